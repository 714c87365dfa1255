"""H-ENN, "Hybrid Empty Neural Networks" (seed 001): a state-space backbone with a sliding-window
attention layer every fourth layer, trained in "ticks" that carry the state, saved to disk and
resumed, weight-averaged, initialised from the data, and shipped as a bit-packed INT6 / INT4 artifact.

The write-up (shalyhinpavel/ENN) describes: a "Mamba-3 / GDN" backbone with MIMO and a complex
state; every 4th layer sliding-window attention ("an exact-match L1 cache"); tick-based truncated
BPTT, "detaching the gradient graph at each step while maintaining the continuous flow of the
compressed state", so memory is "O(1) w.r.t. sequence length"; agents that "sleep" by writing
their states to disk; stochastic weight averaging (its "SWA") and "data-dependent initialisation";
12 layers of width 768, ~36M parameters, INT6 deployment in 15.9 MB. Its public code (see the chapter) has none of the
Mamba-3, window, carried state, INT6 or weight averaging. This module builds each of them:

    HENNConfig / HENN_PRESETS   sizes: `tiny` (tests), `small` (the book on a CPU), `medium` (the gpu
                                profile), `paper` (the table)
    HENNLM                      embedding -> layers -> RMSNorm -> tied unembedding + output bias
                                layer i mixes tokens with Mamba3Layer (or GatedDeltaNet) or, when
                                (i + 1) % attention_every == 0, with sliding-window GQA; then a SwiGLU
    henn_parameter_count        parameters by part, without building the model
    tick_backward               one batch through in ticks: carried state, detached between ticks
    SavedTensorMeter            bytes autograd holds for backward (how "memory" is measured here)
    save_states / load_states   every layer's state to a checked tensor file and back
    WeightAverage               stochastic weight averaging (Izmailov et al. 2018, arXiv:1803.05407)
    unigram_output_bias, bigram_embeddings    initialisation from the training bytes
    write_artifact / read_artifact / artifact_budget    the quantised model file and its size
    quantization_aware          training steps taken at the rounded weights (straight-through estimator)
    associative_recall_batch, recall_loss    the retrieval task behind "SSM + sliding-window attention"

Glossary: B batch, T tokens, C width, V vocabulary, L layers, tick = tokens per truncated-BPTT step.

Does not include: the write-up's tokenizer (bytes here: V = 256 for `tiny`/`small`; `paper` counts
the challenge's 1,024-token vocabulary), bfloat16 weights (only bf16 autocast of the forward, as
`tick_backward(autocast="bf16")`), or the challenge's FineWeb data.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from refimpl import ops, quant
from refimpl.blocks import (GroupedQueryAttention, KVCache, RMSNorm, SwiGLU, check_targets, check_token_ids,
                            config_from_preset, count_parameters, init_lm_weights)
from refimpl.config import check_fields, choice, flag, number, whole
from refimpl.gated_deltanet import GatedDeltaNet, GatedDeltaNetState
from refimpl.io import read_tensors, write_tensors
from refimpl.mamba3 import Mamba3Layer, Mamba3State

BACKBONES = ("mamba3", "gdn")


@dataclass
class HENNConfig:
    vocab_size: int = 256            # V: bytes (the challenge's tokenizer has 1,024 tokens)
    d_model: int = 128               # C
    n_layers: int = 4                # L
    backbone: str = "mamba3"         # "mamba3" (Lahoti et al. 2026) or "gdn" (Gated DeltaNet)
    attention_every: int = 4         # layer i is attention when (i + 1) % attention_every == 0; 0: none
    window: int = 64                 # W: tokens a sliding-window query sees (itself and W - 1 back)
    n_heads: int = 4                 # attention query heads
    n_kv_heads: int = 2              # attention key/value heads (GQA)
    ssm_head_dim: int = 16           # Mamba-3 P, or Gated DeltaNet's key and value head size
    d_state: int = 16                # Mamba-3 N
    expand: int = 2                  # Mamba-3 inner width = expand * C
    mimo_rank: int = 2               # Mamba-3 R
    rope_fraction: float = 0.5       # share of Mamba-3's state that rotates (complex); 0: real
    ffn_hidden: int | None = None    # SwiGLU width; None -> 8/3 C rounded up to 32; 0 -> no feed-forward
    max_seq_len: int = 512           # longest sequence one forward call accepts (ticks can run on forever)
    norm_eps: float = 1e-6
    tie_embeddings: bool = True

    RULES = {"vocab_size": whole(1), "d_model": whole(1), "n_layers": whole(1), "backbone": choice(*BACKBONES),
             "attention_every": whole(0), "window": whole(1), "n_heads": whole(1), "n_kv_heads": whole(1),
             "ssm_head_dim": whole(1), "d_state": whole(1), "expand": whole(1), "mimo_rank": whole(1),
             "rope_fraction": number(0, 1), "ffn_hidden": whole(0, optional=True), "max_seq_len": whole(1),
             "norm_eps": number(0, low_open=True), "tie_embeddings": flag()}

    def __post_init__(self):
        check_fields(self, self.RULES)
        if self.d_model % self.n_heads or self.n_heads % self.n_kv_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(f"attention needs d_model={self.d_model} divisible by n_heads={self.n_heads}, n_heads a "
                             f"multiple of n_kv_heads={self.n_kv_heads}, and an even head size for RoPE")
        inner = self.expand * self.d_model if self.backbone == "mamba3" else self.d_model
        if inner % self.ssm_head_dim:
            raise ValueError(f"ssm_head_dim={self.ssm_head_dim} must divide the {self.backbone} width {inner}")
        if self.ffn_hidden is None:
            self.ffn_hidden = 32 * math.ceil(8 * self.d_model / 3 / 32)

    @classmethod
    def preset(cls, name: str, **overrides) -> "HENNConfig":
        """`tiny` (tests, CI), `small` (the book on a CPU), `medium` (the gpu profile) or `paper` (the write-up's
        table: counted, not trained)."""
        return config_from_preset(cls, HENN_PRESETS, name, overrides)

    def layer_kinds(self) -> list[str]:
        """What mixes tokens in each layer: "attention" or the backbone's name."""
        every = self.attention_every
        return ["attention" if every and (i + 1) % every == 0 else self.backbone for i in range(self.n_layers)]


