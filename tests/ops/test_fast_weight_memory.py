"""The fast-weight memory kernels against the step loop, on every backend, at awkward shapes.

Ground truth is `refimpl.ops.fast_weight_memory_recurrent`, in the kernel's own dtype and from
the same inputs. Outputs are poisoned with NaN before a kernel writes them. numba_cuda runs through
numba's CUDA simulator when there is no GPU (slow: the GPU-size case then skips with a reason);
cupy cases need a GPU and skip with a reason elsewhere, while the CUDA C is compile-checked with
nvcc and NVRTC wherever they exist. A later part runs a whole `FastWeightMemory` layer with the
numba kernel swapped in; the last tests the reference op itself: the parallel form against the step
loop, carried state, and a stored pair fading as decay^gap.
"""

from __future__ import annotations

import math

import pytest
import torch

import kernels
from kernels import fast_weight_memory as fast_weight_kernels
from kernels.check import assert_close, poisoned_outputs, random_tensor
from kernels.machine import device_for
from kernel_testing import BACKEND_DTYPES, skip_unless_runnable
from refimpl import ops, synapse
from refimpl.ops import fast_weight_memory_parallel, fast_weight_memory_recurrent


def _inputs(B, T, H, Dk, Dv, dtype, device, seed=0, gate_scale=3.0):
    """(q, k, v, gate, W0), drawn in float64 and then cast, so every dtype sees the same numbers.
    Gates spread over the sigmoid (pre-activations of a few units); W0 a non-zero starting memory."""
    g = torch.Generator().manual_seed(seed)
    q = random_tensor((B, T, H, Dk), torch.float64, generator=g)
    k = random_tensor((B, T, H, Dk), torch.float64, generator=g)
    v = random_tensor((B, T, H, Dv), torch.float64, generator=g)
    gate = random_tensor((B, T, H), torch.float64, generator=g, scale=gate_scale)
    W0 = random_tensor((B, H, Dk, Dv), torch.float64, generator=g, scale=0.3)
    return tuple(t.to(dtype=dtype, device=device) for t in (q, k, v, gate, W0))


def _check_against_step_loop(backend, q, k, v, gate, W0, name, decay=0.95, strength=0.1):
    expected_r, expected_W = ops.fast_weight_memory_recurrent(q, k, v, gate, decay, strength, W0)
    with poisoned_outputs():
        r, W = kernels.get("fast_weight_memory", backend)(q, k, v, gate, decay, strength, W0)
    assert_close(r, expected_r, f"{name}: reads")
    assert_close(W, expected_W, f"{name}: final memory")


# ---------------------------------------------------------------- kernel vs step loop

# id -> (B, T, H, Dk, Dv)
FW_CASES = {
    "B2-T9-H2-Dk8-Dv8": (2, 9, 2, 8, 8),            # the `tiny` example's sizes, two batch rows
    "B1-T1-H1-Dk1-Dv1": (1, 1, 1, 1, 1),            # every size 1
    "B3-T17-H3-Dk5-Dv7": (3, 17, 3, 5, 7),          # odd everything, Dk != Dv; 63 columns over 2 simulator blocks
    "B1-T13-H2-Dk33-Dv40": (1, 13, 2, 33, 40),      # past one warp in both head dims
    "B1-T5-H1-Dk128-Dv3": (1, 5, 1, 128, 3),        # Dk at the CUDA kernels' limit, MAX_KEY_DIM
}


@pytest.mark.parametrize("case", FW_CASES.values(), ids=FW_CASES.keys())
@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
def test_fast_weight_memory_kernel_vs_step_loop(backend, dtype, case):
    B, T, H, Dk, Dv = case
    skip_unless_runnable(backend, work=B * T * H * Dk * Dv)
    q, k, v, gate, W0 = _inputs(*case, dtype, device_for(backend))
    _check_against_step_loop(backend, q, k, v, gate, W0, f"fast_weight_memory[{backend}]")


