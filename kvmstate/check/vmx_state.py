"""VMX host and guest state: nested_vmx_check_host_state and _guest_state."""

from __future__ import annotations

from kvmstate import uapi, x86
from kvmstate import vmcs12 as vmx
from kvmstate.check.engine import (
    INVALID_GPA,
    RP,
    U64,
    VGUEST,
    VHOST,
    Ctx,
    ScopedRule,
    any_of,
    flag_names,
    in_vmx_guest,
)
from kvmstate.check.registers import (
    CR0_NE,
    CR0_PE,
    CR0_PG,
    CR4,
    cr3_rule,
    cr4_rules,
    efer_rules,
    pat_rule,
)

_VMXON_CR0 = CR0_PE | CR0_PG | CR0_NE  # VMXON_CR0_ALWAYSON


def _cr0_vmx_rules(c: Ctx, field: str, value: int, source: str, *, guest: bool) -> None:
    """nested_{host,guest}_cr0_valid: IA32_VMX_CR0_FIXED0/FIXED1 (PE, PG, NE required;
    PE and PG not for an unrestricted guest)."""
    value &= U64
    fixed0 = c.facts.msr(x86.MSR_IA32_VMX_CR0_FIXED0)
    need = fixed0 if fixed0 is not None else _VMXON_CR0
    if guest and c.has2(vmx.SECONDARY_EXEC_UNRESTRICTED_GUEST):
        need &= ~(CR0_PE | CR0_PG)
    c.report(
        bool(need & ~value),
        field,
        value,
        f"CR0 must have {flag_names(x86.Cr0, need)} in VMX operation (IA32_VMX_CR0_FIXED0)"
        + (" unless the guest is unrestricted" if guest else ""),
        source,
    )
    fixed1 = c.facts.msr(x86.MSR_IA32_VMX_CR0_FIXED1)
    extra = value & ~(fixed1 if fixed1 is not None else 0xFFFFFFFF)
    c.report(
        bool(extra) if fixed1 is not None else (None if extra else False),
        field,
        value,
        f"CR0 bits {extra:#x} are not allowed by IA32_VMX_CR0_FIXED1",
        source,
        "vmx_msrs (IA32_VMX_CR0_FIXED1)",
    )


def _perf_global_ctrl(c: Ctx, field: str, value: int, source: str) -> None:
    c.report(
        None if value else False,
        field,
        value,
        "IA32_PERF_GLOBAL_CTRL may set only bits of the vCPU's PMU counters",
        source + " -> kvm_valid_perf_global_ctrl",
        "the vCPU's PMU (CPUID leaf 0xA)",
    )


_SEGMENT_RPL_TI = 7
# Host addresses nested_vmx_check_host_state wants canonical.
_HOST_ADDRESSES = (
    "host_ia32_sysenter_esp", "host_ia32_sysenter_eip", "host_fs_base", "host_gs_base",
    "host_gdtr_base", "host_idtr_base", "host_tr_base", "host_rip",
)  # fmt: skip


