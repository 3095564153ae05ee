"""``kvmstate check``, ``kvmstate diff`` and ``decode``'s page fields, run as a user runs them."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvmstate import vmcs12 as vmx
from kvmstate.nested import VMX_MAX_SIZE, NestedState
from kvmstate.uapi import NestedFlag, NestedFormat
from tests.support.states import svm_guest

# The script of the kvmstate under test: the one installed beside this interpreter (its
# venv need not be on PATH, where another install's script may be), else the one on PATH.
_BESIDE = Path(sys.executable).with_name("kvmstate")
KVMSTATE = str(_BESIDE) if _BESIDE.is_file() else shutil.which("kvmstate")
pytestmark = pytest.mark.skipif(KVMSTATE is None, reason="the kvmstate script is not installed")

# What the emulated AMD guest's vCPU tells (see tests/test_check.py), as --fact options.
SVM_FACTS = [
    "--svm",
    "--fact", "efer=0x1000",
    "--fact", "cr0=0x60000010",
    "--fact", "cr3=0",
    "--fact", "in_smm=0",
    "--fact", "maxphyaddr=40",
    "--fact", "kernel_version=6.1.0-56-amd64",
    "--fact", "cpu_features=svm,lm,nx,pae,pse",
]  # fmt: skip


def run(*args: str) -> subprocess.CompletedProcess[str]:
    assert KVMSTATE is not None
    return subprocess.run([KVMSTATE, *args], capture_output=True, text=True, timeout=60)


def write(tmp_path: Path, name: str, state: NestedState | bytes) -> str:
    path = tmp_path / name
    path.write_bytes(state if isinstance(state, bytes) else state.to_bytes())
    return str(path)


def assert_one_error_line(proc: subprocess.CompletedProcess[str], *words: str) -> None:
    assert proc.returncode == 2, proc
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvmstate: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word in lines[0]


# --- check ---------------------------------------------------------------------------------


def test_check_valid_state_exits_0(tmp_path: Path) -> None:
    blob = write(tmp_path, "ok.bin", svm_guest())
    proc = run("check", blob, *SVM_FACTS)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout == f"{blob}: no rule of KVM_SET_NESTED_STATE known to kvmstate is broken\n"


def test_check_broken_state_explains_and_exits_1(tmp_path: Path) -> None:
    state = svm_guest()
    assert state.vmcb12 is not None
    state.vmcb12.control.asid = 0
    state.svm.vmcb_pa = 0x10008
    blob = write(tmp_path, "bad.bin", state)
    proc = run("check", blob, *SVM_FACTS)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == (
        f"{blob}: KVM_SET_NESTED_STATE refuses this state "
        "(2 problems: hdr.svm.vmcb_pa, vmcb12.control.asid):"
    )
    assert "  - vmcb12.control.asid = 0: the ASID must not be 0" in proc.stdout
    assert "[arch/x86/kvm/svm/nested.c: __nested_vmcb_check_controls]" in proc.stdout
    assert proc.stderr == ""


def test_check_json(tmp_path: Path) -> None:
    state = svm_guest()
    state.flags = NestedFlag.GIF_SET | NestedFlag.RUN_PENDING
    proc = run("check", "--json", write(tmp_path, "rp.bin", state), *SVM_FACTS)
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    assert report["refused"] is True
    assert report["facts"]["vendor"] == "svm" and report["facts"]["kernel_version"] == [6, 1, 0]
    (problem,) = report["problems"]
    assert problem["field"] == "flags" and problem["value"] == 0x102
    assert problem["value_text"] == "RUN_PENDING|GIF_SET"
    assert problem["certain"] is True and problem["rule_id"] == "run_pending_needs_guest_mode"
    assert problem["source"].startswith("arch/x86/kvm/x86.c")


def test_check_without_facts_reports_what_they_would_decide(tmp_path: Path) -> None:
    blob = write(tmp_path, "ok.bin", svm_guest())
    proc = run("check", blob)
    assert proc.returncode == 0, proc.stdout
    assert "no rule is surely broken, but the kernel may refuse this state:" in proc.stdout
    assert "  depending on efer:" in proc.stdout
    strict = run("check", "--strict", blob)
    assert strict.returncode == 1 and strict.stdout == proc.stdout


def test_check_vendor_option_decides_the_format(tmp_path: Path) -> None:
    blob = write(tmp_path, "svm.bin", svm_guest())
    proc = run("check", blob, "--vmx")
    assert proc.returncode == 1
    assert "takes only VMX nested state" in proc.stdout
    both = run("check", blob, "--vmx", "--svm")
    assert both.returncode == 2 and "not allowed with" in both.stderr


def test_check_reports_a_size_mismatch_as_a_problem(tmp_path: Path) -> None:
    blob = write(tmp_path, "long.bin", svm_guest().to_bytes() + b"\0" * 8)
    proc = run("check", blob, *SVM_FACTS)
    assert proc.returncode == 1
    assert "the size field says 4224 bytes but the saved state has 4232" in proc.stdout


def test_check_reports_an_unknown_format_as_a_problem(tmp_path: Path) -> None:
    state = svm_guest()
    state.format = 7
    proc = run("check", write(tmp_path, "fmt.bin", state))
    assert proc.returncode == 1
    assert re.search(r"  - format = (0x)?7: format must be 0 \(VMX\) or 1 \(SVM\)", proc.stdout)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--fact", "colour=blue"], ["unknown fact 'colour'"]),
        (["--fact", "maxphyaddr"], ["expected NAME=VALUE"]),
        (["--fact", "in_smm=perhaps"], ["in_smm", "yes/no"]),
        (["--fact", "vendor=arm"], ["vendor must be"]),
        (["--svm", "--fact", "vendor=vmx", "--fact", "vendor=svm"], ["given twice"]),
        # Registers and MSRs are u64, the capability a non-negative int: nothing is wrapped.
        (["--fact", "efer=-1"], ["fact efer is -1, outside 0..0xffffffffffffffff"]),
        (["--fact", "cr3=-1"], ["fact cr3 is -1, outside"]),
        (["--fact", "cr0=0x10000000000000000"], ["fact cr0 is 0x10000000000000000, outside"]),
        (["--fact", "feature_control=-0x5"], ["fact feature_control is -5"]),
        (["--fact", "nested_state_cap=-5"], ["fact nested_state_cap is -5, outside 0..2147483647"]),
        (["--fact", "maxphyaddr=-1"], ["fact maxphyaddr is -1, outside 0..64"]),
        (["--fact", "vmx_msrs=0x480:-1"], ["fact vmx_msrs[0x480] is -1"]),
        (["--fact", "vmx_msrs=0x100000000:1"], ["fact vmx_msrs index is 0x100000000"]),
        (["--fact", "kernel_version=6.-1"], ["kernel_version"]),
    ],
)
def test_check_bad_facts_are_one_error_line(
    tmp_path: Path, args: list[str], words: list[str]
) -> None:
    proc = run("check", write(tmp_path, "ok.bin", svm_guest()), *args)
    assert_one_error_line(proc, *words)


def test_check_unreadable_files(tmp_path: Path) -> None:
    assert_one_error_line(run("check", str(tmp_path / "none.bin")), "No such file")
    assert_one_error_line(run("check", str(tmp_path)), "Is a directory")
    short = write(tmp_path, "short.bin", b"\x01" * 40)
    assert_one_error_line(run("check", short), "truncated nested state: 40 bytes")
    big = write(tmp_path, "big.bin", b"\0" * ((1 << 20) + 1))
    assert_one_error_line(run("check", big), "larger than")


# --- diff -----------------------------------------------------------------------------------


def test_diff_equal_and_different(tmp_path: Path) -> None:
    a = write(tmp_path, "a.bin", svm_guest())
    changed = svm_guest()
    assert changed.vmcb12 is not None
    changed.vmcb12.control.asid = 2
    changed.flags = NestedFlag.GUEST_MODE
    b = write(tmp_path, "b.bin", changed)
    same = run("diff", a, a)
    assert (same.returncode, same.stdout) == (0, "equal\n")
    proc = run("diff", a, b)
    assert proc.returncode == 1
    assert proc.stdout.splitlines() == [
        "flags: GUEST_MODE|GIF_SET -> GUEST_MODE",
        "vmcb12.control.asid: 1 -> 2",
    ]


def test_diff_json(tmp_path: Path) -> None:
    header_only = NestedState(128)
    header_only.format, header_only.size, header_only.flags = 1, 128, NestedFlag.GIF_SET
    a = write(tmp_path, "a.bin", header_only)
    b = write(tmp_path, "b.bin", svm_guest())
    proc = run("diff", "--json", a, b)
    assert proc.returncode == 1
    data = json.loads(proc.stdout)
    assert data["equal"] is False
    assert [d["path"] for d in data["differences"]] == [
        "size",
        "flags",
        "hdr.svm.vmcb_pa",
        "vmcb12",
    ]
    assert data["differences"][-1]["a_text"] == "absent"
    same = json.loads(run("diff", "--json", a, a).stdout)
    assert same == {"equal": True, "differences": []}


def test_diff_bad_files(tmp_path: Path) -> None:
    a = write(tmp_path, "a.bin", svm_guest())
    assert_one_error_line(run("diff", a, str(tmp_path / "none.bin")), "none.bin")
    bad = write(tmp_path, "bad.bin", svm_guest().to_bytes()[:200])
    assert_one_error_line(run("diff", bad, a), "size field says 4224")


# --- decode shows both data pages by field name ------------------------------------------------


def test_decode_names_vmcb12_fields(tmp_path: Path) -> None:
    proc = run("decode", write(tmp_path, "svm.bin", svm_guest()))
    assert proc.returncode == 0, proc.stderr
    for line in (
        "  vmcb12.control.asid = 1",
        "  vmcb12.control.iopm_base_pa = 0x20000",
        "  vmcb12.save.efer = SVME",
        "  vmcb12.save.cr0 = PE|PG",
        "  vmcb12.save.cs.attrib = 0",
    ):
        assert line in proc.stdout.splitlines(), line


def test_decode_names_vmcs12_and_shadow_fields(tmp_path: Path) -> None:
    state = NestedState(VMX_MAX_SIZE)
    state.format = NestedFormat.VMX
    state.size = VMX_MAX_SIZE
    state.flags = NestedFlag.GUEST_MODE
    state.vmx.vmxon_pa, state.vmx.vmcs12_pa = 0x3000, 0x4000
    assert state.vmcs12 is not None and state.shadow_vmcs12 is not None
    state.vmcs12.hdr.revision_id = vmx.VMCS12_REVISION
    state.vmcs12.cpu_based_vm_exec_control = vmx.CPU_BASED_HLT_EXITING
    state.vmcs12.guest_rip = 0xFFF0
    state.shadow_vmcs12.hdr.shadow_vmcs = 1
    proc = run("decode", write(tmp_path, "vmx.bin", state))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for line in (
        "  hdr.vmx.vmcs12_pa = 0x4000",
        f"  vmcs12.hdr.revision_id = {vmx.VMCS12_REVISION:#x}",
        "  vmcs12.cpu_based_vm_exec_control = HLT_EXITING",
        "  vmcs12.guest_rip = 0xfff0",
        "  shadow_vmcs12.hdr.shadow_vmcs = 1",
    ):
        assert line in lines, line
    data = json.loads(run("decode", "--json", write(tmp_path, "vmx.bin", state)).stdout)
    assert data["fields"]["vmcs12.guest_rip"] == 0xFFF0
    assert data["decoded"]["vmcs12.cpu_based_vm_exec_control"] == "HLT_EXITING"


# --- check with the guest memory of a VM snapshot -------------------------------------------

_LINK = 0x8000  # a page of the snapshot's one memory slot


def _vm_file(tmp_path: Path, page_header: int | None) -> str:
    """A VM snapshot (file format 1.1) of one vCPU in VMX guest mode whose vmcs12 has a
    VMCS link pointer, and one 64 KiB slot at 0; ``page_header`` is the u32 written at
    the link pointer (a VMCS header: revision in bits 30:0, shadow bit 31), or None for
    a file of the vCPU alone (no memory)."""
    from kvmstate.state import VcpuState
    from kvmstate.vmstate import MemorySlot, VmLayout, VmState
    from tests.support.states import vmx_guest

    nested = vmx_guest()
    assert nested.vmcs12 is not None
    nested.vmcs12.vmcs_link_pointer = _LINK
    vcpu = VcpuState(nested=nested)
    path = tmp_path / "vm.kvmstate"
    if page_header is None:
        path.write_bytes(vcpu.to_bytes())
        return str(path)
    memory = bytearray(0x10000)
    memory[_LINK : _LINK + 4] = page_header.to_bytes(4, "little")
    layout = VmLayout(slots=(MemorySlot(0, 0, len(memory)),), vcpu_ids=(0,))
    VmState(layout=layout, memory=[memory], vcpus=[vcpu]).write(path)
    return str(path)


def _link_problems(path: str) -> list[dict[str, object]]:
    proc = run("check", "--json", path)
    assert proc.returncode in (0, 1), proc.stderr
    (vcpu,) = json.loads(proc.stdout)["vcpus"]
    problems: list[dict[str, object]] = vcpu["problems"]
    return [p for p in problems if p["field"] == "vmcs12.vmcs_link_pointer"]


def test_check_reads_a_vm_snapshots_memory_for_the_link_pointer(tmp_path: Path) -> None:
    """The page at the VMCS link pointer is read from the file's guest memory: a wrong
    revision there is surely refused, the right one (shadow bit clear, as vmcs12 has no
    VMCS shadowing) passes, and a file without memory leaves the rule undecided."""
    (wrong,) = _link_problems(_vm_file(tmp_path, vmx.VMCS12_REVISION + 1))
    assert wrong["certain"] is True and "revision" in str(wrong["rule"])
    assert _link_problems(_vm_file(tmp_path, vmx.VMCS12_REVISION)) == []
    (shadow_bit,) = _link_problems(_vm_file(tmp_path, vmx.VMCS12_REVISION | 1 << 31))
    assert shadow_bit["certain"] is True and "shadow bit 1" in str(shadow_bit["rule"])
    (unknown,) = _link_problems(_vm_file(tmp_path, None))
    assert unknown["certain"] is False and "memory" in str(unknown["needs"])
