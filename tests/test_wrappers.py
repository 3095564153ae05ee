"""The fd wrappers' contracts against the real /dev/kvm: ownership, buffers, ids, slots, errors."""

from __future__ import annotations

import contextlib
import copy
import errno
import fcntl
import gc
import os
import pickle
import re
from typing import Any

import pytest

import kvmstate
from kvmstate import ioctls, uapi
from kvmstate.nested import HEADER_SIZE, SVM_MAX_SIZE, VMX_MAX_SIZE, NestedState
from kvmstate.state import StateError, VcpuState


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


# --- the nested buffer of a borrowed vCPU (issue 11, 3.5) --------------------------------------


class NestedSpy:
    """Stands in for ``fcntl.ioctl``: records the length of each KVM_GET_NESTED_STATE buffer."""

    def __init__(self) -> None:
        self.real = fcntl.ioctl
        self.lengths: list[int] = []

    def __call__(self, fd: int, request: int, arg: Any = 0, *rest: Any) -> Any:
        if request == ioctls.KVM_GET_NESTED_STATE:
            self.lengths.append(memoryview(arg).nbytes)
        return self.real(fd, request, arg, *rest)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> NestedSpy:
    recorder = NestedSpy()
    monkeypatch.setattr(fcntl, "ioctl", recorder)
    return recorder


def dev_kvm_cap() -> int:
    """KVM_CAP_NESTED_STATE asked with a plain ioctl, not through the library."""
    fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    try:
        return fcntl.ioctl(fd, ioctls.KVM_CHECK_EXTENSION, uapi.KVM_CAP_NESTED_STATE)
    finally:
        os.close(fd)


def get_nested(vcpu: kvmstate.Vcpu) -> None:
    with contextlib.suppress(OSError):  # no nesting here: EINVAL after the buffer went down
        vcpu.get_nested_state()


@pytest.mark.parametrize("given", [None, 0, HEADER_SIZE, SVM_MAX_SIZE, VMX_MAX_SIZE])
def test_a_borrowed_vcpu_buffer_is_never_below_the_capability(
    vcpu: kvmstate.Vcpu, spy: NestedSpy, given: int | None
) -> None:
    cap = dev_kvm_cap()
    borrowed = kvmstate.Vcpu.borrow(vcpu.fileno(), nested_state_size=given)
    get_nested(borrowed)
    assert spy.lengths, "KVM_GET_NESTED_STATE never reached the kernel"
    assert all(n >= max(cap, HEADER_SIZE, given or 0) for n in spy.lengths), spy.lengths
    # A smaller given size is raised to /dev/kvm's answer.
    assert borrowed.nested_state_size == max(cap, given if given is not None else cap)
    need = max(cap, given or 0, HEADER_SIZE)
    if need > HEADER_SIZE:
        with pytest.raises(ValueError, match=f"may write {need}"):
            borrowed.get_nested_state(bytearray(need - 8))


@pytest.mark.parametrize("given", [0, HEADER_SIZE, SVM_MAX_SIZE])
def test_without_dev_kvm_the_buffer_is_never_below_the_largest_state(
    vcpu: kvmstate.Vcpu, spy: NestedSpy, monkeypatch: pytest.MonkeyPatch, given: int
) -> None:
    # /dev/kvm unreachable (a sandboxed VMM handing its descriptor over): nothing
    # confirms a capability below 8320, so the buffer is never smaller.
    monkeypatch.setattr(kvmstate.vcpu, "DEFAULT_PATH", "/nonexistent/kvm")
    borrowed = kvmstate.Vcpu.borrow(vcpu.fileno(), nested_state_size=given)
    assert borrowed.nested_state_size == given
    get_nested(borrowed)
    assert spy.lengths and all(n >= VMX_MAX_SIZE for n in spy.lengths), spy.lengths
    with pytest.raises(ValueError, match="cannot be asked"):
        borrowed.get_nested_state(bytearray(SVM_MAX_SIZE))


