"""Shared building blocks: RMSNorm, RoPE, SwiGLU, grouped-query attention with a
KV cache, and a top-k mixture of experts. Every chapter imports these; none
copies them.

Papers
    RMSNorm   Zhang & Sennrich 2019, "Root Mean Square Layer Normalization", arXiv:1910.07467
    RoPE      Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary Position Embedding", arXiv:2104.09864
    SwiGLU    Shazeer 2020, "GLU Variants Improve Transformer", arXiv:2002.05202
    GQA       Ainslie et al. 2023, "GQA: Training Generalized Multi-Query Transformer Models", arXiv:2305.13245
    MoE       Shazeer et al. 2017, arXiv:1701.06538; Fedus et al. 2021, "Switch Transformers", arXiv:2101.03961

Glossary: the shape letters of `refimpl.ops` (B, T, S, C, H, G, D, E, k, N, W), plus
    F  hidden width of a feed-forward block

The heavy lifting is done by `refimpl.ops`, called through the module so that
`kernels.use(...)` can swap it. Does not include: fused or fast paths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from refimpl import ops


def config_from_preset(cls, presets: dict, name: str, overrides: dict):
    """`cls(**presets[name], **overrides)`, with sizes derived in __post_init__ derived again from the overrides."""
    if name not in presets:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(presets)}")
    return cls(**{**presets[name], **overrides})


def init_lm_weights(model: nn.Module, std: float = 0.02) -> None:
    """GPT-2-style initialisation: every Linear and Embedding weight ~ N(0, std^2) (children first, as nn.Module.apply)."""
    def init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
    model.apply(init)


def count_parameters(model: nn.Module) -> int:
    """Every parameter once (tied weights count once)."""
    return sum(p.numel() for p in model.parameters())


def one_dtype(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """The inputs of a recurrence cast to the widest dtype among them (None passes through). Under bf16
    autocast a layer's projections come out bfloat16 while its gates and parameters stay float32; a state
    summed over many tokens is kept in the wider one, as fused scan kernels keep theirs in float32."""
    dtypes = [t.dtype for t in tensors if t is not None]
    wide = dtypes[0]
    for dtype in dtypes[1:]:
        wide = torch.promote_types(wide, dtype)
    return tuple(t.to(wide) if t is not None else None for t in tensors)


class RMSNorm(nn.Module):
    """Learned-scale RMS normalisation over the last dimension (eps 1e-6 by default)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        if dim < 1:
            raise ValueError(f"RMSNorm: dim must be >= 1, got {dim}")
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., C] -> [..., C]
        if x.dtype == self.weight.dtype:
            return ops.rms_norm(x, self.weight, self.eps)
        # under bf16 autocast x may be bfloat16 while the weight stays float32: normalise in the wider of
        # the two (the mean of squares is where bf16 loses most), hand back x's dtype
        wide = torch.promote_types(x.dtype, self.weight.dtype)
        return ops.rms_norm(x.to(wide), self.weight.to(wide), self.eps).to(x.dtype)


# ----------------------------------------------------------------------------
# Rotary position embedding
# ----------------------------------------------------------------------------

