"""Cloud Hypervisor snapshots: the vCPU states of ``state.json``, read and written back.

A Cloud Hypervisor snapshot directory holds ``config.json``, ``state.json``
and ``memory-ranges``. ``state.json`` is a tree of ``Snapshot`` objects,
``{"snapshots": {id: Snapshot, ...}, "snapshot_data": null | {"state": TEXT}}``,
where each ``state`` is a JSON document *inside a JSON string* (double
encoded). The ``cpu-manager`` child has one child per vCPU, keyed by the
vCPU id as a string; each vCPU's state is ``{"Kvm": VcpuKvmState}`` with,
in this order (Cloud Hypervisor v49 and later; ``hypervisor/src/kvm/x86_64``):

================  ==========================================  =================
field             shape in the file                           VcpuState part
================  ==========================================  =================
``cpuid``         ``[{function, index, flags, eax..edx}]``    ``cpuid``
``msrs``          ``[{index, data}]``                         ``msrs``
``vcpu_events``   64 integers 0..255: ``kvm_vcpu_events``     ``events``
``regs``          144 integers: ``kvm_regs``                  ``regs``
``sregs``         312 integers: ``kvm_sregs``                 ``sregs``
``fpu``           ``{fpr, fcw, fsw, ftwx, last_opcode,        ``fpu``
                  last_ip, last_dp, xmm, mxcsr}``
``lapic_state``   ``{regs: 1024 signed bytes -128..127}``     ``lapic``
``xsave``         ``{region: 1024 u32, extra: [u32]}``        ``xsave``
``xcrs``          392 integers: ``kvm_xcrs``                  ``xcrs``
``mp_state``      4 integers: ``kvm_mp_state``                ``mp_state``
``tsc_khz``       a number, or null                           ``tsc_khz``
``nested_state``  null, or 8320 integers (v49+)               ``nested``
``hyperv_synic``  true/false (v50+)                           (kept, unmapped)
================  ==========================================  =================

The kernel structures are written by kvm-bindings' serde support (0.8 and
later: Cloud Hypervisor v39 and later) as their raw little-endian bytes,
which serde_json turns into arrays of integers. ``extra`` (the
``KVM_GET_XSAVE2`` words past 4096 bytes) appears only when non-empty (v50+).

What Cloud Hypervisor does not keep, so a file cannot give it back:

* ``cpuid`` flags other than ``KVM_CPUID_FLAG_SIGNIFCANT_INDEX`` and the
  entries' padding; MSR and ``kvm_fpu`` padding; ``fpu.mxcsr``, which
  ``KVM_GET_FPU`` never fills (it is 0 in every file);
* ``debugregs`` and ``sregs2`` (no PDPTRs): read states list them in
  :attr:`~kvmstate.state.VcpuState.absent`;
* a header-only (128-byte) nested state: kvm-ioctls' ``nested_state()``
  answers ``None`` when the kernel's ``size`` is 128 or less, and Cloud
  Hypervisor stores ``null``, so on restore it never calls
  ``KVM_SET_NESTED_STATE``. A ``null`` is read as an absent ``nested`` part
  whose reason says so.

Writing: :func:`write_vcpu` makes a vCPU's ``{"Kvm": ...}`` object in
Cloud Hypervisor's field order; :func:`with_vcpu` puts a
:class:`~kvmstate.state.VcpuState` into an existing ``state.json`` and
changes nothing else: every field whose meaning is unchanged keeps its
original text, so a file read and written back unmodified is identical byte
for byte. A header-only nested state is written as ``null`` (what Cloud
Hypervisor itself writes) when that loses nothing, that is when the header
is what a fresh vCPU reports (VMX: no VMXON; SVM: GIF set); otherwise the
writers refuse, naming the state, unless told ``header_only="keep"`` (write
the 8320-byte buffer, which Cloud Hypervisor restores with
``KVM_SET_NESTED_STATE``) or ``header_only="drop"`` (write ``null`` anyway).
Cloud Hypervisor restores ``fpu`` after ``xsave``, so a state without an
``fpu`` part gets one derived from the XSAVE area's legacy region exactly as
``KVM_GET_FPU`` builds it.

Before v39 ``snapshot_data`` was an array of bytes holding another encoding
(versionize); such files are refused, saying so.

>>> import kvmstate.formats.cloud_hypervisor as ch
>>> ch.is_snapshot(b'{"snapshots":{"cpu-manager":{}}}')
True
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import struct
from collections.abc import Callable
from typing import Any

from kvmstate import uapi
from kvmstate.formats._fields import keyed
from kvmstate.nested import HEADER_SIZE, VMX_MAX_SIZE, NestedState
from kvmstate.state import VcpuState
from kvmstate.uapi import NestedFlag, NestedFormat

__all__ = [
    "FIELDS",
    "MAX_FILE_SIZE",
    "NESTED_BUFFER_SIZE",
    "STATE_FILE",
    "Snapshot",
    "VcpuEntry",
    "fpu_from_xsave",
    "is_snapshot",
    "load",
    "read_state_json",
    "with_vcpu",
    "write_vcpu",
]

STATE_FILE = "state.json"
#: ``size_of::<KvmNestedStateBuffer>()``: header, vmcs12 and shadow vmcs12 (the VMX maximum).
NESTED_BUFFER_SIZE = VMX_MAX_SIZE  # 8320
#: The largest ``state.json`` read (a vCPU takes about 60 KB; this is thousands of them).
MAX_FILE_SIZE = 1 << 28
#: ``VcpuKvmState``'s fields, in the order Cloud Hypervisor writes them.
FIELDS = (
    "cpuid",
    "msrs",
    "vcpu_events",
    "regs",
    "sregs",
    "fpu",
    "lapic_state",
    "xsave",
    "xcrs",
    "mp_state",
    "tsc_khz",
    "nested_state",
    "hyperv_synic",
)
_CPU_MANAGER = "cpu-manager"
_VALID_INDEX = 1  # Cloud Hypervisor's CPUID_FLAG_VALID_INDEX
_FPU_FIELDS = ("fpr", "fcw", "fsw", "ftwx", "last_opcode", "last_ip", "last_dp", "xmm", "mxcsr")
_U64 = (1 << 64) - 1
_LAPIC_SIZE = ctypes.sizeof(uapi.kvm_lapic_state)  # the 1 KiB APIC register page
_HEADER_ONLY_CHOICES = (None, "keep", "drop")
_SNIFF = 4096  # bytes is_snapshot() looks at


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)
_WS = frozenset(" \t\n\r")


def _json(value: Any) -> str:
    """serde_json's compact text for a value made of dicts, lists, ints, bools, None."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


