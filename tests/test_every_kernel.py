"""The one kernel check, for every registered (op, backend), and the mutation tests that prove it catches
wrong kernels.

`kernels.check.check_backend` (the gate the notebooks and the benchmarks use) runs `check_case` on every
example case of `kernels.check.example_inputs("tiny")`, in every dtype the backend takes, outputs
poisoned, against the reference in float64. The first test runs it per (op, backend).

The mutation tests plant deliberately wrong kernels in the registry (`kernels.registry.replaced`) and
require that same gate to fail, one kind of mistake at a time:

    first block only     numba_cuda, with every launch cut to its first block: what a kernel indexing
                         by threadIdx.x instead of the global index computes
    element 0 copied     the first element of each output's leading dimension (batch, row, parameter)
                         copied over the others: a kernel that computes only batch element 0
    a keyword ignored    each argument that has a default, set back to it (scale, eps, decay, lam, ...)
    an edge regime lost  the mLSTM without its max(|n . q|, e^-m) floor; TIES keeping exactly `keep` of
                         the entries tied at its threshold instead of all of them

Each mutant passing the check would mean the examples cannot see that mistake; each failing proves they can.
"""

from __future__ import annotations

import inspect
import importlib
import math
from contextlib import contextmanager

import pytest
import torch

import kernels
from kernels import launch
from kernels.check import _flatten, check_backend, example_inputs
from kernels.machine import device_for
from kernels.registry import get, registered, replaced
from kernel_testing import skip_unless_runnable
from refimpl import ops

CASES = example_inputs("tiny")
PAIRS = [(op, backend) for op, backends in registered().items() for backend in backends if backend != "reference"]
OPS = sorted(registered())
ONE_THREAD_LAUNCHES = {"_exclusive_scan_one_thread"}   # one thread by design (a scan over E counts)


def _failures(backend: str, op: str) -> list[str]:
    return [r.message for r in check_backend(backend, "tiny", device_for(backend), ops=[op]) if not r.passed]


@pytest.mark.parametrize("op, backend", PAIRS, ids=[f"{op}-{backend}" for op, backend in PAIRS])
def test_kernel_passes_the_check(op, backend):
    skip_unless_runnable(backend)
    results = check_backend(backend, "tiny", device_for(backend), ops=[op])
    assert results, f"{op} has no example case"
    failed = [r.message for r in results if not r.passed]
    assert not failed, "\n".join(failed)


def test_check_backend_refuses_an_op_the_backend_lacks():
    with pytest.raises(ValueError, match="'numba' implements no no_such_op"):
        check_backend("numba", ops=["no_such_op"])


# ---------------------------------------------------------------- what the examples must contain

def _bound_cases(op: str):
    """(case, bound arguments) of every example case of `op`, bound to its numba kernel's signature."""
    signature = inspect.signature(get(op, "numba"))
    return [(case, signature.bind(*args, **kwargs)) for case, (o, args, kwargs) in CASES.items() if o == op]


