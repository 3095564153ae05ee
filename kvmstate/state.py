"""Whole-vCPU state: :class:`VcpuState`, and :data:`PART_TABLE`, the one table of its parts.

Each part of a vCPU KVM exposes is one field of :class:`VcpuState`, declared
with its row of the table: the kernel structure it is, the ioctls that read
and write it, the capability without which the kernel has none, and how its
bytes are laid out in a file. The field order is the restore order
(:mod:`kvmstate.save` explains it, and does the saving and restoring against
a vCPU); :data:`PARTS` lists the names in that order. Adding a part is one
field here plus its mirror in :mod:`kvmstate.uapi` (and its two ioctl numbers
in :mod:`kvmstate.ioctls`): saving, restoring, comparing, the file format and
the JSON form all read the table.

A part the kernel lacks (no in-kernel irqchip, no ``KVM_CAP_SREGS2`` ...) is
``None`` and its reason is in :attr:`VcpuState.absent`; nothing is faked.

``vcpu.save_state()`` and ``vcpu.restore_state(s)`` are the usual way in;
``s.to_bytes()`` and ``VcpuState.from_bytes(data)`` the file of one vCPU
(:mod:`kvmstate.formats.native` has several vCPUs and the JSON form).
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import functools
import json
import operator
import struct
import warnings
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

from kvmstate import ioctls as io
from kvmstate import records, uapi
from kvmstate.errors import StateError
from kvmstate.nested import NestedState
from kvmstate.x86 import MSR_IA32_FEATURE_CONTROL

__all__ = [
    "MSR_IA32_FEATURE_CONTROL",
    "PARTS",
    "PART_TABLE",
    "Part",
    "StateError",
    "VcpuState",
    "check_absent",
    "check_extra",
    "check_trailing",
    "decode_part",
    "msr_lines",
]

# A separator that cannot be a tag: extra bytes after a known part are kept as "part/trailing".
TRAILING = "/trailing"
# The largest XSAVE area taken from a file (KVM_CAP_XSAVE2 is a few KiB today).
_XSAVE_MAX = 1 << 20


@dataclasses.dataclass(frozen=True)
class Part:
    """One row of :data:`PART_TABLE`: what a part of :class:`VcpuState` is and how it moves.

    ``codec`` is how the part is laid out in bytes: ``"fixed"`` (a structure
    of one size; a longer record keeps the tail in ``extra``), ``"xsave"``
    (4096 bytes or ``KVM_CAP_XSAVE2``'s), ``"cpuid"`` (a ``kvm_cpuid2`` with
    its entries), ``"msrs"`` (a ``kvm_msrs``; the part is ``{index: value}``),
    ``"u32"`` or ``"nested"`` (``kvm_nested_state``, exactly ``size`` bytes).
    ``capability`` is the ``KVM_CAP_*`` name without which the kernel has
    none; ``unless`` one whose presence replaces the part (``fpu`` by
    ``xsave``); ``absent_errnos`` the answers of ``get`` that mean "this
    vCPU has none", and ``absent_why`` what to say then.

    >>> PART_TABLE["sregs2"].capability
    'KVM_CAP_SREGS2'
    """

    name: str
    type: Any
    get: int
    set: int
    capability: str | None = None
    codec: str = "fixed"
    unless: str | None = None
    absent_errnos: tuple[int, ...] = ()
    absent_why: str = ""


def _part(kind: Any, get: int, set_: int, **row: Any) -> Any:
    """A VcpuState field (default None) carrying its row of the parts table."""
    return dataclasses.field(default=None, metadata={"part": (kind, get, set_, row)})


@dataclasses.dataclass(eq=False)
class VcpuState:
    """Everything KVM exposes for one vCPU; each part is the kernel's own structure.

    ``msrs`` maps MSR index to value (the kernel's ``KVM_GET_MSR_INDEX_LIST``
    less the MSRs this vCPU cannot read). ``absent`` maps a part that is
    ``None`` to the reason. ``extra`` keeps bytes a newer writer stored that
    this version does not know (file format), so they survive a round trip.
    """

    # The parts, in restore order, each with its row of PART_TABLE.
    cpuid: uapi.kvm_cpuid2 | None = _part(
        uapi.kvm_cpuid2, io.KVM_GET_CPUID2, io.KVM_SET_CPUID2, codec="cpuid"
    )
    sregs: uapi.kvm_sregs | None = _part(uapi.kvm_sregs, io.KVM_GET_SREGS, io.KVM_SET_SREGS)
    sregs2: uapi.kvm_sregs2 | None = _part(
        uapi.kvm_sregs2, io.KVM_GET_SREGS2, io.KVM_SET_SREGS2, capability="KVM_CAP_SREGS2"
    )
    nested: NestedState | None = _part(
        NestedState,
        io.KVM_GET_NESTED_STATE,
        io.KVM_SET_NESTED_STATE,
        capability="KVM_CAP_NESTED_STATE",
        codec="nested",
    )
    tsc_khz: int | None = _part(int, io.KVM_GET_TSC_KHZ, io.KVM_SET_TSC_KHZ, codec="u32")
    regs: uapi.kvm_regs | None = _part(uapi.kvm_regs, io.KVM_GET_REGS, io.KVM_SET_REGS)
    xsave: uapi.kvm_xsave | None = _part(
        uapi.kvm_xsave, io.KVM_GET_XSAVE, io.KVM_SET_XSAVE, capability="KVM_CAP_XSAVE",
        codec="xsave",
    )  # fmt: skip
    fpu: uapi.kvm_fpu | None = _part(
        uapi.kvm_fpu, io.KVM_GET_FPU, io.KVM_SET_FPU, unless="KVM_CAP_XSAVE"
    )
    xcrs: uapi.kvm_xcrs | None = _part(
        uapi.kvm_xcrs, io.KVM_GET_XCRS, io.KVM_SET_XCRS, capability="KVM_CAP_XCRS"
    )
    # Without an in-kernel irqchip there is no LAPIC to read (ENXIO / EINVAL).
    lapic: uapi.kvm_lapic_state | None = _part(
        uapi.kvm_lapic_state, io.KVM_GET_LAPIC, io.KVM_SET_LAPIC,
        absent_errnos=(errno.ENXIO, errno.EINVAL),
        absent_why="no in-kernel irqchip (Vm.create_irqchip)",
    )  # fmt: skip
    msrs: dict[int, int] | None = _part(dict, io.KVM_GET_MSRS, io.KVM_SET_MSRS, codec="msrs")
    events: uapi.kvm_vcpu_events | None = _part(
        uapi.kvm_vcpu_events, io.KVM_GET_VCPU_EVENTS, io.KVM_SET_VCPU_EVENTS
    )
    mp_state: uapi.kvm_mp_state | None = _part(
        uapi.kvm_mp_state, io.KVM_GET_MP_STATE, io.KVM_SET_MP_STATE
    )
    debugregs: uapi.kvm_debugregs | None = _part(
        uapi.kvm_debugregs, io.KVM_GET_DEBUGREGS, io.KVM_SET_DEBUGREGS
    )
    absent: dict[str, str] = dataclasses.field(default_factory=dict)
    extra: dict[str, bytes] = dataclasses.field(default_factory=dict)

    def parts(self) -> dict[str, Any]:
        """The present parts by name, in restore order."""
        return {p: getattr(self, p) for p in PARTS if getattr(self, p) is not None}

    def part_bytes(self, part: str) -> bytes:
        """One part in the kernel's own bytes (MSRs as a ``kvm_msrs``, tsc_khz as a u32).

        KeyError for an unknown or absent part; TypeError/ValueError naming
        the part when its value is not what the file format can carry.
        """
        row = PART_TABLE.get(part)
        if row is None:
            raise KeyError(f"{part} is not a part (one of {', '.join(PARTS)})")
        value = getattr(self, part)
        if value is None:
            raise KeyError(f"{part} is absent: {self.absent.get(part, 'not saved')}")
        return _encode(row, value)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, VcpuState):
            return NotImplemented
        mine, theirs = self.parts(), other.parts()
        if mine.keys() != theirs.keys() or self.extra != other.extra:
            return False
        return all(self.part_bytes(p) == other.part_bytes(p) for p in mine)

    __hash__ = None  # type: ignore[assignment]

    def differing_parts(self, other: VcpuState) -> list[str]:
        """Names of the parts whose bytes differ (or that only one side has)."""
        if not isinstance(other, VcpuState):
            raise TypeError(f"differing_parts() needs a VcpuState, not {type(other).__name__}")
        out = []
        for part in PARTS:
            a, b = getattr(self, part), getattr(other, part)
            if (a is None) != (b is None) or (
                a is not None and self.part_bytes(part) != other.part_bytes(part)
            ):
                out.append(part)
        return out

    def __repr__(self) -> str:
        present = []
        for part, value in self.parts().items():
            if part == "msrs":
                present.append(f"msrs[{len(value)}]")
            elif part == "cpuid":
                present.append(f"cpuid[{len(value)}]")
            elif part == "nested":
                present.append(f"nested={value!r}")
            elif part == "tsc_khz":
                present.append(f"tsc_khz={value}")
            else:
                present.append(part)
        if self.regs is not None:
            present.insert(0, f"rip={self.regs.rip:#x}")
        absent = f", absent={sorted(self.absent)}" if self.absent else ""
        return f"VcpuState({', '.join(present)}{absent})"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        """IPython: one part per line, in restore order; MSRs sorted, in hex.

        Mirrors print as their own pretty forms (CPUID one leaf per line).
        """
        if cycle:
            p.text("VcpuState(...)")
            return
        items: list[tuple[str, Any]] = []
        if self.regs is not None:
            items.append(("rip", f"{self.regs.rip:#x}"))
        items += list(self.parts().items())
        if self.absent:
            items.append(("absent", dict(sorted(self.absent.items()))))
        if self.extra:
            items.append(("extra", {k: f"<{len(v)} bytes>" for k, v in self.extra.items()}))
        with p.group(4, "VcpuState(", ")"):
            for i, (name, value) in enumerate(items):
                if i:
                    p.text(",")
                p.breakable("" if i == 0 else " ")
                p.text(f"{name}=")
                if name == "msrs":
                    _pretty_msrs(p, value)
                elif isinstance(value, str):
                    p.text(value)
                else:
                    p.pretty(value)

    def __reduce__(self) -> tuple[Any, ...]:
        return (VcpuState.from_bytes, (self.to_bytes(),))

    # --- the file of one vCPU (kvmstate.records holds the container) ----------------

    def to_bytes(self) -> bytes:
        """The versioned file format, one vCPU (see :mod:`kvmstate.formats.native`)."""
        chunks, size = self.record_chunks()
        head = _VCPU_PREFIX + _LENGTH.pack(size)
        return b"".join([_FILE_HEADER, records.meta_record(), head, *chunks])

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> VcpuState:
        """Parse :meth:`to_bytes` output; ValueError for anything malformed."""
        plain = type(data) is bytes or type(data) is bytearray
        if plain:
            known = _FILE_LAYOUTS.get(len(data))
            if known is not None:
                state = known.decode(cls, data)
                if state is not None:
                    return state
        payloads = records.vcpu_payloads(data)
        if len(payloads) != 1:
            raise ValueError(f"the file holds {len(payloads)} vCPUs, not one (use loads_vm)")
        state = cls._from_record_checked(*payloads[0])
        if plain:
            _learn(_FILE_LAYOUTS, data, _file_layout)
        return state

    def to_record(self) -> bytes:
        """This vCPU as one ``vcpu`` record of a file: a record per part, then the rest."""
        chunks, size = self.record_chunks()
        return b"".join([records.record_head("vcpu", size), *chunks])

    def record_chunks(self) -> tuple[list[Any], int]:
        """The payload of :meth:`to_record` as buffers for one ``bytes.join``, and its length.

        The kernel's structures go in as they are (``join`` reads their
        buffers): one copy, into the file, instead of one per record and one
        per level of nesting.

        >>> chunks, size = VcpuState(tsc_khz=1).record_chunks()
        >>> len(b"".join(chunks)) == size
        True
        """
        absent, extra = self.absent, self.extra
        # Empty dicts, the common case, need no walk; nor a dict of str to str.
        if type(absent) is not dict or any(
            type(k) is not str or type(v) is not str for k, v in absent.items()
        ):
            check_absent(absent)
        if type(extra) is not dict or extra:
            check_extra(extra)
            check_trailing(self)
        values = _PART_VALUES(self)
        kinds = tuple(map(type, values))
        plan = None if extra else _CHUNK_PLANS.get(kinds) or _chunk_plan(kinds)
        if plan is None:
            out, total = self._chunks_walked(values, extra)
        else:
            # Fixed-size mirrors of exactly their type have their heads made already; the
            # other parts' heads take their lengths.
            payloads, heads, total = list(plan.getter(values)), list(plan.heads), plan.total
            for j, row, prefix in plan.variable:
                payload, length = _payload(row, payloads[j])
                payloads[j] = payload
                heads[j] = head = prefix + _LENGTH.pack(length)
                total += len(head) + length
            out = [b""] * (2 * len(heads))
            out[0::2] = heads
            out[1::2] = payloads
        if absent:
            text = _absent_record(absent)
            out.append(text)
            total += len(text)
        for tag, blob in extra.items():
            if not tag.endswith(TRAILING):
                out += (records.record_head(tag, len(blob)), blob)
                total += len(out[-2]) + len(blob)
        return out, total

    def _chunks_walked(
        self, values: tuple[Any, ...], extra: dict[str, bytes]
    ) -> tuple[list[Any], int]:
        """The parts' chunks of :meth:`record_chunks`, a part at a time (bytes after a
        fixed-size part in ``extra`` follow it)."""
        out: list[Any] = []
        total = 0
        for (part, row, _, _, prefix), value in zip(_ENCODE_PLAN, values, strict=True):
            if value is None:
                continue
            payload, length = _payload(row, value)
            trailing = extra.get(part + TRAILING, b"") if extra else b""
            # The record head: taglen and tag (made once a part), then the length.
            head = prefix + _LENGTH.pack(length + len(trailing))
            out += (head, payload, trailing) if trailing else (head, payload)
            total += len(head) + length + len(trailing)
        return out, total

    @classmethod
    def from_record(cls, payload: memoryview, where: str, base: int) -> VcpuState:
        """The vCPU of a ``vcpu`` record's payload, which starts at file byte ``base``.

        Records this version does not know, and bytes after a fixed-size
        structure that a newer kernel made longer, go to :attr:`extra`.
        """
        if payload.format != "B":  # bytes are read by index below
            payload = payload.cast("B")
        contiguous = payload.ndim == 1 and payload.c_contiguous
        if contiguous:
            known = _RECORD_LAYOUTS.get(len(payload))
            if known is not None:
                state = known.decode(cls, payload)
                if state is not None:
                    return state
        state = cls._from_record_checked(payload, where, base)
        if contiguous:
            _learn(_RECORD_LAYOUTS, payload, _record_layout)
        return state

    @classmethod
    def _from_record_checked(cls, payload: memoryview, where: str, base: int) -> VcpuState:
        """:meth:`from_record` record by record, every length checked (``payload`` of "B")."""
        # One copy into bytes: slicing and indexing bytes makes no memoryview per record.
        data = bytes(payload)
        state = cls()
        seen: set[str] = set()
        fixed = _FIXED_SIZES
        heads = _PART_HEADS
        unpack = _LENGTH.unpack_from
        pos, end = 0, len(data)
        while pos < end:
            # A part's tag, found by its taglen and tag bytes together (a known head is a
            # valid tag); anything else, or too few bytes left, takes records.record_at,
            # which checks every length and names what is wrong.
            if end - pos >= 10:
                at = pos + 2 + (data[pos] | data[pos + 1] << 8)
                tag = heads.get(data[pos:at], "")
            else:
                tag = ""
            if tag and end - at >= 8 and (length := unpack(data, at)[0]) <= end - at - 8:
                offset = base + pos
                pos = at + 8
            else:
                tag, pos, length, offset = records.record_at(payload, pos, end, where, base)
            if tag in seen:
                raise ValueError(f"{where}: record {tag!r} at byte {offset} appears twice")
            seen.add(tag)
            kind = fixed.get(tag)
            if kind is not None and length == kind[1]:
                # Exactly the mirror's bytes, inside data (the length was checked
                # against what is left): from_buffer_copy takes sizeof(kind) from pos.
                setattr(state, tag, kind[0].from_buffer_copy(data, pos))
            else:
                try:
                    state._read_record(tag, payload[pos : pos + length])
                except ValueError as exc:
                    raise ValueError(f"{where}: {exc} (the record at byte {offset})") from None
            pos += length
        return state

    def _read_record(self, tag: str, payload: memoryview) -> None:
        row = PART_TABLE.get(tag)
        if row is not None:
            value, trailing = _decode(row, payload)
            setattr(self, tag, value)
            if trailing:
                self.extra[tag + TRAILING] = trailing
        elif tag == "absent":
            self.absent = _absent_from_json(bytes(payload))
        else:
            self.extra[tag] = bytes(payload)


#: Every part of :class:`VcpuState` by name, in restore order: its row of the table.
PART_TABLE: Mapping[str, Part] = MappingProxyType(
    {
        f.name: Part(
            f.name, f.metadata["part"][0], *f.metadata["part"][1:3], **f.metadata["part"][3]
        )
        for f in dataclasses.fields(VcpuState)
        if "part" in f.metadata
    }
)

#: Every part of a :class:`VcpuState`, in restore order.
PARTS: tuple[str, ...] = tuple(PART_TABLE)

# Per fixed-size part: its mirror and size, for the decoder's common case.
_FIXED_SIZES: dict[str, tuple[Any, int]] = {
    row.name: (row.type, ctypes.sizeof(row.type))
    for row in PART_TABLE.values()
    if row.codec == "fixed"
}
# Per part, in file order: its row; for a fixed-size part the record head for exactly
# its mirror's size and that size (b"", 0 for the others); and the head's taglen and
# tag, which a length completes (records.record_head without the length).
_ENCODE_PLAN = tuple(
    (
        row.name,
        row,
        records.record_head(row.name, fixed[1]) if fixed else b"",
        fixed[1] if fixed else 0,
        records.record_head(row.name, 0)[:-8],
    )
    for row in PART_TABLE.values()
    for fixed in [_FIXED_SIZES.get(row.name)]
)
# The file's first 12 bytes, and the vcpu record's head without its length.
_FILE_HEADER = records.file_header()
_VCPU_PREFIX = records.record_head("vcpu", 0)[:-8]
#: Every part's value, in PARTS order, in one call.
_PART_VALUES = operator.attrgetter(*PARTS)


class _ChunkPlan(NamedTuple):
    """How :meth:`VcpuState.record_chunks` lays out parts of these types: the present
    values (in file order) from all of them, their heads (b"" where a length is needed),
    the parts that need one (position, row, head without the length), the ready total."""

    getter: Callable[[tuple[Any, ...]], tuple[Any, ...]]
    heads: tuple[bytes, ...]
    variable: tuple[tuple[int, Part, bytes], ...]
    total: int


# Plans by the parts' types (NoneType for an absent one). Bounded: when full, the walk.
_CHUNK_PLANS: dict[tuple[type, ...], _ChunkPlan] = {}
_CHUNK_PLANS_MAX = 32


def _chunk_plan(kinds: tuple[type, ...]) -> _ChunkPlan | None:
    """The plan for parts of these types (made at first use), None when too many exist."""
    plan = _CHUNK_PLANS.get(kinds)
    if plan is not None or len(_CHUNK_PLANS) >= _CHUNK_PLANS_MAX:
        return plan
    present = [i for i, kind in enumerate(kinds) if kind is not type(None)]
    heads: list[bytes] = []
    variable: list[tuple[int, Part, bytes]] = []
    total = 0
    for j, i in enumerate(present):
        _, row, ready_head, ready_size, prefix = _ENCODE_PLAN[i]
        if ready_size and kinds[i] is row.type:
            heads.append(ready_head)
            total += len(ready_head) + ready_size
        else:
            heads.append(b"")
            variable.append((j, row, prefix))
    plan = _CHUNK_PLANS[kinds] = _ChunkPlan(_picker(present), tuple(heads), tuple(variable), total)
    return plan


def _picker(indices: list[int]) -> Callable[[tuple[Any, ...]], tuple[Any, ...]]:
    """The items at ``indices`` of a tuple, as a tuple, in one C call when there are two
    or more (itemgetter of one index gives no tuple, of none is refused)."""
    if len(indices) > 1:
        return operator.itemgetter(*indices)
    return functools.partial(_pick, indices)


def _pick(indices: list[int], values: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(values[i] for i in indices)


_LENGTH = struct.Struct("<Q")
# Each part's record head without the length (taglen, tag), to its tag: the decoder's
# common case.
_PART_HEADS: dict[bytes, str] = {
    records.record_head(tag, 0)[:-8]: tag for tag in (*PART_TABLE, "absent")
}

# --- the decoder's fast path: a layout of records seen before ---------------------------
#
# A vCPU saved twice on one host gives two files laid out alike: the same records, in the
# same order, of the same lengths; only the bytes inside the parts differ. The checked walk
# (VcpuState._from_record_checked) learns the layout of what it decoded, by length; a later
# buffer of that length whose record heads (every taglen, tag and length, and the entry
# count of cpuid and msrs) are the same bytes holds the same records, every length and
# count already checked. One struct.unpack_from compares all the heads; what is left to
# check is inside a part (MSR indices unique, the absent JSON, a nested state), and a
# failure there goes back to the checked walk, which names it.


class _Layout:
    """Where each part is in a buffer laid out like one decoded before, and its heads."""

    __slots__ = ("expected", "heads", "parts")

    def __init__(self, view: memoryview, compared: list[tuple[int, int]], parts: _Parts) -> None:
        # The compared spans in order, adjacent ones merged; the bytes between are skipped.
        fmt, pos = ["<"], 0
        expected: list[bytes] = []
        for start, end in compared:
            if start == pos and expected:
                expected[-1] += bytes(view[start:end])
                fmt[-1] = f"{len(expected[-1])}s"
            else:
                fmt += [f"{start - pos}x"] if start > pos else []
                fmt.append(f"{end - start}s")
                expected.append(bytes(view[start:end]))
            pos = end
        fmt += [f"{len(view) - pos}x"] if len(view) > pos else []
        self.heads = struct.Struct("".join(fmt))
        self.expected = tuple(expected)
        self.parts = parts

    def decode(self, cls: type[VcpuState], buf: Any) -> VcpuState | None:
        """The vCPU in ``buf`` (of the learned length), or None when ``buf`` is laid out
        otherwise or a part's inside is bad (the checked walk then says what)."""
        if self.heads.unpack_from(buf) != self.expected:
            return None
        parts = self.parts
        # Exactly each mirror's bytes, at its offset (the heads say so).
        found: dict[str, Any] = {n: kind.from_buffer_copy(buf, at) for n, kind, at in parts.copies}
        if parts.msrs is not None:
            at, count = parts.msrs
            flat = _msr_entries(count).unpack_from(buf, at)
            msrs = found["msrs"] = dict(zip(flat[0::2], flat[1::2], strict=True))
            if len(msrs) != count:  # an index twice
                return None
        if parts.tsc_khz is not None:
            found["tsc_khz"] = _U32.unpack_from(buf, parts.tsc_khz)[0]
        try:
            if parts.absent is not None:
                at, length = parts.absent
                found["absent"] = _absent_from_json(bytes(buf[at : at + length]))
            if parts.nested is not None:
                at, length = parts.nested
                found["nested"] = NestedState.from_bytes(memoryview(buf)[at : at + length])
        except ValueError:
            return None
        return cls(**found)


