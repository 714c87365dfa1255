"""LoRA specialists, their task vectors and merged models, the keyword + Hebbian router, domain corpora."""

from __future__ import annotations

import pytest
import torch

from refimpl.baseline import BaselineConfig, BaselineLM
from refimpl.data import package_corpus
from refimpl.ops import average
from refimpl.specialists import (LoRALinear, SpecialistRouter, add_lora, distinctive_words, lora_modules,
                                 task_vector, with_task_vector, words)
from refimpl.synapse import HebbianPathways


def _base(seed=0):
    torch.manual_seed(seed)
    return BaselineLM(BaselineConfig.preset("tiny"))


def test_lora_starts_at_the_base_and_trains_only_the_adapters():
    base = _base()
    model = _base()
    names = add_lora(model, rank=4)
    idx = torch.randint(0, 256, (2, 16))
    assert torch.equal(model(idx)[0], base(idx)[0])                       # B = 0: nothing changed yet
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith((".A", ".B")) for n in trainable)
    assert "unembed" not in " ".join(names)                               # tied to the embedding: left alone
    _, loss = model(idx, idx)
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n.endswith(".A") or n.endswith(".B"))
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


def test_task_vector_is_the_dense_low_rank_change_and_merging_it_reproduces_the_specialist():
    base, model = _base(), _base()
    names = add_lora(model, rank=3, alpha=6.0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.B.copy_(torch.randn(m.B.shape, generator=g) * 0.05)
    first = lora_modules(model)[names[0]]
    assert torch.allclose(first.delta_weight(), 2.0 * first.B @ first.A)  # alpha / r = 2
    tau = task_vector(model)
    assert tau.numel() == sum(base.get_submodule(n).weight.numel() for n in names)
    merged = with_task_vector(base, names, tau)
    idx = torch.randint(0, 256, (2, 16), generator=g)
    torch.testing.assert_close(merged(idx)[0], model(idx)[0], atol=1e-5, rtol=1e-5)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())  # merged: no adapters left
    # averaging one task vector with itself is the identity
    assert torch.equal(average(torch.stack([tau, tau])), tau)


def test_bad_lora_use_is_a_value_error():
    model = _base()
    with pytest.raises(ValueError, match="LoRA rank must be in"):
        add_lora(model, rank=10_000)
    model = _base()
    names = add_lora(model, rank=2)
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(model)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        task_vector(_base())
    with pytest.raises(ValueError, match="entries"):
        with_task_vector(_base(), names, torch.zeros(7))


def test_distinctive_words_and_routing():
    domains = {"net": b"socket connect socket send recv connect socket " * 5 + b"return value " * 5,
               "mail": b"header message header mime message payload " * 5 + b"return value " * 5}
    caps = distinctive_words(domains, n=3)
    assert set(caps["net"]) == {"socket", "connect", "send"} or "socket" in caps["net"]
    assert "return" not in caps["net"] and "return" not in caps["mail"]   # shared words are not capabilities
    router = SpecialistRouter(caps)
    assert router.route("open a socket and connect") == "net"
    assert router.route("parse the mime header") == "mail"
    assert router.route("nothing relevant here") is None                 # below threshold: the base answers


def test_hebbian_strength_breaks_ties_and_survives_sqlite(tmp_path):
    router = SpecialistRouter({"a": ["alpha", "shared"], "b": ["beta", "shared"]}, hebbian_weight=0.5)
    assert router.route("shared") == "b"                                  # a tie goes to the later name ...
    for _ in range(3):
        router.reinforce("a")
    assert router.route("shared") == "a"                                  # ... until a's pathway is stronger
    assert router.pathways.strengths["a"] == pytest.approx(0.01 * (0.999 + 0.999 ** 2 + 0.999 ** 3))
    router.pathways.save(tmp_path / "routes.sqlite")
    again = SpecialistRouter({"a": ["alpha", "shared"], "b": ["beta", "shared"]},
                             HebbianPathways.load(tmp_path / "routes.sqlite"), hebbian_weight=0.5)
    assert again.pathways.strengths == router.pathways.strengths
    assert again.route("shared") == "a"
    with pytest.raises(ValueError, match="unknown specialist"):
        router.reinforce("c")


def test_words_and_package_corpus():
    assert words("def get_Item(x): return 42") == ["def", "get_item", "return"]
    corpus = package_corpus("json", max_bytes=20_000)
    assert len(corpus.train) > 0 and len(corpus.val) > 0
    assert not set(corpus.train_files) & set(corpus.val_files)
    assert all(name.startswith("json/") for name in corpus.train_files + corpus.val_files)
    with pytest.raises(ValueError, match="no_such_package"):
        package_corpus("no_such_package")
