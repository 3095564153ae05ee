"""Live migration of a whole VM for the VMX tests, through kvmstate's public VM snapshot.

What a VMM does to move a VM, and what ``tests/test_vmx_migration.py``
does at every exit of its nested guest::

    new, done = migrate(kvm, machine)   # machine is closed; new runs on
    done.changes                        # what KVM gave back differently, by field

:func:`save` is ``Vm.save_state``: pending I/O completed on each vCPU
(the KVM API documentation says the state is only consistent then), the
clock, guest memory, and each vCPU with its nested state read last. The
source VM is then closed, and :func:`restore` is ``Kvm.restore_vm``: a new
VM with the same layout (memory slots, ``KVM_SET_TSS_ADDR``,
``KVM_SET_IDENTITY_MAP_ADDR``, a split irqchip, repeated from what the
library recorded), memory written back first (``KVM_SET_NESTED_STATE``
reads guest memory: the page at the VMCS link pointer must already hold
the shadow VMCS), then each vCPU in the library's restore order (IA32_TSC
before the nested state, so L2's preemption timer keeps its deadline).
:func:`migrate` also saves the new vCPUs again and lists, with
:func:`compare`, every field whose value came back different, so that a
test can name each one KVM refreshes instead of hiding it.
"""

from __future__ import annotations

import dataclasses
import mmap
from collections.abc import Iterator

import kvmstate
import kvmstate.diff
from kvmstate.state import PARTS, VcpuState
from kvmstate.vmstate import VmState
from kvmstate.x86 import MSR_IA32_TSC

__all__ = [
    "MSR_IA32_TSC",
    "Change",
    "Layout",
    "Machine",
    "Migration",
    "Snapshot",
    "compare",
    "migrate",
    "restore",
    "save",
]


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
    """A VM built from a :class:`Layout`: the VM, its memory (by slot) and its vCPUs.

    ``vm``: a VM ``Kvm.restore_vm`` already built with this layout.
    """

    def __init__(self, kvm: kvmstate.Kvm, layout: Layout, vm: kvmstate.Vm | None = None) -> None:
        self.layout = layout
        if vm is not None:
            self.vm = vm
            self.memory: list[mmap.mmap] = [vm.memory(slot) for slot in range(len(layout.memory))]
            self.vcpus = vm.vcpus
            return
        self.vm = kvm.create_vm()
        try:
            if layout.tss_addr is not None:
                self.vm.set_tss_addr(layout.tss_addr)
            if layout.identity_map_addr is not None:
                self.vm.set_identity_map_addr(layout.identity_map_addr)
            if layout.split_irqchip_pins is not None:
                self.vm.enable_split_irqchip(layout.split_irqchip_pins)
            self.memory = [
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
    """A saved VM (the library's :class:`~kvmstate.vmstate.VmState`) and the test's layout."""

    layout: Layout
    state: VmState

    @property
    def vcpus(self) -> list[VcpuState]:
        return self.state.vcpus

    @property
    def memory(self) -> list[bytes]:
        return [bytes(m) for m in self.state.memory]

    def through_bytes(self) -> Snapshot:
        """The same snapshot after a trip through kvmstate's file format (VM records)."""
        return Snapshot(self.layout, VmState.from_bytes(self.state.to_bytes()))


def save(machine: Machine) -> Snapshot:
    """``Vm.save_state``: pending I/O completed, every part saved (see the module doc)."""
    return Snapshot(machine.layout, machine.vm.save_state(machine.vcpus))


def restore(kvm: kvmstate.Kvm, snapshot: Snapshot) -> Machine:
    """``Kvm.restore_vm``: a new VM of the snapshot's layout, every part restored."""
    return Machine(kvm, snapshot.layout, kvm.restore_vm(snapshot.state))


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
    kvm: kvmstate.Kvm, machine: Machine, *, through_bytes: bool = True
) -> tuple[Machine, Migration]:
    """Save ``machine``, close it, restore into a new VM and compare a fresh save.

    With ``through_bytes`` the whole VM snapshot goes through the file format
    on the way (as it would through a file or a socket).
    """
    try:
        snapshot = save(machine)
    finally:
        machine.close()
    moved = snapshot.through_bytes() if through_bytes else snapshot
    new = restore(kvm, moved)
    fresh = [vcpu.save_state() for vcpu in new.vcpus]
    changes = [
        change
        for i, (before, after) in enumerate(zip(snapshot.vcpus, fresh, strict=True))
        for change in compare(before, after, i)
    ]
    return new, Migration(snapshot, fresh, changes)
