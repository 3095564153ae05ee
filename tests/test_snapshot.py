"""Property tests of the formats: exact round trips, and clear errors for any bad input."""

from __future__ import annotations

import contextlib
import ctypes
import json
import pickle
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmstate import records, snapshot, uapi
from kvmstate.nested import HEADER_SIZE, NestedState
from kvmstate.state import PART_TABLE, VcpuState

# The fixed-size parts, as the parts table lays them out.
FIXED_PARTS = {n: r.type for n, r in PART_TABLE.items() if r.codec == "fixed"}

FIXED = dict(FIXED_PARTS)


def _struct(cls: type) -> st.SearchStrategy[object]:
    return st.binary(min_size=ctypes.sizeof(cls), max_size=ctypes.sizeof(cls)).map(cls.from_bytes)  # type: ignore[attr-defined]


@st.composite
def nested_states(draw: st.DrawFn) -> NestedState:
    fmt = draw(
        st.sampled_from([uapi.KVM_STATE_NESTED_FORMAT_VMX, uapi.KVM_STATE_NESTED_FORMAT_SVM])
    )
    pages = draw(st.sampled_from([0, 1, 2] if fmt == 0 else [0, 1]))
    size = HEADER_SIZE + pages * 4096
    body = bytearray(draw(st.binary(min_size=size, max_size=size)))
    struct.pack_into("<HI", body, 2, fmt, size)
    return NestedState.from_bytes(body)


@st.composite
def cpuids(draw: st.DrawFn) -> uapi.kvm_cpuid2:
    n = draw(st.integers(0, 6))
    raw = draw(st.binary(min_size=40 * n, max_size=40 * n))
    cpuid = uapi.kvm_cpuid2.new(n)
    ctypes.memmove(ctypes.addressof(cpuid) + 8, raw, len(raw))
    return cpuid


@st.composite
def vcpu_states(draw: st.DrawFn) -> VcpuState:
    state = VcpuState()
    for part, cls in FIXED.items():
        if draw(st.booleans()):
            setattr(state, part, draw(_struct(cls)))
        elif draw(st.booleans()):
            state.absent[part] = draw(st.text(max_size=20))
    if draw(st.booleans()):
        words = draw(st.integers(1024, 1100))
        raw = draw(st.binary(min_size=4 * words, max_size=4 * words))
        xsave = uapi.kvm_xsave.sized(4 * words)
        ctypes.memmove(ctypes.addressof(xsave), raw, len(raw))
        state.xsave = xsave
    if draw(st.booleans()):
        state.cpuid = draw(cpuids())
    if draw(st.booleans()):
        state.msrs = draw(
            st.dictionaries(st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1), max_size=8)
        )
    if draw(st.booleans()):
        state.tsc_khz = draw(st.integers(0, 2**32 - 1))
    if draw(st.booleans()):
        state.nested = draw(nested_states())
    if draw(st.booleans()):
        state.extra["future.part"] = draw(st.binary(max_size=32))
    return state


SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@SETTINGS
@given(vcpu_states())
def test_binary_round_trip_is_exact(state: VcpuState) -> None:
    data = state.to_bytes()
    back = VcpuState.from_bytes(data)
    assert back == state and back.absent == state.absent and back.extra == state.extra
    assert back.to_bytes() == data


@SETTINGS
@given(vcpu_states())
def test_json_round_trip_is_exact(state: VcpuState) -> None:
    back = snapshot.from_dict(json.loads(json.dumps(snapshot.to_dict(state))))
    assert back.to_bytes() == state.to_bytes()


@SETTINGS
@given(vcpu_states())
def test_pickle_round_trip_is_exact(state: VcpuState) -> None:
    assert pickle.loads(pickle.dumps(state)).to_bytes() == state.to_bytes()


@SETTINGS
@given(st.lists(vcpu_states(), max_size=3))
def test_vm_round_trip_is_exact(states: list[VcpuState]) -> None:
    assert snapshot.loads_vm(snapshot.dumps_vm(states)) == states


@SETTINGS
@given(vcpu_states(), st.data())
def test_truncated_files_give_a_clear_error(state: VcpuState, data: st.DataObject) -> None:
    blob = state.to_bytes()
    cut = data.draw(st.integers(0, len(blob) - 1))
    with pytest.raises(ValueError):
        snapshot.loads_vcpu(blob[:cut])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_give_value_error_only(blob: bytes) -> None:
    for data in (blob, snapshot.MAGIC + struct.pack("<HH", 1, 0) + blob):
        with contextlib.suppress(ValueError):
            snapshot.loads_vm(data)