HENN_PRESETS = {  # the arguments of each named size
    "tiny": dict(d_model=32, n_layers=4, window=16, n_heads=2, n_kv_heads=1, ssm_head_dim=8, d_state=8,
                 mimo_rank=2, max_seq_len=128),
    "small": dict(d_model=96, n_layers=4, window=64, n_heads=4, n_kv_heads=2, ssm_head_dim=16, d_state=16,
                  mimo_rank=2, max_seq_len=512),
    # The gpu profile's size: twice the width and depth of `small`, a 128-token window, 4,096-token calls.
    "medium": dict(d_model=256, n_layers=8, window=128, n_heads=8, n_kv_heads=4, ssm_head_dim=32, d_state=32,
                   mimo_rank=2, max_seq_len=4096),
    # The write-up's table: 12 layers of width 768, one attention layer in four. Vocabulary and the
    # Mamba-3 sizes are the challenge's (1,024 tokens) and the Mamba-3 reference's (head 64, MIMO 4).
    "paper": dict(vocab_size=1024, d_model=768, n_layers=12, window=512, n_heads=12, n_kv_heads=4,
                  ssm_head_dim=64, d_state=64, mimo_rank=4, max_seq_len=2048),
}


# ----------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------

@dataclass
class HENNState:
    """One layer's state between calls: a Mamba3State, a GatedDeltaNetState or the attention's KVCache."""
    kind: str
    mixer: Mamba3State | GatedDeltaNetState | KVCache = None


