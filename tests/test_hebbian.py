"""Hebbian pathways: the update rule, its steady state, and a SQLite round trip."""

from __future__ import annotations

import math

import pytest
import torch

from refimpl.synapse import HebbianPathways


def test_update_rule_by_hand():
    table = HebbianPathways(lr=0.5, decay=0.9)
    table.update(torch.tensor([[1, 0], [2, 3]]))
    # token 1: "0+1" = 0.5, then x0.9 -> 0.45; token 2: "2+3" = 0.5, all x0.9 -> 0.405, 0.45
    assert table.strengths == pytest.approx({"0+1": 0.405, "2+3": 0.45})


def test_always_firing_pathway_settles_at_lr_decay_over_one_minus_decay():
    table = HebbianPathways()
    table.update(torch.tensor([[0, 1]] * 20000))
    assert math.isclose(table.strengths["0+1"], 0.01 * 0.999 / 0.001, rel_tol=1e-6)   # 9.99


def test_sqlite_round_trip(tmp_path):
    table = HebbianPathways(lr=0.02, decay=0.99)
    table.update(torch.tensor([[0, 1], [1, 2], [0, 1]]))
    path = tmp_path / "pathways.sqlite"
    table.save(path)
    loaded = HebbianPathways.load(path)
    assert loaded.strengths == table.strengths and (loaded.lr, loaded.decay) == (0.02, 0.99)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".pathways.sqlite.lock", "pathways.sqlite"]  # no temporary left


def test_loading_something_else_fails_clearly(tmp_path):
    bad = tmp_path / "not.sqlite"
    bad.write_bytes(b"definitely not a database")
    with pytest.raises(ValueError, match="not a pathway database"):
        HebbianPathways.load(bad)
    with pytest.raises(FileNotFoundError):
        HebbianPathways.load(tmp_path / "missing.sqlite")
