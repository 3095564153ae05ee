"""Before a restore: what a target vCPU will refuse of a saved state, and the MSR policy.

A :class:`~kvmstate.state.VcpuState` carries the MSRs of the *source*
kernel's ``KVM_GET_MSR_INDEX_LIST``; another kernel series lists others
(6.1 on an AMD host lists Intel PMU MSRs that 6.12 drops, 6.12 lists
DEBUGCTL and a Hyper-V MSR that 6.1 does not know). :func:`preflight`
compares a state with a :class:`Target` (what a target vCPU accepts: its
MSR list, capabilities, nested-state size and format, TSC scaling; the
CPUID rules every kernel applies)
and lists every refusal *before* anything is written, so a restore cannot
stop half way with CPUID and sregs already set. :func:`kvmstate.state.restore`
runs it first; ``kvmstate check --target FILE`` runs it offline.

The policy for an MSR the target does not know (:func:`msr_policy`):

* ``"required"``: architectural state a guest relies on without asking
  again (the TSC, SYSCALL/SYSENTER targets, PAT, EFER, the FS/GS bases,
  FEATURE_CONTROL and the VMX capability MSRs, SPEC_CTRL, XSS, CET, the
  TSC deadline, VM_HSAVE_PA ...): the MSRs of KVM's ``msrs_to_save_base``
  and the architectural ones of ``emulated_msrs_all``. Never dropped: a
  target without one refuses the state.
* ``"record"``: records the CPU rewrites and no guest writes (the LBR
  from/to registers): dropped at any value.
* ``"if-zero"``: everything else: PMU counters and event selects,
  paravirtual MSRs (KVM's 0x4b564dxx, Hyper-V's 0x400000xx), machine-check
  banks ... Zero is their reset value and means "not in use" (no counter
  programmed, the enlightenment never enabled), so a target that lacks
  the feature loses nothing; dropped then, and refused at any other value.

Dropped MSRs are recorded in :attr:`Preflight.dropped`, and restore warns
with a :class:`DroppedMsrWarning` that carries them. What the lists cannot tell: an MSR the
target lists may still refuse a *value* (KVM checks reserved bits when it
is written); such a refusal still surfaces as a
:class:`~kvmstate.state.StateError` from the write itself.

    >>> msr_policy(0xC0000082)  # LSTAR
    'required'
    >>> msr_policy(0x309)  # IA32_FIXED_CTR0, a PMU counter
    'if-zero'
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import json
import os
from array import array
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from kvmstate import uapi
from kvmstate.errors import KvmError, StateError
from kvmstate.nested import HEADER_SIZE, NestedState, vendor_of_capability
from kvmstate.uapi import NestedFlag, NestedFormat

if TYPE_CHECKING:
    from kvmstate.state import VcpuState

__all__ = [
    "REQUIRED_MSRS",
    "DroppedMsrWarning",
    "Finding",
    "Preflight",
    "PreflightError",
    "Target",
    "msr_policy",
    "preflight",
]

# IA32_VMX_BASIC (0x480) .. IA32_VMX_VMFUNC (0x491), in index order.
_VMX_NAMES = (
    "BASIC", "PINBASED_CTLS", "PROCBASED_CTLS", "EXIT_CTLS", "ENTRY_CTLS", "MISC",
    "CR0_FIXED0", "CR0_FIXED1", "CR4_FIXED0", "CR4_FIXED1", "VMCS_ENUM", "PROCBASED_CTLS2",
    "EPT_VPID_CAP", "TRUE_PINBASED_CTLS", "TRUE_PROCBASED_CTLS", "TRUE_EXIT_CTLS",
    "TRUE_ENTRY_CTLS", "VMFUNC",
)  # fmt: skip

#: MSRs never dropped, by name: architectural state a guest set once and relies on.
REQUIRED_MSRS: Mapping[int, str] = {
    0x10: "IA32_TSC",
    0x1B: "IA32_APIC_BASE",
    0x3A: "IA32_FEATURE_CONTROL",
    0x3B: "IA32_TSC_ADJUST",
    0x48: "IA32_SPEC_CTRL",
    0x10A: "IA32_ARCH_CAPABILITIES",
    0x122: "IA32_TSX_CTRL",
    0x174: "IA32_SYSENTER_CS",
    0x175: "IA32_SYSENTER_ESP",
    0x176: "IA32_SYSENTER_EIP",
    0x1A0: "IA32_MISC_ENABLE",
    0x1C4: "IA32_XFD",
    0x1C5: "IA32_XFD_ERR",
    0x277: "IA32_PAT",
    **{0x480 + i: f"IA32_VMX_{name}" for i, name in enumerate(_VMX_NAMES)},
    0x6A0: "IA32_U_CET",
    0x6A2: "IA32_S_CET",
    0x6A4: "IA32_PL0_SSP",
    0x6A5: "IA32_PL1_SSP",
    0x6A6: "IA32_PL2_SSP",
    0x6A7: "IA32_PL3_SSP",
    0x6A8: "IA32_INT_SSP_TAB",
    0x6E0: "IA32_TSC_DEADLINE",
    0xD90: "IA32_BNDCFGS",
    0xDA0: "IA32_XSS",
    0xE1: "IA32_UMWAIT_CONTROL",
    0xC0000080: "EFER",
    0xC0000081: "STAR",
    0xC0000082: "LSTAR",
    0xC0000083: "CSTAR",
    0xC0000084: "SYSCALL_MASK",
    0xC0000100: "FS_BASE",
    0xC0000101: "GS_BASE",
    0xC0000102: "KERNEL_GS_BASE",
    0xC0000103: "TSC_AUX",
    0xC0010114: "VM_CR",
    0xC0010117: "VM_HSAVE_PA",
    0xC001011F: "VIRT_SPEC_CTRL",
}  # fmt: skip

# EFER, FS_BASE, GS_BASE, APIC_BASE: KVM_SET_MSRS takes them on every kernel
# (kvm_set_msr_common) but no index list names them, as the sregs carry them.
_SREGS_MSRS = frozenset({0xC0000080, 0xC0000100, 0xC0000101, 0x1B})

# LASTBRANCHFROMIP, LASTBRANCHTOIP, LASTINTFROMIP, LASTINTTOIP: what the CPU last
# recorded (with DEBUGCTL.LBR, itself "if-zero"); no guest writes them.
_RECORD_MSRS = frozenset(range(0x1DB, 0x1DF))


def msr_policy(index: int) -> str:
    """What a restore does with MSR ``index`` when the target does not know it.

    ``"required"`` (refuse the state), ``"record"`` (drop it) or
    ``"if-zero"`` (drop it if its value is 0, else refuse); see the module
    docstring for why each MSR is where it is.
    """
    if index in REQUIRED_MSRS:
        return "required"
    if index in _RECORD_MSRS:
        return "record"
    return "if-zero"


class DroppedMsrWarning(UserWarning):
    """A restore left out MSRs the target does not know; ``dropped`` maps each to its value.

    Catch it to keep the record::

        with warnings.catch_warnings(record=True) as seen:
            vcpu.restore_state(saved)
        dropped = {i: v for w in seen if isinstance(w.message, DroppedMsrWarning)
                   for i, v in w.message.dropped.items()}
    """

    def __init__(self, dropped: Mapping[int, int]) -> None:
        self.dropped = dict(sorted(dropped.items()))
        listed = ", ".join(f"{i:#x}={v:#x}" for i, v in self.dropped.items())
        super().__init__(f"MSRs this kernel does not know, dropped: {listed}")


@dataclasses.dataclass(frozen=True)
class Finding:
    """One thing the target will refuse.

    ``part`` is the state's part (``msrs``, ``nested``, ``xsave`` ...),
    ``rule`` a short stable name (``msr-unknown-required``, ``nested-format``
    ...), ``message`` the sentence that says why.
    """

    part: str
    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.part}: {self.message} [{self.rule}]"


class PreflightError(StateError):
    """The target vCPU would refuse the state; nothing was written.

    errno is EINVAL (what the refusing ioctl would return), ``part`` the
    first refused part; ``findings`` lists every refusal and ``report`` is
    the whole :class:`Preflight`.
    """

    def __init__(self, report: Preflight) -> None:
        if not report.refusals:
            raise ValueError("PreflightError needs a report with refusals")
        text = "; ".join(str(f) for f in report.refusals)
        error = KvmError(errno.EINVAL, f"refused before anything was written: {text}")
        super().__init__(report.refusals[0].part, error)
        self.report = report
        self.findings = report.refusals

    def __reduce__(self) -> tuple[Any, ...]:
        return (PreflightError, (self.report,))


@dataclasses.dataclass
class Preflight:
    """What :func:`preflight` found: refusals and the MSRs to drop.

    ``msrs`` is what a restore writes: the saved MSRs less ``dropped``.
    ``unsaved`` lists MSRs the target knows that the state does not carry
    (they keep the target's reset values).
    """

    refusals: list[Finding] = dataclasses.field(default_factory=list)
    dropped: dict[int, int] = dataclasses.field(default_factory=dict)
    msrs: dict[int, int] = dataclasses.field(default_factory=dict)
    unsaved: list[int] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether the target accepts every part (as far as its facts tell)."""
        return not self.refusals

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (MSR indices and values in hex)."""
        return {
            "ok": self.ok,
            "refusals": [dataclasses.asdict(f) for f in self.refusals],
            "dropped": {hex(i): hex(v) for i, v in sorted(self.dropped.items())},
            "unsaved": [hex(i) for i in self.unsaved],
        }

    def lines(self) -> list[str]:
        """One line per refusal and dropped MSR, for people."""
        out = [f"refused: {f}" for f in self.refusals]
        out += [f"dropped: MSR {i:#x} = {v:#x} (unknown to the target)" for i, v in
                sorted(self.dropped.items())]  # fmt: skip
        return out


# KVM_SET_CPUID2 refuses more entries than KVM_MAX_CPUID_ENTRIES (E2BIG), and a
# virtual-address width other than 48 or 57 bits (kvm_check_cpuid; 0 means "not given").
_MAX_CPUID_ENTRIES = 256
_TSC_TOLERANCE_PPM = 250  # kvm's tsc_tolerance_ppm default
_VADDR_BITS = (0, 48, 57)
# struct kvm_cpuid2: nent, padding, then the entries.
_CPUID_HEAD = ctypes.sizeof(uapi.kvm_cpuid2)


@dataclasses.dataclass(frozen=True)
class Target:
    """What a target vCPU accepts, from a live vCPU (:meth:`from_vcpu`) or a file.

    ``msrs`` is the target kernel's ``KVM_GET_MSR_INDEX_LIST`` (what a
    save reads, so what a restore writes); ``None`` for a fact not known
    (its checks are then skipped). Make the file on the target
    host with ``kvmstate target > target.json``; ``kvmstate check STATE
    --target target.json`` reads it::

        target = Target.from_vcpu(vcpu)
        print(preflight(vcpu_state, target).lines())
        Target.from_json(json.dumps(target.to_dict())) == target  # True
    """

    #: The kernel release (``os.uname().release``), e.g. ``6.12.117+deb12-amd64``.
    kernel: str | None = None
    #: ``"svm"`` (kvm_amd) or ``"vmx"`` (kvm_intel), from KVM_CAP_NESTED_STATE's size.
    vendor: str | None = None
    msrs: frozenset[int] | None = None
    #: KVM_CAP_NESTED_STATE: the largest nested state it takes (0: none).
    nested_state_size: int | None = None
    #: KVM_CAP_XSAVE2 (at least 4096) if KVM_CAP_XSAVE, else 0.
    xsave_size: int | None = None
    sregs2: bool | None = None
    xcrs: bool | None = None
    #: KVM_CAP_TSC_CONTROL, and the rate a new vCPU gets (the host's).
    tsc_control: bool | None = None
    tsc_khz: int | None = None
    #: kvm's ``tsc_tolerance_ppm`` parameter: a rate this close to the host's is taken
    #: as it (None: KVM's default, 250).
    tsc_tolerance_ppm: int | None = None
    #: kvm_amd's ``npt`` parameter (a fact the nested-state rules use).
    npt: bool | None = None

    @classmethod
    def from_vcpu(cls, vcpu: Any) -> Target:
        """The facts of ``vcpu``'s KVM (a :class:`~kvmstate.vcpu.Vcpu`: typed loosely because
        this module sits below the wrappers), as its VM handed them down (MSR list, capabilities).

        A borrowed vCPU has no MSR list (``msrs`` None: its MSRs are not checked).
        """
        try:
            khz: int | None = vcpu.get_tsc_khz()
        except KvmError:
            khz = None
        return dataclasses.replace(
            cls.lasting(vcpu),
            tsc_khz=khz,
            tsc_tolerance_ppm=_read_int_param("/sys/module/kvm/parameters/tsc_tolerance_ppm"),
        )

    @classmethod
    def lasting(cls, vcpu: Any) -> Target:
        """The facts of ``vcpu`` that cannot change while it lives: :meth:`from_vcpu`
        without ``tsc_khz`` and ``tsc_tolerance_ppm`` (None), which can.

        Why none of the others can go stale: ``kernel`` is the running kernel's
        release; ``vendor`` and ``nested_state_size`` come from KVM_CAP_NESTED_STATE,
        and ``msrs`` from KVM_GET_MSR_INDEX_LIST, both handed down when the vCPU was
        made (the vCPU keeps them, never asking again); ``xsave_size``, ``sregs2``,
        ``xcrs`` and ``tsc_control`` are its VM's KVM_CHECK_EXTENSION answers, also
        handed down (and ``xsave_size`` kept by the vCPU itself); ``npt`` is a
        read-only (0444) parameter of kvm_amd, which cannot be reloaded while a VM
        holds it. The two left out: KVM_SET_TSC_KHZ changes the vCPU's rate, and
        ``tsc_tolerance_ppm`` is writable (0644) at any time.

        >>> Target.lasting(vcpu).tsc_khz is None                 # doctest: +SKIP
        True
        """
        indices = vcpu.msr_index_list
        size = vcpu.nested_state_size
        return cls(
            kernel=os.uname().release,
            vendor=vendor_of_capability(size),
            msrs=None if indices is None else frozenset(indices),
            nested_state_size=size,
            xsave_size=vcpu.xsave_size if vcpu.check_extension(uapi.KVM_CAP_XSAVE) > 0 else 0,
            sregs2=vcpu.check_extension(uapi.KVM_CAP_SREGS2) > 0,
            xcrs=vcpu.check_extension(uapi.KVM_CAP_XCRS) > 0,
            tsc_control=vcpu.check_extension(uapi.KVM_CAP_TSC_CONTROL) > 0,
            npt=_read_param("/sys/module/kvm_amd/parameters/npt"),
        )

    def with_tsc_of(self, vcpu: Any, khz: object) -> Target:
        """This target, with the TSC facts a restore of rate ``khz`` needs read afresh.

        They matter only without TSC scaling (``tsc_control`` False), and only
        for a rate below the vCPU's current one: the ``tsc-rate`` rule refuses
        a rate below the target's less ``tsc_tolerance_ppm``, so a rate at or
        above it passes whatever the tolerance. Otherwise (the usual case: the
        state's rate is the vCPU's) this target is returned as it is, its TSC
        facts unknown, and the rule skipped, as it would pass.

        >>> Target(tsc_control=True).with_tsc_of(vcpu, 1000).tsc_khz is None  # doctest: +SKIP
        True
        """
        if self.tsc_control is not False or type(khz) is not int:
            return self
        try:
            current: int | None = vcpu.get_tsc_khz()
        except KvmError:
            current = None
        if not current or khz >= current:
            return self  # unknown, or a rate the rule passes whatever the tolerance
        ppm = _read_int_param("/sys/module/kvm/parameters/tsc_tolerance_ppm")
        return dataclasses.replace(self, tsc_khz=current, tsc_tolerance_ppm=ppm)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: MSRs as a sorted list of hex strings."""
        out: dict[str, Any] = {"format": "kvmstate-target-1"}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if f.name == "msrs":
                value = [hex(i) for i in sorted(value)]
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Target:
        """The inverse of :meth:`to_dict`; ValueError naming the first bad key."""
        if not isinstance(data, Mapping) or data.get("format") != "kvmstate-target-1":
            raise ValueError('not a target file (no "format": "kvmstate-target-1")')
        known = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key == "format":
                continue
            if key not in known:
                raise ValueError(f"target: unknown key {key!r} (known: {', '.join(sorted(known))})")
            try:
                values[key] = _parse_field(key, value)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"target: {key}: {exc}") from None
        return cls(**values)

    @classmethod
    def from_json(cls, text: str | bytes) -> Target:
        """:meth:`from_dict` of JSON text."""
        try:
            data = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"target: not JSON: {exc}") from None
        return cls.from_dict(data)