@pytest.mark.parametrize(
    ("given", "error", "message"),
    [
        (True, TypeError, "must be an int, not bool"),
        (1.5, TypeError, "must be an int, not float"),
        ("4224", TypeError, "must be an int, not str"),
        (-1, ValueError, "out of range"),
        (1, ValueError, "out of range"),
        (100, ValueError, "out of range"),
        (HEADER_SIZE - 1, ValueError, "out of range"),
        ((1 << 24) + 1, ValueError, "out of range"),
        (2**64, ValueError, "out of range"),
    ],
)
def test_nested_state_size_is_checked(
    vcpu: kvmstate.Vcpu, given: Any, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        kvmstate.Vcpu.borrow(vcpu.fileno(), nested_state_size=given)
    theirs = os.dup(vcpu.fileno())
    try:
        with pytest.raises(error, match=message):
            kvmstate.Vcpu(theirs, nested_state_size=given)
        gc.collect()  # a half-made owner would close the descriptor when collected
        os.fstat(theirs)  # refused before the descriptor was taken: still open
    finally:
        os.close(theirs)
    assert vcpu.get_regs().rip == 0xFFF0


# --- vCPU ids in reprs (issue 11, 3.9) ---------------------------------------------------------


def test_vcpu_repr_shows_its_id(vm: kvmstate.Vm) -> None:
    with vm.create_vcpu(3) as three:
        assert three.vcpu_id == 3
        assert re.fullmatch(r"<Vcpu fd=\d+ id=3>", repr(three)), repr(three)
        borrowed = kvmstate.Vcpu.borrow(three.fileno(), vcpu_id=3)
        assert re.fullmatch(r"<Vcpu fd=\d+ borrowed id=3>", repr(borrowed))
        anonymous = kvmstate.Vcpu.borrow(three.fileno())
        assert anonymous.vcpu_id is None and "id=" not in repr(anonymous)
    for bad, error in ((True, TypeError), ("1", TypeError), (-1, ValueError), (2**31, ValueError)):
        with pytest.raises(error, match="vcpu_id"):
            kvmstate.Vcpu.borrow(0, vcpu_id=bad)


# --- memory slots (issue 11, 3.10) -------------------------------------------------------------


def test_add_memory_picks_the_lowest_free_slot(vm: kvmstate.Vm) -> None:
    vm.add_memory(0x100000, 4096, slot=1)
    vm.add_memory(0x20000, 4096)  # the kernel takes it: slot 0 was free
    vm.add_memory(0x30000, 4096)  # slot 2: 0 and 1 are taken
    assert vm.memory_regions == {1: (0x100000, 4096), 0: (0x20000, 4096), 2: (0x30000, 4096)}
    vm.set_user_memory_region(2, 0x30000, 0, 0)  # size 0 deletes slot 2
    vm.add_memory(0x50000, 4096)  # and it is free again
    assert vm.memory_regions[2] == (0x50000, 4096)
    vm.memory_regions.clear()  # a copy: the VM's own record stays
    assert len(vm.memory_regions) == 3


def test_add_memory_names_the_slot_in_use_or_overlapped(vm: kvmstate.Vm) -> None:
    vm.add_memory(0x100000, 0x2000, slot=1)
    with pytest.raises(ValueError, match=r"slot 1 is in use \(0x100000\.\.0x102000\)"):
        vm.add_memory(0x200000, 4096, slot=1)
    for start, size in ((0x100000, 4096), (0x101000, 0x2000), (0xFF000, 0x2000)):
        with pytest.raises(ValueError, match=r"overlaps slot 1 \(0x100000\.\.0x102000\)"):
            vm.add_memory(start, size)
    vm.add_memory(0x102000, 4096)  # adjacent is fine
    # Beside add_memory, the kernel's own EEXIST for an overlap names the slot too.
    with pytest.raises(kvmstate.KvmError, match="overlaps slot 1") as info:
        vm.set_user_memory_region(7, 0x101000, 4096, 0)
    assert info.value.errno == errno.EEXIST
    with pytest.raises(ValueError, match="beyond 2"):
        vm.add_memory(2**64 - 4096, 8192)


# --- errors that name their cause (issue 11, 3.8) ----------------------------------------------


def test_lapic_without_irqchip_says_create_irqchip(vm: kvmstate.Vm, vcpu: kvmstate.Vcpu) -> None:
    for call in (vcpu.get_lapic, lambda: vcpu.set_lapic(uapi.kvm_lapic_state())):
        with pytest.raises(kvmstate.KvmError, match=r"create_irqchip\(\) before") as info:
            call()
        assert info.value.errno == errno.EINVAL
    saved = vcpu.save_state()
    assert "no in-kernel irqchip" in saved.absent["lapic"]
    with vm.kvm.create_vm() as other:  # type: ignore[union-attr]
        other.create_irqchip()
        with other.create_vcpu(0) as chip:
            saved.lapic = chip.get_lapic()
    with pytest.raises(StateError, match=r"lapic: .*create_irqchip\(\)") as err:
        vcpu.restore_state(VcpuState(lapic=saved.lapic))
    assert err.value.errno == errno.EINVAL and err.value.part == "lapic"


def tsc_control(kvm: kvmstate.Kvm) -> int:
    return kvm.check_extension(uapi.KVM_CAP_TSC_CONTROL)


def test_tsc_rate_refused_without_tsc_control_says_why(kvm: kvmstate.Kvm) -> None:
    if tsc_control(kvm):
        pytest.skip("this KVM has KVM_CAP_TSC_CONTROL: it scales the guest TSC")
    with kvm.create_vm() as vm, vm.create_vcpu(0) as vcpu:
        host = vcpu.get_tsc_khz()  # a fresh vCPU runs at the host's rate
        with pytest.raises(kvmstate.KvmError, match="KVM_CAP_TSC_CONTROL is 0") as info:
            vcpu.set_tsc_khz(host // 2)
        assert info.value.errno == errno.EINVAL and info.value.ioctl == "KVM_SET_TSC_KHZ"
        # The quirk: the refused rate now reads back as current (docs/quirks.md).
        assert vcpu.get_tsc_khz() == host // 2


def test_restoring_a_refused_tsc_rate_fails_every_time(kvm: kvmstate.Kvm) -> None:
    if tsc_control(kvm):
        pytest.skip("this KVM has KVM_CAP_TSC_CONTROL: it scales the guest TSC")
    with kvm.create_vm() as vm, vm.create_vcpu(0) as vcpu:
        host = vcpu.get_tsc_khz()
        slow = VcpuState(tsc_khz=host // 2)
        for _ in range(2):  # the second time KVM_GET_TSC_KHZ already reads the rate
            with pytest.raises(StateError, match=r"tsc_khz: .*KVM_CAP_TSC_CONTROL is 0.*None"):
                vcpu.restore_state(slow)
        vcpu.restore_state(VcpuState(tsc_khz=host))  # the host's rate: taken
        assert vcpu.get_tsc_khz() == host


def in_a_fork_child(call: Any) -> str:
    """Run ``call()`` in a real fork() child; its exception's text (or "no error")."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the pipe, never return into pytest
        try:
            os.close(r)
            try:
                call()
                text = "no error"
            except BaseException as exc:
                text = f"{type(exc).__name__}[{getattr(exc, 'errno', None)}]: {exc}"
            os.write(w, text.encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        text = pipe.read().decode()
    os.waitpid(pid, 0)
    return text


def test_a_vcpu_used_in_a_fork_child_says_kvm_serves_its_creator(
    vm: kvmstate.Vm, vcpu: kvmstate.Vcpu
) -> None:
    parent = os.getpid()
    for call in (vcpu.get_regs, vcpu.get_nested_state, lambda: vm.create_vcpu(1)):
        text = in_a_fork_child(call)
        assert text.startswith("KvmError[5]: [Errno 5]"), text  # EIO, kept
        assert "only in the process that created it" in text
        assert f"a fork() child of pid {parent}" in text
    text = in_a_fork_child(vcpu.save_state)
    assert re.match(r"(StateError|KvmError)\[5\]", text) and "fork() child" in text, text
    assert vcpu.get_regs().rip == 0xFFF0  # the parent is served as before


def test_eio_for_a_descriptor_wrapped_in_another_process(vcpu: kvmstate.Vcpu) -> None:
    # Wrapped after the fork: the wrapper cannot tell whose VM it is, the message still can.
    text = in_a_fork_child(lambda: kvmstate.Vcpu.borrow(vcpu.fileno()).get_regs())
    assert "KvmError[5]" in text and "not in a fork() child" in text, text


def test_kvm_error_names_eio_for_callers_of_fcntl(vcpu: kvmstate.Vcpu) -> None:
    exc = OSError(errno.EIO, "Input/output error")
    made_here = vcpu.kvm_error(exc, ioctls.KVM_GET_REGS)
    assert made_here.errno == errno.EIO and made_here.ioctl == "KVM_GET_REGS"
    assert "not in a fork() child" in str(made_here)  # made in this process: the general cause
    other = vcpu.kvm_error(OSError(errno.EINVAL, "Invalid argument"), "KVM_RUN")
    assert str(other) == "[Errno 22] KVM_RUN: Invalid argument"  # errno says it all: as is
