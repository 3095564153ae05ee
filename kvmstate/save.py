"""Saving and restoring a whole vCPU, in the order nested state needs.

``vcpu.save_state()`` calls :func:`save`, ``vcpu.restore_state(s)``
:func:`restore`. Both walk :data:`kvmstate.state.PART_TABLE`; the parts that
need more than one GET or SET (CPUID, MSRs, the TSC rate, nested state, the
XSAVE area's size, the LAPIC's missing irqchip) are handled by name here, the
others by their row alone. The vCPU is anything with :class:`~kvmstate.vcpu.Vcpu`'s
methods: this module sits below the wrappers, which call it.

Restore order, and why (close to QEMU's ``kvm_arch_put_registers``, but with
the TSC before nested state):

1. ``cpuid``: KVM validates EFER, CR4, XCR0 and MSRs against the guest's
   CPUID, and nested state needs VMX/SVM in it.
2. ``IA32_FEATURE_CONTROL`` (MSR 0x3a) and the VMX capability MSRs
   (0x480..0x491, ``IA32_VMX_BASIC`` .. ``IA32_VMX_VMFUNC``): VMX nested
   state with VMXON needs VMX enabled in the first (QEMU's
   ``kvm_put_msr_feature_control``), and KVM refuses to change the others
   once the vCPU is in VMX operation (``vmx_set_vmx_msr``: EBUSY).
3. ``tsc_khz``, then IA32_TSC (MSR 0x10): the TSC is scaled by the rate,
   and ``KVM_SET_NESTED_STATE`` starts L2's VMX preemption timer from the
   saved deadline and the vCPU's TSC at that moment
   (``vmx_calc_preemption_timer_value``): on a new vCPU, whose TSC starts
   near 0, a TSC written after nested state would make the timer late by
   the whole saved TSC. The kernel's selftests (``vcpu_load_state``) also
   put MSRs before nested state.
4. ``sregs`` then ``sregs2``: EFER.SVME / CR4.VMXE must be set before
   ``KVM_SET_NESTED_STATE`` (svm/vmx ``set_nested_state`` check them).
5. ``nested``.
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

>>> saved = save(vcpu)                      # doctest: +SKIP
>>> restore(other_vcpu, saved)              # doctest: +SKIP
"""

from __future__ import annotations

import ctypes
import errno
import operator
import warnings
import weakref
from array import array
from collections.abc import Callable, Mapping
from typing import Any

from kvmstate import ioctls as io
from kvmstate import uapi
from kvmstate._fd import raw_ioctl
from kvmstate.errors import KvmError, NestedStateUnavailableError, StateError
from kvmstate.nested import NestedState, check_for_set
from kvmstate.preflight import DroppedMsrWarning, PreflightError, Target, preflight
from kvmstate.state import PART_TABLE, PARTS, Part, VcpuState
from kvmstate.x86 import MSR_IA32_FEATURE_CONTROL, MSR_IA32_TSC, VMX_CAPABILITY_MSRS

__all__ = ["EARLY_MSRS", "restore", "save"]

#: MSRs restored right after CPUID, before any other part (steps 2 of the order above).
EARLY_MSRS = frozenset({MSR_IA32_FEATURE_CONTROL, *VMX_CAPABILITY_MSRS})

# The parts save() and restore() do not move by their row alone.
_BY_NAME = frozenset({"cpuid", "nested", "tsc_khz", "msrs"})

# Per vCPU, worked out on its first save: the rows its KVM offers (with the structure
# each GET fills), the parts it lacks for a capability, and the MSRs it can read (with
# the kvm_msrs words that ask for them). Kept here, not on the vCPU object.
_PLANS: weakref.WeakKeyDictionary[Any, list[tuple[Part, Any, int]]] = weakref.WeakKeyDictionary()
_LACKING: weakref.WeakKeyDictionary[Any, dict[str, str]] = weakref.WeakKeyDictionary()
_READABLE: weakref.WeakKeyDictionary[Any, tuple[list[int], array[int]]] = (
    weakref.WeakKeyDictionary()
)


def _lacking(vcpu: Any) -> dict[str, str]:
    """The parts :func:`_plan` left out for a capability of 0, each with that reason."""
    lacking = _LACKING.get(vcpu)
    if lacking is None:
        done = {row.name for row, _, _ in _plan(vcpu)}
        lacking = _LACKING[vcpu] = {
            row.name: f"{row.capability} is 0"
            for row in PART_TABLE.values()
            if row.name not in done
            and row.name not in _BY_NAME
            and row.unless is None
            and row.capability is not None
        }
    return lacking


