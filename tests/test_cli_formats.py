"""The installed ``kvmstate`` command on the files VMMs write: QEMU, Cloud Hypervisor, crosvm.

The QEMU streams are real QEMU 7.2 vCPU records (tests/data/qemu-svm-cpu.json,
framed by tests/support/qemu_streams.py); the ``svm_guest`` test makes a
fresh stream with QEMU in the AMD guest, changes it with ``kvmstate
convert`` and has QEMU run it on. Cloud Hypervisor and crosvm files are
written per their serializers (tests/support/vmm_files.py) around vCPU
states saved from the real /dev/kvm. Expected values come from the
payload's constants, the kernel's structures or the files' own bytes,
never from the code under test.
"""

from __future__ import annotations

import dataclasses
import json
import re
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

import kvmstate
from kvmstate import uapi, vmcb
from kvmstate.check import Facts
from kvmstate.formats import qemu
from kvmstate.nested import HEADER_SIZE, SVM_MAX_SIZE, NestedState
from kvmstate.state import VcpuState
from kvmstate.uapi import NestedFlag, NestedFormat
from tests.support import qemu_payload, qemu_streams, vmm_files
from tests.test_cli import needs_script, run
from tests.test_qemu_stream import GuestRun, counter, resume
from tests.test_qemu_stream import guest_run as guest_run  # the fixture: QEMU in the AMD guest

CAP = qemu_streams.capture()
VMCB_PA = CAP["payload"]["VMCB"]
ONE_LINE = re.compile(r"kvmstate: error: [^\n]+\n")


def write(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def one_line_error(proc: object, *needles: str) -> None:
    """Exit status 2, nothing on stdout, one error line naming ``needles``, no traceback."""
    assert proc.returncode == 2, (proc.stdout, proc.stderr)  # type: ignore[attr-defined]
    assert proc.stdout == ""  # type: ignore[attr-defined]
    err = proc.stderr  # type: ignore[attr-defined]
    assert ONE_LINE.fullmatch(err), err
    assert "Traceback" not in err and "internal error" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)


@pytest.fixture
def stream(tmp_path: Path) -> str:
    return write(tmp_path, "vm.mig", qemu_streams.synthesize())


def real_vmcb12_page() -> bytes:
    """The vmcb12 page as QEMU sent it: the 4096 bytes after vmcb_pa in the cpu section."""
    cpu = next(d for d in CAP["devices"] if d["name"] == "cpu")
    body = bytes.fromhex(cpu["body"])
    name = b"cpu/kvm_nested_state/svm"
    at = body.index(bytes([len(name)]) + name) + 1 + len(name) + 4  # name, version
    assert int.from_bytes(body[at : at + 8], "big") == VMCB_PA
    return body[at + 8 : at + 8 + 4096]


# --- QEMU streams ------------------------------------------------------------------------


@needs_script
def test_decode_a_qemu_stream_by_field(stream: str) -> None:
    proc = run("decode", stream)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"{stream}: QEMU migration stream, 1 vCPU"
    assert lines[1] == (
        f"vcpu 0: NestedState(format=SVM, flags=GUEST_MODE|GIF_SET, size={SVM_MAX_SIZE}, "
        f"vmcb_pa={VMCB_PA:#x})"
    )
    assert f"  hdr.svm.vmcb_pa = {VMCB_PA:#x}" in lines
    assert "  vmcb12.control.asid = 1" in lines  # what the payload's L1 wrote
    # What QEMU does not migrate is absent, with the reason, not a plain 0.
    (gpat,) = [line for line in lines if line.startswith("  hdr.svm.gpat")]
    assert gpat.startswith("  hdr.svm.gpat = absent (") and "QEMU" in gpat
    assert any(line.startswith("  hdr.svm.flags: absent (") for line in lines)
    report = json.loads(run("decode", "--json", stream).stdout)
    assert report["source"] == "QEMU migration stream" and report["vcpu_count"] == 1
    (vcpu,) = report["vcpus"]
    assert vcpu["nested"]["fields"]["hdr.svm.vmcb_pa"] == VMCB_PA
    assert set(vcpu["absent_fields"]) == {"hdr.svm.flags", "hdr.svm.gpat"}


