"""The Mamba-3 scan kernels against the step loop, on every backend, at awkward shapes.

Ground truth is `refimpl.ops.mamba3_scan_recurrent`, in the kernel's own dtype and from the same
inputs. Outputs are poisoned with NaN before a kernel writes them. numba_cuda runs through numba's
CUDA simulator when there is no GPU (slow: keep shapes tiny; the GPU-size case then skips with a
reason); cupy cases need a GPU and skip with a reason elsewhere, while the CUDA C is compile-checked
with nvcc and NVRTC (tests/test_kernels.py, every module in kernels.OP_MODULES) wherever they exist.
The next parts run a whole `Mamba3Layer` with the numba scan swapped in, and feed the kernels bad input.
The last tests the reference op itself: reduction to the S6 scan, carried state, the matrix forms
(values and gradients) against the step loop, the rotating state, the trapezoid by hand, bad arguments.

About the angle. Every output is compared with `assert_close` at the dtype's tolerance, except the
returned angle phi, which is compared through cos(phi) and sin(phi) (what the scan uses it for):
phi lives on a circle, kept in [0, 2 pi) by a remainder each step, and where the running sum lands
within rounding of a multiple of 2 pi, a kernel whose sum differs by one rounding (an FMA, say) wraps
to ~0 where the reference gives ~2 pi (or the reverse). Those are the same angle, 2 pi apart as
numbers. Where the sums are exact (test_mamba3_angle_wraps_as_torch_remainder) the angles are
compared bit for bit instead.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import mamba3_scan as mamba3_kernels
from kernels.check import assert_close, poisoned_outputs, random_tensor
from kernels.machine import device_for
from kernel_testing import BACKEND_DTYPES, skip_unless_runnable
from refimpl import mamba3, ops
from refimpl.mamba3 import Mamba3Layer
from refimpl.ops import Mamba3ScanState, mamba3_scan, mamba3_scan_parallel, mamba3_scan_recurrent
from refimpl.ops import selective_scan_recurrent


def _inputs(B, T, H, R, P, N, K, dtype, device, seed=0, trap=True):
    """((x, dt, A, Bm, Cm, theta, trap, D), full initial state), drawn in float64 and then cast, so every
    dtype sees the same numbers. K = 0: theta None (no rotation); trap False: trap None (lambda = 1).

    As a Mamba3Layer makes them: dt = softplus(.) (about 0.1 - 3), A = -softplus(.) <= 0, lambda in
    [0, 1), theta = pi tanh(.), B and C of RMS 1 / sqrt(N) (so a read of N terms stays O(1)). The
    initial state has every field, the angle included (without rotation it is passed through)."""
    g = torch.Generator().manual_seed(seed)
    draw = lambda *shape, scale=1.0: random_tensor(shape, torch.float64, generator=g, scale=scale)  # noqa: E731
    x = draw(B, T, H, R, P)
    dt = F.softplus(draw(B, T, H))
    A = -F.softplus(draw(B, T, H))
    Bm, Cm = draw(B, T, H, R, N) / math.sqrt(N), draw(B, T, H, R, N) / math.sqrt(N)
    theta = math.pi * torch.tanh(draw(B, T, H, K)) if K > 0 else None
    lam = torch.rand(B, T, H, generator=g, dtype=torch.float64) if trap else None
    D = draw(H)
    state = Mamba3ScanState(h=draw(B, H, P, N, scale=0.5),
                            angle=2 * math.pi * torch.rand(B, H, max(K, 2), generator=g, dtype=torch.float64),
                            B_prev=draw(B, H, R, N) / math.sqrt(N), x_prev=draw(B, H, R, P))
    if K > 0:
        state = state._replace(angle=state.angle[..., :K])
    cast = lambda t: t.to(dtype=dtype, device=device) if t is not None else None  # noqa: E731
    args = tuple(cast(t) for t in (x, dt, A, Bm, Cm, theta, lam, D))
    return args, Mamba3ScanState(*(cast(t) for t in state))


def _assert_same(got, expected, name, rotating):
    """Compare (y, Mamba3ScanState) with the reference's, output by output (the angle: module docstring)."""
    (y, state), (expected_y, expected_state) = got, expected
    assert isinstance(state, Mamba3ScanState)
    assert_close(y, expected_y, f"{name}: y")
    for part in ("h", "B_prev", "x_prev"):
        assert_close(getattr(state, part), getattr(expected_state, part), f"{name}: final {part}")
    if not rotating:                       # no rotation: the initial angle (or None) is passed through as is
        assert state.angle is expected_state.angle, f"{name}: the angle should be passed through untouched"
        return
    two_pi = torch.tensor(2 * math.pi, dtype=state.angle.dtype)
    assert ((state.angle >= 0) & (state.angle <= two_pi)).all(), f"{name}: angle outside [0, 2 pi]"
    assert_close(state.angle.cos(), expected_state.angle.cos(), f"{name}: cos(final angle)")
    assert_close(state.angle.sin(), expected_state.angle.sin(), f"{name}: sin(final angle)")


