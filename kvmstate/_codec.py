"""Fast ``to_dict``/``from_dict`` for plain mirrors: one ``struct`` call and one dict display.

The generic walk in :mod:`kvmstate._struct` reads a mirror field by field
through ctypes descriptors, a few hundred nanoseconds a field. For a
structure made only of unsigned integers, ``u8`` byte arrays, arrays and
nested structures of those (every ``kvm_*`` mirror a vCPU state holds), the
whole layout is one little-endian :class:`struct.Struct` format, with pad
bytes where ctypes leaves gaps, so that:

* reading is one ``unpack_from`` and one dict display built from the
  tuple (generated once per class, as :mod:`dataclasses` generates
  ``__init__``: a display is the fastest way CPython builds a dict);
* writing collects the leaves in layout order and makes one ``pack_into``,
  which also range-checks every integer; key sets, list lengths, byte
  lengths and the exact ``int`` type (no ``bool``) are checked first.

Anything else (unions, bitfields, other scalar types) has no codec and
takes the generic walk. A write that fails any check raises
:class:`Slow`: the caller then runs the generic walk, which either
succeeds the same way or raises its error naming the field, so a message
never depends on which path ran.
"""

from __future__ import annotations

import ctypes
import struct

TYPE_CHECKING = False  # typing is not imported at run time (see kvmstate._struct)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

__all__ = ["Codec", "Slow", "codec"]

_SCALARS: dict[Any, str] = {
    ctypes.c_uint8: "B",
    ctypes.c_uint16: "H",
    ctypes.c_uint32: "I",
    ctypes.c_uint64: "Q",
}
# A layout with more leaves than this takes the generic walk: the generated code
# stays small (the largest vCPU mirror, kvm_vcpu_events, has a few dozen).
_MAX_LEAVES = 512


class Slow(Exception):
    """The fast write cannot take this input; the generic walk decides."""


class _Unsupported(Exception):
    pass


class Codec:
    """The generated reader and writer of one mirror class (see the module docstring)."""

    __slots__ = ("fill", "hexed", "layout", "plain")

    def __init__(
        self,
        layout: struct.Struct,
        plain: Callable[[Any, int], dict[str, Any]],
        hexed: Callable[[Any, int], dict[str, Any]],
        fill: Callable[[Any, Any, int], None],
    ) -> None:
        self.layout = layout
        #: ``plain(buffer, offset)``: the fields as ints, lists, dicts and bytes.
        self.plain = plain
        #: ``hexed(buffer, offset)``: the same, byte arrays as hex strings (the JSON form).
        self.hexed = hexed
        #: ``fill(data, buffer, offset)``: write a dict of every field; Slow if it is off,
        #: and then the structure's bytes in ``buffer`` may be half written (``pack_into``
        #: stops at the first bad integer): callers write them again or drop the buffer.
        self.fill = fill


def _field_names(cls: type[Any]) -> list[str]:
    names: list[str] = []
    for klass in reversed(cls.__mro__):
        names.extend(f[0] for f in klass.__dict__.get("_fields_", ()))
    return names


class _Builder:
    """Walks a layout once, writing the format, the read displays and the write code."""

    def __init__(self) -> None:
        self.fmt: list[str] = []
        self.pos = 0  # bytes of the layout covered so far
        self.leaves = 0  # tuple items so far
        self.lines: list[str] = []  # the body of fill()
        self.keysets: list[frozenset[str]] = []
        self.temps = 0

    def _at(self, offset: int) -> None:
        if offset < self.pos:
            raise _Unsupported  # overlapping members: a union somewhere
        if offset > self.pos:
            self.fmt.append(f"{offset - self.pos}x")
        self.pos = offset

    def _leaf(self, offset: int, code: str, size: int) -> int:
        self._at(offset)
        self.fmt.append(code)
        self.pos += size
        self.leaves += 1
        if self.leaves > _MAX_LEAVES:
            raise _Unsupported
        return self.leaves - 1

    def _temp(self) -> str:
        self.temps += 1
        return f"v{self.temps}"

    def struct(self, cls: type[Any], offset: int, src: str, out: list[str]) -> tuple[str, str]:
        """Displays (plain, hexed) for a structure at ``offset``; ``src`` holds its dict."""
        if not issubclass(cls, ctypes.Structure) or getattr(cls, "_pack_", None):
            raise _Unsupported
        names = _field_names(cls)
        types = dict(_all_fields(cls))
        self.keysets.append(frozenset(names))
        self.lines.append(f"if {src}.keys() != K{len(self.keysets) - 1}: raise Slow")
        plain, hexed = [], []
        for name in names:
            desc = getattr(cls, name)
            if desc.size > 0xFFFF:  # a bitfield: size packs the bit count and offset
                raise _Unsupported
            ftype = types[name]
            p, h = self.member(ftype, offset + desc.offset, f"{src}[{name!r}]", out)
            plain.append(f"{name!r}: {p}")
            hexed.append(f"{name!r}: {h}")
        return "{" + ", ".join(plain) + "}", "{" + ", ".join(hexed) + "}"

    def member(self, ftype: Any, offset: int, src: str, out: list[str]) -> tuple[str, str]:
        code = _SCALARS.get(ftype)
        if code is not None:
            index = self._leaf(offset, code, ctypes.sizeof(ftype))
            out.append(src)
            return f"t[{index}]", f"t[{index}]"
        if isinstance(ftype, type) and issubclass(ftype, ctypes.Array):
            item: Any = ftype._type_
            length: int = getattr(ftype, "_length_")  # noqa: B009 - typeshed types it oddly
            if item is ctypes.c_uint8:
                index = self._leaf(offset, f"{length}s", length)
                out.append(f"B({src}, {length})")
                return f"t[{index}]", f"t[{index}].hex()"
            var = self._temp()
            self.lines.append(f"{var} = {src}")
            self.lines.append(
                f"if type({var}) is not list and type({var}) is not tuple "
                f"or len({var}) != {length}: raise Slow"
            )
            step = ctypes.sizeof(item)
            plain, hexed = [], []
            for i in range(length):
                p, h = self.member(item, offset + i * step, f"{var}[{i}]", out)
                plain.append(p)
                hexed.append(h)
            return "[" + ", ".join(plain) + "]", "[" + ", ".join(hexed) + "]"
        if isinstance(ftype, type) and issubclass(ftype, ctypes.Structure):
            var = self._temp()
            self.lines.append(f"{var} = {src}")
            return self.struct(ftype, offset, var, out)
        raise _Unsupported


