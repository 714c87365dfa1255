"""The mLSTM: xLSTM's matrix memory with exponential gates, and the stabiliser that keeps it finite.

Paper: Beck et al. 2024, "xLSTM: Extended Long Short-Term Memory", arXiv:2405.04517 (section 2.3,
the mLSTM, and appendix: its parallel form and the max-state stabiliser).

The mLSTM, per head, with exponential input and forget gates i_t = exp(i~_t), f_t = exp(f~_t):

    C_t = f_t C_{t-1} + i_t v_t k_t^T            matrix memory            [Dv, Dk]
    n_t = f_t n_{t-1} + i_t k_t                  normaliser               [Dk]
    h_t = C_t q_t / max(|n_t . q_t|, 1)          normalised read          [Dv]
    (keys are scaled by 1/sqrt(Dk), as in the paper)

As the write-up gives it, the products of exp(f~) grow without bound: with its forget-gate bias
of 1, C_t ~ e^t, and float32 overflows near t = 88 (the public code's trainer uses 2048 tokens).
The paper's stabiliser carries a running log-scale m_t and stores C and n divided by e^{m_t}:

    m_t  = max(f~_t + m_{t-1}, i~_t)
    i'_t = exp(i~_t - m_t),   f'_t = exp(f~_t + m_{t-1} - m_t)          (both <= 1)
    C'_t = f'_t C'_{t-1} + i'_t v_t k_t^T,   n'_t = f'_t n'_{t-1} + i'_t k_t
    h_t  = C'_t q_t / max(|n'_t . q_t|, exp(-m_t))

which is the same function (C' = C e^{-m}, n' = n e^{-m}, and the max rescales with them) while
every stored number stays bounded.

Shapes: q, k [B, T, H, Dk], v [B, T, H, Dv], i_pre, f_pre [B, T, H], initial_state (C, n, m) or None
        -> (h [B, T, H, Dv], state (C, n, m)).

Three forms: `mlstm_recurrent` (the step loop, the ground truth; stabilised or as written),
`mlstm_parallel` (all T outputs at once from a zero state, O(T^2)), and `mlstm`, the op models call.

Glossary
    B batch   T tokens   H heads   Dk key/query head dim   Dv value head dim
    q, k [B, T, H, Dk], v [B, T, H, Dv], i_pre, f_pre [B, T, H] (the gate pre-activations i~, f~)
    state: (C [B, H, Dv, Dk], n [B, H, Dk], m [B, H])

Does not include: the layer (`refimpl.synapse.MLSTMLayer`), the sLSTM, the xLSTM paper's group norm and up/down projection blocks (the
write-up's module has none), or anything fast: see kernels/ for that.
"""

from __future__ import annotations

import math

import torch

from refimpl.ops.contract import Contract


MLSTM = Contract("mlstm", {"q": "B T H Dk", "k": "B T H Dk", "v": "B T H Dv", "i_pre": "B T H", "f_pre": "B T H",
                           "initial_state C": "B H Dv Dk?", "initial_state n": "B H Dk?", "initial_state m": "B H?"})


def check_mlstm_args(q, k, v, i_pre, f_pre, initial_state):
    """Validate the mLSTM's arguments; return (B, T, H, Dk, Dv)."""
    if initial_state is not None and (not isinstance(initial_state, (tuple, list)) or len(initial_state) != 3
                                      or any(t is None for t in initial_state)):
        raise ValueError("mlstm: initial_state must be None or a tuple of three tensors (C, n, m)")
    C, n, m = initial_state if initial_state is not None else (None, None, None)
    return MLSTM.check({"q": q, "k": k, "v": v, "i_pre": i_pre, "f_pre": f_pre,
                        "initial_state C": C, "initial_state n": n, "initial_state m": m})