def _plan(vcpu: Any) -> list[tuple[Part, Any, int]]:
    """``(row, structure, GET request)`` for each plain part this vCPU's KVM offers."""
    plan = _PLANS.get(vcpu)
    if plan is not None:
        return plan

    def has(name: str) -> bool:
        return int(vcpu.check_extension(getattr(uapi, name))) > 0

    plan = []
    for row in PART_TABLE.values():
        if row.name in _BY_NAME:
            continue
        if row.capability is not None and not has(row.capability):
            continue
        if row.unless is not None and has(row.unless):
            continue
        kind, get = row.type, row.get
        if row.codec == "xsave":
            size = vcpu.xsave_size
            # The area is xsave_size bytes: what XSAVE2 writes and SET_XSAVE reads.
            kind = type(uapi.kvm_xsave.sized(size))
            get = io.KVM_GET_XSAVE2 if size > 4096 else io.KVM_GET_XSAVE
        plan.append((row, kind, get))
    _PLANS[vcpu] = plan
    return plan


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


def save(vcpu: Any) -> VcpuState:
    """Read every part of ``vcpu`` (nested state last); see the module docstring."""
    state = VcpuState()
    plan = _plan(vcpu)
    fd = vcpu.fileno()
    _attempt(state, "cpuid", vcpu.get_cpuid2, errno.EINVAL, errno.E2BIG)
    for row, kind, get in plan:
        obj = kind()
        try:
            # Each structure is the size its GET request encodes (xsave: KVM_CAP_XSAVE2).
            raw_ioctl(fd, get, obj)
        except OSError as exc:
            if exc.errno in row.absent_errnos:
                why = f"{io.IOCTL_NAMES[get]}: {exc.strerror}"
                state.absent[row.name] = f"{row.absent_why} ({why})" if row.absent_why else why
                continue
            raise StateError(row.name, vcpu.kvm_error(exc, get)) from None
        setattr(state, row.name, obj)
    state.absent.update(_lacking(vcpu))

    readable = _READABLE.get(vcpu)
    if readable is None:
        wanted = vcpu.msr_index_list
        if wanted is None:
            raise ValueError("saving MSRs needs the Kvm (KVM_GET_MSR_INDEX_LIST); borrowed vCPU?")
        indices = _readable_msrs(vcpu, list(wanted))
        readable = _READABLE[vcpu] = (indices, uapi.msrs_words(uapi.msr_index_array(indices)))
    indices, template = readable
    words = template[:]  # a copy: nmsrs and the indices set, the values for the kernel
    try:
        # words holds nmsrs == len(indices) entries: the kernel reads and writes only those.
        done = raw_ioctl(fd, io.KVM_GET_MSRS, words)
    except OSError as exc:
        raise StateError("msrs", vcpu.kvm_error(exc, io.KVM_GET_MSRS)) from None
    if done != len(indices):
        error = KvmError(
            None,
            f"processed {done} of {len(indices)} MSRs; MSR {indices[done]:#x} was refused",
            ioctl="KVM_GET_MSRS",
            result=done,
        )
        raise StateError("msrs", error)
    state.msrs = dict(zip(indices, words[2::2].tolist(), strict=True))

    _attempt(state, "tsc_khz", vcpu.get_tsc_khz, errno.EIO, errno.ENOTTY, errno.EINVAL)
    if vcpu.nested_state_size == 0:
        state.absent["nested"] = "KVM_CAP_NESTED_STATE is 0"
    else:
        _attempt(state, "nested", vcpu.get_nested_state)
    return state


