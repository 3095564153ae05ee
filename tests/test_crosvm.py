"""kvmstate.formats.crosvm: vcpu<N> (and irqchip) fragments written per crosvm's serde.

The fragments come from tests/support/vmm_files.py, which follows crosvm's
``From`` conversions and ciborium's encoding apart from the library, fed
with vCPU state saved from the real /dev/kvm and with the nested states
tests/test_check.py builds. Inside the emulated AMD guest a guest-mode
state saved by a nested KVM goes through a fragment into a fresh vCPU.
"""

from __future__ import annotations

import contextlib
import doctest
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings

import kvmstate
from kvmstate import uapi
from kvmstate.check import check
from kvmstate.formats import cbor, crosvm
from kvmstate.state import VcpuState
from kvmstate.uapi import VcpuEventsFlag
from tests.kvm_fixtures import NO_KVM
from tests.support import vmm_files
from tests.support.states import restored_in_a_fresh_vcpu, svm_guest_saved
from tests.support.vmm_files import crosvm_irqchip, crosvm_vcpu
from tests.test_check import BASELINES

needs_kvm = pytest.mark.skipif(NO_KVM is not None, reason=str(NO_KVM))
EXACT = ("regs", "xcrs", "xsave")


@pytest.fixture
def states(kvm: kvmstate.Kvm) -> Iterator[list[VcpuState]]:
    """Two vCPUs of one VM with an in-kernel irqchip, saved from the real KVM."""
    with kvm.create_vm() as vm:
        vm.create_irqchip()
        out = []
        for i in range(2):
            with vm.create_vcpu(i) as vcpu:
                vcpu.set_cpuid2(kvm.get_supported_cpuid())
                regs = vcpu.get_regs()
                regs.rax, regs.r15, regs.rip = 0xA5A5 + i, (1 << 64) - 1, 0x7C00 + i
                vcpu.set_regs(regs)
                debug = vcpu.get_debugregs()
                debug.db[1] = 0x1234
                vcpu.set_debugregs(debug)
                out.append(vcpu.save_state())
        yield out


def _fragment(state: VcpuState, **kwargs: Any) -> bytes:
    return vmm_files.cbor(crosvm_vcpu(state, **kwargs))


def _masked_sregs(state: VcpuState) -> bytes:
    """The kernel's sregs as crosvm gives them back: unusable = !present, no apic_base/bitmap."""
    assert state.sregs is not None
    sregs = uapi.kvm_sregs.from_bytes(state.sregs.to_bytes())
    for seg in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"):
        s = getattr(sregs, seg)
        s.unusable = 0 if s.present else 1
        s.padding = 0
    sregs.apic_base = 0
    for i in range(4):
        sregs.interrupt_bitmap[i] = 0
    return sregs.to_bytes()


# --- reading ---------------------------------------------------------------------------------


@needs_kvm
def test_the_vcpu_fragment_holds_the_kernels_parts(states: list[VcpuState]) -> None:
    want = states[1]
    data = _fragment(want, vcpu_id=1, tsc_offset=(1 << 64) - 5)
    snap = crosvm.load(data)
    assert (snap.vcpu_id, snap.tsc_offset, snap.layout) == (1, (1 << 64) - 5, "hypervisor-state")
    got = snap.state
    for part in EXACT:
        assert got.part_bytes(part) == want.part_bytes(part), part
    assert got.msrs == want.msrs
    assert got.sregs is not None and got.sregs.to_bytes() == _masked_sregs(want)
    assert got.debugregs is not None and want.debugregs is not None
    assert list(got.debugregs.db) == list(want.debugregs.db) and got.debugregs.db[1] == 0x1234
    assert (got.debugregs.dr6, got.debugregs.dr7) == (want.debugregs.dr6, want.debugregs.dr7)
    # A fresh vCPU's events have no payload and no injected interrupt: all of them survive.
    assert got.events is not None and got.events.to_bytes() == want.part_bytes("events")
    assert set(got.absent) == {"cpuid", "tsc_khz", "fpu", "sregs2", "lapic", "mp_state", "nested"}
    assert "KVM_CAP_NESTED_STATE was 0" in got.absent["nested"]
    assert any("irqchip fragment" in n for n in snap.notes)


