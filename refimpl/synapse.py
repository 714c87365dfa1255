"""TITAN Synapse (seed 004): the modules of the Synapse layer.

The write-up's layer: RMSNorm -> xLSTM (mLSTM) -> residual; RMSNorm -> Thalamus router -> experts
-> residual; RMSNorm -> fast-weight memory -> residual. This file holds, so far, the mLSTM, the
fast-weight memory, the Hebbian pathway table and the Thalamus router (a `refimpl.ssm.MambaLayer`
feeding a linear router; the experts are `refimpl.blocks.ExpertPool`). The layer, the model and its
parameter arithmetic come next.

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

Glossary
    B batch   T tokens   H heads   Dk key/query head dim   Dv value head dim
    q, k [B, T, H, Dk], v [B, T, H, Dv], i_pre, f_pre [B, T, H] (the gate pre-activations i~, f~)
    state: (C [B, H, Dv, Dk], n [B, H, Dk], m [B, H])

Does not include: the sLSTM, the xLSTM paper's group norm and up/down projection blocks (the
write-up's module has none), or anything fast: see kernels/ for that.
"""

from __future__ import annotations

import math
import os
import sqlite3
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from refimpl.blocks import (ExpertPool, RMSNorm, check_targets, check_token_ids, config_from_preset, count_parameters,
                            init_lm_weights, load_balancing_loss)
from refimpl.config import check_fields, choice, flag, number, whole
from refimpl.ssm import MambaLayer, MambaState


def check_mlstm_args(q, k, v, i_pre, f_pre, initial_state):
    """Validate the mLSTM's arguments; return (B, T, H, Dk, Dv)."""
    for name, t in (("q", q), ("k", k), ("v", v), ("i_pre", i_pre), ("f_pre", f_pre)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"mlstm: {name} must be a floating-point tensor")
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"mlstm: q and k must both be [B, T, H, Dk], got {list(q.shape)} and {list(k.shape)}")
    B, T, H, Dk = q.shape
    if v.dim() != 4 or tuple(v.shape[:3]) != (B, T, H):
        raise ValueError(f"mlstm: v must be [B, T, H, Dv] = [{B}, {T}, {H}, Dv], got {list(v.shape)}")
    for name, t in (("i_pre", i_pre), ("f_pre", f_pre)):
        if tuple(t.shape) != (B, T, H):
            raise ValueError(f"mlstm: {name} must be [B, T, H] = [{B}, {T}, {H}], got {list(t.shape)}")
    Dv = v.shape[3]
    if min(B, T, H, Dk, Dv) < 1:
        raise ValueError("mlstm: every size must be >= 1")
    if initial_state is not None:
        C, n, m = initial_state
        if tuple(C.shape) != (B, H, Dv, Dk) or tuple(n.shape) != (B, H, Dk) or tuple(m.shape) != (B, H):
            raise ValueError(f"mlstm: initial_state must be (C [B, H, Dv, Dk], n [B, H, Dk], m [B, H]) = "
                             f"([{B}, {H}, {Dv}, {Dk}], [{B}, {H}, {Dk}], [{B}, {H}])")
    return B, T, H, Dk, Dv


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


FORGET_GATES = {"exp": 1.0, "sigmoid": 3.0}  # forget gate -> the initial bias of its pre-activation


