"""Whole-vCPU state: :class:`VcpuState`, saved and restored in an order nested state needs.

``vcpu.save_state()`` reads every part KVM exposes; ``vcpu.restore_state(s)``
writes them back (``kvmstate.state.save`` / ``restore`` underneath). A part
the kernel lacks (no in-kernel irqchip, no ``KVM_CAP_SREGS2`` ...) is
``None`` and its reason is in :attr:`VcpuState.absent`; nothing is faked.

Restore order, and why (QEMU's ``kvm_arch_put_registers`` keeps the same):

1. ``cpuid``: KVM validates EFER, CR4, XCR0 and MSRs against the guest's
   CPUID, and nested state needs VMX/SVM in it.
2. ``IA32_FEATURE_CONTROL`` (MSR 0x3a): VMX nested state with VMXON needs
   VMX enabled there (QEMU's ``kvm_put_msr_feature_control``).
3. ``sregs`` then ``sregs2``: EFER.SVME / CR4.VMXE must be set before
   ``KVM_SET_NESTED_STATE`` (svm/vmx ``set_nested_state`` check them).
4. ``nested``.
5. ``tsc_khz``: before the TSC MSR, which is scaled by it.
6. ``regs``, then ``xsave`` (or ``fpu``) and ``xcrs``.
7. ``lapic``: before MSRs, as IA32_TSC_DEADLINE only takes in TSC-deadline
   timer mode.
8. the other ``msrs``.
9. ``events``: pending exceptions and NMIs refer to the L1/L2 state above.
10. ``mp_state``, ``debugregs``.

Save order reads ``nested`` last, as QEMU's ``kvm_arch_get_registers``
does: it must see the vCPU after everything else is settled. Complete a
pending I/O exit first (:meth:`Vcpu.complete_io <kvmstate.vcpu.Vcpu.complete_io>`):
the KVM API documentation says the state is only consistent then.
"""

from __future__ import annotations

import dataclasses
import errno
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kvmstate import ioctls as _io
from kvmstate import uapi
from kvmstate.errors import KvmError, NestedStateUnavailableError
from kvmstate.nested import NestedState

if TYPE_CHECKING:
    from kvmstate.vcpu import Vcpu

__all__ = ["MSR_IA32_FEATURE_CONTROL", "PARTS", "StateError", "VcpuState", "restore", "save"]

MSR_IA32_FEATURE_CONTROL = 0x3A

#: Every part of a :class:`VcpuState`, in restore order.
PARTS = (
    "cpuid",
    "sregs",
    "sregs2",
    "nested",
    "tsc_khz",
    "regs",
    "xsave",
    "fpu",
    "xcrs",
    "lapic",
    "msrs",
    "events",
    "mp_state",
    "debugregs",
)


class StateError(KvmError):
    """Saving or restoring one part of a vCPU failed; ``part`` names it, errno is kept."""

    def __init__(self, part: str, exc: OSError) -> None:
        ioctl = getattr(exc, "ioctl", None)
        super().__init__(exc.errno, f"{part}: {exc.strerror}", ioctl=ioctl)
        self.part = part
        self.result = getattr(exc, "result", None)