@dataclasses.dataclass
class _Parts:
    """What :class:`_Layout` reads, found by a walk: ``(part, type, offset)`` to copy,
    the MSR entries' ``(offset, count)``, and the other parts' offsets (and lengths)."""

    copies: list[tuple[str, Any, int]] = dataclasses.field(default_factory=list)
    msrs: tuple[int, int] | None = None
    tsc_khz: int | None = None
    absent: tuple[int, int] | None = None
    nested: tuple[int, int] | None = None


def _walk_vcpu(
    view: memoryview, pos: int, end: int, compared: list[tuple[int, int]], parts: _Parts
) -> bool:
    """Add the records of the vcpu payload ``view[pos:end]`` to ``compared`` and ``parts``;
    False when one is outside the fast path (an unknown record, bytes after a part)."""
    while pos < end:
        tag, at, length, _ = records.record_at(view, pos, end, "vcpu", 0)
        row = PART_TABLE.get(tag)
        codec = row.codec if row is not None else "absent" if tag == "absent" else ""
        # The field's own name: interned, as keyword arguments are matched fastest.
        name = row.name if row is not None else ""
        head = at  # the head, and for cpuid and msrs the entry count after it, are compared
        if codec == "fixed":
            if length != _FIXED_SIZES[tag][1]:
                return False
            parts.copies.append((name, _FIXED_SIZES[tag][0], at))
        elif codec == "xsave":
            parts.copies.append((name, _xsave_type(length), at))
        elif codec == "cpuid":
            count, head = int.from_bytes(view[at : at + 4], "little"), at + 4
            parts.copies.append((name, _sized_type(uapi.kvm_cpuid2, count), at))
        elif codec == "msrs":
            count, head = int.from_bytes(view[at : at + 4], "little"), at + 4
            parts.msrs = (at + 8, count)
        elif codec == "u32":
            parts.tsc_khz = at
        elif codec == "nested":
            parts.nested = (at, length)
        elif codec == "absent":
            parts.absent = (at, length)
        else:
            return False
        compared.append((pos, head))
        pos = at + length
    return True


