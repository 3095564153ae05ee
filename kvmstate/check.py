"""Why would ``KVM_SET_NESTED_STATE`` refuse this state? Rule by rule, with the kernel's reasons.

The kernel answers almost every mistake in a nested state with a bare
``EINVAL``. :func:`check` runs the rules that ``KVM_SET_NESTED_STATE``
applies (``arch/x86/kvm/x86.c``, then ``vmx_set_nested_state`` or
``svm_set_nested_state`` and the consistency checks they call, read in
Linux 6.1 and 6.12) on a :class:`~kvmstate.nested.NestedState` and returns
a :class:`Problem` per broken rule: the field, its value, the rule in one
sentence and the kernel function it comes from. :func:`explain` turns them
into text for an error message.

Many rules depend on the vCPU the state is restored into (its CPUID, EFER,
SMM, MAXPHYADDR...) or on the kernel's version. Those go in :class:`Facts`;
:meth:`Facts.from_vcpu` reads what a vCPU lets one read. A rule whose
verdict hangs on a fact that is not known is reported with
``certain=False`` and names the fact that would decide it, rather than
guessing. Two bounds are taken as known whatever the facts: addresses below
4 GiB are legal guest-physical addresses (QEMU's smallest ``phys-bits`` is
32) and none at or above 2^52 is (the architecture's largest MAXPHYADDR).

    >>> problems = check(state, Facts.from_vcpu(vcpu))
    >>> print(explain(state, Facts.from_vcpu(vcpu)))

Nothing here talks to the kernel except :meth:`Facts.from_vcpu`, and no rule
raises on odd input: a garbage state gives problems, never an exception.

Kernel versions. The rules were read in Linux 6.1 and 6.12; where they differ
the problem's ``source`` says so and ``Facts.kernel_version`` decides:

* ``V_NMI_ENABLE`` in vmcb12 needs the NMI intercept in 6.12, not in 6.1;
* EFER.AUTOIBRS and CR4.LAM_SUP are reserved in 6.1 and need their CPUID
  feature in 6.12, which also ignores CR3's LAM bits 61-62 with LAM;
* with EFER.SVME clear in the vCPU, 6.1 and 6.12 alike accept only flags
  == GIF_SET (a clear GIF too is refused): 6.12's svm_set_nested_state has
  the same test as 6.1's, so any kernel that accepts flags 0 there is newer
  than 6.12; for such kernels that case is reported undecided;
* VMX sizes compare with ``sizeof(struct vmcs12)``, 998 bytes (C packs it),
  not the 4096-byte page: a vmcs12 counts from ``size`` 1126 and the shadow
  vmcs12 from 5222, in both versions;
* Linux 7.2 (commit 4f256d5770fe, the v8 patch as applied) added SVM's
  ``hdr.svm.gpat`` and its one SET rule: with NP_ENABLE in vmcb12 and
  ``KVM_X86_QUIRK_NESTED_SVM_SHARED_PAT`` disabled it must be a valid PAT.
  The quirk's state decides (``Facts.nested_svm_shared_pat``); when it is not
  known, a ``kernel_version`` before 7.2 does (those kernels ignore gpat).
  A kernel numbered before 7.2 that carries the series as a backport is
  judged by the quirk fact alone: give it.

Not checked, because SET does not check it or nothing here can know it:
vmcb12's ``event_inj`` (neither version validates it), vmcs12's
``launch_state`` and host address-space size (VMLAUNCH/VMRESUME check them,
SET does not), eVMCS control checks (Hyper-V CPUID), and guest memory (the
VMCS link pointer's page is read at SET: reported undecided; vmcb12, the
bitmaps and the like are read at the next KVM_RUN).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import re
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from kvmstate import uapi
from kvmstate import vmcb as svm
from kvmstate import vmcs12 as vmx
from kvmstate._struct import format_value
from kvmstate.nested import HEADER_SIZE, KNOWN_FLAGS, NestedState
from kvmstate.state import VcpuState
from kvmstate.uapi import NestedFlag, NestedFormat

__all__ = [
    "CPUID_FEATURES",
    "INVALID_GPA",
    "RULES",
    "VMCS12_C_SIZE",
    "VMX_MSRS",
    "Facts",
    "Problem",
    "check",
    "explain",
    "format_problems",
    "parse_kernel_version",
]

_U64 = (1 << 64) - 1
#: "No address" in the headers (vmxon_pa, vmcs12_pa, the VMCS link pointer): -1 as a u64.
INVALID_GPA = _U64

#: Size of ``struct vmcs12`` as C packs it (998 bytes): what vmx_set_nested_state
#: copies and compares ``size`` with, not the 4096-byte page it lives in.
VMCS12_C_SIZE = vmx._C_SIZE
_VMCS12_MIN = HEADER_SIZE + VMCS12_C_SIZE  # 1126
# The shadow vmcs12 starts after the whole first page.
_SHADOW_MIN = HEADER_SIZE + uapi.KVM_STATE_NESTED_VMX_VMCS_SIZE + VMCS12_C_SIZE  # 5222
_VMCB_MIN = HEADER_SIZE + uapi.KVM_STATE_NESTED_SVM_VMCB_SIZE  # 4224

_GM = int(NestedFlag.GUEST_MODE)
_RP = int(NestedFlag.RUN_PENDING)
_EVMCS = int(NestedFlag.EVMCS)
_GIF = int(NestedFlag.GIF_SET)
_SVM_FLAGS = _GM | _RP | _GIF
_SMM_GM = uapi.KVM_STATE_NESTED_SMM_GUEST_MODE
_SMM_VMXON = uapi.KVM_STATE_NESTED_SMM_VMXON

# Addresses below 2^32 are legal for any vCPU, none at or above 2^52 is (see the module doc).
_SURELY_LEGAL_BITS = 32
_ARCH_MAX_PHYS_BITS = 52

# Kernel sources the rules cite.
_X86 = "arch/x86/kvm/x86.c: kvm_arch_vcpu_ioctl (KVM_SET_NESTED_STATE)"
_VSET = "arch/x86/kvm/vmx/nested.c: vmx_set_nested_state"
_VEXEC = "arch/x86/kvm/vmx/nested.c: nested_check_vm_execution_controls"
_VEXIT = "arch/x86/kvm/vmx/nested.c: nested_check_vm_exit_controls"
_VENTRY = "arch/x86/kvm/vmx/nested.c: nested_check_vm_entry_controls"
_VHOST = "arch/x86/kvm/vmx/nested.c: nested_vmx_check_host_state"
_VGUEST = "arch/x86/kvm/vmx/nested.c: nested_vmx_check_guest_state"
_SSET = "arch/x86/kvm/svm/nested.c: svm_set_nested_state"
_SCTL = "arch/x86/kvm/svm/nested.c: __nested_vmcb_check_controls"
_SSAVE = "arch/x86/kvm/svm/nested.c: __nested_vmcb_check_save"
_SGPAT = f"{_SSET} (Linux 7.2+, commit {uapi.GPAT_COMMIT[:12]})"
_LIB = "kvmstate: Vcpu.set_nested_state (the kernel reads `size` bytes)"


# --- facts ------------------------------------------------------------------------

#: CPUID features the rules consult: name -> (leaf, subleaf, register, bit).
CPUID_FEATURES: Mapping[str, tuple[int, int, str, int]] = MappingProxyType(
    {
        "vme": (1, 0, "edx", 1),
        "de": (1, 0, "edx", 2),
        "pse": (1, 0, "edx", 3),
        "tsc": (1, 0, "edx", 4),
        "pae": (1, 0, "edx", 6),
        "mce": (1, 0, "edx", 7),
        "pge": (1, 0, "edx", 13),
        "fxsr": (1, 0, "edx", 24),
        "xmm": (1, 0, "edx", 25),
        "vmx": (1, 0, "ecx", 5),
        "smx": (1, 0, "ecx", 6),
        "pcid": (1, 0, "ecx", 17),
        "xsave": (1, 0, "ecx", 26),
        "fsgsbase": (7, 0, "ebx", 0),
        "smep": (7, 0, "ebx", 7),
        "smap": (7, 0, "ebx", 20),
        "umip": (7, 0, "ecx", 2),
        "pku": (7, 0, "ecx", 3),
        "la57": (7, 0, "ecx", 16),
        "lam": (7, 1, "eax", 26),
        "svm": (0x80000001, 0, "ecx", 2),
        "nx": (0x80000001, 0, "edx", 20),
        "fxsr_opt": (0x80000001, 0, "edx", 25),
        "lm": (0x80000001, 0, "edx", 29),
        "autoibrs": (0x80000021, 0, "eax", 8),
    }
)

#: VMX capability MSRs the VMX rules use when known (``Facts.vmx_msrs``): index -> name.
VMX_MSRS: Mapping[int, str] = MappingProxyType(
    {
        0x485: "IA32_VMX_MISC",
        0x486: "IA32_VMX_CR0_FIXED0",
        0x487: "IA32_VMX_CR0_FIXED1",
        0x488: "IA32_VMX_CR4_FIXED0",
        0x489: "IA32_VMX_CR4_FIXED1",
        0x48B: "IA32_VMX_PROCBASED_CTLS2",
        0x48C: "IA32_VMX_EPT_VPID_CAP",
        0x48D: "IA32_VMX_TRUE_PINBASED_CTLS",
        0x48E: "IA32_VMX_TRUE_PROCBASED_CTLS",
        0x48F: "IA32_VMX_TRUE_EXIT_CTLS",
        0x490: "IA32_VMX_TRUE_ENTRY_CTLS",
        0x491: "IA32_VMX_VMFUNC",
    }
)
_MSR_IA32_FEATURE_CONTROL = 0x3A

_BOOL_FACTS = (
    "has_vmx", "has_svm", "in_smm", "evmcs_enabled", "npt_enabled", "la57",
    "nested_svm_shared_pat",
)  # fmt: skip
_U32_MAX, _INT_MAX = (1 << 32) - 1, (1 << 31) - 1
# Integer facts and their largest value: registers and MSRs are u64, a capability a
# non-negative C int (what KVM_CHECK_EXTENSION returns), MAXPHYADDR at most 64 bits.
_INT_FACTS: Mapping[str, int] = MappingProxyType(
    {
        "maxphyaddr": 64,
        "efer": _U64,
        "cr0": _U64,
        "cr3": _U64,
        "cr4": _U64,
        "nested_state_cap": _INT_MAX,
        "feature_control": _U64,
    }
)


def _check_fact_int(name: str, value: object, largest: int) -> int:
    """An int fact: an int (not a bool) in 0..largest, or TypeError/ValueError naming it."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"fact {name} must be int or None, not {value!r}")
    if not 0 <= value <= largest:
        top = hex(largest) if largest > _INT_MAX else str(largest)
        shown = hex(value) if value > _INT_MAX else str(value)
        raise ValueError(f"fact {name} is {shown}, outside 0..{top}")
    return value


def _check_features(features: object) -> frozenset[str]:
    """``cpu_features``: names of :data:`CPUID_FEATURES`, as an iterable of str or a comma list.

    A str is a comma-separated list (``"svm"``, ``"svm,lm,nx"``), the form
    ``--fact cpu_features=`` takes; anything else must be an iterable of str.
    """
    if isinstance(features, str):
        names = frozenset(t.strip().lower() for t in features.split(",") if t.strip())
    else:
        try:
            items = list(features)  # type: ignore[call-overload]
        except TypeError:
            raise TypeError(
                f"fact cpu_features must be a set of feature names or a comma-separated str, "
                f"not {type(features).__name__}"
            ) from None
        for item in items:
            if not isinstance(item, str):
                raise TypeError(f"fact cpu_features: a feature name must be a str, not {item!r}")
        names = frozenset(items)
    unknown = names - CPUID_FEATURES.keys()
    if unknown:
        raise ValueError(
            f"unknown CPUID features {sorted(unknown)} (known: {sorted(CPUID_FEATURES)})"
        )
    return names


