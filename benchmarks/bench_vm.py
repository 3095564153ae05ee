#!/usr/bin/env python3
"""A whole-VM snapshot (``Vm.save_state`` / ``Vm.restore_state``) against memcpy and C ioctls.

Run on demand (not part of the test suite):

    python3 benchmarks/bench_vm.py [--sizes 64,512] [--repeat R]

A VM with an in-kernel irqchip, PIT and one vCPU, its memory (64 MiB and
512 MiB by default) filled with a pattern, is saved and restored by the
library; the baseline, compiled on the spot into a shared library loaded
into this process (KVM refuses vCPU ioctls from other processes), copies
the same bytes with one ``memcpy`` per slot and issues the same ioctls on
the same descriptors: KVM_GET/SET_CLOCK, the three irqchip chips, the PIT
and the vCPU's parts (the ioctl sequence of ``benchmarks/bench_state.py``).

Two baselines for a save: memcpy into memory mapped for it the way the
library maps a slot's image (``kvmstate.vmstate.new_image``: anonymous,
transparent huge pages asked for; page faults included, as a save that
hands back new memory must pay them) and into a buffer already touched
(a floor no new snapshot reaches). A restore writes into the VM's own,
already touched memory on both sides. Printed: ms per operation and the
Python/C ratio (target <= 1.3x against the first baseline).
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import kvmstate
from benchmarks._harness import C_PRELUDE, best_ns, build_c
from kvmstate.vmstate import VmState

C_SOURCE = (
    C_PRELUDE
    + r"""
#include <sys/mman.h>

static struct {
    struct kvm_cpuid2 *cpuid; unsigned nent;
    struct kvm_regs regs; struct kvm_sregs sregs; struct kvm_sregs2 sregs2;
    struct kvm_xsave *xsave; struct kvm_xcrs xcrs; struct kvm_msrs *msrs;
    struct kvm_lapic_state lapic; struct kvm_mp_state mp; struct kvm_vcpu_events ev;
    struct kvm_debugregs dr;
    struct kvm_clock_data clock; struct kvm_irqchip chip[3]; struct kvm_pit_state2 pit;
    char *guest; char *warm; size_t size;
} P;

/* Buffers sized like the Python side: cpuid nent entries, xsave_len bytes, n MSRs;
 * warm is the size of guest memory and touched once here. */
int setup(unsigned nent, unsigned xsave_len, const uint32_t *idx, unsigned n, char *guest,
          size_t size) {
    P.nent = nent;
    P.cpuid = calloc(1, sizeof(*P.cpuid) + nent * sizeof(struct kvm_cpuid_entry2));
    P.xsave = calloc(1, xsave_len);
    P.msrs = calloc(1, sizeof(*P.msrs) + n * sizeof(struct kvm_msr_entry));
    P.msrs->nmsrs = n;
    for (unsigned i = 0; i < n; i++) P.msrs->entries[i].index = idx[i];
    P.guest = guest;
    P.size = size;
    P.warm = malloc(size);
    memset(P.warm, 1, size);
    return 0;
}

#define TRY(x) do { if ((x) < 0) return -1; } while (0)

