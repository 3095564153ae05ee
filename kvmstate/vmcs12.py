"""KVM's ``struct vmcs12``: the VMCS that L1 sees, as saved by ``KVM_GET_NESTED_STATE``.

On Intel, the data area of a nested state holds the cached vmcs12 and,
with VMCS shadowing, the shadow vmcs12: one 4096-byte page each
(:data:`VMCS12_SIZE`). Their layout is KVM's own, not Intel's, and is
frozen for migration: ``vmx_check_vmcs12_offsets()`` in
``arch/x86/kvm/vmx/vmcs12.h`` pins every field, new fields only go into
the ``padding*`` arrays or after the last field, and
:data:`VMCS12_REVISION` never changes. :class:`vmcs12` mirrors that
structure byte for byte and is padded to the whole page, so
``vmcs12.from_buffer(page)`` gives a writable, typed view of a
:class:`~kvmstate.nested.NestedState` page::

    >>> v = vmcs12.from_buffer(state.vmcs12)      # no copy
    >>> v.guest_rip, v.secondary_vm_exec_control
    >>> v                                          # controls decoded, padding hidden

Field names, types and offsets are the kernel's (``natural_width`` is a
u64). ``tests/test_vmcs12_layout.py`` checks every ``CHECK_OFFSET`` of
each installed ``linux-source`` package, and every field's size as gcc
and gdb see the C structure.

Kernel versions:

* 6.1 and 6.12 have the same ``struct vmcs12`` (998 bytes, 145 pinned
  offsets); only comments and the ``CHECK_OFFSET`` macro changed.
* 6.18 carved six CET fields out of ``paddingl`` (8 -> 2 entries):
  ``host_s_cet`` (680), ``host_ssp``, ``host_ssp_tbl``, ``guest_s_cet``,
  ``guest_ssp`` and ``guest_ssp_tbl`` (720), from "KVM: nVMX: Prepare for
  enabling CET support for nested guest" in the ``kvm-x86-cet-6.18``
  merge (mainline 12abeb81c873). Older kernels keep zeroes there and
  ignore them. They are listed in :data:`NEWER_FIELDS`, and the VMX
  controls that load them (same series, d6c387fc396b) in
  :data:`NEWER_CONSTANTS`.

Since 6.1 the header no longer defines ``VMCS12_MAX_FIELD_INDEX``; it
is not mirrored.
"""

from __future__ import annotations

import ctypes
import enum
from typing import Any

from kvmstate import uapi
from kvmstate._struct import Struct

