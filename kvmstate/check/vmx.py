"""VMX rules: vmx_set_nested_state, the VMX controls and the entry event."""

from __future__ import annotations

import dataclasses
from typing import Any

from kvmstate import uapi, x86
from kvmstate import vmcs12 as vmx
from kvmstate.check.engine import (
    EVMCS,
    GM,
    INVALID_GPA,
    RP,
    SHADOW_MIN,
    U64,
    VENTRY,
    VEXEC,
    VEXIT,
    VMCS12_MIN,
    VSET,
    Ctx,
    ScopedRule,
    any_of,
    flag_names,
    in_vmx,
    in_vmx_guest,
    in_vmx_page,
    in_vmx_vmxon,
)
from kvmstate.check.facts import VMX_MSRS
from kvmstate.nested import KNOWN_FLAGS
from kvmstate.uapi import NestedFlag

_SMM_GM = uapi.KVM_STATE_NESTED_SMM_GUEST_MODE
_SMM_VMXON = uapi.KVM_STATE_NESTED_SMM_VMXON

# --- VMX: vmx_set_nested_state ----------------------------------------------------------


def vmx_no_vmxon_means_empty(c: Ctx) -> None:
    """vmx_set_nested_state: with vmxon_pa -1 (VMX off) there is no SMM state, no
    vmcs12_pa, and no flag but EVMCS (kept for old userspace)."""
    if c.vmx.vmxon_pa != INVALID_GPA:
        return
    why = "vmxon_pa is -1 (L1 is not in VMX operation), so "
    c.report(
        bool(c.vmx.smm.flags),
        "hdr.vmx.smm.flags",
        c.vmx.smm.flags,
        why + "smm.flags must be 0",
        VSET,
    )
    c.report(
        c.vmx.vmcs12_pa != INVALID_GPA,
        "hdr.vmx.vmcs12_pa",
        c.vmx.vmcs12_pa,
        why + "vmcs12_pa must be -1 too",
        VSET,
    )
    extra = c.flags & ~EVMCS & KNOWN_FLAGS
    c.report(
        bool(extra),
        "flags",
        c.flags,
        why + f"no flag but EVMCS may be set (found {flag_names(NestedFlag, extra)})",
        VSET,
    )


def vmx_needs_cpuid_vmx(c: Ctx) -> None:
    """vmx_set_nested_state: VMXON state needs VMX in the vCPU's CPUID (nested_vmx_allowed
    in 6.1, guest_cpu_cap_has(X86_FEATURE_VMX) in 6.12): set CPUID first."""
    has = c.feature("vmx")
    c.report(
        None if has is None else not has,
        "hdr.vmx.vmxon_pa",
        c.vmx.vmxon_pa,
        "a VMXON region needs VMX in the vCPU's CPUID (KVM_SET_CPUID2 before the nested state)",
        VSET,
        "has_vmx",
    )


def vmx_vmxon_pa_valid(c: Ctx) -> None:
    """vmx_set_nested_state: ``page_address_valid(vmxon_pa)``."""
    c.page_rule("hdr.vmx.vmxon_pa", c.vmx.vmxon_pa, VSET, "the VMXON region (vmxon_pa)")


def vmx_smm_flags(c: Ctx) -> None:
    """vmx_set_nested_state: smm.flags has only SMM_GUEST_MODE and SMM_VMXON, SMM_GUEST_MODE
    needs SMM_VMXON, and excludes GUEST_MODE (L2 cannot run while SMM saved it)."""
    smm = int(c.vmx.smm.flags)
    field = "hdr.vmx.smm.flags"
    c.report(
        bool(smm & _SMM_GM and c.flags & GM),
        field,
        smm,
        "SMM_GUEST_MODE (L2 interrupted by an SMI) excludes GUEST_MODE in flags",
        VSET,
    )
    unknown = smm & ~(_SMM_GM | _SMM_VMXON)
    c.report(bool(unknown), field, smm, f"unknown smm.flags bits {unknown:#x}", VSET)
    c.report(
        bool(smm & _SMM_GM and not smm & _SMM_VMXON),
        field,
        smm,
        "SMM_GUEST_MODE needs SMM_VMXON (L2 implies VMX operation)",
        VSET,
    )


def vmx_header_flags(c: Ctx) -> None:
    """vmx_set_nested_state: hdr.vmx.flags has only PREEMPTION_TIMER_DEADLINE."""
    extra = c.vmx.flags & ~uapi.KVM_STATE_VMX_PREEMPTION_TIMER_DEADLINE
    c.report(
        bool(extra),
        "hdr.vmx.flags",
        c.vmx.flags,
        f"unknown hdr.vmx.flags bits {extra:#x} (known: PREEMPTION_TIMER_DEADLINE)",
        VSET,
    )


