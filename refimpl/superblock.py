"""The "world's best" superblock LM (seed 002): Gated DeltaNet, MoE, GQA and multi-token prediction.

The write-up: 12 superblocks of eight layers each --
    1 RMSNorm  2 Gated DeltaNet  3 MoE FFN  4 RMSNorm  5 GQA  6 MoE FFN  7 RMSNorm  8 MTP head
between an embedding + positional encoding (+ dropout 0.1) and a final RMSNorm + unembedding,
at d = 8192, 16 heads, vocabulary 50,432, "~235B parameters".

Papers
    Gated DeltaNet   Yang, Kautz & Hatamizadeh 2024, arXiv:2412.06464 (refimpl/gated_deltanet.py)
    GQA              Ainslie et al. 2023, arXiv:2305.13245;  MoE: Fedus et al. 2021, arXiv:2101.03961
    Multi-token prediction  Gloeckle et al. 2024, "Better & Faster Large Language Models via
                     Multi-token Prediction", arXiv:2404.19737 (shared trunk, one head per horizon,
                     self-speculative decoding)

Where the write-up is silent, the choices made here (and the switch that undoes each):
    residuals      every mixer and every MoE adds to the residual stream (x + f(...)).
    norms          `layout="prenorm"` (default) puts an RMSNorm before each of the four sub-layers,
                   the usual pre-norm transformer. `layout="as_written"` keeps only the three norms
                   the write-up lists: norm -> GDN, then the first MoE reads the raw stream, norm -> GQA,
                   the second MoE raw again, and the third norm feeds only the in-block MTP head.
    MTP            horizon 1 is the ordinary next-token head (final norm + unembedding). Horizons
                   2..k are small heads on the final hidden state: h_j = h + W_j SiLU(U_j RMSNorm(h)),
                   then the shared final norm and unembedding. Layers 7-8 of each block (a norm and an MTP
                   head that adds a training loss on that block's hidden state, "deep supervision") are
                   present only with `mtp_in_every_block=True`: the write-up lists them, it does not say
                   what they feed, and they add nothing to the residual stream.
    positions      `absolute_positions=True` adds the sinusoidal encoding of "Positional Encoding"
                   after the embedding, scaled to the embedding's initial std (0.02): at amplitude 1 it
                   drowns the tokens (two prompts' logits then differ by ~12%). GQA also rotates q and k
                   (RoPE), as Llama-style GQA does.

Glossary: B batch, T tokens, C d_model, V vocabulary, E experts, k experts per token,
H heads, G key/value heads, D head dim, J = mtp_horizons.

Does not include: training at `paper` size (its parameters are only counted), sharding, checkpointing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from refimpl.blocks import (GroupedQueryAttention, KVCache, RMSNorm, TopKMoE, check_targets, check_token_ids,
                            config_from_preset, count_parameters, init_lm_weights)
from refimpl.config import check_fields, choice, flag, number, whole
from refimpl.gated_deltanet import GatedDeltaNet, GatedDeltaNetState

LAYOUTS = ("prenorm", "as_written")


@dataclass
class SuperblockConfig:
    vocab_size: int = 256            # V: bytes here; 50,432 in the write-up
    d_model: int = 128               # C
    n_superblocks: int = 2           # the write-up: 12
    n_heads: int = 4                 # H: GQA query heads, and Gated DeltaNet heads
    n_kv_heads: int = 2              # G: GQA key/value heads
    head_dim: int | None = None      # D: None -> d_model / n_heads (GQA and Gated DeltaNet alike)
    n_experts: int = 4               # E: experts in each of the two MoE layers per superblock
    top_k: int = 2                   # k: experts per token
    expert_hidden: int | None = None  # F: SwiGLU hidden width of one expert; None -> 2 * d_model
    window: int | None = None        # GQA sliding window; None -> full causal attention
    mtp_horizons: int = 3            # J: predict tokens t+1 .. t+J (1 = next-token only)
    mtp_in_every_block: bool = False  # the write-up's layers 7-8: a norm + MTP head per block (deep supervision)
    layout: str = "prenorm"          # "prenorm" or "as_written" (see the module docstring)
    absolute_positions: bool = True  # sinusoidal positional encoding after the embedding
    position_scale: float = 0.02     # the encoding's amplitude: the embedding's initial std, so it does not drown the tokens
    dropout: float = 0.1             # after the embedding, as the write-up says
    conv_size: int = 4               # Gated DeltaNet short convolution length
    norm_eps: float = 1e-6           # every RMSNorm
    max_seq_len: int = 256           # longest sequence one forward call accepts
    aux_loss_weight: float = 0.01    # MoE load-balancing loss weight
    mtp_loss_weight: float = 1.0     # weight of the extra horizons' losses (averaged over horizons 2..J)
    tie_embeddings: bool = True      # unembedding shares the embedding matrix

    RULES = {"vocab_size": whole(1), "d_model": whole(1), "n_superblocks": whole(1), "n_heads": whole(1),
             "n_kv_heads": whole(1), "head_dim": whole(1, optional=True), "n_experts": whole(1), "top_k": whole(1),
             "expert_hidden": whole(1, optional=True), "window": whole(1, optional=True), "mtp_horizons": whole(1),
             "mtp_in_every_block": flag(), "layout": choice(*LAYOUTS), "absolute_positions": flag(),
             "position_scale": number(0), "dropout": number(0, 1, high_open=True), "conv_size": whole(1),
             "norm_eps": number(0, low_open=True), "max_seq_len": whole(1), "aux_loss_weight": number(0),
             "mtp_loss_weight": number(0), "tie_embeddings": flag()}

    def __post_init__(self):
        check_fields(self, self.RULES)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if self.top_k > self.n_experts:
            raise ValueError(f"top_k={self.top_k} must be <= n_experts={self.n_experts}")
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads} (or set head_dim)")
            self.head_dim = self.d_model // self.n_heads
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.expert_hidden is None:
            self.expert_hidden = 2 * self.d_model

    @classmethod
    def preset(cls, name: str, **overrides) -> "SuperblockConfig":
        """`tiny` (tests, CI), `small` (the book on a CPU), `medium` (the gpu profile) or `paper` (the write-up's
        size: counted, not trained)."""
        return config_from_preset(cls, PRESETS, name, overrides)


PRESETS = {  # the arguments of each named size
    "tiny": dict(d_model=32, n_superblocks=1, n_heads=2, n_kv_heads=1, n_experts=3, top_k=2,
                 mtp_horizons=3, max_seq_len=64),
    "small": dict(d_model=96, n_superblocks=2, n_heads=4, n_kv_heads=2, n_experts=4, top_k=2,
                  mtp_horizons=3, max_seq_len=128),
    "medium": dict(d_model=256, n_superblocks=3, n_heads=8, n_kv_heads=4, n_experts=8, top_k=2,   # the gpu profile
                   mtp_horizons=3, max_seq_len=512),
    # The write-up's numbers: d 8192, 16 heads, 12 superblocks, vocabulary 50,432. It gives no expert
    # count or size, no KV-head count and no MTP depth: 4 KV heads, 8 experts of 4 d, top-2 and 4
    # horizons are placeholders; `experts_to_reach` solves for the expert count its 235B implies.
    "paper": dict(vocab_size=50_432, d_model=8192, n_superblocks=12, n_heads=16, n_kv_heads=4,
                  n_experts=8, top_k=2, expert_hidden=4 * 8192, mtp_horizons=4, max_seq_len=2048),
}


def sinusoidal_positions(T: int, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """The fixed encoding of Vaswani et al. 2017: [T, C], sin on even and cos on odd channels."""
    position = torch.arange(T, device=device, dtype=torch.float64)[:, None]
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, device=device, dtype=torch.float64) / dim)
    table = torch.zeros(T, dim, device=device, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq[: dim // 2])
    return table.to(dtype)


class MTPHeads(nn.Module):
    """Heads for horizons 2..J on a shared trunk: h_j = h + W_j SiLU(U_j RMSNorm(h)) (-> norm -> unembed)."""

    def __init__(self, dim: int, horizons: int, eps: float):
        super().__init__()
        self.norms = nn.ModuleList(RMSNorm(dim, eps) for _ in range(horizons - 1))
        self.ups = nn.ModuleList(nn.Linear(dim, dim, bias=False) for _ in range(horizons - 1))
        self.downs = nn.ModuleList(nn.Linear(dim, dim, bias=False) for _ in range(horizons - 1))

    def forward(self, h: torch.Tensor) -> list[torch.Tensor]:
        """h: [B, T, C] -> J - 1 hidden states [B, T, C], one per extra horizon."""
        return [h + down(F.silu(up(norm(h)))) for norm, up, down in zip(self.norms, self.ups, self.downs)]


@dataclass
class SuperblockState:
    """What decoding carries per superblock: the Gated DeltaNet state and the GQA KV cache."""
    gdn: GatedDeltaNetState
    kv: KVCache


class Superblock(nn.Module):
    """The write-up's eight layers (see the module docstring for the two layouts)."""

    def __init__(self, cfg: SuperblockConfig):
        super().__init__()
        self.prenorm = cfg.layout == "prenorm"
        C = cfg.d_model
        self.norm_gdn = RMSNorm(C, cfg.norm_eps)                                          # layer 1
        self.gdn = GatedDeltaNet(C, cfg.n_heads, cfg.head_dim, conv_size=cfg.conv_size,
                                 norm_eps=cfg.norm_eps)                                    # layer 2
        self.moe_1 = TopKMoE(C, cfg.expert_hidden, cfg.n_experts, cfg.top_k)              # layer 3
        self.norm_gqa = RMSNorm(C, cfg.norm_eps)                                          # layer 4
        self.gqa = GroupedQueryAttention(C, cfg.n_heads, cfg.n_kv_heads, cfg.window, head_dim=cfg.head_dim)  # layer 5
        self.moe_2 = TopKMoE(C, cfg.expert_hidden, cfg.n_experts, cfg.top_k)              # layer 6
        if self.prenorm:
            self.norm_moe_1 = RMSNorm(C, cfg.norm_eps)
            self.norm_moe_2 = RMSNorm(C, cfg.norm_eps)
        self.mtp_norm = RMSNorm(C, cfg.norm_eps) if cfg.mtp_in_every_block else None     # layer 7
        self.mtp = (MTPHeads(C, cfg.mtp_horizons + 1, cfg.norm_eps)                        # layer 8: horizons 1..J
                    if cfg.mtp_in_every_block else None)

    def forward(self, x: torch.Tensor, state: SuperblockState | None = None):
        """x: [B, T, C] -> (x [B, T, C], this block's MTP hidden states or [])."""
        x = x + self.gdn(self.norm_gdn(x), state.gdn if state is not None else None)
        x = x + self.moe_1(self.norm_moe_1(x) if self.prenorm else x)
        x = x + self.gqa(self.norm_gqa(x), state.kv if state is not None else None)
        x = x + self.moe_2(self.norm_moe_2(x) if self.prenorm else x)
        block_mtp = self.mtp(self.mtp_norm(x)) if self.mtp is not None else []
        return x, block_mtp

    @property
    def aux_loss(self) -> torch.Tensor:
        return self.moe_1.aux_loss + self.moe_2.aux_loss


