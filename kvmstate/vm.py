"""A VM file descriptor (:class:`Vm`): memory slots and vCPU creation."""

from __future__ import annotations

import ctypes
import errno
import mmap

from kvmstate import ioctls as io
from kvmstate import uapi
from kvmstate._fd import FdWrapper, int_arg, unmap
from kvmstate.errors import KvmError
from kvmstate.vcpu import Vcpu

TYPE_CHECKING = False  # typing is not imported at run time (see kvmstate._struct)
if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence
    from typing import Any

    from kvmstate.vmstate import VmState

__all__ = ["Vm"]

_PAGE = mmap.PAGESIZE


# The capabilities a vCPU consults (whole-vCPU save, XSAVE size, kvm_run sync, TSC rate).
_VCPU_CAPABILITIES = (
    uapi.KVM_CAP_XSAVE,
    uapi.KVM_CAP_XSAVE2,
    uapi.KVM_CAP_XCRS,
    uapi.KVM_CAP_SREGS2,
    uapi.KVM_CAP_SYNC_REGS,
    uapi.KVM_CAP_TSC_CONTROL,
)


class Vm(FdWrapper):
    """A KVM VM (from :meth:`Kvm.create_vm <kvmstate.system.Kvm.create_vm>`).

    Keeps the host memory it maps into the guest (:meth:`add_memory`) alive
    until :meth:`close`. What a vCPU needs of ``/dev/kvm`` (``KVM_CAP_NESTED_STATE``,
    ``KVM_GET_VCPU_MMAP_SIZE``, ``KVM_GET_MSR_INDEX_LIST``) is handed down by
    :meth:`Kvm.create_vm <kvmstate.system.Kvm.create_vm>`, and passed on by
    :meth:`create_vcpu` with the VM's own capabilities; ``kvm`` is kept for callers.

    Made with :meth:`Kvm.create_vm <kvmstate.system.Kvm.create_vm>`; the
    constructor wraps a VM descriptor you already have (``owned=False``: not
    closed by :meth:`close`).

    >>> with kvmstate.Kvm() as kvm, kvm.create_vm() as vm:
    ...     vm.kvm is kvm, vm.nested_state_size == kvm.nested_state_size
    (True, True)

    :raises TypeError: ``fd`` is not an int (or has ``fileno()``).
    :raises ValueError: ``fd`` is negative.
    """

    def __init__(
        self,
        fd: int,
        *,
        kvm: Any = None,
        owned: bool = True,
        nested_state_size: int | None = None,
        vcpu_mmap_size: int | None = None,
        msr_index_list: Iterable[int] | None = None,
    ) -> None:
        super().__init__(fd, owned=owned)
        self.kvm = kvm
        self.nested_state_size = nested_state_size
        self.vcpu_mmap_size = vcpu_mmap_size
        self.msr_index_list = None if msr_index_list is None else tuple(msr_index_list)
        self._vcpu_caps: dict[int, int] | None = None
        self._memory: dict[int, mmap.mmap] = {}
        # slot -> (guest_phys_addr, memory_size) of every region set through this wrapper.
        self._regions: dict[int, tuple[int, int]] = {}
        # What was set up through this wrapper, so a VM snapshot can build the same VM again.
        self._setup: dict[str, int] = {}
        self._vcpus: list[Vcpu] = []

    def check_extension(self, capability: int) -> int:
        """``KVM_CHECK_EXTENSION`` on the VM (per-VM answers where KVM has them)."""
        return self._ioctl(io.KVM_CHECK_EXTENSION, int_arg(capability))

    def create_vcpu(self, vcpu_id: int = 0) -> Vcpu:
        """``KVM_CREATE_VCPU``: a new vCPU, owned by the returned :class:`Vcpu`."""
        fd = self._ioctl(io.KVM_CREATE_VCPU, int_arg(vcpu_id))
        vcpu = Vcpu(
            fd,
            vm=self,
            vcpu_id=vcpu_id,
            capabilities=self._capabilities_for_vcpus(),
            mmap_size=self.vcpu_mmap_size,
            msr_index_list=self.msr_index_list,
        )
        # Held for Vm.vcpus (a VM snapshot saves them); closing one is the caller's choice.
        self._vcpus.append(vcpu)
        return vcpu

    def _capabilities_for_vcpus(self) -> dict[int, int]:
        """What each vCPU asks of its VM, asked once: a vCPU never reaches back for it."""
        if self._vcpu_caps is None:
            caps = {cap: self.check_extension(cap) for cap in _VCPU_CAPABILITIES}
            if self.nested_state_size is not None:
                caps[uapi.KVM_CAP_NESTED_STATE] = self.nested_state_size
            self._vcpu_caps = caps
        return dict(self._vcpu_caps)

    @property
    def vcpus(self) -> list[Vcpu]:
        """The vCPUs :meth:`create_vcpu` made that are still open, in creation order."""
        return [v for v in self._vcpus if not v.closed]

    def memory(self, slot: int) -> mmap.mmap:
        """The host memory :meth:`add_memory` mapped for ``slot`` (KeyError if none)."""
        try:
            return self._memory[slot]
        except KeyError:
            raise KeyError(f"slot {slot} has no memory mapped by add_memory") from None

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
        ``memory_size`` 0 deletes the slot. The kernel's EEXIST for a range
        that overlaps another slot names that slot when this wrapper set it.

        >>> vm.set_user_memory_region(0, 0x100000, 4096, address)  # doctest: +SKIP
        """
        region = uapi.kvm_userspace_memory_region(
            _uint(slot, 32, "slot"),
            _uint(flags, 32, "flags"),
            _uint(guest_phys_addr, 64, "guest_phys_addr"),
            _uint(memory_size, 64, "memory_size"),
            _uint(userspace_addr, 64, "userspace_addr"),
        )
        try:
            # A fixed-size structure the kernel only reads.
            self._ioctl(io.KVM_SET_USER_MEMORY_REGION, region)
        except KvmError as exc:
            other = self._overlapping(slot, guest_phys_addr, memory_size)
            if exc.errno != errno.EEXIST or other is None:
                raise
            raise KvmError(exc.errno, f"{exc.strerror}: {other}", ioctl=exc.ioctl) from None
        if memory_size:
            self._regions[slot] = (guest_phys_addr, memory_size)
        else:
            self._regions.pop(slot, None)
            # Deleted: the memory add_memory mapped for it has no further use.
            mem = self._memory.pop(slot, None)
            if mem is not None:
                unmap(mem)

    @property
    def memory_regions(self) -> dict[int, tuple[int, int]]:
        """``{slot: (guest_phys_addr, size)}`` of the regions set through this wrapper (a copy).

        >>> vm.add_memory(0x100000, 4096) and vm.memory_regions  # doctest: +SKIP
        {0: (1048576, 4096)}
        """
        return dict(self._regions)

    def _overlapping(self, slot: int, start: int, size: int) -> str | None:
        """What another slot of the same address space maps over ``start..start+size``."""
        space = slot >> 16  # KVM_SET_USER_MEMORY_REGION: address space id in bits 16..31
        for other, (base, length) in sorted(self._regions.items()):
            if (
                other != slot
                and other >> 16 == space
                and base < start + size
                and start < base + length
            ):
                return (
                    f"{start:#x}..{start + size:#x} overlaps slot {other} "
                    f"({base:#x}..{base + length:#x})"
                )
        return None

    def add_memory(self, guest_phys_addr: int, size: int, *, slot: int | None = None) -> mmap.mmap:
        """Map ``size`` bytes of fresh anonymous memory at ``guest_phys_addr``.

        Returns the ``mmap`` (write guest code and data into it); the VM
        keeps it alive until :meth:`close`. Without ``slot``, the lowest slot
        not in use is taken. A ``slot`` already in use, or a
        range that overlaps another slot's, is a ValueError naming it (for
        slots set through this wrapper; the kernel judges the others).

        >>> mem = vm.add_memory(0, 0x10000)                      # doctest: +SKIP
        >>> mem[0x1000:0x1002] = b"\xeb\xfe"                    # jmp $
        """
        _uint_type(guest_phys_addr, "guest_phys_addr")
        _uint_type(size, "size")
        if size <= 0 or size % _PAGE or guest_phys_addr % _PAGE:
            raise ValueError("guest_phys_addr and size must be positive multiples of the page size")
        # Checked before the mapping is made: never a wrapped value, nor a huge mmap.
        _uint(guest_phys_addr, 64, "guest_phys_addr")
        _uint(size, 64, "size")
        if guest_phys_addr + size > 1 << 64:
            raise ValueError(f"{guest_phys_addr:#x} + size {size:#x} is beyond 2**64")
        if slot is None:
            slot = next(s for s in range(len(self._regions) + 1) if s not in self._regions)
        _uint(slot, 32, "slot")
        if slot in self._regions:
            base, length = self._regions[slot]
            raise ValueError(
                f"slot {slot} is in use ({base:#x}..{base + length:#x}); "
                "leave slot=None for the lowest free one"
            )
        other = self._overlapping(slot, guest_phys_addr, size)
        if other is not None:
            raise ValueError(other)
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
        self._setup["tss_addr"] = address

    def create_irqchip(self) -> None:
        """``KVM_CREATE_IRQCHIP``: in-kernel PIC, IOAPIC and LAPICs."""
        self._ioctl(io.KVM_CREATE_IRQCHIP)
        self._setup["irqchip"] = 1

    # --- the VM's devices and clock (issue 14) --------------------------------------------

    @property
    def setup(self) -> dict[str, int]:
        """What was set up through this wrapper (a copy): ``tss_addr``,
        ``identity_map_addr``, ``irqchip`` (1), ``split_irqchip`` (its IOAPIC pins),
        ``pit`` (the ``KVM_CREATE_PIT2`` flags). A VM snapshot repeats them.

        >>> vm.create_irqchip(); vm.setup                       # doctest: +SKIP
        {'irqchip': 1}
        """
        return dict(self._setup)

    def enable_cap(self, capability: int, *args: int, flags: int = 0) -> int:
        """``KVM_ENABLE_CAP`` on the VM with up to four u64 arguments; the kernel's answer.

        >>> vm.enable_cap(uapi.KVM_CAP_SPLIT_IRQCHIP, 24)        # doctest: +SKIP
        0
        """
        cap = uapi.kvm_enable_cap.build(capability, *args, flags=flags)
        # A kvm_enable_cap, the size KVM_ENABLE_CAP encodes; the kernel only reads it.
        return self._ioctl(io.KVM_ENABLE_CAP, cap)

    def enable_split_irqchip(self, pins: int = uapi.KVM_IOAPIC_NUM_PINS) -> None:
        """``KVM_CAP_SPLIT_IRQCHIP``: in-kernel LAPICs, the PIC and IOAPIC left to userspace
        (``pins`` IOAPIC routes); before any vCPU. :meth:`Vcpu.interrupt
        <kvmstate.vcpu.Vcpu.interrupt>` then delivers an ExtINT.

        >>> vm.enable_split_irqchip(24)                          # doctest: +SKIP
        """
        self.enable_cap(uapi.KVM_CAP_SPLIT_IRQCHIP, _uint(pins, 32, "pins"))
        self._setup["split_irqchip"] = pins

    def set_identity_map_addr(self, address: int) -> None:
        """``KVM_SET_IDENTITY_MAP_ADDR``: the EPT identity-map page (Intel), before any vCPU.

        >>> vm.set_identity_map_addr(0xFEFFC000)                 # doctest: +SKIP
        """
        # A u64 the kernel copies from the pointer: exactly what it reads.
        self._ioctl(io.KVM_SET_IDENTITY_MAP_ADDR, ctypes.c_uint64(_uint(address, 64, "address")))
        self._setup["identity_map_addr"] = address

    def get_irqchip(self, chip_id: int) -> uapi.kvm_irqchip:
        """``KVM_GET_IRQCHIP`` of one chip: ``KVM_IRQCHIP_PIC_MASTER``, ``PIC_SLAVE`` or ``IOAPIC``.

        ENXIO (a :class:`KvmError`) without :meth:`create_irqchip`.

        >>> vm.get_irqchip(uapi.KVM_IRQCHIP_IOAPIC).chip.ioapic.base_address  # doctest: +SKIP
        4273995776
        """
        chip = uapi.kvm_irqchip(chip_id=_uint(chip_id, 32, "chip_id"))
        # The whole kvm_irqchip (520 bytes), the size KVM_GET_IRQCHIP encodes and copies back.
        self._ioctl(io.KVM_GET_IRQCHIP, chip)
        return chip

    def set_irqchip(self, chip: uapi.kvm_irqchip) -> None:
        """``KVM_SET_IRQCHIP``: one chip, as :meth:`get_irqchip` gave it (``chip_id`` inside)."""
        # Exactly a kvm_irqchip, the size the request encodes; the kernel only reads it.
        self._ioctl(io.KVM_SET_IRQCHIP, _exact(chip, uapi.kvm_irqchip, "chip"))

    def create_pit2(self, flags: int = 0) -> None:
        """``KVM_CREATE_PIT2``: the in-kernel 8254 PIT (after :meth:`create_irqchip`).

        >>> vm.create_pit2()                                     # doctest: +SKIP
        """
        config = uapi.kvm_pit_config(flags=_uint(flags, 32, "flags"))
        # A kvm_pit_config, the size KVM_CREATE_PIT2 encodes; the kernel only reads it.
        self._ioctl(io.KVM_CREATE_PIT2, config)
        self._setup["pit"] = flags

    def get_pit2(self) -> uapi.kvm_pit_state2:
        """``KVM_GET_PIT2``: the three PIT channels (ENXIO without :meth:`create_pit2`)."""
        pit = uapi.kvm_pit_state2()
        # A kvm_pit_state2, the size KVM_GET_PIT2 encodes and the kernel writes.
        self._ioctl(io.KVM_GET_PIT2, pit)
        return pit

    def set_pit2(self, pit: uapi.kvm_pit_state2) -> None:
        """``KVM_SET_PIT2``: the PIT as :meth:`get_pit2` gave it."""
        # Exactly a kvm_pit_state2, the size the request encodes; the kernel only reads it.
        self._ioctl(io.KVM_SET_PIT2, _exact(pit, uapi.kvm_pit_state2, "pit"))

    def get_clock(self) -> uapi.kvm_clock_data:
        """``KVM_GET_CLOCK``: the VM's kvmclock (ns), with the host's realtime and TSC
        where ``flags`` says so.

        >>> vm.get_clock().clock                                 # doctest: +SKIP
        123456789
        """
        data = uapi.kvm_clock_data()
        # A kvm_clock_data, the size KVM_GET_CLOCK encodes and the kernel writes.
        self._ioctl(io.KVM_GET_CLOCK, data)
        return data

    def set_clock(self, data: uapi.kvm_clock_data) -> None:
        """``KVM_SET_CLOCK``: set the kvmclock; with ``KVM_CLOCK_REALTIME`` in ``flags`` KVM
        adds the wall-clock time elapsed since ``realtime`` (a saved clock keeps counting)."""
        # Exactly a kvm_clock_data, the size the request encodes; the kernel only reads it.
        self._ioctl(io.KVM_SET_CLOCK, _exact(data, uapi.kvm_clock_data, "clock"))

    # --- the whole VM (kvmstate.vmstate does the work) -----------------------------------

    def save_state(self, vcpus: Sequence[Vcpu] | None = None) -> VmState:
        """The whole VM: memory, clock, devices and every vCPU (:mod:`kvmstate.vmstate`).

        ``vcpus`` are this VM's :class:`Vcpu` objects (by default those made by
        :meth:`create_vcpu` and not closed), saved in that order.

        >>> state = vm.save_state()                              # doctest: +SKIP
        """
        from kvmstate import vmstate

        return vmstate.save(self, vcpus)

    def restore_state(self, state: VmState, vcpus: Sequence[Vcpu] | None = None) -> None:
        """Write a :class:`~kvmstate.vmstate.VmState` into this VM, which must have been
        built with the same layout (see :mod:`kvmstate.vmstate`); checked before any write.

        >>> new.restore_state(state)                             # doctest: +SKIP
        """
        from kvmstate import vmstate

        vmstate.restore(self, state, vcpus)

    def _release(self) -> None:
        memory, self._memory = self._memory, {}
        for mem in memory.values():
            # A caller may still hold a view; then the GC unmaps it later.
            unmap(mem)


def _exact(obj: object, kind: type[Any], name: str) -> Any:
    """``obj`` must be exactly ``kind`` (the size the ioctl encodes): TypeError naming it."""
    if type(obj) is not kind:
        raise TypeError(f"{name}: expected {kind.__name__}, not {type(obj).__name__}")
    return obj


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
