"""Base classes for the kernel mirrors: ctypes layouts that read well.

Every mirror in :mod:`kvmstate.uapi` (and the VMCB / vmcs12 mirrors) derives
from :class:`Struct` or :class:`Union`, which share :class:`Mirror` (test
``isinstance(obj, Mirror)`` for "any kernel mirror"). They add, on top of
plain ctypes:

* a ``repr`` that names every field, shows addresses in hex, decodes flag
  fields and summarises large byte arrays;
* an IPython pretty printer (``_repr_pretty_``) with one field per line;
* byte-wise equality, :meth:`~Struct.to_bytes`, :meth:`~Struct.from_bytes`
  (exact length, no silent truncation) and :meth:`~Struct.to_dict`.

Per class, ``_decimal_`` names fields shown in decimal (counts and sizes)
and ``_flags_`` maps a field to the ``enum.IntFlag``/``IntEnum`` that
decodes it, or to its name in the class's module (:func:`flag_kind`).

Also here, for every module that checks or shows values: :func:`check_uint`
(an int, not a bool, that fits in N bits), :func:`as_bytes` (bytes or hex of
an exact length) and :func:`to_jsonable` (bytes as hex, enums as ints).
"""

from __future__ import annotations

import ctypes
import enum
import sys
from collections.abc import Mapping

from kvmstate._codec import Slow, codec

# typing is not imported at run time: it and what it pulls in (re, contextlib) would cost
# more than the rest of ``import kvmstate`` (issue 16). mypy takes this name as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, ClassVar, TypeVar

    _T = TypeVar("_T", bound="Mirror")

__all__ = [
    "Mirror",
    "Struct",
    "Union",
    "as_bytes",
    "check_uint",
    "flag_kind",
    "format_int",
    "format_value",
    "to_jsonable",
]

# Byte arrays longer than this are summarised in a repr.
_BYTES_SHOWN = 16
# Arrays of scalars or structures longer than this are cut in a repr.
_ITEMS_SHOWN = 8


def format_int(value: int, name: str = "", decimal: frozenset[str] = frozenset()) -> str:
    """Format an integer field: small values and counts in decimal, the rest in hex."""
    if name in decimal or 0 <= value < 10:
        return str(value)
    return hex(value)


def _format_flag(value: int, kind: type[enum.IntEnum] | type[enum.IntFlag]) -> str:
    try:
        member = kind(value)
    except ValueError:
        # An unknown enum value: in hex even when small, so it stands out from named ones
        # (tests/test_vmcb_layout.py::test_unknown_values_show_in_hex relies on it).
        return hex(value)
    if isinstance(member, enum.IntFlag):
        if value == 0:
            return "0"
        names = [m.name for m in kind if m.value and (value & m.value) == m.value and m.name]
        known = 0
        for m in kind:
            if m.name in names:
                known |= m.value
        if value & ~known:
            names.append(hex(value & ~known))
        return "|".join(names)
    return member.name or hex(value)


def _format_bytes(raw: bytes) -> str:
    if not any(raw):
        return f"<{len(raw)} zero bytes>"
    if len(raw) <= _BYTES_SHOWN:
        return f"bytes.fromhex('{raw.hex()}')"
    nonzero = sum(1 for b in raw if b)
    return f"<{len(raw)} bytes, {nonzero} non-zero: {raw[:_BYTES_SHOWN].hex()}...>"


def flag_kind(owner: Any, name: str) -> Any:
    """The enum that decodes field ``name`` of ``owner`` (a mirror or its class), or None.

    ``_flags_`` holds the enum itself, or its name in the owner's module when
    that module makes it on first use (the enum views of :mod:`kvmstate.uapi`):

    >>> flag_kind(kvmstate.uapi.kvm_mp_state, "mp_state")     # doctest: +SKIP
    <enum 'MpState'>
    """
    flags: Mapping[str, Any] = getattr(owner, "_flags_", {})
    kind = flags.get(name)
    if type(kind) is str:
        cls = owner if isinstance(owner, type) else type(owner)
        kind = getattr(sys.modules[cls.__module__], kind)
    return kind


