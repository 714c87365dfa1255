"""A fast-weight memory: a per-head matrix written with outer products and decayed every token.

Papers: Schmidhuber 1992, "Learning to Control Fast-Weight Memories"; Ba et al. 2016, "Using Fast
Weights to Attend to the Recent Past", arXiv:1610.06258; Schlag, Irie & Schmidhuber 2021, "Linear
Transformers Are Secretly Fast Weight Programmers", arXiv:2102.11174. Chapter 05 (seed 004, TITAN
Synapse) gives this memory; unlike its public code (notes/public-code.md) nothing here is detached:
gradients reach the key, value and gate projections, and every batch element has its own W.

Per head, with W [Dk, Dv] starting at zero (or a carried state), for each token:

    r_t = W^T q_t                                                   read first
    W  <- decay * W + strength * sigmoid(gate_t) k_t v_t^T          then decay, then write

Unrolled: r_t = decay^t W_0^T q_t + sum_{s<t} decay^(t-1-s) a_s (k_s . q_t) v_s, a_s = strength * sigmoid(gate_s),
which is what `fast_weight_memory_parallel` computes with one masked matrix product.

Shapes: q, k [B, T, H, Dk], v [B, T, H, Dv], gate [B, T, H] (pre-sigmoid), initial_state [B, H, Dk, Dv] or None
        -> (reads r [B, T, H, Dv], final W [B, H, Dk, Dv]).

Glossary: B batch, T tokens, H heads, Dk key dim, Dv value dim; decay in [0, 1], strength the write scale.

Does not include: the layer (`refimpl.synapse.FastWeightMemory`), or anything fast (kernels/fast_weight_memory.py).
"""

from __future__ import annotations

import torch

from refimpl.ops.contract import Contract


FAST_WEIGHT_MEMORY = Contract("fast_weight_memory", q="B T H Dk", k="B T H Dk", v="B T H Dv", gate="B T H",
                              initial_state="B H Dk Dv?")


def check_fast_weight_args(q, k, v, gate, initial_state):
    """Validate the fast-weight memory's arguments; return (B, T, H, Dk, Dv)."""
    return FAST_WEIGHT_MEMORY.check(q=q, k=k, v=v, gate=gate, initial_state=initial_state)


def fast_weight_memory_recurrent(q, k, v, gate, decay: float = 0.95, strength: float = 0.1, initial_state=None):
    """The step loop. q, k [B, T, H, Dk], v [B, T, H, Dv], gate [B, T, H] (pre-sigmoid)
    -> (reads r [B, T, H, Dv], final W [B, H, Dk, Dv])."""
    B, T, H, Dk, Dv = check_fast_weight_args(q, k, v, gate, initial_state)
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"fast_weight_memory: decay must be in [0, 1], got {decay}")
    W = initial_state if initial_state is not None else q.new_zeros(B, H, Dk, Dv)
    reads = []
    for t in range(T):
        reads.append(torch.einsum("bhkv,bhk->bhv", W, q[:, t]))                      # read before writing
        a = strength * torch.sigmoid(gate[:, t])                                      # [B, H]
        W = decay * W + a[..., None, None] * k[:, t, :, :, None] * v[:, t, :, None, :]
    return torch.stack(reads, dim=1), W


def fast_weight_memory_parallel(q, k, v, gate, decay: float = 0.95, strength: float = 0.1, initial_state=None):
    """All reads at once: r = (M o Q K^T)(a V) + decay^t Q W_0, M_ts = decay^(t-1-s) for s < t. Same returns."""
    B, T, H, Dk, Dv = check_fast_weight_args(q, k, v, gate, initial_state)
    t = torch.arange(T, device=q.device, dtype=q.dtype)
    power = (t[:, None] - 1 - t[None, :])                                             # t - 1 - s
    strictly_past = power >= 0
    M = torch.where(strictly_past, decay ** power.clamp_min(0), torch.zeros_like(power))  # [T, T]
    a = strength * torch.sigmoid(gate)                                                # [B, T, H]
    scores = torch.einsum("bthk,bshk->bhts", q, k) * M                                # [B, H, T, T]
    reads = torch.einsum("bhts,bshv->bthv", scores, a[..., None] * v)                 # [B, T, H, Dv]
    W = torch.einsum("s,bshk,bshv->bhkv", decay ** (T - 1 - t), k * a[..., None], v)  # [B, H, Dk, Dv]
    if initial_state is not None:
        reads = reads + (decay ** t)[None, :, None, None] * torch.einsum("bhkv,bthk->bthv", initial_state, q)
        W = W + decay ** T * initial_state
    return reads, W


def fast_weight_memory(q, k, v, gate, decay: float = 0.95, strength: float = 0.1, initial_state=None):
    """The op models call: the step loop. Returns (reads [B, T, H, Dv], final W [B, H, Dk, Dv])."""
    return fast_weight_memory_recurrent(q, k, v, gate, decay, strength, initial_state)