def _check_version(version: object) -> tuple[int, ...]:
    """``kernel_version``: a tuple of ints, or a release str (:func:`parse_kernel_version`)."""
    if isinstance(version, str):
        parsed = parse_kernel_version(version)
        if parsed is None:
            raise ValueError(f"fact kernel_version: {version!r} is not a kernel release like 6.1.0")
        return parsed
    if not isinstance(version, (tuple, list)):
        raise TypeError(
            f"fact kernel_version must be a tuple of ints such as (6, 1, 0) or a release str, "
            f"not {type(version).__name__}"
        )
    if not version:
        raise ValueError("fact kernel_version must not be empty")
    for part in version:
        if not isinstance(part, int) or isinstance(part, bool):
            raise TypeError(f"fact kernel_version: {part!r} is not an int")
        if part < 0:
            raise ValueError(f"fact kernel_version: {part} is negative")
    return tuple(version)


def _check_vmx_msrs(msrs: object) -> Mapping[int, int]:
    """``vmx_msrs``: u32 index -> u64 value, read-only; refused (never masked) when out of range."""
    if not isinstance(msrs, Mapping):
        raise TypeError(f"fact vmx_msrs must be a mapping of index to value, not {msrs!r}")
    out: dict[int, int] = {}
    for index, value in msrs.items():
        _check_fact_int("vmx_msrs index", index, _U32_MAX)
        out[index] = _check_fact_int(f"vmx_msrs[{index:#x}]", value, _U64)
    return MappingProxyType(out)


