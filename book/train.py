"""A small training loop with a progress bar, and bits-per-byte evaluation.

Any model of the book fits if `model(x, y)` returns `(logits [B, T, V], loss)`.
The loop is AdamW with linear warm-up and cosine decay and gradient clipping.
Batches come from a generator seeded by the config and evaluation windows are
fixed, so two runs of the same model (seed its initialisation with
torch.manual_seed before building it) with the same config give the same curve.
Batches are moved to the model's device: the loop has no device of its own, so a model on a GPU trains there.
With `autocast="bf16"` the forward pass (and the loss) runs under torch.autocast in bfloat16 and the backward
outside it, as PyTorch recommends; the weights and the optimiser stay in float32. Evaluation is in float32.

Under `torchrun` (torch.distributed initialised, more than one process) the same loop trains data-parallel:
every process draws the same global batch from the seeded generator and takes its own equal slice of the rows,
the model is wrapped in DistributedDataParallel (which averages the gradients across processes during
backward), and the reported loss is averaged across processes. So N processes on a batch of B rows compute
what one process computes on the whole batch, up to float rounding (tests/test_distributed.py checks it).
See book/distributed.py for the command.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from refimpl.data import TextCorpus, random_batch, sequential_batches
from refimpl.config import check_fields, choice, number, whole


@dataclass
class TrainConfig:
    steps: int = 200               # optimiser steps
    batch_size: int = 16           # B: sequences per step
    seq_len: int = 128             # T: bytes per sequence
    lr: float = 3e-3               # peak learning rate
    min_lr_ratio: float = 0.1      # cosine decays to lr * min_lr_ratio
    warmup: int = 20               # linear warm-up steps
    weight_decay: float = 0.1      # AdamW decoupled weight decay (matrices only)
    grad_clip: float = 1.0         # clip the global gradient norm to this
    eval_every: int = 50           # steps between validation evaluations
    eval_batches: int = 8          # validation batches per evaluation
    seed: int = 0                  # batch order
    autocast: str = "none"         # "bf16": the forward pass under torch.autocast in bfloat16 (a GPU's fast path)
    max_seconds: float | None = None   # a wall-clock budget: stop when it is spent (the challenge's 10 min: 600)

    RULES = {"steps": whole(1), "batch_size": whole(1), "seq_len": whole(1), "lr": number(0, low_open=True),
             "min_lr_ratio": number(0, 1), "warmup": whole(0), "weight_decay": number(0),
             "grad_clip": number(0, low_open=True), "eval_every": whole(1), "eval_batches": whole(1),
             "seed": whole(0), "autocast": choice("none", "bf16"),
             "max_seconds": number(0, low_open=True, optional=True)}

    def __post_init__(self):
        check_fields(self, self.RULES)


@dataclass
class History:
    """What a training run measured: per-step train loss, periodic validation bits per byte."""
    step: list[int] = field(default_factory=list)
    train_bpb: list[float] = field(default_factory=list)   # training loss, converted to bits per byte
    eval_step: list[int] = field(default_factory=list)
    val_bpb: list[float] = field(default_factory=list)
    seconds: float = 0.0
    config: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def learning_rate(step: int, cfg: TrainConfig, elapsed: float = 0.0) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to cfg.lr * cfg.min_lr_ratio. With a wall-clock budget
    (cfg.max_seconds) the decay follows whichever runs out first, the steps or the seconds (`elapsed`), so a
    budgeted run still ends at the low learning rate."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    if cfg.max_seconds is not None:
        progress = min(1.0, max(progress, elapsed / cfg.max_seconds))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not norms, not biases)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


def _device_of(model: torch.nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")   # cpu-ok: no parameters at all


@torch.no_grad()
def bits_per_byte(model: torch.nn.Module, data: torch.Tensor, seq_len: int, batch_size: int = 16,
                  max_batches: int | None = None) -> float:
    """Mean next-byte cross-entropy in bits over non-overlapping windows of `data`.

    With byte-level tokens this is exactly bits per byte (a uniform guess scores 8).
    """
    was_training = model.training
    model.eval()
    device = _device_of(model)
    total_bits, total_bytes = 0.0, 0
    for x, y in sequential_batches(data, batch_size, seq_len, max_batches):
        x, y = x.to(device), y.to(device)
        logits, _ = model(x)
        nats = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
        total_bits += nats.item() / math.log(2)
        total_bytes += y.numel()
    model.train(was_training)
    return total_bits / total_bytes


def _forward_backward(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, autocast: str = "none") -> float:
    """The usual step: one forward over the whole batch (under bf16 autocast if asked), one backward outside it.
    Returns the loss (nats per token)."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast == "bf16"):
        _, loss = model(x, y)
    if torch.isfinite(loss):
        loss.backward()
    return loss.item()


