"""crosvm snapshots: the per-vCPU CBOR fragment ``vcpu/vcpu<N>``, read and written back.

A crosvm snapshot is a directory of fragments, each one value serialized by
serde into CBOR with ``ciborium`` (since 2025-01-08; JSON before, refused
here). ``vcpu/vcpu<N>`` is crosvm's ``VcpuSnapshot``
(``hypervisor/src/x86_64.rs``), a map with, in this order:

===================  =================================================  ===============
key                  value                                              VcpuState part
===================  =================================================  ===============
``vcpu_id``          unsigned                                           (returned)
``regs``             map ``rax`` .. ``r15``, ``rip``, ``rflags``        ``regs``
``sregs``            map: ``cs`` .. ``ldt`` as ``{base, limit_bytes,    ``sregs``
                     selector, type_, present, dpl, db, s, l, g,
                     avl}``, ``gdt``/``idt`` as ``{base, limit}``,
                     ``cr0`` ``cr2`` ``cr3`` ``cr4`` ``cr8`` ``efer``
``debug_regs``       ``{db: [4], dr6, dr7}``                            ``debugregs``
``xcrs``             map XCR index -> value (integer keys)              ``xcrs``
``msrs``             map MSR index -> value (integer keys, sorted)      ``msrs``
``xsave``            ``{data: [u32], len}`` (``len`` bytes)             ``xsave``
``hypervisor_data``  KVM: ``{interrupts: events, nested_state: [u8]}``  ``events``,
                     (2025-07-29 and later); before, the events map     ``nested``
``tsc_offset``       unsigned: guest TSC minus host TSC when saved      (returned)
===================  =================================================  ===============

The events map is crosvm's ``VcpuEvents``: ``exception`` {injected, nr,
has_error_code, pending, error_code}, ``interrupt`` {injected, nr, soft,
shadow}, ``nmi`` {injected, pending, masked}, ``sipi_vector``, ``smi``
{smm, pending, smm_inside_nmi, latched_init}, ``triple_fault`` {pending},
``exception_payload``; a field that is null means the matching
``KVM_VCPUEVENT_VALID_*`` flag was clear. ``nested_state`` is an *array of
integers* (serde's form of a ``Vec<u8>``, not a CBOR byte string) as long as
the saving host's ``KVM_CAP_NESTED_STATE`` (empty where that is 0); the
header's ``size`` says how much of it is state, and a header-only state is
kept like any other.

Reading builds each kernel structure exactly as crosvm's restore does. What
the fragment does not hold, and where it went:

* ``sregs.apic_base`` and ``interrupt_bitmap`` live in the ``irqchip``
  fragment (kernel irqchip), like the LAPIC page and ``mp_state``: pass that
  fragment as ``irqchip=`` to get them; without it they are 0 and the
  missing parts are listed in :attr:`~kvmstate.state.VcpuState.absent`;
* a segment's ``unusable`` bit: crosvm restores it as ``present == 0``;
  padding of segments, descriptor tables, debug registers, events;
* ``kvm_vcpu_events.exception_has_payload``: crosvm restores it as 1
  whenever ``KVM_VCPUEVENT_VALID_PAYLOAD`` is set; and a payload whose
  ``pending`` is null, which its restore ignores;
* ``cpuid``, ``tsc_khz``, ``fpu`` (XSAVE holds it) and ``sregs2``: crosvm
  does not save them.

crosvm's own save (``From<&kvm_vcpu_events>``) takes ``nmi.injected`` from
the kernel's ``interrupt.injected``, so in files crosvm wrote the two are
always equal; the writer here stores the real NMI bit, which crosvm's
restore reads as it should.

Writing: :func:`write_vcpu` makes a fragment from a
:class:`~kvmstate.state.VcpuState`; :func:`with_vcpu` puts one into an
existing fragment, keeping the encoded bytes of every value whose meaning
does not change (a fragment read and written back unmodified is identical
byte for byte) and of keys it does not know.

>>> from kvmstate.formats import crosvm
>>> crosvm.is_vcpu_snapshot(bytes.fromhex("a1 67") + b"vcpu_id" + b"\\x00")
True
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import struct
from typing import Any

from kvmstate import uapi
from kvmstate.formats import cbor
from kvmstate.formats._fields import keyed
from kvmstate.nested import HEADER_SIZE, NestedState
from kvmstate.state import VcpuState
from kvmstate.uapi import NestedFormat, VcpuEventsFlag

__all__ = [
    "FIELDS",
    "MAX_FILE_SIZE",
    "VcpuSnapshot",
    "irqchip_parts",
    "is_vcpu_snapshot",
    "load",
    "read_vcpu",
    "with_vcpu",
    "write_vcpu",
]

#: ``VcpuSnapshot``'s keys, in the order crosvm writes them.
FIELDS = (
    "vcpu_id",
    "regs",
    "sregs",
    "debug_regs",
    "xcrs",
    "msrs",
    "xsave",
    "hypervisor_data",
    "tsc_offset",
)
#: The largest fragment read (a vCPU with an AMX-sized XSAVE is about 30 KB).
MAX_FILE_SIZE = 1 << 26

_REGS = (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags",
)  # fmt: skip
_SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
_SEGMENT_FIELDS = (
    ("base", 64), ("limit_bytes", 32), ("selector", 16), ("type_", 8), ("present", 8),
    ("dpl", 8), ("db", 8), ("s", 8), ("l", 8), ("g", 8), ("avl", 8),
)  # fmt: skip
_CONTROL = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer")
_MP_STATES = {
    "Runnable": uapi.MpState.RUNNABLE,
    "Uninitialized": uapi.MpState.UNINITIALIZED,
    "InitReceived": uapi.MpState.INIT_RECEIVED,
    "Halted": uapi.MpState.HALTED,
    "SipiReceived": uapi.MpState.SIPI_RECEIVED,
    "Stopped": uapi.MpState.STOPPED,
}
_F = VcpuEventsFlag
_LAPIC_SIZE = ctypes.sizeof(uapi.kvm_lapic_state)  # the 1 KiB APIC register page


# --- checked access to decoded values ----------------------------------------------------


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a bool"
    if isinstance(value, int):
        return f"the integer {value}"  # CBOR integers have at most 64 bits and a sign
    if isinstance(value, bytes):
        return f"a byte string of {len(value)}"
    if isinstance(value, str):
        return "a text string"
    if isinstance(value, list):
        return f"an array of {len(value)}"
    if isinstance(value, dict):
        return "a map"
    return type(value).__name__


def _map(value: Any, keys: tuple[str, ...], where: str) -> dict[Any, Any]:
    return keyed(value, keys, where, "a map", _kind)


def _uint(value: Any, bits: int, where: str) -> int:
    if type(value) is not int or not 0 <= value < 1 << bits:
        raise ValueError(f"{where}: expected an unsigned {bits}-bit integer, found {_kind(value)}")
    return value


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{where}: expected a bool, found {_kind(value)}")
    return value


def _opt(value: Any, check: Any, *args: Any) -> Any:
    return None if value is None else check(value, *args)


def _array(value: Any, where: str, count: int | None = None) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError(f"{where}: expected an array, found {_kind(value)}")
    if count is not None and len(value) != count:
        raise ValueError(f"{where}: {len(value)} items, expected {count}")
    return value


def _int_map(value: Any, where: str) -> dict[int, int]:
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a map, found {_kind(value)}")
    out = {}
    for key, item in value.items():
        index = _uint(key, 32, f"{where}: key")
        out[index] = _uint(item, 64, f"{where}[{index:#x}]")
    return out


# --- the parts, both ways -------------------------------------------------------------------


def _read_regs(value: Any, where: str) -> uapi.kvm_regs:
    obj = _map(value, _REGS, where)
    regs = uapi.kvm_regs()
    for name in _REGS:
        setattr(regs, name, _uint(obj[name], 64, f"{where}.{name}"))
    return regs


def _write_regs(regs: uapi.kvm_regs) -> dict[str, int]:
    return {name: int(getattr(regs, name)) for name in _REGS}


def _read_sregs(value: Any, where: str) -> uapi.kvm_sregs:
    obj = _map(value, (*_SEGMENTS, "gdt", "idt", *_CONTROL), where)
    sregs = uapi.kvm_sregs()
    for seg in _SEGMENTS:
        fields = _map(obj[seg], tuple(n for n, _ in _SEGMENT_FIELDS), f"{where}.{seg}")
        target = getattr(sregs, seg)
        for name, bits in _SEGMENT_FIELDS:
            got = _uint(fields[name], bits, f"{where}.{seg}.{name}")
            setattr(target, {"limit_bytes": "limit", "type_": "type"}.get(name, name), got)
        target.unusable = 1 if target.present == 0 else 0  # crosvm's From<&Segment>
    for table in ("gdt", "idt"):
        fields = _map(obj[table], ("base", "limit"), f"{where}.{table}")
        getattr(sregs, table).base = _uint(fields["base"], 64, f"{where}.{table}.base")
        getattr(sregs, table).limit = _uint(fields["limit"], 16, f"{where}.{table}.limit")
    for name in _CONTROL:
        setattr(sregs, name, _uint(obj[name], 64, f"{where}.{name}"))
    return sregs


def _write_sregs(sregs: uapi.kvm_sregs) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for seg in _SEGMENTS:
        s = getattr(sregs, seg)
        out[seg] = {
            name: int(getattr(s, {"limit_bytes": "limit", "type_": "type"}.get(name, name)))
            for name, _ in _SEGMENT_FIELDS
        }
    for table in ("gdt", "idt"):
        t = getattr(sregs, table)
        out[table] = {"base": int(t.base), "limit": int(t.limit)}
    for name in _CONTROL:
        out[name] = int(getattr(sregs, name))
    return out


def _read_debugregs(value: Any, where: str) -> uapi.kvm_debugregs:
    obj = _map(value, ("db", "dr6", "dr7"), where)
    regs = uapi.kvm_debugregs()
    for i, item in enumerate(_array(obj["db"], f"{where}.db", 4)):
        regs.db[i] = _uint(item, 64, f"{where}.db[{i}]")
    regs.dr6 = _uint(obj["dr6"], 64, f"{where}.dr6")
    regs.dr7 = _uint(obj["dr7"], 64, f"{where}.dr7")
    return regs


def _write_debugregs(regs: uapi.kvm_debugregs) -> dict[str, Any]:
    return {"db": [int(x) for x in regs.db], "dr6": int(regs.dr6), "dr7": int(regs.dr7)}


def _read_xcrs(value: Any, where: str) -> uapi.kvm_xcrs:
    values = _int_map(value, where)
    xcrs = uapi.kvm_xcrs()
    if len(values) > len(xcrs.xcrs):
        raise ValueError(f"{where}: {len(values)} XCRs, kvm_xcrs holds {len(xcrs.xcrs)}")
    xcrs.nr_xcrs = len(values)
    for slot, (index, item) in zip(xcrs.xcrs, sorted(values.items()), strict=False):
        slot.xcr, slot.value = index, item
    return xcrs


def _write_xcrs(xcrs: uapi.kvm_xcrs | None) -> dict[int, int]:
    if xcrs is None:
        return {}
    count = min(int(xcrs.nr_xcrs), len(xcrs.xcrs))
    return dict(sorted((int(x.xcr), int(x.value)) for x in list(xcrs.xcrs)[:count]))


def _read_msrs(value: Any, where: str) -> dict[int, int]:
    return _int_map(value, where)


def _write_msrs(msrs: dict[int, int]) -> dict[int, int]:
    for index, item in msrs.items():
        _uint(index, 32, f"msrs: MSR {index!r}")
        _uint(item, 64, f"msrs: MSR {index:#x} value")
    return dict(sorted(msrs.items()))  # a BTreeMap: sorted by index


def _read_xsave(value: Any, where: str) -> uapi.kvm_xsave:
    obj = _map(value, ("data", "len"), where)
    length = _uint(obj["len"], 64, f"{where}.len")
    data = _array(obj["data"], f"{where}.data")
    if length < 4096 or length % 4 or length > 1 << 20:
        raise ValueError(f"{where}.len: {length} bytes is not an XSAVE area (>= 4096, 4-aligned)")
    if len(data) != length // 4:
        raise ValueError(f"{where}.data: {len(data)} words for {length} bytes")
    words = [_uint(w, 32, f"{where}.data[{i}]") for i, w in enumerate(data)]
    xsave = uapi.kvm_xsave.sized(length)
    ctypes.memmove(ctypes.addressof(xsave), struct.pack(f"<{len(words)}I", *words), length)
    return xsave


def _write_xsave(xsave: uapi.kvm_xsave) -> dict[str, Any]:
    raw = bytes(xsave.to_bytes())
    if len(raw) < 4096 or len(raw) % 4:
        raise ValueError(f"xsave: {len(raw)} bytes is not an XSAVE area (>= 4096, 4-aligned)")
    return {"data": list(struct.unpack(f"<{len(raw) // 4}I", raw)), "len": len(raw)}


_EVENT_KEYS = (
    "exception", "interrupt", "nmi", "sipi_vector", "smi", "triple_fault", "exception_payload",
)  # fmt: skip


def _read_events(value: Any, where: str) -> uapi.kvm_vcpu_events:
    """crosvm's ``From<&VcpuEvents> for kvm_vcpu_events``: what its restore sets."""
    obj = _map(value, _EVENT_KEYS, where)
    ev = uapi.kvm_vcpu_events()
    flags = 0
    exc = _map(
        obj["exception"],
        ("injected", "nr", "has_error_code", "pending", "error_code"),
        f"{where}.exception",
    )
    ev.exception.injected = _bool(exc["injected"], f"{where}.exception.injected")
    ev.exception.nr = _uint(exc["nr"], 8, f"{where}.exception.nr")
    ev.exception.has_error_code = _bool(exc["has_error_code"], f"{where}.exception.has_error_code")
    pending = _opt(exc["pending"], _bool, f"{where}.exception.pending")
    payload = _opt(obj["exception_payload"], _uint, 64, f"{where}.exception_payload")
    if pending is not None:
        ev.exception.pending = pending
        ev.exception_has_payload = payload is not None
        ev.exception_payload = payload or 0
        flags |= _F.PAYLOAD
    ev.exception.error_code = _uint(exc["error_code"], 32, f"{where}.exception.error_code")
    irq = _map(obj["interrupt"], ("injected", "nr", "soft", "shadow"), f"{where}.interrupt")
    ev.interrupt.injected = _bool(irq["injected"], f"{where}.interrupt.injected")
    ev.interrupt.nr = _uint(irq["nr"], 8, f"{where}.interrupt.nr")
    ev.interrupt.soft = _bool(irq["soft"], f"{where}.interrupt.soft")
    shadow = _opt(irq["shadow"], _uint, 8, f"{where}.interrupt.shadow")
    if shadow is not None:
        ev.interrupt.shadow = shadow
        flags |= _F.SHADOW
    nmi = _map(obj["nmi"], ("injected", "pending", "masked"), f"{where}.nmi")
    ev.nmi.injected = _bool(nmi["injected"], f"{where}.nmi.injected")
    nmi_pending = _opt(nmi["pending"], _bool, f"{where}.nmi.pending")
    if nmi_pending is not None:
        ev.nmi.pending = nmi_pending
        flags |= _F.NMI_PENDING
    ev.nmi.masked = _bool(nmi["masked"], f"{where}.nmi.masked")
    sipi = _opt(obj["sipi_vector"], _uint, 32, f"{where}.sipi_vector")
    if sipi is not None:
        ev.sipi_vector = sipi
        flags |= _F.SIPI_VECTOR
    smi = _map(obj["smi"], ("smm", "pending", "smm_inside_nmi", "latched_init"), f"{where}.smi")
    smm = _opt(smi["smm"], _bool, f"{where}.smi.smm")
    if smm is not None:
        ev.smi.smm = smm
        flags |= _F.SMM
    ev.smi.pending = _bool(smi["pending"], f"{where}.smi.pending")
    ev.smi.smm_inside_nmi = _bool(smi["smm_inside_nmi"], f"{where}.smi.smm_inside_nmi")
    ev.smi.latched_init = _uint(smi["latched_init"], 8, f"{where}.smi.latched_init")
    triple = _map(obj["triple_fault"], ("pending",), f"{where}.triple_fault")
    fault = _opt(triple["pending"], _bool, f"{where}.triple_fault.pending")
    if fault is not None:
        ev.triple_fault.pending = fault
        flags |= _F.TRIPLE_FAULT
    ev.flags = flags
    return ev