class MLSTMLayer(nn.Module):
    """The write-up's xLSTM module: q, k, v and the exponential gates projected from x, an output
    gate o = sigmoid(W_o x), y = W_out (o * h). x: [B, T, C] -> [B, T, C]; with `stabilised=False`
    the write-up's unstabilised cell (clamped at 20).

    `forget_gate` chooses f_t, the factor the memory keeps per token (the xLSTM paper allows both):
      "exp"      f_t = exp(f~_t), as the write-up has it, bias 1 ("biased to remember"). But exp(1) = 2.7 > 1:
                 the memory does not forget, it *amplifies* the past, so the oldest tokens dominate every read.
      "sigmoid"  f_t = sigmoid(f~_t) < 1 (log f = logsigmoid(f~)), bias 3 (keeps 95% per token), as the
                 xLSTM authors' released mLSTM does.
    Both reach the recurrences as log f_t, which is all they take."""

    def __init__(self, dim: int, hidden: int, n_heads: int, stabilised: bool = True, forget_gate: str = "exp"):
        super().__init__()
        if min(dim, hidden, n_heads) < 1 or hidden % n_heads:
            raise ValueError(f"MLSTMLayer: hidden={hidden} must be a positive multiple of n_heads={n_heads}")
        if forget_gate not in FORGET_GATES:
            raise ValueError(f"MLSTMLayer: forget_gate must be one of {sorted(FORGET_GATES)}, got {forget_gate!r}")
        self.n_heads, self.head_dim, self.stabilised = n_heads, hidden // n_heads, stabilised
        self.forget_gate = forget_gate
        self.qkv = nn.Linear(dim, 3 * hidden, bias=False)
        self.gates = nn.Linear(dim, 2 * n_heads)                                      # i~ and f~ per head
        with torch.no_grad():
            self.gates.bias[n_heads:].fill_(FORGET_GATES[forget_gate])
        self.out_gate = nn.Linear(dim, hidden)
        self.out_proj = nn.Linear(hidden, dim, bias=False)
        self.last_introspection: dict = {}

    def forward(self, x: torch.Tensor, state: list | None = None) -> torch.Tensor:
        """`state`: a one-element list holding (C, n, m) between calls. With no state held (None or an
        empty list) the sequence starts from zeros and runs in the parallel form; with one, the step
        loop `mlstm` continues it (the op a kernel replaces). The two are tested equal."""
        B, T, _ = x.shape
        H, D = self.n_heads, self.head_dim
        q, k, v = (t.view(B, T, H, D) for t in self.qkv(x).chunk(3, dim=-1))        # [B, T, H, D] each
        i_pre, f_pre = self.gates(x).chunk(2, dim=-1)                                 # [B, T, H] each
        if self.forget_gate == "sigmoid":
            f_pre = F.logsigmoid(f_pre)                                               # log f_t, < 0
        start = state[0] if state else None
        if self.stabilised and start is None:
            h, new_state = mlstm_parallel(q, k, v, i_pre, f_pre, return_state=True)   # training: T^2 but ~17x faster
        elif self.stabilised:
            h, new_state = mlstm(q, k, v, i_pre, f_pre, start)                        # the op a kernel may replace
        else:
            h, new_state = mlstm_recurrent(q, k, v, i_pre, f_pre, start, stabilised=False, gate_clamp=20.0)
        if state is not None:
            state[:] = [new_state]
        self.last_introspection = {"input_gate_pre": i_pre.detach(), "log_forget_gate": f_pre.detach(),
                                   "cell_norm": new_state[0].detach().flatten(2).norm(dim=-1)}  # [B, H]
        y = torch.sigmoid(self.out_gate(x)) * h.reshape(B, T, H * D)                  # [B, T, hidden]
        return self.out_proj(y)                                                       # [B, T, C]


# ----------------------------------------------------------------------------
# Fast-weight memory (Schmidhuber 1992; Ba et al. 2016, arXiv:1610.06258; Schlag et al. 2021,
# arXiv:2102.11174), as the write-up gives it but trainable
# ----------------------------------------------------------------------------
#
# Per head, with W [Dk, Dv] starting at zero (or a carried state), for each token:
#     r_t = W^T q_t                                   read first
#     W  <- decay * W + strength * sigmoid(gate_t) * k_t v_t^T     then decay, then write
# Unrolled: r_t = decay^t W_0^T q_t + sum_{s<t} decay^(t-1-s) a_s (k_s . q_t) v_s, with a_s = strength * sigmoid(gate_s).
# Unlike the public code (notes/public-code.md), nothing is detached: gradients reach the key, value and
# gate projections, and every batch element has its own W.

