"""NestedState offline, and the buffer rules of get/set against the real kernel.

The buffer-safety tests wrap ``fcntl.ioctl`` in a recorder that still makes
the real call: it notes, at the moment of each nested ioctl, how long the
buffer handed to the kernel is and what its ``size`` field says.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import pickle
import struct
from collections.abc import Iterator
from typing import Any

import pytest

import kvmstate
from kvmstate import _fd, ioctls, uapi
from kvmstate.nested import HEADER_SIZE, SVM_MAX_SIZE, VMX_MAX_SIZE, NestedState

GET, SET = ioctls.KVM_GET_NESTED_STATE, ioctls.KVM_SET_NESTED_STATE


def svm_guest_state() -> NestedState:
    state = NestedState(SVM_MAX_SIZE)
    state.format = uapi.KVM_STATE_NESTED_FORMAT_SVM
    state.flags = uapi.NestedFlag.GUEST_MODE | uapi.NestedFlag.GIF_SET
    state.size = SVM_MAX_SIZE
    state.svm.vmcb_pa = 0x10000
    return state


def vmx_state(size: int = VMX_MAX_SIZE) -> NestedState:
    state = NestedState(VMX_MAX_SIZE)
    state.format = uapi.KVM_STATE_NESTED_FORMAT_VMX
    state.size = size
    state.vmx.vmxon_pa = 0x3000
    state.vmx.vmcs12_pa = 0x4000
    return state


# --- offline behaviour ----------------------------------------------------------


def test_default_buffer_fits_any_state_and_is_aligned() -> None:
    state = NestedState()
    assert state.capacity == VMX_MAX_SIZE == 128 + 2 * 4096
    assert ctypes.addressof(state._storage) % 8 == 0


def test_explicit_capacity() -> None:
    assert NestedState(SVM_MAX_SIZE).capacity == SVM_MAX_SIZE
    assert NestedState(130).capacity == 136  # whole 64-bit words
    with pytest.raises(ValueError, match="below the 128-byte header"):
        NestedState(127)
    with pytest.raises(TypeError):
        NestedState("4224")  # type: ignore[arg-type]


def test_header_fields_by_name_land_at_the_kernel_offsets() -> None:
    state = svm_guest_state()
    raw = state.to_bytes()
    flags, fmt, size, vmcb_pa = struct.unpack_from("<HHIQ", raw)
    assert (flags, fmt, size, vmcb_pa) == (0x101, 1, SVM_MAX_SIZE, 0x10000)
    assert state.flags == uapi.NestedFlag.GUEST_MODE | uapi.NestedFlag.GIF_SET
    assert state.format is uapi.NestedFormat.SVM


def test_data_views_only_where_size_and_format_cover_them() -> None:
    svm = svm_guest_state()
    assert svm.vmcb12 is not None and svm.vmcs12 is None and svm.shadow_vmcs12 is None
    svm.size = HEADER_SIZE
    assert svm.vmcb12 is None
    vmx = vmx_state(HEADER_SIZE + 4096)
    assert vmx.vmcs12 is not None and vmx.shadow_vmcs12 is None and vmx.vmcb12 is None
    vmx.size = VMX_MAX_SIZE
    assert vmx.shadow_vmcs12 is not None
    small = NestedState(SVM_MAX_SIZE)
    small.size = VMX_MAX_SIZE  # claims more than the buffer holds
    assert small.shadow_vmcs12 is None


def test_vmcb12_fields_by_name_land_at_the_architectural_offsets() -> None:
    state = svm_guest_state()
    vmcb = state.vmcb12
    vmcb.control.asid = 7
    vmcb.save.rip = 0x1234
    raw = state.to_bytes()
    asid = 128 + type(vmcb.control).asid.offset
    rip = 128 + type(vmcb).save.offset + type(vmcb.save).rip.offset
    assert raw[asid : asid + 4] == (7).to_bytes(4, "little")
    assert raw[rip : rip + 8] == (0x1234).to_bytes(8, "little")
    assert type(vmcb).save.offset == 0x400  # the save area follows the 1 KiB control area


def test_data_views_write_into_the_buffer() -> None:
    state = vmx_state()
    state.vmcs12.hdr.revision_id = 0x11E57ED0
    state.vmcs12.guest_rip = 0xFFF0
    state.shadow_vmcs12.hdr.shadow_vmcs = 1
    memoryview(state.shadow_vmcs12).cast("B")[4095] = 0xAA  # also a writable byte view
    raw = state.to_bytes()
    assert raw[128:132] == (0x11E57ED0).to_bytes(4, "little")
    guest_rip = 128 + type(state.vmcs12).guest_rip.offset
    assert raw[guest_rip : guest_rip + 8] == (0xFFF0).to_bytes(8, "little")
    assert raw[128 + 4096 + 3] & 0x80  # shadow_vmcs is bit 31 of the header word
    assert raw[-1] == 0xAA


def test_to_bytes_is_exactly_size_bytes() -> None:
    state = svm_guest_state()
    assert len(state.to_bytes()) == SVM_MAX_SIZE
    state.size = HEADER_SIZE
    assert len(state.to_bytes()) == HEADER_SIZE == len(state)
    state.size = SVM_MAX_SIZE + 8
    with pytest.raises(ValueError, match="between 128 and the buffer"):
        state.to_bytes()


def test_from_bytes_round_trip_and_equality() -> None:
    state = svm_guest_state()
    state.vmcb12.control.asid = 1
    back = NestedState.from_bytes(state.to_bytes())
    assert back == state and back.capacity == SVM_MAX_SIZE
    assert back.vmcb12.control.asid == 1
    back.vmcb12.control.asid = 2
    assert back != state
    assert NestedState.from_bytes(bytearray(state.to_bytes())) == state
    assert NestedState.from_bytes(memoryview(state.to_bytes())) == state


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (b"\0" * 100, "truncated nested state: 100 bytes"),
        (struct.pack("<HHI", 0, 7, 128) + bytes(120), "unknown nested state format 7"),
        (
            struct.pack("<HHI", 0, 1, 4224) + bytes(120),
            "size field says 4224 bytes but the blob has 128",
        ),
        (
            struct.pack("<HHI", 0, 0, 128) + bytes(320),
            "size field says 128 bytes but the blob has 328",
        ),
    ],
    ids=["truncated", "unknown-format", "size-beyond-blob", "trailing-bytes"],
)
def test_from_bytes_refuses_bad_blobs(blob: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NestedState.from_bytes(blob)


def test_from_bytes_needs_bytes_like() -> None:
    with pytest.raises(TypeError, match="bytes-like"):
        NestedState.from_bytes("abc")  # type: ignore[arg-type]


def test_from_buffer_is_a_zero_copy_view() -> None:
    backing = bytearray(SVM_MAX_SIZE)
    state = NestedState.from_buffer(backing)
    state.format = 1
    state.size = SVM_MAX_SIZE
    assert struct.unpack_from("<HHI", backing) == (0, 1, SVM_MAX_SIZE)
    with pytest.raises(BufferError):
        backing.extend(b"x")  # exported: cannot move under the view


@pytest.mark.parametrize(
    ("buffer", "error", "message"),
    [
        (bytes(8320), TypeError, "read-only"),
        (bytearray(100), ValueError, "below the 128-byte header"),
        (memoryview(bytearray(8328))[1:8321], ValueError, "not 8-byte aligned"),
        (memoryview(bytearray(8320 * 2))[::2], ValueError, "not C-contiguous"),
        (12345, TypeError, "buffer protocol"),
    ],
    ids=["read-only", "short", "misaligned", "strided", "not-a-buffer"],
)
def test_from_buffer_refuses_unusable_buffers(
    buffer: Any, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        NestedState.from_buffer(buffer)


def test_copy_is_independent() -> None:
    state = svm_guest_state()
    twin = state.copy()
    twin.svm.vmcb_pa = 0x20000
    assert state.svm.vmcb_pa == 0x10000 and twin != state


def test_pickle_round_trip() -> None:
    state = vmx_state(HEADER_SIZE + 4096)
    assert pickle.loads(pickle.dumps(state)) == state


def test_repr_reads_well() -> None:
    text = repr(svm_guest_state())
    assert text == "NestedState(format=SVM, flags=GUEST_MODE|GIF_SET, size=4224, vmcb_pa=0x10000)"
    vmx = vmx_state(HEADER_SIZE)
    vmx.vmx.flags = uapi.KVM_STATE_VMX_PREEMPTION_TIMER_DEADLINE
    vmx.vmx.preemption_timer_deadline = 0x1234
    assert repr(vmx) == (
        "NestedState(format=VMX, flags=0, size=128, vmxon_pa=0x3000, vmcs12_pa=0x4000, "
        "vmx.flags=PREEMPTION_TIMER_DEADLINE, preemption_timer_deadline=0x1234, capacity=8320)"
    )


def test_setters_refuse_out_of_range() -> None:
    state = NestedState()
    with pytest.raises(ValueError, match="does not fit in 16 bits"):
        state.flags = 1 << 16
    with pytest.raises(TypeError):
        state.size = 1.5  # type: ignore[assignment]


# --- the buffer handed to the kernel ---------------------------------------------


class Recorder:
    """Records each nested ioctl's buffer length and size field, then makes the real call."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, int]] = []
        self.real = fcntl.ioctl

    def __call__(self, fd: int, request: int, arg: Any = 0) -> Any:
        if request in (GET, SET):
            view = memoryview(arg).cast("B")
            size = struct.unpack_from("<I", view, 4)[0]
            self.calls.append((request, view.nbytes, size))
        return self.real(fd, request, arg)


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Iterator[Recorder]:
    rec = Recorder()
    monkeypatch.setattr(_fd.fcntl, "ioctl", rec)
    yield rec


