"""Real VMX nested state, inside the emulated Intel guest (Bochs, kvm_intel nested=1).

Marked ``vmx_guest``: on a host with Debian's bochs these run inside the
guest through ``tests/guest/run --cpu intel`` (one boot per session);
elsewhere they skip. The states are reached for real: a fresh vCPU; VMX
root without a current VMCS, by SET alone; and VMX root with a current
VMCS and L2 running, by running the L1 program of tests/support/vmx_l1.py.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable, Iterator

import pytest

import kvmstate
import kvmstate.diff
from kvmstate import uapi
from kvmstate.nested import HEADER_SIZE, VMX_MAX_SIZE, NestedState
from kvmstate.uapi import NestedFlag, NestedFormat
from kvmstate.vmcs12 import VMCS12_REVISION
from tests.support import vmx_l1

pytestmark = pytest.mark.vmx_guest

NO_VMCS = 0xFFFF_FFFF_FFFF_FFFF
MSR_FEATURE_CONTROL = 0x3A
FEATURE_CONTROL_LOCKED_VMX = 0x5  # lock + VMX outside SMX
CR0_L1 = 0x8000_0031  # PG | NE | ET | PE
CR4_PSE, CR4_VMXE = 0x10, 0x2000
# Read-only VM-exit information: KVM refreshes it from the hardware vmcs02 on GET
# (sync_vmcs02_to_vmcs12), and a fresh vCPU's vmcs02 has not exited yet.
EXIT_INFO = {
    f"vmcs12.{name}"
    for name in (
        "vm_instruction_error", "vm_exit_reason", "vm_exit_intr_info",
        "vm_exit_intr_error_code", "idt_vectoring_info_field", "idt_vectoring_error_code",
        "vm_exit_instruction_len", "vmx_instruction_info", "exit_qualification",
        "guest_linear_address", "guest_physical_address",
    )
}  # fmt: skip
# A VMX-root state with a current VMCS has the header and one vmcs12 page.
ROOT_WITH_VMCS = HEADER_SIZE + 4096


class L1:
    """A vCPU running tests/support/vmx_l1.py's program, stopped at chosen port writes."""

    def __init__(self, kvm: kvmstate.Kvm) -> None:
        self.vm = kvm.create_vm()
        memory = self.vm.add_memory(0, vmx_l1.MEMORY)
        code = vmx_l1.program()
        memory[vmx_l1.CODE : vmx_l1.CODE + len(code)] = code
        pde = vmx_l1.page_directory()
        memory[vmx_l1.PAGE_DIR : vmx_l1.PAGE_DIR + len(pde)] = pde
        self.vcpu = self.vm.create_vcpu(0)
        prepare(kvm, self.vcpu, vmxe=False)
        regs = self.vcpu.get_regs()
        regs.rip, regs.rsp, regs.rflags = vmx_l1.CODE, vmx_l1.L1_STACK, 2
        self.vcpu.set_regs(regs)
        self.trace: list[tuple[int, int]] = []

    def run_until(self, port: int, value: int | None = None, limit: int = 500) -> None:
        """Run until L1/L2 writes ``value`` to ``port``, then complete that I/O."""
        for _ in range(limit):
            reason = self.vcpu.run()
            if reason != uapi.ExitReason.IO:
                raise AssertionError(f"exit {reason!r} after {self.trace}")
            io = self.vcpu.kvm_run.io
            seen = (int(io.port), self.vcpu.io_data()[0])
            self.trace.append(seen)
            if io.port == vmx_l1.PORT_FAIL:
                raise AssertionError(f"a VMX instruction failed: {self.trace}")
            if io.port == port and (value is None or seen[1] == value):
                # The KVM API: state is only consistent once the pending I/O is done.
                self.vcpu.complete_io()
                return
        raise AssertionError(f"no write to port {port:#x} in {limit} exits: {self.trace}")

    def close(self) -> None:
        self.vcpu.close()
        self.vm.close()


def prepare(kvm: kvmstate.Kvm, vcpu: kvmstate.Vcpu, *, vmxe: bool = True) -> None:
    """What must precede KVM_SET_NESTED_STATE: CPUID, IA32_FEATURE_CONTROL, sregs."""
    vcpu.set_cpuid2(kvm.get_supported_cpuid())
    vcpu.set_msrs({MSR_FEATURE_CONTROL: FEATURE_CONTROL_LOCKED_VMX})
    sregs = vcpu.get_sregs()
    vmx_l1.flat_segments(sregs)
    sregs.tr.selector, sregs.tr.type, sregs.tr.present, sregs.tr.limit = vmx_l1.TR_SEL, 11, 1, 0x67
    sregs.cr0, sregs.cr3 = CR0_L1, vmx_l1.PAGE_DIR
    sregs.cr4 = CR4_PSE | (CR4_VMXE if vmxe else 0)
    sregs.efer = 0
    vcpu.set_sregs(sregs)


@pytest.fixture
def kvm() -> Iterator[kvmstate.Kvm]:
    with kvmstate.Kvm() as k:
        yield k


@pytest.fixture
def fresh(kvm: kvmstate.Kvm) -> Iterator[Callable[[], kvmstate.Vcpu]]:
    opened: list[kvmstate.Vcpu | kvmstate.Vm] = []

    def make(prepared: bool = True) -> kvmstate.Vcpu:
        vm = kvm.create_vm()
        vm.add_memory(0, vmx_l1.MEMORY)
        vcpu = vm.create_vcpu(0)
        opened.extend((vm, vcpu))
        if prepared:
            prepare(kvm, vcpu)
        return vcpu

    yield make
    for fd in reversed(opened):
        fd.close()


