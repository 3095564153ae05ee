"""Real SVM nested state, inside the emulated AMD guest (kvm_amd nested=1).

Marked ``svm_guest``: on a host with QEMU these run inside the guest
through tests/guest/run (one boot per kernel series); elsewhere they skip.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import struct
from collections.abc import Iterator

import pytest

import kvmstate
from kvmstate import ioctls, uapi, vmcb
from kvmstate.nested import HEADER_SIZE, SVM_MAX_SIZE, NestedState
from kvmstate.uapi import NestedFlag, NestedFormat
from tests.support import states

pytestmark = pytest.mark.svm_guest

VMCB_PA, IOPM_PA, MSRPM_PA = 0x10000, 0x20000, 0x30000


@pytest.fixture
def svm_kvm() -> Iterator[kvmstate.Kvm]:
    with kvmstate.Kvm() as kvm:
        yield kvm


@pytest.fixture
def new_vcpu(svm_kvm: kvmstate.Kvm) -> Iterator[object]:
    """Makes vCPUs with CPUID (SVM included) and, unless told not to, EFER.SVME set."""
    opened: list[kvmstate.Vcpu | kvmstate.Vm] = []

    def make(svme: bool = True) -> kvmstate.Vcpu:
        vm = svm_kvm.create_vm()
        vcpu = vm.create_vcpu(0)
        opened.extend((vm, vcpu))
        vcpu.set_cpuid2(svm_kvm.get_supported_cpuid())
        if svme:
            sregs = vcpu.get_sregs()
            sregs.efer |= vmcb.EFER_SVME
            vcpu.set_sregs(sregs)
        return vcpu

    yield make
    for fd in reversed(opened):
        fd.close()


def guest_mode_state() -> NestedState:
    """A valid guest-mode state, built by name (tests/support/states.py), L2 at 0x1000."""
    return states.svm_guest(rip=0x1000, rsp=0x8000)


def test_capability_is_amds(svm_kvm: kvmstate.Kvm) -> None:
    assert svm_kvm.nested_state_size == SVM_MAX_SIZE == 4224


def test_fresh_vcpu_is_header_only_with_gif(new_vcpu: object) -> None:
    vcpu = new_vcpu(svme=False)  # type: ignore[operator]
    state = vcpu.get_nested_state()
    assert state.format is NestedFormat.SVM
    assert state.flags == NestedFlag.GIF_SET
    assert state.size == HEADER_SIZE
    assert state.vmcb12 is None  # header-only state is kept, not turned into None
    assert len(state.to_bytes()) == HEADER_SIZE
    vcpu.set_nested_state(state)  # and it is a state the kernel takes back


def test_guest_mode_state_by_name_round_trips(new_vcpu: object) -> None:
    vcpu = new_vcpu()  # type: ignore[operator]
    wanted = guest_mode_state()
    vcpu.set_nested_state(wanted)
    got = vcpu.get_nested_state()
    assert got.flags == NestedFlag.GUEST_MODE | NestedFlag.GIF_SET
    assert got.size == SVM_MAX_SIZE and got.svm.vmcb_pa == VMCB_PA
    c, w = got.vmcb12.control, wanted.vmcb12.control
    assert c.is_intercept(vmcb.INTERCEPT_VMRUN)
    for name in ("asid", "iopm_base_pa", "msrpm_base_pa"):
        assert getattr(c, name) == getattr(w, name), name
    s, ws = got.vmcb12.save, wanted.vmcb12.save
    for name in ("efer", "cr0", "rflags", "rip", "rsp"):
        assert getattr(s, name) == getattr(ws, name), name


def test_state_carried_as_bytes_into_a_fresh_vcpu(new_vcpu: object) -> None:
    first = new_vcpu()  # type: ignore[operator]
    first.set_nested_state(guest_mode_state())
    saved = first.get_nested_state()
    blob = saved.to_bytes()
    assert len(blob) == SVM_MAX_SIZE

    second = new_vcpu()  # type: ignore[operator]  # CPUID and sregs first, as QEMU does
    second.set_nested_state(NestedState.from_bytes(blob))
    assert second.get_nested_state() == saved


def test_whole_vcpu_state_with_guest_mode_round_trips(new_vcpu: object) -> None:
    first = new_vcpu()  # type: ignore[operator]
    first.set_nested_state(guest_mode_state())
    saved = first.save_state()
    assert saved.nested is not None and saved.nested.flags & NestedFlag.GUEST_MODE
    carried = kvmstate.state.VcpuState.from_bytes(saved.to_bytes())
    second = new_vcpu(svme=False)  # type: ignore[operator]  # restore_state sets sregs first
    second.restore_state(carried)
    again = second.save_state()
    assert again.nested == saved.nested
    assert again.sregs is not None and again.sregs.efer & vmcb.EFER_SVME


def test_set_without_svme_refuses_guest_mode(new_vcpu: object) -> None:
    vcpu = new_vcpu(svme=False)  # type: ignore[operator]
    with pytest.raises(kvmstate.KvmError) as info:
        vcpu.set_nested_state(guest_mode_state())
    assert info.value.errno == errno.EINVAL


@pytest.mark.parametrize("declared", [0, HEADER_SIZE, 200, SVM_MAX_SIZE - 8])
def test_short_size_in_a_caller_buffer_still_gives_the_whole_state(
    new_vcpu: object, declared: int
) -> None:
    vcpu = new_vcpu()  # type: ignore[operator]
    vcpu.set_nested_state(guest_mode_state())
    guard = 4096
    backing = bytearray(b"\xa5" * (SVM_MAX_SIZE + guard))
    struct.pack_into("<I", backing, 4, declared)  # a hostile size field
    view = memoryview(backing)[:SVM_MAX_SIZE]
    state = vcpu.get_nested_state(view)
    assert state.size == SVM_MAX_SIZE and state.flags & NestedFlag.GUEST_MODE
    assert state.vmcb12.control.asid == 1
    assert backing[SVM_MAX_SIZE:] == b"\xa5" * guard  # nothing written past the buffer


def test_short_size_in_a_reused_state_still_gives_the_whole_state(new_vcpu: object) -> None:
    vcpu = new_vcpu()  # type: ignore[operator]
    vcpu.set_nested_state(guest_mode_state())
    reused = NestedState(SVM_MAX_SIZE)
    reused.size = HEADER_SIZE
    assert vcpu.get_nested_state(reused) is reused
    assert reused.size == SVM_MAX_SIZE and reused.vmcb12 is not None


def test_a_borrowed_vcpu_told_a_short_size_still_gets_a_whole_buffer(
    new_vcpu: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Told 128 bytes, a borrowed vCPU still hands the kernel KVM_CAP_NESTED_STATE's 4224."""
    vcpu = new_vcpu()  # type: ignore[operator]
    vcpu.set_nested_state(guest_mode_state())
    lengths: list[int] = []
    real = fcntl.ioctl

    def spy(fd: int, request: int, arg: object = 0, *rest: object) -> object:
        if request == ioctls.KVM_GET_NESTED_STATE:
            lengths.append(memoryview(arg).nbytes)  # type: ignore[arg-type]
        return real(fd, request, arg, *rest)  # type: ignore[call-overload]

    monkeypatch.setattr(fcntl, "ioctl", spy)
    borrowed = kvmstate.Vcpu.borrow(vcpu.fileno(), nested_state_size=HEADER_SIZE)
    assert borrowed.nested_state_size == SVM_MAX_SIZE  # raised to /dev/kvm's answer
    state = borrowed.get_nested_state()
    assert lengths == [SVM_MAX_SIZE]
    assert state.size == SVM_MAX_SIZE and state.vmcb12 is not None