@dataclasses.dataclass(frozen=True)
class Facts:
    """What is known about the vCPU (and kernel) a state is meant for; ``None`` = unknown.

    Build one by hand (``Facts(has_svm=True, efer=EFER_SVME, maxphyaddr=48)``),
    from a vCPU (:meth:`from_vcpu`), from a saved vCPU state (:meth:`from_state`)
    or from ``NAME=VALUE`` text (:meth:`from_strings`, what ``kvmstate check
    --fact`` uses).

    Every field is checked when the object is made: a bool fact takes a
    bool; an int fact an int (not a bool) within its width (registers and
    MSRs 64 bits, ``maxphyaddr`` 0..64, ``nested_state_cap`` a non-negative C
    int), else TypeError/ValueError naming the fact; nothing is masked.
    Two fields also take the text forms of :meth:`from_strings`:
    ``kernel_version`` a release string (``"6.1"`` is ``(6, 1)``,
    ``"6.1.0-50-amd64"`` is ``(6, 1, 0)``), ``cpu_features`` a comma-separated
    string (``"svm"`` is ``{"svm"}``, ``"svm,lm"`` is ``{"svm", "lm"}``, never
    the letters of one name)::

        >>> Facts(kernel_version="6.1", cpu_features="svm")
        Facts(cpu_features={svm}, kernel_version=(6, 1))
    """

    #: The KVM module behind the vCPU: ``"vmx"`` (kvm_intel) or ``"svm"`` (kvm_amd).
    vendor: str | None = None
    #: CPUID.1:ECX.VMX in the vCPU's CPUID (overrides ``cpu_features`` for "vmx").
    has_vmx: bool | None = None
    #: CPUID.80000001h:ECX.SVM in the vCPU's CPUID (overrides ``cpu_features`` for "svm").
    has_svm: bool | None = None
    #: Every feature of :data:`CPUID_FEATURES` the vCPU's CPUID has (the others it lacks).
    cpu_features: frozenset[str] | None = None
    #: The vCPU's MAXPHYADDR (CPUID 80000008h:EAX[7:0]; 36 without that leaf).
    maxphyaddr: int | None = None
    #: The vCPU's EFER (SVM reads its SVME bit), as KVM_GET_SREGS gives it.
    efer: int | None = None
    #: The vCPU's CR0 (svm_set_nested_state checks its CD/NW bits).
    cr0: int | None = None
    #: The vCPU's CR3 (svm_set_nested_state reloads it and checks it is legal).
    cr3: int | None = None
    #: The vCPU's CR4 (informational: CR4.VMXE, CR4.LA57).
    cr4: int | None = None
    #: Whether the vCPU is in SMM (KVM_GET_VCPU_EVENTS ``smi.smm``).
    in_smm: bool | None = None
    #: Whether KVM_CAP_HYPERV_ENLIGHTENED_VMCS was enabled on the vCPU (no ioctl reads it).
    evmcs_enabled: bool | None = None
    #: kvm_amd's ``npt`` parameter: nested paging, which NP_ENABLE in vmcb12 needs.
    npt_enabled: bool | None = None
    #: Whether 57-bit linear addresses are canonical here: the vCPU's CR4.LA57 in 6.1,
    #: the host's 5-level paging for MSR and base addresses in 6.12.
    la57: bool | None = None
    #: The kernel's version, e.g. ``(6, 1, 0)`` (rules that differ between versions).
    kernel_version: tuple[int, ...] | None = None
    #: KVM_CAP_NESTED_STATE: 0 without nesting, 8320 on kvm_intel, 4224 on kvm_amd.
    nested_state_cap: int | None = None
    #: IA32_FEATURE_CONTROL. No SET rule reads it (VMXON does); kept for callers.
    feature_control: int | None = None
    #: Whether ``KVM_X86_QUIRK_NESTED_SVM_SHARED_PAT`` is in force for the VM (True: L2
    #: shares L1's PAT, the default and all a kernel before 7.2 does; False: the VMM
    #: disabled it with KVM_CAP_DISABLE_QUIRKS2, which only a 7.2+ kernel accepts). No
    #: ioctl reads it back, so :meth:`from_vcpu` leaves it None.
    nested_svm_shared_pat: bool | None = None
    #: VMX capability MSRs (see :data:`VMX_MSRS`) as the vCPU reports them: index -> value.
    vmx_msrs: Mapping[int, int] | None = dataclasses.field(default=None, hash=False)

    def __post_init__(self) -> None:
        if self.vendor is not None and not isinstance(self.vendor, str):
            raise TypeError(f"fact vendor must be a str or None, not {self.vendor!r}")
        if self.vendor not in (None, "vmx", "svm"):
            raise ValueError(f"vendor must be 'vmx', 'svm' or None, not {self.vendor!r}")
        for name in _BOOL_FACTS:
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise TypeError(f"fact {name} must be bool or None, not {value!r}")
        for name, largest in _INT_FACTS.items():
            value = getattr(self, name)
            if value is not None:
                _check_fact_int(name, value, largest)
        if self.cpu_features is not None:
            object.__setattr__(self, "cpu_features", _check_features(self.cpu_features))
        if self.kernel_version is not None:
            object.__setattr__(self, "kernel_version", _check_version(self.kernel_version))
        if self.vmx_msrs is not None:
            object.__setattr__(self, "vmx_msrs", _check_vmx_msrs(self.vmx_msrs))

    # --- reading facts -------------------------------------------------------------

    def feature(self, name: str) -> bool | None:
        """Whether the vCPU's CPUID has ``name`` (a :data:`CPUID_FEATURES` key); None: unknown."""
        if name == "vmx" and self.has_vmx is not None:
            return self.has_vmx
        if name == "svm" and self.has_svm is not None:
            return self.has_svm
        if self.cpu_features is None:
            return None
        return name in self.cpu_features

    def target_vendor(self) -> str | None:
        """``"vmx"``/``"svm"`` from :attr:`vendor`, else from :attr:`nested_state_cap`."""
        if self.vendor is not None:
            return self.vendor
        return {8320: "vmx", 4224: "svm"}.get(self.nested_state_cap or 0)

    def msr(self, index: int) -> int | None:
        """A VMX capability MSR from :attr:`vmx_msrs`, None if unknown."""
        return None if self.vmx_msrs is None else self.vmx_msrs.get(index)

    def known(self) -> dict[str, Any]:
        """The facts that are known, by name."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None
        }

    def __repr__(self) -> str:
        parts = []
        for name, value in self.known().items():
            if isinstance(value, int) and not isinstance(value, bool) and value > 9:
                text = hex(value) if name not in ("maxphyaddr", "nested_state_cap") else str(value)
            elif isinstance(value, frozenset):
                text = "{" + ", ".join(sorted(value)) + "}"
            elif isinstance(value, Mapping):
                text = "{" + ", ".join(f"{k:#x}: {v:#x}" for k, v in value.items()) + "}"
            else:
                text = repr(value)
            parts.append(f"{name}={text}")
        return f"Facts({', '.join(parts)})"

    # --- gathering facts -------------------------------------------------------------

    @classmethod
    def from_vcpu(cls, vcpu: Any) -> Facts:
        """What a :class:`~kvmstate.vcpu.Vcpu` lets one read; a failed read leaves its fact None.

        Read: CPUID (``get_cpuid2``: features, MAXPHYADDR as KVM derives it),
        sregs (EFER, CR0, CR3, CR4), vCPU events (SMM), ``KVM_CAP_NESTED_STATE``,
        the VMX capability MSRs and IA32_FEATURE_CONTROL when the CPUID has
        VMX, kvm_amd's ``npt`` parameter, and this machine's kernel version.
        Not readable, so left None: eVMCS enablement, LA57 canonicality and
        whether the VM disabled ``KVM_X86_QUIRK_NESTED_SVM_SHARED_PAT``.
        """
        found: dict[str, Any] = {}
        try:
            cpuid = _cpuid_table(vcpu.get_cpuid2())
        except (OSError, ValueError):
            cpuid = None
        if cpuid is not None:
            features = frozenset(
                name
                for name, (leaf, sub, reg, bit) in CPUID_FEATURES.items()
                if _cpuid_reg(cpuid, leaf, sub, reg) >> bit & 1
            )
            found["cpu_features"] = features
            found["has_vmx"] = "vmx" in features
            found["has_svm"] = "svm" in features
            found["maxphyaddr"] = _kvm_maxphyaddr(cpuid)
        try:
            sregs = vcpu.get_sregs()
            found.update(efer=sregs.efer, cr0=sregs.cr0, cr3=sregs.cr3, cr4=sregs.cr4)
        except (OSError, ValueError):
            pass
        with contextlib.suppress(OSError, ValueError):
            found["in_smm"] = bool(vcpu.get_vcpu_events().smi.smm)
        try:
            cap = int(vcpu.nested_state_size)
            found["nested_state_cap"] = cap
            vendor = {8320: "vmx", 4224: "svm"}.get(cap)
            if vendor:
                found["vendor"] = vendor
        except (OSError, ValueError):
            pass
        if found.get("has_vmx"):
            msrs = _read_msrs(vcpu, VMX_MSRS)
            if msrs:
                found["vmx_msrs"] = msrs
            control = _read_msrs(vcpu, [_MSR_IA32_FEATURE_CONTROL])
            if control:
                found["feature_control"] = control[_MSR_IA32_FEATURE_CONTROL]
        npt = _read_bool_param("/sys/module/kvm_amd/parameters/npt")
        if npt is not None:
            found["npt_enabled"] = npt
        version = parse_kernel_version(os.uname().release)
        if version is not None:
            found["kernel_version"] = version
        return cls(**found)

    @classmethod
    def from_state(cls, state: VcpuState) -> Facts:
        """What a saved vCPU (a :class:`~kvmstate.state.VcpuState`) tells of the vCPU it restores.

        :func:`kvmstate.state.restore` sets CPUID, then the sregs, then the
        nested state, so at ``KVM_SET_NESTED_STATE`` the vCPU has the saved
        CPUID (features, MAXPHYADDR) and registers (EFER, CR0, CR3, CR4, from
        ``sregs`` or else ``sregs2``), and the saved VMX capability MSRs and
        IA32_FEATURE_CONTROL where the MSRs hold them. Nothing about the target
        machine (vendor, ``KVM_CAP_NESTED_STATE``, kernel version, ``npt``) and
        not SMM (the vCPU events come after the nested state) is taken::

            >>> Facts.from_state(kvmstate.snapshot.loads_vcpu(data)).efer
            4096
        """
        if not isinstance(state, VcpuState):
            raise TypeError(f"from_state() needs a VcpuState, not {type(state).__name__}")
        found: dict[str, Any] = {}
        cpuid = state.cpuid
        if cpuid is not None:
            table = _cpuid_table(cpuid)
            features = frozenset(
                name
                for name, (leaf, sub, reg, bit) in CPUID_FEATURES.items()
                if _cpuid_reg(table, leaf, sub, reg) >> bit & 1
            )
            found.update(
                cpu_features=features,
                has_vmx="vmx" in features,
                has_svm="svm" in features,
                maxphyaddr=_kvm_maxphyaddr(table),
            )
        sregs = state.sregs if state.sregs is not None else state.sregs2
        if sregs is not None:
            found.update(efer=sregs.efer, cr0=sregs.cr0, cr3=sregs.cr3, cr4=sregs.cr4)
        msrs = state.msrs or {}
        if found.get("has_vmx"):
            vmx_msrs = {i: msrs[i] for i in VMX_MSRS if i in msrs}
            if vmx_msrs:
                found["vmx_msrs"] = vmx_msrs
            if _MSR_IA32_FEATURE_CONTROL in msrs:
                found["feature_control"] = msrs[_MSR_IA32_FEATURE_CONTROL]
        return cls(**found)

    @classmethod
    def from_strings(cls, pairs: Mapping[str, str] | Iterable[tuple[str, str]]) -> Facts:
        """Facts from text, as ``kvmstate check --fact NAME=VALUE`` gives them.

        Booleans take 1/0/yes/no/true/false, integers any Python literal
        (``0x1000``), ``kernel_version`` a release (``6.1.0-50-amd64``),
        ``cpu_features`` a comma list, ``vmx_msrs`` ``INDEX:VALUE`` pairs
        separated by commas, ``vendor`` vmx or svm; ``svme=1`` is short for
        ``efer=0x1000`` (EFER.SVME alone). Raises ValueError naming a bad pair.
        """
        items = pairs.items() if isinstance(pairs, Mapping) else pairs
        values: dict[str, Any] = {}
        names = {f.name for f in dataclasses.fields(cls)}
        for name, text in items:
            text = text.strip()
            value: Any
            try:
                if name == "svme":
                    name, value = "efer", svm.EFER_SVME if _parse_bool(text) else 0
                elif name in _BOOL_FACTS:
                    value = _parse_bool(text)
                elif name in _INT_FACTS:
                    value = int(text, 0)
                elif name == "vendor":
                    value = text.lower()
                elif name == "kernel_version":
                    value = parse_kernel_version(text)
                    if value is None:
                        raise ValueError("not a kernel release like 6.1.0")
                elif name == "cpu_features":
                    value = frozenset(t.strip().lower() for t in text.split(",") if t.strip())
                elif name == "vmx_msrs":
                    value = _parse_msrs(text)
                elif name not in names:
                    raise KeyError(name)
                else:  # a field without a parser of its own: by its annotation
                    value = _parse_as(typing.get_type_hints(cls)[name], text)
            except KeyError:
                raise ValueError(
                    f"unknown fact {name!r} (known: {', '.join(sorted(names | {'svme'}))})"
                ) from None
            except ValueError as exc:
                raise ValueError(f"fact {name}={text!r}: {exc}") from None
            if name in values:
                raise ValueError(f"fact {name} is given twice")
            values[name] = value
        try:
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise ValueError(str(exc)) from None


def _parse_as(hint: Any, text: str) -> Any:
    """``text`` as a value of the Facts field type ``hint`` (``X | None``).

    So that a field added to :class:`Facts` is settable from the command line
    before anyone writes it a parser: bools, ints, strs, tuples of ints
    (dotted), sets of strs (comma list), int-to-int mappings (INDEX:VALUE).
    """
    kinds = [k for k in typing.get_args(hint) if k is not type(None)] or [hint]
    kind = kinds[0] if len(kinds) == 1 else hint
    origin = typing.get_origin(kind) or kind
    if kind is bool:
        return _parse_bool(text)
    if kind is int:
        return int(text, 0)
    if kind is str:
        return text
    if origin is tuple:
        return tuple(int(part, 0) for part in text.split("."))
    if origin in (frozenset, set):
        return frozenset(t.strip() for t in text.split(",") if t.strip())
    if isinstance(origin, type) and issubclass(origin, Mapping):
        return _parse_msrs(text)
    raise ValueError(f"no text form for a fact of type {hint}")


def parse_kernel_version(release: str) -> tuple[int, ...] | None:
    """``(6, 1, 0)`` from a release string such as ``6.1.0-50-amd64``; None if it has none."""
    match = re.match(r"\s*(\d+)\.(\d+)(?:\.(\d+))?", release)
    if match is None:
        return None
    return tuple(int(part) for part in match.groups() if part is not None)


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "y", "yes", "true", "on"):
        return True
    if lowered in ("0", "n", "no", "false", "off"):
        return False
    raise ValueError("expected 1/0, yes/no or true/false")


def _parse_msrs(text: str) -> dict[int, int]:
    msrs: dict[int, int] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        index, sep, value = item.partition(":")
        if not sep:
            raise ValueError("expected INDEX:VALUE pairs, e.g. 0x48d:0xff00000016")
        msrs[int(index, 0)] = int(value, 0)
    return msrs


def _cpuid_table(cpuid: Any) -> dict[tuple[int, int], Any]:
    table: dict[tuple[int, int], Any] = {}
    for entry in list(cpuid.items())[: len(cpuid)]:
        significant = entry.flags & uapi.KVM_CPUID_FLAG_SIGNIFCANT_INDEX
        table[(entry.function, entry.index if significant else -1)] = entry
    return table


def _cpuid_reg(table: Mapping[tuple[int, int], Any], leaf: int, sub: int, reg: str) -> int:
    entry = table.get((leaf, sub)) or table.get((leaf, -1))
    return int(getattr(entry, reg)) if entry is not None else 0


def _kvm_maxphyaddr(table: Mapping[tuple[int, int], Any]) -> int:
    """MAXPHYADDR as cpuid_query_maxphyaddr (arch/x86/kvm/cpuid.c) derives it: 36 by default."""
    if _cpuid_reg(table, 0x80000000, 0, "eax") < 0x80000008:
        return 36
    entry = table.get((0x80000008, 0)) or table.get((0x80000008, -1))
    return int(entry.eax) & 0xFF if entry is not None else 36


def _read_msrs(vcpu: Any, indices: Iterable[int]) -> dict[int, int]:
    wanted = list(indices)
    try:
        return dict(vcpu.get_msrs(wanted))
    except (OSError, ValueError):
        pass
    out: dict[int, int] = {}
    for index in wanted:  # one by one: keep those that can be read
        try:
            out.update(vcpu.get_msrs([index]))
        except (OSError, ValueError):
            continue
    return out


def _read_bool_param(path: str) -> bool | None:
    try:
        return _parse_bool(Path(path).read_text().strip())
    except (OSError, ValueError):
        return None


# --- problems -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Problem:
    """One rule of KVM_SET_NESTED_STATE that a state breaks (or may break).

    ``field`` is a dotted path into the state (``hdr.svm.vmcb_pa``,
    ``vmcb12.control.asid``, ``flags``), or ``vcpu.<register>`` / ``kvm`` for
    a rule about the target rather than the state. ``certain`` is False when
    the verdict depends on something not known here; ``needs`` then names it
    (a :class:`Facts` field, or what else would decide it).
    """

    field: str
    value: int | None
    rule: str
    source: str
    certain: bool = True
    needs: str | None = None
    #: The rule function of this module that found it (``svm_controls``...), see :data:`RULES`.
    rule_id: str = ""

    @property
    def value_text(self) -> str:
        """The value as the field's own decoder shows it (flag names, hex); "-" if None."""
        return _show(self.field, self.value)

    @property
    def subject(self) -> str:
        """``field = value`` (just the field when the value is not known)."""
        return self.field if self.value is None else f"{self.field} = {self.value_text}"

    def __str__(self) -> str:
        text = f"{self.subject}: {self.rule} [{self.source}]"
        if not self.certain:
            text += f" (undecided: depends on {self.needs}, not known here)"
        return text

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: every field, plus ``value_text``."""
        out = dataclasses.asdict(self)
        out["value_text"] = None if self.value is None else self.value_text
        return out


# The structure that decodes each path prefix's fields (flag names, decimal counts).
_OWNERS: tuple[tuple[str, Any], ...] = (
    ("hdr.vmx.smm.", uapi.kvm_vmx_nested_state_hdr_smm),
    ("hdr.vmx.", uapi.kvm_vmx_nested_state_hdr),
    ("hdr.svm.", uapi.kvm_svm_nested_state_hdr),
    ("vmcb12.control.", svm.vmcb_control_area),
    ("vmcb12.save.cs.", svm.vmcb_seg),
    ("vmcb12.save.", svm.vmcb_save_area),
    ("vmcs12.", vmx.vmcs12),
    ("shadow_vmcs12.", vmx.vmcs12),
    ("vcpu.", svm.vmcb_save_area),  # efer, cr0, cr4 decode the same way
    ("", uapi.kvm_nested_state_header),
)


def _show(field: str, value: int | None) -> str:
    if value is None:
        return "-"
    owner = next(o for prefix, o in _OWNERS if field.startswith(prefix))
    name = re.sub(r"\[\d+\]$", "", field.rsplit(".", 1)[-1])
    return format_value(value, name, owner)


# --- the context the rules read ----------------------------------------------------------


class _Ctx:
    """The state, the facts and the problems found so far, with the kernel's helpers."""

    def __init__(self, state: NestedState, facts: Facts, blob_len: int | None) -> None:
        self.state = state
        self.facts = facts
        self.blob_len = blob_len
        h = state.header
        self.flags = int(h.flags)
        self.fmt = int(h.format)
        self.size = int(h.size)
        self.problems: list[Problem] = []
        self.rule_id = ""  # the rule running now, stamped on its problems
        # Bytes the kernel would read that this buffer really holds.
        self.avail = min(self.size, state.capacity)
        self.vmx = state.vmx
        self.svm = state.svm
        self.v12 = self._vmcs12(HEADER_SIZE) if self.avail >= _VMCS12_MIN else None
        shadow_at = HEADER_SIZE + uapi.KVM_STATE_NESTED_VMX_VMCS_SIZE
        self.shadow = self._vmcs12(shadow_at) if self.avail >= _SHADOW_MIN else None
        self.vmcb = state.vmcb12 if self.avail >= _VMCB_MIN else None

    def _vmcs12(self, offset: int) -> vmx.vmcs12:
        # The kernel copies sizeof(struct vmcs12) bytes, so a short page still counts.
        raw = bytes(self.state.buffer[offset : offset + VMCS12_C_SIZE])
        return vmx.vmcs12.from_buffer_copy(raw.ljust(vmx.VMCS12_SIZE, b"\0"))

    # --- reporting ---------------------------------------------------------------

    def report(
        self,
        verdict: bool | None,
        field: str,
        value: int | None,
        rule: str,
        source: str,
        needs: str | None = None,
    ) -> None:
        """Record a problem: ``verdict`` True = broken, None = undecided (``needs``), False = ok."""
        if verdict is False:
            return
        certain = verdict is True
        if not certain and needs is None:  # a rule bug: never drop the problem for it
            needs = "an unnamed fact"
        needs = None if certain else needs
        self.problems.append(Problem(field, value, rule, source, certain, needs, self.rule_id))

    # --- kernel helpers, three-valued: True = breaks, False = fine, None = unknown -----

    def feature(self, name: str) -> bool | None:
        return self.facts.feature(name)

    def illegal_gpa(self, gpa: int) -> bool | None:
        """Not ``kvm_vcpu_is_legal_gpa``: bits at or above MAXPHYADDR set."""
        gpa &= _U64
        bits = self.facts.maxphyaddr
        if bits is not None:
            return gpa >> bits != 0
        if gpa >> _ARCH_MAX_PHYS_BITS:
            return True
        return None if gpa >> _SURELY_LEGAL_BITS else False

    def bad_page(self, gpa: int) -> bool | None:
        """Not ``page_address_valid``: unaligned, or beyond MAXPHYADDR."""
        return True if gpa & 0xFFF else self.illegal_gpa(gpa)

    def bad_aligned(self, gpa: int, alignment: int) -> bool | None:
        """Not ``kvm_vcpu_is_legal_aligned_gpa``."""
        return True if gpa % alignment else self.illegal_gpa(gpa)

    def page_rule(self, field: str, gpa: int, source: str, what: str = "") -> None:
        self.report(
            self.bad_page(gpa),
            field,
            gpa,
            f"{what or field.rsplit('.', 1)[-1]} must be a page-aligned guest-physical "
            "address below 2^MAXPHYADDR",
            source,
            "maxphyaddr",
        )

    def newer_rule(self) -> bool | None:
        """A rule in 6.12 but not in 6.1: applies? (None between them or unknown)."""
        v = self.facts.kernel_version
        if v is None:
            return None
        if v[:2] <= (6, 1):
            return False
        return True if v[:2] >= (6, 12) else None

    def since(self, release: tuple[int, int]) -> bool | None:
        """Whether the kernel is ``release`` or later (None: version unknown)."""
        v = self.facts.kernel_version
        return None if v is None else v[:2] >= release

    def both_kernels_rule(self) -> bool | None:
        """A rule read in 6.1 and 6.12 that a later kernel may have dropped."""
        v = self.facts.kernel_version
        if v is None:
            return None
        return True if v[:2] <= (6, 12) else None

    def noncanonical(self, value: int) -> bool | None:
        """Not canonical: at 57 bits with LA57, at 48 without; unknown LA57 decides only
        the addresses canonical at 48 bits (fine) or not even at 57 (broken)."""
        la57 = self.facts.la57
        if la57 is not None:
            return not _canonical(value, 57 if la57 else 48)
        if _canonical(value, 48):
            return False
        return True if not _canonical(value, 57) else None

    def has2(self, bit: int) -> bool:
        """``nested_cpu_has2``: a secondary control, only if the primary enables them."""
        v = self.v12
        if v is None:
            return False
        primary = v.cpu_based_vm_exec_control & vmx.CPU_BASED_ACTIVATE_SECONDARY_CONTROLS
        return bool(primary and v.secondary_vm_exec_control & bit)


