"""Interactive views for the chapters (ipywidgets), each with a plain method a test or a static figure can call.

    CoordinateExplorer (chapter 04)   move a geometric model's coordinate theta along the main directions of
                                      its learned coordinate space, or between two inputs' coordinates, and see
                                      the next-byte distribution, a greedy continuation and how much each layer's
                                      weights changed.

    RoutingExplorer (chapter 05)      run a Synapse model on a text (a sample or your own) and see, layer by
                                      layer, which expert the Thalamus chose for every byte, how sure it was,
                                      and how strongly each fast-weight memory head wrote.

Every view keeps its computation (`view`) apart from its drawing (`figure`) and its controls (`widget`),
so the same numbers feed the widget, the static figure beside it and the tests. Figures are drawn with
matplotlib's object API (no pyplot state) and shown as PNG images inside the widget, so a notebook saved
with its widget state shows the last picture even where no kernel runs (the HTML edition).
"""

from __future__ import annotations

import html
import io
from dataclasses import dataclass

import numpy as np
import torch
from matplotlib.figure import Figure

from refimpl.geometric import GeometricLM, generate, interpolate, layer_energies
from refimpl.geometric_training import principal_directions, sequence_coordinates
from refimpl.synapse import SynapseLM


def _png(fig: Figure, dpi: int = 80) -> bytes:
    """A figure as PNG bytes: what an ipywidgets.Image shows, and what a saved widget state keeps."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def byte_label(byte: int) -> str:
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
        labels = [byte_label(b % 256) for b in view.top_bytes]
        ax_p.bar(range(len(labels)), view.top_probs, color="tab:blue")
        ax_p.set_xticks(range(len(labels)), labels, fontfamily="monospace")
        ax_p.set(ylim=(0, 1), ylabel="probability", title="next byte")
        ax_e.bar(range(len(view.energies)), view.energies, color="tab:orange")
        ax_e.set(xlabel="layer", ylabel="||W_eff - W_base||", title="modulation energy",
                 xticks=range(len(view.energies)))
        if title:
            fig.suptitle(title, fontsize=9)
        return fig

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
        c["image"].value = _png(self.figure(view, title))
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


# ----------------------------------------------------------------------------------------------------------
# chapter 05: routing
# ----------------------------------------------------------------------------------------------------------

@dataclass
class RoutingTrace:
    """What every layer of a Synapse model did on one text (batch element 0), as plain arrays.

    bytes: the T input bytes. Per layer (a dict in `layers`):
        choices [T, k]          the Thalamus's chosen experts for each byte, best first
        first_choice [T]        choices[:, 0]
        confidence [T]          its top score over its second score (1 = a tie)
        load [E]                token copies each expert received
        write_gate [T, H]       each fast-weight memory head's write gate, 0 to 1
        head_utilisation [H]    each memory head's ||W|| after the text
        cell_norm [H]           each mLSTM head's cell-state norm after the text
    """
    bytes: list[int]
    layers: list[dict[str, np.ndarray]]


@torch.no_grad()
def routing_trace(model: SynapseLM, text: bytes) -> RoutingTrace:
    """Run `model` on `text` (at most max_seq_len bytes, the last ones kept) in eval mode (no router noise)
    and collect each layer's introspection. The model's train/eval mode is restored afterwards."""
    if not isinstance(model, SynapseLM):
        raise ValueError(f"routing_trace needs a SynapseLM, got {type(model).__name__}")
    if not isinstance(text, bytes) or not text:
        raise ValueError(f"routing_trace needs non-empty bytes, got {type(text).__name__} {text!r:.40}")
    ids = torch.tensor(list(text[-model.cfg.max_seq_len:]), dtype=torch.long)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        model(ids[None].to(device))
    finally:
        model.train(was_training)
    layers = []
    for layer in model.layers:
        th, mem, xl = (layer.thalamus.last_introspection, layer.memory.last_introspection,
                       layer.xlstm.last_introspection)
        layers.append({"choices": th["chosen"][0].cpu().numpy(), "first_choice": th["chosen"][0, :, 0].cpu().numpy(),
                       "confidence": th["confidence"][0].cpu().numpy(), "load": th["load"].cpu().numpy(),
                       "write_gate": mem["write_gate"][0].cpu().numpy(),
                       "head_utilisation": mem["head_utilisation"][0].cpu().numpy(),
                       "cell_norm": xl["cell_norm"][0].cpu().numpy()})
    return RoutingTrace(ids.tolist(), layers)


def routing_figure(trace: RoutingTrace, layers: list[int] | None = None, title: str = "", rank: int = 0) -> Figure:
    """For each chosen layer (default: all): the expert of every byte at choice `rank` (0 = first choice; a
    colour per expert), the memory heads' write gates under it, and the token copies each expert received,
    in the same colours."""
    layers = list(range(len(trace.layers))) if layers is None else list(layers)
    k = trace.layers[0]["choices"].shape[1]
    if not 0 <= rank < k:
        raise ValueError(f"rank {rank} out of range: the router chooses {k} experts per byte")
    which = ["first", "second", "third"][rank] if rank < 3 else f"#{rank + 1}"
    for l in layers:
        if not 0 <= l < len(trace.layers):
            raise ValueError(f"layer {l} out of range: the trace has {len(trace.layers)} layers")
    heads = trace.layers[0]["write_gate"].shape[1]
    L = len(layers)
    fig = Figure(figsize=(11, (0.35 + 0.3 * heads) * L * 2 + 0.8), layout="constrained")
    axes = fig.subplots(2 * L, 2, squeeze=False, gridspec_kw={"width_ratios": [5, 1], "height_ratios": [1, heads] * L})
    labels = [byte_label(b % 256) for b in trace.bytes]
    for row, l in enumerate(layers):
        info = trace.layers[l]
        strip, gates, bars, spare = axes[2 * row, 0], axes[2 * row + 1, 0], axes[2 * row, 1], axes[2 * row + 1, 1]
        strip.imshow(info["choices"][None, :, rank], aspect="auto", cmap="tab10", vmin=0, vmax=9,
                     interpolation="nearest")
        strip.set(xticks=[], yticks=[0], yticklabels=["expert"])
        strip.set_title(f"layer {l}: {which}-choice expert per byte (colour = expert, as in the bars)", fontsize=8)
        shown = gates.imshow(info["write_gate"].T, aspect="auto", cmap="viridis", vmin=0, vmax=1,
                             interpolation="nearest")
        gates.set_yticks(range(heads), [f"memory head {h} write gate" for h in range(heads)], fontsize=7)
        gates.set_xticks(range(len(labels)), labels, fontsize=6, fontfamily="monospace")
        load = info["load"]
        bars.bar(range(len(load)), load, color=[f"C{e % 10}" for e in range(len(load))])
        bars.set_title("token copies per expert", fontsize=8)
        bars.tick_params(labelsize=7)
        fig.colorbar(shown, ax=spare, orientation="horizontal", fraction=0.5, label="write gate")
        spare.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


class RoutingExplorer:
    """Watch a Synapse model route a text: pick a sample or type your own; sliders choose the layer and the
    choice shown (the router's first, second, ... expert for each byte).

    samples: {name: text}. The picture is `routing_figure` for the chosen layer; the text under it gives,
    for every layer, the router's mean confidence, each expert's share of first choices, and the memory and
    mLSTM head norms, so a change of text shows in numbers as well as colours.
    """

    def __init__(self, model: SynapseLM, samples: dict[str, str]):
        if not isinstance(model, SynapseLM):
            raise ValueError(f"RoutingExplorer needs a SynapseLM, got {type(model).__name__}")
        if not samples or not all(isinstance(t, str) and t for t in samples.values()):
            raise ValueError("RoutingExplorer needs at least one non-empty sample text (str)")
        self.model, self.samples = model, dict(samples)
        self._controls = None
        self.last_trace: RoutingTrace | None = None

    def trace(self, text: str) -> RoutingTrace:
        """routing_trace of `text` (UTF-8 encoded)."""
        return routing_trace(self.model, text.encode("utf-8"))

    @staticmethod
    def summary_html(trace: RoutingTrace) -> str:
        """One table row per layer: mean confidence, first-choice share per expert, head norms."""
        E = len(trace.layers[0]["load"])
        rows = []
        for l, info in enumerate(trace.layers):
            share = np.bincount(info["first_choice"], minlength=E) / len(info["first_choice"])
            rows.append(f"<tr><td>{l}</td><td>{info['confidence'].mean():.2f}</td>"
                        f"<td>{' '.join(f'{s:.2f}' for s in share)}</td>"
                        f"<td>{' '.join(f'{u:.2f}' for u in info['head_utilisation'])}</td>"
                        f"<td>{' '.join(f'{c:.2f}' for c in info['cell_norm'])}</td></tr>")
        return ("<table style='border-spacing: 14px 2px'><tr><th>layer</th><th>mean router confidence</th><th>first-choice share per expert</th>"
                "<th>memory head ‖W‖</th><th>mLSTM cell norm per head</th></tr>" + "".join(rows) + "</table>"
                f"<small>{len(trace.bytes)} bytes</small>")

    def widget(self):
        """The interactive view: a sample picker, a text box, layer and choice sliders; the picture and the
        table update on every change. Returns an ipywidgets.VBox."""
        import ipywidgets as w

        names = list(self.samples)
        c = {"sample": w.Dropdown(options=names, value=names[0], description="sample"),
             "text": w.Textarea(value=self.samples[names[0]], description="text",
                                layout={"width": "95%", "height": "80px"}, continuous_update=False),
             "layer": w.IntSlider(value=0, min=0, max=len(self.model.layers) - 1, description="layer",
                                  continuous_update=False, disabled=len(self.model.layers) == 1),
             "choice": w.IntSlider(value=1, min=1, max=self.model.cfg.top_k, description="choice",
                                   continuous_update=False),
             "image": w.Image(format="png"), "table": w.HTML()}
        self._controls = c
        c["sample"].observe(lambda change: setattr(c["text"], "value", self.samples[change["new"]]), names="value")
        c["text"].observe(lambda _change: self.refresh(), names="value")
        for name in ("layer", "choice"):
            c[name].observe(lambda _change: self.refresh(), names="value")
        self.refresh()
        return w.VBox([w.HBox([c["sample"], c["layer"], c["choice"]]), c["text"], c["image"], c["table"]])

    def refresh(self) -> RoutingTrace:
        """Trace the text box's text and redraw (the widget's callback). Returns the trace shown."""
        if self._controls is None:
            raise RuntimeError("refresh() redraws the widget: call widget() first")
        c = self._controls
        trace = self.trace(c["text"].value or " ")
        layer, rank = c["layer"].value, c["choice"].value - 1
        c["image"].value = _png(routing_figure(trace, [layer], f"layer {layer} of {len(trace.layers)}", rank))
        c["table"].value = self.summary_html(trace)
        self.last_trace = trace
        return trace

    @property
    def controls(self) -> dict:
        """The widget's controls by name (sample, text, layer, choice, image, table): what a test drives."""
        if self._controls is None:
            raise RuntimeError("call widget() first")
        return self._controls
