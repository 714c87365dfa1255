"""The shared blocks' kernels against their references, on every backend, at awkward shapes; and
every op's CUDA C (kernels.OP_MODULES) compiled with nvcc and with NVRTC. The chapter ops' kernels
have their own files, tests/test_kernel_<op>.py.

Outputs are poisoned with NaN (floats) or -1 (indices) before a kernel writes
them; inputs are fresh random draws. numba_cuda runs through numba's CUDA
simulator when there is no GPU (slow: the biggest cases then skip with a
reason and run on a GPU); cupy cases need a GPU and skip with a reason
elsewhere, while their CUDA C is compile-checked here wherever nvcc / NVRTC exist.
"""

from __future__ import annotations

import subprocess

import pytest
import torch

import kernels
from kernels import attention as attention_kernels
from kernels import rmsnorm as rmsnorm_kernels
from kernels.check import assert_close, poisoned_outputs, random_tensor
from kernels.machine import device_for
from kernel_testing import BACKEND_DTYPES, ptx_entries, skip_unless_runnable


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- RMSNorm

RMS_SHAPES = {"rows3-C60": (3, 60), "B2-T5-C63": (2, 5, 63), "one-element": (1, 1), "rows4-C257": (4, 257)}


@pytest.mark.parametrize("shape", RMS_SHAPES.values(), ids=RMS_SHAPES.keys())
@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
def test_rms_norm_kernel_vs_reference(backend, shape, dtype):
    skip_unless_runnable(backend)
    g, device = _gen(), device_for(backend)
    x = random_tensor(shape, dtype, device, g, scale=3.0)
    w = random_tensor(shape[-1:], dtype, device, g)
    expected = kernels.get("rms_norm", "reference")(x, w, 1e-5)
    with poisoned_outputs():
        got = kernels.get("rms_norm", backend)(x, w, 1e-5)
    assert_close(got, expected, f"rms_norm[{backend}]")


@pytest.mark.parametrize("variant", rmsnorm_kernels.NUMBA_CUDA_LADDER)
def test_rms_norm_numba_cuda_ladder_vs_reference(variant):
    skip_unless_runnable("numba_cuda")
    g, device = _gen(1), device_for("numba_cuda")
    x, w = random_tensor((3, 70), device=device, generator=g), random_tensor((70,), device=device, generator=g)
    with poisoned_outputs():
        got = rmsnorm_kernels.NUMBA_CUDA_LADDER[variant](x, w)
    assert_close(got, kernels.get("rms_norm", "reference")(x, w), variant)


@pytest.mark.parametrize("variant", rmsnorm_kernels.CUPY_LADDER)
def test_rms_norm_cupy_ladder_vs_reference(variant):
    skip_unless_runnable("cupy")
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
LARGE_LOGITS = 8.0  # q scaled up so scores span tens of units: the softmax's max-rescaling must hold


@pytest.mark.parametrize("case", ATTENTION_CASES.values(), ids=ATTENTION_CASES.keys())
@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
def test_attention_kernel_vs_reference(backend, case, dtype):
    B, T, S, H, G, D, causal, window = case
    skip_unless_runnable(backend, work=B * T * H * S * D)
    g, device = _gen(3), device_for(backend)
    q = random_tensor((B, T, H, D), dtype, device, g)
    k = random_tensor((B, S, G, D), dtype, device, g)
    v = random_tensor((B, S, G, D), dtype, device, g)
    for q_scale in (1.0, LARGE_LOGITS):
        expected = kernels.get("attention", "reference")(q * q_scale, k, v, causal=causal, window=window)
        with poisoned_outputs():
            got = kernels.get("attention", backend)(q * q_scale, k, v, causal=causal, window=window)
        assert_close(got, expected, f"attention[{backend}], q x {q_scale}")