def check_fast_weight_args(q, k, v, gate, initial_state):
    """Validate the fast-weight memory's arguments; return (B, T, H, Dk, Dv)."""
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"fast_weight_memory: q and k must both be [B, T, H, Dk], got {list(q.shape)} and {list(k.shape)}")
    B, T, H, Dk = q.shape
    if v.dim() != 4 or tuple(v.shape[:3]) != (B, T, H):
        raise ValueError(f"fast_weight_memory: v must be [B, T, H, Dv] = [{B}, {T}, {H}, Dv], got {list(v.shape)}")
    if tuple(gate.shape) != (B, T, H):
        raise ValueError(f"fast_weight_memory: gate must be [B, T, H] = [{B}, {T}, {H}], got {list(gate.shape)}")
    Dv = v.shape[3]
    if initial_state is not None and tuple(initial_state.shape) != (B, H, Dk, Dv):
        raise ValueError(f"fast_weight_memory: initial_state must be [B, H, Dk, Dv] = [{B}, {H}, {Dk}, {Dv}]")
    return B, T, H, Dk, Dv


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


class FastWeightMemory(nn.Module):
    """The write-up's module: per-head q, k, v and a write gate projected from x, the memory above,
    reads projected back to d_model. x: [B, T, C] -> [B, T, C]. Pass `state` (a one-element list) to carry
    W across calls; leave it None (or empty) to start each sequence from an empty memory. A fresh sequence runs
    in the parallel form, a carried one in the step loop `fast_weight_memory` (the op a kernel replaces)."""

    def __init__(self, dim: int, n_heads: int = 8, head_dim: int = 64, decay: float = 0.95, strength: float = 0.1):
        super().__init__()
        if min(dim, n_heads, head_dim) < 1:
            raise ValueError("FastWeightMemory: dim, n_heads, head_dim must be >= 1")
        self.n_heads, self.head_dim, self.decay, self.strength = n_heads, head_dim, decay, strength
        self.qkv = nn.Linear(dim, 3 * n_heads * head_dim, bias=False)
        self.gate = nn.Linear(dim, n_heads)
        self.out_proj = nn.Linear(n_heads * head_dim, dim, bias=False)
        self.last_introspection: dict = {}

    def forward(self, x: torch.Tensor, state: list | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        H, D = self.n_heads, self.head_dim
        q, k, v = (t.view(B, T, H, D) for t in self.qkv(x).chunk(3, dim=-1))        # [B, T, H, D] each
        gate = self.gate(x)                                                           # [B, T, H]
        if state:                                                                     # carried memory: the step loop,
            reads, W = fast_weight_memory(q, k, v, gate, self.decay, self.strength, state[0])  # which kernels replace
        else:                                                                         # a fresh sequence: the parallel form
            reads, W = fast_weight_memory_parallel(q, k, v, gate, self.decay, self.strength)
        if state is not None:
            state[:] = [W]
        self.last_introspection = {"write_gate": torch.sigmoid(gate).detach(),                     # [B, T, H]
                                   "head_utilisation": W.detach().flatten(2).norm(dim=-1),         # [B, H] Frobenius
                                   "read_norm": reads.detach().norm(dim=-1)}                       # [B, T, H]
        return self.out_proj(reads.reshape(B, T, H * D))                              # [B, T, C]


# ----------------------------------------------------------------------------
# Hebbian pathways: which expert combinations fire together, persisted in SQLite
# ----------------------------------------------------------------------------

class HebbianPathways:
    """The write-up's pathway table. For each token, the fired combination of experts (a "pathway",
    named like "0+3") gains `lr`, then every strength is multiplied by `decay`. A pathway that fires on
    every token settles at lr * decay / (1 - decay) (9.99 with the defaults 0.01 and 0.999).

    Saved to and loaded from SQLite (the standard library's sqlite3): plain rows, no pickle; the
    file is written to a temporary name and renamed, so a reader never sees half of it.
    """

    def __init__(self, lr: float = 0.01, decay: float = 0.999):
        if not lr > 0 or not 0 < decay <= 1:
            raise ValueError(f"HebbianPathways: need lr > 0 and decay in (0, 1], got lr={lr}, decay={decay}")
        self.lr, self.decay = lr, decay
        self.strengths: dict[str, float] = {}

    @staticmethod
    def name(experts) -> str:
        return "+".join(str(int(e)) for e in sorted(experts))

    def update(self, expert_index: torch.Tensor) -> None:
        """expert_index: [N, k] chosen experts, tokens in order."""
        if expert_index.dim() != 2:
            raise ValueError(f"HebbianPathways.update expects [N, k] expert indices, got {list(expert_index.shape)}")
        for row in expert_index.tolist():
            self.reinforce(self.name(row))

    def reinforce(self, key: str) -> None:
        """One event: pathway `key` (any string: an expert combination, a specialist's name) gains lr,
        then every strength decays."""
        self.strengths[key] = self.strengths.get(key, 0.0) + self.lr
        for other in self.strengths:
            self.strengths[other] *= self.decay

    def top(self, n: int = 10) -> list[tuple[str, float]]:
        return sorted(self.strengths.items(), key=lambda item: -item[1])[:n]

    def save(self, path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            with sqlite3.connect(tmp) as db:
                db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value REAL NOT NULL)")
                db.execute("CREATE TABLE pathways (name TEXT PRIMARY KEY, strength REAL NOT NULL)")
                db.executemany("INSERT INTO meta VALUES (?, ?)", [("lr", self.lr), ("decay", self.decay)])
                db.executemany("INSERT INTO pathways VALUES (?, ?)", sorted(self.strengths.items()))
            db.close()
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @classmethod
    def load(cls, path) -> "HebbianPathways":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no pathway database at {path}")
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            meta = dict(db.execute("SELECT key, value FROM meta"))
            table = cls(lr=meta["lr"], decay=meta["decay"])
            table.strengths = {str(name): float(s) for name, s in db.execute("SELECT name, strength FROM pathways")}
        except (sqlite3.DatabaseError, KeyError) as err:
            raise ValueError(f"{path} is not a pathway database: {err}") from None
        finally:
            db.close()
        return table


# ----------------------------------------------------------------------------
# The Thalamus: a Mamba layer reads the context, a linear router picks experts
# ----------------------------------------------------------------------------

class Thalamus(nn.Module):
    """Mamba (S6) layer -> linear router -> softmax -> top-k, renormalised (the write-up's diagram).

    Training adds Gaussian noise of std `noise_std` to the logits (exploration, after Shazeer et al.
    2017), and `aux_loss` holds the load-balancing loss, which the model adds to its training loss
    (the public code computes it and never uses it). With a `HebbianPathways` table, every forward
    records the fired combinations; with `pathway_bias` > 0 (off by default, as in the write-up),
    each expert's logit is raised by pathway_bias * log(1 + total strength of pathways using it).
    """

    def __init__(self, dim: int, n_experts: int, top_k: int, d_state: int = 16, noise_std: float = 1.0,
                 pathways: HebbianPathways | None = None, pathway_bias: float = 0.0):
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"Thalamus: top_k must be in [1, n_experts={n_experts}], got {top_k}")
        self.n_experts, self.top_k, self.noise_std = n_experts, top_k, noise_std
        self.mamba = MambaLayer(dim, d_state=d_state)
        self.router = nn.Linear(dim, n_experts, bias=False)
        self.pathways, self.pathway_bias = pathways, pathway_bias
        self.aux_loss = torch.zeros(())
        self.last_introspection: dict = {}

    def expert_bias(self, device=None) -> torch.Tensor:
        """[E] log(1 + summed strength of the pathways each expert belongs to)."""
        totals = torch.zeros(self.n_experts, device=device)
        if self.pathways is not None:
            for name, strength in self.pathways.strengths.items():
                for e in name.split("+"):
                    totals[int(e)] += strength
        return torch.log1p(totals)

    def forward(self, x: torch.Tensor, state=None):
        """x: [B, T, C] -> (top_w [N, k], top_i [N, k]) with N = B * T, tokens in order."""
        B, T, C = x.shape
        context = self.mamba(x, state).reshape(B * T, C)                          # [N, C] sees tokens <= t
        logits = self.router(context)                                             # [N, E]
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()                                               # softmax and top-k in fp32
        if self.training and self.noise_std > 0:
            logits = logits + self.noise_std * torch.randn_like(logits)
        if self.pathway_bias and self.pathways is not None:
            logits = logits + self.pathway_bias * self.expert_bias(logits.device)
        probs = torch.softmax(logits, dim=-1)                                     # [N, E]
        top_p, top_i = probs.topk(self.top_k, dim=-1)                             # [N, k]
        top_w = top_p / top_p.sum(dim=-1, keepdim=True)
        counts = torch.bincount(top_i.flatten(), minlength=self.n_experts)
        self.aux_loss = load_balancing_loss(probs, counts)
        if self.pathways is not None:
            self.pathways.update(top_i.detach().cpu())
        best_two = probs.topk(min(2, self.n_experts), dim=-1).values
        self.last_introspection = {
            "scores": probs.detach().view(B, T, -1),                              # [B, T, E] every expert's score
            "chosen": top_i.detach().view(B, T, -1),                              # [B, T, k]
            "weights": top_w.detach().view(B, T, -1),                             # [B, T, k]
            "confidence": (best_two[:, 0] / best_two[:, -1]).detach().view(B, T),  # top score / second score
            "load": counts.detach(),                                              # [E] token copies per expert
        }
        return top_w, top_i