@needs_kvm
def test_the_irqchip_fragment_completes_the_state(states: list[VcpuState]) -> None:
    irqchip = vmm_files.cbor(crosvm_irqchip(states))
    for i, want in enumerate(states):
        got = crosvm.read_vcpu(_fragment(want, vcpu_id=i), irqchip=irqchip)
        assert got.sregs is not None and want.sregs is not None
        assert got.sregs.apic_base == want.sregs.apic_base != 0
        assert list(got.sregs.interrupt_bitmap) == list(want.sregs.interrupt_bitmap)
        assert got.mp_state is not None and got.mp_state.to_bytes() == want.part_bytes("mp_state")
        # crosvm keeps the first 32 bits of each 16-byte APIC register slot.
        page = bytearray(16 * 64)
        kernel = want.part_bytes("lapic")
        for reg in range(64):
            page[16 * reg : 16 * reg + 4] = kernel[16 * reg : 16 * reg + 4]
        assert got.lapic is not None and got.lapic.to_bytes() == bytes(page)
        assert {"lapic", "mp_state"}.isdisjoint(got.absent)
    parts = crosvm.irqchip_parts(irqchip, 0)
    assert set(parts) == {"lapic", "mp_state", "apic_base", "interrupt_bitmap"}
    with pytest.raises(ValueError, match=r"irqchip: no LAPIC for vCPU 2 \(2 saved\)"):
        crosvm.irqchip_parts(irqchip, 2)


@needs_kvm
def test_events_follow_crosvms_rules(states: list[VcpuState]) -> None:
    state = states[0]
    ev = state.events
    assert ev is not None
    ev.interrupt.injected, ev.interrupt.nr = 1, 0x30
    ev.nmi.injected = 0
    ev.exception.pending, ev.exception.nr = 1, 14
    ev.exception_has_payload, ev.exception_payload = 0, 0xDEAD000
    ev.flags |= VcpuEventsFlag.PAYLOAD
    got = crosvm.read_vcpu(_fragment(state)).events
    assert got is not None
    # crosvm's save copies interrupt.injected into nmi.injected ...
    assert got.nmi.injected == 1
    # ... and its restore claims a payload whenever VALID_PAYLOAD is set.
    assert got.exception_has_payload == 1 and got.exception_payload == 0xDEAD000
    assert got.exception.pending == 1 and got.flags == ev.flags
    # The writer here keeps the real NMI bit.
    assert crosvm.read_vcpu(crosvm.write_vcpu(state)).events.nmi.injected == 0  # type: ignore[union-attr]


@needs_kvm
@pytest.mark.parametrize(("name", "cap"), [("svm_guest", 4224), ("vmx_guest", 8320),
                                           ("vmx_root", 8320), ("svm_gif", 4224)])  # fmt: skip
def test_nested_state_is_the_whole_buffer(states: list[VcpuState], name: str, cap: int) -> None:
    make, facts = BASELINES[name]
    nested = make()
    buffer = nested.to_bytes().ljust(cap, b"\0")
    data = _fragment(states[0], nested=buffer)
    got = crosvm.read_vcpu(data).nested
    assert got is not None and got == nested and got.capacity == cap  # header-only kept
    assert bytes(got.buffer) == buffer
    assert check(got, facts) == []
    state = states[0]
    state.nested = got
    assert crosvm.load(data).with_vcpu(state) == data
    assert cbor.loads(crosvm.write_vcpu(state))["hypervisor_data"]["nested_state"] == list(buffer)


# --- writing ------------------------------------------------------------------------------------


@needs_kvm
def test_unmodified_round_trip_is_byte_identical(states: list[VcpuState]) -> None:
    for layout in ("hypervisor-state", "events"):
        data = _fragment(states[1], vcpu_id=1, tsc_offset=99, layout=layout)
        snap = crosvm.load(data)
        assert snap.layout == layout
        assert snap.with_vcpu(snap.state) == data
        assert snap.with_vcpu(states[1]) == data  # the kernel's own state says the same
        assert crosvm.with_vcpu(data, snap.state) == data


