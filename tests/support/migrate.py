"""Migrate a test VM into a new one through kvmstate's public VM snapshot.

:class:`Machine` is a VM the tests made with the library (``Kvm.create_vm``,
``Vm.add_memory``, ``Vm.create_vcpu``) plus views of its memory by guest
address. :func:`migrate` does what the kernel's ``state_test.c`` does,
through the library's VM-level calls: ``Vm.save_state`` (pending I/O
completed, memory, clock, every vCPU with its nested state read last),
the file format (``VmState.to_bytes`` / ``from_bytes``, as through a file
or a socket), the old VM closed, ``Kvm.restore_vm`` (a new VM of the same
layout, restored in the documented order), then a fresh save of every
vCPU, naming every field that came back different
(:class:`Migration.refreshed`), so a test can say which fields KVM
refreshes instead of hiding them. :func:`run_in_child` runs one step of a
"save in one process, finish in another" test in a process of its own;
:func:`in_two_processes` runs both steps.
"""

from __future__ import annotations

import dataclasses
import json
import mmap
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

import kvmstate
import kvmstate.diff
from kvmstate.diff import Difference, Differences
from kvmstate.state import PARTS, VcpuState
from kvmstate.vmstate import VmState


@dataclasses.dataclass(frozen=True)
class Region:
    """One memory slot: where it is and the host memory behind it."""

    slot: int
    guest_phys_addr: int
    memory: mmap.mmap


class Machine:
    """A VM with its memory regions and vCPUs, rebuildable with the same layout.

    ``layout`` is a list of (guest-physical address, size); region ``i`` is slot ``i``::

        machine = Machine(kvm, [(0, 4 << 20)])
        machine.regions[0].memory[0x1000:0x1003] = code
        machine.vcpus[0].run()
    """

    def __init__(
        self,
        kvm: kvmstate.Kvm,
        layout: Sequence[tuple[int, int]],
        vcpus: int = 1,
        *,
        vm: kvmstate.Vm | None = None,
    ) -> None:
        if vcpus < 1:
            raise ValueError("a machine needs at least one vCPU")
        self.kvm = kvm
        self.layout = [(int(gpa), int(size)) for gpa, size in layout]
        if vm is not None:  # one Kvm.restore_vm built with this layout
            self.vm = vm
            self.regions = [
                Region(slot, gpa, vm.memory(slot)) for slot, (gpa, _) in enumerate(self.layout)
            ]
            self.vcpus = vm.vcpus
            return
        self.vm = kvm.create_vm()
        try:
            self.regions = [
                Region(slot, gpa, self.vm.add_memory(gpa, size, slot=slot))
                for slot, (gpa, size) in enumerate(self.layout)
            ]
            self.vcpus = [self.vm.create_vcpu(i) for i in range(vcpus)]
        except BaseException:
            self.vm.close()
            raise

    def memory(self, address: int, length: int) -> memoryview:
        """A view of ``length`` bytes of guest memory at ``address`` (within one region)."""
        for region in self.regions:
            start = address - region.guest_phys_addr
            if start >= 0 and start + length <= len(region.memory):
                return memoryview(region.memory)[start : start + length]
        raise ValueError(f"{length} bytes at {address:#x} are not inside one memory region")

    def read_u32(self, address: int, count: int = 1) -> list[int]:
        """``count`` little-endian u32 values of guest memory at ``address``."""
        with self.memory(address, 4 * count) as view:
            return list(view.cast("I"))

    def close(self) -> None:
        """Close the vCPUs, then the VM (which unmaps the memory)."""
        for vcpu in self.vcpus:
            vcpu.close()
        self.vm.close()


@dataclasses.dataclass
class Migration:
    """The result of :func:`migrate`: the new machine, what was saved, what came back different."""

    machine: Machine
    saved: list[VcpuState]
    #: per vCPU: every field whose fresh GET after restore differs from the saved one,
    #: prefixed by its part (``nested.vmcb12.save.dr6``, ``msrs[0x10]``, ``regs.rip``).
    refreshed: list[Differences]
    #: the whole VM snapshot, as saved
    state: VmState | None = None
    #: VM-level parts a fresh read gives back differently (``clock``, ``memory slot 0``)
    vm_refreshed: list[str] = dataclasses.field(default_factory=list)


def migrate(old: Machine, *, through_bytes: bool = True) -> Migration:
    """Save ``old`` whole, close it, restore into a new VM of the same layout, compare.

    ``old`` is closed afterwards (also when saving fails); with ``through_bytes``
    the snapshot goes through the KVMSTATE file format on the way::

        moved = migrate(machine)
        machine = moved.machine  # runs on from where the old one stopped
        print(moved.refreshed[0])  # e.g. msrs[0x10]: 0x5e3a... -> 0x61c0...
    """
    try:
        state = old.vm.save_state(old.vcpus)
    finally:
        old.close()
    moved = VmState.from_bytes(state.to_bytes()) if through_bytes else state
    vm = old.kvm.restore_vm(moved)
    new = Machine(old.kvm, old.layout, len(state.vcpus), vm=vm)
    try:
        refreshed = [
            compare(saved, vcpu.save_state())
            for vcpu, saved in zip(new.vcpus, state.vcpus, strict=True)
        ]
        vm_refreshed = [
            f"memory slot {region.slot}"
            for region, data in zip(new.regions, state.memory, strict=True)
            if region.memory[:] != bytes(data)
        ]
        if state.clock is not None and vm.get_clock().clock != state.clock.clock:
            vm_refreshed.append("clock")  # the kvmclock counts on in the new VM
    except BaseException:
        new.close()
        raise
    return Migration(new, state.vcpus, refreshed, state, vm_refreshed)


