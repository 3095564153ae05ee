"""Lasting formats for vCPU state: a versioned binary file, and a named dict/JSON form.

Binary format, version 1.0 (all integers little-endian)::

    file    = magic major minor record*
    magic   = "KVMSTATE"                          8 bytes
    major   = u16    1: readers refuse a larger major version
    minor   = u16    0: additions a 1.x reader may skip (and keeps)
    record  = taglen:u16 tag:taglen bytes length:u64 payload:length bytes

A file holds one ``vcpu`` record per vCPU (one for :func:`dumps_vcpu`,
any number for :func:`dumps_vm`) and an optional ``meta`` record (UTF-8
JSON: writer, kernel release). A ``vcpu`` payload is itself a sequence of
records, one per part, each payload the kernel's own bytes:

=========== =====================================================
tag         payload
=========== =====================================================
regs        ``struct kvm_regs``  (likewise sregs, sregs2, fpu,
            xcrs, events, debugregs, mp_state, lapic)
xsave       ``struct kvm_xsave`` (4096 bytes or KVM_CAP_XSAVE2's)
cpuid       ``struct kvm_cpuid2`` with its ``nent`` entries
msrs        ``struct kvm_msrs`` with its ``nmsrs`` entries
tsc_khz     u32
nested      ``struct kvm_nested_state``, exactly ``size`` bytes
absent      UTF-8 JSON object: part -> why the kernel had none
=========== =====================================================

Tags are 1-64 characters of ``[a-z0-9_.]``. Inside a ``vcpu`` record, a
reader keeps records it does not know, and bytes after a fixed-size
structure that a newer kernel made longer, in :attr:`VcpuState.extra` and
writes them back unchanged. Unknown top-level records (beside ``vcpu`` and
``meta``) are skipped on load and not written again: a list of
:class:`VcpuState` has no place for them.
Every length is checked against what is left before anything is parsed;
malformed input raises ValueError naming the record.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import re
import struct
from array import array
from collections.abc import Iterator, Mapping
from typing import Any

from kvmstate import uapi
from kvmstate._codec import Slow, codec
from kvmstate._struct import Struct, _as_bytes, _check_int
from kvmstate.nested import HEADER_SIZE, NestedState
from kvmstate.state import PARTS, VcpuState

__all__ = [
    "FORMAT_MAJOR",
    "FORMAT_MINOR",
    "MAGIC",
    "dumps_vcpu",
    "dumps_vm",
    "from_dict",
    "loads_vcpu",
    "loads_vm",
    "to_dict",
]

MAGIC = b"KVMSTATE"
FORMAT_MAJOR = 1
FORMAT_MINOR = 0
_HEAD = struct.Struct("<8sHH")
_TAG_RE = re.compile(rb"[a-z0-9_.]{1,64}\Z")
# A separator that cannot be a tag: extra bytes after a known part are kept as "part/trailing".
_TRAILING = "/trailing"

_U16, _U64 = struct.Struct("<H"), struct.Struct("<Q")
_MSRS_HEAD = struct.Struct("<II")  # kvm_msrs: nmsrs, pad

_FIXED: dict[str, type[Struct]] = {
    "regs": uapi.kvm_regs,
    "sregs": uapi.kvm_sregs,
    "sregs2": uapi.kvm_sregs2,
    "fpu": uapi.kvm_fpu,
    "xcrs": uapi.kvm_xcrs,
    "events": uapi.kvm_vcpu_events,
    "debugregs": uapi.kvm_debugregs,
    "mp_state": uapi.kvm_mp_state,
    "lapic": uapi.kvm_lapic_state,
}
_SIZEOF = {part: ctypes.sizeof(cls) for part, cls in _FIXED.items()}
# The start of each part's record (taglen, tag), written once.
_TAG_HEAD = {part: _U16.pack(len(part)) + part.encode() for part in PARTS}
_TAG_HEAD_LEN = {part: len(head) for part, head in _TAG_HEAD.items()}
_VCPU_HEAD = _U16.pack(4) + b"vcpu"
# Per part, in file order: the mirror it must exactly be to go in as it is (None: a
# part of variable size), its record head (taglen, tag), that head with the length of
# such a mirror after it, the mirror's size, and the bytes of a head with its length.
_ENCODE_PLAN = tuple(
    (
        part,
        _FIXED.get(part),
        _TAG_HEAD[part],
        _TAG_HEAD[part] + _U64.pack(_SIZEOF.get(part, 0)),
        _SIZEOF.get(part, 0),
        _TAG_HEAD_LEN[part] + 8,
    )
    for part in PARTS
)
# The tags this version writes, already checked and decoded.
_KNOWN_TAGS = {tag.encode(): tag for tag in (*PARTS, "absent", "vcpu", "meta")}
_CPUID_HEAD = ctypes.sizeof(uapi.kvm_cpuid2)
_CPUID_ENTRY = ctypes.sizeof(uapi.kvm_cpuid_entry2)


# --- records -------------------------------------------------------------------


def _record(tag: str, payload: bytes) -> bytes:
    raw = tag.encode()
    return struct.pack("<H", len(raw)) + raw + struct.pack("<Q", len(payload)) + payload


def _records(data: memoryview, where: str, base: int) -> Iterator[tuple[str, memoryview, int]]:
    """``(tag, payload, offset)`` for each record of ``data``, which starts at file byte ``base``.

    ``offset`` and every offset in an error are the record's byte in the file.
    """
    pos, end = 0, len(data)
    while pos < end:
        tag, pos, length, start = _record_head(data, pos, end, where, base)
        yield tag, data[pos : pos + length], start
        pos += length


def _record_head(data: memoryview, pos: int, end: int, where: str, base: int) -> _Head:
    """The record at ``pos``: its tag, where its payload starts, its length, its file byte.

    Every length is checked against what is left of ``data`` (``end`` bytes).
    """
    start = base + pos
    if end - pos < 2:
        raise ValueError(f"{where}: truncated record header at byte {start}")
    taglen = data[pos] | data[pos + 1] << 8
    pos += 2
    if end - pos < taglen + 8:
        raise ValueError(f"{where}: truncated record header at byte {start}")
    raw = bytes(data[pos : pos + taglen])
    tag = _KNOWN_TAGS.get(raw)
    if tag is None:
        if not _TAG_RE.match(raw):
            raise ValueError(f"{where}: invalid record tag {raw[:64]!r} at byte {start}")
        tag = raw.decode()
    pos += taglen
    (length,) = _U64.unpack_from(data, pos)
    pos += 8
    if length > end - pos:
        raise ValueError(
            f"{where}: record {tag!r} at byte {start} says {length} bytes, only {end - pos} remain"
        )
    return tag, pos, length, start


_Head = tuple[str, int, int, int]


# --- one vCPU ----------------------------------------------------------------------


def _check_absent(absent: Any) -> dict[str, str]:
    """``absent``: a mapping of str to str (TypeError naming it otherwise)."""
    if not isinstance(absent, Mapping):
        raise TypeError(f"absent: expected a mapping, not {type(absent).__name__}")
    for key, why in absent.items():
        if not isinstance(key, str) or not isinstance(why, str):
            raise TypeError(f"absent: {key!r}: expected str -> str, not {type(why).__name__}")
    return dict(absent)


def _check_extra(extra: Any) -> dict[str, bytes]:
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
        base, trailing, _ = tag.partition(_TRAILING)
        if trailing:
            if base not in _FIXED or tag != base + _TRAILING:
                raise ValueError(f"extra: invalid tag {tag[:64]!r} (trailing bytes of what?)")
        elif not _TAG_RE.match(tag.encode()) or tag in PARTS or tag == "absent":
            raise ValueError(f"extra: invalid record tag {tag[:64]!r}")
    return {tag: bytes(payload) for tag, payload in extra.items()}


def _check_trailing(state: VcpuState) -> None:
    for tag, payload in state.extra.items():
        base, trailing, _ = tag.partition(_TRAILING)
        # Written after its part, as loads reads it back: the part must be there, and bytes.
        if trailing and (getattr(state, base) is None or not payload):
            raise ValueError(f"extra: {tag!r} needs {base} present and at least one byte")


def _encode_vcpu(state: VcpuState) -> tuple[list[Any], int]:
    """The records of one vCPU as buffers for one ``bytes.join``, and their total length.

    The kernel's structures go in as they are (``join`` reads their
    buffers): one copy, into the file, instead of one per record and one
    per level of nesting.
    """
    absent, extra = state.absent, state.extra
    # Empty dicts, the common case, need no walk.
    if type(absent) is not dict or absent:
        _check_absent(absent)
    if type(extra) is not dict or extra:
        _check_extra(extra)
        _check_trailing(state)
    out: list[Any] = []
    total = 0
    for part, kind, head, sized_head, size, overhead in _ENCODE_PLAN:
        value = getattr(state, part)
        if value is None:
            continue
        if extra and part + _TRAILING in extra:
            if type(value) is not kind:
                value, size = _variable_payload(part, value, state)
            trailing = extra[part + _TRAILING]
            out += (head, _U64.pack(size + len(trailing)), value, trailing)
            total += overhead + size + len(trailing)
        elif type(value) is kind:  # a mirror of the kernel's size: its head is ready made
            out += (sized_head, value)
            total += overhead + size
        else:  # a part of variable size (kind None), or a fixed one of another type
            value, length = _variable_payload(part, value, state)
            out += (head, _U64.pack(length), value)
            total += overhead + length
    if absent:
        total += _add_record(out, "absent", _absent_json(absent))
    for tag, payload in extra.items():
        if not tag.endswith(_TRAILING):
            total += _add_record(out, tag, payload)
    return out, total


def _variable_payload(part: str, value: Any, state: VcpuState) -> tuple[Any, int]:
    """A part whose size varies (or a fixed one of another type), and its length."""
    if part == "msrs":
        payload: Any = _msrs_payload(value, state)
    elif part == "cpuid" and isinstance(value, uapi.kvm_cpuid2):
        size = ctypes.sizeof(value)
        # The object itself when nent covers exactly the entries it holds (part_bytes' rule).
        if value.nent == (size - _CPUID_HEAD) // _CPUID_ENTRY:
            return value, size
        payload = state.part_bytes(part)
    elif part == "xsave" and isinstance(value, uapi.kvm_xsave):
        size = ctypes.sizeof(value)
        if not size % 4 and size <= 1 << 20:  # part_bytes' rule (sizeof is >= 4096)
            return value, size
        payload = state.part_bytes(part)
    else:
        payload = state.part_bytes(part)  # checks the value and names what is off
    return payload, len(payload)


# The last "absent" written and its JSON: a state saved on one KVM has the same reasons.
_last_absent: tuple[dict[str, str], bytes] = ({}, b"{}")


def _absent_json(absent: dict[str, str]) -> bytes:
    global _last_absent
    last = _last_absent  # one read: another thread may replace it, never half of it
    if absent == last[0]:
        return last[1]
    text = json.dumps(absent, sort_keys=True).encode()
    _last_absent = (dict(absent), text)
    return text


def _add_record(out: list[Any], tag: str, payload: bytes) -> int:
    raw = tag.encode()
    out += (_U16.pack(len(raw)), raw, _U64.pack(len(payload)), payload)
    return 2 + len(raw) + 8 + len(payload)


def _msrs_payload(values: Any, state: VcpuState) -> bytes:
    """``struct kvm_msrs`` for ``{index: value}``, sorted by index, as part_bytes makes it."""
    if type(values) is dict:
        keys = sorted(values)
        vals = list(map(values.__getitem__, keys))
        # array("I"/"Q") refuses what does not fit; a bool would pass as 0/1, so any
        # bool sends the state to part_bytes, whose error names the MSR.
        try:
            indices, data = array("Q", array("I", keys)), array("Q", vals)
        except (OverflowError, TypeError):
            indices = None
        if indices is not None and bool not in {*map(type, keys), *map(type, vals)}:
            # kvm_msr_entry: u32 index, u32 reserved, u64 data, as two native u64 words
            # (x86 is little-endian, as the format is).
            words = array("Q", bytes(16 * len(keys)))
            words[0::2] = indices
            words[1::2] = data
            return _MSRS_HEAD.pack(len(keys), 0) + words.tobytes()
    return state.part_bytes("msrs")


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
    # One allocation, one copy: the record is exactly the sized type's bytes (checked);
    # new() refuses a count above its limit, as before.
    return _sized_type(cls, count).from_buffer_copy(payload)


@functools.lru_cache(maxsize=8)
def _xsave_type(n: int) -> Any:
    """The class of ``kvm_xsave.sized(n)``."""
    return type(uapi.kvm_xsave.sized(n))


@functools.lru_cache(maxsize=32)
def _sized_type(cls: Any, count: int) -> Any:
    """The class of ``cls.new(count)``: a mirror of ``count`` entries (made once a size)."""
    return type(cls.new(count))


# The last "absent" record read and what it gave: the vCPUs of one file share it.
_last_absent_read: tuple[bytes, dict[str, str]] = (b"{}", {})


def _absent_from_json(raw: bytes) -> dict[str, str]:
    global _last_absent_read
    last = _last_absent_read  # one read: another thread may replace it, never half of it
    if raw == last[0]:
        return dict(last[1])  # a copy: the state's own dict, free to change
    try:
        absent = json.loads(raw.decode())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ValueError("absent: not a JSON object") from None
    if not isinstance(absent, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in absent.items()
    ):
        raise ValueError("absent: not a JSON object of strings")
    _last_absent_read = (raw, dict(absent))
    return absent


def _msrs_from_payload(payload: memoryview) -> dict[int, int]:
    """``{index: value}`` from a ``struct kvm_msrs`` record (count checked against its length)."""
    if len(payload) < _MSRS_HEAD.size:
        raise ValueError(f"msrs: {len(payload)} bytes, shorter than its 8-byte head")
    count = int.from_bytes(payload[:4], "little")
    if len(payload) != 8 + 16 * count:
        raise ValueError(
            f"msrs: its count says {count} entries ({8 + 16 * count} bytes), "
            f"the record has {len(payload)}"
        )
    entries = payload[8:]
    # kvm_msr_entry: u32 index, u32 reserved (ignored), u64 data; x86 and the format
    # are little-endian. memoryview reads unaligned items safely.
    indices = entries.cast("I")[0::4].tolist()
    values = dict(zip(indices, entries.cast("Q")[1::2].tolist(), strict=True))
    if len(values) != count:
        raise ValueError("msrs: an MSR index appears twice")
    return values


def _decode_part(state: VcpuState, part: str, payload: memoryview) -> None:
    cls = _FIXED.get(part)
    if cls is not None:
        size = _SIZEOF[part]
        if len(payload) < size:
            raise ValueError(f"{part}: {len(payload)} bytes, {cls.__name__} is {size}")
        # from_buffer_copy copies the first sizeof bytes only; the rest is kept apart.
        setattr(state, part, cls.from_buffer_copy(payload))
        if len(payload) > size:
            state.extra[part + _TRAILING] = bytes(payload[size:])
    elif part == "xsave":
        n = len(payload)
        if n < 4096 or n % 4 or n > 1 << 20:
            raise ValueError(f"xsave: {n} bytes is not an XSAVE area (>= 4096, 4-aligned)")
        # n bytes, the sized type's size (checked above): one allocation, one copy.
        state.xsave = _xsave_type(n).from_buffer_copy(payload)
    elif part == "cpuid":
        state.cpuid = _flex(uapi.kvm_cpuid2, payload, part)
    elif part == "msrs":
        state.msrs = _msrs_from_payload(payload)
    elif part == "tsc_khz":
        if len(payload) != 4:
            raise ValueError(f"tsc_khz: {len(payload)} bytes, expected 4")
        state.tsc_khz = int.from_bytes(payload, "little")
    elif part == "nested":
        try:
            state.nested = NestedState.from_bytes(payload)
        except ValueError as exc:
            raise ValueError(f"nested: {exc}") from None
    elif part == "absent":
        state.absent = _absent_from_json(bytes(payload))
    else:
        state.extra[part] = bytes(payload)


def _decode_vcpu(data: memoryview, where: str, base: int) -> VcpuState:
    state = VcpuState()
    seen: set[str] = set()
    fixed, sizes = _FIXED, _SIZEOF
    pos, end = 0, len(data)
    while pos < end:
        tag, pos, length, offset = _record_head(data, pos, end, where, base)
        if tag in seen:
            raise ValueError(f"{where}: record {tag!r} at byte {offset} appears twice")
        seen.add(tag)
        cls = fixed.get(tag)
        if cls is not None and length == sizes[tag]:
            # The common case inline: exactly the mirror's bytes, which _record_head
            # found inside data; from_buffer_copy takes sizeof(cls) from pos.
            setattr(state, tag, cls.from_buffer_copy(data, pos))
        else:
            try:
                _decode_part(state, tag, data[pos : pos + length])
            except ValueError as exc:
                raise ValueError(f"{where}: {exc} (the record at byte {offset})") from None
        pos += length
    return state


_FILE_HEAD = _HEAD.pack(MAGIC, FORMAT_MAJOR, FORMAT_MINOR)


def _header() -> bytes:
    return _FILE_HEAD


@functools.lru_cache(maxsize=1)
def _meta() -> bytes:
    # The same for the whole process (the kernel release cannot change under it).
    meta = {
        "writer": "kvmstate",
        "format": f"{FORMAT_MAJOR}.{FORMAT_MINOR}",
        "kernel": os.uname().release,
    }
    return _record("meta", json.dumps(meta, sort_keys=True).encode())


def dumps_vm(states: list[VcpuState]) -> bytes:
    """Encode several vCPUs (a VM) as one file."""
    out: list[Any] = [_FILE_HEAD, _meta()]
    for state in states:
        records, size = _encode_vcpu(state)
        out += (_VCPU_HEAD, _U64.pack(size))
        out += records
    return b"".join(out)


def dumps_vcpu(state: VcpuState) -> bytes:
    """Encode one vCPU as a file."""
    return dumps_vm([state])


def loads_vm(data: bytes | bytearray | memoryview) -> list[VcpuState]:
    """Decode a file written by :func:`dumps_vm` or :func:`dumps_vcpu`."""
    try:
        view = memoryview(data).cast("B")
    except TypeError:
        raise TypeError(f"expected bytes-like data, not {type(data).__name__}") from None
    if len(view) < _HEAD.size:
        raise ValueError(f"not a kvmstate file: {len(view)} bytes, the header alone is 12")
    magic, major, minor = _HEAD.unpack_from(view)
    if magic != MAGIC:
        raise ValueError(f"not a kvmstate file (magic {bytes(magic)!r})")
    if major != FORMAT_MAJOR:
        raise ValueError(
            f"kvmstate file format {major}.{minor} is not readable by this kvmstate "
            f"(it reads {FORMAT_MAJOR}.x)"
        )
    states: list[VcpuState] = []
    for tag, payload, offset in _records(view[_HEAD.size :], "file", _HEAD.size):
        if tag == "vcpu":
            # The payload follows the record's header: taglen (2), tag, length (8).
            body = offset + 2 + len(tag) + 8
            states.append(_decode_vcpu(payload, f"vcpu {len(states)}", body))
    return states


def loads_vcpu(data: bytes | bytearray | memoryview) -> VcpuState:
    """Decode a file holding exactly one vCPU."""
    states = loads_vm(data)
    if len(states) != 1:
        raise ValueError(f"the file holds {len(states)} vCPUs, not one (use loads_vm)")
    return states[0]


# --- named dict / JSON form ----------------------------------------------------------


def _nested_dict(state: NestedState) -> dict[str, Any]:
    h = state.header
    out: dict[str, Any] = {
        "flags": h.flags,
        "format": h.format,
        "size": h.size,
        # The whole 120-byte union first, then the format's own header on top of it.
        "hdr_raw": bytes(h.hdr.pad).hex(),
    }
    if h.format == uapi.KVM_STATE_NESTED_FORMAT_VMX:
        out["vmx"] = h.hdr.vmx.to_dict(hex_bytes=True)
    elif h.format == uapi.KVM_STATE_NESTED_FORMAT_SVM:
        out["svm"] = h.hdr.svm.to_dict(hex_bytes=True)
    pages = (state.size - HEADER_SIZE) // 4096
    named = {"vmcs12": state.vmcs12, "shadow_vmcs12": state.shadow_vmcs12, "vmcb12": state.vmcb12}
    covered = 0
    for name, view in named.items():
        if view is not None:
            out[name] = view.to_dict(hex_bytes=True)
            covered += 1
    rest = state.to_bytes()[HEADER_SIZE + covered * 4096 :]
    if rest or covered != pages:
        out["data_raw"] = rest.hex()
    return out


_NESTED_KEYS = frozenset(
    {"flags", "format", "size", "hdr_raw", "vmx", "svm", "vmcs12", "shadow_vmcs12", "vmcb12"}
    | {"data_raw"}
)


def _nested_from_dict(d: Any, where: str) -> NestedState:
    """The ``nested`` part; every error names its path from ``where`` ("nested")."""
    if not isinstance(d, Mapping):
        raise TypeError(f"{where}: expected a mapping, not {type(d).__name__}")
    missing = sorted({"flags", "format", "size", "hdr_raw"} - set(d))
    unknown = sorted(set(d) - _NESTED_KEYS, key=repr)
    if missing or unknown:
        raise ValueError(f"{where}: unknown keys {unknown}, missing {missing}")
    header = uapi.kvm_nested_state_header()
    # Checked, never wrapped by ctypes: u16 flags and format, u32 size, no bools.
    header.flags = _check_int(d["flags"], 16, f"{where}.flags")
    header.format = _check_int(d["format"], 16, f"{where}.format")
    header.size = _check_int(d["size"], 32, f"{where}.size")
    # Exactly the 120-byte union: a shorter hdr_raw must never be read past.
    hdr_size = ctypes.sizeof(header.hdr)
    raw = _as_bytes(d["hdr_raw"], hdr_size, f"{where}.hdr_raw")
    ctypes.memmove(ctypes.addressof(header.hdr), raw, hdr_size)
    for vendor in ("vmx", "svm"):
        if vendor in d:
            cls = type(getattr(header.hdr, vendor))
            setattr(header.hdr, vendor, cls.from_dict(d[vendor], path=f"{where}.{vendor}"))
    body = header.to_bytes()
    from kvmstate.vmcb import vmcb
    from kvmstate.vmcs12 import vmcs12

    for name, cls in (("vmcs12", vmcs12), ("shadow_vmcs12", vmcs12), ("vmcb12", vmcb)):
        if name in d:
            body += cls.from_dict(d[name], path=f"{where}.{name}").to_bytes()
    body += _hex(d.get("data_raw", ""), f"{where}.data_raw")
    try:
        return NestedState.from_bytes(body)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def _hex(value: Any, where: str) -> bytes:
    if not isinstance(value, str):
        raise TypeError(f"{where}: expected a hex string, not {type(value).__name__}")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise ValueError(f"{where}: not a hex string") from None


def to_dict(state: VcpuState) -> dict[str, Any]:
    """A JSON-ready dict with every field named; :func:`from_dict` gives the same bytes back.

    ``cpuid`` is the list of entries, or ``{"padding": n, "entries": [...]}``
    when ``kvm_cpuid2.padding`` is not zero; ``msrs`` maps ``"0x174"``-style
    hex indices to values; byte arrays are hex strings.
    """
    parts: dict[str, Any] = {}
    for part, value in state.parts().items():
        if part in _FIXED:
            parts[part] = value.to_dict(hex_bytes=True)
        elif part == "cpuid":
            entries = _cpuid_entries(value)
            # kvm_cpuid2.padding (u32) is kept when set: {"padding": n, "entries": [...]}.
            parts[part] = (
                {"padding": value.padding, "entries": entries} if value.padding else entries
            )
        elif part == "msrs":
            parts[part] = {f"{i:#x}": v for i, v in sorted(value.items())}
        elif part == "xsave":
            parts[part] = value.to_bytes().hex()
        elif part == "tsc_khz":
            parts[part] = value
        elif part == "nested":
            parts[part] = _nested_dict(value)
    return {
        "kvmstate": f"{FORMAT_MAJOR}.{FORMAT_MINOR}",
        "parts": parts,
        "absent": dict(state.absent),
        "extra": {k: v.hex() for k, v in state.extra.items()},
    }


def _cpuid_entries(cpuid: uapi.kvm_cpuid2) -> list[dict[str, Any]]:
    """The entries as JSON-ready dicts: one generated read per entry, straight off the array."""
    entries = cpuid.items()
    fast = codec(uapi.kvm_cpuid_entry2)
    if fast is None:
        return [e.to_dict(hex_bytes=True) for e in entries]
    read, step = fast.hexed, ctypes.sizeof(uapi.kvm_cpuid_entry2)
    # The array holds len(entries) entries of step bytes: every offset is inside it.
    return [read(entries, i * step) for i in range(len(entries))]


def _cpuid_from_dict(value: Any, where: str) -> uapi.kvm_cpuid2:
    """A list of entries, or ``{"padding": n, "entries": [...]}`` for a non-zero padding."""
    padding = 0
    if isinstance(value, Mapping):
        if set(value) != {"padding", "entries"}:
            raise ValueError(
                f"{where}: expected a list of entries, or keys 'padding' and 'entries'"
            )
        padding = _uint(value["padding"], 32, f"{where}.padding: ")
        if not padding:
            raise ValueError(f"{where}.padding: 0 is written as a plain list of entries")
        value = value["entries"]
        where = f"{where}.entries"
    if not isinstance(value, list):
        raise TypeError(f"{where}: expected a list of entries, not {type(value).__name__}")
    cpuid = uapi.kvm_cpuid2.new(len(value))
    cpuid.padding = padding
    entries = cpuid.items()
    fast = codec(uapi.kvm_cpuid_entry2)
    step = ctypes.sizeof(uapi.kvm_cpuid_entry2)
    for i, d in enumerate(value):
        if fast is not None:
            try:
                # Entry i of an array of len(value) entries: the write stays inside it.
                fast.fill(d, entries, i * step)
                continue
            except Slow:
                pass  # the generic walk below names what is off
        filled = uapi.kvm_cpuid_entry2.from_dict(d, path=f"{where}[{i}]")
        ctypes.memmove(ctypes.addressof(entries[i]), filled.to_bytes(), step)
    return cpuid


def _uint(value: Any, bits: int, where: str = "") -> int:
    """An unsigned int of ``bits`` bits, as JSON gives it: no bool, no float, no str."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{where}expected an int, not {type(value).__name__}")
    if not 0 <= value < 1 << bits:
        raise ValueError(f"{where}{value} does not fit in {bits} bits")
    return value