__all__ = [
    "CPU_BASED_ACTIVATE_SECONDARY_CONTROLS",
    "CPU_BASED_ACTIVATE_TERTIARY_CONTROLS",
    "CPU_BASED_ALWAYSON_WITHOUT_TRUE_MSR",
    "CPU_BASED_CR3_LOAD_EXITING",
    "CPU_BASED_CR3_STORE_EXITING",
    "CPU_BASED_CR8_LOAD_EXITING",
    "CPU_BASED_CR8_STORE_EXITING",
    "CPU_BASED_HLT_EXITING",
    "CPU_BASED_INTR_WINDOW_EXITING",
    "CPU_BASED_INVLPG_EXITING",
    "CPU_BASED_MONITOR_EXITING",
    "CPU_BASED_MONITOR_TRAP_FLAG",
    "CPU_BASED_MOV_DR_EXITING",
    "CPU_BASED_MWAIT_EXITING",
    "CPU_BASED_NMI_WINDOW_EXITING",
    "CPU_BASED_PAUSE_EXITING",
    "CPU_BASED_RDPMC_EXITING",
    "CPU_BASED_RDTSC_EXITING",
    "CPU_BASED_TPR_SHADOW",
    "CPU_BASED_UNCOND_IO_EXITING",
    "CPU_BASED_USE_IO_BITMAPS",
    "CPU_BASED_USE_MSR_BITMAPS",
    "CPU_BASED_USE_TSC_OFFSETTING",
    "GUEST_ACTIVITY_ACTIVE",
    "GUEST_ACTIVITY_HLT",
    "GUEST_ACTIVITY_SHUTDOWN",
    "GUEST_ACTIVITY_WAIT_SIPI",
    "GUEST_INTR_STATE_ENCLAVE_INTR",
    "GUEST_INTR_STATE_MOV_SS",
    "GUEST_INTR_STATE_NMI",
    "GUEST_INTR_STATE_SMI",
    "GUEST_INTR_STATE_STI",
    "NEWER_CONSTANTS",
    "NEWER_FIELDS",
    "PIN_BASED_ALWAYSON_WITHOUT_TRUE_MSR",
    "PIN_BASED_EXT_INTR_MASK",
    "PIN_BASED_NMI_EXITING",
    "PIN_BASED_POSTED_INTR",
    "PIN_BASED_VIRTUAL_NMIS",
    "PIN_BASED_VMX_PREEMPTION_TIMER",
    "SECONDARY_EXEC_APIC_REGISTER_VIRT",
    "SECONDARY_EXEC_BUS_LOCK_DETECTION",
    "SECONDARY_EXEC_DESC",
    "SECONDARY_EXEC_ENABLE_EPT",
    "SECONDARY_EXEC_ENABLE_INVPCID",
    "SECONDARY_EXEC_ENABLE_PML",
    "SECONDARY_EXEC_ENABLE_RDTSCP",
    "SECONDARY_EXEC_ENABLE_USR_WAIT_PAUSE",
    "SECONDARY_EXEC_ENABLE_VMFUNC",
    "SECONDARY_EXEC_ENABLE_VPID",
    "SECONDARY_EXEC_ENABLE_XSAVES",
    "SECONDARY_EXEC_ENCLS_EXITING",
    "SECONDARY_EXEC_EPT_VIOLATION_VE",
    "SECONDARY_EXEC_MODE_BASED_EPT_EXEC",
    "SECONDARY_EXEC_NOTIFY_VM_EXITING",
    "SECONDARY_EXEC_PAUSE_LOOP_EXITING",
    "SECONDARY_EXEC_PT_CONCEAL_VMX",
    "SECONDARY_EXEC_PT_USE_GPA",
    "SECONDARY_EXEC_RDRAND_EXITING",
    "SECONDARY_EXEC_RDSEED_EXITING",
    "SECONDARY_EXEC_SHADOW_VMCS",
    "SECONDARY_EXEC_TSC_SCALING",
    "SECONDARY_EXEC_UNRESTRICTED_GUEST",
    "SECONDARY_EXEC_VIRTUALIZE_APIC_ACCESSES",
    "SECONDARY_EXEC_VIRTUALIZE_X2APIC_MODE",
    "SECONDARY_EXEC_VIRTUAL_INTR_DELIVERY",
    "SECONDARY_EXEC_WBINVD_EXITING",
    "VMCS12_C_SIZE",
    "VMCS12_REVISION",
    "VMCS12_SIZE",
    "VM_ENTRY_ALWAYSON_WITHOUT_TRUE_MSR",
    "VM_ENTRY_DEACT_DUAL_MONITOR",
    "VM_ENTRY_IA32E_MODE",
    "VM_ENTRY_LOAD_BNDCFGS",
    "VM_ENTRY_LOAD_CET_STATE",
    "VM_ENTRY_LOAD_DEBUG_CONTROLS",
    "VM_ENTRY_LOAD_IA32_EFER",
    "VM_ENTRY_LOAD_IA32_PAT",
    "VM_ENTRY_LOAD_IA32_PERF_GLOBAL_CTRL",
    "VM_ENTRY_LOAD_IA32_RTIT_CTL",
    "VM_ENTRY_PT_CONCEAL_PIP",
    "VM_ENTRY_SMM",
    "VM_EXIT_ACK_INTR_ON_EXIT",
    "VM_EXIT_ALWAYSON_WITHOUT_TRUE_MSR",
    "VM_EXIT_CLEAR_BNDCFGS",
    "VM_EXIT_CLEAR_IA32_RTIT_CTL",
    "VM_EXIT_HOST_ADDR_SPACE_SIZE",
    "VM_EXIT_LOAD_CET_STATE",
    "VM_EXIT_LOAD_IA32_EFER",
    "VM_EXIT_LOAD_IA32_PAT",
    "VM_EXIT_LOAD_IA32_PERF_GLOBAL_CTRL",
    "VM_EXIT_PT_CONCEAL_PIP",
    "VM_EXIT_SAVE_DEBUG_CONTROLS",
    "VM_EXIT_SAVE_IA32_EFER",
    "VM_EXIT_SAVE_IA32_PAT",
    "VM_EXIT_SAVE_VMX_PREEMPTION_TIMER",
    "CpuBasedControls",
    "GuestActivityState",
    "GuestInterruptibility",
    "LaunchState",
    "PinBasedControls",
    "SecondaryExecControls",
    "VmEntryControls",
    "VmExitControls",
    "vmcs12",
    "vmcs_hdr",
]

