"""Geometric Intelligence (seed 003): weights modulated by a point in a coordinate space.

The write-up (mghbot/geometric-intellgence-10m-model) replaces a fixed weight W by

    W_eff(theta) = W_base + sum_i [ cos(theta . c_i) U_i V_i^T + sin(theta . c_i) P_i Q_i^T ]

with theta a 1,024-dimensional coordinate, c_i one of M = 64 fixed "wavelet" directions and each
U_i V_i^T, P_i Q_i^T of rank r = 12. Different theta, different weights, from one set of parameters.
The product with W_eff, never materialised, is the op `refimpl.ops.modulated_linear`.

This file builds the model around it:
    GeometricConfig / GEOMETRIC_PRESETS   `tiny`, `small`, `paper` (10 x 448, GQA 16/4, theta of 1,024, 64 x rank 12),
                                          `ten_million` (a model that really has 10M parameters)
    ModulatedLinear, GeometricBlock       a Llama block whose chosen projections are modulated
    CoordinatePredictor                   theta_t from the running mean of embeddings (causal), or the public
                                          code's whole-sequence mean (causal=False: it leaks the future)
    GeometricLM                           the model; theta predicted, or given (one coordinate, or per token)
    geometric_parameter_count             parameters by the write-up's parts, without building the model
    refine_coordinates, track_context, uncertainty, nucleus_sample, choose_token   inference-time coordinates
    generate, coordinate_statistics, interpolate, layer_energies      the generator API

The curriculum, its data and the forgetting experiment are in `refimpl.geometric_training`; the
interactive explorer is `book.views.CoordinateExplorer`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from refimpl import ops
from refimpl.blocks import (RMSNorm, apply_rope, check_targets, check_token_ids, config_from_preset, count_parameters,
                            init_lm_weights, rope_tables)
from refimpl.config import check_fields, flag, instance, number, whole

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass
class GeometricConfig:
    vocab_size: int = 256            # V: bytes (the write-up's tokenizer has 32,000 tokens)
    d_model: int = 128               # C
    n_layers: int = 4
    n_heads: int = 8                 # query heads
    n_kv_heads: int = 2              # key/value heads (GQA)
    ffn_hidden: int | None = None    # SwiGLU width; None -> 4 C (the write-up's 1,792 = 4 x 448)
    coord_dim: int = 64              # D: size of the coordinate theta (1,024 in the write-up)
    n_wavelets: int = 8              # M: cos/sin pairs per modulated projection (64)
    rank: int = 4                    # r: rank of each U V^T and P Q^T (12)
    modulate: tuple = PROJECTIONS    # which projections the coordinate modulates
    predictor_hidden: int = 64       # width of the coordinate predictor's MLP
    causal_predictor: bool = True    # False: the public code's predictor, which pools the whole sequence
    max_seq_len: int = 256
    norm_eps: float = 1e-6
    tie_embeddings: bool = False     # the write-up counts a separate output layer

    RULES = {"vocab_size": whole(1), "d_model": whole(1), "n_layers": whole(1), "n_heads": whole(1),
             "n_kv_heads": whole(1), "ffn_hidden": whole(1, optional=True), "coord_dim": whole(1),
             "n_wavelets": whole(1), "rank": whole(1), "modulate": instance(tuple, list), "predictor_hidden": whole(1),
             "causal_predictor": flag(), "max_seq_len": whole(1), "norm_eps": number(0, low_open=True),
             "tie_embeddings": flag()}

    def __post_init__(self):
        check_fields(self, self.RULES)
        if self.d_model % self.n_heads or self.n_heads % self.n_kv_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(f"need d_model={self.d_model} divisible by n_heads={self.n_heads}, n_heads a multiple of "
                             f"n_kv_heads={self.n_kv_heads}, and an even head size for RoPE")
        self.modulate = tuple(self.modulate)
        unknown = set(self.modulate) - set(PROJECTIONS)
        if unknown:
            raise ValueError(f"modulate: unknown projections {sorted(unknown)}; choose from {PROJECTIONS}")
        self.ffn_hidden = self.ffn_hidden or 4 * self.d_model

    @classmethod
    def preset(cls, name: str, **overrides) -> "GeometricConfig":
        """`tiny` (tests, CI), `small` (the book on a CPU) or `paper` (the write-up's table: counted, not trained)."""
        return config_from_preset(cls, GEOMETRIC_PRESETS, name, overrides)


GEOMETRIC_PRESETS = {  # the arguments of each named size
    "tiny": dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, coord_dim=16, n_wavelets=4, rank=2,
                 predictor_hidden=16, max_seq_len=64),
    "small": dict(d_model=96, n_layers=4, n_heads=6, n_kv_heads=2, coord_dim=64, n_wavelets=8, rank=4,
                  predictor_hidden=64, max_seq_len=128),
    # The write-up's README: 10 layers of 448, GQA 16/4, SwiGLU 1,792, theta of 1,024, 64 wavelet pairs of rank 12,
    # a predictor of ~256K parameters (hidden 176 gives 448*176 + 176*1024 + biases), its tokenizer's 32,000 tokens.
    "paper": dict(vocab_size=32_000, d_model=448, n_layers=10, n_heads=16, n_kv_heads=4, ffn_hidden=1792,
                  coord_dim=1024, n_wavelets=64, rank=12, predictor_hidden=176, max_seq_len=512),
    # A model that really has 10M parameters (9,993,744) with the write-up's coordinate system untouched
    # (theta of 1,024, 64 pairs of rank 12, the ~256K predictor), its 10 layers, GQA 16/4, and the vocabulary of
    # 3,125 that the table's 1.4M embeddings imply at width 448. Something has to give: with 64 x 12 factor pairs
    # per projection it is the width (160) and all modulated projections but one (q).
    "ten_million": dict(vocab_size=3125, d_model=160, n_layers=10, n_heads=16, n_kv_heads=4, ffn_hidden=672,
                        coord_dim=1024, n_wavelets=64, rank=12, modulate=("q",), predictor_hidden=176,
                        max_seq_len=512),
}


