"""Drive a ``qemu-system-x86_64 -enable-kvm`` that boots a multiboot payload, through QMP.

Used inside the emulated AMD guest, whose KVM has nested SVM: the payload's
debug console (port 0xE9) goes to a file, QMP to a Unix socket, and
``migrate "exec:cat > FILE"`` writes a migration stream.

    with QemuVm(kernel, workdir) as vm:
        vm.wait_console(r"L2 ")
        vm.migrate_to(workdir / "a.mig")
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any

QEMU = "qemu-system-x86_64"


class QemuError(RuntimeError):
    """QEMU failed, answered a QMP error or did not get somewhere in time."""


class QemuVm:
    """One QEMU process: the payload as ``-kernel``, 32 MiB, one vCPU, ``-cpu host``.

    ``incoming``: a migration stream file to start from (``-incoming
    "exec:cat FILE"``) instead of booting. The console file is
    ``workdir/<name>.console``; QEMU's own stderr ``workdir/<name>.stderr``.
    """

    def __init__(
        self, kernel: Path, workdir: Path, name: str = "vm", incoming: Path | None = None
    ) -> None:
        self.workdir = workdir
        self.console = workdir / f"{name}.console"
        self.stderr = workdir / f"{name}.stderr"
        self.socket_path = workdir / f"{name}.qmp"
        for path in (self.console, self.socket_path):
            path.unlink(missing_ok=True)
        # The same machine on both ends of a migration: only -incoming differs.
        self.argv = [
            QEMU, "-enable-kvm", "-cpu", "host", "-m", "32", "-smp", "1",
            "-machine", "pc", "-nodefaults", "-nographic", "-no-reboot",
            "-kernel", str(kernel),
            "-debugcon", f"file:{self.console}",
            "-qmp", f"unix:{self.socket_path},server=on,wait=off",
        ]  # fmt: skip
        if incoming is not None:
            self.argv += ["-incoming", f"exec:cat {shlex.quote(str(incoming))}"]
        self._errfile = self.stderr.open("wb")
        self.process = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=self._errfile, stderr=self._errfile
        )
        self._sock: socket.socket | None = None
        self._buffer = b""
        try:
            self._connect()
        except BaseException:
            self.close()
            raise

    # --- QMP ------------------------------------------------------------------------
    def _connect(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            try:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(timeout)
                sock.connect(str(self.socket_path))
                break
            except OSError:
                sock.close()
                if time.monotonic() > deadline:
                    raise QemuError(f"no QMP socket after {timeout} s: {self.log()}") from None
                time.sleep(0.05)
        self._sock = sock
        self._read_message()  # the greeting
        self.command("qmp_capabilities")

    def _read_message(self) -> dict[str, Any]:
        assert self._sock is not None
        while b"\n" not in self._buffer:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise QemuError(f"QMP connection closed: {self.log()}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        message: dict[str, Any] = json.loads(line)
        return message

    def command(self, name: str, **arguments: Any) -> Any:
        """Run a QMP command; its ``return`` value, or QemuError with QEMU's error."""
        assert self._sock is not None
        request: dict[str, Any] = {"execute": name}
        if arguments:
            request["arguments"] = arguments
        self._sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            message = self._read_message()
            if "return" in message:
                return message["return"]
            if "error" in message:
                raise QemuError(f"{name}: {message['error']}")
            # Anything else is an asynchronous event: not what we wait for.

    # --- what the tests do ----------------------------------------------------------------
    def wait_status(self, *wanted: str, timeout: float = 120.0) -> str:
        """Poll ``query-status`` until the run state is one of ``wanted``."""
        deadline = time.monotonic() + timeout
        while True:
            status = str(self.command("query-status")["status"])
            if status in wanted:
                return status
            if time.monotonic() > deadline:
                raise QemuError(f"status {status}, not {wanted}, after {timeout} s")
            time.sleep(0.05)

    def read_console(self) -> str:
        try:
            return self.console.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_console(self, pattern: str, count: int = 1, timeout: float = 120.0) -> list[str]:
        """Wait until the console has ``count`` matches of ``pattern``; returns all matches."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            found = re.findall(pattern, self.read_console())
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise QemuError(
                    f"{len(found)} of {count} console lines matching {pattern!r} after "
                    f"{timeout} s; console: {self.read_console()[-500:]!r}; {self.log()}"
                )
            time.sleep(0.05)

    def migrate_to(self, path: Path, timeout: float = 120.0) -> float:
        """``migrate "exec:cat > path"`` and wait for it to complete; the seconds it took."""
        start = time.monotonic()
        self.command("migrate", uri=f"exec:cat > {shlex.quote(str(path))}")
        deadline = start + timeout
        while True:
            info = self.command("query-migrate")
            status = info.get("status")
            if status == "completed":
                return time.monotonic() - start
            if status in ("failed", "cancelled"):
                raise QemuError(f"migration {status}: {info}; {self.log()}")
            if time.monotonic() > deadline:
                raise QemuError(f"migration still {status} after {timeout} s")
            time.sleep(0.02)

    def log(self) -> str:
        """QEMU's stderr so far (for error messages)."""
        self._errfile.flush()
        text = self.stderr.read_text(errors="replace").strip()
        return f"QEMU stderr: {text[-2000:]!r}" if text else "QEMU stderr empty"

    def _check_alive(self) -> None:
        code = self.process.poll()
        if code is not None:
            raise QemuError(f"QEMU exited with {code}: {shlex.join(self.argv)}; {self.log()}")

    def close(self) -> None:
        """Quit QEMU (QMP ``quit``, then SIGKILL after 10 s) and close everything."""
        if self.process.poll() is None and self._sock is not None:
            with contextlib.suppress(OSError, QemuError):
                self.command("quit")
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        stuck = None
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                # Only a task stuck in the kernel outlives SIGKILL (KVM_RUN looping in
                # nested code): say so, rather than wait with it.
                stuck = (
                    f"QEMU (pid {self.process.pid}) still there 60 s after SIGKILL: {self.log()}"
                )
        self._errfile.close()
        self.socket_path.unlink(missing_ok=True)
        if stuck is not None:
            raise QemuError(stuck)

    def __enter__(self) -> QemuVm:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def available() -> str | None:
    """Why QEMU with KVM cannot run here, or None when it can."""
    from shutil import which

    if which(QEMU) is None:
        return f"{QEMU} is not installed"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not accessible"
    return None
