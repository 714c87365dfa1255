"""Training the geometric model (chapter 04): its data, the three-phase curriculum, and the forgetting test.

The write-up trains on minimal pairs (singular/plural, tense, formality), then "complex sentences
requiring multiple dimensions", then conversations, with a contrastive, an "interference" and a
temporal-consistency loss. It gives the losses' names and goals, not their formulas, and no data.
The book builds all three from the standard library's own source, deterministically:

    operations      length-preserving byte transformations of a window of source text: `copy`, `upper`,
                    `swapcase`, `rot13`, `leet`, `reverse_words`. A window and its transformation are a
                    minimal pair: same content, one "dimension" changed. Which operation made a sequence
                    is the label the coordinates should route by (the write-up's "184 operations").
    compositions    two operations applied in turn (`upper+reverse_words`): phase 2's "multiple dimensions".
    dialogue        consecutive turns from the library's functions: the docstring (a question in prose)
                    followed by the code (the answer), found with `ast`: phase 3's "conversation".

The losses, each on top of the next-byte loss of the same batch (our concrete reading, stated once):

    contrastive     sequences' coordinates (theta at the last position, which has seen the whole window)
                    pulled together when the same operation made them and pushed at least `margin` apart
                    (per-dimension RMS distance) when different ones did (Hadsell et al. 2006):
                        same: d^2        different: max(0, margin - d)^2
    interference    the coordinate of a composed sequence should be the blend of its parts':
                        || theta(a then b) - (theta(a) + theta(b)) / 2 ||^2 / D
    temporal        coordinates drift smoothly along a conversation: mean_t ||theta_t - theta_{t-1}||^2 / D

The optimiser has two learning rates (the write-up's 3e-4 for base weights, 1e-3 for coordinates;
the book scales both for its short runs and keeps the ratio): "coordinate" parameters are the
predictor and every modulation factor U, V, P, Q; everything else is "base".

`forgetting_experiment` is the write-up's strongest claim put to a test: learn task A at a coordinate
theta_A, then task B at theta_B, and measure A again, against plain fine-tuning of a model of the
same size without coordinates.

Does not include: the 500M/2B/5B-token scale of the write-up's phases; a real tokenizer (bytes here).
"""

from __future__ import annotations

import ast
import math
import sysconfig
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from refimpl.config import check_fields, flag, instance, number, whole
from refimpl.data import stdlib_source_files
from refimpl.geometric import GeometricLM, ModulatedLinear

# ----------------------------------------------------------------------------
# Operations: length-preserving byte transformations (minimal pairs)
# ----------------------------------------------------------------------------


def _table(mapping: Callable[[int], int]) -> bytes:
    return bytes(mapping(b) for b in range(256))


def _rot13(b: int) -> int:
    if 65 <= b <= 90:
        return 65 + (b - 65 + 13) % 26
    if 97 <= b <= 122:
        return 97 + (b - 97 + 13) % 26
    return b


_LEET = {ord(a): ord(b) for a, b in zip("aeiostAEIOST", "431057431057")}

#: byte -> byte tables for the operations that act on each byte alone
_TABLES = {
    "copy": _table(lambda b: b),
    "upper": _table(lambda b: b - 32 if 97 <= b <= 122 else b),
    "swapcase": _table(lambda b: b - 32 if 97 <= b <= 122 else b + 32 if 65 <= b <= 90 else b),
    "rot13": _table(_rot13),
    "leet": _table(lambda b: _LEET.get(b, b)),
}


def _reverse_words(window: bytes) -> bytes:
    """Reverse the letters of every run of letters and digits; everything else stays where it is."""
    out, word = bytearray(), bytearray()
    for b in window:
        if 48 <= b <= 57 or 65 <= b <= 90 or 97 <= b <= 122 or b == 95:
            word.append(b)
        else:
            out += word[::-1]
            word.clear()
            out.append(b)
    return bytes(out + word[::-1])


OPERATIONS = tuple(_TABLES) + ("reverse_words",)


def apply_operation(name: str, window: bytes) -> bytes:
    """Transform `window` by operation `name`, or by several joined with "+" (applied left to right).
    Every operation keeps the length, so a window and its transformation align byte for byte."""
    for part in name.split("+"):
        if part == "reverse_words":
            window = _reverse_words(window)
        elif part in _TABLES:
            window = window.translate(_TABLES[part])
        else:
            raise ValueError(f"unknown operation {part!r}; choose from {OPERATIONS}, joined with '+'")
    return window