def _all(*verdicts: bool | None) -> bool | None:
    """Several conditions that must all hold for a rejection."""
    if any(v is False for v in verdicts):
        return False
    return True if all(v is True for v in verdicts) else None


def _any(*verdicts: bool | None) -> bool | None:
    """Several conditions of which any one rejects."""
    if any(v is True for v in verdicts):
        return True
    return None if any(v is None for v in verdicts) else False


def _canonical(value: int, bits: int) -> bool:
    """``__is_canonical_address``: bits 63 down to ``bits - 1`` all equal."""
    top = (value & _U64) >> (bits - 1)
    return top in (0, (1 << (65 - bits)) - 1)


class _Decoder:
    """An owner for format_value: decodes the field ``x`` with ``kind``."""

    def __init__(self, kind: Any) -> None:
        self._flags_ = {"x": kind}


def _names(kind: Any, bits: int) -> str:
    """``bits`` by the names of the IntFlag ``kind`` (hex for unnamed bits)."""
    return format_value(bits, "x", _Decoder(kind))


# --- rules ---------------------------------------------------------------------------

_Scope = Callable[[_Ctx], bool]
#: Every rule, in the order the kernel applies them: (when it applies, the rule).
_REGISTRY: list[tuple[_Scope, Callable[[_Ctx], None]]] = []


def _rule(scope: _Scope) -> Callable[[Callable[[_Ctx], None]], Callable[[_Ctx], None]]:
    def register(func: Callable[[_Ctx], None]) -> Callable[[_Ctx], None]:
        _REGISTRY.append((scope, func))
        return func

    return register


# Scopes follow the kernel's early returns: a rule only runs where the kernel reaches it.
def _any_state(c: _Ctx) -> bool:
    return True


def _vmx(c: _Ctx) -> bool:
    return c.fmt == NestedFormat.VMX


def _vmx_vmxon(c: _Ctx) -> bool:
    return _vmx(c) and c.vmx.vmxon_pa != INVALID_GPA


def _vmx_page(c: _Ctx) -> bool:
    """VMXON with a vmcs12 in the state (size covers struct vmcs12)."""
    return _vmx_vmxon(c) and c.size >= _VMCS12_MIN and c.v12 is not None


def _vmx_guest(c: _Ctx) -> bool:
    return _vmx_page(c) and bool(c.flags & _GM)


def _svm(c: _Ctx) -> bool:
    return c.fmt == NestedFormat.SVM


def _svm_guest(c: _Ctx) -> bool:
    return _svm(c) and bool(c.flags & _GM)


def _svm_vmcb(c: _Ctx) -> bool:
    return _svm_guest(c) and c.size >= _VMCB_MIN and c.vmcb is not None


# --- x86.c and the format ---------------------------------------------------------------


@_rule(_any_state)
def size_covers_header(c: _Ctx) -> None:
    """x86.c: ``size`` must be at least the 128-byte ``struct kvm_nested_state``."""
    c.report(
        c.size < HEADER_SIZE,
        "size",
        c.size,
        f"size must be at least the {HEADER_SIZE}-byte header",
        _X86,
    )


@_rule(_any_state)
def size_within_data(c: _Ctx) -> None:
    """kvmstate: ``size`` within the buffer (the kernel reads that many bytes) and the blob."""
    if c.blob_len is not None and c.size != c.blob_len:
        c.report(
            True,
            "size",
            c.size,
            f"the size field says {c.size} bytes but the saved state has {c.blob_len}",
            "kvmstate: a saved state is exactly `size` bytes (NestedState.from_bytes)",
        )
    elif c.size > c.state.capacity:
        c.report(
            True,
            "size",
            c.size,
            f"size is larger than the {c.state.capacity}-byte buffer holding the state",
            _LIB,
        )


@_rule(_any_state)
def flags_known(c: _Ctx) -> None:
    """x86.c: only RUN_PENDING, GUEST_MODE, EVMCS, MTF_PENDING and GIF_SET may be set."""
    unknown = c.flags & ~KNOWN_FLAGS
    c.report(
        bool(unknown),
        "flags",
        c.flags,
        f"flags has bits {unknown:#x} that no kernel knows "
        f"(known: {_names(NestedFlag, KNOWN_FLAGS)})",
        _X86,
    )


@_rule(_any_state)
def run_pending_needs_guest_mode(c: _Ctx) -> None:
    """x86.c: RUN_PENDING (a VM-entry not completed yet) implies GUEST_MODE."""
    c.report(
        bool(c.flags & _RP and not c.flags & _GM),
        "flags",
        c.flags,
        "RUN_PENDING needs GUEST_MODE: a pending nested VM-entry means L2 is loaded",
        _X86,
    )


@_rule(_any_state)
def kvm_has_nested_state(c: _Ctx) -> None:
    """x86.c: a KVM whose KVM_CAP_NESTED_STATE is 0 has no nested state handlers, and every
    SET answers EINVAL (seen on a 6.18 host without nesting)."""
    cap = c.facts.nested_state_cap
    c.report(
        cap == 0,
        "kvm",
        cap,
        "this KVM has no nested state support (KVM_CAP_NESTED_STATE is 0: load "
        "kvm_intel/kvm_amd with nested=1)",
        _X86 + ", KVM_CAP_NESTED_STATE",
    )


@_rule(_any_state)
def format_known(c: _Ctx) -> None:
    """vmx/svm_set_nested_state: ``format`` must be VMX (0) or SVM (1)."""
    c.report(
        c.fmt not in (NestedFormat.VMX, NestedFormat.SVM),
        "format",
        c.fmt,
        "format must be 0 (VMX) or 1 (SVM)",
        f"{_VSET}, {_SSET}",
    )


@_rule(_any_state)
def format_matches_vendor(c: _Ctx) -> None:
    """vmx/svm_set_nested_state: each vendor accepts only its own format."""
    vendor = c.facts.target_vendor()
    if vendor is None or c.fmt not in (NestedFormat.VMX, NestedFormat.SVM):
        return
    want = NestedFormat.VMX if vendor == "vmx" else NestedFormat.SVM
    c.report(
        c.fmt != want,
        "format",
        c.fmt,
        f"the target vCPU runs on {'kvm_intel' if vendor == 'vmx' else 'kvm_amd'}, "
        f"which takes only {want.name} nested state",
        _VSET if vendor == "vmx" else _SSET,
    )


# --- VMX: vmx_set_nested_state ----------------------------------------------------------


@_rule(_vmx)
def vmx_no_vmxon_means_empty(c: _Ctx) -> None:
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
        _VSET,
    )
    c.report(
        c.vmx.vmcs12_pa != INVALID_GPA,
        "hdr.vmx.vmcs12_pa",
        c.vmx.vmcs12_pa,
        why + "vmcs12_pa must be -1 too",
        _VSET,
    )
    extra = c.flags & ~_EVMCS & KNOWN_FLAGS
    c.report(
        bool(extra),
        "flags",
        c.flags,
        why + f"no flag but EVMCS may be set (found {_names(NestedFlag, extra)})",
        _VSET,
    )


@_rule(_vmx_vmxon)
def vmx_needs_cpuid_vmx(c: _Ctx) -> None:
    """vmx_set_nested_state: VMXON state needs VMX in the vCPU's CPUID (nested_vmx_allowed
    in 6.1, guest_cpu_cap_has(X86_FEATURE_VMX) in 6.12): set CPUID first."""
    has = c.feature("vmx")
    c.report(
        None if has is None else not has,
        "hdr.vmx.vmxon_pa",
        c.vmx.vmxon_pa,
        "a VMXON region needs VMX in the vCPU's CPUID (KVM_SET_CPUID2 before the nested state)",
        _VSET,
        "has_vmx",
    )


@_rule(_vmx_vmxon)
def vmx_vmxon_pa_valid(c: _Ctx) -> None:
    """vmx_set_nested_state: ``page_address_valid(vmxon_pa)``."""
    c.page_rule("hdr.vmx.vmxon_pa", c.vmx.vmxon_pa, _VSET, "the VMXON region (vmxon_pa)")


@_rule(_vmx)
def vmx_smm_flags(c: _Ctx) -> None:
    """vmx_set_nested_state: smm.flags has only SMM_GUEST_MODE and SMM_VMXON, SMM_GUEST_MODE
    needs SMM_VMXON, and excludes GUEST_MODE (L2 cannot run while SMM saved it)."""
    smm = int(c.vmx.smm.flags)
    field = "hdr.vmx.smm.flags"
    c.report(
        bool(smm & _SMM_GM and c.flags & _GM),
        field,
        smm,
        "SMM_GUEST_MODE (L2 interrupted by an SMI) excludes GUEST_MODE in flags",
        _VSET,
    )
    unknown = smm & ~(_SMM_GM | _SMM_VMXON)
    c.report(bool(unknown), field, smm, f"unknown smm.flags bits {unknown:#x}", _VSET)
    c.report(
        bool(smm & _SMM_GM and not smm & _SMM_VMXON),
        field,
        smm,
        "SMM_GUEST_MODE needs SMM_VMXON (L2 implies VMX operation)",
        _VSET,
    )


@_rule(_vmx)
def vmx_header_flags(c: _Ctx) -> None:
    """vmx_set_nested_state: hdr.vmx.flags has only PREEMPTION_TIMER_DEADLINE."""
    extra = c.vmx.flags & ~uapi.KVM_STATE_VMX_PREEMPTION_TIMER_DEADLINE
    c.report(
        bool(extra),
        "hdr.vmx.flags",
        c.vmx.flags,
        f"unknown hdr.vmx.flags bits {extra:#x} (known: PREEMPTION_TIMER_DEADLINE)",
        _VSET,
    )


@_rule(_vmx)
def vmx_smm_matches_vcpu(c: _Ctx) -> None:
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
            _VSET,
            "in_smm",
        )
    if c.flags & (_GM | _RP):
        c.report(
            in_smm,
            "flags",
            c.flags,
            "GUEST_MODE and RUN_PENDING are refused while the vCPU is in SMM (SMM leaves VMX)",
            _VSET,
            "in_smm",
        )