def _record_layout(view: memoryview) -> _Layout | None:
    """The layout of a ``vcpu`` record's payload (one the checked walk decoded)."""
    compared: list[tuple[int, int]] = []
    parts = _Parts()
    if not _walk_vcpu(view, 0, len(view), compared, parts):
        return None
    return _Layout(view, compared, parts)


def _file_layout(view: memoryview) -> _Layout | None:
    """The layout of a file of one vCPU (one the checked walk decoded): its header, the
    heads of its top-level records, and its vcpu record's."""
    compared = [(0, records.HEAD.size)]
    parts = _Parts()
    pos, end, vcpus = records.HEAD.size, len(view), 0
    while pos < end:
        tag, at, length, _ = records.record_at(view, pos, end, "file", 0)
        compared.append((pos, at))
        if tag == "vcpu":
            vcpus += 1
            if vcpus > 1 or not _walk_vcpu(view, at, at + length, compared, parts):
                return None
        pos = at + length
    return _Layout(view, compared, parts)


# Layouts by length: of files (VcpuState.from_bytes) and of vcpu records (from_record).
# None for a length whose layout the fast path cannot take. Bounded, the oldest dropped.
_FILE_LAYOUTS: dict[int, _Layout | None] = {}
_RECORD_LAYOUTS: dict[int, _Layout | None] = {}
_LAYOUTS_MAX = 16


