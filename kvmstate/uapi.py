"""Byte-exact mirrors of the x86 KVM UAPI (``<linux/kvm.h>``, ``<asm/kvm.h>``).

Names are the kernel's, so that what you read here is what you grep for in
the kernel. Layouts are checked field by field against the installed
headers compiled by gcc and read back by gdb (``tests/test_layout.py``).

Deviations from the C header, all deliberate:

* ``kvm_nested_state.data`` is declared in C as zero-length arrays (so that
  the ioctl numbers keep the 128-byte size). Here it is an explicit union
  of :class:`kvm_vmx_nested_state_data` (``vmcs12``, ``shadow_vmcs12``) and
  :class:`kvm_svm_nested_state_data` (``vmcb12``), so
  ``sizeof(kvm_nested_state)`` is 8320; :data:`NESTED_STATE_HEADER_SIZE`
  is the C size (128). :class:`kvm_nested_state_header` is the 128-byte
  fixed part alone, for buffers smaller than 8320 bytes (AMD's 4224).
* Anonymous C sub-structures get names (``kvm_vcpu_events_exception``,
  ``kvm_nested_state_hdr`` ...); the field names are the kernel's.
* Flexible arrays (``kvm_msrs.entries``, ``kvm_cpuid2.entries``,
  ``kvm_msr_list.indices``) are sized at construction: use
  ``kvm_cpuid2.new(n)``, ``kvm_msrs.new(n)``, ``kvm_msr_list.new(n)``.
* C ``char`` arrays (``kvm_lapic_state.regs``) are ``__u8`` arrays here: ctypes
  would otherwise cut their bytes at the first NUL when read.
* ``kvm_run`` is mirrored whole (2352 bytes): the exit union names the x86
  exits' members (``io``, ``mmio``, ``internal``...) and leaves other
  architectures' to its ``padding``; ``s`` is the x86 ``kvm_sync_regs``.
  The mapping behind it is ``KVM_GET_VCPU_MMAP_SIZE`` bytes (more pages follow:
  port I/O data, the coalesced MMIO ring).
* Fields newer than the installed header (linux-libc-dev 6.1) are listed
  in :data:`NEWER_FIELDS` with the kernel that brought them.

The ``KVM_*`` constants are defined in :mod:`kvmstate.uapi_constants` and the
enum views (``ExitReason``, ``MpState`` ...) in :mod:`kvmstate.uapi_enums`;
both are names of this module too, the enums imported the first time one is
asked for (making them costs as much as the rest of ``import kvmstate``).
"""

from __future__ import annotations

import ctypes
import enum
import functools
from array import array
from collections.abc import Mapping

from kvmstate._struct import Struct, Union

# Every constant is also a name of this module: uapi.KVM_* is where people look them up.
from kvmstate.uapi_constants import *  # noqa: F403
from kvmstate.uapi_constants import (
    KVM_API_VERSION,
    KVM_APIC_REG_SIZE,
    KVM_CAP_NESTED_STATE,
    KVM_CAP_SYNC_REGS,
    KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
    KVM_CPUID_FLAG_STATE_READ_NEXT,
    KVM_CPUID_FLAG_STATEFUL_FUNC,
    KVM_EXIT_DEBUG,
    KVM_EXIT_EXCEPTION,
    KVM_EXIT_FAIL_ENTRY,
    KVM_EXIT_HYPERCALL,
    KVM_EXIT_HYPERV,
    KVM_EXIT_INTERNAL_ERROR,
    KVM_EXIT_IO,
    KVM_EXIT_IOAPIC_EOI,
    KVM_EXIT_MMIO,
    KVM_EXIT_NOTIFY,
    KVM_EXIT_SYSTEM_EVENT,
    KVM_EXIT_TPR_ACCESS,
    KVM_EXIT_UNKNOWN,
    KVM_EXIT_X86_RDMSR,
    KVM_EXIT_X86_WRMSR,
    KVM_INTERNAL_ERROR_EMULATION,
    KVM_IOAPIC_NUM_PINS,
    KVM_MAX_XCRS,
    KVM_NR_INTERRUPTS,
    KVM_STATE_NESTED_EVMCS,
    KVM_STATE_NESTED_FORMAT_SVM,
    KVM_STATE_NESTED_FORMAT_VMX,
    KVM_STATE_NESTED_GIF_SET,
    KVM_STATE_NESTED_GUEST_MODE,
    KVM_STATE_NESTED_MTF_PENDING,
    KVM_STATE_NESTED_RUN_PENDING,
    KVM_STATE_NESTED_SMM_GUEST_MODE,
    KVM_STATE_NESTED_SMM_VMXON,
    KVM_STATE_NESTED_SVM_VMCB_SIZE,
    KVM_STATE_NESTED_VMX_VMCS_SIZE,
    KVM_STATE_VMX_PREEMPTION_TIMER_DEADLINE,
    KVM_SYNC_X86_VALID_FIELDS,
    KVM_X86_QUIRK_NESTED_SVM_SHARED_PAT,
    KVMIO,
    NEWER_CONSTANTS,
    SYNC_REGS_SIZE_BYTES,
)

TYPE_CHECKING = False  # typing is not imported at run time (see kvmstate._struct)
if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import Any, ClassVar, TypeVar

    # Named in __all__, so mypy takes them as this module's: see __getattr__ below.
    from kvmstate.uapi_enums import (
        ClockFlag,
        CpuidFlag,
        ExitReason,
        GuestDebugFlag,
        HypervExit,
        InternalError,
        IoDirection,
        IrqchipId,
        MpState,
        MsrExitReason,
        PitFlag,
        RunFlag,
        SyncRegs,
        SystemEvent,
        VcpuEventsFlag,
    )