def _windows(data: torch.Tensor, n: int, length: int, generator: torch.Generator) -> list[bytes]:
    if data.dim() != 1 or data.dtype != torch.uint8 or len(data) <= length:
        raise ValueError(f"need a 1-D uint8 byte stream longer than {length}, got {data.dtype} {list(data.shape)}")
    starts = torch.randint(0, len(data) - length, (n,), generator=generator).tolist()
    return [bytes(data[s:s + length].tolist()) for s in starts]


def _as_batch(windows: Sequence[bytes]) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.tensor([list(w) for w in windows], dtype=torch.long)                # [B, T + 1]
    return t[:, :-1], t[:, 1:]


def operation_batch(data: torch.Tensor, operations: Sequence[str], batch_size: int, seq_len: int,
                    generator: torch.Generator, op_ids: Sequence[int] | None = None):
    """Random windows of `data`, each transformed by one of `operations` (random, or `op_ids` [B]).
    -> x [B, T], y [B, T] (next bytes), op_ids [B] (indices into `operations`)."""
    if op_ids is None:
        op_ids = torch.randint(0, len(operations), (batch_size,), generator=generator).tolist()
    windows = _windows(data, batch_size, seq_len + 1, generator)
    x, y = _as_batch([apply_operation(operations[o], w) for o, w in zip(op_ids, windows)])
    return x, y, torch.tensor(list(op_ids))


def minimal_pairs(data: torch.Tensor, operations: Sequence[str], batch_size: int, seq_len: int,
                  generator: torch.Generator):
    """Phase 1's data: `batch_size` windows, each under two different operations.
    -> x [2B, T], y [2B, T], op_ids [2B]: rows i and B + i are the same text."""
    if len(operations) < 2:
        raise ValueError("minimal pairs need at least two operations")
    first = torch.randint(0, len(operations), (batch_size,), generator=generator)
    second = (first + torch.randint(1, len(operations), (batch_size,), generator=generator)) % len(operations)
    windows = _windows(data, batch_size, seq_len + 1, generator)
    ids = first.tolist() + second.tolist()
    x, y = _as_batch([apply_operation(operations[o], w) for o, w in zip(ids, windows + windows)])
    return x, y, torch.tensor(ids)


def composed_triples(data: torch.Tensor, compositions: Sequence[tuple[str, str]], batch_size: int, seq_len: int,
                     generator: torch.Generator):
    """Phase 2's data: windows under a, under b, and under a then b, for random pairs (a, b) of `compositions`.
    -> x [3B, T], y [3B, T]: rows [0, B) are a, [B, 2B) are b, [2B, 3B) the composition, same text per column."""
    pick = torch.randint(0, len(compositions), (batch_size,), generator=generator).tolist()
    windows = _windows(data, batch_size, seq_len + 1, generator)
    rows = ([apply_operation(compositions[p][0], w) for p, w in zip(pick, windows)]
            + [apply_operation(compositions[p][1], w) for p, w in zip(pick, windows)]
            + [apply_operation("+".join(compositions[p]), w) for p, w in zip(pick, windows)])
    return _as_batch(rows)


def dialogue_stream(max_bytes: int = 400_000, root: str | Path | None = None, validation: bool = False) -> torch.Tensor:
    """Phase 3's data: the standard library's documented functions as two-turn exchanges,

        >>> <the docstring, a question in prose>
        <the function's source, the answer>

    separated by form feeds, files in crc32 order (every 10th file by crc32 is validation, as in
    `refimpl.data.stdlib_corpus`). -> a uint8 stream of at most `max_bytes` bytes."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib_source_files(root), key=lambda p: zlib.crc32(p.relative_to(root).as_posix().encode()))
    parts, size = [], 0
    for path in files:
        if (zlib.crc32(path.relative_to(root).as_posix().encode()) % 10 == 0) != validation:
            continue
        source = path.read_text(encoding="utf-8", errors="replace")
        try:
            tree = ast.parse(source)
        except SyntaxError:                                    # a few files are templates, not Python
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and ast.get_docstring(node):
                code = ast.get_source_segment(source, node)
                if not code:
                    continue
                turn = f">>> {ast.get_docstring(node)}\n{code}\n\x0c\n".encode("utf-8")
                parts.append(turn)
                size += len(turn)
                if size >= max_bytes:
                    return torch.frombuffer(bytearray(b"".join(parts)[:max_bytes]), dtype=torch.uint8)
    if not parts:
        raise RuntimeError(f"no documented functions found under {root}")
    return torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8)


# ----------------------------------------------------------------------------
# The three losses
# ----------------------------------------------------------------------------

def sequence_coordinates(theta: torch.Tensor) -> torch.Tensor:
    """A sequence's coordinate: theta at its last position (causal: it has seen the whole window). [B, T, D] -> [B, D]."""
    return theta[:, -1]