# --- JSON with spans: the writers replace only what changed ----------------------------


@dataclasses.dataclass
class _Member:
    start: int  #: where the value's text starts
    end: int  #: one past its end
    value: Any


def _skip(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _WS:
        pos += 1
    return pos


def _value(text: str, pos: int, where: str) -> tuple[Any, int]:
    try:
        value, end = _DECODER.raw_decode(text, pos)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: {exc.msg} at offset {exc.pos}") from None
    except RecursionError:
        raise ValueError(f"{where}: nested too deeply at offset {pos}") from None
    except ValueError as exc:  # NaN / Infinity, integers too long to read
        raise ValueError(f"{where}: {exc} (at offset {pos})") from None
    return value, end


def _members(text: str, pos: int, where: str) -> tuple[dict[str, _Member], int]:
    """The members of the object starting at ``pos`` (after blanks), with their spans."""
    pos = _skip(text, pos)
    if pos >= len(text) or text[pos] != "{":
        found = "the end" if pos >= len(text) else repr(text[pos])
        raise ValueError(f"{where}: expected an object at offset {pos}, found {found}")
    members: dict[str, _Member] = {}
    pos = _skip(text, pos + 1)
    if pos < len(text) and text[pos] == "}":
        return members, pos + 1
    while True:
        if pos >= len(text) or text[pos] != '"':
            raise ValueError(f"{where}: expected a key at offset {pos}")
        key, pos = _value(text, pos, where)
        pos = _skip(text, pos)
        if pos >= len(text) or text[pos] != ":":
            raise ValueError(f"{where}: expected ':' after {key!r} at offset {pos}")
        start = _skip(text, pos + 1)
        value, pos = _value(text, start, f"{where}.{key}")
        if key in members:
            raise ValueError(f"{where}: the key {key!r} appears twice")
        members[key] = _Member(start, pos, value)
        pos = _skip(text, pos)
        if pos < len(text) and text[pos] == ",":
            pos = _skip(text, pos + 1)
            continue
        if pos < len(text) and text[pos] == "}":
            return members, pos + 1
        raise ValueError(f"{where}: expected ',' or '}}' at offset {pos}")


def _splice(text: str, edits: list[tuple[int, int, str]]) -> str:
    out, last = [], 0
    for start, end, new in sorted(edits):
        out.append(text[last:start])
        out.append(new)
        last = end
    out.append(text[last:])
    return "".join(out)


# --- field shapes -----------------------------------------------------------------------


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int) and not -(1 << 64) <= value < 1 << 64:
        return "a number beyond 64 bits"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return f"an array of {len(value)}"
    return "an object"


def _uint(value: Any, bits: int, where: str) -> int:
    if type(value) is not int or not 0 <= value < 1 << bits:
        raise ValueError(f"{where}: expected an unsigned {bits}-bit integer, found {_kind(value)}")
    return value