# --- constants (kernel names) -------------------------------------------------

#: KVM's layout id for vmcs12, reported to L1 in MSR_IA32_VMX_BASIC and checked by VMPTRLD.
VMCS12_REVISION = 0x11E57ED0
#: Bytes of a vmcs12 page (the kernel defines it as KVM_STATE_NESTED_VMX_VMCS_SIZE).
VMCS12_SIZE = uapi.KVM_STATE_NESTED_VMX_VMCS_SIZE

# Pin-based VM-execution controls.
PIN_BASED_EXT_INTR_MASK = 1 << 0
PIN_BASED_NMI_EXITING = 1 << 3
PIN_BASED_VIRTUAL_NMIS = 1 << 5
PIN_BASED_VMX_PREEMPTION_TIMER = 1 << 6
PIN_BASED_POSTED_INTR = 1 << 7
PIN_BASED_ALWAYSON_WITHOUT_TRUE_MSR = 0x00000016

# Primary processor-based VM-execution controls.
CPU_BASED_INTR_WINDOW_EXITING = 1 << 2
CPU_BASED_USE_TSC_OFFSETTING = 1 << 3
CPU_BASED_HLT_EXITING = 1 << 7
CPU_BASED_INVLPG_EXITING = 1 << 9
CPU_BASED_MWAIT_EXITING = 1 << 10
CPU_BASED_RDPMC_EXITING = 1 << 11
CPU_BASED_RDTSC_EXITING = 1 << 12
CPU_BASED_CR3_LOAD_EXITING = 1 << 15
CPU_BASED_CR3_STORE_EXITING = 1 << 16
CPU_BASED_ACTIVATE_TERTIARY_CONTROLS = 1 << 17
CPU_BASED_CR8_LOAD_EXITING = 1 << 19
CPU_BASED_CR8_STORE_EXITING = 1 << 20
CPU_BASED_TPR_SHADOW = 1 << 21
CPU_BASED_NMI_WINDOW_EXITING = 1 << 22
CPU_BASED_MOV_DR_EXITING = 1 << 23
CPU_BASED_UNCOND_IO_EXITING = 1 << 24
CPU_BASED_USE_IO_BITMAPS = 1 << 25
CPU_BASED_MONITOR_TRAP_FLAG = 1 << 27
CPU_BASED_USE_MSR_BITMAPS = 1 << 28
CPU_BASED_MONITOR_EXITING = 1 << 29
CPU_BASED_PAUSE_EXITING = 1 << 30
CPU_BASED_ACTIVATE_SECONDARY_CONTROLS = 1 << 31
CPU_BASED_ALWAYSON_WITHOUT_TRUE_MSR = 0x0401E172

# Secondary processor-based VM-execution controls.
SECONDARY_EXEC_VIRTUALIZE_APIC_ACCESSES = 1 << 0
SECONDARY_EXEC_ENABLE_EPT = 1 << 1
SECONDARY_EXEC_DESC = 1 << 2
SECONDARY_EXEC_ENABLE_RDTSCP = 1 << 3
SECONDARY_EXEC_VIRTUALIZE_X2APIC_MODE = 1 << 4
SECONDARY_EXEC_ENABLE_VPID = 1 << 5
SECONDARY_EXEC_WBINVD_EXITING = 1 << 6
SECONDARY_EXEC_UNRESTRICTED_GUEST = 1 << 7
SECONDARY_EXEC_APIC_REGISTER_VIRT = 1 << 8
SECONDARY_EXEC_VIRTUAL_INTR_DELIVERY = 1 << 9
SECONDARY_EXEC_PAUSE_LOOP_EXITING = 1 << 10
SECONDARY_EXEC_RDRAND_EXITING = 1 << 11
SECONDARY_EXEC_ENABLE_INVPCID = 1 << 12
SECONDARY_EXEC_ENABLE_VMFUNC = 1 << 13
SECONDARY_EXEC_SHADOW_VMCS = 1 << 14
SECONDARY_EXEC_ENCLS_EXITING = 1 << 15
SECONDARY_EXEC_RDSEED_EXITING = 1 << 16
SECONDARY_EXEC_ENABLE_PML = 1 << 17
SECONDARY_EXEC_EPT_VIOLATION_VE = 1 << 18
SECONDARY_EXEC_PT_CONCEAL_VMX = 1 << 19
SECONDARY_EXEC_ENABLE_XSAVES = 1 << 20
SECONDARY_EXEC_MODE_BASED_EPT_EXEC = 1 << 22
SECONDARY_EXEC_PT_USE_GPA = 1 << 24
SECONDARY_EXEC_TSC_SCALING = 1 << 25
SECONDARY_EXEC_ENABLE_USR_WAIT_PAUSE = 1 << 26
SECONDARY_EXEC_BUS_LOCK_DETECTION = 1 << 30
SECONDARY_EXEC_NOTIFY_VM_EXITING = 1 << 31