@needs_script
def test_check_a_qemu_stream_uses_its_registers(stream: str) -> None:
    # The stream's EFER (L2's, with SVME as the payload's VMCB sets it) answers the EFER rule;
    # SMM is not in the stream and CPUID is not migrated: --fact and --svm give them.
    proc = run("check", "--svm", "--fact", "in_smm=0", stream)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith(f"{stream} vcpu 0: no rule of KVM_SET_NESTED_STATE")
    assert "hdr.svm.flags, hdr.svm.gpat" in proc.stdout  # checked as QEMU restores them
    unsure = run("check", "--strict", stream)
    assert unsure.returncode == 1
    assert "depending on in_smm" in unsure.stdout and "depending on has_svm" in unsure.stdout
    assert "depending on efer" not in unsure.stdout
    report = json.loads(run("check", "--json", "--svm", stream).stdout)
    facts = report["vcpus"][0]["facts"]
    assert facts["efer"] & vmcb.EFER_SVME and facts["cr3"] == CAP["payload"]["PAGE_DIR"]
    assert facts["vendor"] == "svm" and facts["has_svm"] is True


@needs_script
def test_check_for_another_destination(stream: str) -> None:
    """The issue's example: would a kvm_intel 6.12 host take this SVM stream?"""
    proc = run("check", stream, "--vmx", "--fact", "kernel_version=6.12.0")
    assert proc.returncode == 1
    assert "refuses this state (1 problem: format)" in proc.stdout
    assert "takes only VMX nested state" in proc.stdout
    report = json.loads(
        run("check", "--json", stream, "--vmx", "--fact", "kernel_version=6.12").stdout
    )
    assert report["refused"] is True
    assert report["vcpus"][0]["facts"]["kernel_version"] == [6, 12]
    one_line_error(run("check", stream, "--fact", "kernel_versoin=6.12"), "unknown fact")
    one_line_error(run("check", stream, "--fact", "kernel_version=six"), "kernel_version")


@needs_script
def test_qemu_to_kernel_bytes_and_back(tmp_path: Path, stream: str) -> None:
    blob = str(tmp_path / "nested.bin")
    proc = run("convert", stream, blob, "--to", "kernel")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{blob}: nested-state blob of vcpu 0, {SVM_MAX_SIZE} bytes\n"
    raw = Path(blob).read_bytes()
    # The kernel's header (little-endian), then QEMU's vmcb12 page as it was sent.
    assert struct.unpack_from("<HHIQ", raw) == (0x101, 1, SVM_MAX_SIZE, VMCB_PA)
    assert raw[HEADER_SIZE:] == real_vmcb12_page()
    back = str(tmp_path / "back.mig")
    proc = run("convert", blob, back, "--to", "qemu", "--template", stream)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.endswith(f", identical to {stream}\n")
    assert Path(back).read_bytes() == Path(stream).read_bytes()


@needs_script
@pytest.mark.parametrize("kind", ["kvmstate", "json"])
def test_qemu_through_kvmstate_files_and_back(tmp_path: Path, stream: str, kind: str) -> None:
    saved = str(tmp_path / f"vm.{kind}")
    assert run("convert", stream, saved, "--to", kind).returncode == 0
    assert run("diff", stream, saved).stdout == "equal\n"
    back = str(tmp_path / "back.mig")
    proc = run("convert", saved, back, "--to", "qemu", "--template", stream)
    assert proc.returncode == 0, proc.stderr
    assert Path(back).read_bytes() == Path(stream).read_bytes()


@needs_script
def test_a_changed_nested_state_into_the_stream(tmp_path: Path, stream: str) -> None:
    blob = tmp_path / "nested.bin"
    assert run("convert", stream, str(blob), "--to", "kernel").returncode == 0
    state = NestedState.from_bytes(blob.read_bytes())
    assert state.vmcb12 is not None
    state.vmcb12.control.set_intercept(vmcb.INTERCEPT_IOIO_PROT)
    blob.write_bytes(state.to_bytes())
    out = str(tmp_path / "new.mig")
    proc = run("convert", str(blob), out, "--to", "qemu", "--template", stream)
    assert proc.returncode == 0 and "identical" not in proc.stdout
    old, new = Path(stream).read_bytes(), Path(out).read_bytes()
    assert len(new) == len(old) and sum(a != b for a, b in zip(old, new, strict=True)) == 1
    diff = run("diff", stream, out)
    assert diff.returncode == 1
    # arch/x86/include/asm/svm.h: INTERCEPT_IOIO_PROT = 3 * 32 + 27 (word 3, bit 27).
    assert diff.stdout == f"nested.vmcb12.control.intercepts[3]: 0 -> {1 << 27:#x}\n"


