"""The KVMSTATE file's one-join encoder and inline decoder, read against the format itself.

The oracle is the format as documented in kvmstate.snapshot, parsed here
with ``struct`` alone; bad MSR maps must still be refused with the MSR named.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmstate import uapi
from kvmstate.formats import native
from kvmstate.nested import NestedState
from kvmstate.state import VcpuState


def records(data: bytes) -> dict[str, bytes]:
    """tag -> payload of a record sequence (taglen:u16 tag length:u64 payload)."""
    out, pos = {}, 0
    while pos < len(data):
        (taglen,) = struct.unpack_from("<H", data, pos)
        tag = data[pos + 2 : pos + 2 + taglen].decode()
        (length,) = struct.unpack_from("<Q", data, pos + 2 + taglen)
        start = pos + 2 + taglen + 8
        out[tag] = data[start : start + length]
        pos = start + length
    return out


def test_msrs_are_written_sorted_as_kvm_msrs() -> None:
    state = VcpuState(msrs={0xC000_0080: 0xD01, 0x10: 1 << 63, 0x174: 0})
    assert state.to_bytes()[:8] == b"KVMSTATE"
    vcpu = records(records(state.to_bytes()[12:])["vcpu"])
    payload = vcpu["msrs"]
    nmsrs, pad = struct.unpack_from("<II", payload)
    assert (nmsrs, pad, len(payload)) == (3, 0, 8 + 3 * 16)
    entries = [struct.unpack_from("<IIQ", payload, 8 + 16 * i) for i in range(3)]
    assert entries == [(0x10, 0, 1 << 63), (0x174, 0, 0), (0xC000_0080, 0, 0xD01)]
    assert VcpuState.from_bytes(state.to_bytes()).msrs == state.msrs


@pytest.mark.parametrize(
    ("msrs", "error", "message"),
    [
        ({0x10: True}, TypeError, "MSR 0x10 must be an int"),
        ({True: 1}, TypeError, "MSR index must be an int"),
        ({0x10: 1 << 64}, ValueError, "MSR 0x10 value .* does not fit in 64 bits"),
        ({0x10: -1}, ValueError, "MSR 0x10 value .* does not fit in 64 bits"),
        ({1 << 32: 0}, ValueError, "MSR index 0x100000000 does not fit in 32 bits"),
        ({0x10: 1.0}, TypeError, "MSR 0x10 must be an int"),
    ],
    ids=["bool-value", "bool-index", "value-65-bits", "negative", "index-33-bits", "float"],
)
def test_bad_msrs_are_refused_naming_the_msr(msrs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        VcpuState(msrs=msrs).to_bytes()


def test_fixed_parts_go_in_as_the_kernel_bytes() -> None:
    regs = uapi.kvm_regs(rip=0xFFF0, rflags=2)
    state = VcpuState(regs=regs)
    vcpu = records(records(state.to_bytes()[12:])["vcpu"])
    assert vcpu["regs"] == bytes(memoryview(regs).cast("B"))
    again = VcpuState.from_bytes(state.to_bytes()).regs
    assert again is not None and again.rip == 0xFFF0 and again is not regs


def record(tag: bytes, payload: bytes) -> bytes:
    return struct.pack("<H", len(tag)) + tag + struct.pack("<Q", len(payload)) + payload


def file_of(vcpu: bytes) -> bytes:
    return b"KVMSTATE" + struct.pack("<HH", 1, 0) + record(b"vcpu", vcpu)


def test_parts_are_read_in_any_order_beside_unknown_records() -> None:
    regs = uapi.kvm_regs(rip=0x1234)
    vcpu = (
        record(b"newer.thing", b"\x01\x02")
        + record(b"tsc_khz", struct.pack("<I", 2_000_000))
        + record(b"regs", bytes(memoryview(regs).cast("B")))
    )
    state = VcpuState.from_bytes(file_of(vcpu))
    assert state.regs is not None and state.regs.rip == 0x1234
    assert state.tsc_khz == 2_000_000 and state.extra == {"newer.thing": b"\x01\x02"}


def test_a_part_whose_length_runs_past_the_end_is_refused_at_its_byte() -> None:
    # The regs head is a known one; its length says one byte more than the file holds.
    vcpu = struct.pack("<H", 4) + b"regs" + struct.pack("<Q", 145) + bytes(144)
    with pytest.raises(ValueError, match=r"record 'regs' at byte 26 says 145 bytes, only 144"):
        VcpuState.from_bytes(file_of(vcpu))


def test_a_part_twice_is_refused() -> None:
    vcpu = record(b"tsc_khz", bytes(4)) * 2
    with pytest.raises(ValueError, match="record 'tsc_khz' at byte 47 appears twice"):
        VcpuState.from_bytes(file_of(vcpu))


def test_each_decoded_absent_is_its_own_dict() -> None:
    data = VcpuState(absent={"nested": "no KVM_CAP_NESTED_STATE"}).to_bytes()
    first, second = VcpuState.from_bytes(data), VcpuState.from_bytes(data)
    first.absent["lapic"] = "edited"
    assert second.absent == {"nested": "no KVM_CAP_NESTED_STATE"}
    assert VcpuState.from_bytes(data).absent == second.absent
    assert records(records(data[12:])["vcpu"])["absent"] == b'{"nested": "no KVM_CAP_NESTED_STATE"}'


def test_json_cpuid_entries_round_trip_and_a_bad_one_is_named() -> None:
    from kvmstate.formats import native

    cpuid = uapi.kvm_cpuid2.new(3)
    for i, entry in enumerate(cpuid.items()):
        entry.function, entry.eax, entry.edx = i, 0x1000 + i, 0xFFFF_FFFF
    d = native.to_dict(VcpuState(cpuid=cpuid))
    assert d["parts"]["cpuid"][2]["eax"] == 0x1002
    again = native.from_dict(d).cpuid
    assert again is not None and bytes(memoryview(again).cast("B")) == bytes(
        memoryview(cpuid).cast("B")
    )
    d["parts"]["cpuid"][1]["eax"] = 1 << 32
    with pytest.raises(ValueError, match=r"cpuid\[1\]\.eax"):
        native.from_dict(d)
    d["parts"]["cpuid"][1]["eax"] = True
    with pytest.raises(ValueError, match=r"cpuid\[1\]\.eax"):
        native.from_dict(d)


# --- a file laid out like one decoded before ---------------------------------------------
#
# A decoded file's layout (its records and their lengths) is remembered, and a later file
# of that length with the same record heads is read by it. A bytes subclass takes the
# record-by-record walk every time: the oracle each fast decode is held to.


class Walked(bytes):
    """Bytes that the decoder reads record by record, every time."""


def full_state() -> VcpuState:
    """Every kind of part: fixed, cpuid, xsave, MSRs, tsc_khz, nested, absent."""
    cpuid = uapi.kvm_cpuid2.new(3)
    for i, entry in enumerate(cpuid.items()):
        entry.function, entry.eax = i, 0x100 + i
    nested = uapi.kvm_nested_state_header(format=uapi.KVM_STATE_NESTED_FORMAT_SVM, size=128)
    return VcpuState(
        cpuid=cpuid,
        regs=uapi.kvm_regs(rip=0xFFF0, rflags=2),
        sregs=uapi.kvm_sregs(),
        xsave=uapi.kvm_xsave.sized(4096),
        msrs={0x174: 8, 0x10: 1 << 63, 0xC000_0080: 0xD01},
        tsc_khz=2_000_000,
        nested=NestedState.from_bytes(bytes(memoryview(nested).cast("B"))),
        absent={"lapic": "no in-kernel irqchip"},
    )


def decoded(data: bytes | bytearray, read: Callable[[Any], VcpuState]) -> VcpuState | str:
    try:
        return read(data)
    except ValueError as exc:
        return f"ValueError: {exc}"


def same(a: VcpuState | str, b: VcpuState | str) -> bool:
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    return a == b and a.absent == b.absent and a.extra == b.extra


def test_a_file_laid_out_alike_decodes_to_fresh_equal_parts() -> None:
    state = full_state()
    data = state.to_bytes()
    first, second = VcpuState.from_bytes(data), VcpuState.from_bytes(data)
    assert same(first, state) and same(second, state) and second.to_bytes() == data
    for part in first.parts():
        if part not in ("tsc_khz", "msrs"):
            assert getattr(first, part) is not getattr(second, part)
    assert first.msrs is not second.msrs and first.absent is not second.absent
    # Another vCPU of the same layout: its own bytes are read.
    state.regs.rip, state.msrs[0x174], state.tsc_khz = 0x1234, 9, 1_000_000
    third = VcpuState.from_bytes(bytearray(state.to_bytes()))
    assert third.regs is not None and third.regs.rip == 0x1234
    assert third.msrs == {0x10: 1 << 63, 0x174: 9, 0xC000_0080: 0xD01}
    assert third.tsc_khz == 1_000_000 and same(third, state)


def change(data: bytearray, part: str) -> None:
    """Bytes inside one part of ``full_state()``'s file changed, its heads kept."""
    at = data.index(struct.pack("<H", len(part)) + part.encode()) + 2 + len(part) + 8
    if part == "msrs":  # the first MSR's index made the second's
        data[at + 8 : at + 12] = data[at + 24 : at + 28]
    elif part == "absent":
        data[at] = ord("[")
    elif part == "nested":  # the header's size field
        data[at + 4 : at + 8] = struct.pack("<I", 4224)
    elif part == "cpuid":  # the count, which is one of the heads
        data[at : at + 4] = struct.pack("<I", 2)