# VM-exit controls.
VM_EXIT_SAVE_DEBUG_CONTROLS = 0x00000004
VM_EXIT_HOST_ADDR_SPACE_SIZE = 0x00000200
VM_EXIT_LOAD_IA32_PERF_GLOBAL_CTRL = 0x00001000
VM_EXIT_ACK_INTR_ON_EXIT = 0x00008000
VM_EXIT_SAVE_IA32_PAT = 0x00040000
VM_EXIT_LOAD_IA32_PAT = 0x00080000
VM_EXIT_SAVE_IA32_EFER = 0x00100000
VM_EXIT_LOAD_IA32_EFER = 0x00200000
VM_EXIT_SAVE_VMX_PREEMPTION_TIMER = 0x00400000
VM_EXIT_CLEAR_BNDCFGS = 0x00800000
VM_EXIT_PT_CONCEAL_PIP = 0x01000000
VM_EXIT_CLEAR_IA32_RTIT_CTL = 0x02000000
VM_EXIT_LOAD_CET_STATE = 0x10000000  # 6.18, see NEWER_CONSTANTS
VM_EXIT_ALWAYSON_WITHOUT_TRUE_MSR = 0x00036DFF

# VM-entry controls.
VM_ENTRY_LOAD_DEBUG_CONTROLS = 0x00000004
VM_ENTRY_IA32E_MODE = 0x00000200
VM_ENTRY_SMM = 0x00000400
VM_ENTRY_DEACT_DUAL_MONITOR = 0x00000800
VM_ENTRY_LOAD_IA32_PERF_GLOBAL_CTRL = 0x00002000
VM_ENTRY_LOAD_IA32_PAT = 0x00004000
VM_ENTRY_LOAD_IA32_EFER = 0x00008000
VM_ENTRY_LOAD_BNDCFGS = 0x00010000
VM_ENTRY_PT_CONCEAL_PIP = 0x00020000
VM_ENTRY_LOAD_IA32_RTIT_CTL = 0x00040000
VM_ENTRY_LOAD_CET_STATE = 0x00100000  # 6.18, see NEWER_CONSTANTS
VM_ENTRY_ALWAYSON_WITHOUT_TRUE_MSR = 0x000011FF

# guest_interruptibility_info bits.
GUEST_INTR_STATE_STI = 0x00000001
GUEST_INTR_STATE_MOV_SS = 0x00000002
GUEST_INTR_STATE_SMI = 0x00000004
GUEST_INTR_STATE_NMI = 0x00000008
GUEST_INTR_STATE_ENCLAVE_INTR = 0x00000010

# guest_activity_state values.
GUEST_ACTIVITY_ACTIVE = 0
GUEST_ACTIVITY_HLT = 1
GUEST_ACTIVITY_SHUTDOWN = 2
GUEST_ACTIVITY_WAIT_SIPI = 3

#: Constants newer than linux-source 6.12, with where they come from.
NEWER_CONSTANTS: dict[str, str] = {
    "VM_EXIT_LOAD_CET_STATE": (
        "6.18: KVM: VMX: Introduce CET VMCS fields and control bits (d6c387fc396b)"
    ),
    "VM_ENTRY_LOAD_CET_STATE": "6.18: same commit as VM_EXIT_LOAD_CET_STATE",
}

