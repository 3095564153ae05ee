"""The installed ``kvmstate`` command, run as a user runs it."""

from __future__ import annotations

import array
import ctypes
import fcntl
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

import kvmstate
from kvmstate import snapshot, uapi, vmcb
from kvmstate.nested import HEADER_SIZE, SVM_MAX_SIZE, VMX_MAX_SIZE, NestedState
from kvmstate.state import VcpuState
from tests.kvm_fixtures import NO_KVM
from tests.support import states

# The script of the kvmstate under test: the one installed beside this interpreter (its
# venv need not be on PATH, where another install's script may be), else the one on PATH.
_BESIDE = Path(sys.executable).with_name("kvmstate")
KVMSTATE = str(_BESIDE) if _BESIDE.is_file() else shutil.which("kvmstate")
needs_script = pytest.mark.skipif(KVMSTATE is None, reason="the kvmstate script is not installed")
# fcntl's names for them (Python 3.10+); the values are Linux's.
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    assert KVMSTATE is not None
    return subprocess.run([KVMSTATE, *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def svm_blob(tmp_path: Path) -> Path:
    state = NestedState(SVM_MAX_SIZE)
    state.format = uapi.KVM_STATE_NESTED_FORMAT_SVM
    state.flags = uapi.NestedFlag.GUEST_MODE | uapi.NestedFlag.GIF_SET
    state.size = SVM_MAX_SIZE
    state.svm.vmcb_pa = 0x10000
    path = tmp_path / "svm.bin"
    path.write_bytes(state.to_bytes())
    return path


@needs_script
@pytest.mark.skipif(NO_KVM is not None, reason=str(NO_KVM))
def test_info_reports_this_kvm() -> None:
    proc = run("info", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    with open("/dev/kvm", "rb", buffering=0) as dev:
        import fcntl

        from kvmstate import ioctls

        size = fcntl.ioctl(dev.fileno(), ioctls.KVM_CHECK_EXTENSION, uapi.KVM_CAP_NESTED_STATE)
    assert data["api_version"] == 12 and data["nested_state_size"] == size
    if size == 0:
        assert "nested=1" in data["missing"]
    text = run("info").stdout
    assert f"KVM_CAP_NESTED_STATE: {size}" in text


@needs_script
def test_info_without_a_device_says_why() -> None:
    proc = run("info", "--device", "/nonexistent/kvm")
    assert proc.returncode == 1
    assert "not usable" in proc.stdout and "No such file" in proc.stdout


@needs_script
def test_decode_names_the_fields(svm_blob: Path) -> None:
    proc = run("decode", str(svm_blob))
    assert proc.returncode == 0, proc.stderr
    assert "format=SVM, flags=GUEST_MODE|GIF_SET, size=4224, vmcb_pa=0x10000" in proc.stdout
    assert "hdr.svm.vmcb_pa = 0x10000" in proc.stdout


@needs_script
def test_decode_json(svm_blob: Path) -> None:
    proc = run("decode", "--json", str(svm_blob))
    data = json.loads(proc.stdout)
    assert data["fields"]["hdr.svm.vmcb_pa"] == 0x10000
    assert data["decoded"]["flags"] == "GUEST_MODE|GIF_SET"


@needs_script
@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "truncated nested state: 0 bytes"),
        (bytes(64), "truncated nested state: 64 bytes"),
        (bytes([0, 0, 9, 0, 128, 0, 0, 0]) + bytes(120), "unknown nested state format 9"),
        (bytes([0, 0, 1, 0, 0x80, 0x10, 0, 0]) + bytes(120), "size field says 4224 bytes"),
    ],
    ids=["empty", "truncated", "unknown-format", "wrong-size"],
)
def test_decode_bad_files_is_one_line(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.bin"
    path.write_bytes(content)
    proc = run("decode", str(path))
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and message in proc.stderr
    assert "Traceback" not in proc.stderr


@needs_script
def test_decode_missing_and_huge_files(tmp_path: Path) -> None:
    proc = run("decode", str(tmp_path / "absent"))
    assert proc.returncode == 2 and "No such file" in proc.stderr
    huge = tmp_path / "huge.bin"
    huge.write_bytes(bytes((1 << 20) + 1))
    proc = run("decode", str(huge))
    assert proc.returncode == 2 and "larger than" in proc.stderr


def test_python_dash_m(svm_blob: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "kvmstate", "decode", str(svm_blob)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and "vmcb_pa=0x10000" in proc.stdout


# --- the exit status is the command's, whatever the pipe does ---------------------------------


def svm_l2(asid: int = 0) -> NestedState:
    """The valid SVM L2 state (tests/support/states.py) with this ASID (0 is refused)."""
    state = states.svm_guest()
    assert state.vmcb12 is not None
    state.vmcb12.control.asid = asid
    return state


@pytest.fixture
def pipe_cases(tmp_path: Path) -> dict[str, tuple[list[str], int | None]]:
    """Command lines and the status each must give (None: whatever it gives unpiped)."""
    refused = tmp_path / "asid0.bin"
    refused.write_bytes(svm_l2(asid=0).to_bytes())
    fixed = tmp_path / "asid1.bin"
    fixed.write_bytes(svm_l2(asid=1).to_bytes())
    vmx_full = NestedState(VMX_MAX_SIZE)
    vmx_full.format, vmx_full.size = uapi.KVM_STATE_NESTED_FORMAT_VMX, VMX_MAX_SIZE
    big = tmp_path / "vmx.bin"
    big.write_bytes(vmx_full.to_bytes())
    return {
        "check": (["check", "--svm", str(refused)], 1),
        "check-json": (["check", "--json", "--svm", str(refused)], 1),
        "diff": (["diff", str(refused), str(fixed)], 1),
        "diff-json": (["diff", "--json", str(refused), str(fixed)], 1),
        # More than a pipe and Python's buffer hold: the pipe breaks in mid-command.
        "decode": (["decode", "--all", str(big)], 0),
        "decode-bad": (["decode", str(tmp_path / "absent.bin")], 2),
        "info": (["info"], None),
        "help": (["--help"], 0),
    }


@needs_script
@pytest.mark.parametrize(
    "case", ["check", "check-json", "diff", "diff-json", "decode", "decode-bad", "info", "help"]
)
def test_status_survives_a_reader_that_is_gone(
    pipe_cases: dict[str, tuple[list[str], int | None]], case: str
) -> None:
    """stdout is a pipe whose reader has exited: EPIPE on the first write, status kept."""
    argv, status = pipe_cases[case]
    if status is None:
        status = run(*argv).returncode
    assert KVMSTATE is not None
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the command writes a byte
    try:
        proc = subprocess.run(
            [KVMSTATE, *argv], stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60
        )
    finally:
        os.close(write_end)
    assert proc.returncode == status, proc.stderr
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr
    if status != 2:
        assert proc.stderr == ""


@needs_script
@pytest.mark.parametrize("reader", ["true", "head -1", "head -c 1"])
@pytest.mark.parametrize("case", ["check", "diff", "decode", "info"])
def test_status_in_a_shell_pipeline(
    pipe_cases: dict[str, tuple[list[str], int | None]], case: str, reader: str
) -> None:
    """`kvmstate ... | head -1`: whenever head exits, bash's PIPESTATUS shows our status."""
    argv, status = pipe_cases[case]
    if status is None:
        status = run(*argv).returncode
    line = " ".join(shlex.quote(a) for a in [str(KVMSTATE), *argv])
    script = f'{line} | {reader} >/dev/null; echo "status=${{PIPESTATUS[0]}}"'
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == f"status={status}", proc.stderr
    assert proc.stderr == ""


@needs_script
@pytest.mark.parametrize(
    ("argv", "status"),
    [(["bogus"], 2), (["decode", "/nonexistent/x.bin"], 2), (["decode"], 2), (["--version"], 0)],
)
def test_status_survives_a_closed_stderr(argv: list[str], status: int) -> None:
    """Usage errors and error lines into a pipe whose reader is gone: the status is kept."""
    assert KVMSTATE is not None
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run(
            [KVMSTATE, *argv], stdout=subprocess.PIPE, stderr=write_end, text=True, timeout=60
        )
    finally:
        os.close(write_end)
    assert proc.returncode == status
    assert proc.stdout == (f"kvmstate {kvmstate.__version__}\n" if argv == ["--version"] else "")


@needs_script
def test_a_failed_write_is_an_error(tmp_path: Path) -> None:
    """Output to a full disk (/dev/full): not a traceback, not success."""
    blob = tmp_path / "asid1.bin"
    blob.write_bytes(svm_l2(asid=1).to_bytes())
    assert KVMSTATE is not None
    with open("/dev/full", "w") as full:
        proc = subprocess.run(
            [KVMSTATE, "decode", str(blob)], stdout=full, stderr=subprocess.PIPE, text=True
        )
    assert proc.returncode == 2
    assert proc.stderr == "kvmstate: error: writing the output failed: No space left on device\n"


@needs_script
def test_closed_stdout_keeps_the_status(tmp_path: Path) -> None:
    blob = tmp_path / "asid0.bin"
    blob.write_bytes(svm_l2(asid=0).to_bytes())
    script = f"{shlex.quote(str(KVMSTATE))} check --svm {shlex.quote(str(blob))} >&-"
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stderr) == (1, "")


@needs_script
def test_version_and_no_command() -> None:
    assert run("--version").stdout == f"kvmstate {kvmstate.__version__}\n"
    proc = run()
    assert proc.returncode == 2 and "required: command" in proc.stderr


# --- Ctrl-C -------------------------------------------------------------------------------


@needs_script
def test_ctrl_c_exits_130_quietly(tmp_path: Path) -> None:
    """SIGINT while the command writes into a pipe nobody reads: 130, nothing on stderr.

    The pipe holds one page and the output is several pages, so the command
    cannot finish before the signal: it is in its output loop or blocked in
    write() (and then must not block again in the exit-time flush).
    """
    state = NestedState(VMX_MAX_SIZE)
    state.format, state.size = uapi.KVM_STATE_NESTED_FORMAT_VMX, VMX_MAX_SIZE
    blob = tmp_path / "vmx.bin"
    blob.write_bytes(state.to_bytes())
    assert KVMSTATE is not None
    read_end, write_end = os.pipe()
    try:
        fcntl.fcntl(write_end, F_SETPIPE_SZ, 4096)
        capacity = fcntl.fcntl(write_end, F_GETPIPE_SZ)
        assert len(run("decode", "--all", str(blob)).stdout) > 2 * capacity
        proc = subprocess.Popen(
            [KVMSTATE, "decode", "--all", str(blob)], stdout=write_end, stderr=subprocess.PIPE
        )
        os.close(write_end)
        write_end = -1
        queued = array.array("i", [0])
        deadline = time.monotonic() + 60
        while not queued[0] and proc.poll() is None and time.monotonic() < deadline:
            fcntl.ioctl(read_end, termios.FIONREAD, queued)
            time.sleep(0.01)
        assert queued[0] > 0 and proc.poll() is None, "the command never wrote"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
    assert proc.returncode == 130
    assert err == b""


# --- file names any stream can print ------------------------------------------------------


@needs_script
def test_undecodable_names_under_an_ascii_locale(tmp_path: Path) -> None:
    """A name with byte 0xff, shown as \\xff where stdout is ASCII (LC_ALL=C, ascii)."""
    folder = os.fsencode(tmp_path)
    good = folder + b"/\xff\xe9t\xc3\xa9.bin"
    with open(good, "wb") as f:
        f.write(svm_l2(asid=0).to_bytes())
    missing = folder + b"/\xfe.bin"
    assert KVMSTATE is not None
    env = {**os.environ, "LC_ALL": "C", "PYTHONIOENCODING": "ascii"}
    shown = os.fsdecode(folder) + "/\\xff\\xe9t\\xe9.bin"
    for argv, status, where in (
        ([b"check", good], 1, "stdout"),
        ([b"diff", good, good], 0, "stdout"),
        ([b"decode", missing], 2, "stderr"),
        ([b"check", b"--json", missing], 2, "stderr"),
    ):
        proc = subprocess.run([KVMSTATE, *argv], capture_output=True, env=env, timeout=60)
        assert proc.returncode == status, proc
        assert b"Traceback" not in proc.stderr and b"Error" not in proc.stderr
        out = proc.stdout if where == "stdout" else proc.stderr
        assert out.isascii()
    proc = subprocess.run([KVMSTATE, b"check", good], capture_output=True, env=env, timeout=60)
    assert proc.stdout.decode().startswith(f"{shown}: KVM_SET_NESTED_STATE refuses")
    # UTF-8 streams keep é; an undecodable byte is still \xff.
    utf8 = {**os.environ, "LC_ALL": "C.UTF-8", "PYTHONIOENCODING": "utf-8"}
    proc = subprocess.run([KVMSTATE, b"check", good], capture_output=True, env=utf8, timeout=60)
    assert proc.stdout.decode().startswith(os.fsdecode(folder) + "/\\xff\\xe9té.bin: ")


@needs_script
def test_a_newline_in_a_name_stays_one_line(tmp_path: Path) -> None:
    proc = run("decode", str(tmp_path / "a\nb\x1b[31m"))
    assert proc.returncode == 2
    assert proc.stderr == f"kvmstate: error: {tmp_path}/a\\nb\\x1b[31m: No such file or directory\n"


# --- only regular files ---------------------------------------------------------------------


@needs_script
def test_non_regular_files_are_refused_at_once(tmp_path: Path) -> None:
    """A FIFO would block the read (nobody writes it); a device or socket is no saved state."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    server = socket.socket(socket.AF_UNIX)
    sock = tmp_path / "sock"
    server.bind(str(sock))
    try:
        cases = {
            str(fifo): "Is a FIFO, not a regular file",
            "/dev/null": "Is a character device, not a regular file",
            "/dev/zero": "Is a character device, not a regular file",
            str(sock): "Is a socket, not a regular file",
            str(tmp_path): "Is a directory",
        }
        for path, why in cases.items():
            for argv in (["decode", path], ["check", path], ["diff", path, path]):
                proc = run(*argv)  # a block would hit run()'s timeout
                assert proc.returncode == 2, proc
                assert proc.stderr == f"kvmstate: error: {path}: {why}\n"
    finally:
        server.close()


# --- decode shows everything ------------------------------------------------------------------


@needs_script
def test_decode_json_all_adds_the_hidden_fields(tmp_path: Path) -> None:
    state = NestedState(VMX_MAX_SIZE)
    state.format, state.size = uapi.KVM_STATE_NESTED_FORMAT_VMX, VMX_MAX_SIZE
    blob = tmp_path / "vmx.bin"
    blob.write_bytes(state.to_bytes())
    shown = json.loads(run("decode", "--json", str(blob)).stdout)["fields"]
    everything = json.loads(run("decode", "--json", "--all", str(blob)).stdout)["fields"]
    assert "hdr.vmx.pad" not in shown and "hdr.vmx.pad" in everything
    assert set(shown) < set(everything)
    # The text form's --all has the same fields.
    text = run("decode", "--all", str(blob)).stdout
    assert [f"  {path} = " in text for path in everything] == [True] * len(everything)


@needs_script
def test_decode_shows_what_diff_shows_past_the_last_page(tmp_path: Path) -> None:
    """A size that ends inside a page: the bytes after the last whole page are data too."""
    a = NestedState(SVM_MAX_SIZE + 8)
    a.format, a.size = uapi.KVM_STATE_NESTED_FORMAT_SVM, SVM_MAX_SIZE + 8
    b = a.copy()
    b.buffer[SVM_MAX_SIZE + 6] = 0x07
    pa, pb = tmp_path / "a.bin", tmp_path / "b.bin"
    pa.write_bytes(a.to_bytes())
    pb.write_bytes(b.to_bytes())
    assert run("diff", str(pa), str(pb)).stdout == "bytes[0x1086:0x1087]: 00 -> 07\n"
    tail = "bytes[0x1080:0x1088]"
    assert f"  {tail} = 0000000000000700" in run("decode", str(pb)).stdout.splitlines()
    assert f"  {tail} = 0000000000000000" in run("decode", str(pa)).stdout.splitlines()
    fields = json.loads(run("decode", "--json", str(pb)).stdout)["fields"]
    assert fields[tail] == "0000000000000700"


@needs_script
def test_decode_shows_what_diff_shows_in_the_header_union(tmp_path: Path) -> None:
    """Bytes of the 120-byte union past the vendor header: no field, still shown."""
    a = NestedState(HEADER_SIZE)
    a.format, a.size = uapi.KVM_STATE_NESTED_FORMAT_VMX, HEADER_SIZE
    b = a.copy()
    b.buffer[HEADER_SIZE - 1] = 0x5A
    pa, pb = tmp_path / "a.bin", tmp_path / "b.bin"
    pa.write_bytes(a.to_bytes())
    pb.write_bytes(b.to_bytes())
    assert run("diff", str(pa), str(pb)).stdout == "bytes[0x7f:0x80]: 00 -> 5a\n"
    # The union starts at byte 8; the VMX header in it is struct kvm_vmx_nested_state_hdr.
    start = 8 + ctypes.sizeof(uapi.kvm_vmx_nested_state_hdr)
    line = f"  bytes[{start:#x}:0x80] = " + "00" * (HEADER_SIZE - 1 - start) + "5a"
    assert line in run("decode", str(pb)).stdout.splitlines()
    # All zero: only --all shows it (it is padding then, like hdr.vmx.pad).
    assert "bytes[" not in run("decode", str(pa)).stdout
    assert f"  bytes[{start:#x}:0x80] = " + "00" * (HEADER_SIZE - start) in (
        run("decode", "--all", str(pa)).stdout.splitlines()
    )


# --- kvmstate's own files ----------------------------------------------------------------------


def kvmstate_file(tmp_path: Path, name: str, *states: VcpuState) -> Path:
    path = tmp_path / name
    path.write_bytes(snapshot.dumps_vm(list(states)))
    return path


def no_svm_file(tmp_path: Path) -> Path:
    """A KVMSTATE file of a valid SVM L2 (ASID 1, EFER.SVME) saved with a CPUID whose one
    leaf, 0x80000001, has ECX.SVM (bit 2) clear."""
    saved = saved_vcpu(svm_l2(asid=1), efer=vmcb.EFER_SVME)
    saved.cpuid = uapi.kvm_cpuid2.new(1)
    saved.cpuid.items()[0].function = 0x8000_0001
    return kvmstate_file(tmp_path, "no-svm.kvmstate", saved)


def saved_vcpu(nested: NestedState | None, efer: int = 0, why: str = "") -> VcpuState:
    """A saved vCPU (as VcpuState.to_bytes writes one) with this nested part and EFER."""
    state = VcpuState(regs=uapi.kvm_regs(), sregs=uapi.kvm_sregs(), msrs={0x174: 0})
    assert state.regs is not None and state.sregs is not None
    state.regs.rip = 0xFFF0
    state.sregs.efer = efer
    if nested is not None:
        state.nested = nested
    elif why:
        state.absent["nested"] = why
    return state


@needs_script
def test_decode_a_kvmstate_file(tmp_path: Path) -> None:
    path = tmp_path / "state.kvmstate"
    path.write_bytes(saved_vcpu(svm_l2(asid=1)).to_bytes())
    proc = run("decode", str(path))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"{path}: kvmstate file, 1 vCPU"
    assert lines[1] == (
        "vcpu 0: NestedState(format=SVM, flags=GUEST_MODE|GIF_SET, size=4224, vmcb_pa=0x10000)"
    )
    assert "  vmcb12.control.asid = 1" in lines
    data = json.loads(run("decode", "--json", str(path)).stdout)
    assert data["source"] == "kvmstate file" and data["vcpu_count"] == 1
    (vcpu,) = data["vcpus"]
    assert vcpu["vcpu"] == 0 and vcpu["nested"]["fields"]["vmcb12.control.asid"] == 1


@needs_script
def test_decode_the_json_form(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text(json.dumps(snapshot.to_dict(saved_vcpu(svm_l2(asid=3))), indent=1))
    proc = run("decode", str(path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == f"{path}: kvmstate JSON, 1 vCPU"
    assert "  vmcb12.control.asid = 3" in proc.stdout.splitlines()


@needs_script
def test_a_vcpu_without_nested_state_says_so(tmp_path: Path) -> None:
    path = kvmstate_file(
        tmp_path, "plain.kvmstate", saved_vcpu(None, why="KVM_CAP_NESTED_STATE is 0")
    )
    decoded = run("decode", str(path))
    assert decoded.returncode == 0
    assert decoded.stdout.splitlines()[1] == "vcpu 0: no nested state (KVM_CAP_NESTED_STATE is 0)"
    checked = run("check", str(path))
    assert (checked.returncode, checked.stdout) == (
        0,
        f"{path} vcpu 0: no nested state to check (KVM_CAP_NESTED_STATE is 0)\n",
    )
    data = json.loads(run("decode", "--json", str(path)).stdout)
    assert data["vcpus"] == [{"vcpu": 0, "nested": None, "absent": "KVM_CAP_NESTED_STATE is 0"}]
    silent = kvmstate_file(tmp_path, "silent.kvmstate", saved_vcpu(None))
    assert "no nested state (the file gives no reason)" in run("decode", str(silent)).stdout


@needs_script
def test_a_vm_file_and_vcpu_option(tmp_path: Path) -> None:
    vm = kvmstate_file(
        tmp_path, "vm.kvmstate", saved_vcpu(svm_l2(asid=1)), saved_vcpu(svm_l2(asid=2))
    )
    every = run("decode", str(vm)).stdout.splitlines()
    assert every[0] == f"{vm}: kvmstate file, 2 vCPUs"
    assert "  vmcb12.control.asid = 1" in every and "  vmcb12.control.asid = 2" in every
    second = run("decode", "--vcpu", "1", str(vm)).stdout.splitlines()
    assert "  vmcb12.control.asid = 2" in second and "  vmcb12.control.asid = 1" not in second
    assert second[1].startswith("vcpu 1: NestedState(")
    proc = run("decode", "--vcpu", "2", str(vm))
    assert proc.returncode == 2
    assert proc.stderr == f"kvmstate: error: {vm}: no vcpu 2: the file holds 2 vCPUs (0..1)\n"
    assert run("decode", "--vcpu", "-1", str(vm)).returncode == 2
    blob = tmp_path / "l2.bin"
    blob.write_bytes(svm_l2().to_bytes())
    proc = run("decode", "--vcpu", "0", str(blob))
    assert proc.returncode == 2 and "is a nested-state blob" in proc.stderr


@needs_script
def test_check_a_kvmstate_file_uses_its_saved_registers(tmp_path: Path) -> None:
    """The saved sregs are the vCPU's at KVM_SET_NESTED_STATE: EFER.SVME decides GUEST_MODE."""
    without = kvmstate_file(tmp_path, "no-svme.kvmstate", saved_vcpu(svm_l2(asid=1), efer=0))
    proc = run("check", "--svm", str(without))
    assert proc.returncode == 1
    assert proc.stdout.startswith(f"{without} vcpu 0: KVM_SET_NESTED_STATE refuses this state")
    assert "GUEST_MODE needs EFER.SVME set in the vCPU" in proc.stdout
    with_svme = kvmstate_file(
        tmp_path, "svme.kvmstate", saved_vcpu(svm_l2(asid=1), efer=vmcb.EFER_SVME)
    )
    proc = run("check", "--svm", "--fact", "in_smm=0", str(with_svme))
    assert "EFER.SVME" not in proc.stdout and "efer" not in proc.stdout
    # A --fact overrides what the file says.
    forced = run("check", "--svm", "--fact", "efer=0", "--fact", "in_smm=0", str(with_svme))
    assert forced.returncode == 1 and "GUEST_MODE needs EFER.SVME" in forced.stdout
    report = json.loads(run("check", "--json", "--svm", str(with_svme)).stdout)
    assert report["source"] == "kvmstate file"
    (vcpu,) = report["vcpus"]
    assert vcpu["facts"]["efer"] == vmcb.EFER_SVME and vcpu["facts"]["cr3"] == 0


@needs_script
def test_check_a_kvmstate_file_given_cpu_features_overrides_its_cpuid(tmp_path: Path) -> None:
    """A CPUID without SVM in the file; --fact cpu_features says the target has it."""
    path = no_svm_file(tmp_path)
    facts = ["--fact", "vendor=svm", "--fact", "in_smm=0"]
    proc = run("check", *facts, str(path))
    assert proc.returncode == 1 and "needs CPUID svm in the vCPU" in proc.stdout
    given = run("check", *facts, "--fact", "cpu_features=svm,lm,nx,pae,pse", str(path))
    assert "CPUID svm" not in given.stdout, given.stdout


@needs_script
def test_check_a_vm_file_refuses_if_any_vcpu_is_refused(tmp_path: Path) -> None:
    svme = vmcb.EFER_SVME
    vm = kvmstate_file(
        tmp_path,
        "vm.kvmstate",
        saved_vcpu(svm_l2(asid=1), efer=svme),
        saved_vcpu(svm_l2(asid=0), efer=svme),
    )
    proc = run("check", "--svm", "--fact", "in_smm=0", str(vm))
    assert proc.returncode == 1
    first, second = proc.stdout.split(f"{vm} vcpu 1: ")
    assert first == f"{vm} vcpu 0: no rule of KVM_SET_NESTED_STATE known to kvmstate is broken\n"
    assert second.startswith(
        "KVM_SET_NESTED_STATE refuses this state (1 problem: vmcb12.control.asid)"
    )
    only_first = run("check", "--svm", "--fact", "in_smm=0", "--vcpu", "0", str(vm))
    assert only_first.returncode == 0


@needs_script
def test_diff_whole_vcpu_states(tmp_path: Path) -> None:
    before = saved_vcpu(None, why="KVM_CAP_NESTED_STATE is 0")
    after = saved_vcpu(svm_l2(asid=1))
    assert after.regs is not None and after.msrs is not None
    after.regs.rip = 0x1000
    after.msrs[0x174] = 0x10
    after.msrs[0xC0000080] = 0x500
    a = kvmstate_file(tmp_path, "a.kvmstate", before)
    b = kvmstate_file(tmp_path, "b.kvmstate", after)
    proc = run("diff", str(a), str(b))
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.splitlines() == [
        "nested: absent (KVM_CAP_NESTED_STATE is 0) -> present",
        "regs.rip: 0xfff0 -> 0x1000",
        "msrs[0x174]: 0x0 -> 0x10",
        "msrs[0xc0000080]: absent -> 0x500",
    ]
    # The nested fields, when both have a nested part; the JSON form is the same state.
    later = saved_vcpu(svm_l2(asid=2))
    c = kvmstate_file(tmp_path, "c.kvmstate", later)
    j = tmp_path / "b.json"
    j.write_text(json.dumps(snapshot.to_dict(after)))
    assert run("diff", str(b), str(j)).stdout == "equal\n"
    nested = run("diff", str(c), str(j))
    assert "nested.vmcb12.control.asid: 2 -> 1" in nested.stdout.splitlines()
    data = json.loads(run("diff", "--json", str(a), str(b)).stdout)
    assert data["equal"] is False
    assert data["differences"][1] == {
        "path": "regs.rip",
        "a": 0xFFF0,
        "b": 0x1000,
        "a_text": "0xfff0",
        "b_text": "0x1000",
    }


@needs_script
def test_diff_vm_files_and_blobs(tmp_path: Path) -> None:
    one, two = saved_vcpu(svm_l2(asid=1)), saved_vcpu(svm_l2(asid=2))
    vm_a = kvmstate_file(tmp_path, "a.kvmstate", one, one)
    vm_b = kvmstate_file(tmp_path, "b.kvmstate", one, two)
    single = kvmstate_file(tmp_path, "one.kvmstate", one)
    assert run("diff", str(vm_a), str(vm_b)).stdout.splitlines() == [
        "vcpu[1].nested.vmcb12.control.asid: 1 -> 2"
    ]
    assert run("diff", "--vcpu", "0", str(vm_a), str(vm_b)).stdout == "equal\n"
    assert run("diff", "--vcpu", "1", str(vm_a), str(vm_b)).stdout.splitlines() == [
        "nested.vmcb12.control.asid: 1 -> 2"
    ]
    assert run("diff", str(vm_a), str(single)).stdout.splitlines() == ["vcpus: 2 vCPUs -> 1 vCPU"]
    # A blob against a kvmstate file: their nested states.
    blob = tmp_path / "l2.bin"
    blob.write_bytes(svm_l2(asid=2).to_bytes())
    assert run("diff", str(blob), str(single)).stdout == "vmcb12.control.asid: 2 -> 1\n"
    assert run("diff", "--vcpu", "1", str(blob), str(vm_b)).stdout == "equal\n"
    proc = run("diff", str(blob), str(vm_b))
    assert proc.returncode == 2
    assert proc.stderr == f"kvmstate: error: {vm_b}: holds 2 vCPUs: choose one with --vcpu N\n"
    plain = kvmstate_file(tmp_path, "plain.kvmstate", saved_vcpu(None, why="not offered"))
    assert run("diff", str(blob), str(plain)).stdout == "nested: present -> absent (not offered)\n"


@needs_script
@pytest.mark.parametrize(
    ("content", "message"),
    [
        (snapshot.MAGIC + b"\x02\x00\x00\x00", "kvmstate file: kvmstate file format 2.0"),
        (snapshot.MAGIC + b"\x01\x00\x00\x00", "a kvmstate file holding no vCPU"),
        (snapshot.MAGIC + b"\x01\x00\x00\x00\x04\x00vcpu" + b"\xff" * 8, "says 18446744"),
        (b'{"kvmstate": "1.0", "parts": {"regs": 5}}', "kvmstate JSON: regs: "),
        (b'{"kvmstate": "1.0", "parts": {"a\\nb": 5}}', "kvmstate JSON: a\\nb: unknown part"),
        (b'{"kvmstate": ', "starts like JSON but is not JSON"),
        (b"{" * 100000, "starts like JSON but is not JSON"),
        (b'{"x": "\xff"}', "not UTF-8 text"),
        (b"[1, 2]", "truncated nested state: 6 bytes"),
    ],
    ids=[
        "major-2",
        "no-vcpu",
        "record-too-long",
        "bad-part",
        "newline-in-key",
        "cut-json",
        "deep-json",
        "not-utf8",
        "json-list",
    ],
)
def test_bad_kvmstate_files_are_one_line(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.kvmstate"
    path.write_bytes(content)
    for command in ("decode", "check", "diff"):
        argv = [command, str(path)] + ([str(path)] if command == "diff" else [])
        proc = run(*argv)
        assert proc.returncode == 2, (command, proc)
        assert proc.stdout == ""
        assert proc.stderr.count("\n") == 1 and message in proc.stderr, (command, proc.stderr)
        assert "Traceback" not in proc.stderr
