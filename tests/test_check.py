"""kvmstate.check: each rule of KVM_SET_NESTED_STATE, offline and against a real kernel.

Offline, every rule is broken by a state that breaks that rule alone, next to
valid baselines (VMX root, VMX with a current VMCS, VMX guest mode, SVM
GIF-only, SVM guest mode) that pass with no problem. The tests marked
``svm_guest`` run inside the emulated AMD guest (tests/guest/run) and check
that the kernel refuses a state exactly when check() finds a certain problem,
on each kernel series the guests boot (6.1 and 6.12), with the answer stated
per series where the series differ (:data:`MORE_KERNEL_ANSWERS`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kvmstate
from kvmstate import check as checks
from kvmstate import ioctls, uapi
from kvmstate import vmcb as svm
from kvmstate import vmcs12 as vmx
from kvmstate.check import Facts, Problem, check, engine, explain, format_problems
from kvmstate.nested import SVM_MAX_SIZE, VMX_MAX_SIZE, NestedState
from kvmstate.state import VcpuState
from kvmstate.uapi import NestedFlag
from tests.kvm_fixtures import needs_kvm
from tests.support import kernels, vmx_l1
from tests.support.states import (
    INVALID,
    IOPM_PA,
    L1_CR0,
    L1_CR3,
    L1_CR4,
    VMCB_PA,
    VMCS12_PA,
    VMXON_PA,
    svm_gif,
    svm_guest,
    vmx_guest,
    vmx_root,
    vmx_vmcs,
)

GM, RP, GIF = NestedFlag.GUEST_MODE, NestedFlag.RUN_PENDING, NestedFlag.GIF_SET

# --- baselines ------------------------------------------------------------------------


def _msr(low: int, high: int) -> int:
    return high << 32 | low


# What a kvm_intel with EPT, VPID, unrestricted guest and APICv reports to L1.
VMX_MSRS = {
    0x485: 0,
    0x486: 0x80000021,
    0x487: 0xFFFFFFFF,
    0x488: 0x2000,
    0x489: 0x3727FF,
    0x48B: _msr(0, 0x613FBFF),
    0x48C: (1 << 6) | (1 << 14) | (1 << 21),
    0x48D: _msr(0x16, 0xFF),
    0x48E: _msr(0x04006172, 0xFFF9FFFE),
    0x48F: _msr(0x36DFB, 0xFFFFFF),
    0x490: _msr(0x11FB, 0x1F3FF),
    0x491: 1,
}
VMX_FACTS = Facts(
    vendor="vmx",
    has_vmx=True,
    has_svm=False,
    cpu_features=frozenset({"vmx", "vme", "de", "pse", "tsc", "pae", "mce", "pge", "fxsr",
                            "xmm", "lm", "nx", "pcid", "xsave", "fsgsbase", "smep", "smap"}),
    maxphyaddr=46,
    efer=0,
    cr0=L1_CR0,
    cr3=L1_CR3,
    cr4=L1_CR4,
    in_smm=False,
    evmcs_enabled=False,
    la57=False,
    host_la57=False,
    kernel_version=(6, 12, 0),
    nested_state_cap=VMX_MAX_SIZE,
    vmx_msrs=VMX_MSRS,
)  # fmt: skip
# What the emulated AMD guest's vCPU reports (Facts.from_vcpu there, 6.1).
SVM_FACTS = Facts(
    vendor="svm",
    has_vmx=False,
    has_svm=True,
    cpu_features=frozenset({"svm", "de", "pse", "tsc", "pae", "mce", "pge", "fxsr", "xmm",
                            "lm", "nx", "xsave", "fsgsbase", "smep", "smap", "pku", "umip"}),
    maxphyaddr=40,
    efer=svm.EFER_SVME,
    cr0=0x60000010,
    cr3=0,
    cr4=0,
    in_smm=False,
    npt_enabled=True,
    la57=False,
    kernel_version=(6, 1, 0),
    nested_state_cap=SVM_MAX_SIZE,
)  # fmt: skip

BASELINES: dict[str, tuple[Callable[[], NestedState], Facts]] = {
    "svm_gif": (svm_gif, SVM_FACTS),
    "svm_guest": (svm_guest, SVM_FACTS),
    "vmx_root": (vmx_root, VMX_FACTS),
    "vmx_vmcs": (vmx_vmcs, VMX_FACTS),
    "vmx_guest": (vmx_guest, VMX_FACTS),
}


def certain(problems: list[Problem]) -> list[Problem]:
    return [p for p in problems if p.certain]


@pytest.mark.parametrize("name", BASELINES)
def test_baseline_passes_with_facts(name: str) -> None:
    make, facts = BASELINES[name]
    assert check(make(), facts) == []
    assert check(make().to_bytes(), facts) == []  # the saved bytes too


@pytest.mark.parametrize("name", BASELINES)
def test_baseline_without_facts_has_only_undecided_problems(name: str) -> None:
    make, _ = BASELINES[name]
    problems = check(make())
    assert certain(problems) == []
    assert all(p.needs for p in problems)


def test_vmx_guest_without_msrs_is_decided_by_kvm_defaults() -> None:
    """The allowed-0 settings are what every KVM offers: no MSR needed to pass them."""
    facts = dataclasses.replace(VMX_FACTS, vmx_msrs=None)
    assert check(vmx_guest(), facts) == []


# --- one case per rule -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    """A baseline, a change that breaks one rule, and the problem expected."""

    id: str
    base: str
    change: Callable[[NestedState], Any]
    rule_id: str
    field: str
    facts: dict[str, Any] = dataclasses.field(default_factory=dict)
    words: str = ""  # a piece of the rule's sentence


def _set(path: str, value: int) -> Callable[[NestedState], None]:
    def change(state: NestedState) -> None:
        *parents, last = path.split(".")
        obj: Any = state
        for name in parents:
            obj = getattr(obj, name)
        setattr(obj, last, value)

    return change


def _or(path: str, bits: int) -> Callable[[NestedState], None]:
    def change(state: NestedState) -> None:
        *parents, last = path.split(".")
        obj: Any = state
        for name in parents:
            obj = getattr(obj, name)
        setattr(obj, last, getattr(obj, last) | bits)

    return change


def _all(*changes: Callable[[NestedState], Any]) -> Callable[[NestedState], None]:
    def change(state: NestedState) -> None:
        for c in changes:
            c(state)

    return change


def _secondary(bits: int) -> Callable[[NestedState], None]:
    return _all(
        _or("vmcs12.cpu_based_vm_exec_control", vmx.CPU_BASED_ACTIVATE_SECONDARY_CONTROLS),
        _or("vmcs12.secondary_vm_exec_control", bits),
    )


def _clear_vmrun(state: NestedState) -> None:
    assert state.vmcb12 is not None
    state.vmcb12.control.clr_intercept(svm.INTERCEPT_VMRUN)


_EPT = _all(
    _secondary(vmx.SECONDARY_EXEC_ENABLE_EPT), _set("vmcs12.ept_pointer", 0x5000 | 0x18 | 6)
)
_SHADOW = _all(
    _secondary(vmx.SECONDARY_EXEC_SHADOW_VMCS),
    _set("vmcs12.vmread_bitmap", 0x6000),
    _set("vmcs12.vmwrite_bitmap", 0x7000),
    _set("vmcs12.vmcs_link_pointer", 0x8000),
)

# The power-on PAT with entry 0 set to type 2, which is reserved: not kvm_pat_valid.
BAD_PAT = 0x0007040600070402
GOOD_PAT = 0x0007040600070406  # the power-on PAT: WB, WT, UC-, UC twice over

CASES = [
    # x86.c and the format
    Case("size-below-header", "svm_gif", _set("size", 64), "size_covers_header", "size"),
    Case("size-beyond-buffer", "svm_gif", _set("size", 4224), "size_within_data", "size"),
    Case("unknown-flag", "svm_gif", _set("flags", GIF | 0x200), "flags_known", "flags"),
    Case("run-pending-alone", "svm_gif", _set("flags", GIF | RP),
         "run_pending_needs_guest_mode", "flags"),
    Case("no-nested-kvm", "svm_gif", lambda s: None, "kvm_has_nested_state", "kvm",
         {"nested_state_cap": 0}),
    Case("unknown-format", "svm_gif", _set("format", 2), "format_known", "format"),
    Case("vmx-on-amd", "vmx_root", lambda s: None, "format_matches_vendor", "format",
         {"vendor": "svm"}),
    Case("svm-on-intel", "svm_gif", lambda s: None, "format_matches_vendor", "format",
         {"vendor": "vmx"}),
    # VMX: vmx_set_nested_state
    Case("vmxoff-with-vmcs12", "vmx_root",
         _all(_set("vmx.vmxon_pa", INVALID), _set("vmx.vmcs12_pa", VMCS12_PA)),
         "vmx_no_vmxon_means_empty", "hdr.vmx.vmcs12_pa"),
    Case("vmxoff-guest-mode", "vmx_root",
         _all(_set("vmx.vmxon_pa", INVALID), _set("flags", GM)),
         "vmx_no_vmxon_means_empty", "flags"),
    Case("vmxoff-smm", "vmx_root",
         _all(_set("vmx.vmxon_pa", INVALID), _set("vmx.smm.flags", 2)),
         "vmx_no_vmxon_means_empty", "hdr.vmx.smm.flags", {"in_smm": True}),
    Case("vmxon-without-cpuid-vmx", "vmx_root", lambda s: None, "vmx_needs_cpuid_vmx",
         "hdr.vmx.vmxon_pa", {"has_vmx": False}),
    Case("vmxon-unaligned", "vmx_root", _set("vmx.vmxon_pa", 0x3008), "vmx_vmxon_pa_valid",
         "hdr.vmx.vmxon_pa"),
    Case("vmxon-beyond-maxphyaddr", "vmx_root", _set("vmx.vmxon_pa", 1 << 46),
         "vmx_vmxon_pa_valid", "hdr.vmx.vmxon_pa"),
    Case("smm-unknown-bits", "vmx_root", _set("vmx.smm.flags", 2 | 4), "vmx_smm_flags",
         "hdr.vmx.smm.flags", {"in_smm": True}),
    Case("smm-guest-without-vmxon", "vmx_root", _set("vmx.smm.flags", 1), "vmx_smm_flags",
         "hdr.vmx.smm.flags", {"in_smm": True}),
    Case("vmx-header-flags", "vmx_root", _set("vmx.flags", 2), "vmx_header_flags",
         "hdr.vmx.flags"),
    Case("smm-flags-outside-smm", "vmx_root", _set("vmx.smm.flags", 2),
         "vmx_smm_matches_vcpu", "hdr.vmx.smm.flags"),
    Case("guest-mode-in-smm", "vmx_guest", lambda s: None, "vmx_smm_matches_vcpu", "flags",
         {"in_smm": True}),
    Case("evmcs-not-enabled", "vmx_root",
         _all(_set("vmx.vmxon_pa", INVALID), _set("flags", NestedFlag.EVMCS)),
         "vmx_evmcs_enabled", "flags"),
    Case("vmxon-only-with-vmcs12-pa", "vmx_root", _set("vmx.vmcs12_pa", VMCS12_PA),
         "vmx_without_vmcs12", "hdr.vmx.vmcs12_pa"),
    Case("vmxon-only-guest-mode", "vmx_root", _set("flags", GM), "vmx_without_vmcs12",
         "flags", words="no GUEST_MODE"),
    Case("vmcs12-pa-is-vmxon", "vmx_vmcs", _set("vmx.vmcs12_pa", VMXON_PA), "vmx_vmcs12_pa",
         "hdr.vmx.vmcs12_pa"),
    Case("vmcs12-page-without-pa", "vmx_vmcs", _set("vmx.vmcs12_pa", INVALID),
         "vmx_vmcs12_pa", "hdr.vmx.vmcs12_pa"),
    Case("vmcs12-pa-unaligned", "vmx_vmcs", _set("vmx.vmcs12_pa", 0x4010), "vmx_vmcs12_pa",
         "hdr.vmx.vmcs12_pa"),
    Case("vmcs12-revision", "vmx_vmcs", _set("vmcs12.hdr.revision_id", 1),
         "vmx_vmcs12_revision", "vmcs12.hdr.revision_id"),
    Case("short-state-counts-struct-vmcs12", "vmx_vmcs",
         _all(_set("vmcs12.hdr.revision_id", 1), _set("size", 1126)),
         "vmx_vmcs12_revision", "vmcs12.hdr.revision_id"),
    Case("shadow-vmcs-without-shadow-page", "vmx_guest", _SHADOW, "vmx_shadow_vmcs12", "size"),
    Case("shadow-vmcs12-revision", "vmx_guest", _all(_SHADOW, _set("size", VMX_MAX_SIZE)),
         "vmx_shadow_vmcs12", "shadow_vmcs12.hdr.revision_id"),
    # VMX: nested_vmx_check_controls
    Case("pin-allowed0", "vmx_guest", _set("vmcs12.pin_based_vm_exec_control", 0),
         "vmx_control_fields", "vmcs12.pin_based_vm_exec_control", words="must be 1"),
    Case("tertiary-never-offered", "vmx_guest",
         _or("vmcs12.cpu_based_vm_exec_control", vmx.CPU_BASED_ACTIVATE_TERTIARY_CONTROLS),
         "vmx_control_fields", "vmcs12.cpu_based_vm_exec_control", {"vmx_msrs": None},
         "never offered"),
    Case("entry-not-in-msr", "vmx_guest", _or("vmcs12.vm_entry_controls", 1 << 17),
         "vmx_control_fields", "vmcs12.vm_entry_controls", words="not allowed by"),
    Case("cr3-targets", "vmx_guest", _set("vmcs12.cr3_target_count", 1), "vmx_cr3_targets",
         "vmcs12.cr3_target_count"),
    Case("io-bitmap-unaligned", "vmx_guest",
         _all(_or("vmcs12.cpu_based_vm_exec_control", vmx.CPU_BASED_USE_IO_BITMAPS),
              _set("vmcs12.io_bitmap_a", 0x9800), _set("vmcs12.io_bitmap_b", 0xA000)),
         "vmx_bitmap_pages", "vmcs12.io_bitmap_a"),
    Case("x2apic-and-apic-access", "vmx_guest",
         _all(_secondary(vmx.SECONDARY_EXEC_VIRTUALIZE_X2APIC_MODE
                         | vmx.SECONDARY_EXEC_VIRTUALIZE_APIC_ACCESSES),
              _or("vmcs12.cpu_based_vm_exec_control", vmx.CPU_BASED_TPR_SHADOW),
              _set("vmcs12.virtual_apic_page_addr", 0xB000),
              _set("vmcs12.apic_access_addr", 0xC000)),
         "vmx_apicv", "vmcs12.secondary_vm_exec_control"),
    Case("virtual-nmis-without-nmi-exiting", "vmx_guest",
         _or("vmcs12.pin_based_vm_exec_control", vmx.PIN_BASED_VIRTUAL_NMIS),
         "vmx_nmi_controls", "vmcs12.pin_based_vm_exec_control"),
    Case("unrestricted-without-ept", "vmx_guest",
         _secondary(vmx.SECONDARY_EXEC_UNRESTRICTED_GUEST), "vmx_ept_dependents",
         "vmcs12.secondary_vm_exec_control"),
    Case("vpid-zero", "vmx_guest", _secondary(vmx.SECONDARY_EXEC_ENABLE_VPID),
         "vmx_vpid_and_timer", "vmcs12.virtual_processor_id"),
    Case("save-timer-without-timer", "vmx_guest",
         _or("vmcs12.vm_exit_controls", vmx.VM_EXIT_SAVE_VMX_PREEMPTION_TIMER),
         "vmx_vpid_and_timer", "vmcs12.vm_exit_controls"),
    Case("eptp-uncached", "vmx_guest", _all(_EPT, _set("vmcs12.ept_pointer", 0x5000 | 0x18)),
         "vmx_eptp", "vmcs12.ept_pointer", words="memory type"),
    Case("eptp-reserved", "vmx_guest", _all(_EPT, _or("vmcs12.ept_pointer", 1 << 8)),
         "vmx_eptp", "vmcs12.ept_pointer", words="11:7"),
    Case("vmfunc-unknown", "vmx_guest",
         _all(_secondary(vmx.SECONDARY_EXEC_ENABLE_VMFUNC), _set("vmcs12.vm_function_control", 2)),
         "vmx_vmfunc", "vmcs12.vm_function_control"),
    Case("msr-load-unaligned", "vmx_guest",
         _all(_set("vmcs12.vm_exit_msr_load_count", 1), _set("vmcs12.vm_exit_msr_load_addr", 8)),
         "vmx_msr_switch_areas", "vmcs12.vm_exit_msr_load_addr"),
    Case("event-type-reserved", "vmx_guest",
         _set("vmcs12.vm_entry_intr_info_field", 1 << 31 | 1 << 8), "vmx_entry_event",
         "vmcs12.vm_entry_intr_info_field", words="reserved"),
    Case("event-gp-without-error-code", "vmx_guest",
         _set("vmcs12.vm_entry_intr_info_field", 1 << 31 | 3 << 8 | 13), "vmx_entry_event",
         "vmcs12.vm_entry_intr_info_field", words="error-code"),
    Case("event-soft-int-zero-length", "vmx_guest",
         _set("vmcs12.vm_entry_intr_info_field", 1 << 31 | 4 << 8 | 0x80), "vmx_entry_event",
         "vmcs12.vm_entry_instruction_len"),
    # VMX: host and guest state
    Case("host-cr0-without-ne", "vmx_guest", _set("vmcs12.host_cr0", L1_CR0 & ~0x20),
         "vmx_host_state", "vmcs12.host_cr0"),
    Case("host-cr4-without-vmxe", "vmx_guest", _set("vmcs12.host_cr4", 0x10),
         "vmx_host_state", "vmcs12.host_cr4"),
    Case("host-tr-zero", "vmx_guest", _set("vmcs12.host_tr_selector", 0), "vmx_host_state",
         "vmcs12.host_tr_selector"),
    Case("host-selector-rpl", "vmx_guest", _set("vmcs12.host_ds_selector", 0x13),
         "vmx_host_state", "vmcs12.host_ds_selector"),
    Case("host-rip-64-bit-on-32-bit-host", "vmx_guest", _set("vmcs12.host_rip", 1 << 32),
         "vmx_host_state", "vmcs12.host_rip"),
    Case("host-pat", "vmx_guest",
         _all(_or("vmcs12.vm_exit_controls", vmx.VM_EXIT_LOAD_IA32_PAT),
              _set("vmcs12.host_ia32_pat", 0x0007040600070402)),
         "vmx_host_state", "vmcs12.host_ia32_pat"),
    Case("guest-activity-shutdown", "vmx_guest", _set("vmcs12.guest_activity_state", 2),
         "vmx_guest_state", "vmcs12.guest_activity_state"),
    Case("guest-pg-without-pe", "vmx_guest",
         _all(_secondary(vmx.SECONDARY_EXEC_UNRESTRICTED_GUEST | vmx.SECONDARY_EXEC_ENABLE_EPT),
              _set("vmcs12.ept_pointer", 0x5000 | 0x18 | 6),
              _set("vmcs12.guest_cr0", L1_CR0 & ~1)),
         "vmx_guest_state", "vmcs12.guest_cr0", words="PG needs"),
    Case("guest-cr4-without-vmxe", "vmx_guest", _set("vmcs12.guest_cr4", 0x10),
         "vmx_guest_state", "vmcs12.guest_cr4"),
    Case("guest-dr7-high", "vmx_guest",
         _all(_or("vmcs12.vm_entry_controls", vmx.VM_ENTRY_LOAD_DEBUG_CONTROLS),
              _set("vmcs12.guest_dr7", 1 << 40)),
         "vmx_guest_state", "vmcs12.guest_dr7"),
    Case("guest-efer-lma-mismatch", "vmx_guest",
         _all(_set("flags", GM | RP), _or("vmcs12.vm_entry_controls", vmx.VM_ENTRY_LOAD_IA32_EFER),
              _set("vmcs12.guest_ia32_efer", svm.EFER_LMA | svm.EFER_LME)),
         "vmx_guest_state", "vmcs12.guest_ia32_efer"),
    Case("guest-cr3-beyond-maxphyaddr", "vmx_guest", _set("vmcs12.guest_cr3", 1 << 50),
         "vmx_guest_cr3", "vmcs12.guest_cr3"),
    # SVM: svm_set_nested_state
    Case("svm-evmcs", "svm_gif", _set("flags", GIF | NestedFlag.EVMCS), "svm_flags", "flags"),
    Case("svm-mtf", "svm_guest", _or("flags", NestedFlag.MTF_PENDING), "svm_flags", "flags"),
    Case("guest-mode-without-svme", "svm_guest", lambda s: None, "svm_svme_clear", "flags",
         {"efer": 0}),
    Case("gif-clear-without-svme-6.1", "svm_gif", _set("flags", 0), "svm_svme_clear", "flags",
         {"efer": 0}),
    Case("svm-guest-mode-in-smm", "svm_guest", lambda s: None, "svm_not_in_smm", "flags",
         {"in_smm": True}),
    Case("vmcb-pa-unaligned", "svm_guest", _set("svm.vmcb_pa", VMCB_PA + 8), "svm_vmcb_pa",
         "hdr.svm.vmcb_pa"),
    Case("vmcb-pa-invalid", "svm_guest", _set("svm.vmcb_pa", INVALID), "svm_vmcb_pa",
         "hdr.svm.vmcb_pa"),
    Case("vmcb-pa-beyond-maxphyaddr", "svm_guest", _set("svm.vmcb_pa", 1 << 40), "svm_vmcb_pa",
         "hdr.svm.vmcb_pa"),
    Case("guest-mode-header-only", "svm_gif", _set("flags", GM | GIF), "svm_size", "size"),
    Case("guest-mode-short", "svm_guest", _set("size", 2112), "svm_size", "size"),
    Case("no-vmrun-intercept", "svm_guest", _clear_vmrun, "svm_controls",
         "vmcb12.control.intercepts[4]"),
    Case("asid-zero", "svm_guest", _set("vmcb12.control.asid", 0), "svm_controls",
         "vmcb12.control.asid"),
    Case("np-without-npt", "svm_guest", _set("vmcb12.control.nested_ctl", 1), "svm_controls",
         "vmcb12.control.nested_ctl", {"npt_enabled": False}),
    Case("nested-cr3-beyond-maxphyaddr", "svm_guest",
         _all(_set("vmcb12.control.nested_ctl", 1), _set("vmcb12.control.nested_cr3", 1 << 51)),
         "svm_controls", "vmcb12.control.nested_cr3"),
    Case("msrpm-past-maxphyaddr", "svm_guest",
         _set("vmcb12.control.msrpm_base_pa", (1 << 40) - 0x1000), "svm_controls",
         "vmcb12.control.msrpm_base_pa"),
    Case("iopm-past-maxphyaddr", "svm_guest",
         _set("vmcb12.control.iopm_base_pa", (1 << 40) - 0x2000), "svm_controls",
         "vmcb12.control.iopm_base_pa"),
    Case("vnmi-without-nmi-intercept-6.12", "svm_guest",
         _set("vmcb12.control.int_ctl", svm.V_NMI_ENABLE_MASK), "svm_controls",
         "vmcb12.control.int_ctl", {"kernel_version": (6, 12, 0)}),
    Case("vcpu-cr0-nw-without-cd", "svm_guest", lambda s: None, "svm_vcpu_cr0", "vcpu.cr0",
         {"cr0": 0x20000011}),
    Case("l1-cr0-without-pg", "svm_guest", _set("vmcb12.save.cr0", svm.X86_CR0_PE),
         "svm_save_area", "vmcb12.save.cr0"),
    Case("l1-rflags-vm", "svm_guest", _set("vmcb12.save.rflags", 2 | svm.X86_EFLAGS_VM),
         "svm_save_area", "vmcb12.save.rflags"),
    Case("l1-efer-without-svme", "svm_guest", _set("vmcb12.save.efer", 0), "svm_save_area",
         "vmcb12.save.efer"),
    Case("l1-cr0-nw-without-cd", "svm_guest", _or("vmcb12.save.cr0", svm.X86_CR0_NW),
         "svm_save_area", "vmcb12.save.cr0"),
    Case("l1-cr0-high-bits", "svm_guest", _or("vmcb12.save.cr0", 1 << 32), "svm_save_area",
         "vmcb12.save.cr0"),
    Case("l1-dr6-high-bits", "svm_guest", _or("vmcb12.save.dr6", 1 << 32), "svm_save_area",
         "vmcb12.save.dr6"),
    Case("l1-dr7-high-bits", "svm_guest", _or("vmcb12.save.dr7", 1 << 33), "svm_save_area",
         "vmcb12.save.dr7"),
    Case("l1-long-mode-without-pae", "svm_guest", _or("vmcb12.save.efer", svm.EFER_LME),
         "svm_save_area", "vmcb12.save.cr4"),
    Case("l1-long-mode-cs-l-and-d", "svm_guest",
         _all(_or("vmcb12.save.efer", svm.EFER_LME | svm.EFER_LMA),
              _set("vmcb12.save.cr4", svm.X86_CR4_PAE),
              _set("vmcb12.save.cs.attrib", svm.SVM_SELECTOR_L_MASK | svm.SVM_SELECTOR_DB_MASK)),
         "svm_save_area", "vmcb12.save.cs.attrib"),
    Case("l1-long-mode-cr3-beyond-maxphyaddr", "svm_guest",
         _all(_or("vmcb12.save.efer", svm.EFER_LME | svm.EFER_LMA),
              _set("vmcb12.save.cr4", svm.X86_CR4_PAE), _set("vmcb12.save.cr3", 1 << 45)),
         "svm_save_area", "vmcb12.save.cr3"),
    Case("l1-cr4-reserved", "svm_guest", _set("vmcb12.save.cr4", 1 << 14), "svm_save_area",
         "vmcb12.save.cr4", words="reserved"),
    Case("l1-cr4-vmxe-on-amd", "svm_guest", _set("vmcb12.save.cr4", 1 << 13), "svm_save_area",
         "vmcb12.save.cr4", words="lacks"),
    Case("l1-efer-reserved", "svm_guest", _or("vmcb12.save.efer", 1 << 2), "svm_save_area",
         "vmcb12.save.efer", words="reserved"),
    Case("l1-efer-ffxsr-without-cpuid", "svm_guest", _or("vmcb12.save.efer", svm.EFER_FFXSR),
         "svm_save_area", "vmcb12.save.efer", words="fxsr_opt"),
    Case("l1-efer-autoibrs-6.1", "svm_guest", _or("vmcb12.save.efer", svm.EFER_AUTOIBRS),
         "svm_save_area", "vmcb12.save.efer", words="AUTOIBRS"),
    Case("gpat-invalid-with-npt-quirk-disabled", "svm_guest",
         _all(_set("vmcb12.control.nested_ctl", svm.SVM_NESTED_CTL_NP_ENABLE),
              _set("svm.gpat", BAD_PAT)),
         "svm_gpat", "hdr.svm.gpat", {"nested_svm_shared_pat": False, "kernel_version": (7, 2, 0)},
         words="valid PAT"),
    Case("vcpu-cr3-beyond-maxphyaddr", "svm_guest", lambda s: None, "svm_vcpu_cr3", "vcpu.cr3",
         {"cr3": 1 << 50}),
]  # fmt: skip


def _case_state(case: Case) -> tuple[NestedState, Facts]:
    make, facts = BASELINES[case.base]
    state = make()
    case.change(state)
    return state, dataclasses.replace(facts, **case.facts)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_rule_broken_alone(case: Case) -> None:
    state, facts = _case_state(case)
    found = certain(check(state, facts))
    assert found, f"{case.id}: nothing found"
    assert {p.rule_id for p in found} == {case.rule_id}, [str(p) for p in found]
    assert case.field in {p.field for p in found}, [str(p) for p in found]
    assert any(case.words in p.rule for p in found), [str(p) for p in found]
    for p in found:
        assert p.source and (p.source.startswith("arch/x86/kvm/") or "kvmstate" in p.source)


def test_every_rule_has_a_case_and_cites_the_kernel() -> None:
    covered = {c.rule_id for c in CASES}
    assert covered == {rule.__name__ for rule in checks.RULES}
    for rule in checks.RULES:
        doc = rule.__doc__ or ""
        assert doc.strip(), rule.__name__
        assert any(word in doc for word in ("x86.c", "nested", "kvmstate", "_check", "valid"))


# --- version-dependent rules ---------------------------------------------------------------


def test_vnmi_rule_is_not_in_6_1() -> None:
    state = svm_guest()
    assert state.vmcb12 is not None
    state.vmcb12.control.int_ctl = svm.V_NMI_ENABLE_MASK
    assert check(state, SVM_FACTS) == []  # 6.1 ignores V_NMI_ENABLE
    between = dataclasses.replace(SVM_FACTS, kernel_version=(6, 6, 0))
    (p,) = check(state, between)
    assert not p.certain and p.needs == "kernel_version"
    state.vmcb12.control.set_intercept(svm.INTERCEPT_NMI)
    assert check(state, dataclasses.replace(SVM_FACTS, kernel_version=(6, 12, 3))) == []


def test_gif_clear_without_svme_is_undecided_after_6_12() -> None:
    state = svm_gif()
    state.flags = 0
    for version in ((6, 1, 0), (6, 12, 9)):
        facts = dataclasses.replace(SVM_FACTS, efer=0, kernel_version=version)
        assert [p.certain for p in check(state, facts)] == [True]
    later = dataclasses.replace(SVM_FACTS, efer=0, kernel_version=(6, 13, 0))
    (p,) = check(state, later)
    assert not p.certain and p.needs == "kernel_version"
    gif = svm_gif()
    assert check(gif, dataclasses.replace(SVM_FACTS, efer=0)) == []  # GIF_SET alone is fine


def test_autoibrs_needs_cpuid_in_6_12() -> None:
    state = svm_guest()
    assert state.vmcb12 is not None
    state.vmcb12.save.efer |= svm.EFER_AUTOIBRS
    newer = dataclasses.replace(SVM_FACTS, kernel_version=(6, 12, 0))
    assert [p.rule_id for p in certain(check(state, newer))] == ["svm_save_area"]
    features = frozenset(SVM_FACTS.cpu_features or ()) | {"autoibrs"}
    with_cpuid = dataclasses.replace(newer, cpu_features=features)
    assert check(state, with_cpuid) == []


def _npt_gpat(gpat: int) -> NestedState:
    state = svm_guest()
    assert state.vmcb12 is not None
    state.vmcb12.control.nested_ctl = svm.SVM_NESTED_CTL_NP_ENABLE
    state.svm.gpat = gpat
    return state


@pytest.mark.parametrize("byte", range(256))
def test_gpat_rule_takes_exactly_the_six_memory_types(byte: int) -> None:
    # Every byte of gpat in turn: the architecture's memory types are 0, 1, 4, 5, 6, 7.
    facts = dataclasses.replace(SVM_FACTS, kernel_version=(7, 2, 0), nested_svm_shared_pat=False)
    for shift in range(0, 64, 8):
        gpat = (GOOD_PAT & ~(0xFF << shift)) | byte << shift
        problems = check(_npt_gpat(gpat), facts)
        if byte in (0, 1, 4, 5, 6, 7):
            assert problems == []
        else:
            assert [(p.rule_id, p.field, p.value, p.certain) for p in problems] == [
                ("svm_gpat", "hdr.svm.gpat", gpat, True)
            ]


def test_gpat_rule_needs_npt_and_the_quirk_disabled() -> None:
    disabled = dataclasses.replace(SVM_FACTS, kernel_version=(7, 2, 0), nested_svm_shared_pat=False)
    (p,) = check(_npt_gpat(BAD_PAT), disabled)
    assert p.certain and "commit 4f256d5770fe" in p.source and "7.2" in p.source
    # The quirk in force (the default): gpat is ignored, whatever it holds.
    enabled = dataclasses.replace(disabled, nested_svm_shared_pat=True)
    assert check(_npt_gpat(BAD_PAT), enabled) == []
    # Without nested paging in vmcb12 L2 has no PAT of its own.
    no_npt = _npt_gpat(BAD_PAT)
    assert no_npt.vmcb12 is not None
    no_npt.vmcb12.control.nested_ctl = 0
    assert check(no_npt, disabled) == []
    # Outside guest mode SET reads nothing but flags.
    gif = svm_gif()
    gif.svm.gpat = BAD_PAT
    assert check(gif, disabled) == []


def test_gpat_rule_is_undecided_without_the_quirk_state() -> None:
    for version in ((7, 2, 0), (7, 3, 1)):
        (p,) = check(_npt_gpat(BAD_PAT), dataclasses.replace(SVM_FACTS, kernel_version=version))
        assert not p.certain and p.needs == "nested_svm_shared_pat"
        assert "undecided: depends on nested_svm_shared_pat" in str(p)
    (p,) = check(_npt_gpat(BAD_PAT), dataclasses.replace(SVM_FACTS, kernel_version=None))
    assert not p.certain and p.needs == "nested_svm_shared_pat (or a kernel_version before 7.2)"
    # Kernels before 7.2 ignore gpat: the version alone decides then.
    for version in ((6, 1, 0), (6, 12, 9), (7, 1, 4)):
        older = dataclasses.replace(SVM_FACTS, kernel_version=version)
        assert check(_npt_gpat(BAD_PAT), older) == []
    # A disabled quirk proves the kernel has the series, whatever its number says.
    backport = dataclasses.replace(
        SVM_FACTS, kernel_version=(6, 12, 0), nested_svm_shared_pat=False
    )
    assert [p.certain for p in check(_npt_gpat(BAD_PAT), backport)] == [True]
    assert check(_npt_gpat(GOOD_PAT), dataclasses.replace(SVM_FACTS, kernel_version=None)) == []


def test_quirk_fact_parses_from_text() -> None:
    assert Facts.from_strings({"nested_svm_shared_pat": "no"}).nested_svm_shared_pat is False
    with pytest.raises(TypeError, match="nested_svm_shared_pat"):
        Facts(nested_svm_shared_pat=0)  # type: ignore[arg-type]


# --- undecided verdicts name the fact -------------------------------------------------------


@pytest.mark.parametrize(
    ("base", "change", "unknown", "needs"),
    [
        ("svm_guest", _set("svm.vmcb_pa", 1 << 40), ("maxphyaddr",), "maxphyaddr"),
        ("svm_guest", lambda s: None, ("efer",), "efer"),
        ("svm_guest", lambda s: None, ("in_smm",), "in_smm"),
        ("svm_guest", lambda s: None, ("cr0",), "cr0"),
        ("svm_guest", lambda s: None, ("cr3",), "cr3"),
        ("svm_guest", _set("vmcb12.control.nested_ctl", 1), ("npt_enabled",), "npt_enabled"),
        ("svm_guest", _set("vmcb12.save.cr4", 1 << 18), ("cpu_features",), "cpu_features"),
        ("svm_guest", lambda s: None, ("has_svm", "cpu_features"), "has_svm"),
        ("vmx_root", lambda s: None, ("has_vmx", "cpu_features"), "has_vmx"),
        ("vmx_root", _set("vmx.smm.flags", 2), ("in_smm",), "in_smm"),
        ("vmx_guest",
         _or("vmcs12.pin_based_vm_exec_control",
             vmx.PIN_BASED_VIRTUAL_NMIS | vmx.PIN_BASED_NMI_EXITING),
         ("vmx_msrs",), "vmx_msrs"),
        ("vmx_guest", _set("vmcs12.host_fs_base", 1 << 50), ("host_la57",), "host_la57"),
        ("vmx_guest", _set("vmcs12.host_fs_base", 1 << 50), ("kernel_version", "host_la57"),
         "kernel_version"),
        ("vmx_guest", _all(_SHADOW, _set("size", VMX_MAX_SIZE),
                           _set("shadow_vmcs12.hdr.revision_id", vmx.VMCS12_REVISION),
                           _set("shadow_vmcs12.hdr.shadow_vmcs", 1)),
         (), "guest memory"),
        ("vmx_root", _all(_set("vmx.vmxon_pa", INVALID), _set("flags", NestedFlag.EVMCS)),
         ("evmcs_enabled",), "evmcs_enabled"),
        ("svm_gif", _set("flags", 0), ("kernel_version",), "kernel_version"),
        ("svm_guest", _all(_set("vmcb12.control.nested_ctl", 1), _set("svm.gpat", BAD_PAT)),
         ("kernel_version",), "nested_svm_shared_pat"),
    ],
)  # fmt: skip
def test_unknown_fact_gives_an_undecided_problem_naming_it(
    base: str, change: Callable[[NestedState], Any], unknown: tuple[str, ...], needs: str
) -> None:
    make, facts = BASELINES[base]
    state = make()
    change(state)
    overrides: dict[str, Any] = {name: None for name in unknown}
    if base == "svm_gif":
        overrides["efer"] = 0
    problems = check(state, dataclasses.replace(facts, **overrides))
    assert certain(problems) == []
    undecided = [p for p in problems if needs in (p.needs or "")]
    assert undecided, [str(p) for p in problems]
    assert all(needs in str(p) and "undecided" in str(p) for p in undecided)


# --- guest memory: the VMCS link pointer's page ------------------------------------------------

LINK = 0x8000  # where _SHADOW puts the link pointer


def _shadow_state() -> NestedState:
    state = vmx_guest()
    _SHADOW(state)
    state.size = VMX_MAX_SIZE
    assert state.shadow_vmcs12 is not None
    state.shadow_vmcs12.hdr.revision_id = vmx.VMCS12_REVISION
    state.shadow_vmcs12.hdr.shadow_vmcs = 1
    return state


def _page(revision: int, shadow: int) -> bytes:
    """A 4 KiB guest page whose first u32 is a VMCS header (SDM: revision in bits 30:0,
    the shadow-VMCS indicator in bit 31)."""
    return (revision | shadow << 31).to_bytes(4, "little") + bytes(4092)


@pytest.mark.parametrize(
    ("regions", "refused", "words"),
    [
        ([(LINK, _page(vmx.VMCS12_REVISION, 1))], False, ""),
        ([(0, bytes(LINK) + _page(vmx.VMCS12_REVISION, 1))], False, ""),  # inside a region
        ([(LINK, _page(vmx.VMCS12_REVISION + 1, 1))], True, "revision"),
        ([(LINK, _page(vmx.VMCS12_REVISION, 0))], True, "shadow bit 0"),
        ([(0, bytes(LINK))], True, "not in guest memory"),  # ends right below the page
        ([(LINK, bytes(4095))], True, "not in guest memory"),  # a page cut short
        ([], True, "not in guest memory"),
    ],
)
def test_link_pointer_page_is_decided_by_guest_memory(
    regions: list[tuple[int, bytes]], refused: bool, words: str
) -> None:
    state = _shadow_state()
    problems = check(state, VMX_FACTS, memory=checks.Regions(regions))
    assert all(p.certain for p in problems), [str(p) for p in problems]
    assert [p.field for p in problems] == (["vmcs12.vmcs_link_pointer"] if refused else [])
    assert all(words in p.rule for p in problems)


def test_link_pointer_page_without_memory_is_undecided() -> None:
    (p,) = check(_shadow_state(), VMX_FACTS)
    assert not p.certain and p.needs is not None and "memory" in p.needs


def test_link_pointer_shadow_bit_follows_the_control() -> None:
    """Without SHADOW_VMCS in vmcs12, the page's shadow bit must be clear."""
    state = vmx_guest()
    assert state.vmcs12 is not None
    state.vmcs12.vmcs_link_pointer = LINK
    ordinary = checks.Regions([(LINK, _page(vmx.VMCS12_REVISION, 0))])
    assert check(state, VMX_FACTS, memory=ordinary) == []
    shadow = checks.Regions([(LINK, _page(vmx.VMCS12_REVISION, 1))])
    assert [p.certain for p in check(state, VMX_FACTS, memory=shadow)] == [True]