_CET_FIELDS = (
    "6.18: KVM: nVMX: Prepare for enabling CET support for nested guest (kvm-x86-cet-6.18)"
)
#: vmcs12 fields newer than linux-source 6.12, with where they come from.
#: All were carved out of ``paddingl``, so older kernels hold zeroes there.
NEWER_FIELDS: dict[str, str] = {
    name: _CET_FIELDS
    for name in (
        "host_s_cet",
        "host_ssp",
        "host_ssp_tbl",
        "guest_s_cet",
        "guest_ssp",
        "guest_ssp_tbl",
    )
}


# --- enum views, for reading values in a REPL --------------------------------


class PinBasedControls(enum.IntFlag):
    """``pin_based_vm_exec_control`` bits (``PIN_BASED_*``)."""

    EXT_INTR_MASK = PIN_BASED_EXT_INTR_MASK
    NMI_EXITING = PIN_BASED_NMI_EXITING
    VIRTUAL_NMIS = PIN_BASED_VIRTUAL_NMIS
    VMX_PREEMPTION_TIMER = PIN_BASED_VMX_PREEMPTION_TIMER
    POSTED_INTR = PIN_BASED_POSTED_INTR


class CpuBasedControls(enum.IntFlag):
    """``cpu_based_vm_exec_control`` bits (``CPU_BASED_*``)."""

    INTR_WINDOW_EXITING = CPU_BASED_INTR_WINDOW_EXITING
    USE_TSC_OFFSETTING = CPU_BASED_USE_TSC_OFFSETTING
    HLT_EXITING = CPU_BASED_HLT_EXITING
    INVLPG_EXITING = CPU_BASED_INVLPG_EXITING
    MWAIT_EXITING = CPU_BASED_MWAIT_EXITING
    RDPMC_EXITING = CPU_BASED_RDPMC_EXITING
    RDTSC_EXITING = CPU_BASED_RDTSC_EXITING
    CR3_LOAD_EXITING = CPU_BASED_CR3_LOAD_EXITING
    CR3_STORE_EXITING = CPU_BASED_CR3_STORE_EXITING
    ACTIVATE_TERTIARY_CONTROLS = CPU_BASED_ACTIVATE_TERTIARY_CONTROLS
    CR8_LOAD_EXITING = CPU_BASED_CR8_LOAD_EXITING
    CR8_STORE_EXITING = CPU_BASED_CR8_STORE_EXITING
    TPR_SHADOW = CPU_BASED_TPR_SHADOW
    NMI_WINDOW_EXITING = CPU_BASED_NMI_WINDOW_EXITING
    MOV_DR_EXITING = CPU_BASED_MOV_DR_EXITING
    UNCOND_IO_EXITING = CPU_BASED_UNCOND_IO_EXITING
    USE_IO_BITMAPS = CPU_BASED_USE_IO_BITMAPS
    MONITOR_TRAP_FLAG = CPU_BASED_MONITOR_TRAP_FLAG
    USE_MSR_BITMAPS = CPU_BASED_USE_MSR_BITMAPS
    MONITOR_EXITING = CPU_BASED_MONITOR_EXITING
    PAUSE_EXITING = CPU_BASED_PAUSE_EXITING
    ACTIVATE_SECONDARY_CONTROLS = CPU_BASED_ACTIVATE_SECONDARY_CONTROLS