class ModulatedLinear(nn.Module):
    """A bias-free linear layer whose weight is W_base + sum_i cos_i U_i V_i^T + sin_i P_i Q_i^T.

    forward(x [..., I], cos [..., M], sin [..., M]) -> [..., O] through the op `modulated_linear`.
    U and P start small (std 0.02 / sqrt(M)) so the modulation starts as a small perturbation of W_base."""

    def __init__(self, in_features: int, out_features: int, n_wavelets: int, rank: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) * 0.02)
        scale_out, scale_in = 0.02 / math.sqrt(n_wavelets), 1 / math.sqrt(in_features)
        self.U = nn.Parameter(torch.randn(n_wavelets, out_features, rank) * scale_out)
        self.V = nn.Parameter(torch.randn(n_wavelets, in_features, rank) * scale_in)
        self.P = nn.Parameter(torch.randn(n_wavelets, out_features, rank) * scale_out)
        self.Q = nn.Parameter(torch.randn(n_wavelets, in_features, rank) * scale_in)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = ops.modulated_linear(x.reshape(-1, x.shape[-1]), self.weight, self.U, self.V, self.P, self.Q,
                             cos.reshape(-1, cos.shape[-1]), sin.reshape(-1, sin.shape[-1]))
        return y.view(*lead, -1)

    def energy(self, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """||W_eff - W_base||_F per coefficient row: cos, sin [..., M] -> [...]. How much the coordinate changes
        this layer (the explorer's "modulation energy"); builds the [O, I] deltas, fine at these sizes."""
        UV = torch.einsum("mor,mir->moi", self.U, self.V)
        PQ = torch.einsum("mor,mir->moi", self.P, self.Q)
        delta = torch.einsum("...m,moi->...oi", cos, UV) + torch.einsum("...m,moi->...oi", sin, PQ)
        return delta.flatten(-2).norm(dim=-1)


def _projection(cfg: GeometricConfig, name: str, i: int, o: int) -> nn.Module:
    return ModulatedLinear(i, o, cfg.n_wavelets, cfg.rank) if name in cfg.modulate else nn.Linear(i, o, bias=False)


def _apply(layer: nn.Module, x, cos, sin):
    return layer(x, cos, sin) if isinstance(layer, ModulatedLinear) else layer(x)


class GeometricBlock(nn.Module):
    """Llama block: x + GQA(RMSNorm x) with RoPE; x + SwiGLU(RMSNorm x); each projection optionally modulated."""

    def __init__(self, cfg: GeometricConfig):
        super().__init__()
        C, H, G = cfg.d_model, cfg.n_heads, cfg.n_kv_heads
        self.n_heads, self.n_kv_heads, self.head_dim = H, G, C // H
        D = self.head_dim
        self.norm_attn, self.norm_ffn = RMSNorm(C, cfg.norm_eps), RMSNorm(C, cfg.norm_eps)
        self.proj = nn.ModuleDict({"q": _projection(cfg, "q", C, H * D), "k": _projection(cfg, "k", C, G * D),
                                   "v": _projection(cfg, "v", C, G * D), "o": _projection(cfg, "o", H * D, C),
                                   "gate": _projection(cfg, "gate", C, cfg.ffn_hidden),
                                   "up": _projection(cfg, "up", C, cfg.ffn_hidden),
                                   "down": _projection(cfg, "down", cfg.ffn_hidden, C)})

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        H, G, D = self.n_heads, self.n_kv_heads, self.head_dim
        p = self.proj
        h = self.norm_attn(x)
        q = _apply(p["q"], h, cos, sin).view(B, T, H, D)
        k = _apply(p["k"], h, cos, sin).view(B, T, G, D)
        v = _apply(p["v"], h, cos, sin).view(B, T, G, D)
        rc, rs = rope_tables(torch.arange(T, device=x.device), D, dtype=torch.promote_types(x.dtype, torch.float32))
        q, k = apply_rope(q, rc, rs), apply_rope(k, rc, rs)
        x = x + _apply(p["o"], ops.attention(q, k, v, causal=True).reshape(B, T, H * D), cos, sin)
        h = self.norm_ffn(x)
        return x + _apply(p["down"], F.silu(_apply(p["gate"], h, cos, sin)) * _apply(p["up"], h, cos, sin), cos, sin)


class CoordinatePredictor(nn.Module):
    """theta_t = MLP(mean of the embeddings of tokens <= t): amortised, one pass, causal.

    causal=False pools over the whole sequence instead (the public code's mean pooling): then every
    position's theta, and so its weights, depend on tokens after it, a leak of the future."""

    def __init__(self, dim: int, hidden: int, coord_dim: int, causal: bool = True):
        super().__init__()
        self.causal = causal
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, coord_dim))

    def forward(self, emb: torch.Tensor) -> torch.Tensor:  # [B, T, C] -> [B, T, coord_dim]
        if self.causal:
            counts = torch.arange(1, emb.shape[1] + 1, device=emb.device, dtype=emb.dtype)[None, :, None]
            pooled = emb.cumsum(dim=1) / counts                                # running mean over tokens <= t
        else:
            pooled = emb.mean(dim=1, keepdim=True).expand_as(emb)             # the whole sequence, at every t
        return self.net(pooled)