def contrastive_loss(coords: torch.Tensor, labels: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Pairwise margin loss over a batch of sequence coordinates [B, D] with labels [B]:
    d^2 for pairs with the same label, max(0, margin - d)^2 for different ones, d the RMS distance."""
    if coords.dim() != 2 or labels.shape != coords.shape[:1]:
        raise ValueError(f"contrastive_loss: coords [B, D] and labels [B], got {list(coords.shape)}, "
                         f"{list(labels.shape)}")
    d2 = (coords[:, None] - coords[None]).square().mean(dim=-1)               # [B, B] squared RMS distances
    d = d2.clamp_min(1e-12).sqrt()                                            # (the clamp keeps sqrt's gradient finite)
    same = labels[:, None] == labels[None]
    off_diagonal = ~torch.eye(len(labels), dtype=torch.bool, device=coords.device)
    per_pair = torch.where(same, d2, (margin - d).clamp_min(0).square())
    return per_pair[off_diagonal].mean()


def interference_loss(coord_a: torch.Tensor, coord_b: torch.Tensor, coord_ab: torch.Tensor) -> torch.Tensor:
    """|| theta(a then b) - (theta(a) + theta(b)) / 2 ||^2 / D, averaged over the batch ([B, D] each)."""
    return (coord_ab - 0.5 * (coord_a + coord_b)).square().mean()


def temporal_loss(theta: torch.Tensor) -> torch.Tensor:
    """mean_t ||theta_t - theta_{t-1}||^2 / D over a batch of coordinate paths [B, T, D]."""
    return (theta[:, 1:] - theta[:, :-1]).square().mean()


# ----------------------------------------------------------------------------
# The curriculum
# ----------------------------------------------------------------------------

def coordinate_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The predictor's parameters and every modulation factor U, V, P, Q: what the write-up calls coordinates."""
    params = list(model.predictor.parameters()) if hasattr(model, "predictor") else []
    for module in model.modules():
        if isinstance(module, ModulatedLinear):
            params += [module.U, module.V, module.P, module.Q]
    return params


def make_two_rate_optimizer(model: torch.nn.Module, lr_base: float, lr_coord: float,
                            weight_decay: float = 0.1) -> torch.optim.AdamW:
    """AdamW (betas 0.9, 0.95, the write-up's) with base and coordinate parameters at their own learning
    rates; weight decay on matrices only. Each group remembers its peak rate in "peak_lr"."""
    coord_ids = {id(p) for p in coordinate_parameters(model)}
    groups = []
    for is_coord, lr in ((False, lr_base), (True, lr_coord)):
        mine = [p for p in model.parameters() if p.requires_grad and (id(p) in coord_ids) == is_coord]
        for decay in (True, False):
            chosen = [p for p in mine if (p.dim() >= 2) == decay]
            if chosen:
                groups.append({"params": chosen, "lr": lr, "peak_lr": lr,
                               "weight_decay": weight_decay if decay else 0.0})
    return torch.optim.AdamW(groups, betas=(0.9, 0.95))


LOSS_NAMES = ("contrastive", "interference", "temporal")   # the curriculum's auxiliary losses, weighted by name


@dataclass
class CurriculumConfig:
    steps: int = 300                         # optimiser steps over all three phases
    phase_ends: tuple = (0.2, 0.6)           # phase 1 until 20% of the steps, phase 2 until 60% (the write-up's)
    batch_size: int = 16                     # sequences per step (phase 1: pairs, so 2 x this many rows ...)
    seq_len: int = 64                        # T: bytes per sequence
    lr_base: float = 3e-3                    # the write-up's 3e-4 and 1e-3, scaled x10 for short runs
    lr_coord: float = 1e-2
    warmup: int = 20
    grad_clip: float = 1.0                   # the write-up's max_norm
    operations: tuple = OPERATIONS           # the labels phase 1 separates
    compositions: tuple = (("upper", "reverse_words"), ("rot13", "reverse_words"), ("swapcase", "leet"))
    margin: float = 1.0                      # contrastive: different operations at least this far apart (RMS)
    weights: dict = field(default_factory=lambda: {"contrastive": 1.0, "interference": 1.0, "temporal": 1.0})
    auxiliary: bool = True                   # False: the same data with the next-byte loss only (the ablation)
    eval_every: int = 50
    seed: int = 0

    RULES = {"steps": whole(1), "phase_ends": instance(tuple, list), "batch_size": whole(1), "seq_len": whole(1),
             "lr_base": number(0, low_open=True), "lr_coord": number(0, low_open=True), "warmup": whole(0),
             "grad_clip": number(0, low_open=True), "operations": instance(tuple, list),
             "compositions": instance(tuple, list), "margin": number(0), "weights": instance(dict),
             "auxiliary": flag(), "eval_every": whole(1), "seed": whole(0)}

    def __post_init__(self):
        check_fields(self, self.RULES)
        if len(self.phase_ends) != 2 or not all(number().allows(x) for x in self.phase_ends):
            raise ValueError(f"CurriculumConfig.phase_ends must be two numbers a <= b in [0, 1], got {self.phase_ends}")
        if set(self.weights) != set(LOSS_NAMES) or not all(number(0).allows(v) for v in self.weights.values()):
            raise ValueError(f"CurriculumConfig.weights must map each of {', '.join(LOSS_NAMES)} to a number >= 0, "
                             f"got {self.weights}")
        a, b = self.phase_ends
        if not 0 <= a <= b <= 1:
            raise ValueError(f"CurriculumConfig.phase_ends must satisfy 0 <= a <= b <= 1, got {self.phase_ends}")
        for name in self.operations:
            apply_operation(name, b"")                                          # raises on an unknown one
        self.operations, self.compositions = tuple(self.operations), tuple(tuple(c) for c in self.compositions)

    def phase(self, step: int) -> int:
        """1, 2 or 3: the phase `step` falls in."""
        fraction = step / self.steps
        return 1 if fraction < self.phase_ends[0] else 2 if fraction < self.phase_ends[1] else 3


@dataclass
class CurriculumHistory:
    step: list[int] = field(default_factory=list)
    phase: list[int] = field(default_factory=list)
    lm_bpb: list[float] = field(default_factory=list)            # next-byte loss of the step's batch, bits per byte
    auxiliary: list[float] = field(default_factory=list)         # the phase's own loss (0 without one)
    eval_step: list[int] = field(default_factory=list)
    val_bpb: list[float] = field(default_factory=list)           # mean over operations, on validation text
    seconds: float = 0.0
    config: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def _lm_loss(model, x, y):
    logits, _ = model(x)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())


