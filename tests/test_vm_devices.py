"""The VM clock, irqchip, PIT and set-up wrappers, and the vCPU event ioctls, on /dev/kvm.

Every expectation is the kernel's answer to an earlier call, or an
architectural value (the IOAPIC at 0xfec00000, the PIT's 65536 reset
count), never a number read from kvmstate.
"""

from __future__ import annotations

import errno
import time

import pytest

import kvmstate
from kvmstate import uapi
from tests.kvm_fixtures import start_real_mode

PIC_MASTER, PIC_SLAVE, IOAPIC = (
    uapi.KVM_IRQCHIP_PIC_MASTER,
    uapi.KVM_IRQCHIP_PIC_SLAVE,
    uapi.KVM_IRQCHIP_IOAPIC,
)


def test_the_clock_runs_and_takes_a_new_value(vm: kvmstate.Vm) -> None:
    first = vm.get_clock()
    time.sleep(0.01)
    second = vm.get_clock()
    assert second.clock - first.clock >= 10_000_000  # ns: at least the 10 ms slept
    target = uapi.kvm_clock_data(clock=second.clock + 3_600 * 10**9)  # an hour ahead
    vm.set_clock(target)
    after = vm.get_clock().clock
    assert target.clock <= after < target.clock + 10**9
    with pytest.raises(TypeError, match="clock: expected kvm_clock_data"):
        vm.set_clock(uapi.kvm_regs())  # type: ignore[arg-type]


def test_the_irqchip_chips_read_and_write_back(vm: kvmstate.Vm) -> None:
    with pytest.raises(kvmstate.KvmError) as no_chip:
        vm.get_irqchip(PIC_MASTER)
    assert no_chip.value.errno == errno.ENXIO and no_chip.value.ioctl == "KVM_GET_IRQCHIP"
    vm.create_irqchip()
    assert vm.setup == {"irqchip": 1}
    ioapic = vm.get_irqchip(IOAPIC)
    assert ioapic.chip_id == IOAPIC
    assert ioapic.chip.ioapic.base_address == 0xFEC0_0000  # the architectural default
    # Every redirection entry comes out of reset masked.
    assert all(e.fields.mask == 1 for e in ioapic.chip.ioapic.redirtbl)

    entry = ioapic.chip.ioapic.redirtbl[5]
    entry.fields.vector, entry.fields.mask, entry.fields.trig_mode = 0x35, 0, 1
    entry.fields.dest_id = 3
    vm.set_irqchip(ioapic)
    again = vm.get_irqchip(IOAPIC)
    assert again.chip.ioapic.redirtbl[5].bits == entry.bits
    assert again.chip.ioapic.redirtbl[5].fields.vector == 0x35

    for chip_id, imr in ((PIC_MASTER, 0xFB), (PIC_SLAVE, 0x7F)):
        pic = vm.get_irqchip(chip_id)
        pic.chip.pic.imr, pic.chip.pic.irq_base = imr, 0x20 + 8 * chip_id
        vm.set_irqchip(pic)
        back = vm.get_irqchip(chip_id).chip.pic
        assert (back.imr, back.irq_base) == (imr, 0x20 + 8 * chip_id)
    with pytest.raises(TypeError, match="chip: expected kvm_irqchip"):
        vm.set_irqchip(uapi.kvm_pit_state2())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="chip_id"):
        vm.get_irqchip(-1)


def test_the_pit_is_created_read_and_written(vm: kvmstate.Vm) -> None:
    vm.create_irqchip()
    with pytest.raises(kvmstate.KvmError) as no_pit:
        vm.get_pit2()
    assert no_pit.value.errno == errno.ENXIO
    vm.create_pit2()
    assert vm.setup["pit"] == 0
    pit = vm.get_pit2()
    assert [c.count for c in pit.channels] == [65536] * 3  # a count of 0 means 65536
    pit.channels[2].gate = 1
    pit.flags = uapi.KVM_PIT_FLAGS_SPEAKER_DATA_ON
    vm.set_pit2(pit)
    back = vm.get_pit2()
    assert back.channels[2].gate == 1
    assert back.flags & uapi.KVM_PIT_FLAGS_SPEAKER_DATA_ON
    with pytest.raises(kvmstate.KvmError) as twice:
        vm.create_pit2()
    assert twice.value.errno == errno.EEXIST


