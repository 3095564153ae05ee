"""SVM rules: svm_set_nested_state and the vmcb12 checks it calls."""

from __future__ import annotations

from kvmstate import uapi, x86
from kvmstate import vmcb as svm
from kvmstate.check.engine import (
    GIF,
    GM,
    RP,
    SCTL,
    SGPAT,
    SSAVE,
    SSET,
    U64,
    VMCB_MIN,
    Ctx,
    ScopedRule,
    all_of,
    any_of,
    flag_names,
    in_svm,
    in_svm_guest,
    in_svm_vmcb,
)
from kvmstate.check.registers import (
    CR0_PE,
    CR0_PG,
    CR4,
    cr3_rule,
    cr4_rules,
    efer_rules,
    pat_invalid,
)
from kvmstate.nested import KNOWN_FLAGS
from kvmstate.uapi import NestedFlag

_SVM_FLAGS = GM | RP | GIF

# --- SVM: svm_set_nested_state ----------------------------------------------------------


def svm_flags(c: Ctx) -> None:
    """svm_set_nested_state: only GUEST_MODE, RUN_PENDING and GIF_SET (no EVMCS, no
    MTF_PENDING: those are VMX's)."""
    extra = c.flags & ~_SVM_FLAGS & KNOWN_FLAGS
    c.report(
        bool(extra),
        "flags",
        c.flags,
        f"SVM state takes only GUEST_MODE, RUN_PENDING and GIF_SET, not "
        f"{flag_names(NestedFlag, extra)}",
        SSET,
    )


def svm_svme_clear(c: Ctx) -> None:
    """svm_set_nested_state: with EFER.SVME clear in the vCPU, flags must be exactly GIF_SET
    (no guest mode, GIF set). Read in 6.1 and 6.12; set EFER with KVM_SET_SREGS first."""
    if c.flags == GIF:
        return
    efer = c.facts.efer
    svme_clear = None if efer is None else not efer & x86.EFER_SVME
    if c.flags & GM:
        c.report(
            svme_clear,
            "flags",
            c.flags,
            "GUEST_MODE needs EFER.SVME set in the vCPU (KVM_SET_SREGS before the nested state)",
            SSET,
            "efer",
        )
    else:
        c.report(
            all_of(svme_clear, c.both_kernels_rule()),
            "flags",
            c.flags,
            "with EFER.SVME clear in the vCPU, flags must be exactly GIF_SET "
            "(6.1 and 6.12 refuse a clear GIF there)",
            SSET + " (6.1-6.12)",
            "efer" if svme_clear is None else "kernel_version",
        )


def svm_not_in_smm(c: Ctx) -> None:
    """svm_set_nested_state: SMM suspends SVM, so no GUEST_MODE while the vCPU is in SMM."""
    if not c.flags & GM:
        return
    c.report(
        c.facts.in_smm,
        "flags",
        c.flags,
        "GUEST_MODE is refused while the vCPU is in SMM (SMM suspends SVM)",
        SSET,
        "in_smm",
    )


def svm_vmcb_pa(c: Ctx) -> None:
    """svm_set_nested_state: ``page_address_valid(vmcb_pa)`` in guest mode."""
    c.page_rule("hdr.svm.vmcb_pa", int(c.svm.vmcb_pa), SSET, "vmcb12's address (vmcb_pa)")


def svm_size(c: Ctx) -> None:
    """svm_set_nested_state: guest mode needs the vmcb12 page (size >= 128 + 4096)."""
    c.report(
        c.size < VMCB_MIN,
        "size",
        c.size,
        f"GUEST_MODE needs the vmcb12: size at least {VMCB_MIN}",
        SSET,
    )


def _legal_range(c: Ctx, base: int, size: int) -> bool | None:
    """Not nested_svm_check_bitmap_pa: the page-aligned base and the last byte legal."""
    base &= ~0xFFF & U64
    return any_of(c.illegal_gpa(base), c.illegal_gpa((base + size - 1) & U64))


