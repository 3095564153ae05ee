"""kvmstate.formats.cloud_hypervisor: state.json files written per Cloud Hypervisor's serde.

The files come from tests/support/vmm_files.py, a writer made from Cloud
Hypervisor's and kvm-bindings' serializers apart from the library, fed with
vCPU state saved from the real /dev/kvm and with the nested states
tests/test_check.py builds (accepted by a real kernel). Inside the emulated
AMD guest, a guest-mode state saved by a nested KVM goes through a file and
back into a fresh vCPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings

import kvmstate
from kvmstate import uapi, vmcs12
from kvmstate.check import check
from kvmstate.formats import cloud_hypervisor as ch
from kvmstate.nested import NestedState
from kvmstate.state import VcpuState
from kvmstate.uapi import NestedFlag, NestedFormat
from tests.kvm_fixtures import NO_KVM
from tests.support import vmm_files
from tests.support.states import restored_in_a_fresh_vcpu, svm_guest_saved
from tests.test_check import BASELINES

Saved = tuple[VcpuState, uapi.kvm_fpu]
STRUCTS = ("regs", "sregs", "events", "xcrs", "mp_state", "lapic", "xsave")


def _machine(kvm: kvmstate.Kvm, count: int) -> tuple[kvmstate.Vm, list[kvmstate.Vcpu]]:
    vm = kvm.create_vm()
    vm.create_irqchip()  # Cloud Hypervisor always has one: every state has a LAPIC
    vcpus = []
    for i in range(count):
        vcpu = vm.create_vcpu(i)
        vcpu.set_cpuid2(kvm.get_supported_cpuid())
        regs = vcpu.get_regs()
        regs.rax, regs.rbx, regs.rip = 0x1111 * (i + 1), 1 << 63, 0x1000 + i
        vcpu.set_regs(regs)
        vcpus.append(vcpu)
    return vm, vcpus


@pytest.fixture
def saved(kvm: kvmstate.Kvm) -> Iterator[list[Saved]]:
    """Three vCPUs' states from the real KVM, each with the kernel's own KVM_GET_FPU."""
    vm, vcpus = _machine(kvm, 3)
    out = [(v.save_state(), v.get_fpu()) for v in vcpus]
    for v in vcpus:
        v.close()
    vm.close()
    yield out


def _doc(saved: list[Saved], **kwargs: Any) -> bytes:
    return vmm_files.ch_state_json(
        {i: vmm_files.ch_vcpu_state(s, fpu, **kwargs) for i, (s, fpu) in enumerate(saved)}
    )


def _inner(data: bytes, vcpu: int) -> dict[str, Any]:
    tree = json.loads(data)
    text = tree["snapshots"]["cpu-manager"]["snapshots"][str(vcpu)]["snapshot_data"]["state"]
    return json.loads(text)["Kvm"]  # type: ignore[no-any-return]


def _with_inner(data: bytes, vcpu: int, change: Callable[[dict[str, Any]], Any]) -> bytes:
    tree = json.loads(data)
    leaf = tree["snapshots"]["cpu-manager"]["snapshots"][str(vcpu)]["snapshot_data"]
    state = json.loads(leaf["state"])
    change(state["Kvm"])
    leaf["state"] = json.dumps(state, separators=(",", ":"))
    return json.dumps(tree, separators=(",", ":")).encode()


# --- reading ---------------------------------------------------------------------------------


@pytest.mark.skipif(NO_KVM is not None, reason=str(NO_KVM))
def test_every_part_is_the_kernels(saved: list[Saved]) -> None:
    kernel_order = list(saved[0][0].msrs or {})
    data = _doc(saved, msr_order=kernel_order[::-1])
    snap = ch.load(data)
    assert sorted(snap.vcpus) == [0, 1, 2]
    for i, (want, fpu) in enumerate(saved):
        got = snap.states()[i]
        for part in STRUCTS:
            assert got.part_bytes(part) == want.part_bytes(part), (i, part)
        assert got.fpu is not None and got.fpu.to_bytes() == fpu.to_bytes()
        assert got.msrs is not None and list(got.msrs) == kernel_order[::-1]
        assert got.msrs == want.msrs
        assert got.tsc_khz == want.tsc_khz
        assert got.cpuid is not None and want.cpuid is not None
        kernel = [e.to_bytes() for e in list(want.cpuid.items())[: want.cpuid.nent]]
        read = [e.to_bytes() for e in list(got.cpuid.items())[: got.cpuid.nent]]
        assert read == kernel
        assert set(got.absent) == {"debugregs", "sregs2", "nested"}
        assert "header-only" in got.absent["nested"] and "null" in got.absent["nested"]
        assert snap.vcpus[i].unmapped == {"hyperv_synic": False}
    assert got.regs is not None and got.regs.rip == 0x1002 and got.regs.rbx == 1 << 63


@pytest.mark.skipif(NO_KVM is not None, reason=str(NO_KVM))
def test_cpuid_index_flag_is_mapped(saved: list[Saved]) -> None:
    state = saved[0][0]
    assert state.cpuid is not None
    flagged = [e for e in list(state.cpuid.items())[: state.cpuid.nent] if e.flags & 1]
    if not flagged:
        pytest.skip("this KVM's CPUID has no leaf with a significant index")
    got = ch.read_state_json(_doc(saved[:1]))[0].cpuid
    assert got is not None
    pairs = {(e.function, e.index): e.flags for e in list(got.items())[: got.nent]}
    for e in flagged:
        assert pairs[(e.function, e.index)] == uapi.CpuidFlag.SIGNIFCANT_INDEX


@pytest.mark.skipif(NO_KVM is not None, reason=str(NO_KVM))
def test_fpu_from_xsave_is_what_kvm_get_fpu_reports(kvm: kvmstate.Kvm) -> None:
    vm, (vcpu,) = _machine(kvm, 1)
    with vm, vcpu:
        area = vcpu.get_xsave()
        raw = bytearray(area.to_bytes())
        struct.pack_into("<HHBxHQQ", raw, 0, 0x27F, 0x3800, 0x81, 0x123, 0xFEED0000, 0xBEEF0000)
        raw[32:160] = bytes(range(128))  # st0..st7 (the kernel keeps 10 bytes of each 16)
        raw[160:416] = bytes(range(256))  # xmm0..xmm15
        (bv,) = struct.unpack_from("<Q", raw, 512)
        struct.pack_into("<Q", raw, 512, bv | 3)  # XSTATE_BV: x87 and SSE are not in init state
        changed = type(area).from_bytes(bytes(raw))
        vcpu.set_xsave(changed)
        kernel = vcpu.get_fpu()
        derived = ch.fpu_from_xsave(vcpu.get_xsave())
    assert kernel.fcw == 0x27F and kernel.last_ip == 0xFEED0000  # the change took
    assert derived.to_bytes() == kernel.to_bytes()
    with pytest.raises(TypeError, match="kvm_xsave"):
        ch.fpu_from_xsave(kernel)  # type: ignore[arg-type]


# --- writing back ------------------------------------------------------------------------------


@pytest.mark.skipif(NO_KVM is not None, reason=str(NO_KVM))
def test_unmodified_round_trip_is_byte_identical(saved: list[Saved]) -> None:
    data = _doc(saved)
    snap = ch.load(data)
    for i, (kernel_state, _) in enumerate(saved):
        assert snap.with_vcpu(i, snap.states()[i]) == data
        # The kernel's own state (no fpu part: derived from XSAVE) says the same.
        assert snap.with_vcpu(i, kernel_state) == data
    assert ch.with_vcpu(data, 2, snap.states()[2]) == data


@pytest.mark.skipif(NO_KVM is not None, reason=str(NO_KVM))
def test_a_change_rewrites_only_what_changed(saved: list[Saved]) -> None:
    data = _doc(saved)
    snap = ch.load(data)
    state = snap.states()[1]
    assert state.regs is not None and state.msrs is not None
    state.regs.rip = 0xDEAD
    first_msr = next(iter(state.msrs))
    state.msrs[first_msr] ^= 1
    state.msrs[0xC0000103] = 7  # TSC_AUX, appended
    out = snap.with_vcpu(1, state)
    again = ch.load(out)
    assert again.states()[1].regs.rip == 0xDEAD  # type: ignore[union-attr]
    assert again.states()[1].msrs == state.msrs
    before, after = _inner(data, 1), _inner(out, 1)
    assert list(after) == list(before)
    assert [k for k in before if before[k] != after[k]] == ["msrs", "regs"]
    assert [m["index"] for m in after["msrs"]][:-1] == [m["index"] for m in before["msrs"]]
    for other in (0, 2):
        assert _inner(out, other) == _inner(data, other)
    # Outside vCPU 1's state string, not a byte moves.
    prefix = data.index(b'"1":{')
    assert out[:prefix] == data[:prefix]
    suffix = len(data) - data.index(b'"2":{')
    assert out[-suffix:] == data[-suffix:]


@pytest.mark.skipif(NO_KVM is not None, reason=str(NO_KVM))
def test_write_vcpu_gives_the_serde_shape(saved: list[Saved]) -> None:
    state, fpu = saved[0]
    written = ch.write_vcpu(state)
    assert written == vmm_files.ch_vcpu_state(state, fpu)
    text = json.dumps(written, separators=(",", ":"))
    assert json.dumps(vmm_files.ch_vcpu_state(state, fpu), separators=(",", ":")) == text
    assert ch.write_vcpu(state, hyperv_synic=True)["Kvm"]["hyperv_synic"] is True


def test_write_vcpu_names_the_part_it_needs() -> None:
    needed = "cpuid, msrs, events, regs, sregs, lapic, mp_state, xsave"
    with pytest.raises(ValueError, match=f"VcpuKvmState needs {needed}, absent here"):
        ch.write_vcpu(VcpuState())
    state = VcpuState(absent={"lapic": "KVM_GET_LAPIC: Invalid argument"})
    with pytest.raises(ValueError, match="lapic: KVM_GET_LAPIC: Invalid argument"):
        ch.write_vcpu(state)
    with pytest.raises(TypeError, match="VcpuState"):
        ch.write_vcpu({})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="header_only must be"):
        ch.write_vcpu(VcpuState(), header_only="sometimes")


# --- nested state -------------------------------------------------------------------------------


@pytest.fixture
def one_saved(saved: list[Saved]) -> Saved:
    return saved[0]


@pytest.mark.skipif(NO_KVM is not None, reason=str(NO_KVM))
@pytest.mark.parametrize("name", ["svm_guest", "vmx_vmcs", "vmx_guest"])
def test_nested_states_are_read_whole(one_saved: Saved, name: str) -> None:
    make, facts = BASELINES[name]
    nested = make()
    state, fpu = one_saved
    data = vmm_files.ch_state_json(
        {0: vmm_files.ch_vcpu_state(state, fpu, nested=nested.to_bytes())}
    )
    entry = ch.load(data).vcpus[0]
    got = entry.state.nested
    assert got is not None and got == nested and got.capacity == 8320
    assert check(got, facts) == []
    assert "nested" not in entry.state.absent
    state.nested = nested
    assert ch.load(data).with_vcpu(0, state) == data
    expected = list(nested.to_bytes().ljust(8320, b"\0"))
    assert ch.write_vcpu(state)["Kvm"]["nested_state"] == expected
    if nested.format == NestedFormat.SVM:
        assert got.vmcb12 is not None and got.vmcb12.control.asid == 1
    else:
        assert got.vmcs12 is not None and got.vmcs12.hdr.revision_id == vmcs12.VMCS12_REVISION


def _header(fmt: NestedFormat, flags: int = 0, vmxon: int = (1 << 64) - 1) -> NestedState:
    state = NestedState(128)
    state.format, state.size, state.flags = fmt, 128, flags
    if fmt == NestedFormat.VMX:
        state.vmx.vmxon_pa = vmxon
        state.vmx.vmcs12_pa = (1 << 64) - 1
    return state


@pytest.mark.skipif(NO_KVM is not None, reason=str(NO_KVM))
def test_header_only_states_are_dropped_only_when_nothing_is_lost(one_saved: Saved) -> None:
    state = one_saved[0]
    fresh = [_header(NestedFormat.SVM, NestedFlag.GIF_SET), _header(NestedFormat.VMX)]
    for header in fresh:  # what a vCPU that never used VMX/SVM answers
        state.nested = header
        assert ch.write_vcpu(state)["Kvm"]["nested_state"] is None
    lossy = [_header(NestedFormat.VMX, vmxon=0x3000), _header(NestedFormat.SVM)]  # VMXON; GIF=0
    for header in lossy:
        state.nested = header
        with pytest.raises(ValueError, match=r"header-only state .* header_only='keep'"):
            ch.write_vcpu(state)
        assert ch.write_vcpu(state, header_only="drop")["Kvm"]["nested_state"] is None
        kept = ch.write_vcpu(state, header_only="keep")["Kvm"]["nested_state"]
        assert kept == list(header.to_bytes().ljust(8320, b"\0"))


@pytest.mark.skipif(NO_KVM is not None, reason=str(NO_KVM))
def test_a_kept_header_only_buffer_round_trips(one_saved: Saved) -> None:
    # A file holding a header-only buffer (written with header_only="keep") reads as that
    # state, and writing it back unchanged applies no rule: the bytes stay.
    state, fpu = one_saved
    vmxon = _header(NestedFormat.VMX, vmxon=0x3000)
    body = vmm_files.ch_vcpu_state(state, fpu)
    body["Kvm"]["nested_state"] = list(vmxon.to_bytes().ljust(8320, b"\0"))
    data = vmm_files.ch_state_json({0: body})
    snap = ch.load(data)
    assert snap.states()[0].nested == vmxon
    assert snap.with_vcpu(0, snap.states()[0]) == data


@pytest.mark.skipif(NO_KVM is not None, reason=str(NO_KVM))
def test_files_from_before_v49_and_v50(one_saved: Saved) -> None:
    state, fpu = one_saved
    data = vmm_files.ch_state_json({0: vmm_files.ch_vcpu_state(state, fpu, version=48)})
    entry = ch.load(data).vcpus[0]
    assert "before v49" in entry.state.absent["nested"]
    assert any("before v50" in note for note in entry.notes)
    assert entry.unmapped == {}
    assert ch.load(data).with_vcpu(0, entry.state) == data
    # A nested state goes in where Cloud Hypervisor would put it: after tsc_khz.
    entry.state.nested = BASELINES["svm_guest"][0]()
    out = ch.load(data).with_vcpu(0, entry.state)
    assert list(_inner(out, 0)) == list(ch.FIELDS[:-1])
    assert ch.load(out).states()[0].nested == entry.state.nested


def test_snapshots_from_before_v39_are_refused() -> None:
    old = {"snapshots": {"cpu-manager": {"snapshots": {"0": {"snapshots": {},
           "snapshot_data": list(b'{"Kvm":{}}')}}, "snapshot_data": None}},
           "snapshot_data": None}  # fmt: skip
    with pytest.raises(ValueError, match=r"snapshots\.0: snapshot_data is an array .* before v39"):
        ch.load(json.dumps(old).encode())


# --- hostile files -------------------------------------------------------------------------------


def _set(field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(kvm: dict[str, Any]) -> None:
        kvm[field] = value

    return change


def _poke(
    field: str, index: int, value: Any, sub: str | None = None
) -> Callable[[dict[str, Any]], None]:
    def change(kvm: dict[str, Any]) -> None:
        target = kvm[field] if sub is None else kvm[field][sub]
        target[index] = value

    return change


def _nested_header(size: int = 8320, fmt: int = 0) -> list[int]:
    raw = bytearray(8320)
    struct.pack_into("<HHI", raw, 0, 0, fmt, size)
    return list(raw)


HOSTILE: dict[str, tuple[Callable[[dict[str, Any]], Any], str]] = {
    "nested 8319 bytes": (
        _set("nested_state", [0] * 8319),
        r"Kvm\.nested_state: 8319 items, expected 8320",
    ),
    "nested byte 256": (
        _set("nested_state", [256] + [0] * 8319),
        r"Kvm\.nested_state\[0\]: the number 256 is not in 0\.\.255",
    ),
    "nested as a string": (
        _set("nested_state", "AAAA"),
        r"Kvm\.nested_state: expected an array, found a string",
    ),
    "nested size beyond": (
        _set("nested_state", _nested_header(9000)),
        r"size field says 9000 bytes",
    ),
    "nested format": (
        _set("nested_state", _nested_header(fmt=7)),
        r"unknown nested state format 7",
    ),
    "negative register byte": (
        _poke("regs", 0, -1),
        r"Kvm\.regs\[0\]: the number -1 is not in 0\.\.255",
    ),
    "float register byte": (_poke("regs", 3, 1.0), r"Kvm\.regs\[3\]: the number 1\.0"),
    "short sregs": (lambda k: k["sregs"].pop(), r"Kvm\.sregs: 311 items, expected 312"),
    "lapic out of i8": (
        _poke("lapic_state", 3, 200, "regs"),
        r"Kvm\.lapic_state\.regs\[3\]: the number 200 is not in -128\.\.127",
    ),
    "xsave region short": (lambda k: k["xsave"]["region"].pop(), r"Kvm\.xsave\.region: 1023 items"),
    "msr beyond 64 bits": (
        lambda k: k["msrs"][0].update(data=1 << 64),
        r"Kvm\.msrs\[0\]\.data: expected an unsigned 64-bit",
    ),
    "cpuid entry short": (lambda k: k["cpuid"][0].pop("eax"), r"Kvm\.cpuid\[0\]: missing eax"),
    "fpu fpr short": (lambda k: k["fpu"]["fpr"].pop(), r"Kvm\.fpu\.fpr: expected 8 arrays"),
    "no mp_state": (lambda k: k.pop("mp_state"), r"Kvm\.mp_state is missing"),
    "tsc_khz text": (
        _set("tsc_khz", "2.6GHz"),
        r"Kvm\.tsc_khz: expected an unsigned 32-bit integer, found a string",
    ),
    "bool as byte": (_poke("mp_state", 0, True), r"Kvm\.mp_state\[0\]: true/false is not in"),
}


@pytest.mark.skipif(NO_KVM is not None, reason=str(NO_KVM))
@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_vcpu_fields_are_refused_naming_the_place(one_saved: Saved, case: str) -> None:
    change, message = HOSTILE[case]
    state, fpu = one_saved
    data = _with_inner(vmm_files.ch_state_json({0: vmm_files.ch_vcpu_state(state, fpu)}), 0, change)
    with pytest.raises(ValueError, match=message) as info:
        ch.load(data)
    assert "state.json: snapshots.cpu-manager.snapshots.0.snapshot_data.state" in str(info.value)


def _tree(state_text: str, key: str = "0") -> bytes:
    leaf = {"snapshots": {}, "snapshot_data": {"state": state_text}}
    tree = {"snapshots": {"cpu-manager": {"snapshots": {key: leaf}, "snapshot_data": None}},
            "snapshot_data": None}  # fmt: skip
    return json.dumps(tree).encode()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", r"state\.json: expected an object at offset 0, found the end"),
        (b"[]", r"expected an object at offset 0, found '\['"),
        (b'{"snapshots":{}}', r"no cpu-manager snapshot"),
        (b'{"snap":{}}', r"no 'snapshots' member"),
        (b'{"snapshots":{"cpu-manager":{}}} x', r"text after the snapshot at offset 33"),
        (b'{"snapshots":{"cpu-manager":{}},"snapshots":{}}', r"the key 'snapshots' appears twice"),
        (b'{"snapshots":{"cpu-manager":{"snapshots":{}}}', r"expected ',' or '}' at offset"),
        (b'{"snapshots": NaN}', r"NaN is not JSON"),
        (
            b'{"snapshots":{"cpu-manager":' + b"[" * 100_000 + b"]" * 100_000 + b"}}",
            r"nested too deeply",
        ),
        (b'{"snapshots":"\xff"}', r"not UTF-8 at byte 14"),
        (_tree("{}", key="01"), r"snapshots\.01: a vCPU id must be a decimal number"),
        (_tree('{"Mshv":{}}'), r"expected a KVM vCPU state \(\{\"Kvm\": \.\.\.\}\), found Mshv"),
        (
            _tree('{"Kvm":' + "[" * 50_000 + "]" * 50_000 + "}"),
            r"snapshot_data\.state\.Kvm: nested too deeply",
        ),
        (_tree('{"Kvm":{}} {}'), r"text after the state at offset 11"),
        (
            _tree('{"Kvm":{"cpuid":1' + "9" * 5000 + "}}"),
            r"state\.Kvm: Exceeds the limit|Kvm\.cpuid: expected an array, found a number beyond",
        ),
    ],
)
def test_hostile_documents_are_refused_in_one_line(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        ch.load(data)
    assert "\n" not in str(info.value)


@pytest.mark.skipif(NO_KVM is not None, reason=str(NO_KVM))
def test_every_truncation_is_refused(one_saved: Saved) -> None:
    state, fpu = one_saved
    data = vmm_files.ch_state_json({0: vmm_files.ch_vcpu_state(state, fpu)})
    for cut in range(0, len(data), max(1, len(data) // 400)):
        with pytest.raises(ValueError):
            ch.load(data[:cut])


_SMALL = _tree(json.dumps({"Kvm": {"cpuid": [], "msrs": [{"index": 16, "data": 5}]}}))


@given(vmm_files.pokes(_SMALL))
@settings(max_examples=500, deadline=None)
def test_fuzz_mutations_give_value_errors(pokes: list[tuple[int, int]]) -> None:
    vmm_files.loads_or_refuses_in_one_line(ch.load, _SMALL, pokes)


# --- paths and detection --------------------------------------------------------------------------


@pytest.mark.skipif(NO_KVM is not None, reason=str(NO_KVM))
def test_paths_and_detection(saved: list[Saved], tmp_path: Path) -> None:
    data = _doc(saved)
    snapdir = tmp_path / "snap"
    snapdir.mkdir()
    (snapdir / "state.json").write_bytes(data)
    (snapdir / "config.json").write_text("{}")
    assert (
        ch.is_snapshot(data) and ch.is_snapshot(snapdir) and ch.is_snapshot(snapdir / "state.json")
    )
    assert ch.is_snapshot(memoryview(data))
    assert not ch.is_snapshot(snapdir / "config.json") and not ch.is_snapshot(tmp_path / "none")
    assert not ch.is_snapshot(b"KVMSTATE") and not ch.is_snapshot(42)  # type: ignore[arg-type]
    for source in (snapdir, snapdir / "state.json", str(snapdir)):
        snap = ch.load(source)
        assert snap.name == str(snapdir / "state.json") and snap.data == data
    assert ch.read_state_json(snapdir).keys() == {0, 1, 2}
    assert repr(ch.load(data)) == "Snapshot('state.json', vcpus=[0, 1, 2])"
    with pytest.raises(ValueError, match=str(snapdir / "state.json")):
        (snapdir / "state.json").write_bytes(data[:-1])
        ch.load(snapdir)
    with pytest.raises(TypeError, match="bytes or a path"):
        ch.load(3)  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError):
        ch.load(tmp_path / "none")


@pytest.mark.skipif(NO_KVM is not None, reason=str(NO_KVM))
def test_with_vcpu_refuses_what_it_cannot_place(saved: list[Saved]) -> None:
    snap = ch.load(_doc(saved))
    with pytest.raises(KeyError, match=r"has no vCPU 7 \(it has \[0, 1, 2\]\)"):
        snap.with_vcpu(7, snap.states()[0])
    with pytest.raises(TypeError, match="VcpuState"):
        snap.with_vcpu(0, "state")  # type: ignore[arg-type]
    state = snap.states()[0]
    state.lapic = None
    with pytest.raises(ValueError, match="needs lapic, absent here"):
        snap.with_vcpu(0, state)


def test_module_examples() -> None:
    import doctest

    result = doctest.testmod(ch)
    assert result.attempted >= 2 and result.failed == 0


# --- real nested state, in the emulated AMD guest -----------------------------------------


@pytest.mark.svm_guest
def test_guest_mode_state_through_a_file_into_a_fresh_vcpu() -> None:
    with contextlib.ExitStack() as stack:
        make, first, saved = svm_guest_saved(stack, stack.enter_context(kvmstate.Kvm()))
        assert saved.nested is not None
        data = vmm_files.ch_state_json(
            {0: vmm_files.ch_vcpu_state(saved, first.get_fpu(), nested=saved.nested.to_bytes())}
        )
        read = ch.read_state_json(data)[0]
        again = restored_in_a_fresh_vcpu(make, read, saved, ("regs", "sregs", "xsave", "lapic"))
        # Written back (the TSC has moved on), the nested state is the same bytes.
        out = ch.load(data).with_vcpu(0, again)
        assert _inner(out, 0)["nested_state"] == _inner(data, 0)["nested_state"]


def test_sizes_match_kvm_bindings() -> None:
    assert ch.NESTED_BUFFER_SIZE == 8320 == ctypes.sizeof(uapi.kvm_nested_state_header) + 8192
