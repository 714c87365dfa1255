"""A tiered block store (chapter 01, Sintellix, write-up section 4.2 and table 6.3): a fast tier, a RAM
tier and a disk tier, true LRU eviction, dirty tracking, checked zstd-compressed files, and prefetching
on a background thread.

The write-up describes a GPU tier ("hot data", LRU eviction), a RAM tier ("pinned memory", "background
prefetching") and a disk tier ("Zstd compression (3:1 ratio)", "asynchronous I/O"), and reports a "95%
cache hit rate" at "4% overhead". Its public code evicts by access count (LFU, not LRU), does not pin
its RAM, writes raw files without zstd, and has no prefetching. This module builds the described store,
small enough to read in one sitting:

    TieredStore    named blocks in three tiers; a block is a dict of named tensors (a layer's weights
                   and its Adam moments, say), all on one device
        fast tier  the CUDA device when there is one. On a CPU-only machine (where the book runs) a
                   size-capped dict of CPU tensors STANDS IN for it: the bookkeeping, the eviction order
                   and the statistics are the same, but nothing is faster there
        RAM tier   CPU tensors, page-locked ("pinned") when the fast tier is a GPU, so that copies to
                   and from the GPU go by DMA without a staging copy
        disk tier  one file per block, `<key>.blk`, written by refimpl.io.write_tensors: atomically
                   (temp file, fsync, rename), SHA-256 checked when read, zstd-compressed by default;
                   as large as the disk
    block_nbytes   the bytes a block's tensors hold (what the capacities count)

How blocks move. Every block is in exactly one memory tier (fast or RAM) or on disk only; a block in
memory may also have a (clean or stale) copy on disk. Every move is a copy, as between real memories.

    put(key, block)    a copy of the block -> fast tier, most recently used; marked dirty
    get(key)           fast hit: refresh its recency. RAM hit or disk read: promote it to the fast tier
    fast tier full     its least recently used block is demoted to the RAM tier (most recently used there)
    RAM tier full      its least recently used block is written to disk if it is dirty or not yet on
                       disk; a clean block already on disk is just dropped
    prefetch(keys)     disk -> fast tier if it has free room (nothing is evicted for it), else -> RAM tier;
                       read on the background thread, ahead of use
    flush()            every dirty block -> disk; afterwards the directory alone rebuilds the store

"LRU" here is the textbook policy: each tier is an OrderedDict from least to most recently used, and
both get() and put() count as a use. A write-up's "LRU" is easy to claim and easy to get wrong (the
public code's eviction by access count is LFU); tests/test_store.py checks the order against a
reference simulation.

The dirty rule (when must the disk copy be rewritten?). put() always marks the block dirty. get()
returns the fast tier's own tensors, not a copy, so in-place changes land in the store; a caller that
will change them says so with get(key, for_write=True), which marks the block dirty. A block fetched
with for_write=False is clean: if it is changed anyway, the change is lost when the block is evicted
(a clean block on disk is dropped, not written). Changing a copy and put()ting it back also works.
A returned block stays valid until the next call that may evict it; after that, get() it again.

Locking. One lock, `self._lock` (threading.Lock, not re-entrant), guards every piece of shared state:
the tiers, the byte counts, the dirty set, the disk index, the in-flight prefetches and the statistics.
Public methods take it; the helpers whose names start with `_` expect it to be held and never take it.
The background thread takes it twice per prefetch: to look at the state before reading the file, and
to install what it read; reading and decompressing the file, the slow part, happens without it.
Nobody waits for anything while holding the lock: get() releases it before waiting for an in-flight
prefetch, and close() releases it before joining the thread. The only locks taken while holding it
are the thread pool's and its futures' own (submit(), cancel()), and those are never held while
waiting for ours. With every wait outside the lock and one order between locks, there is no cycle of
waiters, so the store cannot deadlock. Disk writes (evictions, flush) happen under the lock on the
caller's thread: they are slow, not dangerous.

Changes to a key are tracked by an "epoch": a number that changes whenever the key is put, deleted or
its file rewritten. A prefetch remembers the epoch it was issued at and throws its read away if the
epoch has moved on, so a slow read can never install an out-of-date block.

stats() reports hits and misses per tier, the fast-tier hit rate, the bytes moved between each pair of
tiers, the bytes written to and read from disk (as stored and raw: the measured compression ratio),
and prefetches issued, used and wasted. A hit rate is a property of a workload, not of a store: the
write-up's 95% can be measured here for a given access pattern, not assumed. Likewise the "3:1":
zstd takes random-looking float32 weights and Adam moments to about 1.08:1 (their mantissa bits are
noise); only zeros, repeats and small integers compress far.

Does not include: CUDA unified memory (the write-up's "automatic management"); writes in the
background (evictions and flush() write on the calling thread; only reads are asynchronous, through
prefetch); several processes sharing one directory: one store per directory at a time, enforced by an OS
lock (flock) on LOCK_NAME, so a second store, in this process or another, is refused with a clear error, and
the temp files a store removes when it opens can only be a dead writer's.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import threading
from collections import OrderedDict
from pathlib import Path

import torch

from refimpl.io import _DTYPES, compression_name, hold_writer_lock, read_tensors, tensor_file_bytes, write_tensors

BLOCK_SUFFIX = ".blk"                 # the disk tier's files: <key>.blk
LOCK_NAME = ".tieredstore.lock"        # the writer lock's file (its name starts with ".": never a key)
BLOCK_FORMAT = "tieredstore-block-1"  # written into each file's meta, with the block's key
# a key names its file, so: letters, digits, "_", "." and "-", not starting with "." (the temp files do)
KEY_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
MOVES = ("fast->ram", "ram->fast", "ram->disk", "disk->ram", "fast->disk", "disk->fast")


def block_nbytes(block: dict[str, torch.Tensor]) -> int:
    """Bytes held by a block's tensors: what the tier capacities count (not Python's overheads)."""
    return sum(t.numel() * t.element_size() for t in block.values())


def _lock_directory(directory: Path):
    """Take the directory's writer lock (an OS lock on LOCK_NAME, released when the returned file is closed,
    or when the process dies); a second store on the same directory, in this process or another, is refused."""
    return hold_writer_lock(directory / LOCK_NAME,
                            f"TieredStore: {directory} is already open in another TieredStore (process {{holder}}); "
                            "one store per directory at a time: close that one first")


def _fast_device(device) -> torch.device:
    """The fast tier's device: None picks CUDA when there is one, else the CPU stand-in."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")   # cpu-ok: the stand-in fast tier
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"TieredStore: device must be None, 'cpu' or 'cuda[:n]', got {device!r}") from None
    if device.type not in ("cpu", "cuda"):                                      # cpu-ok: the devices allowed
        raise ValueError(f"TieredStore: device must be None, 'cpu' or 'cuda[:n]', got {device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"TieredStore: device={str(device)!r} but this machine has no CUDA; "
                         "pass device=None (or 'cpu') to use the CPU stand-in for the fast tier")
    return device