def restore(vcpu: Any, state: VcpuState, *, drop_msrs: bool = True) -> None:
    """Write ``state`` into ``vcpu`` in the order the module docstring gives.

    First :func:`kvmstate.preflight.preflight` against this vCPU: if it
    would refuse anything, :class:`~kvmstate.preflight.PreflightError`
    (nothing written). MSRs this kernel does not know are dropped where the
    policy allows (``drop_msrs=False``: refused), with a
    :class:`~kvmstate.preflight.DroppedMsrWarning` that lists them.
    """
    if not isinstance(state, VcpuState):
        raise TypeError(f"restore() needs a VcpuState, not {type(state).__name__}")
    s = state
    # The MSRs sorted and checked (TypeError/ValueError naming a bad one), once, before
    # anything is written; the lists written below are cut from this one.
    checked = None if s.msrs is None else _msr_list(s.msrs)
    if isinstance(s.nested, NestedState):
        check_for_set(s.nested)  # and a malformed nested state (ValueError naming the field)
    target = _TARGETS.get(vcpu)
    if target is None:
        target = _TARGETS[vcpu] = Target.lasting(vcpu)
    report = preflight(s, target.with_tsc_of(vcpu, s.tsc_khz), drop_msrs=drop_msrs)
    if not report.ok:
        raise PreflightError(report)
    if report.dropped:
        # stacklevel 3: the caller of Vcpu.restore_state, whose state it was.
        warnings.warn(DroppedMsrWarning(report.dropped), stacklevel=3)
    plan = _set_plan(vcpu)
    fd = vcpu.fileno()

    def put(part: str, write: Callable[[], object]) -> None:
        try:
            write()
        except OSError as exc:
            raise StateError(part, exc) from None

    # The MSR lists: the early ones, IA32_TSC, the rest. report.msrs is the state's
    # MSRs less what the pre-flight dropped.
    early: array[int] | None = None
    tsc: array[int] | None = None
    rest: array[int] | None = None
    if checked is not None:
        if report.dropped:
            checked = _msr_list(report.msrs)
        early, tsc, rest = _split_msrs(checked)
    if s.cpuid is not None:
        put("cpuid", lambda: vcpu.set_cpuid2(s.cpuid))
    if early is not None:
        put("msrs", lambda: _put_msrs(vcpu, early))
    if s.tsc_khz is not None:
        _restore_tsc_khz(vcpu, s.tsc_khz)
    if tsc is not None:
        # Before nested state, at the rate just set: L2's preemption timer starts from it.
        put("msrs", lambda: _put_msrs(vcpu, tsc))
    for part in PARTS:
        value = getattr(s, part)
        if value is None or part in ("cpuid", "tsc_khz"):
            continue
        if part == "nested":
            put("nested", lambda: vcpu.set_nested_state(s.nested))
        elif part == "msrs":
            if rest is not None:  # the rest, after the LAPIC (IA32_TSC_DEADLINE)
                put("msrs", lambda: _put_msrs(vcpu, rest))
        elif part == "fpu" and s.xsave is not None:
            continue  # the XSAVE area holds the FPU state too, and wins
        else:
            step = plan.get(part)
            if step is None:
                raise StateError(part, KvmError(errno.ENOTSUP, "this KVM cannot set it"))
            row, size = step
            # XSAVE areas come in several sizes (sized subclasses); the rest must match.
            if not isinstance(value, row.type):
                raise TypeError(f"{part}: expected {row.type.__name__}, not {type(value).__name__}")
            if ctypes.sizeof(value) < size:
                raise ValueError(f"{part}: {ctypes.sizeof(value)} bytes, this KVM reads {size}")
            try:
                if part == "lapic":
                    vcpu.set_lapic(value)  # names a missing irqchip
                else:
                    # At least the size the kernel reads (checked just above).
                    raw_ioctl(fd, row.set, value)
            except KvmError as exc:
                raise StateError(part, exc) from None
            except OSError as exc:
                raise StateError(part, vcpu.kvm_error(exc, row.set)) from None


# Per vCPU, for restore(): the pre-flight's lasting facts (Target.lasting says why
# none can go stale), and each plain part's row with the bytes its SET reads.
_TARGETS: weakref.WeakKeyDictionary[Any, Target] = weakref.WeakKeyDictionary()
_SET_PLANS: weakref.WeakKeyDictionary[Any, dict[str, tuple[Part, int]]] = (
    weakref.WeakKeyDictionary()
)


def _set_plan(vcpu: Any) -> dict[str, tuple[Part, int]]:
    plan = _SET_PLANS.get(vcpu)
    if plan is None:
        plan = _SET_PLANS[vcpu] = {
            row.name: (row, ctypes.sizeof(kind)) for row, kind, _ in _plan(vcpu)
        }
    return plan


def _restore_tsc_khz(vcpu: Any, khz: int) -> None:
    # Set even when KVM_GET_TSC_KHZ already reads the rate: after a refused set it
    # reports the refused rate (docs/quirks.md), which must not pass for restored.
    try:
        vcpu.set_tsc_khz(khz)
    except OSError as exc:
        hint = " (set the state's tsc_khz to None to keep this vCPU's rate)"
        error = KvmError(exc.errno, f"{exc.strerror}{hint}", ioctl=getattr(exc, "ioctl", None))
        raise StateError("tsc_khz", error) from None