@pytest.mark.parametrize(
    ("part", "message"),
    [
        ("msrs", "msrs: an MSR index appears twice"),
        ("absent", "absent: not a JSON object"),
        ("nested", "nested: the size field says 4224 bytes"),
        ("cpuid", "cpuid: its count says 2 entries"),
    ],
)
def test_a_file_laid_out_alike_is_checked_inside_its_parts(part: str, message: str) -> None:
    data = full_state().to_bytes()
    VcpuState.from_bytes(data)  # the file's layout is known now,
    native.loads_vcpu(data)  # and its vcpu record's
    bad = bytearray(data)
    change(bad, part)
    expected = decoded(Walked(bad), VcpuState.from_bytes)
    assert isinstance(expected, str) and message in expected
    for variant in (bytes(bad), bad):
        assert decoded(variant, VcpuState.from_bytes) == expected
        assert decoded(variant, native.loads_vcpu) == expected


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1, max_size=4))
def test_a_changed_file_of_a_known_length_decodes_as_the_walk_does(
    flips: list[tuple[int, int]],
) -> None:
    data = full_state().to_bytes()
    VcpuState.from_bytes(data)
    native.loads_vcpu(data)  # the vcpu record's layout too
    changed = bytearray(data)
    for at, value in flips:
        changed[at % len(changed)] = value
    expected = decoded(Walked(changed), VcpuState.from_bytes)
    for read in (VcpuState.from_bytes, native.loads_vcpu):
        assert same(decoded(bytes(changed), read), expected)