@dataclasses.dataclass(eq=False)
class VcpuState:
    """Everything KVM exposes for one vCPU; each part is the kernel's own structure.

    ``msrs`` maps MSR index to value (the kernel's ``KVM_GET_MSR_INDEX_LIST``
    less the MSRs this vCPU cannot read). ``absent`` maps a part that is
    ``None`` to the reason. ``extra`` keeps bytes a newer writer stored that
    this version does not know (file format), so they survive a round trip.
    """

    regs: uapi.kvm_regs | None = None
    sregs: uapi.kvm_sregs | None = None
    sregs2: uapi.kvm_sregs2 | None = None
    fpu: uapi.kvm_fpu | None = None
    xsave: uapi.kvm_xsave | None = None
    xcrs: uapi.kvm_xcrs | None = None
    msrs: dict[int, int] | None = None
    events: uapi.kvm_vcpu_events | None = None
    debugregs: uapi.kvm_debugregs | None = None
    mp_state: uapi.kvm_mp_state | None = None
    lapic: uapi.kvm_lapic_state | None = None
    cpuid: uapi.kvm_cpuid2 | None = None
    tsc_khz: int | None = None
    nested: NestedState | None = None
    absent: dict[str, str] = dataclasses.field(default_factory=dict)
    extra: dict[str, bytes] = dataclasses.field(default_factory=dict)

    def parts(self) -> dict[str, Any]:
        """The present parts by name, in restore order."""
        return {p: getattr(self, p) for p in PARTS if getattr(self, p) is not None}

    def part_bytes(self, part: str) -> bytes:
        """One part in the kernel's own bytes (MSRs as a ``kvm_msrs``, tsc_khz as a u32)."""
        value = getattr(self, part)
        if value is None:
            raise KeyError(f"{part} is absent: {self.absent.get(part, 'not saved')}")
        if part == "msrs":
            return _msrs_struct(value).to_bytes()
        if part == "tsc_khz":
            return int(value).to_bytes(4, "little")
        return bytes(value.to_bytes())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, VcpuState):
            return NotImplemented
        mine, theirs = self.parts(), other.parts()
        if mine.keys() != theirs.keys() or self.extra != other.extra:
            return False
        return all(self.part_bytes(p) == other.part_bytes(p) for p in mine)

    __hash__ = None  # type: ignore[assignment]

    def differing_parts(self, other: VcpuState) -> list[str]:
        """Names of the parts whose bytes differ (or that only one side has)."""
        out = []
        for part in PARTS:
            a, b = getattr(self, part), getattr(other, part)
            if (a is None) != (b is None) or (
                a is not None and self.part_bytes(part) != other.part_bytes(part)
            ):
                out.append(part)
        return out

    def __repr__(self) -> str:
        present = []
        for part, value in self.parts().items():
            if part == "msrs":
                present.append(f"msrs[{len(value)}]")
            elif part == "cpuid":
                present.append(f"cpuid[{len(value)}]")
            elif part == "nested":
                present.append(f"nested={value!r}")
            elif part == "tsc_khz":
                present.append(f"tsc_khz={value}")
            else:
                present.append(part)
        if self.regs is not None:
            present.insert(0, f"rip={self.regs.rip:#x}")
        absent = f", absent={sorted(self.absent)}" if self.absent else ""
        return f"VcpuState({', '.join(present)}{absent})"

    def __reduce__(self) -> tuple[Any, ...]:
        from kvmstate.snapshot import loads_vcpu

        return (loads_vcpu, (self.to_bytes(),))

    def to_bytes(self) -> bytes:
        """The versioned file format (see :mod:`kvmstate.snapshot`)."""
        from kvmstate.snapshot import dumps_vcpu

        data: bytes = dumps_vcpu(self)
        return data

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> VcpuState:
        """Parse :meth:`to_bytes` output; ValueError for anything malformed."""
        from kvmstate.snapshot import loads_vcpu

        state: VcpuState = loads_vcpu(data)
        return state


def _msrs_struct(values: dict[int, int]) -> uapi.kvm_msrs:
    msrs = uapi.kvm_msrs.new(len(values))
    for entry, (index, value) in zip(msrs.items(), sorted(values.items()), strict=True):
        entry.index, entry.data = index, value
    return msrs


def _readable_msrs(vcpu: Vcpu, indices: list[int]) -> list[int]:
    """The subset of ``indices`` this vCPU can read (the kernel stops at the first it cannot)."""
    readable: list[int] = []
    pending = list(indices)
    while pending:
        msrs = uapi.kvm_msrs.new(len(pending))
        for entry, index in zip(msrs.items(), pending, strict=True):
            entry.index = index
        # nmsrs == len(entries): the kernel touches only those entries.
        done = vcpu._ioctl(_io.KVM_GET_MSRS, msrs)
        readable.extend(pending[:done])
        pending = pending[done + 1 :]  # skip the one it refused
    return readable


def _attempt(state: VcpuState, part: str, read: Callable[[], Any], *absent_errnos: int) -> None:
    try:
        setattr(state, part, read())
    except NestedStateUnavailableError as exc:
        state.absent[part] = f"no nested support ({exc.ioctl}: errno {exc.errno})"
    except KvmError as exc:
        if exc.errno in absent_errnos:
            state.absent[part] = f"{exc.ioctl or part}: {exc.strerror}"
        else:
            raise StateError(part, exc) from None