def _write_events(ev: uapi.kvm_vcpu_events) -> dict[str, Any]:
    """crosvm's ``From<&kvm_vcpu_events> for VcpuEvents``, with the NMI's own injected bit."""
    flags = int(ev.flags)

    def valid(flag: int, value: Any) -> Any:
        return value if flags & flag else None

    return {
        "exception": {
            "injected": bool(ev.exception.injected),
            "nr": int(ev.exception.nr),
            "has_error_code": bool(ev.exception.has_error_code),
            "pending": valid(_F.PAYLOAD, bool(ev.exception.pending)),
            "error_code": int(ev.exception.error_code),
        },
        "interrupt": {
            "injected": bool(ev.interrupt.injected),
            "nr": int(ev.interrupt.nr),
            "soft": bool(ev.interrupt.soft),
            "shadow": valid(_F.SHADOW, int(ev.interrupt.shadow)),
        },
        "nmi": {
            "injected": bool(ev.nmi.injected),
            "pending": valid(_F.NMI_PENDING, bool(ev.nmi.pending)),
            "masked": bool(ev.nmi.masked),
        },
        "sipi_vector": valid(_F.SIPI_VECTOR, int(ev.sipi_vector)),
        "smi": {
            "smm": valid(_F.SMM, bool(ev.smi.smm)),
            "pending": bool(ev.smi.pending),
            "smm_inside_nmi": bool(ev.smi.smm_inside_nmi),
            "latched_init": int(ev.smi.latched_init),
        },
        "triple_fault": {"pending": valid(_F.TRIPLE_FAULT, bool(ev.triple_fault.pending))},
        "exception_payload": valid(_F.PAYLOAD, int(ev.exception_payload)),
    }