class GeometricLM(nn.Module):
    """Embedding -> coordinate predictor -> modulated Llama blocks -> RMSNorm -> output layer.

    The coordinates theta [B, T, coord_dim] are predicted from the tokens, or passed in (refinement,
    the explorer, task coordinates); the wavelet phases theta . c_i use fixed random unit directions
    c_i (a buffer, seeded). After each forward, `last_theta` holds the coordinates used."""

    def __init__(self, cfg: GeometricConfig, direction_seed: int = 0):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.predictor = CoordinatePredictor(cfg.d_model, cfg.predictor_hidden, cfg.coord_dim, cfg.causal_predictor)
        directions = torch.randn(cfg.n_wavelets, cfg.coord_dim, generator=torch.Generator().manual_seed(direction_seed))
        self.register_buffer("directions", directions / directions.norm(dim=1, keepdim=True))   # [M, D] the c_i
        self.blocks = nn.ModuleList(GeometricBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.unembed = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.unembed.weight = self.embed.weight
        init_lm_weights(self)
        self.last_theta: torch.Tensor | None = None

    def num_parameters(self) -> int:
        return count_parameters(self)

    def coefficients(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """theta [..., D] -> (cos, sin) of theta . c_i, each [..., M]."""
        phase = theta @ self.directions.T
        return phase.cos(), phase.sin()

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, theta: torch.Tensor | None = None):
        """idx [B, T] -> (logits [B, T, V], loss or None). theta: [B, T, D], or [D] for one coordinate everywhere."""
        check_token_ids("GeometricLM", idx, self.cfg.max_seq_len, self.cfg.vocab_size)
        B, T = idx.shape
        x = self.embed(idx)                                                     # [B, T, C]
        if theta is None:
            theta = self.predictor(x)
        elif theta.dim() == 1 and theta.shape[0] == self.cfg.coord_dim:
            theta = theta.expand(B, T, -1)
        elif tuple(theta.shape) != (B, T, self.cfg.coord_dim):
            raise ValueError(f"theta must be [B, T, D] = [{B}, {T}, {self.cfg.coord_dim}] or [D], got {list(theta.shape)}")
        self.last_theta = theta
        cos, sin = self.coefficients(theta)                                     # [B, T, M] each
        for block in self.blocks:
            x = block(x, cos, sin)
        logits = self.unembed(self.norm(x))
        if targets is None:
            return logits, None
        check_targets("GeometricLM", targets, idx, self.cfg.vocab_size)
        return logits, F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def geometric_parameter_count(cfg: GeometricConfig) -> dict:
    """Parameters of GeometricLM(cfg) by the write-up's parts, without building it."""
    C, H, G, Fh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_hidden
    D = C // H
    shapes = {"q": (C, H * D), "k": (C, G * D), "v": (C, G * D), "o": (H * D, C), "gate": (C, Fh), "up": (C, Fh),
              "down": (Fh, C)}
    base = sum(i * o for i, o in shapes.values()) + 2 * C
    modulation = sum(2 * cfg.n_wavelets * cfg.rank * (i + o) for name, (i, o) in shapes.items() if name in cfg.modulate)
    h = cfg.predictor_hidden
    parts = {"token_embeddings": cfg.vocab_size * C, "transformer_layers_base": cfg.n_layers * base + C,
             "coordinate_modulation": cfg.n_layers * modulation,
             "coordinate_predictor": C * h + h + h * cfg.coord_dim + cfg.coord_dim,
             "output_layer": 0 if cfg.tie_embeddings else cfg.vocab_size * C}
    return {"total": sum(parts.values()), "parts": parts}


# ----------------------------------------------------------------------------
# Coordinates at inference: refinement, context tracking, adaptive decoding
# ----------------------------------------------------------------------------

def refine_coordinates(model: GeometricLM, idx: torch.Tensor, steps: int = 3, lr: float = 0.1,
                       weight: float = 0.01) -> tuple[torch.Tensor, list[float]]:
    """A few gradient steps on theta for -log p(idx[1:] | idx[:-1], theta) + weight ||theta - theta_proposed||^2,
    starting from the predictor's proposal. Returns (theta [B, T - 1, D], the objective at each step)."""
    if steps < 0 or idx.dim() != 2 or idx.shape[1] < 2:
        raise ValueError("refine_coordinates needs steps >= 0 and idx [B, T] with T >= 2")
    x, y = idx[:, :-1], idx[:, 1:]
    with torch.no_grad():
        proposed = model.predictor(model.embed(x))
    theta = proposed.clone().requires_grad_(True)
    objective = []
    for _ in range(steps):
        _, nll = model(x, y, theta=theta)
        loss = nll + weight * (theta - proposed).square().sum(dim=-1).mean()
        (grad,) = torch.autograd.grad(loss, theta)
        with torch.no_grad():
            theta -= lr * grad
        objective.append(loss.item())
    return theta.detach(), objective


def track_context(theta: torch.Tensor, decay: float = 0.95) -> torch.Tensor:
    """Exponential moving average along the tokens: ctx_0 = theta_0, ctx_t = decay ctx_{t-1} + (1 - decay) theta_t.
    theta [T, D] (or [B, T, D]) -> the same shape."""
    if not 0 <= decay <= 1:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    steps = theta.unbind(dim=-2)
    ctx, out = steps[0], [steps[0]]
    for t in steps[1:]:
        ctx = decay * ctx + (1 - decay) * t
        out.append(ctx)
    return torch.stack(out, dim=-2)


def uncertainty(theta: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """var(theta_t - ctx_t) over the coordinate dims: [..., D] -> [...]."""
    return (theta - context).var(dim=-1, unbiased=False)


def nucleus_sample(logits: torch.Tensor, top_p: float, generator: torch.Generator | None = None) -> int:
    """Sample from the smallest set of tokens whose probabilities sum to >= top_p. logits [V] -> a token id."""
    probs = torch.softmax(logits.float(), dim=-1)
    sorted_p, order = probs.sort(descending=True)
    keep = sorted_p.cumsum(0) - sorted_p < top_p                               # the first token always stays
    kept = sorted_p * keep
    return int(order[torch.multinomial(kept / kept.sum(), 1, generator=generator)])


def choose_token(logits: torch.Tensor, unc: float, threshold: float, top_p: float = 0.92,
                 generator: torch.Generator | None = None) -> tuple[int, str]:
    """The write-up's adaptive decoding: uncertainty above `threshold` -> nucleus sample (top_p), else greedy."""
    if unc > threshold:
        return nucleus_sample(logits, top_p, generator), "nucleus"
    return int(logits.argmax()), "greedy"


# ----------------------------------------------------------------------------
# The generator API: generate with context tracking and adaptive decoding; statistics; interpolation
# ----------------------------------------------------------------------------

@dataclass
class Generation:
    """What `generate` did, token by token (n = new tokens)."""
    tokens: list[int]            # the prompt followed by the n new tokens
    new_tokens: list[int]        # the n new tokens
    modes: list[str]             # "greedy" or "nucleus" for each new token ("fixed" when theta was given)
    uncertainty: list[float]     # var(theta_t - ctx_t) at each decision
    theta: torch.Tensor          # [n, D] the predicted coordinate at each decision
    context: torch.Tensor        # [n, D] the tracked (EMA) coordinate at each decision

    @property
    def text(self) -> str:
        return bytes(t % 256 for t in self.new_tokens).decode("utf-8", errors="replace")


def _check_prompt(model: GeometricLM, prompt) -> torch.Tensor:
    prompt = torch.as_tensor(prompt)
    if prompt.dim() != 1 or prompt.numel() < 1 or prompt.dtype not in (torch.int64, torch.int32, torch.uint8):
        raise ValueError(f"prompt must be a non-empty 1-D tensor of token ids, got {prompt.dtype} "
                         f"{list(prompt.shape)}")
    return prompt.long()


@torch.no_grad()
def generate(model: GeometricLM, prompt, max_new_tokens: int, threshold: float = float("inf"), top_p: float = 0.92,
             decay: float = 0.95, use_context: bool = True, theta: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> Generation:
    """Continue `prompt` ([T] token ids) by `max_new_tokens`, the write-up's way.

    At every step the predictor proposes theta_t for each position; the context ctx_t is their EMA
    (`track_context`, decay 0.95). With use_context the model runs at the context coordinates (the
    write-up's "coordinates drift smoothly during generation"), else at the proposals. The next token
    is greedy when var(theta_t - ctx_t) <= threshold and nucleus-sampled (top_p) above it; the default
    threshold (infinity) is always greedy. Given `theta` ([D]), every position runs at that one
    coordinate and decoding is greedy: what the explorer shows.
    The context is recomputed from the whole window each step (no cache): simple, fine for short runs;
    only the last max_seq_len tokens are seen."""
    prompt = _check_prompt(model, prompt)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if theta is not None and tuple(theta.shape) != (model.cfg.coord_dim,):
        raise ValueError(f"theta must be [D] = [{model.cfg.coord_dim}], got {list(theta.shape)}")
    was_training = model.training
    model.eval()
    device = model.directions.device
    tokens = prompt.tolist()
    modes, unc, thetas, contexts = [], [], [], []
    for _ in range(max_new_tokens):
        window = torch.tensor(tokens[-model.cfg.max_seq_len:], device=device)[None]
        if theta is not None:
            logits, _ = model(window, theta=theta.to(device))
            token, mode, u, proposal, ctx = int(logits[0, -1].argmax()), "fixed", 0.0, theta, theta
        else:
            proposals = model.predictor(model.embed(window))                        # [1, T, D]
            context = track_context(proposals, decay)
            logits, _ = model(window, theta=context if use_context else proposals)
            proposal, ctx = proposals[0, -1], context[0, -1]
            u = uncertainty(proposal, ctx).item()
            token, mode = choose_token(logits[0, -1], u, threshold, top_p, generator)
        tokens.append(token)
        modes.append(mode)
        unc.append(u)
        thetas.append(proposal.detach().cpu())      # cpu-ok: collected for statistics and plots
        contexts.append(ctx.detach().cpu())         # cpu-ok: collected for statistics and plots
    model.train(was_training)
    D = model.cfg.coord_dim
    return Generation(tokens, tokens[len(prompt):], modes, unc,
                      torch.stack(thetas) if thetas else torch.empty(0, D),
                      torch.stack(contexts) if contexts else torch.empty(0, D))


@torch.no_grad()
def coordinate_statistics(model: GeometricLM, idx: torch.Tensor, decay: float = 0.95) -> dict:
    """What the predictor does with a batch idx [B, T]: the numbers the write-up's `--analyze-coordinates`
    promises, each a float: mean ||theta_t||, mean per-dimension spread across the batch, mean token-to-token
    drift ||theta_t - theta_{t-1}||, mean and 90th-percentile uncertainty var(theta_t - ctx_t), and the
    mean wavelet phase spread (std of theta . c_i: near 0 the cos/sin terms barely move)."""
    check_token_ids("coordinate_statistics", idx, model.cfg.max_seq_len, model.cfg.vocab_size)
    theta = model.predictor(model.embed(idx))                                       # [B, T, D]
    u = uncertainty(theta, track_context(theta, decay)).flatten()
    drift = (theta[:, 1:] - theta[:, :-1]).norm(dim=-1) if idx.shape[1] > 1 else theta.new_zeros(1)
    return {"theta_norm": theta.norm(dim=-1).mean().item(),
            "spread_per_dim": theta.flatten(0, 1).std(dim=0, unbiased=False).mean().item(),
            "drift": drift.mean().item(),
            "uncertainty_mean": u.mean().item(), "uncertainty_p90": u.quantile(0.9).item(),
            "phase_std": (theta @ model.directions.T).std(unbiased=False).item()}


def interpolate(theta_a: torch.Tensor, theta_b: torch.Tensor, alpha: float) -> torch.Tensor:
    """(1 - alpha) theta_a + alpha theta_b: the straight path between two coordinates (alpha in [0, 1];
    outside it extrapolates, which the explorer allows on purpose)."""
    if theta_a.shape != theta_b.shape:
        raise ValueError(f"interpolate: coordinates differ in shape, {list(theta_a.shape)} vs {list(theta_b.shape)}")
    return torch.lerp(theta_a, theta_b, float(alpha))


@torch.no_grad()
def layer_energies(model: GeometricLM, theta: torch.Tensor) -> torch.Tensor:
    """How much coordinate theta ([D]) changes each layer: the root of the summed ||W_eff - W_base||_F^2 of
    the layer's modulated projections. -> [n_layers] (zeros where a layer has none)."""
    cos, sin = model.coefficients(theta)
    out = []
    for block in model.blocks:
        sq = [layer.energy(cos, sin).square() for layer in block.proj.values() if isinstance(layer, ModulatedLinear)]
        out.append(torch.stack(sq).sum().sqrt() if sq else theta.new_zeros(()))
    return torch.stack(out)