def vmx_host_state(c: Ctx) -> None:
    """nested_vmx_check_host_state: host CR0/CR4 fixed bits, legal CR3, canonical
    addresses, PAT, PERF_GLOBAL_CTRL, the 64-bit host rules, selectors and EFER."""
    v = c.v12
    assert v is not None
    src = VHOST
    _cr0_vmx_rules(c, "vmcs12.host_cr0", int(v.host_cr0), src, guest=False)
    cr4_rules(c, "vmcs12.host_cr4", int(v.host_cr4), src, vmx_fixed=True)
    cr3_rule(c, "vmcs12.host_cr3", int(v.host_cr3), src)
    exit_ctl = int(v.vm_exit_controls)
    ia32e = bool(exit_ctl & vmx.VM_EXIT_HOST_ADDR_SPACE_SIZE)
    for name in _HOST_ADDRESSES:
        value = int(getattr(v, name))
        msr = name != "host_rip"  # 6.12: MSR addresses and bases vs HOST_RIP
        c.report(
            c.noncanonical(value, msr),
            f"vmcs12.{name}",
            value,
            f"{name} must be a canonical address",
            src + (" (6.12: is_noncanonical_msr/base_address)" if msr else ""),
            c.la57_for(msr)[1],
        )
    if exit_ctl & vmx.VM_EXIT_LOAD_IA32_PAT:
        pat_rule(c, "vmcs12.host_ia32_pat", int(v.host_ia32_pat), src)
    if exit_ctl & vmx.VM_EXIT_LOAD_IA32_PERF_GLOBAL_CTRL:
        value = int(v.host_ia32_perf_global_ctrl)
        _perf_global_ctrl(c, "vmcs12.host_ia32_perf_global_ctrl", value, src)
    host_cr4 = int(v.host_cr4)
    if ia32e:
        c.report(
            not host_cr4 & CR4.PAE,
            "vmcs12.host_cr4",
            host_cr4,
            "a 64-bit host (HOST_ADDR_SPACE_SIZE) needs CR4.PAE",
            src,
        )
    else:
        c.report(
            bool(v.vm_entry_controls & vmx.VM_ENTRY_IA32E_MODE),
            "vmcs12.vm_entry_controls",
            int(v.vm_entry_controls),
            "a 64-bit guest (IA32E_MODE) needs a 64-bit host (HOST_ADDR_SPACE_SIZE)",
            src,
        )
        c.report(
            bool(host_cr4 & CR4.PCIDE),
            "vmcs12.host_cr4",
            host_cr4,
            "CR4.PCIDE needs a 64-bit host (HOST_ADDR_SPACE_SIZE)",
            src,
        )
        c.report(
            bool(v.host_rip >> 32),
            "vmcs12.host_rip",
            int(v.host_rip),
            "a 32-bit host's RIP must fit in 32 bits",
            src,
        )
    for seg in ("cs", "ss", "ds", "es", "fs", "gs", "tr"):
        sel = int(getattr(v, f"host_{seg}_selector"))
        c.report(
            bool(sel & _SEGMENT_RPL_TI),
            f"vmcs12.host_{seg}_selector",
            sel,
            "host selectors must have RPL 0 and TI 0 (bits 2:0 clear)",
            src,
        )
    for seg, zero_bad in (("cs", True), ("tr", True), ("ss", not ia32e)):
        sel = int(getattr(v, f"host_{seg}_selector"))
        c.report(
            zero_bad and sel == 0,
            f"vmcs12.host_{seg}_selector",
            sel,
            f"host {seg.upper()} selector must not be 0"
            + (" for a 32-bit host" if seg == "ss" else ""),
            src,
        )
    if exit_ctl & vmx.VM_EXIT_LOAD_IA32_EFER:
        efer = int(v.host_ia32_efer)
        efer_rules(c, "vmcs12.host_ia32_efer", efer, src, "vmx")
        c.report(
            bool(efer & x86.EFER_LMA) != ia32e or bool(efer & x86.EFER_LME) != ia32e,
            "vmcs12.host_ia32_efer",
            efer,
            f"host EFER.LMA and EFER.LME must both be {int(ia32e)}, as HOST_ADDR_SPACE_SIZE",
            src,
        )


_ACTIVITY_STATES = (vmx.GUEST_ACTIVITY_ACTIVE, vmx.GUEST_ACTIVITY_HLT, vmx.GUEST_ACTIVITY_WAIT_SIPI)
_DEBUGCTL_ALWAYS_OK = 0x3  # LBR and BTF: vmx_is_valid_debugctl lets them through
_DEBUGCTL_MAYBE = (1 << 2) | (1 << 11) | (1 << 14) | (1 << 15)  # bus-lock, freeze-LBRs, SMM, RTM
_BNDCFGS_RSVD = 0xFFC