__all__ = [
    "EXIT_MEMBERS",
    "GPAT_COMMIT",
    "GPAT_RELEASE",
    "KVMIO",
    "KVM_API_VERSION",
    "KVM_CAP_NESTED_STATE",
    "KVM_CAP_SYNC_REGS",
    "KVM_STATE_NESTED_EVMCS",
    "KVM_STATE_NESTED_FORMAT_SVM",
    "KVM_STATE_NESTED_FORMAT_VMX",
    "KVM_STATE_NESTED_GIF_SET",
    "KVM_STATE_NESTED_GUEST_MODE",
    "KVM_STATE_NESTED_MTF_PENDING",
    "KVM_STATE_NESTED_RUN_PENDING",
    "KVM_STATE_NESTED_SMM_GUEST_MODE",
    "KVM_STATE_NESTED_SMM_VMXON",
    "KVM_STATE_NESTED_SVM_VMCB_SIZE",
    "KVM_STATE_NESTED_VMX_VMCS_SIZE",
    "KVM_STATE_VMX_PREEMPTION_TIMER_DEADLINE",
    "KVM_SYNC_X86_VALID_FIELDS",
    "KVM_X86_QUIRK_NESTED_SVM_SHARED_PAT",
    "NESTED_STATE_HEADER_SIZE",
    "NEWER_CONSTANTS",
    "NEWER_FIELDS",
    "SYNC_REGS_SIZE_BYTES",
    "CpuidFlag",
    "ExitReason",
    "HypervExit",
    "InternalError",
    "IoDirection",
    "MpState",
    "MsrExitReason",
    "NestedFlag",
    "NestedFormat",
    "NestedSmmFlag",
    "RunFlag",
    "SyncRegs",
    "SystemEvent",
    "VcpuEventsFlag",
    "VmxHeaderFlag",
    "kvm_cpuid2",
    "kvm_cpuid_entry2",
    "kvm_debug_exit_arch",
    "kvm_debugregs",
    "kvm_dtable",
    "kvm_fpu",
    "kvm_hyperv_exit",
    "kvm_lapic_state",
    "kvm_mp_state",
    "kvm_msr_entry",
    "kvm_msr_list",
    "kvm_msrs",
    "kvm_nested_state",
    "kvm_nested_state_data",
    "kvm_nested_state_hdr",
    "kvm_nested_state_header",
    "kvm_regs",
    "kvm_run",
    "kvm_run_debug",
    "kvm_run_emulation_failure",
    "kvm_run_eoi",
    "kvm_run_ex",
    "kvm_run_exit",
    "kvm_run_fail_entry",
    "kvm_run_hw",
    "kvm_run_hypercall",
    "kvm_run_internal",
    "kvm_run_io",
    "kvm_run_mmio",
    "kvm_run_msr",
    "kvm_run_notify",
    "kvm_run_s",
    "kvm_run_system_event",
    "kvm_run_tpr_access",
    "kvm_segment",
    "kvm_sregs",
    "kvm_sregs2",
    "kvm_svm_nested_state_data",
    "kvm_svm_nested_state_hdr",
    "kvm_sync_regs",
    "kvm_userspace_memory_region",
    "kvm_vcpu_events",
    "kvm_vmx_nested_state_data",
    "kvm_vmx_nested_state_hdr",
    "kvm_xcr",
    "kvm_xcrs",
    "kvm_xsave",
    "msr_index_array",
    "msr_value_array",
    "msrs_buffer",
    "msrs_from_mapping",
    "msrs_words",
]

_u8 = ctypes.c_uint8
_u16 = ctypes.c_uint16
_u32 = ctypes.c_uint32
_u64 = ctypes.c_uint64

# --- enum views, for reading values in a REPL --------------------------------


class NestedFormat(enum.IntEnum):
    """``kvm_nested_state.format`` (``KVM_STATE_NESTED_FORMAT_*``)."""

    VMX = KVM_STATE_NESTED_FORMAT_VMX
    SVM = KVM_STATE_NESTED_FORMAT_SVM


class NestedFlag(enum.IntFlag):
    """``kvm_nested_state.flags`` (``KVM_STATE_NESTED_*``)."""

    GUEST_MODE = KVM_STATE_NESTED_GUEST_MODE
    RUN_PENDING = KVM_STATE_NESTED_RUN_PENDING
    EVMCS = KVM_STATE_NESTED_EVMCS
    MTF_PENDING = KVM_STATE_NESTED_MTF_PENDING
    GIF_SET = KVM_STATE_NESTED_GIF_SET


class NestedSmmFlag(enum.IntFlag):
    """``kvm_vmx_nested_state_hdr.smm.flags`` (``KVM_STATE_NESTED_SMM_*``)."""

    GUEST_MODE = KVM_STATE_NESTED_SMM_GUEST_MODE
    VMXON = KVM_STATE_NESTED_SMM_VMXON


class VmxHeaderFlag(enum.IntFlag):
    """``kvm_vmx_nested_state_hdr.flags``."""

    PREEMPTION_TIMER_DEADLINE = KVM_STATE_VMX_PREEMPTION_TIMER_DEADLINE


# --- nested state -------------------------------------------------------------


class kvm_vmx_nested_state_data(Struct):
    """VMX data area: the cached vmcs12 and, with VMCS shadowing, its shadow."""

    _fields_ = [
        ("vmcs12", _u8 * KVM_STATE_NESTED_VMX_VMCS_SIZE),
        ("shadow_vmcs12", _u8 * KVM_STATE_NESTED_VMX_VMCS_SIZE),
    ]


class kvm_vmx_nested_state_hdr_smm(Struct):
    """``kvm_vmx_nested_state_hdr.smm`` (anonymous in C)."""

    _fields_ = [("flags", _u16)]
    _flags_ = {"flags": NestedSmmFlag}


class kvm_vmx_nested_state_hdr(Struct):
    """VMX header: VMXON region and current VMCS addresses (-1 when none)."""

    _fields_ = [
        ("vmxon_pa", _u64),
        ("vmcs12_pa", _u64),
        ("smm", kvm_vmx_nested_state_hdr_smm),
        ("pad", _u16),
        ("flags", _u32),
        ("preemption_timer_deadline", _u64),
    ]
    _flags_ = {"flags": VmxHeaderFlag}
    _hidden_ = frozenset({"pad"})


class kvm_svm_nested_state_data(Struct):
    """SVM data area: the vmcb12 (control area, then save area at 0x400)."""

    _fields_ = [("vmcb12", _u8 * KVM_STATE_NESTED_SVM_VMCB_SIZE)]


class kvm_svm_nested_state_hdr(Struct):
    """SVM header: the guest-physical address of vmcb12, then L2's guest PAT.

    ``gpat`` is newer than the installed header (Linux 7.2, see
    :data:`NEWER_FIELDS`). KVM_GET_NESTED_STATE fills it only in guest mode
    with nested paging and ``KVM_X86_QUIRK_NESTED_SVM_SHARED_PAT`` disabled,
    and leaves it 0 otherwise; older kernels leave it 0 and ignore it.
    """

    _fields_ = [("vmcb_pa", _u64), ("gpat", _u64)]


class kvm_nested_state_hdr(Union):
    """``kvm_nested_state.hdr`` (anonymous union in C), padded to 120 bytes."""

    _fields_ = [
        ("vmx", kvm_vmx_nested_state_hdr),
        ("svm", kvm_svm_nested_state_hdr),
        ("pad", _u8 * 120),
    ]
    _hidden_ = frozenset({"pad"})


class kvm_nested_state_data(Union):
    """``kvm_nested_state.data``: zero-length in C, explicit here."""

    _fields_ = [
        ("vmx", kvm_vmx_nested_state_data),
        ("svm", kvm_svm_nested_state_data),
    ]


class kvm_nested_state_header(Struct):
    """The fixed 128-byte part of :class:`kvm_nested_state` (C's ``sizeof``)."""

    _fields_ = [
        ("flags", _u16),
        ("format", _u16),
        ("size", _u32),
        ("hdr", kvm_nested_state_hdr),
    ]
    _flags_ = {"flags": NestedFlag, "format": NestedFormat}
    _decimal_ = frozenset({"size"})


class kvm_nested_state(kvm_nested_state_header):
    """``struct kvm_nested_state`` with its data area made explicit (8320 bytes)."""

    _fields_ = [("data", kvm_nested_state_data)]


#: sizeof(struct kvm_nested_state) in C: the fixed 128-byte header.
NESTED_STATE_HEADER_SIZE = ctypes.sizeof(kvm_nested_state_header)
assert NESTED_STATE_HEADER_SIZE == kvm_nested_state.data.offset == 128

#: The commit that added ``kvm_svm_nested_state_hdr.gpat`` (kvm-x86 ``svm``, 2026-05-18,
#: the v8 posting of the nSVM gPAT series as applied) and the first release with it.
GPAT_COMMIT = "4f256d5770febb9d61f9b57a4c79c491bf4987f1"
GPAT_RELEASE = (7, 2)


