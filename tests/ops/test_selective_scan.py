"""The selective scan (Mamba S6) kernels against the step loop, on every backend, at awkward shapes.

Ground truth is `refimpl.ops.selective_scan_recurrent`, in the kernel's own dtype and from the
same inputs. Outputs are poisoned with NaN before a kernel writes them. numba_cuda runs through
numba's CUDA simulator when there is no GPU (slow: the GPU-size case then skips with a reason);
cupy cases need a GPU and skip with a reason elsewhere, while the CUDA C is compile-checked with
nvcc and NVRTC wherever they exist. The next part runs a whole `MambaLayer` with the numba scan
swapped in; the last tests the reference op itself: the chunked form against the step loop, carried
state, and bad arguments.
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import selective_scan as selective_scan_kernels
from kernels.check import assert_close, poisoned_outputs, random_tensor
from kernels.machine import device_for
from kernel_testing import BACKEND_DTYPES, skip_unless_runnable
from refimpl import ops, ssm
from refimpl.ops import selective_scan_chunked, selective_scan_recurrent


def _scan_inputs(B, T, Dm, N, dtype, device, seed=0, steps="typical"):
    """(u, delta, A, Bm, Cm, D, h0), drawn in float64 and then cast, so every dtype sees the same numbers.

    steps: "typical" Delta = softplus(draw), about 0.1 to 3; "large" Delta up to 20, so exp(Delta A)
    underflows to 0 and the state forgets everything each step; "tiny" Delta about 1e-5, so the decay
    rounds to 1 and the state barely moves.
    """
    g = torch.Generator().manual_seed(seed)
    u = random_tensor((B, T, Dm), generator=g, dtype=torch.float64)
    draw = random_tensor((B, T, Dm), generator=g, dtype=torch.float64)
    delta = {"typical": F.softplus(draw),
             "large": 20 * torch.sigmoid(draw + 2),
             "tiny": 1e-5 * F.softplus(draw)}[steps]                                       # [B, T, Dm], > 0
    A = -torch.exp(random_tensor((Dm, N), generator=g, dtype=torch.float64))                # [Dm, N], < 0
    Bm = random_tensor((B, T, N), generator=g, dtype=torch.float64)
    Cm = random_tensor((B, T, N), generator=g, dtype=torch.float64)
    D = random_tensor((Dm,), generator=g, dtype=torch.float64)
    h0 = random_tensor((B, Dm, N), generator=g, dtype=torch.float64)
    return tuple(t.to(dtype=dtype, device=device) for t in (u, delta, A, Bm, Cm, D, h0))


def _check_against_step_loop(backend, args, name):
    expected_y, expected_h = ops.selective_scan_recurrent(*args)
    with poisoned_outputs():
        y, h = kernels.get("selective_scan", backend)(*args)
    assert_close(y, expected_y, f"{name}: y")
    assert_close(h, expected_h, f"{name}: final state")


# ---------------------------------------------------------------- kernel vs step loop

# id -> (B, T, Dm, N)
SCAN_CASES = {
    "B2-T9-Dm24-N4": (2, 9, 24, 4),             # the `tiny` example's sizes, two batch rows
    "B1-T1-Dm1-N1": (1, 1, 1, 1),               # every size 1
    "B3-T17-Dm33-N5": (3, 17, 33, 5),           # odd everything; 99 channels over 4 simulator blocks
    "B1-T37-Dm70-N16": (1, 37, 70, 16),         # Mamba's N, T past one reference chunk of 32
    "B2-T6-Dm5-N64": (2, 6, 5, 64),             # N at the CUDA kernels' limit, MAX_STATE_DIM
}


@pytest.mark.parametrize("case", SCAN_CASES.values(), ids=SCAN_CASES.keys())
@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
def test_selective_scan_kernel_vs_step_loop(backend, dtype, case):
    B, T, Dm, N = case
    skip_unless_runnable(backend, work=B * T * Dm * N)
    args = _scan_inputs(*case, dtype, device_for(backend))
    _check_against_step_loop(backend, args, f"selective_scan[{backend}]")


@pytest.mark.parametrize("with_D, with_state", [(False, False), (False, True), (True, False)],
                         ids=["no-D-no-state", "no-D", "no-state"])
@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
def test_selective_scan_without_skip_or_initial_state(backend, dtype, with_D, with_state):
    skip_unless_runnable(backend)
    u, delta, A, Bm, Cm, D, h0 = _scan_inputs(2, 11, 13, 6, dtype, device_for(backend), seed=1)
    args = (u, delta, A, Bm, Cm, D if with_D else None, h0 if with_state else None)
    _check_against_step_loop(backend, args, f"selective_scan[{backend}] D={with_D} state={with_state}")


@pytest.mark.parametrize("steps", ["large", "tiny"], ids=["large-steps-decay-underflows", "tiny-steps-decay-near-1"])
@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
def test_selective_scan_extreme_step_sizes(backend, dtype, steps):
    skip_unless_runnable(backend)
    args = _scan_inputs(2, 15, 19, 8, dtype, device_for(backend), seed=2, steps=steps)
    u, delta, A = args[:3]
    decay = torch.exp(delta[..., None] * A)                                     # [B, T, Dm, N]
    if steps == "large":
        assert (decay == 0).any(), "the large-step case should drive some decays to exactly 0"
    else:
        assert decay.min() > 0.99, "the tiny-step case should keep every decay near 1"
    _check_against_step_loop(backend, args, f"selective_scan[{backend}] {steps} steps")


@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
def test_selective_scan_state_carried_in_halves_equals_one_run(backend, dtype):
    skip_unless_runnable(backend)
    u, delta, A, Bm, Cm, D, h0 = _scan_inputs(2, 23, 9, 7, dtype, device_for(backend), seed=3)
    scan = kernels.get("selective_scan", backend)
    cut = 10
    with poisoned_outputs():
        y_all, h_all = scan(u, delta, A, Bm, Cm, D, h0)
        y1, h1 = scan(u[:, :cut], delta[:, :cut], A, Bm[:, :cut], Cm[:, :cut], D, h0)
        y2, h2 = scan(u[:, cut:], delta[:, cut:], A, Bm[:, cut:], Cm[:, cut:], D, h1)
    assert_close(torch.cat([y1, y2], dim=1), y_all, f"selective_scan[{backend}] halves: y")
    assert_close(h2, h_all, f"selective_scan[{backend}] halves: final state")
    expected_y, expected_h = ops.selective_scan_recurrent(u, delta, A, Bm, Cm, D, h0)
    assert_close(y_all, expected_y, f"selective_scan[{backend}] one run: y")
    assert_close(h_all, expected_h, f"selective_scan[{backend}] one run: final state")


@pytest.mark.parametrize("backend", ["numba", "numba_cuda"])
def test_selective_scan_takes_non_contiguous_inputs(backend):
    """As in the Mamba layer, where B and C are slices of one projection."""
    skip_unless_runnable(backend)
    u, delta, A, Bm, Cm, D, h0 = _scan_inputs(2, 7, 6, 5, torch.float32, device_for(backend), seed=4)
    BC = torch.cat([Bm, Cm], dim=-1)                            # [B, T, 2N]
    Bm, Cm = BC.split([5, 5], dim=-1)                           # views with row stride 2N
    u = u.transpose(1, 2).contiguous().transpose(1, 2)           # [B, T, Dm] with T the fast axis
    assert not (Bm.is_contiguous() or Cm.is_contiguous() or u.is_contiguous())
    _check_against_step_loop(backend, (u, delta, A, Bm, Cm, D, h0), f"strided selective_scan[{backend}]")


@pytest.mark.parametrize("backend", ["numba_cuda", "cupy"])
def test_selective_scan_at_gpu_size(backend):
    B, T, Dm, N = 4, 512, 512, 16
    skip_unless_runnable(backend, work=B * T * Dm * N)
    args = _scan_inputs(B, T, Dm, N, torch.float32, device_for(backend), seed=6)
    _check_against_step_loop(backend, args, f"selective_scan[{backend}] at GPU size")


# ---------------------------------------------------------------- the Mamba layer, scan swapped in

def test_mamba_layer_with_numba_selective_scan_equals_reference():
    torch.manual_seed(7)
    layer = ssm.MambaLayer(dim=12, d_state=16).eval()
    x = random_tensor((2, 13, 12), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        expected = layer(x)
        state = ssm.MambaState()
        expected_steps = [layer(x[:, :5], state), layer(x[:, 5:], state)]   # carried scan and conv state
        with kernels.use("numba", ops=["selective_scan"]) as swapped:
            assert swapped == ["selective_scan"]
            assert ops.selective_scan.__wrapped__ is selective_scan_kernels.selective_scan_numba   # behind a call counter
            got = layer(x)
            state = ssm.MambaState()
            got_steps = [layer(x[:, :5], state), layer(x[:, 5:], state)]
    assert ops.selective_scan is kernels.get("selective_scan", "reference")     # put back after the block
    assert_close(got, expected, "MambaLayer with the numba scan")
    for i, (g, e) in enumerate(zip(got_steps, expected_steps)):
        assert_close(g, e, f"MambaLayer with the numba scan, call {i} with carried state")


# ---------------------------------------------------------------- bad input

SCANS = {"reference": kernels.get("selective_scan", "reference"), "numba": kernels.get("selective_scan", "numba"),
         "step loop": selective_scan_recurrent, "chunked": selective_scan_chunked}


@pytest.mark.parametrize("scan", SCANS.values(), ids=SCANS.keys())
def test_selective_scan_bad_shapes_are_value_errors(scan):
    u, delta, A, Bm, Cm, D, h0 = _scan_inputs(2, 5, 3, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"A must be \[Dm, N\]"):
        scan(u, delta, A.T, Bm, Cm)
    with pytest.raises(ValueError, match=r"Cm must be \[B, T, N\]"):
        scan(u, delta, A, Bm, Cm[:, :3])
    with pytest.raises(ValueError, match=r"initial_state must be \[B, Dm, N\]"):
        scan(u, delta, A, Bm, Cm, D, h0[:1])
    with pytest.raises(ValueError, match=r"D must be \[Dm\]"):
        scan(u, delta, A, Bm, Cm, D[:2])
    with pytest.raises(ValueError, match="every size must be >= 1"):
        scan(u[:, :0], delta[:, :0], A, Bm[:, :0], Cm[:, :0])


def test_selective_scan_kernels_refuse_wrong_dtypes_and_gradients():
    u, delta, A, Bm, Cm, D, h0 = _scan_inputs(1, 4, 3, 2, torch.float32, "cpu")
    numba_scan = kernels.get("selective_scan", "numba")
    with pytest.raises(ValueError, match="u must be float32, float64, got bfloat16"):
        numba_scan(*(t.bfloat16() for t in (u, delta, A, Bm, Cm)))
    with pytest.raises(ValueError, match="A must have u's dtype torch.float32, got torch.float64"):
        numba_scan(u, delta, A.double(), Bm, Cm)                  # one dtype for every input
    with pytest.raises(ValueError, match="u must be float32, got float64"):
        kernels.get("selective_scan", "numba_cuda")(*(t.double() for t in (u, delta, A, Bm, Cm)))
    A_trained = A.clone().requires_grad_()
    with pytest.raises(ValueError, match="forward-only"):
        numba_scan(u, delta, A_trained, Bm, Cm)
    with torch.no_grad():
        numba_scan(u, delta, A_trained, Bm, Cm)                   # fine without a graph


@pytest.mark.parametrize("backend", ["numba_cuda", "cupy"])
def test_state_size_beyond_the_cuda_array_is_a_value_error(backend):
    """The size check comes before the device check, so this runs on any machine."""
    N = selective_scan_kernels.MAX_STATE_DIM + 1
    args = _scan_inputs(1, 3, 2, N, torch.float32, "cpu")
    with pytest.raises(ValueError, match=f"state size N <= {selective_scan_kernels.MAX_STATE_DIM}, got {N}"):
        kernels.get("selective_scan", backend)(*args)


def test_cpu_tensors_to_the_cupy_kernel_are_a_value_error():
    args = _scan_inputs(1, 3, 2, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match="cpu tensor but cupy kernels run on a CUDA GPU"):
        kernels.get("selective_scan", "cupy")(*args)


# ---------------------------------------------------------------- the reference op: chunked form = step loop

def _inputs(B=2, T=37, Dm=5, N=4, seed=0, big_steps=False):
    g = torch.Generator().manual_seed(seed)
    u = random_tensor((B, T, Dm), torch.float64, generator=g)
    delta = F.softplus(random_tensor((B, T, Dm), torch.float64, generator=g) + (4.0 if big_steps else 0.0))
    A = -3 * torch.rand(Dm, N, generator=g, dtype=torch.float64)
    Bm, Cm = random_tensor((B, T, N), torch.float64, generator=g), random_tensor((B, T, N), torch.float64, generator=g)
    D = random_tensor((Dm,), torch.float64, generator=g)
    h0 = random_tensor((B, Dm, N), torch.float64, generator=g)
    return u, delta, A, Bm, Cm, D, h0


@pytest.mark.parametrize("chunk_size", [1, 8, 32, 64], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("big_steps", [False, True], ids=["small-steps", "large-steps-forget-fast"])
def test_chunked_scan_equals_step_loop(chunk_size, big_steps):
    args = _inputs(big_steps=big_steps)
    y_ref, h_ref = selective_scan_recurrent(*args)
    y, h = selective_scan_chunked(*args, chunk_size=chunk_size)
    assert_close(y, y_ref, "outputs")
    assert_close(h, h_ref, "final state")


def test_carried_state_equals_one_shot():
    u, delta, A, Bm, Cm, D, h0 = _inputs()
    y, h = selective_scan_recurrent(u, delta, A, Bm, Cm, D, h0)
    y1, h1 = selective_scan_chunked(u[:, :20], delta[:, :20], A, Bm[:, :20], Cm[:, :20], D, h0)
    y2, h2 = selective_scan_chunked(u[:, 20:], delta[:, 20:], A, Bm[:, 20:], Cm[:, 20:], D, h1)
    assert_close(torch.cat([y1, y2], dim=1), y, "outputs, split at 20")
    assert_close(h2, h, "final state, split at 20")