def vmx_smm_matches_vcpu(c: Ctx) -> None:
    """vmx_set_nested_state: in SMM no GUEST_MODE/RUN_PENDING (SMM leaves VMX); outside
    SMM, smm.flags must be 0."""
    smm = int(c.vmx.smm.flags)
    in_smm = c.facts.in_smm
    if smm:
        c.report(
            None if in_smm is None else not in_smm,
            "hdr.vmx.smm.flags",
            smm,
            "smm.flags describe VMX state saved on SMM entry: the vCPU must be in SMM",
            VSET,
            "in_smm",
        )
    if c.flags & (GM | RP):
        c.report(
            in_smm,
            "flags",
            c.flags,
            "GUEST_MODE and RUN_PENDING are refused while the vCPU is in SMM (SMM leaves VMX)",
            VSET,
            "in_smm",
        )


def vmx_evmcs_enabled(c: Ctx) -> None:
    """vmx_set_nested_state: EVMCS needs VMX in CPUID and KVM_CAP_HYPERV_ENLIGHTENED_VMCS
    enabled on the vCPU."""
    if not c.flags & EVMCS:
        return
    has = c.feature("vmx")
    c.report(
        None if has is None else not has,
        "flags",
        c.flags,
        "EVMCS needs VMX in the vCPU's CPUID",
        VSET,
        "has_vmx",
    )
    enabled = c.facts.evmcs_enabled
    c.report(
        None if enabled is None else not enabled,
        "flags",
        c.flags,
        "EVMCS needs KVM_CAP_HYPERV_ENLIGHTENED_VMCS enabled on the vCPU first",
        VSET,
        "evmcs_enabled",
    )


def vmx_without_vmcs12(c: Ctx) -> None:
    """vmx_set_nested_state: a state too short for struct vmcs12 (VMXON only) can have no
    GUEST_MODE, no EVMCS and no vmcs12_pa (see vmx_has_valid_vmcs12)."""
    if c.size >= VMCS12_MIN:
        return
    why = f"size {c.size} holds no vmcs12 (it needs {VMCS12_MIN}: header + struct vmcs12), so "
    c.report(bool(c.flags & GM), "flags", c.flags, why + "no GUEST_MODE", VSET)
    c.report(bool(c.flags & EVMCS), "flags", c.flags, why + "no EVMCS", VSET)
    c.report(
        c.vmx.vmcs12_pa != INVALID_GPA,
        "hdr.vmx.vmcs12_pa",
        c.vmx.vmcs12_pa,
        why + "vmcs12_pa must be -1",
        VSET,
    )


def vmx_vmcs12_pa(c: Ctx) -> None:
    """vmx_set_nested_state: with a vmcs12, vmcs12_pa is a valid page other than the
    VMXON region, or -1 with EVMCS (the vmcs12 then lives in an enlightened VMCS)."""
    pa = int(c.vmx.vmcs12_pa)
    field = "hdr.vmx.vmcs12_pa"
    if pa == INVALID_GPA:
        c.report(
            not c.flags & EVMCS,
            field,
            pa,
            "a state with a vmcs12 must give its address (vmcs12_pa), unless EVMCS is set",
            VSET,
        )
        return
    c.report(
        pa == c.vmx.vmxon_pa,
        field,
        pa,
        "vmcs12_pa must differ from vmxon_pa (the VMXON region is not a VMCS)",
        VSET,
    )
    c.page_rule(field, pa, VSET, "the current VMCS (vmcs12_pa)")


def vmx_vmcs12_revision(c: Ctx) -> None:
    """vmx_set_nested_state: the vmcs12 carries KVM's revision id, VMCS12_REVISION."""
    assert c.v12 is not None
    rev = int(c.v12.hdr.revision_id)
    c.report(
        rev != vmx.VMCS12_REVISION,
        "vmcs12.hdr.revision_id",
        rev,
        f"the vmcs12 revision id must be {vmx.VMCS12_REVISION:#x} (KVM's VMCS12_REVISION)",
        VSET,
    )


def vmx_shadow_vmcs12(c: Ctx) -> None:
    """vmx_set_nested_state: with VMCS shadowing and a link pointer, the state holds a
    shadow vmcs12 (size >= 128 + 4096 + sizeof(struct vmcs12)) with KVM's revision id
    and the shadow-VMCS bit."""
    v = c.v12
    assert v is not None
    if not (c.has2(vmx.SECONDARY_EXEC_SHADOW_VMCS) and v.vmcs_link_pointer != INVALID_GPA):
        return
    if c.size < SHADOW_MIN:
        c.report(
            True,
            "size",
            c.size,
            f"the vmcs12 enables VMCS shadowing with a link pointer, so the state needs the "
            f"shadow vmcs12: size at least {SHADOW_MIN}",
            VSET,
        )
        return
    if c.shadow is None:
        return  # size is beyond the buffer: size_within_data said so
    rev = int(c.shadow.hdr.revision_id)
    c.report(
        rev != vmx.VMCS12_REVISION,
        "shadow_vmcs12.hdr.revision_id",
        rev,
        f"the shadow vmcs12 revision id must be {vmx.VMCS12_REVISION:#x}",
        VSET,
    )
    c.report(
        not c.shadow.hdr.shadow_vmcs,
        "shadow_vmcs12.hdr.shadow_vmcs",
        int(c.shadow.hdr.shadow_vmcs),
        "the shadow vmcs12 must have its shadow-VMCS bit set",
        VSET,
    )