@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
def test_fast_weight_memory_from_an_empty_memory(backend, dtype):
    skip_unless_runnable(backend)
    q, k, v, gate, _ = _inputs(2, 11, 3, 6, 5, dtype, device_for(backend), seed=1)
    _check_against_step_loop(backend, q, k, v, gate, None, f"fast_weight_memory[{backend}] no initial state",
                             strength=0.5)


@pytest.mark.parametrize("decay", [0.0, 1.0], ids=["decay0-forget-at-once", "decay1-never-forget"])
@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
def test_fast_weight_memory_decay_at_the_ends(backend, dtype, decay):
    """decay 0: W holds only the last write (the initial memory is read once, then gone);
    decay 1: every write stays, so W grows along the sequence."""
    skip_unless_runnable(backend)
    q, k, v, gate, W0 = _inputs(2, 15, 2, 7, 9, dtype, device_for(backend), seed=2)
    _check_against_step_loop(backend, q, k, v, gate, W0, f"fast_weight_memory[{backend}] decay={decay}",
                             decay=decay, strength=0.3)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")   # the simulator's NumPy, on exp(100)
@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
def test_fast_weight_memory_extreme_gates(backend, dtype):
    """Gates of +-20 pre-sigmoid: sigmoid is then 1 (to rounding) or about 2e-9, a write in full or none;
    +-100 as well, where exp(100) overflows float32 to inf and 1 / (1 + inf) must still give 0."""
    skip_unless_runnable(backend)
    q, k, v, gate, W0 = _inputs(2, 12, 3, 6, 5, dtype, device_for(backend), seed=3)
    signs = torch.where(gate > 0, 1.0, -1.0).to(dtype)
    gate = signs * torch.tensor([20.0, 100.0], dtype=dtype, device=gate.device).repeat(6)[None, :, None]
    assert (gate == 20).any() and (gate == -20).any() and (gate == -100).any()
    _check_against_step_loop(backend, q, k, v, gate, W0, f"fast_weight_memory[{backend}] gates +-20, +-100",
                             strength=0.2)


@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
def test_fast_weight_memory_state_carried_in_halves_equals_one_run(backend, dtype):
    skip_unless_runnable(backend)
    q, k, v, gate, W0 = _inputs(2, 19, 2, 9, 6, dtype, device_for(backend), seed=4)
    memory = kernels.get("fast_weight_memory", backend)
    cut = 8
    with poisoned_outputs():
        r_all, W_all = memory(q, k, v, gate, 0.9, 0.2, W0)
        r1, W1 = memory(q[:, :cut], k[:, :cut], v[:, :cut], gate[:, :cut], 0.9, 0.2, W0)
        r2, W2 = memory(q[:, cut:], k[:, cut:], v[:, cut:], gate[:, cut:], 0.9, 0.2, W1)
    assert_close(torch.cat([r1, r2], dim=1), r_all, f"fast_weight_memory[{backend}] halves: reads")
    assert_close(W2, W_all, f"fast_weight_memory[{backend}] halves: final memory")
    expected_r, expected_W = ops.fast_weight_memory_recurrent(q, k, v, gate, 0.9, 0.2, W0)
    assert_close(r_all, expected_r, f"fast_weight_memory[{backend}] one run: reads")
    assert_close(W_all, expected_W, f"fast_weight_memory[{backend}] one run: final memory")


@pytest.mark.parametrize("backend", ["numba", "numba_cuda"])
def test_fast_weight_memory_takes_non_contiguous_inputs(backend):
    """As in the layer, where q, k and v are views into one projection."""
    skip_unless_runnable(backend)
    q, k, v, gate, W0 = _inputs(2, 7, 2, 4, 4, torch.float32, device_for(backend), seed=5)
    qkv = torch.cat([q, k, v], dim=-1)                          # [B, T, H, 12]
    q, k, v = qkv.split([4, 4, 4], dim=-1)                      # views with row stride 12
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    _check_against_step_loop(backend, q, k, v, gate, W0, f"strided fast_weight_memory[{backend}]")