def _read_nested(value: Any, where: str) -> NestedState | None:
    data = _array(value, where)
    if not data:
        return None
    if len(data) < HEADER_SIZE:
        raise ValueError(f"{where}: {len(data)} bytes, the header alone is {HEADER_SIZE}")
    raw = bytes(_uint(b, 8, f"{where}[{i}]") for i, b in enumerate(data))
    header = uapi.kvm_nested_state_header.from_buffer_copy(raw[:HEADER_SIZE])
    if header.format not in (NestedFormat.VMX, NestedFormat.SVM):
        raise ValueError(f"{where}: unknown nested state format {header.format}")
    if not HEADER_SIZE <= header.size <= len(raw):
        # crosvm refuses a size beyond the array (EINVAL) before KVM_SET_NESTED_STATE.
        raise ValueError(
            f"{where}: the size field says {header.size} bytes, the array holds {len(raw)}"
        )
    state = NestedState(len(raw))
    state.buffer[: len(raw)] = raw
    return state


def _write_nested(state: NestedState | None, size: int | None) -> list[int]:
    if state is None:
        return []
    used = state.size
    length = state.capacity if size is None else size
    if not HEADER_SIZE <= used <= min(length, state.capacity):
        raise ValueError(
            f"nested: the size field ({used}) must be between {HEADER_SIZE} and the "
            f"{min(length, state.capacity)} bytes written"
        )
    return list(bytes(state.buffer[: min(length, state.capacity)]).ljust(length, b"\0"))