def curriculum_step_loss(model: torch.nn.Module, cfg: CurriculumConfig, phase: int, train: torch.Tensor,
                         dialogue: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of phase `phase`: (next-byte loss, auxiliary loss). The auxiliary loss is zero for a model
    without coordinates (the baseline sees the same bytes) or with cfg.auxiliary off."""
    use_aux = cfg.auxiliary and isinstance(model, GeometricLM)
    zero = torch.zeros((), device=next(model.parameters()).device)
    if phase == 1:
        x, y, labels = minimal_pairs(train, cfg.operations, cfg.batch_size // 2 or 1, cfg.seq_len, generator)
        lm = _lm_loss(model, x, y)
        aux = contrastive_loss(sequence_coordinates(model.last_theta), labels, cfg.margin) if use_aux else zero
        return lm, aux * cfg.weights["contrastive"]
    if phase == 2:
        n = max(1, cfg.batch_size // 3)
        x, y = composed_triples(train, cfg.compositions, n, cfg.seq_len, generator)
        xo, yo, labels = operation_batch(train, cfg.operations, cfg.batch_size - n, cfg.seq_len, generator)
        lm = _lm_loss(model, torch.cat([x, xo]), torch.cat([y, yo]))
        if not use_aux:
            return lm, zero
        coords = sequence_coordinates(model.last_theta)
        aux = (cfg.weights["interference"] * interference_loss(coords[:n], coords[n:2 * n], coords[2 * n:3 * n])
               + cfg.weights["contrastive"] * contrastive_loss(coords[3 * n:], labels, cfg.margin))
        return lm, aux
    half = max(1, cfg.batch_size // 2)
    xd, yd = _as_batch(_windows(dialogue, half, cfg.seq_len + 1, generator))
    xo, yo, labels = operation_batch(train, cfg.operations, cfg.batch_size - half, cfg.seq_len, generator)
    lm = _lm_loss(model, torch.cat([xd, xo]), torch.cat([yd, yo]))
    if not use_aux:
        return lm, zero
    theta = model.last_theta
    aux = (cfg.weights["temporal"] * temporal_loss(theta[:half])
           + cfg.weights["contrastive"] * contrastive_loss(sequence_coordinates(theta[half:]), labels, cfg.margin))
    return lm, aux


@torch.no_grad()
def operation_bits_per_byte(model: torch.nn.Module, data: torch.Tensor, operations: Sequence[str], seq_len: int,
                            batches: int = 4, batch_size: int = 16, seed: int = 1234,
                            theta: torch.Tensor | None = None) -> dict[str, float]:
    """Next-byte loss in bits per byte on `data` under each operation: the same windows (fixed seed) for every
    operation and every model. theta ([D]) runs a geometric model at one given coordinate."""
    was_training = model.training
    model.eval()
    out = {}
    for name in operations:
        generator = torch.Generator().manual_seed(seed)
        nats, count = 0.0, 0
        for _ in range(batches):
            x, y, _ = operation_batch(data, [name], batch_size, seq_len, generator)
            logits, _ = model(x, theta=theta) if theta is not None else model(x)
            nats += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
            count += y.numel()
        out[name] = nats / count / math.log(2)
    model.train(was_training)
    return out


def _scheduled_lr(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10%: the factor each group's peak rate is multiplied by."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train_curriculum(model: torch.nn.Module, train: torch.Tensor, val: torch.Tensor, dialogue: torch.Tensor,
                     cfg: CurriculumConfig, progress: bool = True, description: str = "curriculum",
                     lr_coord: float | None = None) -> CurriculumHistory:
    """The three phases on `train` (and `dialogue` in phase 3), evaluating mean bits per byte over the
    operations on `val`. A model without coordinates (the baseline) gets the same batches with the
    next-byte loss alone and one learning rate, cfg.lr_base."""
    generator = torch.Generator().manual_seed(cfg.seed)
    optimizer = make_two_rate_optimizer(model, cfg.lr_base, cfg.lr_coord if lr_coord is None else lr_coord)
    history = CurriculumHistory(config=asdict(cfg))
    model.train()
    start = time.perf_counter()
    for step in tqdm(range(cfg.steps), desc=description, disable=not progress, mininterval=1.0):
        factor = _scheduled_lr(step, cfg.steps, cfg.warmup)
        for group in optimizer.param_groups:
            group["lr"] = group["peak_lr"] * factor
        phase = cfg.phase(step)
        lm, aux = curriculum_step_loss(model, cfg, phase, train, dialogue, generator)
        loss = lm + aux
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at step {step} (phase {phase}); lower the rates")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        history.step.append(step)
        history.phase.append(phase)
        history.lm_bpb.append(lm.item() / math.log(2))
        history.auxiliary.append(aux.item())
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            per_op = operation_bits_per_byte(model, val, cfg.operations, cfg.seq_len, batches=2)
            history.eval_step.append(step + 1)
            history.val_bpb.append(sum(per_op.values()) / len(per_op))
    history.seconds = time.perf_counter() - start
    return history


# ----------------------------------------------------------------------------
# Routing: do coordinates separate the operations?
# ----------------------------------------------------------------------------

@torch.no_grad()
def operation_coordinates(model: GeometricLM, data: torch.Tensor, operations: Sequence[str], per_operation: int,
                          seq_len: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence coordinates of `per_operation` windows under each operation (fixed seed).
    -> coords [n_ops * per_operation, D], labels [same] (indices into `operations`)."""
    generator = torch.Generator().manual_seed(seed)
    ids = [i for i in range(len(operations)) for _ in range(per_operation)]
    x, _, labels = operation_batch(data, operations, len(ids), seq_len, generator, op_ids=ids)
    theta = model.predictor(model.embed(x))
    return sequence_coordinates(theta), labels


def routing_accuracy(train_coords: torch.Tensor, train_labels: torch.Tensor, test_coords: torch.Tensor,
                     test_labels: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Nearest-centroid routing: each test coordinate goes to the operation whose mean training coordinate
    is closest. -> (accuracy, confusion [n_ops, n_ops]: row = true operation, column = routed to)."""
    n = int(train_labels.max()) + 1
    centroids = torch.stack([train_coords[train_labels == k].mean(0) for k in range(n)])
    routed = torch.cdist(test_coords, centroids).argmin(dim=1)
    confusion = torch.zeros(n, n, dtype=torch.long)
    confusion.index_put_((test_labels, routed), torch.ones_like(routed), accumulate=True)
    return (routed == test_labels).float().mean().item(), confusion


def principal_directions(points: torch.Tensor, k: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PCA of points [n, D]: (mean [D], the top-k directions [k, D], the spread (std) along each [k])."""
    mean = points.mean(0)
    _, s, vh = torch.linalg.svd(points - mean, full_matrices=False)
    return mean, vh[:k], s[:k] / math.sqrt(max(1, len(points) - 1))


# ----------------------------------------------------------------------------
# Catastrophic forgetting: task A at theta_A, then task B at theta_B
# ----------------------------------------------------------------------------

def task_coordinates(coord_dim: int, scale: float = 3.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two fixed random coordinates theta_A, theta_B ([D] each) with independent N(0, scale^2) entries. The
    directions c_i are unit vectors, so every wavelet phase theta . c_i is N(0, scale^2) too: at 3 radians
    the two tasks' cos/sin coefficients are essentially unrelated."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(coord_dim, generator=g) * scale, torch.randn(coord_dim, generator=g) * scale


def _train_task(model, data, operation, steps, seq_len, batch_size, lr, theta, generator, params=None):
    params = list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * _scheduled_lr(step, steps, min(20, steps // 5 + 1))
        x, y, _ = operation_batch(data, [operation], batch_size, seq_len, generator)
        logits, _ = model(x, theta=theta) if theta is not None else model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()


@dataclass
class ForgettingResult:
    arm: str                       # which model and which parameters learned task B
    a_after_a: float               # task A's bits per byte (at theta_A) after learning A
    a_after_b: float               # ... after then learning B
    b_after_b: float               # task B's bits per byte (at theta_B) after learning B

    @property
    def forgetting(self) -> float:
        """How much worse A got by learning B, in bits per byte (0 = no forgetting)."""
        return self.a_after_b - self.a_after_a


def forgetting_experiment(make_model: Callable[[], torch.nn.Module], train: torch.Tensor, val: torch.Tensor,
                          task_a: str, task_b: str, steps: int, seq_len: int, batch_size: int, lr: float,
                          arm: str, seed: int = 0, eval_batches: int = 4) -> ForgettingResult:
    """Learn operation `task_a`, then `task_b`; measure A before and after B. `arm` picks the setting:

        plain            a model without coordinates, all parameters train on A then on B (fine-tuning)
        coordinates      a geometric model at theta_A for A and theta_B for B, all parameters train both times
                         (the write-up's claim: "operations at different coordinates never interfere")
        frozen_base      as `coordinates`, but B trains only the coordinate parameters (U, V, P, Q, predictor)

    make_model is called right after seeding, so arms that build the same model start from the same weights;
    every arm sees the same batches."""
    if arm not in ("plain", "coordinates", "frozen_base"):
        raise ValueError(f"arm must be 'plain', 'coordinates' or 'frozen_base', got {arm!r}")
    torch.manual_seed(seed)
    model = make_model()
    theta_a = theta_b = None
    if arm != "plain":
        if not isinstance(model, GeometricLM):
            raise ValueError(f"arm {arm!r} needs a GeometricLM, got {type(model).__name__}")
        theta_a, theta_b = task_coordinates(model.cfg.coord_dim, seed=seed)

    def measure(task, theta):
        return operation_bits_per_byte(model, val, [task], seq_len, eval_batches, batch_size, theta=theta)[task]

    generator = torch.Generator().manual_seed(seed)
    _train_task(model, train, task_a, steps, seq_len, batch_size, lr, theta_a, generator)
    a_after_a = measure(task_a, theta_a)
    params = coordinate_parameters(model) if arm == "frozen_base" else None
    _train_task(model, train, task_b, steps, seq_len, batch_size, lr, theta_b, generator, params)
    return ForgettingResult(arm, a_after_a, measure(task_a, theta_a), measure(task_b, theta_b))