@pytest.mark.parametrize("backend", ["numba_cuda", "cupy"])
def test_fast_weight_memory_at_gpu_size(backend):
    B, T, H, D = 16, 128, 4, 32                                 # the `small` example's sizes
    skip_unless_runnable(backend, work=B * T * H * D * D)
    q, k, v, gate, W0 = _inputs(B, T, H, D, D, torch.float32, device_for(backend), seed=7)
    _check_against_step_loop(backend, q, k, v, gate, W0, f"fast_weight_memory[{backend}] at GPU size")


# ---------------------------------------------------------------- the layer, kernel swapped in

def test_fast_weight_layer_with_numba_kernel_equals_reference():
    torch.manual_seed(8)
    layer = synapse.FastWeightMemory(12, n_heads=3, head_dim=5).eval()
    x = random_tensor((2, 11, 12), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        expected = layer(x)
        state = []
        expected_steps = [layer(x[:, :4], state), layer(x[:, 4:], state)]     # memory carried across calls
        with kernels.use("numba", ops=["fast_weight_memory"]) as swapped:
            assert swapped == ["fast_weight_memory"]
            assert ops.fast_weight_memory.__wrapped__ is fast_weight_kernels.fast_weight_memory_numba   # behind a call counter
            got = layer(x)
            state = []
            got_steps = [layer(x[:, :4], state), layer(x[:, 4:], state)]
    assert ops.fast_weight_memory is kernels.get("fast_weight_memory", "reference")   # put back after the block
    assert_close(got, expected, "FastWeightMemory with the numba kernel")
    for i, (g, e) in enumerate(zip(got_steps, expected_steps)):
        assert_close(g, e, f"FastWeightMemory with the numba kernel, call {i} with carried memory")


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_fast_weight_memory_bad_shapes_are_value_errors(backend):
    memory = kernels.get("fast_weight_memory", backend)
    q, k, v, gate, W0 = _inputs(2, 5, 3, 4, 6, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"k must be \[B, T, H, Dk\]"):
        memory(q, k[..., :3], v, gate)
    with pytest.raises(ValueError, match=r"v must be \[B, T, H, Dv\]"):
        memory(q, k, v[:, :4], gate)
    with pytest.raises(ValueError, match=r"gate must be \[B, T, H\]"):
        memory(q, k, v, gate[..., None])
    with pytest.raises(ValueError, match=r"initial_state must be \[B, H, Dk, Dv\]"):
        memory(q, k, v, gate, initial_state=W0.transpose(2, 3))
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\]"):
        memory(q, k, v, gate, decay=1.5)


def test_fast_weight_memory_kernels_refuse_empty_sizes_wrong_dtypes_and_gradients():
    q, k, v, gate, W0 = _inputs(1, 4, 2, 3, 3, torch.float32, "cpu")
    numba_memory = kernels.get("fast_weight_memory", "numba")
    with pytest.raises(ValueError, match="every size must be >= 1"):
        numba_memory(q[:, :0], k[:, :0], v[:, :0], gate[:, :0])
    with pytest.raises(ValueError, match="q must be float32, float64, got bfloat16"):
        numba_memory(*(t.bfloat16() for t in (q, k, v, gate)))
    with pytest.raises(ValueError, match="gate must have q's dtype torch.float32, got torch.float64"):
        numba_memory(q, k, v, gate.double())                    # one dtype for every input
    with pytest.raises(ValueError, match="initial_state must have q's dtype torch.float32, got torch.float64"):
        numba_memory(q, k, v, gate, initial_state=W0.double())
    with pytest.raises(ValueError, match="q must be float32, got float64"):
        kernels.get("fast_weight_memory", "numba_cuda")(*(t.double() for t in (q, k, v, gate)))
    gate_trained = gate.clone().requires_grad_()
    with pytest.raises(ValueError, match="forward-only"):
        numba_memory(q, k, v, gate_trained)
    with torch.no_grad():
        numba_memory(q, k, v, gate_trained)                     # fine without a graph


