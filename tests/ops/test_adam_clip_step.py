"""The fused Adam + clipping kernels against `refimpl.ops.adam_clip_step`, on every backend.

The op's output is only the gradient norm; its real results are the three buffers it updates in
place (param, exp_avg, exp_avg_sq). So every test here compares all four after each run, and
checks that grad is left alone. (`kernels.check.check_backend` compares outputs only, and runs the
reference and the kernel on the same tensors one after the other, so for this op it sees the norm
and nothing else.)

Ground truth is the reference run in float64 from the same inputs. The float64 numba kernel must
match it to the book's float64 tolerance, after one step and after 100 chained steps; the float32
kernels are held to a bound worked out from the arithmetic (see `_fp32_tolerance`). Sizes N = 1,
37 (under a warp), 1025 (a block and one), 70000 (many blocks, several grid-stride turns). The
runs start from non-zero moments at step > 1, as mid-training, with gradient sizes varying from
step to step so that clipping is active on some steps and not on others. numba_cuda runs through
numba's CUDA simulator when there is no GPU (slow: only small sizes run there, the others skip
with a reason); cupy cases need a GPU and skip with a reason elsewhere, while the CUDA C is
compile-checked with nvcc and NVRTC wherever they exist.

The last part tests the reference op itself: on one flat buffer it must do exactly what
`torch.nn.utils.clip_grad_norm_` followed by `torch.optim.Adam(...).step()` do on the same numbers
split over several tensors; in float64 the two agree to ~1e-15 step after step, so those comparisons
use atol = rtol = 1e-12 (tighter than the book's float64 tolerance), clipping on some steps and not
on others, with and without weight decay, and with no clipping at all; then bad arguments.
"""

from __future__ import annotations

import copy

import pytest
import torch

import kernels
from kernels import adam_clip_step as adam_kernels
from kernels.check import assert_close, random_tensor
from kernels.machine import device_for
from kernel_testing import BACKEND_DTYPES, one_torch_thread, skip_unless_runnable  # noqa: F401 (a fixture)
from refimpl import ops, optim

SIZES = [pytest.param(N, id=f"N{N}") for N in (1, 37, 1025, 70000)]
MODES = {  # id -> hyperparameters; "clip" gets max_norm = the median step's gradient norm (see _run_inputs)
    "clip-wd": dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.05, clip=True),
    "noclip-nowd": dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, clip=False),
}
# The simulator takes ~40 ms per step at N = 37 (two blocks of 32 threads: the atomic sees two partial sums)
# and ~250 ms at N = 1025. There, one step runs at N <= 1025 and the 100-step chains at N = 37 only.
SIMULATOR_ONE_STEP_MAX_N = 1025
SIMULATOR_CHAINED_N = 37
FIRST_STEP = 6                # runs continue a training run: the first call is step 6


def _fp32_tolerance(steps: int) -> float:
    """Relative error bound for float32 kernels after `steps` chained steps, against float64 from the same inputs.

    Each step rounds every stored value a few times (u = 2^-24 ~ 6e-8 per rounding): m and v are each
    two products and a sum, and param one product, a division, a square root and a difference, with
    the clip coefficient and the host constants (1 - b1, step_size, ...) rounded once to float32.
    Four roundings per step, each relative to the size of the quantity's own terms, bound it well.
    The recurrences do not amplify these errors: m <- b1 m + ..., v <- b2 v + ... shrink old errors
    (b < 1), the gradients are given (not computed from the drifting params), and param's update,
    lr_t * m / (sqrt(v) + eps), is O(lr), so an error in m or v reaches param multiplied by lr.
    The errors can therefore add up at worst linearly in the number of steps:
        |err| <= 4 * steps * u * (|x| + scale_x)      (scale_x: the largest magnitude x's terms reach)
    For 100 steps that is 2.4e-5; in practice errors partly cancel (a random walk) and come out well
    under it. Not the book's fixed float32 tolerance: that one is for a single computation, not 100.
    """
    return 4 * steps * 2.0 ** -24


