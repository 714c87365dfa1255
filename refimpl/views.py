"""Interactive views for the chapters (ipywidgets), each with a plain method a test or a static figure can call.

    CoordinateExplorer (chapter 04)   move a geometric model's coordinate theta along the main directions of
                                      its learned coordinate space, or between two inputs' coordinates, and see
                                      the next-byte distribution, a greedy continuation and how much each layer's
                                      weights changed.

Every view keeps its computation (`view`) apart from its drawing (`figure`) and its controls (`widget`),
so the same numbers feed the widget, the static figure beside it and the tests. Figures are drawn with
matplotlib's object API (no pyplot state) and shown as PNG images inside the widget, so a notebook saved
with its widget state shows the last picture even where no kernel runs (the HTML edition).

Does not include: the routing views of other chapters.
"""

from __future__ import annotations

import html
import io
from dataclasses import dataclass

import torch
from matplotlib.figure import Figure

from refimpl.geometric import GeometricLM, generate, interpolate, layer_energies
from refimpl.geometric_training import principal_directions, sequence_coordinates


def _printable(byte: int) -> str:
    """A byte as a short label: the character, or its escape (\\n, \\x0c, ...)."""
    text = repr(bytes([byte]))[2:-1]
    return "␣" if text == " " else text


@dataclass
class ExplorerView:
    """What the model does at one coordinate."""
    theta: torch.Tensor            # [D] the coordinate
    top_bytes: list[int]           # the most likely next bytes after the prompt, most likely first
    top_probs: list[float]         # their probabilities
    continuation: str              # greedy continuation of the prompt at theta
    energies: list[float]          # ||W_eff(theta) - W_base|| per layer