# --- VMX: nested_vmx_check_controls -----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Controls:
    """One VMX control field as vmx_control_verify checks it against nested.msrs."""

    field: str
    msr: int  # the capability MSR (low half: must be 1, high half: may be 1)
    must: int  # KVM's must-be-1 bits (a userspace MSR restore can only add to them)
    offered: int  # every bit a 6.1 or 6.12 KVM may let L1 set
    always: int  # the bits KVM offers whatever the hardware
    kind: Any  # the IntFlag that names the bits


_PIN_ALWAYS = vmx.PIN_BASED_ALWAYSON_WITHOUT_TRUE_MSR | vmx.PIN_BASED_VMX_PREEMPTION_TIMER
_PROC_REQUIRED = (  # KVM_REQUIRED_VMX_CPU_BASED_VM_EXEC_CONTROL (vmx.h): every VMX host has them
    vmx.CPU_BASED_HLT_EXITING | vmx.CPU_BASED_CR3_LOAD_EXITING | vmx.CPU_BASED_CR3_STORE_EXITING
    | vmx.CPU_BASED_UNCOND_IO_EXITING | vmx.CPU_BASED_MOV_DR_EXITING
    | vmx.CPU_BASED_USE_TSC_OFFSETTING | vmx.CPU_BASED_MWAIT_EXITING
    | vmx.CPU_BASED_MONITOR_EXITING | vmx.CPU_BASED_INVLPG_EXITING | vmx.CPU_BASED_RDPMC_EXITING
    | vmx.CPU_BASED_INTR_WINDOW_EXITING | vmx.CPU_BASED_CR8_LOAD_EXITING
    | vmx.CPU_BASED_CR8_STORE_EXITING
)  # fmt: skip
_PROC_OPTIONAL = (  # in nested_vmx_setup_cpubased_ctls' list, if the hardware has them
    vmx.CPU_BASED_NMI_WINDOW_EXITING | vmx.CPU_BASED_RDTSC_EXITING
    | vmx.CPU_BASED_USE_IO_BITMAPS | vmx.CPU_BASED_MONITOR_TRAP_FLAG
    | vmx.CPU_BASED_PAUSE_EXITING | vmx.CPU_BASED_TPR_SHADOW
    | vmx.CPU_BASED_ACTIVATE_SECONDARY_CONTROLS
)  # fmt: skip
_PROC_ALWAYS = (
    _PROC_REQUIRED | vmx.CPU_BASED_ALWAYSON_WITHOUT_TRUE_MSR | vmx.CPU_BASED_USE_MSR_BITMAPS
)
_SEC_OFFERED = (
    vmx.SECONDARY_EXEC_DESC | vmx.SECONDARY_EXEC_ENABLE_RDTSCP
    | vmx.SECONDARY_EXEC_VIRTUALIZE_X2APIC_MODE | vmx.SECONDARY_EXEC_WBINVD_EXITING
    | vmx.SECONDARY_EXEC_APIC_REGISTER_VIRT | vmx.SECONDARY_EXEC_VIRTUAL_INTR_DELIVERY
    | vmx.SECONDARY_EXEC_RDRAND_EXITING | vmx.SECONDARY_EXEC_ENABLE_INVPCID
    | vmx.SECONDARY_EXEC_ENABLE_VMFUNC | vmx.SECONDARY_EXEC_RDSEED_EXITING
    | vmx.SECONDARY_EXEC_ENABLE_XSAVES | vmx.SECONDARY_EXEC_TSC_SCALING
    | vmx.SECONDARY_EXEC_ENABLE_USR_WAIT_PAUSE | vmx.SECONDARY_EXEC_SHADOW_VMCS
    | vmx.SECONDARY_EXEC_ENABLE_EPT | vmx.SECONDARY_EXEC_ENABLE_PML
    | vmx.SECONDARY_EXEC_ENABLE_VPID | vmx.SECONDARY_EXEC_UNRESTRICTED_GUEST
    | vmx.SECONDARY_EXEC_VIRTUALIZE_APIC_ACCESSES | vmx.SECONDARY_EXEC_ENCLS_EXITING
)  # fmt: skip
_EXIT_ALWAYS = (
    vmx.VM_EXIT_ALWAYSON_WITHOUT_TRUE_MSR | vmx.VM_EXIT_HOST_ADDR_SPACE_SIZE
    | vmx.VM_EXIT_LOAD_IA32_EFER | vmx.VM_EXIT_SAVE_IA32_EFER
    | vmx.VM_EXIT_SAVE_VMX_PREEMPTION_TIMER | vmx.VM_EXIT_ACK_INTR_ON_EXIT
    | vmx.VM_EXIT_LOAD_IA32_PERF_GLOBAL_CTRL
)  # fmt: skip
_ENTRY_ALWAYS = (
    vmx.VM_ENTRY_ALWAYSON_WITHOUT_TRUE_MSR | vmx.VM_ENTRY_IA32E_MODE
    | vmx.VM_ENTRY_LOAD_IA32_EFER | vmx.VM_ENTRY_LOAD_IA32_PERF_GLOBAL_CTRL
)  # fmt: skip

