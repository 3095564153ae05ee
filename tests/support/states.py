"""One valid nested state of each kind, built by name, for every test and benchmark that needs one.

The SVM guest-mode state is the one of /work/shared/notes/svm-guest.md,
accepted by a real 6.1 and 6.12; the VMX ones follow the 32-bit paged L1 of
/work/shared/notes/vmx-guest/guest.asm. Each call builds a fresh object, so
a test may change it freely.

>>> svm_guest().vmcb12.control.asid
1
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import kvmstate
from kvmstate import vmcb as svm
from kvmstate import vmcs12 as vmx
from kvmstate.nested import SVM_MAX_SIZE, VMX_MAX_SIZE, NestedState
from kvmstate.state import VcpuState
from kvmstate.uapi import NestedFlag, NestedFormat

__all__ = [
    "INVALID",
    "IOPM_PA",
    "L1_CR0",
    "L1_CR3",
    "L1_CR4",
    "MSRPM_PA",
    "VMCB_PA",
    "VMCS12_PA",
    "VMXON_PA",
    "restored_in_a_fresh_vcpu",
    "svm_gif",
    "svm_guest",
    "svm_guest_saved",
    "vmx_guest",
    "vmx_root",
    "vmx_vmcs",
]

#: "No address" in the VMX header and the VMCS link pointer.
INVALID = (1 << 64) - 1
#: Where the SVM state's vmcb12 and its I/O and MSR permission maps are.
VMCB_PA, IOPM_PA, MSRPM_PA = 0x10000, 0x20000, 0x30000
#: The VMXON region and the current VMCS of the VMX states.
VMXON_PA, VMCS12_PA = 0x3000, 0x4000
#: A 32-bit paged L1 (PE|ET|NE|PG, CR4 PSE|VMXE) like /work/shared/notes/vmx-guest/guest.asm.
L1_CR0, L1_CR4, L1_CR3 = 0x80000031, 0x2010, 0x2000


def svm_gif() -> NestedState:
    """What a fresh AMD vCPU answers: GIF set, no guest mode, header only."""
    state = NestedState(128)
    state.format = NestedFormat.SVM
    state.size = 128
    state.flags = NestedFlag.GIF_SET
    return state


def svm_guest(*, rip: int = 0, rsp: int = 0) -> NestedState:
    """L2 running under SVM: GIF and guest mode, a vmcb12 that intercepts VMRUN, ASID 1."""
    state = NestedState(SVM_MAX_SIZE)
    state.format = NestedFormat.SVM
    state.size = SVM_MAX_SIZE
    state.flags = NestedFlag.GUEST_MODE | NestedFlag.GIF_SET
    state.svm.vmcb_pa = VMCB_PA
    assert state.vmcb12 is not None
    control, save = state.vmcb12.control, state.vmcb12.save
    control.set_intercept(svm.INTERCEPT_VMRUN)
    control.asid = 1
    control.iopm_base_pa, control.msrpm_base_pa = IOPM_PA, MSRPM_PA
    save.efer = svm.EFER_SVME
    save.cr0 = svm.X86_CR0_PG | svm.X86_CR0_PE
    save.dr6, save.dr7, save.rflags = 0xFFFF0FF0, 0x400, 2
    save.rip, save.rsp = rip, rsp
    return state


def vmx_root() -> NestedState:
    """VMXON without a current VMCS: header only."""
    state = NestedState(VMX_MAX_SIZE)
    state.format = NestedFormat.VMX
    state.size = 128
    state.vmx.vmxon_pa = VMXON_PA
    state.vmx.vmcs12_pa = INVALID
    return state


def vmx_vmcs() -> NestedState:
    """VMXON with a current VMCS (after VMPTRLD), L1 running."""
    state = vmx_root()
    state.size = 128 + 4096
    state.vmx.vmcs12_pa = VMCS12_PA
    assert state.vmcs12 is not None
    state.vmcs12.hdr.revision_id = vmx.VMCS12_REVISION
    return state


def vmx_guest() -> NestedState:
    """L2 running: a vmcs12 built from the TRUE controls' allowed-0 bits, as that L1 does."""
    state = vmx_vmcs()
    state.flags = NestedFlag.GUEST_MODE
    v = state.vmcs12
    assert v is not None
    v.launch_state = 1
    v.pin_based_vm_exec_control = vmx.PIN_BASED_ALWAYSON_WITHOUT_TRUE_MSR
    v.cpu_based_vm_exec_control = 0x04006172
    v.vm_exit_controls = 0x36DFB
    v.vm_entry_controls = 0x11FB
    v.host_cr0 = v.guest_cr0 = L1_CR0
    v.host_cr4 = v.guest_cr4 = L1_CR4
    v.host_cr3 = v.guest_cr3 = L1_CR3
    v.host_cs_selector = v.guest_cs_selector = 0x08
    for seg in ("ss", "ds", "es", "fs", "gs"):
        setattr(v, f"host_{seg}_selector", 0x10)
        setattr(v, f"guest_{seg}_selector", 0x10)
    v.host_tr_selector = v.guest_tr_selector = 0x18
    v.host_rsp, v.host_rip = 0x8000, 0x1100
    v.guest_rsp, v.guest_rip, v.guest_rflags = 0x7000, 0x1080, 2
    v.guest_dr7 = 0x400
    v.vmcs_link_pointer = INVALID
    return state


def svm_guest_saved(
    stack: contextlib.ExitStack[None], kvm: kvmstate.Kvm
) -> tuple[Callable[[], kvmstate.Vcpu], kvmstate.Vcpu, VcpuState]:
    """On a KVM with SVM nesting: a vCPU in guest mode (EFER.SVME, then
    :func:`svm_guest` set) and its state saved whole; and first the maker of fresh vCPUs like it
    (a new VM with an in-kernel irqchip and KVM's supported CPUID, closed by
    ``stack``) for the state to be restored into."""

    def make() -> kvmstate.Vcpu:
        vm = stack.enter_context(kvm.create_vm())
        vm.create_irqchip()
        vcpu: kvmstate.Vcpu = stack.enter_context(vm.create_vcpu(0))
        vcpu.set_cpuid2(kvm.get_supported_cpuid())
        return vcpu

    first = make()
    sregs = first.get_sregs()
    sregs.efer |= svm.EFER_SVME
    first.set_sregs(sregs)
    first.set_nested_state(svm_guest())
    saved = first.save_state()
    assert saved.nested is not None and saved.nested.flags & NestedFlag.GUEST_MODE
    return make, first, saved


def restored_in_a_fresh_vcpu(
    make: Callable[[], kvmstate.Vcpu], read: VcpuState, saved: VcpuState, parts: Sequence[str]
) -> VcpuState:
    """``read`` (``saved`` as a VMM's file gave it back) restored into a vCPU from
    ``make`` and saved again, checking that the nested state and ``parts`` come back
    as ``saved`` has them; the fresh save."""
    assert read.nested == saved.nested
    vcpu = make()
    vcpu.restore_state(read)
    again = vcpu.save_state()
    assert again.nested == saved.nested
    for part in parts:
        assert again.part_bytes(part) == saved.part_bytes(part), part
    return again
