"""The primer's pictures (chapter 00): each function draws what one block does, from numbers the notebook
computed with the book's own code, and returns the figure. Kept here so the notebook's cells hold the lesson,
not forty lines of matplotlib; `book.save_figure` checks each one before it is written.

Does not include: any computation of the model's behaviour (the notebook computes; these only draw).
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np


def rms_norm(before: np.ndarray, after: np.ndarray, labels: list[str]):
    """Left: each row's RMS before and after RMSNorm (weight 1), log scale. Right: the rows after it."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(8.5, 2.9))
    rms_before, rms_after = np.sqrt((before ** 2).mean(-1)), np.sqrt((after ** 2).mean(-1))
    rows = np.arange(len(labels))
    left.bar(rows - 0.2, rms_before, 0.4, label="before")
    left.bar(rows + 0.2, rms_after, 0.4, label="after")
    left.set(yscale="log", xticks=rows, xticklabels=labels, ylabel="RMS of the row", title="RMS of each row")
    left.legend(fontsize=8)
    for row, label in enumerate(labels):
        right.plot(after[row], marker=".", label=label)
    right.set(title="the rows after rms_norm: one scale", xlabel="channel c")
    right.legend(fontsize=8)
    fig.tight_layout()
    return fig


def rope(angles: np.ndarray, scores: np.ndarray, pairs: tuple[int, int] = (0, 1)):
    """Left: the angle two pairs turn to at positions 0..T-1 (angles [T, D/2]), as arrows on the unit circle.
    Right: q.k after RoPE for q at position m, k at n (scores [T, T]): constant along each diagonal, so the score
    depends only on m - n."""
    fig = plt.figure(figsize=(8.5, 3.4))
    colours = plt.cm.viridis(np.linspace(0, 1, angles.shape[0]))
    for panel, pair in enumerate(pairs):
        ax = fig.add_subplot(1, 3, panel + 1, aspect="equal")
        ax.add_patch(plt.Circle((0, 0), 1, fill=False, color="lightgrey"))
        for m, angle in enumerate(angles[:, pair]):
            ax.annotate("", (np.cos(angle), np.sin(angle)), (0, 0), arrowprops=dict(arrowstyle="->", color=colours[m]))
        step = np.angle(np.exp(1j * (angles[1, pair] - angles[0, pair])))
        ax.set(xlim=(-1.2, 1.2), ylim=(-1.2, 1.2), xticks=[], yticks=[], title=f"pair {pair}: {step:.2f} rad per position",
               xlabel="positions 0 → T-1: dark → light")
    ax = fig.add_subplot(1, 3, 3)
    image = ax.imshow(scores, cmap="coolwarm")
    ax.set(title="q·k after RoPE", xlabel="key position n", ylabel="query position m")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def swiglu(z: np.ndarray, silu: np.ndarray, relu: np.ndarray, sigmoid: np.ndarray):
    """silu(z) = z σ(z) beside ReLU and the sigmoid gate it multiplies by."""
    fig, ax = plt.subplots(figsize=(5.5, 3))
    ax.plot(z, relu, color="grey", ls=":", label="relu(z)")
    ax.plot(z, sigmoid, color="tab:green", label="σ(z): the gate")
    ax.plot(z, silu, color="tab:blue", lw=2, label="silu(z) = z σ(z)")
    ax.axhline(0, color="black", lw=0.5)
    ax.set(xlabel="z", title="SwiGLU's gate: smooth, and slightly negative below 0")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def masks(named: dict[str, np.ndarray]):
    """Boolean attention masks side by side ({title: [T, S] bool}); a filled square means "may attend"."""
    fig, axes = plt.subplots(1, len(named), figsize=(3.0 * len(named), 3.2))
    for ax, (title, mask) in zip(np.atleast_1d(axes), named.items()):
        ax.imshow(mask, cmap="Blues", vmin=0, vmax=1.3)
        T, S = mask.shape
        ax.set(title=title, xlabel="key position s", xticks=range(0, S, 2), yticks=range(T))
        ax.set_yticklabels([str(S - T + t) for t in range(T)])
    np.atleast_1d(axes)[0].set_ylabel("query position")
    fig.tight_layout()
    return fig