def format_value(value: Any, name: str = "", owner: Any = None) -> str:
    """Format one field value of a mirror for a repr."""
    decimal: frozenset[str] = getattr(owner, "_decimal_", frozenset())
    if isinstance(value, int):
        kind = flag_kind(owner, name)
        if kind is not None:
            return _format_flag(value, kind)
        return format_int(value, name, decimal)
    if isinstance(value, Mirror):
        return repr(value)
    if isinstance(value, ctypes.Array):
        item = value._type_
        if item in (ctypes.c_uint8, ctypes.c_char, ctypes.c_byte):
            return _format_bytes(bytes(value))
        items = [format_value(v, name, owner) for v in value[:_ITEMS_SHOWN]]
        if len(value) > _ITEMS_SHOWN:
            items.append(f"... {len(value) - _ITEMS_SHOWN} more")
        return "[" + ", ".join(items) + "]"
    if isinstance(value, bytes):
        return _format_bytes(value)
    return repr(value)


class Mirror:
    """Behaviour shared by :class:`Struct` and :class:`Union`: what makes a kernel mirror.

    >>> isinstance(kvmstate.uapi.kvm_regs(), Mirror)           # doctest: +SKIP
    True
    """

    _fields_: ClassVar[Any]
    _decimal_: ClassVar[frozenset[str]] = frozenset()
    _flags_: ClassVar[Mapping[str, Any]] = {}
    # Fields hidden from repr (reserved/padding), still in to_dict.
    _hidden_: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def field_names(cls) -> list[str]:
        """Names of the fields in layout order, the base classes' first."""
        return list(_names(cls))

    def shown_fields(self) -> list[str]:
        """The fields a repr or ``describe`` shows: all but the reserved and padding ones."""
        hidden = self._hidden_
        return [n for n in self.field_names() if n not in hidden]

    def __repr__(self) -> str:
        parts = [f"{n}={format_value(getattr(self, n), n, self)}" for n in self.shown_fields()]
        return f"{type(self).__name__}({', '.join(parts)})"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        """IPython pretty printer: one field per line, nested structures indented."""
        name = type(self).__name__
        if cycle:
            p.text(f"{name}(...)")
            return
        with p.group(4, f"{name}(", ")"):
            for i, field in enumerate(self.shown_fields()):
                if i:
                    p.text(",")
                p.breakable("" if i == 0 else " ")
                p.text(f"{field}=")
                value = getattr(self, field)
                if isinstance(value, Mirror):
                    p.pretty(value)
                else:
                    p.text(format_value(value, field, self))

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self.to_bytes() == other.to_bytes()

    __hash__ = None  # type: ignore[assignment]  # mutable, like a bytearray

    def to_bytes(self) -> bytes:
        """The kernel's own bytes for this structure (``sizeof`` bytes)."""
        return ctypes.string_at(ctypes.addressof(self), ctypes.sizeof(self))  # type: ignore[arg-type]

    @classmethod
    def from_bytes(cls: type[_T], data: bytes | bytearray | memoryview) -> _T:
        """Build a copy from exactly ``sizeof(cls)`` bytes.

        Raises ValueError when the length differs: a short or long input is
        never padded or cut silently.
        """
        size = ctypes.sizeof(cls)  # type: ignore[arg-type]
        view = memoryview(data).cast("B")
        if view.nbytes != size:
            raise ValueError(f"{cls.__name__} is {size} bytes, got {view.nbytes}")
        return cls.from_buffer_copy(view)  # type: ignore[attr-defined,no-any-return]

    def to_dict(self, *, hex_bytes: bool = False) -> dict[str, Any]:
        """Fields as plain Python values: ints, nested dicts, lists, and bytes for byte arrays.

        With ``hex_bytes=True`` byte arrays are hex strings instead, ready for
        ``json.dumps`` (what :meth:`from_dict` also takes):

        >>> kvm_xcr(xcr=0, value=7).to_dict(hex_bytes=True)     # doctest: +SKIP
        {'xcr': 0, 'reserved': 0, 'value': 7}
        """
        fast = codec(type(self))
        if fast is not None:
            return (fast.hexed if hex_bytes else fast.plain)(self, 0)
        out = {n: _plain(getattr(self, n)) for n in _names(type(self))}
        return _hexed(out) if hex_bytes else out

    @classmethod
    def from_dict(cls: type[_T], data: Mapping[str, Any], *, path: str | None = None) -> _T:
        """Rebuild from :meth:`to_dict` output (bytes may be given as hex strings).

        Every field must be present and no other; integers must fit their
        field. ValueError/TypeError name the offending field by its path
        from ``path`` (the class name when not given): ``kvm_sregs.cs.base``,
        or with ``path="sregs"``, ``sregs.cs.base``.

        >>> kvm_regs.from_dict({**kvm_regs().to_dict(), "rip": 0x1000}).rip  # doctest: +SKIP
        4096
        """
        obj = cls()
        fast = codec(cls)
        if fast is not None:
            try:
                fast.fill(data, obj, 0)
                return obj
            except Slow:
                # Off somewhere: the generic walk names the field (or takes what it takes).
                obj = cls()
        _fill(obj, data, cls.__name__ if path is None else path)
        return obj

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(self.field_names()))


