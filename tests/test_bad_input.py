"""Nothing wrong passes quietly: a table of bad inputs per public entry point, each refused with a clear error.

The other tables live beside what they test: tests/test_config.py (every config field), test_token_ids.py
(ids and targets of the five language models), test_tensor_files.py (hostile tensor files), tests/ops/ (each
op's shapes). This file holds the rest of issue 19's list: the tokenizer's ids, NaN task vectors, pathway
names and strengths, sampling arguments, and one writer per pathway database. conftest.py counts every
`pytest.raises` that saw its error and prints the total at the end of the run.
"""

from __future__ import annotations

import math
import os
import re
import sqlite3
import subprocess
import sys

import pytest
import torch

import kernels
from book.tokenizer import ByteTokenizer
from refimpl import ops
from refimpl.baseline import BaselineConfig, BaselineLM
from refimpl.io import remove_dead_temporaries
from refimpl.synapse import HebbianPathways, Thalamus

# ----------------------------------------------------------------------------
# ByteTokenizer.decode: ids are ints in 0..255, nothing is rounded
# ----------------------------------------------------------------------------

DECODE = {
    "a float id": ([72, 1.7], "ids must be ints, got e.g. \\[1.7\\]"),
    "a whole float id": ([72.0], "ids must be ints"),
    "a bool id": ([True], "ids must be ints"),
    "a float tensor": (torch.tensor([72.0, 105.0]), "1-D integer tensor of ids, got torch.float32"),
    "a bool tensor": (torch.tensor([True]), "1-D integer tensor of ids, got torch.bool"),
    "a 2-D tensor": (torch.zeros(2, 2, dtype=torch.long), "1-D integer tensor of ids"),
    "a string": ("hi", "sequence of int ids, got str"),
    "bytes": (b"hi", "sequence of int ids, got bytes"),
    "an int, not a sequence": (72, "sequence of int ids, got int"),
    "id 256": ([256], "ids must lie in 0..255, got e.g. \\[256\\]"),
    "id -1": (torch.tensor([-1]), "ids must lie in 0..255"),
}


@pytest.mark.parametrize("ids, message", DECODE.values(), ids=DECODE.keys())
def test_decode_refuses(ids, message):
    with pytest.raises(ValueError, match=message):
        ByteTokenizer().decode(ids)


def test_decode_still_takes_what_it_should():
    assert ByteTokenizer().decode([72, 105]) == ByteTokenizer().decode(torch.tensor([72, 105], dtype=torch.uint8)) == "Hi"


# ----------------------------------------------------------------------------
# TIES: a task vector with NaN or inf is refused, by the reference and by every kernel
# ----------------------------------------------------------------------------

def _tau_with(value, at=(1, 3)):
    tau = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))
    tau[at] = value
    return tau


TIES = {"NaN": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


@pytest.mark.parametrize("backend", ["reference", "numba"])
@pytest.mark.parametrize("value", TIES.values(), ids=TIES.keys())
def test_ties_refuses_non_finite_task_vectors(value, backend):
    with pytest.raises(ValueError, match=r"task vectors must be finite; tau\[1, 3\] = "):
        kernels.get("ties_merge", backend)(_tau_with(value))


def test_the_nan_was_a_real_hole():
    """Why it is refused: without the check, a NaN neither propagates nor is kept, so the merge looks fine."""
    tau = _tau_with(float("nan"))
    trimmed = ops.trim(torch.nan_to_num(tau, nan=0.0), 0.2)
    assert torch.isfinite(trimmed).all()          # the merge of the rest is finite: nothing would have warned


# ----------------------------------------------------------------------------
# Hebbian pathways: names, strengths, rows of a database, and the router's reading of names
# ----------------------------------------------------------------------------

REINFORCE = {"an empty name": "", "an int": 3, "None": None}


@pytest.mark.parametrize("key", REINFORCE.values(), ids=REINFORCE.keys())
def test_reinforce_refuses(key):
    with pytest.raises(ValueError, match="named by a non-empty string"):
        HebbianPathways().reinforce(key)


UPDATE = {"floats": torch.tensor([[0.0, 1.0]]), "1-D": torch.tensor([0, 1]), "a list": [[0, 1]],
          "a negative expert": torch.tensor([[-1, 1]])}


@pytest.mark.parametrize("index", UPDATE.values(), ids=UPDATE.keys())
def test_update_refuses(index):
    with pytest.raises(ValueError, match="HebbianPathways.update"):
        HebbianPathways().update(index)


CONSTRUCT = {"lr 0": dict(lr=0.0), "lr inf": dict(lr=math.inf), "lr NaN": dict(lr=math.nan), "decay 0": dict(decay=0.0),
             "decay 1.5": dict(decay=1.5), "lr as a string": dict(lr="0.1"), "decay as a bool": dict(decay=True)}


@pytest.mark.parametrize("kwargs", CONSTRUCT.values(), ids=CONSTRUCT.keys())
def test_pathway_tables_refuse_bad_rates(kwargs):
    with pytest.raises(ValueError, match="HebbianPathways: "):
        HebbianPathways(**kwargs)


def _database(path, rows, meta=(("lr", 0.01), ("decay", 0.999))):
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value)")
        db.execute("CREATE TABLE pathways (name, strength)")
        db.executemany("INSERT INTO meta VALUES (?, ?)", meta)
        db.executemany("INSERT INTO pathways VALUES (?, ?)", rows)
    db.close()
    return path