def rope_tables(positions: torch.Tensor, head_dim: int, base: float = 10000.0, dtype=torch.float32):
    """cos and sin tables for the given absolute positions.

    positions: [T] (int) -> cos, sin: [T, D/2] in `dtype` (fp32, or fp64 for an fp64 model).
    Pair i of a head rotates by angle position * base^(-2i/D).
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dimension, got {head_dim}")
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=dtype) / head_dim)
    angles = positions.to(dtype)[:, None] * inv_freq[None, :]  # [T, D/2]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of each head as complex pairs (the "rotate half" layout).

    x: [B, T, H, D], cos/sin: [T, D/2] -> [B, T, H, D]
    """
    if x.dim() != 4 or cos.shape != (x.shape[1], x.shape[3] // 2):
        raise ValueError(f"apply_rope: expected x [B, T, H, D] and tables [T, D/2], got {list(x.shape)} and {list(cos.shape)}")
    compute = torch.promote_types(x.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
    x1, x2 = x.to(compute).chunk(2, dim=-1)               # [B, T, H, D/2] each
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return rotated.to(x.dtype)


# ----------------------------------------------------------------------------
# Feed-forward
# ----------------------------------------------------------------------------

class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): the gated feed-forward of Llama."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., C] -> [..., C]
        return self.down(F.silu(self.gate(x)) * self.up(x))  # via [..., F]


# ----------------------------------------------------------------------------
# Grouped-query attention with RoPE, optional sliding window, and a KV cache
# ----------------------------------------------------------------------------

@dataclass
class KVCache:
    """Keys and values seen so far by one attention layer, for token-by-token decoding.

    `seen` counts every token ever appended (it sets RoPE positions); with a
    sliding window only the last `window` keys are kept, so memory stays bounded.
    """
    k: torch.Tensor | None = None  # [B, S, G, D]
    v: torch.Tensor | None = None  # [B, S, G, D]
    seen: int = 0

    def append(self, k: torch.Tensor, v: torch.Tensor, window: int | None):
        if self.k is None:
            self.k, self.v = k, v
        else:
            self.k = torch.cat([self.k, k], dim=1)  # [B, S + T, G, D]
            self.v = torch.cat([self.v, v], dim=1)
        self.seen += k.shape[1]
        keys, values = self.k, self.v
        if window is not None and self.k.shape[1] > window:
            self.k, self.v = self.k[:, -window:], self.v[:, -window:]
        return keys, values


class GroupedQueryAttention(nn.Module):
    """Causal attention with H query heads sharing G key/value heads, RoPE on q and k."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, window: int | None = None,
                 rope_base: float = 10000.0, head_dim: int | None = None):
        super().__init__()
        if n_heads < 1 or n_kv_heads < 1 or n_heads % n_kv_heads:
            raise ValueError(f"GQA: n_heads={n_heads} must be a positive multiple of n_kv_heads={n_kv_heads}")
        if head_dim is None and dim % n_heads:
            raise ValueError(f"GQA: dim={dim} must be divisible by n_heads={n_heads} (or pass head_dim)")
        if window is not None and window < 1:
            raise ValueError(f"GQA: window must be >= 1 or None, got {window}")
        self.n_heads, self.n_kv_heads, self.window = n_heads, n_kv_heads, window
        self.head_dim = head_dim or dim // n_heads
        self.rope_base = rope_base
        self.q_proj = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * self.head_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        H, G, D = self.n_heads, self.n_kv_heads, self.head_dim
        q = self.q_proj(x).view(B, T, H, D)  # [B, T, H, D]
        k = self.k_proj(x).view(B, T, G, D)  # [B, T, G, D]
        v = self.v_proj(x).view(B, T, G, D)  # [B, T, G, D]
        start = cache.seen if cache is not None else 0
        cos, sin = rope_tables(torch.arange(start, start + T, device=x.device), D, self.rope_base,
                               dtype=torch.promote_types(x.dtype, torch.float32))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.append(k, v, self.window)  # [B, S, G, D], S = kept history + T
        y = ops.attention(q, k, v, causal=True, window=self.window)  # [B, T, H, D]
        return self.o_proj(y.reshape(B, T, H * D))                   # [B, T, C]


# ----------------------------------------------------------------------------
# Top-k mixture of experts
# ----------------------------------------------------------------------------

def load_balancing_loss(probs: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """Switch-style E * sum_e f_e * P_e: probs [N, E] router probabilities, tokens_per_expert [E] copies routed.

    f_e (the share of copies sent to e) carries no gradient; P_e (the mean probability of e) does,
    so minimising it pushes probability away from overloaded experts. It is 1 when routing is uniform.
    """
    share = tokens_per_expert.float() / tokens_per_expert.sum()
    return probs.shape[-1] * (share * probs.mean(dim=0)).sum()


def capacity_overflow(tokens_per_expert: torch.Tensor, n_tokens: int, top_k: int,
                      capacity_factor: float) -> torch.Tensor:
    """Token copies a capacity-bound router would drop: each of the E experts takes at most
    ceil(capacity_factor * N * k / E) copies, and the copies past that are not computed.

    tokens_per_expert [E] (copies routed to each expert) -> a 0-d tensor, the copies over capacity. The book's MoE
    layers are dropless (every copy is computed, `ExpertPool`); this measures what a capacity would have cost.
    """
    if capacity_factor <= 0:
        raise ValueError(f"capacity_overflow: capacity_factor must be > 0, got {capacity_factor}")
    capacity = math.ceil(capacity_factor * n_tokens * top_k / tokens_per_expert.numel())
    return (tokens_per_expert - capacity).clamp(min=0).sum()


class ExpertPool(nn.Module):
    """E SwiGLU experts. Given each token's chosen experts and their weights, it runs every expert on
    the tokens that chose it (grouped by `ops.moe_dispatch`) and mixes the results (`ops.moe_combine`)."""

    def __init__(self, dim: int, hidden: int, n_experts: int):
        super().__init__()
        if min(dim, hidden, n_experts) < 1:
            raise ValueError(f"ExpertPool: dim, hidden, n_experts must be >= 1, got {dim}, {hidden}, {n_experts}")
        self.n_experts = n_experts
        scale_in, scale_hidden = dim ** -0.5, hidden ** -0.5
        self.w_gate = nn.Parameter(torch.randn(n_experts, dim, hidden) * scale_in)       # [E, C, F]
        self.w_up = nn.Parameter(torch.randn(n_experts, dim, hidden) * scale_in)         # [E, C, F]
        self.w_down = nn.Parameter(torch.randn(n_experts, hidden, dim) * scale_hidden)   # [E, F, C]

    def forward(self, x: torch.Tensor, top_i: torch.Tensor, top_w: torch.Tensor):
        """x [N, C], top_i [N, k], top_w [N, k] -> (y [N, C], token copies per expert [E])."""
        x_sorted, offsets, slot = ops.moe_dispatch(x, top_i, self.n_experts)  # [N*k, C], [E+1], [N, k]
        out_sorted = torch.empty_like(x_sorted)
        bounds = offsets.tolist()
        for e in range(self.n_experts):
            lo, hi = bounds[e], bounds[e + 1]
            if hi > lo:
                h = F.silu(x_sorted[lo:hi] @ self.w_gate[e]) * (x_sorted[lo:hi] @ self.w_up[e])  # [n_e, F]
                out_sorted[lo:hi] = h @ self.w_down[e]                                         # [n_e, C]
        y = ops.moe_combine(out_sorted, slot, top_w.to(x.dtype))        # [N, C]
        return y, torch.diff(offsets)


class TopKMoE(nn.Module):
    """A softmax router picks k of E SwiGLU experts per token; their outputs are
    mixed with the router's probabilities renormalised over the chosen k.

    After each forward, `aux_loss` holds the load-balancing loss (`load_balancing_loss`)
    and `last_stats` the expert utilisation, as plain tensors a notebook can plot.
    """

    def __init__(self, dim: int, hidden: int, n_experts: int, top_k: int):
        super().__init__()
        if n_experts < 1:
            raise ValueError(f"TopKMoE: n_experts must be >= 1, got {n_experts}")
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"TopKMoE: top_k must be in [1, n_experts={n_experts}], got {top_k}")
        self.n_experts, self.top_k = n_experts, top_k
        self.router = nn.Linear(dim, n_experts, bias=False)
        self.experts = ExpertPool(dim, hidden, n_experts)
        self.aux_loss = torch.zeros(())
        self.last_stats: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])                                    # [N, C]
        probs = torch.softmax(self.router(x).float(), dim=-1)           # [N, E]
        top_p, top_i = probs.topk(self.top_k, dim=-1)                   # [N, k] each
        top_w = top_p / top_p.sum(dim=-1, keepdim=True)                 # renormalise over the chosen k
        y, counts = self.experts(x, top_i, top_w)                       # [N, C], [E]
        self.aux_loss = load_balancing_loss(probs, counts)
        self.last_stats = {"tokens_per_expert": counts.float().detach(), "mean_router_prob": probs.mean(0).detach()}
        return y.view(shape)


def check_token_ids(model: str, idx: torch.Tensor, max_seq_len: int, vocab_size: int | None = None) -> None:
    """What every language model of the book checks first: idx is an int tensor [B, T] with 1 <= T <= max_seq_len
    and, given vocab_size, every id in [0, vocab_size) (an id past the table would fail deep inside the embedding)."""
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{model} expects idx as an int tensor [B, T], got "
                         f"{getattr(idx, 'dtype', type(idx).__name__)} {list(getattr(idx, 'shape', []))}")
    if idx.shape[0] < 1 or idx.shape[1] < 1:
        raise ValueError(f"{model} expects at least one sequence of at least one token, got idx {list(idx.shape)}")
    if idx.shape[1] > max_seq_len:
        raise ValueError(f"sequence of {idx.shape[1]} tokens is longer than max_seq_len={max_seq_len}")
    if vocab_size is not None:
        low, high = int(idx.min()), int(idx.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(f"{model}: token ids must be in [0, {vocab_size}), got ids from {low} to {high}")


def check_targets(model: str, targets: torch.Tensor, idx: torch.Tensor, vocab_size: int) -> None:
    """Targets are an int tensor of idx's shape [B, T], every id in [0, vocab_size). The book's models score every
    position, so -100 (PyTorch's ignore index, which F.cross_entropy would drop without a word) is refused."""
    if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int32, torch.int64) \
            or tuple(targets.shape) != tuple(idx.shape):
        raise ValueError(f"{model} expects targets as an int tensor of idx's shape {list(idx.shape)}, got "
                         f"{getattr(targets, 'dtype', type(targets).__name__)} {list(getattr(targets, 'shape', []))}")
    low, high = int(targets.min()), int(targets.max())
    if low == -100:
        raise ValueError(f"{model}: targets hold -100, PyTorch's ignore index; this model scores every position "
                         "and takes no ignore index, so mask the loss yourself instead")
    if low < 0 or high >= vocab_size:
        raise ValueError(f"{model}: target ids must be in [0, {vocab_size}), got ids from {low} to {high}")
