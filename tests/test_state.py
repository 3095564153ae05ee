"""Whole-vCPU save/restore against the real /dev/kvm, through every format."""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable

import pytest

import kvmstate
from kvmstate import snapshot, uapi
from kvmstate.state import PARTS, StateError, VcpuState

# MSRs that count time: between two saves they move on, so they may only grow.
# HV_X64_MSR_VP_RUNTIME is the vCPU thread's run time, restored as an offset (hyperv.c).
MSR_TSC = 0x10
CLOCK_MSRS = {MSR_TSC: "TSC", 0x40000010: "HV_X64_MSR_VP_RUNTIME"}
# Except that KVM takes a host write of the TSC within one second (of TSC cycles) of the
# VM's own TSC for an attempt to synchronize vCPUs, and keeps the VM's (kvm_synchronize_tsc):
# a state restored into a VM made just after the saved one may read up to a second earlier.
# HV_X64_MSR_TIME_REF_COUNT is the VM's Hyper-V reference time, from its kvmclock: KVM ignores
# a host write of it (kvm_hv_set_msr_pw); KVM_SET_CLOCK, a VM ioctl, carries it, not a vCPU's.
VM_CLOCK_MSRS = {0x40000020: "HV_X64_MSR_TIME_REF_COUNT"}
DISTINCT_MSRS = {
    0x174: 0x10,  # SYSENTER_CS
    0x175: 0x1234_5000,  # SYSENTER_ESP (32-bit on AMD)
    0x176: 0x0567_8000,  # SYSENTER_EIP
    0xC0000081: 0x0023_0010_0000_0000,  # STAR
    0xC0000082: 0xFFFF_FFFF_8100_0000,  # LSTAR
    0xC0000102: 0xFFFF_8880_1234_0000,  # KERNEL_GS_BASE
}


def make_distinctive(vcpu: kvmstate.Vcpu) -> None:
    regs = vcpu.get_regs()
    for i, name in enumerate(regs.field_names()):
        setattr(regs, name, 0x5A5A_0000 + i)
    regs.rflags = 0x246
    vcpu.set_regs(regs)
    sregs = vcpu.get_sregs()
    sregs.ds.base, sregs.ds.selector = 0x20000, 0x2000
    sregs.gdt.base, sregs.gdt.limit = 0x5000, 0x7F
    vcpu.set_sregs(sregs)
    vcpu.set_msrs(DISTINCT_MSRS)
    xsave = vcpu.get_xsave()
    xsave.region[40] = 0xDEADBEEF  # XMM0's first dword (legacy area byte 160)
    vcpu.set_xsave(xsave)
    events = vcpu.get_vcpu_events()
    events.nmi.masked = 1
    events.flags = 0
    vcpu.set_vcpu_events(events)
    debugregs = vcpu.get_debugregs()
    debugregs.db[0] = 0x1000
    debugregs.dr7 = 0x401
    vcpu.set_debugregs(debugregs)


def assert_same(a: VcpuState, b: VcpuState) -> None:
    """Part by part; the clocks (CLOCK_MSRS) may only have moved forward, and the VM's
    (VM_CLOCK_MSRS, in the MSR list of KVMs with Hyper-V) are not vCPU state."""
    assert a.msrs is not None and b.msrs is not None
    assert set(a.msrs) == set(b.msrs)
    for index in CLOCK_MSRS.keys() & a.msrs.keys():
        slack = (a.tsc_khz or 0) * 1000 if index == MSR_TSC else 0
        assert b.msrs[index] >= a.msrs[index] - slack, CLOCK_MSRS[index]
    moving = (CLOCK_MSRS.keys() | VM_CLOCK_MSRS.keys()) & a.msrs.keys()
    kept = {index: (a.msrs.pop(index), b.msrs.pop(index)) for index in moving}
    try:
        assert a.differing_parts(b) == []
        assert a == b
    finally:
        for index, (value_a, value_b) in kept.items():
            a.msrs[index], b.msrs[index] = value_a, value_b


def test_save_reads_every_part_or_says_why(machine: Callable[[], kvmstate.Vcpu]) -> None:
    vcpu = machine()
    state = vcpu.save_state()
    for part in PARTS:
        if part == "fpu" and state.xsave is not None:
            assert state.fpu is None  # XSAVE holds the same x87/SSE state and more
            continue
        assert (getattr(state, part) is None) == (part in state.absent), part
    assert state.regs is not None and state.sregs is not None and state.msrs
    assert state.lapic is not None  # the irqchip exists
    if vcpu.nested_state_size == 0:
        assert "KVM_CAP_NESTED_STATE is 0" in state.absent["nested"]
    assert set(DISTINCT_MSRS) <= set(state.msrs)
    assert "VcpuState(rip=0xfff0" in repr(state)