@pytest.mark.parametrize("backend", ["numba", "numba_cuda"])
def test_attention_kernel_takes_non_contiguous_inputs(backend):
    skip_unless_runnable(backend)
    g, device = _gen(6), device_for(backend)
    q = random_tensor((1, 10, 8, 2), device=device, generator=g).transpose(2, 3)   # [1, 10, 2, 8], heads strided
    k = random_tensor((1, 20, 1, 8), device=device, generator=g)[:, ::2]           # [1, 10, 1, 8], every other step
    v = random_tensor((1, 20, 1, 8), device=device, generator=g)[:, 1::2]
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    with poisoned_outputs():
        got = kernels.get("attention", backend)(q, k, v, window=3)
    assert_close(got, kernels.get("attention", "reference")(q, k, v, window=3), f"strided attention[{backend}]")


def test_attention_cupy_at_gpu_size():
    skip_unless_runnable("cupy")
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
    skip_unless_runnable(backend)
    x, index, E, weight, expert_out = _moe_inputs(case, dtype, device_for(backend))
    if dtype == torch.float64:
        index = index.to(torch.int32)          # the kernels take int32 indices too
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


def test_degenerate_sizes_are_value_errors():
    with pytest.raises(ValueError, match="every size must be >= 1"):
        kernels.get("attention", "numba")(torch.randn(1, 4, 2, 0), torch.randn(1, 4, 2, 0), torch.randn(1, 4, 2, 0))
    with pytest.raises(ValueError, match="C >= 1"):
        kernels.get("rms_norm", "numba")(torch.randn(3, 0), torch.randn(0))
    with pytest.raises(ValueError, match="k >= 1"):
        kernels.get("moe_dispatch", "numba")(torch.randn(3, 4), torch.zeros(3, 0, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="N >= 1"):
        kernels.get("moe_dispatch", "numba")(torch.randn(0, 4), torch.zeros(0, 1, dtype=torch.long), 2)


@pytest.mark.parametrize("backend", ["numba_cuda", "cupy"])
def test_head_dim_beyond_the_cuda_accumulator_is_a_value_error(backend):
    skip_unless_runnable(backend)
    q = torch.randn(1, 2, 1, attention_kernels.MAX_HEAD_DIM + 2, device=device_for(backend))
    with pytest.raises(ValueError, match=f"head dimension D <= {attention_kernels.MAX_HEAD_DIM}"):
        kernels.get("attention", backend)(q, q, q)


# ---------------------------------------------------------------- CUDA C compiles

KERNEL_MODULES = list(kernels.OP_MODULES)  # every op's .cu file


@pytest.mark.parametrize("module", KERNEL_MODULES, ids=[m.CU_SOURCE.name for m in KERNEL_MODULES])
def test_cuda_source_compiles_with_nvcc(module, tmp_path):
    nvcc = kernels.machine.nvcc_path()
    if nvcc is None:
        pytest.skip("nvcc is not installed on this machine")
    ptx = tmp_path / "out.ptx"
    result = subprocess.run([nvcc, "-ptx", "-arch=sm_80", "-std=c++17", str(module.CU_SOURCE), "-o", str(ptx)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert set(module.CUPY_ENTRY_POINTS) <= ptx_entries(ptx.read_text())


@pytest.mark.parametrize("module", KERNEL_MODULES, ids=[m.CU_SOURCE.name for m in KERNEL_MODULES])
def test_cuda_source_compiles_with_nvrtc_as_cupy_will(module):
    """CuPy's RawModule compiles with NVRTC, which (unlike nvcc) has no host headers such as math.h."""
    try:
        from cupy_backends.cuda.libs import nvrtc
        nvrtc.getVersion()
    except Exception as err:  # missing library or CuPy: the error type depends on which
        pytest.skip(f"NVRTC is not loadable here ({type(err).__name__}: {err})")
    program = nvrtc.createProgram(module.CU_SOURCE.read_text(), module.CU_SOURCE.name, [], [])
    try:
        try:
            nvrtc.compileProgram(program, ["-arch=compute_80", "-std=c++17"])
        except nvrtc.NVRTCError:
            pytest.fail(nvrtc.getProgramLog(program))
        ptx = nvrtc.getPTX(program)
    finally:
        nvrtc.destroyProgram(program)
    ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
    assert set(module.CUPY_ENTRY_POINTS) <= ptx_entries(ptx)
