"""Geometric Intelligence (chapter 04): the factored modulation equals the materialised weight, the
causal predictor sees no future token (the public code's does), context tracking, adaptive decoding,
refinement, the parameter calculator, and the generator API."""

from __future__ import annotations

import math

import pytest
import torch

from refimpl.geometric import GeometricConfig, GeometricLM, ModulatedLinear, choose_token, coordinate_statistics, generate, geometric_parameter_count, interpolate, layer_energies, nucleus_sample, refine_coordinates, track_context, uncertainty
from refimpl.ops import modulated_linear, modulated_linear_materialised


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
    with pytest.raises(ValueError, match=r"V must be \[M, I, r\] = \[3, 7, 2\]"):
        modulated_linear(x, weight, U, V[:, :5], P, Q, cos, sin)
    with pytest.raises(ValueError, match="weight must have x's dtype torch.float32, got torch.float64"):
        modulated_linear(x.float(), weight, U, V, P, Q, cos, sin)
    with pytest.raises(ValueError, match="unknown projections"):
        GeometricConfig(modulate=("q", "attention"))
    with pytest.raises(ValueError, match="decay must be in"):
        track_context(torch.zeros(3, 2), decay=1.5)


def test_the_ten_million_preset_really_has_ten_million_parameters():
    count = geometric_parameter_count(GeometricConfig.preset("ten_million"))
    assert abs(count["total"] - 10_000_000) < 0.01 * 10_000_000
    paper = geometric_parameter_count(GeometricConfig.preset("paper"))
    assert paper["total"] > 10 * 10_000_000                                           # the write-up's own config


def test_generate_greedy_follows_the_argmax_and_sampling_switches_on_threshold():
    torch.manual_seed(0)
    model = GeometricLM(GeometricConfig.preset("tiny")).eval()
    prompt = torch.tensor(list(b"def f("))
    greedy = generate(model, prompt, 5)                                                # threshold inf: always greedy
    assert greedy.modes == ["greedy"] * 5 and greedy.tokens[:6] == prompt.tolist() and len(greedy.new_tokens) == 5
    with torch.no_grad():                                                              # first token = argmax at the
        theta = track_context(model.predictor(model.embed(prompt[None])))             # context coordinates
        logits, _ = model(prompt[None], theta=theta)
    assert greedy.new_tokens[0] == int(logits[0, -1].argmax())
    sampled = generate(model, prompt, 5, threshold=-1.0, generator=torch.Generator().manual_seed(0))
    assert sampled.modes == ["nucleus"] * 5                                            # any uncertainty >= 0 > -1
    assert greedy.theta.shape == greedy.context.shape == (5, 16)
    fixed = generate(model, prompt, 3, theta=torch.zeros(16))
    assert fixed.modes == ["fixed"] * 3 and torch.equal(fixed.theta, torch.zeros(3, 16))
    with pytest.raises(ValueError, match="prompt must be a non-empty 1-D tensor"):
        generate(model, torch.zeros(2, 3, dtype=torch.long), 3)
    with pytest.raises(ValueError, match=r"theta must be \[D\] = \[16\]"):
        generate(model, prompt, 3, theta=torch.zeros(4))


def test_coordinate_statistics_interpolation_and_layer_energies():
    torch.manual_seed(0)
    model = GeometricLM(GeometricConfig.preset("tiny")).eval()
    stats = coordinate_statistics(model, torch.randint(0, 256, (3, 12)))
    assert set(stats) == {"theta_norm", "spread_per_dim", "drift", "uncertainty_mean", "uncertainty_p90", "phase_std"}
    assert all(math.isfinite(v) and v >= 0 for v in stats.values())
    a, b = torch.zeros(16), torch.ones(16)
    assert torch.equal(interpolate(a, b, 0.0), a) and torch.equal(interpolate(a, b, 1.0), b)
    assert torch.allclose(interpolate(a, b, 0.25), torch.full((16,), 0.25))
    with pytest.raises(ValueError, match="differ in shape"):
        interpolate(a, torch.ones(3), 0.5)
    theta = torch.randn(16)
    energies = layer_energies(model, theta)
    cos, sin = model.coefficients(theta)
    first = torch.stack([layer.energy(cos, sin) ** 2 for layer in model.blocks[0].proj.values()]).sum().sqrt()
    assert energies.shape == (2,) and math.isclose(energies[0].item(), first.item(), rel_tol=1e-6)
    plain = GeometricLM(GeometricConfig.preset("tiny", modulate=("q",)))
    assert layer_energies(plain, theta).gt(0).all()                                    # q alone still modulates
