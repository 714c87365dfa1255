"""The vector quantiser (refimpl/vq.py).

`VectorQuantizer`: the round trip through `lookup`, the straight-through gradient, which parameters
each loss trains, the EMA codebook update, dead-code restarts, the usage statistics, and bad input.
(The nearest-code op `vq_nearest` itself, against brute force: tests/ops/test_vq_nearest.py.)
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kernels.check import assert_close, random_tensor
from refimpl import ops, vq


# ---------------------------------------------------------------- VectorQuantizer

def _quantizer(K=8, C=4, seed=0, **kwargs) -> vq.VectorQuantizer:
    return vq.VectorQuantizer(K, C, generator=torch.Generator().manual_seed(seed), **kwargs)


@pytest.mark.parametrize("ema", [False, True], ids=["codebook-loss", "ema"])
def test_forward_round_trips_through_lookup(ema):
    quantizer = _quantizer(ema=ema).eval()                 # eval: the EMA codebook stays put
    z_e = random_tensor((2, 5, 4), generator=torch.Generator().manual_seed(1))
    out = quantizer(z_e)
    assert tuple(out.z_q.shape) == (2, 5, 4) and tuple(out.indices.shape) == (2, 5)
    assert torch.equal(out.indices, ops.vq_nearest(z_e.reshape(-1, 4), quantizer.codebook)[0].view(2, 5))
    assert torch.allclose(quantizer.lookup(out.indices), out.z_q, atol=1e-6, rtol=0)   # z_e + (z_q - z_e): rounding
    assert torch.equal(quantizer.lookup(out.indices), quantizer.codebook[out.indices])
    # quantising the codes themselves gives them back, exactly
    again = quantizer(quantizer.lookup(out.indices))
    assert torch.equal(again.indices, out.indices) and torch.equal(again.z_q, quantizer.lookup(out.indices))


def test_straight_through_gradient_is_ones():
    quantizer = _quantizer()
    z_e = random_tensor((3, 7, 4), generator=torch.Generator().manual_seed(2)).requires_grad_()
    quantizer(z_e).z_q.sum().backward()
    assert torch.equal(z_e.grad, torch.ones_like(z_e))
    assert quantizer.codebook.grad is None                 # z_q's value is detached from the codebook


def test_commitment_loss_trains_only_the_encoder():
    quantizer = _quantizer(beta=0.3)
    z_e = random_tensor((6, 4), generator=torch.Generator().manual_seed(3)).requires_grad_()
    out = quantizer(z_e)
    out.commitment_loss.backward()
    z_q = quantizer.codebook.detach()[out.indices]
    assert_close(out.commitment_loss.detach(), 0.3 * ((z_e.detach() - z_q) ** 2).mean(), "commitment loss")
    assert_close(z_e.grad, 0.3 * 2 * (z_e.detach() - z_q) / z_e.numel(), "d commitment / d z_e")
    assert quantizer.codebook.grad is None


def test_codebook_loss_trains_only_the_codebook():
    quantizer = _quantizer(K=5)
    z_e = random_tensor((9, 4), generator=torch.Generator().manual_seed(4)).requires_grad_()
    out = quantizer(z_e)
    out.codebook_loss.backward()
    codes = quantizer.codebook.detach()
    z_q = codes[out.indices]
    assert_close(out.codebook_loss.detach(), ((z_e.detach() - z_q) ** 2).mean(), "codebook loss")
    # d/dc_k mean((z - c_k)^2 over the rows assigned to k) = sum over those rows of 2 (c_k - z) / numel
    expected = torch.zeros_like(codes).index_add_(0, out.indices, 2 * (z_q - z_e.detach()) / z_e.numel())
    assert_close(quantizer.codebook.grad, expected, "d codebook loss / d codebook")
    assert z_e.grad is None
    assert_close(out.loss.detach(), (out.commitment_loss + out.codebook_loss).detach(), "loss = sum")


def test_ema_moves_each_used_code_toward_its_assigned_mean():
    K, C, gamma, eps = 4, 3, 0.9, 1e-5
    quantizer = _quantizer(K=K, C=C, ema=True, decay=gamma, eps=eps)
    assert isinstance(quantizer.codebook, torch.Tensor) and not isinstance(quantizer.codebook, torch.nn.Parameter)
    before = quantizer.codebook.clone()
    # rows near codes 0 and 2 only, offset by a common shift so the assigned means differ from the codes
    g = torch.Generator().manual_seed(5)
    source = torch.tensor([0, 0, 0, 2, 2, 0, 2, 0])
    z_e = before[source] + 0.2 + 0.01 * random_tensor((8, C), generator=g)
    out = quantizer(z_e)                                   # training mode: one EMA step
    assert torch.equal(out.indices, source)
    assert out.codebook_loss.item() == 0.0
    assert torch.equal(out.z_q, z_e + (before[source] - z_e))         # quantised with the codes before the step
    # the update by hand: N_k = gamma 1 + (1 - gamma) n_k, m_k = gamma c_k + (1 - gamma) sum z, then smoothing
    counts = torch.bincount(source, minlength=K).float()
    sums = torch.zeros(K, C).index_add_(0, source, z_e)
    N = gamma + (1 - gamma) * counts
    m = gamma * before + (1 - gamma) * sums
    smoothed = (N + eps) / (N.sum() + K * eps) * N.sum()
    assert_close(quantizer.codebook, m / smoothed[:, None], "EMA codebook")
    for k in (0, 2):
        mean = z_e[source == k].mean(0)
        assert (quantizer.codebook[k] - mean).norm() < 0.95 * (before[k] - mean).norm()
    for k in (1, 3):                                       # unused: only the smoothing touches them (~1e-5)
        assert_close(quantizer.codebook[k], before[k], f"unused code {k}")
    # many steps on the same batch: each used code converges to its assigned mean
    for _ in range(200):
        quantizer(z_e)
    for k in (0, 2):
        assert_close(quantizer.codebook[k], z_e[source == k].mean(0), f"code {k} after 200 steps",
                     atol=1e-4, rtol=1e-4)                 # gamma^200 ~ 7e-10 of the start, plus the smoothing


def test_eval_mode_neither_updates_the_ema_codebook_nor_counts():
    quantizer = _quantizer(ema=True).eval()
    before = quantizer.codebook.clone()
    quantizer(random_tensor((5, 4), generator=torch.Generator().manual_seed(6)))
    assert torch.equal(quantizer.codebook, before)
    assert int(quantizer.code_counts.sum()) == 0


@pytest.mark.parametrize("ema", [False, True], ids=["codebook-loss", "ema"])
def test_restart_replaces_exactly_the_unused_codes(ema):
    K, C = 6, 4
    quantizer = _quantizer(K=K, C=C, ema=ema)
    codes = quantizer.codebook.detach().clone()
    z_e = codes[torch.tensor([0, 2, 3, 3, 0])]                         # uses codes 0, 2, 3 (each exactly)
    quantizer(z_e)
    codes = quantizer.codebook.detach().clone()                       # (under EMA, that forward moved them a little)
    assert quantizer.code_counts.tolist() == [2, 0, 1, 2, 0, 0]
    assert quantizer.usage() == pytest.approx(3 / K)
    fresh_rows = random_tensor((10, C), generator=torch.Generator().manual_seed(7), scale=3.0)
    restarted = quantizer.restart_dead_codes(fresh_rows, generator=torch.Generator().manual_seed(8))
    assert restarted == 3
    after = quantizer.codebook.detach()
    for k in (0, 2, 3):
        assert torch.equal(after[k], codes[k])
    for k in (1, 4, 5):                                    # each now a row of fresh_rows, within the tiny noise
        nearest = (fresh_rows - after[k]).norm(dim=1).min()
        assert 0 < nearest < 1e-3 * 3.0 * 10 * math.sqrt(C)
        assert not torch.equal(after[k], codes[k])
    assert len({tuple(after[k].tolist()) for k in (1, 4, 5)}) == 3    # distinct rows (drawn without replacement)
    assert int(quantizer.code_counts.sum()) == 0                     # counts reset
    if ema:
        assert quantizer.ema_cluster_size[[1, 4, 5]].tolist() == [1.0, 1.0, 1.0]
        assert torch.equal(quantizer.ema_sum[[1, 4, 5]], after[[1, 4, 5]])
    # min_count: codes used fewer than twice are dead; counts were reset, so now every code is
    quantizer(after[torch.tensor([1, 1, 4])])
    assert quantizer.restart_dead_codes(fresh_rows, min_count=2) == K - 1
    assert quantizer.restart_dead_codes(fresh_rows, min_count=0) == 0


def test_restart_with_fewer_rows_than_dead_codes_draws_with_replacement():
    quantizer = _quantizer(K=5, C=2)
    row = torch.tensor([[3.0, -1.0], [2.5, 0.0]])
    assert quantizer.restart_dead_codes(row, generator=torch.Generator().manual_seed(9)) == 5
    assert ((quantizer.codebook.detach()[:, None] - row[None]).norm(dim=-1).min(dim=1).values < 1e-2).all()


def test_perplexity_is_K_for_uniform_usage_and_1_for_one_code():
    K = 8
    quantizer = _quantizer(K=K)
    assert quantizer.perplexity() == 0.0 and quantizer.usage() == 0.0           # nothing counted yet
    codes = quantizer.codebook.detach()
    quantizer(torch.cat([codes, codes, codes]))            # every code three times
    assert quantizer.perplexity() == pytest.approx(K, rel=1e-12)
    assert quantizer.usage() == 1.0
    quantizer.reset_usage()
    quantizer(codes[3].expand(10, -1).contiguous())
    assert quantizer.perplexity() == pytest.approx(1.0, rel=1e-12)
    assert quantizer.usage() == 1 / K
    quantizer.reset_usage()
    quantizer(codes[torch.tensor([0, 0, 1, 1])])            # two codes equally: perplexity 2
    assert quantizer.perplexity() == pytest.approx(2.0, rel=1e-12)


def test_a_short_training_run_lowers_the_loss():
    """Everything together: the straight-through gradient trains an encoder through the quantiser
    (a reconstruction of x from z_q), while the two VQ losses pull encoder outputs and codes together."""
    torch.manual_seed(10)
    quantizer = _quantizer(K=16, C=4, seed=10)
    encoder = torch.nn.Linear(4, 4)
    x = random_tensor((64, 4), generator=torch.Generator().manual_seed(11))
    opt = torch.optim.Adam([*encoder.parameters(), *quantizer.parameters()], lr=1e-2)
    losses = []
    for _ in range(60):
        out = quantizer(encoder(x))
        loss = F.mse_loss(out.z_q, x) + out.loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_quantizer_bad_inputs_are_value_errors():
    quantizer = _quantizer(K=8, C=4)
    with pytest.raises(ValueError, match=r"z_e must be \[..., C\] with C = 4, got shape \[2, 5\]"):
        quantizer(torch.randn(2, 5))
    with pytest.raises(ValueError, match="z_e must have the codebook's dtype torch.float32, got torch.float64"):
        quantizer(torch.randn(2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"z_e must be a floating-point tensor \[..., 4\], got torch.int64"):
        quantizer(torch.ones(2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"z_e must be a floating-point tensor \[..., 4\], got list"):
        quantizer([[0.0] * 4])
    with pytest.raises(ValueError, match=r"every size must be >= 1, got N = 0"):
        quantizer(torch.randn(0, 4))
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 8\), got \[0, 8\]"):
        quantizer.lookup(torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="indices must be an integer tensor, got torch.float32"):
        quantizer.lookup(torch.tensor([0.0]))
    with pytest.raises(ValueError, match=r"z_e must be \[..., C\] with C = 4"):
        quantizer.restart_dead_codes(torch.randn(3, 2))
    with pytest.raises(ValueError, match="num_codes and dim must be >= 1"):
        vq.VectorQuantizer(0, 4)
    with pytest.raises(ValueError, match=r"decay must be in \(0, 1\)"):
        vq.VectorQuantizer(4, 4, ema=True, decay=1.0)
    with pytest.raises(ValueError, match="beta must be >= 0"):
        vq.VectorQuantizer(4, 4, beta=-0.1)
