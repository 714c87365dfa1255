"""The semantic codec of chapter 01 (Sintellix): three modalities, one codebook.

The write-up encodes text with E5-Large, images with CLIP's vision encoder and audio with Wav2Vec2 into a
1,024-dimensional semantic space, quantises with an 8,192-entry codebook (VQ-GAN style: commitment and
codebook losses) and decodes with an autoregressive transformer. None of those encoders can be downloaded
here, so small trainable encoders stand in for them, one per modality, each mapping a piece of its input
to one vector of the shared space:

    image    a P x P patch of a grey image          -> MLP -> z_e [C]     decoder: MLP -> P x P pixels
    signal   a window of L samples of a 1-D signal   -> MLP -> z_e [C]     decoder: MLP -> L samples
    text     a window of W bytes                     -> byte embeddings, MLP -> z_e [C]
                                                                            decoder: MLP -> W x 256 logits

All three share one `refimpl.vq.VectorQuantizer` (straight-through gradients, commitment and codebook
losses or EMA updates, dead-code restarts): the "unified semantic space" is that codebook. The decoders
are small MLPs, not the write-up's autoregressive transformer: each decodes one code to one piece.

Glossary: B pieces in a batch, C semantic width, K codebook entries, P patch side, L signal window, W text window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from refimpl.blocks import config_from_preset, count_parameters
from refimpl.config import check_fields, flag, number, whole
from refimpl.vq import VectorQuantizer

MODALITIES = ("image", "signal", "text")


@dataclass
class CodecConfig:
    dim: int = 64                 # C: the shared semantic space (the write-up: 1,024)
    num_codes: int = 256          # K: codebook entries (the write-up: 8,192)
    hidden: int = 256             # width of every encoder's and decoder's MLP
    patch: int = 4                # P: image pieces are P x P pixels
    signal_window: int = 16       # L: signal pieces are L samples
    text_window: int = 4          # W: text pieces are W bytes
    byte_embedding: int = 32      # text: each byte's embedding before the MLP
    beta: float = 0.25            # commitment weight
    ema: bool = False             # EMA codebook updates instead of the codebook loss

    RULES = {"dim": whole(1), "num_codes": whole(1), "hidden": whole(1), "patch": whole(1), "signal_window": whole(1),
             "text_window": whole(1), "byte_embedding": whole(1), "beta": number(0), "ema": flag()}

    def __post_init__(self):
        check_fields(self, self.RULES)

    @classmethod
    def preset(cls, name: str, **overrides) -> "CodecConfig":
        """`tiny` (tests, CI), `small` (the book on a CPU), `paper` (the write-up's space and codebook sizes)."""
        return config_from_preset(cls, CODEC_PRESETS, name, overrides)


CODEC_PRESETS = {
    "tiny": dict(dim=16, num_codes=32, hidden=64, byte_embedding=8),
    "small": dict(dim=64, num_codes=256, hidden=256, byte_embedding=32),
    "paper": dict(dim=1024, num_codes=8192, hidden=1024, byte_embedding=64),
}


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                         nn.Linear(hidden, d_out))


class CodecOutput(NamedTuple):
    reconstruction: torch.Tensor     # image [B, P, P], signal [B, L] or text logits [B, W, 256]
    indices: torch.Tensor            # [B] the code each piece got
    recon_loss: torch.Tensor         # MSE (image, signal) or cross-entropy in nats (text)
    vq_loss: torch.Tensor            # commitment + codebook