#: Fields this module mirrors that the installed header (6.1) lacks, with
#: where they come from. The layout oracle skips exactly these.
NEWER_FIELDS: dict[tuple[str, str], str] = {
    ("kvm_svm_nested_state_hdr", "gpat"): (
        f"Linux {GPAT_RELEASE[0]}.{GPAT_RELEASE[1]}: commit {GPAT_COMMIT[:12]} (KVM: x86: nSVM: "
        "Save/restore gPAT with KVM_{GET,SET}_NESTED_STATE), L2's guest PAT in guest mode "
        "with nested paging and KVM_X86_QUIRK_NESTED_SVM_SHARED_PAT disabled, else 0"
    ),
}


# --- registers and events -------------------------------------------------------


class kvm_regs(Struct):
    """General-purpose registers (``KVM_GET_REGS`` / ``KVM_SET_REGS``)."""

    _fields_ = [
        (name, _u64)
        for name in (
            "rax",
            "rbx",
            "rcx",
            "rdx",
            "rsi",
            "rdi",
            "rsp",
            "rbp",
            "r8",
            "r9",
            "r10",
            "r11",
            "r12",
            "r13",
            "r14",
            "r15",
            "rip",
            "rflags",
        )
    ]


class kvm_segment(Struct):
    """A segment register as KVM sees it (base, limit, selector, attributes)."""

    _fields_ = [
        ("base", _u64),
        ("limit", _u32),
        ("selector", _u16),
        ("type", _u8),
        ("present", _u8),
        ("dpl", _u8),
        ("db", _u8),
        ("s", _u8),
        ("l", _u8),
        ("g", _u8),
        ("avl", _u8),
        ("unusable", _u8),
        ("padding", _u8),
    ]
    _hidden_ = frozenset({"padding"})


class kvm_dtable(Struct):
    """A descriptor-table register (GDTR / IDTR)."""

    _fields_ = [("base", _u64), ("limit", _u16), ("padding", _u16 * 3)]
    _hidden_ = frozenset({"padding"})