def vmx_guest_state(c: Ctx) -> None:
    """nested_vmx_check_guest_state (as far as the vmcs12 decides it): CR0/CR4 fixed bits,
    DR7/DEBUGCTL, PAT, PERF_GLOBAL_CTRL, PG without PE, IA-32e mode, EFER (with
    RUN_PENDING), BNDCFGS and the activity state."""
    v = c.v12
    assert v is not None
    src = VGUEST
    cr0, cr4 = int(v.guest_cr0), int(v.guest_cr4)
    entry = int(v.vm_entry_controls)
    ia32e = bool(entry & vmx.VM_ENTRY_IA32E_MODE)
    _cr0_vmx_rules(c, "vmcs12.guest_cr0", cr0, src, guest=True)
    cr4_rules(c, "vmcs12.guest_cr4", cr4, src, vmx_fixed=True)
    if entry & vmx.VM_ENTRY_LOAD_DEBUG_CONTROLS:
        c.report(
            bool(v.guest_dr7 >> 32),
            "vmcs12.guest_dr7",
            int(v.guest_dr7),
            "DR7 bits 63:32 are reserved",
            src,
        )
        debugctl = int(v.guest_ia32_debugctl)
        bad = debugctl & ~(_DEBUGCTL_ALWAYS_OK | _DEBUGCTL_MAYBE)
        c.report(
            bool(bad),
            "vmcs12.guest_ia32_debugctl",
            debugctl,
            f"DEBUGCTL bits {bad:#x} are never valid for a KVM guest",
            src + " -> vmx_is_valid_debugctl",
        )
        maybe = debugctl & _DEBUGCTL_MAYBE
        c.report(
            None if maybe else False,
            "vmcs12.guest_ia32_debugctl",
            debugctl,
            f"DEBUGCTL bits {maybe:#x} need host and vCPU support (bus-lock detection, LBR "
            "freezing, RTM debugging; FREEZE_IN_SMM only under a 6.12 quirk)",
            src + " -> vmx_is_valid_debugctl",
            "the vCPU's PMU, CPUID and kernel_version",
        )
    if entry & vmx.VM_ENTRY_LOAD_IA32_PAT:
        pat_rule(c, "vmcs12.guest_ia32_pat", int(v.guest_ia32_pat), src)
    link = int(v.vmcs_link_pointer)
    if link != INVALID_GPA:
        c.page_rule("vmcs12.vmcs_link_pointer", link, src, "the VMCS link pointer")
        if c.bad_page(link) is False:
            _link_page(c, v, link, src + " -> nested_vmx_check_vmcs_link_ptr")
    if entry & vmx.VM_ENTRY_LOAD_IA32_PERF_GLOBAL_CTRL:
        value = int(v.guest_ia32_perf_global_ctrl)
        _perf_global_ctrl(c, "vmcs12.guest_ia32_perf_global_ctrl", value, src)
    c.report(
        cr0 & (CR0_PG | CR0_PE) == CR0_PG,
        "vmcs12.guest_cr0",
        cr0,
        "CR0.PG needs CR0.PE",
        src,
    )
    if ia32e:
        c.report(
            not cr4 & CR4.PAE or not cr0 & CR0_PG,
            "vmcs12.vm_entry_controls",
            entry,
            "an IA-32e mode guest needs guest CR4.PAE and CR0.PG",
            src,
        )
    if c.flags & RP and entry & vmx.VM_ENTRY_LOAD_IA32_EFER:
        efer = int(v.guest_ia32_efer)
        efer_rules(c, "vmcs12.guest_ia32_efer", efer, src, "vmx")
        c.report(
            bool(efer & x86.EFER_LMA) != ia32e
            or (bool(cr0 & CR0_PG) and bool(efer & x86.EFER_LME) != ia32e),
            "vmcs12.guest_ia32_efer",
            efer,
            f"with RUN_PENDING, guest EFER.LMA (and EFER.LME when paging) must be "
            f"{int(ia32e)}, as IA32E_MODE",
            src,
        )
    if entry & vmx.VM_ENTRY_LOAD_BNDCFGS:
        bnd = int(v.guest_bndcfgs)
        c.report(
            any_of(bool(bnd & _BNDCFGS_RSVD), c.noncanonical(bnd & ~0xFFF, msr=True)),
            "vmcs12.guest_bndcfgs",
            bnd,
            "BNDCFGS bits 11:2 are reserved and its base must be canonical",
            src + " (6.12: is_noncanonical_msr_address)",
            c.la57_for(True)[1],
        )
    activity = int(v.guest_activity_state)
    c.report(
        activity not in _ACTIVITY_STATES,
        "vmcs12.guest_activity_state",
        activity,
        "the activity state must be ACTIVE, HLT or WAIT_SIPI",
        src + " -> nested_check_guest_non_reg_state",
    )


_NEEDS_MEMORY = "guest memory (check's memory argument)"


def _link_page(c: Ctx, v: vmx.vmcs12, link: int, source: str) -> None:
    """nested_vmx_check_vmcs_link_ptr (6.1 and 6.12): the 4 KiB page at the link pointer is
    in guest memory (kvm_gfn_to_hva_cache_init over VMCS12_SIZE) and its header has
    VMCS12_REVISION and the shadow bit equal to the vmcs12's SHADOW_VMCS control."""
    shadow = c.has2(vmx.SECONDARY_EXEC_SHADOW_VMCS)
    rule = (
        "the page at the link pointer is read from guest memory: it must be mapped and "
        f"hold a VMCS header with revision {vmx.VMCS12_REVISION:#x} and the shadow bit "
        f"{int(shadow)} (as SHADOW_VMCS)"
    )
    if c.memory is None:
        c.report(None, "vmcs12.vmcs_link_pointer", link, rule, source, _NEEDS_MEMORY)
        return
    page = c.memory.read_physical(link, uapi.KVM_STATE_NESTED_VMX_VMCS_SIZE)
    if page is None:
        c.report(
            True,
            "vmcs12.vmcs_link_pointer",
            link,
            "the page at the link pointer is not in guest memory (no memory slot holds it)",
            source,
        )
        return
    header = int.from_bytes(page[:4], "little")
    revision, shadow_bit = header & 0x7FFF_FFFF, bool(header >> 31)
    c.report(
        revision != vmx.VMCS12_REVISION or shadow_bit != shadow,
        "vmcs12.vmcs_link_pointer",
        link,
        f"{rule}; guest memory holds revision {revision:#x}, shadow bit {int(shadow_bit)}",
        source,
    )


def vmx_guest_cr3(c: Ctx) -> None:
    """prepare_vmcs02 -> nested_vmx_load_cr3: L2's CR3 (vmcs12.guest_cr3) is legal."""
    assert c.v12 is not None
    source = "arch/x86/kvm/vmx/nested.c: prepare_vmcs02 -> nested_vmx_load_cr3"
    cr3_rule(c, "vmcs12.guest_cr3", int(c.v12.guest_cr3), source)


#: This module's rules in the kernel's order, each with the scope in which
#: the kernel reaches it (its early returns).
RULES: tuple[ScopedRule, ...] = (
    (in_vmx_guest, vmx_host_state),
    (in_vmx_guest, vmx_guest_state),
    (in_vmx_guest, vmx_guest_cr3),
)