# ----------------------------------------------------------------------------
# The layer and the model
# ----------------------------------------------------------------------------

@dataclass
class SynapseConfig:
    vocab_size: int = 256            # bytes here; 151,936 (Qwen2.5's) in the write-up
    d_model: int = 128               # C
    n_layers: int = 2                # Synapse layers
    n_experts: int = 4               # E
    top_k: int = 2                   # k
    d_expert: int | None = None      # F: SwiGLU width of one expert; None -> 4 * d_model (the write-up's 3072 = 4 x 768)
    xlstm_hidden: int | None = None  # mLSTM width (all heads); None -> 2 * d_model (1536 = 2 x 768)
    xlstm_heads: int = 4             # mLSTM heads
    xlstm_forget_gate: str = "exp"   # "exp" as written (amplifies the past) or "sigmoid" (see MLSTMLayer)
    memory_heads: int = 2            # fast-weight heads (8 in the write-up)
    memory_head_dim: int = 16        # fast-weight key/value size (64 in the write-up)
    memory_decay: float = 0.95       # fast-weight decay per token
    memory_strength: float = 0.1     # fast-weight write strength
    d_state: int = 16                # Mamba state size in the Thalamus
    router_noise: float = 1.0        # Thalamus logit noise during training
    aux_loss_weight: float = 0.01    # load-balancing loss weight (the public code computes it, then drops it)
    norm_eps: float = 1e-6
    max_seq_len: int = 256
    tie_embeddings: bool = True

    RULES = {"vocab_size": whole(1), "d_model": whole(1), "n_layers": whole(1), "n_experts": whole(1),
             "top_k": whole(1), "d_expert": whole(1, optional=True), "xlstm_hidden": whole(1, optional=True),
             "xlstm_heads": whole(1), "xlstm_forget_gate": choice("exp", "sigmoid"), "memory_heads": whole(1),
             "memory_head_dim": whole(1), "memory_decay": number(0, 1), "memory_strength": number(0),
             "d_state": whole(1), "router_noise": number(0), "aux_loss_weight": number(0),
             "norm_eps": number(0, low_open=True), "max_seq_len": whole(1), "tie_embeddings": flag()}

    def __post_init__(self):
        check_fields(self, self.RULES)
        if self.top_k > self.n_experts:
            raise ValueError(f"top_k={self.top_k} must be <= n_experts={self.n_experts}")
        self.d_expert = self.d_expert or 4 * self.d_model
        self.xlstm_hidden = self.xlstm_hidden or 2 * self.d_model
        if self.xlstm_hidden % self.xlstm_heads:
            raise ValueError(f"xlstm_hidden={self.xlstm_hidden} must be a multiple of xlstm_heads={self.xlstm_heads}")

    @classmethod
    def preset(cls, name: str, **overrides) -> "SynapseConfig":
        """`tiny` (tests, CI), `small` (the book on a CPU) or `paper` (the write-up's table: counted, not trained)."""
        return config_from_preset(cls, SYNAPSE_PRESETS, name, overrides)


