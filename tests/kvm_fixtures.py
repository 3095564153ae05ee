"""Fixtures for tests against a real /dev/kvm; they skip, saying why, where there is none."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

import kvmstate


def _why_no_kvm() -> str | None:
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist on this machine"
    try:
        kvm = kvmstate.Kvm()
    except OSError as exc:
        return f"/dev/kvm cannot be opened: {exc}"
    kvm.close()
    return None


NO_KVM = _why_no_kvm()
needs_kvm = pytest.mark.skipif(NO_KVM is not None, reason=str(NO_KVM))


@pytest.fixture
def kvm() -> Iterator[kvmstate.Kvm]:
    if NO_KVM:
        pytest.skip(NO_KVM)
    with kvmstate.Kvm() as k:
        yield k


@pytest.fixture
def vm(kvm: kvmstate.Kvm) -> Iterator[kvmstate.Vm]:
    with kvm.create_vm() as v:
        yield v


@pytest.fixture
def vcpu(vm: kvmstate.Vm) -> Iterator[kvmstate.Vcpu]:
    with vm.create_vcpu(0) as c:
        yield c


def start_real_mode(vcpu: kvmstate.Vcpu, rip: int = 0x1000) -> None:
    """Point a fresh ``vcpu`` (in real mode) at ``rip``, with CS base and selector 0::

    mem[0x1000:0x1002] = b"\\xe6\\x10"  # out 0x10, al
    start_real_mode(vcpu)  # the next run() exits with that OUT
    """
    sregs = vcpu.get_sregs()
    sregs.cs.base = sregs.cs.selector = 0
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rip, regs.rflags = rip, 2  # bit 1 is always set
    vcpu.set_regs(regs)


@pytest.fixture
def no_nested_kvm(kvm: kvmstate.Kvm) -> kvmstate.Kvm:
    """A KVM without nested support (as on the development machines)."""
    if kvm.nested_state_size:
        pytest.skip(f"this KVM has nested support (KVM_CAP_NESTED_STATE={kvm.nested_state_size})")
    return kvm


@pytest.fixture
def machine(kvm: kvmstate.Kvm) -> Iterator[Callable[[], kvmstate.Vcpu]]:
    """Fresh vCPUs, each in a VM of its own with an in-kernel irqchip (so the LAPIC is part
    of the state) and the supported CPUID; all closed after the test."""
    opened: list[kvmstate.Vcpu | kvmstate.Vm] = []

    def new_vcpu() -> kvmstate.Vcpu:
        vm = kvm.create_vm()
        opened.append(vm)
        vm.create_irqchip()
        vcpu = vm.create_vcpu(0)
        opened.append(vcpu)
        vcpu.set_cpuid2(kvm.get_supported_cpuid())
        return vcpu

    yield new_vcpu
    for fd in reversed(opened):
        fd.close()