class HENNLayer(nn.Module):
    """x + mixer(RMSNorm x); then x + SwiGLU(RMSNorm x) when the config has a feed-forward."""

    def __init__(self, cfg: HENNConfig, kind: str):
        super().__init__()
        C = cfg.d_model
        self.kind = kind
        self.norm_mix = RMSNorm(C, cfg.norm_eps)
        if kind == "attention":
            self.mixer = GroupedQueryAttention(C, cfg.n_heads, cfg.n_kv_heads, window=cfg.window)
        elif kind == "mamba3":
            self.mixer = Mamba3Layer(C, d_state=cfg.d_state, expand=cfg.expand, head_dim=cfg.ssm_head_dim,
                                     mimo_rank=cfg.mimo_rank, rope_fraction=cfg.rope_fraction)
        else:
            self.mixer = GatedDeltaNet(C, C // cfg.ssm_head_dim, head_dim=cfg.ssm_head_dim)
        self.norm_ffn = RMSNorm(C, cfg.norm_eps) if cfg.ffn_hidden else None
        self.ffn = SwiGLU(C, cfg.ffn_hidden) if cfg.ffn_hidden else None

    def new_state(self) -> HENNState:
        mixer = {"attention": KVCache, "mamba3": Mamba3State, "gdn": GatedDeltaNetState}[self.kind]()
        return HENNState(self.kind, mixer)

    def forward(self, x: torch.Tensor, state: HENNState | None = None) -> torch.Tensor:
        x = x + self.mixer(self.norm_mix(x), state.mixer if state is not None else None)
        return x + self.ffn(self.norm_ffn(x)) if self.ffn is not None else x


class HENNLM(nn.Module):
    """Embedding -> HENN layers -> RMSNorm -> unembedding (+ a learned output bias, the unigram prior's home)."""

    def __init__(self, cfg: HENNConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(HENNLayer(cfg, kind) for kind in cfg.layer_kinds())
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.unembed = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.output_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        if cfg.tie_embeddings:
            self.unembed.weight = self.embed.weight
        init_lm_weights(self)

    def num_parameters(self) -> int:
        return count_parameters(self)

    def new_state(self) -> list[HENNState]:
        """Empty states, one per layer: pass them to successive calls to carry the sequence on."""
        return [layer.new_state() for layer in self.layers]

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, states: list[HENNState] | None = None):
        """idx: [B, T] -> (logits [B, T, V], mean next-token cross-entropy or None). `states` is carried."""
        check_token_ids("HENNLM", idx, self.cfg.max_seq_len, self.cfg.vocab_size)
        if states is not None and [s.kind for s in states] != self.cfg.layer_kinds():
            raise ValueError(f"states must be one HENNState per layer of kinds {self.cfg.layer_kinds()}, "
                             f"got {[getattr(s, 'kind', type(s).__name__) for s in states]}")
        x = self.embed(idx)                                                          # [B, T, C]
        for i, layer in enumerate(self.layers):
            x = layer(x, states[i] if states is not None else None)
        logits = self.unembed(self.norm(x)) + self.output_bias                      # [B, T, V]
        if targets is None:
            return logits, None
        check_targets("HENNLM", targets, idx, self.cfg.vocab_size)
        return logits, F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def henn_parameter_count(cfg: HENNConfig) -> dict:
    """Parameters of HENNLM(cfg) by part, without building it (a test checks it against built models)."""
    C, V = cfg.d_model, cfg.vocab_size
    D = C // cfg.n_heads
    attention = C * cfg.n_heads * D * 2 + C * cfg.n_kv_heads * D * 2
    if cfg.backbone == "mamba3":
        Di = cfg.expand * C
        H, P, N, R = Di // cfg.ssm_head_dim, cfg.ssm_head_dim, cfg.d_state, cfg.mimo_rank
        K = int(N * cfg.rope_fraction) // 2
        backbone = (C * 2 * Di + 3 * C * H + C * K + 2 * C * R * N + 2 * N + 2 * H * R * N + 2 * H
                    + (3 * H * R * P if R > 1 else 0) + Di * C)
    else:
        H, Kd = C // cfg.ssm_head_dim, cfg.ssm_head_dim
        width = H * 3 * Kd                                                          # q, k, v (value size = key size)
        backbone = C * width + width * 4 + 2 * C * H + 2 * H + C * H * Kd + Kd + H * Kd * C
    ffn = (3 * C * cfg.ffn_hidden + C) if cfg.ffn_hidden else 0                    # SwiGLU and its norm
    kinds = cfg.layer_kinds()
    n_attention = kinds.count("attention")
    n_backbone = len(kinds) - n_attention
    parts = {"embedding": V * C, "unembedding": 0 if cfg.tie_embeddings else V * C,
             "output_bias_and_norm": V + C, f"{cfg.backbone}_layers": n_backbone * (backbone + C),
             "attention_layers": n_attention * (attention + C), "feed_forward": cfg.n_layers * ffn}
    return {"total": sum(parts.values()), "parts": parts}


# ----------------------------------------------------------------------------
# Ticks: truncated backpropagation through time with a carried state
# ----------------------------------------------------------------------------

def detach_states(states: list[HENNState]) -> None:
    """Cut the autograd graph behind every layer's state, in place; the values flow on."""
    for s in states:
        m = s.mixer
        if isinstance(m, Mamba3State) and m.scan is not None:
            m.scan = ops.Mamba3ScanState(*(t.detach() if t is not None else None for t in m.scan))
        elif isinstance(m, GatedDeltaNetState):
            m.S = m.S.detach() if m.S is not None else None
            m.conv = m.conv.detach() if m.conv is not None else None
        elif isinstance(m, KVCache) and m.k is not None:
            m.k, m.v = m.k.detach(), m.v.detach()


def tick_backward(model: HENNLM, x: torch.Tensor, y: torch.Tensor, tick: int, states: list[HENNState] | None = None,
                  truncate: bool = True, autocast: str = "none") -> float:
    """Run one batch x, y [B, T] through `model` in ticks of `tick` tokens and accumulate gradients.

    The state of every layer (SSM states, the attention window's keys and values) is carried from
    tick to tick. truncate=True detaches it between ticks and calls backward after each tick, so
    autograd only ever holds one tick's graph: memory depends on the tick, not on T. truncate=False
    keeps the whole graph and calls backward once: full BPTT through the same computation.
    The loss is the mean over all T tokens either way; returns it (nats per token).
    autocast="bf16" runs each tick's forward under torch.autocast in bfloat16 (the write-up's "BFloat16
    training"); the backward runs outside it, and the weights stay float32.
    """
    if not isinstance(tick, int) or tick < 1:
        raise ValueError(f"tick must be a positive int, got {tick!r}")
    if autocast not in ("none", "bf16"):
        raise ValueError(f"autocast must be 'none' or 'bf16', got {autocast!r}")
    if x.shape != y.shape or x.dim() != 2:
        raise ValueError(f"x and y must both be [B, T], got {list(x.shape)} and {list(y.shape)}")
    states = states if states is not None else model.new_state()
    T = x.shape[1]
    total, kept = 0.0, []
    for lo in range(0, T, tick):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast == "bf16"):
            _, loss = model(x[:, lo:lo + tick], y[:, lo:lo + tick], states)
        share = loss.float() * (min(tick, T - lo) / T)                              # this tick's part of the mean
        total += share.item()
        if truncate:
            share.backward()
            detach_states(states)
        else:
            kept.append(share)
    if not truncate:
        torch.stack(kept).sum().backward()
    return total