def _ints(value: Any, count: int | None, lo: int, hi: int, where: str) -> list[int]:
    if not isinstance(value, list):
        raise ValueError(f"{where}: expected an array, found {_kind(value)}")
    if count is not None and len(value) != count:
        raise ValueError(f"{where}: {len(value)} items, expected {count}")
    for i, item in enumerate(value):
        if type(item) is not int or not lo <= item <= hi:
            raise ValueError(f"{where}[{i}]: {_kind(item)} is not in {lo}..{hi}")
    return value


def _raw(value: Any, kind: type[Any], where: str) -> Any:
    """A kernel structure from kvm-bindings' serde form: its bytes as integers 0..255."""
    return kind.from_bytes(bytes(_ints(value, ctypes.sizeof(kind), 0, 255, where)))


def _object(value: Any, keys: tuple[str, ...], where: str) -> dict[str, Any]:
    return keyed(value, keys, where, "an object", _kind)


def _read_cpuid(value: Any, where: str) -> uapi.kvm_cpuid2:
    if not isinstance(value, list):
        raise ValueError(f"{where}: expected an array, found {_kind(value)}")
    cpuid = uapi.kvm_cpuid2.new(len(value))
    regs = ("function", "index", "flags", "eax", "ebx", "ecx", "edx")
    for i, (entry, item) in enumerate(zip(cpuid.items(), value, strict=True)):
        obj = _object(item, regs, f"{where}[{i}]")
        for name in regs:
            setattr(entry, name, _uint(obj[name], 32, f"{where}[{i}].{name}"))
        # Cloud Hypervisor's VALID_INDEX is the kernel's SIGNIFCANT_INDEX; it keeps no other.
        entry.flags = uapi.CpuidFlag.SIGNIFCANT_INDEX if entry.flags & _VALID_INDEX else 0
    return cpuid


def _write_cpuid(cpuid: uapi.kvm_cpuid2) -> list[dict[str, int]]:
    out = []
    for entry in list(cpuid.items())[: len(cpuid)]:
        flags = _VALID_INDEX if entry.flags & uapi.CpuidFlag.SIGNIFCANT_INDEX else 0
        out.append(
            {
                "function": entry.function,
                "index": entry.index,
                "flags": flags,
                "eax": entry.eax,
                "ebx": entry.ebx,
                "ecx": entry.ecx,
                "edx": entry.edx,
            }
        )
    return out


def _read_msrs(value: Any, where: str) -> dict[int, int]:
    if not isinstance(value, list):
        raise ValueError(f"{where}: expected an array, found {_kind(value)}")
    msrs: dict[int, int] = {}
    for i, item in enumerate(value):
        obj = _object(item, ("index", "data"), f"{where}[{i}]")
        index = _uint(obj["index"], 32, f"{where}[{i}].index")
        # Cloud Hypervisor sets them in order: a repeated index ends with its last value.
        msrs.pop(index, None)
        msrs[index] = _uint(obj["data"], 64, f"{where}[{i}].data")
    return msrs


def _write_msrs(msrs: dict[int, int], order: list[int] | None = None) -> list[dict[str, int]]:
    """In the dict's order (the kernel's MSR list, as Cloud Hypervisor saves), or in ``order``
    (a file's) with the MSRs it lacks after them."""
    if order is None:
        indices = list(msrs)
    else:
        indices = [i for i in dict.fromkeys(order) if i in msrs]
        indices += sorted(set(msrs) - set(indices))
    out = []
    for index in indices:
        _uint(index, 32, f"msrs: MSR {index!r}")
        _uint(msrs[index], 64, f"msrs: MSR {index:#x} value")
        out.append({"index": index, "data": msrs[index]})
    return out


def _read_fpu(value: Any, where: str) -> uapi.kvm_fpu:
    obj = _object(value, _FPU_FIELDS, where)
    fpu = uapi.kvm_fpu()
    for name, count in (("fpr", 8), ("xmm", 16)):
        rows = obj[name]
        if not isinstance(rows, list) or len(rows) != count:
            raise ValueError(f"{where}.{name}: expected {count} arrays of 16 bytes")
        raw = b"".join(
            bytes(_ints(r, 16, 0, 255, f"{where}.{name}[{i}]")) for i, r in enumerate(rows)
        )
        ctypes.memmove(ctypes.addressof(getattr(fpu, name)), raw, len(raw))
    for name, bits in (
        ("fcw", 16),
        ("fsw", 16),
        ("ftwx", 8),
        ("last_opcode", 16),
        ("last_ip", 64),
        ("last_dp", 64),
        ("mxcsr", 32),
    ):
        setattr(fpu, name, _uint(obj[name], bits, f"{where}.{name}"))
    return fpu


def _write_fpu(fpu: uapi.kvm_fpu) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in _FPU_FIELDS:
        if name in ("fpr", "xmm"):
            out[name] = [list(bytes(row)) for row in getattr(fpu, name)]
        else:
            out[name] = int(getattr(fpu, name))
    return out