def svm_controls(c: Ctx) -> None:
    """__nested_vmcb_check_controls: VMRUN intercepted, ASID non-zero, NP_ENABLE only with
    NPT and a legal nested_cr3, MSR/IO permission maps inside guest-physical space, and
    (6.12, not 6.1) V_NMI_ENABLE only with the NMI intercept."""
    assert c.vmcb is not None
    ctl = c.vmcb.control
    c.report(
        not ctl.is_intercept(svm.INTERCEPT_VMRUN),
        f"vmcb12.control.intercepts[{svm.INTERCEPT_WORD4}]",
        int(ctl.intercepts[svm.INTERCEPT_WORD4]),
        "VMRUN must be intercepted (intercept word 4, bit 0): L1 must see L2's VMRUN",
        SCTL,
    )
    c.report(
        ctl.asid == 0,
        "vmcb12.control.asid",
        int(ctl.asid),
        "the ASID must not be 0 (ASID 0 is the host's)",
        SCTL,
    )
    if ctl.nested_ctl & svm.SVM_NESTED_CTL_NP_ENABLE:
        npt = c.facts.npt_enabled
        c.report(
            None if npt is None else not npt,
            "vmcb12.control.nested_ctl",
            int(ctl.nested_ctl),
            "NP_ENABLE needs nested paging in KVM (kvm_amd npt=1)",
            SCTL,
            "npt_enabled",
        )
        c.report(
            c.illegal_gpa(int(ctl.nested_cr3)),
            "vmcb12.control.nested_cr3",
            int(ctl.nested_cr3),
            "with NP_ENABLE, nested_cr3 must be below 2^MAXPHYADDR",
            SCTL,
            "maxphyaddr",
        )
    for name, size in (("msrpm_base_pa", svm.MSRPM_SIZE), ("iopm_base_pa", svm.IOPM_SIZE)):
        value = int(getattr(ctl, name))
        c.report(
            _legal_range(c, value, size),
            f"vmcb12.control.{name}",
            value,
            f"the {size // 4096}-page permission map at {name} must lie below 2^MAXPHYADDR",
            SCTL + " -> nested_svm_check_bitmap_pa",
            "maxphyaddr",
        )
    if ctl.int_ctl & svm.V_NMI_ENABLE_MASK:
        c.report(
            all_of(c.newer_rule(), not ctl.is_intercept(svm.INTERCEPT_NMI)),
            "vmcb12.control.int_ctl",
            int(ctl.int_ctl),
            "V_NMI_ENABLE needs the NMI intercept (a 6.12 rule, absent in 6.1)",
            SCTL + " (6.12, not 6.1)",
            "kernel_version",
        )


def svm_vcpu_cr0(c: Ctx) -> None:
    """svm_set_nested_state: the vCPU's own CR0 (L2's, from KVM_SET_SREGS) must not have NW
    without CD."""
    cr0 = c.facts.cr0
    c.report(
        None if cr0 is None else bool(not cr0 & x86.X86_CR0_CD and cr0 & x86.X86_CR0_NW),
        "vcpu.cr0",
        cr0,
        "the vCPU's CR0 (L2's) must not set NW with CD clear",
        SSET,
        "cr0",
    )


def svm_save_area(c: Ctx) -> None:
    """svm_set_nested_state + __nested_vmcb_check_save on vmcb12.save, which holds L1's
    state saved at VMRUN (restored into vmcb01; 6.1 and 6.12 check the same area): CR0.PG,
    CR0.PE, no RFLAGS.VM, no EFER.LMA without LME (6.12.118 on), EFER.SVME, CR0 NW/CD and
    high bits, DR6/DR7 high bits, long-mode consistency, valid CR4 and EFER."""
    assert c.vmcb is not None
    save = c.vmcb.save
    efer, cr0, cr3, cr4 = int(save.efer), int(save.cr0), int(save.cr3), int(save.cr4)
    f = "vmcb12.save."
    c.report(
        not cr0 & CR0_PG or not cr0 & CR0_PE,
        f + "cr0",
        cr0,
        "L1's CR0 must have PG and PE: VMRUN runs from paged protected mode",
        SSET,
    )
    c.report(
        bool(save.rflags & x86.X86_EFLAGS_VM),
        f + "rflags",
        int(save.rflags),
        "L1's RFLAGS must not have VM (VMRUN is not allowed in virtual-8086 mode)",
        SSET,
    )
    if efer & x86.EFER_LMA and not efer & x86.EFER_LME:
        c.report(
            _lma_rule(c.facts.kernel_version),
            f + "efer",
            efer,
            "L1's EFER must not have LMA without LME (refused from 6.12.118 on; 6.1 and "
            "earlier 6.12 releases take it)",
            SSET + " (6.12.118+, CVE-2026-99345)",
            "kernel_version",
        )
    c.report(
        not efer & x86.EFER_SVME,
        f + "efer",
        efer,
        "L1's EFER must have SVME",
        SSAVE,
    )
    c.report(
        bool(not cr0 & x86.X86_CR0_CD and cr0 & x86.X86_CR0_NW),
        f + "cr0",
        cr0,
        "CR0.NW needs CR0.CD",
        SSAVE,
    )
    c.report(bool(cr0 >> 32), f + "cr0", cr0, "CR0 bits 63:32 are reserved", SSAVE)
    c.report(bool(save.dr6 >> 32), f + "dr6", int(save.dr6), "DR6 bits 63:32 are reserved", SSAVE)
    c.report(bool(save.dr7 >> 32), f + "dr7", int(save.dr7), "DR7 bits 63:32 are reserved", SSAVE)
    if efer & x86.EFER_LME and cr0 & CR0_PG:
        c.report(
            not cr4 & CR4.PAE or not cr0 & CR0_PE,
            f + "cr4",
            cr4,
            "long mode (EFER.LME with CR0.PG) needs CR4.PAE and CR0.PE",
            SSAVE,
        )
        cr3_rule(c, f + "cr3", cr3, SSAVE)
        attrib = int(save.cs.attrib)
        c.report(
            bool(attrib & svm.SVM_SELECTOR_L_MASK and attrib & svm.SVM_SELECTOR_DB_MASK),
            f + "cs.attrib",
            attrib,
            "in long mode CS cannot have both L and D/B",
            SSAVE,
        )
    cr4_rules(c, f + "cr4", cr4, SSAVE, vmx_fixed=False)
    efer_rules(c, f + "efer", efer, SSAVE, "svm")