# --- the fragment ------------------------------------------------------------------------


@dataclasses.dataclass
class VcpuSnapshot:
    """One parsed ``vcpu<N>`` fragment.

    ``state`` is the :class:`~kvmstate.state.VcpuState`; ``vcpu_id`` and
    ``tsc_offset`` are crosvm's own; ``layout`` is ``"hypervisor-state"``
    (``hypervisor_data`` = ``{interrupts, nested_state}``, 2025-07-29 and
    later) or ``"events"`` (the bare events map, before); ``notes`` say what
    the file implies; ``unmapped`` holds keys this reader does not know.
    """

    vcpu_id: int
    state: VcpuState
    tsc_offset: int
    layout: str
    notes: list[str]
    unmapped: dict[Any, Any]
    data: bytes
    _items: list[tuple[Any, Any, bytes]]
    _hv_items: list[tuple[Any, Any, bytes]] | None
    _meaning: dict[str, Any]  # what the file says, in the writer's form (to see what changed)
    _nested_size: int | None  # the nested state array's length in the file

    def with_vcpu(
        self, state: VcpuState, *, tsc_offset: int | None = None, nested_size: int | None = None
    ) -> bytes:
        """This fragment holding ``state``; values whose meaning is unchanged keep their bytes.

        ``tsc_offset`` replaces crosvm's own value when given; ``nested_size``
        pads or cuts the nested state array (default: the state's buffer).
        ``snap.with_vcpu(snap.state) == snap.data``. ValueError for a state
        with nested state into a fragment of the older (events-only) layout,
        which has no place for it.
        """
        if not isinstance(state, VcpuState):
            raise TypeError(f"with_vcpu() needs a VcpuState, not {type(state).__name__}")
        if nested_size is None:
            nested_size = self._nested_size
        new = _fields(
            state, self.vcpu_id, self.tsc_offset if tsc_offset is None else tsc_offset, nested_size
        )
        old = self._meaning
        entries: list[bytes] = []
        changed = False
        for key, _, raw in self._items:
            if key == "hypervisor_data":
                raw, moved = self._hypervisor_data(state, new, old, raw)
                changed |= moved
            elif key in new and not _same(new[key], old[key]):
                raw, changed = cbor.dumps(new[key]), True
            entries.append(cbor.dumps(key) + raw)
        if not changed:
            return self.data
        return _map_head(len(entries)) + b"".join(entries)

    def _hypervisor_data(
        self, state: VcpuState, new: dict[str, Any], old: dict[str, Any], raw: bytes
    ) -> tuple[bytes, bool]:
        if self._hv_items is None:  # the older layout: the events map alone
            if state.nested is not None:
                raise ValueError(
                    "this fragment's layout (crosvm before 2025-07-29) has no nested state; "
                    f"the state holds {state.nested!r}"
                )
            if _same(new["hypervisor_data"]["interrupts"], old["hypervisor_data"]["interrupts"]):
                return raw, False
            return cbor.dumps(new["hypervisor_data"]["interrupts"]), True
        entries, changed = [], False
        for key, _, item in self._hv_items:
            if key in ("interrupts", "nested_state") and not _same(
                new["hypervisor_data"][key], old["hypervisor_data"][key]
            ):
                item, changed = cbor.dumps(new["hypervisor_data"][key]), True
            entries.append(cbor.dumps(key) + item)
        if not changed:
            return raw, False
        return _map_head(len(entries)) + b"".join(entries), True


