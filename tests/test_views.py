"""The interactive views, driven the way a reader drives them: change a control, see the outputs change."""

from __future__ import annotations

import pytest
import torch

from refimpl.geometric import GeometricConfig, GeometricLM
from refimpl.synapse import SynapseConfig, SynapseLM
from book.views import CoordinateExplorer, RoutingExplorer, routing_figure, routing_trace

pytest.importorskip("ipywidgets", reason="the views need ipywidgets (in requirements.txt)")

PROMPTS = {"code": b"def parse(self, text):\n    return ", "prose": b"Return the number of items in the "}


@pytest.fixture(scope="module")
def explorer():
    torch.manual_seed(0)
    model = GeometricLM(GeometricConfig.preset("tiny"))
    with torch.no_grad():                                    # reference coordinates: random nudges of real ones
        base = model.predictor(model.embed(torch.tensor([list(PROMPTS["code"][:20])])))[0]
    reference = base + torch.randn(base.shape, generator=torch.Generator().manual_seed(1))
    return CoordinateExplorer(model, PROMPTS, reference, n_directions=3, continuation_length=8)


def _outputs(explorer):
    c = explorer.controls
    return c["image"].value, c["text"].value


def test_every_control_changes_what_the_widget_shows(explorer):
    explorer.widget()
    start = _outputs(explorer)
    assert start[0][:8] == b"\x89PNG\r\n\x1a\n" and "<pre" in start[1]
    c = explorer.controls
    for name, value in (("pc1", 3.0), ("alpha", 1.0), ("pc2", -2.0), ("prompt", "prose")):
        before = _outputs(explorer)
        theta_before = explorer.last_view.theta.clone()
        c[name].value = value                                # fires the observer, as a slider drag does
        after = _outputs(explorer)
        assert after[0] != before[0], f"moving {name} did not redraw the figure"
        if name != "prompt":
            assert not torch.equal(explorer.last_view.theta, theta_before), f"moving {name} did not move theta"
    assert "Return the number" in c["text"].value            # the chosen prompt is shown


def test_the_coordinate_formula(explorer):
    a, b = explorer.prompt_coords["code"], explorer.prompt_coords["prose"]
    assert torch.allclose(explorer.coordinate(alpha=0.5), (a + b) / 2)
    shifted = explorer.coordinate([2.0], alpha=0.0)
    assert torch.allclose(shifted - a, 2.0 * explorer.spread[0] * explorer.directions[0], atol=1e-6)
    view = explorer.view("code", shifted)
    assert len(view.energies) == 2 and all(e > 0 for e in view.energies)                # two layers, both modulated
    assert len(view.top_probs) == 12 and view.top_probs == sorted(view.top_probs, reverse=True)
    assert 0 < sum(view.top_probs) <= 1 + 1e-6                                           # the 12 likeliest of 256


def test_bad_input_is_refused(explorer):
    with pytest.raises(ValueError, match="unknown prompt 'poem'"):
        explorer.view("poem", explorer.coordinate())
    with pytest.raises(ValueError, match="offsets for 3 directions"):
        explorer.coordinate([1.0] * 4)
    with pytest.raises(ValueError, match="at least two non-empty prompts"):
        CoordinateExplorer(explorer.model, {"one": b"x"}, torch.zeros(10, 16))
    with pytest.raises(ValueError, match=r"reference_coords must be \[n, 16\]"):
        CoordinateExplorer(explorer.model, PROMPTS, torch.zeros(10, 5))


# -- chapter 05: the routing explorer ----------------------------------------------------------------------

SAMPLES = {"code": "def parse(self, text):\n    return text.split()", "prose": "The router picks two experts."}


@pytest.fixture(scope="module")
def routing():
    torch.manual_seed(0)
    model = SynapseLM(SynapseConfig.preset("tiny", n_layers=2))
    return RoutingExplorer(model, SAMPLES)


def test_the_trace_is_the_models_own_introspection(routing):
    model = routing.model
    model.train()
    trace = routing_trace(model, b"abcab")
    assert model.training, "routing_trace must restore the model's mode"
    assert trace.bytes == list(b"abcab") and len(trace.layers) == 2
    ids = torch.tensor([list(b"abcab")])
    model.eval()
    with torch.no_grad():
        model(ids)
    for layer, info in zip(model.layers, trace.layers):
        th = layer.thalamus.last_introspection
        assert info["first_choice"].tolist() == th["chosen"][0, :, 0].tolist()
        assert info["choices"].tolist() == th["chosen"][0].tolist()
        assert info["load"].sum() == 5 * model.cfg.top_k                    # every byte went to top_k experts
        assert info["write_gate"].shape == (5, model.cfg.memory_heads)
        assert ((0 <= info["write_gate"]) & (info["write_gate"] <= 1)).all() and (info["confidence"] >= 1).all()
    long = routing_trace(model, bytes(range(200)))                           # only the last max_seq_len bytes
    assert long.bytes == list(range(200))[-model.cfg.max_seq_len:]
    fig = routing_figure(trace, [1], "one layer")
    assert len(fig.axes) == 5                                               # strip, gates, bars, spare, colour bar


def test_every_routing_control_changes_what_the_widget_shows(routing):
    routing.widget()
    c = routing.controls
    start = (c["image"].value, c["table"].value)
    assert start[0][:8] == b"\x89PNG\r\n\x1a\n" and "<table" in start[1]
    c["layer"].value = 1                                                     # the slider: another layer's picture
    assert c["image"].value != start[0] and c["table"].value == start[1]
    second = c["image"].value
    c["choice"].value = 2                                                    # the second-choice experts
    assert c["image"].value != second and c["table"].value == start[1]
    c["sample"].value = "prose"                                              # the dropdown sets the text box
    assert c["text"].value == SAMPLES["prose"]
    assert routing.last_trace.bytes == list(SAMPLES["prose"].encode())
    after_sample = (c["image"].value, c["table"].value)
    assert after_sample[0] != start[0] and after_sample[1] != start[1]
    c["text"].value = "your own text"                                        # typing
    assert routing.last_trace.bytes == list(b"your own text") and c["image"].value != after_sample[0]


def test_routing_bad_input_is_refused(routing):
    with pytest.raises(ValueError, match="needs a SynapseLM"):
        RoutingExplorer(GeometricLM(GeometricConfig.preset("tiny")), SAMPLES)
    with pytest.raises(ValueError, match="at least one non-empty sample"):
        RoutingExplorer(routing.model, {})
    with pytest.raises(ValueError, match="non-empty bytes"):
        routing_trace(routing.model, "text, not bytes")
    with pytest.raises(ValueError, match="layer 5 out of range"):
        routing_figure(routing_trace(routing.model, b"ab"), [5])
    with pytest.raises(ValueError, match="rank 2 out of range: the router chooses 2"):
        routing_figure(routing_trace(routing.model, b"ab"), rank=2)
    with pytest.raises(RuntimeError, match="call widget"):
        RoutingExplorer(routing.model, SAMPLES).controls