def assert_size_within_buffer(rec: Recorder) -> None:
    assert rec.calls, "no nested ioctl reached the kernel"
    for _, length, size in rec.calls:
        assert size <= length


@pytest.fixture
def amd_sized_vcpu(vcpu: kvmstate.Vcpu) -> Iterator[kvmstate.Vcpu]:
    """The real vCPU fd, told that KVM_CAP_NESTED_STATE is AMD's 4224."""
    borrowed = kvmstate.Vcpu.borrow(vcpu.fileno(), nested_state_size=SVM_MAX_SIZE)
    yield borrowed
    borrowed.close()


def get_as_this_kvm_answers(vcpu: kvmstate.Vcpu, *buffer: Any) -> None:
    """GET a fresh vCPU's nested state: a KVM without nesting (KVM_CAP_NESTED_STATE 0)
    answers EINVAL; kvm_amd and kvm_intel answer with their 128-byte header-only state."""
    with kvmstate.Kvm() as kvm:
        has_nesting = kvm.nested_state_size != 0
    try:
        state = vcpu.get_nested_state(*buffer)
    except kvmstate.KvmError as exc:
        assert not has_nesting and exc.errno == errno.EINVAL, exc
    else:
        assert has_nesting and state.size == HEADER_SIZE, state


@pytest.mark.parametrize("hostile_size", [0, 1, 127, 4096, 8320, 1 << 20, 0xFFFF_FFFF])
def test_get_overwrites_a_hostile_size_in_a_caller_buffer(
    amd_sized_vcpu: kvmstate.Vcpu, recorder: Recorder, hostile_size: int
) -> None:
    backing = bytearray(SVM_MAX_SIZE)
    struct.pack_into("<I", backing, 4, hostile_size)
    get_as_this_kvm_answers(amd_sized_vcpu, backing)
    assert recorder.calls == [(GET, SVM_MAX_SIZE, SVM_MAX_SIZE)]