def _run_inputs(N, steps, dtype, device, clip, seed=0):
    """(param, exp_avg, exp_avg_sq, grads [steps], max_norm or None), drawn in float64 and then cast.

    Moments are non-zero, as after some steps (m ~ 0.3 g, v ~ g^2); each step's gradient has its own
    size (a factor e^-1 .. e), and max_norm is the median of their norms, so about half the steps clip.
    """
    g = torch.Generator().manual_seed(seed)
    param = random_tensor((N,), torch.float64, generator=g)
    exp_avg = random_tensor((N,), torch.float64, generator=g, scale=0.3)
    exp_avg_sq = random_tensor((N,), torch.float64, generator=g) ** 2 + 0.1
    sizes = torch.exp(2 * torch.rand(steps, generator=g, dtype=torch.float64) - 1)
    grads = [random_tensor((N,), torch.float64, generator=g) * s for s in sizes]
    cast = [t.to(dtype=dtype, device=device) for t in (param, exp_avg, exp_avg_sq, *grads)]
    param, exp_avg, exp_avg_sq, grads = cast[0], cast[1], cast[2], cast[3:]
    max_norm = float(torch.stack([gr.double().norm() for gr in grads]).median()) if clip else None
    return param, exp_avg, exp_avg_sq, grads, max_norm


def _run(backend, param, exp_avg, exp_avg_sq, grads, max_norm, hyper, first_step=FIRST_STEP):
    """Run `len(grads)` chained steps in place; return the norms (floats) each step reported."""
    step_fn = kernels.get("adam_clip_step", backend)
    kwargs = {k: v for k, v in hyper.items() if k != "clip"}
    norms = []
    for t, grad in enumerate(grads, start=first_step):
        before = grad.clone()
        norm = step_fn(param, grad, exp_avg, exp_avg_sq, step=t, max_norm=max_norm, **kwargs)
        assert norm.dim() == 0 and norm.dtype == param.dtype, f"{backend}: norm is {norm.dtype} {list(norm.shape)}"
        assert torch.equal(grad, before), f"{backend}: step {t} modified grad"
        norms.append(float(norm))
    return norms


def _check_run(backend, dtype, N, mode, steps):
    hyper = MODES[mode]
    param, exp_avg, exp_avg_sq, grads, max_norm = _run_inputs(N, steps, dtype, device_for(backend), hyper["clip"])
    # the float64 reference, from exactly the same (possibly float32) numbers, in buffers of its own
    expected = [t.detach().cpu().double().clone() for t in (param, exp_avg, exp_avg_sq)]
    # the magnitudes each buffer's terms reach, for the float32 bound: m averages the gradients g + wd p
    # (|coef| <= 1), v their squares, and param moves by at most ~lr per step from where it starts
    p_max = float(expected[0].abs().max()) + hyper["lr"] * steps
    G = max(float(gr.abs().max()) for gr in grads) + hyper["weight_decay"] * p_max
    scales = {"param": p_max, "exp_avg": max(G, float(expected[1].abs().max())),
              "exp_avg_sq": max(G * G, float(expected[2].abs().max()))}

    expected_norms = _run("reference", *expected, [gr.cpu().double() for gr in grads], max_norm, hyper)
    if max_norm is not None and steps > 1:
        clipped = sum(n > max_norm for n in expected_norms)
        assert 0 < clipped < steps, "the run should clip on some steps and not on others"
    got_norms = _run(backend, param, exp_avg, exp_avg_sq, grads, max_norm, hyper)

    name = f"adam_clip_step[{backend}, {dtype}] N={N} {mode}, {steps} step(s)"
    for (what, scale), out, ref in zip(scales.items(), (param, exp_avg, exp_avg_sq), expected):
        if dtype == torch.float64:
            assert_close(out, ref, f"{name}: {what}")                                # the float64 tolerance
        else:
            tol = _fp32_tolerance(steps)
            assert_close(out.cpu().double(), ref, f"{name}: {what}", atol=tol * scale, rtol=tol)
    # the norm depends on grad only, so it never drifts: the buffers' dtype's own tolerance
    assert_close(torch.tensor(got_norms, dtype=dtype), torch.tensor(expected_norms, dtype=dtype), f"{name}: norms")


def _skip_if_too_slow(backend, N, steps):
    skip_unless_runnable(backend)
    if backend == "numba_cuda" and kernels.cuda_simulator_enabled():
        if (steps == 1 and N > SIMULATOR_ONE_STEP_MAX_N) or (steps > 1 and N != SIMULATOR_CHAINED_N):
            pytest.skip(f"{steps} step(s) at N = {N} are too slow for the CUDA simulator; runs on a GPU")


# ---------------------------------------------------------------- kernel vs reference

@pytest.mark.parametrize("mode", MODES, ids=MODES.keys())
@pytest.mark.parametrize("N", SIZES)
@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
def test_adam_one_step_vs_reference(backend, dtype, N, mode):
    _skip_if_too_slow(backend, N, steps=1)
    _check_run(backend, dtype, N, mode, steps=1)


