"""The ops a kernel may replace: plain PyTorch, written to be read.

Every model in the book calls these through the module, `ops.rms_norm(...)`,
never through a from-import. That one habit is what lets
`with kernels.use("numba"): model(x)` rebind the names for the length of the
block while refimpl itself never imports a kernel.

Each op checks its arguments first (the `check_*` functions, which the kernels
reuse) and raises `ValueError` naming the shape it expected.

Glossary (shape letters used in comments throughout the book)
    B  batch size                 T  query length (tokens in this call)
    S  key/value length           C  model width (d_model)
    H  query heads                G  key/value heads (H % G == 0; H / G queries share one KV head)
    D  head dimension             E  number of experts
    k  experts chosen per token   N  tokens (B * T flattened)
    W  sliding-window length: a query sees itself and the W - 1 keys before it

Does not include: anything fast. That is the kernels' job.
"""

from __future__ import annotations

import math

import torch


def _fail(message: str) -> None:
    raise ValueError(message)


def _expect_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        _fail(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        _fail(f"{name} must be a floating-point tensor, got {t.dtype}")


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors are promoted for reductions; fp32 and fp64 stay as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


# ----------------------------------------------------------------------------
# RMSNorm  (Zhang & Sennrich 2019, "Root Mean Square Layer Normalization", arXiv:1910.07467)
# ----------------------------------------------------------------------------

def check_rms_norm_args(x: torch.Tensor, weight: torch.Tensor, eps: float) -> int:
    """Validate RMSNorm arguments; return the normalised width C."""
    _expect_float("x", x)
    _expect_float("weight", weight)
    if x.dim() < 1 or x.shape[-1] < 1:
        _fail(f"rms_norm: x must be [..., C] with C >= 1, got shape {list(x.shape)}")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        _fail(f"rms_norm: weight must have shape [C] = [{x.shape[-1]}], got {list(weight.shape)}")
    if not (eps > 0 and math.isfinite(eps)):
        _fail(f"rms_norm: eps must be a positive finite number, got {eps}")
    return x.shape[-1]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * weight, over the last dimension.

    x: [..., C], weight: [C] -> y: [..., C] (x's dtype; the mean is taken in fp32 or better).
    """
    check_rms_norm_args(x, weight, eps)
    xf = _at_least_fp32(x)
    inv_rms = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)  # [..., 1]
    return (xf * inv_rms * weight).to(x.dtype)


# ----------------------------------------------------------------------------
# Grouped-query attention (Ainslie et al. 2023, "GQA", arXiv:2305.13245),
# causal, with an optional sliding window (Beltagy et al. 2020, arXiv:2004.05150)
# ----------------------------------------------------------------------------

def check_attention_args(q, k, v, causal: bool, window: int | None):
    """Validate attention arguments; return (B, T, H, S, G, D)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _expect_float(name, t)
        if t.dim() != 4:
            _fail(f"attention: {name} must be 4-D [B, T|S, heads, D], got shape {list(t.shape)}")
    B, T, H, D = q.shape
    Bk, S, G, Dk = k.shape
    if k.shape != v.shape:
        _fail(f"attention: k and v must have the same shape, got {list(k.shape)} and {list(v.shape)}")
    if Bk != B or Dk != D:
        _fail(f"attention: k must be [B, S, G, D] = [{B}, S, G, {D}], got {list(k.shape)}")
    if min(B, T, H, D) < 1 or S < 1:
        _fail(f"attention: every size must be >= 1, got q {list(q.shape)} and k {list(k.shape)}")
    if G == 0 or H % G != 0:
        _fail(f"attention: query heads H={H} must be a multiple of key/value heads G={G}")
    if causal and T > S:
        _fail(f"attention: causal attention needs T <= S (queries are the last T positions), got T={T}, S={S}")
    if window is not None:
        if not causal:
            _fail("attention: a sliding window is only defined for causal attention")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            _fail(f"attention: window must be a positive int (or None for full attention), got {window!r}")
    if not (q.dtype == k.dtype == v.dtype):
        _fail(f"attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
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
    probs = torch.softmax(_at_least_fp32(scores), dim=-1).to(q.dtype)  # [B, H, T, S]
    return torch.einsum("bhts,bshd->bthd", probs, v)           # [B, T, H, D]


# ----------------------------------------------------------------------------
# Mixture-of-experts dispatch and combine (Shazeer et al. 2017, arXiv:1701.06538;
# Fedus et al. 2021, "Switch Transformers", arXiv:2101.03961)
# ----------------------------------------------------------------------------

def check_moe_dispatch_args(x, expert_index, n_experts: int):
    """Validate dispatch arguments; return (N, C, k)."""
    _expect_float("x", x)
    if x.dim() != 2:
        _fail(f"moe_dispatch: x must be 2-D [N, C], got shape {list(x.shape)}")
    if x.shape[0] < 1:
        _fail("moe_dispatch: x must hold at least one token (N >= 1)")
    if not isinstance(expert_index, torch.Tensor) or expert_index.dtype not in (torch.int32, torch.int64):
        _fail("moe_dispatch: expert_index must be an int32/int64 tensor [N, k]")
    if expert_index.dim() != 2 or expert_index.shape[0] != x.shape[0] or expert_index.shape[1] < 1:
        _fail(f"moe_dispatch: expert_index must be [N, k] with N = {x.shape[0]} and k >= 1, got {list(expert_index.shape)}")
    if x.shape[1] < 1:
        _fail("moe_dispatch: x must have width C >= 1")
    if isinstance(n_experts, bool) or not isinstance(n_experts, int) or n_experts < 1:
        _fail(f"moe_dispatch: n_experts must be a positive int, got {n_experts!r}")
    if expert_index.numel() and (expert_index.min() < 0 or expert_index.max() >= n_experts):
        _fail(f"moe_dispatch: expert_index values must lie in [0, {n_experts}), "
              f"got range [{int(expert_index.min())}, {int(expert_index.max())}]")
    return x.shape[0], x.shape[1], expert_index.shape[1]


def moe_dispatch(x: torch.Tensor, expert_index: torch.Tensor, n_experts: int):
    """Group token copies by expert so each expert reads one contiguous slice.

    x: [N, C], expert_index: [N, k] (the k experts each token chose) ->
      x_sorted: [N*k, C]  rows ordered by expert, and by token within an expert
      offsets:  [E + 1]   int64; expert e owns rows offsets[e]:offsets[e+1]
      slot:     [N, k]    int64; row of x_sorted holding token n's j-th copy
    """
    N, C, k = check_moe_dispatch_args(x, expert_index, n_experts)
    flat = expert_index.reshape(-1).long()                       # [N*k]
    order = torch.argsort(flat, stable=True)                     # [N*k] copy ids, grouped by expert
    x_sorted = x[order // k]                                     # [N*k, C]
    counts = torch.bincount(flat, minlength=n_experts)           # [E]
    offsets = torch.zeros(n_experts + 1, dtype=torch.int64, device=x.device)
    offsets[1:] = torch.cumsum(counts, dim=0)                    # [E + 1]
    slot = torch.empty_like(order)
    slot[order] = torch.arange(N * k, device=x.device)           # invert the permutation
    return x_sorted, offsets, slot.view(N, k)


def check_moe_combine_args(expert_out, slot, weight):
    """Validate combine arguments; return (N, C, k)."""
    _expect_float("expert_out", expert_out)
    _expect_float("weight", weight)
    if expert_out.dim() != 2:
        _fail(f"moe_combine: expert_out must be 2-D [N*k, C], got shape {list(expert_out.shape)}")
    if weight.dim() != 2:
        _fail(f"moe_combine: weight must be 2-D [N, k], got shape {list(weight.shape)}")
    N, k = weight.shape
    if N < 1 or k < 1 or expert_out.shape[1] < 1:
        _fail(f"moe_combine: need N, k, C >= 1, got weight {list(weight.shape)} and expert_out {list(expert_out.shape)}")
    if not isinstance(slot, torch.Tensor) or slot.dtype not in (torch.int32, torch.int64) or tuple(slot.shape) != (N, k):
        _fail(f"moe_combine: slot must be an int tensor of shape [N, k] = [{N}, {k}]")
    if expert_out.shape[0] != N * k:
        _fail(f"moe_combine: expert_out must have N*k = {N * k} rows, got {expert_out.shape[0]}")
    if slot.numel() and (slot.min() < 0 or slot.max() >= N * k):
        _fail(f"moe_combine: slot values must lie in [0, {N * k})")
    return N, expert_out.shape[1], k


def moe_combine(expert_out: torch.Tensor, slot: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted sum of each token's expert outputs: y[n] = sum_j weight[n, j] * expert_out[slot[n, j]].

    expert_out: [N*k, C], slot: [N, k], weight: [N, k] -> y: [N, C]
    """
    check_moe_combine_args(expert_out, slot, weight)
    picked = expert_out[slot.long()]                             # [N, k, C]
    return (picked * weight.to(expert_out.dtype).unsqueeze(-1)).sum(dim=1)  # [N, C]