def test_memory_is_read_only_where_the_kernel_reads_it() -> None:
    """An unaligned link pointer is refused before any read; VMX root state reads nothing."""
    reads: list[tuple[int, int]] = []

    class Spy:
        def read_physical(self, gpa: int, size: int) -> bytes | None:
            reads.append((gpa, size))
            return None

    state = _shadow_state()
    assert state.vmcs12 is not None
    state.vmcs12.vmcs_link_pointer = LINK + 8
    assert [p.rule_id for p in certain(check(state, VMX_FACTS, memory=Spy()))] == [
        "vmx_guest_state"
    ]
    check(vmx_root(), VMX_FACTS, memory=Spy())
    assert reads == []
    check(_shadow_state(), VMX_FACTS, memory=Spy())
    assert reads == [(LINK, 4096)]  # VMCS12_SIZE, as kvm_gfn_to_hva_cache_init maps


def test_bad_memory_arguments_are_refused() -> None:
    with pytest.raises(TypeError, match="read_physical"):
        check(vmx_guest(), VMX_FACTS, memory=b"\0" * 4096)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="guest-physical address"):
        checks.Regions([(-1, b"")])
    with pytest.raises(TypeError, match="buffer"):
        checks.Regions([(0, 4096)])
    assert checks.Regions([(0, b"ab")]).read_physical(-1, 1) is None


