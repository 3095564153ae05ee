"""AMD VMCB mirrors: the ``vmcb12`` page of SVM nested state, field by field.

``struct vmcb`` is the architectural Virtual Machine Control Block (AMD APM
vol. 2, appendix B): the 1024-byte control area (:class:`vmcb_control_area`)
then, at 0x400, the state save area (:class:`vmcb_save_area`).
:class:`vmcb` pads them to the 4096 bytes of ``KVM_STATE_NESTED_SVM_VMCB_SIZE``
so that ``vmcb.from_buffer(page)`` maps the data page of a
:class:`~kvmstate.nested.NestedState` in place.

What KVM puts there (``svm_get_nested_state``): ``control`` is L1's vmcb12
control area as KVM cached it at VMRUN (with the processor-written fields
synced back), ``save`` is L1's own state saved at VMRUN (vmcb01), not L2's;
the rest of the page is zero. ``svm_set_nested_state`` checks ``control``
like ``nested_vmcb_check_controls`` (VMRUN intercepted, ``asid`` != 0,
``nested_cr3``/``msrpm_base_pa``/``iopm_base_pa`` legal, and since vNMI,
``V_NMI_ENABLE`` only with the NMI intercept) and ``save`` like
``nested_vmcb_check_save`` plus CR0.PG, CR0.PE and not RFLAGS.VM.

Layouts and names are those of ``arch/x86/include/asm/svm.h`` in Linux 6.12
(checked field by field against it by gcc and gdb in
``tests/test_vmcb_layout.py``); Linux 6.1 has the same layout with these
differences, also checked:

* ``vmcb_save_area`` reserved fields are named by position in 6.1
  (``reserved_1`` ... ``reserved_6``) and by offset in 6.12
  (``reserved_0xa0`` ... ``reserved_0x298``), see :data:`LINUX_6_1_NAMES`;
* ``vmcb_save_area.spec_ctrl`` is a u32 in 6.1 (``sizeof`` 740) and a u64
  in 6.12 (744), see :data:`LINUX_6_1_SIZES`; 6.1 copies 740 bytes into a
  zeroed page, so reading a 6.1 blob here gives the same value;
* 6.12 makes ``vmcb.save`` a union with ``host_sev_es_save`` (the SEV-ES
  host save area, ``struct sev_es_save_area``); it is not mirrored, since
  nested SVM never uses it (that structure also renames ``vmpl0_ssp`` ...
  ``vmpl3_ssp`` to ``pl0_ssp`` ... ``pl3_ssp`` and carves ``tsc_aux`` out of
  its reserved bytes in 6.12);
* ``vmcb_control_area`` is identical. Kernels after 6.12 carve
  ``bus_lock_counter`` (0x120) and more out of ``reserved_8``; they are not
  mirrored (no reference kernel has them), so they read as reserved bytes;
* int_ctl's vNMI bits (``V_NMI_PENDING_MASK``, ``V_NMI_BLOCKING_MASK``,
  ``V_NMI_ENABLE_MASK``) are in 6.12, not in 6.1.

Flags and enums (:class:`Efer`, :class:`Cr0`, :class:`IntCtl` ...) decode
fields in a ``repr``; reserved fields are hidden there but kept in
``to_dict``. Constants carry the kernel's names (``INTERCEPT_VMRUN``,
``SVM_EXIT_VMRUN``, ``EFER_SVME``, ``X86_CR0_PG``, ``V_GIF_MASK`` ...).
"""

from __future__ import annotations

import ctypes
import enum
from typing import NamedTuple

from kvmstate import x86 as _x86
from kvmstate._struct import Struct, Union
from kvmstate.uapi import KVM_STATE_NESTED_SVM_VMCB_SIZE

# Architectural bits, defined once in x86 and still importable from here (see __all__).
from kvmstate.x86 import (  # noqa: F401
    EFER_AUTOIBRS,
    EFER_FFXSR,
    EFER_LMA,
    EFER_LME,
    EFER_LMSLE,
    EFER_NX,
    EFER_SCE,
    EFER_SVME,
    X86_CR0_AM,
    X86_CR0_CD,
    X86_CR0_EM,
    X86_CR0_ET,
    X86_CR0_MP,
    X86_CR0_NE,
    X86_CR0_NW,
    X86_CR0_PE,
    X86_CR0_PG,
    X86_CR0_TS,
    X86_CR0_WP,
    X86_CR4_PAE,
    X86_EFLAGS_FIXED,
    X86_EFLAGS_IOPL,
    X86_EFLAGS_VM,
    Cr0,
    Cr4,
    Efer,
    Rflags,
)

