"""kvm_run whole: its exits by name, its repr, and the sync-regs area, offline and on /dev/kvm.

The layout itself is checked against gcc+gdb in tests/test_layout.py. Here the
guests are a few bytes of real-mode code (tests/test_kvm.py's load_real_mode)
run on this machine's KVM until the exit each test is about.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator

import pytest

import kvmstate
from kvmstate import describe, uapi
from kvmstate.errors import UnsupportedKvmError
from kvmstate.uapi import ExitReason, SyncRegs
from tests.test_kvm import load_real_mode

MEMBERS = set(uapi.kvm_run_exit.field_names()) - {"padding"}

# --- offline: the repr shows the exit's own member only ---------------------------------


@pytest.mark.parametrize("reason", sorted(uapi.EXIT_MEMBERS))
def test_repr_shows_only_the_member_the_exit_fills(reason: int) -> None:
    run = uapi.kvm_run()
    run.exit_reason = reason
    member = uapi.EXIT_MEMBERS[reason]
    text = repr(run)
    assert f"exit_reason={ExitReason(reason).name}," in text
    assert f" {member}=" in text
    assert not [m for m in MEMBERS - {member} if f" {m}=" in text]
    assert " s=" not in text and "padding" not in text


@pytest.mark.parametrize("reason", [ExitReason.HLT, ExitReason.SHUTDOWN, ExitReason.INTR])
def test_exits_without_payload_show_no_member(reason: ExitReason) -> None:
    run = uapi.kvm_run()
    run.exit_reason = reason
    run.io.port = 0x10  # stale bytes of an earlier exit stay out of the repr
    assert run.exit_member() is None
    assert not [m for m in MEMBERS if f" {m}=" in repr(run)]


def test_unknown_exit_reason_shows_in_hex_without_member() -> None:
    run = uapi.kvm_run()
    run.exit_reason = 0x99
    assert "exit_reason=0x99," in repr(run) and run.exit_member() is None


def test_emulation_failure_overlays_internal() -> None:
    run = uapi.kvm_run()
    run.exit_reason = uapi.KVM_EXIT_INTERNAL_ERROR
    run.internal.suberror = uapi.KVM_INTERNAL_ERROR_DELIVERY_EV
    assert run.exit_member() == "internal" and "suberror=DELIVERY_EV" in repr(run)
    run.internal.suberror = uapi.KVM_INTERNAL_ERROR_EMULATION
    run.emulation_failure.insn_size = 2
    run.emulation_failure.insn_bytes[:2] = [0x0F, 0x0B]
    assert run.exit_member() == "emulation_failure"
    assert "insn_size=2" in repr(run) and "0f0b" in repr(run)
    # The same bytes, seen as internal.data: data[1] starts with insn_size, then insn_bytes.
    assert run.internal.data[1] & 0xFFFFFF == 0x0B0F02


def test_system_event_reads_by_its_c_names() -> None:
    run = uapi.kvm_run()
    run.exit_reason = uapi.KVM_EXIT_SYSTEM_EVENT
    run.system_event.type = uapi.KVM_SYSTEM_EVENT_RESET
    run.system_event.ndata = 1
    run.system_event.data[0] = 0x1234
    assert run.system_event.flags == 0x1234  # the old name of data[0]
    assert "system_event=kvm_run_system_event(type=RESET, ndata=1, data=[0x1234," in repr(run)


def test_sync_regs_area_shows_when_asked_for() -> None:
    run = uapi.kvm_run()
    run.kvm_valid_regs = uapi.KVM_SYNC_X86_REGS
    run.s.regs.regs.rip = 0xFFF0
    text = repr(run)
    assert "kvm_valid_regs=REGS" in text and "rip=0xfff0" in text


def test_kvm_run_dict_round_trip_and_fields() -> None:
    run = uapi.kvm_run()
    run.exit_reason = uapi.KVM_EXIT_MMIO
    run.mmio.phys_addr, run.mmio.len, run.mmio.is_write = 0x20000, 4, 1
    run.kvm_valid_regs = uapi.KVM_SYNC_X86_VALID_FIELDS
    run.s.regs.sregs.cr0 = 0x11
    back = uapi.kvm_run.from_dict(run.to_dict())
    assert back == run and back.mmio.phys_addr == 0x20000
    paths = {path for path, _, _ in describe.fields(run)}
    assert "mmio.phys_addr" in paths and "s.regs.sregs.cr0" in paths and "io.port" not in paths
    assert uapi.kvm_run.from_bytes(run.to_bytes()) == run


# --- on /dev/kvm: the exits a vCPU meets -------------------------------------------------

MMIO_BASE = 0x20000  # past the 64 KiB slot load_real_mode maps


def run_until(vcpu: kvmstate.Vcpu, *reasons: ExitReason, limit: int = 16) -> ExitReason | int:
    """KVM_RUN until an exit in ``reasons`` (bounded: a guest that never gets there fails)."""
    for _ in range(limit):
        reason = vcpu.run()
        if reason in reasons:
            return reason
    raise AssertionError(f"no {reasons} within {limit} exits, last {reason!r}")


def test_io_in_exit_and_its_completion(vm: kvmstate.Vm, vcpu: kvmstate.Vcpu) -> None:
    # in al, 0x20; out 0x10, al; hlt: the IN's data is what userspace leaves at data_offset.
    load_real_mode(vm, vcpu, bytes([0xE4, 0x20, 0xE6, 0x10, 0xF4]))
    assert vcpu.run() == ExitReason.IO
    run = vcpu.kvm_run
    assert (run.io.direction, run.io.port, run.io.size, run.io.count) == (0, 0x20, 1, 1)
    assert "io=kvm_run_io(direction=IN, size=1, port=0x20, count=1," in repr(run)
    mapping = memoryview(vcpu._run_map)  # type: ignore[arg-type]
    mapping[run.io.data_offset] = 0x5C
    assert vcpu.run() == ExitReason.IO and run.io.direction == uapi.KVM_EXIT_IO_OUT
    assert vcpu.io_data() == b"\x5c"
    mapping.release()
    assert run_until(vcpu, ExitReason.HLT) == ExitReason.HLT
    assert vcpu.kvm_run.exit_member() is None


def test_mmio_write_and_read_of_unmapped_memory(vm: kvmstate.Vm, vcpu: kvmstate.Vcpu) -> None:
    code = b"".join([
        bytes([0xB8, 0x00, 0x20, 0x8E, 0xD8]),  # mov ax, 0x2000; mov ds, ax (ds base 0x20000)
        bytes([0xC6, 0x06, 0x00, 0x00, 0x5A]),  # mov byte [0], 0x5a        (MMIO write)
        bytes([0xA0, 0x01, 0x00]),  # mov al, [1]                           (MMIO read)
        bytes([0xE6, 0x10, 0xF4]),  # out 0x10, al; hlt
    ])  # fmt: skip
    load_real_mode(vm, vcpu, code)
    assert vcpu.run() == ExitReason.MMIO
    mmio = vcpu.kvm_run.mmio
    assert (mmio.phys_addr, mmio.len, mmio.is_write, mmio.data[0]) == (MMIO_BASE, 1, 1, 0x5A)
    assert "mmio=kvm_run_mmio(phys_addr=0x20000, data=bytes.fromhex('5a" in repr(vcpu.kvm_run)
    assert vcpu.run() == ExitReason.MMIO
    assert (mmio.phys_addr, mmio.len, mmio.is_write) == (MMIO_BASE + 1, 1, 0)
    mmio.data[0] = 0x77  # the value the read returns
    assert vcpu.run() == ExitReason.IO
    assert vcpu.io_data() == b"\x77"


def load_flat_protected_mode(vm: kvmstate.Vm, vcpu: kvmstate.Vcpu, code: bytes) -> None:
    """``code`` at 0x1000, run in 32-bit protected mode with flat segments and no IDT."""
    load_real_mode(vm, vcpu, code)
    sregs = vcpu.get_sregs()
    sregs.cr0 |= 1  # PE
    for seg, kind, selector in ((sregs.cs, 11, 8), *((s, 3, 16) for s in (sregs.ds, sregs.ss))):
        seg.base, seg.limit, seg.selector, seg.type = 0, 0xFFFF_FFFF, selector, kind
        seg.s = seg.present = seg.db = seg.g = 1
    sregs.idt.base, sregs.idt.limit = 0, 0
    vcpu.set_sregs(sregs)


def test_triple_fault_is_a_shutdown_exit(vm: kvmstate.Vm, vcpu: kvmstate.Vcpu) -> None:
    # An IDT of limit 0 has no gate: #UD cannot be delivered (#GP), nor that (#DF), nor
    # that: a triple fault. (Real mode would not do: KVM's emulator ignores the IVT limit.)
    load_flat_protected_mode(vm, vcpu, bytes([0x0F, 0x0B]))  # ud2
    assert vcpu.run() == ExitReason.SHUTDOWN
    assert "exit_reason=SHUTDOWN," in repr(vcpu.kvm_run)
    assert vcpu.kvm_run.exit_member() is None


def test_mapping_is_the_vcpu_mmap_size(kvm: kvmstate.Kvm, vcpu: kvmstate.Vcpu) -> None:
    vcpu.kvm_run  # noqa: B018 - maps it
    assert vcpu._run_map is not None
    assert len(vcpu._run_map) == kvm.vcpu_mmap_size >= ctypes.sizeof(uapi.kvm_run)


def test_mapping_smaller_than_kvm_run_is_refused(
    vm: kvmstate.Vm, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A kernel whose vCPU mapping is smaller than the mirror: stand in for its answer,
    # as the Kvm handed it down to the VM (which passes it on to each vCPU).
    monkeypatch.setattr(vm, "vcpu_mmap_size", 2048)
    message = "2048 bytes, smaller than struct kvm_run"
    with vm.create_vcpu(0) as vcpu, pytest.raises(UnsupportedKvmError, match=message):
        vcpu.kvm_run  # noqa: B018


# --- sync regs ---------------------------------------------------------------------------


@pytest.fixture
def synced(vm: kvmstate.Vm, vcpu: kvmstate.Vcpu) -> Iterator[kvmstate.Vcpu]:
    """A vCPU whose KVM offers every x86 sync-regs part (skips, saying why, elsewhere)."""
    offered = vcpu.sync_regs_supported
    if offered != uapi.KVM_SYNC_X86_VALID_FIELDS:
        pytest.skip(f"KVM_CAP_SYNC_REGS is {offered!r} here, not REGS|SREGS|EVENTS")
    yield vcpu


def test_sync_regs_capability_is_the_kernels(vm: kvmstate.Vm, vcpu: kvmstate.Vcpu) -> None:
    assert vcpu.sync_regs_supported == vm.check_extension(uapi.KVM_CAP_SYNC_REGS)


def test_sync_regs_read_registers_at_an_exit(vm: kvmstate.Vm, synced: kvmstate.Vcpu) -> None:
    load_real_mode(vm, synced, bytes([0xB0, 0x42, 0xE6, 0x10, 0xF4]))  # mov al,0x42; out; hlt
    synced.sync_regs = SyncRegs.REGS | SyncRegs.SREGS | SyncRegs.EVENTS
    assert synced.kvm_run.kvm_valid_regs == uapi.KVM_SYNC_X86_VALID_FIELDS
    assert synced.run() == ExitReason.IO
    shared = synced.kvm_run.s.regs
    # Read before any KVM_GET_*: what KVM wrote into kvm_run at the exit.
    rip, rax = shared.regs.rip, shared.regs.rax
    # At the OUT or past it (KVM may finish the instruction on the next KVM_RUN), al loaded.
    assert rip in (0x1002, 0x1004) and rax & 0xFF == 0x42
    assert shared.regs == synced.get_regs()
    assert shared.sregs == synced.get_sregs()
    assert shared.events == synced.get_vcpu_events()
    assert synced.sync_regs == SyncRegs.REGS | SyncRegs.SREGS | SyncRegs.EVENTS  # kept


def test_sync_regs_write_registers_through_dirty_bits(
    vm: kvmstate.Vm, synced: kvmstate.Vcpu
) -> None:
    # mov al,0x42; out 0x10,al; out 0x10,al; hlt
    load_real_mode(vm, synced, bytes([0xB0, 0x42, 0xE6, 0x10, 0xE6, 0x10, 0xF4]))
    synced.sync_regs = SyncRegs.REGS
    assert synced.run() == ExitReason.IO and synced.io_data() == b"\x42"
    run = synced.kvm_run
    run.s.regs.regs.rax = 0x99
    run.s.regs.regs.rbx = 0xB0B
    synced.sync_regs_dirty = SyncRegs.REGS
    assert synced.run() == ExitReason.IO
    assert synced.io_data() == b"\x99"  # the second OUT saw the written al
    assert synced.sync_regs_dirty == 0  # KVM clears the bits it loaded
    assert run.s.regs.regs == synced.get_regs() and run.s.regs.regs.rbx == 0xB0B


def test_sync_regs_refuse_bad_parts(vcpu: kvmstate.Vcpu) -> None:
    with pytest.raises(TypeError, match="SyncRegs bits"):
        vcpu.sync_regs = True
    with pytest.raises(TypeError, match="SyncRegs bits"):
        vcpu.sync_regs_dirty = "REGS"  # type: ignore[assignment]
    for bad in (8, -1, 1 << 63):
        with pytest.raises(ValueError, match="not a set of SyncRegs bits"):
            vcpu.sync_regs = bad
    assert vcpu.kvm_run.kvm_valid_regs == 0  # nothing was written


def test_sync_regs_not_offered_are_refused(vcpu: kvmstate.Vcpu) -> None:
    # A KVM without the capability (kernels before 4.17, encrypted guests) answers 0:
    # not reachable here, so its answer is put where the vCPU caches it.
    vcpu._sync_regs_cap = 0
    with pytest.raises(UnsupportedKvmError, match="offers nothing here, not REGS"):
        vcpu.sync_regs = SyncRegs.REGS
    vcpu.sync_regs = 0  # asking for nothing is always fine


def test_borrowed_vcpu_asks_dev_kvm_for_sync_regs(vm: kvmstate.Vm, vcpu: kvmstate.Vcpu) -> None:
    with contextlib.closing(kvmstate.Vcpu.borrow(vcpu.fileno())) as borrowed:
        assert borrowed.sync_regs_supported == vm.check_extension(uapi.KVM_CAP_SYNC_REGS)


def test_closed_vcpu_refuses_sync_regs(vm: kvmstate.Vm) -> None:
    vcpu = vm.create_vcpu(0)
    vcpu.close()
    for attempt in (
        lambda: vcpu.sync_regs,
        lambda: vcpu.sync_regs_dirty,
        lambda: setattr(vcpu, "sync_regs", SyncRegs.REGS),
        lambda: setattr(vcpu, "sync_regs_dirty", 0),
    ):
        with pytest.raises(ValueError, match="closed Vcpu"):
            attempt()