def test_get_reuses_a_nested_state_and_resets_its_size(
    amd_sized_vcpu: kvmstate.Vcpu, recorder: Recorder
) -> None:
    state = NestedState(VMX_MAX_SIZE)
    state.size = 0xFFFF_FFFF
    get_as_this_kvm_answers(amd_sized_vcpu, state)
    assert recorder.calls == [(GET, VMX_MAX_SIZE, VMX_MAX_SIZE)]


def test_get_refuses_a_buffer_below_the_capability(
    amd_sized_vcpu: kvmstate.Vcpu, recorder: Recorder
) -> None:
    with pytest.raises(ValueError, match="KVM_CAP_NESTED_STATE says the kernel may write 4224"):
        amd_sized_vcpu.get_nested_state(bytearray(SVM_MAX_SIZE - 8))
    with pytest.raises(ValueError, match="below the 128-byte header"):
        amd_sized_vcpu.get_nested_state(bytearray(64))
    with pytest.raises(TypeError, match="read-only"):
        amd_sized_vcpu.get_nested_state(bytes(SVM_MAX_SIZE))
    assert recorder.calls == []


def test_fresh_get_buffer_is_the_capability_size(
    amd_sized_vcpu: kvmstate.Vcpu, recorder: Recorder
) -> None:
    get_as_this_kvm_answers(amd_sized_vcpu)
    assert recorder.calls == [(GET, SVM_MAX_SIZE, SVM_MAX_SIZE)]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: setattr(s, "size", 100), "below the 128-byte header"),
        (lambda s: setattr(s, "size", SVM_MAX_SIZE + 1), "larger than the 4224-byte buffer"),
        (lambda s: setattr(s, "flags", 0x10), "unknown bits 0x10"),
        (lambda s: setattr(s, "flags", uapi.KVM_STATE_NESTED_RUN_PENDING), "RUN_PENDING without"),
        (lambda s: setattr(s, "format", 2), "unknown format 2"),
    ],
    ids=["size-short", "size-beyond", "unknown-flag", "run-pending-alone", "unknown-format"],
)
def test_set_refuses_what_the_kernel_surely_refuses(
    amd_sized_vcpu: kvmstate.Vcpu, recorder: Recorder, mutate: Any, message: str
) -> None:
    state = svm_guest_state()
    mutate(state)
    with pytest.raises(ValueError, match=message):
        amd_sized_vcpu.set_nested_state(state)
    blob = bytes(state.buffer)
    with pytest.raises(ValueError, match=message):
        amd_sized_vcpu.set_nested_state(blob)
    assert recorder.calls == []


