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

__all__ = ["TOLERANCES", "Comparison", "compare", "assert_close", "poisoned_outputs", "random_tensor",
           "example_shapes", "example_inputs", "check_backend", "parameters_without_gradient"]

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


def example_shapes(size: str) -> dict:
    """The sizes every shared op's examples use: `tiny` (simulator-friendly) or `small`, which is the
    `small` baseline preset (C, H, G, D, T) at batch 16, with 4 experts top-2 and a window of 32."""
    if size == "tiny":
        return dict(B=1, T=9, C=12, H=2, G=1, D=8, E=3, k=2, window=4)
    if size == "small":
        from refimpl.baseline import BaselineConfig
        p = BaselineConfig.preset("small")
        return dict(B=16, T=p.max_seq_len, C=p.d_model, H=p.n_heads, G=p.n_kv_heads, D=p.head_dim, E=4, k=2, window=32)
    raise ValueError(f"example size must be 'tiny' or 'small', got {size!r}")


def example_inputs(size: str = "tiny", device="cpu", seed: int = 0) -> dict:
    """Every registered op's example inputs, {case name: (op, args, kwargs)}, at `tiny` or `small` size."""
    from kernels import OP_MODULES
    shapes = example_shapes(size)
    generator = torch.Generator().manual_seed(seed)
    cases = {}
    for module in OP_MODULES:
        for case, (args, kwargs) in module.example_inputs(shapes, generator).items():
            cases[case] = (case.split(" ")[0], _to_device(args, device), _to_device(kwargs, device))
    return cases


def _to_device(value, device):
    """Tensors moved to `device`, inside tuples, NamedTuples, lists and dicts too (a state may be a tuple of tensors)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple) and hasattr(value, "_fields"):                      # a NamedTuple state
        return type(value)(*(_to_device(v, device) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def _clone(args: tuple) -> tuple:
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def _flatten(value) -> list:
    """An op's result as a flat list of tensors: (o, (C, n, m)) -> [o, C, n, m]."""
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _flatten(v)]
    return [value]


def check_backend(backend: str, size: str = "tiny", device="cpu", seed: int = 0) -> list[Comparison]:
    """Run `backend`'s kernel for every example case against the reference, outputs poisoned.

    Ops returning several tensors give one Comparison per output (named op[i]). An op that updates some of
    its arguments in place (a kernel module's IN_PLACE_ARGUMENTS: {op: argument positions}, e.g. the Adam
    step) runs on fresh copies for each side, and the updated arguments are compared as outputs too.
    """
    from kernels import OP_MODULES
    from kernels.registry import get
    in_place = {op: positions for module in OP_MODULES for op, positions in getattr(module, "IN_PLACE_ARGUMENTS", {}).items()}
    results = []
    with torch.no_grad():
        for case, (op, args, kwargs) in example_inputs(size, device, seed).items():
            if op in in_place:                        # each side steps its own copy; the updated buffers are results too
                ref_args, args = _clone(args), _clone(args)
                expected = (get(op, "reference")(*ref_args, **kwargs),) + tuple(ref_args[i] for i in in_place[op])
                got = (get(op, backend)(*args, **kwargs),) + tuple(args[i] for i in in_place[op])
            else:
                expected = get(op, "reference")(*args, **kwargs)
                with poisoned_outputs():
                    got = get(op, backend)(*args, **kwargs)
            if isinstance(expected, tuple):
                got, expected = _flatten(got), _flatten(expected)
                if len(got) != len(expected):
                    raise AssertionError(f"{case}: {backend} returned {len(got)} tensors, the reference {len(expected)}")
                results += [compare(g, e, f"{case}[{i}]") for i, (g, e) in enumerate(zip(got, expected))]
            else:
                results.append(compare(got, expected, case))
    return results


def parameters_without_gradient(model: torch.nn.Module) -> list[str]:
    """Names of the parameters a backward pass left without a (non-zero) gradient: parts nothing trains."""
    return [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