__all__ = [
    "AVIC_ENABLE_MASK",
    "INTERCEPT_CLGI",
    "INTERCEPT_CR",
    "INTERCEPT_DR",
    "INTERCEPT_EXCEPTION",
    "INTERCEPT_EXCEPTION_OFFSET",
    "INTERCEPT_INTR",
    "INTERCEPT_IOIO_PROT",
    "INTERCEPT_MSR_PROT",
    "INTERCEPT_NMI",
    "INTERCEPT_SHUTDOWN",
    "INTERCEPT_SMI",
    "INTERCEPT_STGI",
    "INTERCEPT_VINTR",
    "INTERCEPT_VMLOAD",
    "INTERCEPT_VMMCALL",
    "INTERCEPT_VMRUN",
    "INTERCEPT_VMSAVE",
    "INTERCEPT_WORD3",
    "INTERCEPT_WORD4",
    "INTERCEPT_WORD5",
    "IOPM_SIZE",
    "LBR_CTL_ENABLE_MASK",
    "LINUX_6_1_NAMES",
    "LINUX_6_1_SIZES",
    "MAX_INTERCEPT",
    "MSRPM_SIZE",
    "SVM_EVTINJ_TYPE_EXEPT",
    "SVM_EVTINJ_TYPE_INTR",
    "SVM_EVTINJ_TYPE_MASK",
    "SVM_EVTINJ_TYPE_NMI",
    "SVM_EVTINJ_TYPE_SHIFT",
    "SVM_EVTINJ_TYPE_SOFT",
    "SVM_EVTINJ_VALID",
    "SVM_EVTINJ_VALID_ERR",
    "SVM_EVTINJ_VEC_MASK",
    "SVM_EXIT_CLGI",
    "SVM_EXIT_CPUID",
    "SVM_EXIT_ERR",
    "SVM_EXIT_EXCP_BASE",
    "SVM_EXIT_HLT",
    "SVM_EXIT_INIT",
    "SVM_EXIT_INTR",
    "SVM_EXIT_IOIO",
    "SVM_EXIT_MSR",
    "SVM_EXIT_NMI",
    "SVM_EXIT_NPF",
    "SVM_EXIT_SHUTDOWN",
    "SVM_EXIT_SMI",
    "SVM_EXIT_STGI",
    "SVM_EXIT_VINTR",
    "SVM_EXIT_VMLOAD",
    "SVM_EXIT_VMMCALL",
    "SVM_EXIT_VMRUN",
    "SVM_EXIT_VMSAVE",
    "SVM_GUEST_INTERRUPT_MASK",
    "SVM_INTERRUPT_SHADOW_MASK",
    "SVM_NESTED_CTL_NP_ENABLE",
    "SVM_NESTED_CTL_SEV_ENABLE",
    "SVM_NESTED_CTL_SEV_ES_ENABLE",
    "SVM_SELECTOR_AVL_MASK",
    "SVM_SELECTOR_CODE_MASK",
    "SVM_SELECTOR_DB_MASK",
    "SVM_SELECTOR_DPL_MASK",
    "SVM_SELECTOR_G_MASK",
    "SVM_SELECTOR_L_MASK",
    "SVM_SELECTOR_P_MASK",
    "SVM_SELECTOR_READ_MASK",
    "SVM_SELECTOR_S_MASK",
    "SVM_SELECTOR_TYPE_MASK",
    "SVM_SELECTOR_WRITE_MASK",
    "TLB_CONTROL_DO_NOTHING",
    "TLB_CONTROL_FLUSH_ALL_ASID",
    "TLB_CONTROL_FLUSH_ASID",
    "TLB_CONTROL_FLUSH_ASID_LOCAL",
    "VIRTUAL_VMLOAD_VMSAVE_ENABLE_MASK",
    "V_GIF_ENABLE_MASK",
    "V_GIF_MASK",
    "V_IGN_TPR_MASK",
    "V_INTR_MASKING_MASK",
    "V_INTR_PRIO_MASK",
    "V_INTR_PRIO_SHIFT",
    "V_IRQ_INJECTION_BITS_MASK",
    "V_IRQ_MASK",
    "V_NMI_BLOCKING_MASK",
    "V_NMI_ENABLE_MASK",
    "V_NMI_PENDING_MASK",
    "V_TPR_MASK",
    "X2APIC_MODE_MASK",
    "Event",
    "EventInjFlag",
    "EventType",
    "IntCtl",
    "IntState",
    "Intercept",
    "InterceptWord",
    "NestedCtl",
    "SegAttrib",
    "SvmExit",
    "TlbControl",
    "VirtExt",
    "decode_event",
    "hv_enlightenments_control",
    "hv_vmcb_enlightenments",
    "vmcb",
    "vmcb_control_area",
    "vmcb_control_area_sw",
    "vmcb_save_area",
    "vmcb_seg",
]
# The architectural names it re-exports from x86 (CR0, CR4, EFER, RFLAGS; not the MSRs).
__all__ += [n for n in _x86.__all__ if n[:4] != "MSR_" and n != "VMX_CAPABILITY_MSRS"]