def data_parallel() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) unless torch.distributed is initialised."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _mean_over_processes(value: float, device: torch.device) -> float:
    import torch.distributed as dist
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def _slowest(seconds: float, device: torch.device, world: int) -> float:
    """The largest of every process's `seconds` (itself alone without torchrun): processes stop together."""
    if world == 1:
        return seconds
    import torch.distributed as dist
    t = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def train(model: torch.nn.Module, corpus: TextCorpus, cfg: TrainConfig, progress: bool = True,
          description: str = "train", forward_backward=None, after_step=None) -> History:
    """Train `model` on `corpus.train`, evaluating bits per byte on `corpus.val` as it goes.

    forward_backward(model, x, y) -> loss (float, nats per token) computes the gradients of one batch;
    the default is one forward and one backward (chapter 02 passes its tick-by-tick version).
    after_step(step, model), if given, runs after every optimiser step (chapter 02 averages weights there).
    With cfg.max_seconds the run stops at the first step that ends past the budget (evaluated there), and
    `history.step` says how many steps it took; under torchrun every process stops at the same step.
    """
    if forward_backward is not None and cfg.autocast != "none":
        raise ValueError(f"train: autocast={cfg.autocast!r} applies to the default step only; a custom "
                         "forward_backward must set up its own autocast (pass autocast='none')")
    forward_backward = forward_backward or (lambda m, x, y: _forward_backward(m, x, y, cfg.autocast))
    generator = torch.Generator().manual_seed(cfg.seed)
    device = _device_of(model)
    rank, world = data_parallel()
    stepped = model
    if world > 1:
        if cfg.batch_size % world:
            raise ValueError(f"train: batch_size={cfg.batch_size} must be a multiple of the {world} processes "
                             "(each takes an equal slice of every batch)")
        from torch.nn.parallel import DistributedDataParallel
        # find_unused_parameters: an expert that no token of this slice chose has no gradient this step
        stepped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                          find_unused_parameters=True)
        progress = progress and rank == 0
    optimizer = make_optimizer(model, cfg)
    history = History(config=asdict(cfg))
    model.train()
    start = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc=description, disable=not progress, mininterval=1.0)
    for step in bar:
        elapsed = time.perf_counter() - start
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg, elapsed)
        x, y = random_batch(corpus.train, cfg.batch_size, cfg.seq_len, generator)   # the global batch
        if world > 1:
            x, y = x.chunk(world)[rank], y.chunk(world)[rank]                     # this process's rows
        optimizer.zero_grad(set_to_none=True)
        loss = forward_backward(stepped, x.to(device), y.to(device))
        if world > 1:
            loss = _mean_over_processes(loss, device)
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss became {loss} at step {step}; lower the learning rate")
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        if after_step is not None:
            after_step(step, model)
        history.step.append(step)
        history.train_bpb.append(loss / math.log(2))
        spent = cfg.max_seconds is not None and _slowest(time.perf_counter() - start, device, world) >= cfg.max_seconds
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps or spent:
            val = bits_per_byte(model, corpus.val, cfg.seq_len, cfg.batch_size, cfg.eval_batches)
            history.eval_step.append(step + 1)
            history.val_bpb.append(val)
            bar.set_postfix(train_bpb=f"{history.train_bpb[-1]:.3f}", val_bpb=f"{val:.3f}")
        if spent:
            break
    history.seconds = time.perf_counter() - start
    return history


# ----------------------------------------------------------------------------
# Cached training: a trained model is kept under build/cache/, so re-running a chapter (or jumping to a section)
# loads it instead of training again. BOOK_RETRAIN=1 trains anyway.
# ----------------------------------------------------------------------------

CACHE_DIR_NAME = "cache"


def cache_key(model: torch.nn.Module, corpus: TextCorpus | None, cfg: TrainConfig | None, name: str, profile: str,
              extra: dict | None = None) -> str:
    """A hash of everything the trained weights depend on: the run's name and profile, the model's class and
    device type, its config (if it has `cfg`) and its initial parameters, the training config (autocast
    included), the corpus bytes, and `extra`. (`fit_cached` passes no corpus and no config: its `extra`
    names what its loop depends on.)"""
    import hashlib
    import json

    digest = hashlib.sha256()
    model_cfg = getattr(model, "cfg", None)
    digest.update(json.dumps({"name": name, "profile": profile, "model": type(model).__qualname__,
                              "device": _device_of(model).type,     # a GPU's rounding trains other weights
                              "model_cfg": asdict(model_cfg) if hasattr(model_cfg, "__dataclass_fields__")
                              else repr(model_cfg), "train": asdict(cfg) if cfg is not None else None,
                              "extra": extra or {}},
                             sort_keys=True, default=repr).encode())
    for key, value in model.state_dict().items():         # the initial weights: another seed is another model
        digest.update(key.encode())
        host = value.detach().cpu().contiguous()      # cpu-ok: hashed as bytes
        digest.update(host.reshape(-1).view(torch.uint8).numpy().tobytes())
    for part in (corpus.train, corpus.val) if corpus is not None else ():
        digest.update(part.cpu().contiguous().numpy().tobytes())   # cpu-ok: hashed as bytes
    return digest.hexdigest()[:20]