def _msrs_from_dict(value: Any, where: str) -> dict[int, int]:
    """``{"0x174": value}`` exactly as :func:`to_dict` writes it (u32 index, u64 value)."""
    if not isinstance(value, Mapping):
        raise TypeError(
            f"{where}: expected a mapping of hex index to value, not {type(value).__name__}"
        )
    msrs: dict[int, int] = {}
    for key, v in value.items():
        try:
            index = int(key, 16) if isinstance(key, str) and key.startswith("0x") else -1
        except ValueError:
            index = -1
        # The form to_dict writes, and only that: no sign, case, "_" or space variants.
        if not 0 <= index <= 0xFFFF_FFFF or key != f"{index:#x}":
            raise ValueError(f"{where}: {key!r} is not an MSR index like '0x174' (32 bits, hex)")
        msrs[index] = _uint(v, 64, f"{where}.{key}: ")
    return msrs


def _extra_from_dict(value: Any) -> dict[str, bytes]:
    if not isinstance(value, Mapping):
        raise ValueError(f"extra: expected a mapping of tag to hex, not {type(value).__name__}")
    extra: dict[str, bytes] = {}
    for tag, payload in value.items():
        try:
            extra[tag] = _hex(payload, f"extra.{tag}")
        except TypeError as exc:
            raise ValueError(str(exc)) from None
    try:
        return _check_extra(extra)
    except TypeError as exc:
        raise ValueError(str(exc)) from None