_u8 = ctypes.c_uint8
_u16 = ctypes.c_uint16
_u32 = ctypes.c_uint32
_u64 = ctypes.c_uint64

# --- constants (kernel names) --------------------------------------------------

# enum intercept_words: index of each 32-bit word of vmcb_control_area.intercepts.
INTERCEPT_CR = 0
INTERCEPT_DR = 1
INTERCEPT_EXCEPTION = 2
INTERCEPT_WORD3 = 3
INTERCEPT_WORD4 = 4
INTERCEPT_WORD5 = 5
MAX_INTERCEPT = 6

# Intercept bit numbers (bit n is word n // 32, bit n % 32), those the nested code tests.
INTERCEPT_EXCEPTION_OFFSET = 64  # + exception vector
INTERCEPT_INTR = 96
INTERCEPT_NMI = 97
INTERCEPT_SMI = 98
INTERCEPT_VINTR = 100
INTERCEPT_IOIO_PROT = 123
INTERCEPT_MSR_PROT = 124
INTERCEPT_SHUTDOWN = 127
INTERCEPT_VMRUN = 128
INTERCEPT_VMMCALL = 129
INTERCEPT_VMLOAD = 130
INTERCEPT_VMSAVE = 131
INTERCEPT_STGI = 132
INTERCEPT_CLGI = 133

# Exit codes (uapi/asm/svm.h); exit_code is a u32, so SVM_EXIT_ERR reads 0xffffffff.
SVM_EXIT_EXCP_BASE = 0x040
SVM_EXIT_INTR = 0x060
SVM_EXIT_NMI = 0x061
SVM_EXIT_SMI = 0x062
SVM_EXIT_INIT = 0x063
SVM_EXIT_VINTR = 0x064
SVM_EXIT_CPUID = 0x072
SVM_EXIT_HLT = 0x078
SVM_EXIT_IOIO = 0x07B
SVM_EXIT_MSR = 0x07C
SVM_EXIT_SHUTDOWN = 0x07F
SVM_EXIT_VMRUN = 0x080
SVM_EXIT_VMMCALL = 0x081
SVM_EXIT_VMLOAD = 0x082
SVM_EXIT_VMSAVE = 0x083
SVM_EXIT_STGI = 0x084
SVM_EXIT_CLGI = 0x085
SVM_EXIT_NPF = 0x400
SVM_EXIT_ERR = -1

TLB_CONTROL_DO_NOTHING = 0
TLB_CONTROL_FLUSH_ALL_ASID = 1
TLB_CONTROL_FLUSH_ASID = 3
TLB_CONTROL_FLUSH_ASID_LOCAL = 7

# int_ctl.
V_TPR_MASK = 0x0F
V_IRQ_MASK = 1 << 8
V_GIF_MASK = 1 << 9
V_NMI_PENDING_MASK = 1 << 11
V_NMI_BLOCKING_MASK = 1 << 12
V_INTR_PRIO_SHIFT = 16
V_INTR_PRIO_MASK = 0x0F << V_INTR_PRIO_SHIFT
V_IGN_TPR_MASK = 1 << 20
V_IRQ_INJECTION_BITS_MASK = V_IRQ_MASK | V_INTR_PRIO_MASK | V_IGN_TPR_MASK
V_INTR_MASKING_MASK = 1 << 24
V_GIF_ENABLE_MASK = 1 << 25
V_NMI_ENABLE_MASK = 1 << 26
X2APIC_MODE_MASK = 1 << 30
AVIC_ENABLE_MASK = 1 << 31

# virt_ext.
LBR_CTL_ENABLE_MASK = 1 << 0
VIRTUAL_VMLOAD_VMSAVE_ENABLE_MASK = 1 << 1