def fpu_from_xsave(xsave: uapi.kvm_xsave) -> uapi.kvm_fpu:
    """The ``kvm_fpu`` that ``KVM_GET_FPU`` reports for this XSAVE area.

    KVM fills it from the area's legacy (FXSAVE) region: x87 registers,
    control/status/tag words, last opcode and pointers, XMM registers; it
    never fills ``mxcsr`` (left 0).

    >>> area = uapi.kvm_xsave()
    >>> area.region[0] = 0x37F                  # FCW
    >>> hex(fpu_from_xsave(area).fcw)
    '0x37f'
    """
    if not isinstance(xsave, uapi.kvm_xsave):
        raise TypeError(f"expected a kvm_xsave, not {type(xsave).__name__}")
    legacy = bytes(xsave.to_bytes()[:416])
    fpu = uapi.kvm_fpu()
    fpu.fcw, fpu.fsw = struct.unpack_from("<HH", legacy, 0)
    fpu.ftwx = legacy[4]
    (fpu.last_opcode,) = struct.unpack_from("<H", legacy, 6)
    fpu.last_ip, fpu.last_dp = struct.unpack_from("<QQ", legacy, 8)
    ctypes.memmove(ctypes.addressof(fpu.fpr), legacy[32:160], 128)  # st_space
    ctypes.memmove(ctypes.addressof(fpu.xmm), legacy[160:416], 256)  # xmm_space
    return fpu


def _read_lapic(value: Any, where: str) -> uapi.kvm_lapic_state:
    obj = _object(value, ("regs",), where)
    regs = _ints(obj["regs"], _LAPIC_SIZE, -128, 127, f"{where}.regs")
    return uapi.kvm_lapic_state.from_bytes(bytes(b & 0xFF for b in regs))


def _write_lapic(lapic: uapi.kvm_lapic_state) -> dict[str, Any]:
    # Cloud Hypervisor's LapicState keeps the page as C chars, signed on x86.
    return {"regs": [b - 256 if b > 127 else b for b in bytes(lapic.to_bytes())]}


def _read_xsave(value: Any, where: str) -> uapi.kvm_xsave:
    if not isinstance(value, dict) or "region" not in value:
        raise ValueError(f"{where}: expected an object with a region, found {_kind(value)}")
    region = _ints(value["region"], 1024, 0, 0xFFFF_FFFF, f"{where}.region")
    extra = _ints(value.get("extra", []), None, 0, 0xFFFF_FFFF, f"{where}.extra")
    words = region + extra
    if len(words) * 4 > 1 << 20:
        raise ValueError(f"{where}: {len(words) * 4} bytes is beyond any XSAVE area")
    xsave = uapi.kvm_xsave.sized(len(words) * 4)
    ctypes.memmove(ctypes.addressof(xsave), struct.pack(f"<{len(words)}I", *words), len(words) * 4)
    return xsave


def _write_xsave(xsave: uapi.kvm_xsave) -> dict[str, Any]:
    raw = bytes(xsave.to_bytes())
    if len(raw) < 4096 or len(raw) % 4:
        raise ValueError(f"xsave: {len(raw)} bytes is not an XSAVE area (>= 4096, 4-aligned)")
    words = list(struct.unpack(f"<{len(raw) // 4}I", raw))
    out: dict[str, Any] = {"region": words[:1024]}
    if len(words) > 1024:
        out["extra"] = words[1024:]
    return out


def _read_nested(value: Any, where: str) -> NestedState | None:
    if value is None:
        return None
    raw = bytes(_ints(value, NESTED_BUFFER_SIZE, 0, 255, where))
    header = uapi.kvm_nested_state_header.from_buffer_copy(raw[:HEADER_SIZE])
    if header.format not in (NestedFormat.VMX, NestedFormat.SVM):
        raise ValueError(f"{where}: unknown nested state format {header.format}")
    if header.size > NESTED_BUFFER_SIZE:
        raise ValueError(
            f"{where}: the size field says {header.size} bytes, the buffer holds "
            f"{NESTED_BUFFER_SIZE}"
        )
    state = NestedState(NESTED_BUFFER_SIZE)
    state.buffer[:] = raw
    return state


def _fresh_header(state: NestedState) -> bool:
    """True when a header-only state says no more than a fresh vCPU's (dropping loses nothing)."""
    if state.format == NestedFormat.SVM:
        return int(state.flags) == NestedFlag.GIF_SET
    return (
        int(state.flags) == 0
        and state.vmx.vmxon_pa == _U64
        and state.vmx.vmcs12_pa == _U64
        and state.vmx.smm.flags == 0
        and state.vmx.flags == 0
    )


