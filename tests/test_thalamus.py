"""The Thalamus router: causal context, a balance loss that trains it, pathways, introspection."""

from __future__ import annotations

import torch

from kernels.check import assert_close
from refimpl.synapse import HebbianPathways, Thalamus


def test_routing_is_causal_and_renormalised():
    torch.manual_seed(0)
    thalamus = Thalamus(16, n_experts=4, top_k=2, d_state=4).double().eval()
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    w, i = thalamus(x)
    assert w.shape == (24, 2) and i.shape == (24, 2)
    assert_close(w.sum(-1), torch.ones(24, dtype=torch.float64), "weights renormalised over the chosen k")
    scores = thalamus.last_introspection["scores"].clone()
    x2 = x.clone()
    x2[:, 7] += 1.0
    thalamus(x2)
    assert_close(thalamus.last_introspection["scores"][:, :7], scores[:, :7], "scores before the change")


def test_balance_loss_reaches_the_router_and_the_mamba_layer():
    torch.manual_seed(1)
    thalamus = Thalamus(8, n_experts=4, top_k=2, d_state=4)
    thalamus(torch.randn(2, 10, 8))
    thalamus.aux_loss.backward()
    assert thalamus.router.weight.grad.abs().sum() > 0
    assert thalamus.mamba.in_proj.weight.grad.abs().sum() > 0


def test_noise_only_in_training():
    torch.manual_seed(2)
    thalamus = Thalamus(8, n_experts=4, top_k=2, d_state=4, noise_std=5.0)
    x = torch.randn(1, 30, 8)
    thalamus.eval()
    _, a = thalamus(x)
    _, b = thalamus(x)
    assert torch.equal(a, b)
    thalamus.train()
    _, c = thalamus(x)
    assert not torch.equal(a, c)


def test_pathways_are_recorded_and_can_bias_routing():
    torch.manual_seed(3)
    table = HebbianPathways(lr=1.0, decay=1.0)
    thalamus = Thalamus(8, n_experts=3, top_k=1, d_state=4, pathways=table).eval()
    thalamus(torch.randn(1, 5, 8))
    assert abs(sum(table.strengths.values()) - 5.0) < 1e-9        # five tokens, one pathway each
    table.strengths = {"2": 1000.0}
    thalamus.pathway_bias = 10.0                                    # a strong bias: expert 2 wins everywhere
    _, chosen = thalamus(torch.randn(1, 5, 8))
    assert chosen.flatten().tolist() == [2] * 5
    assert thalamus.last_introspection["confidence"].min() >= 1.0