@needs_kvm
def test_regions_from_a_vm_read_its_memory_as_it_is() -> None:
    with kvmstate.Kvm() as kvm, kvm.create_vm() as vm:
        mem = vm.add_memory(0x10000, 0x4000)
        memory = checks.Regions.from_vm(vm, {0: mem})
        mem[0x1000:0x1004] = b"\x01\x02\x03\x04"
        assert memory.read_physical(0x11000, 4) == b"\x01\x02\x03\x04"  # read when asked
        assert memory.read_physical(0x13FFF, 2) is None  # past the slot's end
        with pytest.raises(ValueError, match="slot 3"):
            checks.Regions.from_vm(vm, {3: mem})
        with pytest.raises(ValueError, match="shorter"):
            checks.Regions.from_vm(vm, {0: b"\0" * 16})


def test_smm_guest_mode_and_guest_mode_exclude_each_other() -> None:
    state = vmx_root()
    state.vmx.smm.flags = uapi.KVM_STATE_NESTED_SMM_GUEST_MODE | uapi.KVM_STATE_NESTED_SMM_VMXON
    state.flags = GM
    for in_smm in (False, True):
        found = certain(check(state, dataclasses.replace(VMX_FACTS, in_smm=in_smm)))
        assert any(p.rule_id == "vmx_smm_flags" and "excludes GUEST_MODE" in p.rule for p in found)


