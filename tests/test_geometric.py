"""Geometric Intelligence (chapter 04): the factored modulation equals the materialised weight, the
causal predictor sees no future token (the public code's does), context tracking, adaptive decoding,
refinement, and the parameter calculator."""

from __future__ import annotations

import math

import pytest
import torch

from refimpl.geometric import (GeometricConfig, GeometricLM, ModulatedLinear, choose_token, geometric_parameter_count,
                               modulated_linear, modulated_linear_materialised, nucleus_sample, refine_coordinates,
                               track_context, uncertainty)


def _op_inputs(N=5, I=7, O=9, M=3, r=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, weight = torch.randn(N, I, generator=g, dtype=torch.float64), torch.randn(O, I, generator=g, dtype=torch.float64)
    U, P = (torch.randn(M, O, r, generator=g, dtype=torch.float64) for _ in range(2))
    V, Q = (torch.randn(M, I, r, generator=g, dtype=torch.float64) for _ in range(2))
    angle = torch.randn(N, M, generator=g, dtype=torch.float64)
    return x, weight, U, V, P, Q, angle.cos(), angle.sin()


@pytest.mark.parametrize("sizes", [(5, 7, 9, 3, 2), (1, 1, 1, 1, 1), (33, 20, 64, 8, 12)])
def test_factored_modulation_equals_the_materialised_weight(sizes):
    args = _op_inputs(*sizes)
    torch.testing.assert_close(modulated_linear(*args), modulated_linear_materialised(*args), atol=1e-10, rtol=1e-10)


def test_modulation_vanishes_without_factors():
    x, weight, U, V, P, Q, cos, sin = _op_inputs()
    torch.testing.assert_close(modulated_linear(x, weight, U * 0, V, P * 0, Q, cos, sin), x @ weight.T)


def test_modulated_layer_energy_is_the_weight_change():
    layer = ModulatedLinear(6, 4, n_wavelets=3, rank=2).double()
    angle = torch.randn(3, dtype=torch.float64)
    cos, sin = angle.cos(), angle.sin()
    eye = torch.eye(6, dtype=torch.float64)
    W_eff = layer(eye, cos.expand(6, 3), sin.expand(6, 3)).T                      # columns: W_eff e_i
    assert math.isclose(layer.energy(cos, sin).item(), (W_eff - layer.weight).norm().item(), rel_tol=1e-9)


@pytest.mark.parametrize("name", ["tiny", "small"])
@pytest.mark.parametrize("overrides", [{}, {"modulate": ("q", "down")}, {"tie_embeddings": True}])
def test_parameter_calculator_counts_the_built_model(name, overrides):
    cfg = GeometricConfig.preset(name, **overrides)
    assert geometric_parameter_count(cfg)["total"] == GeometricLM(cfg).num_parameters()


@pytest.mark.parametrize("causal", [True, False])
def test_the_causal_predictor_sees_no_future_token(causal):
    torch.manual_seed(0)
    model = GeometricLM(GeometricConfig.preset("tiny", causal_predictor=causal)).eval()
    x = torch.randint(0, 256, (1, 12))
    x2 = x.clone()
    x2[0, 8] = (x2[0, 8] + 1) % 256                                                # change a later token
    with torch.no_grad():
        logits, _ = model(x)
        theta = model.last_theta.clone()
        logits2, _ = model(x2)
        theta2 = model.last_theta.clone()
    early_theta_same = torch.equal(theta[:, :8], theta2[:, :8])
    early_logits_same = torch.allclose(logits[:, :8], logits2[:, :8], atol=1e-6)
    assert early_theta_same == causal and early_logits_same == causal             # causal=False leaks the future


def test_given_coordinates_override_the_predictor():
    torch.manual_seed(0)
    model = GeometricLM(GeometricConfig.preset("tiny")).eval()
    x = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        a, _ = model(x, theta=torch.zeros(16))
        b, _ = model(x, theta=torch.full((16,), 3.0))
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match=r"theta must be \[B, T, D\]"):
        model(x, theta=torch.zeros(2, 10, 5))


def test_context_tracking_is_the_specified_average():
    theta = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    ctx = track_context(theta)
    assert torch.allclose(ctx[0], theta[0])
    assert torch.allclose(ctx[1], 0.95 * theta[0] + 0.05 * theta[1])
    assert torch.allclose(ctx[2], 0.95 * ctx[1] + 0.05 * theta[2])
    assert torch.allclose(uncertainty(theta, ctx), (theta - ctx).var(dim=-1, unbiased=False))


def test_decoding_switches_on_uncertainty():
    logits = torch.tensor([0.0, 5.0, 4.9, -3.0])
    assert choose_token(logits, unc=0.1, threshold=0.5) == (1, "greedy")
    g = torch.Generator().manual_seed(0)
    picks = {choose_token(logits, unc=0.9, threshold=0.5, generator=g)[0] for _ in range(200)}
    assert picks == {1, 2}                                                          # the nucleus: both near-ties, never 0 or 3
    assert nucleus_sample(torch.tensor([10.0, 0.0, 0.0]), 0.92) == 0


def test_refinement_lowers_its_objective():
    torch.manual_seed(0)
    model = GeometricLM(GeometricConfig.preset("tiny"))
    idx = torch.randint(0, 256, (2, 16))
    theta, objective = refine_coordinates(model, idx, steps=5, lr=1.0)
    assert theta.shape == (2, 15, 16) and objective[-1] < objective[0]


def test_bad_input_is_a_value_error():
    x, weight, U, V, P, Q, cos, sin = _op_inputs()
    with pytest.raises(ValueError, match=r"V must be \[3, 7, 2\]"):
        modulated_linear(x, weight, U, V[:, :5], P, Q, cos, sin)
    with pytest.raises(ValueError, match="share a dtype"):
        modulated_linear(x.float(), weight, U, V, P, Q, cos, sin)
    with pytest.raises(ValueError, match="unknown projections"):
        GeometricConfig(modulate=("q", "attention"))
    with pytest.raises(ValueError, match="decay must be in"):
        track_context(torch.zeros(3, 2), decay=1.5)
