"""Sintellix (seed 000): a 3D grid of neurons that attend to their neighbours, to a sample of the grid, and to
their own past.

The write-up arranges 32 x 32 x 32 neurons in a cube, each with a d-dimensional state (d in 128..1024), and
updates them with three kinds of attention: multi-head attention over each neuron's neighbours, "sparse global
aggregation" (cross-attention to 256 neurons sampled uniformly, aggregated with learned weights), and temporal
attention over an 8-frame history with a hierarchical pairing (t-1, t-2) -> (t-3, t-4) -> ..., learned per
neuron. Its ablation table adds a "noise filter" and an "FXAA layer" without defining either. The public
code has no grid topology at all (every neuron sees the same input; see the chapter).

One grid update (`SintellixGrid.step`), for the state S [B, N, d] of the N = X Y Z neurons:

    h       = RMSNorm(S)
    local   = W_o  neighbourhood_attention(W_q h, W_k h, W_v h)      the 26 neighbours and itself (radius 1),
                                                                     no wrap-around (refimpl.ops.neighbourhood_attention)
    global  = g_n * W_go attention(W_gq h, W_gk h[sample], W_gv h[sample])   256 neurons drawn uniformly with a
                                                                     fixed seed per step; g_n a learned weight
                                                                     per neuron
    past    = W_t  hierarchy(history)                                pairs of frames merged by per-neuron
                                                                     learned softmax weights: 8 -> 4 -> 2 -> 1
    delta   = noise_filter(local + global + past)                    the book's meaning: a gate that lets an
                                                                     update through only where its RMS exceeds
                                                                     a learned threshold (small updates are noise)
    S       = S + delta;  S = S + SwiGLU(RMSNorm(S))
    S       = fxaa(S)                                                the book's meaning: like the image filter, an
                                                                     edge-aware smoothing: where the local contrast
                                                                     over the 6 face neighbours is high, blend in
                                                                     their mean (learned gain and strength)

Every part can be switched off (the ablation table). Projections are shared by all neurons
(`weight_sharing=True`) or each neuron has its own (the write-up's "each neuron maintains attention
weights"); `sintellix_memory` says what each choice costs at the write-up's size.

The reconstruction task the chapter trains: an image patch written into the bottom layer (z = 0), corrupted
(noise and dropped pixels), read back from the top layer (z = Z - 1): information must cross the grid.
`ConvBaseline` is the plain network it is compared with.

Training a grid bigger than memory: `offload_neuron_weights` moves every per-neuron projection into a
`refimpl.store.TieredStore`, slab by slab; forward and backward stream the blocks in (`_StoredProjection`)
and `stored_adam_step` updates them through the fused-Adam op, with global gradient clipping.

Glossary:  B batch   X, Y, Z grid sides   N = X Y Z neurons   d state size   H heads   D = d / H
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from refimpl import ops
from refimpl.blocks import RMSNorm, config_from_preset, count_parameters
from refimpl.config import check_fields, flag, instance, whole


@dataclass
class SintellixConfig:
    grid: tuple = (8, 8, 4)          # X, Y, Z: neurons along each side (the write-up: 32, 32, 32)
    dim: int = 32                    # d: each neuron's state (the write-up: 128, 256, 512 or 1024)
    n_heads: int = 8                 # H: attention heads (the write-up's 8)
    radius: int = 1                  # neighbourhood: the cube of side 2 r + 1 around a neuron
    n_global: int = 256              # neurons sampled per step for global aggregation (capped at N)
    history: int = 8                 # frames of past states, a power of two (the hierarchy halves it)
    steps: int = 6                   # grid updates per input
    ffn_mult: int = 2                # SwiGLU hidden = ffn_mult * d
    weight_sharing: bool = True      # False: every neuron has its own projections
    in_channels: int = 1             # values written into each bottom-layer neuron (grey pixels: 1)
    out_channels: int = 1            # values read from each top-layer neuron
    neighbour_attention: bool = True  # the ablation switches
    global_aggregation: bool = True
    temporal: bool = True
    noise_filter: bool = True
    fxaa: bool = True
    seed: int = 0                    # the global samples' seed

    RULES = {"grid": instance(tuple, list), "dim": whole(1), "n_heads": whole(1), "radius": whole(0),
             "n_global": whole(1), "history": whole(1), "steps": whole(1), "ffn_mult": whole(1),
             "weight_sharing": flag(), "in_channels": whole(1), "out_channels": whole(1),
             "neighbour_attention": flag(), "global_aggregation": flag(), "temporal": flag(), "noise_filter": flag(),
             "fxaa": flag(), "seed": whole(0)}

    def __post_init__(self):
        check_fields(self, self.RULES)
        self.grid = tuple(self.grid)
        if len(self.grid) != 3 or not all(whole(1).allows(s) for s in self.grid):
            raise ValueError(f"SintellixConfig.grid must be three sides >= 1, got {self.grid}")
        if self.dim % self.n_heads:
            raise ValueError(f"SintellixConfig: dim={self.dim} must be divisible by n_heads={self.n_heads}")
        if self.history < 1 or self.history & (self.history - 1):
            raise ValueError(f"SintellixConfig.history must be a power of two >= 1, got {self.history}")

    @property
    def n_neurons(self) -> int:
        X, Y, Z = self.grid
        return X * Y * Z

    @classmethod
    def preset(cls, name: str, **overrides) -> "SintellixConfig":
        """`tiny` (tests, CI), `small` (the book on a CPU) or `paper` (the write-up's: counted, never built)."""
        return config_from_preset(cls, SINTELLIX_PRESETS, name, overrides)


SINTELLIX_PRESETS = {
    "tiny": dict(grid=(4, 4, 3), dim=16, n_heads=2, n_global=8, history=4, steps=4),
    "small": dict(grid=(8, 8, 4), dim=32, n_heads=4, n_global=64, history=8, steps=6),
    # The write-up: 32^3 neurons, d = 256 (its "Sintellix-256"), 8 heads, 256 global samples, 8 frames, and
    # per-neuron weights ("each neuron maintains ... attention weights").
    "paper": dict(grid=(32, 32, 32), dim=256, n_heads=8, n_global=256, history=8, steps=8, weight_sharing=False),
}


class NeuronLinear(nn.Module):
    """A bias-free linear map applied to every neuron: one shared weight [out, in], or one per neuron
    [N, out, in]. forward(x [B, N, in]) -> [B, N, out]."""

    def __init__(self, n_neurons: int, d_in: int, d_out: int, shared: bool, std: float = 0.02):
        super().__init__()
        shape = (d_out, d_in) if shared else (n_neurons, d_out, d_in)
        self.weight = nn.Parameter(torch.randn(shape) * std)
        self.shared = shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shared:
            return x @ self.weight.T
        return torch.einsum("bni,noi->bno", x, self.weight)


def temporal_hierarchy(history: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Merge frames in pairs, level by level: history [B, F, N, d] (frame 0 = t-1, the newest) and per-neuron
    pair logits [N, F - 1, 2] -> [B, N, d]. Level 1 merges (t-1, t-2), (t-3, t-4), ...; level 2 merges those
    results in pairs; after log2(F) levels one frame is left. Each merge is w_a a + w_b b with
    (w_a, w_b) = softmax of that neuron's two logits for that pair."""
    frames = list(history.unbind(dim=1))
    weights = torch.softmax(logits, dim=-1)                                 # [N, F - 1, 2]
    pair = 0
    while len(frames) > 1:
        merged = []
        for a, b in zip(frames[0::2], frames[1::2]):
            w = weights[:, pair]                                            # [N, 2]
            merged.append(w[None, :, 0:1] * a + w[None, :, 1:2] * b)
            pair += 1
        frames = merged
    return frames[0]


def face_neighbour_mean(S: torch.Tensor, grid: tuple) -> torch.Tensor:
    """Mean of each neuron's 6 face neighbours that exist (fewer on the boundary). S [B, N, d] -> [B, N, d]."""
    X, Y, Z = grid
    B, N, d = S.shape
    s = S.view(B, X, Y, Z, d)
    total, count = torch.zeros_like(s), torch.zeros(X, Y, Z, 1, dtype=S.dtype, device=S.device)
    for axis in (1, 2, 3):
        size = s.shape[axis]
        if size == 1:
            continue
        for lo, hi, src_lo, src_hi in ((1, size, 0, size - 1), (0, size - 1, 1, size)):   # from below, from above
            dst = [slice(None)] * 5
            src = [slice(None)] * 5
            dst[axis], src[axis] = slice(lo, hi), slice(src_lo, src_hi)
            total[tuple(dst)] += s[tuple(src)]
            count[tuple(dst[1:])] += 1
    return (total / count.clamp_min(1)).view(B, N, d)


def fxaa(S: torch.Tensor, grid: tuple, gain: torch.Tensor, threshold: torch.Tensor,
         strength: torch.Tensor) -> torch.Tensor:
    """Edge-aware smoothing over the grid. Luminance = the mean of a neuron's state; contrast = the largest
    luminance difference to a face neighbour; where contrast is high (sigmoid(gain (contrast - threshold))),
    blend toward the face neighbours' mean by up to sigmoid(strength). A uniform grid is left unchanged."""
    neighbours = face_neighbour_mean(S, grid)
    X, Y, Z = grid
    B, N, d = S.shape
    lum = S.mean(dim=-1).view(B, X, Y, Z)
    padded = F.pad(lum[:, None], (1, 1, 1, 1, 1, 1), mode="replicate")[:, 0]            # edges replicate
    shifts = [padded[:, 1 + dx:1 + dx + X, 1 + dy:1 + dy + Y, 1 + dz:1 + dz + Z]
              for dx, dy, dz in ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1))]
    contrast = torch.stack([(s - lum).abs() for s in shifts]).amax(dim=0).reshape(B, N, 1)
    blend = torch.sigmoid(strength) * torch.sigmoid(gain * (contrast - threshold))
    return S + blend * (neighbours - S)


