"""Architectural register rules shared by VMX host/guest state and the SVM save area."""

from __future__ import annotations

from collections.abc import Iterable

from kvmstate import x86
from kvmstate.check.engine import U64, Ctx, all_of, flag_names

# --- CR0, CR4, EFER, CR3 and PAT, as the kernel checks them for L2 and the VMCB ---

CR0_PE, CR0_NE, CR0_PG = x86.X86_CR0_PE, x86.X86_CR0_NE, x86.X86_CR0_PG
CR4 = x86.Cr4
_CR4_LAM_SUP = 1 << 28
# CR4_RESERVED_BITS' complement (asm/kvm_host.h), without LAM_SUP (6.12 only).
_CR4_KNOWN = int(
    CR4.VME | CR4.PVI | CR4.TSD | CR4.DE | CR4.PSE | CR4.PAE | CR4.MCE | CR4.PGE
    | CR4.PCE | CR4.OSFXSR | CR4.PCIDE | CR4.OSXSAVE | CR4.SMEP | CR4.FSGSBASE
    | CR4.OSXMMEXCPT | CR4.LA57 | CR4.VMXE | CR4.SMAP | CR4.PKE | CR4.UMIP
)  # fmt: skip
# __cr4_reserved_bits: the CR4 bits a guest may set only with the CPUID feature.
_CR4_GUEST_FEATURES = {
    int(CR4.OSXSAVE): "xsave",
    int(CR4.SMEP): "smep",
    int(CR4.SMAP): "smap",
    int(CR4.FSGSBASE): "fsgsbase",
    int(CR4.PKE): "pku",
    int(CR4.LA57): "la57",
    int(CR4.UMIP): "umip",
    int(CR4.VMXE): "vmx",
    int(CR4.PCIDE): "pcid",
    _CR4_LAM_SUP: "lam",
}
# nested_vmx_cr_fixed1_bits_update: nested VMX also ties these to CPUID.
_CR4_FIXED1_FEATURES = {
    **_CR4_GUEST_FEATURES,
    int(CR4.VME): "vme",
    int(CR4.PVI): "vme",
    int(CR4.TSD): "tsc",
    int(CR4.DE): "de",
    int(CR4.PSE): "pse",
    int(CR4.PAE): "pae",
    int(CR4.MCE): "mce",
    int(CR4.PGE): "pge",
    int(CR4.OSFXSR): "fxsr",
    int(CR4.OSXMMEXCPT): "xmm",
}


def _newer_feature(c: Ctx, feature: str) -> bool | None:
    """A bit reserved in 6.1 that 6.12 accepts with a CPUID feature: broken?"""
    newer = c.newer_rule()
    if newer is False:
        return True
    has = c.feature(feature)
    return None if newer is None or has is None else not has


def _bits(value: int) -> Iterable[int]:
    while value:
        low = value & -value
        yield low
        value ^= low


def cr4_rules(c: Ctx, field: str, value: int, source: str, *, vmx_fixed: bool) -> None:
    """__kvm_is_valid_cr4 (reserved bits, CPUID-gated bits), and with ``vmx_fixed`` the
    nested CR4_FIXED0/FIXED1 (nested_cr4_valid)."""
    value &= U64
    reserved = value & ~(_CR4_KNOWN | _CR4_LAM_SUP)
    c.report(
        bool(reserved),
        field,
        value,
        f"CR4 bits {reserved:#x} are reserved (CR4_RESERVED_BITS)",
        "arch/x86/kvm/x86.c: __kvm_is_valid_cr4 (" + source + ")",
    )
    if value & _CR4_LAM_SUP:
        c.report(
            _newer_feature(c, "lam"),
            field,
            value,
            "CR4.LAM_SUP (bit 28) is reserved before LAM support (6.1) and needs CPUID LAM (6.12)",
            "arch/x86/kvm/x86.c: __kvm_is_valid_cr4 (" + source + ")",
            "kernel_version and cpu_features",
        )
    fixed0 = c.facts.msr(x86.MSR_IA32_VMX_CR4_FIXED0) if vmx_fixed else None
    fixed1 = c.facts.msr(x86.MSR_IA32_VMX_CR4_FIXED1) if vmx_fixed else None
    if vmx_fixed:
        need = fixed0 if fixed0 is not None else int(CR4.VMXE)
        c.report(
            bool(need & ~value),
            field,
            value,
            "CR4 must have VMXE (and every IA32_VMX_CR4_FIXED0 bit) in VMX operation",
            source,
        )
    if fixed1 is not None:
        c.report(
            bool(value & ~fixed1 & ~reserved),
            field,
            value,
            f"CR4 bits {value & ~fixed1 & ~reserved:#x} are not allowed by IA32_VMX_CR4_FIXED1",
            source,
        )
    table = _CR4_FIXED1_FEATURES if vmx_fixed and fixed1 is None else _CR4_GUEST_FEATURES
    lacking, unknown = [], []
    for bit in _bits(value & ~reserved & ~_CR4_LAM_SUP):
        feature = table.get(bit)
        if feature is None:
            continue
        has = c.feature(feature)
        if has is None:
            unknown.append(f"{flag_names(CR4, bit)} ({feature})")
        elif not has:
            lacking.append(f"{flag_names(CR4, bit)} ({feature})")
    if lacking:
        c.report(
            True,
            field,
            value,
            f"CR4 bits need CPUID features the vCPU lacks: {', '.join(lacking)}",
            source,
        )
    if unknown:
        c.report(
            None,
            field,
            value,
            f"CR4 bits need CPUID features: {', '.join(unknown)}",
            source,
            "cpu_features",
        )


