"""Chapter 01's tiered store (refimpl/store.py) and the compressed tensor files under it (refimpl/io.py):
no block is ever lost or corrupted, eviction is textbook LRU, a crash mid-write keeps the old block,
damaged files are refused by name, zstd really shrinks what it can, prefetching saves disk reads."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import random
import re
import threading
from collections import Counter, OrderedDict

import pytest
import torch

import refimpl.store as store_module
from refimpl.io import TENSOR_FILE_MAGIC, read_tensors, tensor_file_bytes, write_tensors
from refimpl.store import TieredStore, block_nbytes


def _block(n: int, seed: int) -> dict[str, torch.Tensor]:
    """A small 'layer': weights, two Adam moments and a step counter."""
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(n, generator=g), "m": torch.randn(n, generator=g) * 0.1,
            "v": torch.rand(n, generator=g) * 1e-3, "step": torch.tensor(seed, dtype=torch.int64)}


def _assert_same(got: dict, want: dict, key: str):
    assert set(got) == set(want), key
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name].cpu(), want[name]), (key, name)


def _tmp_files(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


# ----------------------------------------------------------------------------
# refimpl.io: the compress argument
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("compress, codec", [(False, None), (True, "lzma"), ("lzma", "lzma"), ("zstd", "zstd")])
def test_tensor_files_round_trip_with_each_compression(tmp_path, compress, codec):
    tensors = {"a": torch.arange(1000, dtype=torch.int32) % 5, "empty": torch.empty(0, 3), "b": torch.randn(7, 3)}
    path = write_tensors(tmp_path / "t.bin", tensors, {"note": "x"}, compress=compress)
    data = path.read_bytes()
    n = len(TENSOR_FILE_MAGIC)
    header = json.loads(data[n + 8:n + 8 + int.from_bytes(data[n:n + 8], "little")])
    assert header["compressed"] == codec
    back, meta = read_tensors(path)
    assert meta == {"note": "x"}
    for name, t in tensors.items():
        assert back[name].shape == t.shape and torch.equal(back[name], t)


def test_true_still_means_lzma_byte_for_byte():
    tensors = {"a": torch.arange(300, dtype=torch.float32)}
    assert tensor_file_bytes(tensors, compress=True) == tensor_file_bytes(tensors, compress="lzma")


def test_zstd_level_and_bad_arguments():
    tensors = {"a": torch.zeros(10_000)}
    default, strong = (len(tensor_file_bytes(tensors, compress="zstd", level=lv)) for lv in (None, 19))
    assert strong <= default
    with pytest.raises(ValueError, match="compress must be False, True"):
        tensor_file_bytes(tensors, compress="gzip")
    with pytest.raises(ValueError, match="level must be an integer from 1 to 22"):
        tensor_file_bytes(tensors, compress="zstd", level=40)


def test_unknown_compression_in_a_header_is_refused_by_name(tmp_path):
    payload = b"\x00" * 16
    header = json.dumps({"tensors": [{"name": "a", "dtype": "float32", "shape": [4], "offset": 0, "nbytes": 16}],
                         "meta": {}, "compressed": "brotli"}).encode()
    body = TENSOR_FILE_MAGIC + len(header).to_bytes(8, "little") + header + payload
    path = tmp_path / "odd.bin"
    path.write_bytes(body + hashlib.sha256(body).digest())          # a correct checksum: the codec is what is wrong
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: compressed with 'brotli'"):
        read_tensors(path)


# ----------------------------------------------------------------------------
# The store: never loses or corrupts a block
# ----------------------------------------------------------------------------

def test_random_access_stress_against_a_dict(tmp_path):
    """~2000 random operations over blocks three times larger in total than fast + RAM, checked against
    a plain dict on every get; the store is closed and reopened from its directory now and then."""
    rng = random.Random(1234)
    keys = [f"layer{i}" for i in range(30)]
    caps = dict(fast_bytes=4000, ram_bytes=6000)
    store = TieredStore(tmp_path, **caps)
    model: dict[str, dict[str, torch.Tensor]] = {}
    seed = 0
    counted = ("fast_hits", "ram_hits", "disk_reads", "prefetches_used", "prefetches_wasted", "disk_writes")
    totals = Counter()                                 # statistics start afresh with each reopened store
    for step in range(2000):
        op = rng.choices(["put", "get", "modify", "rewrite", "delete", "prefetch", "flush", "reopen"],
                         weights=[20, 35, 15, 8, 6, 12, 3, 1])[0]
        present = sorted(model)
        if op == "put" or not present:
            key, seed = rng.choice(keys), seed + 1
            block = _block(rng.randint(8, 120), seed)
            store.put(key, block)
            model[key] = {n: t.clone() for n, t in block.items()}
            block["w"].add_(1.0)                     # the store kept a copy: this must not leak in
        elif op == "get":
            key = rng.choice(present)
            _assert_same(store.get(key), model[key], key)
        elif op == "modify":                         # in place, under the dirty rule
            key = rng.choice(present)
            block = store.get(key, for_write=True)
            _assert_same(block, model[key], key)
            block["w"].mul_(-0.5).add_(step)
            block["step"].add_(1)
            model[key] = {n: t.detach().cpu().clone() for n, t in block.items()}
        elif op == "rewrite":                        # the other way: change a copy, put it back
            key = rng.choice(present)
            block = {n: t.clone() for n, t in store.get(key).items()}
            block["v"] = block["v"] * 2
            store.put(key, block)
            model[key] = block
        elif op == "delete":
            key = rng.choice(present)
            store.delete(key)
            del model[key]
            assert key not in store
        elif op == "prefetch":                       # not waited for: it races with what follows
            store.prefetch(rng.sample(present, min(4, len(present))))
        elif op == "flush":
            store.flush()
            assert store.stats()["dirty_blocks"] == 0
        else:
            store.close()
            totals.update({k: v for k, v in store.stats().items() if k in counted})
            store = TieredStore(tmp_path, **caps)
        s = store.stats()
        assert s["fast_used_bytes"] <= caps["fast_bytes"] and s["ram_used_bytes"] <= caps["ram_bytes"]
        assert s["fast_hits"] + s["ram_hits"] + s["disk_reads"] == s["gets"]
    assert store.keys() == sorted(model)
    store.close()
    s = store.stats()
    assert s["prefetches_issued"] == s["prefetches_used"] + s["prefetches_wasted"] + s["prefetches_outstanding"]
    totals.update({k: v for k, v in s.items() if k in counted})
    assert all(totals[k] > 0 for k in counted), totals         # every path was taken
    reopened = TieredStore(tmp_path, **caps)          # the disk alone rebuilds every block
    assert reopened.keys() == sorted(model) and _tmp_files(tmp_path) == []
    for key in model:
        _assert_same(reopened.get(key), model[key], key)
    reopened.close()


def test_a_block_changed_in_place_survives_eviction_to_disk_and_back(tmp_path):
    unit = block_nbytes(_block(16, 0))
    with TieredStore(tmp_path, fast_bytes=unit, ram_bytes=unit) as store:
        store.put("a", _block(16, 1))
        store.flush()                                          # "a" is on disk, and clean
        store.get("a", for_write=True)["w"].fill_(7.0)
        store.put("b", _block(16, 2))                          # "a" -> RAM
        store.put("c", _block(16, 3))                          # "a" -> disk, rewritten because it is dirty
        assert store.tier_of("a") == "disk"
        assert torch.equal(store.get("a")["w"], torch.full((16,), 7.0))
        assert store.stats()["disk_reads"] == 1

        # The rule's other side: a change made without for_write is not written back.
        store.get("a")["w"].fill_(-1.0)                        # clean (just read from disk), not marked
        store.get("b")
        store.get("c")                                         # "a" is evicted and, being clean, dropped
        assert store.tier_of("a") == "disk"
        assert torch.equal(store.get("a")["w"], torch.full((16,), 7.0))


def test_put_keeps_a_plain_copy(tmp_path):
    weight = torch.nn.Parameter(torch.randn(4))
    before = weight.detach().clone()
    with TieredStore(tmp_path) as store:
        store.put("layer", {"w": weight})
        with torch.no_grad():
            weight.add_(1.0)
        stored = store.get("layer")["w"]
        assert not stored.requires_grad and stored.grad_fn is None
        assert torch.equal(stored, before)


# ----------------------------------------------------------------------------
# LRU: the textbook order, in both memory tiers
# ----------------------------------------------------------------------------

class ReferenceLRU:
    """Two exclusive LRU caches counted in blocks: a use moves a block to the fast cache's most recent end;
    the fast cache's least recent block goes to the RAM cache's most recent end; the RAM cache's least
    recent block goes to disk."""

    def __init__(self, fast_blocks: int, ram_blocks: int):
        self.fast, self.ram = OrderedDict(), OrderedDict()
        self.fast_blocks, self.ram_blocks = fast_blocks, ram_blocks
        self.evicted_from_fast: list[str] = []

    def use(self, key: str):
        if key in self.fast:
            self.fast.move_to_end(key)
            return
        self.ram.pop(key, None)
        while len(self.fast) >= self.fast_blocks:
            victim, _ = self.fast.popitem(last=False)
            self.evicted_from_fast.append(victim)
            while len(self.ram) >= self.ram_blocks:
                self.ram.popitem(last=False)
            self.ram[victim] = None
        self.fast[key] = None


def test_eviction_order_is_textbook_lru(tmp_path):
    unit = block_nbytes({"w": torch.zeros(16)})
    store = TieredStore(tmp_path, fast_bytes=3 * unit, ram_bytes=2 * unit)
    ref = ReferenceLRU(3, 2)
    rng = random.Random(7)
    keys = [f"k{i}" for i in range(8)]
    trace = [("put", k) for k in "k0 k1 k2".split()] + [("get", "k0"), ("put", "k3")]   # k1 goes, not k0
    trace += [(rng.choice(["get", "get", "put"]), rng.choice(keys)) for _ in range(400)]
    evicted: list[str] = []
    for op, key in trace:
        if op == "get" and key not in store:
            op = "put"
        before = store.keys("fast")
        if op == "put":
            store.put(key, {"w": torch.full((16,), float(len(evicted)))})
        else:
            store.get(key)
        ref.use(key)
        after = store.keys("fast")
        evicted += [k for k in before if k not in after]
        assert after == list(ref.fast), (op, key)              # least to most recently used
        assert store.keys("ram") == list(ref.ram), (op, key)
    assert ref.evicted_from_fast[0] == "k1"                     # the get refreshed k0
    assert evicted == ref.evicted_from_fast and len(evicted) > 100
    store.close(flush=False)


# ----------------------------------------------------------------------------
# Crashes and damaged files
# ----------------------------------------------------------------------------

class SimulatedCrash(Exception):
    pass


def test_a_crash_mid_write_keeps_the_old_block_and_the_temp_file_is_cleaned_up(tmp_path, monkeypatch):
    old, new = _block(32, 1), _block(32, 2)
    store = TieredStore(tmp_path)
    store.put("layer0", old)
    store.flush()
    store.put("layer0", new)

    def crash(*args, **kwargs):                     # the temp file is written and fsynced; the rename never comes
        raise SimulatedCrash

    with monkeypatch.context() as m:
        m.setattr(os, "replace", crash)
        m.setattr(os, "unlink", lambda *a, **k: None)    # a crashed process cleans nothing up
        with pytest.raises(SimulatedCrash):
            store.flush()
    left = _tmp_files(tmp_path)
    assert len(left) == 1 and left[0].startswith(".layer0.blk.")
    store.close(flush=False)                         # (only to stop its thread; a real crash would not)

    reopened = TieredStore(tmp_path)
    assert reopened.removed_temp_files == left and _tmp_files(tmp_path) == []
    _assert_same(reopened.get("layer0"), old, "layer0")
    reopened.close()


def test_a_failed_eviction_write_loses_nothing(tmp_path, monkeypatch):
    unit = block_nbytes(_block(16, 0))
    store = TieredStore(tmp_path, fast_bytes=unit, ram_bytes=unit)
    blocks = {k: _block(16, i) for i, k in enumerate("abc")}
    store.put("a", blocks["a"])
    store.put("b", blocks["b"])                      # a -> RAM
    with monkeypatch.context() as m:
        m.setattr(os, "replace", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left on device")))
        with pytest.raises(OSError, match="No space"):
            store.put("c", blocks["c"])              # b -> RAM needs a -> disk, whose write fails
    assert _tmp_files(tmp_path) == [] and "c" not in store
    assert store.keys("fast") == ["b"] and store.keys("ram") == ["a"]
    store.put("c", blocks["c"])                      # the disk works again
    for k in "abc":
        _assert_same(store.get(k), blocks[k], k)
    store.close()


@pytest.mark.parametrize("damage", ["truncate", "flip", "stub"])
def test_a_damaged_block_file_is_refused_naming_the_file(tmp_path, damage):
    with TieredStore(tmp_path) as store:
        store.put("layer0", _block(64, 1))
    path = tmp_path / "layer0.blk"
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[:len(data) - 10]
    elif damage == "flip":
        data[-5] ^= 0xFF
    else:
        data = data[:5]
    path.write_bytes(bytes(data))
    with TieredStore(tmp_path) as store:
        with pytest.raises(ValueError, match=re.escape(str(path))):
            store.get("layer0")
        concurrent.futures.wait(store.prefetch(["layer0"]))     # the prefetch thread refuses it too...
        with pytest.raises(ValueError, match=re.escape(str(path))):
            store.get("layer0")                                  # ...and get() says why
        assert store.stats()["prefetches_wasted"] == 1


def test_a_renamed_block_file_is_refused(tmp_path):
    with TieredStore(tmp_path) as store:
        store.put("a", _block(8, 1))
    os.rename(tmp_path / "a.blk", tmp_path / "b.blk")
    with TieredStore(tmp_path) as store:
        with pytest.raises(ValueError, match="holds 'tieredstore-block-1' block 'a', not .* block 'b'"):
            store.get("b")


def test_reopening_finds_the_blocks_and_ignores_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("not a block")
    blocks = {f"b{i}": _block(10, i) for i in range(5)}
    with TieredStore(tmp_path, fast_bytes=400, ram_bytes=400) as store:
        for k, b in blocks.items():
            store.put(k, b)
    with TieredStore(tmp_path) as store:
        assert store.keys() == sorted(blocks) and store.keys("fast") == [] and len(store) == 5
        for k, b in blocks.items():
            assert store.tier_of(k) == "disk"
            _assert_same(store.get(k), b, k)
    assert (tmp_path / "notes.txt").exists()


# ----------------------------------------------------------------------------
# Compression
# ----------------------------------------------------------------------------

def test_zstd_files_are_smaller_and_the_ratio_is_the_file_sizes(tmp_path):
    blocks = {f"b{i}": {"w": torch.zeros(2048), "ids": torch.arange(2048, dtype=torch.int64) % 11,
                        "x": torch.randn(64)} for i in range(4)}
    sizes = {}
    for compress in (False, "zstd"):
        directory = tmp_path / str(compress)
        with TieredStore(directory, compress=compress) as store:
            for k, b in blocks.items():
                store.put(k, b)
            store.flush()
            s = store.stats()
        files = sum(p.stat().st_size for p in directory.glob("*.blk"))   # the block files (not the lock)
        raw = sum(block_nbytes(b) for b in blocks.values())
        assert s["disk_writes"] == 4 and s["disk_bytes_written"] == files and s["disk_bytes_written_raw"] == raw
        assert s["compression_ratio"] == raw / files
        sizes[compress] = files
    assert sizes[False] > sum(block_nbytes(b) for b in blocks.values())     # raw: the data plus headers
    assert sizes["zstd"] * 10 < sizes[False]
    with TieredStore(tmp_path / "zstd") as store:
        for k, b in blocks.items():
            _assert_same(store.get(k), b, k)
        s = store.stats()
        assert s["disk_bytes_read"] == sizes["zstd"] and s["disk_bytes_read_raw"] == s["bytes_moved"]["disk->fast"]


# ----------------------------------------------------------------------------
# Prefetching
# ----------------------------------------------------------------------------

def _store_on_disk(tmp_path, n: int, fast_blocks: int, ram_blocks: int):
    """n blocks written to tmp_path, then a fresh store over it: every block on disk only."""
    unit = block_nbytes(_block(16, 0))
    blocks = {f"b{i}": _block(16, i) for i in range(n)}
    with TieredStore(tmp_path) as store:
        for k, b in blocks.items():
            store.put(k, b)
    return TieredStore(tmp_path, fast_bytes=fast_blocks * unit, ram_bytes=ram_blocks * unit), blocks


def test_prefetched_blocks_are_hits_without_further_disk_reads(tmp_path):
    store, blocks = _store_on_disk(tmp_path, 6, fast_blocks=2, ram_blocks=3)
    done, _ = concurrent.futures.wait(store.prefetch(["b0", "b1", "b2", "b2"]))
    assert len(done) == 3                                       # b2 once
    assert [store.tier_of(k) for k in ("b0", "b1", "b2")] == ["fast", "fast", "ram"]   # fast while it has room
    assert store.prefetch(["b0"]) == []                         # in memory already: nothing to do
    reads = store.stats()["disk_file_reads"]
    assert reads == 3
    for k in ("b0", "b1", "b2"):                               # (b2 first would demote b0, then b1)
        _assert_same(store.get(k), blocks[k], k)
    s = store.stats()
    assert s["disk_file_reads"] == reads and s["disk_reads"] == 0
    assert (s["fast_hits"], s["ram_hits"]) == (2, 1) and s["hit_rate"] == 2 / 3
    assert (s["prefetches_issued"], s["prefetches_used"], s["prefetches_wasted"]) == (3, 3, 0)

    concurrent.futures.wait(store.prefetch(["b3", "b4"]))
    store.delete("b3")                                          # never used: wasted
    store.put("b4", _block(16, 99))                             # replaced before use: wasted
    s = store.stats()
    assert (s["prefetches_issued"], s["prefetches_used"], s["prefetches_wasted"]) == (5, 3, 2)
    assert s["prefetches_outstanding"] == 0
    store.close()


def test_get_waits_for_an_in_flight_prefetch_instead_of_reading_twice(tmp_path, monkeypatch):
    """Threads ordered by events, never by timing: b0's prefetch is held inside its file read until get("b0")
    is about to wait for it (the store's before_prefetch_wait hook releases it), so get("b0") meets a running
    prefetch on every run; b1's prefetch is still queued behind it when get("b1") comes."""
    store, blocks = _store_on_disk(tmp_path, 3, fast_blocks=3, ram_blocks=3)
    b0_reading, release_b0, reads, waited_for = threading.Event(), threading.Event(), [], []
    real_read = store_module.read_tensors

    def held_read(path):
        name = os.path.basename(path)
        reads.append(name)
        if name == "b0.blk":                       # the prefetch thread: hold b0's read until released
            b0_reading.set()
            assert release_b0.wait(timeout=60), "get('b0') never waited for the prefetch"
        return real_read(path)

    def release(key):
        waited_for.append(key)
        release_b0.set()

    monkeypatch.setattr(store_module, "read_tensors", held_read)
    store.before_prefetch_wait = release
    store.prefetch(["b0", "b1"])                   # b0 starts (and is held); b1 waits in the queue
    assert b0_reading.wait(timeout=60)
    _assert_same(store.get("b1"), blocks["b1"], "b1")   # not started: cancelled and read here
    assert not release_b0.is_set()                 # b0's prefetch is still inside its read
    _assert_same(store.get("b0"), blocks["b0"], "b0")   # running: waited for, not read again
    assert waited_for == ["b0"]
    assert reads == ["b0.blk", "b1.blk"]
    s = store.stats()
    assert s["prefetch_waits"] == 1 and s["disk_reads"] == 1 and s["fast_hits"] == 1
    assert (s["prefetches_issued"], s["prefetches_used"], s["prefetches_wasted"]) == (2, 1, 1)
    store.close()


# ----------------------------------------------------------------------------
# Configuration and bad input
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(fast_bytes=-1), "fast_bytes must be a positive whole number"),
    (dict(ram_bytes=0), "ram_bytes must be a positive whole number"),
    (dict(fast_bytes=1.5), "fast_bytes must be a positive whole number"),
    (dict(compress="gzip"), "compress must be False, True"),
    (dict(level=99), "level must be an integer from 1 to 22"),
    (dict(device="tpu"), "device must be None, 'cpu' or 'cuda"),
])
def test_bad_configuration_is_refused(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        TieredStore(tmp_path, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_asking_for_cuda_without_it_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no CUDA"):
        TieredStore(tmp_path, device="cuda")


@pytest.mark.parametrize("key, block, message", [
    ("a", [torch.zeros(2)], "must be a dict of named tensors, got a list"),
    ("a", {}, "is empty"),
    ("a", {"w": [1.0, 2.0]}, "'w' is a list, not a tensor"),
    ("a", {3: torch.zeros(2)}, "tensor names must be strings"),
    ("a", {"w": torch.zeros(2, dtype=torch.complex64)}, "dtype torch.complex64"),
    ("a", {"w": torch.zeros(2).to_sparse()}, "only dense ones"),
    ("a", {"w": torch.zeros(100)}, "400 bytes, more than the fast tier's capacity of 256"),
    ("../a", {"w": torch.zeros(2)}, "key '../a' must be"),
    (".hidden", {"w": torch.zeros(2)}, "not starting with '.'"),
])
def test_bad_blocks_are_refused(tmp_path, key, block, message):
    with TieredStore(tmp_path, fast_bytes=256, ram_bytes=1024) as store:
        with pytest.raises(ValueError, match=re.escape(message)):
            store.put(key, block)
        assert store.keys() == []


def test_a_block_bigger_than_the_ram_tier_is_refused_too(tmp_path):
    with TieredStore(tmp_path, fast_bytes=1024, ram_bytes=256) as store:
        with pytest.raises(ValueError, match="more than the ram tier's capacity of 256 bytes"):
            store.put("a", {"w": torch.zeros(100)})


def test_one_store_per_directory_and_the_lock_is_released_on_close(tmp_path):
    first = TieredStore(tmp_path)
    first.put("a", {"w": torch.ones(3)})
    with pytest.raises(RuntimeError, match=rf"already open in another TieredStore \(process {os.getpid()}\)"):
        TieredStore(tmp_path)
    first.close()
    with TieredStore(tmp_path) as second:                       # the lock went with close()
        assert torch.equal(second.get("a")["w"], torch.ones(3))


def test_a_second_process_cannot_open_the_directory_nor_delete_a_live_writers_temp_file(tmp_path):
    import subprocess
    import sys
    first = TieredStore(tmp_path)
    live_temp = tmp_path / ".a.blk.inflight.tmp"               # as a write in progress names its temp file
    live_temp.write_bytes(b"half a block")
    script = ("import sys; from refimpl.store import TieredStore\n"
              "try:\n    TieredStore(sys.argv[1])\nexcept RuntimeError as err:\n    print(err); sys.exit(3)\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 3 and "already open in another TieredStore" in done.stdout, done.stderr[-2000:]
    assert live_temp.exists()
    first.close()
    with TieredStore(tmp_path) as after:                        # now the writer is gone: its temp file is stale
        assert after.removed_temp_files == [live_temp.name]


def test_missing_keys_and_a_closed_store(tmp_path):
    store = TieredStore(tmp_path)
    with pytest.raises(KeyError):
        store.get("nothing")
    with pytest.raises(KeyError):
        store.prefetch(["nothing"])
    with pytest.raises(KeyError):
        store.delete("nothing")
    store.put("a", {"w": torch.ones(3)})
    store.close()
    store.close()                                               # harmless
    with pytest.raises(RuntimeError, match="is closed"):
        store.get("a")
    with TieredStore(tmp_path) as again:                        # close() flushed
        assert torch.equal(again.get("a")["w"], torch.ones(3))