#: The first 6.12 stable release whose svm_set_nested_state refuses L1's EFER.LMA
#: without EFER.LME (Debian's 6.12.118 changelog: "KVM: nSVM: Reject
#: KVM_SET_NESTED_STATE if L1 has EFER.LMA=1 && EFER.LME=0", CVE-2026-99345).
#: 6.1.192 does not have it; the series after 6.12 were not read.
LMA_RULE_612 = (6, 12, 118)


def _lma_rule(version: tuple[int, ...] | None) -> bool | None:
    """Whether a kernel refuses L1's EFER.LMA without LME (None: cannot tell)."""
    if version is None:
        return None
    if version[:2] < (6, 12):
        # Read in 6.1.192. Debian numbers every 6.1 kernel 6.1.0, so a later 6.1
        # backport could not be told apart by the version: the 6.1 read stands.
        return False
    if version[:2] == (6, 12):
        return None if len(version) < 3 else version >= LMA_RULE_612
    return None


def svm_gpat(c: Ctx) -> None:
    """svm_set_nested_state, Linux 7.2+ (commit 4f256d5770fe): with NP_ENABLE in vmcb12's
    nested_ctl and KVM_X86_QUIRK_NESTED_SVM_SHARED_PAT disabled, ``hdr.svm.gpat`` must be
    a valid PAT (kvm_pat_valid: every byte 0, 1, 4, 5, 6 or 7). With the quirk in force
    (the default), and in any kernel before 7.2, gpat is ignored."""
    assert c.vmcb is not None
    if not c.vmcb.control.nested_ctl & svm.SVM_NESTED_CTL_NP_ENABLE:
        return
    gpat = int(c.svm.gpat)
    if not pat_invalid(gpat):
        return
    shared = c.facts.nested_svm_shared_pat
    needs = "nested_svm_shared_pat"
    if shared is not None:
        # Only a kernel with the series lets the quirk be disabled: no version needed.
        verdict: bool | None = not shared
    elif c.since(uapi.GPAT_RELEASE) is False:
        verdict = False  # a kernel before 7.2 has neither the quirk nor the rule
    else:
        verdict = None
        if c.facts.kernel_version is None:
            needs += " (or a kernel_version before 7.2)"
    c.report(
        verdict,
        "hdr.svm.gpat",
        gpat,
        "with NP_ENABLE in vmcb12 and KVM_X86_QUIRK_NESTED_SVM_SHARED_PAT disabled, gpat "
        "(L2's PAT) must be a valid PAT: every byte a memory type 0, 1, 4, 5, 6 or 7",
        SGPAT,
        needs,
    )


def svm_vcpu_cr3(c: Ctx) -> None:
    """svm_set_nested_state -> nested_svm_load_cr3: the vCPU's CR3 (L2's) is reloaded and
    must be legal."""
    cr3 = c.facts.cr3
    if cr3 is None:
        c.report(
            None,
            "vcpu.cr3",
            None,
            "the vCPU's CR3 (L2's) must have no bit at or above MAXPHYADDR",
            SSET + " -> nested_svm_load_cr3",
            "cr3",
        )
        return
    cr3_rule(c, "vcpu.cr3", cr3, SSET + " -> nested_svm_load_cr3")


#: This module's rules in the kernel's order, each with the scope in which
#: the kernel reaches it (its early returns).
RULES: tuple[ScopedRule, ...] = (
    (in_svm, svm_flags),
    (in_svm, svm_svme_clear),
    (in_svm, svm_not_in_smm),
    (in_svm_guest, svm_vmcb_pa),
    (in_svm_guest, svm_size),
    (in_svm_vmcb, svm_controls),
    (in_svm_vmcb, svm_vcpu_cr0),
    (in_svm_vmcb, svm_save_area),
    (in_svm_vmcb, svm_gpat),
    (in_svm_vmcb, svm_vcpu_cr3),
)