def test_the_kernel_hazard_is_real(new_vcpu: object) -> None:
    """Raw ioctl, size=128, guest mode: the kernel writes vmcb12 past 128 bytes, then E2BIG.

    This is why the library never hands the kernel a buffer shorter than
    KVM_CAP_NESTED_STATE: here the buffer is large, so the overrun is seen,
    not suffered.
    """
    vcpu = new_vcpu()  # type: ignore[operator]
    vcpu.set_nested_state(guest_mode_state())
    buf = (ctypes.c_uint8 * (SVM_MAX_SIZE + 4096))(*([0xA5] * (SVM_MAX_SIZE + 4096)))
    struct.pack_into("<I", buf, 4, HEADER_SIZE)
    with pytest.raises(OSError) as info:
        fcntl.ioctl(vcpu.fileno(), ioctls.KVM_GET_NESTED_STATE, buf)
    assert info.value.errno == errno.E2BIG
    assert struct.unpack_from("<I", buf, 4)[0] == SVM_MAX_SIZE  # the size it wanted
    written = bytes(buf[HEADER_SIZE:SVM_MAX_SIZE])
    assert written != b"\xa5" * len(written)  # vmcb12 landed beyond the declared 128 bytes
    assert bytes(buf[SVM_MAX_SIZE:]) == b"\xa5" * 4096