def _write_nested(state: NestedState | None, header_only: str | None) -> list[int] | None:
    if state is None:
        return None
    size = state.size
    if not HEADER_SIZE <= size <= min(state.capacity, NESTED_BUFFER_SIZE):
        raise ValueError(
            f"nested: the size field ({size}) must be between {HEADER_SIZE} and "
            f"{min(state.capacity, NESTED_BUFFER_SIZE)} (Cloud Hypervisor's buffer is "
            f"{NESTED_BUFFER_SIZE} bytes)"
        )
    if size == HEADER_SIZE:
        if header_only == "drop" or (header_only is None and _fresh_header(state)):
            return None  # what Cloud Hypervisor writes for a header-only state
        if header_only is None:
            raise ValueError(
                f"nested: a header-only state ({state!r}) that Cloud Hypervisor would drop "
                "(it stores null for 128 bytes or less), losing what it says; pass "
                "header_only='keep' to write the buffer (Cloud Hypervisor restores it) or "
                "header_only='drop' to write null as Cloud Hypervisor does"
            )
    # The whole KvmNestedStateBuffer: bytes past `size` are what the buffer holds (zero
    # from the kernel), padded with zeros to the 8320 bytes serde writes.
    raw = bytes(state.buffer[: min(state.capacity, NESTED_BUFFER_SIZE)])
    return list(raw.ljust(NESTED_BUFFER_SIZE, b"\0"))


_Reader = Callable[[Any, str], Any]
# The fields that are a kernel structure's raw bytes: field -> (VcpuState part, structure).
_RAW_PARTS: dict[str, tuple[str, type[Any]]] = {
    "vcpu_events": ("events", uapi.kvm_vcpu_events),
    "regs": ("regs", uapi.kvm_regs),
    "sregs": ("sregs", uapi.kvm_sregs),
    "xcrs": ("xcrs", uapi.kvm_xcrs),
    "mp_state": ("mp_state", uapi.kvm_mp_state),
}


def _read_field(name: str, value: Any, where: str) -> Any:
    if name in _RAW_PARTS:
        return _raw(value, _RAW_PARTS[name][1], where)
    if name == "tsc_khz":
        return None if value is None else _uint(value, 32, where)
    readers: dict[str, _Reader] = {
        "cpuid": _read_cpuid,
        "msrs": _read_msrs,
        "fpu": _read_fpu,
        "lapic_state": _read_lapic,
        "xsave": _read_xsave,
        "nested_state": _read_nested,
    }
    return readers[name](value, where)


_PART_OF = {
    "cpuid": "cpuid",
    "msrs": "msrs",
    "fpu": "fpu",
    "lapic_state": "lapic",
    "xsave": "xsave",
    "tsc_khz": "tsc_khz",
    "nested_state": "nested",
    **{field: part for field, (part, _) in _RAW_PARTS.items()},
}
_REQUIRED = ("cpuid", "msrs", "vcpu_events", "regs", "sregs", "lapic_state", "mp_state")


def _part(state: VcpuState, name: str) -> Any:
    value = getattr(state, _PART_OF[name])
    if value is None and name in _REQUIRED:
        why = state.absent.get(_PART_OF[name], "not in this state")
        raise ValueError(
            f"{_PART_OF[name]} is absent ({why}); Cloud Hypervisor's VcpuKvmState needs {name}"
        )
    return value


def _write_field(
    name: str, state: VcpuState, header_only: str | None, msr_order: list[int] | None = None
) -> Any:
    """The JSON value of one VcpuKvmState field for ``state``."""
    value = _part(state, name)
    if name == "xcrs" and value is None:
        # Cloud Hypervisor writes a zeroed kvm_xcrs where KVM has no XCRS.
        return list(bytes(ctypes.sizeof(uapi.kvm_xcrs)))
    if name in _RAW_PARTS:
        kind = _RAW_PARTS[name][1]
        if not isinstance(value, kind):
            raise TypeError(
                f"{_PART_OF[name]}: expected {kind.__name__}, not {type(value).__name__}"
            )
        return list(bytes(value.to_bytes()))
    if name == "cpuid":
        return _write_cpuid(value)
    if name == "msrs":
        return _write_msrs(value, msr_order)
    if name == "fpu":
        if value is None:
            if state.xsave is None:
                raise ValueError("fpu and xsave are both absent; Cloud Hypervisor needs both")
            value = fpu_from_xsave(state.xsave)
        return _write_fpu(value)
    if name == "lapic_state":
        return _write_lapic(value)
    if name == "xsave":
        if value is None:
            raise ValueError(
                "xsave is absent; Cloud Hypervisor's VcpuKvmState needs one "
                "(it saves KVM_GET_XSAVE or KVM_GET_XSAVE2)"
            )
        return _write_xsave(value)
    if name == "tsc_khz":
        if value is not None:
            _uint(value, 32, "tsc_khz")
        return value
    if name == "nested_state":
        return _write_nested(value, header_only)
    raise KeyError(name)