def _check_against_step_loop(backend, args, initial_state, name):
    expected = mamba3_scan_recurrent(*args, initial_state=initial_state)
    with poisoned_outputs():
        got = kernels.get("mamba3_scan", backend)(*args, initial_state=initial_state)
    _assert_same(got, expected, name, rotating=args[5] is not None)


# ---------------------------------------------------------------- kernel vs step loop

# id -> (B, T, H, R, P, N, K, trap given); K = 0 means theta None
CASES = {
    "all-sizes-1-K0-no-trap": (1, 1, 1, 1, 1, 1, 0, False),     # every size 1 (N = 1: nothing to turn)
    "B3-T7-H1-R3-P5-N7-K1": (3, 7, 1, 3, 5, 7, 1, True),        # odd everything; N odd (dim 6 has no partner)
    "B1-T11-H3-R2-P3-N10-K5": (1, 11, 3, 2, 3, 10, 5, True),    # K = N/2: every pair turns
    "B2-T9-H2-R1-P7-N5-K0-no-trap": (2, 9, 2, 1, 7, 5, 0, False),   # real state, lambda = 1 (Mamba-2's rule)
    "B1-T13-H2-R2-P33-N6-K2": (1, 13, 2, 2, 33, 6, 2, True),    # a pair's 33 rows straddle simulator blocks of 32
    "B1-T4-H1-R4-P2-N64-K32": (1, 4, 1, 4, 2, 64, 32, True),    # R and N at the CUDA bounds MAX_RANK, MAX_STATE_DIM
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
def test_mamba3_kernel_vs_step_loop(backend, dtype, case):
    B, T, H, R, P, N, K, trap = case
    skip_unless_runnable(backend, work=B * T * H * P * N * R)
    args, state = _inputs(B, T, H, R, P, N, K, dtype, device_for(backend), seed=1, trap=trap)
    _check_against_step_loop(backend, args, state, f"mamba3_scan[{backend}] {case}")


# what the initial state holds: None, a state of Nones, h only, the previous input only
STARTS = ["None", "all-fields-None", "h-only", "previous-input-only"]


@pytest.mark.parametrize("start", STARTS)
@pytest.mark.parametrize("rotating", [True, False], ids=["rotating", "real"])
@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
def test_mamba3_kernel_from_partial_or_no_state(backend, dtype, rotating, start):
    """Missing fields mean zeros; without rotation the angle comes back as given (here None)."""
    skip_unless_runnable(backend)
    args, full = _inputs(2, 5, 2, 2, 3, 6, 2 if rotating else 0, dtype, device_for(backend), seed=2)
    initial_state = {"None": None, "all-fields-None": Mamba3ScanState(None),
                     "h-only": Mamba3ScanState(full.h),
                     "previous-input-only": Mamba3ScanState(None, B_prev=full.B_prev, x_prev=full.x_prev)}[start]
    _check_against_step_loop(backend, args, initial_state, f"mamba3_scan[{backend}] from {start}")
    if not rotating:
        _, state = kernels.get("mamba3_scan", backend)(*args, initial_state=initial_state)
        assert state.angle is None


@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
def test_mamba3_state_carried_in_halves_equals_one_run(backend, dtype):
    skip_unless_runnable(backend)
    args, state = _inputs(2, 17, 2, 2, 5, 8, 3, dtype, device_for(backend), seed=3)
    D = args[7]
    scan = kernels.get("mamba3_scan", backend)
    cut = 7
    first = tuple(t[:, :cut] for t in args[:7])              # x, dt, A, Bm, Cm, theta, trap: time is dim 1
    second = tuple(t[:, cut:] for t in args[:7])
    with poisoned_outputs():
        whole = scan(*args, initial_state=state)
        y1, half = scan(*first, D, initial_state=state)
        y2, end = scan(*second, D, initial_state=half)
    _assert_same((torch.cat([y1, y2], dim=1), end), whole, f"mamba3_scan[{backend}] in two halves vs one run",
                 rotating=True)
    _assert_same(whole, mamba3_scan_recurrent(*args, initial_state=state), f"mamba3_scan[{backend}] one run",
                 rotating=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("backend", ["numba", "numba_cuda", "cupy"])
def test_mamba3_angle_wraps_as_torch_remainder(backend, dtype):
    """dt = 1 makes each step's dt * theta exact, so the kernel's running sum is the reference's and the
    angle must match bit for bit, wraps included: a sum just below 0 gives 2 pi (rounded to the dtype) as
    torch.remainder does, exactly 2 pi gives 0, sums past 4 pi and below -2 pi come back in range."""
    if backend != "numba" and dtype == torch.float64:
        pytest.skip("the CUDA kernels take float32")
    skip_unless_runnable(backend)
    device, B, T, H, R, P, N = device_for(backend), 1, 3, 1, 1, 2, 14
    two_pi = float(torch.tensor(2 * math.pi, dtype=dtype))       # 2 pi rounded to the dtype, as the reference's
    tiny = torch.finfo(dtype).eps          # under half the spacing near 2 pi (4 eps): 2 pi - tiny rounds to 2 pi
    steps = torch.tensor([[-tiny, two_pi, 7.0, 20.0, -3.0, -13.0, 0.0],     # theta at t = 0, one value per pair
                          [tiny, two_pi, 7.0, 20.0, -3.0, 13.0, -tiny],      # t = 1
                          [-2 * tiny, -two_pi, 0.5, -40.0, 3.0, 0.0, tiny]],  # t = 2
                         dtype=torch.float64)
    theta = steps.reshape(B, T, H, N // 2).to(dtype=dtype, device=device)
    g = torch.Generator().manual_seed(4)
    x, Bm, Cm = (random_tensor(shape, dtype, device, g)
                 for shape in ((B, T, H, R, P), (B, T, H, R, N), (B, T, H, R, N)))
    dt = torch.ones(B, T, H, dtype=dtype, device=device)
    A = -torch.rand(B, T, H, generator=g).to(dtype=dtype, device=device)
    args = (x, dt, A, Bm, Cm, theta)
    expected = mamba3_scan_recurrent(*args)
    with poisoned_outputs():
        got = kernels.get("mamba3_scan", backend)(*args)
    assert torch.equal(got[1].angle, expected[1].angle), f"{got[1].angle} vs {expected[1].angle}"
    _assert_same(got, expected, f"mamba3_scan[{backend}] wrapping angles", rotating=True)
    # the first step's wraps, by hand: -tiny -> 2 pi (rounded), 2 pi -> 0
    first = mamba3_scan_recurrent(*(t[:, :1] for t in args))[1].angle
    assert first[0, 0, 0] == two_pi and first[0, 0, 1] == 0.0


@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
def test_mamba3_reduces_to_the_selective_scan_kernel(backend, dtype):
    """R = 1, no rotation, lambda = 1, one head per S6 channel (P = 1): the S6 kernel of the same backend."""
    skip_unless_runnable(backend)
    device, B, T, Dm, N = device_for(backend), 2, 9, 5, 4
    g = torch.Generator().manual_seed(5)
    u = random_tensor((B, T, Dm), dtype, device, g)
    delta = F.softplus(random_tensor((B, T, Dm), dtype, device, g))
    a = -torch.rand(Dm, generator=g).to(dtype=dtype, device=device)
    Bs6, Cs6 = random_tensor((B, T, N), dtype, device, g), random_tensor((B, T, N), dtype, device, g)
    D = random_tensor((Dm,), dtype, device, g)
    h0 = random_tensor((B, Dm, N), dtype, device, g)
    with poisoned_outputs():
        y_s6, h_s6 = kernels.get("selective_scan", backend)(u, delta, a[:, None].expand(Dm, N), Bs6, Cs6, D, h0)
        y, state = kernels.get("mamba3_scan", backend)(
            u[..., None, None], delta, a.expand(B, T, Dm).contiguous(),
            Bs6[:, :, None, None, :].expand(B, T, Dm, 1, N), Cs6[:, :, None, None, :].expand(B, T, Dm, 1, N),
            D=D, initial_state=Mamba3ScanState(h0[:, :, None, :]))
    assert_close(y[:, :, :, 0, 0], y_s6, f"mamba3_scan[{backend}] as S6: y")
    assert_close(state.h[:, :, 0, :], h_s6, f"mamba3_scan[{backend}] as S6: final state")


@pytest.mark.parametrize("backend", ["numba", "numba_cuda"])
def test_mamba3_takes_non_contiguous_inputs(backend):
    """As in Mamba3Layer, where theta is one [B, T, 1, K] tensor expanded over the heads."""
    skip_unless_runnable(backend)
    (x, dt, A, Bm, Cm, theta, trap, D), state = _inputs(2, 6, 3, 2, 4, 6, 3, torch.float32, device_for(backend), seed=6)
    theta = theta[:, :, :1].expand_as(theta)                                # stride 0 over heads
    BC = torch.cat([Bm, Cm], dim=-1)                                        # [B, T, H, R, 2N]
    Bm, Cm = BC.split([6, 6], dim=-1)                                       # views with row stride 2N
    x = x.transpose(1, 4).contiguous().transpose(1, 4)                      # T the fast axis
    assert not any(t.is_contiguous() for t in (theta, Bm, Cm, x))
    _check_against_step_loop(backend, (x, dt, A, Bm, Cm, theta, trap, D), state, f"strided mamba3_scan[{backend}]")


@pytest.mark.parametrize("backend", ["numba_cuda", "cupy"])
def test_mamba3_at_gpu_size(backend):
    B, T, H, R, P, N, K = 4, 256, 8, 2, 64, 64, 16
    skip_unless_runnable(backend, work=B * T * H * P * N * R)
    args, state = _inputs(B, T, H, R, P, N, K, torch.float32, device_for(backend), seed=8)
    _check_against_step_loop(backend, args, state, f"mamba3_scan[{backend}] at GPU size")


# ---------------------------------------------------------------- the Mamba-3 layer, scan swapped in

def test_mamba3_layer_with_numba_scan_equals_reference():
    torch.manual_seed(9)
    layer = mamba3.Mamba3Layer(dim=8, d_state=8, expand=2, head_dim=4, mimo_rank=2).eval()   # H 4, P 4, N 8, K 2
    x = random_tensor((2, 11, 8), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        expected = layer(x)
        expected_state = mamba3.Mamba3State()
        expected_steps = [layer(x[:, :4], expected_state), layer(x[:, 4:], expected_state)]   # scan state carried
        with kernels.use("numba", ops=["mamba3_scan"]) as swapped:
            assert swapped == ["mamba3_scan"]
            assert ops.mamba3_scan.__wrapped__ is mamba3_kernels.mamba3_scan_numba   # behind a call counter
            got = layer(x)
            state = mamba3.Mamba3State()
            got_steps = [layer(x[:, :4], state), layer(x[:, 4:], state)]
    assert ops.mamba3_scan is kernels.get("mamba3_scan", "reference")          # put back after the block
    assert_close(got, expected, "Mamba3Layer with the numba scan")
    for i, (g, e) in enumerate(zip(got_steps, expected_steps)):
        assert_close(g, e, f"Mamba3Layer with the numba scan, call {i} with carried state")
    assert_close(torch.cat(got_steps, dim=1), expected, "Mamba3Layer in two calls vs one")
    for part in ("h", "B_prev", "x_prev"):
        assert_close(getattr(state.scan, part), getattr(expected_state.scan, part), f"the layer's carried {part}")
    assert_close(state.scan.angle.cos(), expected_state.scan.angle.cos(), "the layer's carried cos(angle)")
    assert_close(state.scan.angle.sin(), expected_state.scan.angle.sin(), "the layer's carried sin(angle)")


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_mamba3_bad_shapes_are_value_errors(backend):
    scan = kernels.get("mamba3_scan", backend)
    (x, dt, A, Bm, Cm, theta, trap, D), state = _inputs(2, 5, 3, 2, 4, 6, 2, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"dt must be \[B, T, H\]"):
        scan(x, dt[:, :4], A, Bm, Cm)
    with pytest.raises(ValueError, match=r"Cm must be \[B, T, H, R, N\]"):
        scan(x, dt, A, Bm, Cm[..., :5])
    with pytest.raises(ValueError, match=r"theta must be \[B, T, H, K\] .* K <= N/2 = 3"):
        scan(x, dt, A, Bm, Cm, torch.zeros(2, 5, 3, 4))
    with pytest.raises(ValueError, match=r"trap must be \[B, T, H\]"):
        scan(x, dt, A, Bm, Cm, theta, trap[..., None])
    with pytest.raises(ValueError, match=r"initial_state.B_prev must be \[B, H, R, N\]"):
        scan(x, dt, A, Bm, Cm, theta, trap, D, state._replace(B_prev=state.B_prev[:, :, :1]))
    with pytest.raises(ValueError, match="B_prev and x_prev must be given together"):
        scan(x, dt, A, Bm, Cm, theta, trap, D, state._replace(x_prev=None))
    with pytest.raises(ValueError, match="initial_state must be a Mamba3ScanState"):
        scan(x, dt, A, Bm, Cm, theta, trap, D, tuple(state))
    with pytest.raises(ValueError, match="every size must be >= 1"):
        scan(x[:, :0], dt[:, :0], A[:, :0], Bm[:, :0], Cm[:, :0])


def test_mamba3_kernels_refuse_wrong_dtypes_devices_and_gradients():
    (x, dt, A, Bm, Cm, theta, trap, D), state = _inputs(1, 4, 2, 2, 3, 4, 1, torch.float32, "cpu")
    numba_scan = kernels.get("mamba3_scan", "numba")
    with pytest.raises(ValueError, match="x must be float32, float64, got bfloat16"):
        numba_scan(*(t.bfloat16() for t in (x, dt, A, Bm, Cm)))
    with pytest.raises(ValueError, match="theta must have x's dtype torch.float32, got torch.float64"):
        numba_scan(x, dt, A, Bm, Cm, theta.double())                   # one dtype for every input
    with pytest.raises(ValueError, match="initial_state.x_prev must have x's dtype torch.float32, got torch.float64"):
        numba_scan(x, dt, A, Bm, Cm, theta, trap, D, state._replace(x_prev=state.x_prev.double()))
    with pytest.raises(ValueError, match="x must be float32, got float64"):
        kernels.get("mamba3_scan", "numba_cuda")(*(t.double() for t in (x, dt, A, Bm, Cm)))
    with pytest.raises(ValueError, match="cpu tensor but cupy kernels run on a CUDA GPU"):
        kernels.get("mamba3_scan", "cupy")(x, dt, A, Bm, Cm)
    A_trained = A.clone().requires_grad_()
    with pytest.raises(ValueError, match="forward-only"):
        numba_scan(x, dt, A_trained, Bm, Cm)
    with torch.no_grad():
        numba_scan(x, dt, A_trained, Bm, Cm)                            # fine without a graph


@pytest.mark.parametrize("backend", ["numba_cuda", "cupy"])
def test_mamba3_sizes_beyond_the_cuda_arrays_are_value_errors(backend):
    """The size checks come before the device check, so this runs on any machine."""
    N, R = mamba3_kernels.MAX_STATE_DIM, mamba3_kernels.MAX_RANK
    args, _ = _inputs(1, 2, 1, 1, 2, N + 1, 1, torch.float32, "cpu")
    with pytest.raises(ValueError, match=f"state size N <= {N}, got {N + 1}"):
        kernels.get("mamba3_scan", backend)(*args)
    args, _ = _inputs(1, 2, 1, R + 1, 2, 4, 1, torch.float32, "cpu")
    with pytest.raises(ValueError, match=f"MIMO rank R <= {R}, got {R + 1}"):
        kernels.get("mamba3_scan", backend)(*args)


def test_mamba3_numba_cpu_has_no_size_bound():
    N, R = mamba3_kernels.MAX_STATE_DIM + 2, mamba3_kernels.MAX_RANK + 1
    args, state = _inputs(1, 3, 1, R, 2, N, N // 2, torch.float64, "cpu", seed=11)
    _check_against_step_loop("numba", args, state, f"mamba3_scan[numba] N = {N}, R = {R}")


# ---------------------------------------------------------------- the reference op: step loop, matrix forms, rotation

def _reference_inputs(B=2, T=19, H=3, R=2, P=4, N=6, K=3, seed=0):
    """Random fp64 scan inputs: x, dt, A, Bm, Cm, theta, trap, D."""
    g = torch.Generator().manual_seed(seed)
    x = random_tensor((B, T, H, R, P), torch.float64, generator=g)
    dt = F.softplus(random_tensor((B, T, H), torch.float64, generator=g))
    A = -2 * torch.rand(B, T, H, generator=g, dtype=torch.float64)
    Bm = random_tensor((B, T, H, R, N), torch.float64, generator=g)
    Cm = random_tensor((B, T, H, R, N), torch.float64, generator=g)
    theta = math.pi * torch.tanh(random_tensor((B, T, H, K), torch.float64, generator=g))
    trap = torch.rand(B, T, H, generator=g, dtype=torch.float64)
    D = random_tensor((H,), torch.float64, generator=g)
    return x, dt, A, Bm, Cm, theta, trap, D


@pytest.mark.parametrize("euler", ["trap-None", "trap-ones"])
def test_reduces_to_the_s6_scan(euler):
    """R = 1, no rotation, lambda = 1, one head per S6 channel (P = 1), S6 rates constant along N."""
    B, T, Dm, N = 2, 23, 5, 4
    g = torch.Generator().manual_seed(1)
    u = random_tensor((B, T, Dm), torch.float64, generator=g)
    delta = F.softplus(random_tensor((B, T, Dm), torch.float64, generator=g))
    a = -3 * torch.rand(Dm, generator=g, dtype=torch.float64)
    A_s6 = a[:, None].expand(Dm, N).contiguous()                              # [Dm, N], rows constant
    Bm, Cm = (random_tensor((B, T, N), torch.float64, generator=g) for _ in range(2))
    D = random_tensor((Dm,), torch.float64, generator=g)
    h0 = random_tensor((B, Dm, N), torch.float64, generator=g)
    y_s6, h_s6 = selective_scan_recurrent(u, delta, A_s6, Bm, Cm, D, h0)

    trap = None if euler == "trap-None" else torch.ones(B, T, Dm, dtype=torch.float64)
    theta = torch.zeros(B, T, Dm, N // 2, dtype=torch.float64)               # zero angles: no turning
    y, state = mamba3_scan_recurrent(
        u[..., None, None],                                                   # x  [B, T, H=Dm, R=1, P=1]
        delta,                                                                # dt [B, T, H]
        a.expand(B, T, Dm),                                                   # A  [B, T, H]
        Bm[:, :, None, None, :].expand(B, T, Dm, 1, N),                       # Bm [B, T, H, 1, N], shared by heads
        Cm[:, :, None, None, :].expand(B, T, Dm, 1, N),
        theta, trap, D, Mamba3ScanState(h0[:, :, None, :]))                   # h  [B, H, P=1, N]
    assert_close(y[:, :, :, 0, 0], y_s6, "outputs", atol=1e-10, rtol=0.0)
    assert_close(state.h[:, :, 0, :], h_s6, "final state", atol=1e-10, rtol=0.0)


@pytest.mark.parametrize("rotate", [True, False], ids=["rotating", "real"])
def test_carried_state_equals_one_run(rotate):
    x, dt, A, Bm, Cm, theta, trap, D = _reference_inputs()
    theta = theta if rotate else None
    y, state = mamba3_scan_recurrent(x, dt, A, Bm, Cm, theta, trap, D)
    s = 8
    first = [t[:, :s] if t is not None else None for t in (x, dt, A, Bm, Cm, theta, trap)]
    second = [t[:, s:] if t is not None else None for t in (x, dt, A, Bm, Cm, theta, trap)]
    y1, state1 = mamba3_scan_recurrent(*first, D=D)
    y2, state2 = mamba3_scan_recurrent(*second, D=D, initial_state=state1)
    assert_close(torch.cat([y1, y2], dim=1), y, "outputs, split at 8")
    for name in Mamba3ScanState._fields:
        if getattr(state, name) is not None:
            assert_close(getattr(state2, name), getattr(state, name), f"carried {name}")
    # Without the carried previous input (trapezoid) or angle (rotation), the second half is wrong:
    y2_no_prev, _ = mamba3_scan_recurrent(*second, D=D, initial_state=Mamba3ScanState(state1.h, state1.angle))
    assert not torch.allclose(y2_no_prev, y2)
    if rotate:
        y2_no_angle, _ = mamba3_scan_recurrent(*second, D=D, initial_state=state1._replace(angle=None))
        assert not torch.allclose(y2_no_angle, y2)


@pytest.mark.parametrize("form", [mamba3_scan_parallel, mamba3_scan], ids=["parallel", "chunked"])
@pytest.mark.parametrize("variant", ["full", "euler-real", "fresh-start"])
def test_matrix_forms_equal_the_step_loop(form, variant):
    """The masked-matrix form (whole call, and on chunks of 64 carrying the state) equals the step loop."""
    x, dt, A, Bm, Cm, theta, trap, D = _reference_inputs(T=150, seed=3)
    g = torch.Generator().manual_seed(4)
    start = Mamba3ScanState(random_tensor((2, 3, 4, 6), torch.float64, generator=g),
                            2 * math.pi * torch.rand(2, 3, 3, generator=g, dtype=torch.float64),
                            random_tensor((2, 3, 2, 6), torch.float64, generator=g),
                            random_tensor((2, 3, 2, 4), torch.float64, generator=g))
    args = {"full": (x, dt, A, Bm, Cm, theta, trap, D, start),
            "euler-real": (x, dt, A, Bm, Cm, None, None, None, start._replace(angle=None)),
            "fresh-start": (x, dt, A, Bm, Cm, theta, trap, D, None)}[variant]
    y_loop, state_loop = mamba3_scan_recurrent(*args)
    y, state = form(*args)
    assert_close(y, y_loop, f"{variant}: y")
    for name in Mamba3ScanState._fields:
        if getattr(state_loop, name) is None:
            assert getattr(state, name) is None
        else:
            assert_close(getattr(state, name), getattr(state_loop, name), f"{variant}: {name}")


def test_matrix_form_gradients_equal_the_step_loop():
    x, dt, A, Bm, Cm, theta, trap, D = (t.requires_grad_() for t in _reference_inputs(T=21, seed=5))
    grads = []
    for form in (mamba3_scan_recurrent, mamba3_scan_parallel):
        y, state = form(x, dt, A, Bm, Cm, theta, trap, D)
        (y.sin().sum() + state.h.square().sum()).backward()
        grads.append([t.grad.clone() for t in (x, dt, A, Bm, Cm, theta, trap, D)])
        for t in (x, dt, A, Bm, Cm, theta, trap, D):
            t.grad = None
    for name, g_loop, g_matrix in zip("x dt A B C theta trap D".split(), *grads):
        assert_close(g_matrix, g_loop, f"d/d{name}")


def test_rotations_equal_a_complex_valued_state():
    """The scan (rotation moved onto B and C) equals the explicit complex recurrence
    g_t = e^{-i dt theta} (alpha g_{t-1} + beta B_{t-1} x_{t-1}) + gamma B_t x_t,  y_t = Re<C_t, g_t>,
    with pair k of the state as the complex number g_2k + i g_2k+1 and B, C never rotated."""
    x, dt, A, Bm, Cm, theta, trap, D = _reference_inputs(N=6, K=3)
    y, _ = mamba3_scan_recurrent(x, dt, A, Bm, Cm, theta, trap)
    Bc = torch.view_as_complex(Bm.unflatten(-1, (3, 2)))                     # [B, T, H, R, K] pairs as complex numbers
    Cc = torch.view_as_complex(Cm.unflatten(-1, (3, 2)))
    xc = x.to(torch.complex128)
    g = torch.zeros(2, 3, 4, 3, dtype=torch.complex128)                        # [B, H, P, K]
    prev = torch.zeros_like(g)
    ys = []
    for t in range(x.shape[1]):
        alpha = torch.exp(dt[:, t] * A[:, t])[..., None, None]                 # [B, H, 1, 1]
        beta = ((1 - trap[:, t]) * dt[:, t])[..., None, None] * alpha
        gamma = (trap[:, t] * dt[:, t])[..., None, None]
        turn = torch.exp(-1j * dt[:, t, :, None] * theta[:, t])[:, :, None, :]  # [B, H, 1, K]
        now = torch.einsum("bhrp,bhrk->bhpk", xc[:, t], Bc[:, t])
        g = turn * (alpha * g + beta * prev) + gamma * now
        ys.append(torch.einsum("bhpk,bhrk->bhrp", g, Cc[:, t].conj()).real)   # sum_k Re(conj(C_k) g_k)
        prev = now
    assert_close(y, torch.stack(ys, dim=1), "scan vs complex state")


def test_rotation_turns_the_state_without_changing_its_norm():
    """A = 0 and no input after t0: the un-rotated state g only turns, pair k by -dt_t theta_t[k] each step.

    With R = N ranks and C_t,r = e_r, the outputs read the whole un-rotated state: y_t[r, p] = g_t[p, r]."""
    B, T, H, P, N, t0 = 1, 12, 2, 3, 4, 4
    x, dt, A, Bm, Cm, theta, trap, D = _reference_inputs(B=B, T=T, H=H, R=N, P=P, N=N, K=N // 2, seed=3)
    x[:, t0 + 1:] = 0.0                                                       # nothing written after t0
    A = torch.zeros_like(A)                                                   # nothing forgotten
    Cm = torch.eye(N, dtype=torch.float64).expand(B, T, H, N, N)               # C_t,r = e_r
    y, state = mamba3_scan_recurrent(x, dt, A, Bm, Cm, theta, trap)
    g = y.transpose(-1, -2)                                                   # [B, T, H, P, N] the un-rotated state
    settled = range(t0 + 2, T)                                                # t0 + 1 still adds x_t0 (trapezoid)
    norm = g[:, t0 + 1].norm(dim=(-1, -2))                                    # [B, H]
    for t in settled:
        assert_close(g[:, t].norm(dim=(-1, -2)), norm, f"state norm at t={t}")
        assert (g[:, t] - g[:, t - 1]).abs().max() > 1e-3                     # but it does turn
        gc_now, gc_before = (torch.view_as_complex(g[:, s].unflatten(-1, (N // 2, 2)).contiguous()) for s in (t, t - 1))
        turn = torch.exp(-1j * dt[:, t, :, None, None] * theta[:, t, :, None, :])  # [B, H, 1, K]
        assert_close(torch.view_as_real(gc_now), torch.view_as_real(turn * gc_before), f"turn at t={t}")


def test_trapezoid_by_hand():
    """One head, P = N = R = 1, no rotation: A = -ln 2 and dt = 1 give alpha = 1/2; lambda = 1/2 gives
    beta = (1 - 1/2) * 1 * 1/2 = 1/4 and gamma = 1/2.  B = (1, 2, 3), x = (2, 4, 0), C = (1, 1, 2):
        h_0 = 1/2 * 0 + 1/4 * 0       + 1/2 * (1 * 2) = 1
        h_1 = 1/2 * 1 + 1/4 * (1 * 2) + 1/2 * (2 * 4) = 5
        h_2 = 1/2 * 5 + 1/4 * (2 * 4) + 1/2 * (3 * 0) = 4.5       (the previous term is B_1 x_1, not B_2 x_1)
        y   = C h = (1, 5, 9)"""
    def seq(*v):
        return torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1, 1)
    x, Bm, Cm = seq(2, 4, 0), seq(1, 2, 3), seq(1, 1, 2)
    dt = torch.ones(1, 3, 1, dtype=torch.float64)
    A = torch.full((1, 3, 1), -math.log(2), dtype=torch.float64)
    trap = torch.full((1, 3, 1), 0.5, dtype=torch.float64)
    y, state = mamba3_scan_recurrent(x, dt, A, Bm, Cm, trap=trap)
    assert_close(y.flatten(), torch.tensor([1.0, 5.0, 9.0], dtype=torch.float64), "y")
    assert_close(state.h.flatten(), torch.tensor([4.5], dtype=torch.float64), "h_2")


def test_bad_arguments_are_value_errors():
    x, dt, A, Bm, Cm, theta, trap, D = _reference_inputs()
    with pytest.raises(ValueError, match=r"x must be \[B, T, H, R, P\]"):
        mamba3_scan_recurrent(x[..., 0], dt, A, Bm, Cm)
    with pytest.raises(ValueError, match=r"A must be \[B, T, H\]"):
        mamba3_scan_recurrent(x, dt, A[0], Bm, Cm)
    with pytest.raises(ValueError, match=r"Cm must be \[B, T, H, R, N\]"):
        mamba3_scan_recurrent(x, dt, A, Bm, Cm[..., :1, :])
    with pytest.raises(ValueError, match=r"theta must be \[B, T, H, K\].*N/2 = 3"):
        mamba3_scan_recurrent(x, dt, A, Bm, Cm, torch.cat([theta, theta], dim=-1))
    with pytest.raises(ValueError, match=r"trap must be \[B, T, H\]"):
        mamba3_scan_recurrent(x, dt, A, Bm, Cm, theta, trap[:, :3])
    with pytest.raises(ValueError, match=r"D must be \[H\]"):
        mamba3_scan_recurrent(x, dt, A, Bm, Cm, theta, trap, D[:1])
    with pytest.raises(ValueError, match=r"initial_state.h must be \[B, H, P, N\]"):
        h_wrong = torch.zeros(2, 3, 6, 4, dtype=torch.float64)               # [B, H, N, P]: transposed
        mamba3_scan_recurrent(x, dt, A, Bm, Cm, initial_state=Mamba3ScanState(h_wrong))
    with pytest.raises(ValueError, match=r"initial_state must be a Mamba3ScanState"):
        mamba3_scan_recurrent(x, dt, A, Bm, Cm, initial_state=torch.zeros(2, 3, 4, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"head_dim 5 must divide"):
        Mamba3Layer(12, head_dim=5)
