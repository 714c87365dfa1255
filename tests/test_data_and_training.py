"""Data without downloads, the byte tokenizer, bits per byte, and a training loop that learns."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from refimpl import data
from refimpl.baseline import BaselineConfig, BaselineLM
from book.tokenizer import ByteTokenizer
from book.train import TrainConfig, bits_per_byte, learning_rate, train


@pytest.fixture(scope="module")
def corpus():
    return data.stdlib_corpus(max_train_bytes=300_000, max_val_bytes=40_000)


def test_corpus_split_is_deterministic_and_disjoint(corpus):
    again = data.stdlib_corpus(max_train_bytes=300_000, max_val_bytes=40_000)
    assert torch.equal(corpus.train, again.train) and torch.equal(corpus.val, again.val)
    assert not set(corpus.train_files) & set(corpus.val_files)
    assert len(corpus.train) == 300_000 and len(corpus.val) == 40_000
    assert b"def " in bytes(corpus.train[:20_000].tolist())


def test_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "naïve café — ∑ x²"
    ids = tok.encode(text)
    assert ids.dtype == torch.int64 and int(ids.max()) < 256 and len(ids) == len(text.encode())
    assert tok.decode(ids) == text
    with pytest.raises(ValueError, match="0..255"):
        tok.decode([300])


@pytest.mark.parametrize("name", data.IMAGES)
def test_sample_images_load(name):
    img = data.sample_image(name)
    assert img.dtype == np.float32 and img.ndim in (2, 3) and 0 <= img.min() and img.max() <= 1


@pytest.mark.parametrize("name", data.SIGNALS)
def test_sample_signals_load(name):
    sig = data.sample_signal(name)
    assert sig.dtype == np.float32 and len(sig) > 100 and np.isfinite(sig).all()


def test_unknown_sample_is_a_value_error():
    with pytest.raises(ValueError, match="choose one of"):
        data.sample_image("mona_lisa")


class _Uniform(torch.nn.Module):
    def forward(self, idx, targets=None):
        return torch.zeros(*idx.shape, 256), None


def test_uniform_model_scores_eight_bits_per_byte(corpus):
    assert math.isclose(bits_per_byte(_Uniform(), corpus.val, 64, 4, 3), 8.0, rel_tol=1e-6)


def test_learning_rate_schedule():
    cfg = TrainConfig(steps=100, warmup=10, lr=1e-3, min_lr_ratio=0.1)
    assert math.isclose(learning_rate(9, cfg), 1e-3) and math.isclose(learning_rate(100, cfg), 1e-4)


def test_training_lowers_validation_bits_per_byte(corpus):
    torch.manual_seed(0)
    model = BaselineLM(BaselineConfig.preset("tiny"))
    before = bits_per_byte(model, corpus.val, 64, 8, 4)
    history = train(model, corpus, TrainConfig(steps=60, batch_size=8, seq_len=64, eval_every=30, eval_batches=4),
                    progress=False)
    assert history.val_bpb[-1] < before - 2.0, (before, history.val_bpb)  # from ~8 bits to well under 6
    assert len(history.train_bpb) == 60 and history.eval_step == [30, 60]


def test_a_wall_clock_budget_stops_training_and_ends_the_schedule(corpus, monkeypatch):
    """max_seconds: the run stops at the first step that ends past the budget, is evaluated there, and its
    learning rate reaches the schedule's floor when the budget runs out, however many steps remain.
    A fake clock (one second per reading) makes the stopping step exact."""
    cfg = TrainConfig(steps=1000, warmup=2, lr=1e-3, min_lr_ratio=0.1, max_seconds=10.0, batch_size=4, seq_len=32,
                      eval_every=100, eval_batches=1)
    assert math.isclose(learning_rate(50, cfg, elapsed=10.0), 1e-4)            # the budget spent: the floor
    assert math.isclose(learning_rate(50, cfg, elapsed=0.0), learning_rate(50, TrainConfig(**{**cfg.__dict__,
                                                                                             "max_seconds": None})))
    import book.train as train_module
    clock = iter(range(10_000))
    monkeypatch.setattr(train_module.time, "perf_counter", lambda: float(next(clock)))
    torch.manual_seed(0)
    model = BaselineLM(BaselineConfig.preset("tiny", max_seq_len=32))
    history = train(model, corpus, cfg, progress=False)
    # readings: 0 at the start, then two per step (before it, 2k + 1, and after it, 2k + 2): 2k + 2 >= 10 at k = 4
    assert history.step == [0, 1, 2, 3, 4] and history.eval_step == [5] and len(history.val_bpb) == 1
    with pytest.raises(ValueError, match="max_seconds"):
        TrainConfig(max_seconds=0)
