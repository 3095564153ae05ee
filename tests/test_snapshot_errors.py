"""Errors of the file and dict forms say where: the field's whole path, the record's file byte."""

from __future__ import annotations

import copy
import struct
from collections.abc import Iterator
from typing import Any

import pytest

import kvmstate
from kvmstate import snapshot, uapi, vmcb
from kvmstate.nested import SVM_MAX_SIZE, NestedState
from kvmstate.state import VcpuState
from tests.kvm_fixtures import NO_KVM


def svm_state() -> NestedState:
    """A guest-mode SVM state with its vmcb12: every nested key of the dict form."""
    state = NestedState(SVM_MAX_SIZE)
    state.format, state.size = uapi.KVM_STATE_NESTED_FORMAT_SVM, SVM_MAX_SIZE
    state.flags = uapi.KVM_STATE_NESTED_GUEST_MODE | uapi.KVM_STATE_NESTED_GIF_SET
    state.svm.vmcb_pa = 0x10000
    state.vmcb12.control.asid = 1
    state.vmcb12.save.efer = vmcb.EFER_SVME
    return state


@pytest.fixture(scope="module")
def saved() -> VcpuState:
    """A real vCPU's whole state where /dev/kvm opens (else its fixed parts made here)."""
    if NO_KVM is None:
        with kvmstate.Kvm() as kvm, kvm.create_vm() as vm:
            vm.create_irqchip()
            with vm.create_vcpu(0) as vcpu:
                vcpu.set_cpuid2(kvm.get_supported_cpuid())
                state = vcpu.save_state()
    else:
        state = VcpuState(regs=uapi.kvm_regs(), sregs=uapi.kvm_sregs(), msrs={0x10: 5})
        state.cpuid = uapi.kvm_cpuid2.new(2)
    state.nested = svm_state()
    return state