def _map_head(count: int) -> bytes:
    return cbor.head(5, count)


def _same(a: Any, b: Any) -> bool:
    return cbor.dumps(a) == cbor.dumps(b)


def _need(state: VcpuState, part: str) -> Any:
    value = getattr(state, part)
    if value is None:
        why = state.absent.get(part, "not in this state")
        raise ValueError(f"{part} is absent ({why}); crosvm's VcpuSnapshot needs it")
    return value


def _fields(
    state: VcpuState, vcpu_id: int, tsc_offset: int, nested_size: int | None
) -> dict[str, Any]:
    """The fragment's values for ``state``, in crosvm's order."""
    return {
        "vcpu_id": _uint(vcpu_id, 64, "vcpu_id"),
        "regs": _write_regs(_need(state, "regs")),
        "sregs": _write_sregs(_need(state, "sregs")),
        "debug_regs": _write_debugregs(_need(state, "debugregs")),
        "xcrs": _write_xcrs(state.xcrs),
        "msrs": _write_msrs(_need(state, "msrs")),
        "xsave": _write_xsave(_need(state, "xsave")),
        "hypervisor_data": {
            "interrupts": _write_events(_need(state, "events")),
            "nested_state": _write_nested(state.nested, nested_size),
        },
        "tsc_offset": _uint(tsc_offset, 64, "tsc_offset"),
    }