# EFER bits KVM may ever accept (efer_reserved_bits' complement at its widest).
_EFER_SVM_ONLY = x86.EFER_SVME | x86.EFER_LMSLE | x86.EFER_FFXSR | x86.EFER_AUTOIBRS
_EFER_KNOWN = x86.EFER_SCE | x86.EFER_LME | x86.EFER_LMA | x86.EFER_NX | _EFER_SVM_ONLY
_EFER_FEATURES = (
    (x86.EFER_SVME, "svm"),
    (x86.EFER_LME | x86.EFER_LMA, "lm"),
    (x86.EFER_NX, "nx"),
    (x86.EFER_FFXSR, "fxsr_opt"),
    (x86.EFER_AUTOIBRS, "autoibrs"),
)


def efer_rules(c: Ctx, field: str, value: int, source: str, vendor: str) -> None:
    """kvm_valid_efer: no reserved bit (SVME, LMSLE, FFXSR and AUTOIBRS exist only on
    kvm_amd, AUTOIBRS only from 6.12 on), and each feature bit needs its CPUID feature."""
    value &= U64
    known = _EFER_KNOWN if vendor == "svm" else _EFER_KNOWN & ~_EFER_SVM_ONLY
    reserved = value & ~known
    full = "arch/x86/kvm/x86.c: kvm_valid_efer (" + source + ")"
    c.report(
        bool(reserved),
        field,
        value,
        f"EFER bits {flag_names(x86.Efer, reserved)} are reserved on "
        f"{'kvm_amd' if vendor == 'svm' else 'kvm_intel'}",
        full,
    )
    if vendor == "svm" and value & x86.EFER_AUTOIBRS:
        c.report(
            _newer_feature(c, "autoibrs"),
            field,
            value,
            "EFER.AUTOIBRS is reserved in 6.1; 6.12 accepts it with host and CPUID AUTOIBRS",
            full,
            "kernel_version and cpu_features",
        )
    for bits, feature in _EFER_FEATURES:
        if not value & bits & known or bits == x86.EFER_AUTOIBRS:
            continue
        has = c.feature(feature)
        c.report(
            None if has is None else not has,
            field,
            value,
            f"EFER.{flag_names(x86.Efer, value & bits)} needs CPUID {feature} in the vCPU",
            full,
            "cpu_features" if feature not in ("svm", "vmx") else f"has_{feature}",
        )


def pat_invalid(value: int) -> bool:
    """Not kvm_pat_valid: each byte a memory type 0, 1, 4, 5, 6 or 7."""
    value &= U64
    if value & 0xF8F8F8F8F8F8F8F8:
        return True
    return (value | ((value & 0x0202020202020202) << 1)) != value


def pat_rule(c: Ctx, field: str, value: int, source: str) -> None:
    """kvm_pat_valid on a PAT the state loads (vmcs12's host PAT on exit, guest PAT on entry)."""
    c.report(
        pat_invalid(value),
        field,
        value,
        "each PAT entry must be a memory type 0, 1, 4, 5, 6 or 7",
        source + " -> kvm_pat_valid",
    )


def cr3_rule(c: Ctx, field: str, value: int, source: str) -> None:
    """kvm_vcpu_is_legal_cr3: no bit at or above MAXPHYADDR. 6.12 (cpuid.h) first drops the
    LAM bits 61-62 when the vCPU's CPUID has LAM; 6.1 (kvm_vcpu_is_illegal_gpa) never does,
    and as no MAXPHYADDR exceeds 52 those bits are then always illegal."""
    lam_bits = value & (3 << 61)
    if lam_bits:
        newer, lam = c.newer_rule(), c.feature("lam")
        masked = all_of(newer, lam)
        needs = " and ".join(
            name for name, known in (("kernel_version", newer), ("cpu_features", lam))
            if known is None
        )  # fmt: skip
        c.report(
            None if masked is None else not masked,
            field,
            value,
            "CR3 bits 61-62 (LAM_U57, LAM_U48) are legal only with LAM: 6.12 with CPUID LAM "
            "ignores them, 6.1 never does",
            source + " -> kvm_vcpu_is_legal_cr3 (6.12; kvm_vcpu_is_illegal_gpa in 6.1)",
            needs or "kernel_version",
        )
        value &= ~lam_bits
    c.report(
        c.illegal_gpa(value),
        field,
        value,
        "CR3 must have no bit at or above MAXPHYADDR",
        source + " -> kvm_vcpu_is_legal_cr3 (6.12; kvm_vcpu_is_illegal_gpa in 6.1)",
        "maxphyaddr",
    )
