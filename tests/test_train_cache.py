"""Cached training: the second run of the same training loads the weights and history instead of training; any
change to what the weights depend on is another key; BOOK_RETRAIN=1 trains again; a damaged file is retrained."""

from __future__ import annotations

import importlib

import pytest
import torch

import book.train as train_module
from book.train import TrainConfig, cache_key, train_cached
from refimpl import data
from refimpl.baseline import BaselineConfig, BaselineLM

CFG = TrainConfig(steps=3, batch_size=2, seq_len=16, warmup=1, eval_every=3, eval_batches=1)


@pytest.fixture
def corpus():
    return data.stdlib_corpus(max_train_bytes=50_000, max_val_bytes=10_000)


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setattr(importlib.import_module("book.chapters"), "ROOT", tmp_path)          # build/cache/ under the test's folder
    monkeypatch.delenv("BOOK_RETRAIN", raising=False)


def _model(seed=0):
    torch.manual_seed(seed)
    return BaselineLM(BaselineConfig(d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=16))


def _run(corpus, model, **kwargs):
    return train_cached(model, corpus, CFG, chapter="00_test", name="tiny", profile="ci", progress=False, **kwargs)


def test_the_second_run_loads_instead_of_training(corpus, tmp_path, monkeypatch):
    first_model = _model()
    first = _run(corpus, first_model)
    assert first.cached_from is None
    files = list((tmp_path / "build" / "cache" / "00_test").glob("tiny-*.tensors"))
    assert len(files) == 1

    def no_training(*args, **kwargs):
        raise AssertionError("trained although a cached model was there")
    monkeypatch.setattr(train_module, "train", no_training)
    second_model = _model()
    second = _run(corpus, second_model)
    assert second.cached_from.endswith(files[0].name) and second.as_dict() == first.as_dict()
    for (k, a), (_, b) in zip(first_model.state_dict().items(), second_model.state_dict().items()):
        assert torch.equal(a, b), k


def test_what_the_weights_depend_on_is_in_the_key(corpus):
    base = cache_key(_model(), corpus, CFG, "tiny", "ci")
    assert cache_key(_model(), corpus, CFG, "tiny", "ci") == base
    assert cache_key(_model(seed=1), corpus, CFG, "tiny", "ci") != base                       # other initial weights
    assert cache_key(_model(), corpus, TrainConfig(**{**CFG.__dict__, "lr": 1e-3}), "tiny", "ci") != base
    assert cache_key(_model(), corpus, CFG, "tiny", "small") != base                          # other profile
    assert cache_key(_model(), corpus, CFG, "tiny", "ci", extra={"tick": 8}) != base
    other = data.stdlib_corpus(max_train_bytes=40_000, max_val_bytes=10_000)
    assert cache_key(_model(), other, CFG, "tiny", "ci") != base                              # other bytes


def test_retrain_switch_and_a_damaged_file(corpus, tmp_path, monkeypatch, capsys):
    _run(corpus, _model())
    monkeypatch.setenv("BOOK_RETRAIN", "1")
    assert _run(corpus, _model()).cached_from is None
    monkeypatch.delenv("BOOK_RETRAIN")
    path, = (tmp_path / "build" / "cache" / "00_test").glob("tiny-*.tensors")
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert _run(corpus, _model()).cached_from is None
    assert "cannot be used" in capsys.readouterr().out
    assert _run(corpus, _model()).cached_from is not None                                    # rewritten, loads again