SYNAPSE_PRESETS = {  # the arguments of each named size
    "tiny": dict(d_model=32, n_layers=1, n_experts=4, top_k=2, xlstm_heads=2, memory_heads=2, memory_head_dim=8,
                 d_state=4, max_seq_len=64),
    "small": dict(d_model=96, n_layers=2, n_experts=4, top_k=2, xlstm_heads=4, memory_heads=4, memory_head_dim=16,
                  d_state=8, max_seq_len=128),
    "paper": dict(vocab_size=151_936, d_model=768, n_layers=12, n_experts=8, top_k=2, d_expert=3072, xlstm_hidden=1536,
                  xlstm_heads=4, memory_heads=8, memory_head_dim=64, d_state=16, max_seq_len=2048),
}


@dataclass
class SynapseState:
    """What decoding carries per layer: mLSTM (C, n, m), the Thalamus's Mamba state, the fast-weight memory."""
    mlstm: list = field(default_factory=list)
    mamba: MambaState = field(default_factory=MambaState)
    memory: list = field(default_factory=list)


class SynapseLayer(nn.Module):
    """x + mLSTM(norm x); x + experts(norm x) routed by the Thalamus; x + memory(norm x)."""

    def __init__(self, cfg: SynapseConfig):
        super().__init__()
        C = cfg.d_model
        self.norm_xlstm, self.norm_experts, self.norm_memory = (RMSNorm(C, cfg.norm_eps) for _ in range(3))
        self.xlstm = MLSTMLayer(C, cfg.xlstm_hidden, cfg.xlstm_heads, forget_gate=cfg.xlstm_forget_gate)
        self.thalamus = Thalamus(C, cfg.n_experts, cfg.top_k, cfg.d_state, cfg.router_noise)
        self.experts = ExpertPool(C, cfg.d_expert, cfg.n_experts)
        self.memory = FastWeightMemory(C, cfg.memory_heads, cfg.memory_head_dim, cfg.memory_decay, cfg.memory_strength)

    def forward(self, x: torch.Tensor, state: SynapseState | None = None) -> torch.Tensor:
        B, T, C = x.shape
        x = x + self.xlstm(self.norm_xlstm(x), state.mlstm if state is not None else None)
        h = self.norm_experts(x)
        top_w, top_i = self.thalamus(h, state.mamba if state is not None else None)  # [N, k] each
        routed, _ = self.experts(h.reshape(B * T, C), top_i, top_w)                 # [N, C]
        x = x + routed.view(B, T, C)
        return x + self.memory(self.norm_memory(x), state.memory if state is not None else None)


