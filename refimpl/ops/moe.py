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

from refimpl.ops.contract import Contract, fail


MOE_DISPATCH = Contract("moe_dispatch", x="N C")
MOE_COMBINE = Contract("moe_combine", expert_out="Nk C", weight="N k")


def _check_int(op: str, name: str, t, shape: tuple[int, ...], letters: str) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int32, torch.int64):
        fail(f"{op}: {name} must be an int32/int64 tensor [{letters}]")
    if tuple(t.shape) != shape:
        fail(f"{op}: {name} must be [{letters}] = {list(shape)}, got {list(t.shape)}")


def check_moe_dispatch_args(x, expert_index, n_experts: int):
    """Validate dispatch arguments; return (N, C, k)."""
    N, C = MOE_DISPATCH.check(x=x)
    k = expert_index.shape[1] if isinstance(expert_index, torch.Tensor) and expert_index.dim() == 2 else 0
    if k < 1:
        fail(f"moe_dispatch: expert_index must be [N, k] with N = {N} and k >= 1, "
             f"got {list(getattr(expert_index, 'shape', [])) or type(expert_index).__name__}")
    _check_int("moe_dispatch", "expert_index", expert_index, (N, k), "N, k")
    if isinstance(n_experts, bool) or not isinstance(n_experts, int) or n_experts < 1:
        fail(f"moe_dispatch: n_experts must be a positive int, got {n_experts!r}")
    if expert_index.min() < 0 or expert_index.max() >= n_experts:
        fail(f"moe_dispatch: expert_index values must lie in [0, {n_experts}), "
             f"got range [{int(expert_index.min())}, {int(expert_index.max())}]")
    return N, C, k


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
    Nk, C, N, k = MOE_COMBINE.check(expert_out=expert_out, weight=weight)
    if Nk != N * k:
        fail(f"moe_combine: expert_out must have N*k = {N * k} rows, got {Nk}")
    _check_int("moe_combine", "slot", slot, (N, k), "N, k")
    if slot.min() < 0 or slot.max() >= N * k:
        fail(f"moe_combine: slot values must lie in [0, {N * k})")
    return N, C, k


def moe_combine(expert_out: torch.Tensor, slot: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted sum of each token's expert outputs: y[n] = sum_j weight[n, j] * expert_out[slot[n, j]].

    expert_out: [N*k, C], slot: [N, k], weight: [N, k] -> y: [N, C]
    """
    check_moe_combine_args(expert_out, slot, weight)
    picked = expert_out[slot.long()]                             # [N, k, C]
    return (picked * weight.to(expert_out.dtype).unsqueeze(-1)).sum(dim=1)  # [N, C]
