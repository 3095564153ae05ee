"""A small, bounds-checked CBOR (RFC 8949) decoder and encoder, for crosvm's snapshots.

crosvm writes every snapshot fragment with ``ciborium``; this module reads
and writes the subset ciborium produces:

======================  ==============================================
CBOR                    Python
======================  ==============================================
unsigned / negative     ``int`` (-2**64 .. 2**64 - 1)
byte string             ``bytes``
text string             ``str`` (must be UTF-8)
array                   ``list``
map                     ``dict`` (insertion order = file order)
false / true / null     ``False`` / ``True`` / ``None``
float (16, 32, 64 bit)  ``float``
tag                     refused, or :class:`Tag` with ``tags=True``
======================  ==============================================

Indefinite lengths, ``undefined`` and the other simple values are refused:
ciborium never writes them. Hostile input cannot make the decoder allocate
more than a small multiple of its own size or recurse without bound: every
declared length is checked against the bytes left before anything is
allocated (an array of *n* items needs at least *n* bytes, a map 2 *n*),
nesting stops at ``max_depth``, and a map with a repeated or unhashable key
is refused. Every refusal is a :class:`CborError` (a ``ValueError``) whose
message starts with the byte offset.

:func:`dumps` writes what ciborium writes: the shortest head for every
integer and length, definite lengths, map entries in the dict's order,
floats in the shortest of the three widths that keeps the value.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from collections.abc import Container
from typing import Any

__all__ = ["MAX_DEPTH", "CborError", "Tag", "dumps", "head", "loads", "map_items"]

#: Default nesting limit; crosvm's deepest vCPU value is five levels down.
MAX_DEPTH = 64

_UINT_MAX = (1 << 64) - 1
_HEAD = struct.Struct(">B")
_WIDTHS = {24: 1, 25: 2, 26: 4, 27: 8}


class CborError(ValueError):
    """Malformed or unsupported CBOR; ``offset`` is where the problem starts."""

    def __init__(self, offset: int, message: str) -> None:
        super().__init__(f"offset {offset}: {message}")
        self.offset = offset


@dataclasses.dataclass(frozen=True)
class Tag:
    """A CBOR tag kept as it is (``loads(..., tags=True)``): its number and content."""

    number: int
    value: Any


class _Decoder:
    __slots__ = ("data", "max_depth", "pos", "tags")

    def __init__(self, data: bytes, max_depth: int, tags: bool) -> None:
        self.data = data
        self.pos = 0
        self.max_depth = max_depth
        self.tags = tags

    def _take(self, n: int, what: str) -> bytes:
        start = self.pos
        if n > len(self.data) - start:
            raise CborError(start, f"{what} needs {n} bytes, {len(self.data) - start} are left")
        self.pos = start + n
        return self.data[start : start + n]

    def _head(self) -> tuple[int, int, int, int]:
        """(offset, major type, additional info, argument) of the next data item."""
        start = self.pos
        if start >= len(self.data):
            raise CborError(start, "truncated: expected a data item")
        initial = self.data[start]
        self.pos = start + 1
        major, info = initial >> 5, initial & 0x1F
        if info < 24:
            return start, major, info, info
        width = _WIDTHS.get(info)
        if width is None:
            if info == 31:
                raise CborError(start, "indefinite-length items are not supported")
            raise CborError(start, f"reserved additional information {info}")
        if major == 7:
            return start, major, info, 0  # floats: the caller reads the payload
        return start, major, info, int.from_bytes(self._take(width, "an argument"), "big")

    def _room(self, start: int, count: int, per_item: int, what: str) -> None:
        # Each item takes at least one byte: a count beyond what is left is a lie,
        # refused before anything is allocated for it.
        left = len(self.data) - self.pos
        if count * per_item > left:
            raise CborError(start, f"{what} of {count} items cannot fit in the {left} bytes left")

    def map_key(self, depth: int, seen: Container[Any]) -> Any:
        """The next item as a map key: refused, at its offset, if it cannot be one (a list,
        a map: unhashable) or ``seen`` already holds it."""
        key_at = self.pos
        key = self.item(depth)
        try:
            repeated = key in seen
        except TypeError:
            raise CborError(key_at, f"map key of type {type(key).__name__}") from None
        if repeated:
            raise CborError(key_at, f"repeated map key {key!r}")
        return key

    def item(self, depth: int) -> Any:
        start, major, info, arg = self._head()
        if major == 0:
            return arg
        if major == 1:
            return -1 - arg
        if major in (2, 3):
            raw = self._take(arg, "a byte string" if major == 2 else "a text string")
            if major == 2:
                return raw
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise CborError(start, f"text string is not UTF-8 ({exc.reason})") from None
        if major == 7:
            return self._simple(start, info)
        if depth >= self.max_depth:
            raise CborError(start, f"nested deeper than {self.max_depth} levels")
        if major == 4:
            self._room(start, arg, 1, "array")
            return [self.item(depth + 1) for _ in range(arg)]
        if major == 5:
            self._room(start, arg, 2, "map")
            out: dict[Any, Any] = {}
            for _ in range(arg):
                key = self.map_key(depth + 1, out)
                out[key] = self.item(depth + 1)
            return out
        # major 6: a tag
        if not self.tags:
            raise CborError(start, f"tag {arg} is not supported")
        return Tag(arg, self.item(depth + 1))

    def _simple(self, start: int, info: int) -> Any:
        if info == 20:
            return False
        if info == 21:
            return True
        if info == 22:
            return None
        if info == 25:
            return float(struct.unpack(">e", self._take(2, "a half float"))[0])
        if info == 26:
            return float(struct.unpack(">f", self._take(4, "a float"))[0])
        if info == 27:
            return float(struct.unpack(">d", self._take(8, "a double"))[0])
        if info == 24:
            value = self._take(1, "a simple value")[0]
            raise CborError(start, f"simple value {value} is not supported")
        raise CborError(start, "undefined is not supported" if info == 23 else f"simple {info}")


def _as_bytes(data: object) -> bytes:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    raise TypeError(f"CBOR data must be bytes-like, not {type(data).__name__}")


def loads(
    data: bytes | bytearray | memoryview, *, tags: bool = False, max_depth: int = MAX_DEPTH
) -> Any:
    """Decode one CBOR data item that fills ``data`` exactly.

    >>> loads(bytes.fromhex("a2 61 61 01 61 62 82 02 03"))
    {'a': 1, 'b': [2, 3]}

    Raises :class:`CborError` (a ValueError) naming the offset for
    truncated, malformed, unsupported or trailing bytes; tags are refused
    unless ``tags`` is true (then they come back as :class:`Tag`).
    """
    decoder = _Decoder(_as_bytes(data), max_depth, tags)
    value = decoder.item(0)
    if decoder.pos != len(decoder.data):
        raise CborError(decoder.pos, f"{len(decoder.data) - decoder.pos} bytes after the item")
    return value


def map_items(
    data: bytes | bytearray | memoryview, *, tags: bool = False, max_depth: int = MAX_DEPTH
) -> list[tuple[Any, Any, bytes]]:
    """A top-level map as ``(key, value, encoded value)`` triples, in file order.

    The encoded bytes let a writer put back, unchanged, each value it does
    not modify. ValueError as for :func:`loads`, and if the item is not a map.

    >>> map_items(bytes.fromhex("a1616118ff"))
    [('a', 255, b'\\x18\\xff')]
    """
    decoder = _Decoder(_as_bytes(data), max_depth, tags)
    start, major, _, count = decoder._head()
    if major != 5:
        raise CborError(start, "expected a map")
    decoder._room(start, count, 2, "map")
    out: list[tuple[Any, Any, bytes]] = []
    seen: set[Any] = set()
    for _ in range(count):
        key = decoder.map_key(1, seen)
        seen.add(key)
        value_at = decoder.pos
        value = decoder.item(1)
        out.append((key, value, decoder.data[value_at : decoder.pos]))
    if decoder.pos != len(decoder.data):
        raise CborError(decoder.pos, f"{len(decoder.data) - decoder.pos} bytes after the map")
    return out


def head(major: int, arg: int) -> bytes:
    """The shortest head for major type ``major`` (0..7) and argument ``arg`` (a length, a value).

    >>> head(5, 2).hex(), head(0, 500).hex()
    ('a2', '1901f4')
    """
    if not 0 <= major <= 7 or not 0 <= arg <= _UINT_MAX:
        raise ValueError(f"no CBOR head for major type {major!r} and argument {arg!r}")
    if arg < 24:
        return bytes([major << 5 | arg])
    for info, width in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if arg < 1 << (8 * width):
            return bytes([major << 5 | info]) + arg.to_bytes(width, "big")
    raise ValueError(f"{arg} does not fit in a CBOR head")


def _float_bytes(value: float) -> bytes:
    if math.isnan(value):
        return b"\xf9\x7e\x00"
    for info, fmt in ((25, ">e"), (26, ">f")):
        try:
            packed = struct.pack(fmt, value)
        except (OverflowError, struct.error):
            continue
        if struct.unpack(fmt, packed)[0] == value:
            return bytes([0xE0 | info]) + packed
    return b"\xfb" + struct.pack(">d", value)


def _encode(value: Any, out: list[bytes], depth: int, max_depth: int) -> None:
    if depth > max_depth:
        raise ValueError(f"value nested deeper than {max_depth} levels (a cycle?)")
    if value is None:
        out.append(b"\xf6")
    elif value is True:
        out.append(b"\xf5")
    elif value is False:
        out.append(b"\xf4")
    elif isinstance(value, int):
        if 0 <= value <= _UINT_MAX:
            out.append(head(0, value))
        elif -(1 << 64) <= value < 0:
            out.append(head(1, -1 - value))
        else:
            raise ValueError(f"{value} does not fit in a CBOR integer (64 bits and a sign)")
    elif isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        out.append(head(2, len(raw)))
        out.append(raw)
    elif isinstance(value, str):
        raw = value.encode("utf-8")
        out.append(head(3, len(raw)))
        out.append(raw)
    elif isinstance(value, (list, tuple)):
        out.append(head(4, len(value)))
        for item in value:
            _encode(item, out, depth + 1, max_depth)
    elif isinstance(value, dict):
        out.append(head(5, len(value)))
        for key, item in value.items():
            _encode(key, out, depth + 1, max_depth)
            _encode(item, out, depth + 1, max_depth)
    elif isinstance(value, float):
        out.append(_float_bytes(value))
    elif isinstance(value, Tag):
        if not isinstance(value.number, int) or not 0 <= value.number <= _UINT_MAX:
            raise ValueError(f"tag number {value.number!r} is not a 64-bit unsigned integer")
        out.append(head(6, value.number))
        _encode(value.value, out, depth + 1, max_depth)
    else:
        raise TypeError(f"cannot encode {type(value).__name__} as CBOR")


def dumps(value: Any, *, max_depth: int = MAX_DEPTH) -> bytes:
    """Encode ``value`` as ciborium would (shortest heads, definite lengths).

    >>> dumps({"a": 1, "b": [2, 3]}).hex()
    'a26161016162820203'

    TypeError for a value with no CBOR form, ValueError for an integer
    beyond 64 bits or nesting beyond ``max_depth``.
    """
    out: list[bytes] = []
    _encode(value, out, 0, max_depth)
    return b"".join(out)