def from_dict(data: dict[str, Any]) -> VcpuState:
    """Rebuild a :class:`VcpuState` from :func:`to_dict` output (ValueError/TypeError if off)."""
    try:
        version = str(data["kvmstate"])
        major = int(version.split(".")[0])
        parts = data["parts"]
    except (KeyError, TypeError, ValueError, AttributeError):
        raise ValueError("not a kvmstate dict (needs 'kvmstate' and 'parts')") from None
    if major != FORMAT_MAJOR:
        raise ValueError(f"kvmstate dict format {version} is not readable (reads {FORMAT_MAJOR}.x)")
    if not isinstance(parts, Mapping):
        raise ValueError(f"parts: expected a mapping, not {type(parts).__name__}")
    absent = data.get("absent", {})
    if not isinstance(absent, Mapping):
        raise TypeError(f"absent: expected a mapping, not {type(absent).__name__}")
    try:
        state = VcpuState(absent=_check_absent(absent))
    except TypeError as exc:
        raise ValueError(str(exc)) from None
    state.extra = _extra_from_dict(data.get("extra", {}))
    for part, value in parts.items():
        # Each error names the field's whole path from the part ("sregs.cs.base"), once.
        try:
            if part in _FIXED:
                setattr(state, part, _FIXED[part].from_dict(value, path=part))
            elif part == "cpuid":
                state.cpuid = _cpuid_from_dict(value, part)
            elif part == "msrs":
                state.msrs = _msrs_from_dict(value, part)
            elif part == "xsave":
                _decode_part(state, "xsave", memoryview(_hex(value, part)))
            elif part == "tsc_khz":
                state.tsc_khz = _uint(value, 32, "tsc_khz: ")
            elif part == "nested":
                state.nested = _nested_from_dict(value, part)
            else:
                name = part if isinstance(part, str) else repr(part)
                raise ValueError(f"{name}: unknown part (one of {', '.join(PARTS)})")
        except TypeError as exc:  # the messages name their path already
            raise ValueError(str(exc)) from None
        except (KeyError, AttributeError) as exc:  # never expected: at least name the part
            raise ValueError(f"{part}: {exc!r}") from None
    _check_trailing(state)
    return state
