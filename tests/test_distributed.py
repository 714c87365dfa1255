"""Data-parallel training: two CPU processes (gloo), each on half of every batch, take the same steps as one
process on the whole batch. Checked on the book's own loop (book.train.train under torch.distributed): the
losses, and every parameter after three AdamW steps."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from book.distributed import train_baseline
from refimpl.io import read_json, read_tensors

ROOT = Path(__file__).resolve().parents[1]
STEPS, BATCH, SEQ = 3, 8, 32

# One process of the pair: joins through a file in tmp_path (no TCP port to choose and race for), trains, and
# writes its parameters and history (tensor file and JSON: no pickle).
WORKER = """
import sys, torch, torch.distributed as dist
from book.distributed import init_process_group, train_baseline
from refimpl.io import write_json, write_tensors
rank, init, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
torch.set_num_threads(1)
device = init_process_group(init, rank=rank, world_size=2)
model, history = train_baseline({steps}, {batch}, {seq}, "tiny", device, train_bytes=100_000, progress=False)
write_tensors(f"{{out}}/rank{{rank}}.tensors", {{k: v.detach().contiguous() for k, v in model.state_dict().items()}})
write_json(f"{{out}}/rank{{rank}}.json", history.as_dict())
dist.destroy_process_group()
""".format(steps=STEPS, batch=BATCH, seq=SEQ)


def test_two_processes_equal_one_on_the_combined_batch(tmp_path):
    init = f"file://{tmp_path / 'rendezvous'}"
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, str(rank), init, str(tmp_path)], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), "\n".join(o[-3000:] for o in outputs)

    torch.set_num_threads(1)
    single, history = train_baseline(STEPS, BATCH, SEQ, "tiny", torch.device("cpu"), train_bytes=100_000,
                                     progress=False)
    expected = single.state_dict()
    ranks = [read_tensors(tmp_path / f"rank{r}.tensors")[0] for r in (0, 1)]
    for name, value in expected.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), f"{name}: the two processes disagree"
        assert torch.allclose(ranks[0][name], value, rtol=1e-4, atol=1e-6), (
            f"{name}: two processes differ from one, max {float((ranks[0][name] - value).abs().max()):.2e}")
    assert any(not torch.equal(value, single_init) for value, single_init in
               zip(expected.values(), _initial_state().values())), "training changed nothing: the test proves nothing"
    losses = [read_json(tmp_path / f"rank{r}.json")["train_bpb"] for r in (0, 1)]
    assert losses[0] == losses[1]
    assert losses[0] == pytest.approx(history.train_bpb, rel=1e-5)


def _initial_state():
    from refimpl.baseline import BaselineConfig, BaselineLM
    torch.manual_seed(0)
    return BaselineLM(BaselineConfig.preset("tiny", max_seq_len=SEQ)).state_dict()


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