def _learn(
    known: dict[int, _Layout | None], data: Any, layout_of: Callable[[memoryview], _Layout | None]
) -> None:
    """Remember the layout of ``data``, which the checked walk has just decoded."""
    view = memoryview(data).cast("B")
    if known.get(len(view), True) is None:
        return  # a length the fast path cannot take: no second walk
    if len(known) >= _LAYOUTS_MAX:
        known.pop(next(iter(known)), None)
    try:
        known[len(view)] = layout_of(view)
    except (ValueError, struct.error):  # never expected after the checked walk
        known[len(view)] = None


@functools.lru_cache(maxsize=8)
def _msr_entries(count: int) -> struct.Struct:
    """``count`` ``kvm_msr_entry``: u32 index, u32 reserved (ignored), u64 data."""
    return struct.Struct("<" + "I4xQ" * count)


_U32 = struct.Struct("<I")

# The ``absent`` record by the dict's items: a state saved on one kernel says the
# same few reasons every time. Bounded, so that many different dicts cannot grow it.
_ABSENT_TEXT: dict[frozenset[tuple[str, str]], bytes] = {}
_ABSENT_TEXT_MAX = 64


# And back: the checked dict of an ``absent`` record's bytes (each caller gets a copy).
_ABSENT_DICT: dict[bytes, dict[str, str]] = {}


