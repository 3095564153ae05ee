"""Lasting formats for vCPU state: a versioned binary file, and a named dict/JSON form.

Binary format, version 1.1 (all integers little-endian)::

    file    = magic major minor record*
    magic   = "KVMSTATE"                          8 bytes
    major   = u16    1: readers refuse another major version
    minor   = u16    0 for vCPU files, 1 with VM records: additions a 1.x
                     reader may skip
    record  = taglen:u16 tag:taglen bytes length:u64 payload:length bytes

A file holds one ``vcpu`` record per vCPU (one for :func:`dumps_vcpu`,
any number for :func:`dumps_vm`) and an optional ``meta`` record (UTF-8
JSON: writer, format, kernel release). A ``vcpu`` payload is itself a
sequence of records, one per part, each payload the kernel's own bytes:

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

A VM snapshot (:class:`~kvmstate.vmstate.VmState`, version 1.1) adds
top-level records, in this order (a reader takes them in any order):

=========== =====================================================
tag         payload
=========== =====================================================
vm          UTF-8 JSON: ``{"layout": {...}, "absent": {...}}``;
            the layout has ``slots`` (``slot``,
            ``guest_phys_addr``, ``size``), ``vcpu_ids``,
            ``tss_addr``, ``identity_map_addr``, ``irqchip``
            (bool), ``split_irqchip`` (pins), ``pit`` (flags)
clock       ``struct kvm_clock_data``
irqchip     ``struct kvm_irqchip``, one per chip (PIC master,
            PIC slave, IOAPIC; ``chip_id`` inside)
pit2        ``struct kvm_pit_state2``
vcpu        as above, one per vCPU in ``vcpu_ids`` order
memory      ``slot:u32 reserved:u32 guest_phys_addr:u64`` then
            the slot's ``size`` bytes; one per slot, last
=========== =====================================================

A 1.0 reader skips these records and reads the vCPUs (:func:`loads_vm`).
A VM reader refuses a file without ``vm`` (a vCPU file), a memory record
whose slot, address or size differs from the layout, a slot without
one, and a vCPU count other than the layout's, each naming it.
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
from kvmstate._struct import Struct, _as_bytes, _check_int
from kvmstate.nested import HEADER_SIZE, NestedState
from kvmstate.state import PARTS, VcpuState
from kvmstate.vmstate import VmLayout, VmState, new_image

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
#: The minor version a file with VM records (a :class:`~kvmstate.vmstate.VmState`) has.
VM_FORMAT_MINOR = 1
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


def _header(minor: int = FORMAT_MINOR) -> bytes:
    return _HEAD.pack(MAGIC, FORMAT_MAJOR, minor)


def _meta(minor: int = FORMAT_MINOR) -> bytes:
    meta = {
        "writer": "kvmstate",
        "format": f"{FORMAT_MAJOR}.{minor}",
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


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


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
        out["vmx"] = _jsonable(h.hdr.vmx.to_dict())
    elif h.format == uapi.KVM_STATE_NESTED_FORMAT_SVM:
        out["svm"] = _jsonable(h.hdr.svm.to_dict())
    pages = (state.size - HEADER_SIZE) // 4096
    named = {"vmcs12": state.vmcs12, "shadow_vmcs12": state.shadow_vmcs12, "vmcb12": state.vmcb12}
    covered = 0
    for name, view in named.items():
        if view is not None:
            out[name] = _jsonable(view.to_dict())
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
            parts[part] = _jsonable(value.to_dict())
        elif part == "cpuid":
            entries = [_jsonable(e.to_dict()) for e in value.items()]
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


# --- whole VMs (format 1.1: VM records beside the vcpu ones) ------------------------------
#
# A VM snapshot file adds, after ``meta``, one ``vm`` record (UTF-8 JSON: the layout and
# the parts the VM had none of), ``clock`` (kvm_clock_data), one ``irqchip`` per chip
# (kvm_irqchip, its chip_id inside), ``pit2`` (kvm_pit_state2), the ``vcpu`` records
# in layout order, and last one ``memory`` record per slot:
#
#     memory = slot:u32 reserved:u32 guest_phys_addr:u64 bytes:(size of the slot)
#
# A 1.0 reader skips the VM records (unknown top-level records) and sees the vCPUs.

_MEMORY_HEAD = struct.Struct("<IIQ")
_VM_FIXED: dict[str, type[Struct]] = {
    "clock": uapi.kvm_clock_data,
    "irqchip": uapi.kvm_irqchip,
    "pit2": uapi.kvm_pit_state2,
}


def _record_head(tag: str, length: int) -> bytes:
    raw = tag.encode()
    return struct.pack("<H", len(raw)) + raw + struct.pack("<Q", length)


def _vm_records(state: Any) -> list[bytes]:
    """Every record of a VM file but the memory contents, in file order (checked first)."""
    state.check()
    vm = {"layout": state.layout.to_json(), "absent": dict(state.absent)}
    out = [_record("vm", json.dumps(vm, sort_keys=True).encode())]
    if state.clock is not None:
        out.append(_record("clock", state.clock.to_bytes()))
    for _, chip in sorted(state.irqchip.items()):
        out.append(_record("irqchip", chip.to_bytes()))
    if state.pit is not None:
        out.append(_record("pit2", state.pit.to_bytes()))
    out += [_record("vcpu", _encode_vcpu(s)) for s in state.vcpus]
    return out


def _memory_head(slot: Any) -> bytes:
    payload = _MEMORY_HEAD.size + slot.size
    return _record_head("memory", payload) + _MEMORY_HEAD.pack(slot.slot, 0, slot.guest_phys_addr)


def dumps_vm_state(state: Any) -> bytes:
    """Encode a :class:`~kvmstate.vmstate.VmState` as one file (see above; memory last)."""
    chunks = [_header(VM_FORMAT_MINOR), _meta(VM_FORMAT_MINOR), *_vm_records(state)]
    for slot, data in zip(state.layout.slots, state.memory, strict=True):
        chunks += [_memory_head(slot), bytes(memoryview(data).cast("B"))]
    return b"".join(chunks)


def write_vm_state(file: Any, state: Any) -> int:
    """Write a VM snapshot to a binary file; memory goes from its buffers, uncopied."""
    n = 0
    for chunk in [_header(VM_FORMAT_MINOR), _meta(VM_FORMAT_MINOR), *_vm_records(state)]:
        n += file.write(chunk)
    for slot, data in zip(state.layout.slots, state.memory, strict=True):
        n += file.write(_memory_head(slot))
        n += file.write(memoryview(data).cast("B"))
    return n


class _VmReader:
    """Builds a VmState from the records of a VM file, in any order, checking as it goes."""

    def __init__(self) -> None:
        self.vm: dict[str, Any] | None = None
        self.clock: Any = None
        self.pit: Any = None
        self.irqchip: dict[int, Any] = {}
        self.vcpus: list[VcpuState] = []
        self.memory: dict[int, tuple[int, Any]] = {}

    def record(self, tag: str, payload: memoryview, offset: int) -> None:
        where = f"{tag} record at byte {offset}"
        if tag == "vm":
            if self.vm is not None:
                raise ValueError(f"{where}: a second vm record")
            try:
                vm = json.loads(bytes(payload).decode())
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
                raise ValueError(f"{where}: not JSON") from None
            if not isinstance(vm, dict) or "layout" not in vm:
                raise ValueError(f"{where}: expected a JSON object with 'layout'")
            self.vm = vm
        elif tag in _VM_FIXED:
            cls = _VM_FIXED[tag]
            if len(payload) != ctypes.sizeof(cls):
                raise ValueError(
                    f"{where}: {len(payload)} bytes, {cls.__name__} is {ctypes.sizeof(cls)}"
                )
            obj = cls.from_bytes(payload)
            if tag == "irqchip":
                chip_id = int(obj.chip_id)
                if chip_id in self.irqchip or chip_id >= uapi.KVM_NR_IRQCHIPS:
                    raise ValueError(f"{where}: chip {chip_id} twice or unknown")
                self.irqchip[chip_id] = obj
            elif getattr(self, "pit" if tag == "pit2" else tag) is not None:
                raise ValueError(f"{where}: a second {tag} record")
            else:
                setattr(self, "pit" if tag == "pit2" else tag, obj)
        elif tag == "vcpu":
            body = offset + 2 + len(tag) + 8
            self.vcpus.append(_decode_vcpu(payload, f"vcpu {len(self.vcpus)}", body))

    def memory_head(self, head: bytes, length: int, offset: int) -> int:
        """The slot number of a memory record whose first 16 bytes are ``head``."""
        if length < _MEMORY_HEAD.size:
            raise ValueError(f"memory record at byte {offset}: {length} bytes, no slot header")
        slot = _MEMORY_HEAD.unpack(head)[0]
        if slot in self.memory:
            raise ValueError(f"memory record at byte {offset}: slot {slot} twice")
        return int(slot)

    def finish(self) -> Any:
        if self.vm is None:
            raise ValueError(
                "not a VM snapshot: the file has no 'vm' record (a vCPU file? use loads_vm)"
            )
        layout = VmLayout.from_json(self.vm["layout"])
        absent = self.vm.get("absent", {})
        if not isinstance(absent, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in absent.items()
        ):
            raise ValueError("vm.absent: expected a JSON object of strings")
        images = []
        for s in layout.slots:
            got = self.memory.get(s.slot)
            if got is None:
                raise ValueError(f"memory: the file has no contents for {s} (truncated?)")
            gpa, data = got
            if gpa != s.guest_phys_addr or memoryview(data).nbytes != s.size:
                raise ValueError(
                    f"memory: {s}, but the record holds {memoryview(data).nbytes} bytes at {gpa:#x}"
                )
            images.append(data)
        extra = sorted(self.memory.keys() - {s.slot for s in layout.slots})
        if extra:
            raise ValueError(f"memory: records for slots {extra}, which the layout lacks")
        if len(self.vcpus) != len(layout.vcpu_ids):
            raise ValueError(
                f"vcpus: the file holds {len(self.vcpus)} vCPU records, its layout says "
                f"{len(layout.vcpu_ids)} (truncated?)"
            )
        state = VmState(layout, images, self.vcpus, self.clock, self.irqchip, self.pit, absent)
        state.check()
        return state


def _check_head(head: bytes | memoryview, size: int) -> None:
    if size < _HEAD.size:
        raise ValueError(f"not a kvmstate file: {size} bytes, the header alone is 12")
    magic, major, minor = _HEAD.unpack_from(head)
    if magic != MAGIC:
        raise ValueError(f"not a kvmstate file (magic {bytes(magic)!r})")
    if major != FORMAT_MAJOR:
        raise ValueError(
            f"kvmstate file format {major}.{minor} is not readable by this kvmstate "
            f"(it reads {FORMAT_MAJOR}.x)"
        )


def loads_vm_state(data: bytes | bytearray | memoryview) -> Any:
    """Decode :func:`dumps_vm_state` output; the memory images are views of ``data``."""
    try:
        view = memoryview(data).cast("B")
    except TypeError:
        raise TypeError(f"expected bytes-like data, not {type(data).__name__}") from None
    _check_head(view, len(view))
    reader = _VmReader()
    for tag, payload, offset in _records(view[_HEAD.size :], "file", _HEAD.size):
        if tag == "memory":
            slot = reader.memory_head(bytes(payload[: _MEMORY_HEAD.size]), len(payload), offset)
            gpa = _MEMORY_HEAD.unpack_from(payload)[2]
            reader.memory[slot] = (gpa, payload[_MEMORY_HEAD.size :])
        else:
            reader.record(tag, payload, offset)
    return reader.finish()


def _read(file: Any, n: int, what: str, offset: int) -> bytes:
    data = file.read(n)
    if len(data) != n:
        raise ValueError(f"file: truncated {what} at byte {offset}")
    return bytes(data)


def read_vm_state(file: Any) -> Any:
    """Read a VM snapshot from a seekable binary file; memory with ``readinto`` (one copy).

    Every record length is checked against the bytes the file has left
    before anything is read or allocated: a truncated file is a ValueError
    naming the record, never a short image.
    """
    start = file.tell()
    size = file.seek(0, os.SEEK_END) - start
    file.seek(start)
    head = file.read(_HEAD.size)
    _check_head(head, size if len(head) == _HEAD.size else len(head))
    reader = _VmReader()
    pos = _HEAD.size
    while pos < size:
        offset = pos
        (taglen,) = struct.unpack("<H", _read(file, 2, "record header", offset))
        if size - pos - 2 < taglen + 8:
            raise ValueError(f"file: truncated record header at byte {offset}")
        tag = _read(file, taglen, "record header", offset)
        if not _TAG_RE.match(tag):
            raise ValueError(f"file: invalid record tag {tag[:64]!r} at byte {offset}")
        (length,) = struct.unpack("<Q", _read(file, 8, "record header", offset))
        pos += 2 + taglen + 8
        if length > size - pos:
            raise ValueError(
                f"file: record {tag.decode()!r} at byte {offset} says {length} bytes, "
                f"only {size - pos} remain"
            )
        name = tag.decode()
        if name == "memory":
            head16 = _read(file, min(length, _MEMORY_HEAD.size), "memory record", offset)
            slot = reader.memory_head(head16, length, offset)
            gpa = _MEMORY_HEAD.unpack(head16)[2]
            image = new_image(length - _MEMORY_HEAD.size) if length > _MEMORY_HEAD.size else b""
            view = memoryview(image)
            got = 0
            while got < len(image):  # readinto may return less than asked (pipes, signals)
                n = file.readinto(view[got:])
                if not n:
                    raise ValueError(f"file: truncated memory record at byte {offset}")
                got += n
            reader.memory[slot] = (gpa, image)
        elif name in ("vm", "clock", "irqchip", "pit2", "vcpu"):
            payload = _read(file, length, f"{name} record", offset)
            reader.record(name, memoryview(payload), offset)
        else:
            file.seek(length, os.SEEK_CUR)  # a record a newer minor version added
        pos += length
    return reader.finish()


__all__ += [
    "VM_FORMAT_MINOR",
    "dumps_vm_state",
    "loads_vm_state",
    "read_vm_state",
    "write_vm_state",
]
