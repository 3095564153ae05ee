"""KVM_SET_GUEST_DEBUG and the KVM_EXIT_DEBUG record, which kvmstate does not wrap (yet).

A library gap filled on the test side with a raw ioctl: single-stepping is
how the tests stop a vCPU right after an emulated VMRUN, with the nested
entry still pending. The mirrors' layouts and the request number are
checked against gcc (tests/test_svm_l1.py).
"""

from __future__ import annotations

import ctypes
import fcntl

import kvmstate
from kvmstate import uapi

KVM_GUESTDBG_ENABLE = 0x1
KVM_GUESTDBG_SINGLESTEP = 0x2


class kvm_guest_debug_arch(ctypes.Structure):
    """``struct kvm_guest_debug_arch`` (x86): the debug registers to use."""

    _fields_ = [("debugreg", ctypes.c_uint64 * 8)]


class kvm_guest_debug(ctypes.Structure):
    """``struct kvm_guest_debug``: what KVM_SET_GUEST_DEBUG reads."""

    _fields_ = [
        ("control", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("arch", kvm_guest_debug_arch),
    ]


class kvm_debug_exit_arch(ctypes.Structure):
    """``struct kvm_debug_exit_arch`` (x86): ``kvm_run.debug.arch`` at KVM_EXIT_DEBUG."""

    _fields_ = [
        ("exception", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("pc", ctypes.c_uint64),
        ("dr6", ctypes.c_uint64),
        ("dr7", ctypes.c_uint64),
    ]


# _IOW(KVMIO, 0x9b, struct kvm_guest_debug): direction write (1) in bits 31:30,
# the argument's size in bits 29:16, the type in 15:8, the number in 7:0.
KVM_SET_GUEST_DEBUG = 1 << 30 | ctypes.sizeof(kvm_guest_debug) << 16 | uapi.KVMIO << 8 | 0x9B


def set_guest_debug(vcpu: kvmstate.Vcpu, control: int) -> None:
    """``KVM_SET_GUEST_DEBUG`` with ``control`` (0 turns debugging off) and no breakpoints."""
    arg = kvm_guest_debug(control=control)
    # The argument is exactly the struct the request's size field encodes.
    fcntl.ioctl(vcpu.fileno(), KVM_SET_GUEST_DEBUG, arg)


def debug_exit(vcpu: kvmstate.Vcpu) -> kvm_debug_exit_arch:
    """A copy of ``kvm_run.debug.arch`` (valid after a KVM_EXIT_DEBUG)."""
    run = vcpu.kvm_run
    if run.exit_reason != uapi.KVM_EXIT_DEBUG:
        raise ValueError(f"the last exit was reason {run.exit_reason}, not KVM_EXIT_DEBUG")
    # The exit union starts with the debug record; its 256 bytes hold it with room to spare.
    return kvm_debug_exit_arch.from_buffer_copy(
        bytes(run.padding)[: ctypes.sizeof(kvm_debug_exit_arch)]
    )