def _absent_from_json(text: bytes) -> dict[str, str]:
    """The ``absent`` record's dict (ValueError when it is not a JSON object of strings)."""
    known = _ABSENT_DICT.get(text)
    if known is not None:
        return dict(known)
    try:
        absent = json.loads(text.decode())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ValueError("absent: not a JSON object") from None
    if not isinstance(absent, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in absent.items()
    ):
        raise ValueError("absent: not a JSON object of strings")
    if len(_ABSENT_DICT) < _ABSENT_TEXT_MAX:
        _ABSENT_DICT[text] = dict(absent)
    return absent


def _absent_record(absent: Mapping[str, str]) -> bytes:
    """``absent`` (checked: str -> str) as its record: head and UTF-8 JSON, keys sorted."""
    key = frozenset(absent.items())
    record = _ABSENT_TEXT.get(key)
    if record is None:
        record = records.record("absent", json.dumps(dict(absent), sort_keys=True).encode())
        if len(_ABSENT_TEXT) < _ABSENT_TEXT_MAX:
            _ABSENT_TEXT[key] = record
    return record


# --- each part's bytes, by its codec --------------------------------------------------


def _payload(row: Part, value: Any) -> tuple[Any, int]:
    """A part's bytes for the file, as a buffer (the structure itself when it can be), and
    their length: what :func:`_encode` checks, without its copy."""
    codec = row.codec
    if codec == "msrs":
        data = _msrs_bytes(value)
        if data is not None:
            return data, len(data)
    elif codec == "cpuid" and isinstance(value, uapi.kvm_cpuid2):
        n = ctypes.sizeof(value)
        # _encode's rule, nent == capacity(): for a kvm_cpuid2[k], k entries after the head.
        sized = type(value).__base__ is uapi.kvm_cpuid2
        if sized and n == _CPUID_HEAD + _CPUID_ENTRY * value.nent:
            return value, n
        if value.nent == value.capacity():  # else _encode names what is off
            return value, n
    elif codec == "u32" and type(value) is int and 0 <= value <= 0xFFFF_FFFF:
        return _U32.pack(value), 4
    elif codec == "xsave" and isinstance(value, uapi.kvm_xsave):
        n = ctypes.sizeof(value)
        if not n % 4 and n <= _XSAVE_MAX:  # _encode's rule (sizeof is >= 4096)
            return value, n
    data = _encode(row, value)
    return data, len(data)