# An MSR list (_msr_list): a ``struct kvm_msrs`` as u64 words (uapi.msrs_words), sorted
# by index: word 0 is nmsrs, then entry k is its index (word 2k + 1) and value (2k + 2).
# Written apart from the rest, each at its step of the order: the early MSRs, IA32_TSC.
_APART = EARLY_MSRS | {MSR_IA32_TSC}


def _msr_list(values: Mapping[int, int]) -> array[int]:
    """``values`` sorted by index as ``kvm_msrs`` words (TypeError/ValueError naming a bad MSR)."""
    if not isinstance(values, Mapping):
        raise TypeError(f"msrs: expected a mapping of index to value, not {type(values).__name__}")
    keys = sorted(values)
    words = uapi.msrs_words(uapi.msr_index_array(keys))  # checks the indices
    if not keys:
        return words
    # The values in index order, gathered in C; array("Q") refuses what is no u64 but
    # takes True as 1: either way msr_value_array raises, naming the value.
    data = operator.itemgetter(*keys)(values)
    if len(keys) == 1:
        data = (data,)
    try:
        words[2::2] = array("Q", data)
    except (OverflowError, TypeError):
        uapi.msr_value_array(values)
        raise
    if bool in set(map(type, data)):
        uapi.msr_value_array(values)
    return words


def _split_msrs(
    words: array[int],
) -> tuple[array[int] | None, array[int] | None, array[int] | None]:
    """One :func:`_msr_list` cut in three: the early MSRs, IA32_TSC, the rest (None if empty)."""
    indices = words[1::2]
    apart = _APART.intersection(indices)  # a set operation: the usual few, or none
    if not apart:
        return None, None, (words if words[0] else None)
    rest = array("Q", words)
    early = array("Q", [0])
    tsc = array("Q", [0])
    # From the highest position down, so each cut leaves the lower positions where they are.
    for k in sorted((indices.index(i) for i in apart), reverse=True):
        pair = words[1 + 2 * k : 3 + 2 * k]
        if pair[0] == MSR_IA32_TSC:
            tsc[1:1] = pair
        else:
            early[1:1] = pair
        del rest[1 + 2 * k : 3 + 2 * k]
    out = []
    for part in (early, tsc, rest):
        part[0] = (len(part) - 1) // 2
        out.append(part if part[0] else None)
    return out[0], out[1], out[2]


def _put_msrs(vcpu: Any, words: array[int]) -> None:
    """KVM_SET_MSRS, tolerating an MSR the kernel will not write if it already holds the value.

    KVM refuses some host writes that its reads allow (MSR_KVM_ASYNC_PF_INT
    without an in-kernel LAPIC); a state saved there must still restore there.
    ``words`` is one :func:`_msr_list`.
    """
    fd = vcpu.fileno()
    while words[0]:
        count = words[0]
        try:
            # words holds nmsrs entries: the kernel reads only those.
            done = raw_ioctl(fd, io.KVM_SET_MSRS, words)
        except OSError as exc:
            raise vcpu.kvm_error(exc, io.KVM_SET_MSRS) from None
        if done == count:
            return
        index, wanted = words[1 + 2 * done], words[2 + 2 * done]
        try:
            current = vcpu.get_msrs([index])[index]
        except KvmError:
            current = None
        if current != wanted:
            raise KvmError(
                None,
                f"processed {done} of {count} MSRs; MSR {index:#x} was refused",
                ioctl="KVM_SET_MSRS",
                result=done,
            )
        words = array("Q", [count - done - 1]) + words[3 + 2 * done :]


def _readable_msrs(vcpu: Any, indices: list[int]) -> list[int]:
    """The subset of ``indices`` this vCPU can read (the kernel stops at the first it cannot)."""
    readable: list[int] = []
    pending = list(indices)
    fd = vcpu.fileno()
    while pending:
        words = uapi.msrs_words(uapi.msr_index_array(pending))
        try:
            # words holds nmsrs == len(pending) entries: the kernel touches only those.
            done = raw_ioctl(fd, io.KVM_GET_MSRS, words)
        except OSError as exc:
            raise vcpu.kvm_error(exc, io.KVM_GET_MSRS) from None
        readable.extend(pending[:done])
        pending = pending[done + 1 :]  # skip the one it refused
    return readable
