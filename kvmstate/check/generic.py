"""The rules every nested state meets: arch/x86/kvm/x86.c and the header format."""

from __future__ import annotations

from kvmstate.check.engine import GM, LIB, RP, SSET, VSET, X86, Ctx, ScopedRule, flag_names, in_any
from kvmstate.nested import HEADER_SIZE, KNOWN_FLAGS
from kvmstate.uapi import NestedFlag, NestedFormat

# --- x86.c and the format ---------------------------------------------------------------


def size_covers_header(c: Ctx) -> None:
    """x86.c: ``size`` must be at least the 128-byte ``struct kvm_nested_state``."""
    c.report(
        c.size < HEADER_SIZE,
        "size",
        c.size,
        f"size must be at least the {HEADER_SIZE}-byte header",
        X86,
    )


def size_within_data(c: Ctx) -> None:
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
            LIB,
        )


def flags_known(c: Ctx) -> None:
    """x86.c: only RUN_PENDING, GUEST_MODE, EVMCS, MTF_PENDING and GIF_SET may be set."""
    unknown = c.flags & ~KNOWN_FLAGS
    c.report(
        bool(unknown),
        "flags",
        c.flags,
        f"flags has bits {unknown:#x} that no kernel knows "
        f"(known: {flag_names(NestedFlag, KNOWN_FLAGS)})",
        X86,
    )


def run_pending_needs_guest_mode(c: Ctx) -> None:
    """x86.c: RUN_PENDING (a VM-entry not completed yet) implies GUEST_MODE."""
    c.report(
        bool(c.flags & RP and not c.flags & GM),
        "flags",
        c.flags,
        "RUN_PENDING needs GUEST_MODE: a pending nested VM-entry means L2 is loaded",
        X86,
    )


def kvm_has_nested_state(c: Ctx) -> None:
    """x86.c: a KVM whose KVM_CAP_NESTED_STATE is 0 has no nested state handlers, and every
    SET answers EINVAL (seen on a 6.18 host without nesting)."""
    cap = c.facts.nested_state_cap
    c.report(
        cap == 0,
        "kvm",
        cap,
        "this KVM has no nested state support (KVM_CAP_NESTED_STATE is 0: load "
        "kvm_intel/kvm_amd with nested=1)",
        X86 + ", KVM_CAP_NESTED_STATE",
    )


def format_known(c: Ctx) -> None:
    """vmx/svm_set_nested_state: ``format`` must be VMX (0) or SVM (1)."""
    c.report(
        c.fmt not in (NestedFormat.VMX, NestedFormat.SVM),
        "format",
        c.fmt,
        "format must be 0 (VMX) or 1 (SVM)",
        f"{VSET}, {SSET}",
    )


def format_matches_vendor(c: Ctx) -> None:
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
        VSET if vendor == "vmx" else SSET,
    )


#: This module's rules in the kernel's order, each with the scope in which
#: the kernel reaches it (its early returns).
RULES: tuple[ScopedRule, ...] = (
    (in_any, size_covers_header),
    (in_any, size_within_data),
    (in_any, flags_known),
    (in_any, run_pending_needs_guest_mode),
    (in_any, kvm_has_nested_state),
    (in_any, format_known),
    (in_any, format_matches_vendor),
)
