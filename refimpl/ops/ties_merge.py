"""Merging fine-tuned models by their task vectors: averaging, task arithmetic, and TIES.

Papers: Ilharco et al. 2023, "Editing Models with Task Arithmetic", arXiv:2212.04089;
Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models", arXiv:2306.01708.

A task vector is what fine-tuning changed: tau_k = theta_k - theta_base, flattened to [P].
All functions take the K task vectors stacked, tau: [K, P], and return the merged change [P]
(add it to theta_base).

TIES, in its three steps:
    trim    keep each task vector's largest-magnitude entries (the top `density` fraction), zero the rest
    elect   per parameter, the sign of the summed trimmed values (the sign with more total mass)
    merge   average only the entries that agree with the elected sign ("disjoint mean"), scale by lambda

The write-up's variant (`ties_merge_as_written`) differs in three places: it keeps 80% rather than
20%, elects the sign by counting votes rather than summing mass, and divides by K (every model)
rather than by the number that agree; it has no lambda.

Shapes: tau [K, P] (float, finite) -> merged change [P].

Glossary: K task vectors (fine-tuned models), P parameters, density the fraction trim keeps, lam (lambda)
the scale of the merged change.

Does not include: building task vectors from models (`refimpl.specialists`), DARE's random drop-and-rescale,
or per-layer densities.
"""

from __future__ import annotations

import math

import torch

from refimpl.ops.contract import Contract


TASK_VECTORS = Contract("ties_merge", tau="K P")


def check_ties_merge_args(tau: torch.Tensor) -> None:
    """Validate task vectors: a float tensor [K, P] with K, P >= 1, every entry finite. (A NaN would not
    propagate: it has no sign to elect and never wins a top-k, so the merge would quietly drop it and
    change its neighbours' trim; an inf would swamp its column.)"""
    TASK_VECTORS.check(tau=tau)
    finite = torch.isfinite(tau)
    if not bool(finite.all()):
        k, p = (int(i) for i in (~finite).nonzero()[0])
        raise ValueError(f"ties_merge: task vectors must be finite; tau[{k}, {p}] = {float(tau[k, p])} "
                         f"({int((~finite).sum())} non-finite entries)")


def average(tau: torch.Tensor) -> torch.Tensor:
    """Plain averaging of the fine-tuned models: mean_k tau_k."""
    check_ties_merge_args(tau)
    return tau.mean(dim=0)


def task_arithmetic(tau: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    """lambda * sum_k tau_k."""
    check_ties_merge_args(tau)
    return lam * tau.sum(dim=0)


def trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but each row's top `density` fraction by magnitude (ties at the threshold are kept)."""
    check_ties_merge_args(tau)
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    keep = max(1, math.ceil(density * tau.shape[1]))
    threshold = tau.abs().topk(keep, dim=1).values[:, -1:]                       # [K, 1] k-th largest |tau|
    return torch.where(tau.abs() >= threshold, tau, torch.zeros_like(tau))


def elect_sign(trimmed: torch.Tensor, rule: str = "mass") -> torch.Tensor:
    """Per parameter, +1 / -1 (0 where undecided): "mass" = sign of the sum, "count" = sign of the vote."""
    if rule == "mass":
        return torch.sign(trimmed.sum(dim=0))
    if rule == "count":
        return torch.sign(torch.sign(trimmed).sum(dim=0))
    raise ValueError(f"sign rule must be 'mass' or 'count', got {rule!r}")


def ties_merge(tau: torch.Tensor, density: float = 0.2, lam: float = 1.0, sign_rule: str = "mass",
               divide_by: str = "agreeing") -> torch.Tensor:
    """TIES: trim, elect, disjoint merge. divide_by="agreeing" (the paper) or "all" (divide by K)."""
    trimmed = trim(tau, density)                                                   # [K, P]
    sign = elect_sign(trimmed, sign_rule)                                          # [P]
    agrees = (torch.sign(trimmed) == sign) & (trimmed != 0)                        # [K, P]
    kept = torch.where(agrees, trimmed, torch.zeros_like(trimmed))
    if divide_by == "agreeing":
        count = agrees.sum(dim=0).clamp_min(1)
    elif divide_by == "all":
        count = torch.full_like(sign, tau.shape[0])
    else:
        raise ValueError(f"divide_by must be 'agreeing' or 'all', got {divide_by!r}")
    return lam * kept.sum(dim=0) / count


def ties_merge_as_written(tau: torch.Tensor) -> torch.Tensor:
    """The write-up's TIES: keep 80%, elect by vote count, divide by K, no lambda."""
    return ties_merge(tau, density=0.8, lam=1.0, sign_rule="count", divide_by="all")