# nested_vmx_setup_*_ctls in arch/x86/kvm/vmx/nested.c (6.1 and 6.12 agree).
_CONTROLS = (
    _Controls(
        "pin_based_vm_exec_control",
        x86.MSR_IA32_VMX_TRUE_PINBASED_CTLS,
        vmx.PIN_BASED_ALWAYSON_WITHOUT_TRUE_MSR,
        _PIN_ALWAYS | vmx.PIN_BASED_EXT_INTR_MASK | vmx.PIN_BASED_NMI_EXITING
        | vmx.PIN_BASED_VIRTUAL_NMIS | vmx.PIN_BASED_POSTED_INTR,
        _PIN_ALWAYS | vmx.PIN_BASED_EXT_INTR_MASK | vmx.PIN_BASED_NMI_EXITING,
        vmx.PinBasedControls,
    ),
    _Controls(
        "cpu_based_vm_exec_control",
        x86.MSR_IA32_VMX_TRUE_PROCBASED_CTLS,
        vmx.CPU_BASED_ALWAYSON_WITHOUT_TRUE_MSR
        & ~(vmx.CPU_BASED_CR3_LOAD_EXITING | vmx.CPU_BASED_CR3_STORE_EXITING),
        _PROC_ALWAYS | _PROC_OPTIONAL,
        _PROC_ALWAYS,
        vmx.CpuBasedControls,
    ),
    _Controls(
        "secondary_vm_exec_control",
        x86.MSR_IA32_VMX_PROCBASED_CTLS2,
        0,
        _SEC_OFFERED,
        vmx.SECONDARY_EXEC_SHADOW_VMCS,
        vmx.SecondaryExecControls,
    ),
    _Controls(
        "vm_exit_controls",
        x86.MSR_IA32_VMX_TRUE_EXIT_CTLS,
        vmx.VM_EXIT_ALWAYSON_WITHOUT_TRUE_MSR & ~vmx.VM_EXIT_SAVE_DEBUG_CONTROLS,
        _EXIT_ALWAYS | vmx.VM_EXIT_LOAD_IA32_PAT | vmx.VM_EXIT_SAVE_IA32_PAT
        | vmx.VM_EXIT_CLEAR_BNDCFGS,
        _EXIT_ALWAYS,
        vmx.VmExitControls,
    ),
    _Controls(
        "vm_entry_controls",
        x86.MSR_IA32_VMX_TRUE_ENTRY_CTLS,
        vmx.VM_ENTRY_ALWAYSON_WITHOUT_TRUE_MSR & ~vmx.VM_ENTRY_LOAD_DEBUG_CONTROLS,
        _ENTRY_ALWAYS | vmx.VM_ENTRY_LOAD_IA32_PAT | vmx.VM_ENTRY_LOAD_BNDCFGS,
        _ENTRY_ALWAYS,
        vmx.VmEntryControls,
    ),
)  # fmt: skip


def vmx_control_fields(c: Ctx) -> None:
    """nested_check_vm_{execution,exit,entry}_controls: each control field passes
    vmx_control_verify against KVM's nested VMX capability MSRs (the TRUE ones)."""
    v = c.v12
    assert v is not None
    for spec in _CONTROLS:
        if spec.field == "secondary_vm_exec_control" and not (
            v.cpu_based_vm_exec_control & vmx.CPU_BASED_ACTIVATE_SECONDARY_CONTROLS
        ):
            continue  # not verified unless the primary controls activate them
        value = int(getattr(v, spec.field))
        field = f"vmcs12.{spec.field}"
        source = VEXEC if "exec" in spec.field else VEXIT if "exit" in spec.field else VENTRY
        msr = c.facts.msr(spec.msr)
        must, may = (msr & 0xFFFFFFFF, msr >> 32) if msr is not None else (spec.must, None)
        missing = must & ~value
        c.report(
            bool(missing),
            field,
            value,
            f"bits {flag_names(spec.kind, missing)} must be 1 ({VMX_MSRS[spec.msr]} allowed-0)",
            source,
        )
        if may is not None:
            extra = value & ~may
            c.report(
                bool(extra),
                field,
                value,
                f"bits {flag_names(spec.kind, extra)} are not allowed by {VMX_MSRS[spec.msr]}",
                source,
            )
            continue
        never = value & ~spec.offered
        c.report(
            bool(never),
            field,
            value,
            f"bits {flag_names(spec.kind, never)} are never offered to L1 by KVM",
            source,
        )
        host = value & spec.offered & ~spec.always
        c.report(
            None if host else False,
            field,
            value,
            f"bits {flag_names(spec.kind, host)} are offered only when the host supports them",
            source,
            f"vmx_msrs ({VMX_MSRS[spec.msr]})",
        )


