"""One comparison helper and one tolerance table for the whole book.

A kernel passes when, element by element, |out - ref| <= atol + rtol * |ref|,
after its shape and dtype match. NaN or inf never passes, not even where the
reference has the same infinity: the book's ops have finite outputs. Every result also reports the relative L2 error ||out - ref|| / ||ref||,
a single number that says how close, not only whether.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from kernels.tensors import poisoned_outputs

__all__ = ["TOLERANCES", "KERNEL_DTYPES", "Comparison", "compare", "assert_close", "poisoned_outputs",
           "random_tensor", "example_shapes", "example_inputs", "check_case", "check_backend",
           "parameters_without_gradient"]

#: dtype -> (atol, rtol), and why.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    # float64: exact math in a different order; ~1e-16 per op over reductions of a few thousand terms
    torch.float64: (1e-10, 1e-9),
    # float32: unit roundoff 6e-8; a reduction of length L in another order drifts ~sqrt(L) * 6e-8 * |terms|,
    # and softmax/exp amplify it a little. 1e-5/1e-4 holds with margin up to L ~ 10^4.
    torch.float32: (1e-5, 1e-4),
    # float16: unit roundoff 4.9e-4, so one rounding of the output alone is ~5e-4 relative
    torch.float16: (1e-3, 2e-3),
    # bfloat16: unit roundoff 3.9e-3 (8-bit mantissa); one or two output roundings
    torch.bfloat16: (1e-2, 1.6e-2),
}
# Integer outputs (indices, offsets) must match exactly.


@dataclass
class Comparison:
    """The verdict of one comparison, as plain data for a table."""
    name: str
    passed: bool
    shape_ok: bool
    dtype_ok: bool
    max_abs_error: float
    rel_l2_error: float
    worst_excess: float      # max over elements of |out - ref| / (atol + rtol |ref|); <= 1 passes
    atol: float
    rtol: float
    message: str

    def as_dict(self) -> dict:
        return asdict(self)


def compare(out: torch.Tensor, ref: torch.Tensor, name: str = "", atol: float | None = None,
            rtol: float | None = None) -> Comparison:
    """Compare a kernel's output with the reference's; never raises on a mismatch."""
    shape_ok = tuple(out.shape) == tuple(ref.shape)
    dtype_ok = out.dtype == ref.dtype
    if not (shape_ok and dtype_ok):
        msg = f"{name}: got {out.dtype} {list(out.shape)}, expected {ref.dtype} {list(ref.shape)}"
        return Comparison(name, False, shape_ok, dtype_ok, float("inf"), float("inf"), float("inf"),
                          atol or 0.0, rtol or 0.0, msg)
    if ref.dtype.is_floating_point:
        default_atol, default_rtol = TOLERANCES[ref.dtype]
    else:
        default_atol, default_rtol = 0.0, 0.0
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    o, r = out.detach().cpu().double(), ref.detach().cpu().double()
    err = (o - r).abs()
    bound = atol + rtol * r.abs()
    bad = ~(err <= bound)              # NaN or inf anywhere in err fails (so matching infinities fail too)
    if err.isfinite().all():
        max_abs = float(err.max()) if err.numel() else 0.0
        ref_norm = float(r.norm())
        rel_l2 = float((o - r).norm()) / ref_norm if ref_norm > 0 else max_abs
        excess = float((err / bound.clamp_min(1e-300)).max()) if err.numel() else 0.0
    else:
        max_abs = rel_l2 = excess = float("inf")
    n_bad = int(bad.sum())
    passed = n_bad == 0
    if passed:
        msg = f"{name}: ok (max |err| {max_abs:.2e}, rel L2 {rel_l2:.2e})"
    else:
        first = tuple(int(i) for i in bad.nonzero()[0])
        msg = (f"{name}: {n_bad} of {r.numel()} elements out of tolerance (atol {atol:g}, rtol {rtol:g}); "
               f"first at {first}: got {o[first].item()!r}, expected {r[first].item()!r}; "
               f"max |err| {max_abs:.2e}, rel L2 {rel_l2:.2e}")
    return Comparison(name, passed, True, True, max_abs, rel_l2, excess, atol, rtol, msg)


def assert_close(out: torch.Tensor, ref: torch.Tensor, name: str = "", atol: float | None = None,
                 rtol: float | None = None) -> Comparison:
    """`compare`, raising AssertionError with the details when it fails."""
    result = compare(out, ref, name, atol, rtol)
    if not result.passed:
        raise AssertionError(result.message)
    return result


def random_tensor(shape, dtype=torch.float32, device="cpu", generator: torch.Generator | None = None,
                  scale: float = 1.0) -> torch.Tensor:
    """A fresh standard-normal draw (never zeros: zeros hide indexing bugs)."""
    t = torch.randn(shape, generator=generator, dtype=torch.float64) * scale
    return t.to(dtype=dtype, device=device)


#: the float dtypes each backend's kernels take: the check runs every case in each of them
KERNEL_DTYPES = {"reference": (torch.float32, torch.float64), "numba": (torch.float32, torch.float64),
                 "numba_cuda": (torch.float32,), "cupy": (torch.float32,)}


def example_shapes(size: str) -> dict:
    """The sizes every op's examples are drawn at: `tiny` (what numba's CUDA simulator runs), `small`
    (the `small` baseline preset's C, H, G, D at batch 16) or `large` (a GPU's: `make gpu-check`).

    Both are chosen so that a wrong kernel cannot pass by luck: batch B >= 2, T not a multiple of any
    chunk size (16, 32, 64), value width V != key width D, and enough rows that every launch of a
    thread-per-row kernel needs more than one block even at a GPU's 128 threads (tiny: B H V = 160).
    R is the row count of the ops whose kernels give each row a block that reduces across its threads
    (RMSNorm, VQ, the modulated linear, TIES and Adam's R * C): few at `tiny`, because the simulator
    acts out every barrier of every block in Python, but at least two blocks' worth.
    """
    if size == "tiny":
        return dict(B=2, T=19, C=40, H=4, G=2, D=8, V=20, E=3, k=2, window=5, R=6)
    if size == "small":
        from refimpl.baseline import BaselineConfig
        p = BaselineConfig.preset("small")
        return dict(B=16, T=p.max_seq_len - 1, C=p.d_model, H=p.n_heads, G=p.n_kv_heads, D=p.head_dim,
                    V=p.head_dim + p.head_dim // 2, E=4, k=2, window=32, R=16 * (p.max_seq_len - 1))
    if size == "large":       # for a GPU (make gpu-check): enough work per launch to fill one, same rules as above
        return dict(B=8, T=511, C=512, H=8, G=2, D=64, V=96, E=8, k=2, window=128, R=8 * 511)
    raise ValueError(f"example size must be 'tiny', 'small' or 'large', got {size!r}")


def example_inputs(size: str = "tiny", device="cpu", seed: int = 0) -> dict:
    """Every registered op's example inputs, {case name: (op, args, kwargs)}, at `tiny`, `small` or `large` size."""
    from kernels import OP_MODULES
    shapes = example_shapes(size)
    generator = torch.Generator().manual_seed(seed)
    cases = {}
    for module in OP_MODULES:
        for case, (args, kwargs) in module.example_inputs(shapes, generator).items():
            cases[case] = (case.split(" ")[0], _to(args, device=device), _to(kwargs, device=device))
    return cases


def _to(value, device=None, dtype=None):
    """`value` with every tensor moved to `device` and every float tensor cast to `dtype`, inside tuples,
    NamedTuples (a scan's state), lists and dicts too. Fresh tensors: the caller may write to them."""
    if isinstance(value, torch.Tensor):
        cast = dtype if (dtype is not None and value.dtype.is_floating_point) else value.dtype
        return value.to(device=device or value.device, dtype=cast, copy=True)
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_to(v, device, dtype) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device, dtype) for k, v in value.items()}
    return value