class SavedTensorMeter:
    """Measures the bytes autograd keeps for the backward pass, the memory that grows with T.

        meter = SavedTensorMeter()
        with meter:
            tick_backward(model, x, y, tick)
        meter.peak_bytes

    Every tensor saved for backward is counted once per storage (views of one buffer count once)
    from when it is saved until autograd frees it (after its backward, or when the graph is dropped);
    `peak_bytes` is the largest total alive at any moment. Parameters saved by reference count too
    (they are the same at every T).
    """

    def __init__(self):
        self.live: dict[int, list[int]] = {}          # storage pointer -> [references, bytes]
        self.current = self.peak_bytes = 0
        self._hooks = None

    def _pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        key, nbytes = storage.data_ptr(), storage.nbytes()
        entry = self.live.setdefault(key, [0, nbytes])
        if entry[0] == 0:
            self.current += nbytes
            self.peak_bytes = max(self.peak_bytes, self.current)
        entry[0] += 1
        return _Saved(t, self, key)

    def _release(self, key: int) -> None:
        entry = self.live[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]
            del self.live[key]

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda saved: saved.tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


class _Saved:
    """A tensor autograd saved; tells its meter when autograd lets go of it."""

    def __init__(self, tensor, meter, key):
        self.tensor, self.meter, self.key = tensor, meter, key

    def __del__(self):
        self.meter._release(self.key)


