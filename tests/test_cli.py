"""The installed ``kvmstate`` command, run as a user runs it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvmstate import uapi
from kvmstate.nested import SVM_MAX_SIZE, NestedState
from tests.kvm_fixtures import NO_KVM

# The script of the kvmstate under test: the one installed beside this interpreter (its
# venv need not be on PATH, where another install's script may be), else the one on PATH.
_BESIDE = Path(sys.executable).with_name("kvmstate")
KVMSTATE = str(_BESIDE) if _BESIDE.is_file() else shutil.which("kvmstate")
needs_script = pytest.mark.skipif(KVMSTATE is None, reason="the kvmstate script is not installed")


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
