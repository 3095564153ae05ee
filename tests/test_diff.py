"""kvmstate.diff: differences between nested states and mirrors, by field name."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmstate import uapi
from kvmstate import vmcb as svm
from kvmstate import vmcs12 as vmx
from kvmstate.diff import ABSENT, Difference, Differences, diff, diff_structs
from kvmstate.nested import SVM_MAX_SIZE, VMX_MAX_SIZE, NestedState
from kvmstate.uapi import NestedFlag, NestedFormat


def svm_state(size: int = SVM_MAX_SIZE) -> NestedState:
    state = NestedState(SVM_MAX_SIZE)
    state.format = NestedFormat.SVM
    state.size = size
    state.flags = NestedFlag.GIF_SET | (NestedFlag.GUEST_MODE if size > 128 else 0)
    state.svm.vmcb_pa = 0x10000 if size > 128 else 0
    return state


def vmx_state(size: int = 4224) -> NestedState:
    state = NestedState(VMX_MAX_SIZE)
    state.format = NestedFormat.VMX
    state.size = size
    state.vmx.vmxon_pa = 0x3000
    state.vmx.vmcs12_pa = 0x4000
    if state.vmcs12 is not None:
        state.vmcs12.hdr.revision_id = vmx.VMCS12_REVISION
    return state


def test_equal_states() -> None:
    found = diff(svm_state(), svm_state())
    assert found == [] and isinstance(found, Differences)
    assert repr(found) == "Differences(0): equal"


def test_fields_by_name_with_decoded_values() -> None:
    a, b = svm_state(), svm_state()
    assert b.vmcb12 is not None
    b.flags = NestedFlag.GUEST_MODE
    b.vmcb12.control.asid = 7
    b.vmcb12.save.efer = svm.EFER_SVME | svm.EFER_LME
    found = diff(a, b)
    assert [str(d) for d in found] == [
        "flags: GUEST_MODE|GIF_SET -> GUEST_MODE",
        "vmcb12.control.asid: 0 -> 7",
        "vmcb12.save.efer: 0 -> LME|SVME",
    ]
    assert found.paths() == ["flags", "vmcb12.control.asid", "vmcb12.save.efer"]
    assert repr(found).splitlines() == [
        "Differences(3):",
        "  flags: GUEST_MODE|GIF_SET -> GUEST_MODE",
        "  vmcb12.control.asid: 0 -> 7",
        "  vmcb12.save.efer: 0 -> LME|SVME",
    ]
    assert repr(found[1]) == "Difference(vmcb12.control.asid: 0 -> 7)"


def test_size_and_format_come_first() -> None:
    found = diff(svm_state(), vmx_state(VMX_MAX_SIZE))
    assert found.paths()[:2] == ["size", "format"]
    assert str(found[1]) == "format: SVM -> VMX"


def test_a_missing_page_is_one_difference() -> None:
    found = diff(svm_state(128), svm_state())
    assert found.paths() == ["size", "flags", "hdr.svm.vmcb_pa", "vmcb12"]
    page = found[-1]
    assert (page.a, page.a_text, page.b_text) == (None, ABSENT, "present")
    shadow = diff(vmx_state(VMX_MAX_SIZE), vmx_state(4224))
    assert shadow.paths() == ["size", "shadow_vmcs12"]
    assert shadow[-1].b_text == ABSENT


def test_vendor_headers_of_other_formats_are_one_difference_each() -> None:
    found = diff(svm_state(128), vmx_state(128))
    assert found.paths() == ["format", "flags", "hdr.svm", "hdr.vmx"]


def test_vmcs12_fields_by_name() -> None:
    a, b = vmx_state(), vmx_state()
    assert b.vmcs12 is not None
    b.vmcs12.cpu_based_vm_exec_control = vmx.CPU_BASED_HLT_EXITING
    b.vmcs12.guest_rip = 0x1234
    assert [str(d) for d in diff(a, b)] == [
        "vmcs12.guest_rip: 0 -> 0x1234",
        "vmcs12.cpu_based_vm_exec_control: 0 -> HLT_EXITING",
    ]


def test_reserved_fields_and_uncovered_bytes_count() -> None:
    a, b = svm_state(), svm_state()
    assert b.vmcb12 is not None
    b.vmcb12.control.reserved_8[3] = 1
    assert diff(a, b).paths() == ["vmcb12.control.reserved_8"]
    c = svm_state()
    c.header.hdr.pad[100] = 9  # past every vendor header field
    (only,) = diff(a, c)
    assert only.path == "bytes[0x6c:0x6d]" and (only.a_text, only.b_text) == ("00", "09")


def test_json_ready() -> None:
    a, b = svm_state(), svm_state()
    assert b.vmcb12 is not None
    b.vmcb12.control.reserved_8[0] = 0xAB
    b.flags = 0
    data = diff(a, b).to_list()
    assert json.loads(json.dumps(data)) == data
    assert data[0] == {
        "path": "flags",
        "a": 0x101,
        "b": 0,
        "a_text": "GUEST_MODE|GIF_SET",
        "b_text": "0",
    }
    assert data[1]["b"].startswith("ab")


def test_diff_structs() -> None:
    a, b = svm.vmcb_save_area(), svm.vmcb_save_area()
    b.cs.attrib = svm.SVM_SELECTOR_P_MASK | svm.SVM_SELECTOR_L_MASK
    b.rip = 0xFFF0
    assert [str(d) for d in diff_structs(a, b)] == ["cs.attrib: 0 -> P|L", "rip: 0 -> 0xfff0"]
    assert diff_structs(a, svm.vmcb_save_area()) == []
    sregs_a, sregs_b = uapi.kvm_sregs(), uapi.kvm_sregs()
    sregs_b.interrupt_bitmap[2] = 1
    assert diff_structs(sregs_a, sregs_b).paths() == ["interrupt_bitmap[2]"]


def test_wrong_types_are_refused() -> None:
    with pytest.raises(TypeError, match="one type"):
        diff_structs(svm.vmcb_save_area(), svm.vmcb_control_area())
    with pytest.raises(TypeError, match="one type"):
        diff_structs(1, 1)
    with pytest.raises(TypeError, match="two NestedState"):
        diff(svm_state(), svm_state().to_bytes())  # type: ignore[arg-type]


def test_difference_is_a_value() -> None:
    d = Difference("size", 128, 4224, "128", "4224")
    assert d == Difference("size", 128, 4224, "128", "4224")
    assert str(d) == "size: 128 -> 4224"


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["svm", "vmx"]),
    st.lists(st.tuples(st.integers(0, 4223), st.integers(0, 255)), max_size=12),
)
def test_empty_exactly_when_the_bytes_are_equal(kind: str, pokes: list[tuple[int, int]]) -> None:
    a = svm_state() if kind == "svm" else vmx_state()
    b = a.copy()
    for offset, byte in pokes:
        if offset >= 8:  # leave flags/format/size alone: they change what the bytes mean
            b.buffer[offset] = byte
    assert (diff(a, b) == []) == (a.to_bytes() == b.to_bytes())
    assert (diff(b, a) == []) == (diff(a, b) == [])