class SuperblockLM(nn.Module):
    """Embedding (+ positions, dropout) -> superblocks -> final RMSNorm -> unembedding, plus MTP heads."""

    def __init__(self, cfg: SuperblockConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Superblock(cfg) for _ in range(cfg.n_superblocks))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.unembed = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.unembed.weight = self.embed.weight
        self.mtp = MTPHeads(cfg.d_model, cfg.mtp_horizons, cfg.norm_eps)
        init_lm_weights(self)

    def num_parameters(self) -> int:
        return count_parameters(self)

    def new_state(self) -> list[SuperblockState]:
        """Fresh per-block decoding state (Gated DeltaNet memory + KV cache)."""
        return [SuperblockState(GatedDeltaNetState(), KVCache()) for _ in self.blocks]

    def hidden(self, idx: torch.Tensor, states: list[SuperblockState] | None = None):
        """idx: [B, T] -> (final hidden [B, T, C], every block's MTP hiddens). `states` carries decoding."""
        check_token_ids("SuperblockLM", idx, self.cfg.max_seq_len, self.cfg.vocab_size)
        B, T = idx.shape
        if states is not None and len(states) != len(self.blocks):
            raise ValueError(f"need one SuperblockState per superblock ({len(self.blocks)}), got {len(states)}")
        x = self.embed(idx)                                                   # [B, T, C]
        if self.cfg.absolute_positions:
            start = states[0].kv.seen if states is not None else 0
            x = x + self.cfg.position_scale * sinusoidal_positions(start + T, self.cfg.d_model, x.device, x.dtype)[start:]
        x = self.dropout(x)
        block_mtp = []
        for i, block in enumerate(self.blocks):
            x, extra = block(x, states[i] if states is not None else None)  # [B, T, C]
            block_mtp.append(extra)
        return x, block_mtp

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm + unembedding: [B, T, C] -> [B, T, V]."""
        return self.unembed(self.norm(h))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                states: list[SuperblockState] | None = None):
        """idx: [B, T] -> (next-token logits [B, T, V], loss or None).

        The loss: next-token cross-entropy + mtp_loss_weight * the mean of the MTP terms + aux_loss_weight
        * MoE load-balancing loss. The MTP terms are the cross-entropies of predicting token t+j at position
        t for horizons j = 2..J of the top heads, and (with mtp_in_every_block) j = 1..J of every block's
        heads, all averaged together; horizons longer than the sequence are left out. `self.last_losses` keeps
        each part as a float for plotting.
        """
        h, block_mtp = self.hidden(idx, states)
        logits = self.logits(h)                                               # [B, T, V]
        if targets is None:
            return logits, None
        check_targets("SuperblockLM", targets, idx, self.cfg.vocab_size)
        next_token = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        # targets[:, t] is token t+1; token t+j is targets[:, t+j-1]
        T = targets.shape[1]
        mtp_terms = [self._horizon_loss(hj, targets, j) for j, hj in enumerate(self.mtp(h), start=2) if j <= T]
        for extra in block_mtp:            # per-block heads: horizon 1 is extra[0], horizon j is extra[j-1]
            mtp_terms += [self._horizon_loss(hj, targets, j) for j, hj in enumerate(extra, start=1) if j <= T]
        mtp = torch.stack(mtp_terms).mean() if mtp_terms else torch.zeros((), device=idx.device)
        aux = sum(block.aux_loss for block in self.blocks)
        self.last_losses = {"next_token": next_token.item(), "mtp": mtp.item(), "aux": aux.item()}
        return logits, next_token + self.cfg.mtp_loss_weight * mtp + self.cfg.aux_loss_weight * aux

    def _horizon_loss(self, hidden: torch.Tensor, targets: torch.Tensor, j: int) -> torch.Tensor:
        """Cross-entropy of predicting token t+j from position t (positions without one are left out)."""
        T = targets.shape[1]
        logits = self.logits(hidden[:, : T - j + 1])                          # [B, T-j+1, V]
        return F.cross_entropy(logits.float().flatten(0, 1), targets[:, j - 1:].flatten())


# ----------------------------------------------------------------------------
# Parameter arithmetic: what the write-up's sizes cost
# ----------------------------------------------------------------------------

def parameter_count(cfg: SuperblockConfig) -> dict:
    """Total and active-per-token parameters of SuperblockLM(cfg), by part, computed without building it."""
    C, H, G, D, E, k, Fh = (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_experts, cfg.top_k,
                            cfg.expert_hidden)
    qkv = H * 3 * D                                                       # GDN: q, k, v channels (K = V = D)
    gdn = C * qkv + qkv * cfg.conv_size + 2 * C * H + 2 * H + C * H * D + D + H * D * C
    gqa = C * H * D + 2 * C * G * D + H * D * C
    expert = 3 * C * Fh
    router = C * E
    norms = (4 if cfg.layout == "prenorm" else 2) * C
    mtp_head = C + 2 * C * C                                              # one MTP head: RMSNorm + two C x C matrices
    block_mtp = (C + cfg.mtp_horizons * mtp_head) if cfg.mtp_in_every_block else 0
    per_block_total = gdn + gqa + 2 * (router + E * expert) + norms + block_mtp
    per_block_active = gdn + gqa + 2 * (router + k * expert) + norms + block_mtp
    embedding = cfg.vocab_size * C
    unembedding = 0 if cfg.tie_embeddings else cfg.vocab_size * C
    top = embedding + unembedding + C + (cfg.mtp_horizons - 1) * mtp_head
    return {
        "total": top + cfg.n_superblocks * per_block_total,
        "active_per_token": top + cfg.n_superblocks * per_block_active,
        "parts": {"embedding": embedding, "unembedding": unembedding,
                  "gated_deltanet": cfg.n_superblocks * gdn, "gqa": cfg.n_superblocks * gqa,
                  "experts": cfg.n_superblocks * 2 * E * expert, "routers": cfg.n_superblocks * 2 * router,
                  "norms": cfg.n_superblocks * norms + C,
                  "mtp_heads": (cfg.mtp_horizons - 1) * mtp_head + cfg.n_superblocks * block_mtp},
    }


def experts_to_reach(cfg: SuperblockConfig, target: float = 235e9) -> int:
    """The smallest expert count per MoE layer (at cfg's expert size) whose total reaches `target`."""
    without = parameter_count(replace(cfg, n_experts=1, top_k=1))["total"]
    per_expert = cfg.n_superblocks * 2 * (3 * cfg.d_model * cfg.expert_hidden + cfg.d_model)
    return max(1, math.ceil((target - without) / per_expert) + 1)


# ----------------------------------------------------------------------------
# Decoding: one token per pass (greedy or sampled), and self-speculative with the MTP heads
# ----------------------------------------------------------------------------

def _snapshot(states: list[SuperblockState]) -> list[tuple]:
    return [(s.gdn.S, s.gdn.conv, s.kv.k, s.kv.v, s.kv.seen) for s in states]


def _restore(states: list[SuperblockState], saved: list[tuple]) -> None:
    for s, (S, conv, k, v, seen) in zip(states, saved):
        s.gdn.S, s.gdn.conv, s.kv.k, s.kv.v, s.kv.seen = S, conv, k, v, seen


def _check_decoding(model: SuperblockLM, n_tokens: int) -> None:
    if model.training:
        raise ValueError("decoding needs model.eval(): dropout would make every pass differ")
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
        raise ValueError(f"n_tokens must be a positive int, got {n_tokens!r}")


def accepted_prefix(drafts: list[int], choices: list[int]) -> int:
    """How many drafts survive verification. drafts[0] is the main head's own pick, so it always
    stands; draft i (i >= 1) stands while it equals choices[i-1], the main head's greedy pick after
    seeing drafts 0..i-1, and every earlier draft stood."""
    n = 1
    while n < len(drafts) and drafts[n] == choices[n - 1]:
        n += 1
    return n


@torch.no_grad()
def generate(model: SuperblockLM, prompt: torch.Tensor, n_tokens: int, temperature: float = 0.0,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
    """The write-up's last layer, "softmax / sampling": one forward pass per new token.

    temperature 0 -> greedy (argmax); > 0 -> sample from softmax(logits / temperature).
    [B, T0] -> ([B, T0 + n_tokens], stats).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    _check_decoding(model, n_tokens)
    states = model.new_state()
    h, _ = model.hidden(prompt, states)
    out, passes = [prompt], 1
    for i in range(n_tokens):
        logits = model.logits(h[:, -1]).float()                            # [B, V]
        if temperature == 0:
            nxt = logits.argmax(-1, keepdim=True)                           # [B, 1]
        else:
            nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator)
        out.append(nxt)
        if i + 1 < n_tokens:
            h, _ = model.hidden(nxt, states)
            passes += 1
    return torch.cat(out, dim=1), {"forward_passes": passes, "new_tokens": n_tokens}


@torch.no_grad()
def speculative_generate(model: SuperblockLM, prompt: torch.Tensor, n_tokens: int) -> tuple[torch.Tensor, dict]:
    """Self-speculative greedy decoding (Gloeckle et al. 2024, section 3.2), batch size 1.

    From the last position the main head and the J-1 MTP heads draft J tokens at once; one
    forward pass over the drafts verifies them: draft i is accepted while it equals the main
    head's greedy choice after drafts 1..i-1. The output is identical to `generate` (greedy).
    When a draft is rejected, the recurrent state (Gated DeltaNet memory, KV cache) has already
    consumed the rejected tokens, so it is restored and the accepted ones are fed again: that
    repair is a forward pass too, and it is counted.
    """
    if prompt.dim() != 2 or prompt.shape[0] != 1:
        raise ValueError(f"speculative_generate decodes one sequence [1, T0] at a time, got shape {list(prompt.shape)}")
    _check_decoding(model, n_tokens)
    states = model.new_state()
    h, _ = model.hidden(prompt, states)
    passes, accepted_counts, produced = 1, [], []
    while len(produced) < n_tokens:
        last = h[:, -1:]                                                    # [1, 1, C]
        drafts = [model.logits(last).argmax(-1)] + [model.logits(hj).argmax(-1) for hj in model.mtp(last)]
        drafts = torch.cat(drafts, dim=1)[:, : n_tokens - len(produced)]    # [1, J'] draft tokens
        saved = _snapshot(states)
        h_verify, _ = model.hidden(drafts, states)                          # one pass over every draft
        passes += 1
        choice = model.logits(h_verify).argmax(-1)                          # [1, J'] greedy token after each draft
        n_ok = accepted_prefix(drafts[0].tolist(), choice[0].tolist())
        produced += drafts[0, :n_ok].tolist()
        accepted_counts.append(n_ok)
        if n_ok == drafts.shape[1]:
            h = h_verify                                                    # the state is already right
        else:
            _restore(states, saved)                                         # undo the rejected drafts
            h, _ = model.hidden(drafts[:, :n_ok], states)
            passes += 1
    out = torch.cat([prompt, torch.tensor([produced[:n_tokens]], device=prompt.device)], dim=1)
    return out, {"forward_passes": passes, "new_tokens": n_tokens,
                 "mean_accepted_per_draft": sum(accepted_counts) / len(accepted_counts),
                 "drafts": len(accepted_counts)}