@needs_kvm
def test_write_vcpu_is_what_crosvm_writes(states: list[VcpuState]) -> None:
    state = states[0]
    assert state.events is not None and not state.events.interrupt.injected  # no NMI quirk here
    data = crosvm.write_vcpu(state, vcpu_id=0, tsc_offset=7)
    assert data == _fragment(state, tsc_offset=7)
    assert crosvm.is_vcpu_snapshot(data)


@needs_kvm
def test_a_change_rewrites_only_that_value(states: list[VcpuState]) -> None:
    data = _fragment(states[0], nested=BASELINES["vmx_guest"][0]().to_bytes(), tsc_offset=5)
    snap = crosvm.load(data)
    state = snap.state
    assert state.regs is not None and state.nested is not None
    state.regs.rip = 0xBEEF  # changed in place: the fragment's meaning was kept at load
    state.nested.vmx.vmcs12_pa = 0x5000
    out = snap.with_vcpu(state, tsc_offset=6)
    old, new = cbor.map_items(data), cbor.map_items(out)
    assert [k for k, _, _ in new] == [k for k, _, _ in old] == list(crosvm.FIELDS)
    changed = [k for (k, _, a), (_, _, b) in zip(old, new, strict=True) if a != b]
    assert changed == ["regs", "hypervisor_data", "tsc_offset"]
    again = crosvm.load(out)
    assert again.state.regs.rip == 0xBEEF and again.tsc_offset == 6  # type: ignore[union-attr]
    assert again.state.nested is not None and again.state.nested.vmx.vmcs12_pa == 0x5000
    hv_old, hv_new = cbor.map_items(old[7][2]), cbor.map_items(new[7][2])
    assert hv_old[0][2] == hv_new[0][2]  # the events' bytes did not move


@needs_kvm
def test_unknown_keys_stay(states: list[VcpuState]) -> None:
    value = crosvm_vcpu(states[0])
    value["future_field"] = {"x": [1, 2]}
    data = vmm_files.cbor(value)
    snap = crosvm.load(data)
    assert snap.unmapped == {"future_field": {"x": [1, 2]}}
    snap.state.regs.rax = 1  # type: ignore[union-attr]
    assert cbor.loads(snap.with_vcpu(snap.state))["future_field"] == {"x": [1, 2]}


@needs_kvm
def test_the_older_layout_has_no_room_for_nested_state(states: list[VcpuState]) -> None:
    data = _fragment(states[0], layout="events")
    snap = crosvm.load(data)
    assert "before 2025-07-29" in snap.state.absent["nested"]
    state = snap.state
    state.nested = BASELINES["svm_guest"][0]()
    with pytest.raises(ValueError, match=r"before 2025-07-29\) has no nested state"):
        snap.with_vcpu(state)
    state.nested = None
    assert state.regs is not None
    state.regs.rax = 3
    assert crosvm.read_vcpu(snap.with_vcpu(state)).regs.rax == 3  # type: ignore[union-attr]


def test_write_vcpu_names_the_parts_it_needs() -> None:
    with pytest.raises(ValueError, match=r"regs is absent \(not in this state\); crosvm"):
        crosvm.write_vcpu(VcpuState())
    with pytest.raises(TypeError, match="VcpuState"):
        crosvm.write_vcpu(b"")  # type: ignore[arg-type]


# --- hostile fragments ---------------------------------------------------------------------------


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    *parents, last = path.split(".")

    def change(doc: dict[str, Any]) -> None:
        target: Any = doc
        for p in parents:
            target = target[int(p)] if isinstance(target, list) else target[p]
        if isinstance(target, list):
            target[int(last)] = value
        else:
            target[last] = value

    return change


def _nested(size: int, length: int = 4224, fmt: int = 1) -> list[int]:
    raw = bytearray(length)
    struct.pack_into("<HHI", raw, 0, 0, fmt, size)
    return list(raw)