def _parse_field(key: str, value: Any) -> Any:
    if key in ("kernel", "vendor"):
        if not isinstance(value, str):
            raise TypeError(f"expected a string, not {value!r}")
        if key == "vendor" and value not in ("svm", "vmx"):
            raise ValueError(f"expected 'svm' or 'vmx', not {value!r}")
        return value
    if key in ("sregs2", "xcrs", "tsc_control", "npt"):
        if not isinstance(value, bool):
            raise TypeError(f"expected true or false, not {value!r}")
        return value
    if key in ("nested_state_size", "xsave_size", "tsc_khz", "tsc_tolerance_ppm"):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 32:
            raise ValueError(f"expected an integer 0..2**32-1, not {value!r}")
        return value
    if not isinstance(value, list):  # msrs
        raise TypeError("expected a list of MSR indices")
    return frozenset(_u(item, 32) for item in value)


def _u(item: Any, bits: int) -> int:
    number = int(item, 0) if isinstance(item, str) else item
    if not isinstance(number, int) or isinstance(number, bool) or not 0 <= number < 1 << bits:
        raise ValueError(f"{item!r} is not a {bits}-bit number")
    return number


def _read_int_param(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _read_param(path: str) -> bool | None:
    try:
        with open(path) as f:
            return f.read().strip() in ("1", "Y", "y")
    except OSError:
        return None


def preflight(state: VcpuState, target: Target, *, drop_msrs: bool = True) -> Preflight:
    """Every part and MSR of ``state`` that ``target`` will refuse, before anything is written.

    With ``drop_msrs`` (the default) the MSRs :func:`msr_policy` lets go
    are dropped (in :attr:`Preflight.dropped`); without it every MSR the
    target does not know is a refusal. Facts the target leaves None are
    not checked. Rules: ``msr-unknown-required``, ``msr-unknown-nonzero``,
    ``msr-unknown`` (drop_msrs=False), ``nested-unsupported``,
    ``nested-format``, ``nested-size``, ``sregs2-unsupported``,
    ``xsave-size``, ``xcrs-unsupported``, ``tsc-rate``, ``cpuid-entries``,
    ``cpuid-vaddr-bits``::

        report = preflight(state, Target.from_vcpu(vcpu))
        if not report.ok:
            print("\\n".join(report.lines()))  # restore_state raises PreflightError
    """
    report = Preflight()
    refuse = report.refusals.append
    saved = dict(state.msrs or {})
    known = target.msrs
    # The usual case in one pass, building no set: the target lists every saved MSR.
    unknown: Any = ()
    listed = known is not None and known.issuperset(saved)
    if known is not None and not listed:
        unknown = saved.keys() - known - _SREGS_MSRS
    if not unknown:
        report.msrs = saved
    else:
        for index, value in sorted(saved.items()):
            if index not in unknown:
                report.msrs[index] = value
                continue
            policy = msr_policy(index)
            name = REQUIRED_MSRS.get(index)
            label = f"MSR {index:#x}" + (f" ({name})" if name else "")
            where = f"the target kernel ({target.kernel or 'unknown release'}) does not list it"
            if not drop_msrs:
                refuse(Finding("msrs", "msr-unknown", f"{label} = {value:#x}: {where}"))
            elif policy == "required":
                refuse(
                    Finding(
                        "msrs",
                        "msr-unknown-required",
                        f"{label} = {value:#x}: {where}, and the guest relies on it",
                    )
                )
            elif policy == "if-zero" and value != 0:
                refuse(
                    Finding(
                        "msrs",
                        "msr-unknown-nonzero",
                        f"{label} = {value:#x}: {where}; only a zero (unused) value may be dropped",
                    )
                )
            else:
                report.dropped[index] = value
    # Every saved MSR listed, and as many: the same set, nothing unsaved.
    if known is not None and not (listed and len(known) == len(saved)):
        report.unsaved = sorted(known - saved.keys())
    _nested(state, target, refuse)
    if state.sregs2 is not None and target.sregs2 is False:
        refuse(Finding("sregs2", "sregs2-unsupported", "the target has no KVM_CAP_SREGS2"))
    # A part of the wrong type is left to restore, which names it (TypeError).
    if isinstance(state.xsave, uapi.kvm_xsave) and target.xsave_size is not None:
        size = ctypes.sizeof(state.xsave)
        if target.xsave_size == 0:
            refuse(Finding("xsave", "xsave-size", "the target has no KVM_CAP_XSAVE"))
        elif size < target.xsave_size:
            refuse(
                Finding(
                    "xsave",
                    "xsave-size",
                    f"{size} bytes, the target's KVM_SET_XSAVE reads {target.xsave_size}",
                )
            )
    if state.xcrs is not None and target.xcrs is False:
        refuse(Finding("xcrs", "xcrs-unsupported", "the target has no KVM_CAP_XCRS"))
    khz = state.tsc_khz
    # A rate that is no u32 is left to restore, which names it (ValueError).
    if (
        type(khz) is int
        and 0 <= khz <= 0xFFFF_FFFF
        and target.tsc_control is False
        and target.tsc_khz
    ):
        # kvm_set_tsc_khz: a rate within tsc_tolerance_ppm of the host's is the host's;
        # without TSC scaling a higher one is caught up with, a lower one refused.
        ppm = _TSC_TOLERANCE_PPM if target.tsc_tolerance_ppm is None else target.tsc_tolerance_ppm
        lowest = target.tsc_khz * (1_000_000 - ppm) // 1_000_000
        if khz < lowest:
            refuse(
                Finding(
                    "tsc_khz",
                    "tsc-rate",
                    f"{khz} kHz is below the target's {target.tsc_khz} kHz (less {ppm} ppm: "
                    f"{lowest}) and it cannot scale the TSC (KVM_CAP_TSC_CONTROL is 0; set the "
                    "state's tsc_khz to None to keep the target's rate)",
                )
            )
    if isinstance(state.cpuid, uapi.kvm_cpuid2):
        _cpuid(state.cpuid, refuse)
    return report


def _cpuid(cpuid: uapi.kvm_cpuid2, refuse: Any) -> None:
    """The rules of KVM_SET_CPUID2 that hold on every kernel, whatever its CPUs."""
    count = min(cpuid.nent, cpuid.capacity())  # the entries the object holds of nent
    if count > _MAX_CPUID_ENTRIES:
        refuse(
            Finding(
                "cpuid",
                "cpuid-entries",
                f"{count} entries, KVM takes at most {_MAX_CPUID_ENTRIES}",
            )
        )
    # The entries as u32 words, read in one copy instead of a ctypes object each:
    # kvm_cpuid_entry2 is 10 words (function, index, flags, eax, ebx, ecx, edx, 3 pad).
    words = array("I")
    words.frombytes(ctypes.string_at(ctypes.addressof(cpuid) + _CPUID_HEAD, 40 * count))
    functions = words[0::10]
    k = -1
    while 0x80000008 in functions[k + 1 :]:  # found in C, each entry of that leaf in turn
        k = functions.index(0x80000008, k + 1)
        bits = words[10 * k + 3] >> 8 & 0xFF  # eax[15:8]
        if bits not in _VADDR_BITS:
            refuse(
                Finding(
                    "cpuid",
                    "cpuid-vaddr-bits",
                    f"leaf 0x80000008 gives {bits}-bit virtual addresses; KVM takes 48 or 57",
                )
            )


def _nested(state: VcpuState, target: Target, refuse: Any) -> None:
    nested = state.nested
    if not isinstance(nested, NestedState) or target.nested_state_size is None:
        return
    # Header only, GIF_SET or nothing, no VMXON: the state of a vCPU that never used
    # nesting. Some kernels without KVM_CAP_NESTED_STATE take it, so it is no refusal.
    idle = (
        nested.size <= HEADER_SIZE
        and nested.flags & ~NestedFlag.GIF_SET == 0
        and (nested.format != NestedFormat.VMX or nested.vmx.vmxon_pa == (1 << 64) - 1)
    )
    if target.nested_state_size == 0:
        if not idle:
            refuse(
                Finding("nested", "nested-unsupported", "the target has no KVM_CAP_NESTED_STATE")
            )
        return
    want = {"vmx": NestedFormat.VMX, "svm": NestedFormat.SVM}.get(target.vendor or "")
    if want is not None and nested.format != want:
        refuse(
            Finding(
                "nested",
                "nested-format",
                f"format {nested.format!r}, the target is {target.vendor} ({want.name})",
            )
        )
    if nested.size > target.nested_state_size:
        refuse(
            Finding(
                "nested",
                "nested-size",
                f"{nested.size} bytes, the target takes at most {target.nested_state_size}",
            )
        )
