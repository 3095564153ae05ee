"""Machinery shared by the emulated test guests (AMD: QEMU TCG, Intel: Bochs).

A guest is a stock Debian kernel plus a busybox initramfs whose ``/init`` loads
KVM with ``nested=1``, runs one command and reports its exit status on the
serial console. This module holds what does not depend on the emulator:

* exit statuses and messages (:data:`EXIT_PREREQ`, :data:`EXIT_TIMEOUT`,
  :data:`EXIT_BOOT`, :class:`HarnessError`, :func:`say`, :func:`debug`);
* host prerequisites (:func:`require_host`, :func:`require_tools`,
  :func:`static_busybox`);
* the cache (:func:`cache_dir`, :func:`cached_build`, :func:`cache_lock`);
* the kernel (:func:`prepare_kernel`);
* the initramfs (:class:`Cpio`, :func:`base_initramfs`, :func:`init_script`,
  :func:`run_script`, :func:`guest_env`);
* the console protocol and the emulator's lifetime (:class:`ConsoleFilter`,
  :func:`run_guest`).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import fcntl
import hashlib
import json
import lzma
import os
import re
import secrets
import select
import shlex
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

# The harness's own exit statuses (the command's status is passed through).
EXIT_PREREQ = 123  #: a host prerequisite is missing (package, tool, kernel .deb)
EXIT_TIMEOUT = 124  #: the guest did not finish within the timeout
EXIT_BOOT = 125  #: the guest could not be prepared or booted

#: Bumped when the layout of anything cached changes, so old entries are not reused.
CACHE_FORMAT = 4

#: Writable places inside the guest. A tmpfs on the chroot's ``/dev/shm`` (inside
#: the guest's own devtmpfs) hides nothing of the host's tree, unlike one on
#: ``/tmp``, where CI checkouts often live.
GUEST_SHM = "/dev/shm"
GUEST_TMP = GUEST_SHM + "/tmp"
GUEST_HOME = GUEST_SHM + "/home"
#: Python's bytecode cache (PYTHONPYCACHEPREFIX) inside the guest. Compiling
#: under emulation is slow: a warm cache makes a small pytest run about twice as fast.
GUEST_PYCACHE = GUEST_SHM + "/pycache"

#: Host environment variables passed on to the command.
FORWARDED_ENV = ("PATH", "VIRTUAL_ENV", "PYTHONPATH", "PYENV_ROOT", "PYENV_VERSION")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

#: The Debian kernels the guests boot, by series (``run --kernel``): the newest
#: package of the series in this flavour (``-cloud-`` lacks 9p). bookworm names
#: 6.1 by ABI (6.1.0-N) and its linux-6.12 (bookworm-security) by point release
#: (6.12.N+deb12). Their numbers are looked up, never pinned: the archive only
#: keeps recent ones.
KERNEL_PACKAGES = {
    "6.1": r"^linux-image-6\.1\.0-[0-9]+-amd64-unsigned$",
    "6.12": r"^linux-image-6\.12\.[0-9]+\+deb12-amd64-unsigned$",
}
#: The series booted when none is asked for.
DEFAULT_KERNEL = "6.1"
KERNEL_PACKAGE_RE = KERNEL_PACKAGES[DEFAULT_KERNEL]

#: Console marker; a random nonce per run keeps the command's output from faking it.
MARKER = "KVMSTATE-GUEST"

VERBOSE = False


class HarnessError(Exception):
    """A failure of the harness itself; ``status`` is the exit status to return."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def say(message: str) -> None:
    """Print a harness line on stderr (every line starts with ``kvmstate-guest:``)."""
    for line in message.splitlines() or [""]:
        sys.stderr.write(f"kvmstate-guest: {line}\n")
    sys.stderr.flush()


def debug(message: str) -> None:
    """:func:`say`, but only with ``run -v``."""
    if VERBOSE:
        say(message)


# --------------------------------------------------------------------------- prerequisites


def find_tool(name: str) -> str | None:
    """Find an executable in PATH, or in the sbin directories a non-root PATH lacks."""
    path = os.environ.get("PATH", DEFAULT_PATH) + ":/usr/sbin:/sbin"
    return shutil.which(name, path=path)


def missing_packages_error(packages: Iterable[str], what: str) -> HarnessError:
    """The 123 error for missing host packages, naming the install line."""
    names = " ".join(sorted(set(packages)))
    return HarnessError(
        EXIT_PREREQ, f"missing on the host: {what}\ninstall with: apt-get install -y {names}"
    )