@pytest.mark.parametrize("mode", MODES, ids=MODES.keys())
@pytest.mark.parametrize("N", SIZES)
@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
def test_adam_100_chained_steps_vs_reference(backend, dtype, N, mode):
    """The moments each kernel leaves are what its next step reads: 100 steps, state carried in place."""
    _skip_if_too_slow(backend, N, steps=100)
    _check_run(backend, dtype, N, mode, steps=100)


@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
def test_adam_zero_gradient_and_first_step(backend, dtype):
    """Step 1 from zero moments (a fresh optimiser), then an all-zero gradient: norm 0, no 0/0 in the clip."""
    skip_unless_runnable(backend)
    device = device_for(backend)
    g = torch.Generator().manual_seed(3)
    param = random_tensor((33,), dtype, device, generator=g)
    grads = [random_tensor((33,), dtype, device, generator=g), torch.zeros(33, dtype=dtype, device=device)]
    runs = {}
    for who in ("reference", backend):
        buffers = [param.clone(), torch.zeros_like(param), torch.zeros_like(param)]
        norms = _run(who, *buffers, grads, 0.5, MODES["clip-wd"], first_step=1)
        runs[who] = buffers, norms
    assert runs[backend][1][1] == 0.0
    for what, out, ref in zip(("param", "exp_avg", "exp_avg_sq"), runs[backend][0], runs["reference"][0]):
        assert_close(out, ref, f"adam_clip_step[{backend}] from step 1, then a zero gradient: {what}")


@pytest.mark.parametrize("backend", ["numba", "numba_cuda", "cupy"])
def test_adam_kernel_on_parameters_that_require_grad(backend):
    """A model's parameters require grad; the step is outside autograd, as torch optimisers' steps are.
    The kernels write through raw views, and still bump the version counters, as in-place torch ops do."""
    skip_unless_runnable(backend)
    device = device_for(backend)
    param, exp_avg, exp_avg_sq, (grad,), _ = _run_inputs(40, 1, torch.float32, device, False, seed=4)
    param.requires_grad_()
    expected = [t.detach().clone() for t in (param, exp_avg, exp_avg_sq)]
    kernels.get("adam_clip_step", "reference")(*expected[:1], grad, *expected[1:], step=3, max_norm=1.0)
    versions = [t._version for t in (param, exp_avg, exp_avg_sq)]
    kernels.get("adam_clip_step", backend)(param, grad, exp_avg, exp_avg_sq, step=3, max_norm=1.0)
    assert all(t._version > v for t, v in zip((param, exp_avg, exp_avg_sq), versions))
    for what, out, ref in zip(("param", "exp_avg", "exp_avg_sq"), (param.detach(), exp_avg, exp_avg_sq), expected):
        assert_close(out, ref, f"adam_clip_step[{backend}] on a parameter that requires grad: {what}")


@pytest.mark.parametrize("backend", ["numba_cuda", "cupy"])
def test_adam_at_gpu_size(backend):
    N = (1 << 22) + 3                          # 4M elements: ~4000 blocks' worth, the reduction's grid-stride loop
    skip_unless_runnable(backend, work=N)
    if kernels.cuda_simulator_enabled():
        pytest.skip("too large for the CUDA simulator; runs on a GPU")
    _check_run(backend, torch.float32, N, "clip-wd", steps=10)


# ---------------------------------------------------------------- FlatAdam with a kernel swapped in