def vmx_cr3_targets(c: Ctx) -> None:
    """nested_check_vm_execution_controls: cr3_target_count <= the CR3-target count of
    IA32_VMX_MISC, which KVM reports as 0."""
    assert c.v12 is not None
    count = int(c.v12.cr3_target_count)
    misc = c.facts.msr(x86.MSR_IA32_VMX_MISC)
    limit = (misc >> 16) & 0x1FF if misc is not None else 0
    c.report(
        count > limit,
        "vmcs12.cr3_target_count",
        count,
        f"cr3_target_count must be at most {limit} (IA32_VMX_MISC)",
        VEXEC,
    )


def vmx_bitmap_pages(c: Ctx) -> None:
    """nested_vmx_check_{io_bitmap,msr_bitmap,tpr_shadow,apic_access,shadow_vmcs}_controls
    and the PML/EPTP-list checks: each page an enabled control uses is page_address_valid."""
    v = c.v12
    assert v is not None
    proc = v.cpu_based_vm_exec_control
    pages: list[tuple[bool, str]] = [
        (bool(proc & vmx.CPU_BASED_USE_IO_BITMAPS), "io_bitmap_a"),
        (bool(proc & vmx.CPU_BASED_USE_IO_BITMAPS), "io_bitmap_b"),
        (bool(proc & vmx.CPU_BASED_USE_MSR_BITMAPS), "msr_bitmap"),
        (bool(proc & vmx.CPU_BASED_TPR_SHADOW), "virtual_apic_page_addr"),
        (c.has2(vmx.SECONDARY_EXEC_VIRTUALIZE_APIC_ACCESSES), "apic_access_addr"),
        (c.has2(vmx.SECONDARY_EXEC_ENABLE_PML), "pml_address"),
        (c.has2(vmx.SECONDARY_EXEC_SHADOW_VMCS), "vmread_bitmap"),
        (c.has2(vmx.SECONDARY_EXEC_SHADOW_VMCS), "vmwrite_bitmap"),
        (_eptp_switching(c), "eptp_list_address"),
    ]
    for enabled, name in pages:
        if enabled:
            c.page_rule(f"vmcs12.{name}", int(getattr(v, name)), VEXEC)


def _eptp_switching(c: Ctx) -> bool:
    assert c.v12 is not None
    return c.has2(vmx.SECONDARY_EXEC_ENABLE_VMFUNC) and bool(c.v12.vm_function_control & 1)


def vmx_apicv(c: Ctx) -> None:
    """nested_vmx_check_apicv_controls: virtual x2APIC excludes APIC-access virtualization,
    virtual interrupt delivery needs external-interrupt exiting, posted interrupts need
    delivery, ack-on-exit, a notification vector < 256 and a 64-byte aligned descriptor,
    and all of them need the TPR shadow."""
    v = c.v12
    assert v is not None
    x2apic = c.has2(vmx.SECONDARY_EXEC_VIRTUALIZE_X2APIC_MODE)
    vid = c.has2(vmx.SECONDARY_EXEC_VIRTUAL_INTR_DELIVERY)
    posted = bool(v.pin_based_vm_exec_control & vmx.PIN_BASED_POSTED_INTR)
    if not (x2apic or vid or posted or c.has2(vmx.SECONDARY_EXEC_APIC_REGISTER_VIRT)):
        return
    sec = "vmcs12.secondary_vm_exec_control"
    c.report(
        x2apic and c.has2(vmx.SECONDARY_EXEC_VIRTUALIZE_APIC_ACCESSES),
        sec,
        int(v.secondary_vm_exec_control),
        "VIRTUALIZE_X2APIC_MODE and VIRTUALIZE_APIC_ACCESSES exclude each other",
        VEXEC,
    )
    c.report(
        vid and not v.pin_based_vm_exec_control & vmx.PIN_BASED_EXT_INTR_MASK,
        "vmcs12.pin_based_vm_exec_control",
        int(v.pin_based_vm_exec_control),
        "VIRTUAL_INTR_DELIVERY needs EXT_INTR_MASK (exit on external interrupts)",
        VEXEC,
    )
    if posted:
        pin = ("vmcs12.pin_based_vm_exec_control", int(v.pin_based_vm_exec_control))
        c.report(not vid, *pin, "POSTED_INTR needs VIRTUAL_INTR_DELIVERY", VEXEC)
        c.report(
            not v.vm_exit_controls & vmx.VM_EXIT_ACK_INTR_ON_EXIT,
            *pin,
            "POSTED_INTR needs the ACK_INTR_ON_EXIT exit control",
            VEXEC,
        )
        c.report(
            bool(v.posted_intr_nv & 0xFF00),
            "vmcs12.posted_intr_nv",
            int(v.posted_intr_nv),
            "the posted-interrupt notification vector must be below 256",
            VEXEC,
        )
        c.report(
            c.bad_aligned(int(v.posted_intr_desc_addr), 64),
            "vmcs12.posted_intr_desc_addr",
            int(v.posted_intr_desc_addr),
            "the posted-interrupt descriptor must be 64-byte aligned, below 2^MAXPHYADDR",
            VEXEC,
            "maxphyaddr",
        )
    c.report(
        not v.cpu_based_vm_exec_control & vmx.CPU_BASED_TPR_SHADOW,
        "vmcs12.cpu_based_vm_exec_control",
        int(v.cpu_based_vm_exec_control),
        "APIC virtualization (x2APIC mode, register virtualization, interrupt delivery, "
        "posted interrupts) needs TPR_SHADOW",
        VEXEC,
    )


