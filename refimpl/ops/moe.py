"""Mixture-of-experts dispatch and combine: group token copies by expert, then sum them back.

Papers: Shazeer et al. 2017, "Outrageously Large Neural Networks", arXiv:1701.06538; Fedus et al.
2021, "Switch Transformers", arXiv:2101.03961.

    dispatch   x_sorted = the k copies of every token, ordered by the expert each copy goes to
    combine    y_n = sum_j weight_nj * expert_out[slot_nj]

Shapes: dispatch x [N, C], expert_index [N, k] -> (x_sorted [N*k, C], offsets [E + 1], slot [N, k]);
        combine expert_out [N*k, C], slot [N, k], weight [N, k] -> y [N, C].

Glossary: N tokens (B * T flattened), C width, E experts, k experts chosen per token.

Does not include: the router or the experts themselves (`refimpl.blocks.ExpertPool`), capacity limits
or token dropping (every copy is kept).
"""

from __future__ import annotations

import torch

from refimpl.ops.contract import expect_float, fail


def check_moe_dispatch_args(x, expert_index, n_experts: int):
    """Validate dispatch arguments; return (N, C, k)."""
    expect_float("x", x)
    if x.dim() != 2:
        fail(f"moe_dispatch: x must be 2-D [N, C], got shape {list(x.shape)}")
    if x.shape[0] < 1:
        fail("moe_dispatch: x must hold at least one token (N >= 1)")
    if not isinstance(expert_index, torch.Tensor) or expert_index.dtype not in (torch.int32, torch.int64):
        fail("moe_dispatch: expert_index must be an int32/int64 tensor [N, k]")
    if expert_index.dim() != 2 or expert_index.shape[0] != x.shape[0] or expert_index.shape[1] < 1:
        fail(f"moe_dispatch: expert_index must be [N, k] with N = {x.shape[0]} and k >= 1, got {list(expert_index.shape)}")
    if x.shape[1] < 1:
        fail("moe_dispatch: x must have width C >= 1")
    if isinstance(n_experts, bool) or not isinstance(n_experts, int) or n_experts < 1:
        fail(f"moe_dispatch: n_experts must be a positive int, got {n_experts!r}")
    if expert_index.numel() and (expert_index.min() < 0 or expert_index.max() >= n_experts):
        fail(f"moe_dispatch: expert_index values must lie in [0, {n_experts}), "
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
    expect_float("expert_out", expert_out)
    expect_float("weight", weight)
    if expert_out.dim() != 2:
        fail(f"moe_combine: expert_out must be 2-D [N*k, C], got shape {list(expert_out.shape)}")
    if weight.dim() != 2:
        fail(f"moe_combine: weight must be 2-D [N, k], got shape {list(weight.shape)}")
    N, k = weight.shape
    if N < 1 or k < 1 or expert_out.shape[1] < 1:
        fail(f"moe_combine: need N, k, C >= 1, got weight {list(weight.shape)} and expert_out {list(expert_out.shape)}")
    if not isinstance(slot, torch.Tensor) or slot.dtype not in (torch.int32, torch.int64) or tuple(slot.shape) != (N, k):
        fail(f"moe_combine: slot must be an int tensor of shape [N, k] = [{N}, {k}]")
    if expert_out.shape[0] != N * k:
        fail(f"moe_combine: expert_out must have N*k = {N * k} rows, got {expert_out.shape[0]}")
    if slot.numel() and (slot.min() < 0 or slot.max() >= N * k):
        fail(f"moe_combine: slot values must lie in [0, {N * k})")
    return N, expert_out.shape[1], k


def moe_combine(expert_out: torch.Tensor, slot: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted sum of each token's expert outputs: y[n] = sum_j weight[n, j] * expert_out[slot[n, j]].

    expert_out: [N*k, C], slot: [N, k], weight: [N, k] -> y: [N, C]
    """
    check_moe_combine_args(expert_out, slot, weight)
    picked = expert_out[slot.long()]                             # [N, k, C]
    return (picked * weight.to(expert_out.dtype).unsqueeze(-1)).sum(dim=1)  # [N, C]
