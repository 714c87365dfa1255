"""Gated DeltaNet: the chunked form against the step loop, carried state, the layer, and its kernels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import gated_delta_rule as gdr_kernels
from kernels.check import assert_close, poisoned_outputs, random_tensor
from kernels.machine import device_for
from refimpl.gated_deltanet import GatedDeltaNet, GatedDeltaNetState
from refimpl.ops import gated_delta_rule_chunked, gated_delta_rule_recurrent

# id -> (B, T, H, K, V, gate regime)
CASES = {
    "B2-T63-H3-K60-V20": (2, 63, 3, 60, 20, "mixed"),
    "B1-T17-H1-K8-V1": (1, 17, 1, 8, 1, "mixed"),
    "T40-forget-everything": (1, 40, 2, 16, 8, "alpha~0"),
    "T40-never-forget": (1, 40, 2, 16, 8, "alpha~1"),
    "T33-write-nothing-or-all": (2, 33, 2, 12, 12, "beta 0/1"),
}


def _inputs(case, dtype=torch.float64, device="cpu", seed=0):
    B, T, H, K, V, regime = case
    gen = torch.Generator().manual_seed(seed)
    q = random_tensor((B, T, H, K), dtype, device, gen)
    k = F.normalize(random_tensor((B, T, H, K), dtype, device, gen), dim=-1)
    v = random_tensor((B, T, H, V), dtype, device, gen)
    g = -3 * torch.rand(B, T, H, generator=gen, dtype=torch.float64)
    beta = torch.rand(B, T, H, generator=gen, dtype=torch.float64)
    if regime == "alpha~0":
        g = torch.full_like(g, -30.0)                       # alpha = e^-30: the state is wiped every step
    elif regime == "alpha~1":
        g = torch.full_like(g, -1e-7)                       # alpha = 1 - 1e-7: nothing decays
    elif regime == "beta 0/1":
        beta = (beta > 0.5).double()                        # each step writes nothing or overwrites fully
    state = random_tensor((B, H, V, K), dtype, device, gen)  # a non-zero state carried in
    return q, k, v, g.to(dtype=dtype, device=device), beta.to(dtype=dtype, device=device), state


@pytest.mark.parametrize("chunk_size", [1, 16, 64, 100], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_chunked_equals_step_loop(case, chunk_size):
    q, k, v, g, beta, state = _inputs(case)
    o_ref, s_ref = gated_delta_rule_recurrent(q, k, v, g, beta, state)
    o, s = gated_delta_rule_chunked(q, k, v, g, beta, state, chunk_size=chunk_size)
    assert_close(o, o_ref, "outputs")
    assert_close(s, s_ref, "final state")


def test_chunked_gradients_equal_step_loop_gradients():
    inputs = [t.clone().requires_grad_() for t in _inputs(CASES["B1-T17-H1-K8-V1"])]
    o_ref, s_ref = gated_delta_rule_recurrent(*inputs)
    grads_ref = torch.autograd.grad((o_ref ** 2).sum() + s_ref.sum(), inputs)
    o, s = gated_delta_rule_chunked(*inputs, chunk_size=5)
    grads = torch.autograd.grad((o ** 2).sum() + s.sum(), inputs)
    for name, got, want in zip("q k v g beta state".split(), grads, grads_ref):
        assert_close(got, want, f"d/d{name}")


def test_carrying_the_state_across_calls_equals_one_shot():
    q, k, v, g, beta, state = _inputs(CASES["B2-T63-H3-K60-V20"])
    o_full, s_full = gated_delta_rule_chunked(q, k, v, g, beta, state, chunk_size=16)
    o1, s1 = gated_delta_rule_chunked(q[:, :25], k[:, :25], v[:, :25], g[:, :25], beta[:, :25], state, chunk_size=16)
    o2, s2 = gated_delta_rule_chunked(q[:, 25:], k[:, 25:], v[:, 25:], g[:, 25:], beta[:, 25:], s1, chunk_size=16)
    assert_close(torch.cat([o1, o2], dim=1), o_full, "outputs, split at 25")
    assert_close(s2, s_full, "final state, split at 25")


def test_the_delta_rule_stores_and_recalls_a_key():
    """With beta = 1 and no decay, writing (k, v) then reading with q = k returns exactly v."""
    k = F.normalize(torch.randn(1, 1, 1, 8, dtype=torch.float64), dim=-1)
    v = torch.randn(1, 1, 1, 3, dtype=torch.float64)
    zeros = torch.zeros(1, 1, 1, dtype=torch.float64)
    o, _ = gated_delta_rule_recurrent(k, k, v, zeros, zeros + 1, scale=1.0)
    assert_close(o, v, "recall")


def test_layer_decoding_with_state_equals_the_parallel_forward_and_is_causal():
    torch.manual_seed(0)
    layer = GatedDeltaNet(32, n_heads=4).double()
    x = torch.randn(2, 21, 32, dtype=torch.float64)
    full = layer(x)
    state = GatedDeltaNetState()
    pieces = [layer(x[:, a:b], state) for a, b in [(0, 5), (5, 6), (6, 13), (13, 21)]]
    assert_close(torch.cat(pieces, dim=1), full, "decoding in pieces vs one call")
    x2 = x.clone()
    x2[:, 11] += 1.0                                             # change token 11: outputs before it must not move
    changed = layer(x2)
    assert_close(changed[:, :11], full[:, :11], "outputs before the change")
    assert not torch.allclose(changed[:, 11:], full[:, 11:])


def test_bad_arguments_are_value_errors():
    q = torch.randn(1, 4, 2, 8)
    v, g = torch.randn(1, 4, 2, 3), torch.zeros(1, 4, 2)
    with pytest.raises(ValueError, match=r"v must be \[B, T, H, V\]"):
        gated_delta_rule_recurrent(q, q, torch.randn(1, 4, 3, 3), g, g)
    with pytest.raises(ValueError, match=r"beta must be \[B, T, H\]"):
        gated_delta_rule_chunked(q, q, v, g, torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"initial_state must be \[B, H, V, K\]"):
        gated_delta_rule_chunked(q, q, v, g, g, torch.zeros(1, 2, 8, 3))
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        gated_delta_rule_chunked(q, q, v, g, g, chunk_size=0)
    with pytest.raises(ValueError, match="initial_state must have q's dtype"):
        gated_delta_rule_recurrent(q, q, v, g, g, torch.zeros(1, 2, 3, 8, dtype=torch.float64))


def test_half_precision_runs_in_fp32_and_comes_back():
    half = [t.bfloat16() for t in _inputs(CASES["B1-T17-H1-K8-V1"], torch.float32)]
    o_ref, s_ref = gated_delta_rule_recurrent(*(t.float() for t in half))     # the same rounded inputs, in fp32
    o, s = gated_delta_rule_chunked(*half)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.bfloat16
    assert_close(o, o_ref.bfloat16(), "bf16 outputs vs fp32 on the same inputs")
    assert_close(s, s_ref.bfloat16(), "bf16 state vs fp32 on the same inputs")


def test_kernels_use_reaches_the_layer():
    """The layer calls the op through its module, so `kernels.use` swaps it (forward only)."""
    torch.manual_seed(0)
    layer = GatedDeltaNet(32, n_heads=2).eval()
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        expected = layer(x)
        with kernels.use("numba", ops=["gated_delta_rule"]):
            got = layer(x)
    assert_close(got, expected, "layer with the numba gated delta rule")


# ---------------------------------------------------------------- kernels vs the step loop

BACKEND_DTYPES = [pytest.param("numba", torch.float32, id="numba-fp32"),
                  pytest.param("numba", torch.float64, id="numba-fp64"),
                  pytest.param("numba_cuda", torch.float32, id="numba_cuda-fp32"),
                  pytest.param("cupy", torch.float32, id="cupy-fp32")]


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
def test_gated_delta_rule_kernel_vs_step_loop(backend, dtype, case):
    status = kernels.backend_status()[backend]
    if status.startswith("unavailable"):
        pytest.skip(f"{backend}: {status}")
    inputs = _inputs(case, dtype, device_for(backend), seed=1)
    o_ref, s_ref = gated_delta_rule_recurrent(*inputs)
    with poisoned_outputs():
        o, s = kernels.get("gated_delta_rule", backend)(*inputs)
    assert_close(o, o_ref, f"gated_delta_rule[{backend}] outputs")
    assert_close(s, s_ref, f"gated_delta_rule[{backend}] final state")


def test_gated_delta_rule_kernel_without_initial_state():
    q, k, v, g, beta, _ = _inputs(CASES["B1-T17-H1-K8-V1"], torch.float32)
    o_ref, s_ref = gated_delta_rule_recurrent(q, k, v, g, beta)
    o, s = kernels.get("gated_delta_rule", "numba")(q, k, v, g, beta)
    assert_close(o, o_ref, "outputs from a zero state")
    assert_close(s, s_ref, "final state from a zero state")


def test_gated_delta_rule_kernel_bad_input():
    q, k, v, g, beta, state = _inputs(CASES["B1-T17-H1-K8-V1"], torch.float32)
    with pytest.raises(ValueError, match="initial_state must have q's dtype"):
        kernels.get("gated_delta_rule", "numba")(q, k, v, g, beta, state.double())
    with pytest.raises(ValueError, match="cpu tensor but cupy kernels run on a CUDA GPU"):
        kernels.get("gated_delta_rule", "cupy")(q, k, v, g, beta, state)
    device = device_for("numba_cuda")
    wide = torch.randn(1, 2, 1, gdr_kernels.MAX_KEY_DIM + 1, device=device)
    small = torch.zeros(1, 2, 1, device=device)
    with pytest.raises(ValueError, match=f"K <= {gdr_kernels.MAX_KEY_DIM}"):
        kernels.get("gated_delta_rule", "numba_cuda")(wide, wide, torch.randn(1, 2, 1, 2, device=device), small, small)