# ----------------------------------------------------------------------------
# State swapping: every layer's state to a file and back
# ----------------------------------------------------------------------------

def state_tensors(states: list[HENNState]) -> tuple[dict[str, torch.Tensor], dict]:
    """Flatten per-layer states to {"i.field": tensor} plus JSON metadata (kinds, cache positions)."""
    tensors, seen = {}, {}
    for i, s in enumerate(states):
        m = s.mixer
        if isinstance(m, Mamba3State):
            fields = m.scan._asdict() if m.scan is not None else {}
        elif isinstance(m, GatedDeltaNetState):
            fields = {"S": m.S, "conv": m.conv}
        else:
            fields, seen[str(i)] = {"k": m.k, "v": m.v}, m.seen
        tensors.update({f"{i}.{name}": t.detach() for name, t in fields.items() if t is not None})
    return tensors, {"kinds": [s.kind for s in states], "seen": seen}


def save_states(path, states: list[HENNState]) -> Path:
    """Write every layer's state to `path` (atomically, with a checksum; a tensor file, not a pickle)."""
    tensors, meta = state_tensors(states)
    return write_tensors(path, tensors, {"format": "henn-states-1", **meta})


def load_states(path, model: HENNLM, device=None) -> list[HENNState]:
    """The states `save_states` wrote, rebuilt for `model` (refused, with the reason, if they do not fit it)."""
    tensors, meta = read_tensors(path)
    if meta.get("format") != "henn-states-1":
        raise ValueError(f"{path} does not hold H-ENN states (format {meta.get('format')!r})")
    if meta["kinds"] != model.cfg.layer_kinds():
        raise ValueError(f"{path} holds states for layers {meta['kinds']}, the model has {model.cfg.layer_kinds()}")
    device = device or model.embed.weight.device
    states = model.new_state()
    for i, s in enumerate(states):
        get = {name.split(".", 1)[1]: t.to(device) for name, t in tensors.items() if name.split(".")[0] == str(i)}
        m = s.mixer
        if isinstance(m, Mamba3State):
            m.scan = ops.Mamba3ScanState(**{f: get.get(f) for f in ops.Mamba3ScanState._fields}) if get else None
        elif isinstance(m, GatedDeltaNetState):
            m.S, m.conv = get.get("S"), get.get("conv")
        else:
            m.k, m.v, m.seen = get.get("k"), get.get("v"), int(meta["seen"].get(str(i), 0))
    return states


# ----------------------------------------------------------------------------
# Stochastic weight averaging and initialisation from the data
# ----------------------------------------------------------------------------

