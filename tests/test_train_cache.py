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


def test_the_weight_average_is_kept_and_loaded_with_the_model(corpus, monkeypatch):
    """average_from: the running mean of the parameters over the late steps (stochastic weight averaging) is
    stored beside the weights, so a cached run gives back the same average as the run that trained."""
    cfg = TrainConfig(steps=4, batch_size=2, seq_len=16, warmup=1, eval_every=4, eval_batches=1)
    seen = []
    trained_model = _model()
    trained = train_cached(trained_model, corpus, cfg, chapter="00_test", name="avg", profile="ci", progress=False,
                           average_from=2, after_step=lambda step, m: seen.append(step))
    assert seen == [0, 1, 2, 3], "the caller's after_step still runs at every step"
    assert trained.cached_from is None and trained.averaged.count == 2
    averaged = _model()
    trained.averaged.copy_to(averaged)
    assert any(not torch.equal(a, b) for a, b in zip(averaged.parameters(), trained_model.parameters())), \
        "the mean of steps 2 and 3 equals the last step's weights: nothing was averaged"

    monkeypatch.setattr(train_module, "train", lambda *a, **k: pytest.fail("trained although cached"))
    again_model = _model()
    again = train_cached(again_model, corpus, cfg, chapter="00_test", name="avg", profile="ci", progress=False,
                         average_from=2)
    assert again.cached_from is not None and again.averaged.count == 2
    for a, b in zip(trained_model.parameters(), again_model.parameters()):
        assert torch.equal(a, b)
    again_averaged = _model()
    again.averaged.copy_to(again_averaged)
    for a, b in zip(averaged.parameters(), again_averaged.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"average_from must be a step in \[0, 4\), got 4"):
        train_cached(_model(), corpus, cfg, chapter="00_test", name="avg", profile="ci", average_from=4)


def test_averaging_is_part_of_the_key(corpus):
    """A run cached without an average is not loaded when one is asked for (it has none to give)."""
    plain = _run(corpus, _model())
    averaged = _run(corpus, _model(), average_from=1)
    assert plain.cached_from is None and averaged.cached_from is None and averaged.averaged.count == 2


def test_fit_cached_keeps_a_custom_loops_weights_and_record(monkeypatch):
    """A chapter's own training loop: fitted once, then loaded (weights and record) while `extra` is the same;
    another `extra` is another fit."""
    from book.train import fit_cached

    def fit(model):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        return {"curve": [3.0, 2.0, 1.5], "accuracy": 0.75}

    trained = _model()
    first = fit_cached(trained, fit, chapter="00_test", name="loop", profile="ci", extra={"steps": 3})
    assert first == {"curve": [3.0, 2.0, 1.5], "accuracy": 0.75, "cached_from": None}
    again = _model()
    second = fit_cached(again, lambda m: pytest.fail("fitted although cached"), chapter="00_test", name="loop",
                        profile="ci", extra={"steps": 3})
    assert second["cached_from"].endswith(".tensors") and second["curve"] == first["curve"]
    for a, b in zip(trained.parameters(), again.parameters()):
        assert torch.equal(a, b)
    other = fit_cached(_model(), fit, chapter="00_test", name="loop", profile="ci", extra={"steps": 4})
    assert other["cached_from"] is None