def require_tools(tools: Mapping[str, str]) -> dict[str, str]:
    """Resolve each tool (name -> Debian package providing it) to its path.

    Raises a 123 :class:`HarnessError` naming every missing tool and the
    ``apt-get install`` line that provides them.
    """
    found: dict[str, str] = {}
    missing: dict[str, str] = {}
    for tool, package in tools.items():
        path = find_tool(tool)
        if path is None:
            missing[tool] = package
        else:
            found[tool] = path
    if missing:
        raise missing_packages_error(missing.values(), ", ".join(missing))
    return found


def require_host(tools: Mapping[str, str]) -> tuple[dict[str, str], Path]:
    """:func:`require_tools` and :func:`static_busybox` at once, so that one
    123 error names every missing package."""
    try:
        busybox: Path | None = static_busybox()
    except HarnessError:
        busybox = None
    missing = {tool: pkg for tool, pkg in tools.items() if find_tool(tool) is None}
    if busybox is None:
        missing["a static busybox"] = "busybox-static"
    if missing:
        raise missing_packages_error(missing.values(), ", ".join(missing))
    assert busybox is not None
    return require_tools(tools), busybox


def _is_static_elf(path: Path) -> bool:
    """True for an ELF64 executable without a PT_INTERP (dynamic loader) header."""
    with path.open("rb") as f:
        header = f.read(64)
        if len(header) < 64 or header[:5] != b"\x7fELF\x02":
            return False
        (phoff,) = struct.unpack_from("<Q", header, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", header, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    pt_interp = 3
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != pt_interp for i in range(phnum))


def static_busybox() -> Path:
    """The host's statically linked busybox (package busybox-static), or a 123 error.

    The dynamically linked ``busybox`` package would need a libc in the initramfs.
    """
    for candidate in ("/bin/busybox", "/usr/bin/busybox"):
        path = Path(candidate)
        if path.is_file() and _is_static_elf(path):
            return path
    raise missing_packages_error(["busybox-static"], "a statically linked busybox")


# --------------------------------------------------------------------------- cache