def test_la57_decides_canonical_addresses() -> None:
    state = vmx_guest()
    assert state.vmcs12 is not None
    state.vmcs12.host_gs_base = 1 << 50  # canonical with 57-bit addresses only
    (p,) = check(state, VMX_FACTS)  # la57=False, host_la57=False
    assert p.certain and p.field == "vmcs12.host_gs_base"
    assert check(state, dataclasses.replace(VMX_FACTS, host_la57=True)) == []
    state.vmcs12.host_gs_base = 1 << 60  # canonical nowhere
    unknown = dataclasses.replace(VMX_FACTS, la57=None, host_la57=None)
    assert [p.certain for p in check(state, unknown)] == [True]


# Linux 6.1 (vmx/nested.c nested_vmx_check_host_state, x86.h is_noncanonical_address) checks
# every host address at the vCPU's CR4.LA57; 6.12 checks the SYSENTER MSRs and the bases at
# KVM's LA57 (is_noncanonical_msr/base_address -> max_host_virt_addr_bits) and HOST_RIP at
# the vCPU's (vcpu_virt_addr_bits).
@pytest.mark.parametrize(
    ("field", "version", "vcpu_la57", "host_la57", "refused"),
    [
        ("host_gs_base", (6, 1, 0), False, True, True),
        ("host_gs_base", (6, 1, 0), True, False, False),
        ("host_gs_base", (6, 12, 0), False, True, False),
        ("host_gs_base", (6, 12, 0), True, False, True),
        ("host_ia32_sysenter_esp", (6, 12, 0), True, False, True),
        ("host_rip", (6, 12, 0), False, True, True),
        ("host_rip", (6, 12, 0), True, False, False),
    ],
)
def test_canonical_checks_split_between_vcpu_and_kvm_in_6_12(
    field: str, version: tuple[int, ...], vcpu_la57: bool, host_la57: bool, refused: bool
) -> None:
    state = vmx_guest()
    assert state.vmcs12 is not None
    state.vmcs12.vm_exit_controls |= vmx.VM_EXIT_HOST_ADDR_SPACE_SIZE
    setattr(state.vmcs12, field, 0x00FF_0000_0000_0000)  # canonical at 57 bits only
    facts = dataclasses.replace(
        VMX_FACTS, kernel_version=version, la57=vcpu_la57, host_la57=host_la57
    )
    found = [p for p in check(state, facts) if p.field == f"vmcs12.{field}"]
    assert all(p.certain for p in found)
    assert bool(found) == refused, [str(p) for p in found]