_NAMES: dict[type[Any], tuple[str, ...]] = {}
# Bounded: sized variants (kvm_cpuid2[n]) are classes made at run time.
_NAMES_KEPT = 1024


def _names(cls: type[Any]) -> tuple[str, ...]:
    """:meth:`_Mixin.field_names`, once per class (a layout never changes)."""
    try:
        return _NAMES[cls]
    except KeyError:
        pass
    names: list[str] = []
    for klass in reversed(cls.__mro__):
        names.extend(f[0] for f in klass.__dict__.get("_fields_", ()))
    if len(_NAMES) >= _NAMES_KEPT:
        _NAMES.clear()
    made = _NAMES[cls] = tuple(names)
    return made


def _hexed(value: Any) -> Any:
    """A :meth:`_Mixin.to_dict` result with every bytes value as hex text."""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {k: _hexed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_hexed(v) for v in value]
    return value


def to_jsonable(value: Any) -> Any:
    """``value`` with what JSON cannot hold made plain: bytes as hex, enums as ints,
    dicts, lists and tuples walked.

    >>> to_jsonable({"raw": b"\x01\xff", "kind": [NestedFormat.SVM]})   # doctest: +SKIP
    {'raw': '01ff', 'kind': [1]}
    """
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex()
    if isinstance(value, enum.Enum):
        return int(value.value)
    if isinstance(value, dict):
        return {k: to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, Mirror):
        return value.to_dict()
    if isinstance(value, ctypes.Array):
        if value._type_ in (ctypes.c_uint8, ctypes.c_char, ctypes.c_byte):
            return bytes(value)
        return [_plain(v) for v in value]
    return value


_BYTE_TYPES = (ctypes.c_uint8, ctypes.c_char, ctypes.c_byte)


def as_bytes(value: Any, size: int, path: str) -> bytes:
    """``value`` as exactly ``size`` bytes: bytes, a bytearray or a hex string.

    TypeError/ValueError naming ``path`` otherwise; nothing is padded or cut.
    """
    if isinstance(value, str):
        try:
            value = bytes.fromhex(value)
        except ValueError:
            raise ValueError(f"{path}: not a hex string") from None
    if not isinstance(value, (bytes, bytearray)):
        raise TypeError(f"{path}: expected bytes or a hex string, not {type(value).__name__}")
    if len(value) != size:
        raise ValueError(f"{path}: {len(value)} bytes, the field holds {size}")
    return bytes(value)


