"""Architectural x86 names: CR0, CR4, EFER and RFLAGS bits, and MSR indices.

One place for the bits every vendor shares, so that neither the SVM
mirrors (:mod:`kvmstate.vmcb`, which re-exports them) nor the VMX rules
define their own. Names follow the kernel's ``arch/x86/include`` headers
(``X86_CR0_PG``, ``EFER_SVME``, ``MSR_IA32_FEATURE_CONTROL``).

>>> from kvmstate.x86 import EFER_SVME, MSR_IA32_FEATURE_CONTROL, Efer
>>> Efer(EFER_SVME).name, hex(MSR_IA32_FEATURE_CONTROL)
('SVME', '0x3a')
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType

__all__ = [
    "EFER_AUTOIBRS",
    "EFER_FFXSR",
    "EFER_LMA",
    "EFER_LME",
    "EFER_LMSLE",
    "EFER_NX",
    "EFER_SCE",
    "EFER_SVME",
    "MSR_IA32_FEATURE_CONTROL",
    "MSR_IA32_VMX_BASIC",
    "MSR_IA32_VMX_CR0_FIXED0",
    "MSR_IA32_VMX_CR0_FIXED1",
    "MSR_IA32_VMX_CR4_FIXED0",
    "MSR_IA32_VMX_CR4_FIXED1",
    "MSR_IA32_VMX_ENTRY_CTLS",
    "MSR_IA32_VMX_EPT_VPID_CAP",
    "MSR_IA32_VMX_EXIT_CTLS",
    "MSR_IA32_VMX_MISC",
    "MSR_IA32_VMX_PINBASED_CTLS",
    "MSR_IA32_VMX_PROCBASED_CTLS",
    "MSR_IA32_VMX_PROCBASED_CTLS2",
    "MSR_IA32_VMX_TRUE_ENTRY_CTLS",
    "MSR_IA32_VMX_TRUE_EXIT_CTLS",
    "MSR_IA32_VMX_TRUE_PINBASED_CTLS",
    "MSR_IA32_VMX_TRUE_PROCBASED_CTLS",
    "MSR_IA32_VMX_VMCS_ENUM",
    "MSR_IA32_VMX_VMFUNC",
    "VMX_CAPABILITY_MSRS",
    "X86_CR0_AM",
    "X86_CR0_CD",
    "X86_CR0_EM",
    "X86_CR0_ET",
    "X86_CR0_MP",
    "X86_CR0_NE",
    "X86_CR0_NW",
    "X86_CR0_PE",
    "X86_CR0_PG",
    "X86_CR0_TS",
    "X86_CR0_WP",
    "X86_CR4_PAE",
    "X86_EFLAGS_FIXED",
    "X86_EFLAGS_IOPL",
    "X86_EFLAGS_VM",
    "Cr0",
    "Cr4",
    "Efer",
    "Rflags",
]

EFER_SCE = 1 << 0
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
EFER_NX = 1 << 11
EFER_SVME = 1 << 12
EFER_LMSLE = 1 << 13
EFER_FFXSR = 1 << 14
EFER_AUTOIBRS = 1 << 21

X86_CR0_PE = 1 << 0
X86_CR0_MP = 1 << 1
X86_CR0_EM = 1 << 2
X86_CR0_TS = 1 << 3
X86_CR0_ET = 1 << 4
X86_CR0_NE = 1 << 5
X86_CR0_WP = 1 << 16
X86_CR0_AM = 1 << 18
X86_CR0_NW = 1 << 29
X86_CR0_CD = 1 << 30
X86_CR0_PG = 1 << 31

X86_CR4_PAE = 1 << 5

X86_EFLAGS_FIXED = 1 << 1
X86_EFLAGS_IOPL = 3 << 12
X86_EFLAGS_VM = 1 << 17

# MSR indices (arch/x86/include/asm/msr-index.h).
MSR_IA32_FEATURE_CONTROL = 0x3A
MSR_IA32_VMX_BASIC = 0x480
MSR_IA32_VMX_PINBASED_CTLS = 0x481
MSR_IA32_VMX_PROCBASED_CTLS = 0x482
MSR_IA32_VMX_EXIT_CTLS = 0x483
MSR_IA32_VMX_ENTRY_CTLS = 0x484
MSR_IA32_VMX_MISC = 0x485
MSR_IA32_VMX_CR0_FIXED0 = 0x486
MSR_IA32_VMX_CR0_FIXED1 = 0x487
MSR_IA32_VMX_CR4_FIXED0 = 0x488
MSR_IA32_VMX_CR4_FIXED1 = 0x489
MSR_IA32_VMX_VMCS_ENUM = 0x48A
MSR_IA32_VMX_PROCBASED_CTLS2 = 0x48B
MSR_IA32_VMX_EPT_VPID_CAP = 0x48C
MSR_IA32_VMX_TRUE_PINBASED_CTLS = 0x48D
MSR_IA32_VMX_TRUE_PROCBASED_CTLS = 0x48E
MSR_IA32_VMX_TRUE_EXIT_CTLS = 0x48F
MSR_IA32_VMX_TRUE_ENTRY_CTLS = 0x490
MSR_IA32_VMX_VMFUNC = 0x491

#: The VMX capability MSRs, IA32_VMX_BASIC (0x480) .. IA32_VMX_VMFUNC (0x491): index -> name.
#: KVM refuses to change them once the vCPU is in VMX operation (vmx_set_vmx_msr: EBUSY).
VMX_CAPABILITY_MSRS: Mapping[int, str] = MappingProxyType(
    {
        MSR_IA32_VMX_BASIC: "IA32_VMX_BASIC",
        MSR_IA32_VMX_PINBASED_CTLS: "IA32_VMX_PINBASED_CTLS",
        MSR_IA32_VMX_PROCBASED_CTLS: "IA32_VMX_PROCBASED_CTLS",
        MSR_IA32_VMX_EXIT_CTLS: "IA32_VMX_EXIT_CTLS",
        MSR_IA32_VMX_ENTRY_CTLS: "IA32_VMX_ENTRY_CTLS",
        MSR_IA32_VMX_MISC: "IA32_VMX_MISC",
        MSR_IA32_VMX_CR0_FIXED0: "IA32_VMX_CR0_FIXED0",
        MSR_IA32_VMX_CR0_FIXED1: "IA32_VMX_CR0_FIXED1",
        MSR_IA32_VMX_CR4_FIXED0: "IA32_VMX_CR4_FIXED0",
        MSR_IA32_VMX_CR4_FIXED1: "IA32_VMX_CR4_FIXED1",
        MSR_IA32_VMX_VMCS_ENUM: "IA32_VMX_VMCS_ENUM",
        MSR_IA32_VMX_PROCBASED_CTLS2: "IA32_VMX_PROCBASED_CTLS2",
        MSR_IA32_VMX_EPT_VPID_CAP: "IA32_VMX_EPT_VPID_CAP",
        MSR_IA32_VMX_TRUE_PINBASED_CTLS: "IA32_VMX_TRUE_PINBASED_CTLS",
        MSR_IA32_VMX_TRUE_PROCBASED_CTLS: "IA32_VMX_TRUE_PROCBASED_CTLS",
        MSR_IA32_VMX_TRUE_EXIT_CTLS: "IA32_VMX_TRUE_EXIT_CTLS",
        MSR_IA32_VMX_TRUE_ENTRY_CTLS: "IA32_VMX_TRUE_ENTRY_CTLS",
        MSR_IA32_VMX_VMFUNC: "IA32_VMX_VMFUNC",
    }
)


class Efer(enum.IntFlag):
    """EFER (``EFER_*``)."""

    SCE = EFER_SCE
    LME = EFER_LME
    LMA = EFER_LMA
    NX = EFER_NX
    SVME = EFER_SVME
    LMSLE = EFER_LMSLE
    FFXSR = EFER_FFXSR
    AUTOIBRS = EFER_AUTOIBRS


class Cr0(enum.IntFlag):
    """CR0 (``X86_CR0_*``)."""

    PE = X86_CR0_PE
    MP = X86_CR0_MP
    EM = X86_CR0_EM
    TS = X86_CR0_TS
    ET = X86_CR0_ET
    NE = X86_CR0_NE
    WP = X86_CR0_WP
    AM = X86_CR0_AM
    NW = X86_CR0_NW
    CD = X86_CR0_CD
    PG = X86_CR0_PG


class Cr4(enum.IntFlag):
    """CR4 (``X86_CR4_*``, the bits both 6.1 and 6.12 name)."""

    VME = 1 << 0
    PVI = 1 << 1
    TSD = 1 << 2
    DE = 1 << 3
    PSE = 1 << 4
    PAE = X86_CR4_PAE
    MCE = 1 << 6
    PGE = 1 << 7
    PCE = 1 << 8
    OSFXSR = 1 << 9
    OSXMMEXCPT = 1 << 10
    UMIP = 1 << 11
    LA57 = 1 << 12
    VMXE = 1 << 13
    SMXE = 1 << 14
    FSGSBASE = 1 << 16
    PCIDE = 1 << 17
    OSXSAVE = 1 << 18
    SMEP = 1 << 20
    SMAP = 1 << 21
    PKE = 1 << 22
    CET = 1 << 23


class Rflags(enum.IntFlag):
    """RFLAGS (``X86_EFLAGS_*``); IOPL shows as hex rest."""

    CF = 1 << 0
    FIXED = X86_EFLAGS_FIXED
    PF = 1 << 2
    AF = 1 << 4
    ZF = 1 << 6
    SF = 1 << 7
    TF = 1 << 8
    IF = 1 << 9
    DF = 1 << 10
    OF = 1 << 11
    NT = 1 << 14
    RF = 1 << 16
    VM = X86_EFLAGS_VM
    AC = 1 << 18
    VIF = 1 << 19
    VIP = 1 << 20
    ID = 1 << 21