def _check(state: VcpuState, header_only: str | None) -> None:
    """Refuse, all at once, the parts Cloud Hypervisor needs that ``state`` lacks."""
    if header_only not in _HEADER_ONLY_CHOICES:
        raise ValueError(f"header_only must be None, 'keep' or 'drop', not {header_only!r}")
    needed = [_PART_OF[name] for name in _REQUIRED] + ["xsave"]
    missing = [p for p in needed if getattr(state, p) is None]
    if missing:
        why = "; ".join(f"{p}: {state.absent.get(p, 'not in this state')}" for p in missing)
        raise ValueError(
            f"Cloud Hypervisor's VcpuKvmState needs {', '.join(missing)}, absent here ({why})"
        )


def write_vcpu(
    state: VcpuState, *, header_only: str | None = None, hyperv_synic: bool = False
) -> dict[str, Any]:
    """One vCPU's state as Cloud Hypervisor's ``{"Kvm": VcpuKvmState}`` object.

    Fields come in Cloud Hypervisor's order; ``json.dumps(obj,
    separators=(",", ":"))`` gives its text. ValueError names a part Cloud
    Hypervisor needs that ``state`` lacks (regs, sregs, events, lapic,
    mp_state, cpuid, msrs, xsave). ``header_only`` says what to do with a
    header-only nested state (see the module docstring); ``hyperv_synic``
    is Cloud Hypervisor's own flag (whether it emulates the Hyper-V SynIC).

    >>> import kvmstate
    >>> state = kvmstate.Kvm().create_vm().create_vcpu(0).save_state()  # doctest: +SKIP
    >>> list(write_vcpu(state)["Kvm"])[:3]                              # doctest: +SKIP
    ['cpuid', 'msrs', 'vcpu_events']
    """
    if not isinstance(state, VcpuState):
        raise TypeError(f"write_vcpu() needs a VcpuState, not {type(state).__name__}")
    _check(state, header_only)
    body: dict[str, Any] = {}
    for name in FIELDS[:-1]:
        body[name] = _write_field(name, state, header_only)
    body["hyperv_synic"] = bool(hyperv_synic)
    return {"Kvm": body}


# --- the snapshot tree ------------------------------------------------------------------


@dataclasses.dataclass
class VcpuEntry:
    """One vCPU of a ``state.json``: its state, what the file implies, what has no part.

    ``notes`` say what the file's shape means (a ``null`` nested state, a
    field an older Cloud Hypervisor did not write); ``unmapped`` holds the
    fields with no :class:`~kvmstate.state.VcpuState` part (``hyperv_synic``,
    and any a newer Cloud Hypervisor added), which the writers keep as they are.
    """

    vcpu_id: int
    state: VcpuState
    notes: list[str]
    unmapped: dict[str, Any]
    _span: tuple[int, int]  # the vCPU's state string in the document text
    _inner: str  # that string's content: the vCPU's own JSON document
    _fields: dict[str, _Member]  # the Kvm object's members, with spans in _inner
    _kvm_end: int  # where the Kvm object's closing brace is in _inner


def _read_vcpu(vcpu_id: int, text: str, span: tuple[int, int], where: str) -> VcpuEntry:
    root, end = _members(text, 0, where)
    if _skip(text, end) != len(text):
        raise ValueError(f"{where}: text after the state at offset {_skip(text, end)}")
    if "Kvm" not in root or len(root) != 1:
        kinds = ", ".join(sorted(root)) or "nothing"
        raise ValueError(f'{where}: expected a KVM vCPU state ({{"Kvm": ...}}), found {kinds}')
    kvm = root["Kvm"]
    fields, kvm_end = _members(text, kvm.start, f"{where}: Kvm")
    state = VcpuState()
    notes: list[str] = []
    for name in FIELDS[:-1]:
        if name not in fields:
            if name in ("tsc_khz", "nested_state"):
                continue
            raise ValueError(f"{where}: Kvm.{name} is missing")
        part = _PART_OF[name]
        setattr(state, part, _read_field(name, fields[name].value, f"{where}: Kvm.{name}"))
    if "tsc_khz" not in fields:
        state.absent["tsc_khz"] = "no tsc_khz field in the file"
    elif state.tsc_khz is None:
        state.absent["tsc_khz"] = "tsc_khz is null: KVM_GET_TSC_KHZ answered EIO when saved"
    if "nested_state" not in fields:
        state.absent["nested"] = (
            "no nested_state field: Cloud Hypervisor before v49 did not save nested state"
        )
    elif state.nested is None:
        state.absent["nested"] = (
            "nested_state is null: no nested state, or a header-only (128-byte) one that "
            "Cloud Hypervisor dropped (kvm-ioctls gives None for size <= 128); it does "
            "not call KVM_SET_NESTED_STATE on restore"
        )
    if "nested" in state.absent:
        notes.append(f"nested: {state.absent['nested']}")
    state.absent["debugregs"] = "Cloud Hypervisor does not save KVM_GET_DEBUGREGS"
    state.absent["sregs2"] = "Cloud Hypervisor saves KVM_GET_SREGS (no PDPTRs), not SREGS2"
    if state.cpuid is not None and any(
        isinstance(m, dict) and isinstance(m.get("flags"), int) and m["flags"] & ~_VALID_INDEX
        for m in fields["cpuid"].value
    ):
        notes.append("cpuid: flags other than VALID_INDEX (bit 0) are not kernel flags; dropped")
    if "xsave" in fields and isinstance(fields["xsave"].value, dict):
        extra = set(fields["xsave"].value) - {"region", "extra"}
        if extra:
            notes.append(f"xsave: unknown members {sorted(extra)} are kept as they are")
    unmapped = {k: m.value for k, m in fields.items() if k not in _PART_OF}
    if "hyperv_synic" not in fields:
        notes.append("no hyperv_synic field (Cloud Hypervisor before v50); it reads as false")
    return VcpuEntry(vcpu_id, state, notes, unmapped, span, text, fields, kvm_end - 1)