def test_split_irqchip_through_enable_cap_leaves_no_pic(vm: kvmstate.Vm) -> None:
    vm.enable_split_irqchip(24)
    assert vm.setup == {"split_irqchip": 24}
    with pytest.raises(kvmstate.KvmError) as exc:
        vm.get_irqchip(PIC_MASTER)
    assert exc.value.errno == errno.ENXIO
    vcpu = vm.create_vcpu(0)
    try:
        assert vcpu.get_lapic().regs  # the LAPIC stays in the kernel
    finally:
        vcpu.close()


def test_enable_cap_checks_its_arguments(vm: kvmstate.Vm, vcpu: kvmstate.Vcpu) -> None:
    with pytest.raises(ValueError, match="at most 4 arguments"):
        vm.enable_cap(uapi.KVM_CAP_SPLIT_IRQCHIP, 1, 2, 3, 4, 5)
    with pytest.raises(ValueError, match=r"args\[0\] .* does not fit in 64 bits"):
        vm.enable_cap(uapi.KVM_CAP_SPLIT_IRQCHIP, 1 << 64)
    with pytest.raises(TypeError, match="cap must be an int"):
        vcpu.enable_cap(True)
    # A capability KVM cannot enable on a vCPU: its own errno, kept.
    with pytest.raises(kvmstate.KvmError) as exc:
        vcpu.enable_cap(uapi.KVM_CAP_SPLIT_IRQCHIP, 24)
    assert exc.value.errno == errno.EINVAL and exc.value.ioctl == "KVM_ENABLE_CAP"


def test_identity_map_and_tss_addresses_only_before_vcpus(kvm: kvmstate.Kvm) -> None:
    with kvm.create_vm() as vm:
        vm.set_tss_addr(0x7FFF_D000)
        vm.set_identity_map_addr(0xFEFF_C000)
        assert vm.setup == {"tss_addr": 0x7FFF_D000, "identity_map_addr": 0xFEFF_C000}
        with vm.create_vcpu(0):
            with pytest.raises(kvmstate.KvmError) as exc:
                vm.set_identity_map_addr(0xFEFF_C000)
            assert exc.value.ioctl == "KVM_SET_IDENTITY_MAP_ADDR"
        with pytest.raises(ValueError, match="does not fit in 64 bits"):
            vm.set_identity_map_addr(1 << 64)


def test_nmi_is_pending_until_the_next_run(vcpu: kvmstate.Vcpu) -> None:
    assert vcpu.get_vcpu_events().nmi.pending == 0
    vcpu.nmi()
    assert vcpu.get_vcpu_events().nmi.pending == 1


def test_interrupt_is_queued_without_an_irqchip(vcpu: kvmstate.Vcpu) -> None:
    vcpu.interrupt(0x41)
    events = vcpu.get_vcpu_events()
    assert (events.interrupt.injected, events.interrupt.nr) == (1, 0x41)
    with pytest.raises(ValueError, match="vector 256 is out of range"):
        vcpu.interrupt(256)


def test_interrupt_is_refused_with_a_full_irqchip(vm: kvmstate.Vm) -> None:
    vm.create_irqchip()
    with vm.create_vcpu(0) as vcpu:
        with pytest.raises(kvmstate.KvmError) as exc:
            vcpu.interrupt(0x41)  # the in-kernel PIC owns external interrupts
        assert exc.value.errno == errno.ENXIO and exc.value.ioctl == "KVM_INTERRUPT"


def test_guest_debug_single_steps_real_mode(vm: kvmstate.Vm) -> None:
    mem = vm.add_memory(0, 0x10000)
    mem[0x1000:0x1004] = b"\x90\x90\x90\xf4"  # nop; nop; nop; hlt
    with vm.create_vcpu(0) as vcpu:
        start_real_mode(vcpu)
        vcpu.set_guest_debug(uapi.KVM_GUESTDBG_ENABLE | uapi.KVM_GUESTDBG_SINGLESTEP)
        pcs = []
        for _ in range(3):
            assert vcpu.run() == uapi.ExitReason.DEBUG
            pcs.append(vcpu.kvm_run.debug.arch.pc)
        assert pcs == [0x1001, 0x1002, 0x1003]  # one exit after each nop
        vcpu.set_guest_debug(0)
        assert vcpu.run() == uapi.ExitReason.HLT
        with pytest.raises(ValueError, match="at most 8"):
            vcpu.set_guest_debug(uapi.KVM_GUESTDBG_ENABLE, [0] * 9)
