"""Data that is already on the machine: nothing is downloaded.

Text   the Python standard library's own source files, read from the running
       interpreter's installation and split deterministically by file: a file
       goes to validation when crc32 of its relative path is divisible by 10.
Images matplotlib's bundled samples (Grace Hopper's portrait, an MRI slice,
       two elevation grids).
Signals matplotlib's bundled EEG recording and membrane-potential trace.

Everything is byte-level text or a float32 array; the choice of file depends
only on its path, so two machines with the same Python version see the same data.
"""

from __future__ import annotations

import gzip
import sysconfig
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


@dataclass
class TextCorpus:
    """Train and validation bytes of standard-library source, as uint8 tensors."""
    train: torch.Tensor                    # [L_train] uint8
    val: torch.Tensor                      # [L_val] uint8
    train_files: list[str] = field(default_factory=list)
    val_files: list[str] = field(default_factory=list)
    source: str = ""                       # where the files came from

    def describe(self) -> str:
        return (f"{len(self.train_files)} train files ({len(self.train):,} bytes), "
                f"{len(self.val_files)} validation files ({len(self.val):,} bytes) from {self.source}")


def stdlib_source_files(root: str | Path | None = None) -> list[Path]:
    """Every .py file of the standard library (tests and site-packages left out), sorted by path."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"standard library directory {root} not found")
    return sorted(p for p in root.rglob("*.py")
                  if not _SKIP_DIRS.intersection(p.relative_to(root).parts[:-1]))


def _is_validation(relative_path: str) -> bool:
    return zlib.crc32(relative_path.encode()) % 10 == 0


def stdlib_corpus(max_train_bytes: int = 4_000_000, max_val_bytes: int = 400_000,
                  root: str | Path | None = None) -> TextCorpus:
    """Standard-library source split by file into train/validation, each capped in size.

    Files are taken in the order of crc32(path) (a fixed shuffle), joined with a
    form feed, and cut at the cap, so the same caps always give the same bytes.
    """
    if max_train_bytes < 1 or max_val_bytes < 1:
        raise ValueError("stdlib_corpus: byte caps must be positive")
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = stdlib_source_files(root)
    files.sort(key=lambda p: (zlib.crc32(p.relative_to(root).as_posix().encode()), str(p)))
    parts = {"train": [], "val": []}
    names = {"train": [], "val": []}
    sizes = {"train": 0, "val": 0}
    caps = {"train": max_train_bytes, "val": max_val_bytes}
    for path in files:
        rel = path.relative_to(root).as_posix()
        split = "val" if _is_validation(rel) else "train"
        if sizes[split] >= caps[split]:
            continue
        blob = path.read_bytes() + b"\x0c\n"
        parts[split].append(blob)
        names[split].append(rel)
        sizes[split] += len(blob)
    as_tensor = {s: torch.frombuffer(bytearray(b"".join(parts[s])[:caps[s]]), dtype=torch.uint8) for s in parts}
    if len(as_tensor["train"]) == 0 or len(as_tensor["val"]) == 0:
        raise RuntimeError(f"no standard-library source found under {root}")
    return TextCorpus(as_tensor["train"], as_tensor["val"], names["train"], names["val"], str(root))


def package_corpus(package: str, max_bytes: int = 1_000_000, val_fraction: float = 0.1,
                   root: str | Path | None = None) -> TextCorpus:
    """One standard-library package's source (e.g. "asyncio", "email"): a domain for a specialist.

    Files are ordered by crc32(path), as in `stdlib_corpus`, and joined until `max_bytes`; the last
    `val_fraction` of the files (at least one) is validation. The split is by file inside the package,
    since the corpus-wide crc32 split leaves some packages with no validation file at all.
    """
    if not 0 < val_fraction < 1 or max_bytes < 1:
        raise ValueError(f"package_corpus: need max_bytes >= 1 and 0 < val_fraction < 1, got {max_bytes}, {val_fraction}")
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = [p for p in stdlib_source_files(root) if p.relative_to(root).parts[0] == package]
    if len(files) < 2:
        raise ValueError(f"package_corpus: standard-library package {package!r} has {len(files)} source files "
                         f"under {root}; need at least 2 (one for training, one for validation)")
    files.sort(key=lambda p: (zlib.crc32(p.relative_to(root).as_posix().encode()), str(p)))
    chosen, size = [], 0
    for path in files:
        if size >= max_bytes:
            break
        chosen.append(path)
        size += path.stat().st_size
    n_val = min(len(chosen) - 1, max(1, round(val_fraction * len(chosen))))
    if n_val < 1:                                   # max_bytes covered a single file: take the next as validation
        chosen, n_val = files[:2], 1
    train_files, val_files = chosen[:-n_val], chosen[-n_val:]

    def joined(paths):
        return torch.frombuffer(bytearray(b"".join(p.read_bytes() + b"\x0c\n" for p in paths)), dtype=torch.uint8)

    return TextCorpus(joined(train_files), joined(val_files),
                      [p.relative_to(root).as_posix() for p in train_files],
                      [p.relative_to(root).as_posix() for p in val_files], f"{root}/{package}")


def random_batch(data: torch.Tensor, batch_size: int, seq_len: int,
                 generator: torch.Generator | None = None):
    """Random windows of a byte stream: x [B, T] and the next-byte targets y [B, T] (int64)."""
    if data.dim() != 1 or len(data) <= seq_len:
        raise ValueError(f"random_batch: need a 1-D stream longer than seq_len={seq_len}, got shape {list(data.shape)}")
    starts = torch.randint(0, len(data) - seq_len, (batch_size,), generator=generator)  # last start: len - T - 1
    window = torch.stack([data[s:s + seq_len + 1] for s in starts.tolist()]).long()  # [B, T+1]
    return window[:, :-1], window[:, 1:]


def sequential_batches(data: torch.Tensor, batch_size: int, seq_len: int, max_batches: int | None = None):
    """Non-overlapping windows in order (for evaluation): yields x, y of shape [b, T], b <= B."""
    n_windows = (len(data) - 1) // seq_len
    if n_windows < 1:
        raise ValueError(f"sequential_batches: stream of {len(data)} bytes is shorter than seq_len={seq_len}")
    starts = list(range(0, n_windows * seq_len, seq_len))
    for i, b in enumerate(range(0, len(starts), batch_size)):
        if max_batches is not None and i >= max_batches:
            return
        window = torch.stack([data[s:s + seq_len + 1] for s in starts[b:b + batch_size]]).long()
        yield window[:, :-1], window[:, 1:]


# ----------------------------------------------------------------------------
# matplotlib's bundled images and signals
# ----------------------------------------------------------------------------

def _sample_path(name: str) -> Path:
    import matplotlib
    path = Path(matplotlib.get_data_path()) / "sample_data" / name
    if not path.exists():
        raise FileNotFoundError(f"matplotlib sample file {name} not found at {path}")
    return path


IMAGES = ("grace_hopper", "mri", "jacksboro_dem", "topobathy")
SIGNALS = ("eeg", "membrane")


def sample_image(name: str) -> np.ndarray:
    """One of matplotlib's sample images as float32 in [0, 1]: [H, W] (grey) or [H, W, 3] (colour)."""
    if name == "grace_hopper":
        import matplotlib.image as mpimg
        img = mpimg.imread(_sample_path("grace_hopper.jpg")).astype(np.float32)  # [512, 512, 3]
    elif name == "mri":
        with gzip.open(_sample_path("s1045.ima.gz")) as f:
            img = np.frombuffer(f.read(), np.uint16).reshape(256, 256).astype(np.float32)
    elif name == "jacksboro_dem":
        img = np.load(_sample_path("jacksboro_fault_dem.npz"))["elevation"].astype(np.float32)
    elif name == "topobathy":
        img = np.load(_sample_path("topobathy.npz"))["topo"].astype(np.float32)
    else:
        raise ValueError(f"sample_image: unknown name {name!r}; choose one of {IMAGES}")
    lo, hi = float(img.min()), float(img.max())
    return (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)


def sample_signal(name: str) -> np.ndarray:
    """One of matplotlib's sample signals as float32: eeg [800, 4] channels, membrane [L]."""
    if name == "eeg":
        return np.fromfile(_sample_path("eeg.dat"), dtype=np.float64).reshape(800, 4).astype(np.float32)
    if name == "membrane":
        return np.fromfile(_sample_path("membrane.dat"), dtype=np.float32)
    raise ValueError(f"sample_signal: unknown name {name!r}; choose one of {SIGNALS}")
