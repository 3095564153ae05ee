"""Kvm / Vm / Vcpu against the real /dev/kvm of this machine."""

from __future__ import annotations

import errno
import fcntl
import os

import pytest

import kvmstate
from kvmstate import ioctls, uapi
from kvmstate.errors import KvmError

SYSENTER_CS, SYSENTER_ESP, SYSENTER_EIP = 0x174, 0x175, 0x176


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def cloexec(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)


def test_kvm_opens_with_api_12_and_cloexec(kvm: kvmstate.Kvm) -> None:
    assert kvm.api_version == fcntl.ioctl(kvm.fileno(), ioctls.KVM_GET_API_VERSION) == 12
    assert cloexec(kvm.fileno())
    assert "api=12" in repr(kvm)


def test_check_extension_is_the_kernels_answer(kvm: kvmstate.Kvm, vm: kvmstate.Vm) -> None:
    raw = fcntl.ioctl(kvm.fileno(), ioctls.KVM_CHECK_EXTENSION, uapi.KVM_CAP_USER_MEMORY)
    assert kvm.check_extension(uapi.KVM_CAP_USER_MEMORY) == raw == 1
    assert vm.check_extension(uapi.KVM_CAP_NR_VCPUS) == fcntl.ioctl(
        vm.fileno(), ioctls.KVM_CHECK_EXTENSION, uapi.KVM_CAP_NR_VCPUS
    )
    raw_nested = fcntl.ioctl(kvm.fileno(), ioctls.KVM_CHECK_EXTENSION, uapi.KVM_CAP_NESTED_STATE)
    assert kvm.nested_state_size == raw_nested


def test_check_extension_rejects_bad_arguments(kvm: kvmstate.Kvm) -> None:
    with pytest.raises(TypeError):
        kvm.check_extension("157")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        kvm.check_extension(-1)
    with pytest.raises(ValueError):
        kvm.check_extension(1 << 40)


def test_vm_and_vcpu_fds_are_cloexec_and_closed_without_leaks(kvm: kvmstate.Kvm) -> None:
    before = open_fds()
    for _ in range(3):
        with kvm.create_vm() as vm, vm.create_vcpu(0) as vcpu:
            assert cloexec(vm.fileno()) and cloexec(vcpu.fileno())
            vcpu.get_regs()
            vcpu.kvm_run  # noqa: B018 - maps the run page, which close() must unmap
    assert open_fds() == before


def test_closed_wrappers_refuse_use(kvm: kvmstate.Kvm) -> None:
    vm = kvm.create_vm()
    vcpu = vm.create_vcpu(0)
    vcpu.close()
    vcpu.close()  # idempotent
    assert vcpu.closed and "closed" in repr(vcpu)
    with pytest.raises(ValueError, match="closed Vcpu"):
        vcpu.get_regs()
    vm.close()
    with pytest.raises(ValueError, match="closed Vm"):
        vm.create_vcpu(1)


def test_non_kvm_device_is_refused_and_closed() -> None:
    before = open_fds()
    with pytest.raises(KvmError) as info:
        kvmstate.Kvm("/dev/null")
    assert info.value.errno == errno.ENOTTY
    assert info.value.ioctl == "KVM_GET_API_VERSION"
    assert open_fds() == before


def test_missing_device_is_file_not_found() -> None:
    with pytest.raises(FileNotFoundError):
        kvmstate.Kvm("/dev/kvm-does-not-exist")


def test_regs_round_trip(vcpu: kvmstate.Vcpu) -> None:
    regs = vcpu.get_regs()
    for i, name in enumerate(regs.field_names()):
        setattr(regs, name, 0x1111_0000_0000 + i)
    regs.rflags = 0x202
    vcpu.set_regs(regs)
    assert vcpu.get_regs() == regs


def test_set_regs_needs_kvm_regs(vcpu: kvmstate.Vcpu) -> None:
    with pytest.raises(TypeError, match="kvm_regs"):
        vcpu.set_regs(vcpu.get_sregs())  # type: ignore[arg-type]


def test_sregs_round_trip(vcpu: kvmstate.Vcpu) -> None:
    sregs = vcpu.get_sregs()
    sregs.cs.base, sregs.cs.selector = 0x10000, 0x1000
    sregs.ds.base, sregs.ds.selector = 0x20000, 0x2000
    sregs.gdt.base, sregs.gdt.limit = 0x5000, 0xFF
    sregs.idt.base, sregs.idt.limit = 0x6000, 0x7FF
    vcpu.set_sregs(sregs)
    assert vcpu.get_sregs() == sregs


def test_msrs_round_trip(vcpu: kvmstate.Vcpu) -> None:
    # 32-bit values: AMD keeps only the low half of the SYSENTER MSRs.
    values = {SYSENTER_CS: 0x10, SYSENTER_ESP: 0x1234_5000, SYSENTER_EIP: 0x0567_8000}
    vcpu.set_msrs(values)
    assert vcpu.get_msrs(values) == values


def test_msr_refused_by_the_kernel_is_named(vcpu: kvmstate.Vcpu) -> None:
    with pytest.raises(KvmError, match="0xdeadbeef") as info:
        vcpu.get_msrs([SYSENTER_CS, 0xDEADBEEF])
    assert info.value.result == 1 and info.value.ioctl == "KVM_GET_MSRS"
    with pytest.raises(ValueError):
        vcpu.get_msrs([1 << 32])
    with pytest.raises(TypeError):
        vcpu.set_msrs({SYSENTER_CS: "1"})  # type: ignore[dict-item]