def gqa(n_heads: int, n_kv_heads: int):
    """Which key/value head each query head reads: head h reads h // (H / G)."""
    fig, ax = plt.subplots(figsize=(6.5, 2.2))
    group = n_heads // n_kv_heads
    q_x = np.arange(n_heads)
    kv_x = (np.arange(n_kv_heads) + 0.5) * group - 0.5
    colours = plt.cm.tab10(np.arange(n_kv_heads))
    for h in range(n_heads):
        ax.plot([q_x[h], kv_x[h // group]], [1, 0], color=colours[h // group], lw=1.5)
    ax.scatter(q_x, np.ones(n_heads), s=300, color=[colours[h // group] for h in range(n_heads)], zorder=3)
    ax.scatter(kv_x, np.zeros(n_kv_heads), s=500, marker="s", color=colours, zorder=3)
    for h in range(n_heads):
        ax.text(q_x[h], 1.22, f"q{h}", ha="center", fontsize=8)
    for g in range(n_kv_heads):
        ax.text(kv_x[g], -0.38, f"k{g}, v{g}", ha="center", fontsize=8)
    ax.set(xlim=(-0.8, n_heads - 0.2), ylim=(-0.6, 1.45), xticks=[], yticks=[],
           title=f"GQA: {n_heads} query heads share {n_kv_heads} key/value heads (head h reads h // {group})")
    ax.axis("off")
    return fig


def cache_size(steps: np.ndarray, kept: dict[str, np.ndarray]):
    """Keys held by the KV cache after each decoded token ({label: kept count per step})."""
    fig, ax = plt.subplots(figsize=(5.5, 3))
    for label, counts in kept.items():
        ax.plot(steps, counts, label=label)
    ax.set(xlabel="tokens decoded", ylabel="keys kept per layer", title="KV cache memory: full vs sliding window")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def moe_load(loads: dict[str, np.ndarray], uniform: float, losses: dict[str, float]):
    """Token copies each expert received ({label: [E] counts}), grouped, with the uniform share as a line."""
    fig, ax = plt.subplots(figsize=(6, 3))
    E, width = len(next(iter(loads.values()))), 0.8 / len(loads)
    for i, (label, counts) in enumerate(loads.items()):
        ax.bar(np.arange(E) + (i - (len(loads) - 1) / 2) * width, counts, width,
               label=f"{label} (balance loss {losses[label]:.3f})")
    ax.axhline(uniform, color="black", ls="--", lw=1, label="uniform: N·k / E")
    ax.set(xticks=range(E), xlabel="expert e", ylabel="token copies routed", title="The router's load")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return fig


def scan(t: np.ndarray, outputs: dict[str, np.ndarray], inputs: np.ndarray):
    """The selective scan's output for one channel ({label: y [T]}), each scaled to its largest |y| so that how
    long it lasts can be compared, beside its input u [T]."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 3.8), sharex=True)
    top.stem(t, inputs, basefmt=" ")
    top.set(ylabel="u_t", title="input: two pulses")
    for (label, y), style in zip(outputs.items(), ["-", "--", "-."]):
        bottom.plot(t, y / np.abs(y).max(), style, marker=".", label=label)
    bottom.set(xlabel="time step t", ylabel="y_t / max |y|", title="output, each scaled to its peak: Δ sets how long "
               "the state remembers")
    bottom.legend(fontsize=8)
    fig.tight_layout()
    return fig


def recall(n_pairs: np.ndarray, errors: dict[str, np.ndarray], key_dim: int, by_age: dict[str, np.ndarray]):
    """Left: recall error (|S k_i - v_i| / |v_i|, mean over the stored pairs) against the pairs written
    ({label: [len(n_pairs)]}). Right: the error of each pair against how many writes ago it was written
    ({label: [n]}, averaged over draws). The dotted line at 1 is the error of answering zero."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    for label, err in errors.items():
        left.plot(n_pairs, err, marker="o", label=label)
    left.axvline(key_dim, color="grey", ls=":", lw=1)
    left.text(key_dim, 0.03, f" K = {key_dim}", color="grey", fontsize=8, va="bottom", ha="left",
              transform=left.get_xaxis_transform())
    left.set(xlabel="key/value pairs written", ylabel="recall error", title="mean recall error")
    for label, err in by_age.items():
        right.plot(np.arange(len(err)), err, marker=".", label=label)
    n = len(next(iter(by_age.values())))
    right.set(xlabel="writes since the pair was written (0 = the last)", title=f"{n} pairs: mean error by age")
    for ax in (left, right):
        ax.axhline(1.0, color="black", ls=":", lw=0.8)
    left.legend(fontsize=8)
    fig.tight_layout()
    return fig


def worker_maps(named: dict[str, np.ndarray], xlabel: str, ylabel: str):
    """Which worker computes each element ({title: [rows, cols] int worker ids}), one colour per worker."""
    fig, axes = plt.subplots(1, len(named), figsize=(4.2 * len(named), 3.2))
    for ax, (title, ids) in zip(np.atleast_1d(axes), named.items()):
        ax.imshow(ids, cmap="tab20", vmin=0, vmax=19, aspect="auto")
        rows, cols = ids.shape
        if rows * cols <= 128:
            for (r, c), worker in np.ndenumerate(ids):
                ax.text(c, r, str(worker), ha="center", va="center", fontsize=7)
        ax.set(title=title, xlabel=xlabel, xticks=range(0, cols, max(1, cols // 8)),
               yticks=range(0, rows, max(1, rows // 8)))
    np.atleast_1d(axes)[0].set_ylabel(ylabel)
    fig.tight_layout()
    return fig