def mlstm_recurrent(q, k, v, i_pre, f_pre, initial_state=None, stabilised: bool = True,
                    gate_clamp: float | None = None):
    """The step loop (ground truth). Returns (h [B, T, H, Dv], state (C, n, m)).

    stabilised=False is the write-up's form (no m_t); its state's m stays 0. `gate_clamp`
    clamps both pre-activations to [-gate_clamp, gate_clamp] first, as the write-up does with 20.
    """
    B, T, H, Dk, Dv = check_mlstm_args(q, k, v, i_pre, f_pre, initial_state)
    if gate_clamp is not None:
        i_pre, f_pre = i_pre.clamp(-gate_clamp, gate_clamp), f_pre.clamp(-gate_clamp, gate_clamp)
    if initial_state is None:
        C, n, m = q.new_zeros(B, H, Dv, Dk), q.new_zeros(B, H, Dk), q.new_zeros(B, H)
    else:
        C, n, m = initial_state
    k = k / math.sqrt(Dk)
    hs = []
    for t in range(T):
        if stabilised:
            m_new = torch.maximum(f_pre[:, t] + m, i_pre[:, t])                       # [B, H]
            i_gate = torch.exp(i_pre[:, t] - m_new)
            f_gate = torch.exp(f_pre[:, t] + m - m_new)
            floor = torch.exp(-m_new)                                                 # the max(., 1) in units of e^{-m}
            m = m_new
        else:
            i_gate, f_gate = torch.exp(i_pre[:, t]), torch.exp(f_pre[:, t])
            floor = torch.ones_like(i_gate)
        C = f_gate[..., None, None] * C + i_gate[..., None, None] * v[:, t, :, :, None] * k[:, t, :, None, :]
        n = f_gate[..., None] * n + i_gate[..., None] * k[:, t]                       # [B, H, Dk]
        read = torch.einsum("bhvk,bhk->bhv", C, q[:, t])                              # [B, H, Dv]
        denominator = torch.maximum((n * q[:, t]).sum(-1).abs(), floor)               # [B, H]
        hs.append(read / denominator[..., None])
    return torch.stack(hs, dim=1), (C, n, m)


def mlstm_parallel(q, k, v, i_pre, f_pre, return_state: bool = False):
    """All T outputs at once from a zero state (the xLSTM paper's parallel form). Returns h [B, T, H, Dv],
    or with `return_state` (h, (C, n, m)): the final state exactly as the step loop leaves it.

    log D_ts = sum_{r=s+1..t} f~_r + i~_s for s <= t: the log-weight of key s in the memory at time t.
    Each row is shifted by its max m_t (the stabiliser again), so
        h_t = sum_s (q_t . k_s) e^{log D_ts - m_t} v_s / max(|sum_s (q_t . k_s) e^{log D_ts - m_t}|, e^{-m_t}).
    Memory is O(T^2) per head: this form is for checking and short sequences.
    """
    B, T, H, Dk, Dv = check_mlstm_args(q, k, v, i_pre, f_pre, None)
    F_cum = f_pre.transpose(1, 2).cumsum(dim=-1)                                      # [B, H, T]
    log_D = F_cum[..., :, None] - F_cum[..., None, :] + i_pre.transpose(1, 2)[..., None, :]  # [B, H, T(t), T(s)]
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    log_D = log_D.masked_fill(~causal, float("-inf"))
    m = log_D.amax(dim=-1, keepdim=True)                                              # [B, H, T, 1]
    scores = torch.einsum("bthk,bshk->bhts", q, k / math.sqrt(Dk)) * torch.exp(log_D - m)  # [B, H, T, T]
    denominator = torch.maximum(scores.sum(-1, keepdim=True).abs(), torch.exp(-m))
    h = torch.einsum("bhts,bshv->bthv", scores / denominator, v)                     # [B, T, H, Dv]
    if not return_state:
        return h
    # The step loop's final m also holds the path from its starting m_0 = 0: m_T = max(F_T, max_s log D_Ts).
    m_final = torch.maximum(F_cum[..., -1], m[..., -1, 0])                            # [B, H]
    weight = torch.exp(log_D[..., -1, :] - m_final[..., None])                        # [B, H, T(s)]
    C = torch.einsum("bhs,bshv,bshk->bhvk", weight, v, k / math.sqrt(Dk))             # [B, H, Dv, Dk]
    n = torch.einsum("bhs,bshk->bhk", weight, k / math.sqrt(Dk))                      # [B, H, Dk]
    return h, (C, n, m_final)


def mlstm(q, k, v, i_pre, f_pre, initial_state=None):
    """The op models call: the stabilised step loop. Returns (h [B, T, H, Dv], state (C, n, m))."""
    return mlstm_recurrent(q, k, v, i_pre, f_pre, initial_state, stabilised=True)