@pytest.mark.parametrize("backend", ["numba_cuda", "cupy"])
def test_key_dim_beyond_the_cuda_array_is_a_value_error(backend):
    """The size check comes before the device check, so this runs on any machine."""
    Dk = fast_weight_kernels.MAX_KEY_DIM + 1
    q, k, v, gate, _ = _inputs(1, 2, 1, Dk, 2, torch.float32, "cpu")
    with pytest.raises(ValueError, match=f"key dimension Dk <= {fast_weight_kernels.MAX_KEY_DIM}, got {Dk}"):
        kernels.get("fast_weight_memory", backend)(q, k, v, gate)


def test_cpu_tensors_to_the_cupy_kernel_are_a_value_error():
    q, k, v, gate, _ = _inputs(1, 3, 2, 4, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match="cpu tensor but cupy kernels run on a CUDA GPU"):
        kernels.get("fast_weight_memory", "cupy")(q, k, v, gate)


# ---------------------------------------------------------------- the reference op: parallel form = step loop

def _reference_inputs(B=2, T=23, H=3, Dk=5, Dv=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(random_tensor(shape, torch.float64, generator=g)
                 for shape in ((B, T, H, Dk), (B, T, H, Dk), (B, T, H, Dv), (B, T, H)))


@pytest.mark.parametrize("decay", [0.0, 0.95, 1.0], ids=["decay0", "decay0.95", "decay1"])
def test_parallel_form_equals_step_loop(decay):
    q, k, v, gate = _reference_inputs()
    W0 = random_tensor((2, 3, 5, 4), torch.float64, generator=torch.Generator().manual_seed(9))
    r_ref, W_ref = fast_weight_memory_recurrent(q, k, v, gate, decay, 0.1, W0)
    r, W = fast_weight_memory_parallel(q, k, v, gate, decay, 0.1, W0)
    assert_close(r, r_ref, "reads")
    assert_close(W, W_ref, "final memory")


def test_carried_state_equals_one_shot():
    q, k, v, gate = _reference_inputs()
    r, W = fast_weight_memory_recurrent(q, k, v, gate)
    r1, W1 = fast_weight_memory_recurrent(q[:, :9], k[:, :9], v[:, :9], gate[:, :9])
    r2, W2 = fast_weight_memory_recurrent(q[:, 9:], k[:, 9:], v[:, 9:], gate[:, 9:], initial_state=W1)
    assert_close(torch.cat([r1, r2], dim=1), r, "reads, split at 9")
    assert_close(W2, W, "memory, split at 9")


def test_a_stored_pair_fades_as_decay_to_the_delta():
    """Write (k, v) once, read with q = k after `gap` tokens of nothing: r = decay^(gap-1) * 0.1 * sigmoid(g) |k|^2 v."""
    k = torch.zeros(1, 30, 1, 4, dtype=torch.float64)
    k[0, 0, 0] = torch.tensor([1.0, 0, 0, 0])
    v = torch.zeros(1, 30, 1, 2, dtype=torch.float64)
    v[0, 0, 0] = torch.tensor([2.0, -1.0])
    gate = torch.full((1, 30, 1), -1e9, dtype=torch.float64)     # no writes ...
    gate[0, 0, 0] = 0.0                                           # ... except the first, with sigmoid(0) = 1/2
    q = k[:, :1].expand(1, 30, 1, 4)
    reads, _ = fast_weight_memory_recurrent(q, k, v, gate)
    for gap in (1, 20):
        assert math.isclose(reads[0, gap, 0, 0].item(), 0.95 ** (gap - 1) * 0.1 * 0.5 * 2.0, rel_tol=1e-12)
