"""Tests of the emulated-guest harness (tests/guest/run) and its pytest plugin.

These run on the host and boot the AMD guest themselves (about 7 s a boot),
so they are few: one probe shared by several tests, one timeout, one pytest
session through the plugin, plus the marked example below.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.guest import _common

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "tests" / "guest" / "run"
KVM_CHECK_EXTENSION = 0xAE03
KVM_CAP_NESTED_STATE = 157
NESTED_STATE_SIZE_SVM = 4224  # header (128) + vmcb12 (4096), on the guest's 6.1 kernel

needs_qemu = pytest.mark.skipif(
    shutil.which("qemu-system-x86_64") is None,
    reason="qemu-system-x86_64 is not installed (apt-get install -y qemu-system-x86)",
)


def harness(
    *args: str, cwd: Path = REPO, timeout: float | None = None
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, str(RUN), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
    )
    if done.returncode == _common.EXIT_PREREQ:
        pytest.skip(f"guest prerequisites missing: {done.stderr.strip()}")
    return done


# --------------------------------------------------------------------------- the marked example


@pytest.mark.svm_guest
def test_inside_amd_guest() -> None:
    assert os.environ["KVMSTATE_GUEST"] == "amd"
    fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    try:
        assert fcntl.ioctl(fd, KVM_CHECK_EXTENSION, KVM_CAP_NESTED_STATE) == NESTED_STATE_SIZE_SVM
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- one probe boot

PROBE = """
import fcntl, json, os, tempfile
fd = os.open("/dev/kvm", os.O_RDWR)
with tempfile.NamedTemporaryFile() as f:
    f.write(b"written")
    tmpfile = f.name
print(json.dumps({
    "cwd": os.getcwd(),
    "guest": os.environ.get("KVMSTATE_GUEST"),
    "tmpfile": tmpfile,
    "pycache": os.environ.get("PYTHONPYCACHEPREFIX"),
    "nested_state": fcntl.ioctl(fd, 0xAE03, 157),
}))
"""


@pytest.fixture(scope="module")
def probe() -> subprocess.CompletedProcess[str]:
    """One boot: a Python probe run through sh, which then exits 7, from tests/."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (apt-get install -y qemu-system-x86)")
    command = ["sh", "-c", '"$0" -c "$1" && exit 7', sys.executable, PROBE]
    return harness("--", *command, cwd=REPO / "tests")


def probed(probe: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert probe.stdout.count("\n") == 1, probe.stdout + probe.stderr
    result: dict[str, Any] = json.loads(probe.stdout)
    return result


def test_exit_status_is_the_commands(probe: subprocess.CompletedProcess[str]) -> None:
    assert probe.returncode == 7, probe.stderr


def test_cwd_is_kept(probe: subprocess.CompletedProcess[str]) -> None:
    assert probed(probe)["cwd"] == str(REPO / "tests")


def test_environment(probe: subprocess.CompletedProcess[str]) -> None:
    found = probed(probe)
    assert found["guest"] == "amd"
    assert found["pycache"] == _common.GUEST_PYCACHE  # bytecode is not written to the host
    assert found["tmpfile"].startswith(_common.GUEST_TMP + "/")


def test_kvm_inside_has_nested_state(probe: subprocess.CompletedProcess[str]) -> None:
    assert probed(probe)["nested_state"] == NESTED_STATE_SIZE_SVM


def test_stdout_is_only_the_commands_output(probe: subprocess.CompletedProcess[str]) -> None:
    probed(probe)  # exactly one line: the probe's
    # The harness speaks on stderr only, each line marked; on a cold cache it also says
    # what it downloads and unpacks, and the guest kernel's warnings are passed on.
    lines = probe.stderr.splitlines()
    assert all(line.startswith("kvmstate-guest: ") for line in lines), probe.stderr
    started = [line for line in lines if line.startswith("kvmstate-guest: AMD guest")]
    assert len(started) == 1, probe.stderr


# --------------------------------------------------------------------------- other boots


@needs_qemu
def test_timeout_gives_124() -> None:
    # A command that never ends: whether the guest had booted by then or not, the limit
    # ends the run. The subprocess bound only keeps a broken limit from hanging CI (it
    # leaves room for a cold cache, where the kernel is first downloaded).
    done = harness("--timeout", "3", "--", "sh", "-c", "while :; do sleep 1; done", timeout=900)
    assert done.returncode == _common.EXIT_TIMEOUT, done.stderr
    assert "kvmstate-guest: timed out after 3 s (" in done.stderr
    assert "the command was still running" in done.stderr or "had not booted" in done.stderr


@needs_qemu
def test_pytest_plugin_reports_guest_results(tmp_path: Path) -> None:
    """A pass, a skip and a failure inside the guest are those outcomes on the host."""
    ini = "[pytest]\nmarkers =\n    svm_guest: guest\n    vmx_guest: guest\n"
    (tmp_path / "pytest.ini").write_text(ini)
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["tests.guest.pytest_guest"]\n')
    (tmp_path / "test_plumbing.py").write_text(
        textwrap.dedent(
            """
            import os
            import pytest

            @pytest.mark.svm_guest
            def test_passes():
                assert os.environ["KVMSTATE_GUEST"] == "amd"

            @pytest.mark.svm_guest
            def test_skips():
                pytest.skip("a reason given inside")

            @pytest.mark.svm_guest
            def test_fails():
                assert os.environ["KVMSTATE_GUEST"] == "deliberately wrong"

            def test_on_host():
                assert "KVMSTATE_GUEST" not in os.environ
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if k != "KVMSTATE_GUEST"}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    out = done.stdout
    assert done.returncode == 1, out
    assert "1 failed, 2 passed, 1 skipped" in out
    assert "in the amd guest: a reason given inside" in out
    assert "deliberately wrong" in out  # the guest's assertion text
    assert "full amd guest output: " in out  # the log's path


# --------------------------------------------------------------------------- no boot


def test_help_documents_exit_statuses() -> None:
    done = subprocess.run(
        [sys.executable, str(RUN), "--help"], capture_output=True, text=True, check=True
    )
    for status in ("123", "124", "125"):
        assert f"\n  {status}  " in done.stdout


def test_console_filter_keeps_output_and_markers_apart() -> None:
    out = io.BytesIO()
    started: list[str] = []
    console = _common.ConsoleFilter("n0", out, started.append)
    stream = b"boot noise\r\nKVMSTATE-GUEST n0 start 6.1\noutput\nno newline"
    stream += b"KVMSTATE-GUEST n0 kmsg <4>[ 1.0] warned\nKVMSTATE-GUEST n0 exit 3\npoweroff\n"
    for i in range(len(stream)):  # byte by byte: markers split across reads
        console.feed(stream[i : i + 1])
    assert started == ["6.1"]
    assert out.getvalue() == b"output\nno newline"
    assert console.kernel_messages == ["<4>[ 1.0] warned"]
    assert console.exit_status == 3


def test_cpio_is_newc() -> None:
    cpio = _common.Cpio()
    cpio.file("init", b"#!/bin/sh\n", 0o755)
    archive = cpio.finish()
    assert archive.startswith(b"070701")
    assert len(archive) % 512 == 0
    assert b"init\0" in archive
    assert b"TRAILER!!!\0" in archive
