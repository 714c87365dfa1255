"""Softmax attention with grouped key/value heads, causal, with an optional sliding window.

Papers: Vaswani et al. 2017, "Attention Is All You Need", arXiv:1706.03762; grouped-query
attention: Ainslie et al. 2023, "GQA", arXiv:2305.13245; the sliding window: Beltagy et al.
2020, "Longformer", arXiv:2004.05150.

    out_h = softmax(scale * q_h k_g^T + mask) v_g,      g = h // (H / G),   scale = 1 / sqrt(D)

where the mask is -inf wherever query t may not see key s (the future, or further back than the window).

Shapes: q [B, T, H, D], k and v [B, S, G, D] -> out [B, T, H, D]. Queries are the last T of the S positions.

Glossary
    B  batch size      T  query length (tokens in this call)     S  key/value length
    H  query heads     G  key/value heads (H % G == 0)           D  head dimension
    W  window: a query sees itself and the W - 1 keys before it

Does not include: the projections around it (the layers' job), dropout, or anything fast (the kernels').
"""

from __future__ import annotations

import math

import torch

from refimpl.ops.contract import Contract, at_least_fp32, fail


ATTENTION = Contract("attention", q="B T H D", k="B S G D", v="B S G D")


def check_attention_args(q, k, v, causal: bool, window: int | None):
    """Validate attention arguments; return (B, T, H, S, G, D)."""
    B, T, H, D, S, G = ATTENTION.check(q=q, k=k, v=v)
    if H % G != 0:
        fail(f"attention: query heads H={H} must be a multiple of key/value heads G={G}")
    if causal and T > S:
        fail(f"attention: causal attention needs T <= S (queries are the last T positions), got T={T}, S={S}")
    if window is not None:
        if not causal:
            fail("attention: a sliding window is only defined for causal attention")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            fail(f"attention: window must be a positive int (or None for full attention), got {window!r}")
    return B, T, H, S, G, D


def attention_mask(T: int, S: int, causal: bool, window: int | None, device=None) -> torch.Tensor:
    """Boolean [T, S]: True where query t may attend to key s.

    Query t sits at absolute position S - T + t (the last T of S positions), which
    is what a KV cache needs: the new tokens follow everything already cached.
    """
    pos_q = torch.arange(S - T, S, device=device)[:, None]  # [T, 1]
    pos_k = torch.arange(S, device=device)[None, :]         # [1, S]
    allowed = torch.ones(T, S, dtype=torch.bool, device=device)
    if causal:
        allowed &= pos_k <= pos_q
    if window is not None:
        allowed &= pos_k > pos_q - window
    return allowed


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
              window: int | None = None, scale: float | None = None) -> torch.Tensor:
    """Softmax attention with grouped key/value heads, the textbook way.

    q: [B, T, H, D], k and v: [B, S, G, D] -> out: [B, T, H, D].
    Query head h reads key/value head h // (H // G). Queries are the last T of
    the S positions. `window=W` lets a query see only itself and W - 1 keys back.
    """
    B, T, H, S, G, D = check_attention_args(q, k, v, causal, window)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    group = H // G
    k = k.repeat_interleave(group, dim=2)                      # [B, S, H, D]
    v = v.repeat_interleave(group, dim=2)                      # [B, S, H, D]
    scores = torch.einsum("bthd,bshd->bhts", q, k) * scale     # [B, H, T, S]
    allowed = attention_mask(T, S, causal, window, device=q.device)
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(at_least_fp32(scores), dim=-1).to(q.dtype)  # [B, H, T, S]
    return torch.einsum("bhts,bshd->bthd", probs, v)           # [B, T, H, D]