def test_flat_adam_with_the_numba_kernel_equals_the_reference():
    """FlatAdam.step calls refimpl.ops.adam_clip_step at call time, so kernels.use swaps the kernel in."""
    torch.manual_seed(6)
    model = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.GELU(), torch.nn.Linear(9, 2)).double()
    twin = copy.deepcopy(model)
    x, y = torch.randn(20, 6, dtype=torch.float64), torch.randn(20, 2, dtype=torch.float64)
    reference, fast = (optim.FlatAdam(m.parameters(), lr=1e-2, weight_decay=0.01, max_norm=0.3) for m in (model, twin))
    for step in range(30):
        reference.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        reference.step()
        fast.zero_grad()
        torch.nn.functional.mse_loss(twin(x), y).backward()
        with kernels.use("numba", ops=["adam_clip_step"]):
            assert ops.adam_clip_step.__wrapped__ is adam_kernels.adam_clip_step_numba   # behind a call counter
            fast.step()
        assert_close(fast.last_norm, reference.last_norm, f"step {step}: norm")
    assert ops.adam_clip_step is kernels.get("adam_clip_step", "reference")          # put back after the block
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert_close(q, p, f"FlatAdam with the numba kernel: {name}")


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_adam_bad_arguments_are_value_errors(backend):
    step_fn = kernels.get("adam_clip_step", backend)
    p, m, v, (g,), _ = _run_inputs(8, 1, torch.float32, "cpu", False)
    with pytest.raises(ValueError, match=r"grad must be \[N\] = \[8\], got \[7\]"):
        step_fn(p, g[:7], m, v, step=1)
    with pytest.raises(ValueError, match=r"exp_avg must be \[N\] = \[8\], got \[2, 4\]"):
        step_fn(p, g, m.view(2, 4), v, step=1)
    with pytest.raises(ValueError, match="exp_avg_sq must have param's dtype torch.float32, got torch.float64"):
        step_fn(p, g, m, v.double(), step=1)
    with pytest.raises(ValueError, match="param must be contiguous"):
        step_fn(torch.stack([p, p], 1)[:, 0], g, m, v, step=1)
    with pytest.raises(ValueError, match="step must be an int >= 1"):
        step_fn(p, g, m, v, step=0)
    with pytest.raises(ValueError, match=r"beta2 must be in \[0, 1\)"):
        step_fn(p, g, m, v, step=1, beta2=1.0)
    with pytest.raises(ValueError, match="lr must be > 0"):
        step_fn(p, g, m, v, step=1, lr=0.0)
    with pytest.raises(ValueError, match="max_norm must be > 0"):
        step_fn(p, g, m, v, step=1, max_norm=-1.0)
    with pytest.raises(ValueError, match="weight_decay must be >= 0"):
        step_fn(p, g, m, v, step=1, weight_decay=-0.1)
    with pytest.raises(ValueError, match="every size must be >= 1, got N = 0"):
        step_fn(p[:0], g[:0], m[:0], v[:0], step=1)


def test_adam_kernels_refuse_wrong_dtypes_and_devices():
    p, m, v, (g,), _ = _run_inputs(8, 1, torch.float32, "cpu", False)
    with pytest.raises(ValueError, match="param must be float32, float64, got bfloat16"):
        kernels.get("adam_clip_step", "numba")(*(t.bfloat16() for t in (p, g, m, v)), step=1)
    with pytest.raises(ValueError, match="param must be float32, got float64"):
        kernels.get("adam_clip_step", "numba_cuda")(*(t.double() for t in (p, g, m, v)), step=1)
    with pytest.raises(ValueError, match="cpu tensor but cupy kernels run on a CUDA GPU"):
        kernels.get("adam_clip_step", "cupy")(p, g, m, v, step=1)


# The CUDA C compile checks (nvcc and NVRTC) are in tests/test_kernels.py, over kernels.OP_MODULES.

def test_cupy_reduction_block_matches_the_cuda_source():
    assert f"#define ADAM_BLOCK {adam_kernels.CUPY_REDUCE_BLOCK} " in adam_kernels.CU_SOURCE.read_text()


# ---------------------------------------------------------------- the reference op: against torch's clip + Adam

TIGHT = dict(atol=1e-12, rtol=1e-12)
SHAPES = [(3, 4), (5,), (2, 1, 3), (1,)]                  # a few parameter tensors, 24 numbers in all


def _numbers(steps, seed=0):
    """Initial parameter values [24] and `steps` gradients [24], each step's with its own size (e^-1.5 .. e^1.5)."""
    g = torch.Generator().manual_seed(seed)
    N = sum(torch.Size(s).numel() for s in SHAPES)
    start = random_tensor((N,), torch.float64, generator=g)
    sizes = torch.exp(3 * torch.rand(steps, generator=g, dtype=torch.float64) - 1.5)
    return start, [random_tensor((N,), torch.float64, generator=g) * s for s in sizes]


def _split(flat):
    """A flat [24] vector as tensors of SHAPES (copies)."""
    out, start = [], 0
    for shape in SHAPES:
        n = torch.Size(shape).numel()
        out.append(flat[start:start + n].reshape(shape).clone())
        start += n
    return out