class WeightAverage:
    """The running mean of a model's parameters over the steps `update` is called at: stochastic weight
    averaging (the write-up's "SWA"; this book does not use the letters, which also name sliding-window attention).

    Averaging the late, noisy iterates of SGD lands nearer the middle of a wide minimum than any
    single one (Izmailov et al. 2018). The model trains on unchanged; `copy_to` writes the average."""

    def __init__(self):
        self.count = 0
        self.mean: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.count += 1
        for name, p in model.named_parameters():
            if name not in self.mean:
                self.mean[name] = p.detach().clone().float()
            else:
                self.mean[name] += (p.detach().float() - self.mean[name]) / self.count

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        if not self.count:
            raise ValueError("WeightAverage.copy_to: no weights averaged yet (call update first)")
        for name, p in model.named_parameters():
            p.copy_(self.mean[name].to(p.dtype))


def _byte_counts(data: torch.Tensor, vocab_size: int) -> torch.Tensor:
    if not isinstance(data, torch.Tensor) or data.dim() != 1 or data.numel() < 2:
        raise ValueError("need the training tokens as a 1-D tensor of at least two ids")
    return torch.bincount(data.long(), minlength=vocab_size)[:vocab_size].double()


@torch.no_grad()
def unigram_output_bias(model: HENNLM, data: torch.Tensor) -> torch.Tensor:
    """Set the output bias to the log-frequencies of the training tokens (add-one smoothed), so the
    untrained model already predicts the unigram distribution. Returns the bias [V]."""
    counts = _byte_counts(data, model.cfg.vocab_size) + 1
    model.output_bias.copy_(torch.log(counts / counts.sum()).to(model.output_bias.dtype))
    return model.output_bias.detach().clone()


@torch.no_grad()
def bigram_embeddings(model: HENNLM, data: torch.Tensor, std: float = 0.02) -> torch.Tensor:
    """Set the embedding to the top-C singular directions of the bigram table: row a of
    M = log P(next | a) - log P(next) (add-one smoothed, centred) factors as U S W^T, and token a's
    embedding is U[a, :C] sqrt(S), scaled to `std`. Tokens followed by similar bytes start close."""
    V, C = model.cfg.vocab_size, model.cfg.d_model
    ids = data.long()
    pairs = torch.bincount(ids[:-1] * V + ids[1:], minlength=V * V)[:V * V].double().view(V, V) + 1
    log_next = torch.log(pairs / pairs.sum(dim=1, keepdim=True))                 # [V, V] log P(b | a)
    M = log_next - torch.log(pairs.sum(dim=0) / pairs.sum())                     # minus log P(b)
    M = M - M.mean(dim=0)
    U, S, _ = torch.linalg.svd(M)
    k = min(C, V)
    E = torch.zeros(V, C, dtype=torch.float64)
    E[:, :k] = U[:, :k] * S[:k].sqrt()
    E = E * (std / E.std())
    model.embed.weight.copy_(E.to(model.embed.weight.dtype))
    return E.float()


# ----------------------------------------------------------------------------
# The artifact: code bytes + the compressed, quantised model
# ----------------------------------------------------------------------------

#: what running the artifact imports: these files, and every .py file in a folder named here
CODE_FILES = ("refimpl/__init__.py", "refimpl/henn.py", "refimpl/mamba3.py", "refimpl/gated_deltanet.py",
              "refimpl/blocks.py", "refimpl/config.py", "refimpl/quant.py", "refimpl/io.py", "refimpl/ops")
ARTIFACT_LIMIT = 16_000_000      # the challenge's cap, bytes: code plus compressed model
ARTIFACT_BITS = (4, 6, 8, 32)    # 32: float32, unquantised


def quantizable(name: str, p: torch.Tensor) -> bool:
    """Which parameters are quantised: matrices with rows of at least 16 values (every projection and
    the embedding); norms, biases and the small per-head tensors stay float32 (about 1% of the total)."""
    return p.dim() == 2 and p.shape[1] >= 16


