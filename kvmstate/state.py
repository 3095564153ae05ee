"""Whole-vCPU state: :class:`VcpuState`, saved and restored in an order nested state needs.

``vcpu.save_state()`` reads every part KVM exposes; ``vcpu.restore_state(s)``
writes them back (``kvmstate.state.save`` / ``restore`` underneath). A part
the kernel lacks (no in-kernel irqchip, no ``KVM_CAP_SREGS2`` ...) is
``None`` and its reason is in :attr:`VcpuState.absent`; nothing is faked.

Restore order, and why (QEMU's ``kvm_arch_put_registers`` keeps the same):

1. ``cpuid``: KVM validates EFER, CR4, XCR0 and MSRs against the guest's
   CPUID, and nested state needs VMX/SVM in it.
2. ``IA32_FEATURE_CONTROL`` (MSR 0x3a) and the VMX capability MSRs
   (0x480..0x491, ``IA32_VMX_BASIC`` .. ``IA32_VMX_VMFUNC``): VMX nested
   state with VMXON needs VMX enabled in the first (QEMU's
   ``kvm_put_msr_feature_control``), and KVM refuses to change the others
   once the vCPU is in VMX operation (``vmx_set_vmx_msr``: EBUSY).
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

import ctypes
import dataclasses
import errno
import fcntl
import importlib
import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from kvmstate import ioctls as _io
from kvmstate import uapi
from kvmstate.errors import KvmError, NestedStateUnavailableError
from kvmstate.ioctls import IOCTL_NAMES
from kvmstate.nested import NestedState
from kvmstate.vcpu import _msr_buffer, _msr_indices, _msr_values

if TYPE_CHECKING:
    from kvmstate.vcpu import Vcpu

__all__ = [
    "MSR_IA32_FEATURE_CONTROL",
    "PARTS",
    "StateError",
    "VcpuState",
    "msr_lines",
    "restore",
    "save",
]

MSR_IA32_FEATURE_CONTROL = 0x3A
# IA32_VMX_BASIC (0x480) .. IA32_VMX_VMFUNC (0x491): KVM refuses to change them once the
# vCPU is in VMX operation (vmx_set_vmx_msr: -EBUSY), so they go before nested state.
_VMX_CAPABILITY_MSRS = range(0x480, 0x492)
_EARLY_MSRS = frozenset({MSR_IA32_FEATURE_CONTROL, *_VMX_CAPABILITY_MSRS})

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


# What each structured part must be (the file format writes its bytes as they are).
_PART_TYPES: dict[str, type[Any]] = {
    "regs": uapi.kvm_regs,
    "sregs": uapi.kvm_sregs,
    "sregs2": uapi.kvm_sregs2,
    "fpu": uapi.kvm_fpu,
    "xsave": uapi.kvm_xsave,
    "xcrs": uapi.kvm_xcrs,
    "events": uapi.kvm_vcpu_events,
    "debugregs": uapi.kvm_debugregs,
    "mp_state": uapi.kvm_mp_state,
    "lapic": uapi.kvm_lapic_state,
    "cpuid": uapi.kvm_cpuid2,
    "nested": NestedState,
}


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
        """One part in the kernel's own bytes (MSRs as a ``kvm_msrs``, tsc_khz as a u32).

        KeyError for an unknown or absent part; TypeError/ValueError naming
        the part when its value is not what the file format can carry.
        """
        if part not in PARTS:
            raise KeyError(f"{part} is not a part (one of {', '.join(PARTS)})")
        value = getattr(self, part)
        if value is None:
            raise KeyError(f"{part} is absent: {self.absent.get(part, 'not saved')}")
        if part == "msrs":
            return _msrs_struct(value).to_bytes()
        if part == "tsc_khz":
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"tsc_khz: expected an int, not {type(value).__name__}")
            if not 0 <= value <= 0xFFFF_FFFF:
                raise ValueError(f"tsc_khz: {value} does not fit in 32 bits")
            return value.to_bytes(4, "little")
        kind = _PART_TYPES[part]
        if not isinstance(value, kind):
            raise TypeError(f"{part}: expected {kind.__name__}, not {type(value).__name__}")
        if part == "cpuid" and value.nent != value.capacity():
            raise ValueError(
                f"cpuid: nent is {value.nent} but the object holds {value.capacity()} entries "
                "(use trimmed())"
            )
        if part == "xsave":
            n = ctypes.sizeof(value)
            if n % 4 or n > 1 << 20:
                raise ValueError(f"xsave: {n} bytes is not an XSAVE area (>= 4096, 4-aligned)")
        elif part not in ("cpuid", "nested") and ctypes.sizeof(value) != ctypes.sizeof(kind):
            raise ValueError(
                f"{part}: {ctypes.sizeof(value)} bytes, {kind.__name__} is {ctypes.sizeof(kind)}"
            )
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
        if not isinstance(other, VcpuState):
            raise TypeError(f"differing_parts() needs a VcpuState, not {type(other).__name__}")
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

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        """IPython: one part per line, in restore order; MSRs sorted, in hex.

        Mirrors print as their own pretty forms (CPUID one leaf per line).
        """
        if cycle:
            p.text("VcpuState(...)")
            return
        items: list[tuple[str, Any]] = []
        if self.regs is not None:
            items.append(("rip", f"{self.regs.rip:#x}"))
        items += list(self.parts().items())
        if self.absent:
            items.append(("absent", dict(sorted(self.absent.items()))))
        if self.extra:
            items.append(("extra", {k: f"<{len(v)} bytes>" for k, v in self.extra.items()}))
        with p.group(4, "VcpuState(", ")"):
            for i, (name, value) in enumerate(items):
                if i:
                    p.text(",")
                p.breakable("" if i == 0 else " ")
                p.text(f"{name}=")
                if name == "msrs":
                    _pretty_msrs(p, value)
                elif isinstance(value, str):
                    p.text(value)
                else:
                    p.pretty(value)

    def __reduce__(self) -> tuple[Any, ...]:
        from kvmstate.snapshot import loads_vcpu

        return (loads_vcpu, (self.to_bytes(),))

    def to_bytes(self) -> bytes:
        """The versioned file format (see :mod:`kvmstate.snapshot`)."""
        data: bytes = _snapshot().dumps_vcpu(self)
        return data

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> VcpuState:
        """Parse :meth:`to_bytes` output; ValueError for anything malformed."""
        state: VcpuState = _snapshot().loads_vcpu(data)
        return state


def _snapshot() -> Any:
    """:mod:`kvmstate.snapshot`, which imports this module: found at call time.

    A lookup in ``sys.modules`` once it is loaded; an ``import`` statement in
    the method would run the import machinery on every call.
    """
    return sys.modules.get("kvmstate.snapshot") or importlib.import_module("kvmstate.snapshot")


def msr_lines(values: Mapping[int, int]) -> list[str]:
    """``{index: value}`` as ``"0x174: 0x10"`` lines, sorted by index, both in hex.

    >>> msr_lines({0x176: 0, 0x10: 0x1234})
    ['0x10: 0x1234', '0x176: 0x0']
    """
    return [f"{i:#x}: {v:#x}" for i, v in sorted(values.items())]


def _pretty_msrs(p: Any, values: Mapping[int, int]) -> None:
    lines = msr_lines(values)
    with p.group(4, "{", "}"):
        for i, line in enumerate(lines):
            if i:
                p.text(",")
            p.breakable("" if i == 0 else " ")
            p.text(line)


def _msrs_struct(values: Mapping[int, int]) -> uapi.kvm_msrs:
    """A ``kvm_msrs`` of ``{index: value}`` sorted by index; indices must fit in 32 bits,
    values in 64 (TypeError/ValueError naming the MSR: ctypes would wrap them)."""
    if not isinstance(values, Mapping):
        raise TypeError(f"msrs: expected a mapping of index to value, not {type(values).__name__}")
    ordered = dict(sorted(values.items()))
    msrs, words = _msr_buffer(_msr_indices(ordered.keys()))
    words[1::2] = _msr_values(ordered)
    return msrs


def _put_msrs(vcpu: Vcpu, values: dict[int, int], msrs: uapi.kvm_msrs | None = None) -> None:
    """KVM_SET_MSRS, tolerating an MSR the kernel will not write if it already holds the value.

    KVM refuses some host writes that its reads allow (MSR_KVM_ASYNC_PF_INT
    without an in-kernel LAPIC); a state saved there must still restore there.
    ``msrs``: ``_msrs_struct(values)`` when the caller has it already.
    """
    items: list[tuple[int, int]] | None = None  # sorted only if the kernel stops short
    count = len(values)
    while count:
        if msrs is None:
            msrs = _msrs_struct(dict(items) if items is not None else values)
        # nmsrs == len(entries): the kernel reads only those entries.
        done = vcpu._ioctl(_io.KVM_SET_MSRS, msrs)
        if done == count:
            return
        if items is None:
            items = sorted(values.items())
        index, wanted = items[done]
        try:
            current = vcpu.get_msrs([index])[index]
        except KvmError:
            current = None
        if current != wanted:
            raise KvmError(
                None,
                f"processed {done} of {len(items)} MSRs; MSR {index:#x} was refused",
                ioctl="KVM_SET_MSRS",
                result=done,
            )
        items = items[done + 1 :]
        count = len(items)
        msrs = None


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


# (part, structure, GET request, SET request, errnos meaning "the kernel has none").
_Step = tuple[str, Any, int, int, tuple[int, ...]]


def _plan(vcpu: Vcpu) -> list[_Step]:
    """The fixed-size parts this vCPU's KVM offers, in save order (built once per vCPU)."""
    plan = vcpu._state_plan
    if plan is not None:
        return plan
    kvm = getattr(vcpu.vm, "kvm", None)

    def has(cap: int) -> bool:
        return bool(kvm is not None and not kvm.closed and kvm.check_extension(cap))

    plan = [("regs", uapi.kvm_regs, _io.KVM_GET_REGS, _io.KVM_SET_REGS, ())]
    if has(uapi.KVM_CAP_XSAVE):
        size = vcpu.xsave_size
        get = _io.KVM_GET_XSAVE2 if size > 4096 else _io.KVM_GET_XSAVE
        # The area is xsave_size bytes: what XSAVE2 writes and SET_XSAVE reads.
        plan.append(("xsave", type(uapi.kvm_xsave.sized(size)), get, _io.KVM_SET_XSAVE, ()))
    else:
        plan.append(("fpu", uapi.kvm_fpu, _io.KVM_GET_FPU, _io.KVM_SET_FPU, ()))
    if has(uapi.KVM_CAP_XCRS):
        plan.append(("xcrs", uapi.kvm_xcrs, _io.KVM_GET_XCRS, _io.KVM_SET_XCRS, ()))
    plan.append(("sregs", uapi.kvm_sregs, _io.KVM_GET_SREGS, _io.KVM_SET_SREGS, ()))
    if has(uapi.KVM_CAP_SREGS2):
        plan.append(("sregs2", uapi.kvm_sregs2, _io.KVM_GET_SREGS2, _io.KVM_SET_SREGS2, ()))
    # Without an in-kernel irqchip there is no LAPIC to read (ENXIO / EINVAL).
    plan.append(
        ("lapic", uapi.kvm_lapic_state, _io.KVM_GET_LAPIC, _io.KVM_SET_LAPIC, (_ENXIO, _EINVAL))
    )
    plan.append(("mp_state", uapi.kvm_mp_state, _io.KVM_GET_MP_STATE, _io.KVM_SET_MP_STATE, ()))
    plan.append(
        ("events", uapi.kvm_vcpu_events, _io.KVM_GET_VCPU_EVENTS, _io.KVM_SET_VCPU_EVENTS, ())
    )
    plan.append(("debugregs", uapi.kvm_debugregs, _io.KVM_GET_DEBUGREGS, _io.KVM_SET_DEBUGREGS, ()))
    vcpu._state_plan = plan
    return plan