class SemanticCodec(nn.Module):
    """Encoders, one shared quantiser, decoders. forward(modality, pieces) -> CodecOutput.

    pieces: image [B, P, P] floats in [0, 1]; signal [B, L] floats (standardised); text [B, W] int64 bytes."""

    def __init__(self, cfg: CodecConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.cfg = cfg
        P, L, W, C, h = cfg.patch, cfg.signal_window, cfg.text_window, cfg.dim, cfg.hidden
        self.byte_embed = nn.Embedding(256, cfg.byte_embedding)
        self.encoders = nn.ModuleDict({"image": _mlp(P * P, h, C), "signal": _mlp(L, h, C),
                                       "text": _mlp(W * cfg.byte_embedding, h, C)})
        self.decoders = nn.ModuleDict({"image": _mlp(C, h, P * P), "signal": _mlp(C, h, L),
                                       "text": _mlp(C, h, W * 256)})
        self.quantizer = VectorQuantizer(cfg.num_codes, C, beta=cfg.beta, ema=cfg.ema, generator=generator)

    def num_parameters(self) -> int:
        return count_parameters(self)

    def _check(self, modality: str, pieces: torch.Tensor) -> None:
        cfg = self.cfg
        expected = {"image": (cfg.patch, cfg.patch), "signal": (cfg.signal_window,), "text": (cfg.text_window,)}
        if modality not in expected:
            raise ValueError(f"unknown modality {modality!r}; choose from {MODALITIES}")
        shape = expected[modality]
        if not isinstance(pieces, torch.Tensor) or pieces.dim() != len(shape) + 1 or tuple(pieces.shape[1:]) != shape:
            got = list(pieces.shape) if isinstance(pieces, torch.Tensor) else type(pieces).__name__
            raise ValueError(f"{modality} pieces must be [B, {', '.join(map(str, shape))}], got {got}")
        if modality == "text" and pieces.dtype != torch.int64:
            raise ValueError(f"text pieces must be int64 byte values, got {pieces.dtype}")
        if modality != "text" and not pieces.is_floating_point():
            raise ValueError(f"{modality} pieces must be floating point, got {pieces.dtype}")

    def encode(self, modality: str, pieces: torch.Tensor) -> torch.Tensor:
        """pieces -> z_e [B, C] (before quantisation)."""
        self._check(modality, pieces)
        flat = self.byte_embed(pieces).flatten(1) if modality == "text" else pieces.flatten(1)
        return self.encoders[modality](flat)

    def decode(self, modality: str, z: torch.Tensor) -> torch.Tensor:
        """z [B, C] (quantised) -> image [B, P, P], signal [B, L] or text logits [B, W, 256]."""
        cfg = self.cfg
        out = self.decoders[modality](z)
        return {"image": lambda: out.view(-1, cfg.patch, cfg.patch), "signal": lambda: out,
                "text": lambda: out.view(-1, cfg.text_window, 256)}[modality]()

    def forward(self, modality: str, pieces: torch.Tensor) -> CodecOutput:
        q = self.quantizer(self.encode(modality, pieces))
        recon = self.decode(modality, q.z_q)
        if modality == "text":
            loss = F.cross_entropy(recon.flatten(0, 1), pieces.flatten())
        else:
            loss = F.mse_loss(recon, pieces)
        return CodecOutput(recon, q.indices, loss, q.loss)

    @torch.no_grad()
    def round_trip(self, modality: str, pieces: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices [B], reconstruction) with no training side effects: encode, quantise, decode the codes."""
        was_training = self.training
        self.eval()
        indices = self.quantizer(self.encode(modality, pieces)).indices
        recon = self.decode(modality, self.quantizer.lookup(indices))
        self.train(was_training)
        return indices, (recon.argmax(-1) if modality == "text" else recon)


# ----------------------------------------------------------------------------
# Cutting real data into pieces
# ----------------------------------------------------------------------------

def image_pieces(image: torch.Tensor, patch: int) -> torch.Tensor:
    """Every non-overlapping P x P patch of a grey image [H, W], row by row -> [n, P, P] (edges cut off)."""
    if image.dim() != 2:
        raise ValueError(f"image must be [H, W] (grey), got {list(image.shape)}")
    H, W = (image.shape[0] // patch) * patch, (image.shape[1] // patch) * patch
    return image[:H, :W].reshape(H // patch, patch, W // patch, patch).transpose(1, 2).reshape(-1, patch, patch)


def image_from_pieces(pieces: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `image_pieces` for an image whose sides are multiples of the patch: [n, P, P] -> [H, W]."""
    P = pieces.shape[-1]
    return pieces.reshape(height // P, width // P, P, P).transpose(1, 2).reshape(height, width)


def signal_pieces(signal: torch.Tensor, window: int) -> torch.Tensor:
    """Non-overlapping windows of a 1-D signal -> [n, L]."""
    if signal.dim() != 1:
        raise ValueError(f"signal must be 1-D, got {list(signal.shape)}")
    n = len(signal) // window
    return signal[: n * window].reshape(n, window)


def text_pieces(data: torch.Tensor, window: int) -> torch.Tensor:
    """Non-overlapping windows of a uint8 byte stream -> [n, W] int64."""
    if data.dim() != 1 or data.dtype != torch.uint8:
        raise ValueError(f"text must be a 1-D uint8 byte stream, got {data.dtype} {list(data.shape)}")
    n = len(data) // window
    return data[: n * window].long().reshape(n, window)