def vmx_nmi_controls(c: Ctx) -> None:
    """nested_vmx_check_nmi_controls: virtual NMIs need NMI exiting; NMI-window exiting
    needs virtual NMIs."""
    v = c.v12
    assert v is not None
    pin = int(v.pin_based_vm_exec_control)
    vnmi = bool(pin & vmx.PIN_BASED_VIRTUAL_NMIS)
    c.report(
        vnmi and not pin & vmx.PIN_BASED_NMI_EXITING,
        "vmcs12.pin_based_vm_exec_control",
        pin,
        "VIRTUAL_NMIS needs NMI_EXITING",
        VEXEC,
    )
    c.report(
        not vnmi and bool(v.cpu_based_vm_exec_control & vmx.CPU_BASED_NMI_WINDOW_EXITING),
        "vmcs12.cpu_based_vm_exec_control",
        int(v.cpu_based_vm_exec_control),
        "NMI_WINDOW_EXITING needs the VIRTUAL_NMIS pin control",
        VEXEC,
    )


def vmx_ept_dependents(c: Ctx) -> None:
    """nested_vmx_check_{pml,unrestricted_guest,mode_based_ept_exec}_controls and the EPTP
    switching check: PML, unrestricted guest, mode-based execute control and EPTP switching
    need EPT."""
    v = c.v12
    assert v is not None
    if c.has2(vmx.SECONDARY_EXEC_ENABLE_EPT):
        return
    needs_ept = [
        (vmx.SECONDARY_EXEC_ENABLE_PML, "ENABLE_PML"),
        (vmx.SECONDARY_EXEC_UNRESTRICTED_GUEST, "UNRESTRICTED_GUEST"),
        (vmx.SECONDARY_EXEC_MODE_BASED_EPT_EXEC, "MODE_BASED_EPT_EXEC"),
    ]
    for bit, name in needs_ept:
        if c.has2(bit):
            c.report(
                True,
                "vmcs12.secondary_vm_exec_control",
                int(v.secondary_vm_exec_control),
                f"{name} needs ENABLE_EPT",
                VEXEC,
            )
    if _eptp_switching(c):
        c.report(
            True,
            "vmcs12.vm_function_control",
            int(v.vm_function_control),
            "EPTP switching (VM function 0) needs ENABLE_EPT",
            VEXEC,
        )


def vmx_vpid_and_timer(c: Ctx) -> None:
    """nested_check_vm_execution_controls: VPID enabled needs a non-zero VPID; saving the
    preemption timer on exit needs the preemption timer."""
    v = c.v12
    assert v is not None
    c.report(
        c.has2(vmx.SECONDARY_EXEC_ENABLE_VPID) and v.virtual_processor_id == 0,
        "vmcs12.virtual_processor_id",
        int(v.virtual_processor_id),
        "ENABLE_VPID needs a non-zero virtual_processor_id",
        VEXEC,
    )
    c.report(
        bool(
            v.vm_exit_controls & vmx.VM_EXIT_SAVE_VMX_PREEMPTION_TIMER
            and not v.pin_based_vm_exec_control & vmx.PIN_BASED_VMX_PREEMPTION_TIMER
        ),
        "vmcs12.vm_exit_controls",
        int(v.vm_exit_controls),
        "SAVE_VMX_PREEMPTION_TIMER needs the VMX_PREEMPTION_TIMER pin control",
        VEXEC,
    )


# EPTP bits (asm/vmx.h) and the EPT capabilities nested_vmx_check_eptp tests.
_EPTP_MT_UC, _EPTP_MT_WB = 0, 6
_EPTP_PWL_MASK, _EPTP_PWL_4, _EPTP_PWL_5 = 0x38, 0x18, 0x20
_EPTP_AD = 1 << 6
_EPT_CAP_PWL5, _EPT_CAP_UC, _EPT_CAP_AD = 1 << 7, 1 << 8, 1 << 21


