"""Files as Cloud Hypervisor and crosvm write them, made from kernel structures.

No binary of either VMM exists here, so these writers follow the VMMs'
serializers as read from their sources (the facts below), independently of
kvmstate.formats: the tests then check that the library reads these files
into the kernel structures they were made from.

Cloud Hypervisor (cloud-hypervisor ae44c29, v53+; kvm-bindings 0.14 with
its ``serde`` feature; serde_json ``to_string``/``to_vec``, compact):

* kvm-bindings serializes a kernel struct with ``serialize_bytes`` of its
  raw bytes, which serde_json writes as an array of integers 0..255;
* ``VcpuKvmState`` field order: cpuid, msrs, vcpu_events, regs, sregs,
  fpu, lapic_state, xsave, xcrs, mp_state, tsc_khz, nested_state,
  hyperv_synic; ``CpuState`` is an externally tagged enum: ``{"Kvm": ...}``;
* ``CpuIdEntry`` {function, index, flags, eax, ebx, ecx, edx} with flags
  bit 0 = the kernel's SIGNIFCANT_INDEX and no other bit;
* ``FpuState`` {fpr [[u8;16];8], fcw, fsw, ftwx, last_opcode, last_ip,
  last_dp, xmm [[u8;16];16], mxcsr} from ``KVM_GET_FPU``;
* ``LapicState`` {regs: [c_char; 1024]} (signed on x86);
* ``XsaveState`` {region: [u32; 1024], extra: Vec<u32> only when not empty};
* ``nested_state``: ``None`` (null) when the kernel's size is <= 128, else
  the whole 8320-byte ``KvmNestedStateBuffer``;
* ``SnapshotData`` {state: String} holds ``serde_json::to_string`` of the
  state; ``Snapshot`` {snapshots: BTreeMap<String, Snapshot>, snapshot_data:
  Option<SnapshotData>}; the VM root's children are cpu-manager,
  device-manager, memory-manager; the cpu-manager's children are the vCPU
  ids as strings (sorted as strings by the BTreeMap).

crosvm (google/crosvm f1e797a; ciborium ``into_writer``):

* ciborium writes a struct as a map with text keys in field order, every
  integer and length with its shortest head, ``Option::None`` as null,
  ``bool`` as true/false, a ``Vec``/array as an array (``Vec<u8>`` too: an
  array of integers, not a byte string), ``BTreeMap<u32, u64>`` as a map
  with integer keys in ascending order, a unit enum variant as its name;
* ``VcpuSnapshot`` {vcpu_id, regs, sregs, debug_regs, xcrs, msrs, xsave,
  hypervisor_data, tsc_offset}; ``hypervisor_data`` = ``HypervisorState``
  {interrupts: VcpuEvents, nested_state: Vec<u8>} since 2025-07-29, the
  bare ``VcpuEvents`` before;
* ``From<&kvm_vcpu_events> for VcpuEvents`` (its save) sets
  ``nmi.injected`` from ``interrupt.injected``, and each ``Option`` from
  its ``KVM_VCPUEVENT_VALID_*`` flag;
* ``From<&kvm_segment> for Segment`` keeps base, limit (as limit_bytes),
  selector, type (as type_), present, dpl, db, s, l, g, avl;
* the ``irqchip`` fragment (kernel irqchip) is ``IrqChipSnapshot``
  {ioapic_state, lapic_state: [{regs: [u32; 64]}], pic_state_1,
  pic_state_2, pit_state, chip_specific_state: {routes, apic_base: [u64],
  interrupt_bitmap: [[u64; 4]]}, mp_state: [variant names]}.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from typing import Any

from hypothesis import strategies

from kvmstate import uapi
from kvmstate.state import VcpuState

NESTED_BUFFER = 8320


def pokes(good: bytes) -> strategies.SearchStrategy[list[tuple[int, int]]]:
    """Up to six (offset, byte) writes into ``good``, for :func:`loads_or_refuses_in_one_line`."""
    byte_at = strategies.tuples(strategies.integers(0, len(good) - 1), strategies.integers(0, 255))
    return strategies.lists(byte_at, max_size=6)


def loads_or_refuses_in_one_line(
    load: Callable[[bytes], object], good: bytes, writes: list[tuple[int, int]]
) -> None:
    """``good`` with ``writes`` (offset, byte) made: ``load`` takes it, or refuses it with
    a ValueError of one line (a file reader's promise for a damaged file)."""
    data = bytearray(good)
    for at, value in writes:
        data[at] = value
    try:
        load(bytes(data))
    except ValueError as exc:
        assert "\n" not in str(exc), str(exc)


# --- Cloud Hypervisor ---------------------------------------------------------------------


def _serde_bytes(obj: Any) -> list[int]:
    return list(bytes(obj))


def ch_vcpu_state(
    state: VcpuState,
    fpu: uapi.kvm_fpu,
    *,
    nested: bytes | None = None,
    msr_order: list[int] | None = None,
    version: int = 53,
) -> dict[str, Any]:
    """``CpuState::Kvm(VcpuKvmState)`` as serde builds it (before text), for a CH ``version``.

    ``nested`` is the kernel's nested state (exactly ``size`` bytes) or None;
    ``version`` below 49 leaves out nested_state, below 50 hyperv_synic.
    """
    assert state.cpuid is not None and state.msrs is not None and state.lapic is not None
    assert state.xsave is not None and state.xcrs is not None and state.mp_state is not None
    entries = list(state.cpuid.entries)[: state.cpuid.nent]
    cpuid = [
        {
            "function": e.function,
            "index": e.index,
            "flags": e.flags & 1,
            "eax": e.eax,
            "ebx": e.ebx,
            "ecx": e.ecx,
            "edx": e.edx,
        }
        for e in entries
    ]
    order = msr_order if msr_order is not None else list(state.msrs)
    raw_fpu = bytes(fpu)
    fpu_obj = {
        "fpr": [list(raw_fpu[16 * i : 16 * i + 16]) for i in range(8)],
        "fcw": struct.unpack_from("<H", raw_fpu, 128)[0],
        "fsw": struct.unpack_from("<H", raw_fpu, 130)[0],
        "ftwx": raw_fpu[132],
        "last_opcode": struct.unpack_from("<H", raw_fpu, 134)[0],
        "last_ip": struct.unpack_from("<Q", raw_fpu, 136)[0],
        "last_dp": struct.unpack_from("<Q", raw_fpu, 144)[0],
        "xmm": [list(raw_fpu[152 + 16 * i : 168 + 16 * i]) for i in range(16)],
        "mxcsr": struct.unpack_from("<I", raw_fpu, 408)[0],
    }
    raw_xsave = bytes(state.xsave)
    words = list(struct.unpack(f"<{len(raw_xsave) // 4}I", raw_xsave))
    xsave: dict[str, Any] = {"region": words[:1024]}
    if len(words) > 1024:
        xsave["extra"] = words[1024:]
    body: dict[str, Any] = {
        "cpuid": cpuid,
        "msrs": [{"index": i, "data": state.msrs[i]} for i in order],
        "vcpu_events": _serde_bytes(state.events),
        "regs": _serde_bytes(state.regs),
        "sregs": _serde_bytes(state.sregs),
        "fpu": fpu_obj,
        "lapic_state": {"regs": list(struct.unpack("1024b", bytes(state.lapic)))},
        "xsave": xsave,
        "xcrs": _serde_bytes(state.xcrs),
        "mp_state": _serde_bytes(state.mp_state),
        "tsc_khz": state.tsc_khz,
    }
    if version >= 49:
        if nested is None or struct.unpack_from("<I", nested, 4)[0] <= 128:
            body["nested_state"] = None
        else:
            body["nested_state"] = list(nested.ljust(NESTED_BUFFER, b"\0"))
    if version >= 50:
        body["hyperv_synic"] = False
    return {"Kvm": body}


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _leaf(state: Any) -> dict[str, Any]:
    return {"snapshots": {}, "snapshot_data": {"state": _compact(state)}}


def ch_state_json(vcpus: dict[int, dict[str, Any]]) -> bytes:
    """A whole ``state.json``: a VM root with clock and CPUID, the vCPUs, two other managers."""
    root_state = {"clock": {"Kvm": [0] * 48}, "common_cpuid": []}
    cpus = {str(i): _leaf(vcpus[i]) for i in vcpus}
    tree = {
        "snapshots": {
            "cpu-manager": {"snapshots": dict(sorted(cpus.items())), "snapshot_data": None},
            "device-manager": {
                "snapshots": {"serial": _leaf({"out": [104, 105]})},
                "snapshot_data": {"state": _compact({"device_tree": {}})},
            },
            "memory-manager": _leaf({"memory_ranges": {"regions": []}, "guest_ram_mappings": []}),
        },
        "snapshot_data": {"state": _compact(root_state)},
    }
    return _compact(tree).encode()


# --- a CBOR encoder written apart from kvmstate.formats.cbor ------------------------------


def _cbor_head(major: int, n: int) -> bytes:
    if n <= 23:
        return struct.pack(">B", (major << 5) | n)
    if n <= 0xFF:
        return struct.pack(">BB", (major << 5) | 24, n)
    if n <= 0xFFFF:
        return struct.pack(">BH", (major << 5) | 25, n)
    if n <= 0xFFFF_FFFF:
        return struct.pack(">BI", (major << 5) | 26, n)
    return struct.pack(">BQ", (major << 5) | 27, n)


def cbor(value: Any) -> bytes:
    """ciborium's encoding of ints, bools, None, str, lists and dicts (insertion order)."""
    if value is None:
        return b"\xf6"
    if isinstance(value, bool):
        return b"\xf5" if value else b"\xf4"
    if isinstance(value, int):
        return _cbor_head(0, value) if value >= 0 else _cbor_head(1, -1 - value)
    if isinstance(value, str):
        raw = value.encode()
        return _cbor_head(3, len(raw)) + raw
    if isinstance(value, bytes):
        return _cbor_head(2, len(value)) + value
    if isinstance(value, list):
        return _cbor_head(4, len(value)) + b"".join(cbor(v) for v in value)
    if isinstance(value, dict):
        return _cbor_head(5, len(value)) + b"".join(cbor(k) + cbor(v) for k, v in value.items())
    raise TypeError(type(value).__name__)


# --- crosvm --------------------------------------------------------------------------------

VALID_NMI_PENDING, VALID_SIPI, VALID_SHADOW, VALID_SMM, VALID_PAYLOAD, VALID_TRIPLE = (
    1,
    2,
    4,
    8,
    16,
    32,
)


def crosvm_events(ev: uapi.kvm_vcpu_events) -> dict[str, Any]:
    """crosvm's ``From<&kvm_vcpu_events> for VcpuEvents``, its NMI quirk included."""
    f = ev.flags

    def opt(flag: int, value: Any) -> Any:
        return value if f & flag else None

    return {
        "exception": {
            "injected": ev.exception.injected != 0,
            "nr": ev.exception.nr,
            "has_error_code": ev.exception.has_error_code != 0,
            "pending": opt(VALID_PAYLOAD, ev.exception.pending != 0),
            "error_code": ev.exception.error_code,
        },
        "interrupt": {
            "injected": ev.interrupt.injected != 0,
            "nr": ev.interrupt.nr,
            "soft": ev.interrupt.soft != 0,
            "shadow": opt(VALID_SHADOW, ev.interrupt.shadow),
        },
        "nmi": {
            "injected": ev.interrupt.injected != 0,  # sic: crosvm reads interrupt.injected
            "pending": opt(VALID_NMI_PENDING, ev.nmi.pending != 0),
            "masked": ev.nmi.masked != 0,
        },
        "sipi_vector": opt(VALID_SIPI, ev.sipi_vector),
        "smi": {
            "smm": opt(VALID_SMM, ev.smi.smm != 0),
            "pending": ev.smi.pending != 0,
            "smm_inside_nmi": ev.smi.smm_inside_nmi != 0,
            "latched_init": ev.smi.latched_init,
        },
        "triple_fault": {"pending": opt(VALID_TRIPLE, ev.triple_fault.pending != 0)},
        "exception_payload": opt(VALID_PAYLOAD, ev.exception_payload),
    }


def _segment(s: uapi.kvm_segment) -> dict[str, int]:
    return {
        "base": s.base,
        "limit_bytes": s.limit,
        "selector": s.selector,
        "type_": s.type,
        "present": s.present,
        "dpl": s.dpl,
        "db": s.db,
        "s": s.s,
        "l": s.l,
        "g": s.g,
        "avl": s.avl,
    }


def crosvm_vcpu(
    state: VcpuState,
    *,
    vcpu_id: int = 0,
    tsc_offset: int = 0,
    nested: bytes = b"",
    layout: str = "hypervisor-state",
) -> dict[str, Any]:
    """``VcpuSnapshot`` as ciborium sees it; ``nested`` is the whole KVM_CAP_NESTED_STATE buffer."""
    assert state.regs is not None and state.sregs is not None and state.debugregs is not None
    assert state.xcrs is not None and state.msrs is not None and state.xsave is not None
    assert state.events is not None
    r, s, d = state.regs, state.sregs, state.debugregs
    names = [n for n, _ in uapi.kvm_regs._fields_]
    raw_xsave = bytes(state.xsave)
    events = crosvm_events(state.events)
    hypervisor_data: Any
    if layout == "hypervisor-state":
        hypervisor_data = {"interrupts": events, "nested_state": list(nested)}
    else:
        hypervisor_data = events
    xcrs = {x.xcr: x.value for x in list(state.xcrs.xcrs)[: state.xcrs.nr_xcrs]}
    return {
        "vcpu_id": vcpu_id,
        "regs": {n: getattr(r, n) for n in names},
        "sregs": {
            **{seg: _segment(getattr(s, seg)) for seg in ("cs", "ds", "es", "fs", "gs", "ss")},
            "tr": _segment(s.tr),
            "ldt": _segment(s.ldt),
            "gdt": {"base": s.gdt.base, "limit": s.gdt.limit},
            "idt": {"base": s.idt.base, "limit": s.idt.limit},
            "cr0": s.cr0,
            "cr2": s.cr2,
            "cr3": s.cr3,
            "cr4": s.cr4,
            "cr8": s.cr8,
            "efer": s.efer,
        },
        "debug_regs": {"db": list(d.db), "dr6": d.dr6, "dr7": d.dr7},
        "xcrs": dict(sorted(xcrs.items())),
        "msrs": dict(sorted(state.msrs.items())),
        "xsave": {
            "data": list(struct.unpack(f"<{len(raw_xsave) // 4}I", raw_xsave)),
            "len": len(raw_xsave),
        },
        "hypervisor_data": hypervisor_data,
        "tsc_offset": tsc_offset,
    }


MP_STATE_NAMES = ["Runnable", "Uninitialized", "InitReceived", "Halted", "SipiReceived", "Stopped"]


def crosvm_irqchip(states: list[VcpuState]) -> dict[str, Any]:
    """``IrqChipSnapshot`` of a kernel irqchip: per-vCPU LAPIC words, mp_state, apic_base."""
    lapics = []
    for st in states:
        assert st.lapic is not None and st.mp_state is not None and st.sregs is not None
        page = bytes(st.lapic)
        lapics.append({"regs": [struct.unpack_from("<I", page, 16 * i)[0] for i in range(64)]})
    pic = {"last_irr": 0, "irr": 0, "imr": 0, "isr": 0, "priority_add": 0, "irq_base": 8}
    return {
        "ioapic_state": {"base_address": 0xFEC00000, "ioregsel": 0, "ioapicid": 0},
        "lapic_state": lapics,
        "pic_state_1": pic,
        "pic_state_2": dict(pic, irq_base=0x70),
        "pit_state": {"channels": [], "flags": 0},
        "chip_specific_state": {
            "routes": [],
            "apic_base": [st.sregs.apic_base for st in states],  # type: ignore[union-attr]
            "interrupt_bitmap": [list(st.sregs.interrupt_bitmap) for st in states],  # type: ignore[union-attr]
        },
        "mp_state": [MP_STATE_NAMES[st.mp_state.mp_state] for st in states],  # type: ignore[union-attr]
    }
