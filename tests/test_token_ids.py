"""Every language model of the book refuses token ids and targets it cannot score, naming what it expected,
instead of failing deep inside the embedding or dropping -100 targets without a word (issue 19, item 3 in part)."""

from __future__ import annotations

import pytest
import torch

from refimpl.baseline import BaselineConfig, BaselineLM
from refimpl.geometric import GeometricConfig, GeometricLM
from refimpl.henn import HENNConfig, HENNLM
from refimpl.superblock import SuperblockConfig, SuperblockLM
from refimpl.synapse import SynapseConfig, SynapseLM

MODELS = {"BaselineLM": (BaselineLM, BaselineConfig), "GeometricLM": (GeometricLM, GeometricConfig),
          "HENNLM": (HENNLM, HENNConfig), "SuperblockLM": (SuperblockLM, SuperblockConfig),
          "SynapseLM": (SynapseLM, SynapseConfig)}


def _ids(*shape, high=256):
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(0))


# (what, the call's idx and targets, the message)
CASES = {
    "id past the vocabulary": (lambda: (torch.full((2, 8), 256), None), r"token ids must be in \[0, 256\), got ids from 256"),
    "negative id": (lambda: (_ids(2, 8) - 300, None), r"token ids must be in \[0, 256\)"),
    "empty sequence": (lambda: (_ids(2, 0), None), r"at least one sequence of at least one token, got idx \[2, 0\]"),
    "float ids": (lambda: (_ids(2, 8).float(), None), r"expects idx as an int tensor \[B, T\]"),
    "-100 targets": (lambda: (_ids(2, 8), torch.full((2, 8), -100)), "targets hold -100, PyTorch's ignore index"),
    "target past the vocabulary": (lambda: (_ids(2, 8), _ids(2, 8) + 256), r"target ids must be in \[0, 256\)"),
    "float targets": (lambda: (_ids(2, 8), _ids(2, 8).float()), r"targets as an int tensor of idx's shape \[2, 8\]"),
    "targets of another shape": (lambda: (_ids(2, 8), _ids(2, 7)), r"targets as an int tensor of idx's shape \[2, 8\]"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
@pytest.mark.parametrize("name", MODELS)
def test_bad_ids_and_targets_are_refused_by_name(name, case):
    model_cls, config_cls = MODELS[name]
    model = model_cls(config_cls.preset("tiny")).eval()
    make, message = CASES[case]
    idx, targets = make()
    with pytest.raises(ValueError, match=message), torch.no_grad():
        model(idx, targets)


@pytest.mark.parametrize("name", MODELS)
def test_good_ids_and_targets_still_give_a_loss(name):
    model_cls, config_cls = MODELS[name]
    model = model_cls(config_cls.preset("tiny")).eval()
    idx = _ids(2, 8)
    with torch.no_grad():
        _, loss = model(idx, _ids(2, 8))
    assert torch.isfinite(loss)