@settings(max_examples=200, deadline=None)
@given(
    st.binary(min_size=1, max_size=300),
    st.sampled_from([*sorted(FIXED), "cpuid", "msrs", "xsave", "tsc_khz", "nested", "absent"]),
)
def test_random_part_payloads_give_value_error_only(payload: bytes, part: str) -> None:
    body = records.record(part, payload)
    data = records.file_header() + records.record("vcpu", body)
    with contextlib.suppress(ValueError):
        snapshot.loads_vcpu(data)


def test_unknown_records_and_trailing_bytes_survive() -> None:
    regs = uapi.kvm_regs()
    regs.rip = 0x1234
    body = records.record("regs", regs.to_bytes() + b"NEWFIELD") + records.record(
        "future.part", b"\x01\x02"
    )
    data = records.file_header() + records.record("vcpu", body)
    state = snapshot.loads_vcpu(data)
    assert state.regs is not None and state.regs.rip == 0x1234
    assert state.extra == {"regs/trailing": b"NEWFIELD", "future.part": b"\x01\x02"}
    again = snapshot.loads_vcpu(state.to_bytes())
    assert again.extra == state.extra
    assert b"NEWFIELD" in state.to_bytes()


def test_newer_major_version_is_refused() -> None:
    data = snapshot.MAGIC + struct.pack("<HH", 2, 0)
    with pytest.raises(ValueError, match=r"format 2\.0 is not readable by this kvmstate"):
        snapshot.loads_vm(data)
    with pytest.raises(ValueError, match="not readable"):
        snapshot.from_dict({"kvmstate": "2.0", "parts": {}})


def test_newer_minor_version_is_read() -> None:
    data = snapshot.MAGIC + struct.pack("<HH", 1, 7) + records.record("vcpu", b"")
    assert snapshot.loads_vcpu(data) == VcpuState()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"KVMSTAT", "the header alone is 12"),
        (b"NOTKVMST" + bytes(4), "not a kvmstate file"),
        (records.file_header() + b"\x05\x00vc", "truncated record header"),
        (
            records.file_header() + struct.pack("<H", 4) + b"vcpu" + struct.pack("<Q", 99),
            "says 99 bytes",
        ),
        (
            records.file_header() + struct.pack("<H", 3) + b"BAD" + struct.pack("<Q", 0),
            "invalid record tag",
        ),
    ],
    ids=["short", "magic", "truncated", "overlong", "bad-tag"],
)
def test_malformed_files_name_the_problem(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        snapshot.loads_vm(data)


def test_part_errors_name_the_part() -> None:
    def file_with(part: str, payload: bytes) -> bytes:
        return records.file_header() + records.record("vcpu", records.record(part, payload))

    with pytest.raises(ValueError, match="regs: 10 bytes, kvm_regs is 144"):
        snapshot.loads_vcpu(file_with("regs", bytes(10)))
    with pytest.raises(ValueError, match="cpuid: its count says 2 entries"):
        snapshot.loads_vcpu(file_with("cpuid", struct.pack("<II", 2, 0) + bytes(40)))
    with pytest.raises(ValueError, match="nested: truncated nested state"):
        snapshot.loads_vcpu(file_with("nested", bytes(64)))
    with pytest.raises(ValueError, match="appears twice"):
        twice = records.record("tsc_khz", bytes(4)) * 2
        snapshot.loads_vcpu(records.file_header() + records.record("vcpu", twice))


def test_from_dict_refuses_values_that_do_not_fit() -> None:
    d = snapshot.to_dict(VcpuState(regs=uapi.kvm_regs()))
    d["parts"]["regs"]["rip"] = 1 << 64
    with pytest.raises(ValueError, match=r"^regs\.rip: .* does not fit in 64 bits"):
        snapshot.from_dict(d)
    d["parts"]["regs"]["rip"] = "0x10"
    with pytest.raises(ValueError, match="expected an int"):
        snapshot.from_dict(d)
    with pytest.raises(ValueError, match="not a kvmstate dict"):
        snapshot.from_dict({"parts": {}})