def write_vcpu(
    state: VcpuState, *, vcpu_id: int = 0, tsc_offset: int = 0, nested_size: int | None = None
) -> bytes:
    """A ``vcpu<N>`` fragment for ``state`` (the current layout, with nested state).

    ``tsc_offset`` is crosvm's guest-minus-host TSC offset, which it applies
    on restore (0: the guest's TSC restarts at the host's). ``nested_size``
    is the length of the nested state array (crosvm writes the host's
    ``KVM_CAP_NESTED_STATE``; the default is the state's buffer). ValueError
    names a part crosvm needs that ``state`` lacks (regs, sregs, debugregs,
    msrs, xsave, events).
    """
    if not isinstance(state, VcpuState):
        raise TypeError(f"write_vcpu() needs a VcpuState, not {type(state).__name__}")
    return cbor.dumps(_fields(state, vcpu_id, tsc_offset, nested_size))


def irqchip_parts(data: bytes | bytearray | memoryview, vcpu_id: int) -> dict[str, Any]:
    """One vCPU's share of crosvm's ``irqchip`` fragment (kernel irqchip).

    Returns ``lapic`` (``kvm_lapic_state``: crosvm keeps the first 32 bits of
    each of the 64 registers), ``mp_state`` (``kvm_mp_state``, when saved),
    and ``apic_base`` / ``interrupt_bitmap`` (the ``kvm_sregs`` fields crosvm
    keeps there), as far as the fragment has them. ValueError for a
    malformed fragment or a vCPU it does not hold.
    """
    where = "irqchip"
    root = _map(_decode(data, where), ("lapic_state", "mp_state"), where)
    lapics = _array(root["lapic_state"], f"{where}.lapic_state")
    if not 0 <= vcpu_id < len(lapics):
        raise ValueError(f"{where}: no LAPIC for vCPU {vcpu_id} ({len(lapics)} saved)")
    out: dict[str, Any] = {}
    regs = _array(
        _map(lapics[vcpu_id], ("regs",), f"{where}.lapic_state[{vcpu_id}]")["regs"],
        f"{where}.lapic_state[{vcpu_id}].regs",
        64,
    )
    page = bytearray(_LAPIC_SIZE)
    for i, reg in enumerate(regs):
        page[16 * i : 16 * i + 4] = _uint(reg, 32, f"{where}.lapic_state[{vcpu_id}][{i}]").to_bytes(
            4, "little"
        )
    out["lapic"] = uapi.kvm_lapic_state.from_bytes(bytes(page))
    mp_states = _array(root["mp_state"], f"{where}.mp_state")
    if mp_states:
        if vcpu_id >= len(mp_states):
            raise ValueError(f"{where}: no mp_state for vCPU {vcpu_id} ({len(mp_states)} saved)")
        name = mp_states[vcpu_id]
        if name not in _MP_STATES:
            raise ValueError(f"{where}.mp_state[{vcpu_id}]: unknown state {name!r}")
        mp = uapi.kvm_mp_state()
        mp.mp_state = _MP_STATES[name]
        out["mp_state"] = mp
    chip = root.get("chip_specific_state")
    if isinstance(chip, dict) and "apic_base" in chip:
        bases = _array(chip["apic_base"], f"{where}.chip_specific_state.apic_base")
        bitmaps = _array(
            chip.get("interrupt_bitmap"), f"{where}.chip_specific_state.interrupt_bitmap"
        )
        if vcpu_id < len(bases) and vcpu_id < len(bitmaps):
            out["apic_base"] = _uint(bases[vcpu_id], 64, f"{where}.apic_base[{vcpu_id}]")
            words = _array(bitmaps[vcpu_id], f"{where}.interrupt_bitmap[{vcpu_id}]", 4)
            out["interrupt_bitmap"] = [
                _uint(w, 64, f"{where}.interrupt_bitmap[{vcpu_id}][{i}]")
                for i, w in enumerate(words)
            ]
    return out


