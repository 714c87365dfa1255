"""A device everywhere (issue 20): the training loop, evaluation and the training cache follow the model's device,
bf16 autocast is one switch, a chapter's device comes from its profile, and no model or training code puts a
tensor on the CPU by name unless the line says why (`# cpu-ok: <reason>`).

On a machine with a GPU the parametrised tests also run on "cuda"; here they run on the CPU and the lint stands
in for what only a GPU would show (a tensor left behind on the CPU).
"""

from __future__ import annotations

import importlib
import io
import tokenize
from pathlib import Path

import pytest
import torch

import book
from book.train import TrainConfig, bits_per_byte, train, train_cached
from refimpl import data
from refimpl.baseline import BaselineConfig, BaselineLM

ROOT = Path(__file__).resolve().parents[1]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CFG = TrainConfig(steps=3, batch_size=4, seq_len=32, warmup=1, eval_every=3, eval_batches=1)


@pytest.fixture(scope="module")
def corpus():
    return data.stdlib_corpus(max_train_bytes=40_000, max_val_bytes=10_000)


def tiny_model(device: str) -> BaselineLM:
    torch.manual_seed(0)
    return BaselineLM(BaselineConfig.preset("tiny", max_seq_len=32)).to(device)


def test_the_profile_decides_the_device(monkeypatch):
    monkeypatch.delenv("BOOK_DEVICE", raising=False)
    assert book.device_for_profile("ci") == "cpu" and book.device_for_profile("small") == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="torch sees no CUDA GPU; use the 'small' profile"):
            book.device_for_profile("gpu")
    monkeypatch.setenv("BOOK_DEVICE", "cpu")
    assert book.device_for_profile("gpu") == "cpu"
    monkeypatch.setenv("BOOK_DEVICE", "tpu")
    with pytest.raises(ValueError, match="BOOK_DEVICE must be 'cpu', 'cuda' or 'cuda:N', got 'tpu'"):
        book.device_for_profile("ci")


@pytest.mark.parametrize("device", DEVICES)
def test_training_evaluation_and_the_cache_stay_on_the_models_device(device, corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(importlib.import_module("book.chapters"), "ROOT", tmp_path)   # the cache: under tmp_path
    model = tiny_model(device)
    history = train_cached(model, corpus, CFG, chapter="00_test", name="device", profile="ci", progress=False)
    assert history.cached_from is None and all(p.device.type == device for p in model.parameters())
    assert 0 < bits_per_byte(model, corpus.val, 32, 4, max_batches=1) < 9
    again = tiny_model(device)
    loaded = train_cached(again, corpus, CFG, chapter="00_test", name="device", profile="ci", progress=False)
    assert loaded.cached_from is not None and all(p.device.type == device for p in again.parameters())
    for a, b in zip(model.parameters(), again.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_trains_the_same_model_to_bf16_precision(device, corpus):
    full = train(tiny_model(device), corpus, CFG, progress=False)
    mixed = train(tiny_model(device), corpus, TrainConfig(**{**CFG.__dict__, "autocast": "bf16"}), progress=False)
    assert mixed.train_bpb[0] == pytest.approx(full.train_bpb[0], rel=0.02)          # same model, same batch
    assert mixed.train_bpb[0] != full.train_bpb[0], "autocast changed nothing: was the forward in bf16 at all?"


def test_autocast_with_a_custom_step_is_refused(corpus):
    with pytest.raises(ValueError, match="a custom forward_backward must set up its own autocast"):
        train(tiny_model("cpu"), corpus, TrainConfig(**{**CFG.__dict__, "autocast": "bf16"}), progress=False,
              forward_backward=lambda m, x, y: 0.0)
    with pytest.raises(ValueError, match="autocast"):
        TrainConfig(autocast="fp8")


def test_the_cache_key_knows_the_device_and_autocast(corpus):
    from book.train import cache_key
    model = tiny_model("cpu")
    plain = cache_key(model, corpus, CFG, "m", "ci")
    assert cache_key(model, corpus, TrainConfig(**{**CFG.__dict__, "autocast": "bf16"}), "m", "ci") != plain


# ---------------------------------------------------------------- no hard-coded CPU placement

LINTED = sorted((ROOT / "refimpl").rglob("*.py")) + [ROOT / "book" / "train.py"]


def cpu_placements(source: str) -> list[int]:
    """Lines that name the CPU in code (a "cpu" string, or a .cpu() call) without `# cpu-ok:` on them."""
    lines = source.splitlines()
    found = set()
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    for i, tok in enumerate(tokens):
        named = tok.type == tokenize.STRING and tok.string.strip("rb").strip("'\"") == "cpu"
        called = (tok.type == tokenize.NAME and tok.string == "cpu" and i > 0 and tokens[i - 1].string == "."
                  and i + 1 < len(tokens) and tokens[i + 1].string == "(")
        if (named or called) and "# cpu-ok:" not in lines[tok.start[0] - 1]:
            found.add(tok.start[0])
    return sorted(found)


def test_the_lint_sees_what_it_should():
    assert cpu_placements('x = torch.zeros(3, device="cpu")\ny = x.cpu()\nz = x.cpu()  # cpu-ok: numpy\n'
                          'msg = "not the cpu"\n') == [1, 2]


def test_no_model_or_training_code_places_a_tensor_on_the_cpu_by_name():
    offenders = [f"{path.relative_to(ROOT)}:{line}" for path in LINTED for line in cpu_placements(path.read_text())]
    assert not offenders, ("these lines put something on the CPU by name; follow the model's or the input's device "
                           "instead, or say why with `# cpu-ok: <reason>`:\n" + "\n".join(offenders))