_ENXIO, _EINVAL = errno.ENXIO, errno.EINVAL
_NOT_THERE = {
    "xsave": "KVM_CAP_XSAVE is 0",
    "xcrs": "KVM_CAP_XCRS is 0",
    "sregs2": "KVM_CAP_SREGS2 is 0",
}


def save(vcpu: Vcpu) -> VcpuState:
    """Read every part of ``vcpu`` (nested state last); see the module docstring."""
    state = VcpuState()
    plan = _plan(vcpu)
    fd = vcpu.fileno()
    _attempt(state, "cpuid", vcpu.get_cpuid2, errno.EINVAL, errno.E2BIG)
    for part, cls, get, _, absent in plan:
        obj = cls()
        try:
            # Each structure is the size its GET request encodes (xsave: KVM_CAP_XSAVE2).
            fcntl.ioctl(fd, get, obj)
        except OSError as exc:
            if exc.errno in absent:
                why = f"{IOCTL_NAMES[get]}: {exc.strerror}"
                if part == "lapic":
                    why = f"no in-kernel irqchip (Vm.create_irqchip) ({why})"
                state.absent[part] = why
                continue
            raise StateError(part, vcpu.kvm_error(exc, get)) from None
        setattr(state, part, obj)
    done = {step[0] for step in plan}
    for part, why in _NOT_THERE.items():
        if part not in done:
            state.absent[part] = why

    indices = vcpu._msr_indices
    if indices is None:
        kvm = getattr(vcpu.vm, "kvm", None)
        if kvm is None or kvm.closed:
            raise ValueError("saving MSRs needs the Kvm (KVM_GET_MSR_INDEX_LIST); borrowed vCPU?")
        indices = vcpu._msr_indices = _readable_msrs(vcpu, kvm.get_msr_index_list())
    try:
        state.msrs = vcpu.get_msrs(indices)
    except OSError as exc:
        raise StateError("msrs", exc) from None

    _attempt(state, "tsc_khz", vcpu.get_tsc_khz, errno.EIO, errno.ENOTTY, errno.EINVAL)
    if vcpu.nested_state_size == 0:
        state.absent["nested"] = "KVM_CAP_NESTED_STATE is 0"
    else:
        _attempt(state, "nested", vcpu.get_nested_state)
    return state


