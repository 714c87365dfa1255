"""Every kernel of the shared blocks against its reference, on every backend, at awkward shapes.

Outputs are poisoned with NaN (floats) or -1 (indices) before a kernel writes
them; inputs are fresh random draws. numba_cuda runs through numba's CUDA
simulator when there is no GPU (slow: the biggest cases then skip with a
reason and run on a GPU); cupy cases need a GPU and skip with a reason
elsewhere, while their CUDA C is compile-checked with nvcc wherever it exists.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

import kernels
from kernels import attention as attention_kernels
from kernels import rmsnorm as rmsnorm_kernels
from kernels.check import assert_close, poisoned_outputs, random_tensor

# numba CPU kernels take float32 and float64; the CUDA ones take float32.
BACKEND_DTYPES = [pytest.param("numba", torch.float32, id="numba-fp32"),
                  pytest.param("numba", torch.float64, id="numba-fp64"),
                  pytest.param("numba_cuda", torch.float32, id="numba_cuda-fp32"),
                  pytest.param("cupy", torch.float32, id="cupy-fp32")]
SIMULATOR_BUDGET = 3_000_000  # rough count of inner-loop steps the simulator finishes in about a second


def _device_for(backend: str) -> str:
    if backend == "cupy" or (backend == "numba_cuda" and not kernels.cuda_simulator_enabled()):
        return "cuda"
    return "cpu"


def _skip_unless_runnable(backend: str, work: int = 0) -> None:
    status = kernels.backend_status()[backend]
    if status.startswith("unavailable"):
        pytest.skip(f"{backend}: {status}")
    if backend == "numba_cuda" and kernels.cuda_simulator_enabled() and work > SIMULATOR_BUDGET:
        pytest.skip(f"too large for the CUDA simulator ({work:,} steps); runs on a GPU")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- RMSNorm

RMS_SHAPES = {"rows3-C60": (3, 60), "B2-T5-C63": (2, 5, 63), "one-element": (1, 1), "rows4-C257": (4, 257)}


@pytest.mark.parametrize("shape", RMS_SHAPES.values(), ids=RMS_SHAPES.keys())
@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
def test_rms_norm_kernel_vs_reference(backend, shape, dtype):
    _skip_unless_runnable(backend)
    g, device = _gen(), _device_for(backend)
    x = random_tensor(shape, dtype, device, g, scale=3.0)
    w = random_tensor(shape[-1:], dtype, device, g)
    expected = kernels.get("rms_norm", "reference")(x, w, 1e-5)
    with poisoned_outputs():
        got = kernels.get("rms_norm", backend)(x, w, 1e-5)
    assert_close(got, expected, f"rms_norm[{backend}]")


@pytest.mark.parametrize("variant", rmsnorm_kernels.NUMBA_CUDA_LADDER)
def test_rms_norm_numba_cuda_ladder_vs_reference(variant):
    _skip_unless_runnable("numba_cuda")
    g, device = _gen(1), _device_for("numba_cuda")
    x, w = random_tensor((3, 70), device=device, generator=g), random_tensor((70,), device=device, generator=g)
    with poisoned_outputs():
        got = rmsnorm_kernels.NUMBA_CUDA_LADDER[variant](x, w)
    assert_close(got, kernels.get("rms_norm", "reference")(x, w), variant)


@pytest.mark.parametrize("variant", rmsnorm_kernels.CUPY_LADDER)
def test_rms_norm_cupy_ladder_vs_reference(variant):
    _skip_unless_runnable("cupy")
    g = _gen(2)
    x, w = random_tensor((64, 1000), device="cuda", generator=g), random_tensor((1000,), device="cuda", generator=g)
    with poisoned_outputs():
        got = rmsnorm_kernels.CUPY_LADDER[variant](x, w)
    assert_close(got, kernels.get("rms_norm", "reference")(x, w), variant)


# ---------------------------------------------------------------- attention

# id -> (B, T, S, H, G, D, causal, window)
ATTENTION_CASES = {
    "B2-T63-H4-G2-D60-full": (2, 63, 63, 4, 2, 60, True, None),
    "B1-T33-H3-G1-D16-window7": (1, 33, 33, 3, 1, 16, True, 7),
    "B2-T9-H2-G2-D8-window1": (2, 9, 9, 2, 2, 8, True, 1),
    "B1-T12-H4-G2-D8-window-covers-T": (1, 12, 12, 4, 2, 8, True, 40),
    "decode-T1-S20-H6-G3-D12": (2, 1, 20, 6, 3, 12, True, None),
    "chunk-T5-S17-H4-G4-D10-window6": (1, 5, 17, 4, 4, 10, True, 6),
    "noncausal-T7-S11-H2-G1-D6": (1, 7, 11, 2, 1, 6, False, None),
}


@pytest.mark.parametrize("case", ATTENTION_CASES.values(), ids=ATTENTION_CASES.keys())
@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
def test_attention_kernel_vs_reference(backend, case, dtype):
    B, T, S, H, G, D, causal, window = case
    _skip_unless_runnable(backend, work=B * T * H * S * D)
    g, device = _gen(3), _device_for(backend)
    q = random_tensor((B, T, H, D), dtype, device, g)
    k = random_tensor((B, S, G, D), dtype, device, g)
    v = random_tensor((B, S, G, D), dtype, device, g)
    expected = kernels.get("attention", "reference")(q, k, v, causal=causal, window=window)
    with poisoned_outputs():
        got = kernels.get("attention", backend)(q, k, v, causal=causal, window=window)
    assert_close(got, expected, f"attention[{backend}]")


def test_attention_cupy_at_gpu_size():
    _skip_unless_runnable("cupy")
    g = _gen(4)
    q = random_tensor((4, 256, 8, 64), device="cuda", generator=g)
    k = random_tensor((4, 256, 2, 64), device="cuda", generator=g)
    v = random_tensor((4, 256, 2, 64), device="cuda", generator=g)
    for window in (None, 64):
        with poisoned_outputs():
            got = attention_kernels.attention_cupy(q, k, v, window=window)
        assert_close(got, kernels.get("attention", "reference")(q, k, v, window=window), f"window={window}")


# ---------------------------------------------------------------- MoE dispatch / combine

# id -> (N, C, E, k, experts actually used)
MOE_CASES = {
    "N7-C12-E3-k2": (7, 12, 3, 2, 3),
    "N5-C60-E1-k1": (5, 60, 1, 1, 1),
    "N33-C20-E8-k3": (33, 20, 8, 3, 8),
    "N17-C9-E6-k2-two-experts-idle": (17, 9, 6, 2, 4),
}


def _moe_inputs(case, dtype, device, seed=5):
    N, C, E, k, used = case
    g = _gen(seed)
    x = random_tensor((N, C), dtype, device, g)
    index = torch.stack([torch.randperm(used, generator=g)[:k] for _ in range(N)]).to(device)  # [N, k]
    weight = torch.rand(N, k, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    expert_out = random_tensor((N * k, C), dtype, device, g)
    return x, index, E, weight, expert_out


@pytest.mark.parametrize("case", MOE_CASES.values(), ids=MOE_CASES.keys())
@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
def test_moe_dispatch_and_combine_kernels_vs_reference(backend, case, dtype):
    _skip_unless_runnable(backend)
    x, index, E, weight, expert_out = _moe_inputs(case, dtype, _device_for(backend))
    ref_sorted, ref_offsets, ref_slot = kernels.get("moe_dispatch", "reference")(x, index, E)
    with poisoned_outputs():
        got_sorted, got_offsets, got_slot = kernels.get("moe_dispatch", backend)(x, index, E)
    assert_close(got_offsets, ref_offsets, "offsets")
    assert_close(got_slot, ref_slot, "slot")
    assert_close(got_sorted, ref_sorted, "x_sorted")
    expected = kernels.get("moe_combine", "reference")(expert_out, ref_slot, weight)
    with poisoned_outputs():
        got = kernels.get("moe_combine", backend)(expert_out, ref_slot, weight)
    assert_close(got, expected, f"moe_combine[{backend}]")


# ---------------------------------------------------------------- bad input

def test_cpu_tensor_to_cuda_kernel_is_a_value_error():
    x, w = torch.randn(2, 8), torch.randn(8)
    with pytest.raises(ValueError, match="cpu tensor but cupy kernels run on a CUDA GPU"):
        kernels.get("rms_norm", "cupy")(x, w)
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="cpu tensor"):
        kernels.get("attention", "cupy")(q, q, q)
    if not kernels.cuda_simulator_enabled():
        with pytest.raises(ValueError, match="cpu tensor"):
            kernels.get("rms_norm", "numba_cuda")(x, w)


@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_attention_bad_shapes_are_value_errors(backend):
    fn = kernels.get("attention", backend)
    q, kv = torch.randn(1, 4, 3, 8), torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        fn(q, kv, kv)                                    # 3 query heads over 2 KV heads
    with pytest.raises(ValueError, match="4-D"):
        fn(torch.randn(4, 3, 8), kv, kv)                 # wrong rank
    with pytest.raises(ValueError, match="window must be a positive int"):
        fn(torch.randn(1, 4, 2, 8), kv, kv, window=0)
    with pytest.raises(ValueError, match="T <= S"):
        fn(torch.randn(1, 6, 2, 8), kv, kv)


def test_kernels_refuse_wrong_dtype_and_gradients():
    with pytest.raises(ValueError, match="must be float32, float64, got bfloat16"):
        kernels.get("rms_norm", "numba")(torch.randn(2, 8, dtype=torch.bfloat16), torch.randn(8, dtype=torch.bfloat16))
    w = torch.randn(8, requires_grad=True)
    with pytest.raises(ValueError, match="forward-only"):
        kernels.get("rms_norm", "numba")(torch.randn(2, 8), w)
    with torch.no_grad():
        kernels.get("rms_norm", "numba")(torch.randn(2, 8), w)  # fine without a graph


def test_moe_dispatch_bad_indices_are_value_errors():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\)"):
        kernels.get("moe_dispatch", "numba")(x, torch.tensor([[0], [1], [2], [3]]), 3)
    with pytest.raises(ValueError, match=r"\[N, k\]"):
        kernels.get("moe_dispatch", "numba")(x, torch.tensor([[0], [1]]), 3)


# ---------------------------------------------------------------- CUDA C compiles

CU_FILES = sorted(Path(kernels.__file__).parent.glob("*.cu"))


@pytest.mark.parametrize("cu_file", CU_FILES, ids=[p.name for p in CU_FILES])
def test_cuda_source_compiles_with_nvcc(cu_file, tmp_path):
    nvcc = kernels.machine.nvcc_path()
    if nvcc is None:
        pytest.skip("nvcc is not installed on this machine")
    result = subprocess.run([nvcc, "-ptx", "-arch=sm_80", "-std=c++17", str(cu_file), "-o", str(tmp_path / "out.ptx")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out.ptx").stat().st_size > 0
