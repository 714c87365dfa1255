"""Data-parallel training: two CPU processes (gloo), each on half of every batch, take the same steps as one
process on the whole batch. Checked on the book's own loop (book.train.train under torch.distributed) for every
chapter's language model (book.distributed.MODELS): the losses, and every parameter after three AdamW steps.
Dense models agree to float rounding; the two with a mixture of experts agree closely, not exactly, because each
process computes the load-balancing loss on its own slice (a product of two means is not the mean of products)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from book.distributed import MODELS, build_model, train_model
from refimpl.io import read_json, read_tensors

ROOT = Path(__file__).resolve().parents[1]
STEPS, BATCH, SEQ = 3, 8, 32

# One process of the pair: joins through a file in tmp_path (no TCP port to choose and race for), trains, and
# writes its parameters and history (tensor file and JSON: no pickle).
WORKER = """
import json, sys, torch, torch.distributed as dist
from book.distributed import init_process_group, train_model
from refimpl.io import write_json, write_tensors
rank, init, out, name, overrides = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], json.loads(sys.argv[5])
torch.set_num_threads(1)
device = init_process_group(init, rank=rank, world_size=2)
model, history = train_model(name, {steps}, {batch}, {seq}, "tiny", device, train_bytes=100_000, progress=False,
                             overrides=overrides)
write_tensors(f"{{out}}/rank{{rank}}.tensors", {{k: v.detach().contiguous() for k, v in model.state_dict().items()}})
write_json(f"{{out}}/rank{{rank}}.json", history.as_dict())
dist.destroy_process_group()
""".format(steps=STEPS, batch=BATCH, seq=SEQ)

# What makes a process's slice of the batch matter: the MoE load-balancing loss (a product of two means over the
# rows), and randomness drawn per row (the superblock's dropout, Synapse's router noise: each process draws its
# own). Off, every model must agree with one process to rounding.
EXACT = {"superblock": {"aux_loss_weight": 0.0, "dropout": 0.0}, "synapse": {"aux_loss_weight": 0.0, "router_noise": 0.0}}


def run_pair(name: str, overrides: dict, tmp_path: Path) -> tuple[list[dict], list[list[float]]]:
    """Two gloo processes training `name`: each one's parameters and training losses."""
    init = f"file://{tmp_path / 'rendezvous'}"
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, str(rank), init, str(tmp_path), name,
                                 json.dumps(overrides)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True) for rank in (0, 1)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), "\n".join(o[-3000:] for o in outputs)
    ranks = [read_tensors(tmp_path / f"rank{r}.tensors")[0] for r in (0, 1)]
    losses = [read_json(tmp_path / f"rank{r}.json")["train_bpb"] for r in (0, 1)]
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), f"{name} {key}: the two processes disagree"
    assert losses[0] == losses[1]
    return ranks, losses


@pytest.mark.parametrize("name", MODELS)
def test_two_processes_equal_one_on_the_combined_batch(name, tmp_path):
    overrides = EXACT.get(name, {})
    ranks, losses = run_pair(name, overrides, tmp_path)
    torch.set_num_threads(1)
    single, history = train_model(name, STEPS, BATCH, SEQ, "tiny", torch.device("cpu"), train_bytes=100_000,
                                  progress=False, overrides=overrides)
    expected, initial = single.state_dict(), build_model(name, "tiny", SEQ, overrides).state_dict()
    for key, value in expected.items():
        assert torch.allclose(ranks[0][key], value, rtol=1e-4, atol=1e-6), (
            f"{name} {key}: two processes differ from one, max {float((ranks[0][key] - value).abs().max()):.2e}")
    assert any(not torch.equal(value, initial[key]) for key, value in expected.items()), \
        "training changed nothing: the test proves nothing"
    assert losses[0] == pytest.approx(history.train_bpb, rel=1e-5)


@pytest.mark.parametrize("name", sorted(EXACT))
def test_with_the_balancing_loss_on_the_processes_agree_and_stay_close_to_one(name, tmp_path):
    _, losses = run_pair(name, {}, tmp_path)
    torch.set_num_threads(1)
    _, history = train_model(name, STEPS, BATCH, SEQ, "tiny", torch.device("cpu"), train_bytes=100_000,
                             progress=False)
    assert losses[0][0] == pytest.approx(history.train_bpb[0], rel=1e-3)   # step 0: the same weights, same batch
    assert losses[0] == pytest.approx(history.train_bpb, rel=1e-2)


def test_a_batch_that_does_not_split_evenly_is_refused():
    """Checked in one process with the group's size faked to 3 (the refusal comes before any communication)."""
    import book.train as train_module
    from refimpl import data
    from refimpl.baseline import BaselineConfig, BaselineLM
    original = train_module.data_parallel
    train_module.data_parallel = lambda: (0, 3)
    try:
        with pytest.raises(ValueError, match="batch_size=8 must be a multiple of the 3 processes"):
            train_module.train(BaselineLM(BaselineConfig.preset("tiny")), data.stdlib_corpus(100_000, 20_000),
                               train_module.TrainConfig(steps=1, batch_size=8, seq_len=16), progress=False)
    finally:
        train_module.data_parallel = original


def test_the_command_refuses_to_run_outside_torchrun():
    done = subprocess.run([sys.executable, "-m", "book.distributed", "--steps", "1"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "run me under torchrun" in done.stderr
