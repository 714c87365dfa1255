"""TITAN Synapse (seed 004): the modules of the Synapse layer, the layer, and the model.

The write-up's layer: RMSNorm -> xLSTM (mLSTM) -> residual; RMSNorm -> Thalamus router -> experts
-> residual; RMSNorm -> fast-weight memory -> residual. This file holds the mLSTM layer, the
fast-weight memory layer, the Hebbian pathway table (SQLite), the Thalamus router (a
`refimpl.ssm.MambaLayer` feeding a linear router; the experts are `refimpl.blocks.ExpertPool`), the
layer, the model and its parameter arithmetic.

The two recurrences are ops, each in its own file with its equations: `refimpl.ops.mlstm` (xLSTM's
matrix memory, Beck et al. 2024, arXiv:2405.04517) and `refimpl.ops.fast_weight_memory`.

Does not include: the sLSTM or the xLSTM paper's block structure (the write-up's module has neither),
or anything fast: see kernels/.
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

from refimpl import ops
from refimpl.blocks import (ExpertPool, RMSNorm, check_targets, check_token_ids, config_from_preset, count_parameters,
                            init_lm_weights, load_balancing_loss)
from refimpl.config import check_fields, choice, flag, number, whole
from refimpl.io import hold_writer_lock, remove_dead_temporaries, temporary_name_prefix
from refimpl.ssm import MambaLayer, MambaState


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
            h, new_state = ops.mlstm_parallel(q, k, v, i_pre, f_pre, return_state=True)   # training: T^2 but ~17x faster
        elif self.stabilised:
            h, new_state = ops.mlstm(q, k, v, i_pre, f_pre, start)                        # the op a kernel may replace
        else:
            h, new_state = ops.mlstm_recurrent(q, k, v, i_pre, f_pre, start, stabilised=False, gate_clamp=20.0)
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
            reads, W = ops.fast_weight_memory(q, k, v, gate, self.decay, self.strength, state[0])  # which kernels replace
        else:                                                                         # a fresh sequence: the parallel form
            reads, W = ops.fast_weight_memory_parallel(q, k, v, gate, self.decay, self.strength)
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

    Saved to and loaded from SQLite (the standard library's sqlite3): plain rows, no pickle. One writer at
    a time: `save` holds an OS lock on ".<name>.lock" beside the database (a second writer is refused with
    a clear error), removes the temporary files and journals a dead writer left, writes a temporary file
    and renames it, so a reader never sees half of it. `load` checks every row: names are non-empty
    strings, strengths finite and >= 0, lr and decay in range, and every failure names the file.
    """

    def __init__(self, lr: float = 0.01, decay: float = 0.999):
        for name, value in (("lr", lr), ("decay", decay)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"HebbianPathways: {name} must be a finite number, got {value!r}")
        if not lr > 0 or not 0 < decay <= 1:
            raise ValueError(f"HebbianPathways: need lr > 0 and decay in (0, 1], got lr={lr}, decay={decay}")
        self.lr, self.decay = lr, decay
        self.strengths: dict[str, float] = {}

    @staticmethod
    def name(experts) -> str:
        return "+".join(str(int(e)) for e in sorted(experts))

    def update(self, expert_index: torch.Tensor) -> None:
        """expert_index: [N, k] chosen experts (an integer tensor, each >= 0), tokens in order."""
        if (not isinstance(expert_index, torch.Tensor) or expert_index.dim() != 2
                or expert_index.dtype not in (torch.int32, torch.int64)):
            raise ValueError(f"HebbianPathways.update expects [N, k] integer expert indices, got "
                             f"{getattr(expert_index, 'dtype', type(expert_index).__name__)} "
                             f"{list(getattr(expert_index, 'shape', []))}")
        if expert_index.numel() and int(expert_index.min()) < 0:
            raise ValueError(f"HebbianPathways.update: expert indices must be >= 0, got {int(expert_index.min())}")
        for row in expert_index.tolist():
            self.reinforce(self.name(row))

    def reinforce(self, key: str) -> None:
        """One event: pathway `key` (any non-empty string: an expert combination, a specialist's name) gains
        lr, then every strength decays."""
        if not isinstance(key, str) or not key:
            raise ValueError(f"HebbianPathways.reinforce: a pathway is named by a non-empty string, got {key!r}")
        self.strengths[key] = self.strengths.get(key, 0.0) + self.lr
        for other in self.strengths:
            self.strengths[other] *= self.decay

    def top(self, n: int = 10) -> list[tuple[str, float]]:
        return sorted(self.strengths.items(), key=lambda item: -item[1])[:n]

    def save(self, path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = hold_writer_lock(path.parent / f".{path.name}.lock",
                                f"HebbianPathways.save: {path} is being written by another writer (process "
                                "{holder}); one writer per pathway database at a time")
        try:
            remove_dead_temporaries(path)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temporary_name_prefix(path), suffix=".tmp")
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
                for leftover in (tmp, tmp + "-journal"):
                    if os.path.exists(leftover):
                        os.unlink(leftover)
        finally:
            lock.close()

    @classmethod
    def load(cls, path) -> "HebbianPathways":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no pathway database at {path}")
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
        try:
            meta = dict(db.execute("SELECT key, value FROM meta"))
            rows = list(db.execute("SELECT name, strength FROM pathways"))
        except sqlite3.OperationalError as err:
            if "locked" in str(err):
                raise RuntimeError(f"HebbianPathways.load: {path} is locked by another process (an open write "
                                   f"transaction); try again when it has finished") from None
            raise ValueError(f"HebbianPathways.load: {path} is not a pathway database: {err}") from None
        except sqlite3.DatabaseError as err:
            raise ValueError(f"HebbianPathways.load: {path} is not a pathway database: {err}") from None
        finally:
            db.close()
        try:
            table = cls(lr=meta["lr"], decay=meta["decay"])
        except KeyError as err:
            raise ValueError(f"HebbianPathways.load: {path} is not a pathway database: its meta table lacks {err}") \
                from None
        except ValueError as err:
            raise ValueError(f"HebbianPathways.load: {path}: {err}") from None
        for name, strength in rows:
            if not isinstance(name, str) or not name:
                raise ValueError(f"HebbianPathways.load: {path}: a pathway name must be a non-empty string, got {name!r}")
            if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not (
                    math.isfinite(strength) and strength >= 0):
                raise ValueError(f"HebbianPathways.load: {path}: pathway {name!r} has strength {strength!r}; "
                                 "strengths are finite numbers >= 0")
            table.strengths[name] = float(strength)
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
                experts = name.split("+")
                if not all(e.isdigit() and int(e) < self.n_experts for e in experts):
                    raise ValueError(f"Thalamus: pathway {name!r} does not name experts of this router: expected "
                                     f"expert numbers 0..{self.n_experts - 1} joined by '+', like '0+3'")
                for e in experts:
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
            self.pathways.update(top_i.detach().cpu())   # cpu-ok: the pathways are counts kept in Python and SQLite
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