# int_state.
SVM_INTERRUPT_SHADOW_MASK = 1 << 0
SVM_GUEST_INTERRUPT_MASK = 1 << 1

# nested_ctl.
SVM_NESTED_CTL_NP_ENABLE = 1 << 0
SVM_NESTED_CTL_SEV_ENABLE = 1 << 1
SVM_NESTED_CTL_SEV_ES_ENABLE = 1 << 2

# event_inj and exit_int_info share this format.
SVM_EVTINJ_VEC_MASK = 0xFF
SVM_EVTINJ_TYPE_SHIFT = 8
SVM_EVTINJ_TYPE_MASK = 7 << SVM_EVTINJ_TYPE_SHIFT
SVM_EVTINJ_TYPE_INTR = 0 << SVM_EVTINJ_TYPE_SHIFT
SVM_EVTINJ_TYPE_NMI = 2 << SVM_EVTINJ_TYPE_SHIFT
SVM_EVTINJ_TYPE_EXEPT = 3 << SVM_EVTINJ_TYPE_SHIFT
SVM_EVTINJ_TYPE_SOFT = 4 << SVM_EVTINJ_TYPE_SHIFT
SVM_EVTINJ_VALID = 1 << 31
SVM_EVTINJ_VALID_ERR = 1 << 11

# vmcb_seg.attrib: the descriptor's attribute bits packed into 12 bits.
SVM_SELECTOR_TYPE_MASK = 0xF
SVM_SELECTOR_S_MASK = 1 << 4
SVM_SELECTOR_DPL_MASK = 3 << 5
SVM_SELECTOR_P_MASK = 1 << 7
SVM_SELECTOR_AVL_MASK = 1 << 8
SVM_SELECTOR_L_MASK = 1 << 9
SVM_SELECTOR_DB_MASK = 1 << 10
SVM_SELECTOR_G_MASK = 1 << 11
SVM_SELECTOR_WRITE_MASK = 1 << 1
SVM_SELECTOR_READ_MASK = SVM_SELECTOR_WRITE_MASK
SVM_SELECTOR_CODE_MASK = 1 << 3

# Bitmap sizes nested_svm_check_bitmap_pa checks msrpm_base_pa/iopm_base_pa against.
MSRPM_SIZE = 2 * 4096
IOPM_SIZE = 3 * 4096

#: Fields named differently in Linux 6.1: (struct, name here = 6.12 name) -> 6.1 name.
LINUX_6_1_NAMES: dict[tuple[str, str], str] = {
    ("vmcb_save_area", "reserved_0xa0"): "reserved_1",
    ("vmcb_save_area", "reserved_0xcc"): "reserved_2",
    ("vmcb_save_area", "reserved_0xd8"): "reserved_3",
    ("vmcb_save_area", "reserved_0x180"): "reserved_4",
    ("vmcb_save_area", "reserved_0x248"): "reserved_5",
    ("vmcb_save_area", "reserved_0x298"): "reserved_6",
}
#: Fields of another size in Linux 6.1 (same offset): (struct, name) -> 6.1 size in bytes.
LINUX_6_1_SIZES: dict[tuple[str, str], int] = {
    ("vmcb_save_area", "spec_ctrl"): 4,
}


# --- enum views, for reading values in a REPL -----------------------------------


class InterceptWord(enum.IntEnum):
    """Indices of ``vmcb_control_area.intercepts`` (``enum intercept_words``)."""

    CR = INTERCEPT_CR
    DR = INTERCEPT_DR
    EXCEPTION = INTERCEPT_EXCEPTION
    WORD3 = INTERCEPT_WORD3
    WORD4 = INTERCEPT_WORD4
    WORD5 = INTERCEPT_WORD5