def restore(vcpu: Vcpu, state: VcpuState) -> None:
    """Write ``state`` into ``vcpu`` in the order the module docstring gives."""
    s = state
    plan = {step[0]: step for step in _plan(vcpu)}
    fd = vcpu.fileno()

    def put(part: str, write: Callable[[], object]) -> None:
        try:
            write()
        except OSError as exc:
            raise StateError(part, exc) from None

    def put_fixed(part: str) -> None:
        obj = getattr(s, part)
        if obj is None:
            return
        step = plan.get(part)
        if step is None:
            raise StateError(part, KvmError(errno.ENOTSUP, "this KVM cannot set it"))
        _, cls, _, set_request, _ = step
        # XSAVE areas come in several sizes (sized subclasses); the rest must match exactly.
        expected = uapi.kvm_xsave if part == "xsave" else cls
        if not isinstance(obj, expected):
            raise TypeError(f"{part}: expected {expected.__name__}, not {type(obj).__name__}")
        if ctypes.sizeof(obj) < ctypes.sizeof(cls):
            raise ValueError(
                f"{part}: {ctypes.sizeof(obj)} bytes, this KVM reads {ctypes.sizeof(cls)}"
            )
        try:
            if isinstance(obj, uapi.kvm_lapic_state):
                vcpu.set_lapic(obj)  # names a missing irqchip
            else:
                # At least the size the kernel reads (checked just above).
                fcntl.ioctl(fd, set_request, obj)
        except KvmError as exc:
            raise StateError(part, exc) from None
        except OSError as exc:
            raise StateError(part, vcpu.kvm_error(exc, set_request)) from None

    # The MSR lists, built (and so their indices and values checked) before anything is
    # written: the early ones and the rest, each once.
    if s.msrs is not None and not isinstance(s.msrs, Mapping):
        _msrs_struct(s.msrs)  # raises TypeError, naming the part
    msrs = dict(s.msrs or {})
    early = {i: msrs.pop(i) for i in sorted(i for i in msrs if i in _EARLY_MSRS)}
    early_list = _msrs_struct(early) if early else None
    ordered = _msrs_struct(msrs) if msrs else None
    if s.cpuid is not None:
        put("cpuid", lambda: vcpu.set_cpuid2(s.cpuid))  # type: ignore[arg-type]
    if early:
        put("msrs", lambda: _put_msrs(vcpu, early, early_list))
    put_fixed("sregs")
    put_fixed("sregs2")
    if s.nested is not None:
        put("nested", lambda: vcpu.set_nested_state(s.nested))
    if s.tsc_khz is not None:
        # Set even when KVM_GET_TSC_KHZ already reads the rate: after a refused set it
        # reports the refused rate (docs/quirks.md), which must not pass for restored.
        try:
            vcpu.set_tsc_khz(s.tsc_khz)
        except OSError as exc:
            hint = " (set the state's tsc_khz to None to keep this vCPU's rate)"
            error = KvmError(exc.errno, f"{exc.strerror}{hint}", ioctl=getattr(exc, "ioctl", None))
            raise StateError("tsc_khz", error) from None
    put_fixed("regs")
    put_fixed("xsave" if s.xsave is not None else "fpu")
    put_fixed("xcrs")
    put_fixed("lapic")
    if msrs:
        put("msrs", lambda: _put_msrs(vcpu, msrs, ordered))
    put_fixed("events")
    put_fixed("mp_state")
    put_fixed("debugregs")
