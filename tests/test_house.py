"""The house rules of issue 12: one home per name, public names between modules.

These tests pin what the redraw promised callers: old import paths keep
working (the same objects), and the shared helpers behave as documented.
"""

from __future__ import annotations

import enum
import pickle

import pytest

import kvmstate
from kvmstate import errors, state, vmcb, x86
from kvmstate._struct import Mirror, check_uint, to_jsonable
from kvmstate.check import VMX_MSRS
from kvmstate.uapi import NestedFormat, kvm_regs


def test_state_error_lives_in_errors_and_is_exported() -> None:
    assert state.StateError is errors.StateError is kvmstate.StateError
    exc = errors.StateError("regs", OSError(22, "Invalid argument"))
    assert isinstance(exc, kvmstate.KvmError) and exc.errno == 22 and exc.part == "regs"
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is errors.StateError and back.part == "regs" and str(back) == str(exc)


def test_vmcb_keeps_the_architectural_names_it_had() -> None:
    # The same objects, so code that read vmcb.EFER_SVME or vmcb.Cr4 is unchanged.
    assert vmcb.EFER_SVME is x86.EFER_SVME and vmcb.Cr4 is x86.Cr4 and vmcb.Efer is x86.Efer
    assert vmcb.vmcb_save_area._flags_["cr0"] is x86.Cr0


def test_one_feature_control_msr_and_the_vmx_capability_range() -> None:
    assert state.MSR_IA32_FEATURE_CONTROL is x86.MSR_IA32_FEATURE_CONTROL
    # The SDM numbers the VMX capability MSRs 0x480..0x491 with no gap.
    assert sorted(x86.VMX_CAPABILITY_MSRS) == list(range(0x480, 0x492))
    assert set(VMX_MSRS) <= set(x86.VMX_CAPABILITY_MSRS)
    for index, name in VMX_MSRS.items():
        assert x86.VMX_CAPABILITY_MSRS[index] == name


def test_mirror_is_the_public_base_of_every_mirror() -> None:
    assert isinstance(kvm_regs(), Mirror) and isinstance(vmcb.vmcb(), Mirror)
    assert "rip" in kvm_regs().shown_fields()


@pytest.mark.parametrize(
    ("value", "bits", "error"),
    [
        (True, 8, TypeError),
        (1.0, 8, TypeError),
        ("1", 8, TypeError),
        (-1, 8, ValueError),
        (256, 8, ValueError),
        (1 << 64, 64, ValueError),
    ],
)
def test_check_uint_refuses_what_ctypes_would_wrap(value: object, bits: int, error: type) -> None:
    with pytest.raises(error, match="where"):
        check_uint(value, bits, "where")


def test_check_uint_takes_the_whole_range() -> None:
    assert check_uint(0, 8, "x") == 0 and check_uint(255, 8, "x") == 255
    assert check_uint((1 << 64) - 1, 64, "x") == (1 << 64) - 1


def test_to_jsonable_walks_containers() -> None:
    class Colour(enum.IntEnum):
        RED = 3

    given = {"raw": b"\x01\xff", "kind": [NestedFormat.SVM, (Colour.RED, bytearray(b"\x02"))]}
    assert to_jsonable(given) == {"raw": "01ff", "kind": [1, [3, "02"]]}


# --- step 4: one table of parts, save.py, the native format ----------------------------------


def test_every_fixed_part_row_names_ioctls_of_its_own_size() -> None:
    import ctypes

    from kvmstate.ioctls import IOCTL_NAMES

    for name, row in state.PART_TABLE.items():
        assert IOCTL_NAMES[row.get].startswith("KVM_GET_"), name
        assert IOCTL_NAMES[row.set].startswith("KVM_SET_"), name
        if row.codec == "fixed":
            # _IOC's size field (bits 16-29) is the structure the kernel copies.
            assert (row.get >> 16) & 0x3FFF == ctypes.sizeof(row.type), name
            assert (row.set >> 16) & 0x3FFF == ctypes.sizeof(row.type), name
        if row.capability is not None:
            assert isinstance(getattr(kvmstate.uapi, row.capability), int), name
    assert tuple(state.PART_TABLE) == state.PARTS
    assert state.PARTS[0] == "cpuid" and state.PARTS.index("sregs") < state.PARTS.index("nested")


def test_state_save_and_restore_moved_to_save_with_a_warning() -> None:
    from kvmstate import save

    for name in ("save", "restore"):
        with pytest.warns(DeprecationWarning, match=f"kvmstate.save.{name}"):
            moved = getattr(state, name)
        assert moved is getattr(save, name)
    with pytest.raises(AttributeError):
        state.no_such_name  # noqa: B018


def test_snapshot_reexports_the_native_format() -> None:
    from kvmstate import snapshot
    from kvmstate.formats import native

    for name in native.__all__:
        assert getattr(snapshot, name) is getattr(native, name), name
    empty = state.VcpuState(tsc_khz=1000)
    assert snapshot.loads_vcpu(empty.to_bytes()) == empty
    assert native.dumps_vcpu(empty)[12:] != b""  # header, then records


# --- step 5: values handed down at creation ---------------------------------------------------


def _kvm_or_skip() -> kvmstate.Kvm:
    try:
        return kvmstate.Kvm()
    except OSError as exc:
        pytest.skip(f"/dev/kvm cannot be opened: {exc}")


class _NoParent:
    """Stands where a vCPU's VM was: any use of it fails the test."""

    closed = False

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"the vCPU reached back to its VM for {name!r}")


def test_a_vcpu_works_without_reaching_back_to_its_vm() -> None:
    with _kvm_or_skip() as kvm, kvm.create_vm() as vm, vm.create_vcpu(0) as vcpu:
        assert vcpu.msr_index_list == tuple(kvm.get_msr_index_list())
        assert vcpu.nested_state_size == kvm.nested_state_size
        vcpu.vm = _NoParent()
        vcpu.set_cpuid2(kvm.get_supported_cpuid())
        saved = vcpu.save_state()
        vcpu.restore_state(saved)
        assert vcpu.save_state().regs == saved.regs
        assert len(vcpu.kvm_run.to_bytes()) > 0  # mapped with the size handed down
        vcpu.vm = vm  # so that closing is ordinary


def test_a_borrowed_vcpu_still_asks_dev_kvm() -> None:
    with _kvm_or_skip() as kvm, kvm.create_vm() as vm, vm.create_vcpu(0) as vcpu:
        borrowed = kvmstate.Vcpu.borrow(vcpu.fileno())
        assert borrowed.nested_state_size == kvm.nested_state_size
        assert borrowed.msr_index_list is None  # so save_state says a Kvm is needed
        with pytest.raises(ValueError, match="borrowed"):
            borrowed.save_state()
        borrowed.close()
        assert not vcpu.closed
