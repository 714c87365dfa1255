"""Files the book writes: atomically (temp file + rename), as JSON or as checked tensor files, never pickle."""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import lzma
import math
import os
import tempfile
from pathlib import Path

import torch


def _alive(pid: int) -> bool:
    """Whether process `pid` exists (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                       # it exists, under another user
        return True
    return True


def temporary_name_prefix(path: Path) -> str:
    """What this process's temporary files for `path` start with: `.name.<pid>.` (the pid says whose they are)."""
    return f".{path.name}.{os.getpid()}."


def remove_dead_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files (and SQLite journals) that a writer of `path` left when it died; return them.

    A temporary is `.name.<pid>.<random>.tmp` (or that with `-journal`): only those whose writer process no
    longer exists are removed, never a live writer's (in this process or another)."""
    path = Path(path)
    removed = []
    for candidate in path.parent.glob(f".{glob.escape(path.name)}.*.tmp*"):
        pid = candidate.name[len(path.name) + 2:].split(".", 1)[0]
        if (candidate.name.endswith((".tmp", ".tmp-journal")) and pid.isdigit() and int(pid) != os.getpid()
                and not _alive(int(pid))):
            try:
                candidate.unlink()
                removed.append(candidate)
            except FileNotFoundError:              # another process cleaned it first
                pass
    return removed