@_rule(_vmx)
def vmx_evmcs_enabled(c: _Ctx) -> None:
    """vmx_set_nested_state: EVMCS needs VMX in CPUID and KVM_CAP_HYPERV_ENLIGHTENED_VMCS
    enabled on the vCPU."""
    if not c.flags & _EVMCS:
        return
    has = c.feature("vmx")
    c.report(
        None if has is None else not has,
        "flags",
        c.flags,
        "EVMCS needs VMX in the vCPU's CPUID",
        _VSET,
        "has_vmx",
    )
    enabled = c.facts.evmcs_enabled
    c.report(
        None if enabled is None else not enabled,
        "flags",
        c.flags,
        "EVMCS needs KVM_CAP_HYPERV_ENLIGHTENED_VMCS enabled on the vCPU first",
        _VSET,
        "evmcs_enabled",
    )


@_rule(_vmx_vmxon)
def vmx_without_vmcs12(c: _Ctx) -> None:
    """vmx_set_nested_state: a state too short for struct vmcs12 (VMXON only) can have no
    GUEST_MODE, no EVMCS and no vmcs12_pa (see vmx_has_valid_vmcs12)."""
    if c.size >= _VMCS12_MIN:
        return
    why = f"size {c.size} holds no vmcs12 (it needs {_VMCS12_MIN}: header + struct vmcs12), so "
    c.report(bool(c.flags & _GM), "flags", c.flags, why + "no GUEST_MODE", _VSET)
    c.report(bool(c.flags & _EVMCS), "flags", c.flags, why + "no EVMCS", _VSET)
    c.report(
        c.vmx.vmcs12_pa != INVALID_GPA,
        "hdr.vmx.vmcs12_pa",
        c.vmx.vmcs12_pa,
        why + "vmcs12_pa must be -1",
        _VSET,
    )


@_rule(_vmx_page)
def vmx_vmcs12_pa(c: _Ctx) -> None:
    """vmx_set_nested_state: with a vmcs12, vmcs12_pa is a valid page other than the
    VMXON region, or -1 with EVMCS (the vmcs12 then lives in an enlightened VMCS)."""
    pa = int(c.vmx.vmcs12_pa)
    field = "hdr.vmx.vmcs12_pa"
    if pa == INVALID_GPA:
        c.report(
            not c.flags & _EVMCS,
            field,
            pa,
            "a state with a vmcs12 must give its address (vmcs12_pa), unless EVMCS is set",
            _VSET,
        )
        return
    c.report(
        pa == c.vmx.vmxon_pa,
        field,
        pa,
        "vmcs12_pa must differ from vmxon_pa (the VMXON region is not a VMCS)",
        _VSET,
    )
    c.page_rule(field, pa, _VSET, "the current VMCS (vmcs12_pa)")


@_rule(_vmx_page)
def vmx_vmcs12_revision(c: _Ctx) -> None:
    """vmx_set_nested_state: the vmcs12 carries KVM's revision id, VMCS12_REVISION."""
    assert c.v12 is not None
    rev = int(c.v12.hdr.revision_id)
    c.report(
        rev != vmx.VMCS12_REVISION,
        "vmcs12.hdr.revision_id",
        rev,
        f"the vmcs12 revision id must be {vmx.VMCS12_REVISION:#x} (KVM's VMCS12_REVISION)",
        _VSET,
    )


@_rule(_vmx_guest)
def vmx_shadow_vmcs12(c: _Ctx) -> None:
    """vmx_set_nested_state: with VMCS shadowing and a link pointer, the state holds a
    shadow vmcs12 (size >= 128 + 4096 + sizeof(struct vmcs12)) with KVM's revision id
    and the shadow-VMCS bit."""
    v = c.v12
    assert v is not None
    if not (c.has2(vmx.SECONDARY_EXEC_SHADOW_VMCS) and v.vmcs_link_pointer != INVALID_GPA):
        return
    if c.size < _SHADOW_MIN:
        c.report(
            True,
            "size",
            c.size,
            f"the vmcs12 enables VMCS shadowing with a link pointer, so the state needs the "
            f"shadow vmcs12: size at least {_SHADOW_MIN}",
            _VSET,
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
        _VSET,
    )
    c.report(
        not c.shadow.hdr.shadow_vmcs,
        "shadow_vmcs12.hdr.shadow_vmcs",
        int(c.shadow.hdr.shadow_vmcs),
        "the shadow vmcs12 must have its shadow-VMCS bit set",
        _VSET,
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
        0x48D,
        vmx.PIN_BASED_ALWAYSON_WITHOUT_TRUE_MSR,
        _PIN_ALWAYS | vmx.PIN_BASED_EXT_INTR_MASK | vmx.PIN_BASED_NMI_EXITING
        | vmx.PIN_BASED_VIRTUAL_NMIS | vmx.PIN_BASED_POSTED_INTR,
        _PIN_ALWAYS | vmx.PIN_BASED_EXT_INTR_MASK | vmx.PIN_BASED_NMI_EXITING,
        vmx.PinBasedControls,
    ),
    _Controls(
        "cpu_based_vm_exec_control",
        0x48E,
        vmx.CPU_BASED_ALWAYSON_WITHOUT_TRUE_MSR
        & ~(vmx.CPU_BASED_CR3_LOAD_EXITING | vmx.CPU_BASED_CR3_STORE_EXITING),
        _PROC_ALWAYS | _PROC_OPTIONAL,
        _PROC_ALWAYS,
        vmx.CpuBasedControls,
    ),
    _Controls(
        "secondary_vm_exec_control",
        0x48B,
        0,
        _SEC_OFFERED,
        vmx.SECONDARY_EXEC_SHADOW_VMCS,
        vmx.SecondaryExecControls,
    ),
    _Controls(
        "vm_exit_controls",
        0x48F,
        vmx.VM_EXIT_ALWAYSON_WITHOUT_TRUE_MSR & ~vmx.VM_EXIT_SAVE_DEBUG_CONTROLS,
        _EXIT_ALWAYS | vmx.VM_EXIT_LOAD_IA32_PAT | vmx.VM_EXIT_SAVE_IA32_PAT
        | vmx.VM_EXIT_CLEAR_BNDCFGS,
        _EXIT_ALWAYS,
        vmx.VmExitControls,
    ),
    _Controls(
        "vm_entry_controls",
        0x490,
        vmx.VM_ENTRY_ALWAYSON_WITHOUT_TRUE_MSR & ~vmx.VM_ENTRY_LOAD_DEBUG_CONTROLS,
        _ENTRY_ALWAYS | vmx.VM_ENTRY_LOAD_IA32_PAT | vmx.VM_ENTRY_LOAD_BNDCFGS,
        _ENTRY_ALWAYS,
        vmx.VmEntryControls,
    ),
)  # fmt: skip


@_rule(_vmx_guest)
def vmx_control_fields(c: _Ctx) -> None:
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
        source = _VEXEC if "exec" in spec.field else _VEXIT if "exit" in spec.field else _VENTRY
        msr = c.facts.msr(spec.msr)
        must, may = (msr & 0xFFFFFFFF, msr >> 32) if msr is not None else (spec.must, None)
        missing = must & ~value
        c.report(
            bool(missing),
            field,
            value,
            f"bits {_names(spec.kind, missing)} must be 1 ({VMX_MSRS[spec.msr]} allowed-0)",
            source,
        )
        if may is not None:
            extra = value & ~may
            c.report(
                bool(extra),
                field,
                value,
                f"bits {_names(spec.kind, extra)} are not allowed by {VMX_MSRS[spec.msr]}",
                source,
            )
            continue
        never = value & ~spec.offered
        c.report(
            bool(never),
            field,
            value,
            f"bits {_names(spec.kind, never)} are never offered to L1 by KVM",
            source,
        )
        host = value & spec.offered & ~spec.always
        c.report(
            None if host else False,
            field,
            value,
            f"bits {_names(spec.kind, host)} are offered only when the host supports them",
            source,
            f"vmx_msrs ({VMX_MSRS[spec.msr]})",
        )


@_rule(_vmx_guest)
def vmx_cr3_targets(c: _Ctx) -> None:
    """nested_check_vm_execution_controls: cr3_target_count <= the CR3-target count of
    IA32_VMX_MISC, which KVM reports as 0."""
    assert c.v12 is not None
    count = int(c.v12.cr3_target_count)
    misc = c.facts.msr(0x485)
    limit = (misc >> 16) & 0x1FF if misc is not None else 0
    c.report(
        count > limit,
        "vmcs12.cr3_target_count",
        count,
        f"cr3_target_count must be at most {limit} (IA32_VMX_MISC)",
        _VEXEC,
    )


@_rule(_vmx_guest)
def vmx_bitmap_pages(c: _Ctx) -> None:
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
            c.page_rule(f"vmcs12.{name}", int(getattr(v, name)), _VEXEC)


def _eptp_switching(c: _Ctx) -> bool:
    assert c.v12 is not None
    return c.has2(vmx.SECONDARY_EXEC_ENABLE_VMFUNC) and bool(c.v12.vm_function_control & 1)


@_rule(_vmx_guest)
def vmx_apicv(c: _Ctx) -> None:
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
        _VEXEC,
    )
    c.report(
        vid and not v.pin_based_vm_exec_control & vmx.PIN_BASED_EXT_INTR_MASK,
        "vmcs12.pin_based_vm_exec_control",
        int(v.pin_based_vm_exec_control),
        "VIRTUAL_INTR_DELIVERY needs EXT_INTR_MASK (exit on external interrupts)",
        _VEXEC,
    )
    if posted:
        pin = ("vmcs12.pin_based_vm_exec_control", int(v.pin_based_vm_exec_control))
        c.report(not vid, *pin, "POSTED_INTR needs VIRTUAL_INTR_DELIVERY", _VEXEC)
        c.report(
            not v.vm_exit_controls & vmx.VM_EXIT_ACK_INTR_ON_EXIT,
            *pin,
            "POSTED_INTR needs the ACK_INTR_ON_EXIT exit control",
            _VEXEC,
        )
        c.report(
            bool(v.posted_intr_nv & 0xFF00),
            "vmcs12.posted_intr_nv",
            int(v.posted_intr_nv),
            "the posted-interrupt notification vector must be below 256",
            _VEXEC,
        )
        c.report(
            c.bad_aligned(int(v.posted_intr_desc_addr), 64),
            "vmcs12.posted_intr_desc_addr",
            int(v.posted_intr_desc_addr),
            "the posted-interrupt descriptor must be 64-byte aligned, below 2^MAXPHYADDR",
            _VEXEC,
            "maxphyaddr",
        )
    c.report(
        not v.cpu_based_vm_exec_control & vmx.CPU_BASED_TPR_SHADOW,
        "vmcs12.cpu_based_vm_exec_control",
        int(v.cpu_based_vm_exec_control),
        "APIC virtualization (x2APIC mode, register virtualization, interrupt delivery, "
        "posted interrupts) needs TPR_SHADOW",
        _VEXEC,
    )


@_rule(_vmx_guest)
def vmx_nmi_controls(c: _Ctx) -> None:
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
        _VEXEC,
    )
    c.report(
        not vnmi and bool(v.cpu_based_vm_exec_control & vmx.CPU_BASED_NMI_WINDOW_EXITING),
        "vmcs12.cpu_based_vm_exec_control",
        int(v.cpu_based_vm_exec_control),
        "NMI_WINDOW_EXITING needs the VIRTUAL_NMIS pin control",
        _VEXEC,
    )


@_rule(_vmx_guest)
def vmx_ept_dependents(c: _Ctx) -> None:
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
                _VEXEC,
            )
    if _eptp_switching(c):
        c.report(
            True,
            "vmcs12.vm_function_control",
            int(v.vm_function_control),
            "EPTP switching (VM function 0) needs ENABLE_EPT",
            _VEXEC,
        )


