"""The superblock LM: causality, decoding with carried state, MTP losses, balance loss, parameter arithmetic."""

from __future__ import annotations

import math

import pytest
import torch

from kernels.check import assert_close, parameters_without_gradient
from refimpl.blocks import TopKMoE
from refimpl.superblock import (LAYOUTS, SuperblockConfig, SuperblockLM, accepted_prefix, experts_to_reach,
                                generate, parameter_count, sinusoidal_positions, speculative_generate)


def _model(**overrides) -> SuperblockLM:
    torch.manual_seed(0)
    return SuperblockLM(SuperblockConfig.preset("tiny", dropout=0.0, **overrides)).double().eval()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_no_position_sees_the_future(layout):
    model = _model(layout=layout, window=6)
    idx = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before, _ = model(idx)
        changed = idx.clone()
        changed[:, 13] = (changed[:, 13] + 1) % 256          # perturb token 13
        after, _ = model(changed)
    assert_close(after[:, :13], before[:, :13], "logits before the perturbed token")
    assert not torch.allclose(after[:, 13:], before[:, 13:])


@pytest.mark.parametrize("window", [None, 5], ids=["full", "window5"])
def test_decoding_with_carried_state_equals_the_parallel_forward(window):
    model = _model(window=window)
    idx = torch.randint(0, 256, (2, 19), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full, _ = model(idx)
        states = model.new_state()
        pieces = [model(idx[:, a:b], states=states)[0] for a, b in [(0, 7), (7, 10)] + [(t, t + 1) for t in range(10, 19)]]
    assert_close(torch.cat(pieces, dim=1), full, "prompt, chunk, then token by token")


def test_mtp_loss_predicts_the_right_future_tokens():
    """Make horizon 2's head return the final hidden state unchanged: its loss must then equal the
    next-token head's loss on the targets shifted by one more position."""
    model = _model(mtp_horizons=2)
    with torch.no_grad():
        model.mtp.downs[0].weight.zero_()                   # h_2 = h + 0
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    targets = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits, _ = model(idx, targets)
        expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets[:, 1:].flatten())
    assert math.isclose(model.last_losses["mtp"], expected.item(), rel_tol=1e-9)


def test_training_step_reaches_every_part():
    model = _model(mtp_in_every_block=True)
    idx = torch.randint(0, 256, (2, 12))
    _, loss = model(idx, torch.randint(0, 256, (2, 12)))
    loss.backward()
    assert not parameters_without_gradient(model)


def test_balance_loss_is_minimal_for_uniform_routing():
    """E * sum_e f_e P_e: with f = P it is E * sum_e f_e^2 >= 1, equal to 1 exactly when routing is uniform."""
    x = torch.randn(64, 8).abs()
    uniform = TopKMoE(8, 16, n_experts=4, top_k=4)
    with torch.no_grad():
        uniform.router.weight.zero_()                        # P_e = 1/4 and every token uses every expert: f_e = 1/4
    uniform(x)
    assert math.isclose(uniform.aux_loss.item(), 1.0, rel_tol=1e-6)
    skewed = TopKMoE(8, 16, n_experts=4, top_k=1)
    with torch.no_grad():
        skewed.router.weight.copy_(torch.tensor([[1.0] * 8, [0.0] * 8, [0.0] * 8, [0.0] * 8]))
    skewed(x)                                                # positive inputs: expert 0 wins every token
    assert skewed.aux_loss.item() > 1.5                      # concentrated routing is penalised


def test_tokens_are_not_drowned_by_the_positional_encoding():
    model = _model()
    with torch.no_grad():
        a, _ = model(torch.full((1, 8), 65))
        b, _ = model(torch.full((1, 8), 200))
    assert (a - b).norm() / a.norm() > 0.5                   # different bytes, clearly different predictions


@pytest.mark.parametrize("preset", ["tiny", "small"])
@pytest.mark.parametrize("overrides", [{}, {"layout": "as_written"}, {"mtp_in_every_block": True},
                                       {"tie_embeddings": False, "n_kv_heads": 1, "mtp_horizons": 1}],
                         ids=["default", "as_written", "mtp-in-every-block", "untied-mqa-no-mtp"])