def test_vcpu_la57_comes_from_cr4_when_not_given() -> None:
    state = vmx_guest()
    assert state.vmcs12 is not None
    state.vmcs12.vm_exit_controls |= vmx.VM_EXIT_HOST_ADDR_SPACE_SIZE
    state.vmcs12.host_rip = 1 << 50

    def rip(facts: Facts) -> list[Problem]:
        return [p for p in check(state, facts) if p.field == "vmcs12.host_rip"]

    assert rip(dataclasses.replace(VMX_FACTS, la57=None, cr4=L1_CR4 | 0x1000)) == []  # LA57
    assert [p.certain for p in rip(dataclasses.replace(VMX_FACTS, la57=None))] == [True]
    (p,) = rip(dataclasses.replace(VMX_FACTS, la57=None, cr4=None))
    assert not p.certain and p.needs is not None and "la57" in p.needs


@pytest.mark.parametrize(
    ("version", "lam", "refused"),
    [((6, 1, 0), True, True), ((6, 1, 0), False, True), ((6, 12, 0), True, False),
     ((6, 12, 0), False, True)],
)  # fmt: skip
def test_cr3_lam_bits_by_kernel_version(version: tuple[int, ...], lam: bool, refused: bool) -> None:
    """cpuid.h kvm_vcpu_is_legal_cr3 (6.12) masks LAM_U48/U57 with CPUID LAM; 6.1's
    kvm_vcpu_is_illegal_gpa keeps them, and bit 61 is beyond any MAXPHYADDR."""
    state = vmx_guest()
    assert state.vmcs12 is not None
    state.vmcs12.host_cr3 = L1_CR3 | 1 << 61
    features = VMX_FACTS.cpu_features or frozenset()
    facts = dataclasses.replace(
        VMX_FACTS, kernel_version=version, cpu_features=features | {"lam"} if lam else features
    )
    found = check(state, facts)
    assert all(p.certain for p in found)
    assert bool(found) == refused, [str(p) for p in found]
    if lam:  # a kernel between the two, or unknown: the version decides
        for between in (None, (6, 6, 0)):
            (p,) = check(state, dataclasses.replace(facts, kernel_version=between))
            assert not p.certain and p.needs == "kernel_version"


def test_addresses_below_4g_need_no_maxphyaddr() -> None:
    facts = dataclasses.replace(SVM_FACTS, maxphyaddr=None)
    assert check(svm_guest(), facts) == []
    state = svm_guest()
    state.svm.vmcb_pa = 1 << 52
    assert [p.certain for p in check(state, facts)] == [True]


# --- text ---------------------------------------------------------------------------------------


def test_problem_text_names_field_value_rule_and_source() -> None:
    state = svm_guest()
    assert state.vmcb12 is not None
    state.vmcb12.control.asid = 0
    (p,) = check(state, SVM_FACTS)
    assert str(p) == (
        "vmcb12.control.asid = 0: the ASID must not be 0 (ASID 0 is the host's) "
        "[arch/x86/kvm/svm/nested.c: __nested_vmcb_check_controls]"
    )
    assert p.to_dict()["value_text"] == "0" and p.to_dict()["rule_id"] == "svm_controls"


def test_flags_are_shown_by_name() -> None:
    state = svm_gif()
    state.flags = GIF | RP
    (p,) = check(state, SVM_FACTS)
    assert p.value_text == "RUN_PENDING|GIF_SET"


def test_explain_sums_up_on_its_first_line() -> None:
    state = svm_guest()
    assert state.vmcb12 is not None
    state.vmcb12.control.asid = 0
    state.svm.vmcb_pa = 0x10008
    text = explain(state, SVM_FACTS)
    first, *rest = text.splitlines()
    assert first == (
        "KVM_SET_NESTED_STATE refuses this state (2 problems: hdr.svm.vmcb_pa, "
        "vmcb12.control.asid):"
    )
    assert len(rest) == 2 and all(line.startswith("  - ") for line in rest)


def test_explain_groups_undecided_problems_by_fact() -> None:
    text = explain(svm_guest())
    assert text.splitlines()[0].startswith("no rule is surely broken")
    assert "  depending on efer:" in text and "  depending on in_smm:" in text
    assert explain(svm_guest(), SVM_FACTS) == format_problems([])
    assert "no rule" in format_problems([])


# --- odd input never raises ---------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=9000))
def test_garbage_bytes_give_problems_not_exceptions(data: bytes) -> None:
    for facts in (Facts(), SVM_FACTS, VMX_FACTS):
        problems = check(data, facts)
        assert all(p.rule_id != "" and p.field != "(check)" for p in problems)
        format_problems(problems)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(sorted(BASELINES)),
    st.lists(st.tuples(st.integers(0, 8319), st.integers(0, 255)), max_size=40),
    st.sampled_from([128, 1126, 4224, 5222, 8320]),
)
def test_mutated_states_never_raise(base: str, pokes: list[tuple[int, int]], size: int) -> None:
    make, facts = BASELINES[base]
    state = NestedState(VMX_MAX_SIZE)
    raw = make().buffer
    state.buffer[: len(raw)] = raw
    state.size = size
    for offset, byte in pokes:
        state.buffer[offset] = byte
    for f in (Facts(), facts):
        problems = check(state, f)
        assert all(p.field != "(check)" for p in problems), [str(p) for p in problems]
        str(explain(state, f))


def test_short_data_is_a_size_problem() -> None:
    (p,) = check(b"\x01" * 10)
    assert p.field == "size" and p.certain


def test_check_refuses_non_buffers() -> None:
    with pytest.raises(TypeError, match="NestedState or bytes"):
        check(42)