def test_blob_declaring_a_short_size_is_refused_before_the_kernel(new_vcpu: object) -> None:
    vcpu = new_vcpu()  # type: ignore[operator]
    blob = bytearray(guest_mode_state().to_bytes())
    struct.pack_into("<I", blob, 4, HEADER_SIZE)
    with pytest.raises(ValueError):
        kvmstate.NestedState.from_bytes(blob)  # size disagrees with the blob
    # Handed to set as raw bytes, size=128 with GUEST_MODE is the kernel's to refuse.
    with pytest.raises(kvmstate.KvmError) as info:
        vcpu.set_nested_state(bytes(blob))
    assert info.value.errno == errno.EINVAL


def test_uapi_layout_matches_what_the_kernel_writes(new_vcpu: object) -> None:
    vcpu = new_vcpu()  # type: ignore[operator]
    vcpu.set_nested_state(guest_mode_state())
    raw = vcpu.get_nested_state().to_bytes()
    flags, fmt, size, vmcb_pa = struct.unpack_from("<HHIQ", raw)
    assert (flags, fmt, size, vmcb_pa) == (0x101, uapi.KVM_STATE_NESTED_FORMAT_SVM, 4224, VMCB_PA)
    asid_at = HEADER_SIZE + vmcb.vmcb_control_area.asid.offset
    assert struct.unpack_from("<I", raw, asid_at)[0] == 1


def test_a_refusal_says_which_rule_was_broken(new_vcpu: object) -> None:
    vcpu = new_vcpu()  # type: ignore[operator]
    state = guest_mode_state()
    state.vmcb12.control.asid = 0
    with pytest.raises(kvmstate.NestedStateRejectedError) as info:
        vcpu.set_nested_state(state)
    err = info.value
    assert err.errno == errno.EINVAL and err.ioctl == "KVM_SET_NESTED_STATE"
    assert any(p.field == "vmcb12.control.asid" and p.certain for p in err.problems)
    assert "asid" in str(err) and "nested_vmcb_check_controls" in str(err)


def in_guest_mode(new_vcpu: object) -> kvmstate.Vcpu:
    vcpu: kvmstate.Vcpu = new_vcpu()  # type: ignore[operator]
    vcpu.set_nested_state(guest_mode_state())
    return vcpu