def _all_fields(cls: type[Any]) -> list[tuple[str, Any]]:
    fields: list[tuple[str, Any]] = []
    for klass in reversed(cls.__mro__):
        fields.extend((f[0], f[1]) for f in klass.__dict__.get("_fields_", ()))
    return fields


def _bytes_of(value: Any, size: int) -> bytes:
    """A byte array's value as the generic walk takes it: hex text or bytes, exactly ``size``."""
    if type(value) is str:
        try:
            value = bytes.fromhex(value)
        except ValueError:
            raise Slow from None
    elif type(value) is not bytes and type(value) is not bytearray:
        raise Slow
    if len(value) != size:
        raise Slow
    return bytes(value)


_LEAF_TYPES = frozenset({int, bytes})


_CODECS: dict[type[Any], Codec | None] = {}
# Bounded: sized variants (kvm_cpuid2[n], kvm_xsave[n]) are classes made at run time.
_CODECS_KEPT = 256


def codec(cls: type[Any]) -> Codec | None:
    """The codec of ``cls``, built on first use; None when the layout needs the generic walk."""
    try:
        return _CODECS[cls]
    except KeyError:
        pass
    try:
        made: Codec | None = _build(cls)
    except _Unsupported:
        made = None
    if len(_CODECS) >= _CODECS_KEPT:
        _CODECS.clear()
    _CODECS[cls] = made
    return made


def _build(cls: type[Any]) -> Codec:
    b = _Builder()
    leaves: list[str] = []
    plain, hexed = b.struct(cls, 0, "d", leaves)
    b._at(ctypes.sizeof(cls))  # trailing padding, so the format spans the whole structure
    layout = struct.Struct("<" + "".join(b.fmt))
    if layout.size != ctypes.sizeof(cls):
        raise _Unsupported
    scope: dict[str, Any] = {
        "S": layout,
        "Slow": Slow,
        "B": _bytes_of,
        "LEAF_TYPES": _LEAF_TYPES,
        **{f"K{i}": keys for i, keys in enumerate(b.keysets)},
    }
    body = "\n        ".join(b.lines)
    source = (
        "def plain(buf, off):\n"
        "    t = S.unpack_from(buf, off)\n"
        f"    return {plain}\n"
        "def hexed(buf, off):\n"
        "    t = S.unpack_from(buf, off)\n"
        f"    return {hexed}\n"
        "def fill(d, buf, off):\n"
        "    try:\n"
        f"        {body}\n"
        f"        v = ({', '.join(leaves)},)\n"
        # Exactly int for integers (a bool is an int to struct) and bytes for byte arrays;
        # pack_into range-checks each integer and refuses a bytes/int mix-up.
        "        if not LEAF_TYPES.issuperset(map(type, v)): raise Slow\n"
        "        S.pack_into(buf, off, *v)\n"
        "    except Slow:\n"
        "        raise\n"
        # Whatever else went wrong (a missing key, a non-mapping, an out-of-range int,
        # a hostile mapping's own error), the generic walk meets it again and says so.
        "    except Exception:\n"
        "        raise Slow from None\n"
    )
    exec(compile(source, f"<codec {cls.__name__}>", "exec"), scope)
    return Codec(layout, scope["plain"], scope["hexed"], scope["fill"])