def _defaults(op: str) -> dict:
    """{argument: default} for the arguments of `op`'s numba kernel that have one."""
    return {name: p.default for name, p in inspect.signature(get(op, "numba")).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _differs(value, default) -> bool:
    if default is None:
        return value is not None
    return value != default


KEYWORDS = [(op, name) for op in OPS for name in _defaults(op)]


@pytest.mark.parametrize("op, keyword", KEYWORDS, ids=[f"{op}-{k}" for op, k in KEYWORDS])
def test_every_keyword_takes_a_value_other_than_its_default(op, keyword):
    default = _defaults(op)[keyword]
    values = [bound.arguments[keyword] for _, bound in _bound_cases(op) if keyword in bound.arguments]
    assert any(_differs(v, default) for v in values), \
        f"{op}: no example case sets {keyword} to anything but its default {default!r}"


@pytest.mark.parametrize("op", OPS)
def test_every_batched_input_has_two_elements_that_differ(op):
    """The batch (leading) dimension of each case's first tensor is at least 2, and its elements differ."""
    for case, (o, args, kwargs) in CASES.items():
        if o != op:
            continue
        first = next(a for a in args if isinstance(a, torch.Tensor))
        assert first.shape[0] >= 2, f"{case}: leading dimension {first.shape[0]}"
        assert not torch.equal(first[0], first[1]), f"{case}: elements 0 and 1 are equal"


def test_sizes_keep_values_and_keys_apart_and_t_off_every_chunk():
    from kernels.check import example_shapes
    for size in ("tiny", "small"):
        shapes = example_shapes(size)
        assert shapes["V"] != shapes["D"] and shapes["B"] >= 2
        assert all(shapes["T"] % chunk for chunk in (16, 32, 64)), f"{size}: T = {shapes['T']}"


@contextmanager
def _recorded_launches(execute: bool = True):
    """Every numba-cuda launch as (kernel name, grid, threads), the launches still run when `execute`."""
    launches, real = [], launch.numba_cuda

    def record(kernel, grid, threads, *args):
        launches.append((getattr(kernel, "__name__", None) or kernel.py_func.__name__, grid, threads))
        if execute:
            real(kernel, grid, threads, *args)
    launch.numba_cuda = record
    try:
        yield launches
    finally:
        launch.numba_cuda = real


@pytest.mark.parametrize("op", [op for op in OPS if "numba_cuda" in registered()[op]])
def test_every_kernel_is_launched_with_more_than_one_block(op):
    """Some case launches each of the op's kernels on two blocks or more: at the simulator's block size, as
    it runs, and at a GPU's, with the launches recorded but not run."""
    skip_unless_runnable("numba_cuda")
    cases = [(args, kwargs) for o, args, kwargs in CASES.values() if o == op]
    for gpu in (False, True):
        real_block_size = launch.block_size
        if gpu:
            launch.block_size = lambda gpu_threads=launch.GPU_BLOCK: gpu_threads
        try:
            with _recorded_launches(execute=not gpu) as launches, torch.no_grad():
                for args, kwargs in cases:
                    get(op, "numba_cuda")(*args, **kwargs)
        finally:
            launch.block_size = real_block_size
        most = {}
        for name, grid, _ in launches:
            most[name] = max(grid, most.get(name, 0))
        single = sorted(name for name, grid in most.items() if grid < 2 and name not in ONE_THREAD_LAUNCHES)
        assert most and not single, f"{op}: never launched on two blocks ({'GPU' if gpu else 'simulator'} sizes): {single}"


# ---------------------------------------------------------------- mutation tests

@pytest.mark.parametrize("op", [op for op in OPS if "numba_cuda" in registered()[op]])
def test_a_kernel_that_runs_only_its_first_block_fails(op, monkeypatch):
    skip_unless_runnable("numba_cuda")
    real = launch.numba_cuda
    monkeypatch.setattr(launch, "numba_cuda", lambda kernel, grid, threads, *args: real(kernel, 1, threads, *args))
    assert _failures("numba_cuda", op), f"{op}: a numba_cuda kernel running only block 0 passed the check"


def _element_0_everywhere(kernel, op):
    from kernels import OP_MODULES
    in_place = next((m.IN_PLACE_ARGUMENTS[op] for m in OP_MODULES if op in getattr(m, "IN_PLACE_ARGUMENTS", {})), ())

    def mutant(*args, **kwargs):
        out = kernel(*args, **kwargs)
        for t in _flatten(out) + [args[i] for i in in_place]:
            if t.dim() and t.shape[0] >= 2:
                t[1:] = t[0]
        return out
    return mutant


@pytest.mark.parametrize("op", OPS)
def test_a_kernel_that_computes_only_element_0_fails(op):
    with replaced(op, "numba", _element_0_everywhere(get(op, "numba"), op)):
        assert _failures("numba", op), f"{op}: a kernel copying element 0 over the rest passed the check"


def _ignoring(kernel, keyword, default):
    signature = inspect.signature(kernel)

    def mutant(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.arguments[keyword] = default
        return kernel(*bound.args, **bound.kwargs)
    return mutant


@pytest.mark.parametrize("op, keyword", KEYWORDS, ids=[f"{op}-{k}" for op, k in KEYWORDS])
def test_a_kernel_that_ignores_a_keyword_fails(op, keyword):
    with replaced(op, "numba", _ignoring(get(op, "numba"), keyword, _defaults(op)[keyword])):
        assert _failures("numba", op), f"{op}: a kernel ignoring {keyword} passed the check"


def _mlstm_without_floor(q, k, v, i_pre, f_pre, initial_state=None):
    """The stabilised mLSTM step loop with max(|n . q|, e^-m) replaced by |n . q|: no floor."""
    C, n, m = (s.clone() for s in initial_state)
    k = k / math.sqrt(q.shape[-1])
    hs = []
    for t in range(q.shape[1]):
        m_new = torch.maximum(f_pre[:, t] + m, i_pre[:, t])
        i_gate, f_gate = torch.exp(i_pre[:, t] - m_new), torch.exp(f_pre[:, t] + m - m_new)
        m = m_new
        C = f_gate[..., None, None] * C + i_gate[..., None, None] * v[:, t, :, :, None] * k[:, t, :, None, :]
        n = f_gate[..., None] * n + i_gate[..., None] * k[:, t]
        read = torch.einsum("bhvk,bhk->bhv", C, q[:, t])
        hs.append(read / (n * q[:, t]).sum(-1).abs()[..., None])
    return torch.stack(hs, dim=1), (C, n, m)


def _ties_keeping_exactly_keep(tau, density=0.2, lam=1.0, sign_rule="mass", divide_by="agreeing"):
    """TIES whose trim keeps exactly `keep` entries per row (torch.topk's), dropping the others tied at the threshold."""
    ties_file = importlib.import_module("refimpl.ops.ties_merge")  # the module (refimpl.ops.ties_merge is the function)
    real_trim = ties_file.trim

    def trim_exactly_keep(tau, density):
        keep = max(1, math.ceil(density * tau.shape[1]))
        chosen = torch.zeros_like(tau, dtype=torch.bool).scatter_(1, tau.abs().topk(keep, dim=1).indices, True)
        return torch.where(chosen, tau, torch.zeros_like(tau))
    ties_file.trim = trim_exactly_keep
    try:
        return ops.ties_merge(tau, density, lam, sign_rule, divide_by)
    finally:
        ties_file.trim = real_trim


EDGE_MUTANTS = {"mlstm": _mlstm_without_floor, "ties_merge": _ties_keeping_exactly_keep}


@pytest.mark.parametrize("op", EDGE_MUTANTS)
def test_a_kernel_that_loses_the_edge_regime_fails(op):
    with replaced(op, "numba", EDGE_MUTANTS[op]):
        assert _failures("numba", op), f"{op}: {EDGE_MUTANTS[op].__doc__.splitlines()[0]} passed the check"


def test_the_edge_mutants_are_right_away_from_the_edge():
    """Each edge mutant matches the reference where its edge is not reached, so what fails above is the edge."""
    (_, args, kwargs), = [c for name, c in CASES.items() if name == "mlstm"]
    q, k, v, i_pre, f_pre = args
    initial = kwargs["initial_state"]
    got, _ = _mlstm_without_floor(q, k, v, i_pre, f_pre, initial)
    expected, _ = kernels.get("mlstm", "reference")(q, k, v, i_pre, f_pre, initial_state=initial)
    torch.testing.assert_close(got, expected)
    tau = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))           # no ties: the same entries kept
    torch.testing.assert_close(_ties_keeping_exactly_keep(tau, 0.3), ops.ties_merge(tau, 0.3))


# ---------------------------------------------------------------- honest swaps in the chapters

def test_every_chapter_swap_that_names_ops_asserts_each_one_ran():
    """A swap naming ops proves something only if the model reached them: each such `kernels.use(..., ops=...)`
    in a chapter is followed, in its cell, by an assert on `never_called()` (which nbmake then executes)."""
    import json
    import re
    from pathlib import Path
    unchecked = []
    for notebook in sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb")):
        for cell in json.loads(notebook.read_text())["cells"]:
            source = "".join(cell["source"])
            for swap in re.finditer(r"kernels\.use\([^)]*ops=[^)]*\)(?: as (\w+))?", source):
                name = swap.group(1)
                if not name or not re.search(rf"assert not {name}\.never_called\(\)", source[swap.end():]) \
                        and not re.search(rf"for \w+ in \([^)]*\b{name}\b", source[swap.end():]):
                    unchecked.append(f"{notebook.name}: {swap.group(0)}")
    assert not unchecked, "swaps whose kernels are never shown to run:\n" + "\n".join(unchecked)
