"""Tensor files (`refimpl.io`): nothing wrong passes quietly (issue 19, item 1).

The SHA-256 at the end of a file covers its header as well as its payload, so a flipped bit anywhere is
refused; and since a checksum is not a signature (a hostile file can carry a correct one), every header
field is also checked against what the writer writes, each failure naming the file and the field.
"""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch

from refimpl.io import (DIGEST_BYTES, OLD_TENSOR_FILE_MAGIC, TENSOR_FILE_MAGIC, read_tensors, tensor_file_bytes,
                        write_tensors)

TENSORS = {"weights": torch.arange(12, dtype=torch.float32).reshape(3, 4) / 7, "empty": torch.empty(0, 2),
           "ids": torch.tensor([5, -3, 7], dtype=torch.int64)}
META = {"step": 3, "note": "fuzz"}
N = len(TENSOR_FILE_MAGIC)


def _parts(data: bytes) -> tuple[dict, bytes]:
    """(header, payload) of a file's bytes."""
    length = int.from_bytes(data[N:N + 8], "little")
    return json.loads(data[N + 8:N + 8 + length]), data[N + 8 + length:-DIGEST_BYTES]


def _sealed(header, payload: bytes, magic: bytes = TENSOR_FILE_MAGIC) -> bytes:
    """A file with this header and payload and a correct SHA-256: what a hostile writer can make."""
    text = json.dumps(header).encode()
    body = magic + len(text).to_bytes(8, "little") + text + payload
    return body + hashlib.sha256(body).digest()


def _same(got: tuple[dict, dict]) -> bool:
    tensors, meta = got
    return meta == META and tensors.keys() == TENSORS.keys() and all(
        tensors[k].dtype == t.dtype and tensors[k].shape == t.shape and torch.equal(tensors[k], t)
        for k, t in TENSORS.items())


@pytest.mark.parametrize("compress", [False, "lzma", "zstd"])
def test_every_flipped_bit_of_the_header_is_refused_or_harmless(tmp_path, compress):
    """Each byte of the magic, the length and the header, and a sample of the payload's and the digest's,
    flipped in turn (its lowest bit): the read must raise a ValueError naming the file, or give back the
    very same tensors and meta. Never different ones."""
    data = tensor_file_bytes(TENSORS, META, compress=compress)
    header_end = N + 8 + int.from_bytes(data[N:N + 8], "little")
    positions = list(range(header_end)) + list(range(header_end, len(data), 7)) + list(range(len(data) - DIGEST_BYTES, len(data)))
    path = tmp_path / "t.bin"
    refused = 0
    for i in positions:
        path.write_bytes(data[:i] + bytes([data[i] ^ 1]) + data[i + 1:])
        try:
            got = read_tensors(path)
        except ValueError as err:
            assert str(path) in str(err), f"byte {i}: the error does not name the file: {err}"
            refused += 1
        else:
            assert _same(got), f"byte {i} flipped: the file loaded with different contents"
    assert refused == len(positions)                  # with the header under the checksum, every flip is seen
    print(f"\n{compress or 'raw'}: {len(positions)} single-bit flips tried, all refused")


# A header field changed, and the checksum recomputed, as a hostile file would: (the header it writes, message).
def _header_cases():
    def entry(i, **changes):
        def change(h):
            h["tensors"][i].update(changes)
            return h
        return change

    def without(key):
        return lambda h: {k: v for k, v in h.items() if k != key}

    def with_(**changes):
        return lambda h: {**h, **changes}

    def tensors(edit):
        def change(h):
            edit(h["tensors"])
            return h
        return change
    return {
        "header is a list": (lambda h: [h], r"header field \(the header itself\) must be a JSON object"),
        "no tensors key": (without("tensors"), "header field tensors must be a JSON array"),
        "meta a list": (with_(meta=[1]), "header field meta must be a JSON object"),
        "no compressed key": (without("compressed"), "header field compressed is missing"),
        "unknown codec": (with_(compressed="brotli"), "compressed with 'brotli'"),
        "entry not an object": (tensors(lambda t: t.__setitem__(0, "weights")), r"tensors\[0\] must be a JSON object"),
        "name not a string": (entry(0, name=7), r"tensors\[0\]\.name must be a string"),
        "name repeated": (entry(1, name="weights"), r"tensors\[1\]\.name must be a string no other tensor has"),
        "unknown dtype": (entry(0, dtype="float128"), r"tensors\[0\]\.dtype must be one of"),
        "negative size": (entry(0, shape=[-3, -4]), r"tensors\[0\]\.shape must be a list of whole numbers"),
        "size as text": (entry(0, shape=["3", 4]), r"tensors\[0\]\.shape must be a list of whole numbers"),
        "negative offset": (entry(2, offset=-8), r"tensors\[2\]\.offset must be a whole number"),
        "offset into another tensor": (entry(2, offset=8),
                                       r"tensors\[2\]\.offset is 8, but the tensors before it end at byte 48"),
        "nbytes not what the shape needs": (entry(0, nbytes=40),
                                            r"tensors\[0\]\.nbytes is 40, but float32 \[3, 4\] takes 48"),
        "shape and nbytes shrunk": (entry(0, shape=[2, 4], nbytes=32),
                                    r"tensors\[1\]\.offset is 48, but the tensors before it end at byte 32"),
        "nbytes a bool": (entry(1, nbytes=False), r"tensors\[1\]\.nbytes must be a whole number"),
        "a tensor dropped": (tensors(lambda t: t.pop()), "header field tensors cover 48 bytes, but the payload holds 72"),
    }


HEADER_CASES = _header_cases()


@pytest.mark.parametrize("case", HEADER_CASES, ids=list(HEADER_CASES))
def test_a_hostile_header_with_a_correct_checksum_is_refused_by_field(tmp_path, case):
    change, message = HEADER_CASES[case]
    header, payload = _parts(tensor_file_bytes(TENSORS, META))
    path = tmp_path / "hostile.bin"
    path.write_bytes(_sealed(change(header), payload))
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + message):
        read_tensors(path)


def test_a_length_past_the_end_and_a_file_cut_short_are_refused(tmp_path):
    data = tensor_file_bytes(TENSORS, META)
    path = tmp_path / "t.bin"
    header, payload = _parts(data)
    text = json.dumps(header).encode()
    body = TENSOR_FILE_MAGIC + (10 ** 9).to_bytes(8, "little") + text + payload
    path.write_bytes(body + hashlib.sha256(body).digest())
    with pytest.raises(ValueError, match="the header length 1000000000 runs past the end of the file"):
        read_tensors(path)
    for cut in (len(data) - 1, N + 5, N):
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=re.escape(str(path))):
            read_tensors(path)


def test_the_old_format_is_refused_with_the_reason(tmp_path):
    header, payload = _parts(tensor_file_bytes(TENSORS, META))
    path = tmp_path / "old.bin"
    path.write_bytes(_sealed(header, payload, magic=OLD_TENSOR_FILE_MAGIC))
    with pytest.raises(ValueError, match="old format, whose checksum left the header unchecked"):
        read_tensors(path)


def test_names_must_be_strings_when_writing(tmp_path):
    with pytest.raises(ValueError, match="tensor names must be strings"):
        write_tensors(tmp_path / "t.bin", {3: torch.zeros(2)})
