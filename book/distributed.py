"""Training beyond one device: the book's training loop under `torchrun`, data-parallel.

    torchrun --nproc_per_node 2 -m book.distributed --steps 200            # 2 processes on this machine
    torchrun --nproc_per_node 8 -m book.distributed --preset small         # 8 GPUs of one machine
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 \\
             --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m book.distributed   # the same on each machine

Each process trains the same model (same seed, same initial weights) on its own slice of every batch;
DistributedDataParallel averages the gradients during backward, so every process takes the same optimiser
step (`book.train.train` does the slicing and the wrapping once torch.distributed is initialised). The
backend is NCCL on GPUs (one GPU per process, LOCAL_RANK picks it) and gloo on CPUs. Rank 0 writes the
history as JSON.

What this trains today: the baseline language model of chapter 00, on the standard library's bytes.
Does not include: FSDP (every model of the book fits one device), tensor or pipeline parallelism, or the
chapters' own training loops under torchrun (their notebooks run one process).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def init_process_group(init_method: str | None = None, rank: int | None = None,
                       world_size: int | None = None) -> torch.device:
    """Join the process group (torchrun's environment by default) and return this process's device:
    cuda:LOCAL_RANK with NCCL when there are GPUs, the CPU with gloo otherwise."""
    use_cuda = torch.cuda.is_available()
    device = torch.device("cpu")
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    kwargs = {} if init_method is None else {"init_method": init_method, "rank": rank, "world_size": world_size}
    dist.init_process_group(backend="nccl" if use_cuda else "gloo", **kwargs)
    return device


def train_baseline(steps: int, batch_size: int, seq_len: int, preset: str, device: torch.device,
                   train_bytes: int = 400_000, progress: bool = True):
    """The baseline LM of `preset` (seed 0), trained `steps` steps on stdlib bytes; returns (model, history)."""
    from book.train import TrainConfig, train
    from refimpl import data
    from refimpl.baseline import BaselineConfig, BaselineLM

    corpus = data.stdlib_corpus(max_train_bytes=train_bytes, max_val_bytes=50_000)
    torch.manual_seed(0)
    model = BaselineLM(BaselineConfig.preset(preset, max_seq_len=seq_len)).to(device)
    cfg = TrainConfig(steps=steps, batch_size=batch_size, seq_len=seq_len, warmup=min(20, steps),
                      eval_every=max(1, steps), eval_batches=2)
    return model, train(model, corpus, cfg, progress=progress, description=f"baseline {preset}")


def main(argv: list[str] | None = None) -> int:
    """Train the baseline under torchrun; rank 0 writes the history to --out."""
    parser = argparse.ArgumentParser(prog="torchrun ... -m book.distributed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16, help="the global batch: split across processes")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--out", type=Path, default=Path("build") / "distributed" / "history.json")
    args = parser.parse_args(argv)
    if "RANK" not in os.environ:
        parser.error("run me under torchrun (e.g. torchrun --nproc_per_node 2 -m book.distributed); "
                     "for one process, book.train.train is the same loop")
    device = init_process_group()
    try:
        _, history = train_baseline(args.steps, args.batch_size, args.seq_len, args.preset, device,
                                    progress=dist.get_rank() == 0)
        if dist.get_rank() == 0:
            from refimpl.io import write_json
            write_json(args.out, {"world_size": dist.get_world_size(), "backend": dist.get_backend(),
                                  **history.as_dict()})
            print(f"{dist.get_world_size()} processes, final validation {history.val_bpb[-1]:.3f} bits/byte; "
                  f"wrote {args.out}")
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