_CPUID_HEAD = ctypes.sizeof(uapi.kvm_cpuid2)
_CPUID_ENTRY = ctypes.sizeof(uapi.kvm_cpuid_entry2)


def _msrs_bytes(values: Any) -> bytes | None:
    """``struct kvm_msrs`` of a plain ``{int: int}`` dict, sorted by index, without a
    ctypes object; None for anything else, which the checked path
    (:func:`uapi.msrs_from_mapping`) takes, and names what is wrong."""
    if type(values) is not dict:
        return None
    keys, data = tuple(values), tuple(values.values())
    n = len(keys)
    # Ints exactly: struct takes True as 1, and an equal float would find an order below.
    # The checked path refuses a bool and takes an int subclass.
    if list(map(type, keys)).count(int) != n or list(map(type, data)).count(int) != n:
        return None
    order = _MSR_ORDERS.get(keys) or _msr_order(keys)
    if order is None:
        return None
    pick, head = order
    try:
        packed = _u64s(n).pack(*pick(data))
    except struct.error:  # a value above 64 bits, or below 0
        return None
    out = bytearray(head)
    # kvm_msrs as u64 words: nmsrs and pad, then each entry's index and its data.
    memoryview(out).cast("Q")[2::2] = memoryview(packed).cast("Q")
    return bytes(out)