class Intercept(enum.IntEnum):
    """Intercept bit numbers across the words: kernel ``INTERCEPT_<name>`` (``TRAP_*`` as is)."""

    CR0_READ = 0
    CR3_READ = 3
    CR4_READ = 4
    CR8_READ = 8
    CR0_WRITE = 16
    CR3_WRITE = 19
    CR4_WRITE = 20
    CR8_WRITE = 24
    DR0_READ = 32
    DR1_READ = 33
    DR2_READ = 34
    DR3_READ = 35
    DR4_READ = 36
    DR5_READ = 37
    DR6_READ = 38
    DR7_READ = 39
    DR0_WRITE = 48
    DR1_WRITE = 49
    DR2_WRITE = 50
    DR3_WRITE = 51
    DR4_WRITE = 52
    DR5_WRITE = 53
    DR6_WRITE = 54
    DR7_WRITE = 55
    EXCEPTION_OFFSET = INTERCEPT_EXCEPTION_OFFSET
    INTR = INTERCEPT_INTR
    NMI = INTERCEPT_NMI
    SMI = INTERCEPT_SMI
    INIT = 99
    VINTR = INTERCEPT_VINTR
    SELECTIVE_CR0 = 101
    STORE_IDTR = 102
    STORE_GDTR = 103
    STORE_LDTR = 104
    STORE_TR = 105
    LOAD_IDTR = 106
    LOAD_GDTR = 107
    LOAD_LDTR = 108
    LOAD_TR = 109
    RDTSC = 110
    RDPMC = 111
    PUSHF = 112
    POPF = 113
    CPUID = 114
    RSM = 115
    IRET = 116
    INTn = 117
    INVD = 118
    PAUSE = 119
    HLT = 120
    INVLPG = 121
    INVLPGA = 122
    IOIO_PROT = INTERCEPT_IOIO_PROT
    MSR_PROT = INTERCEPT_MSR_PROT
    TASK_SWITCH = 125
    FERR_FREEZE = 126
    SHUTDOWN = INTERCEPT_SHUTDOWN
    VMRUN = INTERCEPT_VMRUN
    VMMCALL = INTERCEPT_VMMCALL
    VMLOAD = INTERCEPT_VMLOAD
    VMSAVE = INTERCEPT_VMSAVE
    STGI = INTERCEPT_STGI
    CLGI = INTERCEPT_CLGI
    SKINIT = 134
    RDTSCP = 135
    ICEBP = 136
    WBINVD = 137
    MONITOR = 138
    MWAIT = 139
    MWAIT_COND = 140
    XSETBV = 141
    RDPRU = 142
    TRAP_EFER_WRITE = 143
    TRAP_CR0_WRITE = 144
    TRAP_CR1_WRITE = 145
    TRAP_CR2_WRITE = 146
    TRAP_CR3_WRITE = 147
    TRAP_CR4_WRITE = 148
    TRAP_CR5_WRITE = 149
    TRAP_CR6_WRITE = 150
    TRAP_CR7_WRITE = 151
    TRAP_CR8_WRITE = 152
    INVLPGB = 160
    INVLPGB_ILLEGAL = 161
    INVPCID = 162
    MCOMMIT = 163
    TLBSYNC = 164


class SvmExit(enum.IntEnum):
    """``exit_code`` values named here (``SVM_EXIT_*``); others show in hex."""

    INTR = SVM_EXIT_INTR
    NMI = SVM_EXIT_NMI
    SMI = SVM_EXIT_SMI
    INIT = SVM_EXIT_INIT
    VINTR = SVM_EXIT_VINTR
    CPUID = SVM_EXIT_CPUID
    HLT = SVM_EXIT_HLT
    IOIO = SVM_EXIT_IOIO
    MSR = SVM_EXIT_MSR
    SHUTDOWN = SVM_EXIT_SHUTDOWN
    VMRUN = SVM_EXIT_VMRUN
    VMMCALL = SVM_EXIT_VMMCALL
    VMLOAD = SVM_EXIT_VMLOAD
    VMSAVE = SVM_EXIT_VMSAVE
    STGI = SVM_EXIT_STGI
    CLGI = SVM_EXIT_CLGI
    NPF = SVM_EXIT_NPF
    ERR = SVM_EXIT_ERR & 0xFFFFFFFF  # as the u32 field holds it


class TlbControl(enum.IntEnum):
    """``tlb_ctl`` (``TLB_CONTROL_*``)."""

    DO_NOTHING = TLB_CONTROL_DO_NOTHING
    FLUSH_ALL_ASID = TLB_CONTROL_FLUSH_ALL_ASID
    FLUSH_ASID = TLB_CONTROL_FLUSH_ASID
    FLUSH_ASID_LOCAL = TLB_CONTROL_FLUSH_ASID_LOCAL


class IntCtl(enum.IntFlag):
    """``int_ctl`` one-bit flags (``<name>_MASK``); V_TPR and V_INTR_PRIO show as hex rest."""

    V_IRQ = V_IRQ_MASK
    V_GIF = V_GIF_MASK
    V_NMI_PENDING = V_NMI_PENDING_MASK
    V_NMI_BLOCKING = V_NMI_BLOCKING_MASK
    V_IGN_TPR = V_IGN_TPR_MASK
    V_INTR_MASKING = V_INTR_MASKING_MASK
    V_GIF_ENABLE = V_GIF_ENABLE_MASK
    V_NMI_ENABLE = V_NMI_ENABLE_MASK
    X2APIC_MODE = X2APIC_MODE_MASK
    AVIC_ENABLE = AVIC_ENABLE_MASK