class SecondaryExecControls(enum.IntFlag):
    """``secondary_vm_exec_control`` bits (``SECONDARY_EXEC_*``)."""

    VIRTUALIZE_APIC_ACCESSES = SECONDARY_EXEC_VIRTUALIZE_APIC_ACCESSES
    ENABLE_EPT = SECONDARY_EXEC_ENABLE_EPT
    DESC = SECONDARY_EXEC_DESC
    ENABLE_RDTSCP = SECONDARY_EXEC_ENABLE_RDTSCP
    VIRTUALIZE_X2APIC_MODE = SECONDARY_EXEC_VIRTUALIZE_X2APIC_MODE
    ENABLE_VPID = SECONDARY_EXEC_ENABLE_VPID
    WBINVD_EXITING = SECONDARY_EXEC_WBINVD_EXITING
    UNRESTRICTED_GUEST = SECONDARY_EXEC_UNRESTRICTED_GUEST
    APIC_REGISTER_VIRT = SECONDARY_EXEC_APIC_REGISTER_VIRT
    VIRTUAL_INTR_DELIVERY = SECONDARY_EXEC_VIRTUAL_INTR_DELIVERY
    PAUSE_LOOP_EXITING = SECONDARY_EXEC_PAUSE_LOOP_EXITING
    RDRAND_EXITING = SECONDARY_EXEC_RDRAND_EXITING
    ENABLE_INVPCID = SECONDARY_EXEC_ENABLE_INVPCID
    ENABLE_VMFUNC = SECONDARY_EXEC_ENABLE_VMFUNC
    SHADOW_VMCS = SECONDARY_EXEC_SHADOW_VMCS
    ENCLS_EXITING = SECONDARY_EXEC_ENCLS_EXITING
    RDSEED_EXITING = SECONDARY_EXEC_RDSEED_EXITING
    ENABLE_PML = SECONDARY_EXEC_ENABLE_PML
    EPT_VIOLATION_VE = SECONDARY_EXEC_EPT_VIOLATION_VE
    PT_CONCEAL_VMX = SECONDARY_EXEC_PT_CONCEAL_VMX
    ENABLE_XSAVES = SECONDARY_EXEC_ENABLE_XSAVES
    MODE_BASED_EPT_EXEC = SECONDARY_EXEC_MODE_BASED_EPT_EXEC
    PT_USE_GPA = SECONDARY_EXEC_PT_USE_GPA
    TSC_SCALING = SECONDARY_EXEC_TSC_SCALING
    ENABLE_USR_WAIT_PAUSE = SECONDARY_EXEC_ENABLE_USR_WAIT_PAUSE
    BUS_LOCK_DETECTION = SECONDARY_EXEC_BUS_LOCK_DETECTION
    NOTIFY_VM_EXITING = SECONDARY_EXEC_NOTIFY_VM_EXITING


class VmExitControls(enum.IntFlag):
    """``vm_exit_controls`` bits (``VM_EXIT_*``)."""

    SAVE_DEBUG_CONTROLS = VM_EXIT_SAVE_DEBUG_CONTROLS
    HOST_ADDR_SPACE_SIZE = VM_EXIT_HOST_ADDR_SPACE_SIZE
    LOAD_IA32_PERF_GLOBAL_CTRL = VM_EXIT_LOAD_IA32_PERF_GLOBAL_CTRL
    ACK_INTR_ON_EXIT = VM_EXIT_ACK_INTR_ON_EXIT
    SAVE_IA32_PAT = VM_EXIT_SAVE_IA32_PAT
    LOAD_IA32_PAT = VM_EXIT_LOAD_IA32_PAT
    SAVE_IA32_EFER = VM_EXIT_SAVE_IA32_EFER
    LOAD_IA32_EFER = VM_EXIT_LOAD_IA32_EFER
    SAVE_VMX_PREEMPTION_TIMER = VM_EXIT_SAVE_VMX_PREEMPTION_TIMER
    CLEAR_BNDCFGS = VM_EXIT_CLEAR_BNDCFGS
    PT_CONCEAL_PIP = VM_EXIT_PT_CONCEAL_PIP
    CLEAR_IA32_RTIT_CTL = VM_EXIT_CLEAR_IA32_RTIT_CTL
    LOAD_CET_STATE = VM_EXIT_LOAD_CET_STATE


class VmEntryControls(enum.IntFlag):
    """``vm_entry_controls`` bits (``VM_ENTRY_*``)."""

    LOAD_DEBUG_CONTROLS = VM_ENTRY_LOAD_DEBUG_CONTROLS
    IA32E_MODE = VM_ENTRY_IA32E_MODE
    SMM = VM_ENTRY_SMM
    DEACT_DUAL_MONITOR = VM_ENTRY_DEACT_DUAL_MONITOR
    LOAD_IA32_PERF_GLOBAL_CTRL = VM_ENTRY_LOAD_IA32_PERF_GLOBAL_CTRL
    LOAD_IA32_PAT = VM_ENTRY_LOAD_IA32_PAT
    LOAD_IA32_EFER = VM_ENTRY_LOAD_IA32_EFER
    LOAD_BNDCFGS = VM_ENTRY_LOAD_BNDCFGS
    PT_CONCEAL_PIP = VM_ENTRY_PT_CONCEAL_PIP
    LOAD_IA32_RTIT_CTL = VM_ENTRY_LOAD_IA32_RTIT_CTL
    LOAD_CET_STATE = VM_ENTRY_LOAD_CET_STATE