LOAD = {
    "an inf strength": ([("0+1", math.inf)], None, "pathway '0\\+1' has strength inf"),
    "a negative strength": ([("0+1", -2.0)], None, "has strength -2.0; strengths are finite numbers >= 0"),
    "a text strength": ([("0+1", "lots")], None, "has strength 'lots'"),
    "a NULL strength": ([("0+1", None)], None, "has strength None"),
    "an int name": ([(7, 1.0)], None, "a pathway name must be a non-empty string, got 7"),
    "an empty name": ([("", 1.0)], None, "a pathway name must be a non-empty string"),
    "no decay in meta": ([], (("lr", 0.01),), "its meta table lacks 'decay'"),
    "a decay of 2": ([], (("lr", 0.01), ("decay", 2.0)), "decay in \\(0, 1\\]"),
    "a text lr": ([], (("lr", "x"), ("decay", 0.9)), "lr must be a finite number"),
}


@pytest.mark.parametrize("rows, meta, message", LOAD.values(), ids=LOAD.keys())
def test_load_checks_every_row_and_names_the_file(tmp_path, rows, meta, message):
    path = _database(tmp_path / "bad.sqlite", rows, *(meta,) if meta else ())
    with pytest.raises(ValueError, match=f"HebbianPathways.load: {re.escape(str(path))}.*{message}"):
        HebbianPathways.load(path)


def test_a_locked_database_is_reported_as_locked_not_as_foreign(tmp_path):
    path = tmp_path / "p.sqlite"
    HebbianPathways().save(path)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")                                 # another process mid-write, as sqlite sees it
    try:
        original = sqlite3.connect

        def quick(*args, **kwargs):                                    # do not wait the full 5 s in a test
            return original(*args, **{**kwargs, "timeout": 0.05})
        sqlite3.connect = quick
        try:
            with pytest.raises(RuntimeError, match=f"{re.escape(str(path))} is locked by another process"):
                HebbianPathways.load(path)
        finally:
            sqlite3.connect = original
    finally:
        holder.execute("ROLLBACK")
        holder.close()


NAMES = {"-1": "-1", "an expert too many": "0+4", "a word": "code", "an empty part": "0+", "spaces": " 1"}


@pytest.mark.parametrize("name", NAMES.values(), ids=NAMES.keys())
def test_the_router_refuses_pathways_that_do_not_name_its_experts(name):
    pathways = HebbianPathways()
    pathways.strengths[name] = 1.0
    router = Thalamus(dim=8, n_experts=4, top_k=2, pathways=pathways, pathway_bias=1.0)
    with pytest.raises(ValueError, match=f"pathway '{re.escape(name)}' does not name experts of this router"):
        router.expert_bias()


# ----------------------------------------------------------------------------
# One writer per pathway database; what a dead writer left is cleaned, a live writer's never
# ----------------------------------------------------------------------------

def test_a_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path):
    from refimpl.io import hold_writer_lock
    path = tmp_path / "p.sqlite"
    first = hold_writer_lock(tmp_path / ".p.sqlite.lock", "first")
    try:
        with pytest.raises(RuntimeError, match=rf"{re.escape(str(path))} is being written by another writer \(process {os.getpid()}\)"):
            HebbianPathways().save(path)
    finally:
        first.close()
    HebbianPathways().save(path)                                      # free again once the first is done


def test_temporaries_of_a_dead_writer_go_and_a_live_writers_stay(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        path = tmp_path / "p.sqlite"
        dead_pid = int(dead.stdout)
        left = [tmp_path / f".p.sqlite.{dead_pid}.abc.tmp", tmp_path / f".p.sqlite.{dead_pid}.abc.tmp-journal"]
        kept = [tmp_path / f".p.sqlite.{live.pid}.xyz.tmp", tmp_path / f".p.sqlite.{os.getpid()}.own.tmp",
                tmp_path / ".other.sqlite.1.abc.tmp"]
        for f in left + kept:
            f.write_bytes(b"half a file")
        HebbianPathways().save(path)
        assert not any(f.exists() for f in left) and all(f.exists() for f in kept)
        assert remove_dead_temporaries(path) == []
    finally:
        live.stdin.close()
        live.wait()


# ----------------------------------------------------------------------------
# Sampling arguments
# ----------------------------------------------------------------------------

GENERATE = {
    "top_k 0": (dict(top_k=0), r"top_k must be None .* or an int in \[1, 256\], got 0"),
    "top_k above V": (dict(top_k=257), r"top_k must be None"),
    "top_k 2.5": (dict(top_k=2.5), r"top_k must be None"),
    "temperature 0": (dict(temperature=0.0), "temperature must be a finite number > 0"),
    "temperature NaN": (dict(temperature=math.nan), "temperature must be a finite number > 0"),
    "temperature inf": (dict(temperature=math.inf), "temperature must be a finite number > 0"),
    "max_new_tokens -1": (dict(max_new_tokens=-1), "max_new_tokens must be an int >= 0, got -1"),
    "max_new_tokens 2.0": (dict(max_new_tokens=2.0), "max_new_tokens must be an int >= 0"),
}


@pytest.mark.parametrize("kwargs, message", GENERATE.values(), ids=GENERATE.keys())
def test_baseline_generate_refuses(kwargs, message):
    model = BaselineLM(BaselineConfig(d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=16))
    with pytest.raises(ValueError, match=message):
        model.generate(torch.zeros(1, 2, dtype=torch.long), **{"max_new_tokens": 2, **kwargs})


# ----------------------------------------------------------------------------
# The count itself
# ----------------------------------------------------------------------------

def test_the_count_counts_only_errors_that_came():
    import conftest
    before = sum(conftest.REFUSED.values())
    with pytest.raises(ValueError):
        raise ValueError("one")
    pytest.raises(ValueError, int, "x")
    assert sum(conftest.REFUSED.values()) == before + 2
    with pytest.raises(pytest.fail.Exception):                   # an error that did not come fails the test ...
        with conftest._real_raises(ValueError):
            pass
    assert sum(conftest.REFUSED.values()) == before + 3           # ... and only the outer raises counted