def leaves(node: Any, path: str) -> Iterator[tuple[str, Any]]:
    """Every leaf of a dict form, by path: keys joined by '.', list items as [i]."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from leaves(value, f"{path}.{key}")
    elif isinstance(node, list):
        # Long lists (CPUID leaves): the first and the last item stand for the rest.
        ends = sorted({0, len(node) - 1}) if len(node) > 2 else range(len(node))
        for i in ends:
            yield from leaves(node[i], f"{path}[{i}]")
    else:
        yield path, node


def setter(d: dict[str, Any], path: str) -> tuple[Any, Any]:
    """The container and key that ``path`` (a ``leaves`` path under "parts") names in ``d``."""
    node: Any = d["parts"]
    tokens = path.replace("[", ".[").split(".")
    for token in tokens[:-1]:
        node = node[int(token[1:-1])] if token.startswith("[") else node[token]
    last = tokens[-1]
    return node, int(last[1:-1]) if last.startswith("[") else last


def test_every_from_dict_error_names_the_whole_path_once(saved: VcpuState) -> None:
    d = snapshot.to_dict(saved)
    paths = [p for part, value in d["parts"].items() for p, _ in leaves(value, part)]
    assert {"regs.rip", "sregs.cs.base", "nested.vmcb12.control.asid", "nested.svm.vmcb_pa"} <= {
        *paths
    }
    tried = 0
    for path in paths:
        bad = copy.deepcopy(d)
        node, key = setter(bad, path)
        # An int where hex bytes go, a float where an int goes: both refused by type.
        node[key] = 1.5 if isinstance(node[key], int) else 7
        with pytest.raises(ValueError) as info:
            snapshot.from_dict(bad)
        message = str(info.value)
        assert message.startswith(f"{path}: "), message
        assert message.count(path) == 1, message
        tried += 1
    assert tried == len(paths) > 50


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: p["sregs"]["cs"].pop("base"), r"^sregs\.cs: .*missing \['base'\]"),
        (lambda p: p["sregs"]["cs"].update(bogus=1), r"^sregs\.cs: unknown fields \['bogus'\]"),
        (lambda p: p["regs"].__setitem__("rip", 1 << 64), r"^regs\.rip: \d+ does not fit in 64"),
        (lambda p: p["msrs"].__setitem__("0x10", -1), r"^msrs\.0x10: -1 does not fit in 64"),
        (lambda p: p["msrs"].__setitem__("0X10", 1), r"^msrs: '0X10' is not an MSR index"),
        (lambda p: p["cpuid"][0].__setitem__("eax", None), r"^cpuid\[0\]\.eax: expected an int"),
        (
            lambda p: p.__setitem__("cpuid", {"padding": 1, "entries": [{}]}),
            r"^cpuid\.entries\[0\]: ",
        ),
        (lambda p: p.__setitem__("cpuid", {"padding": 2**32, "entries": []}), r"^cpuid\.padding: "),
        (lambda p: p.__setitem__("xsave", "00" * 10), r"^xsave: 10 bytes is not an XSAVE area"),
        (lambda p: p.__setitem__("xsave", "zz"), r"^xsave: not a hex string"),
        (lambda p: p.__setitem__("tsc_khz", 2**40), r"^tsc_khz: \d+ does not fit in 32 bits"),
        (lambda p: p["nested"].pop("flags"), r"^nested: unknown keys \[\], missing \['flags'\]"),
        (lambda p: p["nested"].update(bogus=1), r"^nested: unknown keys \['bogus'\]"),
        (lambda p: p["nested"].update(size=128), r"^nested: the size field says 128"),
        (lambda p: p["nested"].update(data_raw="0"), r"^nested\.data_raw: not a hex string"),
        (lambda p: p["nested"].update(hdr_raw=""), r"^nested\.hdr_raw: 0 bytes"),
        (lambda p: p["nested"]["vmcb12"]["control"].pop("asid"), r"^nested\.vmcb12\.control: "),
        (lambda p: p.__setitem__("bogus", 1), r"^bogus: unknown part \(one of cpuid, "),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_from_dict_errors_by_path(saved: VcpuState, edit: Any, message: str) -> None:
    d = snapshot.to_dict(saved)
    edit(d["parts"])
    with pytest.raises(ValueError, match=message):
        snapshot.from_dict(d)


def test_extra_errors_name_the_tag() -> None:
    d = snapshot.to_dict(VcpuState())
    d["extra"] = {"x": "zz"}
    with pytest.raises(ValueError, match=r"^extra\.x: not a hex string"):
        snapshot.from_dict(d)


# --- offsets in the file -------------------------------------------------------------------------


def record_at(data: bytes, tag: bytes, start: int = 0) -> int:
    """The file offset of the first record with ``tag`` at or after ``start`` (its taglen)."""
    return data.index(struct.pack("<H", len(tag)) + tag, start)


def with_length(data: bytes, at: int, length: int) -> bytes:
    """``data`` with the length field of the record at ``at`` replaced."""
    (taglen,) = struct.unpack_from("<H", data, at)
    where = at + 2 + taglen
    return data[:where] + struct.pack("<Q", length) + data[where + 8 :]


def test_truncation_offsets_are_file_offsets(saved: VcpuState) -> None:
    data = snapshot.dumps_vm([VcpuState(tsc_khz=1000), saved])  # meta, vcpu 0, vcpu 1
    second = record_at(data, b"vcpu", record_at(data, b"vcpu") + 1)
    regs = record_at(data, b"regs", second)
    assert regs > second > 100  # well past the start of any record's own payload
    lying = with_length(data, regs, 1 << 40)
    with pytest.raises(ValueError, match=rf"^vcpu 1: record 'regs' at byte {regs} says"):
        snapshot.loads_vm(lying)
    # A header cut short inside vcpu 1: its own length shrunk to end mid-header.
    body = second + 2 + 4 + 8
    nested = record_at(data, b"nested", second)
    cut = with_length(data, second, nested + 3 - body)[: nested + 3]
    with pytest.raises(ValueError, match=rf"^vcpu 1: truncated record header at byte {nested}$"):
        snapshot.loads_vm(cut)
    # Top-level records count from the file's start too.
    meta = record_at(data, b"meta")
    assert meta == 12
    with pytest.raises(ValueError, match=rf"^file: truncated record header at byte {second}$"):
        snapshot.loads_vm(data[: second + 5])


def test_part_errors_name_the_records_file_offset() -> None:
    data = snapshot.dumps_vcpu(VcpuState(tsc_khz=1000))
    at = record_at(data, b"tsc_khz")
    vcpu = record_at(data, b"vcpu")
    # A 3-byte tsc_khz record (it holds a u32) that ends the vcpu record.
    end = at + 2 + len(b"tsc_khz") + 8 + 3
    short = with_length(with_length(data, at, 3), vcpu, end - (vcpu + 2 + 4 + 8))[:end]
    with pytest.raises(
        ValueError, match=rf"tsc_khz: 3 bytes, expected 4 \(the record at byte {at}\)"
    ):
        snapshot.loads_vcpu(short)


def test_struct_from_dict_starts_paths_where_told() -> None:
    d = uapi.kvm_sregs().to_dict()
    d["cs"]["base"] = -1
    with pytest.raises(ValueError, match=r"^kvm_sregs\.cs\.base: -1 does not fit"):
        uapi.kvm_sregs.from_dict(d)
    with pytest.raises(ValueError, match=r"^state\.sregs\.cs\.base: -1 does not fit"):
        uapi.kvm_sregs.from_dict(d, path="state.sregs")
