"""Tests of the Intel guest harness's own pieces (tests/guest/intel.py, Bochs), on the host.

What the harness does in a guest is checked for both vendors alike in
tests/test_guest_harness.py (one probe boot each, and the marked tests).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tests.guest import _common, intel

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "tests" / "guest" / "run"


def test_missing_bochs_is_status_123(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(tmp_path), "KVMSTATE_GUEST_CACHE": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, str(RUN), "--cpu", "intel", "--", "true"],
        cwd=REPO, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == _common.EXIT_PREREQ
    assert "apt-get install -y" in done.stderr
    assert "bochs" in done.stderr


def test_checkout_leaves_out_vcs_and_caches(tmp_path: Path) -> None:
    (tmp_path / "pkg" / "__pycache__").mkdir(parents=True)
    (tmp_path / "pkg" / "mod.py").write_text("x = 1\n")
    (tmp_path / "pkg" / "__pycache__" / "mod.cpython-311.pyc").write_bytes(b"")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref\n")
    (tmp_path / "link").symlink_to("pkg/mod.py")
    tree = intel.checkout_files(str(tmp_path), tmp_path / "no-cache")
    assert tree.files == {str(tmp_path / "pkg" / "mod.py")}
    assert tree.links == {str(tmp_path / "link"): "pkg/mod.py"}


def test_tree_keeps_symlinked_directories(tmp_path: Path) -> None:
    (tmp_path / "usr" / "lib").mkdir(parents=True)
    (tmp_path / "usr" / "lib" / "libx.so.1").write_bytes(b"\x7fELF")
    (tmp_path / "lib").symlink_to("usr/lib")
    tree = intel.Tree()
    tree.add(str(tmp_path / "lib" / "libx.so.1"))
    assert tree.links == {str(tmp_path / "lib"): "usr/lib"}
    assert tree.files == {str(tmp_path / "usr" / "lib" / "libx.so.1")}


def test_payload_header_and_size(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("print(1)\n")
    data = intel.payload("0123", ["python3", "a.py"], str(tmp_path), intel.Tree())
    magic, nonce, size, _epoch = data[:512].rstrip(b"\0").decode().split()
    assert (magic, nonce) == (intel.PAYLOAD_MAGIC, "0123")
    assert len(data) == intel.BODY_OFFSET + int(size)
    assert data[intel.BODY_OFFSET : intel.BODY_OFFSET + 6] == b"070701"  # cpio newc
    assert b"kvmstate/run.sh" in data


def test_saved_config_is_made_restorable(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text(
        'panic: action=ask, logio=fatal, ?=fatal\nsound: waveoutdrv=dummy\n'
        'ata0-master: type=cdrom, path="boot.iso", status=inserted\nlog: bochs.log\n'
        "plugin_ctrl: biosdev=true, usb_uhci=true, serial=true\n"
    )  # fmt: skip
    intel._sanitize_config(config)
    text = config.read_text()
    assert "panic: action=fatal\n" in text
    assert "?=" not in text
    assert "sound:" not in text
    restored = intel._restore_config(text, Path("/cache/e"), Path("/run"))
    assert 'path="/cache/e/boot.iso"' in restored
    assert "log: /run/bochs.log" in restored
    assert "plugin_ctrl: biosdev=true, serial=true, usb_uhci=true\n" in restored


def test_only_outdated_saved_machines_of_the_old_layout_are_pruned(tmp_path: Path) -> None:
    """intel/snapshot-* (before one directory per kernel series) go once unused for an
    hour; recent ones and the per-series directories stay."""
    old, recent = tmp_path / "snapshot-0123", tmp_path / "snapshot-4567"
    series = tmp_path / "6.12" / "snapshot-89ab"
    for d in (old, recent, series):
        d.mkdir(parents=True)
        (d / "memory.ram").write_bytes(b"")
    two_hours_ago = time.time() - 7200
    for d in (old, series, series.parent):
        os.utime(d, (two_hours_ago, two_hours_ago))
    intel._prune_unversioned(tmp_path)
    assert not old.exists()
    assert recent.is_dir() and series.is_dir()
