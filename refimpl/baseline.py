"""The baseline: a plain Llama-style byte-level language model.

Every chapter trains its architecture against this model at an equal
parameter count and step budget, so "better" always means "better than a
well-understood transformer of the same size on the same bytes".

Papers: Touvron et al. 2023, "LLaMA", arXiv:2302.13971 (pre-norm RMSNorm,
SwiGLU, RoPE), plus the blocks of `refimpl.blocks`.

Glossary: B batch, T tokens, C d_model, V vocabulary (256 bytes); the rest as in `refimpl.ops`.

Does not include: dropout schedules, weight tying options beyond on/off, or
anything fast. Kernels replace `refimpl.ops`, not this file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from refimpl.blocks import (GroupedQueryAttention, KVCache, RMSNorm, SwiGLU, TopKMoE, check_targets,
                            check_token_ids, config_from_preset, count_parameters, init_lm_weights)
from refimpl.config import check_fields, flag, number, whole


@dataclass
class BaselineConfig:
    vocab_size: int = 256            # V: bytes
    d_model: int = 128               # C: residual width
    n_layers: int = 4                # transformer blocks
    n_heads: int = 4                 # H: query heads
    n_kv_heads: int = 2              # G: key/value heads (GQA); = n_heads gives plain multi-head attention
    ffn_hidden: int | None = None    # F: SwiGLU hidden width; None -> 8/3 * C rounded up to a multiple of 32
    n_experts: int = 0               # E: 0 -> dense SwiGLU; >= 1 -> top-k MoE of SwiGLU experts
    top_k: int = 2                   # k: experts per token (MoE only)
    window: int | None = None        # W: sliding attention window; None -> full causal attention
    max_seq_len: int = 256           # longest sequence one forward call accepts (decoding with a cache may go on past it)
    norm_eps: float = 1e-6           # RMSNorm epsilon
    aux_loss_weight: float = 0.01    # weight of the MoE load-balancing loss in the training loss
    tie_embeddings: bool = True      # share the embedding and unembedding matrices

    RULES = {"vocab_size": whole(1), "d_model": whole(1), "n_layers": whole(1), "n_heads": whole(1),
             "n_kv_heads": whole(1), "ffn_hidden": whole(1, optional=True), "n_experts": whole(0), "top_k": whole(1),
             "window": whole(1, optional=True), "max_seq_len": whole(1), "norm_eps": number(0, low_open=True),
             "aux_loss_weight": number(0), "tie_embeddings": flag()}

    def __post_init__(self):
        check_fields(self, self.RULES)
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"head dimension d_model/n_heads={self.d_model // self.n_heads} must be even for RoPE")
        if self.n_experts and not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"top_k={self.top_k} must be in [1, n_experts={self.n_experts}]")
        if self.ffn_hidden is None:
            self.ffn_hidden = 32 * math.ceil(8 * self.d_model / 3 / 32)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def preset(cls, name: str, **overrides) -> "BaselineConfig":
        """A named size (`tiny` for tests and CI, `small` for the book on a CPU, `medium` for a GPU), optionally
        adjusted."""
        return config_from_preset(cls, PRESETS, name, overrides)


PRESETS = {  # the arguments of each named size
    "tiny": dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64),
    "small": dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=128),
    "medium": dict(d_model=384, n_layers=6, n_heads=6, n_kv_heads=2, max_seq_len=512),
}


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, cfg: BaselineConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = GroupedQueryAttention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.window)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if cfg.n_experts:
            self.ffn = TopKMoE(cfg.d_model, cfg.ffn_hidden, cfg.n_experts, cfg.top_k)
        else:
            self.ffn = SwiGLU(cfg.d_model, cfg.ffn_hidden)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cache)  # [B, T, C]
        return x + self.ffn(self.ffn_norm(x))         # [B, T, C]


class BaselineLM(nn.Module):
    """Embedding -> n_layers blocks -> RMSNorm -> unembedding. No positional table: RoPE does positions."""

    def __init__(self, cfg: BaselineConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.unembed = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.unembed.weight = self.embed.weight
        init_lm_weights(self)

    def num_parameters(self) -> int:
        return count_parameters(self)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                caches: list[KVCache] | None = None):
        """idx: [B, T] byte ids -> (logits [B, T, V], loss or None).

        The loss is next-byte cross-entropy in nats plus the weighted MoE
        load-balancing loss. Pass `caches` (one KVCache per layer) to decode
        token by token; the result equals the full forward.
        """
        check_token_ids("BaselineLM", idx, self.cfg.max_seq_len, self.cfg.vocab_size)
        if caches is not None and len(caches) != len(self.blocks):
            raise ValueError(f"need one KVCache per layer ({len(self.blocks)}), got {len(caches)}")
        x = self.embed(idx)                                          # [B, T, C]
        for i, block in enumerate(self.blocks):
            x = block(x, caches[i] if caches is not None else None)  # [B, T, C]
        logits = self.unembed(self.norm(x))                          # [B, T, V]
        loss = None
        if targets is not None:
            check_targets("BaselineLM", targets, idx, self.cfg.vocab_size)
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
            if self.cfg.n_experts:
                loss = loss + self.cfg.aux_loss_weight * sum(b.ffn.aux_loss for b in self.blocks)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample continuation bytes with a KV cache: [B, T0] -> [B, T0 + max_new_tokens]."""
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
                temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"generate: temperature must be a finite number > 0, got {temperature!r}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"generate: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        V = self.cfg.vocab_size
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= V):
            raise ValueError(f"generate: top_k must be None (sample from every token) or an int in [1, {V}], "
                             f"got {top_k!r}")
        caches = [KVCache() for _ in self.blocks]
        logits, _ = self(idx, caches=caches)
        out = [idx]
        for _ in range(max_new_tokens):
            last = logits[:, -1].float() / temperature               # [B, V]
            if top_k is not None:
                kth = last.topk(top_k, dim=-1).values[:, -1:]
                last = last.masked_fill(last < kth, float("-inf"))
            nxt = torch.multinomial(torch.softmax(last, -1), 1, generator=generator)  # [B, 1]
            out.append(nxt)
            logits, _ = self(nxt, caches=caches)
        return torch.cat(out, dim=1)


def matched_baseline(target_parameters: int, seq_len: int, n_layers: int = 4, widths=range(32, 513, 16)) -> BaselineLM:
    """The baseline whose parameter count is closest to `target_parameters`, by choosing its width
    (4 heads, 2 KV heads): the "equal-size transformer" a chapter compares its model with."""
    if target_parameters < 1:
        raise ValueError(f"matched_baseline: target_parameters must be >= 1, got {target_parameters}")

    def config(d):
        return BaselineConfig(d_model=d, n_layers=n_layers, n_heads=4, n_kv_heads=2, max_seq_len=seq_len)

    best = min(widths, key=lambda d: abs(BaselineLM(config(d)).num_parameters() - target_parameters))
    return BaselineLM(config(best))