def test_internal_rule_error_is_reported_not_raised() -> None:
    def broken(c: Any) -> None:
        raise RuntimeError("boom")

    # The engine check() uses, given a table with one rule that always breaks.
    (p,) = engine.run([(lambda c: True, broken)], svm_gif(), Facts())
    assert p.field == "(check)" and not p.certain and "boom" in p.rule


# --- facts ---------------------------------------------------------------------------------------


def test_facts_from_strings() -> None:
    facts = Facts.from_strings(
        {
            "vendor": "SVM",
            "svme": "1",
            "in_smm": "no",
            "maxphyaddr": "0x28",
            "kernel_version": "6.1.0-56-amd64",
            "cpu_features": "svm, lm,nx",
            "vmx_msrs": "0x48d:0xff00000016,0x491:1",
        }
    )
    assert facts.vendor == "svm" and facts.efer == svm.EFER_SVME and facts.in_smm is False
    assert facts.maxphyaddr == 40 and facts.kernel_version == (6, 1, 0)
    assert facts.cpu_features == frozenset({"svm", "lm", "nx"}) and facts.feature("nx") is True
    assert facts.msr(0x48D) == 0xFF00000016 and facts.msr(0x48E) is None
    assert "vendor='svm'" in repr(facts) and "maxphyaddr=40" in repr(facts)


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        ([("colour", "1")], "unknown fact 'colour'"),
        ([("in_smm", "maybe")], "fact in_smm='maybe'"),
        ([("maxphyaddr", "x")], "fact maxphyaddr"),
        ([("maxphyaddr", "99")], "outside 0..64"),
        ([("vendor", "arm")], "vendor must be"),
        ([("cpu_features", "avx9")], "unknown CPUID features"),
        ([("kernel_version", "latest")], "kernel release"),
        ([("vmx_msrs", "0x48d")], "INDEX:VALUE"),
        ([("efer", "1"), ("svme", "1")], "given twice"),
        ([("efer", "-1")], "fact efer is -1, outside 0..0xffffffffffffffff"),
        ([("cr3", "-1")], "fact cr3 is -1"),
        ([("cr4", str(1 << 64))], "fact cr4 is 0x10000000000000000"),
        ([("nested_state_cap", "-5")], "fact nested_state_cap is -5, outside 0..2147483647"),
        ([("vmx_msrs", "0x480:-1")], r"fact vmx_msrs\[0x480\] is -1"),
    ],
)
def test_facts_from_strings_errors(pairs: list[tuple[str, str]], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Facts.from_strings(pairs)


def test_facts_type_checked() -> None:
    with pytest.raises(TypeError, match="in_smm"):
        Facts(in_smm=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="fact efer must be int"):
        Facts(efer=True)
    with pytest.raises(TypeError, match="fact cr0 must be int"):
        Facts(cr0="0x11")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="fact vendor must be a str"):
        Facts(vendor=1)  # type: ignore[arg-type]
    assert Facts(nested_state_cap=8320).target_vendor() == "vmx"
    assert Facts(nested_state_cap=0).target_vendor() is None
    assert Facts(has_svm=True, cpu_features=frozenset()).feature("svm") is True
    assert Facts().known() == {}


@pytest.mark.parametrize(
    ("fields", "error", "message"),
    [
        ({"efer": -1}, ValueError, "fact efer is -1, outside 0..0xffffffffffffffff"),
        ({"cr3": 1 << 64}, ValueError, "fact cr3 is 0x10000000000000000, outside"),
        ({"feature_control": -1}, ValueError, "fact feature_control is -1"),
        ({"nested_state_cap": -5}, ValueError, "fact nested_state_cap is -5"),
        ({"nested_state_cap": 1 << 31}, ValueError, "fact nested_state_cap is 0x80000000"),
        ({"maxphyaddr": 65}, ValueError, "fact maxphyaddr is 65, outside 0..64"),
        ({"vmx_msrs": {0x480: -1}}, ValueError, r"fact vmx_msrs\[0x480\] is -1"),
        ({"vmx_msrs": {0x480: 1 << 64}}, ValueError, r"fact vmx_msrs\[0x480\] is 0x1"),
        ({"vmx_msrs": {-1: 0}}, ValueError, "fact vmx_msrs index is -1"),
        ({"vmx_msrs": {0x480: True}}, TypeError, r"vmx_msrs\[0x480\] must be int"),
        ({"vmx_msrs": [(0x480, 1)]}, TypeError, "vmx_msrs must be a mapping"),
        ({"kernel_version": "latest"}, ValueError, "'latest' is not a kernel release"),
        ({"kernel_version": 6.1}, TypeError, "tuple of ints such as"),
        ({"kernel_version": ("6", "1")}, TypeError, "'6' is not an int"),
        ({"kernel_version": (6, -1)}, ValueError, "-1 is negative"),
        ({"kernel_version": ()}, ValueError, "must not be empty"),
        ({"cpu_features": ["svm", 5]}, TypeError, "a feature name must be a str, not 5"),
        ({"cpu_features": 5}, TypeError, "set of feature names or a comma-separated str"),
        ({"cpu_features": "s,v,m"}, ValueError, r"unknown CPUID features \['m', 's', 'v'\]"),
        ({"cpu_features": {"svm", "SVM"}}, ValueError, r"unknown CPUID features \['SVM'\]"),
    ],
)
def test_facts_refuse_what_they_cannot_mean(
    fields: dict[str, Any], error: type[Exception], message: str
) -> None:
    """Out-of-range or mistyped facts: an error naming the fact, never a wrapped register."""
    with pytest.raises(error, match=message):
        Facts(**fields)


def test_facts_take_the_text_forms_of_from_strings() -> None:
    """A str kernel_version is a release; a str cpu_features a comma list, never its letters."""
    assert Facts(kernel_version="6.1").kernel_version == (6, 1)
    assert Facts(kernel_version="6.12.3-amd64").kernel_version == (6, 12, 3)
    assert Facts(kernel_version=[6, 1, 0]).kernel_version == (6, 1, 0)
    assert Facts(cpu_features="svm").cpu_features == frozenset({"svm"})
    assert Facts(cpu_features="svm, LM,nx").cpu_features == frozenset({"svm", "lm", "nx"})
    assert Facts(cpu_features="").cpu_features == frozenset()
    assert Facts(cpu_features=["svm", "lm"]).cpu_features == frozenset({"svm", "lm"})
    # The parsed forms behave: the 6.1 rule on AUTOIBRS, the svm feature.
    assert Facts(cpu_features="svm").feature("svm") is True
    assert Facts(cpu_features="svm").feature("s") is False
    assert Facts(efer=(1 << 64) - 1).efer == (1 << 64) - 1
    assert Facts(vmx_msrs={0x480: (1 << 64) - 1}).msr(0x480) == (1 << 64) - 1


def test_check_and_explain_refuse_a_dict_of_facts() -> None:
    state = svm_guest()
    for call in (check, explain):
        with pytest.raises(TypeError, match=r"needs facts as a Facts or None, not dict \(make one"):
            call(state, {"vendor": "svm"})  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"not str$"):
            call(state, "vendor=svm")  # type: ignore[arg-type]
    assert explain(state, Facts.from_strings({"vendor": "svm"})) == explain(
        state, Facts(vendor="svm")
    )


def test_facts_from_a_saved_state() -> None:
    """What restore sets before the nested state: the saved CPUID, sregs and MSRs."""
    assert Facts.from_state(VcpuState()) == Facts()
    with pytest.raises(TypeError, match="from_state\\(\\) needs a VcpuState, not NoneType"):
        Facts.from_state(None)  # type: ignore[arg-type]
    sregs = uapi.kvm_sregs()
    sregs.efer, sregs.cr0, sregs.cr3, sregs.cr4 = svm.EFER_SVME, 0x80000011, 0x5000, 0x20
    cpuid = uapi.kvm_cpuid2.new(3)
    leaves = cpuid.items()
    leaves[0].function, leaves[0].eax = 0x80000000, 0x80000008
    leaves[1].function, leaves[1].ecx = 0x80000001, 1 << 2  # CPUID.80000001h:ECX.SVM
    leaves[1].edx = 1 << 29  # LM
    leaves[2].function, leaves[2].eax = 0x80000008, 0x3028  # MAXPHYADDR 40
    facts = Facts.from_state(VcpuState(sregs=sregs, cpuid=cpuid, msrs={0x3A: 5, 0x480: 7}))
    assert (facts.efer, facts.cr0, facts.cr3, facts.cr4) == (
        svm.EFER_SVME,
        0x80000011,
        0x5000,
        0x20,
    )
    assert facts.cpu_features == frozenset({"svm", "lm"}) and facts.has_svm is True
    assert facts.has_vmx is False and facts.maxphyaddr == 40
    # Not the target machine's, nor SMM (the events are restored after the nested state).
    assert facts.vendor is None and facts.kernel_version is None and facts.in_smm is None
    assert facts.nested_state_cap is None
    assert facts.vmx_msrs is None and facts.feature_control is None  # no VMX in its CPUID
    # sregs2 when there is no sregs; VMX MSRs when the CPUID has VMX.
    sregs2 = uapi.kvm_sregs2()
    sregs2.efer = 0x500
    vmx_cpuid = uapi.kvm_cpuid2.new(1)
    vmx_cpuid.items()[0].function, vmx_cpuid.items()[0].ecx = 1, 1 << 5  # CPUID.1:ECX.VMX
    facts = Facts.from_state(
        VcpuState(sregs2=sregs2, cpuid=vmx_cpuid, msrs={0x3A: 5, 0x480: 7, 0x48D: 9})
    )
    assert facts.efer == 0x500 and facts.has_vmx is True and facts.maxphyaddr == 36
    assert facts.feature_control == 5 and dict(facts.vmx_msrs or {}) == {0x48D: 9}


class _Unreadable:
    """A vCPU whose every read fails."""

    @property
    def nested_state_size(self) -> int:
        raise OSError(errno.EBADF, "closed")

    def __getattr__(self, name: str) -> Any:
        def fail(*args: Any) -> Any:
            raise OSError(errno.EBADF, "closed")

        return fail


def test_from_vcpu_leaves_unreadable_facts_unknown() -> None:
    facts = Facts.from_vcpu(_Unreadable())
    assert facts.has_vmx is None and facts.efer is None and facts.in_smm is None
    assert facts.maxphyaddr is None and facts.nested_state_cap is None
    assert facts.kernel_version == checks.parse_kernel_version(os.uname().release)


