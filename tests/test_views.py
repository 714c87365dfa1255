"""The interactive views, driven the way a reader drives them: change a control, see the outputs change."""

from __future__ import annotations

import pytest
import torch

from refimpl.geometric import GeometricConfig, GeometricLM
from refimpl.views import CoordinateExplorer

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
