"""Guest memory for the rules that read it: a one-method protocol and an adapter.

KVM_SET_NESTED_STATE reads one thing from guest memory: on VMX, in guest mode,
the VMCS header at ``vmcs12.vmcs_link_pointer`` (``nested_vmx_check_vmcs_link_ptr``,
the same in 6.1 and 6.12: the whole 4 KiB page must be in a memory slot, its
revision must be VMCS12_REVISION and its shadow bit must equal the vmcs12's
"VMCS shadowing" control). Without memory that rule is undecided; give
:func:`~kvmstate.check.check` a :class:`GuestMemory` and it is decided.

The memory is the target's as it will be at SET. A migration target is a fresh
vCPU; a vCPU already in guest mode with VMCS shadowing first writes the shadow
vmcs12 KVM caches back to the link pointer's page when a SET takes it out of
guest mode (``vmx_leave_nested`` -> ``nested_flush_cached_shadow_vmcs12``), so
for such a vCPU read the memory after that, not before.

Anything with a ``read_physical(gpa, size)`` method is a GuestMemory, so a
VM-snapshot object can be one directly; :class:`Regions` makes one from the
host buffers that back guest memory, such as the mmaps that
:meth:`Vm.add_memory <kvmstate.vm.Vm.add_memory>` returned::

    >>> mem = vm.add_memory(0, 1 << 20)
    >>> check(state, Facts.from_vcpu(vcpu), memory=Regions.from_vm(vm, {0: mem}))
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

__all__ = ["GuestMemory", "Regions"]


@runtime_checkable
class GuestMemory(Protocol):
    """Guest-physical memory as the target VM will have it when the state is SET."""

    def read_physical(self, gpa: int, size: int) -> bytes | None:
        """``size`` bytes at guest-physical address ``gpa``; None when any of them is
        outside guest memory (no memory slot holds it: the kernel's read fails)."""
        ...  # pragma: no cover - a protocol


class Regions:
    """A :class:`GuestMemory` over ``(guest_phys_addr, buffer)`` pairs.

    Each buffer is anything :class:`memoryview` takes (``bytes``, ``mmap``...);
    it is read at each call, so a live VM's memory is read as it is then. A read
    must lie within one region, as the kernel's single-page reads do.

    >>> Regions([(0x1000, b"\\x01\\x00\\x00\\x00")]).read_physical(0x1000, 4)
    b'\\x01\\x00\\x00\\x00'
    >>> Regions([(0x1000, b"\\0" * 4)]).read_physical(0x2000, 4) is None
    True
    """

    def __init__(self, regions: Iterable[tuple[int, Any]]) -> None:
        self._regions: list[tuple[int, memoryview]] = []
        for gpa, buffer in regions:
            if not isinstance(gpa, int) or isinstance(gpa, bool) or gpa < 0:
                raise ValueError(f"a region's guest-physical address must be an int >= 0: {gpa!r}")
            try:
                view = memoryview(buffer).cast("B")
            except TypeError:
                raise TypeError(
                    f"a region's memory must be a buffer (bytes, mmap...), "
                    f"not {type(buffer).__name__}"
                ) from None
            self._regions.append((gpa, view))

    @classmethod
    def from_vm(cls, vm: Any, memory: Mapping[int, Any]) -> Regions:
        """Regions of a :class:`~kvmstate.vm.Vm` from its memory by slot (``{slot: mmap}``),
        placed where ``vm.memory_regions`` says each slot is; a slot the VM does not have
        is a ValueError, as is a buffer shorter than its slot."""
        placed = vm.memory_regions
        out = []
        for slot, buffer in memory.items():
            if slot not in placed:
                raise ValueError(f"slot {slot} is not one of the VM's ({sorted(placed)})")
            gpa, size = placed[slot]
            if len(memoryview(buffer).cast("B")) < size:
                raise ValueError(f"slot {slot}'s memory is shorter than its {size:#x} bytes")
            out.append((gpa, buffer))
        return cls(out)

    def read_physical(self, gpa: int, size: int) -> bytes | None:
        """See :meth:`GuestMemory.read_physical`."""
        if gpa < 0 or size < 0:
            return None
        for base, view in self._regions:
            if base <= gpa and gpa + size <= base + len(view):
                return bytes(view[gpa - base : gpa - base + size])
        return None