def _decode(data: Any, where: str) -> Any:
    raw = _bytes(data)
    if raw[:1] in (b"{", b"["):
        raise ValueError(f"{where}: JSON, not CBOR (crosvm wrote JSON fragments before 2025-01-08)")
    try:
        return cbor.loads(raw)
    except cbor.CborError as exc:
        raise ValueError(f"{where}: {exc}") from None


def _bytes(source: Any) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        size = os.stat(path).st_size
        if size > MAX_FILE_SIZE:
            raise ValueError(f"{path}: {size} bytes is beyond the {MAX_FILE_SIZE}-byte limit")
        with open(path, "rb") as f:
            return f.read(MAX_FILE_SIZE + 1)
    raise TypeError(f"expected bytes or a path, not {type(source).__name__}")


def load(
    source: bytes | bytearray | memoryview | str | os.PathLike[str],
    *,
    irqchip: bytes | bytearray | memoryview | str | os.PathLike[str] | None = None,
    name: str | None = None,
) -> VcpuSnapshot:
    """Parse a ``vcpu<N>`` fragment (bytes or path); ``irqchip`` adds that fragment's parts.

    ValueError names the fragment and the value (or the byte offset) that
    is wrong; OSError from reading a path.
    """
    where = name or (os.fspath(source) if isinstance(source, (str, os.PathLike)) else "vcpu")
    data = _bytes(source)
    if data[:1] in (b"{", b"["):
        raise ValueError(f"{where}: JSON, not CBOR (crosvm wrote JSON fragments before 2025-01-08)")
    try:
        items = cbor.map_items(data)
    except cbor.CborError as exc:
        raise ValueError(f"{where}: {exc}") from None
    top = {k: v for k, v, _ in items}
    _map(top, FIELDS, where)
    vcpu_id = _uint(top["vcpu_id"], 64, f"{where}: vcpu_id")
    state = VcpuState()
    notes: list[str] = []
    state.regs = _read_regs(top["regs"], f"{where}: regs")
    state.sregs = _read_sregs(top["sregs"], f"{where}: sregs")
    state.debugregs = _read_debugregs(top["debug_regs"], f"{where}: debug_regs")
    state.xcrs = _read_xcrs(top["xcrs"], f"{where}: xcrs")
    state.msrs = _read_msrs(top["msrs"], f"{where}: msrs")
    state.xsave = _read_xsave(top["xsave"], f"{where}: xsave")
    tsc_offset = _uint(top["tsc_offset"], 64, f"{where}: tsc_offset")
    hv = top["hypervisor_data"]
    hv_items: list[tuple[Any, Any, bytes]] | None = None
    if isinstance(hv, dict) and "interrupts" in hv:
        layout = "hypervisor-state"
        _map(hv, ("interrupts", "nested_state"), f"{where}: hypervisor_data")
        raw_hv = next(raw for k, _, raw in items if k == "hypervisor_data")
        hv_items = cbor.map_items(raw_hv)
        events = hv["interrupts"]
        state.nested = _read_nested(hv["nested_state"], f"{where}: hypervisor_data.nested_state")
        if state.nested is None:
            state.absent["nested"] = (
                "nested_state is empty: the saving host had no nested state "
                "(KVM_CAP_NESTED_STATE was 0)"
            )
    else:
        layout = "events"
        events = hv
        state.absent["nested"] = (
            "hypervisor_data is the events map alone: crosvm before 2025-07-29 saved no "
            "nested state"
        )
        notes.append(state.absent["nested"])
    ev_where = f"{where}: hypervisor_data" + (".interrupts" if hv_items is not None else "")
    state.events = _read_events(events, ev_where)
    payload = events.get("exception_payload") if isinstance(events, dict) else None
    exception = events.get("exception") if isinstance(events, dict) else None
    if payload is not None and isinstance(exception, dict) and exception.get("pending") is None:
        notes.append("exception_payload without exception.pending: crosvm's restore ignores it")
    notes.append(
        "events.nmi.injected: crosvm's save copies interrupt.injected there; read as written"
    )
    parts: dict[str, Any] = {}
    if irqchip is not None:
        parts = irqchip_parts(_bytes(irqchip), vcpu_id)
    state.lapic = parts.get("lapic")
    state.mp_state = parts.get("mp_state")
    if "apic_base" in parts:
        state.sregs.apic_base = parts["apic_base"]
        for i, word in enumerate(parts["interrupt_bitmap"]):
            state.sregs.interrupt_bitmap[i] = word
    else:
        notes.append(
            "sregs.apic_base and interrupt_bitmap are not in the vCPU fragment (crosvm keeps "
            "them in the irqchip fragment): 0 here"
        )
    if state.lapic is None:
        state.absent["lapic"] = "in crosvm's irqchip fragment, not the vCPU's (pass irqchip=)"
    if state.mp_state is None:
        state.absent["mp_state"] = "in crosvm's irqchip fragment, not the vCPU's (pass irqchip=)"
    state.absent["cpuid"] = "crosvm does not save CPUID (it rebuilds it from its configuration)"
    state.absent["tsc_khz"] = "crosvm does not save the TSC frequency"
    state.absent["fpu"] = "crosvm saves XSAVE, which holds the FPU"
    state.absent["sregs2"] = "crosvm saves KVM_GET_SREGS fields (no PDPTRs), not SREGS2"
    unmapped = {k: v for k, v, _ in items if k not in FIELDS}
    nested_size = len(hv["nested_state"]) if hv_items is not None else None
    # Computed now: the caller may change `state` in place before writing it back.
    meaning = _fields(state, vcpu_id, tsc_offset, nested_size)
    return VcpuSnapshot(
        vcpu_id,
        state,
        tsc_offset,
        layout,
        notes,
        unmapped,
        data,
        items,
        hv_items,
        meaning,
        nested_size,
    )


