"""Live migration of a whole VM for the VMX tests, through kvmstate's public vCPU API.

What a VMM does to move a VM, and what ``tests/test_vmx_migration.py``
does at every exit of its nested guest::

    new, done = migrate(kvm, machine)   # machine is closed; new runs on
    done.changes                        # what KVM gave back differently, by field

:func:`save` completes a pending I/O exit on each vCPU
(:meth:`~kvmstate.vcpu.Vcpu.complete_io`: the KVM API documentation says
the state is only consistent then), saves each vCPU
(:meth:`~kvmstate.vcpu.Vcpu.save_state`) and copies guest memory. The
source VM is then closed, and :func:`restore` builds a new VM with the same
:class:`Layout`, writes the memory back first (``KVM_SET_NESTED_STATE``
reads guest memory: the page at the VMCS link pointer must already hold the
shadow VMCS) and then each vCPU (:meth:`~kvmstate.vcpu.Vcpu.restore_state`).
:func:`migrate` also saves the new vCPUs again and lists, with
:func:`compare`, every field whose value came back different, so that a
test can name each one KVM refreshes instead of hiding it.

This is test code standing in for a VM-level snapshot API, which kvmstate
does not have yet; what it has to do by hand is what such an API needs:
the VM's layout (memory slots, ``KVM_SET_TSS_ADDR``,
``KVM_SET_IDENTITY_MAP_ADDR``, a split irqchip), and three ioctls the
library does not wrap (``KVM_ENABLE_CAP``, ``KVM_NMI``, ``KVM_INTERRUPT``).
Their structures and numbers here are checked against the C headers in
``tests/test_vmx_migration.py``.
"""

from __future__ import annotations

import ctypes
import dataclasses
import fcntl
import mmap
from collections.abc import Iterator

import kvmstate
import kvmstate.diff
from kvmstate import ioctls, uapi
from kvmstate.state import PARTS, VcpuState

__all__ = [
    "IOCTLS",
    "KVM_CAP_SPLIT_IRQCHIP",
    "MSR_IA32_TSC",
    "Change",
    "Layout",
    "Machine",
    "Migration",
    "Snapshot",
    "compare",
    "enable_split_irqchip",
    "inject_interrupt",
    "inject_nmi",
    "kvm_enable_cap",
    "kvm_interrupt",
    "migrate",
    "restore",
    "save",
]

KVM_CAP_SPLIT_IRQCHIP = 121
MSR_IA32_TSC = 0x10


