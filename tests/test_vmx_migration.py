"""Live migration of VMs into new VMs: the test-side helper of tests/support/migrate_vmx.py.

The host tests check the migration helper itself and the structures it
hands the kernel.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

import kvmstate
from kvmstate import uapi
from kvmstate.state import VcpuState
from tests import ctypes_oracle as oracle
from tests.kvm_fixtures import needs_kvm
from tests.support import migrate_vmx

MSR_IA32_TSC = migrate_vmx.MSR_IA32_TSC


@needs_kvm
def test_migrate_a_running_vm_on_this_host(kvm: kvmstate.Kvm) -> None:
    layout = migrate_vmx.Layout(memory=((0, 0x10000),))
    machine = migrate_vmx.Machine(kvm, layout)
    # Real mode at 0x1000: inc al; out 0x10, al; cmp al, 5; jne back; hlt.
    code = bytes([0xFE, 0xC0, 0xE6, 0x10, 0x3C, 0x05, 0x75, 0xF8, 0xF4])
    machine.memory[0][0x1000 : 0x1000 + len(code)] = code
    vcpu = machine.vcpus[0]
    sregs = vcpu.get_sregs()
    sregs.cs.base = sregs.cs.selector = 0
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rip, regs.rflags, regs.rax = 0x1000, 2, 0
    vcpu.set_regs(regs)
    seen = []
    try:
        while (reason := machine.vcpus[0].run()) == uapi.ExitReason.IO:
            seen.append(machine.vcpus[0].io_data()[0])
            machine, done = migrate_vmx.migrate(kvm, machine)
            assert done.snapshot.vcpus[0].regs is not None
            assert not [c for c in done.changes if c.path.startswith(("regs", "sregs"))]
        assert reason == uapi.ExitReason.HLT
    finally:
        machine.close()
    assert seen == [1, 2, 3, 4, 5]


@needs_kvm
def test_machine_repeats_the_layout_and_carries_events(kvm: kvmstate.Kvm) -> None:
    layout = migrate_vmx.Layout(
        memory=((0, 0x10000), (0x100000, 0x4000)),
        tss_addr=0x7FFF_D000,
        identity_map_addr=0x7FFF_C000,
        split_irqchip_pins=24,
    )
    machine = migrate_vmx.Machine(kvm, layout)
    try:
        for slot, mem in enumerate(machine.memory):
            mem[:4] = bytes([slot + 1] * 4)
        migrate_vmx.inject_nmi(machine.vcpus[0])
        machine, done = migrate_vmx.migrate(kvm, machine)
        assert [bytes(m[:4]) for m in machine.memory] == [b"\x01" * 4, b"\x02" * 4]
        assert [len(m) for m in machine.memory] == [0x10000, 0x4000]
        saved, fresh = done.snapshot.vcpus[0], done.fresh[0]
        assert saved.lapic is not None and fresh.lapic is not None  # the split irqchip's LAPIC
        assert saved.events is not None and saved.events.nmi.pending == 1
        assert fresh.events is not None and fresh.events.nmi.pending == 1
        assert {c.path for c in done.changes} <= {f"msrs[{MSR_IA32_TSC:#x}]"}
    finally:
        machine.close()


@needs_kvm
def test_an_interrupt_from_kvm_interrupt_is_held_where_no_get_sees_it(kvm: kvmstate.Kvm) -> None:
    layout = migrate_vmx.Layout(memory=((0, 0x10000),), split_irqchip_pins=24)
    with migrate_vmx.Machine(kvm, layout) as machine:
        vcpu = machine.vcpus[0]
        migrate_vmx.inject_interrupt(vcpu, 0x41)
        with pytest.raises(OSError) as info:  # one ExtINT at a time: it is pending
            migrate_vmx.inject_interrupt(vcpu, 0x42)
        assert info.value.errno == errno.EEXIST
        events = vcpu.get_vcpu_events()
        assert (events.interrupt.injected, events.interrupt.nr) == (0, 0)


@needs_kvm
def test_compare_names_each_field(kvm: kvmstate.Kvm) -> None:
    with migrate_vmx.Machine(kvm, migrate_vmx.Layout(memory=((0, 0x10000),))) as machine:
        saved = machine.vcpus[0].save_state()
    other = VcpuState.from_bytes(saved.to_bytes())
    assert migrate_vmx.compare(saved, other) == []
    assert other.regs is not None and other.msrs is not None
    other.regs.rip += 1
    index = next(iter(other.msrs))
    other.msrs[index] ^= 1
    del other.msrs[next(i for i in other.msrs if i != index)]
    other.debugregs = None
    paths = [c.path for c in migrate_vmx.compare(saved, other, vcpu=3)]
    assert paths[0] == "regs.rip" and f"msrs[{index:#x}]" in paths and "debugregs" in paths
    assert len(paths) == 4
    assert all(c.vcpu == 3 for c in migrate_vmx.compare(saved, other, vcpu=3))
    assert "absent" in str(migrate_vmx.compare(saved, other)[-1])


needs_oracle = pytest.mark.skipif(
    oracle.tools_missing() is not None, reason=str(oracle.tools_missing())
)


@needs_oracle
def test_helper_structures_match_the_headers(tmp_path: Path) -> None:
    mirrors = {
        "struct kvm_enable_cap": migrate_vmx.kvm_enable_cap,
        "struct kvm_interrupt": migrate_vmx.kvm_interrupt,
    }
    layouts = oracle.c_layouts("#include <linux/kvm.h>\n", list(mirrors), tmp_path)
    for name, cls in mirrors.items():
        assert oracle.compare(cls, layouts[name]) == [], name


@needs_oracle
def test_helper_ioctls_match_the_headers(tmp_path: Path) -> None:
    names = [*migrate_vmx.IOCTLS, "KVM_CAP_SPLIT_IRQCHIP"]
    values = oracle.c_constants("#include <linux/kvm.h>\n", names, tmp_path)
    assert values == {
        **migrate_vmx.IOCTLS,
        "KVM_CAP_SPLIT_IRQCHIP": migrate_vmx.KVM_CAP_SPLIT_IRQCHIP,
    }
