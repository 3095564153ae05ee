"""kvmstate's own formats for vCPU state: a versioned binary file, and a named dict/JSON form.

(``kvmstate.snapshot``, the name this module had, re-exports it unchanged.)

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
malformed input raises ValueError naming the record. The container (header,
records, tags) is :mod:`kvmstate.records`; one ``vcpu`` record is
:meth:`VcpuState.to_record <kvmstate.state.VcpuState.to_record>`, laid out by
:data:`kvmstate.state.PART_TABLE`.
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping
from typing import Any

from kvmstate import records, uapi
from kvmstate._codec import Slow, codec
from kvmstate._struct import as_bytes, check_uint, to_jsonable
from kvmstate.nested import HEADER_SIZE, NestedState
from kvmstate.records import FORMAT_MAJOR, FORMAT_MINOR, MAGIC
from kvmstate.state import (
    PART_TABLE,
    PARTS,
    VcpuState,
    check_absent,
    check_extra,
    check_trailing,
    decode_part,
)

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


def dumps_vm(states: list[VcpuState]) -> bytes:
    """Encode several vCPUs (a VM) as one file.

    >>> from kvmstate.formats import native
    >>> from kvmstate.state import VcpuState
    >>> data = native.dumps_vm([VcpuState(tsc_khz=1000), VcpuState(tsc_khz=2000)])
    >>> [s.tsc_khz for s in native.loads_vm(data)]
    [1000, 2000]

    :raises TypeError: an element is not a VcpuState, or one of its parts is
        not the structure it should be (part named).
    :raises ValueError: a part's value does not fit the format (part named).
    """
    out: list[Any] = [records.file_header(), records.meta_record()]
    for state in states:
        chunks, size = state.record_chunks()
        out.append(records.record_head("vcpu", size))
        out += chunks
    # One copy of every part, into the file.
    return b"".join(out)


def dumps_vcpu(state: VcpuState) -> bytes:
    """Encode one vCPU as a file (what :meth:`VcpuState.to_bytes` gives).

    >>> from kvmstate.formats import native
    >>> from kvmstate.state import VcpuState
    >>> data = native.dumps_vcpu(VcpuState(tsc_khz=1000))
    >>> data[:8], native.loads_vcpu(data).tsc_khz
    (b'KVMSTATE', 1000)

    :raises TypeError: as :func:`dumps_vm`.
    :raises ValueError: as :func:`dumps_vm`.
    """
    return dumps_vm([state])


def loads_vm(data: bytes | bytearray | memoryview) -> list[VcpuState]:
    """Decode a file written by :func:`dumps_vm` or :func:`dumps_vcpu`.

    >>> from kvmstate.formats import native
    >>> native.loads_vm(b"not a file")
    Traceback (most recent call last):
    ValueError: not a kvmstate file: 10 bytes, the header alone is 12

    :raises ValueError: the data are not a kvmstate file, are truncated, or
        a record is malformed (the byte offset is named).
    :raises TypeError: ``data`` is not bytes-like.
    """
    return [VcpuState.from_record(*payload) for payload in records.vcpu_payloads(data)]


def loads_vcpu(data: bytes | bytearray | memoryview) -> VcpuState:
    """Decode a file holding exactly one vCPU (example at :func:`dumps_vcpu`).

    :raises ValueError: as :func:`loads_vm`, or the file holds no or several vCPUs.
    :raises TypeError: ``data`` is not bytes-like.
    """
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

    >>> import json
    >>> from kvmstate.formats import native
    >>> from kvmstate.state import VcpuState
    >>> d = native.to_dict(VcpuState(tsc_khz=1000, msrs={0x174: 8}))
    >>> d["parts"]["tsc_khz"], d["parts"]["msrs"]
    (1000, {'0x174': 8})
    >>> native.from_dict(json.loads(json.dumps(d))).msrs
    {372: 8}

    :raises TypeError: a part is not the structure it should be (part named).
    :raises ValueError: a part's value does not fit the format (part named).
    """
    parts: dict[str, Any] = {}
    for part, value in state.parts().items():
        if PART_TABLE[part].codec == "fixed":
            # Byte arrays as hex, nothing else to convert: a mirror's fields are ints,
            # lists and dicts of them, and byte arrays.
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


_ENTRY = ctypes.sizeof(uapi.kvm_cpuid_entry2)


def _cpuid_entries(cpuid: uapi.kvm_cpuid2) -> list[dict[str, Any]]:
    """The entries as dicts: one generated reader a entry, at its offset in ``cpuid``."""
    fast = codec(uapi.kvm_cpuid_entry2)
    if fast is None or not isinstance(cpuid, uapi.kvm_cpuid2):
        return [to_jsonable(e.to_dict()) for e in cpuid.items()]
    # The entries follow the 8-byte head; capacity() of them fit in the object.
    head, read = ctypes.sizeof(uapi.kvm_cpuid2), fast.plain
    return [read(cpuid, head + i * _ENTRY) for i in range(cpuid.capacity())]


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
    fast = codec(uapi.kvm_cpuid_entry2)
    head = ctypes.sizeof(uapi.kvm_cpuid2)
    for i, d in enumerate(value):
        if fast is not None:
            try:
                # Straight into the entry's bytes (i < len(value), the entries new() made).
                fast.fill(d, cpuid, head + i * _ENTRY)
                continue
            except Slow:
                pass  # the checked walk below names what is wrong, or takes it
        filled = uapi.kvm_cpuid_entry2.from_dict(d, path=f"{where}[{i}]")
        ctypes.memmove(ctypes.addressof(cpuid) + head + i * _ENTRY, filled.to_bytes(), _ENTRY)
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
        return check_extra(extra)
    except TypeError as exc:
        raise ValueError(str(exc)) from None


def from_dict(data: dict[str, Any]) -> VcpuState:
    """Rebuild a :class:`VcpuState` from :func:`to_dict` output (example there).

    >>> from kvmstate.formats import native
    >>> native.from_dict({"parts": {}})
    Traceback (most recent call last):
    ValueError: not a kvmstate dict (needs 'kvmstate' and 'parts')

    :raises ValueError: the dict is not a kvmstate dict, has a format version
        this one cannot read, or a field is malformed (its path is named).
    :raises TypeError: a field has the wrong type (its path is named).
    """
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
        state = VcpuState(absent=check_absent(absent))
    except TypeError as exc:
        raise ValueError(str(exc)) from None
    state.extra = _extra_from_dict(data.get("extra", {}))
    for part, value in parts.items():
        # Each error names the field's whole path from the part ("sregs.cs.base"), once.
        try:
            if part in PART_TABLE and PART_TABLE[part].codec == "fixed":
                setattr(state, part, PART_TABLE[part].type.from_dict(value, path=part))
            elif part == "cpuid":
                state.cpuid = _cpuid_from_dict(value, part)
            elif part == "msrs":
                state.msrs = _msrs_from_dict(value, part)
            elif part == "xsave":
                state.xsave = decode_part("xsave", memoryview(_hex(value, part)))[0]
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
    check_trailing(state)
    return state
