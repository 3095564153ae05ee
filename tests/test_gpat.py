"""A nested state from a Linux 7.2 kernel with L2's own gPAT, read everywhere it shows.

The bytes are built from the merged ABI as a fact (commit 4f256d5770fe):
``struct kvm_svm_nested_state_hdr { __u64 vmcb_pa; __u64 gpat; }`` at offset 8
of ``struct kvm_nested_state``, so gpat is bytes 16-23 of the blob. The layout
itself is checked by gcc+gdb in tests/test_layout.py.
"""

from __future__ import annotations

import json
import struct

from kvmstate import describe, diff, snapshot
from kvmstate.nested import SVM_MAX_SIZE, NestedState
from kvmstate.state import VcpuState

GPAT = 0x0007010600070106  # Linux's PAT: WB, WC, UC-, UC twice over
VMCB_PA = 0x10000


def blob_from_7_2(gpat: int = GPAT) -> bytes:
    """What KVM_GET_NESTED_STATE gives in guest mode with nested NPT and the quirk disabled."""
    header = struct.pack("<HHIQQ", 0x101, 1, SVM_MAX_SIZE, VMCB_PA, gpat)  # GUEST|GIF, SVM
    return header.ljust(SVM_MAX_SIZE, b"\0")


def test_gpat_reads_from_offset_16() -> None:
    state = NestedState.from_bytes(blob_from_7_2())
    assert state.svm.vmcb_pa == VMCB_PA and state.svm.gpat == GPAT
    state.svm.gpat = 0x0606060606060606
    assert state.to_bytes()[16:24] == bytes([6]) * 8


def test_repr_and_summary_show_gpat_not_flags() -> None:
    state = NestedState.from_bytes(blob_from_7_2())
    assert "gpat=0x7010600070106" in repr(state)
    assert "flags=GUEST_MODE|GIF_SET" in repr(state) and "svm.flags" not in repr(state)
    assert state.summary()["gpat"] == GPAT
    assert repr(state.svm) == "kvm_svm_nested_state_hdr(vmcb_pa=0x10000, gpat=0x7010600070106)"
    # A kernel before 7.2 leaves it 0: the summary does not mention it then.
    assert "gpat" not in NestedState.from_bytes(blob_from_7_2(0)).summary()


def test_describe_and_diff_name_hdr_svm_gpat() -> None:
    state = NestedState.from_bytes(blob_from_7_2())
    fields = {path: text for path, _, text in describe.nested_state_fields(state, hidden=True)}
    assert fields["hdr.svm.gpat"] == "0x7010600070106"
    assert not [p for p in fields if p.startswith(("hdr.svm.flags", "hdr.svm.reserved"))]
    assert describe.nested_state_dict(state)["fields"]["hdr.svm.gpat"] == GPAT
    found = diff.diff(NestedState.from_bytes(blob_from_7_2(0)), state)
    assert [str(d) for d in found] == ["hdr.svm.gpat: 0 -> 0x7010600070106"]


def test_snapshot_forms_keep_gpat() -> None:
    saved = VcpuState(nested=NestedState.from_bytes(blob_from_7_2()))
    as_dict = snapshot.to_dict(saved)
    assert as_dict["parts"]["nested"]["svm"] == {"vmcb_pa": VMCB_PA, "gpat": GPAT}
    back = snapshot.from_dict(json.loads(json.dumps(as_dict)))
    assert back.nested is not None and back.nested.to_bytes() == blob_from_7_2()
    loaded = snapshot.loads_vcpu(snapshot.dumps_vcpu(saved))
    assert loaded.nested is not None and loaded.nested.svm.gpat == GPAT