def _has_float(value) -> bool:
    """Whether any tensor inside `value` (tuples, lists, dicts) is a float tensor."""
    if isinstance(value, torch.Tensor):
        return value.dtype.is_floating_point
    if isinstance(value, (tuple, list)):
        return any(_has_float(v) for v in value)
    if isinstance(value, dict):
        return any(_has_float(v) for v in value.values())
    return False


def _flatten(value) -> list:
    """An op's result as a flat list of tensors: (o, (C, n, m)) -> [o, C, n, m]; None entries dropped."""
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _flatten(v)]
    return [] if value is None else [value]


def check_case(op: str, kernel, args: tuple, kwargs: dict, dtype: torch.dtype = torch.float32,
               name: str | None = None, reference=None) -> list[Comparison]:
    """The one check: run `kernel` on the case's inputs in `dtype` with its outputs poisoned, and compare
    every output with `op`'s reference computed in float64 from the same inputs.

    Each side gets its own copies of the inputs, so an op that updates arguments in place (its module's
    IN_PLACE_ARGUMENTS, e.g. the Adam step) cannot see the other side's writes; those arguments are
    compared as outputs too. One Comparison per output tensor, named `name[i]`; the expected values are
    the float64 reference rounded to the kernel's dtype, so a float32 kernel must be as close to the exact
    answer as float32 allows, not merely close to another float32 evaluation. `reference` replaces the
    registered reference (a benchmark's step loop, say). A kernel that raises raises here.
    """
    from kernels import OP_MODULES
    from kernels.registry import get
    name = name or op
    in_place = next((m.IN_PLACE_ARGUMENTS[op] for m in OP_MODULES if op in getattr(m, "IN_PLACE_ARGUMENTS", {})), ())
    ref_args, ref_kwargs = _to(args, dtype=torch.float64), _to(kwargs, dtype=torch.float64)
    run_args, run_kwargs = _to(args, dtype=dtype), _to(kwargs, dtype=dtype)
    with torch.no_grad():
        reference = reference or get(op, "reference")
        expected = _flatten(reference(*ref_args, **ref_kwargs)) + [ref_args[i] for i in in_place]
        with poisoned_outputs():
            got = _flatten(kernel(*run_args, **run_kwargs)) + [run_args[i] for i in in_place]
    if len(got) != len(expected):
        return [Comparison(name, False, False, True, float("inf"), float("inf"), float("inf"), 0.0, 0.0,
                           f"{name}: the kernel returned {len(got)} tensors, the reference {len(expected)}")]
    return [compare(g, e.to(dtype) if e.dtype == torch.float64 else e, f"{name}[{i}]" if len(got) > 1 else name)
            for i, (g, e) in enumerate(zip(got, expected))]


