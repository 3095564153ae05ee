"""The KVMSTATE container: a header and tagged records, with no knowledge of what they hold.

Version 1.0, all integers little-endian::

    file    = magic major minor record*
    magic   = "KVMSTATE"                          8 bytes
    major   = u16    1: readers refuse a larger major version
    minor   = u16    0: additions a 1.x reader may skip (and keeps)
    record  = taglen:u16 tag:taglen bytes length:u64 payload:length bytes

Tags are 1-64 characters of ``[a-z0-9_.]``. What a ``vcpu`` record holds is
:class:`kvmstate.state.VcpuState`'s business; the files and their JSON form
are :mod:`kvmstate.formats.native`'s. Every length is checked against what
is left before anything is read; malformed input raises ValueError naming
the record and its byte in the file.

>>> list(iter_records(memoryview(record("meta", b"{}")), "file", 12))[0][:1]
('meta',)
"""

from __future__ import annotations

import functools
import json
import os
import re
import struct
from collections.abc import Iterator

__all__ = [
    "FORMAT_MAJOR",
    "FORMAT_MINOR",
    "HEAD",
    "MAGIC",
    "TAG_RE",
    "file_header",
    "iter_records",
    "meta_record",
    "record",
    "record_at",
    "record_head",
    "vcpu_payloads",
]

MAGIC = b"KVMSTATE"
FORMAT_MAJOR = 1
FORMAT_MINOR = 0
#: magic, major, minor: the file's first 12 bytes.
HEAD = struct.Struct("<8sHH")
#: What a record tag may be.
TAG_RE = re.compile(rb"[a-z0-9_.]{1,64}\Z")
_TAGLEN = struct.Struct("<H")
_LENGTH = struct.Struct("<Q")


def record(tag: str, payload: bytes) -> bytes:
    """One record: its tag's length, the tag, the payload's length, the payload."""
    raw = tag.encode()
    return _TAGLEN.pack(len(raw)) + raw + _LENGTH.pack(len(payload)) + payload


def record_head(tag: str, length: int) -> bytes:
    """What comes before a record's payload of ``length`` bytes: taglen, tag, length.

    >>> record_head("meta", 2) + b"{}" == record("meta", b"{}")
    True
    """
    raw = tag.encode()
    return _TAGLEN.pack(len(raw)) + raw + _LENGTH.pack(length)


def iter_records(data: memoryview, where: str, base: int) -> Iterator[tuple[str, memoryview, int]]:
    """``(tag, payload, offset)`` for each record of ``data``, which starts at file byte ``base``.

    ``offset`` and every offset in an error are the record's byte in the file.
    """
    pos, end = 0, len(data)
    while pos < end:
        tag, pos, length, start = record_at(data, pos, end, where, base)
        yield tag, data[pos : pos + length], start
        pos += length


# Tags already checked against TAG_RE, by their bytes; bounded, so a hostile file of
# many different tags cannot grow it.
_TAGS: dict[bytes, str] = {}
_TAGS_MAX = 256


def record_at(
    data: memoryview, pos: int, end: int, where: str, base: int
) -> tuple[str, int, int, int]:
    """The record at ``pos`` of ``data[:end]``: ``(tag, payload start, length, file byte)``.

    Every length is checked against what is left before anything is read
    (ValueError naming the file byte), so ``data[start : start + length]``
    is inside ``data``.

    >>> record_at(memoryview(record("meta", b"{}")), 0, 16, "file", 12)
    ('meta', 14, 2, 12)
    """
    start = base + pos
    if end - pos < 2:
        raise ValueError(f"{where}: truncated record header at byte {start}")
    taglen = data[pos] | data[pos + 1] << 8
    pos += 2
    if end - pos < taglen + 8:
        raise ValueError(f"{where}: truncated record header at byte {start}")
    raw = bytes(data[pos : pos + taglen])
    tag = _TAGS.get(raw)
    if tag is None:
        if not TAG_RE.match(raw):
            raise ValueError(f"{where}: invalid record tag {raw[:64]!r} at byte {start}")
        tag = raw.decode()
        if len(_TAGS) < _TAGS_MAX:
            _TAGS[raw] = tag
    pos += taglen
    (length,) = _LENGTH.unpack_from(data, pos)
    pos += 8
    if length > end - pos:
        raise ValueError(
            f"{where}: record {tag!r} at byte {start} says {length} bytes, only {end - pos} remain"
        )
    return tag, pos, length, start


_FILE_HEADER = HEAD.pack(MAGIC, FORMAT_MAJOR, FORMAT_MINOR)


def file_header() -> bytes:
    """The 12 bytes a file starts with."""
    return _FILE_HEADER


@functools.lru_cache(maxsize=1)
def meta_record() -> bytes:
    """The ``meta`` record: UTF-8 JSON naming the writer, the format and the kernel release."""
    # The same for the whole process (the kernel release cannot change under it): made once.
    meta = {
        "writer": "kvmstate",
        "format": f"{FORMAT_MAJOR}.{FORMAT_MINOR}",
        "kernel": os.uname().release,
    }
    return record("meta", json.dumps(meta, sort_keys=True).encode())


def vcpu_payloads(data: object) -> list[tuple[memoryview, str, int]]:
    """The ``vcpu`` records of a file: ``(payload, name, byte of the payload in the file)``.

    TypeError for data that is not bytes-like; ValueError for a bad header or
    record. Other top-level records (``meta``, newer ones) are skipped.
    """
    try:
        view = memoryview(data).cast("B")  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"expected bytes-like data, not {type(data).__name__}") from None
    if len(view) < HEAD.size:
        raise ValueError(f"not a kvmstate file: {len(view)} bytes, the header alone is 12")
    magic, major, minor = HEAD.unpack_from(view)
    if magic != MAGIC:
        raise ValueError(f"not a kvmstate file (magic {bytes(magic)!r})")
    if major != FORMAT_MAJOR:
        raise ValueError(
            f"kvmstate file format {major}.{minor} is not readable by this kvmstate "
            f"(it reads {FORMAT_MAJOR}.x)"
        )
    out: list[tuple[memoryview, str, int]] = []
    for tag, payload, offset in iter_records(view[HEAD.size :], "file", HEAD.size):
        if tag == "vcpu":
            # The payload follows the record's header: taglen (2), tag, length (8).
            out.append((payload, f"vcpu {len(out)}", offset + 2 + len(tag) + 8))
    return out