class kvm_sregs(Struct):
    """Segment and control registers (``KVM_GET_SREGS`` / ``KVM_SET_SREGS``)."""

    _fields_ = [
        *[(s, kvm_segment) for s in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")],
        ("gdt", kvm_dtable),
        ("idt", kvm_dtable),
        *[(r, _u64) for r in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")],
        ("interrupt_bitmap", _u64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class kvm_vcpu_events_exception(Struct):
    """``kvm_vcpu_events.exception`` (anonymous in C)."""

    _fields_ = [
        ("injected", _u8),
        ("nr", _u8),
        ("has_error_code", _u8),
        ("pending", _u8),
        ("error_code", _u32),
    ]


class kvm_vcpu_events_interrupt(Struct):
    """``kvm_vcpu_events.interrupt`` (anonymous in C)."""

    _fields_ = [("injected", _u8), ("nr", _u8), ("soft", _u8), ("shadow", _u8)]


class kvm_vcpu_events_nmi(Struct):
    """``kvm_vcpu_events.nmi`` (anonymous in C)."""

    _fields_ = [("injected", _u8), ("pending", _u8), ("masked", _u8), ("pad", _u8)]
    _hidden_ = frozenset({"pad"})


class kvm_vcpu_events_smi(Struct):
    """``kvm_vcpu_events.smi`` (anonymous in C)."""

    _fields_ = [
        ("smm", _u8),
        ("pending", _u8),
        ("smm_inside_nmi", _u8),
        ("latched_init", _u8),
    ]


class kvm_vcpu_events_triple_fault(Struct):
    """``kvm_vcpu_events.triple_fault`` (anonymous in C)."""

    _fields_ = [("pending", _u8)]


class kvm_vcpu_events(Struct):
    """Pending exceptions, interrupts, NMI, SMM (``KVM_GET/SET_VCPU_EVENTS``)."""

    _fields_ = [
        ("exception", kvm_vcpu_events_exception),
        ("interrupt", kvm_vcpu_events_interrupt),
        ("nmi", kvm_vcpu_events_nmi),
        ("sipi_vector", _u32),
        ("flags", _u32),
        ("smi", kvm_vcpu_events_smi),
        ("triple_fault", kvm_vcpu_events_triple_fault),
        ("reserved", _u8 * 26),
        ("exception_has_payload", _u8),
        ("exception_payload", _u64),
    ]
    _flags_ = {"flags": "VcpuEventsFlag"}
    _hidden_ = frozenset({"reserved"})


class kvm_sregs2(Struct):
    """``KVM_GET_SREGS2`` / ``KVM_SET_SREGS2``: sregs with the PAE PDPTRs, no interrupt bitmap."""

    _fields_ = [
        *[(s, kvm_segment) for s in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")],
        ("gdt", kvm_dtable),
        ("idt", kvm_dtable),
        *[(r, _u64) for r in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base", "flags")],
        ("pdptrs", _u64 * 4),
    ]


class kvm_fpu(Struct):
    """Legacy x87/SSE state (``KVM_GET_FPU``); XSAVE supersedes it where present."""

    _fields_ = [
        ("fpr", (_u8 * 16) * 8),
        ("fcw", _u16),
        ("fsw", _u16),
        ("ftwx", _u8),
        ("pad1", _u8),
        ("last_opcode", _u16),
        ("last_ip", _u64),
        ("last_dp", _u64),
        ("xmm", (_u8 * 16) * 16),
        ("mxcsr", _u32),
        ("pad2", _u32),
    ]
    _hidden_ = frozenset({"pad1", "pad2"})


class kvm_xsave(Struct):
    """The XSAVE area (``KVM_GET_XSAVE``): 4096 bytes, more with ``KVM_GET_XSAVE2``.

    ``kvm_xsave.sized(n)`` gives a structure of ``n`` bytes whose ``extra``
    words follow ``region`` (the C flexible array), for ``KVM_CAP_XSAVE2``
    sizes above 4096.
    """

    _fields_ = [("region", _u32 * 1024)]

    @classmethod
    def sized(cls, nbytes: int) -> kvm_xsave:
        """An XSAVE buffer of ``nbytes`` (a multiple of 4, at least 4096)."""
        if not isinstance(nbytes, int) or nbytes < 4096 or nbytes % 4 or nbytes > 1 << 20:
            raise ValueError(f"an XSAVE area of {nbytes!r} bytes is not valid (>= 4096, 4-aligned)")
        if nbytes == 4096:
            return cls()
        return _xsave_type(nbytes)()


@functools.lru_cache(maxsize=8)
def _xsave_type(nbytes: int) -> type[kvm_xsave]:
    extra = (nbytes - 4096) // 4
    return type(
        f"kvm_xsave[{nbytes}]",
        (kvm_xsave,),
        {"_fields_": [("extra", _u32 * extra)], "__module__": __name__, "__reduce__": _reduce},
    )


def _reduce(self: Any) -> tuple[Any, ...]:
    """Pickle a sized mirror (``kvm_cpuid2[59]``, ``kvm_xsave[8192]``) by its bytes.

    Its class is made at run time, so pickle cannot find it by name.
    """
    base = kvm_xsave if isinstance(self, kvm_xsave) else self._head()
    return (_rebuild, (base, ctypes.sizeof(self), self.to_bytes()))


def _rebuild(base: Any, nbytes: int, data: bytes) -> Any:
    if base is kvm_xsave:
        obj = kvm_xsave.sized(nbytes)
    else:
        item = ctypes.sizeof(base._array_[1])
        obj = base.new((nbytes - ctypes.sizeof(base)) // item)
    if ctypes.sizeof(obj) != len(data):
        raise ValueError(f"{base.__name__}: {len(data)} bytes do not make a {nbytes}-byte object")
    ctypes.memmove(ctypes.addressof(obj), data, len(data))
    return obj


class kvm_xcr(Struct):
    """One extended control register (XCR0 is index 0)."""

    _fields_ = [("xcr", _u32), ("reserved", _u32), ("value", _u64)]
    _hidden_ = frozenset({"reserved"})


class kvm_xcrs(Struct):
    """``KVM_GET_XCRS`` / ``KVM_SET_XCRS``: ``nr_xcrs`` of the 16 slots are used."""

    _fields_ = [
        ("nr_xcrs", _u32),
        ("flags", _u32),
        ("xcrs", kvm_xcr * KVM_MAX_XCRS),
        ("padding", _u64 * 16),
    ]
    _decimal_ = frozenset({"nr_xcrs"})
    _hidden_ = frozenset({"padding"})


class kvm_debugregs(Struct):
    """``KVM_GET_DEBUGREGS``: DR0-3, DR6, DR7."""

    _fields_ = [
        ("db", _u64 * 4),
        ("dr6", _u64),
        ("dr7", _u64),
        ("flags", _u64),
        ("reserved", _u64 * 9),
    ]
    _hidden_ = frozenset({"reserved"})


class kvm_mp_state(Struct):
    """``KVM_GET_MP_STATE``: runnable, halted, waiting for INIT/SIPI..."""

    _fields_ = [("mp_state", _u32)]
    _flags_ = {"mp_state": "MpState"}


class kvm_lapic_state(Struct):
    """``KVM_GET_LAPIC``: the local APIC's 1 KiB register page."""

    _fields_ = [("regs", _u8 * KVM_APIC_REG_SIZE)]


# --- variable-length structures ---------------------------------------------------


class kvm_msr_entry(Struct):
    """One MSR: index and 64-bit value."""

    _fields_ = [("index", _u32), ("reserved", _u32), ("data", _u64)]
    _hidden_ = frozenset({"reserved"})


class kvm_cpuid_entry2(Struct):
    """One CPUID leaf/subleaf as KVM stores it."""

    _fields_ = [
        ("function", _u32),
        ("index", _u32),
        ("flags", _u32),
        ("eax", _u32),
        ("ebx", _u32),
        ("ecx", _u32),
        ("edx", _u32),
        ("padding", _u32 * 3),
    ]
    _flags_ = {"flags": "CpuidFlag"}
    _hidden_ = frozenset({"padding"})


#: The most elements :meth:`_FlexStruct.new` allocates (KVM's own limits are far lower:
#: 256 CPUID entries, a few hundred MSRs); a count from a file is never a 16 GB allocation.
_FLEX_MAX_ELEMENTS = 1 << 16


class _FlexStruct(Struct):
    """A structure whose last member is a C flexible array.

    The base class is the fixed head only (its ``sizeof`` is the C one);
    :meth:`new` returns an instance of a subclass whose array has exactly
    ``n`` elements, with the count field set to ``n``. Wrappers never let
    the count field exceed :meth:`capacity` before a call into the kernel.
    """

    _count_: ClassVar[str]
    _array_: ClassVar[tuple[str, Any]]
    _decimal_ = frozenset({"nent", "nmsrs"})

    @classmethod
    def new(cls: type[_F], n: int) -> _F:
        """An instance with room for ``n`` array elements and its count set to ``n``."""
        if not isinstance(n, int) or isinstance(n, bool):
            raise TypeError(f"{cls.__name__}.new() needs an int, not {type(n).__name__}")
        if not 0 <= n <= _FLEX_MAX_ELEMENTS:
            raise ValueError(
                f"{cls.__name__}.new(): {n} elements is out of range (0..{_FLEX_MAX_ELEMENTS})"
            )
        obj: _F = _sized(cls._head(), n)()
        setattr(obj, cls._count_, n)
        return obj

    def trimmed(self: _F) -> _F:
        """A copy holding exactly as many elements as the count field says.

        After a GET the kernel lowers the count; this drops the unused tail.
        """
        out = type(self).new(len(self))
        ctypes.memmove(ctypes.addressof(out), ctypes.addressof(self), ctypes.sizeof(out))
        return out

    @classmethod
    def _head(cls: type[_F]) -> type[_F]:
        """The fixed-head class (``kvm_cpuid2``) behind a sized one (``kvm_cpuid2[61]``)."""
        while "_flex_base_" in cls.__dict__:
            cls = cls.__bases__[0]
        return cls

    def capacity(self) -> int:
        """How many array elements this object's memory really holds."""
        head = self._head()
        item = head._array_[1]
        return (ctypes.sizeof(self) - ctypes.sizeof(head)) // ctypes.sizeof(item)

    def items(self) -> ctypes.Array[Any]:
        """The array part (``capacity()`` elements), empty for the bare head."""
        name, item = self._array_
        if self.capacity() == 0:
            return (item * 0)()  # type: ignore[no-any-return]
        return getattr(self, name)  # type: ignore[no-any-return]

    def __len__(self) -> int:
        """The count field, clamped to what the memory holds."""
        return min(int(getattr(self, self._count_)), self.capacity())

    def __repr__(self) -> str:
        count = getattr(self, self._count_)
        body = ", ".join(
            repr(e) if not isinstance(e, int) else hex(e)
            for e in list(self.items())[: len(self)][:8]
        )
        more = f", ... {len(self) - 8} more" if len(self) > 8 else ""
        return f"{self._head().__name__}({self._count_}={count}, {self._array_[0]}=[{body}{more}])"


if TYPE_CHECKING:
    _F = TypeVar("_F", bound=_FlexStruct)


@functools.lru_cache(maxsize=64)
def _sized(cls: type[_F], n: int) -> type[_F]:
    name, item = cls._array_
    return type(
        f"{cls.__name__}[{n}]",
        (cls,),
        {
            "_fields_": [(name, item * n)],
            "_flex_base_": True,
            "__module__": cls.__module__,
            "__reduce__": _reduce,
        },
    )


class kvm_msrs(_FlexStruct):
    """``KVM_GET_MSRS`` / ``KVM_SET_MSRS`` argument: ``nmsrs`` entries follow."""

    _fields_ = [("nmsrs", _u32), ("pad", _u32)]
    _count_ = "nmsrs"
    _array_ = ("entries", kvm_msr_entry)
    _hidden_ = frozenset({"pad"})
    if TYPE_CHECKING:
        entries: ctypes.Array[kvm_msr_entry]


def msr_index_array(indices: Iterable[int]) -> array[int]:
    """MSR indices as a u32 array; TypeError/ValueError naming a bad one (bools refused)."""
    items = list(indices)
    try:
        out = array("I", items)
    except (OverflowError, TypeError):
        for index in items:
            _msr_index(index)
        raise
    if bool in set(map(type, items)):  # array("I") takes True as 1
        for index in items:
            _msr_index(index)
    return out


def msr_value_array(values: Mapping[int, int]) -> array[int]:
    """The values of ``{index: value}`` as a u64 array; TypeError/ValueError naming a bad one."""
    items = list(values.values())
    try:
        out = array("Q", items)
    except (OverflowError, TypeError):
        out = None
    if out is None or bool in set(map(type, items)):  # array("Q") takes True as 1
        for i, v in values.items():
            _msr_value(v, f"MSR {i:#x}")  # names the offending value
    if out is None:
        raise TypeError("MSR values must be ints")
    return out


def msrs_buffer(indices: array[int]) -> tuple[kvm_msrs, memoryview]:
    """A kvm_msrs holding ``indices``, and its entries as (index, data) u64 word pairs.

    >>> msrs, words = msrs_buffer(msr_index_array([0x10, 0x174]))
    >>> words[1::2] = msr_value_array({0x10: 5, 0x174: 8}); msrs.items()[1].data
    8
    """
    msrs = kvm_msrs.new(len(indices))
    words = memoryview(msrs).cast("B")[8:].cast("Q")  # kvm_msr_entry: u32 index, u32 pad, u64
    words[0::2] = array("Q", indices)
    return msrs, words


def msrs_words(indices: array[int]) -> array[int]:
    """``struct kvm_msrs`` holding ``indices`` as u64 words: an array, not a ctypes object.

    Word 0 is ``nmsrs`` (``len(indices)``) and ``pad`` (0); then each
    ``kvm_msr_entry`` (u32 index, u32 reserved, u64 data) is two words, the
    index (reserved 0) at ``1 + 2 * i`` and the data at ``2 + 2 * i`` (x86 is
    little-endian). The array is ``8 + 16 * nmsrs`` bytes: all the kernel may
    touch for that ``nmsrs``.

    >>> words = msrs_words(msr_index_array([0x10, 0x174]))
    >>> words[2::2] = msr_value_array({0x10: 5, 0x174: 8}); words.tolist()
    [2, 16, 5, 372, 8]
    """
    words = array("Q", bytes(8 + 16 * len(indices)))
    words[0] = len(indices)
    words[1::2] = array("Q", indices)
    return words


def _msr_index(index: object) -> int:
    if not isinstance(index, int) or isinstance(index, bool):
        raise TypeError(f"an MSR index must be an int, not {type(index).__name__}")
    if not 0 <= index <= 0xFFFF_FFFF:
        raise ValueError(f"MSR index {index:#x} does not fit in 32 bits")
    return index


def _msr_value(value: object, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not 0 <= value <= 0xFFFF_FFFF_FFFF_FFFF:
        raise ValueError(f"{name} value {value:#x} does not fit in 64 bits")
    return value


def msrs_from_mapping(values: Mapping[int, int]) -> kvm_msrs:
    """A ``kvm_msrs`` of ``{index: value}`` sorted by index; indices must fit in 32 bits,
    values in 64 (TypeError/ValueError naming the MSR: ctypes would wrap them)."""
    if not isinstance(values, Mapping):
        raise TypeError(f"msrs: expected a mapping of index to value, not {type(values).__name__}")
    ordered = dict(sorted(values.items()))
    msrs, words = msrs_buffer(msr_index_array(ordered.keys()))
    words[1::2] = msr_value_array(ordered)
    return msrs


class kvm_msr_list(_FlexStruct):
    """``KVM_GET_MSR_INDEX_LIST`` argument: ``nmsrs`` indices follow."""

    _fields_ = [("nmsrs", _u32)]
    _count_ = "nmsrs"
    _array_ = ("indices", _u32)
    if TYPE_CHECKING:
        indices: ctypes.Array[ctypes.c_uint32]


class kvm_cpuid2(_FlexStruct):
    """``KVM_SET_CPUID2`` / ``KVM_GET_SUPPORTED_CPUID`` argument: ``nent`` entries follow.

    The repr is one short line (the count and the leaves' ranges); ``str()``
    and IPython show one entry per line, in hex::

        >>> print(kvm.get_supported_cpuid())                 # doctest: +SKIP
        kvm_cpuid2(nent=59):
          0x00000000        eax=0x0000001f ebx=0x756e6547 ecx=0x6c65746e edx=0x49656e69
          ...
          0x00000004.0  I   eax=0x00000121 ebx=0x01c0003f ecx=0x0000003f edx=0x00000000
          ...
    """

    _fields_ = [("nent", _u32), ("padding", _u32)]
    _count_ = "nent"
    _array_ = ("entries", kvm_cpuid_entry2)
    _hidden_ = frozenset({"padding"})
    if TYPE_CHECKING:
        entries: ctypes.Array[kvm_cpuid_entry2]

    def __repr__(self) -> str:
        entries = list(self.items())[: len(self)]
        # Runs of consecutive functions: 0x0..0x1f, 0x40000000..0x40000001, ...
        runs: list[list[int]] = []
        for function in sorted({int(e.function) for e in entries}):
            if runs and function == runs[-1][1] + 1:
                runs[-1][1] = function
            else:
                runs.append([function, function])
        shown = [f"{a:#x}" if a == b else f"{a:#x}..{b:#x}" for a, b in runs[:6]]
        if len(runs) > 6:
            shown.append(f"... {len(runs) - 6} more ranges")
        leaves = f", leaves {', '.join(shown)}" if shown else ""
        return f"kvm_cpuid2(nent={self.nent}{leaves})"

    def lines(self) -> list[str]:
        """One line per entry: function(.index), flags (I, S, N), the four registers in hex.

        ``I`` is ``SIGNIFCANT_INDEX`` (the index matters), ``S`` and ``N``
        the stateful-function flags.

        >>> kvm.get_supported_cpuid().lines()[0]             # doctest: +SKIP
        '0x00000000        eax=0x0000001f ebx=0x756e6547 ecx=0x6c65746e edx=0x49656e69'
        """
        out = []
        for e in list(self.items())[: len(self)]:
            indexed = e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX
            leaf = f"{e.function:#010x}" + (f".{e.index}" if indexed else "")
            marks = "".join(
                c
                for bit, c in (
                    (KVM_CPUID_FLAG_SIGNIFCANT_INDEX, "I"),
                    (KVM_CPUID_FLAG_STATEFUL_FUNC, "S"),
                    (KVM_CPUID_FLAG_STATE_READ_NEXT, "N"),
                )
                if e.flags & bit
            )
            unknown = e.flags & ~(
                KVM_CPUID_FLAG_SIGNIFCANT_INDEX
                | KVM_CPUID_FLAG_STATEFUL_FUNC
                | KVM_CPUID_FLAG_STATE_READ_NEXT
            )
            if unknown:
                marks += f" flags={int(e.flags):#x}"
            regs = " ".join(f"{r}={getattr(e, r):#010x}" for r in ("eax", "ebx", "ecx", "edx"))
            out.append(f"{leaf:<14}{marks:<3} {regs}")
        return out

    def __str__(self) -> str:
        head = f"kvm_cpuid2(nent={self.nent})"
        if self.nent > self.capacity():
            head += f" (holds {self.capacity()})"
        return "\n".join([head + ":", *(f"  {line}" for line in self.lines())])

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        """IPython: :meth:`__str__`, one entry per line (indented where it is nested)."""
        head, *lines = str(self).splitlines()
        if cycle or not lines:
            p.text(repr(self) if cycle else head.rstrip(":"))
            return
        with p.group(2, head, ""):
            for line in lines:
                p.break_()
                p.text(line.strip())


# --- memory and running -------------------------------------------------------------


class kvm_userspace_memory_region(Struct):
    """A guest-physical memory slot backed by host memory."""

    _fields_ = [
        ("slot", _u32),
        ("flags", _u32),
        ("guest_phys_addr", _u64),
        ("memory_size", _u64),
        ("userspace_addr", _u64),
    ]
    _decimal_ = frozenset({"slot"})


class kvm_run_hw(Struct):
    """``kvm_run.hw`` (KVM_EXIT_UNKNOWN)."""

    _fields_ = [("hardware_exit_reason", _u64)]


class kvm_run_fail_entry(Struct):
    """``kvm_run.fail_entry`` (KVM_EXIT_FAIL_ENTRY): VM-entry failed; the reason is the CPU's."""

    # _pad: the 4 bytes C pads the struct with (no member), named so to_dict/from_dict keep them.
    _fields_ = [("hardware_entry_failure_reason", _u64), ("cpu", _u32), ("_pad", _u8 * 4)]
    _hidden_ = frozenset({"_pad"})


class kvm_run_ex(Struct):
    """``kvm_run.ex`` (KVM_EXIT_EXCEPTION)."""

    _fields_ = [("exception", _u32), ("error_code", _u32)]


class kvm_run_io(Struct):
    """``kvm_run.io`` (KVM_EXIT_IO); data lives at ``data_offset`` in the run page."""

    _fields_ = [
        ("direction", _u8),
        ("size", _u8),
        ("port", _u16),
        ("count", _u32),
        ("data_offset", _u64),
    ]
    _decimal_ = frozenset({"size", "count"})
    _flags_ = {"direction": "IoDirection"}


class kvm_debug_exit_arch(Struct):
    """x86 debug exit: the exception (1 = #DB, 3 = #BP), where, and DR6/DR7."""

    _fields_ = [("exception", _u32), ("pad", _u32), ("pc", _u64), ("dr6", _u64), ("dr7", _u64)]
    _hidden_ = frozenset({"pad"})


class kvm_run_debug(Struct):
    """``kvm_run.debug`` (KVM_EXIT_DEBUG, with KVM_SET_GUEST_DEBUG)."""

    _fields_ = [("arch", kvm_debug_exit_arch)]


class kvm_run_mmio(Struct):
    """``kvm_run.mmio`` (KVM_EXIT_MMIO): an access to guest-physical memory no slot backs."""

    # _pad: the 3 bytes C pads the struct with (no member), named so to_dict/from_dict keep them.
    _fields_ = [
        ("phys_addr", _u64),
        ("data", _u8 * 8),
        ("len", _u32),
        ("is_write", _u8),
        ("_pad", _u8 * 3),
    ]
    _decimal_ = frozenset({"len"})
    _hidden_ = frozenset({"_pad"})


class kvm_run_hypercall(Struct):
    """``kvm_run.hypercall`` (KVM_EXIT_HYPERCALL, with KVM_CAP_EXIT_HYPERCALL)."""

    _fields_ = [
        ("nr", _u64),
        ("args", _u64 * 6),
        ("ret", _u64),
        ("longmode", _u32),
        ("pad", _u32),
    ]
    _hidden_ = frozenset({"pad"})


class kvm_run_tpr_access(Struct):
    """``kvm_run.tpr_access`` (KVM_EXIT_TPR_ACCESS, with KVM_TPR_ACCESS_REPORTING)."""

    _fields_ = [("rip", _u64), ("is_write", _u32), ("pad", _u32)]
    _hidden_ = frozenset({"pad"})


class kvm_run_internal(Struct):
    """``kvm_run.internal`` (KVM_EXIT_INTERNAL_ERROR): ``ndata`` words of ``data`` are set."""

    _fields_ = [("suberror", _u32), ("ndata", _u32), ("data", _u64 * 16)]
    _decimal_ = frozenset({"ndata"})
    _flags_ = {"suberror": "InternalError"}


class kvm_run_emulation_failure(Struct):
    """``kvm_run.emulation_failure``: ``internal`` for KVM_INTERNAL_ERROR_EMULATION, with
    the instruction bytes when ``flags`` has ``..._FLAG_INSTRUCTION_BYTES``."""

    # C wraps insn_size/insn_bytes in an anonymous union of an anonymous struct: same bytes.
    _fields_ = [
        ("suberror", _u32),
        ("ndata", _u32),
        ("flags", _u64),
        ("insn_size", _u8),
        ("insn_bytes", _u8 * 15),
    ]
    _decimal_ = frozenset({"ndata", "insn_size"})
    _flags_ = {"suberror": "InternalError"}


class kvm_run_system_event_u(Union):
    """``kvm_run.system_event``'s anonymous union: ``flags`` (before ndata) or ``data``."""

    _fields_ = [("flags", _u64), ("data", _u64 * 16)]


class kvm_run_system_event(Struct):
    """``kvm_run.system_event`` (KVM_EXIT_SYSTEM_EVENT): shutdown, reset, crash..."""

    _anonymous_ = ("u",)
    _fields_ = [("type", _u32), ("ndata", _u32), ("u", kvm_run_system_event_u)]
    _decimal_ = frozenset({"ndata"})
    _flags_ = {"type": "SystemEvent"}
    _hidden_ = frozenset({"u"})

    def shown_fields(self) -> list[str]:
        # The union by its C names; flags (the pre-ndata name) is data[0].
        return ["type", "ndata", "data"]


class kvm_run_eoi(Struct):
    """``kvm_run.eoi`` (KVM_EXIT_IOAPIC_EOI, split irqchip)."""

    _fields_ = [("vector", _u8)]


class kvm_hyperv_exit_synic(Struct):
    """``kvm_hyperv_exit.u.synic`` (KVM_EXIT_HYPERV_SYNIC): a SynIC MSR was written."""

    _fields_ = [
        ("msr", _u32),
        ("pad2", _u32),
        ("control", _u64),
        ("evt_page", _u64),
        ("msg_page", _u64),
    ]
    _hidden_ = frozenset({"pad2"})


class kvm_hyperv_exit_hcall(Struct):
    """``kvm_hyperv_exit.u.hcall`` (KVM_EXIT_HYPERV_HCALL)."""

    _fields_ = [("input", _u64), ("result", _u64), ("params", _u64 * 2)]


class kvm_hyperv_exit_syndbg(Struct):
    """``kvm_hyperv_exit.u.syndbg`` (KVM_EXIT_HYPERV_SYNDBG)."""

    _fields_ = [
        ("msr", _u32),
        ("pad2", _u32),
        ("control", _u64),
        ("status", _u64),
        ("send_page", _u64),
        ("recv_page", _u64),
        ("pending_page", _u64),
    ]
    _hidden_ = frozenset({"pad2"})


class kvm_hyperv_exit_u(Union):
    """``kvm_hyperv_exit.u``."""

    _fields_ = [
        ("synic", kvm_hyperv_exit_synic),
        ("hcall", kvm_hyperv_exit_hcall),
        ("syndbg", kvm_hyperv_exit_syndbg),
    ]


class kvm_hyperv_exit(Struct):
    """``kvm_run.hyperv`` (KVM_EXIT_HYPERV); ``u`` holds the member ``type`` names."""

    _fields_ = [("type", _u32), ("pad1", _u32), ("u", kvm_hyperv_exit_u)]
    _flags_ = {"type": "HypervExit"}
    _hidden_ = frozenset({"pad1"})


class kvm_run_msr(Struct):
    """``kvm_run.msr`` (KVM_EXIT_X86_RDMSR / WRMSR, with KVM_CAP_X86_USER_SPACE_MSR).

    Userspace sets ``error`` (1: inject #GP) and, for RDMSR, ``data``.
    """

    _fields_ = [
        ("error", _u8),
        ("pad", _u8 * 7),
        ("reason", _u32),
        ("index", _u32),
        ("data", _u64),
    ]
    _flags_ = {"reason": "MsrExitReason"}
    _hidden_ = frozenset({"pad"})


class kvm_run_notify(Struct):
    """``kvm_run.notify`` (KVM_EXIT_NOTIFY, with KVM_CAP_X86_NOTIFY_VMEXIT)."""

    _fields_ = [("flags", _u32)]


class kvm_run_exit(Union):
    """The exit-information union of ``kvm_run`` (anonymous in C), 256 bytes.

    The x86 members; other architectures' (s390, PowerPC, ARM, RISC-V) and
    ``xen`` are reached through ``padding``.
    """

    _fields_ = [
        ("hw", kvm_run_hw),
        ("fail_entry", kvm_run_fail_entry),
        ("ex", kvm_run_ex),
        ("io", kvm_run_io),
        ("debug", kvm_run_debug),
        ("mmio", kvm_run_mmio),
        ("hypercall", kvm_run_hypercall),
        ("tpr_access", kvm_run_tpr_access),
        ("internal", kvm_run_internal),
        ("emulation_failure", kvm_run_emulation_failure),
        ("system_event", kvm_run_system_event),
        ("eoi", kvm_run_eoi),
        ("hyperv", kvm_hyperv_exit),
        ("msr", kvm_run_msr),
        ("notify", kvm_run_notify),
        ("padding", _u8 * 256),
    ]
    _hidden_ = frozenset({"padding"})


class kvm_sync_regs(Struct):
    """``kvm_run.s.regs`` (x86): registers KVM copies out at exits and in at entries.

    Which parts: ``kvm_valid_regs`` / ``kvm_dirty_regs`` (:class:`SyncRegs`), where
    ``KVM_CAP_SYNC_REGS`` offers them.
    """

    _fields_ = [("regs", kvm_regs), ("sregs", kvm_sregs), ("events", kvm_vcpu_events)]


class kvm_run_s(Union):
    """``kvm_run.s``: the sync-regs area, padded to ``SYNC_REGS_SIZE_BYTES``."""

    _fields_ = [("regs", kvm_sync_regs), ("padding", _u8 * SYNC_REGS_SIZE_BYTES)]
    _hidden_ = frozenset({"padding"})


#: The ``kvm_run`` exit member each exit fills, by exit reason (exits not listed,
#: such as HLT or SHUTDOWN, carry no payload; ``emulation_failure`` overlays
#: ``internal`` when ``suberror`` is KVM_INTERNAL_ERROR_EMULATION).
EXIT_MEMBERS: dict[int, str] = {
    KVM_EXIT_UNKNOWN: "hw",
    KVM_EXIT_EXCEPTION: "ex",
    KVM_EXIT_IO: "io",
    KVM_EXIT_HYPERCALL: "hypercall",
    KVM_EXIT_DEBUG: "debug",
    KVM_EXIT_MMIO: "mmio",
    KVM_EXIT_FAIL_ENTRY: "fail_entry",
    KVM_EXIT_TPR_ACCESS: "tpr_access",
    KVM_EXIT_INTERNAL_ERROR: "internal",
    KVM_EXIT_SYSTEM_EVENT: "system_event",
    KVM_EXIT_IOAPIC_EOI: "eoi",
    KVM_EXIT_HYPERV: "hyperv",
    KVM_EXIT_X86_RDMSR: "msr",
    KVM_EXIT_X86_WRMSR: "msr",
    KVM_EXIT_NOTIFY: "notify",
}

_RUN_HEAD = (
    "request_interrupt_window",
    "immediate_exit",
    "exit_reason",
    "ready_for_interrupt_injection",
    "if_flag",
    "flags",
    "cr8",
    "apic_base",
)


class kvm_run(Struct):
    """The ``kvm_run`` structure shared with a vCPU (mapped from its fd), 2352 bytes.

    The exit union's members are fields of their own (``run.io``, ``run.mmio``),
    as in C. The repr shows the head, then only the member the exit reason
    fills, then the sync-regs area when ``kvm_valid_regs`` asks for it.
    """

    _anonymous_ = ("u",)
    _fields_ = [
        ("request_interrupt_window", _u8),
        ("immediate_exit", _u8),
        ("padding1", _u8 * 6),
        ("exit_reason", _u32),
        ("ready_for_interrupt_injection", _u8),
        ("if_flag", _u8),
        ("flags", _u16),
        ("cr8", _u64),
        ("apic_base", _u64),
        ("u", kvm_run_exit),
        ("kvm_valid_regs", _u64),
        ("kvm_dirty_regs", _u64),
        ("s", kvm_run_s),
    ]
    _flags_ = {
        "exit_reason": "ExitReason",
        "flags": "RunFlag",
        "kvm_valid_regs": "SyncRegs",
        "kvm_dirty_regs": "SyncRegs",
    }
    _hidden_ = frozenset({"padding1", "u"})

    def exit_member(self) -> str | None:
        """The name of the exit member this exit reason fills (None: no payload).

        >>> run = kvm_run()
        >>> run.exit_reason = KVM_EXIT_MMIO
        >>> run.exit_member()
        'mmio'
        """
        member = EXIT_MEMBERS.get(int(self.exit_reason))
        if member == "internal" and self.internal.suberror == KVM_INTERNAL_ERROR_EMULATION:
            return "emulation_failure"
        return member

    def shown_fields(self) -> list[str]:
        member = self.exit_member()
        shown = [*_RUN_HEAD, *([member] if member else []), "kvm_valid_regs", "kvm_dirty_regs"]
        if self.kvm_valid_regs or self.kvm_dirty_regs:
            shown.append("s")
        return shown


assert ctypes.sizeof(kvm_run_exit) == 256


# --- VM devices, the VM clock and vCPU events (issue 14) ----------------------------------
# Kept in one block (additive): the VM snapshot (kvmstate.vmstate) saves what these carry.


class kvm_clock_data(Struct):
    """``KVM_GET_CLOCK`` / ``KVM_SET_CLOCK``: the VM's kvmclock in ns (and, with
    ``KVM_CLOCK_REALTIME`` / ``HOST_TSC``, the host's wall clock and TSC at that instant)."""

    _fields_ = [
        ("clock", _u64),
        ("flags", _u32),
        ("pad0", _u32),
        ("realtime", _u64),
        ("host_tsc", _u64),
        ("pad", _u32 * 4),
    ]
    _flags_ = {"flags": "ClockFlag"}
    _hidden_ = frozenset({"pad0", "pad"})


class kvm_pic_state(Struct):
    """One 8259 PIC (``kvm_irqchip.chip.pic``): its registers and init sequence state."""

    _fields_ = [
        ("last_irr", _u8),
        ("irr", _u8),
        ("imr", _u8),
        ("isr", _u8),
        ("priority_add", _u8),
        ("irq_base", _u8),
        ("read_reg_select", _u8),
        ("poll", _u8),
        ("special_mask", _u8),
        ("init_state", _u8),
        ("auto_eoi", _u8),
        ("rotate_on_auto_eoi", _u8),
        ("special_fully_nested_mode", _u8),
        ("init4", _u8),
        ("elcr", _u8),
        ("elcr_mask", _u8),
    ]


class kvm_ioapic_redirtbl_fields(Struct):
    """One IOAPIC redirection entry by field (C: an anonymous struct ``fields``)."""

    _fields_ = [
        ("vector", _u8),
        ("delivery_mode", _u8, 3),
        ("dest_mode", _u8, 1),
        ("delivery_status", _u8, 1),
        ("polarity", _u8, 1),
        ("remote_irr", _u8, 1),
        ("trig_mode", _u8, 1),
        ("mask", _u8, 1),
        ("reserve", _u8, 7),
        ("reserved", _u8 * 4),
        ("dest_id", _u8),
    ]
    _hidden_ = frozenset({"reserve", "reserved"})


class kvm_ioapic_redirtbl(Union):
    """One IOAPIC redirection entry: the 64 bits, or :class:`kvm_ioapic_redirtbl_fields`."""

    _fields_ = [("bits", _u64), ("fields", kvm_ioapic_redirtbl_fields)]


class kvm_ioapic_state(Struct):
    """The IOAPIC (``kvm_irqchip.chip.ioapic``): base, id, IRR and 24 redirection entries."""

    _fields_ = [
        ("base_address", _u64),
        ("ioregsel", _u32),
        ("id", _u32),
        ("irr", _u32),
        ("pad", _u32),
        ("redirtbl", kvm_ioapic_redirtbl * KVM_IOAPIC_NUM_PINS),
    ]
    _hidden_ = frozenset({"pad"})


class kvm_irqchip_chip(Union):
    """``kvm_irqchip.chip``: 512 bytes, a PIC or the IOAPIC by ``chip_id``."""

    _fields_ = [("dummy", _u8 * 512), ("pic", kvm_pic_state), ("ioapic", kvm_ioapic_state)]


class kvm_irqchip(Struct):
    """``KVM_GET_IRQCHIP`` / ``KVM_SET_IRQCHIP``: one chip of the in-kernel irqchip.

    >>> chip = kvm_irqchip(chip_id=KVM_IRQCHIP_IOAPIC)
    >>> chip.chip.ioapic.redirtbl[0].fields.mask
    0
    """

    _fields_ = [("chip_id", _u32), ("pad", _u32), ("chip", kvm_irqchip_chip)]
    _flags_ = {"chip_id": "IrqchipId"}
    _hidden_ = frozenset({"pad"})


class kvm_pit_config(Struct):
    """``KVM_CREATE_PIT2``: ``flags`` (``KVM_PIT_SPEAKER_DUMMY``)."""

    _fields_ = [("flags", _u32), ("pad", _u32 * 15)]
    _hidden_ = frozenset({"pad"})


class kvm_pit_channel_state(Struct):
    """One 8254 PIT channel: count, latches, mode, and when the count was loaded (ns)."""

    _fields_ = [
        ("count", _u32),
        ("latched_count", _u16),
        ("count_latched", _u8),
        ("status_latched", _u8),
        ("status", _u8),
        ("read_state", _u8),
        ("write_state", _u8),
        ("write_latch", _u8),
        ("rw_mode", _u8),
        ("mode", _u8),
        ("bcd", _u8),
        ("gate", _u8),
        # __s64 in C (a ktime in ns); unsigned here like every mirror's integers, so the
        # dict form (unsigned only) keeps all 64 bits: the same bytes either way.
        ("count_load_time", _u64),
    ]


class kvm_pit_state2(Struct):
    """``KVM_GET_PIT2`` / ``KVM_SET_PIT2``: the three PIT channels and ``flags``."""

    _fields_ = [
        ("channels", kvm_pit_channel_state * 3),
        ("flags", _u32),
        ("reserved", _u32 * 9),
    ]
    _flags_ = {"flags": "PitFlag"}
    _hidden_ = frozenset({"reserved"})


class kvm_guest_debug_arch(Struct):
    """``kvm_guest_debug.arch`` (x86): DR0-DR7 for hardware breakpoints."""

    _fields_ = [("debugreg", _u64 * 8)]


class kvm_guest_debug(Struct):
    """``KVM_SET_GUEST_DEBUG``: ``control`` (``KVM_GUESTDBG_*``) and the debug registers."""

    _fields_ = [("control", _u32), ("pad", _u32), ("arch", kvm_guest_debug_arch)]
    _flags_ = {"control": "GuestDebugFlag"}
    _hidden_ = frozenset({"pad"})


class kvm_enable_cap(Struct):
    """``KVM_ENABLE_CAP`` (VM or vCPU): a capability and its four arguments."""

    _fields_ = [("cap", _u32), ("flags", _u32), ("args", _u64 * 4), ("pad", _u8 * 64)]
    _decimal_ = frozenset({"cap"})
    _hidden_ = frozenset({"pad"})

    @classmethod
    def build(cls, cap: int, *args: int, flags: int = 0) -> kvm_enable_cap:
        """One filled in and checked: u32 ``cap`` and ``flags``, at most four u64 ``args``
        (TypeError/ValueError naming the field; ctypes would wrap them).

        >>> kvm_enable_cap.build(KVM_CAP_SPLIT_IRQCHIP, 24).args[0]
        24
        """
        if len(args) > 4:
            raise ValueError(f"KVM_ENABLE_CAP takes at most 4 arguments, not {len(args)}")
        fields = [("cap", cap, 32), ("flags", flags, 32)]
        fields += [(f"args[{i}]", a, 64) for i, a in enumerate(args)]
        for name, value, bits in fields:
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int, not {type(value).__name__}")
            if not 0 <= value < 1 << bits:
                raise ValueError(f"{name} {value:#x} does not fit in {bits} bits")
        out = cls(cap=cap, flags=flags)
        for i, arg in enumerate(args):
            out.args[i] = arg
        return out


class kvm_interrupt(Struct):
    """``KVM_INTERRUPT``: the vector of an external interrupt (userspace irqchip)."""

    _fields_ = [("irq", _u32)]


__all__ += [
    "ClockFlag",
    "GuestDebugFlag",
    "IrqchipId",
    "PitFlag",
    "kvm_clock_data",
    "kvm_enable_cap",
    "kvm_guest_debug",
    "kvm_guest_debug_arch",
    "kvm_interrupt",
    "kvm_ioapic_redirtbl",
    "kvm_ioapic_redirtbl_fields",
    "kvm_ioapic_state",
    "kvm_irqchip",
    "kvm_irqchip_chip",
    "kvm_pic_state",
    "kvm_pit_channel_state",
    "kvm_pit_config",
    "kvm_pit_state2",
]


if not TYPE_CHECKING:  # mypy reads the imports above; a __getattr__ would hide typos from it

    def __getattr__(name: str) -> Any:
        """``uapi.ExitReason`` and the other enum views, imported when first asked for.

        Which names those are is ``uapi_enums.__all__``, read once the module is
        imported; a dunder a tool probes for never imports it.
        """
        if not name.startswith("__"):
            from kvmstate import uapi_enums

            if name in uapi_enums.__all__:
                value = getattr(uapi_enums, name)
                globals()[name] = value
                return value
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