@_rule(_vmx_guest)
def vmx_vpid_and_timer(c: _Ctx) -> None:
    """nested_check_vm_execution_controls: VPID enabled needs a non-zero VPID; saving the
    preemption timer on exit needs the preemption timer."""
    v = c.v12
    assert v is not None
    c.report(
        c.has2(vmx.SECONDARY_EXEC_ENABLE_VPID) and v.virtual_processor_id == 0,
        "vmcs12.virtual_processor_id",
        int(v.virtual_processor_id),
        "ENABLE_VPID needs a non-zero virtual_processor_id",
        _VEXEC,
    )
    c.report(
        bool(
            v.vm_exit_controls & vmx.VM_EXIT_SAVE_VMX_PREEMPTION_TIMER
            and not v.pin_based_vm_exec_control & vmx.PIN_BASED_VMX_PREEMPTION_TIMER
        ),
        "vmcs12.vm_exit_controls",
        int(v.vm_exit_controls),
        "SAVE_VMX_PREEMPTION_TIMER needs the VMX_PREEMPTION_TIMER pin control",
        _VEXEC,
    )


# EPTP bits (asm/vmx.h) and the EPT capabilities nested_vmx_check_eptp tests.
_EPTP_MT_UC, _EPTP_MT_WB = 0, 6
_EPTP_PWL_MASK, _EPTP_PWL_4, _EPTP_PWL_5 = 0x38, 0x18, 0x20
_EPTP_AD = 1 << 6
_EPT_CAP_PWL5, _EPT_CAP_UC, _EPT_CAP_AD = 1 << 7, 1 << 8, 1 << 21


@_rule(_vmx_guest)
def vmx_eptp(c: _Ctx) -> None:
    """nested_vmx_check_eptp: memory type WB (KVM never offers UC to L1; WB and 4-level
    walks come with EPT itself), 4- or 5-level walk, no reserved bits 11:7, legal address,
    and A/D bits only if offered."""
    v = c.v12
    assert v is not None
    if not c.has2(vmx.SECONDARY_EXEC_ENABLE_EPT):
        return
    eptp = int(v.ept_pointer)
    field = "vmcs12.ept_pointer"
    caps = c.facts.msr(0x48C)
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
        _VEXEC + " -> nested_vmx_check_eptp",
    )
    pwl = eptp & _EPTP_PWL_MASK
    c.report(
        pwl not in (_EPTP_PWL_4, _EPTP_PWL_5)
        or (cap(_EPT_CAP_PWL5) if pwl == _EPTP_PWL_5 else False),
        field,
        eptp,
        "the EPT walk length (bits 5:3) must be 4 levels, or 5 where the host has 5-level EPT",
        _VEXEC + " -> nested_vmx_check_eptp",
        msr,
    )
    c.report(
        _any(bool((eptp >> 7) & 0x1F), c.illegal_gpa(eptp)),
        field,
        eptp,
        "EPTP bits 11:7 are reserved and its address must be below 2^MAXPHYADDR",
        _VEXEC + " -> nested_vmx_check_eptp",
        "maxphyaddr",
    )
    if eptp & _EPTP_AD:
        c.report(
            cap(_EPT_CAP_AD),
            field,
            eptp,
            "EPT accessed/dirty bits (EPTP bit 6) need KVM's eptad support",
            _VEXEC + " -> nested_vmx_check_eptp",
            msr,
        )


@_rule(_vmx_guest)
def vmx_vmfunc(c: _Ctx) -> None:
    """nested_check_vm_execution_controls: vm_function_control within IA32_VMX_VMFUNC, which
    KVM limits to EPTP switching (bit 0)."""
    v = c.v12
    assert v is not None
    if not c.has2(vmx.SECONDARY_EXEC_ENABLE_VMFUNC):
        return
    value = int(v.vm_function_control)
    allowed = c.facts.msr(0x491)
    extra = value & ~(allowed if allowed is not None else 1)
    c.report(
        bool(extra),
        "vmcs12.vm_function_control",
        value,
        f"VM functions {extra:#x} are not offered (KVM offers only EPTP switching, bit 0)",
        _VEXEC,
    )
    if allowed is None and value & 1:
        c.report(
            None,
            "vmcs12.vm_function_control",
            value,
            "EPTP switching is offered only with EPT and hardware VMFUNC",
            _VEXEC,
            "vmx_msrs (IA32_VMX_VMFUNC)",
        )


