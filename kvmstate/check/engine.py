"""The rule engine: the context rules read, their scopes and the loop that runs them.

A rule is a function of a :class:`Ctx` that reports what it finds; a scope says
whether the kernel reaches the rule for this state (its early returns). Each
domain module (:mod:`.generic`, :mod:`.vmx`, :mod:`.vmx_state`, :mod:`.svm`)
lists its rules with their scopes in a ``RULES`` table; :mod:`kvmstate.check`
concatenates the tables in the kernel's order and :func:`run` applies them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from kvmstate import uapi
from kvmstate import vmcs12 as vmx
from kvmstate._struct import format_value
from kvmstate.check.facts import Facts
from kvmstate.check.problem import Problem
from kvmstate.nested import HEADER_SIZE, NestedState
from kvmstate.uapi import NestedFlag, NestedFormat

U64 = (1 << 64) - 1
#: "No address" in the headers (vmxon_pa, vmcs12_pa, the VMCS link pointer): -1 as a u64.
INVALID_GPA = U64

#: Size of ``struct vmcs12`` as C packs it (998 bytes): what vmx_set_nested_state
#: copies and compares ``size`` with, not the 4096-byte page it lives in.
VMCS12_C_SIZE = vmx.VMCS12_C_SIZE
VMCS12_MIN = HEADER_SIZE + VMCS12_C_SIZE  # 1126
# The shadow vmcs12 starts after the whole first page.
SHADOW_MIN = HEADER_SIZE + uapi.KVM_STATE_NESTED_VMX_VMCS_SIZE + VMCS12_C_SIZE  # 5222
VMCB_MIN = HEADER_SIZE + uapi.KVM_STATE_NESTED_SVM_VMCB_SIZE  # 4224

GM = int(NestedFlag.GUEST_MODE)
RP = int(NestedFlag.RUN_PENDING)
EVMCS = int(NestedFlag.EVMCS)
GIF = int(NestedFlag.GIF_SET)

# Addresses below 2^32 are legal for any vCPU, none at or above 2^52 is (see the module doc).
_SURELY_LEGAL_BITS = 32
_ARCH_MAX_PHYS_BITS = 52

# Kernel sources the rules cite.
X86 = "arch/x86/kvm/x86.c: kvm_arch_vcpu_ioctl (KVM_SET_NESTED_STATE)"
VSET = "arch/x86/kvm/vmx/nested.c: vmx_set_nested_state"
VEXEC = "arch/x86/kvm/vmx/nested.c: nested_check_vm_execution_controls"
VEXIT = "arch/x86/kvm/vmx/nested.c: nested_check_vm_exit_controls"
VENTRY = "arch/x86/kvm/vmx/nested.c: nested_check_vm_entry_controls"
VHOST = "arch/x86/kvm/vmx/nested.c: nested_vmx_check_host_state"
VGUEST = "arch/x86/kvm/vmx/nested.c: nested_vmx_check_guest_state"
SSET = "arch/x86/kvm/svm/nested.c: svm_set_nested_state"
SCTL = "arch/x86/kvm/svm/nested.c: __nested_vmcb_check_controls"
SSAVE = "arch/x86/kvm/svm/nested.c: __nested_vmcb_check_save"
SGPAT = f"{SSET} (Linux 7.2+, commit {uapi.GPAT_COMMIT[:12]})"
LIB = "kvmstate: Vcpu.set_nested_state (the kernel reads `size` bytes)"

# --- the context the rules read ----------------------------------------------------------


class Ctx:
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
        self.v12 = self._vmcs12(HEADER_SIZE) if self.avail >= VMCS12_MIN else None
        shadow_at = HEADER_SIZE + uapi.KVM_STATE_NESTED_VMX_VMCS_SIZE
        self.shadow = self._vmcs12(shadow_at) if self.avail >= SHADOW_MIN else None
        self.vmcb = state.vmcb12 if self.avail >= VMCB_MIN else None

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
        gpa &= U64
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


def all_of(*verdicts: bool | None) -> bool | None:
    """Several conditions that must all hold for a rejection."""
    if any(v is False for v in verdicts):
        return False
    return True if all(v is True for v in verdicts) else None


def any_of(*verdicts: bool | None) -> bool | None:
    """Several conditions of which any one rejects."""
    if any(v is True for v in verdicts):
        return True
    return None if any(v is None for v in verdicts) else False


def _canonical(value: int, bits: int) -> bool:
    """``__is_canonical_address``: bits 63 down to ``bits - 1`` all equal."""
    top = (value & U64) >> (bits - 1)
    return top in (0, (1 << (65 - bits)) - 1)


class _Decoder:
    """An owner for format_value: decodes the field ``x`` with ``kind``."""

    def __init__(self, kind: Any) -> None:
        self._flags_ = {"x": kind}


def flag_names(kind: Any, bits: int) -> str:
    """``bits`` by the names of the IntFlag ``kind`` (hex for unnamed bits)."""
    return format_value(bits, "x", _Decoder(kind))


Rule = Callable[[Ctx], None]
Scope = Callable[[Ctx], bool]
ScopedRule = tuple[Scope, Rule]


# Scopes follow the kernel's early returns: a rule only runs where the kernel reaches it.
def in_any(c: Ctx) -> bool:
    return True


def in_vmx(c: Ctx) -> bool:
    return c.fmt == NestedFormat.VMX


def in_vmx_vmxon(c: Ctx) -> bool:
    return in_vmx(c) and c.vmx.vmxon_pa != INVALID_GPA


def in_vmx_page(c: Ctx) -> bool:
    """VMXON with a vmcs12 in the state (size covers struct vmcs12)."""
    return in_vmx_vmxon(c) and c.size >= VMCS12_MIN and c.v12 is not None


def in_vmx_guest(c: Ctx) -> bool:
    return in_vmx_page(c) and bool(c.flags & GM)


def in_svm(c: Ctx) -> bool:
    return c.fmt == NestedFormat.SVM


def in_svm_guest(c: Ctx) -> bool:
    return in_svm(c) and bool(c.flags & GM)


def in_svm_vmcb(c: Ctx) -> bool:
    return in_svm_guest(c) and c.size >= VMCB_MIN and c.vmcb is not None


def run(rules: Iterable[ScopedRule], state: Any, facts: Facts) -> list[Problem]:
    """Apply ``rules`` in order to ``state`` (a NestedState or bytes): what
    :func:`kvmstate.check.check` does once it has the facts and the rule table."""
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
            return [Problem("size", len(raw), text, X86, rule_id="size_covers_header")]
        blob_len = len(raw)
        try:
            state = NestedState(len(raw))
        except ValueError as exc:
            return [Problem("size", len(raw), str(exc), LIB, rule_id="size_within_data")]
        state.buffer[: len(raw)] = raw
    c = Ctx(state, facts, blob_len)
    for scope, rule in rules:
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
