"""The kernel registry: (op name, backend) -> callable, and `use` to swap them in.

    kernels.get("rms_norm", "numba")          # one kernel, or an error listing what exists
    with kernels.use("numba"):                # every op that has a numba kernel, for this block
        logits, _ = model(idx)

Swapping rebinds the op's name in the `refimpl.ops` package (`refimpl.ops.rms_norm`,
say). Models call every op through that package, so they pick the kernel up;
nothing falls back silently: an op is swapped or it is not,
and `use` yields what it swapped and counts each kernel's calls, so a swap that
the model never reached (a layer taking another path) shows as never called.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Callable

from refimpl import ops as refimpl_ops

BACKENDS = ("reference", "numba", "numba_cuda", "cupy")

_REGISTRY: dict[tuple[str, str], Callable] = {}


class KernelNotFound(LookupError):
    """No kernel is registered for an (op, backend) pair; the message lists what is."""


def register(op: str, backend: str):
    """Decorator: file `fn` as the `backend` kernel of `op`."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; the backends are {BACKENDS}")

    def decorate(fn: Callable) -> Callable:
        if (op, backend) in _REGISTRY:
            raise ValueError(f"{op!r} already has a {backend!r} kernel: {_REGISTRY[(op, backend)].__qualname__}")
        _REGISTRY[(op, backend)] = fn
        return fn

    return decorate


def registered() -> dict[str, list[str]]:
    """{op: [backends that implement it]}, in BACKENDS order."""
    table: dict[str, list[str]] = {}
    for op, backend in _REGISTRY:
        table.setdefault(op, [])
    for op in table:
        table[op] = [b for b in BACKENDS if (op, b) in _REGISTRY]
    return dict(sorted(table.items()))


def _listing() -> str:
    return "; ".join(f"{op}: {', '.join(bs)}" for op, bs in registered().items()) or "nothing yet"


def get(op: str, backend: str) -> Callable:
    """The kernel for (op, backend); KernelNotFound lists every pair that exists."""
    try:
        return _REGISTRY[(op, backend)]
    except KeyError:
        raise KernelNotFound(f"no kernel for op {op!r} on backend {backend!r}. Registered: {_listing()}") from None


@contextmanager
def replaced(op: str, backend: str, kernel: Callable):
    """Within the block, `kernel` is the registered (op, backend) kernel: how the mutation tests plant a
    deliberately wrong kernel where the check will find it. The original comes back afterwards."""
    original = get(op, backend)
    _REGISTRY[(op, backend)] = kernel
    try:
        yield kernel
    finally:
        _REGISTRY[(op, backend)] = original


class Swap(list):
    """What `use` swapped in: the op names (it is a list of them), and how many times each kernel ran.

        with kernels.use("numba", ops=["mlstm"]) as swapped:
            model(idx)
        swapped.calls            # {"mlstm": 4}
        swapped.never_called()   # ops swapped in that the model never reached: a swap that proved nothing
    """

    def __init__(self, backend: str, names: list[str]):
        super().__init__(names)
        self.backend = backend
        self.calls = {name: 0 for name in names}

    def never_called(self) -> list[str]:
        """The swapped ops whose kernel did not run once inside the block."""
        return [name for name, count in self.calls.items() if count == 0]

    def summary(self) -> str:
        """One line: each op and how many calls its kernel took, then any op that never ran."""
        ran = ", ".join(f"{name} x{count}" for name, count in self.calls.items() if count)
        idle = self.never_called()
        return (f"{self.backend} kernels that ran: {ran or 'none'}"
                + (f"; swapped in but never called: {', '.join(idle)}" if idle else ""))


def _counted(kernel: Callable, name: str, swap: Swap) -> Callable:
    """`kernel`, adding one to swap.calls[name] on every call."""
    @functools.wraps(kernel)
    def counted(*args, **kwargs):
        swap.calls[name] += 1
        return kernel(*args, **kwargs)
    return counted


def _public_name(op: str) -> str:
    """The name under which models reach `op` in `refimpl.ops`: its reference's name, which must be exported
    there (a reference that models cannot reach through the package is a swap that would do nothing)."""
    reference = get(op, "reference")
    attr = reference.__name__
    if attr not in refimpl_ops.__all__:
        raise KernelNotFound(f"op {op!r}: its reference {reference.__module__}.{attr} is not exported by refimpl.ops, "
                             f"so no model calling refimpl.ops would see a swap")
    return attr


@contextmanager
def use(backend: str, ops: list[str] | tuple[str, ...] | None = None):
    """Within the block, models run the `backend` kernels instead of the reference ops.

    ops=None swaps every op the backend implements; naming ops swaps exactly
    those (each must exist). Yields a `Swap`: the list of swapped op names, with
    the number of calls each kernel took (`never_called()` names the ones that
    did not run). A backend this machine cannot run (see
    `kernels.backend_status`) is refused up front.
    """
    from kernels.machine import backend_status  # late import: machine imports torch/numba

    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; the backends are {BACKENDS}")
    problem = backend_status().get(backend)
    if problem is not None and problem.startswith("unavailable"):
        raise RuntimeError(f"backend {backend!r} cannot run on this machine: {problem}")
    names = list(ops) if ops is not None else [op for op, bs in registered().items() if backend in bs]
    kernels = {name: get(name, backend) for name in names}  # raises KernelNotFound first
    swap = Swap(backend, names)
    originals = []
    try:
        for name, kernel in kernels.items():
            attr = _public_name(name)
            originals.append((refimpl_ops, attr, getattr(refimpl_ops, attr)))
            setattr(refimpl_ops, attr, _counted(kernel, name, swap))
        yield swap
    finally:
        for module, attr, original in reversed(originals):
            setattr(module, attr, original)