def vmx_eptp(c: Ctx) -> None:
    """nested_vmx_check_eptp: memory type WB (KVM never offers UC to L1; WB and 4-level
    walks come with EPT itself), 4- or 5-level walk, no reserved bits 11:7, legal address,
    and A/D bits only if offered."""
    v = c.v12
    assert v is not None
    if not c.has2(vmx.SECONDARY_EXEC_ENABLE_EPT):
        return
    eptp = int(v.ept_pointer)
    field = "vmcs12.ept_pointer"
    caps = c.facts.msr(x86.MSR_IA32_VMX_EPT_VPID_CAP)
    msr = "vmx_msrs (IA32_VMX_EPT_VPID_CAP)"

    def cap(bit: int) -> bool | None:
        return None if caps is None else not caps & bit

    mt = eptp & 7
    # KVM never offers UC to L1 (nested ept_caps lack VMX_EPTP_UC_BIT); WB comes with EPT.
    uc_offered = caps is not None and bool(caps & _EPT_CAP_UC)
    c.report(
        mt not in (_EPTP_MT_UC, _EPTP_MT_WB) or (mt == _EPTP_MT_UC and not uc_offered),
        field,
        eptp,
        f"the EPT memory type (bits 2:0 = {mt}) must be WB (6)",
        VEXEC + " -> nested_vmx_check_eptp",
    )
    pwl = eptp & _EPTP_PWL_MASK
    c.report(
        pwl not in (_EPTP_PWL_4, _EPTP_PWL_5)
        or (cap(_EPT_CAP_PWL5) if pwl == _EPTP_PWL_5 else False),
        field,
        eptp,
        "the EPT walk length (bits 5:3) must be 4 levels, or 5 where the host has 5-level EPT",
        VEXEC + " -> nested_vmx_check_eptp",
        msr,
    )
    c.report(
        any_of(bool((eptp >> 7) & 0x1F), c.illegal_gpa(eptp)),
        field,
        eptp,
        "EPTP bits 11:7 are reserved and its address must be below 2^MAXPHYADDR",
        VEXEC + " -> nested_vmx_check_eptp",
        "maxphyaddr",
    )
    if eptp & _EPTP_AD:
        c.report(
            cap(_EPT_CAP_AD),
            field,
            eptp,
            "EPT accessed/dirty bits (EPTP bit 6) need KVM's eptad support",
            VEXEC + " -> nested_vmx_check_eptp",
            msr,
        )


def vmx_vmfunc(c: Ctx) -> None:
    """nested_check_vm_execution_controls: vm_function_control within IA32_VMX_VMFUNC, which
    KVM limits to EPTP switching (bit 0)."""
    v = c.v12
    assert v is not None
    if not c.has2(vmx.SECONDARY_EXEC_ENABLE_VMFUNC):
        return
    value = int(v.vm_function_control)
    allowed = c.facts.msr(x86.MSR_IA32_VMX_VMFUNC)
    extra = value & ~(allowed if allowed is not None else 1)
    c.report(
        bool(extra),
        "vmcs12.vm_function_control",
        value,
        f"VM functions {extra:#x} are not offered (KVM offers only EPTP switching, bit 0)",
        VEXEC,
    )
    if allowed is None and value & 1:
        c.report(
            None,
            "vmcs12.vm_function_control",
            value,
            "EPTP switching is offered only with EPT and hardware VMFUNC",
            VEXEC,
            "vmx_msrs (IA32_VMX_VMFUNC)",
        )


def vmx_msr_switch_areas(c: Ctx) -> None:
    """nested_vmx_check_{exit,entry}_msr_switch_controls: each MSR load/store area with a
    non-zero count is 16-byte aligned and lies below 2^MAXPHYADDR."""
    v = c.v12
    assert v is not None
    areas = (
        ("vm_exit_msr_load_addr", "vm_exit_msr_load_count", VEXIT),
        ("vm_exit_msr_store_addr", "vm_exit_msr_store_count", VEXIT),
        ("vm_entry_msr_load_addr", "vm_entry_msr_load_count", VENTRY),
    )
    for addr_name, count_name, source in areas:
        count = int(getattr(v, count_name))
        if not count:
            continue
        addr = int(getattr(v, addr_name))
        last = (addr + count * 16 - 1) & U64
        c.report(
            any_of(bool(addr % 16), c.illegal_gpa(addr), c.illegal_gpa(last)),
            f"vmcs12.{addr_name}",
            addr,
            f"the MSR area of {count} entries must be 16-byte aligned and end below 2^MAXPHYADDR",
            source,
            "maxphyaddr",
        )


# VM-entry interruption information (asm/vmx.h).
_INTR_VALID = 1 << 31
_INTR_DELIVER_CODE = 1 << 11
_INTR_RESVD = 0x7FFFF000
_INTR_TYPE_RESERVED, _INTR_TYPE_NMI, _INTR_TYPE_HARD_EXC = 1, 2, 3
_INTR_TYPE_SOFT = (4, 5, 6)  # software interrupt, privileged and software exceptions
_INTR_TYPE_OTHER = 7
_EXC_WITH_ERROR_CODE = frozenset({8, 10, 11, 12, 13, 14, 17})  # x86_exception_has_error_code
_VMX_MISC_ZERO_LEN_INS = 1 << 30


