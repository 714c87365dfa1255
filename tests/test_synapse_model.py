"""The Synapse model: parameter arithmetic, causality, carried state, every part trained."""

from __future__ import annotations

import pytest
import torch

from kernels.check import assert_close, parameters_without_gradient
from refimpl.synapse import SynapseConfig, SynapseLM, synapse_parameter_count


def _model(**overrides) -> SynapseLM:
    torch.manual_seed(0)
    return SynapseLM(SynapseConfig.preset("tiny", **overrides)).double().eval()


@pytest.mark.parametrize("preset", ["tiny", "small"])
@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": False, "n_experts": 3, "top_k": 1}],
                         ids=["default", "untied-3-experts-top1"])
def test_parameter_calculator_matches_the_built_model(preset, overrides):
    cfg = SynapseConfig.preset(preset, **overrides)
    assert synapse_parameter_count(cfg)["total"] == SynapseLM(cfg).num_parameters()


def test_paper_size_active_is_below_total():
    counts = synapse_parameter_count(SynapseConfig.preset("paper"))
    assert counts["active_per_token"] < counts["total"]


def test_no_position_sees_the_future_and_state_carries_across_calls():
    model = _model()
    idx = torch.randint(0, 256, (2, 18), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, _ = model(idx)
        changed = idx.clone()
        changed[:, 9] = (changed[:, 9] + 1) % 256
        after, _ = model(changed)
        states = model.new_state()
        pieces = [model(idx[:, a:b], states=states)[0] for a, b in [(0, 6), (6, 7), (7, 18)]]
    assert_close(after[:, :9], full[:, :9], "logits before the perturbed token")
    assert_close(torch.cat(pieces, dim=1), full, "in pieces with carried state vs one call")


def test_training_step_reaches_every_part():
    torch.manual_seed(0)
    model = SynapseLM(SynapseConfig.preset("tiny"))
    idx = torch.randint(0, 256, (2, 12))
    _, loss = model(idx, torch.randint(0, 256, (2, 12)))
    loss.backward()
    assert not parameters_without_gradient(model)


def test_bad_configs_are_value_errors():
    with pytest.raises(ValueError, match="top_k=5 must be <= n_experts=4"):
        SynapseConfig(n_experts=4, top_k=5)
    with pytest.raises(ValueError, match="multiple of xlstm_heads"):
        SynapseConfig(xlstm_hidden=10, xlstm_heads=4)
    with pytest.raises(ValueError, match="longer than max_seq_len"):
        _model()(torch.zeros(1, 65, dtype=torch.long))


def test_zero_state_runs_the_step_loops_and_equals_the_parallel_forms():
    torch.manual_seed(0)
    model = SynapseLM(SynapseConfig.preset("tiny")).double().eval()
    idx = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        parallel, _ = model(idx)                                  # no state: parallel forms
        stepped, _ = model(idx, states=model.new_state(2))        # zero state: step loops
    torch.testing.assert_close(stepped, parallel)
    with pytest.raises(ValueError, match="batch_size"):
        model.new_state(0)