def hold_writer_lock(lock_path: str | os.PathLike, refusal: str):
    """Take an exclusive OS lock (flock) on `lock_path` without waiting, and return the open file that holds
    it (the lock goes when the file is closed or the process dies). A second writer, in this process or
    another, gets RuntimeError(refusal), with "{holder}" in it replaced by the holder's pid."""
    lock_path = Path(lock_path)
    lock_file = open(lock_path, "a+")
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.seek(0)
        holder = lock_file.read().strip() or "unknown"
        lock_file.close()
        raise RuntimeError(refusal.replace("{holder}", holder)) from None
    lock_file.seek(0)
    lock_file.truncate()
    lock_file.write(str(os.getpid()))
    lock_file.flush()
    return lock_file


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` so a reader sees the old file or the new one, never half of one. Temporaries
    that a dead writer of `path` left behind are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temporaries(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temporary_name_prefix(path), suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)                      # mkstemp makes the file private (0600); these are for reading
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json(path: str | os.PathLike, obj) -> Path:
    """Atomically write `obj` as indented JSON (NaN is refused: it is not JSON)."""
    text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"
    return atomic_write_bytes(path, text.encode("utf-8"))


def read_json(path: str | os.PathLike):
    """Read a JSON file written by `write_json`, with a clear error if it is missing or malformed."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist; run the code that writes it first") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None


def save_figure_atomically(fig, path: str | os.PathLike, **savefig_kwargs) -> Path:
    """Render a matplotlib figure to PNG in memory, then write it atomically."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", **savefig_kwargs)
    return atomic_write_bytes(path, buffer.getvalue())


# ----------------------------------------------------------------------------
# Tensor files: a JSON header, the raw bytes, and a SHA-256 over both (no pickle)
# ----------------------------------------------------------------------------

TENSOR_FILE_MAGIC = b"BOOKTENSORS\x02"     # version 2: the checksum covers the header too
OLD_TENSOR_FILE_MAGIC = b"BOOKTENSORS\x00"  # version 1 (checksum over the payload only): refused, with why
DIGEST_BYTES = 32                          # the SHA-256 at the end of the file
_DTYPES = {str(d).replace("torch.", ""): d for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16,
                                                      torch.int64, torch.int32, torch.int16, torch.int8,
                                                      torch.uint8, torch.bool)}


COMPRESSIONS = ("lzma", "zstd")      # what a tensor file's header may name in its "compressed" field


def compression_name(compress: bool | str | None) -> str | None:
    """The codec that `compress` asks for: False (or None) -> None, raw bytes; True -> "lzma" (what True
    has always meant here); "lzma" or "zstd" -> itself. Anything else is refused."""
    if compress is None or compress is False:
        return None
    if compress is True:
        return "lzma"
    if isinstance(compress, str) and compress in COMPRESSIONS:
        return compress
    raise ValueError(f"compress must be False, True (lzma), 'lzma' or 'zstd'; got {compress!r}")


def _zstandard():
    """The `zstandard` package, imported when first needed (Python 3.11 has no zstd of its own)."""
    try:
        import zstandard
    except ImportError:
        raise ImportError("compress='zstd' needs the zstandard package: pip install zstandard "
                          "(it is in requirements.txt)") from None
    return zstandard


def _compress(payload: bytes, codec: str, level: int | None) -> bytes:
    """`payload` compressed by `codec`. level None: zstd 3 (fast, most of the gain), lzma 9 | EXTREME (slow,
    smallest: what the book's artifacts have always used). Otherwise zstd 1..22, or lzma's preset 0..9."""
    low, high = (1, 22) if codec == "zstd" else (0, 9)
    if level is not None and (isinstance(level, bool) or not isinstance(level, int) or not low <= level <= high):
        raise ValueError(f"compress={codec!r}: level must be an integer from {low} to {high}, got {level!r}")
    if codec == "zstd":
        return _zstandard().ZstdCompressor(level=3 if level is None else level).compress(payload)
    return lzma.compress(payload, preset=(9 | lzma.PRESET_EXTREME) if level is None else level)


def tensor_file_bytes(tensors: dict[str, torch.Tensor], meta: dict | None = None,
                      compress: bool | str = False, level: int | None = None) -> bytes:
    """What `write_tensors` writes, as bytes:

        magic (12 bytes) | header length (8 bytes, little-endian) | header (UTF-8 JSON) | payload | SHA-256 (32 bytes)

    The header lists each tensor's name, dtype, shape and byte range in the (uncompressed) payload, in
    order, the caller's `meta` (any JSON), and in "compressed" how the payload is compressed: null, "lzma"
    or "zstd". The SHA-256 covers everything before it, header included, so no byte can change unseen.
    `compress`: False (raw), True or "lzma", or "zstd"; `level` is the codec's level (see `_compress`;
    ignored when nothing is compressed).
    """
    codec = compression_name(compress)
    entries, chunks, offset = [], [], 0
    for name, t in tensors.items():
        if not isinstance(name, str):
            raise ValueError(f"write_tensors: tensor names must be strings, got {name!r}")
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"write_tensors: {name!r} is a {type(t).__name__}, not a tensor")
        dtype = str(t.dtype).replace("torch.", "")
        if dtype not in _DTYPES:
            raise ValueError(f"write_tensors: {name!r} has dtype {dtype}; supported: {sorted(_DTYPES)}")
        host = t.detach().cpu().contiguous()            # cpu-ok: the file is bytes in host memory
        raw = host.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        entries.append({"name": name, "dtype": dtype, "shape": list(t.shape), "offset": offset, "nbytes": len(raw)})
        chunks.append(raw)
        offset += len(raw)
    payload = b"".join(chunks)
    if codec is not None:
        payload = _compress(payload, codec, level)
    header = json.dumps({"tensors": entries, "meta": meta or {}, "compressed": codec}, sort_keys=True).encode("utf-8")
    body = TENSOR_FILE_MAGIC + len(header).to_bytes(8, "little") + header + payload
    return body + hashlib.sha256(body).digest()


def write_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict | None = None,
                  compress: bool | str = False, level: int | None = None) -> Path:
    """Atomically write named tensors (and JSON `meta`) to `path`, compressed as `compress` says (False,
    True = "lzma", "lzma" or "zstd", at `level`); see `tensor_file_bytes` for the layout."""
    return atomic_write_bytes(path, tensor_file_bytes(tensors, meta, compress, level))


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_header(path: Path, header, payload_bytes: int | None) -> None:
    """Refuse a header whose fields are not what `tensor_file_bytes` writes, naming the file and the field.
    With `payload_bytes` (the payload's length once decompressed) the byte ranges are checked against it:
    the entries must tile the payload, in order, each of exactly the bytes its dtype and shape need."""
    def bad(field: str, why: str):
        return ValueError(f"{path}: header field {field} {why}")
    if not isinstance(header, dict):
        raise bad("(the header itself)", f"must be a JSON object, got {type(header).__name__}")
    for key, kind in (("tensors", list), ("meta", dict)):
        if not isinstance(header.get(key), kind):
            raise bad(key, f"must be a JSON {'array' if kind is list else 'object'}, got {header.get(key, 'nothing')!r:.60}")
    if "compressed" not in header:
        raise bad("compressed", "is missing (null, or the codec's name)")
    codec = header["compressed"]
    if codec is not None and codec not in COMPRESSIONS:
        raise ValueError(f"{path}: compressed with {codec!r}, which this reader does not know "
                         f"(it reads {', '.join(COMPRESSIONS)} or uncompressed files)")
    names, end = set(), 0
    for i, e in enumerate(header["tensors"]):
        where = f"tensors[{i}]"
        if not isinstance(e, dict):
            raise bad(where, f"must be a JSON object, got {e!r:.60}")
        if not isinstance(e.get("name"), str) or e["name"] in names:
            raise bad(f"{where}.name", f"must be a string no other tensor has, got {e.get('name')!r:.60}")
        names.add(e["name"])
        if e.get("dtype") not in _DTYPES:
            raise bad(f"{where}.dtype", f"must be one of {sorted(_DTYPES)}, got {e.get('dtype')!r:.60}")
        shape = e.get("shape")
        if not isinstance(shape, list) or not all(_whole(d) for d in shape):
            raise bad(f"{where}.shape", f"must be a list of whole numbers, got {shape!r:.60}")
        for key in ("offset", "nbytes"):
            if not _whole(e.get(key)):
                raise bad(f"{where}.{key}", f"must be a whole number, got {e.get(key)!r:.60}")
        need = math.prod(shape) * _DTYPES[e["dtype"]].itemsize
        if e["nbytes"] != need:
            raise bad(f"{where}.nbytes", f"is {e['nbytes']}, but {e['dtype']} {shape} takes {need} bytes")
        if e["offset"] != end:
            raise bad(f"{where}.offset", f"is {e['offset']}, but the tensors before it end at byte {end}")
        end += e["nbytes"]
    if payload_bytes is not None and end != payload_bytes:
        raise bad("tensors", f"cover {end} bytes, but the payload holds {payload_bytes}")


def read_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) from a file `write_tensors` wrote, decompressed as its header's "compressed" field says.

    Refuses, with the file and the reason: a file that is not one, or in the old format; one cut short or
    whose bytes do not match its SHA-256 (header included); a header field that is not what the writer
    writes (see `_check_header`); a compression this reader does not know. Nothing in it is executed.
    """
    path = Path(path)
    data = path.read_bytes()
    n = len(TENSOR_FILE_MAGIC)
    if data[:n] == OLD_TENSOR_FILE_MAGIC:
        raise ValueError(f"{path} is a tensor file of the old format, whose checksum left the header unchecked; "
                         "write it again with this version (re-run what made it)")
    if data[:n] != TENSOR_FILE_MAGIC:
        raise ValueError(f"{path} is not a tensor file (it does not start with {TENSOR_FILE_MAGIC!r})")
    if len(data) < n + 8 + DIGEST_BYTES or hashlib.sha256(data[:-DIGEST_BYTES]).digest() != data[-DIGEST_BYTES:]:
        raise ValueError(f"{path}: checksum mismatch; the file is damaged or was cut short")
    length = int.from_bytes(data[n:n + 8], "little")
    if length > len(data) - n - 8 - DIGEST_BYTES:
        raise ValueError(f"{path}: the header length {length} runs past the end of the file")
    try:
        header = json.loads(data[n + 8:n + 8 + length].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: the header is damaged ({err})") from None
    _check_header(path, header, None)
    payload = data[n + 8 + length:-DIGEST_BYTES]
    codec = header["compressed"]
    if codec == "lzma":
        try:
            payload = lzma.decompress(payload)
        except lzma.LZMAError as err:
            raise ValueError(f"{path}: the lzma payload does not decompress ({err})") from None
    elif codec == "zstd":
        zstandard = _zstandard()
        try:
            payload = zstandard.ZstdDecompressor().decompress(payload)
        except zstandard.ZstdError as err:
            raise ValueError(f"{path}: the zstd payload does not decompress ({err})") from None
    _check_header(path, header, len(payload))
    tensors = {}
    for e in header["tensors"]:
        raw = bytearray(payload[e["offset"]:e["offset"] + e["nbytes"]])
        flat = torch.frombuffer(raw, dtype=_DTYPES[e["dtype"]]) if raw else torch.empty(0, dtype=_DTYPES[e["dtype"]])
        tensors[e["name"]] = flat.reshape(e["shape"])
    return tensors, header["meta"]