class CoordinateExplorer:
    """Explore a trained GeometricLM's coordinate space.

    prompts: {name: bytes}, the texts to continue (and whose predicted coordinates can be blended).
    reference_coords: [n, D] coordinates the model produced on real inputs; their principal directions
    (PCA) are the sliders' axes, each slider measured in standard deviations along its direction.

    The coordinate shown is
        theta = interpolate(theta[a], theta[b], alpha) + sum_k s_k * spread_k * direction_k
    with theta[a], theta[b] the predicted coordinates of two prompts, alpha the blend slider and s_k
    the direction sliders. The model then runs the chosen prompt at that one coordinate at every position.
    """

    def __init__(self, model: GeometricLM, prompts: dict[str, bytes], reference_coords: torch.Tensor,
                 n_directions: int = 3, continuation_length: int = 40, top: int = 12):
        if not isinstance(model, GeometricLM):
            raise ValueError(f"CoordinateExplorer needs a GeometricLM, got {type(model).__name__}")
        if len(prompts) < 2 or not all(isinstance(p, bytes) and p for p in prompts.values()):
            raise ValueError("CoordinateExplorer needs at least two non-empty prompts given as bytes")
        D = model.cfg.coord_dim
        if reference_coords.dim() != 2 or reference_coords.shape[1] != D or len(reference_coords) <= n_directions:
            raise ValueError(f"reference_coords must be [n, {D}] with n > n_directions={n_directions}, "
                             f"got {list(reference_coords.shape)}")
        self.model, self.prompts, self.top = model.eval(), dict(prompts), top
        self.continuation_length = continuation_length
        self.mean, self.directions, self.spread = principal_directions(reference_coords.float(), n_directions)
        with torch.no_grad():
            self.prompt_coords = {name: sequence_coordinates(model.predictor(model.embed(self._ids(text)[None])))[0]
                                  for name, text in self.prompts.items()}
        self._controls = None

    def _ids(self, text: bytes) -> torch.Tensor:
        return torch.tensor(list(text[-self.model.cfg.max_seq_len:]), dtype=torch.long)

    def coordinate(self, offsets=(), alpha: float = 0.0, a: str | None = None, b: str | None = None) -> torch.Tensor:
        """theta for blend `alpha` between prompts a and b (default: the first two) plus `offsets` (in
        standard deviations) along the principal directions."""
        names = list(self.prompts)
        a, b = a or names[0], b or names[1]
        for name in (a, b):
            if name not in self.prompt_coords:
                raise ValueError(f"unknown prompt {name!r}; choose from {names}")
        offsets = list(offsets)
        if len(offsets) > len(self.directions):
            raise ValueError(f"{len(offsets)} offsets for {len(self.directions)} directions")
        theta = interpolate(self.prompt_coords[a], self.prompt_coords[b], alpha)
        for k, s in enumerate(offsets):
            theta = theta + float(s) * self.spread[k] * self.directions[k]
        return theta

    @torch.no_grad()
    def view(self, prompt: str, theta: torch.Tensor) -> ExplorerView:
        """Run `prompt` at coordinate theta: next-byte distribution, greedy continuation, layer energies."""
        if prompt not in self.prompts:
            raise ValueError(f"unknown prompt {prompt!r}; choose from {list(self.prompts)}")
        ids = self._ids(self.prompts[prompt])
        logits, _ = self.model(ids[None], theta=theta)
        probs = torch.softmax(logits[0, -1].float(), dim=-1)
        top = probs.topk(min(self.top, len(probs)))
        text = generate(self.model, ids, self.continuation_length, theta=theta).text
        return ExplorerView(theta, top.indices.tolist(), top.values.tolist(), text,
                            layer_energies(self.model, theta).tolist())

    def figure(self, view: ExplorerView, title: str = "") -> Figure:
        """Two panels: the next-byte distribution and the modulation energy of each layer."""
        fig = Figure(figsize=(8.0, 2.8), layout="constrained")
        ax_p, ax_e = fig.subplots(1, 2, width_ratios=(3, 2))
        labels = [_printable(b % 256) for b in view.top_bytes]
        ax_p.bar(range(len(labels)), view.top_probs, color="tab:blue")
        ax_p.set_xticks(range(len(labels)), labels, fontfamily="monospace")
        ax_p.set(ylim=(0, 1), ylabel="probability", title="next byte")
        ax_e.bar(range(len(view.energies)), view.energies, color="tab:orange")
        ax_e.set(xlabel="layer", ylabel="||W_eff - W_base||", title="modulation energy",
                 xticks=range(len(view.energies)))
        if title:
            fig.suptitle(title, fontsize=9)
        return fig

    @staticmethod
    def _png(fig: Figure) -> bytes:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=80)
        return buffer.getvalue()

    # -- the widget -----------------------------------------------------------------------------------

    def widget(self):
        """The interactive explorer: prompt and blend pickers, a blend slider, one slider per direction;
        the picture and the continuation update on every change. Returns an ipywidgets.VBox."""
        import ipywidgets as w

        names = list(self.prompts)
        c = {"prompt": w.Dropdown(options=names, value=names[0], description="prompt"),
             "a": w.Dropdown(options=names, value=names[0], description="blend from"),
             "b": w.Dropdown(options=names, value=names[1], description="to"),
             "alpha": w.FloatSlider(value=0.0, min=-0.5, max=1.5, step=0.05, description="blend α",
                                    continuous_update=False)}
        for k in range(len(self.directions)):
            c[f"pc{k + 1}"] = w.FloatSlider(value=0.0, min=-4.0, max=4.0, step=0.25, description=f"PC{k + 1} (σ)",
                                            continuous_update=False)
        c["image"] = w.Image(format="png")
        c["text"] = w.HTML()
        self._controls = c
        for name, control in c.items():
            if name not in ("image", "text"):
                control.observe(lambda _change: self.refresh(), names="value")
        self.refresh()
        sliders = [c[f"pc{k + 1}"] for k in range(len(self.directions))]
        return w.VBox([w.HBox([c["prompt"], c["a"], c["b"]]), w.HBox([c["alpha"]] + sliders[:2]),
                       w.HBox(sliders[2:]), c["image"], c["text"]])

    def refresh(self) -> ExplorerView:
        """Recompute from the controls' values and redraw (the widget's callback; tests call it through the
        controls). Returns the view shown."""
        if self._controls is None:
            raise RuntimeError("refresh() redraws the widget: call widget() first")
        c = self._controls
        offsets = [c[f"pc{k + 1}"].value for k in range(len(self.directions))]
        theta = self.coordinate(offsets, c["alpha"].value, c["a"].value, c["b"].value)
        view = self.view(c["prompt"].value, theta)
        title = (f"{c['prompt'].value!r} at blend α={c['alpha'].value:.2f} of {c['a'].value!r}→{c['b'].value!r}, "
                 + ", ".join(f"PC{k + 1}={s:+.2f}σ" for k, s in enumerate(offsets)))
        c["image"].value = self._png(self.figure(view, title))
        prompt = self.prompts[c["prompt"].value][-60:].decode("utf-8", errors="replace")
        c["text"].value = (f"<pre style='white-space: pre-wrap'>{html.escape(prompt)}<b style='color:#c05000'>"
                           f"{html.escape(view.continuation)}</b></pre>"
                           f"<small>||θ|| = {view.theta.norm():.2f}; total modulation energy "
                           f"{sum(e * e for e in view.energies) ** 0.5:.3f}</small>")
        self.last_view = view
        return view

    @property
    def controls(self) -> dict:
        """The widget's controls by name (prompt, a, b, alpha, pc1..., image, text): what a test drives."""
        if self._controls is None:
            raise RuntimeError("call widget() first")
        return self._controls
