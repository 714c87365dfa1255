"""Specialists on a shared base: LoRA adapters, their task vectors, merging them, and routing queries.

The write-up's Synapse-3B is a transformer base with four (Q)LoRA specialist adapters merged by TIES,
and its swarm routes each query to a specialist by keyword overlap with the specialist's capability
list, weighted by Hebbian pathway strengths kept in SQLite. This file is the miniature: a byte-level
transformer base (`refimpl.baseline.BaselineLM`), one LoRA adapter per standard-library package, the
adapters' task vectors for `refimpl.merging`, and a keyword + Hebbian router.

Paper: Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685.
A frozen weight W [out, in] gains a trainable low-rank change:

    y = x W^T + (alpha / r) (x A^T) B^T,     A [r, in] small random, B [out, r] zeros (so training starts at W)

and the adapter's task vector for that weight is Delta W = (alpha / r) B A, a dense [out, in] matrix.
Merging acts on these dense changes, concatenated over every adapted weight in a fixed order. (Merging
the factors A and B separately is not the same thing: the product of averages is not the average of
products.)

Does not include: quantised (Q)LoRA, DPO, the "cloud fallback" (a query no specialist claims goes to
the base model here), or multi-specialist synthesis.
"""

from __future__ import annotations

import copy
import math
import re
from collections import Counter

import torch
import torch.nn as nn
import torch.nn.functional as F

from refimpl.synapse import HebbianPathways


# ----------------------------------------------------------------------------
# LoRA
# ----------------------------------------------------------------------------

class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable rank-r change (alpha / r) B A."""

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 16.0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ValueError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        if not 1 <= rank <= min(base.in_features, base.out_features):
            raise ValueError(f"LoRA rank must be in [1, {min(base.in_features, base.out_features)}] for a "
                             f"{base.out_features}x{base.in_features} weight, got {rank}")
        self.base, self.rank, self.scale = base, rank, alpha / rank
        for p in self.base.parameters():
            p.requires_grad_(False)
        weight = base.weight
        self.A = nn.Parameter(torch.randn(rank, base.in_features, dtype=weight.dtype, device=weight.device)
                              / math.sqrt(base.in_features))
        self.B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=weight.dtype, device=weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * F.linear(F.linear(x, self.A), self.B)

    def delta_weight(self) -> torch.Tensor:
        """The adapter's change to the base weight, [out, in]."""
        return self.scale * self.B @ self.A


def add_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0) -> list[str]:
    """Freeze `model` and wrap every nn.Linear (except one tied to an embedding) in a LoRALinear, in place.

    Returns the wrapped modules' names, in `named_modules` order: the order task vectors use.
    """
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("add_lora: the model already has LoRA adapters")
    for p in model.parameters():
        p.requires_grad_(False)
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    names = [name for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and id(m.weight) not in embedding_weights]
    if not names:
        raise ValueError("add_lora: the model has no nn.Linear layer to adapt")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha))
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear inside `model`, by its module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def task_vector(model: nn.Module) -> torch.Tensor:
    """Every adapter's Delta W, flattened and concatenated: [P] (P = sum of out * in over adapted weights)."""
    modules = lora_modules(model)
    if not modules:
        raise ValueError("task_vector: the model has no LoRA adapters (call add_lora first)")
    with torch.no_grad():
        return torch.cat([m.delta_weight().flatten() for m in modules.values()])


def with_task_vector(base: nn.Module, names: list[str], delta: torch.Tensor) -> nn.Module:
    """A copy of the plain `base` model with `delta` (laid out as `task_vector` lays it) added to the
    weights of the modules `names`. The copy has no adapters: a merged model costs nothing extra to run."""
    merged = copy.deepcopy(base)
    offset = 0
    with torch.no_grad():
        for name in names:
            weight = merged.get_submodule(name).weight
            n = weight.numel()
            if offset + n > delta.numel():
                raise ValueError(f"with_task_vector: delta has {delta.numel()} entries, too few for the weights {names}")
            weight += delta[offset:offset + n].view_as(weight).to(weight.dtype)
            offset += n
    if offset != delta.numel():
        raise ValueError(f"with_task_vector: delta has {delta.numel()} entries but the weights take {offset}")
    return merged


# ----------------------------------------------------------------------------
# The specialist router: keyword overlap, weighted by Hebbian pathway strengths
# ----------------------------------------------------------------------------

_WORD = re.compile(rb"[A-Za-z_][A-Za-z0-9_]{2,}")


def words(text: bytes | str) -> list[str]:
    """Identifiers and words of three or more characters, lower-cased."""
    if isinstance(text, str):
        text = text.encode()
    return [w.decode().lower() for w in _WORD.findall(bytes(text))]


def distinctive_words(domains: dict[str, bytes], n: int = 40, min_count: int = 5) -> dict[str, list[str]]:
    """Each domain's capability list, measured from its text: the `n` words whose frequency in the domain
    most exceeds their frequency in the other domains (a smoothed log ratio), among words seen `min_count` times."""
    if len(domains) < 2:
        raise ValueError("distinctive_words: need at least two domains to contrast")
    counts = {name: Counter(words(text)) for name, text in domains.items()}
    totals = {name: sum(c.values()) for name, c in counts.items()}
    capabilities = {}
    for name, own in counts.items():
        others = Counter()
        for other, c in counts.items():
            if other != name:
                others.update(c)
        other_total = sum(totals[o] for o in counts if o != name)

        def score(word):
            return math.log((own[word] + 1) / (totals[name] + 1)) - math.log((others[word] + 1) / (other_total + 1))

        candidates = [w for w, c in own.items() if c >= min_count]
        capabilities[name] = sorted(candidates, key=lambda w: (-score(w), w))[:n]
    return capabilities


class SpecialistRouter:
    """Route a query to the specialist whose capability words it mentions most, weighted by pathway strength.

        score_s = overlap_s * (1 + hebbian_weight * strength_s)

    overlap_s counts the query's distinct words in specialist s's capability list; strength_s is s's
    Hebbian pathway strength (every `reinforce(s)` adds lr, then all strengths decay). The best score
    wins if it reaches `threshold`; otherwise `route` returns None (the write-up sends such queries to
    a cloud model; here they go to the base model).
    """

    def __init__(self, capabilities: dict[str, list[str]], pathways: HebbianPathways | None = None,
                 hebbian_weight: float = 0.1, threshold: float = 1.0):
        if not capabilities:
            raise ValueError("SpecialistRouter: need at least one specialist")
        self.capabilities = {name: set(ws) for name, ws in capabilities.items()}
        self.names = sorted(capabilities)
        self.pathways = pathways if pathways is not None else HebbianPathways()
        self.hebbian_weight, self.threshold = hebbian_weight, threshold

    def scores(self, query: bytes | str) -> dict[str, float]:
        distinct = set(words(query))
        return {name: len(distinct & self.capabilities[name])
                * (1.0 + self.hebbian_weight * self.pathways.strengths.get(name, 0.0)) for name in self.names}

    def route(self, query: bytes | str) -> str | None:
        scores = self.scores(query)
        best = max(self.names, key=lambda name: (scores[name], name))
        return best if scores[best] >= self.threshold else None

    def reinforce(self, name: str) -> None:
        """A routing success for specialist `name`: strengthen its pathway."""
        if name not in self.capabilities:
            raise ValueError(f"unknown specialist {name!r}; the specialists are {self.names}")
        self.pathways.reinforce(name)