class IntState(enum.IntFlag):
    """``int_state`` (``SVM_*_MASK``)."""

    INTERRUPT_SHADOW = SVM_INTERRUPT_SHADOW_MASK
    GUEST_INTERRUPT = SVM_GUEST_INTERRUPT_MASK


class NestedCtl(enum.IntFlag):
    """``nested_ctl`` (``SVM_NESTED_CTL_*``)."""

    NP_ENABLE = SVM_NESTED_CTL_NP_ENABLE
    SEV_ENABLE = SVM_NESTED_CTL_SEV_ENABLE
    SEV_ES_ENABLE = SVM_NESTED_CTL_SEV_ES_ENABLE


class VirtExt(enum.IntFlag):
    """``virt_ext`` (``<name>_MASK``)."""

    LBR_CTL_ENABLE = LBR_CTL_ENABLE_MASK
    VIRTUAL_VMLOAD_VMSAVE_ENABLE = VIRTUAL_VMLOAD_VMSAVE_ENABLE_MASK


class EventInjFlag(enum.IntFlag):
    """``event_inj``/``exit_int_info`` flag bits; vector and type show as hex rest."""

    VALID_ERR = SVM_EVTINJ_VALID_ERR
    VALID = SVM_EVTINJ_VALID


class EventType(enum.IntEnum):
    """The type field of ``event_inj``/``exit_int_info`` (``SVM_EVTINJ_TYPE_*`` >> 8)."""

    INTR = SVM_EVTINJ_TYPE_INTR >> SVM_EVTINJ_TYPE_SHIFT
    NMI = SVM_EVTINJ_TYPE_NMI >> SVM_EVTINJ_TYPE_SHIFT
    EXEPT = SVM_EVTINJ_TYPE_EXEPT >> SVM_EVTINJ_TYPE_SHIFT
    SOFT = SVM_EVTINJ_TYPE_SOFT >> SVM_EVTINJ_TYPE_SHIFT


class Event(NamedTuple):
    """An ``event_inj``/``exit_int_info`` word split into its fields."""

    vector: int
    type: EventType | int
    error_code_valid: bool
    valid: bool


def decode_event(value: int) -> Event:
    """Split an ``event_inj``/``exit_int_info`` value (vector, type, EV, V)."""
    kind = (value & SVM_EVTINJ_TYPE_MASK) >> SVM_EVTINJ_TYPE_SHIFT
    known = {int(t) for t in EventType}
    return Event(
        vector=value & SVM_EVTINJ_VEC_MASK,
        type=EventType(kind) if kind in known else kind,
        error_code_valid=bool(value & SVM_EVTINJ_VALID_ERR),
        valid=bool(value & SVM_EVTINJ_VALID),
    )


class SegAttrib(enum.IntFlag):
    """``vmcb_seg.attrib`` one-bit flags (``SVM_SELECTOR_*_MASK``); type and DPL show as hex."""

    S = SVM_SELECTOR_S_MASK
    P = SVM_SELECTOR_P_MASK
    AVL = SVM_SELECTOR_AVL_MASK
    L = SVM_SELECTOR_L_MASK
    DB = SVM_SELECTOR_DB_MASK
    G = SVM_SELECTOR_G_MASK


# --- control area -----------------------------------------------------------------
# The kernel declares these __packed; every field is naturally aligned and every
# size a multiple of 8, so the native ctypes layout is the same (checked by the
# tests) and _pack_ (deprecated without _layout_ on Python 3.14) is not needed.


class hv_enlightenments_control(Struct):
    """Hyper-V enlightenment switches (``hv_vmcb_enlightenments.hv_enlightenments_control``)."""

    _fields_ = [
        ("nested_flush_hypercall", _u32, 1),
        ("msr_bitmap", _u32, 1),
        ("enlightened_npt_tlb", _u32, 1),
        ("reserved", _u32, 29),
    ]
    _hidden_ = frozenset({"reserved"})


class hv_vmcb_enlightenments(Struct):
    """Hyper-V's use of the control area's 32 software bytes (``asm/hyperv-tlfs.h``)."""

    _fields_ = [
        ("hv_enlightenments_control", hv_enlightenments_control),
        ("hv_vp_id", _u32),
        ("hv_vm_id", _u64),
        ("partition_assist_page", _u64),
        ("reserved", _u64),
    ]
    _hidden_ = frozenset({"reserved"})