def test_set_from_a_blob_whose_size_exceeds_it(
    amd_sized_vcpu: kvmstate.Vcpu, recorder: Recorder
) -> None:
    blob = bytearray(svm_guest_state().to_bytes()[:HEADER_SIZE])  # header says 4224
    with pytest.raises(ValueError, match="larger than the 128-byte buffer"):
        amd_sized_vcpu.set_nested_state(blob)
    assert recorder.calls == []


def test_set_hands_the_kernel_at_most_its_buffer(
    amd_sized_vcpu: kvmstate.Vcpu, recorder: Recorder
) -> None:
    for state in (
        svm_guest_state(),
        svm_guest_state().to_bytes(),
        bytearray(vmx_state().to_bytes()),
    ):
        with pytest.raises(OSError):
            amd_sized_vcpu.set_nested_state(state)
    assert len(recorder.calls) == 3
    assert_size_within_buffer(recorder)


def test_set_refuses_non_buffers(amd_sized_vcpu: kvmstate.Vcpu) -> None:
    with pytest.raises(TypeError, match="NestedState or bytes-like"):
        amd_sized_vcpu.set_nested_state(42)
    with pytest.raises(ValueError, match="shorter than the 128-byte header"):
        amd_sized_vcpu.set_nested_state(b"\0" * 64)


def test_a_closed_vcpu_refuses_every_buffer_it_had_bound(kvm: kvmstate.Kvm) -> None:
    vm = kvm.create_vm()
    vcpu = vm.create_vcpu(0)
    reused = NestedState(max(kvm.nested_state_size, HEADER_SIZE))
    kept = (ctypes.c_uint64 * (VMX_MAX_SIZE // 8))()
    for buffer in (reused, kept):  # the first calls learn the floor and bind the array
        try:
            vcpu.get_nested_state(buffer)
        except kvmstate.KvmError as exc:  # no nesting here: the kernel's EINVAL
            assert exc.errno == errno.EINVAL
    vcpu.close()
    vm.close()
    for buffer in (reused, kept):
        with pytest.raises(ValueError, match="closed Vcpu"):
            vcpu.get_nested_state(buffer)
    reused.size = HEADER_SIZE  # a header set_nested_state's own checks pass
    with pytest.raises(ValueError, match="closed Vcpu"):
        vcpu.set_nested_state(reused)