class kvm_enable_cap(ctypes.Structure):
    """``struct kvm_enable_cap`` (``KVM_ENABLE_CAP``)."""

    _fields_ = [
        ("cap", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("args", ctypes.c_uint64 * 4),
        ("pad", ctypes.c_uint8 * 64),
    ]


class kvm_interrupt(ctypes.Structure):
    """``struct kvm_interrupt`` (``KVM_INTERRUPT``)."""

    _fields_ = [("irq", ctypes.c_uint32)]


def _ioc(write: bool, nr: int, size: int) -> int:
    """asm-generic ``_IOC`` for KVMIO: _IOW when ``write``, else _IO (size 0)."""
    return (1 << 30 if write else 0) | size << 16 | uapi.KVMIO << 8 | nr


#: The ioctls kvmstate does not issue (yet), by kernel name.
IOCTLS = {
    "KVM_ENABLE_CAP": _ioc(True, 0xA3, ctypes.sizeof(kvm_enable_cap)),
    "KVM_NMI": _ioc(False, 0x9A, 0),
    "KVM_INTERRUPT": _ioc(True, 0x86, ctypes.sizeof(kvm_interrupt)),
}


def enable_split_irqchip(vm: kvmstate.Vm, pins: int) -> None:
    """``KVM_ENABLE_CAP(KVM_CAP_SPLIT_IRQCHIP)``: in-kernel LAPICs, the PIC and IOAPIC in
    userspace (so ``KVM_INTERRUPT`` delivers an ExtINT); before any vCPU exists."""
    cap = kvm_enable_cap(cap=KVM_CAP_SPLIT_IRQCHIP)
    cap.args[0] = pins
    # The structure is the size KVM_ENABLE_CAP encodes; the kernel only reads it.
    fcntl.ioctl(vm.fileno(), IOCTLS["KVM_ENABLE_CAP"], cap)


def inject_nmi(vcpu: kvmstate.Vcpu) -> None:
    """``KVM_NMI``: queue an NMI; KVM delivers it (or exits to L1) at the next ``KVM_RUN``."""
    fcntl.ioctl(vcpu.fileno(), IOCTLS["KVM_NMI"])


def inject_interrupt(vcpu: kvmstate.Vcpu, vector: int) -> None:
    """``KVM_INTERRUPT``: with a split irqchip, an ExtINT of ``vector`` for the next ``KVM_RUN``.

    KVM keeps it in ``pending_external_vector``, which no GET ioctl reports:
    a VMM must not save the vCPU between this call and the next run.
    """
    # The structure is the size KVM_INTERRUPT encodes; the kernel only reads it.
    fcntl.ioctl(vcpu.fileno(), IOCTLS["KVM_INTERRUPT"], kvm_interrupt(irq=vector))


@dataclasses.dataclass(frozen=True)
class Layout:
    """What a new VM must repeat before it can take a saved one's vCPUs and memory."""

    #: ``(guest_phys_addr, size)`` of each memory slot, the slot number being the index.
    memory: tuple[tuple[int, int], ...]
    vcpus: int = 1
    #: ``KVM_SET_TSS_ADDR`` (three pages Intel needs for real mode without unrestricted guest).
    tss_addr: int | None = None
    #: ``KVM_SET_IDENTITY_MAP_ADDR`` (the EPT identity map page), before any vCPU.
    identity_map_addr: int | None = None
    #: IOAPIC pins of ``KVM_CAP_SPLIT_IRQCHIP``, or None for no in-kernel irqchip.
    split_irqchip_pins: int | None = None


class Machine:
    """A VM built from a :class:`Layout`: the VM, its memory (by slot) and its vCPUs."""

    def __init__(self, kvm: kvmstate.Kvm, layout: Layout) -> None:
        self.layout = layout
        self.vm = kvm.create_vm()
        try:
            if layout.tss_addr is not None:
                self.vm.set_tss_addr(layout.tss_addr)
            if layout.identity_map_addr is not None:
                # A u64 the kernel copies from the pointer: exactly what KVM reads.
                address = ctypes.c_uint64(layout.identity_map_addr)
                fcntl.ioctl(self.vm.fileno(), ioctls.KVM_SET_IDENTITY_MAP_ADDR, address)
            if layout.split_irqchip_pins is not None:
                enable_split_irqchip(self.vm, layout.split_irqchip_pins)
            self.memory: list[mmap.mmap] = [
                self.vm.add_memory(gpa, size, slot=slot)
                for slot, (gpa, size) in enumerate(layout.memory)
            ]
            self.vcpus = [self.vm.create_vcpu(i) for i in range(layout.vcpus)]
        except BaseException:
            self.vm.close()
            raise

    def close(self) -> None:
        """Close the vCPUs, then the VM (which unmaps its memory)."""
        for vcpu in getattr(self, "vcpus", ()):
            vcpu.close()
        self.vm.close()

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclasses.dataclass
class Snapshot:
    """A saved VM: its layout, every vCPU's state and a copy of every memory slot."""

    layout: Layout
    vcpus: list[VcpuState]
    memory: list[bytes]

    def through_bytes(self) -> Snapshot:
        """The same snapshot after a trip through kvmstate's vCPU file format."""
        states = [VcpuState.from_bytes(s.to_bytes()) for s in self.vcpus]
        return Snapshot(self.layout, states, list(self.memory))


def save(machine: Machine) -> Snapshot:
    """Complete pending I/O, save every vCPU and copy guest memory (see the module doc)."""
    states = []
    for vcpu in machine.vcpus:
        if vcpu.kvm_run.exit_reason in (uapi.KVM_EXIT_IO, uapi.KVM_EXIT_MMIO):
            vcpu.complete_io()
        states.append(vcpu.save_state())
    memory = [bytes(m) for m in machine.memory]
    return Snapshot(machine.layout, states, memory)


def restore(kvm: kvmstate.Kvm, snapshot: Snapshot, *, tsc_first: bool = True) -> Machine:
    """A new VM from ``snapshot``: memory first, then each vCPU's state.

    With ``tsc_first`` (the default) IA32_TSC is written before
    :meth:`~kvmstate.vcpu.Vcpu.restore_state`, which writes it only after the
    nested state. KVM_SET_NESTED_STATE starts L2's VMX preemption timer from
    the saved deadline and the vCPU's TSC at that moment
    (``vmx_calc_preemption_timer_value``); on a new vCPU, whose TSC starts
    at 0, the timer would fire late by the whole saved TSC. The kernel's own
    selftests (``vcpu_load_state``) also put MSRs before nested state.
    """
    machine = Machine(kvm, snapshot.layout)
    try:
        for mem, data in zip(machine.memory, snapshot.memory, strict=True):
            mem[:] = data
        for vcpu, state in zip(machine.vcpus, snapshot.vcpus, strict=True):
            if tsc_first and state.msrs is not None and MSR_IA32_TSC in state.msrs:
                vcpu.set_msrs({MSR_IA32_TSC: state.msrs[MSR_IA32_TSC]})
            vcpu.restore_state(state)
    except BaseException:
        machine.close()
        raise
    return machine


@dataclasses.dataclass(frozen=True)
class Change:
    """One field of one vCPU that a fresh save after restore gave back differently."""

    vcpu: int
    path: str  #: ``part.field``, e.g. ``nested.vmcs12.guest_linear_address``, ``msrs[0x10]``
    before: str
    after: str

    def __str__(self) -> str:
        return f"vcpu{self.vcpu} {self.path}: {self.before} -> {self.after}"


def compare(saved: VcpuState, fresh: VcpuState, vcpu: int = 0) -> list[Change]:
    """Every field that differs between two states of one vCPU, part by part."""
    return list(_changes(saved, fresh, vcpu))


def _changes(saved: VcpuState, fresh: VcpuState, vcpu: int) -> Iterator[Change]:
    for part in PARTS:
        a, b = getattr(saved, part), getattr(fresh, part)
        if a is None and b is None:
            continue
        if a is not None and b is not None and saved.part_bytes(part) == fresh.part_bytes(part):
            continue  # the same bytes: no field to walk (walking them all is slow under Bochs)
        if a is None or b is None:
            yield Change(vcpu, part, "absent" if a is None else "present",
                         "absent" if b is None else "present")  # fmt: skip
        elif part == "nested":
            for d in kvmstate.diff.diff(a, b):
                yield Change(vcpu, f"nested.{d.path}", d.a_text, d.b_text)
        elif part == "msrs":
            for index in sorted(a.keys() | b.keys()):
                if a.get(index) != b.get(index):
                    yield Change(vcpu, f"msrs[{index:#x}]", _hex(a.get(index)), _hex(b.get(index)))
        elif part == "tsc_khz":
            yield Change(vcpu, part, str(a), str(b))
        elif part == "cpuid" or type(a) is not type(b):
            yield Change(vcpu, part, "bytes", "other bytes")
        else:
            for d in kvmstate.diff.diff_structs(a, b):
                yield Change(vcpu, f"{part}.{d.path}", d.a_text, d.b_text)


def _hex(value: int | None) -> str:
    return "absent" if value is None else f"{value:#x}"


@dataclasses.dataclass
class Migration:
    """What one :func:`migrate` did: the snapshot it moved, the new VM's fresh states,
    and the differences between the two."""

    snapshot: Snapshot
    fresh: list[VcpuState]
    changes: list[Change]


def migrate(
    kvm: kvmstate.Kvm, machine: Machine, *, through_bytes: bool = True, tsc_first: bool = True
) -> tuple[Machine, Migration]:
    """Save ``machine``, close it, restore into a new VM and compare a fresh save.

    With ``through_bytes`` the vCPU states go through the file format on
    the way (as they would through a file or a socket); ``tsc_first`` is
    :func:`restore`'s.
    """
    snapshot = save(machine)
    machine.close()
    moved = snapshot.through_bytes() if through_bytes else snapshot
    new = restore(kvm, moved, tsc_first=tsc_first)
    fresh = [vcpu.save_state() for vcpu in new.vcpus]
    changes = [
        change
        for i, (before, after) in enumerate(zip(snapshot.vcpus, fresh, strict=True))
        for change in compare(before, after, i)
    ]
    return new, Migration(snapshot, fresh, changes)