def test_msr_index_list_is_readable(kvm: kvmstate.Kvm, vcpu: kvmstate.Vcpu) -> None:
    indices = kvm.get_msr_index_list()
    assert SYSENTER_CS in indices and len(indices) == len(set(indices))
    assert set(vcpu.get_msrs([SYSENTER_CS, SYSENTER_ESP])) == {SYSENTER_CS, SYSENTER_ESP}


def test_cpuid_round_trip(kvm: kvmstate.Kvm, vcpu: kvmstate.Vcpu) -> None:
    supported = kvm.get_supported_cpuid()
    assert 0 < len(supported) == supported.capacity()
    vcpu.set_cpuid2(supported)
    back = vcpu.get_cpuid2()
    # KVM adjusts some registers at runtime (APIC ID, OSXSAVE, XSAVE sizes): compare the leaves.
    leaves = [(e.function, e.index) for e in supported.entries]
    assert [(e.function, e.index) for e in back.entries] == leaves
    vendor = next(e for e in supported.entries if e.function == 0)
    assert back.entries[leaves.index((0, 0))].to_bytes() == vendor.to_bytes()


def test_cpuid_count_beyond_the_allocation_is_refused(vcpu: kvmstate.Vcpu) -> None:
    cpuid = uapi.kvm_cpuid2.new(2)
    cpuid.nent = 1000
    with pytest.raises(ValueError, match="holds 2 entries"):
        vcpu.set_cpuid2(cpuid)


def test_vcpu_events_round_trip(vcpu: kvmstate.Vcpu) -> None:
    events = vcpu.get_vcpu_events()
    events.nmi.masked = 1
    events.flags = 0
    vcpu.set_vcpu_events(events)
    back = vcpu.get_vcpu_events()
    assert back.nmi.masked == 1
    assert back.exception.to_bytes() == events.exception.to_bytes()


def test_borrowed_vcpu_is_not_closed(vcpu: kvmstate.Vcpu) -> None:
    borrowed = kvmstate.Vcpu.borrow(vcpu.fileno())
    assert not borrowed.owned and "borrowed" in repr(borrowed)
    assert borrowed.get_regs() == vcpu.get_regs()
    borrowed.close()
    assert vcpu.get_regs() is not None  # the owner's fd still works
    with pytest.raises(ValueError):
        borrowed.get_regs()


def test_borrowed_vcpu_learns_nested_size_from_dev_kvm(
    kvm: kvmstate.Kvm, vcpu: kvmstate.Vcpu
) -> None:
    borrowed = kvmstate.Vcpu.borrow(vcpu.fileno())
    assert borrowed.nested_state_size == kvm.nested_state_size
    borrowed.close()


def load_real_mode(vm: kvmstate.Vm, vcpu: kvmstate.Vcpu, code: bytes) -> None:
    """Put ``code`` at 0x1000 and point the vCPU (real mode, CS base 0) at it."""
    mem = vm.add_memory(0, 0x10000)
    mem[0x1000 : 0x1000 + len(code)] = code
    sregs = vcpu.get_sregs()
    sregs.cs.base = sregs.cs.selector = 0
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rip, regs.rflags = 0x1000, 2
    vcpu.set_regs(regs)


def test_run_real_mode_code_to_io_and_hlt(vm: kvmstate.Vm, vcpu: kvmstate.Vcpu) -> None:
    code = bytes([0xB0, 0x42, 0xE6, 0x10, 0xF4])  # mov al,0x42; out 0x10,al; hlt
    load_real_mode(vm, vcpu, code)
    assert vcpu.run() == uapi.ExitReason.IO
    io = vcpu.kvm_run.io
    assert (io.direction, io.port, io.size) == (uapi.KVM_EXIT_IO_OUT, 0x10, 1)
    assert vcpu.io_data() == b"\x42"
    assert vcpu.run() == uapi.ExitReason.HLT
    assert vcpu.get_regs().rip == 0x1000 + len(code)
    with pytest.raises(ValueError, match="not KVM_EXIT_IO"):
        vcpu.io_data()


def test_complete_io_finishes_the_exit_without_running(
    vm: kvmstate.Vm, vcpu: kvmstate.Vcpu
) -> None:
    load_real_mode(vm, vcpu, bytes([0xE6, 0x10, 0xF4]))  # out 0x10,al; hlt
    assert vcpu.run() == uapi.ExitReason.IO
    vcpu.complete_io()
    assert vcpu.kvm_run.immediate_exit == 0
    assert vcpu.get_regs().rip == 0x1002  # past the out, not yet at hlt's exit


def test_add_memory_rejects_unaligned(vm: kvmstate.Vm) -> None:
    with pytest.raises(ValueError, match="page size"):
        vm.add_memory(0x100, 0x1000)


def test_nested_unavailable_is_a_dedicated_oserror(no_nested_kvm: kvmstate.Kvm) -> None:
    with no_nested_kvm.create_vm() as vm, vm.create_vcpu(0) as vcpu:
        with pytest.raises(kvmstate.NestedStateUnavailableError) as info:
            vcpu.get_nested_state()
        assert isinstance(info.value, OSError)
        assert info.value.errno == errno.EINVAL
        assert info.value.ioctl == "KVM_GET_NESTED_STATE"
        assert "nested=1" in str(info.value)
        state = kvmstate.NestedState(128)
        state.size = 128
        with pytest.raises(kvmstate.NestedStateUnavailableError) as info:
            vcpu.set_nested_state(state)
        assert info.value.ioctl == "KVM_SET_NESTED_STATE"