def _drop(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda doc: doc.pop(key)


HOSTILE: dict[str, tuple[Callable[[dict[str, Any]], Any], str]] = {
    "nested 8319 with size 8320": (
        _set("hypervisor_data.nested_state", _nested(8320, 8319, 0)),
        r"size field says 8320 bytes, the array holds 8319",
    ),
    "nested byte 256": (
        _set("hypervisor_data.nested_state", [256] * 200),
        r"nested_state\[0\]: expected an unsigned 8-bit integer, found the integer 256",
    ),
    "nested short": (
        _set("hypervisor_data.nested_state", [0] * 100),
        r"nested_state: 100 bytes, the header alone is 128",
    ),
    "nested as bytes": (
        _set("hypervisor_data.nested_state", b"\0" * 4224),
        r"nested_state: expected an array, found a byte string",
    ),
    "nested format": (
        _set("hypervisor_data.nested_state", _nested(128, fmt=9)),
        r"unknown nested state format 9",
    ),
    "nested size 0": (_set("hypervisor_data.nested_state", _nested(0)), r"size field says 0 bytes"),
    "negative register": (
        _set("regs.rax", -1),
        r"vcpu: regs\.rax: expected an unsigned 64-bit integer, found the integer -1",
    ),
    "register text": (_set("regs.rip", "0xfff0"), r"regs\.rip: .*found a text string"),
    "segment bool": (_set("sregs.cs.present", True), r"sregs\.cs\.present: .*found a bool"),
    "limit too wide": (
        _set("sregs.gdt.limit", 1 << 16),
        r"sregs\.gdt\.limit: expected an unsigned 16-bit",
    ),
    "xsave len lies": (
        _set("xsave.len", 1 << 40),
        r"xsave\.len: 1099511627776 bytes is not an XSAVE area",
    ),
    "xsave negative len": (
        _set("xsave.len", -4096),
        r"xsave\.len: expected an unsigned 64-bit integer, found the integer -4096",
    ),
    "xsave short data": (
        lambda d: d["xsave"]["data"].pop(),
        r"xsave\.data: 1023 words for 4096 bytes",
    ),
    "too many xcrs": (_set("xcrs", {i: 0 for i in range(17)}), r"xcrs: 17 XCRs, kvm_xcrs holds 16"),
    "msr key text": (_set("msrs", {"16": 0}), r"msrs: key: expected an unsigned 32-bit"),
    "events missing": (
        lambda d: d["hypervisor_data"]["interrupts"].pop("smi"),
        r"hypervisor_data\.interrupts: missing smi",
    ),
    "no tsc_offset": (_drop("tsc_offset"), r"vcpu: missing tsc_offset"),
    "db of 3": (lambda d: d["debug_regs"]["db"].pop(), r"debug_regs\.db: 3 items, expected 4"),
}


@needs_kvm
@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_values_are_refused_naming_the_place(states: list[VcpuState], case: str) -> None:
    change, message = HOSTILE[case]
    doc = crosvm_vcpu(states[0])
    change(doc)
    with pytest.raises(ValueError, match=message) as info:
        crosvm.load(vmm_files.cbor(doc))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", r"vcpu: offset 0: truncated"),
        (b"\x80", r"vcpu: offset 0: expected a map"),
        (
            b'{"vcpu_id": 0}',
            r"vcpu: JSON, not CBOR \(crosvm wrote JSON fragments before 2025-01-08\)",
        ),
        (b"\xbb" + b"\xff" * 8, r"map of 18446744073709551615 items cannot fit"),
        (
            bytes.fromhex("a1 67") + b"vcpu_id" + b"\x81" * 10_000 + b"\x00",
            r"nested deeper than 64",
        ),
        (bytes.fromhex("a1 67") + b"vcpu_id" + b"\x00", r"vcpu: missing regs, sregs"),
        (bytes.fromhex("a1 67") + b"vcpu_id" + b"\xc1\x00", r"offset 9: tag 1 is not supported"),
    ],
)
def test_hostile_fragments_are_refused_in_one_line(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        crosvm.load(data)
    assert "\n" not in str(info.value)


@needs_kvm
def test_every_truncation_is_refused(states: list[VcpuState]) -> None:
    data = _fragment(states[0], nested=BASELINES["svm_guest"][0]().to_bytes())
    for cut in range(0, len(data), max(1, len(data) // 500)):
        with pytest.raises(ValueError):
            crosvm.load(data[:cut])


_SMALL = vmm_files.cbor({"vcpu_id": 0, "regs": {"rax": 1}, "xcrs": {0: 1}, "msrs": {16: 5}})


@given(vmm_files.pokes(_SMALL))
@settings(max_examples=500, deadline=None)
def test_fuzz_mutations_give_value_errors(pokes: list[tuple[int, int]]) -> None:
    vmm_files.loads_or_refuses_in_one_line(crosvm.load, _SMALL, pokes)


def test_irqchip_hostile() -> None:
    good = {"lapic_state": [{"regs": [0] * 64}], "mp_state": ["Halted"]}
    assert crosvm.irqchip_parts(vmm_files.cbor(good), 0)["mp_state"].mp_state == 3
    bad = dict(good, mp_state=["Sleeping"])
    with pytest.raises(ValueError, match=r"irqchip\.mp_state\[0\]: unknown state 'Sleeping'"):
        crosvm.irqchip_parts(vmm_files.cbor(bad), 0)
    with pytest.raises(ValueError, match=r"lapic_state\[0\]\.regs: 63 items, expected 64"):
        crosvm.irqchip_parts(vmm_files.cbor(dict(good, lapic_state=[{"regs": [0] * 63}])), 0)
    with pytest.raises(ValueError, match=r"irqchip: offset 0: truncated"):
        crosvm.irqchip_parts(b"", 0)


# --- paths and detection --------------------------------------------------------------------------


@needs_kvm
def test_paths_and_detection(states: list[VcpuState], tmp_path: Path) -> None:
    data = _fragment(states[0])
    (tmp_path / "vcpu").mkdir()
    path = tmp_path / "vcpu" / "vcpu0"
    path.write_bytes(data)
    irq = tmp_path / "irqchip"
    irq.write_bytes(vmm_files.cbor(crosvm_irqchip(states)))
    assert crosvm.is_vcpu_snapshot(path) and crosvm.is_vcpu_snapshot(data)
    assert not crosvm.is_vcpu_snapshot(irq) and not crosvm.is_vcpu_snapshot(tmp_path / "none")
    assert not crosvm.is_vcpu_snapshot(b"") and not crosvm.is_vcpu_snapshot(None)  # type: ignore[arg-type]
    big = vmm_files.cbor({f"k{i}": i for i in range(30)} | {"vcpu_id": 0})
    assert not crosvm.is_vcpu_snapshot(big)
    first = vmm_files.cbor({"vcpu_id": 0, **{f"k{i}": i for i in range(30)}})
    assert crosvm.is_vcpu_snapshot(first)  # a 2-byte map head
    state = crosvm.read_vcpu(path, irqchip=irq)
    assert state.lapic is not None
    with pytest.raises(ValueError, match=f"{path}: "):
        path.write_bytes(data[:-3])
        crosvm.load(path)
    with pytest.raises(TypeError, match="bytes or a path"):
        crosvm.load(1.5)  # type: ignore[arg-type]


def test_module_examples() -> None:
    result = doctest.testmod(crosvm)
    assert result.attempted >= 2 and result.failed == 0


# --- real nested state, in the emulated AMD guest -----------------------------------------


@pytest.mark.svm_guest
def test_guest_mode_state_through_a_fragment_into_a_fresh_vcpu() -> None:
    with contextlib.ExitStack() as stack:
        kvm = stack.enter_context(kvmstate.Kvm())
        # crosvm rebuilds CPUID itself, as the helper's vCPUs get it.
        make, _first, saved = svm_guest_saved(stack, kvm)
        assert saved.nested is not None
        cap = kvm.nested_state_size
        buffer = bytes(saved.nested.buffer[:cap])
        data = vmm_files.cbor(crosvm_vcpu(saved, nested=buffer))
        irq = vmm_files.cbor(crosvm_irqchip([saved]))
        read = crosvm.read_vcpu(data, irqchip=irq)
        assert read.nested is not None and read.nested.capacity == cap
        parts = ("regs", "xsave", "lapic", "mp_state")
        again = restored_in_a_fresh_vcpu(make, read, saved, parts)
        # Written back (the TSC has moved on), the nested state is the same bytes.
        out = crosvm.load(data).with_vcpu(again)
        assert cbor.loads(out)["hypervisor_data"] == cbor.loads(data)["hypervisor_data"]