class TieredStore:
    """Named blocks of tensors in a fast tier, a RAM tier and a disk directory (see the module docstring).

    directory  where the disk tier keeps its files; created if missing. If it already holds blocks,
               the store opens with them (on disk only), and removes temp files left by a crash.
    fast_bytes, ram_bytes   capacities of the fast and RAM tiers, in bytes of tensor data
    device     None: CUDA when available, else the CPU stand-in; or 'cpu' / 'cuda[:n]' explicitly
    compress   how blocks are written: "zstd" (default), "lzma"/True, or False (raw)
    level      the codec's level (None: zstd 3); see refimpl.io.write_tensors
    """

    def __init__(self, directory: str | os.PathLike, fast_bytes: int = 64 * 2**20, ram_bytes: int = 256 * 2**20,
                 device: str | torch.device | None = None, compress: bool | str = "zstd", level: int | None = None):
        for name, value in (("fast_bytes", fast_bytes), ("ram_bytes", ram_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"TieredStore: {name} must be a positive whole number of bytes, got {value!r}")
        try:
            self.compress = compression_name(compress)
            tensor_file_bytes({}, compress=self.compress, level=level)   # a bad level fails now, not at the first write
        except ValueError as err:
            raise ValueError(f"TieredStore: {err}") from None
        self.level = level
        self.fast_bytes, self.ram_bytes = fast_bytes, ram_bytes
        self.fast_device = _fast_device(device)
        self.ram_pinned = self.fast_device.type == "cuda"    # pinning only pays for copies to a GPU
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_file = _lock_directory(self.directory)    # one store per directory, or a clear error

        self._lock = threading.Lock()
        self._fast: OrderedDict[str, dict] = OrderedDict()   # least recently used first
        self._ram: OrderedDict[str, dict] = OrderedDict()    # least recently used first
        self._fast_used = 0                                  # bytes of tensor data in each tier
        self._ram_used = 0
        self._sizes: dict[str, int] = {}          # block_nbytes of every block whose size is known
        self._dirty: set[str] = set()             # in memory, and newer than its file (or it has none)
        self._on_disk: dict[str, int] = {}        # key -> bytes of its file
        self._pending: dict[str, concurrent.futures.Future] = {}    # prefetches issued, not yet finished
        self._prefetched: set[str] = set()        # brought in by a prefetch, not yet used by a get()
        self._epoch: dict[str, int] = {}          # see "epoch" in the module docstring
        self._clock = 0
        self._closed = False
        # Called with the key, on the caller's thread and without the lock, just before get() waits for a
        # prefetch that is reading that key right now. None by default; tests set it to order their threads
        # by events instead of by timing (see tests/test_store.py).
        self.before_prefetch_wait = None
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                               thread_name_prefix="tieredstore-prefetch")
        self._counts = dict.fromkeys(
            ("gets", "puts", "fast_hits", "ram_hits", "disk_reads", "prefetch_waits",
             "disk_writes", "disk_bytes_written", "disk_bytes_written_raw",
             "disk_file_reads", "disk_bytes_read", "disk_bytes_read_raw",
             "prefetches_issued", "prefetches_used", "prefetches_wasted"), 0)
        self._moved = dict.fromkeys(MOVES, 0)      # bytes of tensor data moved, per direction
        try:
            # the lock is ours, so every temp file here is a dead writer's, never a live one's
            self.removed_temp_files = self._scan_directory()
        except BaseException:
            self._lock_file.close()
            raise

    # ------------------------------------------------------------------
    # Opening, validation, small helpers (the lock is held, or not yet shared)
    # ------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}{BLOCK_SUFFIX}"

    def _scan_directory(self) -> list[str]:
        """Index the block files already in the directory; delete the temp files a crash left behind.
        refimpl.io.atomic_write_bytes names its temp files ".<name>.<pid>.<random>.tmp" and only renames one
        to <name> once it is complete and fsynced, so a temp file is never a block. Other files are
        left alone."""
        removed = []
        for path in sorted(self.directory.iterdir()):
            name = path.name
            if name.startswith(".") and name.endswith(".tmp") and f"{BLOCK_SUFFIX}." in name and path.is_file():
                path.unlink()
                removed.append(name)
            elif name.endswith(BLOCK_SUFFIX) and KEY_PATTERN.fullmatch(name[:-len(BLOCK_SUFFIX)]) and path.is_file():
                self._on_disk[name[:-len(BLOCK_SUFFIX)]] = path.stat().st_size
        return removed

    def _check_open(self):
        if self._closed:
            raise RuntimeError(f"TieredStore({str(self.directory)!r}) is closed")

    def _check_block(self, key, block) -> int:
        """Refuse, with the reason, what cannot be stored; return the block's size in bytes."""
        if not isinstance(key, str) or not KEY_PATTERN.fullmatch(key):
            raise ValueError(f"TieredStore: key {key!r} must be a string of 1-128 letters, digits, '_', '.' or '-', "
                             "not starting with '.' (it names the block's file)")
        if not isinstance(block, dict):
            raise ValueError(f"TieredStore: block {key!r} must be a dict of named tensors, "
                             f"got a {type(block).__name__}")
        if not block:
            raise ValueError(f"TieredStore: block {key!r} is empty; a block holds at least one tensor")
        for name, t in block.items():
            if not isinstance(name, str):
                raise ValueError(f"TieredStore: block {key!r}: tensor names must be strings, got {name!r}")
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"TieredStore: block {key!r}: {name!r} is a {type(t).__name__}, not a tensor")
            if t.layout != torch.strided:
                raise ValueError(f"TieredStore: block {key!r}: {name!r} is a {t.layout} tensor; "
                                 "only dense ones are stored")
            if str(t.dtype).replace("torch.", "") not in _DTYPES:
                raise ValueError(f"TieredStore: block {key!r}: {name!r} has dtype {t.dtype}, which the disk tier "
                                 f"cannot write; supported: {sorted(_DTYPES)}")
        size = block_nbytes(block)
        self._check_fits(key, size)
        return size

    def _check_fits(self, key: str, size: int, where: str = ""):
        for tier, capacity in (("fast", self.fast_bytes), ("ram", self.ram_bytes)):
            if size > capacity:
                raise ValueError(f"TieredStore: {where}block {key!r} is {size} bytes, more than the {tier} tier's "
                                 f"capacity of {capacity} bytes; split the block or raise {tier}_bytes")

    def _bump_epoch(self, key: str):
        self._clock += 1
        self._epoch[key] = self._clock

    def _forget_prefetch(self, key: str, used: bool):
        """A prefetched block leaves the 'not yet used' set: used by a get(), or wasted."""
        if key in self._prefetched:
            self._prefetched.discard(key)
            self._counts["prefetches_used" if used else "prefetches_wasted"] += 1

    # ------------------------------------------------------------------
    # Moving blocks (the lock is held). Each move copies first and drops after, so a failure
    # part-way (a full disk, a GPU out of memory) leaves the block where it was: nothing is lost.
    # ------------------------------------------------------------------

    def _to_fast(self, block: dict) -> dict:
        return {name: t.detach().to(self.fast_device, copy=True) for name, t in block.items()}

    def _to_ram(self, block: dict) -> dict:
        return {name: torch.empty(t.shape, dtype=t.dtype, device="cpu",   # cpu-ok: this is the RAM tier
                                  pin_memory=self.ram_pinned).copy_(t)
                for name, t in block.items()}

    def _write(self, key: str, block: dict, move: str):
        """Write `block` to its file (atomically), and record that the disk now holds this version."""
        path = write_tensors(self._path(key), block, {"format": BLOCK_FORMAT, "key": key},
                             compress=self.compress, level=self.level)
        file_bytes, raw = path.stat().st_size, self._sizes[key]
        self._on_disk[key] = file_bytes
        self._dirty.discard(key)
        self._bump_epoch(key)                # a prefetch that read the old file must not install it
        self._counts["disk_writes"] += 1
        self._counts["disk_bytes_written"] += file_bytes
        self._counts["disk_bytes_written_raw"] += raw
        self._moved[move] += raw

    def _read(self, key: str) -> tuple[dict, int]:
        """Read a block's file: (block, size). A damaged file raises ValueError naming it."""
        path = self._path(key)
        block, meta = read_tensors(path)
        self._note_read(key, path, block, meta)
        return block, block_nbytes(block)

    def _note_read(self, key: str, path: Path, block: dict, meta: dict):
        """Check what a file held and count the read (shared by get() and the prefetch thread)."""
        if meta.get("format") != BLOCK_FORMAT or meta.get("key") != key:
            raise ValueError(f"{path}: holds {meta.get('format')!r} block {meta.get('key')!r}, "
                             f"not {BLOCK_FORMAT!r} block {key!r}; was the file renamed or copied in?")
        self._counts["disk_file_reads"] += 1
        self._counts["disk_bytes_read"] += path.stat().st_size
        self._counts["disk_bytes_read_raw"] += block_nbytes(block)
        self._check_fits(key, block_nbytes(block), where=f"{path}: ")

    def _make_room_ram(self, size: int):
        """Evict least recently used RAM blocks until `size` more bytes fit."""
        while self._ram_used + size > self.ram_bytes:
            key = next(iter(self._ram))                       # the least recently used
            if key in self._dirty or key not in self._on_disk:
                self._write(key, self._ram[key], "ram->disk")  # write first: if it fails, the block stays
            del self._ram[key]
            self._ram_used -= self._sizes[key]
            self._forget_prefetch(key, used=False)

    def _make_room_fast(self, size: int):
        """Demote least recently used fast-tier blocks to the RAM tier until `size` more bytes fit."""
        while self._fast_used + size > self.fast_bytes:
            key = next(iter(self._fast))                      # the least recently used
            moved = self._sizes[key]
            self._make_room_ram(moved)                        # if this fails, `key` is still in the fast tier
            self._ram[key] = self._to_ram(self._fast[key])    # joins the RAM tier as its most recent
            self._ram_used += moved
            del self._fast[key]
            self._fast_used -= moved
            self._moved["fast->ram"] += moved

    def _take_out(self, key: str) -> tuple[str | None, dict | None]:
        """Remove `key` from its memory tier: (tier, block), or (None, None) if it is in neither."""
        for tier, blocks in (("fast", self._fast), ("ram", self._ram)):
            if key in blocks:
                block = blocks.pop(key)
                if tier == "fast":
                    self._fast_used -= self._sizes[key]
                else:
                    self._ram_used -= self._sizes[key]
                return tier, block
        return None, None

    def _put_back(self, tier: str | None, key: str, block: dict | None):
        """Undo _take_out after a failure. The fast tier always has room again (only evictions ran since);
        the RAM tier may sit over its capacity until its next eviction: better than losing the block."""
        if tier == "fast":
            self._fast[key] = block
            self._fast_used += self._sizes[key]
        elif tier == "ram":
            self._ram[key] = block
            self._ram_used += self._sizes[key]

    # ------------------------------------------------------------------
    # The public interface
    # ------------------------------------------------------------------

    def put(self, key: str, block: dict[str, torch.Tensor]):
        """Store a copy of `block` under `key` (new, or replacing the old version) in the fast tier,
        as its most recently used block, marked dirty; evicts down the tiers as needed."""
        size = self._check_block(key, block)
        new = self._to_fast(block)          # the store keeps its own copy: later changes to `block` do not leak in
        with self._lock:
            self._check_open()
            self._counts["puts"] += 1
            self._bump_epoch(key)           # an in-flight prefetch of the old version will be thrown away
            self._forget_prefetch(key, used=False)
            tier, old = self._take_out(key)  # the old version's room is free for the new one
            try:
                self._make_room_fast(size)
            except BaseException:
                self._put_back(tier, key, old)
                raise
            self._fast[key] = new
            self._fast_used += size
            self._sizes[key] = size
            self._dirty.add(key)

    def get(self, key: str, for_write: bool = False) -> dict[str, torch.Tensor]:
        """The block under `key`, on the fast tier (promoted there if it was not: a RAM hit or a disk read).
        The tensors are the store's own: pass for_write=True before changing them in place (the dirty rule).
        If a prefetch of `key` is reading it right now, waits for it instead of reading the file twice."""
        while True:
            with self._lock:
                self._check_open()
                future = self._pending.get(key)
                if future is None or key in self._fast or key in self._ram:
                    return self._get_locked(key, for_write)
                if future.cancel():             # not started yet: read it here, now, rather than queue behind others
                    del self._pending[key]
                    self._counts["prefetches_wasted"] += 1
                    return self._get_locked(key, for_write)
                self._counts["prefetch_waits"] += 1
            # Running: wait for it WITHOUT the lock (the prefetch thread needs the lock to finish), then look again.
            if self.before_prefetch_wait is not None:
                self.before_prefetch_wait(key)
            concurrent.futures.wait([future])

    def _get_locked(self, key: str, for_write: bool) -> dict[str, torch.Tensor]:
        if key in self._fast:                            # a fast-tier hit: only the recency changes
            self._fast.move_to_end(key)
            self._counts["fast_hits"] += 1
        elif key in self._ram:                           # a RAM hit: promote
            size = self._sizes[key]
            tier, block = self._take_out(key)
            try:
                self._make_room_fast(size)
                self._fast[key] = self._to_fast(block)
            except BaseException:
                self._put_back(tier, key, block)
                raise
            self._fast_used += size
            self._moved["ram->fast"] += size
            self._counts["ram_hits"] += 1
        elif key in self._on_disk:                       # a miss in both memory tiers: read the file
            block, size = self._read(key)
            self._make_room_fast(size)
            self._fast[key] = self._to_fast(block)
            self._fast_used += size
            self._sizes[key] = size
            self._moved["disk->fast"] += size
            self._counts["disk_reads"] += 1
        else:
            raise KeyError(f"TieredStore: no block {key!r}")
        self._counts["gets"] += 1
        self._forget_prefetch(key, used=True)
        if for_write:
            self._dirty.add(key)
        return dict(self._fast[key])          # a new dict (adding or removing names does not touch the store)

    def contains(self, key: str) -> bool:
        """Whether the store holds a block under `key` (in any tier)."""
        with self._lock:
            return key in self._fast or key in self._ram or key in self._on_disk

    __contains__ = contains

    def __len__(self) -> int:
        return len(self.keys())

    def keys(self, tier: str | None = None) -> list[str]:
        """All keys (sorted), or one tier's: 'fast' and 'ram' from least to most recently used,
        'disk' (sorted) the blocks that have a file, current or stale."""
        with self._lock:
            if tier is None:
                return sorted(set(self._fast) | set(self._ram) | set(self._on_disk))
            if tier in ("fast", "ram"):
                return list(self._fast if tier == "fast" else self._ram)
            if tier == "disk":
                return sorted(self._on_disk)
            raise ValueError(f"TieredStore.keys: tier must be None, 'fast', 'ram' or 'disk', got {tier!r}")

    def tier_of(self, key: str) -> str:
        """Where get(key) would find the block now: 'fast', 'ram' or 'disk'."""
        with self._lock:
            for tier, held in (("fast", self._fast), ("ram", self._ram), ("disk", self._on_disk)):
                if key in held:
                    return tier
        raise KeyError(f"TieredStore: no block {key!r}")

    def delete(self, key: str):
        """Remove the block from every tier, its file included."""
        with self._lock:
            self._check_open()
            if not (key in self._fast or key in self._ram or key in self._on_disk):
                raise KeyError(f"TieredStore: no block {key!r}")
            if key in self._on_disk:
                self._path(key).unlink(missing_ok=True)   # first: if it fails, nothing else has changed
                del self._on_disk[key]
            self._take_out(key)
            self._sizes.pop(key, None)
            self._dirty.discard(key)
            self._bump_epoch(key)
            self._forget_prefetch(key, used=False)

    def flush(self):
        """Write every dirty block to disk; afterwards the directory alone can rebuild the store."""
        with self._lock:
            self._check_open()
            self._flush_locked()

    def _flush_locked(self):
        for blocks, move in ((self._fast, "fast->disk"), (self._ram, "ram->disk")):
            for key in [k for k in blocks if k in self._dirty]:
                self._write(key, blocks[key], move)
        # make the renames themselves durable: fsync the directory (not every system can open one)
        try:
            fd = os.open(self.directory, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # ------------------------------------------------------------------
    # Prefetching: the background thread
    # ------------------------------------------------------------------

    def prefetch(self, keys) -> list[concurrent.futures.Future]:
        """Start reading the on-disk-only blocks among `keys` into memory on the background thread, so a
        later get() finds them in the fast or RAM tier. Returns the futures of the reads it started
        (concurrent.futures.wait(...) on them to wait); keys already in memory or on their way are skipped."""
        keys = [keys] if isinstance(keys, str) else list(keys)
        futures = []
        with self._lock:
            self._check_open()
            for key in keys:
                if not (key in self._fast or key in self._ram or key in self._on_disk):
                    raise KeyError(f"TieredStore.prefetch: no block {key!r}")
            for key in dict.fromkeys(keys):          # each key once, in the order given
                if key in self._fast or key in self._ram or key in self._pending:
                    continue
                future = self._executor.submit(self._prefetch_one, key, self._epoch.get(key, 0))
                self._pending[key] = future
                self._counts["prefetches_issued"] += 1
                futures.append(future)
        return futures

    def _prefetch_one(self, key: str, epoch: int):
        """Runs on the background thread: read `key`'s file WITHOUT the lock, then install it with the lock,
        unless the key changed meanwhile (its epoch moved on) or is already in memory."""
        path = self._path(key)
        try:
            block, meta = read_tensors(path)
        except Exception:               # deleted meanwhile, or damaged: a get() will read it and say why
            block = meta = None
        with self._lock:
            self._pending.pop(key, None)
            try:
                if block is None:
                    raise LookupError("unreadable")
                self._note_read(key, path, block, meta)
                if (self._closed or self._epoch.get(key, 0) != epoch or key in self._fast or key in self._ram
                        or key not in self._on_disk):
                    raise LookupError("out of date")
                size = block_nbytes(block)
                if self._fast_used + size <= self.fast_bytes:     # free room in the fast tier: nothing evicted
                    self._fast[key] = self._to_fast(block)
                    self._fast_used += size
                    self._moved["disk->fast"] += size
                else:
                    self._make_room_ram(size)
                    self._ram[key] = self._to_ram(block)
                    self._ram_used += size
                    self._moved["disk->ram"] += size
            except Exception:            # nothing was installed: count it wasted (the failure itself resurfaces
                self._counts["prefetches_wasted"] += 1    # in the get() or flush() that meets it)
                return
            self._sizes[key] = size
            self._prefetched.add(key)

    # ------------------------------------------------------------------
    # Statistics and closing
    # ------------------------------------------------------------------

    def stats(self) -> dict:
        """Counters since the store was opened (see the module docstring)."""
        with self._lock:
            c = dict(self._counts)
            gets, written = c["gets"], c["disk_bytes_written"]
            return {
                **c,
                "fast_misses": gets - c["fast_hits"],
                "ram_misses": c["disk_reads"],              # the gets that missed both memory tiers
                "hit_rate": c["fast_hits"] / gets if gets else None,
                "bytes_moved": dict(self._moved),
                "compression_ratio": c["disk_bytes_written_raw"] / written if written else None,
                "prefetches_outstanding": len(self._pending) + len(self._prefetched),
                "fast_blocks": len(self._fast), "fast_used_bytes": self._fast_used,
                "ram_blocks": len(self._ram), "ram_used_bytes": self._ram_used,
                "disk_blocks": len(self._on_disk), "dirty_blocks": len(self._dirty),
                "fast_device": str(self.fast_device), "ram_pinned": self.ram_pinned,
            }

    def close(self, flush: bool = True):
        """Write the dirty blocks (unless flush=False), stop the prefetch thread and wait for it, and
        let go of the memory tiers. Calling it twice is harmless."""
        with self._lock:
            if self._closed:
                return
            if flush:
                self._flush_locked()     # if this fails the store stays open, so nothing is lost
            self._closed = True
        # Join the thread WITHOUT the lock: a prefetch that is running needs it to finish.
        self._executor.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            for future in self._pending.values():   # what is left never ran: cancelled by the shutdown
                if future.cancelled():
                    self._counts["prefetches_wasted"] += 1
            self._pending.clear()
            self._fast.clear()
            self._ram.clear()
            self._fast_used = self._ram_used = 0
        self._lock_file.close()          # closing the file releases its lock: another store may open the directory

    def __enter__(self) -> TieredStore:
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return (f"TieredStore({str(self.directory)!r}, fast {self._fast_used}/{self.fast_bytes} B on "
                f"{self.fast_device}, ram {self._ram_used}/{self.ram_bytes} B, {len(self._on_disk)} files)")