def test_from_vcpu_reads_a_real_vcpu(vcpu: kvmstate.Vcpu) -> None:
    facts = Facts.from_vcpu(vcpu)
    # A fresh vCPU: no CPUID set, so KVM's defaults (no features, MAXPHYADDR 36).
    assert facts.cpu_features == frozenset() and facts.has_vmx is False
    assert facts.maxphyaddr == 36
    assert facts.in_smm is False and facts.efer == 0 and facts.cr0 == 0x60000010
    assert facts.nested_state_cap == vcpu.nested_state_size


def test_from_vcpu_reads_cpuid(kvm: kvmstate.Kvm, vcpu: kvmstate.Vcpu) -> None:
    vcpu.set_cpuid2(kvm.get_supported_cpuid())
    facts = Facts.from_vcpu(vcpu)
    assert facts.cpu_features is not None and "lm" in facts.cpu_features
    assert facts.maxphyaddr is not None and 32 <= facts.maxphyaddr <= 52


def test_from_vcpu_reads_kvms_own_la57(kvm: kvmstate.Kvm, vcpu: kvmstate.Vcpu) -> None:
    """host_la57 is KVM_GET_SUPPORTED_CPUID's leaf 7.0 ECX bit 16 (SDM: LA57), which 6.12's
    kvm_cpu_cap_has(X86_FEATURE_LA57) reflects; the vCPU's own CPUID does not matter."""
    supported = kvm.get_supported_cpuid()
    leaf7 = [
        e for e in list(supported.items())[: len(supported)] if (e.function, e.index) == (7, 0)
    ]
    want = bool(leaf7 and leaf7[0].ecx & 1 << 16)
    assert Facts.from_vcpu(vcpu).host_la57 is want
    assert Facts.from_vcpu(_Unreadable()).host_la57 is None  # no VM, no Kvm to ask


# --- the kernel agrees (inside the emulated AMD guest) ---------------------------------------


def _kernel_set(vcpu: kvmstate.Vcpu, state: NestedState) -> int:
    """The kernel's own answer, with no library check in between: 0, an errno, or the
    positive value vmx_set_nested_state passes up when L2 cannot be entered (2)."""
    assert state.size <= state.capacity  # the kernel reads `size` bytes
    try:
        return int(fcntl.ioctl(vcpu.fileno(), ioctls.KVM_SET_NESTED_STATE, state._storage))
    except OSError as exc:
        return exc.errno or -1


def _enter_smm(vcpu: kvmstate.Vcpu) -> None:
    """Put ``vcpu`` in SMM through its events (the fact ``in_smm`` the kernel reads)."""
    events = vcpu.get_vcpu_events()
    events.flags = uapi.KVM_VCPUEVENT_VALID_SMM
    events.smi.smm = 1
    vcpu.set_vcpu_events(events)


def _vcpus(setup: Callable[..., None]) -> Iterator[Callable[..., kvmstate.Vcpu]]:
    """A maker of fresh vCPUs, each in a VM of its own, prepared by ``setup(kvm, vcpu,
    **options)`` and then put in SMM when asked (``smm=True``); all closed at the end."""
    with contextlib.ExitStack() as opened:
        kvm = opened.enter_context(kvmstate.Kvm())

        def make(*, smm: bool = False, **options: Any) -> kvmstate.Vcpu:
            vm = opened.enter_context(kvm.create_vm())
            vcpu = opened.enter_context(vm.create_vcpu(0))
            setup(kvm, vcpu, **options)
            if smm:
                _enter_smm(vcpu)
            return vcpu

        yield make


def _as_svm_vmm_does(
    kvm: kvmstate.Kvm, vcpu: kvmstate.Vcpu, *, svme: bool = True, cr3: int | None = None
) -> None:
    vcpu.set_cpuid2(kvm.get_supported_cpuid())
    sregs = vcpu.get_sregs()
    if svme:
        sregs.efer |= svm.EFER_SVME
    if cr3 is not None:
        sregs.cr3 = cr3
    vcpu.set_sregs(sregs)


@pytest.fixture
def amd_vcpu() -> Iterator[Callable[..., kvmstate.Vcpu]]:
    """vCPUs as a VMM restoring SVM state makes them: supported CPUID, then EFER.SVME."""
    yield from _vcpus(_as_svm_vmm_does)


# The SVM cases the kernel can be asked about: every one from CASES on an SVM baseline (the
# facts are then read from the vCPU, not taken from the case) whose facts a vCPU can be made
# to have, plus the generic ones and a few the kernel must accept.
_VCPU_SETUP: dict[str, dict[str, Any]] = {
    "efer": {"svme": False},
    "in_smm": {"smm": True},
    "cr3": {"cr3": 1 << 50},
}
_NOT_MADE = {
    "vendor",  # the format/vendor cases are below, as a VMX state on kvm_amd
    "nested_state_cap",  # this KVM has nested state
    "npt_enabled",  # kvm_amd's npt is a module parameter (Y in the guest)
    "nested_svm_shared_pat",  # 6.1 has no such quirk to disable
    "cr0",  # KVM_SET_SREGS itself refuses CR0.NW without CD
}
SVM_KERNEL_CASES = [
    c
    for c in CASES
    if c.base.startswith("svm")
    and not set(c.facts) & _NOT_MADE
    and c.rule_id != "size_within_data"  # the kernel would read past the buffer
]
_Extra = tuple[str, str, Callable[[NestedState], Any], dict[str, Any]]
MORE_KERNEL_CASES: list[_Extra] = [
    ("baseline", "svm_guest", lambda s: None, {}),
    ("gif-only", "svm_gif", lambda s: None, {}),
    ("gif-only-without-svme", "svm_gif", lambda s: None, {"svme": False}),
    ("vnmi-without-nmi-intercept", "svm_guest",
     _set("vmcb12.control.int_ctl", svm.V_NMI_ENABLE_MASK), {}),
    ("np-with-npt", "svm_guest", _set("vmcb12.control.nested_ctl", 1), {}),
    # 6.1 and 6.12 have no gPAT: any gpat passes, as check() says for a kernel_version
    # before 7.2.
    ("gpat-ignored-before-7.2", "svm_guest",
     _all(_set("vmcb12.control.nested_ctl", 1), _set("svm.gpat", BAD_PAT)), {}),
    ("lmsle", "svm_guest", _or("vmcb12.save.efer", svm.EFER_LMSLE), {}),
    ("long-mode-l1", "svm_guest",
     _all(_or("vmcb12.save.efer", svm.EFER_LME | svm.EFER_LMA),
          _set("vmcb12.save.cr4", svm.X86_CR4_PAE), _set("vmcb12.save.cr3", 0x1000),
          _set("vmcb12.save.cs.attrib", svm.SVM_SELECTOR_L_MASK)), {}),
    ("bitmaps-ignore-low-bits", "svm_guest",
     _set("vmcb12.control.iopm_base_pa", IOPM_PA | 0xFFF), {}),
    ("run-pending", "svm_guest", _or("flags", RP), {}),
    ("gif-clear-in-guest-mode", "svm_guest", _set("flags", GM), {}),
    ("vmx-state-on-amd", "vmx_root", lambda s: None, {}),  # refused: the format
]  # fmt: skip


# The kernel's answer where it is not the same in every series the guests boot, with the
# reason from each series' source (SVM: arch/x86/kvm/svm/nested.c).
MORE_KERNEL_ANSWERS: dict[str, dict[tuple[int, int], int]] = {
    # __nested_vmcb_check_controls: 6.12 refuses V_NMI_ENABLE without the NMI intercept
    # (unconditionally: not only when vNMI is offered to L1); 6.1 has no such check.
    "vnmi-without-nmi-intercept": {(6, 1): 0, (6, 12): errno.EINVAL},
    # Neither 6.1 nor 6.12 reads a gPAT from the header (kvm_svm_nested_state_hdr has only
    # vmcb_pa): NPT on with any gpat is accepted.
    "gpat-ignored-before-7.2": {(6, 1): 0, (6, 12): 0},
}


def _agree(
    vcpu: kvmstate.Vcpu, state: NestedState, undecided: frozenset[str] = frozenset()
) -> tuple[int, list[Problem]]:
    """SET on the kernel and check() must agree: refused exactly when a problem is certain.

    Facts come from the vCPU; only those in ``undecided`` (no ioctl reads them) may be
    left undecided, and then the kernel's answer is not compared.
    """
    problems = check(state, Facts.from_vcpu(vcpu))
    answer = _kernel_set(vcpu, state)
    unsure = {p.needs for p in problems if not p.certain}
    assert unsure <= undecided, [str(p) for p in problems]
    if not unsure:
        refused = any(p.certain for p in problems)
        assert (answer != 0) == refused, (answer, [str(p) for p in problems])
    return answer, problems


@pytest.mark.svm_guest
@pytest.mark.parametrize("case", SVM_KERNEL_CASES, ids=[c.id for c in SVM_KERNEL_CASES])
def test_kernel_refuses_what_check_finds(
    case: Case, amd_vcpu: Callable[..., kvmstate.Vcpu]
) -> None:
    setup: dict[str, Any] = {}
    for fact in case.facts.keys() - {"kernel_version"}:  # the running kernel's, below
        setup.update(_VCPU_SETUP[fact])
    version = case.facts.get("kernel_version")
    if version is not None and tuple(version[:2]) != kernels.running():
        release = os.uname().release
        pytest.skip(f"a rule of Linux {version[0]}.{version[1]}; this guest runs {release}")
    vcpu = amd_vcpu(**setup)
    make, _ = BASELINES[case.base]
    state = make()
    case.change(state)
    answer, problems = _agree(vcpu, state)
    assert answer == errno.EINVAL
    assert case.rule_id in {p.rule_id for p in problems if p.certain}
    assert not [p for p in problems if not p.certain]