# Per order of MSR indices (a dict's keys), the values' positions in index order and the
# kvm_msrs with its indices filled in: a vCPU's MSRs come in the same order save after
# save (KVM's list) and file after file, so each order is sorted once. Bounded.
_MsrOrder = tuple[Callable[[tuple[int, ...]], tuple[int, ...]], bytes]
_MSR_ORDERS: dict[tuple[int, ...], _MsrOrder] = {}
_MSR_ORDERS_MAX = 16
_MSR_ORDER_KEPT = 1024  # MSRs; a larger dict (no vCPU has so many) is sorted every time


def _msr_order(keys: tuple[int, ...]) -> _MsrOrder | None:
    """How :func:`_msrs_bytes` lays out these indices (ints), None when one is not a u32."""
    ordered = sorted(keys)
    if ordered and not 0 <= ordered[0] <= ordered[-1] <= 0xFFFF_FFFF:
        return None
    position = {index: i for i, index in enumerate(keys)}
    flat = [0] * (2 * len(ordered))
    flat[0::2] = ordered
    pick = _picker([position[index] for index in ordered])
    order = pick, _msrs_layout(len(keys)).pack(len(keys), 0, *flat)
    if len(keys) <= _MSR_ORDER_KEPT:
        if len(_MSR_ORDERS) >= _MSR_ORDERS_MAX:
            _MSR_ORDERS.pop(next(iter(_MSR_ORDERS)), None)
        _MSR_ORDERS[keys] = order
    return order


@functools.lru_cache(maxsize=8)
def _u64s(count: int) -> struct.Struct:
    """``count`` little-endian u64."""
    return struct.Struct(f"<{count}Q")


@functools.lru_cache(maxsize=8)
def _msrs_layout(count: int) -> struct.Struct:
    """``struct kvm_msrs`` of ``count`` entries: u32 nmsrs, u32 pad, then per entry u32
    index, u32 reserved (0) and u64 data; x86 and the format are little-endian."""
    return struct.Struct("<II" + "I4xQ" * count)


def _encode(row: Part, value: Any) -> bytes:
    part, kind, codec = row.name, row.type, row.codec
    if codec == "msrs":
        data = _msrs_bytes(value)
        if data is not None:
            return data
        return uapi.msrs_from_mapping(value).to_bytes()
    if codec == "u32":
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{part}: expected an int, not {type(value).__name__}")
        if not 0 <= value <= 0xFFFF_FFFF:
            raise ValueError(f"{part}: {value} does not fit in 32 bits")
        return value.to_bytes(4, "little")
    if not isinstance(value, kind):
        raise TypeError(f"{part}: expected {kind.__name__}, not {type(value).__name__}")
    if codec == "cpuid" and value.nent != value.capacity():
        raise ValueError(
            f"{part}: nent is {value.nent} but the object holds {value.capacity()} entries "
            "(use trimmed())"
        )
    if codec == "xsave":
        n = ctypes.sizeof(value)
        if n % 4 or n > _XSAVE_MAX:
            raise ValueError(f"{part}: {n} bytes is not an XSAVE area (>= 4096, 4-aligned)")
    elif codec == "fixed" and ctypes.sizeof(value) != ctypes.sizeof(kind):
        raise ValueError(
            f"{part}: {ctypes.sizeof(value)} bytes, {kind.__name__} is {ctypes.sizeof(kind)}"
        )
    return bytes(value.to_bytes())


def decode_part(part: str, payload: memoryview) -> tuple[Any, bytes]:
    """A part's value from its bytes, and what follows a fixed-size structure (ValueError
    naming the part when the bytes cannot be it).

    >>> decode_part("tsc_khz", memoryview((2_000_000).to_bytes(4, "little")))
    (2000000, b'')
    """
    return _decode(PART_TABLE[part], payload)


def _decode(row: Part, payload: memoryview) -> tuple[Any, bytes]:
    """The part's value from its record, and the bytes after a fixed-size structure."""
    part, kind, codec = row.name, row.type, row.codec
    if codec == "fixed":
        size = ctypes.sizeof(kind)
        if len(payload) < size:
            raise ValueError(f"{part}: {len(payload)} bytes, {kind.__name__} is {size}")
        # from_buffer_copy copies the first sizeof bytes only; the rest is kept apart.
        return kind.from_buffer_copy(payload), bytes(payload[size:])
    if codec == "xsave":
        n = len(payload)
        if n < 4096 or n % 4 or n > _XSAVE_MAX:
            raise ValueError(f"{part}: {n} bytes is not an XSAVE area (>= 4096, 4-aligned)")
        # n bytes, the sized type's size (checked above): one allocation, one copy.
        return _xsave_type(n).from_buffer_copy(payload), b""
    if codec == "cpuid":
        return _flex(uapi.kvm_cpuid2, payload, part), b""
    if codec == "msrs":
        return _msrs_from_payload(payload, part), b""
    if codec == "u32":
        if len(payload) != 4:
            raise ValueError(f"{part}: {len(payload)} bytes, expected 4")
        return int.from_bytes(payload, "little"), b""
    try:
        return NestedState.from_bytes(payload), b""
    except ValueError as exc:
        raise ValueError(f"{part}: {exc}") from None


