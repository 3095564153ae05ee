"""A VM file descriptor (:class:`Vm`): memory slots and vCPU creation."""

from __future__ import annotations

import contextlib
import ctypes
import mmap
from typing import TYPE_CHECKING

from kvmstate import ioctls as io
from kvmstate import uapi
from kvmstate._fd import FdWrapper, int_arg
from kvmstate.vcpu import Vcpu

if TYPE_CHECKING:
    from kvmstate.system import Kvm

__all__ = ["Vm"]

_PAGE = mmap.PAGESIZE


class Vm(FdWrapper):
    """A KVM VM (from :meth:`Kvm.create_vm <kvmstate.system.Kvm.create_vm>`).

    Keeps a reference to its :class:`~kvmstate.system.Kvm` for capability
    queries, and the host memory it maps into the guest
    (:meth:`add_memory`) alive until :meth:`close`.
    """

    def __init__(self, fd: int, *, kvm: Kvm | None = None, owned: bool = True) -> None:
        super().__init__(fd, owned=owned)
        self.kvm = kvm
        self._memory: dict[int, mmap.mmap] = {}

    def check_extension(self, capability: int) -> int:
        """``KVM_CHECK_EXTENSION`` on the VM (per-VM answers where KVM has them)."""
        return self._ioctl(io.KVM_CHECK_EXTENSION, int_arg(capability))

    def create_vcpu(self, vcpu_id: int = 0) -> Vcpu:
        """``KVM_CREATE_VCPU``: a new vCPU, owned by the returned :class:`Vcpu`."""
        fd = self._ioctl(io.KVM_CREATE_VCPU, int_arg(vcpu_id))
        return Vcpu(fd, vm=self, vcpu_id=vcpu_id)

    def set_user_memory_region(
        self,
        slot: int,
        guest_phys_addr: int,
        memory_size: int,
        userspace_addr: int,
        flags: int = 0,
    ) -> None:
        """``KVM_SET_USER_MEMORY_REGION`` with raw values (the caller keeps the memory alive).

        ``slot`` and ``flags`` must fit in 32 bits, the others in 64
        (TypeError/ValueError naming the field; ctypes would wrap them).
        """
        region = uapi.kvm_userspace_memory_region(
            _uint(slot, 32, "slot"),
            _uint(flags, 32, "flags"),
            _uint(guest_phys_addr, 64, "guest_phys_addr"),
            _uint(memory_size, 64, "memory_size"),
            _uint(userspace_addr, 64, "userspace_addr"),
        )
        # A fixed-size structure the kernel only reads.
        self._ioctl(io.KVM_SET_USER_MEMORY_REGION, region)

    def add_memory(self, guest_phys_addr: int, size: int, *, slot: int | None = None) -> mmap.mmap:
        """Map ``size`` bytes of fresh anonymous memory at ``guest_phys_addr``.

        Returns the ``mmap`` (write guest code and data into it); the VM
        keeps it alive until :meth:`close`.
        """
        _uint_type(guest_phys_addr, "guest_phys_addr")
        _uint_type(size, "size")
        if size <= 0 or size % _PAGE or guest_phys_addr % _PAGE:
            raise ValueError("guest_phys_addr and size must be positive multiples of the page size")
        # Checked before the mapping is made: never a wrapped value, nor a huge mmap.
        _uint(guest_phys_addr, 64, "guest_phys_addr")
        _uint(size, 64, "size")
        if slot is None:
            slot = len(self._memory)
        _uint(slot, 32, "slot")
        mem = mmap.mmap(-1, size, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        address = ctypes.addressof(ctypes.c_char.from_buffer(mem))
        try:
            self.set_user_memory_region(slot, guest_phys_addr, size, address)
        except BaseException:
            mem.close()
            raise
        self._memory[slot] = mem
        return mem

    def set_tss_addr(self, address: int) -> None:
        """``KVM_SET_TSS_ADDR`` (Intel needs three pages for real-mode emulation).

        ``address`` must be below 2**31: ``fcntl.ioctl`` passes an int
        argument as a C int, so a higher one cannot be handed to the kernel.
        """
        if isinstance(address, int) and not isinstance(address, bool) and address > 0x7FFF_FFFF:
            raise ValueError(
                f"TSS address {address:#x} is out of range: fcntl.ioctl passes the argument "
                "as a C int, so it must be below 2**31 (0x80000000); choose three free pages "
                "of guest-physical space below that, e.g. 0x7fffd000"
            )
        self._ioctl(io.KVM_SET_TSS_ADDR, int_arg(address))

    def create_irqchip(self) -> None:
        """``KVM_CREATE_IRQCHIP``: in-kernel PIC, IOAPIC and LAPICs."""
        self._ioctl(io.KVM_CREATE_IRQCHIP)

    def _release(self) -> None:
        memory, self._memory = self._memory, {}
        for mem in memory.values():
            # A caller may still hold a view; then the GC unmaps it later.
            with contextlib.suppress(BufferError):
                mem.close()


def _uint_type(value: object, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    return value


def _uint(value: object, bits: int, name: str) -> int:
    """An unsigned field of ``bits`` bits: TypeError/ValueError naming it (no ctypes wrapping)."""
    value = _uint_type(value, name)
    if not 0 <= value < 1 << bits:
        raise ValueError(f"{name} {value:#x} does not fit in {bits} bits")
    return value