@pytest.fixture
def l1(kvm: kvmstate.Kvm) -> Iterator[L1]:
    runner = L1(kvm)
    yield runner
    runner.close()


def vmxon_only() -> NestedState:
    state = NestedState(HEADER_SIZE)
    state.format = NestedFormat.VMX
    state.size = HEADER_SIZE
    state.vmx.vmxon_pa = vmx_l1.VMXON
    state.vmx.vmcs12_pa = NO_VMCS
    return state


def test_capability_is_intels(kvm: kvmstate.Kvm) -> None:
    assert kvm.nested_state_size == VMX_MAX_SIZE == 8320


def test_fresh_vcpu_has_no_vmxon(fresh: Callable[..., kvmstate.Vcpu]) -> None:
    state = fresh(prepared=False).get_nested_state()
    assert state.format is NestedFormat.VMX and state.size == HEADER_SIZE
    assert state.vmx.vmxon_pa == NO_VMCS and state.vmx.vmcs12_pa == NO_VMCS
    assert state.vmcs12 is None


def test_vmx_root_without_vmcs_by_set_alone(fresh: Callable[..., kvmstate.Vcpu]) -> None:
    vcpu = fresh()
    vcpu.set_nested_state(vmxon_only())
    got = vcpu.get_nested_state()
    assert got.size == HEADER_SIZE and got.flags == 0
    assert got.vmx.vmxon_pa == vmx_l1.VMXON and got.vmx.vmcs12_pa == NO_VMCS
    assert got == vmxon_only()


def test_root_with_current_vmcs_by_running_l1(l1: L1) -> None:
    l1.run_until(vmx_l1.PORT_STEP, vmx_l1.Step.VMCS_READY)
    state = l1.vcpu.get_nested_state()
    assert state.size == ROOT_WITH_VMCS and not state.flags & NestedFlag.GUEST_MODE
    assert state.vmx.vmxon_pa == vmx_l1.VMXON and state.vmx.vmcs12_pa == vmx_l1.VMCS
    vmcs12 = state.vmcs12
    assert vmcs12 is not None and vmcs12.hdr.revision_id == VMCS12_REVISION
    assert vmcs12.launch_state == 0  # VMCLEARed, not yet launched


def test_l2_running_state_by_name(l1: L1) -> None:
    l1.run_until(vmx_l1.PORT_L2, vmx_l1.L2_MARK)
    state = l1.vcpu.get_nested_state()
    assert state.flags & NestedFlag.GUEST_MODE
    assert state.size >= ROOT_WITH_VMCS
    v = state.vmcs12
    assert v is not None and v.hdr.revision_id == VMCS12_REVISION
    assert v.host_rip and v.guest_rip  # L1's exit handler, L2's code
    assert vmx_l1.CODE <= v.host_rip < vmx_l1.PAGE_DIR
    assert vmx_l1.CODE <= v.guest_rip < vmx_l1.PAGE_DIR
    assert v.guest_rsp <= vmx_l1.L2_STACK
    assert v.vmcs_link_pointer == NO_VMCS


def test_l2_state_survives_bytes_and_a_fresh_vcpu(
    l1: L1, fresh: Callable[..., kvmstate.Vcpu]
) -> None:
    l1.run_until(vmx_l1.PORT_L2, vmx_l1.L2_MARK)
    saved = l1.vcpu.get_nested_state()
    blob = saved.to_bytes()
    target = fresh()
    target.set_nested_state(NestedState.from_bytes(blob))
    again = target.get_nested_state()
    assert set(kvmstate.diff.diff(saved, again).paths()) <= EXIT_INFO


def test_set_back_onto_the_same_vcpu_lets_l1_see_the_vmcall(l1: L1) -> None:
    l1.run_until(vmx_l1.PORT_L2, vmx_l1.L2_MARK)
    l1.vcpu.set_nested_state(l1.vcpu.get_nested_state())
    l1.run_until(vmx_l1.PORT_EXIT_REASON)
    assert l1.trace[-1] == (vmx_l1.PORT_EXIT_REASON, vmx_l1.EXIT_REASON_VMCALL)


def test_whole_vcpu_with_l2_running_round_trips(
    l1: L1, fresh: Callable[..., kvmstate.Vcpu]
) -> None:
    l1.run_until(vmx_l1.PORT_L2, vmx_l1.L2_MARK)
    saved = l1.vcpu.save_state()
    assert saved.nested is not None and saved.nested.flags & NestedFlag.GUEST_MODE
    target = fresh(prepared=False)
    target.restore_state(kvmstate.state.VcpuState.from_bytes(saved.to_bytes()))
    again = target.save_state().nested
    assert again is not None
    assert set(kvmstate.diff.diff(saved.nested, again).paths()) <= EXIT_INFO


def test_short_size_in_a_caller_buffer_with_guard(l1: L1) -> None:
    l1.run_until(vmx_l1.PORT_L2, vmx_l1.L2_MARK)
    guard = 4096
    backing = bytearray(b"\xa5" * (VMX_MAX_SIZE + guard))
    struct.pack_into("<I", backing, 4, HEADER_SIZE)
    state = l1.vcpu.get_nested_state(memoryview(backing)[:VMX_MAX_SIZE])
    assert state.flags & NestedFlag.GUEST_MODE and state.size >= ROOT_WITH_VMCS
    assert backing[VMX_MAX_SIZE:] == b"\xa5" * guard


def test_vmxon_without_cpuid_vmx_is_refused(fresh: Callable[..., kvmstate.Vcpu]) -> None:
    vcpu = fresh(prepared=False)
    with pytest.raises(kvmstate.KvmError) as info:
        vcpu.set_nested_state(vmxon_only())
    assert info.value.errno == errno.EINVAL