@needs_script
def test_two_vcpus_pick_one(tmp_path: Path) -> None:
    vm = write(tmp_path, "vm2.mig", qemu_streams.synthesize(2))
    decoded = run("decode", vm).stdout
    assert decoded.startswith(f"{vm}: QEMU migration stream, 2 vCPUs\n")
    assert decoded.count("vcpu 1: NestedState(") == 1
    blob = str(tmp_path / "n.bin")
    one_line_error(run("convert", vm, blob, "--to", "kernel"), "holds 2 vCPUs", "--vcpu")
    one_line_error(run("convert", vm, blob, "--to", "kernel", "--vcpu", "2"), "no vcpu 2", "0..1")
    assert not Path(blob).exists()
    assert run("convert", vm, blob, "--to", "kernel", "--vcpu", "1").returncode == 0
    out = str(tmp_path / "out.mig")
    proc = run("convert", blob, out, "--to", "qemu", "--template", vm, "--vcpu", "1")
    assert proc.returncode == 0 and Path(out).read_bytes() == Path(vm).read_bytes()
    one_line_error(run("convert", blob, out, "--to", "qemu", "--template", vm), "choose one")


@needs_script
def test_refusals_are_one_line_and_write_nothing(tmp_path: Path, stream: str) -> None:
    out = tmp_path / "out"
    one_line_error(run("convert", stream, str(out), "--to", "ch"), "--template")
    one_line_error(
        run("convert", stream, str(out), "--to", "qemu", "--template", str(tmp_path / "none")),
        "No such file",
    )
    blob = write(tmp_path, "n.bin", vmxon_only().to_bytes())
    one_line_error(
        run("convert", stream, str(out), "--to", "ch", "--template", blob),
        "n.bin: Cloud Hypervisor state.json: not UTF-8",
    )
    # QEMU's cpu section has no sregs in KVM's layout: crosvm needs them.
    one_line_error(run("convert", stream, str(out), "--to", "crosvm"), "sregs is absent")
    one_line_error(run("convert", stream, str(out), "--to", "kernel", "--lossy", "--header-only",
                       "keep"), "--header-only")  # fmt: skip
    one_line_error(run("convert", stream, str(tmp_path), "--to", "kernel"), "Is a directory")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["n.bin", "vm.mig"]


@needs_script
def test_a_vcpu_without_nested_state(tmp_path: Path, stream: str) -> None:
    header_only = NestedState(HEADER_SIZE)
    header_only.format, header_only.size = NestedFormat.VMX, HEADER_SIZE
    header_only.vmx.vmxon_pa = header_only.vmx.vmcs12_pa = (1 << 64) - 1
    blob = write(tmp_path, "none.bin", header_only.to_bytes())
    out = str(tmp_path / "vmx.mig")
    assert run("convert", blob, out, "--to", "qemu", "--template", stream).returncode == 0
    # QEMU sends no nested-state subsection for a VMX vCPU without VMXON.
    decoded = run("decode", out).stdout
    assert "VMX" in decoded and "hdr.vmx.flags = absent (" in decoded


# --- hostile files of each kind ----------------------------------------------------------


