"""Training beyond one device: a chapter's language model trained by the book's loop under `torchrun`,
data-parallel. The same command runs one process or many.

    torchrun --nproc_per_node 2 -m book.distributed --model superblock --steps 200   # 2 processes here (gloo)
    torchrun --nproc_per_node 8 -m book.distributed --model baseline --preset small  # 8 GPUs of one machine (NCCL)
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 \\
             --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m book.distributed   # the same on each machine

Each process builds the same model (same seed, same initial weights) and trains on its own slice of every batch;
DistributedDataParallel averages the gradients during backward, so every process takes the same optimiser step
(`book.train.train` does the slicing and the wrapping once torch.distributed is initialised). The backend is NCCL
on GPUs (one GPU per process, LOCAL_RANK picks it) and gloo on CPUs. Rank 0 writes the history as JSON.

The models (`--model`, see MODELS): chapter 00's baseline, 02's H-ENN, 03's superblock, 04's geometric model and
05's Synapse model, each at a named preset, trained by one forward and one backward per step on the standard
library's bytes. For the dense models N processes compute what one computes on the whole batch, up to float
rounding. The two with a mixture of experts (superblock, Synapse) do too once their load-balancing loss is off,
with the randomness each process draws for its own rows (the superblock's dropout, Synapse's router noise); with
them on, each process computes the balancing loss on its own slice, and the mean of those is not the loss of
the whole batch (it is a product of two means), so the runs differ slightly (tests/test_distributed.py checks
the exact case and measures the other).

Does not include: the chapters' own special steps (02's tick-by-tick backward, 04's three-phase curriculum, 01's
grid on image patches: their notebooks run one process); FSDP, because every model of the book, at every preset
including the gpu profile's, fits one device (the largest, chapter 00's `medium` baseline, has 9.5 million
parameters); tensor or pipeline parallelism.
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


# name: (module, config class, model class, the chapter it comes from)
MODELS = {
    "baseline": ("refimpl.baseline", "BaselineConfig", "BaselineLM", "00_overview"),
    "henn": ("refimpl.henn", "HENNConfig", "HENNLM", "02_henn"),
    "superblock": ("refimpl.superblock", "SuperblockConfig", "SuperblockLM", "03_superblock"),
    "geometric": ("refimpl.geometric", "GeometricConfig", "GeometricLM", "04_geometric"),
    "synapse": ("refimpl.synapse", "SynapseConfig", "SynapseLM", "05_synapse"),
}


def build_model(name: str, preset: str, seq_len: int, overrides: dict | None = None) -> torch.nn.Module:
    """The `name` model (see MODELS) at `preset`, its context set to `seq_len` and any config field changed by
    `overrides`, initialised from seed 0."""
    import importlib

    if name not in MODELS:
        raise ValueError(f"no model {name!r}; the models are {', '.join(MODELS)}")
    module, config_class, model_class, _ = MODELS[name]
    module = importlib.import_module(module)
    config = getattr(module, config_class).preset(preset, **{"max_seq_len": seq_len, **(overrides or {})})
    torch.manual_seed(0)
    return getattr(module, model_class)(config)


def train_model(name: str, steps: int, batch_size: int, seq_len: int, preset: str, device: torch.device,
                train_bytes: int = 400_000, progress: bool = True, autocast: str = "none",
                overrides: dict | None = None):
    """The `name` model of `preset` (seed 0, config `overrides`), trained `steps` steps on stdlib bytes; returns
    (model, history)."""
    from book.train import TrainConfig, train
    from refimpl import data

    corpus = data.stdlib_corpus(max_train_bytes=train_bytes, max_val_bytes=50_000)
    model = build_model(name, preset, seq_len, overrides).to(device)
    cfg = TrainConfig(steps=steps, batch_size=batch_size, seq_len=seq_len, warmup=min(20, steps),
                      eval_every=max(1, steps), eval_batches=2, autocast=autocast)
    return model, train(model, corpus, cfg, progress=progress, description=f"{name} {preset}")


def train_baseline(steps: int, batch_size: int, seq_len: int, preset: str, device: torch.device,
                   train_bytes: int = 400_000, progress: bool = True):
    """Chapter 00's baseline: train_model("baseline", ...)."""
    return train_model("baseline", steps, batch_size, seq_len, preset, device, train_bytes, progress)


def main(argv: list[str] | None = None) -> int:
    """Train a chapter's model under torchrun; rank 0 writes the history to --out."""
    parser = argparse.ArgumentParser(prog="torchrun ... -m book.distributed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="baseline", choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16, help="the global batch: split across processes")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--autocast", default="none", choices=["none", "bf16"])
    parser.add_argument("--out", type=Path, default=Path("build") / "distributed" / "history.json")
    args = parser.parse_args(argv)
    if "RANK" not in os.environ:
        parser.error("run me under torchrun (e.g. torchrun --nproc_per_node 2 -m book.distributed); "
                     "for one process, book.train.train is the same loop")
    device = init_process_group()
    try:
        _, history = train_model(args.model, args.steps, args.batch_size, args.seq_len, args.preset, device,
                                 progress=dist.get_rank() == 0, autocast=args.autocast)
        if dist.get_rank() == 0:
            from refimpl.io import write_json
            write_json(args.out, {"model": args.model, "preset": args.preset, "world_size": dist.get_world_size(),
                                  "backend": dist.get_backend(),
                                  **history.as_dict()})
            print(f"{dist.get_world_size()} processes, final validation {history.val_bpb[-1]:.3f} bits/byte; "
                  f"wrote {args.out}")
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