def _flex(cls: Any, payload: memoryview, part: str) -> Any:
    head = ctypes.sizeof(cls)
    if len(payload) < head:
        raise ValueError(f"{part}: {len(payload)} bytes, shorter than its {head}-byte head")
    count = int.from_bytes(payload[:4], "little")
    item = ctypes.sizeof(cls._array_[1])
    if len(payload) != head + count * item:
        raise ValueError(
            f"{part}: its count says {count} entries ({head + count * item} bytes), "
            f"the record has {len(payload)}"
        )
    # One allocation, one copy: the record is exactly the sized type's bytes (checked
    # above); new() refuses a count above its limit, as before.
    return _sized_type(cls, count).from_buffer_copy(payload)


@functools.lru_cache(maxsize=8)
def _xsave_type(n: int) -> Any:
    """The class of ``kvm_xsave.sized(n)``."""
    return type(uapi.kvm_xsave.sized(n))


@functools.lru_cache(maxsize=32)
def _sized_type(cls: Any, count: int) -> Any:
    """The class of ``cls.new(count)``: a mirror of ``count`` entries (made once a size)."""
    return type(cls.new(count))


def _msrs_from_payload(payload: memoryview, part: str) -> dict[int, int]:
    """``{index: value}`` from a ``struct kvm_msrs`` record (count checked against its length)."""
    if len(payload) < 8:
        raise ValueError(f"{part}: {len(payload)} bytes, shorter than its 8-byte head")
    count = int.from_bytes(payload[:4], "little")
    if len(payload) != 8 + 16 * count:
        raise ValueError(
            f"{part}: its count says {count} entries ({8 + 16 * count} bytes), "
            f"the record has {len(payload)}"
        )
    entries = payload[8:]
    # kvm_msr_entry: u32 index, u32 reserved (ignored), u64 data; x86 and the format
    # are little-endian. memoryview reads unaligned items safely.
    indices = entries.cast("I")[0::4].tolist()
    values = dict(zip(indices, entries.cast("Q")[1::2].tolist(), strict=True))
    if len(values) != count:
        raise ValueError(f"{part}: an MSR index appears twice")
    return values


def check_trailing(state: VcpuState) -> None:
    """ValueError if ``state.extra`` has trailing bytes of a part the state lacks (or none)."""
    for tag, payload in state.extra.items():
        base, trailing, _ = tag.partition(TRAILING)
        # Written after its part, as it is read back: the part must be there, and bytes.
        if trailing and (getattr(state, base) is None or not payload):
            raise ValueError(f"extra: {tag!r} needs {base} present and at least one byte")


def check_absent(absent: Any) -> dict[str, str]:
    """``absent``: a mapping of str to str (TypeError naming it otherwise)."""
    if not isinstance(absent, Mapping):
        raise TypeError(f"absent: expected a mapping, not {type(absent).__name__}")
    for key, why in absent.items():
        if not isinstance(key, str) or not isinstance(why, str):
            raise TypeError(f"absent: {key!r}: expected str -> str, not {type(why).__name__}")
    return dict(absent)


def check_extra(extra: Any) -> dict[str, bytes]:
    """``extra``: tag -> bytes, each tag one the file can hold (ValueError/TypeError otherwise).

    A tag is a record tag that no part, ``absent`` or another tag uses, or
    ``<fixed part>/trailing`` (bytes after a fixed-size structure).
    """
    if not isinstance(extra, Mapping):
        raise TypeError(f"extra: expected a mapping, not {type(extra).__name__}")
    for tag, payload in extra.items():
        if not isinstance(tag, str):
            raise TypeError(f"extra: a tag must be a str, not {type(tag).__name__}")
        if not isinstance(payload, (bytes, bytearray)):
            raise TypeError(f"extra: {tag[:64]!r}: expected bytes, not {type(payload).__name__}")
        base, trailing, _ = tag.partition(TRAILING)
        if trailing:
            row = PART_TABLE.get(base)
            if row is None or row.codec != "fixed" or tag != base + TRAILING:
                raise ValueError(f"extra: invalid tag {tag[:64]!r} (trailing bytes of what?)")
        elif not records.TAG_RE.match(tag.encode()) or tag in PARTS or tag == "absent":
            raise ValueError(f"extra: invalid record tag {tag[:64]!r}")
    return {tag: bytes(payload) for tag, payload in extra.items()}


def msr_lines(values: Mapping[int, int]) -> list[str]:
    """``{index: value}`` as ``"0x174: 0x10"`` lines, sorted by index, both in hex.

    >>> msr_lines({0x176: 0, 0x10: 0x1234})
    ['0x10: 0x1234', '0x176: 0x0']
    """
    return [f"{i:#x}: {v:#x}" for i, v in sorted(values.items())]


def _pretty_msrs(p: Any, values: Mapping[int, int]) -> None:
    lines = msr_lines(values)
    with p.group(4, "{", "}"):
        for i, line in enumerate(lines):
            if i:
                p.text(",")
            p.breakable("" if i == 0 else " ")
            p.text(line)


def __getattr__(name: str) -> Any:
    # save() and restore() moved to kvmstate.save, which sits above this module; the
    # old names still work, by a lookup at first use rather than an import back up.
    if name in ("save", "restore"):
        warnings.warn(
            f"kvmstate.state.{name} moved to kvmstate.save.{name} (or use Vcpu.{name}_state)",
            DeprecationWarning,
            stacklevel=2,
        )
        import importlib

        return getattr(importlib.import_module("kvmstate.save"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