def _hostile_streams() -> list[tuple[str, bytes, str]]:
    data = qemu_streams.synthesize()
    cases = [
        ("qemu-magic-only", b"QEVM", "QEMU migration stream"),
        ("qemu-version", b"QEVM\0\0\0\x02", "version 3"),
        ("qemu-no-description", data[:9000], "VM description"),
        ("qemu-cut-in-ram", data[:100], "truncated"),
    ]
    for cut in (len(data) - 1, len(data) - 500, len(data) // 2, 4096):
        cases.append((f"qemu-cut-{cut}", data[:cut], "QEMU migration stream: offset"))
    lying = bytearray(data)
    at = lying.index(b"cpu/kvm_nested_state/svm") - 30
    lying[at : at + 4] = b"\xff\xff\xff\xff"
    cases.append(("qemu-bytes-flipped", bytes(lying), "QEMU migration stream"))
    return cases


@needs_script
@pytest.mark.parametrize(
    ("data", "needle"),
    [pytest.param(d, n, id=i) for i, d, n in _hostile_streams()],
)
def test_hostile_streams_are_refused_in_one_line(tmp_path: Path, data: bytes, needle: str) -> None:
    path = write(tmp_path, "bad.mig", data)
    for command in (["decode"], ["check"], ["convert", "--to", "kernel"]):
        args = [*command, path] + ([str(tmp_path / "out")] if command[0] == "convert" else [])
        one_line_error(run(*args), path, needle)
    one_line_error(run("diff", path, path), needle)


def test_hostile_cloud_hypervisor_and_crosvm_files(tmp_path: Path) -> None:
    cases = {
        "ch-truncated.json": (
            b'{"snapshots":{"cpu-manager":{"snapshots":{"0":',
            "Cloud Hypervisor",
        ),
        "ch-no-kvm.json": (
            b'{"snapshots":{"cpu-manager":{"snapshots":{"0":{"snapshots":{},'
            b'"snapshot_data":{"state":"{\\"Mshv\\":{}}"}}}}}}',
            "Kvm",
        ),
        "ch-old.json": (
            b'{"snapshots":{"cpu-manager":{"snapshots":{"0":{"snapshots":{},'
            b'"snapshot_data":[1,2]}}}}}',
            "before v39",
        ),
        "crosvm-truncated": (vmm_files.cbor({"vcpu_id": 0, "regs": {}})[:12], "crosvm"),
        "crosvm-missing": (vmm_files.cbor({"vcpu_id": 0, "regs": {}}), "missing"),
        "crosvm-json": (b'{"vcpu_id": 0}', "JSON, not CBOR"),
    }
    for name, (data, needle) in cases.items():
        path = write(tmp_path, name, data)
        kind = ["--from", "crosvm"] if name == "crosvm-json" else []
        one_line_error(run("decode", *kind, path), needle)
        one_line_error(run("convert", *kind, path, str(tmp_path / "o"), "--to", "json"), needle)
    # Forcing the wrong kind names what it expected.
    mig = write(tmp_path, "vm.mig", qemu_streams.synthesize())
    one_line_error(run("decode", "--from", "ch", mig), "Cloud Hypervisor state.json", "UTF-8")
    one_line_error(run("decode", "--from", "crosvm", mig), "crosvm vCPU snapshot")
    one_line_error(run("decode", "--from", "qemu", str(tmp_path / "ch-old.json")), "QEVM")
    assert not (tmp_path / "o").exists()


# --- Cloud Hypervisor and crosvm, around states of the real KVM -----------------------------


@dataclasses.dataclass
class Saved:
    states: list[VcpuState]
    fpus: list[uapi.kvm_fpu]


@pytest.fixture
def saved(kvm: kvmstate.Kvm) -> Iterator[Saved]:
    """Two vCPUs of a VM with an in-kernel irqchip, as both VMMs have, saved from KVM."""
    with kvm.create_vm() as vm:
        vm.create_irqchip()
        out = Saved([], [])
        for i in range(2):
            with vm.create_vcpu(i) as vcpu:
                vcpu.set_cpuid2(kvm.get_supported_cpuid())
                regs = vcpu.get_regs()
                regs.rip, regs.rbx = 0x7000 + i, 0x1234 + i
                vcpu.set_regs(regs)
                out.states.append(vcpu.save_state())
                out.fpus.append(vcpu.get_fpu())
        yield out


def svm_l2() -> NestedState:
    state = NestedState(SVM_MAX_SIZE)
    state.format, state.size = NestedFormat.SVM, SVM_MAX_SIZE
    state.flags = NestedFlag.GUEST_MODE | NestedFlag.GIF_SET
    state.svm.vmcb_pa = 0x5000
    assert state.vmcb12 is not None
    state.vmcb12.control.asid = 1
    return state


def vmxon_only() -> NestedState:
    state = NestedState(HEADER_SIZE)
    state.format, state.size = NestedFormat.VMX, HEADER_SIZE
    state.vmx.vmxon_pa, state.vmx.vmcs12_pa = 0x3000, (1 << 64) - 1
    return state


def ch_file(tmp_path: Path, saved: Saved) -> str:
    """vCPU 0 in guest mode (an 8320-byte buffer), vCPU 1 without nested state (null)."""
    vcpus = {
        0: vmm_files.ch_vcpu_state(saved.states[0], saved.fpus[0], nested=svm_l2().to_bytes()),
        1: vmm_files.ch_vcpu_state(saved.states[1], saved.fpus[1]),
    }
    return write(tmp_path, "state.json", vmm_files.ch_state_json(vcpus))


@needs_script
def test_cloud_hypervisor_decode_check_diff(tmp_path: Path, saved: Saved) -> None:
    doc = ch_file(tmp_path, saved)
    proc = run("decode", doc)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{doc}: Cloud Hypervisor state.json, 2 vCPUs\n")
    assert "vcpu 0: NestedState(format=SVM, flags=GUEST_MODE|GIF_SET, size=4224" in proc.stdout
    (null,) = [line for line in proc.stdout.splitlines() if line.startswith("vcpu 1:")]
    assert (
        null.startswith("vcpu 1: no nested state (nested_state is null") and "header-only" in null
    )
    # The snapshot directory stands for its state.json.
    assert run("decode", "--vcpu", "1", str(tmp_path)).stdout.startswith(f"{doc}: Cloud")
    checked = run("check", "--svm", doc).stdout
    assert f"{doc} vcpu 1: no nested state to check (nested_state is null" in checked
    # The file's CPUID (KVM's supported one) decides the SVM feature, not --svm.
    report = json.loads(run("check", "--json", "--svm", doc, "--vcpu", "0").stdout)
    cpuid = saved.states[0].cpuid
    assert cpuid is not None
    ecx = [e.ecx for e in cpuid.items() if e.function == 0x8000_0001]
    assert report["vcpus"][0]["facts"]["has_svm"] is bool(ecx and ecx[0] >> 2 & 1)  # CPUID.SVM
    assert report["vcpus"][0]["facts"]["vendor"] == "svm"  # what no file says
    saved_file = str(tmp_path / "vm.kvmstate")
    assert run("convert", doc, saved_file, "--to", "kvmstate").returncode == 0
    assert run("diff", doc, saved_file).stdout == "equal\n"
    diff = run(
        "diff", doc, write(tmp_path, "vcpu.kvmstate", saved.states[0].to_bytes()), "--vcpu", "0"
    )
    # What Cloud Hypervisor does not keep shows as a part only the saved vCPU has.
    assert "debugregs: absent (Cloud Hypervisor does not save KVM_GET_DEBUGREGS) -> present" in (
        diff.stdout
    )


@needs_script
def test_cloud_hypervisor_round_trips_byte_for_byte(tmp_path: Path, saved: Saved) -> None:
    doc = ch_file(tmp_path, saved)
    original = Path(doc).read_bytes()
    for kind in ("kvmstate", "json"):
        middle = str(tmp_path / f"mid.{kind}")
        args = ["--vcpu", "0"] if kind == "json" else []
        assert run("convert", doc, middle, "--to", kind, *args).returncode == 0
        out = str(tmp_path / f"out-{kind}.json")
        proc = run("convert", middle, out, "--to", "ch", "--template", doc)
        assert proc.returncode == 0, proc.stderr
        assert Path(out).read_bytes() == original
    # A changed nested state goes into vCPU 0's string and nowhere else.
    blob = tmp_path / "n.bin"
    assert run("convert", doc, str(blob), "--to", "kernel", "--vcpu", "0").returncode == 0
    assert blob.read_bytes() == svm_l2().to_bytes()
    state = NestedState.from_bytes(blob.read_bytes())
    state.svm.vmcb_pa = 0x6000
    blob.write_bytes(state.to_bytes())
    out = str(tmp_path / "new.json")
    assert (
        run("convert", str(blob), out, "--to", "ch", "--template", doc, "--vcpu", "0").returncode
        == 0
    )
    assert run("diff", doc, out).stdout == "vcpu[0].nested.hdr.svm.vmcb_pa: 0x5000 -> 0x6000\n"


@needs_script
def test_cloud_hypervisor_header_only_states(tmp_path: Path, saved: Saved) -> None:
    doc = ch_file(tmp_path, saved)
    blob = write(tmp_path, "vmxon.bin", vmxon_only().to_bytes())
    out = tmp_path / "out.json"
    common = ["convert", blob, str(out), "--to", "ch", "--template", doc, "--vcpu", "1"]
    one_line_error(run(*common), "header-only", "--header-only keep", "--header-only drop")
    assert not out.exists()
    kept = run(*common, "--header-only", "keep")
    assert kept.returncode == 0, kept.stderr
    assert "vcpu 1: NestedState(format=VMX, flags=0, size=128, vmxon_pa=0x3000" in (
        run("decode", str(out), "--vcpu", "1").stdout
    )
    dropped = run(*common, "--header-only", "drop")
    assert dropped.returncode == 0 and "stored as null" in dropped.stdout
    assert Path(out).read_bytes() == Path(doc).read_bytes()  # vCPU 1 was null already
    # A fresh vCPU's header-only state is stored as null without asking: nothing is lost.
    fresh = NestedState(HEADER_SIZE)
    fresh.format, fresh.size, fresh.flags = NestedFormat.SVM, HEADER_SIZE, NestedFlag.GIF_SET
    proc = run("convert", write(tmp_path, "gif.bin", fresh.to_bytes()), str(out), "--to", "ch",
               "--template", doc, "--vcpu", "1")  # fmt: skip
    assert proc.returncode == 0 and "a fresh vCPU's" in proc.stdout


@needs_script
def test_what_a_format_cannot_carry_is_refused_unless_lossy(tmp_path: Path, saved: Saved) -> None:
    doc = ch_file(tmp_path, saved)
    state = saved.states[0]
    assert state.debugregs is not None  # KVM_GET_DEBUGREGS: Cloud Hypervisor keeps none
    full = write(tmp_path, "vcpu.kvmstate", state.to_bytes())
    out = tmp_path / "out.json"
    proc = run("convert", full, str(out), "--to", "ch", "--template", doc)
    one_line_error(proc, "would not give back vcpu 0:", "debugregs", "--lossy")
    assert not out.exists()
    proc = run("convert", full, str(out), "--to", "ch", "--template", doc, "--lossy")
    assert proc.returncode == 0 and "debugregs" in proc.stderr and proc.stderr.count("\n") == 1
    regs = run("decode", "--json", str(out))
    assert regs.returncode == 0


@needs_script
def test_crosvm_fragments(tmp_path: Path, saved: Saved) -> None:
    state = saved.states[1]
    cap = 8320  # an Intel host's KVM_CAP_NESTED_STATE: the array's length
    nested = vmxon_only()
    buffer = nested.to_bytes().ljust(cap, b"\0")
    fragment = write(
        tmp_path, "vcpu1", vmm_files.cbor(vmm_files.crosvm_vcpu(state, vcpu_id=1, nested=buffer))
    )
    proc = run("decode", fragment)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{fragment}: crosvm vCPU snapshot, 1 vCPU\n")
    assert "vcpu 1: NestedState(format=VMX, flags=0, size=128, vmxon_pa=0x3000" in proc.stdout
    assert "  note: " in proc.stdout  # apic_base lives in the irqchip fragment
    one_line_error(run("decode", "--vcpu", "0", fragment), "no vcpu 0", "(1)")
    middle = str(tmp_path / "v.kvmstate")
    proc = run("convert", fragment, middle, "--to", "kvmstate")
    assert proc.returncode == 0 and proc.stdout.endswith(
        "  numbered by position in the file: vcpu 1 is vcpu 0\n"
    )
    for extra in ([], ["--template", fragment]):
        out = str(tmp_path / "out")
        proc = run("convert", middle, out, "--to", "crosvm", "--vcpu", "0", *extra)
        if not extra:  # the kvmstate file numbers by position: vcpu_id 0 then
            assert proc.returncode == 0, proc.stderr
            continue
        one_line_error(proc, "holds vcpu 1, not vcpu 0")
    json_file = str(tmp_path / "v.json")
    assert run("convert", fragment, json_file, "--to", "json").returncode == 0
    out = str(tmp_path / "again")
    proc = run("convert", fragment, out, "--to", "crosvm")
    assert proc.returncode == 0 and Path(out).read_bytes() == Path(fragment).read_bytes()
    blob = str(tmp_path / "n.bin")
    assert run("convert", fragment, blob, "--to", "kernel").returncode == 0
    assert Path(blob).read_bytes() == nested.to_bytes()  # exactly `size` bytes
    proc = run("convert", blob, out, "--to", "crosvm", "--template", fragment, "--vcpu", "1")
    assert proc.returncode == 0 and Path(out).read_bytes() == Path(fragment).read_bytes()


# --- --fact for any field -------------------------------------------------------------------


def test_a_facts_field_without_a_parser_parses_by_its_type() -> None:
    """A field a later change adds to Facts is settable from --fact text at once."""

    @dataclasses.dataclass(frozen=True, repr=False)
    class Later(Facts):
        tdp_mmu: bool | None = None
        vmcs12_revision: int | None = None
        quirks: frozenset[str] | None = None
        firmware: tuple[int, ...] | None = None
        limits: dict[int, int] | None = None

    facts = Later.from_strings(
        [("tdp_mmu", "yes"), ("vmcs12_revision", "0x11"), ("quirks", "a, b"),
         ("firmware", "1.16"), ("limits", "0x10:0x20")]
    )  # fmt: skip
    assert isinstance(facts, Later)  # from_strings builds the class it is called on
    assert (facts.tdp_mmu, facts.vmcs12_revision, facts.firmware) == (True, 0x11, (1, 16))
    assert facts.quirks == frozenset({"a", "b"}) and facts.limits == {0x10: 0x20}
    with pytest.raises(ValueError, match=r"fact vmcs12_revision='ten'"):
        Later.from_strings([("vmcs12_revision", "ten")])
    with pytest.raises(ValueError, match=r"unknown fact 'tdp'.*tdp_mmu"):
        Later.from_strings([("tdp", "1")])


@needs_script
def test_sniffing_and_from(tmp_path: Path, stream: str) -> None:
    blob = str(tmp_path / "n.bin")
    assert run("convert", stream, blob, "--to", "kernel").returncode == 0
    # A blob named like a stream is still a blob, and --from kernel says so.
    renamed = write(tmp_path, "looks.mig", Path(blob).read_bytes())
    assert run("decode", renamed).stdout.startswith("NestedState(format=SVM")
    assert run("decode", "--from", "kernel", renamed).returncode == 0
    # "QEVM" read as a header: format 0x4d56 ("VM", little-endian), which KVM never writes.
    one_line_error(
        run("decode", "--from", "kernel", stream), f"unknown nested state format {0x4D56}"
    )
    assert qemu_payload.VMCB == VMCB_PA  # the capture's constants are the payload's


# --- inside the AMD guest: a real stream, changed with the command, run on by QEMU -------------

#: arch/x86/include/uapi/asm/svm.h: the exit code of an intercepted IN/OUT.
SVM_EXIT_IOIO = 0x7B


@needs_script
@pytest.mark.svm_guest
def test_real_stream_through_the_command_runs_on(guest_run: GuestRun, tmp_path: Path) -> None:
    source = str(guest_run.source)
    data = guest_run.source.read_bytes()
    decoded = run("decode", source)
    assert decoded.returncode == 0, decoded.stderr
    assert decoded.stdout.startswith(f"{source}: QEMU migration stream, 1 vCPU\n")
    assert (
        f"vcpu 0: NestedState(format=SVM, flags=GUEST_MODE|GIF_SET, size={SVM_MAX_SIZE}, "
        f"vmcb_pa={qemu_payload.VMCB:#x})"
    ) in decoded.stdout
    assert "  vmcb12.control.asid = 1\n" in decoded.stdout
    assert "  hdr.svm.gpat = absent (" in decoded.stdout
    checked = run("check", "--svm", "--fact", "in_smm=0", source)
    assert checked.returncode == 0, checked.stdout
    # Kernel bytes and back: the same stream, byte for byte.
    blob = tmp_path / "nested.bin"
    assert run("convert", source, str(blob), "--to", "kernel").returncode == 0
    raw = blob.read_bytes()
    assert struct.unpack_from("<HHIQ", raw) == (0x101, 1, SVM_MAX_SIZE, qemu_payload.VMCB)
    assert data.count(raw[HEADER_SIZE:]) == 1  # QEMU's vmcb12 page, as it sent it
    same = tmp_path / "same.mig"
    assert (
        run("convert", str(blob), str(same), "--to", "qemu", "--template", source).returncode == 0
    )
    assert same.read_bytes() == data
    # vmcb12 gains the IOIO intercept: L2's next OUT exits to L1, which says so, goes on.
    state = NestedState.from_bytes(raw)
    assert state.vmcb12 is not None
    state.vmcb12.control.set_intercept(vmcb.INTERCEPT_IOIO_PROT)
    blob.write_bytes(state.to_bytes())
    changed = tmp_path / "changed.mig"
    proc = run("convert", str(blob), str(changed), "--to", "qemu", "--template", source)
    assert proc.returncode == 0, proc.stderr
    assert run("diff", source, str(changed)).stdout == (
        f"nested.vmcb12.control.intercepts[3]: 0 -> {1 << 27:#x}\n"
    )
    saved = counter(qemu.read(data))
    console, after = resume(guest_run, changed.read_bytes(), "cli-changed")
    exits = re.findall(r"L1 exit ([0-9a-f]{8}) next ([0-9a-f]{8})\n", console)
    assert len(exits) == 1 and int(exits[0][0], 16) == SVM_EXIT_IOIO, console
    after_exit = console[console.index("L1 exit") :]
    counts = [int(c, 16) for c in re.findall(r"L2 ([0-9a-f]{8})\n", after_exit)]
    assert counts and all(c > saved for c in counts), (saved, counts)
    # The stream QEMU wrote after running on: still in L2, one exit counted by L1.
    later = write(tmp_path, "later.mig", after)
    assert "flags=GUEST_MODE|GIF_SET" in run("decode", later).stdout
    print(f"timings {guest_run.timings}")


@needs_script
def test_files_larger_than_their_kind_holds_are_refused_unread(tmp_path: Path) -> None:
    from kvmstate import cli
    from kvmstate.formats import cloud_hypervisor

    for name, head, limit in (
        ("big.mig", b"QEVM\0\0\0\x03", cli.MAX_STREAM),
        ("big.json", b'{"snapshots":{"cpu-manager":{}}}', cloud_hypervisor.MAX_FILE_SIZE),
    ):
        path = tmp_path / name
        with path.open("wb") as f:  # sparse: no disk space, and never read
            f.write(head)
            f.truncate(limit + 1)
        one_line_error(run("decode", str(path)), "larger than", str(limit))


@needs_script
def test_svm_fills_in_only_what_the_file_does_not_say(tmp_path: Path) -> None:
    from tests.test_cli import kvmstate_file, no_svm_file, saved_vcpu
    from tests.test_cli import svm_l2 as l2

    path = no_svm_file(tmp_path)
    # The restore sets this CPUID: the vCPU lacks SVM whatever the destination's vendor.
    proc = run("check", "--svm", "--fact", "in_smm=0", str(path))
    assert proc.returncode == 1 and "EFER.SVME needs CPUID svm in the vCPU" in proc.stdout
    without = kvmstate_file(
        tmp_path, "no-cpuid.kvmstate", saved_vcpu(l2(asid=1), efer=vmcb.EFER_SVME)
    )
    proc = run("check", "--svm", "--fact", "in_smm=0", str(without))
    assert proc.returncode == 0 and "CPUID svm" not in proc.stdout, proc.stdout
