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
SMM, MAXPHYADDR...), on the kernel's version or on guest memory. The facts go
in :class:`Facts`, the memory in a :class:`GuestMemory` (:class:`Regions`);
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
  feature in 6.12, which also ignores CR3's LAM bits 61-62 with CPUID LAM
  (``kvm_vcpu_is_legal_cr3``; 6.1's ``kvm_vcpu_is_illegal_gpa`` never does);
* vmcs12's host SYSENTER_ESP/EIP, FS/GS/GDTR/IDTR/TR bases and guest BNDCFGS
  are canonical at the vCPU's CR4.LA57 in 6.1 (``is_noncanonical_address``)
  and at KVM's own LA57 in 6.12 (``is_noncanonical_msr_address``,
  ``_base_address``: ``Facts.host_la57``); HOST_RIP at the vCPU's in both;
* with EFER.SVME clear in the vCPU, 6.1 and 6.12 alike accept only flags
  == GIF_SET (a clear GIF too is refused): 6.12's svm_set_nested_state has
  the same test as 6.1's, so any kernel that accepts flags 0 there is newer
  than 6.12; for such kernels that case is reported undecided;
* VMX sizes compare with ``sizeof(struct vmcs12)``, 998 bytes (C packs it),
  not the 4096-byte page: a vmcs12 counts from ``size`` 1126 and the shadow
  vmcs12 from 5222, in both versions;
* 6.12.118 (a stable fix, CVE-2026-99345) refuses L1's saved EFER
  (``vmcb12.save.efer``) with LMA but not LME; 6.1 (read in 6.1.192) and
  6.12 before .118 take it; for newer series the verdict is undecided;
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
SET does not), eVMCS control checks (Hyper-V CPUID), and guest memory read after SET: the
VMCS link pointer's page is read at SET (decided with ``memory``, undecided
without), but vmcb12's MSRPM and the VMX virtual-APIC and MSR-bitmap pages are
read at the next KVM_RUN (``*_get_nested_state_pages``) and the I/O bitmaps and
IOPM only at L2 exits, so no SET verdict depends on them.

The package is split by domain: :mod:`~kvmstate.check.facts` (what is known of
the target), :mod:`~kvmstate.check.problem` (what a broken rule reports),
:mod:`~kvmstate.check.engine` (the context and scopes the rules read, the loop),
and the rules themselves in :mod:`~kvmstate.check.generic`,
:mod:`~kvmstate.check.vmx`, :mod:`~kvmstate.check.vmx_state` and
:mod:`~kvmstate.check.svm` (with :mod:`~kvmstate.check.registers` for the
register checks VMX and SVM share). :data:`RULES` is their tables joined in
the kernel's order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from kvmstate.check import generic, svm, vmx, vmx_state
from kvmstate.check.engine import INVALID_GPA, VMCS12_C_SIZE, Ctx, ScopedRule, run
from kvmstate.check.facts import CPUID_FEATURES, VMX_MSRS, Facts, parse_kernel_version
from kvmstate.check.memory import GuestMemory, Regions
from kvmstate.check.problem import Problem, format_problems
from kvmstate.nested import NestedState, ReadableBuffer

__all__ = [
    "CPUID_FEATURES",
    "INVALID_GPA",
    "RULES",
    "VMCS12_C_SIZE",
    "VMX_MSRS",
    "Facts",
    "GuestMemory",
    "Problem",
    "Regions",
    "check",
    "explain",
    "format_problems",
    "parse_kernel_version",
]

# The kernel's order: x86.c and the header first, then the vendor's SET function
# and the consistency checks it calls. Explicit, so no import order decides it.
_SCOPED_RULES: tuple[ScopedRule, ...] = generic.RULES + vmx.RULES + vmx_state.RULES + svm.RULES

#: Every rule function, in the order the kernel applies them (each docstring cites it).
RULES: tuple[Callable[[Ctx], None], ...] = tuple(rule for _, rule in _SCOPED_RULES)


def check(
    state: NestedState | ReadableBuffer,
    facts: Facts | None = None,
    memory: GuestMemory | None = None,
) -> list[Problem]:
    """Every rule of KVM_SET_NESTED_STATE that ``state`` breaks, decidable from it and ``facts``.

    ``state`` is a :class:`~kvmstate.nested.NestedState` or the bytes of a saved
    state (then ``size`` must also match their length). Problems come in the
    kernel's order; those that depend on an unknown fact have ``certain=False``.
    An empty list means no known rule is broken. ``memory`` (a
    :class:`~kvmstate.check.memory.GuestMemory`, such as
    :class:`~kvmstate.check.memory.Regions`) is the target's guest memory as it
    will be at SET: with it, the rule that reads guest memory (the VMCS link
    pointer's page) is decided rather than undecided, as in
    ``check(state, facts, memory=Regions([(0, bytes(guest_ram))]))``.

    >>> from kvmstate.check import check
    >>> state = kvmstate.NestedState(4224)
    >>> state.format, state.size = kvmstate.NestedFormat.SVM, 4224
    >>> state.flags = kvmstate.NestedFlag.GUEST_MODE | kvmstate.NestedFlag.GIF_SET
    >>> [p.field for p in check(state) if p.certain]  # an all-zero vmcb12
    ['vmcb12.control.intercepts[4]', 'vmcb12.control.asid', 'vmcb12.save.cr0', 'vmcb12.save.efer']

    :raises TypeError: ``state`` is neither a NestedState nor bytes-like, or
        ``facts`` is not a :class:`Facts` or None, or ``memory`` has no
        ``read_physical``.
    """
    return run(_SCOPED_RULES, state, _facts_or_default(facts, "check"), _memory(memory))


def explain(
    state: NestedState | ReadableBuffer,
    facts: Facts | None = None,
    memory: GuestMemory | None = None,
) -> str:
    """:func:`check`, as text for an error message; its first line sums it up.

    ``facts`` is a :class:`Facts` or None, as for :func:`check`; a dict is
    refused with a TypeError saying how to make one (``Facts(**d)`` for typed
    values, ``Facts.from_strings(d)`` for text), rather than guessing which.

    >>> from kvmstate.check import Facts, explain
    >>> state = kvmstate.NestedState(128)
    >>> state.format, state.size = kvmstate.NestedFormat.SVM, 128
    >>> state.flags = kvmstate.NestedFlag.GIF_SET
    >>> explain(state, Facts(vendor="svm", efer=0))
    'no rule of KVM_SET_NESTED_STATE known to kvmstate is broken'
    >>> explain(state, {"vendor": "svm"})
    Traceback (most recent call last):
    TypeError: explain() needs facts as a Facts or None, not dict (make one with ...)

    :raises TypeError: as :func:`check`.
    """
    return format_problems(check(state, _facts_or_default(facts, "explain"), memory))


def _memory(memory: object) -> GuestMemory | None:
    """``memory`` as given to check: None or a GuestMemory (TypeError otherwise)."""
    if memory is None or isinstance(memory, GuestMemory):
        return memory
    raise TypeError(
        f"check() needs memory as an object with read_physical(gpa, size) (such as "
        f"Regions) or None, not {type(memory).__name__}"
    )


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