def check_uint(value: Any, bits: int, path: str) -> int:
    """``value`` if it is an int (not a bool) in ``0 .. 2**bits - 1``.

    TypeError/ValueError naming ``path`` otherwise: ctypes would wrap it.

    >>> check_uint(True, 8, "flags")
    Traceback (most recent call last):
    TypeError: flags: expected an int, not bool
    """
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{path}: expected an int, not {type(value).__name__}")
    if not 0 <= value < (1 << bits):
        raise ValueError(f"{path}: {value} does not fit in {bits} bits")
    return value


def _fill_array(array: Any, value: Any, path: str) -> None:
    item = array._type_
    if item in _BYTE_TYPES:
        raw = as_bytes(value, ctypes.sizeof(array), path)
        ctypes.memmove(ctypes.addressof(array), raw, len(raw))
        return
    if not isinstance(value, (list, tuple)) or len(value) != len(array):
        raise ValueError(f"{path}: expected a list of {len(array)} items")
    for i, v in enumerate(value):
        where = f"{path}[{i}]"
        element = array[i]
        if isinstance(element, Mirror):
            _fill(element, v, where)
        elif isinstance(element, ctypes.Array):
            _fill_array(element, v, where)
        else:
            array[i] = check_uint(v, ctypes.sizeof(item) * 8, where)


def _fill(obj: Any, data: Any, path: str) -> None:
    if not isinstance(data, Mapping):
        raise TypeError(f"{path}: expected a mapping, not {type(data).__name__}")
    names = _names(type(obj))
    unknown = set(data) - set(names)
    missing = set(names) - set(data)
    if unknown or missing:
        # Sorted by repr: the keys of a hostile dict need not be comparable with each other.
        raise ValueError(
            f"{path}: unknown fields {sorted(unknown, key=repr)}, "
            f"missing {sorted(missing, key=repr)}"
        )
    if isinstance(obj, ctypes.Union):
        _fill_union(obj, data, path, list(names))
        return
    for name in names:
        _fill_member(obj, name, data[name], f"{path}.{name}")


def _fill_member(obj: Any, name: str, value: Any, where: str) -> None:
    current = getattr(obj, name)
    if isinstance(current, Mirror):
        _fill(current, value, where)
    elif isinstance(current, ctypes.Array):
        _fill_array(current, value, where)
    else:
        desc = getattr(type(obj), name)
        bits = desc.size >> 16 if desc.size > 0xFFFF else desc.size * 8
        setattr(obj, name, check_uint(value, bits, where))


def _fill_union(obj: Any, data: Mapping[str, Any], path: str, names: list[str]) -> None:
    """Fill a union from a dict of all its members, which overlap.

    Raw byte members go first, then the structured ones, which win where
    they overlap. In each group only the members whose value differs from
    what the union's bytes give before that group are written, so an edit
    to one member is not undone by the others, which still show the bytes
    before it. Edited members of a group that disagree raise ValueError.
    """
    kind = type(obj)
    raw = [n for n in names if _is_bytes(getattr(obj, n))]
    for group in (raw, [n for n in names if n not in raw]):
        before = bytes(obj)
        edited = []
        for name in group:
            scratch = kind.from_buffer_copy(before)
            _fill_member(scratch, name, data[name], f"{path}.{name}")  # checks the value too
            if bytes(scratch) != before:
                edited.append(name)
        for name in edited:
            _fill_member(obj, name, data[name], f"{path}.{name}")
        after = bytes(obj)
        for name in edited[:-1]:  # the last one written reads back as given
            scratch = kind.from_buffer_copy(after)
            _fill_member(scratch, name, data[name], f"{path}.{name}")
            if bytes(scratch) != after:
                raise ValueError(
                    f"{path}: the edited members {', '.join(edited)} overlap and disagree "
                    f"({name} does not read back as given)"
                )


def _is_bytes(value: Any) -> bool:
    return isinstance(value, ctypes.Array) and value._type_ in _BYTE_TYPES


class Struct(Mirror, ctypes.Structure):
    """A kernel ``struct`` mirror (native alignment, like the C compiler)."""


class Union(Mirror, ctypes.Union):
    """A kernel ``union`` mirror."""