class SynapseLM(nn.Module):
    """Embedding -> Synapse layers -> RMSNorm -> unembedding; loss = next-token CE + weighted balance loss."""

    def __init__(self, cfg: SynapseConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(SynapseLayer(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.unembed = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.unembed.weight = self.embed.weight
        init_lm_weights(self)

    def num_parameters(self) -> int:
        return count_parameters(self)

    def new_state(self, batch_size: int | None = None) -> list[SynapseState]:
        """Empty per-layer states. Given `batch_size`, the mLSTM and memory states start as explicit zeros,
        so even the first call runs the step loops (the ops kernels replace) rather than the parallel forms."""
        states = [SynapseState() for _ in self.layers]
        if batch_size is not None:
            if batch_size < 1:
                raise ValueError(f"new_state: batch_size must be >= 1, got {batch_size}")
            p = self.embed.weight
            for state, layer in zip(states, self.layers):
                H, D = layer.xlstm.n_heads, layer.xlstm.head_dim
                state.mlstm[:] = [(p.new_zeros(batch_size, H, D, D), p.new_zeros(batch_size, H, D),
                                   p.new_zeros(batch_size, H))]
                M, Dm = layer.memory.n_heads, layer.memory.head_dim
                state.memory[:] = [p.new_zeros(batch_size, M, Dm, Dm)]
        return states

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, states: list[SynapseState] | None = None):
        """idx: [B, T] -> (logits [B, T, V], loss or None). `states` carries every layer's memory across calls."""
        check_token_ids("SynapseLM", idx, self.cfg.max_seq_len, self.cfg.vocab_size)
        if states is not None and len(states) != len(self.layers):
            raise ValueError(f"need one SynapseState per layer ({len(self.layers)}), got {len(states)}")
        x = self.embed(idx)                                                          # [B, T, C]
        for i, layer in enumerate(self.layers):
            x = layer(x, states[i] if states is not None else None)
        logits = self.unembed(self.norm(x))                                          # [B, T, V]
        if targets is None:
            return logits, None
        check_targets("SynapseLM", targets, idx, self.cfg.vocab_size)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        aux = sum(layer.thalamus.aux_loss for layer in self.layers)
        return logits, loss + self.cfg.aux_loss_weight * aux


def synapse_parameter_count(cfg: SynapseConfig) -> dict:
    """Total and active-per-token parameters of SynapseLM(cfg), by part, without building it."""
    C, E, k, Fx, h, H = cfg.d_model, cfg.n_experts, cfg.top_k, cfg.d_expert, cfg.xlstm_hidden, cfg.xlstm_heads
    Dm, N = 2 * C, cfg.d_state                                                       # Mamba: expand 2
    dt_rank = math.ceil(C / 16)
    mlstm = C * 3 * h + C * 2 * H + 2 * H + C * h + h + h * C
    mamba = C * 2 * Dm + Dm * 4 + Dm + Dm * (dt_rank + 2 * N) + dt_rank * Dm + Dm + Dm * N + Dm + Dm * C
    router = C * E
    expert = 3 * C * Fx
    Mh, Md = cfg.memory_heads, cfg.memory_head_dim
    memory = C * 3 * Mh * Md + C * Mh + Mh + Mh * Md * C
    per_layer_common = mlstm + mamba + router + memory + 3 * C
    embedding = cfg.vocab_size * C
    top = embedding + (0 if cfg.tie_embeddings else embedding) + C
    return {
        "total": top + cfg.n_layers * (per_layer_common + E * expert),
        "active_per_token": top + cfg.n_layers * (per_layer_common + k * expert),
        "parts": {"embedding": embedding, "unembedding": 0 if cfg.tie_embeddings else embedding,
                  "mlstm": cfg.n_layers * mlstm, "thalamus": cfg.n_layers * (mamba + router),
                  "experts": cfg.n_layers * E * expert, "fast_weight_memory": cfg.n_layers * memory,
                  "norms": cfg.n_layers * 3 * C + C},
    }