def _same(name: str, a: Any, b: Any) -> bool:
    """Whether two fields' JSON values say the same to Cloud Hypervisor."""
    if name == "msrs":  # a list it sets in order: the same MSRs and values are the same
        return {m["index"]: m["data"] for m in a} == {m["index"]: m["data"] for m in b}
    return bool(_json(a) == _json(b))


def _only(name: str, value: Any) -> VcpuState:
    """A state holding one field's part, to write that field alone."""
    state = VcpuState()
    setattr(state, _PART_OF[name], value)
    return state


def _vcpu_text(entry: VcpuEntry, state: VcpuState, header_only: str | None) -> str:
    """``entry``'s JSON text with ``state`` put in, changing only the fields that differ."""
    fields, text = entry._fields, entry._inner
    edits: list[tuple[int, int, str]] = []
    anchor = entry._kvm_end  # where a missing field goes: after the last one present
    inserts: dict[int, list[str]] = {}
    for name in FIELDS[:-1]:
        member = fields.get(name)
        if member is None:
            if getattr(state, _PART_OF[name]) is None:
                continue
            new = _write_field(name, state, header_only)
            inserts.setdefault(anchor, []).append(f",{_json(name)}:{_json(new)}")
            continue
        anchor = member.end
        where = f"vCPU {entry.vcpu_id}: Kvm.{name}"
        old_part = _read_field(name, member.value, where)
        order = [m["index"] for m in member.value] if name == "msrs" else None
        # Compare what the two parts mean (a header-only nested state kept by an earlier
        # writer stays as it is); only a field that differs is written, by the rules.
        new_meaning = _write_field(name, state, "keep", order)
        old_meaning = _write_field(name, _only(name, old_part), "keep", order)
        if not _same(name, new_meaning, old_meaning):
            edits.append(
                (member.start, member.end, _json(_write_field(name, state, header_only, order)))
            )
    edits.extend((at, at, "".join(parts)) for at, parts in inserts.items())
    return _splice(text, edits)


