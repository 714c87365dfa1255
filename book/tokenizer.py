"""A byte-level tokenizer: token id = byte value, vocabulary 256.

With one token per byte, cross-entropy in bits per token *is* bits per byte,
so every chapter's numbers compare directly, whatever its model.
"""

from __future__ import annotations

import torch


class ByteTokenizer:
    """UTF-8 bytes in, ids 0..255 out; decoding replaces invalid sequences with U+FFFD."""

    vocab_size = 256

    def encode(self, text: str) -> torch.Tensor:
        """str -> [L] int64 ids."""
        if not isinstance(text, str):
            raise ValueError(f"ByteTokenizer.encode expects str, got {type(text).__name__}")
        return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()

    def decode(self, ids) -> str:
        """[L] ids (an integer tensor, or a sequence of ints, in 0..255) -> str.

        Anything else is refused, not rounded: a float id (1.7), a bool, a float tensor, a string."""
        if isinstance(ids, torch.Tensor):
            if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool or ids.dim() > 1:
                raise ValueError(f"ByteTokenizer.decode expects a 1-D integer tensor of ids, got {ids.dtype} "
                                 f"{list(ids.shape)}")
            ids = ids.tolist()
        elif isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
            raise ValueError(f"ByteTokenizer.decode expects a sequence of int ids, got {type(ids).__name__}")
        ids = list(ids)
        not_ints = [i for i in ids if isinstance(i, bool) or not isinstance(i, int)]
        if not_ints:
            raise ValueError(f"ByteTokenizer.decode: ids must be ints, got e.g. {not_ints[:3]}")
        bad = [i for i in ids if not 0 <= i < 256]
        if bad:
            raise ValueError(f"ByteTokenizer.decode: ids must lie in 0..255, got e.g. {bad[:3]}")
        return bytes(ids).decode("utf-8", errors="replace")