def fit_cached(model: torch.nn.Module, fit, *, chapter: str, name: str, profile: str, extra: dict) -> dict:
    """`fit(model) -> record` for a training loop of a chapter's own (a JSON-able dict: its curve, its scores),
    or, when this exact fit ran before, the trained weights and the record loaded from
    build/cache/<chapter>/<name>-<key>.tensors. `extra` must name everything the loop depends on besides the
    model (its task, steps, learning rate, seeds): it is hashed into the key with the model's config and initial
    weights. BOOK_RETRAIN=1 fits anyway. The returned record has "cached_from" (the file, or None)."""
    import os

    from book.chapters import ROOT
    from refimpl.io import read_tensors, write_tensors

    key = cache_key(model, None, None, name, profile, extra)
    path = ROOT / "build" / CACHE_DIR_NAME / chapter / f"{name}-{key}.tensors"
    if path.exists() and os.environ.get("BOOK_RETRAIN") != "1":
        try:
            tensors, meta = read_tensors(path)
            model.load_state_dict({k: v.to(_device_of(model)) for k, v in tensors.items()})
            print(f"{name}: loaded the fitted model from {path.relative_to(ROOT)} (BOOK_RETRAIN=1 to fit again)")
            return {**meta["record"], "cached_from": str(path.relative_to(ROOT))}
        except (ValueError, KeyError, RuntimeError, TypeError) as err:   # unreadable or stale: say so, fit again
            print(f"{name}: the cached model {path.relative_to(ROOT)} cannot be used ({err}); fitting again")
    record = fit(model)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}  # cpu-ok: to a file
    write_tensors(path, state, meta={"record": record, "key": key})
    return {**record, "cached_from": None}


AVERAGED = "averaged/"            # the prefix of the averaged weights' names in a cache file


def train_cached(model: torch.nn.Module, corpus: TextCorpus, cfg: TrainConfig, *, chapter: str, name: str,
                 profile: str, extra: dict | None = None, average_from: int | None = None,
                 **train_kwargs) -> History:
    """`train`, or, when this exact run was trained before, its weights and history loaded from
    build/cache/<chapter>/<name>-<key>.tensors (a checked tensor file: no pickle). The key is `cache_key`;
    BOOK_RETRAIN=1 trains anyway (and rewrites the file). `extra` names anything else the run depends on
    (a forward_backward's settings, say). Returns the History; `history.cached_from` names the file it was
    loaded from, or is None when it trained (not a dataclass field: it never reaches a chapter's metrics).

    average_from=s also keeps the running mean of the parameters over steps s, s + 1, ... (stochastic weight
    averaging, `refimpl.henn.WeightAverage`), stored in the same file: `history.averaged` is that WeightAverage
    (`.copy_to(model)` writes it, `.count` says over how many steps), trained or loaded alike."""
    import os

    from book.chapters import ROOT
    from refimpl.io import read_tensors, write_tensors

    from refimpl.henn import WeightAverage

    if average_from is not None and not 0 <= average_from < cfg.steps:
        raise ValueError(f"train_cached: average_from must be a step in [0, {cfg.steps}), got {average_from!r}")
    if average_from is not None:
        extra = {**(extra or {}), "average_from": average_from}
    key = cache_key(model, corpus, cfg, name, profile, extra)
    path = ROOT / "build" / CACHE_DIR_NAME / chapter / f"{name}-{key}.tensors"
    average = WeightAverage() if average_from is not None else None
    if path.exists() and os.environ.get("BOOK_RETRAIN") != "1":
        try:
            tensors, meta = read_tensors(path)
            device = _device_of(model)
            model.load_state_dict({k: v.to(device) for k, v in tensors.items() if not k.startswith(AVERAGED)})
            if average is not None:
                average.count = meta["averaged_steps"]
                average.mean = {k[len(AVERAGED):]: v.to(device) for k, v in tensors.items() if k.startswith(AVERAGED)}
                if average.mean.keys() != dict(model.named_parameters()).keys():
                    raise KeyError("the averaged weights do not name the model's parameters")
            history = History(**meta["history"])
            history.cached_from = str(path.relative_to(ROOT))
            history.averaged = average
            print(f"{name}: loaded the trained model from {path.relative_to(ROOT)} (BOOK_RETRAIN=1 to train again)")
            return history
        except (ValueError, KeyError, RuntimeError, TypeError) as err:   # unreadable or stale: say so, train again
            print(f"{name}: the cached model {path.relative_to(ROOT)} cannot be used ({err}); training again")
    if average is not None:
        then = train_kwargs.pop("after_step", None)

        def after_step(step, m):
            if then is not None:
                then(step, m)
            if step >= average_from:
                average.update(m)
        train_kwargs["after_step"] = after_step
    history = train(model, corpus, cfg, **train_kwargs)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}  # cpu-ok: to a file
    meta = {"history": history.as_dict(), "key": key}
    if average is not None:
        state.update({AVERAGED + k: v.detach().cpu().contiguous() for k, v in average.mean.items()})  # cpu-ok: file
        meta["averaged_steps"] = average.count
    write_tensors(path, state, meta=meta)
    history.cached_from = None
    history.averaged = average
    return history
