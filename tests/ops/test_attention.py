"""Attention's kernels against `refimpl.ops.attention`: causal GQA, windows of 1 and wider than T, decode
and chunk shapes, large logits, strided inputs, and bad input. Outputs are poisoned with NaN (floats) or -1
(indices) before a kernel writes them; numba_cuda runs on numba's CUDA simulator when there is no GPU
(the biggest cases then skip with a reason), cupy cases skip without a GPU. The check every kernel
passes (tests/test_every_kernel.py) runs beside these. The last part tests the reference op itself:
GQA against multi-head attention, and windows covering the sequence or not.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import attention as attention_kernels
from kernels.check import assert_close, poisoned_outputs, random_tensor
from kernels.machine import device_for
from kernel_testing import BACKEND_DTYPES, seeded, skip_unless_runnable
from refimpl import ops


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
    g, device = seeded(3), device_for(backend)
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
    g, device = seeded(6), device_for(backend)
    q = random_tensor((1, 10, 8, 2), device=device, generator=g).transpose(2, 3)   # [1, 10, 2, 8], heads strided
    k = random_tensor((1, 20, 1, 8), device=device, generator=g)[:, ::2]           # [1, 10, 1, 8], every other step
    v = random_tensor((1, 20, 1, 8), device=device, generator=g)[:, 1::2]
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    with poisoned_outputs():
        got = kernels.get("attention", backend)(q, k, v, window=3)
    assert_close(got, kernels.get("attention", "reference")(q, k, v, window=3), f"strided attention[{backend}]")


def test_attention_cupy_at_gpu_size():
    skip_unless_runnable("cupy")
    g = seeded(4)
    q = random_tensor((4, 256, 8, 64), device="cuda", generator=g)
    k = random_tensor((4, 256, 2, 64), device="cuda", generator=g)
    v = random_tensor((4, 256, 2, 64), device="cuda", generator=g)
    for window in (None, 64):
        with poisoned_outputs():
            got = attention_kernels.attention_cupy(q, k, v, window=window)
        assert_close(got, kernels.get("attention", "reference")(q, k, v, window=window), f"window={window}")


@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_attention_bad_shapes_are_value_errors(backend):
    fn = kernels.get("attention", backend)
    q, kv = torch.randn(1, 4, 3, 8), torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        fn(q, kv, kv)                                    # 3 query heads over 2 KV heads
    with pytest.raises(ValueError, match=r"q must be \[B, T, H, D\], got \[4, 3, 8\]"):
        fn(torch.randn(4, 3, 8), kv, kv)                 # wrong rank
    with pytest.raises(ValueError, match="window must be a positive int"):
        fn(torch.randn(1, 4, 2, 8), kv, kv, window=0)
    with pytest.raises(ValueError, match="T <= S"):
        fn(torch.randn(1, 6, 2, 8), kv, kv)


@pytest.mark.parametrize("backend", ["numba_cuda", "cupy"])
def test_head_dim_beyond_the_cuda_accumulator_is_a_value_error(backend):
    skip_unless_runnable(backend)
    q = torch.randn(1, 2, 1, attention_kernels.MAX_HEAD_DIM + 2, device=device_for(backend))
    with pytest.raises(ValueError, match=f"head dimension D <= {attention_kernels.MAX_HEAD_DIM}"):
        kernels.get("attention", backend)(q, q, q)


def test_numba_exp_matches_math_exp():
    """The numba kernel's own exp (a polynomial LLVM vectorises) against libm's, over every x <= 0 it meets."""
    for x in [0.0, -1e-300, -0.34657359, -0.5, -1.0, -17.3, -100.0, -708.0] + [-708.0 * i / 997 for i in range(998)]:
        assert attention_kernels._exp_nonpositive(x) == pytest.approx(math.exp(x), rel=1e-15, abs=0.0), x
    assert attention_kernels._exp_nonpositive(-1e4) < 1e-300                  # underflow: (all but) zero
    assert math.isnan(attention_kernels._exp_nonpositive(math.nan))


def test_numba_attention_keeps_a_nan_visible():
    """A NaN in q spoils only its own output row; a NaN key spoils every query that reads it: as the reference."""
    g = seeded(7)
    q = random_tensor((1, 9, 2, 6), generator=g)
    k, v = random_tensor((1, 9, 1, 6), generator=g), random_tensor((1, 9, 1, 6), generator=g)
    q[0, 4, 1, 2], k[0, 6, 0, 3] = math.nan, math.nan
    for window in (None, 2):
        got = kernels.get("attention", "numba")(q, k, v, window=window)
        expected = kernels.get("attention", "reference")(q, k, v, window=window)
        assert torch.equal(got.isnan(), expected.isnan()), f"window={window}"
        assert_close(got.nan_to_num(), expected.nan_to_num(), f"window={window}, away from the NaNs")


# ---------------------------------------------------------------- the reference op: GQA vs multi-head, windows

def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _mha(q, k, v, causal=True):
    """Plain multi-head attention via PyTorch's own SDPA: one KV head per query head."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
    return out.transpose(1, 2)


def test_gqa_with_groups_equal_to_heads_is_multi_head_attention():
    g = _gen(3)
    q, k, v = (random_tensor((2, 11, 4, 8), generator=g) for _ in range(3))
    assert_close(ops.attention(q, k, v), _mha(q, k, v), "G = H vs MHA")


def test_gqa_equals_mha_with_each_kv_head_repeated():
    g = _gen(4)
    q = random_tensor((2, 11, 6, 8), generator=g)
    k, v = random_tensor((2, 11, 2, 8), generator=g), random_tensor((2, 11, 2, 8), generator=g)
    expected = _mha(q, k.repeat_interleave(3, dim=2), v.repeat_interleave(3, dim=2))
    assert_close(ops.attention(q, k, v), expected, "GQA vs MHA with repeated KV")


@pytest.mark.parametrize("window", [13, 14, 100], ids=["W=T", "W=T+1", "W>>T"])
def test_window_covering_the_sequence_is_full_attention(window):
    g = _gen(5)
    q, k, v = random_tensor((1, 13, 4, 8), generator=g), random_tensor((1, 13, 2, 8), generator=g), random_tensor((1, 13, 2, 8), generator=g)
    assert_close(ops.attention(q, k, v, window=window), ops.attention(q, k, v), f"window={window}")


def test_narrow_window_differs_from_full_attention():
    g = _gen(6)
    q, k, v = (random_tensor((1, 13, 2, 8), generator=g) for _ in range(3))
    assert not torch.allclose(ops.attention(q, k, v, window=4), ops.attention(q, k, v))
