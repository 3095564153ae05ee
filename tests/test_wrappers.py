"""The fd wrappers' contracts against the real /dev/kvm: ownership, buffers, ids, slots, errors."""

from __future__ import annotations

import copy
import os
import pickle
from typing import Any

import pytest

import kvmstate
from kvmstate import uapi
from kvmstate.nested import HEADER_SIZE, NestedState
from kvmstate.state import VcpuState


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


# --- copies and pickles (issue 11, 3.1) --------------------------------------------------------

COPIERS = {
    "copy": copy.copy,
    "deepcopy": copy.deepcopy,
    **{f"pickle{p}": lambda o, p=p: pickle.dumps(o, p) for p in range(pickle.HIGHEST_PROTOCOL + 1)},
}


@pytest.mark.parametrize("how", list(COPIERS))
def test_wrappers_refuse_copies_and_stay_usable(
    kvm: kvmstate.Kvm, vm: kvmstate.Vm, vcpu: kvmstate.Vcpu, how: str
) -> None:
    before = open_fds()
    for wrapper in (kvm, vm, vcpu, kvmstate.Vcpu.borrow(vcpu.fileno())):
        with pytest.raises(TypeError, match=f"a {type(wrapper).__name__} cannot be"):
            COPIERS[how](wrapper)
    # Nothing was duplicated or closed, and each original still answers the kernel.
    assert open_fds() == before
    assert kvm.check_extension(uapi.KVM_CAP_USER_MEMORY) == 1
    assert vm.check_extension(uapi.KVM_CAP_USER_MEMORY) == 1
    assert vcpu.get_regs().rip == 0xFFF0


def test_an_object_holding_a_wrapper_is_refused_too(vcpu: kvmstate.Vcpu) -> None:
    with pytest.raises(TypeError, match="cannot be copied"):
        copy.deepcopy({"vcpu": vcpu})
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps([vcpu])
    assert vcpu.get_regs().rip == 0xFFF0


def same_bytes(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a.to_bytes() == b.to_bytes()


def test_states_and_mirrors_still_copy_and_pickle(kvm: kvmstate.Kvm, vm: kvmstate.Vm) -> None:
    vm.create_irqchip()
    with vm.create_vcpu(0) as vcpu:
        vcpu.set_cpuid2(kvm.get_supported_cpuid())
        saved = vcpu.save_state()
    nested = NestedState(HEADER_SIZE)
    nested.format, nested.size = uapi.KVM_STATE_NESTED_FORMAT_SVM, HEADER_SIZE
    nested.svm.vmcb_pa = 0x10000
    assert saved.cpuid is not None and saved.xsave is not None
    mirrors = [saved.regs, saved.cpuid, saved.xsave, uapi.kvm_msrs.new(3), nested]
    for how, copier in COPIERS.items():
        for obj in mirrors:
            made = copier(obj)
            back = pickle.loads(made) if how.startswith("pickle") else made
            assert back is not obj and same_bytes(back, obj), (how, type(obj).__name__)
        made = copier(saved)
        back = pickle.loads(made) if how.startswith("pickle") else made
        assert isinstance(back, VcpuState) and back == saved