def test_files_of_many_layouts_each_decode_right() -> None:
    # More lengths than are remembered, then the first again.
    states = [VcpuState(msrs={i: i for i in range(n)}, tsc_khz=n) for n in range(40)]
    for state in [*states, *states]:
        data = state.to_bytes()
        assert same(VcpuState.from_bytes(data), state)
        assert native.loads_vm(data + data[12:]) == [state, state]


class Colour(enum.IntEnum):
    RED = 0x174


class Regs(uapi.kvm_regs):
    """A mirror's subclass: not the exact type, the same bytes."""


def test_parts_of_other_types_encode_as_their_bytes() -> None:
    plain = VcpuState(regs=uapi.kvm_regs(rip=5), msrs={0x174: 1, 0x10: 2}, tsc_khz=7)
    regs = Regs()
    regs.rip = 5
    other = VcpuState(regs=regs, msrs={Colour.RED: 1, 0x10: 2}, tsc_khz=7)
    assert other.to_bytes() == plain.to_bytes() and other.to_record() == plain.to_record()


def test_msrs_in_any_order_encode_sorted_with_their_values() -> None:
    indices = [0xC000_0080, 0x10, 0x174, 0x4B56_4D00, 0x3A]
    expected = VcpuState(msrs={i: i + 1 for i in sorted(indices)}).part_bytes("msrs")
    for turn in range(20):  # more orders than are remembered
        order = indices[turn % 5 :] + indices[: turn % 5]
        if turn >= 10:
            order.reverse()
        state = VcpuState(msrs={i: i + 1 for i in order})
        assert state.part_bytes("msrs") == expected
        state.msrs[0x10] = turn  # the same order, another value
        assert VcpuState.from_bytes(state.to_bytes()).msrs == {i: i + 1 for i in indices} | {
            0x10: turn
        }
