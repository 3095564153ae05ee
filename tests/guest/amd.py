"""The AMD guest: QEMU's software CPU (TCG) emulates SVM, so a Debian kernel
inside loads ``kvm_amd nested=1`` and the kernel's real nested SVM code runs.

The host's root is shared read-only over virtio-9p and the command runs
chrooted into it, so the host's Python and installed packages are used as-is.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from . import _common
from ._common import HarnessError

KIND = "amd"
QEMU = "qemu-system-x86_64"
TOOLS = {QEMU: "qemu-system-x86", "dpkg-deb": "dpkg", "depmod": "kmod", "modprobe": "kmod"}
MODULES = ("kvm-amd", "virtio_pci", "9pnet_virtio", "9p")
MODULE_PARAMS = {"kvm_amd": "nested=1"}
MOUNT_TAG = "hostroot"

# cache=loose: the share is read-only, so caching lookups is safe and saves
# most of the 9p round trips of Python's imports.
MOUNT_ROOT = f"""
ROOT=/mnt
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose {MOUNT_TAG} "$ROOT" \\
    || fail "cannot mount the host's root over 9p"
"""

# Python's bytecode cache lives on the host between boots (GUEST_PYCACHE).
PYCACHE_TAG = "pycache"
# run --exchange DIR: the host's DIR, writable, at the same place (over the read-only
# view of it), so that one boot can leave files for the next; no caching, as both
# sides may write.
EXCHANGE_TAG = "exchange"
EXTRA_MOUNTS = f"""
mount -t 9p -o trans=virtio,version=9p2000.L,cache=loose \\
    {PYCACHE_TAG} "$ROOT{_common.GUEST_PYCACHE}"
if [ -n "$EXCHANGE" ]; then
    mount -t 9p -o trans=virtio,version=9p2000.L {EXCHANGE_TAG} "$ROOT$EXCHANGE" \\
        || fail "cannot mount the exchange directory $EXCHANGE"
fi
"""

KERNEL_ARGS = (
    "console=ttyS0 quiet panic=-1 "
    # Under emulation these are slow and of no use to a throwaway guest.
    "mitigations=off cryptomgr.notests"
)


def prepare(series: str = _common.DEFAULT_KERNEL) -> tuple[Path, Path, str]:
    """(kernel image, base initramfs, kernel release) of a kernel series, built
    once into the cache."""
    _, busybox = _common.require_host(TOOLS)
    kernel = _common.prepare_kernel(MODULES, MODULE_PARAMS, series)
    init = _common.init_script(MOUNT_ROOT, EXTRA_MOUNTS)
    key = _common.cache_key(str(kernel.vmlinuz.parent), _common.file_digest(busybox), init)

    def build(out: Path) -> None:
        (out / "initrd.cpio").write_bytes(_common.base_initramfs(busybox, kernel, init))

    with _common.cache_lock() as root:
        entry = _common.cached_build(root, f"{KIND}-{key}", build)
    return kernel.vmlinux or kernel.vmlinuz, entry / "initrd.cpio", kernel.release


def qemu_argv(kernel: Path, initrd: Path, pycache: Path, exchange: str = "") -> list[str]:
    shared = []
    if exchange:
        shared = ["-virtfs", f"local,path={exchange},mount_tag={EXCHANGE_TAG},security_model=none"]
    return [
        QEMU,
        "-nodefaults",
        "-machine", "q35,accel=tcg",
        "-cpu", "max",  # TCG's "max" CPU has SVM
        "-smp", "1",
        "-m", "2048",
        "-display", "none",
        "-no-reboot",  # with panic=-1, a guest panic ends QEMU
        "-serial", "stdio",
        "-kernel", str(kernel),
        "-initrd", str(initrd),
        "-append", KERNEL_ARGS,
        "-virtfs",
        f"local,path=/,mount_tag={MOUNT_TAG},security_model=none,readonly=on,multidevs=remap",
        "-virtfs",
        f"local,path={pycache},mount_tag={PYCACHE_TAG},security_model=none",
        *shared,
    ]  # fmt: skip


def main(
    command: list[str],
    timeout: float,
    cwd: str,
    series: str = _common.DEFAULT_KERNEL,
    exchange: str = "",
) -> int:
    """Run ``command`` in ``cwd`` inside the AMD guest booting the newest kernel
    of ``series``, with the host directory ``exchange`` writable at the same
    place; return its exit status or one of the harness's own (123, 124, 125)."""
    try:
        kernel, base, release = prepare(series)
        pycache = _common.cache_dir() / "pycache"
        pycache.mkdir(exist_ok=True)
        _common.debug(f"kernel {release}, initramfs {base}")
        nonce = _common.new_nonce()
        env = _common.guest_env(KIND, series)
        if exchange:
            env["KVMSTATE_GUEST_EXCHANGE"] = exchange
        run = _common.run_initramfs(nonce, command, cwd, env, exchange)
        with tempfile.TemporaryDirectory(prefix="kvmstate-guest-") as tmp:
            initrd = Path(tmp) / "initrd.cpio"
            initrd.write_bytes(base.read_bytes() + run)
            return _common.run_guest(
                qemu_argv(kernel, initrd, pycache, exchange),
                nonce=nonce,
                timeout=timeout,
                label="AMD guest (QEMU TCG, kvm_amd nested=1)",
            )
    except HarnessError as error:
        _common.say(error.message)
        return error.status
