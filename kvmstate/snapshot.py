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
import json
import os
import re
import struct
from collections.abc import Iterator, Mapping
from typing import Any

from kvmstate import uapi
from kvmstate._struct import Struct, as_bytes, check_uint, to_jsonable
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
        start = base + pos
        if end - pos < 2:
            raise ValueError(f"{where}: truncated record header at byte {start}")
        (taglen,) = struct.unpack_from("<H", data, pos)
        pos += 2
        if end - pos < taglen + 8:
            raise ValueError(f"{where}: truncated record header at byte {start}")
        tag = bytes(data[pos : pos + taglen])
        if not _TAG_RE.match(tag):
            raise ValueError(f"{where}: invalid record tag {tag[:64]!r} at byte {start}")
        pos += taglen
        (length,) = struct.unpack_from("<Q", data, pos)
        pos += 8
        if length > end - pos:
            raise ValueError(
                f"{where}: record {tag.decode()!r} at byte {start} says {length} bytes, "
                f"only {end - pos} remain"
            )
        yield tag.decode(), data[pos : pos + length], start
        pos += length


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


def _encode_vcpu(state: VcpuState) -> bytes:
    _check_absent(state.absent)
    _check_extra(state.extra)
    _check_trailing(state)
    out = []
    for part in PARTS:
        if getattr(state, part) is not None:
            payload = state.part_bytes(part) + state.extra.get(part + _TRAILING, b"")
            out.append(_record(part, payload))
    if state.absent:
        out.append(_record("absent", json.dumps(state.absent, sort_keys=True).encode()))
    for tag, payload in state.extra.items():
        if not tag.endswith(_TRAILING):
            out.append(_record(tag, payload))
    return b"".join(out)


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
    obj = cls.new(count)
    ctypes.memmove(ctypes.addressof(obj), bytes(payload), len(payload))
    return obj


def _decode_part(state: VcpuState, part: str, payload: memoryview) -> None:
    if part in _FIXED:
        cls = _FIXED[part]
        size = ctypes.sizeof(cls)
        if len(payload) < size:
            raise ValueError(f"{part}: {len(payload)} bytes, {cls.__name__} is {size}")
        setattr(state, part, cls.from_bytes(payload[:size]))
        if len(payload) > size:
            state.extra[part + _TRAILING] = bytes(payload[size:])
    elif part == "xsave":
        n = len(payload)
        if n < 4096 or n % 4 or n > 1 << 20:
            raise ValueError(f"xsave: {n} bytes is not an XSAVE area (>= 4096, 4-aligned)")
        xsave = uapi.kvm_xsave.sized(n)
        ctypes.memmove(ctypes.addressof(xsave), bytes(payload), n)
        state.xsave = xsave
    elif part == "cpuid":
        state.cpuid = _flex(uapi.kvm_cpuid2, payload, part)
    elif part == "msrs":
        msrs = _flex(uapi.kvm_msrs, payload, part)
        values = {int(e.index): int(e.data) for e in msrs.items()}
        if len(values) != len(msrs):
            raise ValueError("msrs: an MSR index appears twice")
        state.msrs = values
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
        try:
            absent = json.loads(bytes(payload).decode())
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise ValueError("absent: not a JSON object") from None
        if not isinstance(absent, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in absent.items()
        ):
            raise ValueError("absent: not a JSON object of strings")
        state.absent = absent
    else:
        state.extra[part] = bytes(payload)


def _decode_vcpu(payload: memoryview, where: str, base: int) -> VcpuState:
    state = VcpuState()
    seen: set[str] = set()
    for tag, body, offset in _records(payload, where, base):
        if tag in seen:
            raise ValueError(f"{where}: record {tag!r} at byte {offset} appears twice")
        seen.add(tag)
        try:
            _decode_part(state, tag, body)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc} (the record at byte {offset})") from None
    return state


def _header() -> bytes:
    return _HEAD.pack(MAGIC, FORMAT_MAJOR, FORMAT_MINOR)


def _meta() -> bytes:
    meta = {
        "writer": "kvmstate",
        "format": f"{FORMAT_MAJOR}.{FORMAT_MINOR}",
        "kernel": os.uname().release,
    }
    return _record("meta", json.dumps(meta, sort_keys=True).encode())


def dumps_vm(states: list[VcpuState]) -> bytes:
    """Encode several vCPUs (a VM) as one file."""
    return _header() + _meta() + b"".join(_record("vcpu", _encode_vcpu(s)) for s in states)


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
        out["vmx"] = to_jsonable(h.hdr.vmx.to_dict())
    elif h.format == uapi.KVM_STATE_NESTED_FORMAT_SVM:
        out["svm"] = to_jsonable(h.hdr.svm.to_dict())
    pages = (state.size - HEADER_SIZE) // 4096
    named = {"vmcs12": state.vmcs12, "shadow_vmcs12": state.shadow_vmcs12, "vmcb12": state.vmcb12}
    covered = 0
    for name, view in named.items():
        if view is not None:
            out[name] = to_jsonable(view.to_dict())
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
    header.flags = check_uint(d["flags"], 16, f"{where}.flags")
    header.format = check_uint(d["format"], 16, f"{where}.format")
    header.size = check_uint(d["size"], 32, f"{where}.size")
    # Exactly the 120-byte union: a shorter hdr_raw must never be read past.
    hdr_size = ctypes.sizeof(header.hdr)
    raw = as_bytes(d["hdr_raw"], hdr_size, f"{where}.hdr_raw")
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
            parts[part] = to_jsonable(value.to_dict())
        elif part == "cpuid":
            entries = [to_jsonable(e.to_dict()) for e in value.items()]
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
    for i, (entry, d) in enumerate(zip(cpuid.items(), value, strict=True)):
        filled = uapi.kvm_cpuid_entry2.from_dict(d, path=f"{where}[{i}]")
        ctypes.memmove(ctypes.addressof(entry), filled.to_bytes(), ctypes.sizeof(entry))
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