class SintellixGrid(nn.Module):
    """The grid model. forward(x [B, X, Y, in_channels]) -> [B, X, Y, out_channels]: x is written into the
    bottom layer, `steps` grid updates run, the top layer is read out. `last_states` keeps every step's state
    [steps + 1, B, N, d] after a forward (for pictures)."""

    def __init__(self, cfg: SintellixConfig):
        super().__init__()
        self.cfg = cfg
        N, d, shared = cfg.n_neurons, cfg.dim, cfg.weight_sharing
        self.position = nn.Parameter(torch.randn(N, d) * 0.02)             # each neuron's own starting state
        self.read_in = nn.Linear(cfg.in_channels, d)
        self.read_out = nn.Linear(d, cfg.out_channels)
        self.norm, self.norm_ffn, self.norm_out = RMSNorm(d), RMSNorm(d), RMSNorm(d)
        lin = lambda i, o, std=0.02: NeuronLinear(N, i, o, shared, std)  # noqa: E731
        if cfg.neighbour_attention:
            self.local_qkv, self.local_out = lin(d, 3 * d), lin(d, d)
        if cfg.global_aggregation:
            self.global_q, self.global_kv, self.global_out = lin(d, d), lin(d, 2 * d), lin(d, d)
            self.global_weight = nn.Parameter(torch.full((N, 1), 0.5))      # the learned aggregation weights
        if cfg.temporal:
            self.temporal_logits = nn.Parameter(torch.zeros(N, max(1, cfg.history - 1), 2))
            self.temporal_out = lin(d, d)
        if cfg.noise_filter:
            # log of the RMS threshold; e^-10 lets everything through at the start (updates are ~1e-2 then),
            # so the filter only closes where training finds that suppressing small updates helps
            self.filter_threshold = nn.Parameter(torch.tensor(-10.0))
            self.filter_sharpness = nn.Parameter(torch.tensor(4.0))
        if cfg.fxaa:
            self.fxaa_gain = nn.Parameter(torch.tensor(4.0))
            self.fxaa_threshold = nn.Parameter(torch.tensor(0.5))
            self.fxaa_strength = nn.Parameter(torch.tensor(-2.0))
        self.ffn_gate_up, self.ffn_down = lin(d, 2 * cfg.ffn_mult * d), lin(cfg.ffn_mult * d, d)
        self.last_states: torch.Tensor | None = None

    def num_parameters(self) -> int:
        return count_parameters(self)

    def global_sample(self, step: int, device=None) -> torch.Tensor:
        """The neurons step `step` aggregates from: n_global drawn uniformly without replacement, seeded by
        (seed, step), so every run and every batch element sees the same sample at the same step."""
        n = min(self.cfg.n_global, self.cfg.n_neurons)
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
        return torch.randperm(self.cfg.n_neurons, generator=g)[:n].to(device)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:                     # [B, N, d] -> [B, H, N, D]
        B, N, d = t.shape
        return t.view(B, N, self.cfg.n_heads, d // self.cfg.n_heads).transpose(1, 2)

    def step(self, S: torch.Tensor, history: torch.Tensor | None, step: int) -> torch.Tensor:
        """One grid update: S [B, N, d], history [B, F, N, d] (newest first) -> the new S."""
        cfg = self.cfg
        B, N, d = S.shape
        X, Y, Z = cfg.grid
        H, D = cfg.n_heads, d // cfg.n_heads
        h = self.norm(S)
        delta = torch.zeros_like(S)
        if cfg.neighbour_attention:
            q, k, v = (t.reshape(B, X, Y, Z, H, D) for t in self.local_qkv(h).chunk(3, dim=-1))
            local = ops.neighbourhood_attention(q, k, v, cfg.radius)          # [B, X, Y, Z, H, D]
            delta = delta + self.local_out(local.reshape(B, N, d))
        if cfg.global_aggregation:
            sample = self.global_sample(step, S.device)
            q = self._heads(self.global_q(h))
            k, v = (self._heads(t) for t in self.global_kv(h)[:, sample].chunk(2, dim=-1))
            pooled = F.scaled_dot_product_attention(q, k, v)                            # [B, H, N, D]
            delta = delta + self.global_weight * self.global_out(pooled.transpose(1, 2).reshape(B, N, d))
        if cfg.temporal and history is not None:
            delta = delta + self.temporal_out(temporal_hierarchy(history, self.temporal_logits))
        if cfg.noise_filter:
            rms = delta.square().mean(dim=-1, keepdim=True).add(1e-12).sqrt()
            delta = delta * torch.sigmoid(self.filter_sharpness * (rms.log() - self.filter_threshold))
        S = S + delta
        gate, up = self.ffn_gate_up(self.norm_ffn(S)).chunk(2, dim=-1)
        S = S + self.ffn_down(F.silu(gate) * up)
        if cfg.fxaa:
            S = fxaa(S, cfg.grid, self.fxaa_gain, self.fxaa_threshold, self.fxaa_strength)
        return S

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        X, Y, Z = cfg.grid
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != (X, Y, cfg.in_channels):
            raise ValueError(f"SintellixGrid: x must be [B, X, Y, in_channels] = [B, {X}, {Y}, {cfg.in_channels}], "
                             f"got {list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"SintellixGrid: x must be a floating-point tensor, got {x.dtype}")
        B = x.shape[0]
        S = self.position.expand(B, -1, -1).reshape(B, X, Y, Z, cfg.dim)
        S = torch.cat([S[:, :, :, :1] + self.read_in(x)[:, :, :, None], S[:, :, :, 1:]], dim=3).reshape(B, -1, cfg.dim)
        frames = [S] * cfg.history                                          # the history starts as the first state
        states = [S]
        for t in range(cfg.steps):
            history = torch.stack(frames, dim=1) if cfg.temporal else None
            S = self.step(S, history, t)
            frames = [S] + frames[:-1]
            states.append(S)
        self.last_states = torch.stack(states).detach()
        top = S.view(B, X, Y, Z, cfg.dim)[:, :, :, Z - 1]
        return self.read_out(self.norm_out(top))


# ----------------------------------------------------------------------------
# Parameters and memory, without building the model
# ----------------------------------------------------------------------------

def sintellix_parameter_count(cfg: SintellixConfig) -> dict:
    """Parameters of SintellixGrid(cfg) by part."""
    N, d = cfg.n_neurons, cfg.dim
    per = 1 if cfg.weight_sharing else N                                   # copies of every projection
    parts = {"positions and read in/out": N * d + (cfg.in_channels + 1) * d + (d + 1) * cfg.out_channels,
             "norms": 3 * d,
             "neighbour attention": per * 4 * d * d if cfg.neighbour_attention else 0,
             "global aggregation": per * 4 * d * d + N if cfg.global_aggregation else 0,
             "temporal": N * max(1, cfg.history - 1) * 2 + per * d * d if cfg.temporal else 0,
             "noise filter and FXAA": 2 * cfg.noise_filter + 3 * cfg.fxaa,
             "feed-forward": per * 3 * cfg.ffn_mult * d * d}
    return {"total": sum(parts.values()), "parts": parts}


def sintellix_memory(cfg: SintellixConfig, batch_size: int = 16, bytes_per_value: int = 4) -> dict:
    """Bytes to train SintellixGrid(cfg) with Adam, by what they hold: parameters, gradients, Adam's two
    moments (each the size of the parameters), and the states one forward keeps (the current state and the
    history frames, per batch element; activations saved for backward come on top and are not counted)."""
    params = sintellix_parameter_count(cfg)["total"]
    states = batch_size * cfg.n_neurons * cfg.dim * (1 + cfg.history)
    parts = {"parameters": params * bytes_per_value, "gradients": params * bytes_per_value,
             "adam_moments": 2 * params * bytes_per_value, "states_and_history": states * bytes_per_value}
    return {"total_bytes": sum(parts.values()), "parts": parts, "parameters": params}


# ----------------------------------------------------------------------------
# The reconstruction task: image patches, corrupted, written in at the bottom and read out at the top
# ----------------------------------------------------------------------------

def image_patches(images: list[torch.Tensor], n: int, size: tuple, generator: torch.Generator) -> torch.Tensor:
    """n random patches [n, X, Y, 1] cut from grey images ([H, W] in [0, 1])."""
    X, Y = size
    out = []
    for _ in range(n):
        img = images[int(torch.randint(len(images), (1,), generator=generator))]
        if img.shape[0] < X or img.shape[1] < Y:
            raise ValueError(f"image {list(img.shape)} is smaller than a {X} x {Y} patch")
        i = int(torch.randint(img.shape[0] - X + 1, (1,), generator=generator))
        j = int(torch.randint(img.shape[1] - Y + 1, (1,), generator=generator))
        out.append(img[i:i + X, j:j + Y])
    return torch.stack(out)[..., None]


def corrupt(clean: torch.Tensor, noise: float, drop: float, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise of std `noise`, then a fraction `drop` of pixels set to 0: the input the grid repairs."""
    noisy = clean + noise * torch.randn(clean.shape, generator=generator)
    keep = torch.rand(clean.shape, generator=generator) >= drop
    return noisy * keep


def psnr(prediction: torch.Tensor, target: torch.Tensor, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB: 10 log10(peak^2 / MSE)."""
    mse = F.mse_loss(prediction.float(), target.float()).item()
    return float("inf") if mse == 0 else 10 * math.log10(peak ** 2 / mse)


# ----------------------------------------------------------------------------
# Training a grid bigger than the fast tier: per-neuron weights kept in a TieredStore
# ----------------------------------------------------------------------------

class _StoredProjection(torch.autograd.Function):
    """y = x W^T per neuron, with W [N, out, in] fetched from the store slab by slab, never held by autograd.

    Forward fetches each slab's weights, uses them and lets them go; backward fetches them again (the
    ZeRO-Offload / ZeRO-Infinity pattern: parameters stream in twice per step) and adds the weight
    gradient into the block's "grad" tensor in the store, in place. Only x is saved for backward."""

    @staticmethod
    def forward(ctx, x, store, keys, bounds, prefetch):
        ctx.save_for_backward(x)
        ctx.store, ctx.keys, ctx.bounds, ctx.prefetch = store, keys, bounds, prefetch
        out = []
        for i, (key, (lo, hi)) in enumerate(zip(keys, bounds)):
            if prefetch and i + 1 < len(keys):
                store.prefetch(keys[i + 1])                        # read the next block from disk meanwhile
            out.append(torch.einsum("bni,noi->bno", x[:, lo:hi], store.get(key)["param"]))
        return torch.cat(out, dim=1)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        grad_x = torch.empty_like(x)
        order = list(reversed(list(zip(ctx.keys, ctx.bounds))))              # backward meets them in reverse
        for i, (key, (lo, hi)) in enumerate(order):
            if ctx.prefetch and i + 1 < len(order):
                ctx.store.prefetch(order[i + 1][0])
            block = ctx.store.get(key, for_write=True)
            g = grad_out[:, lo:hi]
            grad_x[:, lo:hi] = torch.einsum("bno,noi->bni", g, block["param"])
            block["grad"] += torch.einsum("bno,bni->noi", g, x[:, lo:hi])
        return grad_x, None, None, None, None


class StoredNeuronLinear(nn.Module):
    """A per-neuron NeuronLinear whose weight lives in a TieredStore as `slabs` blocks (neurons split evenly),
    each {"param", "grad", "exp_avg", "exp_avg_sq"} of shape [neurons in the slab, out, in]. With `prefetch`,
    fetching a block first asks the store to start reading the next one on its background thread."""

    def __init__(self, store, name: str, weight: torch.Tensor, slabs: int, prefetch: bool = False):
        super().__init__()
        self.prefetch = prefetch
        N = weight.shape[0]
        edges = [round(i * N / slabs) for i in range(slabs + 1)]
        self.store, self.bounds = store, [(lo, hi) for lo, hi in zip(edges, edges[1:]) if hi > lo]
        self.keys = [f"{name}.{i}" for i in range(len(self.bounds))]
        for key, (lo, hi) in zip(self.keys, self.bounds):
            w = weight[lo:hi].detach().contiguous()
            store.put(key, {"param": w, "grad": torch.zeros_like(w), "exp_avg": torch.zeros_like(w),
                            "exp_avg_sq": torch.zeros_like(w)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _StoredProjection.apply(x, self.store, self.keys, self.bounds, self.prefetch)


def offload_neuron_weights(model: SintellixGrid, store, slabs: int, prefetch: bool = False) -> list[str]:
    """Move every per-neuron projection of `model` (weight_sharing=False) into `store`, `slabs` blocks each,
    replacing the modules by StoredNeuronLinear (prefetching the next block if `prefetch`). Returns the
    block keys, in the order forward uses them."""
    if model.cfg.weight_sharing:
        raise ValueError("offload_neuron_weights needs per-neuron weights (weight_sharing=False)")
    keys = []
    for name, module in list(model.named_modules()):
        if isinstance(module, NeuronLinear):
            stored = StoredNeuronLinear(store, name, module.weight, slabs, prefetch)
            setattr(model, name, stored)                       # NeuronLinears are direct children of the model
            keys += stored.keys
    return keys


def stored_adam_step(store, keys: list[str], resident: list[torch.nn.Parameter], resident_states: dict, step: int,
                     lr: float, max_norm: float | None = 1.0, betas=(0.9, 0.999), eps: float = 1e-8) -> float:
    """One Adam step with global gradient clipping over the stored blocks and the resident parameters
    (those still in the model), through the op `refimpl.ops.adam_clip_step`, block by block.

    The global norm needs every gradient before any update: a first pass reads each block's grad (one
    more sweep through the store), then each block is updated with its grad pre-scaled by the clip
    coefficient (so the op itself clips nothing) and its grad zeroed. Returns the norm before clipping."""
    squares = sum(float(store.get(k)["grad"].double().square().sum()) for k in keys)
    squares += sum(float(p.grad.double().square().sum()) for p in resident if p.grad is not None)
    norm = squares ** 0.5
    coef = min(1.0, max_norm / (norm + ops.CLIP_EPS)) if max_norm is not None else 1.0
    hyper = dict(step=step, lr=lr, beta1=betas[0], beta2=betas[1], eps=eps, weight_decay=0.0, max_norm=None)
    for key in keys:
        block = store.get(key, for_write=True)
        if coef != 1.0:
            block["grad"].mul_(coef)
        ops.adam_clip_step(block["param"].view(-1), block["grad"].view(-1), block["exp_avg"].view(-1),
                           block["exp_avg_sq"].view(-1), **hyper)
        block["grad"].zero_()
    for p in resident:
        if p.grad is None:
            continue
        state = resident_states.setdefault(p, (torch.zeros_like(p).view(-1), torch.zeros_like(p).view(-1)))
        g = (p.grad * coef).contiguous().view(-1)
        with torch.no_grad():
            ops.adam_clip_step(p.data.view(-1), g, state[0], state[1], **hyper)
        p.grad = None
    return norm


# ----------------------------------------------------------------------------
# The plain baseline for the reconstruction task
# ----------------------------------------------------------------------------

class ConvBaseline(nn.Module):
    """A plain convolutional denoiser for the same task: `depth` 3 x 3 convolutions of `width` channels with GELU,
    input [B, X, Y, in] -> output [B, X, Y, out]. What the grid is compared with at an equal parameter count."""

    def __init__(self, width: int, depth: int = 4, in_channels: int = 1, out_channels: int = 1):
        super().__init__()
        if width < 1 or depth < 2:
            raise ValueError(f"ConvBaseline: need width >= 1 and depth >= 2, got {width}, {depth}")
        channels = [in_channels] + [width] * (depth - 1) + [out_channels]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in zip(channels, channels[1:]))

    def num_parameters(self) -> int:
        return count_parameters(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.permute(0, 3, 1, 2)
        for i, conv in enumerate(self.convs):
            h = conv(h)
            if i < len(self.convs) - 1:
                h = F.gelu(h)
        return h.permute(0, 2, 3, 1)


def matched_conv_baseline(target_parameters: int, depth: int = 4) -> ConvBaseline:
    """The ConvBaseline whose parameter count is closest to `target_parameters`, by choosing its width."""
    return min((ConvBaseline(w, depth) for w in range(1, 257)), key=lambda m: abs(m.num_parameters() - target_parameters))