class vmcb_control_area_sw(Union):
    """The anonymous union at control area 0x3e0: 32 bytes for hypervisor software."""

    _fields_ = [
        ("hv_enlightenments", hv_vmcb_enlightenments),
        ("reserved_sw", _u8 * 32),
    ]
    _hidden_ = frozenset({"reserved_sw"})


class vmcb_control_area(Struct):
    """The VMCB control area (``struct vmcb_control_area``, 1024 bytes)."""

    _anonymous_ = ("sw",)
    _fields_ = [
        ("intercepts", _u32 * MAX_INTERCEPT),  # 0x000
        ("reserved_1", _u32 * (15 - MAX_INTERCEPT)),
        ("pause_filter_thresh", _u16),  # 0x03c
        ("pause_filter_count", _u16),
        ("iopm_base_pa", _u64),  # 0x040
        ("msrpm_base_pa", _u64),
        ("tsc_offset", _u64),
        ("asid", _u32),  # 0x058
        ("tlb_ctl", _u8),
        ("reserved_2", _u8 * 3),
        ("int_ctl", _u32),  # 0x060
        ("int_vector", _u32),
        ("int_state", _u32),
        ("reserved_3", _u8 * 4),
        ("exit_code", _u32),  # 0x070
        ("exit_code_hi", _u32),
        ("exit_info_1", _u64),
        ("exit_info_2", _u64),
        ("exit_int_info", _u32),  # 0x088
        ("exit_int_info_err", _u32),
        ("nested_ctl", _u64),  # 0x090
        ("avic_vapic_bar", _u64),
        ("ghcb_gpa", _u64),
        ("event_inj", _u32),  # 0x0a8
        ("event_inj_err", _u32),
        ("nested_cr3", _u64),  # 0x0b0
        ("virt_ext", _u64),
        ("clean", _u32),  # 0x0c0
        ("reserved_5", _u32),  # the kernel has no reserved_4 here
        ("next_rip", _u64),  # 0x0c8
        ("insn_len", _u8),
        ("insn_bytes", _u8 * 15),
        ("avic_backing_page", _u64),  # 0x0e0
        ("reserved_6", _u8 * 8),
        ("avic_logical_id", _u64),  # 0x0f0
        ("avic_physical_id", _u64),
        ("reserved_7", _u8 * 8),
        ("vmsa_pa", _u64),  # 0x108
        ("reserved_8", _u8 * 720),  # 0x110; newer kernels carve bus_lock_counter out of it
        ("sw", vmcb_control_area_sw),  # 0x3e0
    ]
    _flags_ = {
        "tlb_ctl": TlbControl,
        "int_ctl": IntCtl,
        "int_state": IntState,
        "exit_code": SvmExit,
        "exit_int_info": EventInjFlag,
        "nested_ctl": NestedCtl,
        "event_inj": EventInjFlag,
        "virt_ext": VirtExt,
    }
    _decimal_ = frozenset({"pause_filter_thresh", "pause_filter_count", "asid", "insn_len"})
    _hidden_ = frozenset(
        {
            "reserved_1",
            "reserved_2",
            "reserved_3",
            "reserved_5",
            "reserved_6",
            "reserved_7",
            "reserved_8",
        }
    )

    def is_intercept(self, bit: int) -> bool:
        """Whether intercept ``bit`` (an :class:`Intercept`) is set, like ``vmcb_is_intercept``."""
        word, shift = _intercept_position(bit)
        return bool(self.intercepts[word] >> shift & 1)

    def set_intercept(self, bit: int) -> None:
        """Set intercept ``bit``, like the kernel's ``vmcb_set_intercept``."""
        word, shift = _intercept_position(bit)
        self.intercepts[word] |= 1 << shift

    def clr_intercept(self, bit: int) -> None:
        """Clear intercept ``bit``, like the kernel's ``vmcb_clr_intercept``."""
        word, shift = _intercept_position(bit)
        self.intercepts[word] &= ~(1 << shift) & 0xFFFFFFFF

    def intercept_names(self) -> list[str]:
        """The set intercepts by :class:`Intercept` name (``EXCEPTION_OFFSET+n``, ``bitN``)."""
        names = []
        for bit in range(32 * MAX_INTERCEPT):
            if not self.is_intercept(bit):
                continue
            if bit in _INTERCEPT_BITS:
                names.append(Intercept(bit).name)
            elif bit // 32 == INTERCEPT_EXCEPTION:
                names.append(f"EXCEPTION_OFFSET+{bit - INTERCEPT_EXCEPTION_OFFSET}")
            else:
                names.append(f"bit{bit}")
        return names