def test_parameter_calculator_matches_the_built_model(preset, overrides):
    cfg = SuperblockConfig.preset(preset, **overrides)
    assert parameter_count(cfg)["total"] == SuperblockLM(cfg).num_parameters()


def test_paper_size_arithmetic():
    cfg = SuperblockConfig.preset("paper")
    counts = parameter_count(cfg)
    assert counts["active_per_token"] < counts["total"]
    n = experts_to_reach(cfg, 235e9)
    assert parameter_count(SuperblockConfig.preset("paper", n_experts=n))["total"] >= 235e9
    assert parameter_count(SuperblockConfig.preset("paper", n_experts=n - 1))["total"] < 235e9


def test_sinusoidal_positions_are_the_textbook_table():
    table = sinusoidal_positions(5, 6, dtype=torch.float64)
    assert table[3, 0] == pytest.approx(math.sin(3.0)) and table[3, 1] == pytest.approx(math.cos(3.0))
    assert table[2, 4] == pytest.approx(math.sin(2 * 10000 ** (-4 / 6)))


def test_bad_configs_are_value_errors():
    with pytest.raises(ValueError, match="layout must be one of"):
        SuperblockConfig(layout="postnorm")
    with pytest.raises(ValueError, match="top_k=5 must be <= n_experts=4"):
        SuperblockConfig(n_experts=4, top_k=5)
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        SuperblockConfig(n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="longer than max_seq_len"):
        _model()(torch.zeros(1, 65, dtype=torch.long))


@pytest.mark.parametrize("overrides", [{}, {"window": 4}, {"mtp_horizons": 1}], ids=["default", "window4", "no-mtp"])
def test_speculative_decoding_gives_exactly_the_greedy_output(overrides):
    model = _model(**overrides)
    for seed in range(3):
        prompt = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(seed))
        greedy, greedy_stats = generate(model, prompt, 17)
        fast, stats = speculative_generate(model, prompt, 17)
        assert torch.equal(fast, greedy)
        assert greedy_stats["forward_passes"] == 17
        assert 1 <= stats["mean_accepted_per_draft"] <= model.cfg.mtp_horizons


def test_sampling_follows_the_temperature():
    model = _model()
    prompt = torch.randint(0, 256, (2, 4), generator=torch.Generator().manual_seed(5))
    a, _ = generate(model, prompt, 8, temperature=1.0, generator=torch.Generator().manual_seed(0))
    b, _ = generate(model, prompt, 8, temperature=1.0, generator=torch.Generator().manual_seed(0))
    greedy, _ = generate(model, prompt, 8)
    assert torch.equal(a, b) and a.shape == (2, 12) and torch.equal(a[:, :4], prompt)
    cold, _ = generate(model, prompt, 8, temperature=1e-4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(cold, greedy)                          # near-zero temperature is greedy
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        generate(model, prompt, 2, temperature=-1.0)


def test_acceptance_rule_by_hand():
    assert accepted_prefix([7, 8, 9], [8, 9, 4]) == 3           # every draft matches the main head's pick
    assert accepted_prefix([7, 8, 9], [8, 5, 4]) == 2           # draft 2 disagrees: stop before it
    assert accepted_prefix([7, 8, 9], [1, 9, 4]) == 1           # draft 1 disagrees: even a later match does not count
    assert accepted_prefix([7], []) == 1


def test_decoding_refuses_training_mode_and_bad_lengths():
    model = _model()
    prompt = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="positive int"):
        speculative_generate(model, prompt, 0)
    with pytest.raises(ValueError, match="positive int"):
        generate(model, prompt, -2)
    model.train()
    with pytest.raises(ValueError, match="model.eval"):
        generate(model, prompt, 3)


def test_derived_sizes_follow_the_overrides():
    cfg = SuperblockConfig.preset("small", d_model=128)
    assert cfg.head_dim == 32 and cfg.expert_hidden == 256
    with pytest.raises(ValueError, match="head_dim must be an integer >= 1, or None"):
        SuperblockConfig(head_dim=0)