def read_vcpu(
    source: bytes | bytearray | memoryview | str | os.PathLike[str],
    *,
    irqchip: bytes | bytearray | memoryview | str | os.PathLike[str] | None = None,
) -> VcpuState:
    """The :class:`~kvmstate.state.VcpuState` of a ``vcpu<N>`` fragment; see :func:`load`."""
    return load(source, irqchip=irqchip).state


def with_vcpu(
    doc: bytes | bytearray | memoryview | str | os.PathLike[str], state: VcpuState, **kwargs: Any
) -> bytes:
    """``doc`` (a ``vcpu<N>`` fragment) holding ``state``; see :meth:`VcpuSnapshot.with_vcpu`."""
    return load(doc).with_vcpu(state, **kwargs)


def is_vcpu_snapshot(source: bytes | bytearray | memoryview | str | os.PathLike[str]) -> bool:
    """Whether ``source`` (bytes or a path) starts like crosvm's ``vcpu<N>`` fragment.

    A CBOR map whose first key is ``vcpu_id``; :func:`load` still validates.
    """
    if isinstance(source, (str, os.PathLike)):
        try:
            with open(os.fspath(source), "rb") as f:
                head = f.read(16)
        except OSError:
            return False
    elif isinstance(source, (bytes, bytearray, memoryview)):
        head = bytes(source[:16])
    else:
        return False
    if not head or head[0] >> 5 != 5:
        return False
    info = head[0] & 0x1F
    skip = {24: 2, 25: 3, 26: 5, 27: 9}.get(info, 1 if info < 24 else 0)
    return skip > 0 and head[skip : skip + 8] == b"\x67vcpu_id"