#: How a child of :func:`run_in_child` hands back its function's return value.
CHILD_RESULT = "KVMSTATE-CHILD-RESULT "


def run_in_child(function: Callable[..., Any], *args: object, timeout: float) -> Any:
    """Call ``function(*args)`` in a new Python process; give back what it returned.

    The child shares nothing with the caller but ``args`` (values whose repr
    reads back, such as paths) and the files they name, so that a VM
    restored there has only the saved file to go on::

        run_in_child(save_to_file, path, timeout=600)  # one process saves ...
        logs = run_in_child(finish_from_file, path, timeout=600)  # ... another finishes

    ``function`` must be importable by name from its module (a module-level
    function of ``tests.test_x``), its return value JSON-serializable (it comes
    back through the child's stdout). A child that fails is an AssertionError
    carrying its output; one still running after ``timeout`` seconds is
    :class:`subprocess.TimeoutExpired`.
    """
    module, name = function.__module__, function.__qualname__
    if module == "__main__" or not name.isidentifier():
        raise ValueError(f"{module}.{name} cannot be imported by name in another process")
    code = (
        f"import json; from {module} import {name}; "
        f"print({CHILD_RESULT!r} + json.dumps({name}(*{args!r})))"
    )
    child = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, check=False
    )
    results = [line for line in child.stdout.splitlines() if line.startswith(CHILD_RESULT)]
    if child.returncode != 0 or not results:
        raise AssertionError(
            f"{name}{args!r} in a child process: exit status {child.returncode}\n"
            f"stdout:\n{child.stdout}\nstderr:\n{child.stderr}"
        )
    return json.loads(results[-1][len(CHILD_RESULT) :])


def in_two_processes(
    save: Callable[[str], object], finish: Callable[[str], Any], path: str, *, timeout: float
) -> tuple[VmState, Any]:
    """``save(path)`` in one new process, then ``finish(path)`` in another, which has only
    the file: (the VM state saved there, what ``finish`` returned). Each step is
    :func:`run_in_child`'s, with ``timeout`` seconds of its own::

        saved, logs = in_two_processes(save_to_file, finish_from_file, path, timeout=600)
    """
    run_in_child(save, path, timeout=timeout)
    saved = VmState.load(path)
    return saved, run_in_child(finish, path, timeout=timeout)


def compare(before: VcpuState, after: VcpuState) -> Differences:
    """Every field of every part that differs, named ``<part>.<field>``
    (``regs.rip``, ``nested.vmcb12.save.dr6``, ``msrs[0x10]``, ``tsc_khz``)."""
    out = Differences()
    for part in PARTS:
        a, b = getattr(before, part), getattr(after, part)
        if a is None or b is None:
            if (a is None) != (b is None):
                out.append(_whole(part, a, b))
            continue
        if before.part_bytes(part) == after.part_bytes(part):
            continue
        if part == "nested":
            found = kvmstate.diff.diff(a, b)
        elif part == "msrs":
            found = _msr_differences(a, b)
        elif part == "tsc_khz":
            found = Differences([Difference("", a, b, str(a), str(b))])
        else:
            try:
                found = kvmstate.diff.diff_structs(a, b)
            except TypeError:  # not one mirror type: a kvm_cpuid2 of another entry count
                found = Differences([Difference("", None, None, "one size", "another")])
        if not found:  # bytes differ but no field does: say so rather than hide it
            found = Differences([Difference("bytes", None, None, "differ", "differ")])
        out.extend(dataclasses.replace(d, path=_join(part, d.path)) for d in found)
    return out


def _join(part: str, path: str) -> str:
    if not path:
        return part
    return part + path if path.startswith("[") else f"{part}.{path}"


def _msr_differences(a: dict[int, int], b: dict[int, int]) -> Differences:
    out = Differences()
    for index in sorted(a.keys() | b.keys()):
        va, vb = a.get(index), b.get(index)
        if va != vb:
            ta = kvmstate.diff.ABSENT if va is None else f"{va:#x}"
            tb = kvmstate.diff.ABSENT if vb is None else f"{vb:#x}"
            out.append(Difference(f"[{index:#x}]", va, vb, ta, tb))
    return out


def _whole(part: str, a: object, b: object) -> Difference:
    ta = kvmstate.diff.ABSENT if a is None else "present"
    tb = kvmstate.diff.ABSENT if b is None else "present"
    return Difference(part, None, None, ta, tb)