class GuestInterruptibility(enum.IntFlag):
    """``guest_interruptibility_info`` bits (``GUEST_INTR_STATE_*``)."""

    STI = GUEST_INTR_STATE_STI
    MOV_SS = GUEST_INTR_STATE_MOV_SS
    SMI = GUEST_INTR_STATE_SMI
    NMI = GUEST_INTR_STATE_NMI
    ENCLAVE_INTR = GUEST_INTR_STATE_ENCLAVE_INTR


class GuestActivityState(enum.IntEnum):
    """``guest_activity_state`` values (``GUEST_ACTIVITY_*``)."""

    ACTIVE = GUEST_ACTIVITY_ACTIVE
    HLT = GUEST_ACTIVITY_HLT
    SHUTDOWN = GUEST_ACTIVITY_SHUTDOWN
    WAIT_SIPI = GUEST_ACTIVITY_WAIT_SIPI


class LaunchState(enum.IntEnum):
    """``launch_state``: 0 after VMCLEAR, 1 after VMLAUNCH (the kernel names no constants)."""

    CLEAR = 0
    LAUNCHED = 1


# --- the structure ------------------------------------------------------------

_u16 = ctypes.c_uint16
_u32 = ctypes.c_uint32
_u64 = ctypes.c_uint64
_natural_width = ctypes.c_uint64  # u64 whatever L1's width, so vmcs12 migrates


class vmcs_hdr(Struct):
    """``struct vmcs_hdr``: the first word of any VMCS region."""

    _fields_ = [
        ("revision_id", _u32, 31),
        ("shadow_vmcs", _u32, 1),
    ]


def _group(ctype: Any, names: str) -> list[tuple[str, Any]]:
    return [(name, ctype) for name in names.split()]


_C_FIELDS: list[tuple[str, Any]] = [
    ("hdr", vmcs_hdr),
    ("abort", _u32),
    ("launch_state", _u32),
    ("padding", _u32 * 7),
    *_group(
        _u64,
        """
        io_bitmap_a io_bitmap_b msr_bitmap vm_exit_msr_store_addr vm_exit_msr_load_addr
        vm_entry_msr_load_addr tsc_offset virtual_apic_page_addr apic_access_addr
        posted_intr_desc_addr ept_pointer eoi_exit_bitmap0 eoi_exit_bitmap1
        eoi_exit_bitmap2 eoi_exit_bitmap3 xss_exit_bitmap guest_physical_address
        vmcs_link_pointer guest_ia32_debugctl guest_ia32_pat guest_ia32_efer
        guest_ia32_perf_global_ctrl guest_pdptr0 guest_pdptr1 guest_pdptr2 guest_pdptr3
        guest_bndcfgs host_ia32_pat host_ia32_efer host_ia32_perf_global_ctrl
        vmread_bitmap vmwrite_bitmap vm_function_control eptp_list_address pml_address
        encls_exiting_bitmap tsc_multiplier
    """,
    ),
    ("padding64", _u64 * 1),
    *_group(
        _natural_width,
        """
        cr0_guest_host_mask cr4_guest_host_mask cr0_read_shadow cr4_read_shadow
    """,
    ),
    ("dead_space", _natural_width * 4),  # was cr3_target_value0..3
    *_group(
        _natural_width,
        """
        exit_qualification guest_linear_address guest_cr0 guest_cr3 guest_cr4
        guest_es_base guest_cs_base guest_ss_base guest_ds_base guest_fs_base
        guest_gs_base guest_ldtr_base guest_tr_base guest_gdtr_base guest_idtr_base
        guest_dr7 guest_rsp guest_rip guest_rflags guest_pending_dbg_exceptions
        guest_sysenter_esp guest_sysenter_eip host_cr0 host_cr3 host_cr4 host_fs_base
        host_gs_base host_tr_base host_gdtr_base host_idtr_base host_ia32_sysenter_esp
        host_ia32_sysenter_eip host_rsp host_rip
        host_s_cet host_ssp host_ssp_tbl guest_s_cet guest_ssp guest_ssp_tbl
    """,
    ),
    ("paddingl", _natural_width * 2),
    *_group(
        _u32,
        """
        pin_based_vm_exec_control cpu_based_vm_exec_control exception_bitmap
        page_fault_error_code_mask page_fault_error_code_match cr3_target_count
        vm_exit_controls vm_exit_msr_store_count vm_exit_msr_load_count vm_entry_controls
        vm_entry_msr_load_count vm_entry_intr_info_field vm_entry_exception_error_code
        vm_entry_instruction_len tpr_threshold secondary_vm_exec_control
        vm_instruction_error vm_exit_reason vm_exit_intr_info vm_exit_intr_error_code
        idt_vectoring_info_field idt_vectoring_error_code vm_exit_instruction_len
        vmx_instruction_info guest_es_limit guest_cs_limit guest_ss_limit guest_ds_limit
        guest_fs_limit guest_gs_limit guest_ldtr_limit guest_tr_limit guest_gdtr_limit
        guest_idtr_limit guest_es_ar_bytes guest_cs_ar_bytes guest_ss_ar_bytes
        guest_ds_ar_bytes guest_fs_ar_bytes guest_gs_ar_bytes guest_ldtr_ar_bytes
        guest_tr_ar_bytes guest_interruptibility_info guest_activity_state
        guest_sysenter_cs host_ia32_sysenter_cs vmx_preemption_timer_value
    """,
    ),
    ("padding32", _u32 * 7),
    *_group(
        _u16,
        """
        virtual_processor_id posted_intr_nv guest_es_selector guest_cs_selector
        guest_ss_selector guest_ds_selector guest_fs_selector guest_gs_selector
        guest_ldtr_selector guest_tr_selector guest_intr_status host_es_selector
        host_cs_selector host_ss_selector host_ds_selector host_fs_selector
        host_gs_selector host_tr_selector guest_pml_index
    """,
    ),
]
# sizeof(struct vmcs12) in C: packed, so the plain sum of its members.
#: Size of ``struct vmcs12`` as C packs it (998 bytes): what vmx_set_nested_state copies
#: and compares ``size`` with, not the 4096-byte page it lives in.
VMCS12_C_SIZE = sum(ctypes.sizeof(ctype) for _, ctype in _C_FIELDS)


