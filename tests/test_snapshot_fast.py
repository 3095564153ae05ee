"""The KVMSTATE file's one-join encoder and inline decoder, read against the format itself.

The oracle is the format as documented in kvmstate.snapshot, parsed here
with ``struct`` alone; bad MSR maps must still be refused with the MSR named.
"""

from __future__ import annotations

import struct

import pytest

from kvmstate import uapi
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