def _quantised_tensors(model: nn.Module, bits: int, packed: bool) -> dict[str, torch.Tensor]:
    if bits not in ARTIFACT_BITS:
        raise ValueError(f"bits must be one of {ARTIFACT_BITS}, got {bits!r}")
    tensors = {}
    for name, p in model.state_dict().items():
        if name == "unembed.weight" and getattr(model.cfg, "tie_embeddings", False):
            continue                                                                # the embedding, stored once
        p = p.detach().float().cpu()                 # cpu-ok: the artifact is bytes on disk
        if bits == 32 or not quantizable(name, p):
            tensors[name] = p
            continue
        q, scale = quant.quantize_per_row(p, bits)
        tensors[f"{name}:q{bits}"] = ops.pack_bits(q, bits) if packed and bits < 8 else q
        tensors[f"{name}:scale"] = scale
    return tensors


def quantization_aware(forward_backward, bits: int):
    """Wrap a `forward_backward(model, x, y) -> loss` so it runs with every quantizable weight rounded to
    `bits` (per row, as the artifact will) and then puts the float weights back: the gradient is taken at
    the rounded weights and applied to the float ones, the straight-through estimator
    (`quant.fake_quantize` does the same thing inside autograd). Training this way learns weights
    that survive the rounding."""
    quant.quantize_per_row(torch.zeros(1, 1), bits)                                # refuses bad bits up front

    def step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
        floats = {}
        with torch.no_grad():
            for name, p in model.named_parameters():
                if quantizable(name, p):
                    floats[name] = p.detach().clone()
                    p.copy_(quant.fake_quantize(p, bits))
        try:
            return forward_backward(model, x, y)
        finally:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name in floats:
                        p.copy_(floats[name])
    return step


def code_bytes(root: str | Path | None = None) -> int:
    """Bytes of the source files the artifact needs to run (counted raw, as the challenge counts code)."""
    root = Path(root) if root is not None else Path(__file__).resolve().parent.parent
    files = [path for f in CODE_FILES
             for path in (sorted((root / f).glob("*.py")) if (root / f).is_dir() else [root / f])]
    return sum(path.stat().st_size for path in files)


def write_artifact(path, model: HENNLM, bits: int, packed: bool = True) -> dict:
    """Quantise `model` per row to `bits`, pack (INT6: 4 values in 3 bytes; INT4: 2 per byte), compress
    with lzma and write atomically. packed=False keeps each value in an int8 byte instead (as the
    challenge's "INT6" entries do, leaving the squeezing to the compressor). Returns the sizes:
    model_bytes (the file's length), code_bytes, total_bytes and the margin to ARTIFACT_LIMIT."""
    tensors = _quantised_tensors(model, bits, packed)
    meta = {"format": "henn-artifact-1", "bits": bits, "packed": packed, "config": asdict(model.cfg)}
    path = write_tensors(path, tensors, meta, compress=True)
    model_bytes, code = path.stat().st_size, code_bytes()
    return {"bits": bits, "packed": packed, "model_bytes": model_bytes, "code_bytes": code,
            "total_bytes": model_bytes + code, "under_limit_by": ARTIFACT_LIMIT - model_bytes - code}


def read_artifact(path) -> HENNLM:
    """Rebuild the model an artifact holds, its weights dequantised (float32)."""
    tensors, meta = read_tensors(path)
    if meta.get("format") != "henn-artifact-1":
        raise ValueError(f"{path} is not an H-ENN artifact (format {meta.get('format')!r})")
    cfg, bits = HENNConfig(**meta["config"]), meta["bits"]
    model = HENNLM(cfg)
    state = {}
    for name, p in model.state_dict().items():
        if name in tensors:
            state[name] = tensors[name]
        elif f"{name}:scale" in tensors:
            q, scale = tensors[f"{name}:q{bits}"], tensors[f"{name}:scale"]
            state[name] = (ops.dequantize_packed(q, scale, p.shape[1], bits) if q.dtype == torch.uint8
                           else quant.dequantize_per_row(q, scale))
        elif name == "unembed.weight" and cfg.tie_embeddings:
            continue                                                                # filled in below
        else:
            raise ValueError(f"{path} has no tensor for parameter {name!r}")
    if cfg.tie_embeddings:
        state["unembed.weight"] = state["embed.weight"]
    model.load_state_dict(state)
    return model


