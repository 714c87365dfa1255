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
        """[L] ids (tensor or list of ints in 0..255) -> str."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        bad = [i for i in ids if not 0 <= int(i) < 256]
        if bad:
            raise ValueError(f"ByteTokenizer.decode: ids must lie in 0..255, got e.g. {bad[:3]}")
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")