def cache_dir() -> Path:
    """``${KVMSTATE_GUEST_CACHE:-${XDG_CACHE_HOME:-~/.cache}/kvmstate-guest}``, created."""
    explicit = os.environ.get("KVMSTATE_GUEST_CACHE")
    if explicit:
        path = Path(explicit)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        path = Path(xdg) / "kvmstate-guest"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def cache_lock() -> Iterator[Path]:
    """Hold the cache's lock (harness runs may overlap); yields the cache directory.

    Also removes build directories left behind by killed runs.
    """
    root = cache_dir()
    with (root / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        yield root


def cache_key(*parts: object) -> str:
    """A short stable hash of JSON-able parts (the inputs of a cached build)."""
    blob = json.dumps([CACHE_FORMAT, *parts], sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_digest(path: Path) -> str:
    """sha256 of a file's content: a cache input that survives touch and reinstall."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cached_build(root: Path, name: str, build: Callable[[Path], None], family: str = "") -> Path:
    """Return ``root/name``, building it first with ``build(tmpdir)`` if absent.

    The build fills a temporary sibling that is renamed into place only when
    complete, so an interrupted build never looks like a cache hit. Entries
    named ``family*`` that have not been used for an hour (older inputs) are
    removed when a new one is built. Call it under :func:`cache_lock`.
    """
    final = root / name
    if final.is_dir():
        debug(f"cache hit: {final}")
        os.utime(final)  # marks it as in use, see the pruning below
        return final
    debug(f"building {final}")
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        build(tmp)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if family:
        for old in root.glob(family + "*"):
            if old != final and time.time() - old.stat().st_mtime > 3600:
                debug(f"removing the outdated {old}")
                shutil.rmtree(old, ignore_errors=True)
    return final


# --------------------------------------------------------------------------- kernel


@dataclasses.dataclass(frozen=True)
class Kernel:
    """An unpacked guest kernel: its image and the modules to load, in order."""

    release: str  #: ``uname -r``, e.g. ``6.1.0-56-amd64``
    vmlinuz: Path
    #: The decompressed kernel, kept if it can boot through PVH (QEMU's
    #: ``-kernel`` loads it directly): decompressing the xz bzImage under
    #: emulation takes half of the guest's boot time.
    vmlinux: Path | None
    modules: tuple[tuple[Path, str], ...]  #: (plain .ko file, insmod parameters)


def _apt(args: Sequence[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    debug("$ " + shlex.join(args))
    return subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL
    )


def _apt_update(series: str) -> None:
    if os.geteuid() != 0:
        raise HarnessError(
            EXIT_PREREQ,
            f"the apt package lists know no Debian kernel package of the {series} series "
            "and updating them needs root\nrun: apt-get update",
        )
    say("updating the apt package lists (apt-get update)")
    done = _apt(["apt-get", "update"])
    if done.returncode != 0:
        raise HarnessError(EXIT_PREREQ, "apt-get update failed:\n" + done.stderr.strip())


def _lists_stamp() -> int:
    # apt-get update renames new lists into this directory, changing its mtime.
    try:
        return Path("/var/lib/apt/lists").stat().st_mtime_ns
    except OSError:
        return 0


def _package_order(name: str) -> tuple[int, ...]:
    """Sort key of a kernel package name: its numbers in order (6.1.0-57 is
    (6, 1, 0, 57), 6.12.117+deb12 is (6, 12, 117, 12)), so the newest is the largest."""
    return tuple(int(n) for n in re.findall(r"\d+", name))


def _resolve_kernel_package(root: Path, series: str) -> tuple[str, str] | None:
    """(name, version) of the newest kernel package of ``series`` apt knows, or None.

    apt-cache takes ~1 s per call, so the answer is remembered (per series)
    until the package lists change.
    """
    pattern = KERNEL_PACKAGES[series]
    memo = root / f"kernel-package-{series}.json"
    stamp = _lists_stamp()
    with contextlib.suppress(OSError, ValueError, KeyError):
        known = json.loads(memo.read_text())
        if known["stamp"] == stamp and known["pattern"] == pattern:
            return str(known["name"]), str(known["version"])
    found = _apt(["apt-cache", "search", "--names-only", pattern])
    names = [line.split(" ", 1)[0] for line in found.stdout.splitlines() if line.strip()]
    # --names-only also searches the names a package provides: keep real names only.
    names = [n for n in names if re.match(pattern, n)]
    if not names:
        return None
    name = max(names, key=_package_order)
    shown = _apt(["apt-cache", "show", "--no-all-versions", name])
    version = re.search(r"^Version: (\S+)$", shown.stdout, re.MULTILINE)
    if version is None:
        return None
    memo.write_text(
        json.dumps({"stamp": stamp, "pattern": pattern, "name": name, "version": version[1]})
    )
    return name, version[1]


def _deb_path(root: Path, name: str, version: str) -> Path:
    return root / "debs" / f"{name}_{version.replace(':', '%3a')}_amd64.deb"


def _download(root: Path, name: str, version: str, series: str) -> Path | None:
    deb = _deb_path(root, name, version)
    if deb.is_file():
        return deb
    deb.parent.mkdir(exist_ok=True)
    say(f"downloading {name} {version} (70-110 MB, once)")
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        # Readable by apt's _apt sandbox user, which otherwise warns.
        tmp.chmod(0o755)
        done = _apt(["apt-get", "download", f"{name}={version}"], cwd=tmp)
        got = list(tmp.glob("*.deb"))
        if done.returncode != 0 or len(got) != 1:
            debug(done.stderr.strip())
            return None
        got[0].rename(deb)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # Older packages of the same series only: each series keeps its newest.
    for old in deb.parent.glob("*.deb"):
        if old != deb and re.match(KERNEL_PACKAGES[series], old.name.split("_", 1)[0]):
            old.unlink(missing_ok=True)
    return deb


def _module_order(tree: Path, release: str, modules: Sequence[str], modprobe: str) -> list[Path]:
    """The .ko files to insmod, dependencies first, as modprobe resolves them."""
    done = subprocess.run(
        [modprobe, "-d", str(tree), "-S", release, "--show-depends", "-a", *modules],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise HarnessError(
            EXIT_BOOT,
            f"modprobe cannot resolve {' '.join(modules)} in kernel {release}:\n"
            + done.stderr.strip(),
        )
    order: list[Path] = []
    for line in done.stdout.splitlines():
        words = line.split()
        if words[:1] == ["insmod"]:  # "builtin NAME" lines need nothing
            path = Path(words[1])
            if not path.is_file():  # modprobe -d names files with or without DIR
                path = tree / path.relative_to("/")
            if path not in order:
                order.append(path)
    return order


def prepare_kernel(
    modules: Sequence[str], params: Mapping[str, str], series: str = DEFAULT_KERNEL
) -> Kernel:
    """Download and unpack (once) the newest kernel of ``series`` (a key of
    :data:`KERNEL_PACKAGES`), keeping its image and the given modules with
    their dependencies.

    ``modules`` are modprobe names (``kvm-amd``, ``9p``); ``params`` maps a
    module's name (``kvm_amd``) to its insmod parameters (``nested=1``).
    The package is fetched with ``apt-get download`` (``apt-get update`` is run
    only when apt knows no such package or the download fails), unpacked with
    ``dpkg-deb -x`` and indexed with ``depmod -b``. Without network an
    already unpacked kernel of the series is used. Raises 123 if no kernel
    of the series can be had, naming the apt line to try.
    """
    if series not in KERNEL_PACKAGES:
        known = ", ".join(KERNEL_PACKAGES)
        raise HarnessError(EXIT_BOOT, f"no kernel series {series!r} (known: {known})")
    tools = require_tools(
        {"apt-get": "apt", "apt-cache": "apt", "dpkg-deb": "dpkg", "depmod": "kmod",
         "modprobe": "kmod"}
    )  # fmt: skip
    # The family (same series and modules, any package or format) is what pruning
    # replaces: a new 6.12 never removes the 6.1 kernel.
    wanted = json.dumps([series, sorted(modules), params], sort_keys=True).encode()
    family = f"kernel-{hashlib.sha256(wanted).hexdigest()[:12]}-"
    suffix = f"-f{CACHE_FORMAT}"
    with cache_lock() as root:
        for attempt in range(2):
            resolved = _resolve_kernel_package(root, series)
            if resolved is not None:
                name, version = resolved
                entry = root / f"{family}{name}_{version.replace(':', '%3a')}{suffix}"
                deb = None if entry.is_dir() else _download(root, name, version, series)
                if deb is not None or entry.is_dir():
                    entry = cached_build(
                        root,
                        entry.name,
                        lambda out: _unpack_kernel(deb, out, modules, params, tools),  # noqa: B023
                        family,
                    )
                    return _load_kernel(entry)
            unpacked = sorted(root.glob(f"{family}*{suffix}"), key=lambda p: p.stat().st_mtime)
            if unpacked:
                debug(f"apt cannot give the kernel package; using {unpacked[-1]}")
                return _load_kernel(unpacked[-1])
            if attempt == 0:
                _apt_update(series)
    pattern = KERNEL_PACKAGES[series]
    raise HarnessError(
        EXIT_PREREQ,
        f"cannot download a Debian kernel package of the {series} series matching "
        f"{pattern} (needs a bookworm apt source, with bookworm-security for 6.12, "
        f"and network)\ntry: apt-get update && apt-cache search --names-only '{pattern}'",
    )


def _unpack_kernel(
    deb: Path | None,
    out: Path,
    modules: Sequence[str],
    params: Mapping[str, str],
    tools: Mapping[str, str],
) -> None:
    assert deb is not None
    try:
        _unpack_kernel_tree(deb, out, modules, params, tools)
    except subprocess.CalledProcessError as error:
        deb.unlink(missing_ok=True)  # most likely damaged: download it again next time
        raise HarnessError(EXIT_BOOT, f"cannot unpack {deb.name}: {error}") from error


def _unpack_kernel_tree(
    deb: Path,
    out: Path,
    modules: Sequence[str],
    params: Mapping[str, str],
    tools: Mapping[str, str],
) -> None:
    tree = out / "tree"
    say(f"unpacking {deb.name}")
    # Killed with the harness, so that it does not write into a removed build.
    subprocess.run(
        [tools["dpkg-deb"], "-x", str(deb), str(tree)], check=True, preexec_fn=_die_with_parent
    )
    releases = [p.name for p in (tree / "lib" / "modules").iterdir()]
    if len(releases) != 1:
        raise HarnessError(EXIT_BOOT, f"{deb.name}: modules for {releases}")
    release = releases[0]
    subprocess.run([tools["depmod"], "-b", str(tree), release], check=True)
    (out / "modules").mkdir()
    lines = []
    for i, ko in enumerate(_module_order(tree, release, modules, tools["modprobe"])):
        base = ko.name.split(".ko")[0]
        data = ko.read_bytes()
        if ko.name.endswith(".ko.xz"):
            data = lzma.decompress(data)  # busybox's insmod wants plain modules
        elif not ko.name.endswith(".ko"):
            raise HarnessError(EXIT_BOOT, f"unsupported module compression: {ko.name}")
        target = f"{i:02d}-{base}.ko"
        (out / "modules" / target).write_bytes(data)
        lines.append(f"{target} {params.get(base.replace('-', '_'), '')}".rstrip())
    (out / "modules" / "order").write_text("".join(line + "\n" for line in lines))
    shutil.copyfile(tree / "boot" / f"vmlinuz-{release}", out / "vmlinuz")
    config = (tree / "boot" / f"config-{release}").read_text()
    if "\nCONFIG_PVH=y\n" in config:
        (out / "pvh").touch()  # a vmlinux of it can boot directly: see _add_vmlinux
        _add_vmlinux(out)
    (out / "release").write_text(release + "\n")
    shutil.rmtree(tree)


def _add_vmlinux(entry: Path) -> None:
    """Keep the decompressed kernel of a PVH-capable entry that lacks it: one unpacked
    while a tool was missing (zstd) gets it once the tool is there."""
    target = entry / "vmlinux"
    if target.is_file() or not (entry / "pvh").is_file():
        return
    vmlinux = _extract_vmlinux(entry / "vmlinuz")
    if vmlinux is not None:
        tmp = entry / "vmlinux.tmp"
        tmp.write_bytes(vmlinux)
        tmp.replace(target)


def _load_kernel(entry: Path) -> Kernel:
    _add_vmlinux(entry)
    order = []
    for line in (entry / "modules" / "order").read_text().splitlines():
        ko, _, args = line.partition(" ")
        order.append((entry / "modules" / ko, args))
    vmlinux = entry / "vmlinux"
    return Kernel(
        (entry / "release").read_text().strip(),
        entry / "vmlinuz",
        vmlinux if vmlinux.is_file() else None,
        tuple(order),
    )


def _bzimage_payload(data: bytes) -> bytes | None:
    """The compressed kernel of a bzImage, per its setup header (boot protocol 2.08+:
    ``payload_offset`` at 0x248 and ``payload_length`` at 0x24c, from the start of
    the protected-mode code, which follows ``setup_sects`` + 1 sectors)."""
    if len(data) < 0x250 or data[0x202:0x206] != b"HdrS":
        return None
    (protocol,) = struct.unpack_from("<H", data, 0x206)
    if protocol < 0x208:
        return None
    setup_sects = data[0x1F1] or 4
    offset, length = struct.unpack_from("<II", data, 0x248)
    start = (setup_sects + 1) * 512 + offset
    return data[start : start + length] if start + length <= len(data) else None


def _extract_vmlinux(bzimage: Path) -> bytes | None:
    """The ELF kernel inside an xz (6.1) or zstd (6.12) compressed bzImage, or None
    (zstd needs the zstd tool: Python 3.11 has no zstd module)."""
    payload = _bzimage_payload(bzimage.read_bytes())
    if payload is None:
        return None
    elf = b""
    if payload.startswith(b"\xfd7zXZ\x00"):
        with contextlib.suppress(lzma.LZMAError):
            elf = lzma.LZMADecompressor().decompress(payload)
    elif payload.startswith(b"\x28\xb5\x2f\xfd"):
        zstd = find_tool("zstd")
        if zstd is None:
            debug("no zstd tool (package zstd): the guest boots the compressed kernel")
            return None
        # The build appends the decompressed size (4 bytes) after the zstd frame.
        done = subprocess.run([zstd, "-dcq"], input=payload[:-4], capture_output=True, check=False)
        elf = done.stdout if done.returncode == 0 else b""
    return elf if elf[:4] == b"\x7fELF" else None


# --------------------------------------------------------------------------- initramfs


class Cpio:
    """A writer of the kernel's initramfs format (cpio "newc"), in memory.

    Written here rather than with cpio(1) so that device nodes and root
    ownership need no privileges. Archives may be concatenated; the kernel
    unpacks them in order.
    """

    def __init__(self) -> None:
        self._out = bytearray()
        self._ino = 0

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        self._ino += 1
        encoded = name.lstrip("/").encode() + b"\0"
        fields = (self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, *rdev, len(encoded), 0)
        self._out += b"070701" + b"".join(b"%08x" % f for f in fields) + encoded
        self._pad(4)
        self._out += data
        self._pad(4)

    def _pad(self, align: int) -> None:
        self._out += b"\0" * (-len(self._out) % align)

    def directory(self, name: str, mode: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | mode)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        """The archive with its trailer, padded to 512 bytes for concatenation."""
        self._entry("TRAILER!!!", 0)
        self._pad(512)
        return bytes(self._out)


def base_initramfs(busybox: Path, kernel: Kernel, init: str, dirs: Sequence[str] = ()) -> bytes:
    """A busybox initramfs: ``/init`` (shell text), ``/bin/busybox``, the kernel's
    modules under ``/modules`` with ``/modules/order`` (lines "FILE PARAMS"),
    ``/dev/console`` (needed before devtmpfs is mounted, or init has no
    console), and the given extra empty directories."""
    cpio = Cpio()
    for d in ("bin", "dev", "proc", "sys", "mnt", "modules", "kvmstate", *dirs):
        cpio.directory(d)
    cpio.char_device("dev/console", 5, 1)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    cpio.symlink("bin/sh", "busybox")
    cpio.file("init", init.encode(), 0o755)
    lines = []
    for ko, args in kernel.modules:
        cpio.file(f"modules/{ko.name}", ko.read_bytes())
        lines.append(f"{ko.name} {args}".rstrip() + "\n")
    cpio.file("modules/order", "".join(lines).encode())
    return cpio.finish()


#: The first part of every guest's /init: mounts, the per-run parameters,
#: the marker functions and the module loading.
INIT_PRELUDE = f"""#!/bin/sh
# PID 1 of a kvmstate test guest (generated by tests/guest/_common.py).
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
NONCE=none
. /kvmstate/run.sh
say() {{ echo "{MARKER} $NONCE $*"; }}
fail() {{ say fail "$*"; poweroff -f; sleep 60; }}
# Without constant_tsc (the emulated CPUs have none) KVM keeps the TSC rate of the
# moment it loads as every vCPU's default (max_tsc_khz). The kernel refines its
# early TSC calibration about a second after boot, then drops "tsc-early": load
# KVM after that, or vCPUs may get a rate the host no longer has ("user requested
# TSC rate below hardware speed"), and TSC restores then behave by boot.
n=0
while grep -q tsc-early /sys/devices/system/clocksource/clocksource0/available_clocksource; do
    n=$((n + 1)); [ $n -gt 100 ] && break; sleep 0.1
done
while read -r ko args; do
    insmod "/modules/$ko" $args || fail "insmod $ko $args failed"
done < /modules/order
"""

#: The middle part of every guest's /init: given $ROOT (a directory holding
#: the host's tree, with proc/sys/dev mountpoints), make it usable.
INIT_MOUNTS = f"""
mount -t proc proc "$ROOT/proc" || fail "cannot mount proc in $ROOT"
mount -t sysfs sysfs "$ROOT/sys" || fail "cannot mount sysfs in $ROOT"
mount -t devtmpfs devtmpfs "$ROOT/dev" || fail "cannot mount devtmpfs in $ROOT"
mkdir -p "$ROOT{GUEST_SHM}" "$ROOT/dev/pts"
mount -t tmpfs -o mode=1777 tmpfs "$ROOT{GUEST_SHM}" || fail "cannot mount a tmpfs"
mount -t devpts devpts "$ROOT/dev/pts"
mkdir -p -m 1777 "$ROOT{GUEST_TMP}"
mkdir -p "$ROOT{GUEST_HOME}" "$ROOT{GUEST_PYCACHE}"
"""

#: The last part of every guest's /init: run the command in $ROOT
#: (run_command, from the per-run script) and report its exit status.
INIT_RUN = """
[ -d "$ROOT$GUEST_CWD" ] || fail "the working directory $GUEST_CWD is not visible in the guest"
# Raw output from here on; kernel messages go to the log, reported after the command.
stty -onlcr
dmesg -c > /dev/null
echo 1 > /proc/sys/kernel/printk
say start "$(uname -r)"
run_command < /dev/null
rc=$?
dmesg -r | while IFS= read -r line; do say kmsg "$line"; done
say exit "$rc"
poweroff -f
sleep 60
"""


def init_script(mount_root: str, extra_mounts: str = "") -> str:
    """A complete /init: :data:`INIT_PRELUDE`, ``mount_root`` (shell text that
    sets $ROOT to the directory holding the host's tree, calling ``fail`` on
    errors), :data:`INIT_MOUNTS`, ``extra_mounts`` (e.g. a persistent
    :data:`GUEST_PYCACHE`), :data:`INIT_RUN`."""
    parts = (INIT_PRELUDE, mount_root, INIT_MOUNTS, extra_mounts, INIT_RUN)
    return "\n".join(part.strip("\n") for part in parts if part) + "\n"


def guest_env(kind: str, series: str = DEFAULT_KERNEL) -> dict[str, str]:
    """The command's environment inside the guest: ``KVMSTATE_GUEST`` (``kind``)
    and ``KVMSTATE_GUEST_KERNEL`` (``series``) say where it runs.

    Everything that would write into the (read-only) host tree is pointed at
    the guest's tmpfs: TMPDIR, HOME, caches, pytest's cache, hypothesis's
    database, and bytecode (to :data:`GUEST_PYCACHE`, which a guest may back
    with a persistent host directory).
    """
    env = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
    env.setdefault("PATH", DEFAULT_PATH)
    env.update(
        KVMSTATE_GUEST=kind,
        KVMSTATE_GUEST_KERNEL=series,
        TMPDIR=GUEST_TMP,
        HOME=GUEST_HOME,
        XDG_CACHE_HOME=GUEST_HOME + "/.cache",
        LANG="C.UTF-8",
        PYTHONPYCACHEPREFIX=GUEST_PYCACHE,
        PYTEST_ADDOPTS="-p no:cacheprovider",
        HYPOTHESIS_STORAGE_DIRECTORY=GUEST_TMP + "/hypothesis",
    )
    return env


def run_script(
    nonce: str,
    command: Sequence[str],
    cwd: str,
    env: Mapping[str, str],
    exchange: str = "",
    after: str = "",
) -> str:
    """The per-run ``/kvmstate/run.sh`` sourced by /init: the nonce, the working
    directory, the exchange directory (``EXCHANGE``, empty for none) and
    ``run_command``, which runs the command chrooted into $ROOT with exactly ``env``,
    then the shell text ``after`` (outside the chroot, the command's status in
    ``$rc``), and returns that status."""
    assignments = " ".join(shlex.quote(f"{k}={v}") for k, v in sorted(env.items()))
    return (
        f"NONCE={shlex.quote(nonce)}\n"
        f"GUEST_CWD={shlex.quote(cwd)}\n"
        f"EXCHANGE={shlex.quote(exchange)}\n"
        "run_command() {\n"
        f'    env -i {assignments} /bin/chroot "$ROOT" /bin/sh -c \'cd "$0" && exec "$@"\' '
        f'"$GUEST_CWD" {shlex.join(command)}\n'
        + (f"    rc=$?\n{after.rstrip()}\n    return $rc\n" if after else "")
        + "}\n"
    )


def run_initramfs(
    nonce: str, command: Sequence[str], cwd: str, env: Mapping[str, str], exchange: str = ""
) -> bytes:
    """A small cpio holding :func:`run_script`, to append to the base initramfs."""
    cpio = Cpio()
    cpio.file("kvmstate/run.sh", run_script(nonce, command, cwd, env, exchange).encode())
    return cpio.finish()


def new_nonce() -> str:
    return secrets.token_hex(8)


# --------------------------------------------------------------------------- console


class ConsoleFilter:
    """Splits the guest's serial console into the command's output and markers.

    Before the ``start`` marker everything is boot noise, kept only as a tail
    for error messages (and echoed on stderr with ``-v``). After it, bytes go
    to ``out`` as they come, minus the marker lines, which may follow
    output that lacks a final newline.
    """

    def __init__(self, nonce: str, out: BinaryIO, on_start: Callable[[str], None]) -> None:
        self._prefix = f"{MARKER} {nonce} ".encode()
        self._out = out
        self._on_start = on_start
        self._buf = b""
        self._line = b""  # the current boot line, for the tail
        self.started = False
        self.exit_status: int | None = None
        self.failure: str | None = None
        self.tail: deque[str] = deque(maxlen=40)
        self.kernel_messages: list[str] = []

    def feed(self, data: bytes) -> None:
        self._buf += data
        while self.exit_status is None:
            at = self._buf.find(self._prefix)
            if at < 0:
                # Hold back a tail that could be the start of a marker.
                keep = next(
                    (
                        n
                        for n in range(min(len(self._prefix) - 1, len(self._buf)), 0, -1)
                        if self._prefix.startswith(self._buf[-n:])
                    ),
                    0,
                )
                self._emit(self._buf[: len(self._buf) - keep])
                self._buf = self._buf[len(self._buf) - keep :]
                return
            end = self._buf.find(b"\n", at)
            if end < 0:
                self._emit(self._buf[:at])
                self._buf = self._buf[at:]
                return
            self._emit(self._buf[:at])
            event = self._buf[at + len(self._prefix) : end].decode(errors="replace").strip()
            self._buf = self._buf[end + 1 :]
            self._event(event)

    def _emit(self, data: bytes) -> None:
        if not data:
            return
        if self.started:
            self._out.write(data)
            self._out.flush()
        self._line += data
        *lines, self._line = self._line.split(b"\n")
        for raw in lines:
            line = raw.decode(errors="replace").rstrip("\r")
            self.tail.append(line)
            if not self.started:
                debug("console: " + line)

    def _event(self, event: str) -> None:
        kind, _, rest = event.partition(" ")
        if kind == "start":
            self.started = True
            self.tail.clear()
            self._line = b""
            self._on_start(rest)
        elif kind == "kmsg":
            self.kernel_messages.append(rest)
        elif kind == "fail":
            self.failure = rest
        elif kind == "exit":
            self.exit_status = int(rest)

    def seen(self) -> str:
        """The last console lines, for error messages."""
        lines = [*self.tail, self._line.decode(errors="replace")]
        return "\n".join("  | " + line for line in lines if line.strip()) or "  (nothing)"


#: Kernel warnings that only say that emulation is slow.
EMULATION_NOISE = re.compile(r"hrtimer: interrupt took|clocksource|sched: RT throttling")


def _report_kernel_messages(messages: Sequence[str]) -> None:
    # dmesg -r lines look like "<4>[   12.345678] text"; up to warnings are worth a look.
    for raw in messages:
        found = re.match(r"<(\d+)>\s*(?:\[[^\]]*\]\s*)?(.*)", raw)
        level, text = (int(found[1]) & 7, found[2]) if found else (4, raw)
        if level <= 4 and not EMULATION_NOISE.search(text):
            say(f"guest kernel: {text}")
        else:
            debug(f"guest kernel: {text}")


def _die_with_parent() -> None:
    # The emulator must not outlive a harness killed with SIGKILL.
    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)


def run_guest(
    argv: Sequence[str],
    *,
    nonce: str,
    timeout: float,
    label: str,
    console_file: Path | None = None,
) -> int:
    """Run an emulator until the command inside reports its exit status.

    The console is the emulator's stdout, or ``console_file`` if given (an
    emulator that can only write its serial port to a file; it is followed
    as it grows). The command's output goes to stdout as it comes; the
    harness prints one status line (``label``) on stderr when the command
    starts. Returns the command's exit status; raises :class:`HarnessError`
    with 124 on timeout and 125 if the guest stops without a status.
    """
    started_at = time.monotonic()
    deadline = started_at + timeout
    out = sys.stdout.buffer

    def on_start(release: str) -> None:
        booted = time.monotonic() - started_at
        say(f"{label}: Linux {release}, running the command")
        debug(f"boot took {booted:.2f} s wall (emulator start to command start)")

    console = ConsoleFilter(nonce, out, on_start)
    debug("$ " + shlex.join(argv))
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL if console_file else subprocess.PIPE,
            stderr=errors,
            preexec_fn=_die_with_parent,
        )
        ended = False  # the guest finished or stopped, rather than time or a signal
        try:
            _pump(proc, console, deadline, console_file)
            ended = time.monotonic() < deadline
        finally:
            if proc.poll() is None:
                # A guest that is done powers off by itself; give it a moment.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(2 if ended else 0)
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        errors.seek(0)
        emulator_errors = errors.read().decode(errors="replace").strip()
    elapsed = time.monotonic() - started_at
    _report_kernel_messages(console.kernel_messages)
    if console.exit_status is not None:
        debug(f"command exited with {console.exit_status}; guest wall time {elapsed:.2f} s")
        return console.exit_status
    if console.failure is not None:
        raise HarnessError(EXIT_BOOT, f"the guest could not run the command: {console.failure}")
    if time.monotonic() >= deadline:
        where = "the command was still running" if console.started else "the guest had not booted"
        raise HarnessError(
            EXIT_TIMEOUT,
            f"timed out after {timeout:g} s ({where}); last console lines:\n{console.seen()}",
        )
    detail = f"\n{argv[0]} said:\n{emulator_errors}" if emulator_errors else ""
    raise HarnessError(
        EXIT_BOOT,
        f"the guest stopped (emulator status {proc.returncode}) without reporting the "
        f"command's exit status; last console lines:\n{console.seen()}{detail}",
    )


def _pump(
    proc: subprocess.Popen[bytes],
    console: ConsoleFilter,
    deadline: float,
    console_file: Path | None,
) -> None:
    """Feed the console to the filter until the exit marker, the end, or the deadline."""
    if console_file is None:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        while console.exit_status is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            ready, _, _ = select.select([fd], [], [], min(remaining, 1.0))
            if ready:
                data = os.read(fd, 65536)
                if not data:
                    return
                console.feed(data)
        return
    offset = 0
    while console.exit_status is None and time.monotonic() < deadline:
        alive = proc.poll() is None
        with contextlib.suppress(FileNotFoundError), console_file.open("rb") as f:
            f.seek(offset)
            data = f.read()
            offset += len(data)
            if data:
                console.feed(data)
                continue
        if not alive:
            return
        time.sleep(0.05)