def save(vcpu: Vcpu) -> VcpuState:
    """Read every part of ``vcpu`` (nested state last); see the module docstring."""
    state = VcpuState()
    kvm = getattr(vcpu.vm, "kvm", None)
    caps = _caps(vcpu)

    _attempt(state, "cpuid", vcpu.get_cpuid2, errno.EINVAL, errno.E2BIG)
    _attempt(state, "regs", vcpu.get_regs)
    if caps["xsave"]:
        _attempt(state, "xsave", vcpu.get_xsave)
    else:
        state.absent["xsave"] = "KVM_CAP_XSAVE is 0"
        _attempt(state, "fpu", vcpu.get_fpu)
    if caps["xcrs"]:
        _attempt(state, "xcrs", vcpu.get_xcrs)
    else:
        state.absent["xcrs"] = "KVM_CAP_XCRS is 0"
    _attempt(state, "sregs", vcpu.get_sregs)
    if caps["sregs2"]:
        _attempt(state, "sregs2", vcpu.get_sregs2)
    else:
        state.absent["sregs2"] = "KVM_CAP_SREGS2 is 0"

    indices = vcpu._msr_indices
    if indices is None:
        if kvm is None or kvm.closed:
            raise ValueError("saving MSRs needs the Kvm (KVM_GET_MSR_INDEX_LIST); borrowed vCPU?")
        indices = vcpu._msr_indices = _readable_msrs(vcpu, kvm.get_msr_index_list())
    try:
        state.msrs = vcpu.get_msrs(indices)
    except OSError as exc:
        raise StateError("msrs", exc) from None

    # Without an in-kernel irqchip there is no LAPIC to read (ENXIO / EINVAL).
    _attempt(state, "lapic", vcpu.get_lapic, errno.ENXIO, errno.EINVAL)
    _attempt(state, "mp_state", vcpu.get_mp_state)
    _attempt(state, "events", vcpu.get_vcpu_events)
    _attempt(state, "debugregs", vcpu.get_debugregs)
    _attempt(state, "tsc_khz", vcpu.get_tsc_khz, errno.EIO, errno.ENOTTY, errno.EINVAL)
    if vcpu.nested_state_size == 0:
        state.absent["nested"] = "KVM_CAP_NESTED_STATE is 0"
    else:
        _attempt(state, "nested", vcpu.get_nested_state)
    return state


def restore(vcpu: Vcpu, state: VcpuState) -> None:
    """Write ``state`` into ``vcpu`` in the order the module docstring gives."""

    def put(part: str, write: Callable[[], object]) -> None:
        try:
            write()
        except OSError as exc:
            raise StateError(part, exc) from None

    s = state
    if s.cpuid is not None:
        put("cpuid", lambda: vcpu.set_cpuid2(s.cpuid))  # type: ignore[arg-type]
    msrs = dict(s.msrs or {})
    if MSR_IA32_FEATURE_CONTROL in msrs:
        value = msrs.pop(MSR_IA32_FEATURE_CONTROL)
        put("msrs", lambda: vcpu.set_msrs({MSR_IA32_FEATURE_CONTROL: value}))
    if s.sregs is not None:
        put("sregs", lambda: vcpu.set_sregs(s.sregs))  # type: ignore[arg-type]
    if s.sregs2 is not None:
        put("sregs2", lambda: vcpu.set_sregs2(s.sregs2))  # type: ignore[arg-type]
    if s.nested is not None:
        put("nested", lambda: vcpu.set_nested_state(s.nested))
    if s.tsc_khz is not None:
        khz = s.tsc_khz
        try:
            if vcpu.get_tsc_khz() != khz:
                vcpu.set_tsc_khz(khz)
        except OSError as exc:
            raise StateError("tsc_khz", exc) from None
    if s.regs is not None:
        put("regs", lambda: vcpu.set_regs(s.regs))  # type: ignore[arg-type]
    if s.xsave is not None:
        put("xsave", lambda: vcpu.set_xsave(s.xsave))  # type: ignore[arg-type]
    elif s.fpu is not None:
        put("fpu", lambda: vcpu.set_fpu(s.fpu))  # type: ignore[arg-type]
    if s.xcrs is not None:
        put("xcrs", lambda: vcpu.set_xcrs(s.xcrs))  # type: ignore[arg-type]
    if s.lapic is not None:
        put("lapic", lambda: vcpu.set_lapic(s.lapic))  # type: ignore[arg-type]
    if msrs:
        put("msrs", lambda: vcpu.set_msrs(msrs))
    if s.events is not None:
        put("events", lambda: vcpu.set_vcpu_events(s.events))  # type: ignore[arg-type]
    if s.mp_state is not None:
        put("mp_state", lambda: vcpu.set_mp_state(s.mp_state))  # type: ignore[arg-type]
    if s.debugregs is not None:
        put("debugregs", lambda: vcpu.set_debugregs(s.debugregs))  # type: ignore[arg-type]


def _caps(vcpu: Vcpu) -> dict[str, bool]:
    cached = vcpu._state_caps
    if cached is None:
        kvm = getattr(vcpu.vm, "kvm", None)

        def has(cap: int) -> bool:
            return bool(kvm is not None and not kvm.closed and kvm.check_extension(cap))

        cached = vcpu._state_caps = {
            "xsave": has(uapi.KVM_CAP_XSAVE),
            "xcrs": has(uapi.KVM_CAP_XCRS),
            "sregs2": has(uapi.KVM_CAP_SREGS2),
        }
    return cached