def test_round_trip_into_a_fresh_vm(machine: Callable[[], kvmstate.Vcpu]) -> None:
    source = machine()
    make_distinctive(source)
    saved = source.save_state()
    assert saved.msrs is not None and saved.msrs[0xC0000082] == DISTINCT_MSRS[0xC0000082]
    target = machine()
    target.restore_state(saved)
    assert_same(saved, target.save_state())


@pytest.mark.parametrize(
    "through",
    [
        pytest.param(lambda s: VcpuState.from_bytes(s.to_bytes()), id="binary"),
        pytest.param(lambda s: snapshot.loads_vm(snapshot.dumps_vm([s]))[0], id="vm-file"),
        pytest.param(
            lambda s: snapshot.from_dict(json.loads(json.dumps(snapshot.to_dict(s)))), id="json"
        ),
        pytest.param(lambda s: pickle.loads(pickle.dumps(s)), id="pickle"),
    ],
)
def test_round_trip_through_a_format(
    machine: Callable[[], kvmstate.Vcpu], through: Callable[[VcpuState], VcpuState]
) -> None:
    source = machine()
    make_distinctive(source)
    saved = source.save_state()
    carried = through(saved)
    assert carried == saved
    target = machine()
    target.restore_state(carried)
    assert_same(saved, target.save_state())


def test_restore_error_names_the_part_and_keeps_errno(machine: Callable[[], kvmstate.Vcpu]) -> None:
    saved = machine().save_state()
    assert saved.sregs is not None
    saved.sregs.cr4 = 1 << 31  # a reserved CR4 bit: KVM_SET_SREGS says EINVAL
    saved.sregs2 = None
    with pytest.raises(StateError) as info:
        machine().restore_state(saved)
    assert info.value.part == "sregs" and info.value.errno == 22
    assert isinstance(info.value, OSError) and "sregs" in str(info.value)


def test_save_without_irqchip_records_the_lapic_absent(kvm: kvmstate.Kvm) -> None:
    with kvm.create_vm() as vm, vm.create_vcpu(0) as vcpu:
        state = vcpu.save_state()
    assert state.lapic is None and "KVM_GET_LAPIC" in state.absent["lapic"]


def test_vm_file_holds_several_vcpus(machine: Callable[[], kvmstate.Vcpu]) -> None:
    states = [machine().save_state() for _ in range(2)]
    back = snapshot.loads_vm(snapshot.dumps_vm(states))
    assert back == states
    with pytest.raises(ValueError, match="holds 2 vCPUs"):
        snapshot.loads_vcpu(snapshot.dumps_vm(states))


def test_parts_are_the_kernels_bytes(machine: Callable[[], kvmstate.Vcpu]) -> None:
    vcpu = machine()
    state = vcpu.save_state()
    assert state.part_bytes("regs") == vcpu.get_regs().to_bytes()
    assert state.part_bytes("tsc_khz") == vcpu.get_tsc_khz().to_bytes(4, "little")
    msrs = uapi.kvm_msrs.new(len(state.msrs or {}))
    assert len(state.part_bytes("msrs")) == len(msrs.to_bytes())


def test_state_without_irqchip_restores_without_irqchip(kvm: kvmstate.Kvm) -> None:
    # KVM reads MSR_KVM_ASYNC_PF_INT there but refuses to write it without a LAPIC;
    # an MSR that already holds the saved value must not fail the restore.
    with kvm.create_vm() as vm, vm.create_vcpu(0) as vcpu:
        vcpu.set_cpuid2(kvm.get_supported_cpuid())
        saved = vcpu.save_state()
    with kvm.create_vm() as vm, vm.create_vcpu(0) as vcpu:
        vcpu.restore_state(saved)
        again = vcpu.save_state()
    assert_same(saved, again)


def test_msr_refused_with_a_different_value_is_an_error(
    machine: Callable[[], kvmstate.Vcpu],
) -> None:
    vcpu = machine()
    saved = vcpu.save_state()
    assert saved.msrs is not None
    saved.msrs[0xC0000080] = 1 << 63  # EFER with a reserved bit: refused
    with pytest.raises(StateError, match="MSR 0xc0000080 was refused") as info:
        machine().restore_state(saved)
    assert info.value.part == "msrs"