def vmx_entry_event(c: Ctx) -> None:
    """nested_check_vm_entry_controls: a valid VM-entry event has a defined type, a vector
    that fits it, an error code exactly when a protected-mode hardware exception has one
    (bits 31:16 clear), no reserved bits, and an instruction length of 1-15 for software
    events (KVM does not offer zero-length injection)."""
    v = c.v12
    assert v is not None
    info = int(v.vm_entry_intr_info_field)
    if not info & _INTR_VALID:
        return
    field = "vmcs12.vm_entry_intr_info_field"
    vector, kind = info & 0xFF, (info >> 8) & 7
    c.report(kind == _INTR_TYPE_RESERVED, field, info, "event type 1 is reserved", VENTRY)
    if kind == _INTR_TYPE_OTHER:
        proc = c.facts.msr(x86.MSR_IA32_VMX_TRUE_PROCBASED_CTLS)
        c.report(
            None if proc is None else not (proc >> 32) & vmx.CPU_BASED_MONITOR_TRAP_FLAG,
            field,
            info,
            "event type 7 (MTF) needs the monitor trap flag to be offered",
            VENTRY,
            "vmx_msrs (IA32_VMX_TRUE_PROCBASED_CTLS)",
        )
    wrong_vector = (
        (kind == _INTR_TYPE_NMI and vector != 2)
        or (kind == _INTR_TYPE_HARD_EXC and vector > 31)
        or (kind == _INTR_TYPE_OTHER and vector != 0)
    )
    c.report(
        wrong_vector,
        field,
        info,
        f"vector {vector} does not fit event type {kind} (NMI is 2, exceptions 0-31, MTF 0)",
        VENTRY,
    )
    unrestricted = c.has2(vmx.SECONDARY_EXEC_UNRESTRICTED_GUEST)
    prot_mode = not unrestricted or bool(v.guest_cr0 & x86.X86_CR0_PE)
    should = kind == _INTR_TYPE_HARD_EXC and prot_mode and vector in _EXC_WITH_ERROR_CODE
    has = bool(info & _INTR_DELIVER_CODE)
    c.report(
        has != should,
        field,
        info,
        f"deliver-error-code (bit 11) must be {int(should)} for this event: only "
        "protected-mode hardware exceptions 8, 10-14 and 17 push an error code",
        VENTRY,
    )
    c.report(
        has and bool(v.vm_entry_exception_error_code & 0xFFFF0000),
        "vmcs12.vm_entry_exception_error_code",
        int(v.vm_entry_exception_error_code),
        "the injected error code must fit in 16 bits",
        VENTRY,
    )
    c.report(bool(info & _INTR_RESVD), field, info, "bits 30:12 are reserved", VENTRY)
    if kind in _INTR_TYPE_SOFT:
        length = int(v.vm_entry_instruction_len)
        misc = c.facts.msr(x86.MSR_IA32_VMX_MISC)
        zero_ok = misc is not None and bool(misc & _VMX_MISC_ZERO_LEN_INS)
        c.report(
            length > 15 or (length == 0 and not zero_ok),
            "vmcs12.vm_entry_instruction_len",
            length,
            "a software interrupt or exception needs an instruction length of 1 to 15",
            VENTRY,
        )


#: This module's rules in the kernel's order, each with the scope in which
#: the kernel reaches it (its early returns).
RULES: tuple[ScopedRule, ...] = (
    (in_vmx, vmx_no_vmxon_means_empty),
    (in_vmx_vmxon, vmx_needs_cpuid_vmx),
    (in_vmx_vmxon, vmx_vmxon_pa_valid),
    (in_vmx, vmx_smm_flags),
    (in_vmx, vmx_header_flags),
    (in_vmx, vmx_smm_matches_vcpu),
    (in_vmx, vmx_evmcs_enabled),
    (in_vmx_vmxon, vmx_without_vmcs12),
    (in_vmx_page, vmx_vmcs12_pa),
    (in_vmx_page, vmx_vmcs12_revision),
    (in_vmx_guest, vmx_shadow_vmcs12),
    (in_vmx_guest, vmx_control_fields),
    (in_vmx_guest, vmx_cr3_targets),
    (in_vmx_guest, vmx_bitmap_pages),
    (in_vmx_guest, vmx_apicv),
    (in_vmx_guest, vmx_nmi_controls),
    (in_vmx_guest, vmx_ept_dependents),
    (in_vmx_guest, vmx_vpid_and_timer),
    (in_vmx_guest, vmx_eptp),
    (in_vmx_guest, vmx_vmfunc),
    (in_vmx_guest, vmx_msr_switch_areas),
    (in_vmx_guest, vmx_entry_event),
)
