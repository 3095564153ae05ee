"""Whole-VM state: :class:`VmState`, saved from a VM the library made and restored into a new one.

A VM snapshot is what a VMM moves when it migrates a VM, nested guests
included: the VM's layout (:class:`VmLayout`: memory slots, vCPU ids, the
TSS and identity-map addresses, the irqchip and PIT it was built with),
the contents of every memory slot, the kvmclock, the in-kernel PIC,
IOAPIC and PIT where the VM has them, and every vCPU's
:class:`~kvmstate.state.VcpuState`::

    state = vm.save_state()              # or kvmstate.vmstate.save(vm)
    state.write("vm.kvmstate")           # the KVMSTATE file format, with VM records
    ...
    new = kvm.restore_vm(VmState.load("vm.kvmstate"))   # a new VM, running on
    new.vcpus[0].run()

Save order: pending I/O completed on every vCPU first (the KVM API
documentation says the state is only consistent then), then the clock,
the PIC, IOAPIC and PIT, the memory, and each vCPU with its nested state
read last (:func:`kvmstate.state.save`).

Restore order, and why:

1. The layout, before any vCPU exists (:meth:`VmLayout.build`):
   ``KVM_SET_TSS_ADDR``, ``KVM_SET_IDENTITY_MAP_ADDR`` and the irqchip
   mode (``KVM_CREATE_IRQCHIP`` or ``KVM_CAP_SPLIT_IRQCHIP``) are refused
   once vCPUs exist; ``KVM_CREATE_PIT2`` needs the irqchip.
2. Memory: ``KVM_SET_NESTED_STATE`` reads guest memory (the VMCS12 page
   at the current-VMCS and link pointers on Intel), and nothing runs
   before every part is back.
3. The PICs and the IOAPIC, then the PIT: the vCPUs' LAPICs are restored
   next and may refer to interrupts in flight from them.
4. Each vCPU (:func:`kvmstate.state.restore`): CPUID, the early MSRs,
   the TSC rate and IA32_TSC, sregs, nested state, ... (see that module).
5. The clock last (``KVM_SET_CLOCK``, with ``KVM_CLOCK_REALTIME`` when it
   was saved so KVM adds the wall-clock time since the save), as QEMU does
   when the VM is resumed: a vCPU's kvmclock page is then refreshed from it.

Everything is checked before the first write: the target's layout
against the saved one (slot by slot), the vCPU count, the CPU vendor, the
size of every memory image and every vCPU part. A write that fails then
raises :class:`VmRestoreError` naming the part, and the target VM (and its
vCPUs) is closed: never left half-restored and in use.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import mmap
import os
import struct
from collections.abc import Iterable, Sequence
from typing import Any, BinaryIO, TypeAlias

from kvmstate import records, uapi
from kvmstate.errors import KvmError
from kvmstate.save import restore as restore_vcpu
from kvmstate.save import save as save_vcpu
from kvmstate.state import VcpuState

# The VM, its vCPUs and the Kvm are anything with the wrappers' methods: this module
# sits below them (kvmstate.vm calls it with itself), like kvmstate.save below a vCPU.
Kvm: TypeAlias = Any
Vm: TypeAlias = Any
Vcpu: TypeAlias = Any

__all__ = [
    "IRQCHIPS",
    "VM_FORMAT_MINOR",
    "MemorySlot",
    "VmLayout",
    "VmMismatchError",
    "VmRestoreError",
    "VmState",
    "copy_image",
    "dumps_vm_state",
    "loads_vm_state",
    "new_image",
    "read_vm_state",
    "restore",
    "restore_new",
    "save",
    "write_vm_state",
]

#: The chips of an in-kernel irqchip, in save and restore order.
IRQCHIPS = (uapi.KVM_IRQCHIP_PIC_MASTER, uapi.KVM_IRQCHIP_PIC_SLAVE, uapi.KVM_IRQCHIP_IOAPIC)
_CHIP_NAMES = {c: f"irqchip {uapi.IrqchipId(c).name}" for c in IRQCHIPS}
_NESTED_VENDORS = {
    uapi.KVM_STATE_NESTED_FORMAT_VMX: "GenuineIntel",
    uapi.KVM_STATE_NESTED_FORMAT_SVM: "AuthenticAMD",
}
_MAX_SLOT_SIZE = 1 << 46  # 64 TiB: beyond any guest here; a size from a file is never trusted


class VmMismatchError(ValueError):
    """A :class:`VmState` does not fit the target VM; the message names what differs."""


class VmRestoreError(KvmError):
    """Restoring failed midway; ``part`` names it (``memory``, ``irqchip IOAPIC``,
    ``vcpu 0: nested`` ...), errno is kept, and the target VM has been closed."""

    def __init__(self, part: str, exc: OSError) -> None:
        super().__init__(
            exc.errno,
            f"{part}: {exc.strerror} (the target VM was closed)",
            ioctl=getattr(exc, "ioctl", None),
        )
        sub = getattr(exc, "part", None)  # a vCPU's StateError names its own part
        self.part = f"{part}: {sub}" if sub else part


@dataclasses.dataclass(frozen=True)
class MemorySlot:
    """One memory slot: its number, guest-physical address and size in bytes."""

    slot: int
    guest_phys_addr: int
    size: int

    def __str__(self) -> str:
        end = self.guest_phys_addr + self.size
        return f"slot {self.slot} {self.guest_phys_addr:#x}..{end:#x}"


@dataclasses.dataclass(frozen=True)
class VmLayout:
    """What a new VM must repeat before it can take a saved VM's memory and vCPUs.

    >>> layout = VmLayout(slots=(MemorySlot(0, 0, 0x10000),), vcpu_ids=(0,))
    >>> layout.describe()
    'slot 0 0x0..0x10000; vCPUs [0]'
    """

    slots: tuple[MemorySlot, ...]
    vcpu_ids: tuple[int, ...]
    #: ``KVM_SET_TSS_ADDR`` / ``KVM_SET_IDENTITY_MAP_ADDR``, when they were set.
    tss_addr: int | None = None
    identity_map_addr: int | None = None
    #: ``KVM_CREATE_IRQCHIP`` was called (in-kernel PIC, IOAPIC and LAPICs).
    irqchip: bool = False
    #: ``KVM_CAP_SPLIT_IRQCHIP``'s IOAPIC pins (LAPICs in the kernel, the rest in userspace).
    split_irqchip: int | None = None
    #: ``KVM_CREATE_PIT2``'s flags when the VM has an in-kernel PIT.
    pit: int | None = None

    @classmethod
    def of(cls, vm: Vm, vcpus: Sequence[Vcpu] | None = None) -> VmLayout:
        """The layout of ``vm`` as this library set it up (its memory slots, its vCPUs)."""
        setup = vm.setup
        vcpus = vm.vcpus if vcpus is None else list(vcpus)
        ids = []
        for i, vcpu in enumerate(vcpus):
            if vcpu.vcpu_id is None:
                raise ValueError(f"vCPU {i} has no known id (a borrowed vCPU?)")
            ids.append(vcpu.vcpu_id)
        return cls(
            slots=tuple(
                MemorySlot(slot, gpa, size)
                for slot, (gpa, size) in sorted(vm.memory_regions.items())
            ),
            vcpu_ids=tuple(ids),
            tss_addr=setup.get("tss_addr"),
            identity_map_addr=setup.get("identity_map_addr"),
            irqchip=bool(setup.get("irqchip")),
            split_irqchip=setup.get("split_irqchip"),
            pit=setup.get("pit"),
        )

    def build(self, kvm: Kvm) -> Vm:
        """A new VM with this layout: set-up ioctls, fresh memory per slot, the vCPUs.

        The VM is closed again if any step fails.

        >>> vm = state.layout.build(kvm)                         # doctest: +SKIP
        """
        vm = kvm.create_vm()
        try:
            if self.tss_addr is not None:
                vm.set_tss_addr(self.tss_addr)
            if self.identity_map_addr is not None:
                vm.set_identity_map_addr(self.identity_map_addr)
            if self.irqchip:
                vm.create_irqchip()
            if self.split_irqchip is not None:
                vm.enable_split_irqchip(self.split_irqchip)
            if self.pit is not None:
                vm.create_pit2(self.pit)
            for s in self.slots:
                vm.add_memory(s.guest_phys_addr, s.size, slot=s.slot)
            for vcpu_id in self.vcpu_ids:
                vm.create_vcpu(vcpu_id)
        except BaseException:
            _close(vm, vm.vcpus)
            raise
        return vm

    def differences(self, other: VmLayout) -> list[str]:
        """What differs between this (saved) layout and ``other`` (the target's), in words.

        >>> a = VmLayout(slots=(MemorySlot(0, 0, 0x10000),), vcpu_ids=(0,))
        >>> a.differences(dataclasses.replace(a, vcpu_ids=(0, 1)))
        ['vCPU count: saved 1, target 2']
        """
        out = []
        mine = {s.slot: s for s in self.slots}
        theirs = {s.slot: s for s in other.slots}
        for slot in sorted(mine.keys() | theirs.keys()):
            a, b = mine.get(slot), theirs.get(slot)
            if a != b:
                none = f"no slot {slot}"
                out.append(f"memory layout: saved {a or none}, target {b or none}")
        if len(self.vcpu_ids) != len(other.vcpu_ids):
            out.append(f"vCPU count: saved {len(self.vcpu_ids)}, target {len(other.vcpu_ids)}")
        elif self.vcpu_ids != other.vcpu_ids:
            out.append(f"vCPU ids: saved {list(self.vcpu_ids)}, target {list(other.vcpu_ids)}")
        for name in ("irqchip", "split_irqchip", "pit"):
            a, b = getattr(self, name), getattr(other, name)
            if a != b:
                out.append(f"{name}: saved {a!r}, target {b!r}")
        # The TSS and identity-map addresses are not checked: only their pages' contents
        # matter to the guest, and those are part of guest memory.
        return out

    def describe(self) -> str:
        """One line: the slots, the vCPUs and the devices."""
        parts = [str(s) for s in self.slots] + [f"vCPUs {list(self.vcpu_ids)}"]
        if self.irqchip:
            parts.append("irqchip")
        if self.split_irqchip is not None:
            parts.append(f"split irqchip ({self.split_irqchip} pins)")
        if self.pit is not None:
            parts.append("PIT")
        return "; ".join(parts)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the file format's ``vm`` record)."""
        out = dataclasses.asdict(self)
        out["slots"] = [dataclasses.asdict(s) for s in self.slots]
        out["vcpu_ids"] = list(self.vcpu_ids)
        return out

    @classmethod
    def from_json(cls, data: Any) -> VmLayout:
        """The inverse of :meth:`to_json`; ValueError naming the key that is off."""
        if not isinstance(data, dict):
            raise ValueError(f"vm: expected a JSON object, not {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown or "slots" not in data or "vcpu_ids" not in data:
            raise ValueError(f"vm: unknown keys {unknown}; 'slots' and 'vcpu_ids' are required")
        slots = data["slots"]
        if not isinstance(slots, list):
            raise ValueError("vm.slots: expected a list")
        out_slots = []
        for i, s in enumerate(slots):
            if not isinstance(s, dict) or set(s) != {"slot", "guest_phys_addr", "size"}:
                raise ValueError(f"vm.slots[{i}]: expected slot, guest_phys_addr and size")
            slot = MemorySlot(
                _json_uint(s["slot"], 32, f"vm.slots[{i}].slot"),
                _json_uint(s["guest_phys_addr"], 64, f"vm.slots[{i}].guest_phys_addr"),
                _json_uint(s["size"], 64, f"vm.slots[{i}].size"),
            )
            if not 0 < slot.size <= _MAX_SLOT_SIZE or slot.size % mmap.PAGESIZE:
                raise ValueError(f"vm.slots[{i}].size {slot.size:#x} is not a page multiple")
            out_slots.append(slot)
        if len({s.slot for s in out_slots}) != len(out_slots):
            raise ValueError("vm.slots: a slot number appears twice")
        ids = data["vcpu_ids"]
        if not isinstance(ids, list):
            raise ValueError("vm.vcpu_ids: expected a list")
        opt = {}
        for name, bits in (("tss_addr", 31), ("identity_map_addr", 64), ("split_irqchip", 32)):
            value = data.get(name)
            opt[name] = None if value is None else _json_uint(value, bits, f"vm.{name}")
        pit = data.get("pit")
        irqchip = data.get("irqchip", False)
        if not isinstance(irqchip, bool):
            raise ValueError("vm.irqchip: expected true or false")
        return cls(
            slots=tuple(out_slots),
            vcpu_ids=tuple(_json_uint(v, 32, f"vm.vcpu_ids[{i}]") for i, v in enumerate(ids)),
            irqchip=irqchip,
            pit=None if pit is None else _json_uint(pit, 32, "vm.pit"),
            **opt,
        )


def _json_uint(value: Any, bits: int, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{where}: expected an int, not {type(value).__name__}")
    if not 0 <= value < 1 << bits:
        raise ValueError(f"{where}: {value} does not fit in {bits} bits")
    return value


@dataclasses.dataclass(eq=False)
class VmState:
    """A saved VM: layout, memory (one bytes-like per slot, in layout order), clock,
    irqchip chips (by ``chip_id``), PIT and vCPUs (in layout order).

    ``absent`` names the parts the VM had none of, and why.

    >>> state = vm.save_state()                                  # doctest: +SKIP
    >>> state                                                    # doctest: +SKIP
    VmState(slot 0 0x0..0x400000; vCPUs [0]; irqchip; PIT, clock=..., vcpus=[VcpuState(...)])
    """

    layout: VmLayout
    memory: list[bytes | bytearray | memoryview | mmap.mmap]
    vcpus: list[VcpuState]
    clock: uapi.kvm_clock_data | None = None
    irqchip: dict[int, uapi.kvm_irqchip] = dataclasses.field(default_factory=dict)
    pit: uapi.kvm_pit_state2 | None = None
    absent: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def vendor(self) -> str | None:
        """The CPU vendor the vCPUs were given (CPUID leaf 0's string), else the one
        their nested state's format implies, else None."""
        for vcpu in self.vcpus:
            if vcpu.cpuid is not None and (found := _vendor(vcpu.cpuid)) is not None:
                return found
        for vcpu in self.vcpus:
            if vcpu.nested is not None:
                return _NESTED_VENDORS.get(int(vcpu.nested.header.format))
        return None

    def check(self) -> None:
        """Refuse a state that cannot be restored as it is (ValueError naming the part).

        The memory images must have their slots' sizes, the vCPU states
        their layout's count, and every part what the file format carries.
        """
        if len(self.memory) != len(self.layout.slots):
            raise ValueError(
                f"memory: {len(self.memory)} images for {len(self.layout.slots)} slots"
            )
        for slot, data in zip(self.layout.slots, self.memory, strict=True):
            n = memoryview(data).nbytes
            if n != slot.size:
                raise ValueError(f"memory: {slot} is {slot.size} bytes, its image {n}")
        if len(self.vcpus) != len(self.layout.vcpu_ids):
            raise ValueError(
                f"vcpus: {len(self.vcpus)} states for {len(self.layout.vcpu_ids)} vCPU ids"
            )
        for i, vcpu in enumerate(self.vcpus):
            if not isinstance(vcpu, VcpuState):
                raise TypeError(f"vcpus[{i}]: expected a VcpuState, not {type(vcpu).__name__}")
            for part in vcpu.parts():
                try:
                    vcpu.part_bytes(part)
                except (TypeError, ValueError) as exc:
                    raise type(exc)(f"vcpu {i}: {exc}") from None
        for chip_id, chip in self.irqchip.items():
            if type(chip) is not uapi.kvm_irqchip or chip.chip_id != chip_id:
                raise ValueError(f"irqchip[{chip_id}]: not a kvm_irqchip of that chip_id")
        for name, kind in (("clock", uapi.kvm_clock_data), ("pit", uapi.kvm_pit_state2)):
            value = getattr(self, name)
            if value is not None and type(value) is not kind:
                raise TypeError(f"{name}: expected {kind.__name__}, not {type(value).__name__}")

    def to_bytes(self) -> bytes:
        """The KVMSTATE file format with VM records (:func:`dumps_vm_state`)."""
        return dumps_vm_state(self)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> VmState:
        """Parse :meth:`to_bytes` output; ValueError for a truncated, foreign or vCPU-only file."""
        state: VmState = loads_vm_state(data)
        return state

    def write(self, file: str | os.PathLike[str] | BinaryIO) -> int:
        """Write the file format to a path or a binary file, memory straight from its buffers
        (no copy of it in Python); returns the bytes written."""
        if isinstance(file, (str, os.PathLike)):
            with open(file, "wb") as f:
                return write_vm_state(f, self)
        return write_vm_state(file, self)

    @classmethod
    def load(cls, file: str | os.PathLike[str] | BinaryIO) -> VmState:
        """Read a file written by :meth:`write` (memory with ``readinto``, one copy);
        every length is checked against the file's size before anything is allocated."""
        if isinstance(file, (str, os.PathLike)):
            with open(file, "rb") as f:
                state: VmState = read_vm_state(f)
                return state
        loaded: VmState = read_vm_state(file)
        return loaded

    def __repr__(self) -> str:
        parts = [self.layout.describe()]
        if self.clock is not None:
            parts.append(f"clock={self.clock.clock}ns")
        parts.append(f"vcpus={self.vcpus!r}")
        return f"VmState({', '.join(parts)})"


def new_image(size: int) -> mmap.mmap:
    """Fresh private memory for a slot's image: an anonymous mapping with transparent huge
    pages asked for, so that filling it takes one page fault per 2 MiB, not per 4 KiB.

    >>> image = new_image(0x10000); len(image)
    65536
    """
    image = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(AttributeError, OSError):  # no madvise or no THP: small pages
        image.madvise(mmap.MADV_HUGEPAGE)
    return image


def copy_image(memory: mmap.mmap) -> mmap.mmap:
    """A copy of a slot's memory in :func:`new_image` memory: one memcpy, no Python loop."""
    image = new_image(len(memory))
    image[:] = memory
    return image


def _vendor(cpuid: uapi.kvm_cpuid2) -> str | None:
    for entry in cpuid.items()[: len(cpuid)]:
        if entry.function == 0:
            raw = b"".join(int(r).to_bytes(4, "little") for r in (entry.ebx, entry.edx, entry.ecx))
            return raw.decode("latin-1")
    return None


def _close(vm: Vm, vcpus: Iterable[Vcpu]) -> None:
    for vcpu in list(vcpus):
        vcpu.close()
    vm.close()


def save(vm: Vm, vcpus: Sequence[Vcpu] | None = None) -> VmState:
    """Save ``vm`` whole (see the module docstring for the order).

    ``vcpus`` defaults to the VM's open vCPUs (:attr:`Vm.vcpus <kvmstate.vm.Vm.vcpus>`).
    A vCPU stopped at an I/O or MMIO exit has it completed first (nothing else runs).
    """
    vcpus = vm.vcpus if vcpus is None else list(vcpus)
    layout = VmLayout.of(vm, vcpus)
    for vcpu in vcpus:
        if vcpu.kvm_run.exit_reason in (uapi.KVM_EXIT_IO, uapi.KVM_EXIT_MMIO):
            vcpu.complete_io()
    state = VmState(layout, [], [])
    kvm = vm.kvm
    if kvm is not None and not kvm.closed and kvm.check_extension(uapi.KVM_CAP_ADJUST_CLOCK):
        state.clock = vm.get_clock()
    else:
        state.absent["clock"] = "KVM_CAP_ADJUST_CLOCK is 0"
    if layout.irqchip:
        state.irqchip = {chip: vm.get_irqchip(chip) for chip in IRQCHIPS}
    else:
        why = "split irqchip: PIC and IOAPIC in userspace" if layout.split_irqchip else None
        state.absent["irqchip"] = why or "no in-kernel irqchip (Vm.create_irqchip)"
    if layout.pit is not None:
        state.pit = vm.get_pit2()
    else:
        state.absent["pit"] = "no in-kernel PIT (Vm.create_pit2)"
    state.memory = [copy_image(vm.memory(s.slot)) for s in layout.slots]
    state.vcpus = [save_vcpu(vcpu) for vcpu in vcpus]
    return state


def restore(vm: Vm, state: VmState, vcpus: Sequence[Vcpu] | None = None) -> None:
    """Write ``state`` into ``vm``, built with the same layout (:meth:`VmLayout.build`).

    :class:`VmMismatchError` (nothing written) when the layout, the vCPU
    count or the CPU vendor differs; :class:`VmRestoreError` when a write
    fails, after which ``vm`` and its vCPUs are closed.
    """
    if not isinstance(state, VmState):
        raise TypeError(f"restore() needs a VmState, not {type(state).__name__}")
    vcpus = vm.vcpus if vcpus is None else list(vcpus)
    state.check()
    target = VmLayout.of(vm, vcpus)
    problems = state.layout.differences(target)
    vendor, here = state.vendor, _host_vendor(vm)
    if vendor is not None and here is not None and vendor != here:
        problems.append(f"vendor: saved {vendor}, target {here}")
    if problems:
        raise VmMismatchError("the VM state does not fit this VM: " + "; ".join(problems))

    part = "memory"
    try:
        for slot, data in zip(state.layout.slots, state.memory, strict=True):
            part = f"memory {slot}"
            vm.memory(slot.slot)[:] = data  # one memcpy per slot (sizes checked above)
        for chip_id, chip in sorted(state.irqchip.items()):
            part = _CHIP_NAMES.get(chip_id, f"irqchip {chip_id}")
            vm.set_irqchip(chip)
        if state.pit is not None:
            part = "pit"
            vm.set_pit2(state.pit)
        for i, (vcpu, saved) in enumerate(zip(vcpus, state.vcpus, strict=True)):
            part = f"vcpu {i}"
            restore_vcpu(vcpu, saved)
        if state.clock is not None:
            part = "clock"
            clock = uapi.kvm_clock_data(clock=state.clock.clock)
            if state.clock.flags & uapi.KVM_CLOCK_REALTIME:
                # KVM adds the wall-clock time since the save: the guest's clock runs on.
                clock.flags = uapi.KVM_CLOCK_REALTIME
                clock.realtime = state.clock.realtime
            vm.set_clock(clock)
    except OSError as exc:
        _close(vm, vcpus)
        raise VmRestoreError(part, exc) from None
    except BaseException:
        _close(vm, vcpus)
        raise


def restore_new(kvm: Kvm, state: VmState) -> Vm:
    """A new VM built from ``state.layout`` with ``state`` restored into it.

    Checked before the VM is made (:meth:`VmState.check`, the vendor), so
    a bad state never creates one; a failed write closes it.

    >>> new = restore_new(kvm, VmState.load("vm.kvmstate"))   # doctest: +SKIP
    """
    if not isinstance(state, VmState):
        raise TypeError(f"restore_vm() needs a VmState, not {type(state).__name__}")
    state.check()
    vendor, here = state.vendor, _supported_vendor(kvm)
    if vendor is not None and here is not None and vendor != here:
        raise VmMismatchError(
            f"the VM state does not fit this host: vendor: saved {vendor}, target {here}"
        )
    vm = state.layout.build(kvm)
    restore(vm, state)
    return vm


def _supported_vendor(kvm: Kvm) -> str | None:
    try:
        return _vendor(kvm.get_supported_cpuid())
    except OSError:
        return None


def _host_vendor(vm: Vm) -> str | None:
    kvm = vm.kvm
    if kvm is None or kvm.closed:
        return None
    return _supported_vendor(kvm)


# --- whole VMs (format 1.1: VM records beside the vcpu ones) ------------------------------
#
# A VM snapshot file adds, after ``meta``, one ``vm`` record (UTF-8 JSON: the layout and
# the parts the VM had none of), ``clock`` (kvm_clock_data), one ``irqchip`` per chip
# (kvm_irqchip, its chip_id inside), ``pit2`` (kvm_pit_state2), the ``vcpu`` records
# in layout order, and last one ``memory`` record per slot:
#
#     memory = slot:u32 reserved:u32 guest_phys_addr:u64 bytes:(size of the slot)
#
# A 1.0 reader skips the VM records (unknown top-level records) and sees the vCPUs.

#: The minor version a file with VM records has (vCPU-only files stay 1.0).
VM_FORMAT_MINOR = 1
_MEMORY_HEAD = struct.Struct("<IIQ")
_VM_FIXED: dict[str, Any] = {
    "clock": uapi.kvm_clock_data,
    "irqchip": uapi.kvm_irqchip,
    "pit2": uapi.kvm_pit_state2,
}


def _record_head(tag: str, length: int) -> bytes:
    raw = tag.encode()
    return struct.pack("<H", len(raw)) + raw + struct.pack("<Q", length)


def _vm_records(state: Any) -> list[bytes]:
    """Every record of a VM file but the memory contents, in file order (checked first)."""
    state.check()
    vm = {"layout": state.layout.to_json(), "absent": dict(state.absent)}
    out = [records.record("vm", json.dumps(vm, sort_keys=True).encode())]
    if state.clock is not None:
        out.append(records.record("clock", state.clock.to_bytes()))
    for _, chip in sorted(state.irqchip.items()):
        out.append(records.record("irqchip", chip.to_bytes()))
    if state.pit is not None:
        out.append(records.record("pit2", state.pit.to_bytes()))
    out += [s.to_record() for s in state.vcpus]
    return out


def _memory_head(slot: Any) -> bytes:
    payload = _MEMORY_HEAD.size + slot.size
    return _record_head("memory", payload) + _MEMORY_HEAD.pack(slot.slot, 0, slot.guest_phys_addr)


def dumps_vm_state(state: VmState) -> bytes:
    """Encode a :class:`~kvmstate.vmstate.VmState` as one file (see above; memory last)."""
    chunks = [_vm_header(), _vm_meta(), *_vm_records(state)]
    for slot, data in zip(state.layout.slots, state.memory, strict=True):
        chunks += [_memory_head(slot), bytes(memoryview(data).cast("B"))]
    return b"".join(chunks)


def write_vm_state(file: BinaryIO, state: VmState) -> int:
    """Write a VM snapshot to a binary file; memory goes from its buffers, uncopied."""
    n = 0
    for chunk in [_vm_header(), _vm_meta(), *_vm_records(state)]:
        n += file.write(chunk)
    for slot, data in zip(state.layout.slots, state.memory, strict=True):
        n += file.write(_memory_head(slot))
        n += file.write(memoryview(data).cast("B"))
    return n


class _VmReader:
    """Builds a VmState from the records of a VM file, in any order, checking as it goes."""

    def __init__(self) -> None:
        self.vm: dict[str, Any] | None = None
        self.clock: Any = None
        self.pit: Any = None
        self.irqchip: dict[int, Any] = {}
        self.vcpus: list[VcpuState] = []
        self.memory: dict[int, tuple[int, Any]] = {}

    def record(self, tag: str, payload: memoryview, offset: int) -> None:
        where = f"{tag} record at byte {offset}"
        if tag == "vm":
            if self.vm is not None:
                raise ValueError(f"{where}: a second vm record")
            try:
                vm = json.loads(bytes(payload).decode())
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
                raise ValueError(f"{where}: not JSON") from None
            if not isinstance(vm, dict) or "layout" not in vm:
                raise ValueError(f"{where}: expected a JSON object with 'layout'")
            self.vm = vm
        elif tag in _VM_FIXED:
            cls = _VM_FIXED[tag]
            if len(payload) != ctypes.sizeof(cls):
                raise ValueError(
                    f"{where}: {len(payload)} bytes, {cls.__name__} is {ctypes.sizeof(cls)}"
                )
            obj = cls.from_bytes(payload)
            if tag == "irqchip":
                chip_id = int(obj.chip_id)
                if chip_id in self.irqchip or chip_id >= uapi.KVM_NR_IRQCHIPS:
                    raise ValueError(f"{where}: chip {chip_id} twice or unknown")
                self.irqchip[chip_id] = obj
            elif getattr(self, "pit" if tag == "pit2" else tag) is not None:
                raise ValueError(f"{where}: a second {tag} record")
            else:
                setattr(self, "pit" if tag == "pit2" else tag, obj)
        elif tag == "vcpu":
            body = offset + 2 + len(tag) + 8
            self.vcpus.append(VcpuState.from_record(payload, f"vcpu {len(self.vcpus)}", body))

    def memory_head(self, head: bytes, length: int, offset: int) -> int:
        """The slot number of a memory record whose first 16 bytes are ``head``."""
        if length < _MEMORY_HEAD.size:
            raise ValueError(f"memory record at byte {offset}: {length} bytes, no slot header")
        slot = _MEMORY_HEAD.unpack(head)[0]
        if slot in self.memory:
            raise ValueError(f"memory record at byte {offset}: slot {slot} twice")
        return int(slot)

    def finish(self) -> Any:
        if self.vm is None:
            raise ValueError(
                "not a VM snapshot: the file has no 'vm' record (a vCPU file? use loads_vm)"
            )
        layout = VmLayout.from_json(self.vm["layout"])
        absent = self.vm.get("absent", {})
        if not isinstance(absent, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in absent.items()
        ):
            raise ValueError("vm.absent: expected a JSON object of strings")
        images = []
        for s in layout.slots:
            got = self.memory.get(s.slot)
            if got is None:
                raise ValueError(f"memory: the file has no contents for {s} (truncated?)")
            gpa, data = got
            if gpa != s.guest_phys_addr or memoryview(data).nbytes != s.size:
                raise ValueError(
                    f"memory: {s}, but the record holds {memoryview(data).nbytes} bytes at {gpa:#x}"
                )
            images.append(data)
        extra = sorted(self.memory.keys() - {s.slot for s in layout.slots})
        if extra:
            raise ValueError(f"memory: records for slots {extra}, which the layout lacks")
        if len(self.vcpus) != len(layout.vcpu_ids):
            raise ValueError(
                f"vcpus: the file holds {len(self.vcpus)} vCPU records, its layout says "
                f"{len(layout.vcpu_ids)} (truncated?)"
            )
        state = VmState(layout, images, self.vcpus, self.clock, self.irqchip, self.pit, absent)
        state.check()
        return state


def _check_head(head: bytes | memoryview, size: int) -> None:
    if size < records.HEAD.size:
        raise ValueError(f"not a kvmstate file: {size} bytes, the header alone is 12")
    magic, major, minor = records.HEAD.unpack_from(head)
    if magic != records.MAGIC:
        raise ValueError(f"not a kvmstate file (magic {bytes(magic)!r})")
    if major != records.FORMAT_MAJOR:
        raise ValueError(
            f"kvmstate file format {major}.{minor} is not readable by this kvmstate "
            f"(it reads {records.FORMAT_MAJOR}.x)"
        )


def loads_vm_state(data: bytes | bytearray | memoryview) -> Any:
    """Decode :func:`dumps_vm_state` output; the memory images are views of ``data``."""
    try:
        view = memoryview(data).cast("B")
    except TypeError:
        raise TypeError(f"expected bytes-like data, not {type(data).__name__}") from None
    _check_head(view, len(view))
    reader = _VmReader()
    for tag, payload, offset in records.iter_records(
        view[records.HEAD.size :], "file", records.HEAD.size
    ):
        if tag == "memory":
            slot = reader.memory_head(bytes(payload[: _MEMORY_HEAD.size]), len(payload), offset)
            gpa = _MEMORY_HEAD.unpack_from(payload)[2]
            reader.memory[slot] = (gpa, payload[_MEMORY_HEAD.size :])
        else:
            reader.record(tag, payload, offset)
    return reader.finish()


def _read(file: Any, n: int, what: str, offset: int) -> bytes:
    data = file.read(n)
    if len(data) != n:
        raise ValueError(f"file: truncated {what} at byte {offset}")
    return bytes(data)


def read_vm_state(file: Any) -> Any:
    """Read a VM snapshot from a seekable binary file; memory with ``readinto`` (one copy).

    Every record length is checked against the bytes the file has left
    before anything is read or allocated: a truncated file is a ValueError
    naming the record, never a short image.
    """
    start = file.tell()
    size = file.seek(0, os.SEEK_END) - start
    file.seek(start)
    head = file.read(records.HEAD.size)
    _check_head(head, size if len(head) == records.HEAD.size else len(head))
    reader = _VmReader()
    pos = records.HEAD.size
    while pos < size:
        offset = pos
        (taglen,) = struct.unpack("<H", _read(file, 2, "record header", offset))
        if size - pos - 2 < taglen + 8:
            raise ValueError(f"file: truncated record header at byte {offset}")
        tag = _read(file, taglen, "record header", offset)
        if not records.TAG_RE.match(tag):
            raise ValueError(f"file: invalid record tag {tag[:64]!r} at byte {offset}")
        (length,) = struct.unpack("<Q", _read(file, 8, "record header", offset))
        pos += 2 + taglen + 8
        if length > size - pos:
            raise ValueError(
                f"file: record {tag.decode()!r} at byte {offset} says {length} bytes, "
                f"only {size - pos} remain"
            )
        name = tag.decode()
        if name == "memory":
            head16 = _read(file, min(length, _MEMORY_HEAD.size), "memory record", offset)
            slot = reader.memory_head(head16, length, offset)
            gpa = _MEMORY_HEAD.unpack(head16)[2]
            image = new_image(length - _MEMORY_HEAD.size) if length > _MEMORY_HEAD.size else b""
            view = memoryview(image)
            got = 0
            while got < len(image):  # readinto may return less than asked (pipes, signals)
                n = file.readinto(view[got:])
                if not n:
                    raise ValueError(f"file: truncated memory record at byte {offset}")
                got += n
            reader.memory[slot] = (gpa, image)
        elif name in ("vm", "clock", "irqchip", "pit2", "vcpu"):
            payload = _read(file, length, f"{name} record", offset)
            reader.record(name, memoryview(payload), offset)
        else:
            file.seek(length, os.SEEK_CUR)  # a record a newer minor version added
        pos += length
    return reader.finish()


def _vm_header() -> bytes:
    return records.HEAD.pack(records.MAGIC, records.FORMAT_MAJOR, VM_FORMAT_MINOR)


def _vm_meta() -> bytes:
    meta = {
        "writer": "kvmstate",
        "format": f"{records.FORMAT_MAJOR}.{VM_FORMAT_MINOR}",
        "kernel": os.uname().release,
    }
    return records.record("meta", json.dumps(meta, sort_keys=True).encode())
