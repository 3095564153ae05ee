"""Facts: what is known of the vCPU and kernel a nested state is meant for."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from kvmstate import uapi, x86
from kvmstate.nested import vendor_of_capability
from kvmstate.state import VcpuState

U64 = (1 << 64) - 1  # the largest u64: registers and MSRs

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
        x86.MSR_IA32_VMX_MISC: "IA32_VMX_MISC",
        x86.MSR_IA32_VMX_CR0_FIXED0: "IA32_VMX_CR0_FIXED0",
        x86.MSR_IA32_VMX_CR0_FIXED1: "IA32_VMX_CR0_FIXED1",
        x86.MSR_IA32_VMX_CR4_FIXED0: "IA32_VMX_CR4_FIXED0",
        x86.MSR_IA32_VMX_CR4_FIXED1: "IA32_VMX_CR4_FIXED1",
        x86.MSR_IA32_VMX_PROCBASED_CTLS2: "IA32_VMX_PROCBASED_CTLS2",
        x86.MSR_IA32_VMX_EPT_VPID_CAP: "IA32_VMX_EPT_VPID_CAP",
        x86.MSR_IA32_VMX_TRUE_PINBASED_CTLS: "IA32_VMX_TRUE_PINBASED_CTLS",
        x86.MSR_IA32_VMX_TRUE_PROCBASED_CTLS: "IA32_VMX_TRUE_PROCBASED_CTLS",
        x86.MSR_IA32_VMX_TRUE_EXIT_CTLS: "IA32_VMX_TRUE_EXIT_CTLS",
        x86.MSR_IA32_VMX_TRUE_ENTRY_CTLS: "IA32_VMX_TRUE_ENTRY_CTLS",
        x86.MSR_IA32_VMX_VMFUNC: "IA32_VMX_VMFUNC",
    }
)

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
        "efer": U64,
        "cr0": U64,
        "cr3": U64,
        "cr4": U64,
        "nested_state_cap": _INT_MAX,
        "feature_control": U64,
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
        out[index] = _check_fact_int(f"vmx_msrs[{index:#x}]", value, U64)
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
        return vendor_of_capability(self.nested_state_cap)

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
            vendor = vendor_of_capability(cap)
            if vendor:
                found["vendor"] = vendor
        except (OSError, ValueError):
            pass
        if found.get("has_vmx"):
            msrs = _read_msrs(vcpu, VMX_MSRS)
            if msrs:
                found["vmx_msrs"] = msrs
            control = _read_msrs(vcpu, [x86.MSR_IA32_FEATURE_CONTROL])
            if control:
                found["feature_control"] = control[x86.MSR_IA32_FEATURE_CONTROL]
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
            if x86.MSR_IA32_FEATURE_CONTROL in msrs:
                found["feature_control"] = msrs[x86.MSR_IA32_FEATURE_CONTROL]
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
                    name, value = "efer", x86.EFER_SVME if _parse_bool(text) else 0
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
