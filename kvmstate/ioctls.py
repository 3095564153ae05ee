"""ioctl request numbers, computed from the mirrors' sizes.

The encoding is asm-generic ``_IOC`` (what x86 uses)::

    bits 31-30  direction (_IOC_WRITE = 1: user -> kernel, _IOC_READ = 2)
    bits 29-16  size of the argument structure
    bits 15-8   type ('KVMIO' = 0xAE)
    bits 7-0    number

:data:`IOCTLS` is the one table of every ioctl the library issues; its
values are checked against the C preprocessor's in ``tests/test_layout.py``.
"""

from __future__ import annotations

import ctypes

from kvmstate import uapi

__all__ = ["IOCTLS", "IOCTL_NAMES", "_IO", "_IOC", "_IOR", "_IOW", "_IOWR"]

_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS

_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2


def _IOC(direction: int, type_: int, nr: int, size: int) -> int:
    """Encode an ioctl request number as the kernel's ``_IOC`` macro does."""
    if not 0 <= size < (1 << _IOC_SIZEBITS):
        raise ValueError(f"ioctl argument size {size} does not fit in {_IOC_SIZEBITS} bits")
    return (
        (direction << _IOC_DIRSHIFT)
        | (type_ << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def _size(arg: type[ctypes._CData] | int) -> int:
    return arg if isinstance(arg, int) else ctypes.sizeof(arg)


def _IO(type_: int, nr: int) -> int:
    """``_IO``: no argument structure."""
    return _IOC(_IOC_NONE, type_, nr, 0)


def _IOR(type_: int, nr: int, arg: type[ctypes._CData] | int) -> int:
    """``_IOR``: the kernel writes the argument."""
    return _IOC(_IOC_READ, type_, nr, _size(arg))


def _IOW(type_: int, nr: int, arg: type[ctypes._CData] | int) -> int:
    """``_IOW``: the kernel reads the argument."""
    return _IOC(_IOC_WRITE, type_, nr, _size(arg))


def _IOWR(type_: int, nr: int, arg: type[ctypes._CData] | int) -> int:
    """``_IOWR``: the kernel reads and writes the argument."""
    return _IOC(_IOC_READ | _IOC_WRITE, type_, nr, _size(arg))


_K = uapi.KVMIO

# Each request once, by its kernel name (grouped by the descriptor it is issued on).
# /dev/kvm
KVM_GET_API_VERSION = _IO(_K, 0x00)
KVM_CREATE_VM = _IO(_K, 0x01)
KVM_GET_MSR_INDEX_LIST = _IOWR(_K, 0x02, uapi.kvm_msr_list)
KVM_CHECK_EXTENSION = _IO(_K, 0x03)
KVM_GET_VCPU_MMAP_SIZE = _IO(_K, 0x04)
KVM_GET_SUPPORTED_CPUID = _IOWR(_K, 0x05, uapi.kvm_cpuid2)
KVM_GET_MSR_FEATURE_INDEX_LIST = _IOWR(_K, 0x0A, uapi.kvm_msr_list)

# VM
KVM_CREATE_VCPU = _IO(_K, 0x41)
KVM_SET_USER_MEMORY_REGION = _IOW(_K, 0x46, uapi.kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = _IO(_K, 0x47)
KVM_SET_IDENTITY_MAP_ADDR = _IOW(_K, 0x48, ctypes.c_uint64)
KVM_CREATE_IRQCHIP = _IO(_K, 0x60)

# vCPU
KVM_RUN = _IO(_K, 0x80)
KVM_GET_REGS = _IOR(_K, 0x81, uapi.kvm_regs)
KVM_SET_REGS = _IOW(_K, 0x82, uapi.kvm_regs)
KVM_GET_SREGS = _IOR(_K, 0x83, uapi.kvm_sregs)
KVM_SET_SREGS = _IOW(_K, 0x84, uapi.kvm_sregs)
KVM_GET_FPU = _IOR(_K, 0x8C, uapi.kvm_fpu)
KVM_SET_FPU = _IOW(_K, 0x8D, uapi.kvm_fpu)
KVM_GET_LAPIC = _IOR(_K, 0x8E, uapi.kvm_lapic_state)
KVM_SET_LAPIC = _IOW(_K, 0x8F, uapi.kvm_lapic_state)
KVM_GET_MSRS = _IOWR(_K, 0x88, uapi.kvm_msrs)
KVM_SET_MSRS = _IOW(_K, 0x89, uapi.kvm_msrs)
KVM_SET_CPUID2 = _IOW(_K, 0x90, uapi.kvm_cpuid2)
KVM_GET_CPUID2 = _IOWR(_K, 0x91, uapi.kvm_cpuid2)
KVM_GET_MP_STATE = _IOR(_K, 0x98, uapi.kvm_mp_state)
KVM_SET_MP_STATE = _IOW(_K, 0x99, uapi.kvm_mp_state)
KVM_GET_VCPU_EVENTS = _IOR(_K, 0x9F, uapi.kvm_vcpu_events)
KVM_SET_VCPU_EVENTS = _IOW(_K, 0xA0, uapi.kvm_vcpu_events)
KVM_GET_DEBUGREGS = _IOR(_K, 0xA1, uapi.kvm_debugregs)
KVM_SET_DEBUGREGS = _IOW(_K, 0xA2, uapi.kvm_debugregs)
KVM_SET_TSC_KHZ = _IO(_K, 0xA2)
KVM_GET_TSC_KHZ = _IO(_K, 0xA3)

# The XSAVE ioctls encode 4096 bytes; XSAVE2 transfers KVM_CAP_XSAVE2 bytes.
KVM_GET_XSAVE = _IOR(_K, 0xA4, uapi.kvm_xsave)
KVM_SET_XSAVE = _IOW(_K, 0xA5, uapi.kvm_xsave)
KVM_GET_XCRS = _IOR(_K, 0xA6, uapi.kvm_xcrs)
KVM_SET_XCRS = _IOW(_K, 0xA7, uapi.kvm_xcrs)
KVM_GET_SREGS2 = _IOR(_K, 0xCC, uapi.kvm_sregs2)
KVM_SET_SREGS2 = _IOW(_K, 0xCD, uapi.kvm_sregs2)
KVM_GET_XSAVE2 = _IOR(_K, 0xCF, uapi.kvm_xsave)

# The nested ioctls are numbered with the 128-byte header, the C sizeof.
KVM_GET_NESTED_STATE = _IOWR(_K, 0xBE, uapi.NESTED_STATE_HEADER_SIZE)
KVM_SET_NESTED_STATE = _IOW(_K, 0xBF, uapi.NESTED_STATE_HEADER_SIZE)

#: Every ioctl the library issues, by kernel name: the constants above, collected.
IOCTLS: dict[str, int] = {
    name: value for name, value in list(globals().items()) if name.startswith("KVM_")
}

#: Request number -> kernel name, for error messages.
IOCTL_NAMES: dict[int, str] = {v: k for k, v in IOCTLS.items()}

__all__ += list(IOCTLS)