def artifact_budget(cfg: HENNConfig, bits: int) -> dict:
    """The model's bytes at `bits` before compression, counted exactly from the parameter shapes
    (the model is built on PyTorch's "meta" device: shapes, no memory), against ARTIFACT_LIMIT."""
    with torch.device("meta"):
        model = HENNLM(cfg)
    payload = 0
    for name, p in model.state_dict().items():
        if name == "unembed.weight" and cfg.tie_embeddings:
            continue
        if bits == 32 or not quantizable(name, p):
            payload += 4 * p.numel()
        else:
            rows, cols = p.shape
            payload += rows * (ops.packed_length(cols, bits) if bits < 8 else cols) + 4 * rows  # values + scales
    parameters = henn_parameter_count(cfg)["total"]
    return {"bits": bits, "parameters": parameters, "payload_bytes": payload, "code_bytes": code_bytes(),
            "total_bytes": payload + code_bytes(), "bits_per_parameter": 8 * payload / parameters}


# ----------------------------------------------------------------------------
# Associative recall: the retrieval task an SSM's fixed state struggles with
# ----------------------------------------------------------------------------

RECALL_KEYS = b"abcdefghijklmnopqrstuvwxyz"
RECALL_VALUES = b"0123456789"
RECALL_SEPARATOR = ord("|")


def associative_recall_batch(batch_size: int, n_pairs: int, n_queries: int, generator: torch.Generator):
    """Sequences "k1 v1 k2 v2 ... | q1 a1 q2 a2 ...": n_pairs distinct letter keys with digit values,
    then n_queries of those keys, each followed by its value. Returns x, y [B, S - 1] (y the next
    byte) and mask [B, S - 1], True where y is the answer to a query, the only bytes the task scores."""
    if not 1 <= n_pairs <= len(RECALL_KEYS) or not 1 <= n_queries <= n_pairs:
        raise ValueError(f"need 1 <= n_queries <= n_pairs <= {len(RECALL_KEYS)}, got {n_pairs}, {n_queries}")
    keys_table = torch.tensor(list(RECALL_KEYS))
    values_table = torch.tensor(list(RECALL_VALUES))
    rows, masks = [], []
    for _ in range(batch_size):
        keys = keys_table[torch.randperm(len(RECALL_KEYS), generator=generator)[:n_pairs]]
        values = values_table[torch.randint(0, len(RECALL_VALUES), (n_pairs,), generator=generator)]
        asked = torch.randperm(n_pairs, generator=generator)[:n_queries]
        context = torch.stack([keys, values], dim=1).flatten()
        queries = torch.stack([keys[asked], values[asked]], dim=1).flatten()
        rows.append(torch.cat([context, torch.tensor([RECALL_SEPARATOR]), queries]))
        mask = torch.zeros(len(rows[-1]), dtype=torch.bool)
        mask[2 * n_pairs + 2::2] = True                                          # positions of the answers
        masks.append(mask)
    seq = torch.stack(rows)                                                       # [B, S]
    return seq[:, :-1], seq[:, 1:], torch.stack(masks)[:, 1:]


def recall_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(cross-entropy on the answers only, the share of answers the model's top guess gets right)."""
    logits, _ = model(x)
    answers = logits[mask]                                                        # [n_answers, V]
    loss = F.cross_entropy(answers.float(), y[mask])
    return loss, (answers.argmax(dim=-1) == y[mask]).float().mean().item()
