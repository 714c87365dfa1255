"""The kernel registry: (op name, backend) -> callable, and `use` to swap them in.

    kernels.get("rms_norm", "numba")          # one kernel, or an error listing what exists
    with kernels.use("numba"):                # every op that has a numba kernel, for this block
        logits, _ = model(idx)

Swapping rebinds the op's name in the module that defines its reference
(`refimpl.ops.rms_norm`, say). Models call ops through their module, so they
pick the kernel up; nothing falls back silently: an op is swapped or it is not,
and `use` returns the list of what it swapped.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable

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


@contextmanager
def use(backend: str, ops: list[str] | tuple[str, ...] | None = None):
    """Within the block, models run the `backend` kernels instead of the reference ops.

    ops=None swaps every op the backend implements; naming ops swaps exactly
    those (each must exist). Yields the list of swapped op names. A backend
    this machine cannot run (see `kernels.backend_status`) is refused up front.
    """
    from kernels.machine import backend_status  # late import: machine imports torch/numba

    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; the backends are {BACKENDS}")
    problem = backend_status().get(backend)
    if problem is not None and problem.startswith("unavailable"):
        raise RuntimeError(f"backend {backend!r} cannot run on this machine: {problem}")
    names = list(ops) if ops is not None else [op for op, bs in registered().items() if backend in bs]
    kernels = {name: get(name, backend) for name in names}  # raises KernelNotFound first
    originals = []
    try:
        for name, kernel in kernels.items():
            reference = get(name, "reference")
            module = sys.modules[reference.__module__]
            originals.append((module, reference.__name__, getattr(module, reference.__name__)))
            setattr(module, reference.__name__, kernel)
        yield names
    finally:
        for module, attr, original in reversed(originals):
            setattr(module, attr, original)