@_rule(_vmx_guest)
def vmx_msr_switch_areas(c: _Ctx) -> None:
    """nested_vmx_check_{exit,entry}_msr_switch_controls: each MSR load/store area with a
    non-zero count is 16-byte aligned and lies below 2^MAXPHYADDR."""
    v = c.v12
    assert v is not None
    areas = (
        ("vm_exit_msr_load_addr", "vm_exit_msr_load_count", _VEXIT),
        ("vm_exit_msr_store_addr", "vm_exit_msr_store_count", _VEXIT),
        ("vm_entry_msr_load_addr", "vm_entry_msr_load_count", _VENTRY),
    )
    for addr_name, count_name, source in areas:
        count = int(getattr(v, count_name))
        if not count:
            continue
        addr = int(getattr(v, addr_name))
        last = (addr + count * 16 - 1) & _U64
        c.report(
            _any(bool(addr % 16), c.illegal_gpa(addr), c.illegal_gpa(last)),
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


@_rule(_vmx_guest)
def vmx_entry_event(c: _Ctx) -> None:
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
    c.report(kind == _INTR_TYPE_RESERVED, field, info, "event type 1 is reserved", _VENTRY)
    if kind == _INTR_TYPE_OTHER:
        proc = c.facts.msr(0x48E)
        c.report(
            None if proc is None else not (proc >> 32) & vmx.CPU_BASED_MONITOR_TRAP_FLAG,
            field,
            info,
            "event type 7 (MTF) needs the monitor trap flag to be offered",
            _VENTRY,
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
        _VENTRY,
    )
    unrestricted = c.has2(vmx.SECONDARY_EXEC_UNRESTRICTED_GUEST)
    prot_mode = not unrestricted or bool(v.guest_cr0 & svm.X86_CR0_PE)
    should = kind == _INTR_TYPE_HARD_EXC and prot_mode and vector in _EXC_WITH_ERROR_CODE
    has = bool(info & _INTR_DELIVER_CODE)
    c.report(
        has != should,
        field,
        info,
        f"deliver-error-code (bit 11) must be {int(should)} for this event: only "
        "protected-mode hardware exceptions 8, 10-14 and 17 push an error code",
        _VENTRY,
    )
    c.report(
        has and bool(v.vm_entry_exception_error_code & 0xFFFF0000),
        "vmcs12.vm_entry_exception_error_code",
        int(v.vm_entry_exception_error_code),
        "the injected error code must fit in 16 bits",
        _VENTRY,
    )
    c.report(bool(info & _INTR_RESVD), field, info, "bits 30:12 are reserved", _VENTRY)
    if kind in _INTR_TYPE_SOFT:
        length = int(v.vm_entry_instruction_len)
        misc = c.facts.msr(0x485)
        zero_ok = misc is not None and bool(misc & _VMX_MISC_ZERO_LEN_INS)
        c.report(
            length > 15 or (length == 0 and not zero_ok),
            "vmcs12.vm_entry_instruction_len",
            length,
            "a software interrupt or exception needs an instruction length of 1 to 15",
            _VENTRY,
        )


# --- VMX: nested_vmx_check_host_state / guest_state -------------------------------------

_CR0_PE, _CR0_NE, _CR0_PG = svm.X86_CR0_PE, svm.X86_CR0_NE, svm.X86_CR0_PG
_VMXON_CR0 = _CR0_PE | _CR0_PG | _CR0_NE  # VMXON_CR0_ALWAYSON
_CR4 = svm.Cr4
_CR4_LAM_SUP = 1 << 28
# CR4_RESERVED_BITS' complement (asm/kvm_host.h), without LAM_SUP (6.12 only).
_CR4_KNOWN = int(
    _CR4.VME | _CR4.PVI | _CR4.TSD | _CR4.DE | _CR4.PSE | _CR4.PAE | _CR4.MCE | _CR4.PGE
    | _CR4.PCE | _CR4.OSFXSR | _CR4.PCIDE | _CR4.OSXSAVE | _CR4.SMEP | _CR4.FSGSBASE
    | _CR4.OSXMMEXCPT | _CR4.LA57 | _CR4.VMXE | _CR4.SMAP | _CR4.PKE | _CR4.UMIP
)  # fmt: skip
# __cr4_reserved_bits: the CR4 bits a guest may set only with the CPUID feature.
_CR4_GUEST_FEATURES = {
    int(_CR4.OSXSAVE): "xsave",
    int(_CR4.SMEP): "smep",
    int(_CR4.SMAP): "smap",
    int(_CR4.FSGSBASE): "fsgsbase",
    int(_CR4.PKE): "pku",
    int(_CR4.LA57): "la57",
    int(_CR4.UMIP): "umip",
    int(_CR4.VMXE): "vmx",
    int(_CR4.PCIDE): "pcid",
    _CR4_LAM_SUP: "lam",
}
# nested_vmx_cr_fixed1_bits_update: nested VMX also ties these to CPUID.
_CR4_FIXED1_FEATURES = {
    **_CR4_GUEST_FEATURES,
    int(_CR4.VME): "vme",
    int(_CR4.PVI): "vme",
    int(_CR4.TSD): "tsc",
    int(_CR4.DE): "de",
    int(_CR4.PSE): "pse",
    int(_CR4.PAE): "pae",
    int(_CR4.MCE): "mce",
    int(_CR4.PGE): "pge",
    int(_CR4.OSFXSR): "fxsr",
    int(_CR4.OSXMMEXCPT): "xmm",
}


def _newer_feature(c: _Ctx, feature: str) -> bool | None:
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


def _cr4_rules(c: _Ctx, field: str, value: int, source: str, *, vmx_fixed: bool) -> None:
    """__kvm_is_valid_cr4 (reserved bits, CPUID-gated bits), and with ``vmx_fixed`` the
    nested CR4_FIXED0/FIXED1 (nested_cr4_valid)."""
    value &= _U64
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
    fixed0 = c.facts.msr(0x488) if vmx_fixed else None
    fixed1 = c.facts.msr(0x489) if vmx_fixed else None
    if vmx_fixed:
        need = fixed0 if fixed0 is not None else int(_CR4.VMXE)
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
            unknown.append(f"{_names(_CR4, bit)} ({feature})")
        elif not has:
            lacking.append(f"{_names(_CR4, bit)} ({feature})")
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
_EFER_SVM_ONLY = svm.EFER_SVME | svm.EFER_LMSLE | svm.EFER_FFXSR | svm.EFER_AUTOIBRS
_EFER_KNOWN = svm.EFER_SCE | svm.EFER_LME | svm.EFER_LMA | svm.EFER_NX | _EFER_SVM_ONLY
_EFER_FEATURES = (
    (svm.EFER_SVME, "svm"),
    (svm.EFER_LME | svm.EFER_LMA, "lm"),
    (svm.EFER_NX, "nx"),
    (svm.EFER_FFXSR, "fxsr_opt"),
    (svm.EFER_AUTOIBRS, "autoibrs"),
)


def _efer_rules(c: _Ctx, field: str, value: int, source: str, vendor: str) -> None:
    """kvm_valid_efer: no reserved bit (SVME, LMSLE, FFXSR and AUTOIBRS exist only on
    kvm_amd, AUTOIBRS only from 6.12 on), and each feature bit needs its CPUID feature."""
    value &= _U64
    known = _EFER_KNOWN if vendor == "svm" else _EFER_KNOWN & ~_EFER_SVM_ONLY
    reserved = value & ~known
    full = "arch/x86/kvm/x86.c: kvm_valid_efer (" + source + ")"
    c.report(
        bool(reserved),
        field,
        value,
        f"EFER bits {_names(svm.Efer, reserved)} are reserved on "
        f"{'kvm_amd' if vendor == 'svm' else 'kvm_intel'}",
        full,
    )
    if vendor == "svm" and value & svm.EFER_AUTOIBRS:
        c.report(
            _newer_feature(c, "autoibrs"),
            field,
            value,
            "EFER.AUTOIBRS is reserved in 6.1; 6.12 accepts it with host and CPUID AUTOIBRS",
            full,
            "kernel_version and cpu_features",
        )
    for bits, feature in _EFER_FEATURES:
        if not value & bits & known or bits == svm.EFER_AUTOIBRS:
            continue
        has = c.feature(feature)
        c.report(
            None if has is None else not has,
            field,
            value,
            f"EFER.{_names(svm.Efer, value & bits)} needs CPUID {feature} in the vCPU",
            full,
            "cpu_features" if feature not in ("svm", "vmx") else f"has_{feature}",
        )


def _cr0_vmx_rules(c: _Ctx, field: str, value: int, source: str, *, guest: bool) -> None:
    """nested_{host,guest}_cr0_valid: IA32_VMX_CR0_FIXED0/FIXED1 (PE, PG, NE required;
    PE and PG not for an unrestricted guest)."""
    value &= _U64
    fixed0 = c.facts.msr(0x486)
    need = fixed0 if fixed0 is not None else _VMXON_CR0
    if guest and c.has2(vmx.SECONDARY_EXEC_UNRESTRICTED_GUEST):
        need &= ~(_CR0_PE | _CR0_PG)
    c.report(
        bool(need & ~value),
        field,
        value,
        f"CR0 must have {_names(svm.Cr0, need)} in VMX operation (IA32_VMX_CR0_FIXED0)"
        + (" unless the guest is unrestricted" if guest else ""),
        source,
    )
    fixed1 = c.facts.msr(0x487)
    extra = value & ~(fixed1 if fixed1 is not None else 0xFFFFFFFF)
    c.report(
        bool(extra) if fixed1 is not None else (None if extra else False),
        field,
        value,
        f"CR0 bits {extra:#x} are not allowed by IA32_VMX_CR0_FIXED1",
        source,
        "vmx_msrs (IA32_VMX_CR0_FIXED1)",
    )


def _pat_invalid(value: int) -> bool:
    """Not kvm_pat_valid: each byte a memory type 0, 1, 4, 5, 6 or 7."""
    value &= _U64
    if value & 0xF8F8F8F8F8F8F8F8:
        return True
    return (value | ((value & 0x0202020202020202) << 1)) != value


def _perf_global_ctrl(c: _Ctx, field: str, value: int, source: str) -> None:
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


@_rule(_vmx_guest)
def vmx_host_state(c: _Ctx) -> None:
    """nested_vmx_check_host_state: host CR0/CR4 fixed bits, legal CR3, canonical
    addresses, PAT, PERF_GLOBAL_CTRL, the 64-bit host rules, selectors and EFER."""
    v = c.v12
    assert v is not None
    src = _VHOST
    _cr0_vmx_rules(c, "vmcs12.host_cr0", int(v.host_cr0), src, guest=False)
    _cr4_rules(c, "vmcs12.host_cr4", int(v.host_cr4), src, vmx_fixed=True)
    _cr3_rule(c, "vmcs12.host_cr3", int(v.host_cr3), src)
    exit_ctl = int(v.vm_exit_controls)
    ia32e = bool(exit_ctl & vmx.VM_EXIT_HOST_ADDR_SPACE_SIZE)
    for name in _HOST_ADDRESSES:
        value = int(getattr(v, name))
        c.report(
            c.noncanonical(value),
            f"vmcs12.{name}",
            value,
            f"{name} must be a canonical address",
            src,
            "la57",
        )
    if exit_ctl & vmx.VM_EXIT_LOAD_IA32_PAT:
        c.report(
            _pat_invalid(int(v.host_ia32_pat)),
            "vmcs12.host_ia32_pat",
            int(v.host_ia32_pat),
            "each PAT entry must be a memory type 0, 1, 4, 5, 6 or 7",
            src + " -> kvm_pat_valid",
        )
    if exit_ctl & vmx.VM_EXIT_LOAD_IA32_PERF_GLOBAL_CTRL:
        value = int(v.host_ia32_perf_global_ctrl)
        _perf_global_ctrl(c, "vmcs12.host_ia32_perf_global_ctrl", value, src)
    host_cr4 = int(v.host_cr4)
    if ia32e:
        c.report(
            not host_cr4 & _CR4.PAE,
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
            bool(host_cr4 & _CR4.PCIDE),
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
        _efer_rules(c, "vmcs12.host_ia32_efer", efer, src, "vmx")
        c.report(
            bool(efer & svm.EFER_LMA) != ia32e or bool(efer & svm.EFER_LME) != ia32e,
            "vmcs12.host_ia32_efer",
            efer,
            f"host EFER.LMA and EFER.LME must both be {int(ia32e)}, as HOST_ADDR_SPACE_SIZE",
            src,
        )


def _cr3_rule(c: _Ctx, field: str, value: int, source: str) -> None:
    """kvm_vcpu_is_legal_cr3: no bit at or above MAXPHYADDR (6.12 first drops LAM bits 61-62
    when the vCPU has LAM)."""
    lam_bits = value & (3 << 61)
    if lam_bits and c.feature("lam") is not False:
        c.report(
            None,
            field,
            value,
            "CR3 bits 61-62 are legal only with LAM (6.12 and CPUID LAM)",
            source,
            "kernel_version and cpu_features",
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


_ACTIVITY_STATES = (vmx.GUEST_ACTIVITY_ACTIVE, vmx.GUEST_ACTIVITY_HLT, vmx.GUEST_ACTIVITY_WAIT_SIPI)
_DEBUGCTL_ALWAYS_OK = 0x3  # LBR and BTF: vmx_is_valid_debugctl lets them through
_DEBUGCTL_MAYBE = (1 << 2) | (1 << 11) | (1 << 14) | (1 << 15)  # bus-lock, freeze-LBRs, SMM, RTM
_BNDCFGS_RSVD = 0xFFC


@_rule(_vmx_guest)
def vmx_guest_state(c: _Ctx) -> None:
    """nested_vmx_check_guest_state (as far as the vmcs12 decides it): CR0/CR4 fixed bits,
    DR7/DEBUGCTL, PAT, PERF_GLOBAL_CTRL, PG without PE, IA-32e mode, EFER (with
    RUN_PENDING), BNDCFGS and the activity state."""
    v = c.v12
    assert v is not None
    src = _VGUEST
    cr0, cr4 = int(v.guest_cr0), int(v.guest_cr4)
    entry = int(v.vm_entry_controls)
    ia32e = bool(entry & vmx.VM_ENTRY_IA32E_MODE)
    _cr0_vmx_rules(c, "vmcs12.guest_cr0", cr0, src, guest=True)
    _cr4_rules(c, "vmcs12.guest_cr4", cr4, src, vmx_fixed=True)
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
        c.report(
            _pat_invalid(int(v.guest_ia32_pat)),
            "vmcs12.guest_ia32_pat",
            int(v.guest_ia32_pat),
            "each PAT entry must be a memory type 0, 1, 4, 5, 6 or 7",
            src + " -> kvm_pat_valid",
        )
    link = int(v.vmcs_link_pointer)
    if link != INVALID_GPA:
        c.page_rule("vmcs12.vmcs_link_pointer", link, src, "the VMCS link pointer")
        c.report(
            None,
            "vmcs12.vmcs_link_pointer",
            link,
            "the page at the link pointer is read from guest memory: it must be mapped and "
            f"hold a VMCS header with revision {vmx.VMCS12_REVISION:#x} and the shadow bit "
            "equal to SHADOW_VMCS",
            src + " -> nested_vmx_check_vmcs_link_ptr",
            "guest memory (not visible to kvmstate)",
        )
    if entry & vmx.VM_ENTRY_LOAD_IA32_PERF_GLOBAL_CTRL:
        value = int(v.guest_ia32_perf_global_ctrl)
        _perf_global_ctrl(c, "vmcs12.guest_ia32_perf_global_ctrl", value, src)
    c.report(
        cr0 & (_CR0_PG | _CR0_PE) == _CR0_PG,
        "vmcs12.guest_cr0",
        cr0,
        "CR0.PG needs CR0.PE",
        src,
    )
    if ia32e:
        c.report(
            not cr4 & _CR4.PAE or not cr0 & _CR0_PG,
            "vmcs12.vm_entry_controls",
            entry,
            "an IA-32e mode guest needs guest CR4.PAE and CR0.PG",
            src,
        )
    if c.flags & _RP and entry & vmx.VM_ENTRY_LOAD_IA32_EFER:
        efer = int(v.guest_ia32_efer)
        _efer_rules(c, "vmcs12.guest_ia32_efer", efer, src, "vmx")
        c.report(
            bool(efer & svm.EFER_LMA) != ia32e
            or (bool(cr0 & _CR0_PG) and bool(efer & svm.EFER_LME) != ia32e),
            "vmcs12.guest_ia32_efer",
            efer,
            f"with RUN_PENDING, guest EFER.LMA (and EFER.LME when paging) must be "
            f"{int(ia32e)}, as IA32E_MODE",
            src,
        )
    if entry & vmx.VM_ENTRY_LOAD_BNDCFGS:
        bnd = int(v.guest_bndcfgs)
        c.report(
            _any(bool(bnd & _BNDCFGS_RSVD), c.noncanonical(bnd & ~0xFFF)),
            "vmcs12.guest_bndcfgs",
            bnd,
            "BNDCFGS bits 11:2 are reserved and its base must be canonical",
            src,
            "la57",
        )
    activity = int(v.guest_activity_state)
    c.report(
        activity not in _ACTIVITY_STATES,
        "vmcs12.guest_activity_state",
        activity,
        "the activity state must be ACTIVE, HLT or WAIT_SIPI",
        src + " -> nested_check_guest_non_reg_state",
    )


@_rule(_vmx_guest)
def vmx_guest_cr3(c: _Ctx) -> None:
    """prepare_vmcs02 -> nested_vmx_load_cr3: L2's CR3 (vmcs12.guest_cr3) is legal."""
    assert c.v12 is not None
    source = "arch/x86/kvm/vmx/nested.c: prepare_vmcs02 -> nested_vmx_load_cr3"
    _cr3_rule(c, "vmcs12.guest_cr3", int(c.v12.guest_cr3), source)


# --- SVM: svm_set_nested_state ----------------------------------------------------------


@_rule(_svm)
def svm_flags(c: _Ctx) -> None:
    """svm_set_nested_state: only GUEST_MODE, RUN_PENDING and GIF_SET (no EVMCS, no
    MTF_PENDING: those are VMX's)."""
    extra = c.flags & ~_SVM_FLAGS & KNOWN_FLAGS
    c.report(
        bool(extra),
        "flags",
        c.flags,
        f"SVM state takes only GUEST_MODE, RUN_PENDING and GIF_SET, not "
        f"{_names(NestedFlag, extra)}",
        _SSET,
    )


@_rule(_svm)
def svm_svme_clear(c: _Ctx) -> None:
    """svm_set_nested_state: with EFER.SVME clear in the vCPU, flags must be exactly GIF_SET
    (no guest mode, GIF set). Read in 6.1 and 6.12; set EFER with KVM_SET_SREGS first."""
    if c.flags == _GIF:
        return
    efer = c.facts.efer
    svme_clear = None if efer is None else not efer & svm.EFER_SVME
    if c.flags & _GM:
        c.report(
            svme_clear,
            "flags",
            c.flags,
            "GUEST_MODE needs EFER.SVME set in the vCPU (KVM_SET_SREGS before the nested state)",
            _SSET,
            "efer",
        )
    else:
        c.report(
            _all(svme_clear, c.both_kernels_rule()),
            "flags",
            c.flags,
            "with EFER.SVME clear in the vCPU, flags must be exactly GIF_SET "
            "(6.1 and 6.12 refuse a clear GIF there)",
            _SSET + " (6.1-6.12)",
            "efer" if svme_clear is None else "kernel_version",
        )


@_rule(_svm)
def svm_not_in_smm(c: _Ctx) -> None:
    """svm_set_nested_state: SMM suspends SVM, so no GUEST_MODE while the vCPU is in SMM."""
    if not c.flags & _GM:
        return
    c.report(
        c.facts.in_smm,
        "flags",
        c.flags,
        "GUEST_MODE is refused while the vCPU is in SMM (SMM suspends SVM)",
        _SSET,
        "in_smm",
    )


@_rule(_svm_guest)
def svm_vmcb_pa(c: _Ctx) -> None:
    """svm_set_nested_state: ``page_address_valid(vmcb_pa)`` in guest mode."""
    c.page_rule("hdr.svm.vmcb_pa", int(c.svm.vmcb_pa), _SSET, "vmcb12's address (vmcb_pa)")


@_rule(_svm_guest)
def svm_size(c: _Ctx) -> None:
    """svm_set_nested_state: guest mode needs the vmcb12 page (size >= 128 + 4096)."""
    c.report(
        c.size < _VMCB_MIN,
        "size",
        c.size,
        f"GUEST_MODE needs the vmcb12: size at least {_VMCB_MIN}",
        _SSET,
    )


def _legal_range(c: _Ctx, base: int, size: int) -> bool | None:
    """Not nested_svm_check_bitmap_pa: the page-aligned base and the last byte legal."""
    base &= ~0xFFF & _U64
    return _any(c.illegal_gpa(base), c.illegal_gpa((base + size - 1) & _U64))


@_rule(_svm_vmcb)
def svm_controls(c: _Ctx) -> None:
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
        _SCTL,
    )
    c.report(
        ctl.asid == 0,
        "vmcb12.control.asid",
        int(ctl.asid),
        "the ASID must not be 0 (ASID 0 is the host's)",
        _SCTL,
    )
    if ctl.nested_ctl & svm.SVM_NESTED_CTL_NP_ENABLE:
        npt = c.facts.npt_enabled
        c.report(
            None if npt is None else not npt,
            "vmcb12.control.nested_ctl",
            int(ctl.nested_ctl),
            "NP_ENABLE needs nested paging in KVM (kvm_amd npt=1)",
            _SCTL,
            "npt_enabled",
        )
        c.report(
            c.illegal_gpa(int(ctl.nested_cr3)),
            "vmcb12.control.nested_cr3",
            int(ctl.nested_cr3),
            "with NP_ENABLE, nested_cr3 must be below 2^MAXPHYADDR",
            _SCTL,
            "maxphyaddr",
        )
    for name, size in (("msrpm_base_pa", svm.MSRPM_SIZE), ("iopm_base_pa", svm.IOPM_SIZE)):
        value = int(getattr(ctl, name))
        c.report(
            _legal_range(c, value, size),
            f"vmcb12.control.{name}",
            value,
            f"the {size // 4096}-page permission map at {name} must lie below 2^MAXPHYADDR",
            _SCTL + " -> nested_svm_check_bitmap_pa",
            "maxphyaddr",
        )
    if ctl.int_ctl & svm.V_NMI_ENABLE_MASK:
        c.report(
            _all(c.newer_rule(), not ctl.is_intercept(svm.INTERCEPT_NMI)),
            "vmcb12.control.int_ctl",
            int(ctl.int_ctl),
            "V_NMI_ENABLE needs the NMI intercept (a 6.12 rule, absent in 6.1)",
            _SCTL + " (6.12, not 6.1)",
            "kernel_version",
        )


@_rule(_svm_vmcb)
def svm_vcpu_cr0(c: _Ctx) -> None:
    """svm_set_nested_state: the vCPU's own CR0 (L2's, from KVM_SET_SREGS) must not have NW
    without CD."""
    cr0 = c.facts.cr0
    c.report(
        None if cr0 is None else bool(not cr0 & svm.X86_CR0_CD and cr0 & svm.X86_CR0_NW),
        "vcpu.cr0",
        cr0,
        "the vCPU's CR0 (L2's) must not set NW with CD clear",
        _SSET,
        "cr0",
    )


@_rule(_svm_vmcb)
def svm_save_area(c: _Ctx) -> None:
    """svm_set_nested_state + __nested_vmcb_check_save on vmcb12.save, which holds L1's
    state saved at VMRUN (restored into vmcb01; 6.1 and 6.12 check the same area): CR0.PG,
    CR0.PE, no RFLAGS.VM, EFER.SVME, CR0 NW/CD and high bits, DR6/DR7 high bits, long-mode
    consistency, valid CR4 and EFER."""
    assert c.vmcb is not None
    save = c.vmcb.save
    efer, cr0, cr3, cr4 = int(save.efer), int(save.cr0), int(save.cr3), int(save.cr4)
    f = "vmcb12.save."
    c.report(
        not cr0 & _CR0_PG or not cr0 & _CR0_PE,
        f + "cr0",
        cr0,
        "L1's CR0 must have PG and PE: VMRUN runs from paged protected mode",
        _SSET,
    )
    c.report(
        bool(save.rflags & svm.X86_EFLAGS_VM),
        f + "rflags",
        int(save.rflags),
        "L1's RFLAGS must not have VM (VMRUN is not allowed in virtual-8086 mode)",
        _SSET,
    )
    c.report(
        not efer & svm.EFER_SVME,
        f + "efer",
        efer,
        "L1's EFER must have SVME",
        _SSAVE,
    )
    c.report(
        bool(not cr0 & svm.X86_CR0_CD and cr0 & svm.X86_CR0_NW),
        f + "cr0",
        cr0,
        "CR0.NW needs CR0.CD",
        _SSAVE,
    )
    c.report(bool(cr0 >> 32), f + "cr0", cr0, "CR0 bits 63:32 are reserved", _SSAVE)
    c.report(bool(save.dr6 >> 32), f + "dr6", int(save.dr6), "DR6 bits 63:32 are reserved", _SSAVE)
    c.report(bool(save.dr7 >> 32), f + "dr7", int(save.dr7), "DR7 bits 63:32 are reserved", _SSAVE)
    if efer & svm.EFER_LME and cr0 & _CR0_PG:
        c.report(
            not cr4 & _CR4.PAE or not cr0 & _CR0_PE,
            f + "cr4",
            cr4,
            "long mode (EFER.LME with CR0.PG) needs CR4.PAE and CR0.PE",
            _SSAVE,
        )
        _cr3_rule(c, f + "cr3", cr3, _SSAVE)
        attrib = int(save.cs.attrib)
        c.report(
            bool(attrib & svm.SVM_SELECTOR_L_MASK and attrib & svm.SVM_SELECTOR_DB_MASK),
            f + "cs.attrib",
            attrib,
            "in long mode CS cannot have both L and D/B",
            _SSAVE,
        )
    _cr4_rules(c, f + "cr4", cr4, _SSAVE, vmx_fixed=False)
    _efer_rules(c, f + "efer", efer, _SSAVE, "svm")


@_rule(_svm_vmcb)
def svm_gpat(c: _Ctx) -> None:
    """svm_set_nested_state, Linux 7.2+ (commit 4f256d5770fe): with NP_ENABLE in vmcb12's
    nested_ctl and KVM_X86_QUIRK_NESTED_SVM_SHARED_PAT disabled, ``hdr.svm.gpat`` must be
    a valid PAT (kvm_pat_valid: every byte 0, 1, 4, 5, 6 or 7). With the quirk in force
    (the default), and in any kernel before 7.2, gpat is ignored."""
    assert c.vmcb is not None
    if not c.vmcb.control.nested_ctl & svm.SVM_NESTED_CTL_NP_ENABLE:
        return
    gpat = int(c.svm.gpat)
    if not _pat_invalid(gpat):
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
        _SGPAT,
        needs,
    )


@_rule(_svm_vmcb)
def svm_vcpu_cr3(c: _Ctx) -> None:
    """svm_set_nested_state -> nested_svm_load_cr3: the vCPU's CR3 (L2's) is reloaded and
    must be legal."""
    cr3 = c.facts.cr3
    if cr3 is None:
        c.report(
            None,
            "vcpu.cr3",
            None,
            "the vCPU's CR3 (L2's) must have no bit at or above MAXPHYADDR",
            _SSET + " -> nested_svm_load_cr3",
            "cr3",
        )
        return
    _cr3_rule(c, "vcpu.cr3", cr3, _SSET + " -> nested_svm_load_cr3")


#: Every rule function, in the order the kernel applies them (each docstring cites it).
RULES: tuple[Callable[[_Ctx], None], ...] = tuple(func for _, func in _REGISTRY)


# --- entry points ---------------------------------------------------------------------------


def check(state: Any, facts: Facts | None = None) -> list[Problem]:
    """Every rule of KVM_SET_NESTED_STATE that ``state`` breaks, decidable from it and ``facts``.

    ``state`` is a :class:`~kvmstate.nested.NestedState` or the bytes of a saved
    state (then ``size`` must also match their length). Problems come in the
    kernel's order; those that depend on an unknown fact have ``certain=False``.
    An empty list means no known rule is broken.
    """
    facts = _facts_or_default(facts, "check")
    blob_len: int | None = None
    if not isinstance(state, NestedState):
        try:
            raw = bytes(memoryview(state).cast("B"))
        except TypeError:
            raise TypeError(
                f"check() needs a NestedState or bytes, not {type(state).__name__}"
            ) from None
        if len(raw) < HEADER_SIZE:
            text = f"a nested state has a {HEADER_SIZE}-byte header; these data have {len(raw)}"
            return [Problem("size", len(raw), text, _X86, rule_id="size_covers_header")]
        blob_len = len(raw)
        try:
            state = NestedState(len(raw))
        except ValueError as exc:
            return [Problem("size", len(raw), str(exc), _LIB, rule_id="size_within_data")]
        ctypes.memmove(ctypes.addressof(state._storage), raw, len(raw))
    c = _Ctx(state, facts, blob_len)
    for scope, rule in _REGISTRY:
        c.rule_id = rule.__name__
        try:
            if scope(c):
                rule(c)
        except Exception as exc:  # a bug in a rule must not hide the others
            c.report(
                None,
                "(check)",
                None,
                f"kvmstate could not evaluate rule {rule.__name__}: {exc!r}",
                "kvmstate.check",
                "a fix in kvmstate",
            )
    return c.problems


def format_problems(problems: Iterable[Problem]) -> str:
    """Problems as text: what the kernel refuses, then what depends on unknown facts."""
    problems = list(problems)
    sure = [p for p in problems if p.certain]
    unsure = [p for p in problems if not p.certain]
    if not problems:
        return "no rule of KVM_SET_NESTED_STATE known to kvmstate is broken"
    lines: list[str] = []
    if sure:
        fields = ", ".join(dict.fromkeys(p.field for p in sure))
        count = f"{len(sure)} problem{'s' if len(sure) > 1 else ''}"
        lines.append(f"KVM_SET_NESTED_STATE refuses this state ({count}: {fields}):")
        lines.extend(f"  - {p}" for p in sure)
    if unsure:
        if not sure:
            lines.append("no rule is surely broken, but the kernel may refuse this state:")
        else:
            lines.append("and it may also refuse it:")
        by_fact: dict[str, list[Problem]] = {}
        for p in unsure:
            by_fact.setdefault(p.needs or "?", []).append(p)
        for fact, items in by_fact.items():
            lines.append(f"  depending on {fact}:")
            lines.extend(f"    - {p.subject}: {p.rule} [{p.source}]" for p in items)
    return "\n".join(lines)


def explain(state: Any, facts: Facts | None = None) -> str:
    """:func:`check`, as text for an error message; its first line sums it up.

    ``facts`` is a :class:`Facts` or None, as for :func:`check`; a dict is
    refused with a TypeError saying how to make one (``Facts(**d)`` for typed
    values, ``Facts.from_strings(d)`` for text), rather than guessing which::

        >>> explain(state, {"vendor": "svm"})
        Traceback (most recent call last):
        TypeError: explain() needs facts as a Facts or None, not dict (make one with ...)
    """
    return format_problems(check(state, _facts_or_default(facts, "explain")))


def _facts_or_default(facts: object, caller: str) -> Facts:
    """``facts`` as given to check/explain: a Facts, or None for no facts (TypeError otherwise)."""
    if facts is None:
        return Facts()
    if isinstance(facts, Facts):
        return facts
    hint = (
        " (make one with Facts(**d) for typed values or Facts.from_strings(d) for text)"
        if isinstance(facts, Mapping)
        else ""
    )
    raise TypeError(f"{caller}() needs facts as a Facts or None, not {type(facts).__name__}{hint}")
