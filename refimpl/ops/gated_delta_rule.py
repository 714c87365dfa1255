"""The gated delta rule: a linear-attention memory edited by the delta rule, forgetting by a gate.

Paper: Yang, Kautz & Hatamizadeh 2024, "Gated Delta Networks: Improving Mamba2 with
Delta Rule", arXiv:2412.06464. The delta rule itself: Schlag, Irie & Schmidhuber 2021,
arXiv:2102.11174; its chunked (WY / UT) form: Yang et al. 2024, "Parallelizing Linear
Transformers with the Delta Rule over Sequence Length", arXiv:2406.06484.

The recurrence, per batch element and head, with a state matrix S of shape [V, K]:

    S_t = alpha_t * S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T
        = alpha_t * S_{t-1} + beta_t (v_t - alpha_t S_{t-1} k_t) k_t^T      (same thing, cheaper)
    o_t = S_t (scale * q_t)

Read as memory editing: alpha_t S_{t-1} k_t is what the decayed memory currently
returns for key k_t; the update moves that answer a fraction beta_t of the way to v_t.

Shapes: q, k [B, T, H, K], v [B, T, H, V], g, beta [B, T, H], initial_state [B, H, V, K] or None
        -> (o [B, T, H, V], final state [B, H, V, K]).

Glossary
    B batch   T tokens   H heads   K key/query head dim   V value head dim   C chunk length
    q, k   [B, T, H, K]   queries and keys (the layer L2-normalises them)
    v      [B, T, H, V]   values
    g      [B, T, H]      log decay, g <= 0; alpha = exp(g) in (0, 1]
    beta   [B, T, H]      write strength in [0, 1]
    S      [B, H, V, K]   the state; `initial_state` in, final state out

Two forms of the same function:
    gated_delta_rule_recurrent  the step loop: the ground truth (slow, obviously right)
    gated_delta_rule_chunked    chunks of C tokens: inside a chunk, a triangular solve turns the
                                C sequential updates into matrix products (the "UT transform");
                                between chunks, the state is carried. Tested equal to the loop.
`gated_delta_rule` is the op models call (the chunked form); kernels replace it.

Does not include: the layer around it (projections, short convolution, gates: `refimpl.gated_deltanet`),
the backward pass beyond autograd, or anything fused (kernels/gated_delta_rule.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from refimpl.ops.contract import Contract


GATED_DELTA_RULE = Contract("gated_delta_rule", q="B T H K", k="B T H K", v="B T H V", g="B T H", beta="B T H",
                            initial_state="B H V K?")


def check_gated_delta_rule_args(q, k, v, g, beta, initial_state):
    """Validate the op's arguments; return (B, T, H, K, V)."""
    return GATED_DELTA_RULE.check(q=q, k=k, v=v, g=g, beta=beta, initial_state=initial_state)


def _start_state(initial_state, B, H, V, K, like: torch.Tensor) -> torch.Tensor:
    if initial_state is None:
        return torch.zeros(B, H, V, K, dtype=like.dtype, device=like.device)
    return initial_state.to(like.dtype)  # the fp32 copy, when the chunked form promotes half precision


def gated_delta_rule_recurrent(q, k, v, g, beta, initial_state=None, scale: float | None = None):
    """The step loop, one token at a time. Returns (o [B, T, H, V], final state [B, H, V, K])."""
    B, T, H, K, V = check_gated_delta_rule_args(q, k, v, g, beta, initial_state)
    scale = K ** -0.5 if scale is None else scale
    S = _start_state(initial_state, B, H, V, K, q)                     # [B, H, V, K]
    outputs = []
    for t in range(T):
        alpha = g[:, t].exp()[..., None, None]                         # [B, H, 1, 1]
        k_t, v_t = k[:, t], v[:, t]                                    # [B, H, K], [B, H, V]
        recalled = alpha[..., 0] * torch.einsum("bhvk,bhk->bhv", S, k_t)  # [B, H, V] what memory says for k_t
        delta = beta[:, t, :, None] * (v_t - recalled)                 # [B, H, V] a beta-step towards v_t
        S = alpha * S + delta[..., :, None] * k_t[..., None, :]         # [B, H, V, K]
        outputs.append(torch.einsum("bhvk,bhk->bhv", S, q[:, t] * scale))  # [B, H, V]
    return torch.stack(outputs, dim=1), S                              # [B, T, H, V], [B, H, V, K]