@pytest.mark.svm_guest
@pytest.mark.parametrize(
    ("name", "base", "change", "setup"), MORE_KERNEL_CASES, ids=[a[0] for a in MORE_KERNEL_CASES]
)
def test_kernel_and_check_agree(
    name: str,
    base: str,
    change: Callable[[NestedState], Any],
    setup: dict[str, Any],
    amd_vcpu: Callable[..., kvmstate.Vcpu],
) -> None:
    vcpu = amd_vcpu(**setup)
    state = BASELINES[base][0]()
    change(state)
    answer, _ = _agree(vcpu, state)
    if name in MORE_KERNEL_ANSWERS:
        assert answer == kernels.by_series(MORE_KERNEL_ANSWERS[name])


@pytest.mark.svm_guest
def test_facts_from_the_amd_vcpu(amd_vcpu: Callable[..., kvmstate.Vcpu]) -> None:
    facts = Facts.from_vcpu(amd_vcpu())
    assert facts.vendor == "svm" and facts.has_svm is True and facts.has_vmx is False
    assert facts.efer is not None and facts.efer & svm.EFER_SVME
    assert facts.in_smm is False and facts.npt_enabled is not None
    # The series the harness booted: a source independent of the uname check() reads.
    assert facts.kernel_version is not None
    assert facts.kernel_version[:2] == kernels.harness_series()


@pytest.mark.svm_guest
def test_guest_mode_set_needs_no_guest_memory(amd_vcpu: Callable[..., kvmstate.Vcpu]) -> None:
    """SET only records vmcb_pa: the vmcb12 page is not read until the vCPU runs."""
    vcpu = amd_vcpu()  # no memory slot is ever added
    assert _kernel_set(vcpu, svm_guest()) == 0


# --- the kernel agrees (inside the emulated Intel guest) -------------------------------------

MSR_IA32_FEATURE_CONTROL = 0x3A
CPUID_VMX = 1 << 5


def _as_vmx_vmm_does(kvm: kvmstate.Kvm, vcpu: kvmstate.Vcpu, *, vmx_cpuid: bool = True) -> None:
    cpuid = kvm.get_supported_cpuid()
    for entry in list(cpuid.items())[: len(cpuid)]:
        if entry.function == 1 and not vmx_cpuid:
            entry.ecx &= ~CPUID_VMX
    vcpu.set_cpuid2(cpuid)
    if vmx_cpuid:
        vcpu.set_msrs({MSR_IA32_FEATURE_CONTROL: 0x5})  # locked, VMX outside SMX
    sregs = vcpu.get_sregs()
    vmx_l1.flat_segments(sregs)  # flat 32-bit ring 0, as the hand-assembled L1s run
    sregs.tr.selector, sregs.tr.type, sregs.tr.present, sregs.tr.limit = vmx_l1.TR_SEL, 11, 1, 0x67
    sregs.cr0, sregs.cr3 = L1_CR0, L1_CR3
    sregs.cr4 = L1_CR4 if vmx_cpuid else L1_CR4 & ~0x2000
    sregs.efer = 0
    vcpu.set_sregs(sregs)


@pytest.fixture
def intel_vcpu() -> Iterator[Callable[..., kvmstate.Vcpu]]:
    """vCPUs as a VMM restoring VMX state makes them: CPUID, IA32_FEATURE_CONTROL (locked,
    VMX on), then sregs of the 32-bit paged L1 the VMX baselines describe."""
    yield from _vcpus(_as_vmx_vmm_does)


_VMX_SETUP: dict[str, dict[str, Any]] = {
    "in_smm": {"smm": True},
    "has_vmx": {"vmx_cpuid": False},
    "vmx_msrs": {},  # read from the vCPU: the bit is refused by the real MSR instead
}
VMX_KERNEL_CASES = [
    c
    for c in CASES
    if c.base.startswith("vmx")
    and set(c.facts) <= _VMX_SETUP.keys()
    and c.rule_id != "vmx_evmcs_enabled"  # undecided here: see the eVMCS test below
]
MORE_VMX_KERNEL_CASES: list[_Extra] = [
    ("vmx-root", "vmx_root", lambda s: None, {}),
    ("vmx-root-with-vmcs", "vmx_vmcs", lambda s: None, {}),
    ("l2-running", "vmx_guest", lambda s: None, {}),
    ("l2-running-run-pending", "vmx_guest", _or("flags", RP), {}),
    ("vmx-off", "vmx_root", _set("vmx.vmxon_pa", INVALID), {}),
    ("vmx-off-without-cpuid-vmx", "vmx_root", _set("vmx.vmxon_pa", INVALID),
     {"vmx_cpuid": False}),
    ("l2-unrestricted-with-ept", "vmx_guest",
     _all(_secondary(vmx.SECONDARY_EXEC_UNRESTRICTED_GUEST | vmx.SECONDARY_EXEC_ENABLE_EPT),
          _set("vmcs12.ept_pointer", 0x5000 | 0x18 | 6), _set("vmcs12.guest_cr0", 0x30)), {}),
    ("l2-pending-gp", "vmx_guest",
     _all(_set("vmcs12.vm_entry_intr_info_field", 1 << 31 | 3 << 8 | 1 << 11 | 13),
          _set("vmcs12.vm_entry_exception_error_code", 0x10)), {}),
    ("l2-io-bitmaps", "vmx_guest",
     _all(_or("vmcs12.cpu_based_vm_exec_control", vmx.CPU_BASED_USE_IO_BITMAPS),
          _set("vmcs12.io_bitmap_a", 0x9000), _set("vmcs12.io_bitmap_b", 0xA000)), {}),
    ("smm-vmxon-in-smm", "vmx_root", _set("vmx.smm.flags", 2), {"smm": True}),
    ("svm-state-on-intel", "svm_gif", lambda s: None, {}),
]  # fmt: skip


def _close(vcpu: kvmstate.Vcpu) -> None:
    vcpu.close()
    vcpu.vm.close()


# Bochs runs Python slowly and each pytest item costs seconds there: the Intel cases run
# as two items that try every case and report every disagreement at once.


@pytest.mark.vmx_guest
def test_intel_kernel_refuses_what_check_finds(intel_vcpu: Callable[..., kvmstate.Vcpu]) -> None:
    failures = []
    for case in VMX_KERNEL_CASES:
        setup: dict[str, Any] = {}
        for fact in case.facts:
            setup.update(_VMX_SETUP[fact])
        state = BASELINES[case.base][0]()
        case.change(state)
        vcpu = intel_vcpu(**setup)
        try:
            answer, problems = _agree(
                vcpu, state, frozenset({"guest memory (check's memory argument)"})
            )
            assert answer != 0
            assert case.rule_id in {p.rule_id for p in problems if p.certain}
        except AssertionError as exc:
            failures.append(f"{case.id}: {exc}")
        _close(vcpu)  # one VM at a time: the Intel guest has little memory
    assert not failures, "\n".join(failures)


@pytest.mark.vmx_guest
def test_intel_kernel_and_check_agree(intel_vcpu: Callable[..., kvmstate.Vcpu]) -> None:
    failures = []
    for name, base, change, setup in MORE_VMX_KERNEL_CASES:
        state = BASELINES[base][0]()
        change(state)
        vcpu = intel_vcpu(**setup)
        try:
            _agree(vcpu, state)
        except AssertionError as exc:
            failures.append(f"{name}: {exc}")
        _close(vcpu)
    assert not failures, "\n".join(failures)


@pytest.mark.vmx_guest
def test_intel_evmcs_is_refused_and_check_names_the_unreadable_fact(
    intel_vcpu: Callable[..., kvmstate.Vcpu],
) -> None:
    state = vmx_root()
    state.vmx.vmxon_pa = INVALID
    state.flags = NestedFlag.EVMCS
    vcpu = intel_vcpu()
    answer, problems = _agree(vcpu, state, frozenset({"evmcs_enabled"}))
    assert answer == errno.EINVAL  # KVM_CAP_HYPERV_ENLIGHTENED_VMCS was not enabled
    assert [p.needs for p in problems] == ["evmcs_enabled"]


@pytest.mark.vmx_guest
def test_intel_l2_entry_failure_is_a_positive_return(
    intel_vcpu: Callable[..., kvmstate.Vcpu],
) -> None:
    """prepare_vmcs02 failing (an illegal guest CR3) is not an errno: vmx_set_nested_state
    returns nested_vmx_enter_non_root_mode's NVMX_VMENTRY_VMEXIT (2) as is."""
    state = vmx_guest()
    assert state.vmcs12 is not None
    state.vmcs12.guest_cr3 = 1 << 50
    answer, problems = _agree(intel_vcpu(), state)
    assert answer == 2
    assert [p.rule_id for p in problems] == ["vmx_guest_cr3"]


@pytest.mark.vmx_guest
def test_facts_from_the_intel_vcpu(intel_vcpu: Callable[..., kvmstate.Vcpu]) -> None:
    facts = Facts.from_vcpu(intel_vcpu())
    assert facts.vendor == "vmx" and facts.has_vmx is True and facts.has_svm is False
    assert facts.vmx_msrs is not None and set(facts.vmx_msrs) == set(checks.VMX_MSRS)
    assert facts.feature_control == 0x5 and facts.in_smm is False
    assert facts.kernel_version is not None
    assert facts.kernel_version[:2] == kernels.harness_series()


def test_l1_lma_without_lme_is_refused_from_6_12_118() -> None:
    # Debian's 6.12.118 svm_set_nested_state refuses L1's EFER.LMA=1 with LME=0
    # (CVE-2026-99345); 6.12.117's and 6.1.192's sources have no such test.
    state = svm_guest()
    assert state.vmcb12 is not None
    state.vmcb12.save.efer = (state.vmcb12.save.efer | svm.EFER_LMA) & ~svm.EFER_LME
    for refusing in ((6, 12, 118), (6, 12, 200)):
        (p,) = check(state, dataclasses.replace(SVM_FACTS, kernel_version=refusing))
        assert p.certain and (p.rule_id, p.field) == ("svm_save_area", "vmcb12.save.efer")
    for taking in ((6, 1, 0), (6, 12, 117)):
        assert check(state, dataclasses.replace(SVM_FACTS, kernel_version=taking)) == []
    for unknown in (None, (6, 12), (6, 18, 44)):
        (p,) = check(state, dataclasses.replace(SVM_FACTS, kernel_version=unknown))
        assert not p.certain and p.needs == "kernel_version"
    state.vmcb12.save.efer &= ~svm.EFER_LMA  # neither: the rule has nothing to say
    assert check(state, dataclasses.replace(SVM_FACTS, kernel_version=None)) == []