_INTERCEPT_BITS = frozenset(int(i) for i in Intercept)


def _intercept_position(bit: int) -> tuple[int, int]:
    if not 0 <= bit < 32 * MAX_INTERCEPT:
        raise ValueError(f"intercept bit {bit} is outside 0..{32 * MAX_INTERCEPT - 1}")
    return bit // 32, bit % 32


# --- save area ---------------------------------------------------------------------


class vmcb_seg(Struct):
    """A segment or descriptor-table register in the save area (``struct vmcb_seg``)."""

    _fields_ = [
        ("selector", _u16),
        ("attrib", _u16),
        ("limit", _u32),
        ("base", _u64),
    ]
    _flags_ = {"attrib": SegAttrib}


class vmcb_save_area(Struct):
    """The VMCB state save area (``struct vmcb_save_area``, at 0x400 in the VMCB)."""

    _fields_ = [
        ("es", vmcb_seg),  # 0x000
        ("cs", vmcb_seg),
        ("ss", vmcb_seg),
        ("ds", vmcb_seg),
        ("fs", vmcb_seg),
        ("gs", vmcb_seg),
        ("gdtr", vmcb_seg),
        ("ldtr", vmcb_seg),
        ("idtr", vmcb_seg),
        ("tr", vmcb_seg),
        ("reserved_0xa0", _u8 * 42),
        ("vmpl", _u8),  # 0x0ca
        ("cpl", _u8),
        ("reserved_0xcc", _u8 * 4),
        ("efer", _u64),  # 0x0d0
        ("reserved_0xd8", _u8 * 112),
        ("cr4", _u64),  # 0x148
        ("cr3", _u64),
        ("cr0", _u64),
        ("dr7", _u64),
        ("dr6", _u64),
        ("rflags", _u64),
        ("rip", _u64),  # 0x178
        ("reserved_0x180", _u8 * 88),
        ("rsp", _u64),  # 0x1d8
        ("s_cet", _u64),
        ("ssp", _u64),
        ("isst_addr", _u64),
        ("rax", _u64),  # 0x1f8
        ("star", _u64),
        ("lstar", _u64),
        ("cstar", _u64),
        ("sfmask", _u64),
        ("kernel_gs_base", _u64),
        ("sysenter_cs", _u64),
        ("sysenter_esp", _u64),
        ("sysenter_eip", _u64),
        ("cr2", _u64),  # 0x240
        ("reserved_0x248", _u8 * 32),
        ("g_pat", _u64),  # 0x268
        ("dbgctl", _u64),
        ("br_from", _u64),
        ("br_to", _u64),
        ("last_excp_from", _u64),
        ("last_excp_to", _u64),
        ("reserved_0x298", _u8 * 72),
        ("spec_ctrl", _u64),  # 0x2e0; a u32 in 6.1
    ]
    _flags_ = {"efer": Efer, "cr0": Cr0, "cr4": Cr4, "rflags": Rflags}
    _hidden_ = frozenset(
        {
            "reserved_0xa0",
            "reserved_0xcc",
            "reserved_0xd8",
            "reserved_0x180",
            "reserved_0x248",
            "reserved_0x298",
        }
    )


# --- the whole page ------------------------------------------------------------------

_USED = ctypes.sizeof(vmcb_control_area) + ctypes.sizeof(vmcb_save_area)


class vmcb(Struct):
    """A whole VMCB page: ``control``, ``save`` at 0x400, zero padding to 4096 bytes.

    C's ``struct vmcb`` stops after the save area (6.12 overlays the SEV-ES
    host save area on it); the padding makes this the size of the nested
    state's data page.
    """

    _fields_ = [
        ("control", vmcb_control_area),
        ("save", vmcb_save_area),
        (f"reserved_{_USED:#x}", _u8 * (KVM_STATE_NESTED_SVM_VMCB_SIZE - _USED)),
    ]
    _hidden_ = frozenset({f"reserved_{_USED:#x}"})


# Import-time guard: a wrong field width would silently shift every later field.
assert ctypes.sizeof(vmcb_control_area) == 0x400
assert vmcb.save.offset == 0x400
assert ctypes.sizeof(vmcb) == KVM_STATE_NESTED_SVM_VMCB_SIZE
