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
