"""The VM snapshot (kvmstate.vmstate) on this host's /dev/kvm: save, file, restore, refusals.

A real-mode guest adds 100 down to 1 into a word of its memory and
reports each step on port 0x10; the run is cut at an exit, the VM saved
(to a file), closed, restored into a new VM and finished there. The sum
and the sequence of reports must be those of a run never cut (5050 is
arithmetic, not a number from kvmstate). Bad input is refused before
anything is written; a write that fails midway closes the target VM.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import pytest

import kvmstate
from kvmstate import snapshot, uapi
from kvmstate.state import VcpuState
from kvmstate.vmstate import MemorySlot, VmLayout, VmMismatchError, VmRestoreError, VmState

CODE = 0x1000
SUM = 0x2000
PORT = 0x10
DONE = 0x11
# mov cx, 100 / loop: add [SUM], cx / mov ax, cx / out PORT, al / dec cx / jnz loop /
# out DONE, al / hlt (with an in-kernel irqchip HLT waits in the kernel: DONE ends the run)
PROGRAM = bytes.fromhex("b96400 010e0020 89c8 e610 49 75f5 e611 f4")
SLOTS = [(0, 0x10000), (0x100000, 0x20000)]  # the second slot: a page pattern to carry


def build(
    kvm: kvmstate.Kvm, *, vcpus: int = 2, slots: list[tuple[int, int]] = SLOTS
) -> kvmstate.Vm:
    vm = kvm.create_vm()
    vm.create_irqchip()
    vm.create_pit2()
    for gpa, size in slots:
        vm.add_memory(gpa, size)
    cpuid = kvm.get_supported_cpuid()
    for i in range(vcpus):
        vm.create_vcpu(i).set_cpuid2(cpuid)
    return vm


def load_program(vm: kvmstate.Vm) -> None:
    mem = vm.memory(0)
    mem[CODE : CODE + len(PROGRAM)] = PROGRAM
    if 1 in vm.memory_regions:
        vm.memory(1)[:] = bytes(range(256)) * (0x20000 // 256)
    vcpu = vm.vcpus[0]
    sregs = vcpu.get_sregs()
    for seg in (sregs.cs, sregs.ds):
        seg.base, seg.selector = 0, 0
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rip, regs.rflags = CODE, 2
    vcpu.set_regs(regs)


def run_reports(vcpu: kvmstate.Vcpu, count: int | None = None) -> list[int]:
    """The values written to PORT until DONE (or ``count`` of them)."""
    out: list[int] = []
    while count is None or len(out) < count:
        reason = vcpu.run()
        assert reason == uapi.ExitReason.IO, reason
        if vcpu.kvm_run.io.port == DONE:
            break
        assert vcpu.kvm_run.io.port == PORT
        out.append(vcpu.io_data()[0])
    return out


def close(vm: kvmstate.Vm) -> None:
    for vcpu in vm.vcpus:
        vcpu.close()
    vm.close()


def test_a_vm_saved_to_a_file_finishes_in_a_new_vm(kvm: kvmstate.Kvm, tmp_path: Path) -> None:
    vm = build(kvm)
    load_program(vm)
    first = run_reports(vm.vcpus[0], 37)
    saved = vm.save_state()
    chips = {c: vm.get_irqchip(c).to_bytes() for c in range(3)}
    close(vm)
    path = tmp_path / "vm.kvmstate"
    assert saved.write(path) == path.stat().st_size
    state = VmState.load(path)
    assert state.layout == saved.layout
    assert [bytes(m) for m in state.memory] == [bytes(m) for m in saved.memory]
    assert state.vcpus == saved.vcpus
    new = kvm.restore_vm(state)
    try:
        assert len(new.vcpus) == 2 and new.setup == {"irqchip": 1, "pit": 0}
        # A fresh read of every VM part is what was saved (the clock runs on; the PIT's
        # count_load_time is reset by KVM_SET_PIT2, which reloads the count).
        assert {c: new.get_irqchip(c).to_bytes() for c in range(3)} == chips
        pit, again = saved.pit, new.get_pit2()
        assert pit is not None
        for a, b in zip(pit.channels, again.channels, strict=True):
            assert _channel(a) == _channel(b)
        assert saved.clock is not None and new.get_clock().clock >= saved.clock.clock
        rest = run_reports(new.vcpus[0])
        assert first + rest == [n & 0xFF for n in range(100, 0, -1)]
        assert struct.unpack_from("<H", new.memory(0), SUM)[0] == sum(range(1, 101))
        assert bytes(new.memory(1)[:512]) == bytes(range(256)) * 2
    finally:
        close(new)


def _channel(c: uapi.kvm_pit_channel_state) -> dict[str, int]:
    return {k: v for k, v in c.to_dict().items() if k != "count_load_time"}


def test_vm_restore_state_into_a_vm_built_alike(kvm: kvmstate.Kvm) -> None:
    vm = build(kvm, vcpus=1)
    load_program(vm)
    run_reports(vm.vcpus[0], 10)
    state = vm.save_state()
    close(vm)
    target = state.layout.build(kvm)
    target.restore_state(VmState.from_bytes(state.to_bytes()))
    try:
        assert run_reports(target.vcpus[0]) == list(range(90, 0, -1))
        fresh = target.vcpus[0].save_state()
        assert fresh.regs is not None and fresh.regs.rip == CODE + len(PROGRAM) - 1  # at HLT
    finally:
        close(target)


def test_saving_completes_a_pending_io_exit(kvm: kvmstate.Kvm) -> None:
    vm = build(kvm, vcpus=1)
    load_program(vm)
    run_reports(vm.vcpus[0], 1)
    assert vm.vcpus[0].kvm_run.exit_reason == uapi.KVM_EXIT_IO
    state = vm.save_state()
    try:
        regs = state.vcpus[0].regs
        assert regs is not None and regs.rip == CODE + 11  # past the OUT, at DEC
    finally:
        close(vm)


# --- the file format -----------------------------------------------------------------------


@pytest.fixture
def saved(kvm: kvmstate.Kvm) -> VmState:
    vm = build(kvm, vcpus=1, slots=[(0, 0x10000)])
    load_program(vm)
    try:
        return vm.save_state()
    finally:
        close(vm)


def test_a_vm_file_is_a_1_1_file_whose_vcpus_a_1_0_reader_sees(saved: VmState) -> None:
    data = saved.to_bytes()
    assert data[:8] == b"KVMSTATE" and struct.unpack_from("<HH", data, 8) == (1, 1)
    # loads_vm is what a 1.0 reader runs: it skips the VM records.
    assert snapshot.loads_vm(data) == saved.vcpus
    stream = io.BytesIO()
    saved.write(stream)
    assert stream.getvalue() == data
    stream.seek(0)
    assert VmState.load(stream).vcpus == saved.vcpus


def test_an_older_vcpu_file_still_loads_and_is_not_a_vm(saved: VmState) -> None:
    old = bytearray(saved.vcpus[0].to_bytes())
    struct.pack_into("<H", old, 10, 0)  # minor 0: as a 1.0 writer stamped it
    assert VcpuState.from_bytes(bytes(old)) == saved.vcpus[0]
    with pytest.raises(ValueError, match=r"no 'vm' record.*use loads_vm"):
        VmState.from_bytes(bytes(old))
    with pytest.raises(ValueError, match="no 'vm' record"):
        VmState.load(io.BytesIO(bytes(old)))


def test_a_newer_major_version_is_refused(saved: VmState) -> None:
    data = bytearray(saved.to_bytes())
    struct.pack_into("<H", data, 8, 2)
    for load in (VmState.from_bytes, lambda d: VmState.load(io.BytesIO(d))):
        with pytest.raises(ValueError, match=r"format 2\.1 is not readable .* reads 1\.x"):
            load(bytes(data))


def test_a_foreign_file_is_refused(saved: VmState) -> None:
    for data in (b"QEVM\x00\x00\x00\x03" + bytes(64), b"", b"KVMSTA"):
        with pytest.raises(ValueError, match="not a kvmstate file"):
            VmState.from_bytes(data)
        with pytest.raises(ValueError, match="not a kvmstate file"):
            VmState.load(io.BytesIO(data))


@pytest.mark.parametrize("keep", [0.0, 0.1, 0.5, 0.9, 0.999, -1])
def test_a_truncated_file_is_refused_naming_what_is_cut(saved: VmState, keep: float) -> None:
    data = saved.to_bytes()
    cut = data[: len(data) - 1] if keep == -1 else data[: 12 + int((len(data) - 12) * keep)]
    for load in (VmState.from_bytes, lambda d: VmState.load(io.BytesIO(d))):
        with pytest.raises(ValueError, match=r"truncated|only .* remain|no 'vm' record"):
            load(cut)


# --- refusals before anything is written, and a failure midway ----------------------------


def untouched(vm: kvmstate.Vm) -> bool:
    return not vm.closed and not any(vm.memory(0)[CODE : CODE + len(PROGRAM)])


def test_a_different_memory_layout_is_refused_naming_the_slot(
    kvm: kvmstate.Kvm, saved: VmState
) -> None:
    target = build(kvm, vcpus=1, slots=[(0, 0x20000)])
    try:
        with pytest.raises(VmMismatchError, match=r"memory layout: saved slot 0 0x0\.\.0x10000, "
                           r"target slot 0 0x0\.\.0x20000"):  # fmt: skip
            target.restore_state(saved)
        assert untouched(target)
    finally:
        close(target)


def test_a_different_vcpu_count_is_refused(kvm: kvmstate.Kvm, saved: VmState) -> None:
    target = build(kvm, vcpus=2, slots=[(0, 0x10000)])
    try:
        with pytest.raises(VmMismatchError, match="vCPU count: saved 1, target 2"):
            target.restore_state(saved)
        assert untouched(target)
    finally:
        close(target)


def test_another_vendors_state_is_refused(kvm: kvmstate.Kvm, saved: VmState) -> None:
    here = saved.vendor
    assert here in ("AuthenticAMD", "GenuineIntel")
    other = b"GenuineIntel" if here == "AuthenticAMD" else b"AuthenticAMD"
    cpuid = saved.vcpus[0].cpuid
    assert cpuid is not None
    leaf0 = next(e for e in cpuid.items() if e.function == 0)
    leaf0.ebx, leaf0.edx, leaf0.ecx = struct.unpack("<3I", other)
    target = build(kvm, vcpus=1, slots=[(0, 0x10000)])
    try:
        with pytest.raises(VmMismatchError, match=f"vendor: saved {other.decode()}, target {here}"):
            target.restore_state(saved)
        assert untouched(target)
        with pytest.raises(VmMismatchError, match="vendor"):
            kvm.restore_vm(saved)  # refused before a VM is made
    finally:
        close(target)


def test_a_short_memory_image_is_refused(kvm: kvmstate.Kvm, saved: VmState) -> None:
    saved.memory[0] = bytes(saved.memory[0])[:-4096]
    with pytest.raises(
        ValueError, match=r"memory: slot 0 0x0\.\.0x10000 is 65536 bytes, its image 61440"
    ):
        kvm.restore_vm(saved)


def test_a_write_failing_midway_names_the_part_and_closes_the_vm(
    kvm: kvmstate.Kvm, saved: VmState
) -> None:
    sregs = saved.vcpus[0].sregs
    assert sregs is not None
    sregs.cr0 |= 1 << 31  # paging without protection: KVM_SET_SREGS refuses it
    sregs2 = saved.vcpus[0].sregs2
    if sregs2 is not None:
        sregs2.cr0 |= 1 << 31
    target = saved.layout.build(kvm)
    vcpus = target.vcpus
    with pytest.raises(VmRestoreError) as exc:
        target.restore_state(saved)
    assert exc.value.part == "vcpu 0: sregs"
    assert exc.value.errno is not None and "the target VM was closed" in str(exc.value)
    assert target.closed and all(v.closed for v in vcpus)


def test_layout_json_is_checked(saved: VmState) -> None:
    good = saved.layout.to_json()
    assert VmLayout.from_json(good) == saved.layout
    for bad, match in (
        ({**good, "slots": [{"slot": 0, "guest_phys_addr": 0, "size": 100}]}, "page multiple"),
        ({**good, "vcpu_ids": [True]}, r"vcpu_ids\[0\]: expected an int"),
        ({**good, "bogus": 1}, r"unknown keys \['bogus'\]"),
        ({**good, "tss_addr": 1 << 40}, "does not fit in 31 bits"),
    ):
        with pytest.raises(ValueError, match=match):
            VmLayout.from_json(bad)
    assert MemorySlot(0, 0x1000, 0x2000).__str__() == "slot 0 0x1000..0x3000"