def kernel_bytes(vcpu: kvmstate.Vcpu) -> bytes:
    """The state as a bare fcntl.ioctl gets it, into a buffer of its own."""
    buf = (ctypes.c_uint64 * (SVM_MAX_SIZE // 8))()
    struct.pack_into("<I", buf, 4, SVM_MAX_SIZE)
    fcntl.ioctl(vcpu.fileno(), ioctls.KVM_GET_NESTED_STATE, buf)
    return bytes(buf)[: struct.unpack_from("<I", buf, 4)[0]]


@pytest.mark.parametrize(
    "make",
    [
        lambda: bytearray(SVM_MAX_SIZE),
        lambda: (ctypes.c_uint64 * (SVM_MAX_SIZE // 8))(),
        lambda: (ctypes.c_uint8 * (SVM_MAX_SIZE + 64))(),
    ],
    ids=["bytearray", "ctypes-u64", "ctypes-u8-larger"],
)
def test_a_caller_buffer_holds_the_kernel_bytes_call_after_call(
    new_vcpu: object, make: object
) -> None:
    vcpu = in_guest_mode(new_vcpu)
    buf = make()  # type: ignore[operator]
    first = vcpu.get_nested_state(buf)
    assert first.source is buf and first.capacity == len(memoryview(buf).cast("B"))
    struct.pack_into("<I", buf, 4, 0)  # a stale size: the reused view must write it again
    again = vcpu.get_nested_state(buf)
    assert again.source is buf and again.size == SVM_MAX_SIZE
    assert bytes(memoryview(buf).cast("B"))[:SVM_MAX_SIZE] == kernel_bytes(vcpu)
    other = make()  # type: ignore[operator]
    assert vcpu.get_nested_state(other).source is other  # another buffer, another view


def test_a_dropped_view_is_not_kept(new_vcpu: object) -> None:
    vcpu = in_guest_mode(new_vcpu)
    buf = bytearray(SVM_MAX_SIZE)
    vcpu.get_nested_state(buf)  # the view is dropped at once: nothing holds the export
    buf.extend(b"\0" * 8)  # a bytearray with a live export could not grow
    state = vcpu.get_nested_state(buf)
    assert state.capacity == SVM_MAX_SIZE + 8 and state.size == SVM_MAX_SIZE


def test_a_resized_ctypes_array_is_bound_again(new_vcpu: object) -> None:
    vcpu = in_guest_mode(new_vcpu)
    buf = (ctypes.c_uint64 * (SVM_MAX_SIZE // 8))()
    first = vcpu.get_nested_state(buf)
    ctypes.resize(buf, SVM_MAX_SIZE + 4096)  # may move the memory the view points at
    again = vcpu.get_nested_state(buf)
    assert ctypes.addressof(again.header) == ctypes.addressof(buf)
    assert again.capacity == SVM_MAX_SIZE + 4096
    assert again is not first
    assert again.to_bytes() == kernel_bytes(vcpu)


def test_set_after_get_into_the_same_buffer(new_vcpu: object) -> None:
    vcpu = in_guest_mode(new_vcpu)
    buf = bytearray(SVM_MAX_SIZE)
    state = vcpu.get_nested_state(buf)
    target = new_vcpu()  # type: ignore[operator]
    target.set_nested_state(state)
    assert kernel_bytes(target) == kernel_bytes(vcpu)


def test_the_same_buffer_gets_the_same_view_back(new_vcpu: object) -> None:
    # get_nested_state's documented reuse: a ctypes array's view is kept, another
    # buffer's while the caller holds it; each call still gets the kernel's bytes.
    vcpu = in_guest_mode(new_vcpu)
    array = (ctypes.c_uint64 * (SVM_MAX_SIZE // 8))()
    first = vcpu.get_nested_state(array)
    struct.pack_into("<I", array, 4, 0)  # a stale size: the kept view must write it again
    assert vcpu.get_nested_state(array) is first
    assert first.to_bytes() == kernel_bytes(vcpu)
    buf = bytearray(SVM_MAX_SIZE)
    held = vcpu.get_nested_state(buf)
    assert vcpu.get_nested_state(buf) is held
    assert held.source is buf and held.to_bytes() == kernel_bytes(vcpu)