static int save(int vm, int fd, int fresh) {
    TRY(ioctl(vm, KVM_GET_CLOCK, &P.clock));
    for (int i = 0; i < 3; i++) {
        P.chip[i].chip_id = i;
        TRY(ioctl(vm, KVM_GET_IRQCHIP, &P.chip[i]));
    }
    TRY(ioctl(vm, KVM_GET_PIT2, &P.pit));
    if (fresh) {
        /* New memory for the image, allocated as kvmstate.vmstate.new_image does. */
        char *copy = mmap(NULL, P.size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (copy == MAP_FAILED) return -1;
        madvise(copy, P.size, MADV_HUGEPAGE);
        memcpy(copy, P.guest, P.size);
        __asm__ volatile("" : : "r"(copy) : "memory");
        munmap(copy, P.size);
    } else {
        memcpy(P.warm, P.guest, P.size);
    }
    P.cpuid->nent = P.nent;
    TRY(ioctl(fd, KVM_GET_CPUID2, P.cpuid));
    TRY(ioctl(fd, KVM_GET_REGS, &P.regs));
    TRY(ioctl(fd, KVM_GET_XSAVE, P.xsave));
    TRY(ioctl(fd, KVM_GET_XCRS, &P.xcrs));
    TRY(ioctl(fd, KVM_GET_SREGS, &P.sregs));
    TRY(ioctl(fd, KVM_GET_SREGS2, &P.sregs2));
    if (ioctl(fd, KVM_GET_MSRS, P.msrs) != (int)P.msrs->nmsrs) return -1;
    TRY(ioctl(fd, KVM_GET_LAPIC, &P.lapic));
    TRY(ioctl(fd, KVM_GET_MP_STATE, &P.mp));
    TRY(ioctl(fd, KVM_GET_VCPU_EVENTS, &P.ev));
    TRY(ioctl(fd, KVM_GET_DEBUGREGS, &P.dr));
    TRY(ioctl(fd, KVM_GET_TSC_KHZ, 0));
    return 0;
}

static int restore(int vm, int fd) {
    memcpy(P.guest, P.warm, P.size);
    for (int i = 0; i < 3; i++) TRY(ioctl(vm, KVM_SET_IRQCHIP, &P.chip[i]));
    TRY(ioctl(vm, KVM_SET_PIT2, &P.pit));
    TRY(ioctl(fd, KVM_SET_CPUID2, P.cpuid));
    TRY(ioctl(fd, KVM_SET_SREGS, &P.sregs));
    TRY(ioctl(fd, KVM_SET_SREGS2, &P.sregs2));
    TRY(ioctl(fd, KVM_SET_REGS, &P.regs));
    TRY(ioctl(fd, KVM_SET_XSAVE, P.xsave));
    TRY(ioctl(fd, KVM_SET_XCRS, &P.xcrs));
    TRY(ioctl(fd, KVM_SET_LAPIC, &P.lapic));
    if (ioctl(fd, KVM_SET_MSRS, P.msrs) != (int)P.msrs->nmsrs) return -1;
    TRY(ioctl(fd, KVM_SET_VCPU_EVENTS, &P.ev));
    TRY(ioctl(fd, KVM_SET_MP_STATE, &P.mp));
    TRY(ioctl(fd, KVM_SET_DEBUGREGS, &P.dr));
    P.clock.flags = 0;
    TRY(ioctl(vm, KVM_SET_CLOCK, &P.clock));
    return 0;
}

/* what: 0 save into fresh memory, 1 save into warm memory, 2 restore. */
double bench(int vm, int fd, int what, long n) {
    if (save(vm, fd, 0)) return -1;
    uint64_t t0 = now();
    for (long i = 0; i < n; i++)
        if ((what == 2 ? restore(vm, fd) : save(vm, fd, what == 0))) return -1;
    return (double)(now() - t0) / n;
}
"""
)


def build(workdir: Path) -> ctypes.CDLL:
    dll = build_c(workdir, C_SOURCE, "vm")
    if dll is None:  # unlike the per-ioctl tables, this one has nothing to show without C
        raise SystemExit("bench_vm needs gcc for its C baseline")
    dll.bench.restype = ctypes.c_double
    dll.bench.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    dll.setup.argtypes = [
        ctypes.c_uint,
        ctypes.c_uint,
        ctypes.c_void_p,
        ctypes.c_uint,
        ctypes.c_void_p,
        ctypes.c_size_t,
    ]
    return dll


def measure(kvm: kvmstate.Kvm, dll: ctypes.CDLL, mib: int, repeat: int) -> None:
    size = mib << 20
    n = max(1, 256 // mib)  # calls per run: about 256 MiB copied per run
    with kvm.create_vm() as vm:
        vm.create_irqchip()
        vm.create_pit2()
        mem = vm.add_memory(0, size)
        mem[:] = bytes(range(256)) * (size // 256)  # every page touched and not zero
        vcpu = vm.create_vcpu(0)
        try:
            vcpu.set_cpuid2(kvm.get_supported_cpuid())
            state = vm.save_state()  # also settles the readable MSR list
            v = state.vcpus[0]
            if v.sregs2 is None or v.lapic is None or v.xsave is None or v.cpuid is None:
                raise SystemExit("no sregs2, irqchip or XSAVE here: the C loop uses them")
            if vcpu.xsave_size > 4096:
                raise SystemExit("KVM_CAP_XSAVE2 > 4096: the C loop reads 4096-byte XSAVE areas")
            indices = sorted(v.msrs or {})
            idx = (ctypes.c_uint32 * len(indices))(*indices)
            guest = ctypes.addressof(ctypes.c_char.from_buffer(mem))
            dll.setup(len(v.cpuid), vcpu.xsave_size, idx, len(indices), guest, size)
            vm_fd, fd = vm.fileno(), vcpu.fileno()
            rows = []
            for label, fn, what in (
                ("save", vm.save_state, 0),
                ("restore", lambda: vm.restore_state(state), 2),
            ):
                p = best_ns(fn, n, repeat)
                c = min(dll.bench(vm_fd, fd, what, n) for _ in range(repeat))
                if c < 0:
                    raise RuntimeError(f"the C baseline failed on {label}")
                rows.append((label, p, c))
            warm = min(dll.bench(vm_fd, fd, 1, n) for _ in range(repeat))
            del guest
        finally:
            vcpu.close()
    (_, ps, cs), (_, pr, cr) = rows
    print(f"{mib} MiB, {n} per run, best of {repeat}:")
    print(f"  {'operation':<10}{'Python ms':>10}{'C ms':>9}{'ratio':>8}  target")
    print(f"  {'save':<10}{ps / 1e6:>10.2f}{cs / 1e6:>9.2f}{ps / cs:>7.2f}x  <= 1.3x")
    print(f"  {'restore':<10}{pr / 1e6:>10.2f}{cr / 1e6:>9.2f}{pr / cr:>7.2f}x  <= 1.3x")
    print(f"  (save vs memcpy into touched memory: C {warm / 1e6:.2f} ms, {ps / warm:.2f}x)")


def file_round_trip(kvm: kvmstate.Kvm, mib: int, workdir: Path) -> None:
    """Write and read back a snapshot file, for scale (disk speed, not the library's)."""
    size = mib << 20
    with kvm.create_vm() as vm:
        mem = vm.add_memory(0, size)
        mem[:] = bytes(range(256)) * (size // 256)
        vcpu = vm.create_vcpu(0)
        try:
            state = vm.save_state()
            path = workdir / "vm.kvmstate"
            t0 = time.perf_counter()
            state.write(path)
            t1 = time.perf_counter()
            VmState.load(path)
            t2 = time.perf_counter()
        finally:
            vcpu.close()
    print(f"  file: write {(t1 - t0) * 1e3:.1f} ms, load {(t2 - t1) * 1e3:.1f} ms ({workdir})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64,512", help="guest memory sizes in MiB")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, kvmstate.Kvm() as kvm:
        dll = build(Path(tmp))
        for mib in (int(s) for s in args.sizes.split(",")):
            measure(kvm, dll, mib, args.repeat)
            file_round_trip(kvm, mib, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