def _flatten(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


@pytest.mark.parametrize("foreach", [False, None], ids=["foreach=False", "foreach=default"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05], ids=["wd0", "wd0.05"])
@pytest.mark.parametrize("clip", [True, False], ids=["clip", "noclip"])
def test_adam_clip_step_equals_clip_grad_norm_then_torch_adam(clip, weight_decay, foreach):
    steps, lr, betas, eps = 100, 1e-2, (0.9, 0.999), 1e-8
    start, grads = _numbers(steps)
    norms = torch.stack([g.norm() for g in grads])
    max_norm = float(norms.median()) if clip else None
    if clip:
        assert 0 < int((norms > max_norm).sum()) < steps          # clips on some steps, not on others

    # torch: several tensors, clip_grad_norm_ then Adam
    params = [torch.nn.Parameter(t) for t in _split(start)]
    torch_adam = torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach)
    # the op: one flat buffer each
    param, exp_avg, exp_avg_sq = start.clone(), torch.zeros_like(start), torch.zeros_like(start)

    for t, grad in enumerate(grads, start=1):
        for p, g in zip(params, _split(grad)):
            p.grad = g
        if clip:
            expected_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        else:
            expected_norm = torch.linalg.vector_norm(_flatten([p.grad for p in params]))
        torch_adam.step()

        grad_before = grad.clone()
        norm = ops.adam_clip_step(param, grad, exp_avg, exp_avg_sq, step=t, lr=lr, beta1=betas[0],
                                    beta2=betas[1], eps=eps, weight_decay=weight_decay, max_norm=max_norm)
        assert torch.equal(grad, grad_before), "grad must not be modified"
        assert norm.dim() == 0 and norm.dtype == torch.float64
        assert_close(norm, expected_norm, f"step {t}: norm", **TIGHT)
        assert_close(param, _flatten([p.detach() for p in params]), f"step {t}: params", **TIGHT)
    states = [torch_adam.state[p] for p in params]
    assert_close(exp_avg, _flatten([s["exp_avg"] for s in states]), "exp_avg after 100 steps", **TIGHT)
    assert_close(exp_avg_sq, _flatten([s["exp_avg_sq"] for s in states]), "exp_avg_sq after 100 steps", **TIGHT)


def test_adam_clip_step_zero_gradient_is_not_a_division_by_zero():
    param, zero = torch.ones(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    norm = ops.adam_clip_step(param, zero, zero.clone(), zero.clone(), step=1, max_norm=1.0)
    assert float(norm) == 0.0 and torch.equal(param, torch.ones(4, dtype=torch.float64))


def test_adam_clip_step_bad_arguments_are_value_errors():
    p = torch.zeros(6)
    ok = dict(step=1)
    with pytest.raises(ValueError, match=r"grad must be \[N\] = \[6\], got \[5\]"):
        ops.adam_clip_step(p, p[:5], p.clone(), p.clone(), **ok)
    with pytest.raises(ValueError, match=r"param must be \[N\], got \[2, 3\]"):
        ops.adam_clip_step(p.view(2, 3), p, p, p, **ok)
    with pytest.raises(ValueError, match=r"grad must be a floating-point tensor \[N\], got torch.int64"):
        ops.adam_clip_step(p, torch.zeros(6, dtype=torch.long), p, p, **ok)
    with pytest.raises(ValueError, match="exp_avg must have param's dtype torch.float32, got torch.float64"):
        ops.adam_clip_step(p, p, p.double(), p, **ok)
    with pytest.raises(ValueError, match="exp_avg_sq must be contiguous"):
        ops.adam_clip_step(p, p, p, torch.zeros(12)[::2], **ok)
    with pytest.raises(ValueError, match="every size must be >= 1, got N = 0"):
        ops.adam_clip_step(p[:0], p[:0], p[:0], p[:0], **ok)
    with pytest.raises(ValueError, match="exp_avg and exp_avg_sq share memory"):
        ops.adam_clip_step(p.clone(), p.clone(), p, p, **ok)
    buffer = torch.zeros(20)
    with pytest.raises(ValueError, match="param and grad share memory"):
        ops.adam_clip_step(buffer[:6], buffer[5:11], p.clone(), torch.zeros(6), **ok)   # overlapping by one
    ops.adam_clip_step(buffer[:6], buffer[6:12], buffer[12:18], torch.zeros(6), **ok)   # adjacent is fine
    for kwargs, message in [(dict(step=0), "step must be an int >= 1"), (dict(step=2.0), "step must be an int >= 1"),
                            (dict(step=True), "step must be an int >= 1"), (dict(step=1, lr=0), "lr must be > 0"),
                            (dict(step=1, lr=float("nan")), "lr must be a finite number"),
                            (dict(step=1, beta1=1.0), r"beta1 must be in \[0, 1\)"),
                            (dict(step=1, beta2=-0.1), "beta2 must be >= 0"),
                            (dict(step=1, eps=0.0), "eps must be > 0"),
                            (dict(step=1, weight_decay=-1e-3), "weight_decay must be >= 0"),
                            (dict(step=1, max_norm=0.0), "max_norm must be > 0")]:
        with pytest.raises(ValueError, match=message):
            ops.adam_clip_step(p, p.clone(), p.clone(), p.clone(), **kwargs)