def gated_delta_rule_chunked(q, k, v, g, beta, initial_state=None, scale: float | None = None,
                             chunk_size: int = 64):
    """The same function, C tokens at a time. Returns (o [B, T, H, V], final state [B, H, V, K]).

    Inside a chunk, with gamma_t the running sum of g from the chunk's start and S_0
    the state entering it, unrolling the recurrence gives (rows = positions):

        u_t := beta_t (v_t - alpha_t S_{t-1} k_t)                   the value actually written at t
        (I + A) U = beta*V - (beta*exp(gamma)*K) S_0^T,             A_ts = beta_t exp(gamma_t - gamma_s) k_t.k_s, s < t
        O   = (exp(gamma)*Q) S_0^T + (Q K^T  o  M) U,               M_ts = exp(gamma_t - gamma_s), s <= t
        S_C = exp(gamma_C) S_0 + U^T (exp(gamma_C - gamma) * K)

    I + A is unit lower-triangular, so U comes from one triangular solve instead of C steps.
    """
    B, T, H, K, V = check_gated_delta_rule_args(q, k, v, g, beta, initial_state)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"gated_delta_rule_chunked: chunk_size must be a positive int, got {chunk_size!r}")
    if q.dtype in (torch.float16, torch.bfloat16):
        # the triangular solve has no half-precision kernel: compute in fp32, return in the inputs' dtype
        upcast = [t.float() for t in (q, k, v, g, beta)]
        o, S = gated_delta_rule_chunked(*upcast, None if initial_state is None else initial_state.float(), scale, chunk_size)
        return o.to(q.dtype), S.to(q.dtype)
    scale = K ** -0.5 if scale is None else scale
    C = chunk_size
    n_chunks = math.ceil(T / C)
    pad = n_chunks * C - T  # padded steps have beta = 0 and g = 0: they leave the state alone

    def chunks(x):  # [B, T, H, ...] -> [B, H, n_chunks, C, ...]
        x = F.pad(x, (0, 0) * (x.dim() - 3) + (0, 0, 0, pad))
        x = x.transpose(1, 2)                                          # [B, H, T', ...]
        return x.reshape(B, H, n_chunks, C, *x.shape[3:])

    qc, kc, vc = chunks(q * scale), chunks(k), chunks(v)               # [B, H, N, C, K|V]
    gamma = chunks(g).cumsum(dim=-1)                                   # [B, H, N, C] log decay from chunk start
    bc = chunks(beta)                                                  # [B, H, N, C]

    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()          # s <= t
    strict = causal.clone().fill_diagonal_(False)                                # s < t
    decay = (gamma[..., :, None] - gamma[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # [B, H, N, C, C] M_ts
    A = (bc[..., :, None] * (kc @ kc.transpose(-1, -2)) * decay).masked_fill(~strict, 0.0)
    unit_lower = A + torch.eye(C, dtype=q.dtype, device=q.device)                # I + A
    # Everything of U that does not depend on S_0, and the part that multiplies it:
    u = torch.linalg.solve_triangular(unit_lower, bc[..., None] * vc, upper=False, unitriangular=True)   # [.., C, V]
    w = torch.linalg.solve_triangular(unit_lower, (bc * gamma.exp())[..., None] * kc, upper=False,
                                      unitriangular=True)                                                  # [.., C, K]
    intra = (qc @ kc.transpose(-1, -2)) * decay                        # [B, H, N, C, C] lower-triangular scores

    S = _start_state(initial_state, B, H, V, K, q)                     # [B, H, V, K]
    outputs = []
    for n in range(n_chunks):
        U = u[:, :, n] - w[:, :, n] @ S.transpose(-1, -2)              # [B, H, C, V] values written in chunk n
        o = (gamma[:, :, n, :, None].exp() * qc[:, :, n]) @ S.transpose(-1, -2) + intra[:, :, n] @ U  # [B, H, C, V]
        outputs.append(o)
        to_end = (gamma[:, :, n, -1:] - gamma[:, :, n]).exp()          # [B, H, C] decay from t to the chunk's end
        S = gamma[:, :, n, -1, None, None].exp() * S + U.transpose(-1, -2) @ (to_end[..., None] * kc[:, :, n])
    o = torch.cat(outputs, dim=2)[:, :, :T]                            # [B, H, T, V]
    return o.transpose(1, 2), S                                        # [B, T, H, V], [B, H, V, K]


def gated_delta_rule(q, k, v, g, beta, initial_state=None, scale: float | None = None):
    """The op models call: the chunked form (chunk 64). Returns (o [B, T, H, V], final state [B, H, V, K])."""
    return gated_delta_rule_chunked(q, k, v, g, beta, initial_state, scale, chunk_size=64)