class vmcs12(Struct):
    """KVM's ``struct vmcs12``, padded to the whole :data:`VMCS12_SIZE` page.

    Build it over a nested state's page with ``vmcs12.from_buffer(page)``
    (a view) or ``vmcs12.from_bytes(data)`` (a copy); :meth:`new` gives a
    blank one with the revision id set.
    """

    # The kernel packs it; every field happens to be naturally aligned anyway.
    _pack_ = 1
    # Python 3.14 wants the layout named when _pack_ is set (MSVC-style is what _pack_ meant).
    _layout_ = "ms"
    _fields_ = [
        *_C_FIELDS,
        # Not in C: the rest of the page, where future fields would be appended.
        ("padding_tail", ctypes.c_uint8 * (VMCS12_SIZE - VMCS12_C_SIZE)),
    ]
    _flags_ = {
        "pin_based_vm_exec_control": PinBasedControls,
        "cpu_based_vm_exec_control": CpuBasedControls,
        "secondary_vm_exec_control": SecondaryExecControls,
        "vm_exit_controls": VmExitControls,
        "vm_entry_controls": VmEntryControls,
        "guest_interruptibility_info": GuestInterruptibility,
        "guest_activity_state": GuestActivityState,
        "launch_state": LaunchState,
    }
    _decimal_ = frozenset(
        {
            "cr3_target_count",
            "vm_exit_msr_store_count",
            "vm_exit_msr_load_count",
            "vm_entry_msr_load_count",
            "vm_entry_instruction_len",
            "vm_exit_instruction_len",
            "vm_instruction_error",
            "vmx_preemption_timer_value",
            "virtual_processor_id",
            "guest_pml_index",
        }
    )
    _hidden_ = frozenset(
        {"padding", "padding64", "dead_space", "paddingl", "padding32", "padding_tail"}
    )

    @classmethod
    def new(cls) -> vmcs12:
        """A zeroed vmcs12 carrying :data:`VMCS12_REVISION`, as VMPTRLD expects."""
        v = cls()
        v.hdr.revision_id = VMCS12_REVISION
        return v


assert ctypes.sizeof(vmcs12) == VMCS12_SIZE