class Snapshot:
    """A parsed ``state.json``: its vCPUs by id, and writers that change one of them.

    ``Snapshot.vcpus`` maps each vCPU id to a :class:`VcpuEntry`;
    :meth:`states` gives just the :class:`~kvmstate.state.VcpuState` objects.
    ``name`` is the file's path (or ``state.json``) for messages.
    """

    def __init__(self, data: bytes, name: str = STATE_FILE) -> None:
        self.name = name
        self.data = bytes(data)
        try:
            self.text = self.data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{name}: not UTF-8 at byte {exc.start}") from None
        self.vcpus: dict[int, VcpuEntry] = {}
        self._parse()

    def _parse(self) -> None:
        name, text = self.name, self.text
        root, end = _members(text, 0, name)
        if _skip(text, end) != len(text):
            raise ValueError(f"{name}: text after the snapshot at offset {_skip(text, end)}")
        if "snapshots" not in root:
            raise ValueError(f"{name}: no 'snapshots' member: not a Cloud Hypervisor snapshot")
        children, _ = _members(text, root["snapshots"].start, f"{name}: snapshots")
        if _CPU_MANAGER not in children:
            raise ValueError(f"{name}: no {_CPU_MANAGER} snapshot: not a Cloud Hypervisor VM")
        where = f"{name}: snapshots.{_CPU_MANAGER}"
        manager, _ = _members(text, children[_CPU_MANAGER].start, where)
        if "snapshots" not in manager:
            raise ValueError(f"{where}: no 'snapshots' member")
        vcpus, _ = _members(text, manager["snapshots"].start, f"{where}.snapshots")
        for key, member in vcpus.items():
            at = f"{where}.snapshots.{key}"
            if not key.isdigit() or str(int(key)) != key:
                raise ValueError(f"{at}: a vCPU id must be a decimal number")
            vcpu, _ = _members(text, member.start, at)
            data = vcpu.get("snapshot_data")
            if data is None or not isinstance(data.value, dict):
                if data is not None and isinstance(data.value, list):
                    raise ValueError(
                        f"{at}: snapshot_data is an array of bytes: a snapshot from Cloud "
                        "Hypervisor before v39 (versionize), which is not supported"
                    )
                raise ValueError(f"{at}: no snapshot_data object")
            inner, _ = _members(text, data.start, f"{at}.snapshot_data")
            state = inner.get("state")
            if state is None or not isinstance(state.value, str):
                raise ValueError(f"{at}.snapshot_data: 'state' must be a string of JSON")
            vcpu_id = int(key)
            self.vcpus[vcpu_id] = _read_vcpu(
                vcpu_id, state.value, (state.start, state.end), f"{at}.snapshot_data.state"
            )

    def states(self) -> dict[int, VcpuState]:
        """``{vcpu_id: VcpuState}`` in vCPU id order."""
        return {i: self.vcpus[i].state for i in sorted(self.vcpus)}

    def with_vcpu(self, vcpu_id: int, state: VcpuState, *, header_only: str | None = None) -> bytes:
        """The file with vCPU ``vcpu_id`` holding ``state``; everything else unchanged.

        Fields whose meaning does not change keep their text, so
        ``snap.with_vcpu(i, snap.states()[i]) == snap.data``. ``header_only``
        as for :func:`write_vcpu`. KeyError for a vCPU id the file lacks.
        """
        if not isinstance(state, VcpuState):
            raise TypeError(f"with_vcpu() needs a VcpuState, not {type(state).__name__}")
        if vcpu_id not in self.vcpus:
            raise KeyError(f"{self.name} has no vCPU {vcpu_id} (it has {sorted(self.vcpus)})")
        _check(state, header_only)
        entry = self.vcpus[vcpu_id]
        new_inner = _vcpu_text(entry, state, header_only)
        if new_inner == entry._inner:
            return self.data
        start, end = entry._span
        return _splice(self.text, [(start, end, _json(new_inner))]).encode("utf-8")

    def __repr__(self) -> str:
        return f"Snapshot({self.name!r}, vcpus={sorted(self.vcpus)})"


def _source(source: Any) -> tuple[bytes, str]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), STATE_FILE
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            path = os.path.join(path, STATE_FILE)
        size = os.stat(path).st_size
        if size > MAX_FILE_SIZE:
            raise ValueError(f"{path}: {size} bytes is beyond the {MAX_FILE_SIZE}-byte limit")
        with open(path, "rb") as f:
            return f.read(MAX_FILE_SIZE + 1), str(path)
    raise TypeError(f"expected bytes or a path, not {type(source).__name__}")


def load(source: bytes | bytearray | memoryview | str | os.PathLike[str]) -> Snapshot:
    """Parse a ``state.json``: its bytes, its path, or the snapshot directory's path.

    ValueError, naming the file and the place in it, for anything that is
    not a Cloud Hypervisor (v39 or later) x86 KVM snapshot; OSError from
    reading a path.
    """
    data, name = _source(source)
    return Snapshot(data, name)


def read_state_json(
    source: bytes | bytearray | memoryview | str | os.PathLike[str],
) -> dict[int, VcpuState]:
    """``{vcpu_id: VcpuState}`` from a ``state.json`` (bytes or path); see :func:`load`."""
    return load(source).states()


def with_vcpu(
    doc: bytes | bytearray | memoryview | str | os.PathLike[str],
    vcpu_id: int,
    state: VcpuState,
    *,
    header_only: str | None = None,
) -> bytes:
    """``doc`` (a ``state.json``) with vCPU ``vcpu_id`` replaced; see :meth:`Snapshot.with_vcpu`."""
    return load(doc).with_vcpu(vcpu_id, state, header_only=header_only)


def is_snapshot(source: bytes | bytearray | memoryview | str | os.PathLike[str]) -> bool:
    """Whether ``source`` looks like a Cloud Hypervisor ``state.json`` (by content).

    ``source`` is the file's bytes or a path (a snapshot directory or the
    file). Only the shape is looked at: :func:`load` still validates.
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            path = os.path.join(path, STATE_FILE)
        try:
            with open(path, "rb") as f:
                data = f.read(_SNIFF)
        except OSError:
            return False
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source[:_SNIFF])
    else:
        return False
    # serde_json writes the root's children sorted: "cpu-manager" comes first.
    head = data.lstrip(b" \t\r\n")
    return head[:1] == b"{" and b'"snapshots"' in head[:64] and b'"cpu-manager"' in head
