"""The shared blocks and the baseline: equivalences that teach, and clear errors on bad input."""

from __future__ import annotations

import math

import pytest
import torch

from kernels.check import assert_close, random_tensor
from refimpl import ops
from refimpl.baseline import BaselineConfig, BaselineLM
from refimpl.blocks import GroupedQueryAttention, KVCache, SwiGLU, TopKMoE, apply_rope, rope_tables


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_rope_matches_complex_rotation():
    """Pair (x_i, x_{i+D/2}) is the complex number x_i + i x_{i+D/2}, turned by angle pos * base^(-2i/D)."""
    g = _gen(2)
    x = random_tensor((1, 5, 3, 16), dtype=torch.float64, generator=g)
    positions = torch.arange(7, 12)
    cos, sin = rope_tables(positions, 16, dtype=torch.float64)
    z = torch.complex(x[..., :8], x[..., 8:])                                            # [B, T, H, D/2]
    angle = positions[:, None].double() * 10000.0 ** (-torch.arange(0, 16, 2).double() / 16)  # [T, D/2]
    turned = z * torch.polar(torch.ones_like(angle), angle)[None, :, None, :]
    assert_close(apply_rope(x, cos, sin), torch.cat([turned.real, turned.imag], dim=-1), "RoPE vs complex rotation")


def test_rope_scores_depend_only_on_relative_position():
    g = _gen(2)
    q, k = random_tensor((1, 1, 1, 16), generator=g), random_tensor((1, 1, 1, 16), generator=g)

    def score(pos_q, pos_k):
        cq, sq = rope_tables(torch.tensor([pos_q]), 16)
        ck, sk = rope_tables(torch.tensor([pos_k]), 16)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    assert math.isclose(score(7, 3), score(104, 100), rel_tol=1e-5)
    assert not math.isclose(score(7, 3), score(7, 4), rel_tol=1e-3)


def test_moe_with_one_expert_and_top1_is_the_dense_swiglu():
    torch.manual_seed(0)
    moe, dense = TopKMoE(16, 40, n_experts=1, top_k=1), SwiGLU(16, 40)
    with torch.no_grad():
        dense.gate.weight.copy_(moe.experts.w_gate[0].T)
        dense.up.weight.copy_(moe.experts.w_up[0].T)
        dense.down.weight.copy_(moe.experts.w_down[0].T)
    x = random_tensor((3, 7, 16), generator=_gen(7))
    assert_close(moe(x), dense(x), "MoE(E=1, k=1) vs SwiGLU")
    assert math.isclose(moe.aux_loss.item(), 1.0, rel_tol=1e-6)  # one expert is perfectly balanced


def test_moe_statistics_and_balance_loss():
    torch.manual_seed(1)
    moe = TopKMoE(8, 16, n_experts=4, top_k=2)
    x = random_tensor((32, 8), generator=_gen(9))
    moe(x)
    counts = moe.last_stats["tokens_per_expert"]
    assert counts.sum() == 64 and counts.shape == (4,)
    probs = torch.softmax(moe.router(x), dim=-1)                       # recompute E * sum_e f_e * P_e by hand
    chosen = probs.topk(2, dim=-1).indices
    share = torch.stack([(chosen == e).sum() for e in range(4)]).float() / 64
    assert_close(moe.aux_loss.detach(), 4 * (share * probs.mean(0)).sum().detach(), "aux loss by hand")
    moe.aux_loss.backward()                                            # the loss alone trains the router
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("window", [None, 5], ids=["full", "window5"])
@pytest.mark.parametrize("n_experts", [0, 3], ids=["dense", "moe"])
def test_cached_decoding_equals_the_parallel_forward(window, n_experts):
    torch.manual_seed(2)
    model = BaselineLM(BaselineConfig.preset("tiny", window=window, n_experts=n_experts)).eval()
    idx = torch.randint(0, 256, (2, 14), generator=_gen(10))
    full, _ = model(idx)
    caches = [KVCache() for _ in model.blocks]
    # a 7-token prompt (longer than the window), a 3-token chunk, then one token at a time
    pieces = [(0, 7), (7, 10)] + [(t, t + 1) for t in range(10, 14)]
    steps = [model(idx[:, a:b], caches=caches)[0] for a, b in pieces]
    assert_close(torch.cat(steps, dim=1), full, "cached decoding vs parallel forward")
    if window is not None:
        assert caches[0].k.shape[1] == window                    # the cache stays bounded


def test_generate_extends_the_prompt():
    torch.manual_seed(3)
    model = BaselineLM(BaselineConfig.preset("tiny")).eval()
    out = model.generate(torch.zeros(1, 3, dtype=torch.long), 5, generator=_gen(11))
    assert out.shape == (1, 8) and out[:, :3].eq(0).all()


def test_bad_configs_are_value_errors():
    with pytest.raises(ValueError, match="top_k must be in"):
        TopKMoE(8, 16, n_experts=4, top_k=5)
    with pytest.raises(ValueError, match="top_k=5 must be in"):
        BaselineConfig.preset("tiny", n_experts=4, top_k=5)
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        GroupedQueryAttention(32, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="window must be >= 1"):
        GroupedQueryAttention(32, n_heads=4, n_kv_heads=2, window=0)
    with pytest.raises(ValueError, match="unknown preset"):
        BaselineConfig.preset("huge")
    with pytest.raises(ValueError, match=r"weight must be \[C\]"):
        ops.rms_norm(torch.randn(2, 8), torch.randn(7))
    with pytest.raises(ValueError, match="idx as an int tensor"):
        BaselineLM(BaselineConfig.preset("tiny"))(torch.randn(2, 4))


def test_capacity_overflow_counts_the_copies_past_capacity():
    from refimpl.blocks import capacity_overflow
    counts = torch.tensor([90, 20, 30, 116])                 # N = 128 tokens, top-2, E = 4: N k / E = 64
    assert int(capacity_overflow(counts, 128, 2, 1.0)) == (90 - 64) + (116 - 64)
    assert int(capacity_overflow(counts, 128, 2, 1.25)) == (90 - 80) + (116 - 80)
    assert int(capacity_overflow(counts, 128, 2, 2.0)) == 0
    with pytest.raises(ValueError, match="capacity_factor must be > 0"):
        capacity_overflow(counts, 128, 2, 0.0)
