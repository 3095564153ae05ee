"""Tests of the Intel guest harness's own pieces (tests/guest/intel.py, Bochs), on the host.

What the harness does in a guest is checked for both vendors alike in
tests/test_guest_harness.py (one probe boot each, and the marked tests).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.guest import _common, intel

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "tests" / "guest" / "run"

needs_bochs = pytest.mark.skipif(
    shutil.which("bochs") is None,
    reason="bochs is not installed (apt-get install -y bochs bochsbios vgabios xorriso "
    "isolinux syslinux-common busybox-static)",
)


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


# --------------------------------------------------------------------------- --exchange DIR


def _exchange_out(directory: Path, disk: Path, stamp: Path, nonce: str, script: str) -> None:
    """Run the guest's own exchange functions (run.sh's) with the host's busybox sh:
    ``exchange_since`` before ``script``, ``exchange_out`` onto the file ``disk`` after."""
    disk.write_bytes(b"\0" * 4096)
    text = f"{intel.EXCHANGE_FUNCTIONS}NONCE={nonce}\nexchange_since {stamp}\n{script}\n"
    text += f"exchange_out {directory} {disk} {stamp}\n"
    busybox = str(_common.static_busybox())
    done = subprocess.run([busybox, "sh", "-c", text], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_exchange_goes_in_with_the_payload_at_its_own_path(tmp_path: Path) -> None:
    checkout, shared = tmp_path / "checkout", tmp_path / "shared"
    (shared / "sub").mkdir(parents=True)
    checkout.mkdir()
    (shared / "sub" / "in.txt").write_text("from the host\n")
    data = intel.payload("0123", ["true"], str(checkout), intel.Tree(), exchange=str(shared))
    entries = {name: body for name, _, _, body in intel.read_cpio(data[intel.BODY_OFFSET :])}
    assert entries[f"{intel.GUEST_ROOT}{shared}/sub/in.txt"] == b"from the host\n"
    script = entries["kvmstate/run.sh"].decode()
    assert f"EXCHANGE={shared}\n" in script and "KVMSTATE_GUEST_EXCHANGE=" in script
    assert intel.EXCHANGE_CALL in script and script.endswith("exchange_since /kvmstate/stamp\n")


def test_exchange_refuses_a_symlink_or_too_much_going_in(tmp_path: Path) -> None:
    checkout, shared = tmp_path / "checkout", tmp_path / "shared"
    checkout.mkdir()
    shared.mkdir()
    (shared / "link").symlink_to("elsewhere")
    with pytest.raises(_common.HarnessError, match=r"link is a symlink; only regular") as info:
        intel.payload("0123", ["true"], str(checkout), intel.Tree(), exchange=str(shared))
    assert info.value.status == _common.EXIT_BOOT
    (shared / "link").unlink()
    with (shared / "big").open("wb") as f:
        f.truncate(intel.DISK_BYTES)  # sparse: the payload reads zeros
    with pytest.raises(_common.HarnessError, match=r"--exchange .*shared \(64\.0 MiB of it\).* "
                       "too big for the Intel guest's transfer disk"):  # fmt: skip
        intel.payload("0123", ["true"], str(checkout), intel.Tree(), exchange=str(shared))


def test_exchange_brings_back_what_the_command_made_or_changed(tmp_path: Path) -> None:
    guest, host, disk, stamp = (tmp_path / n for n in ("guest", "host", "disk", "stamp"))
    (guest / "old").mkdir(parents=True)
    host.mkdir()
    for name in ("old/same", "changed"):
        (guest / name).write_text("as sent\n")
        os.utime(guest / name, (time.time() - 60, time.time() - 60))  # as the host wrote it
    os.utime(guest / "old", (time.time() - 60, time.time() - 60))
    _exchange_out(guest, disk, stamp, "n1", f"mkdir -p {guest}/new/deep && "
                  f"echo made > {guest}/new/deep/file && echo more >> {guest}/changed")  # fmt: skip
    intel.exchange_back(disk, "n1", str(host), 0)
    got = {str(p.relative_to(host)) for p in host.rglob("*")}
    assert got == {"new", "new/deep", "new/deep/file", "changed"}  # not old/ nor old/same
    assert (host / "new" / "deep" / "file").read_text() == "made\n"
    assert (host / "changed").read_text() == "as sent\nmore\n"
    with pytest.raises(_common.HarnessError, match="the guest wrote nothing back"):
        intel.exchange_back(disk, "another run's nonce", str(host), 0)


def test_exchange_refuses_too_much_or_a_bad_path_coming_back(tmp_path: Path) -> None:
    guest, host, disk, stamp = (tmp_path / n for n in ("guest", "host", "disk", "stamp"))
    guest.mkdir()
    host.mkdir()
    script = f"ln -s /etc/passwd {guest}/link && echo x > {guest}/fine"
    _exchange_out(guest, disk, stamp, "n2", script)
    with pytest.raises(_common.HarnessError, match="sent back link, a symlink") as info:
        intel.exchange_back(disk, "n2", str(host), 3)
    assert info.value.status == _common.EXIT_BOOT
    assert list(host.iterdir()) == []  # all checked before anything is written
    script = f"rm {guest}/link && dd if=/dev/zero of={guest}/big bs=1M count=64 2> /dev/null"
    _exchange_out(guest, disk, stamp, "n3", script)
    with pytest.raises(_common.HarnessError, match=r"take 64\.0 MiB as a cpio, more than the "
                       r"63 MiB .* none came back \(the command exited with 5\)"):  # fmt: skip
        intel.exchange_back(disk, "n3", str(host), 5)
    assert list(host.iterdir()) == []
    for name in ("../escape", "a/../../b", "a//b"):  # (the writer strips a leading /)
        archive = _common.Cpio()
        archive.file(name, b"x")
        with pytest.raises(_common.HarnessError, match="a path outside it"):
            intel.unpack_exchange(archive.finish(), str(host))
    archive = _common.Cpio()
    archive.char_device("tty", 5, 0)
    with pytest.raises(_common.HarnessError, match="sent back tty, not a regular file"):
        intel.unpack_exchange(archive.finish(), str(host))
    with pytest.raises(_common.HarnessError, match="a broken archive"):
        intel.unpack_exchange(b"070701garbage", str(host))
    assert list(host.iterdir()) == []


@needs_bochs
def test_exchange_carries_a_file_in_and_one_back(tmp_path: Path) -> None:
    """One boot of the saved 6.1 machine: a host file read inside, a file written and
    one changed there come back; an unchanged one is not sent back (still the host's)."""
    (tmp_path / "in.txt").write_text("from the host\n")
    (tmp_path / "kept.txt").write_text("kept\n")
    script = ('cd "$KVMSTATE_GUEST_EXCHANGE" && cat in.txt && echo back > out.txt && '
              "echo again >> in.txt")  # fmt: skip
    done = subprocess.run(
        [sys.executable, str(RUN), "--cpu", "intel", "--timeout", "3600",
         "--exchange", str(tmp_path), "--", "sh", "-c", script],
        cwd=REPO, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode == _common.EXIT_PREREQ:
        pytest.skip(f"guest prerequisites missing: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "from the host\n"
    assert (tmp_path / "out.txt").read_text() == "back\n"
    assert (tmp_path / "in.txt").read_text() == "from the host\nagain\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "kept.txt", "out.txt"]