def check_backend(backend: str, size: str = "tiny", device="cpu", seed: int = 0,
                  ops: list[str] | tuple[str, ...] | None = None) -> list[Comparison]:
    """`check_case` for every example case of every op `backend` implements (or of `ops`, each of which it
    must implement), in every dtype it takes (KERNEL_DTYPES). Cases in float64 are named `case (float64)`."""
    from kernels.registry import get, registered
    implemented = {op for op, backends in registered().items() if backend in backends}
    if ops is not None:
        missing = sorted(set(ops) - implemented)
        if missing:
            raise ValueError(f"check_backend: {backend!r} implements no {', '.join(missing)}; "
                             f"it implements {', '.join(sorted(implemented))}")
    ops = implemented if ops is None else set(ops)
    results = []
    for case, (op, args, kwargs) in example_inputs(size, device, seed).items():
        if op not in ops:
            continue
        dtypes = KERNEL_DTYPES[backend] if _has_float((args, kwargs)) else (torch.float32,)   # integer-only: once
        for dtype in dtypes:
            name = case if dtype == torch.float32 else f"{case} ({str(dtype).replace('torch.', '')})"
            results += check_case(op, get(op, backend), args, kwargs, dtype, name)
    return results


def parameters_without_gradient(model: torch.nn.Module) -> list[str]:
    """Names of the parameters a backward pass left without a (non-zero) gradient: parts nothing trains."""
    return [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
