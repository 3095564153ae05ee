#!/usr/bin/env python3
"""``save_state``/``restore_state`` against the same ioctl sequence in C, plus format speed.

Run on demand (not part of the test suite):

    python3 benchmarks/bench_state.py [--iterations N] [--repeat R]

The C baseline is compiled on the spot into a shared library loaded into
this process (KVM refuses vCPU ioctls from other processes) and runs, on
the same vCPU descriptor, the ioctls ``kvmstate.state`` issues: the same
parts, the same MSR list, the same buffer sizes. Printed: ns per save and
per restore, the Python/C ratio (target <= 1.20x), and the binary and
JSON formats' encode/decode throughput in MB/s.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import kvmstate
from benchmarks._common import best_ns, compile_c
from kvmstate import snapshot
from kvmstate.state import VcpuState

C_SOURCE = r"""
struct parts {
    struct kvm_cpuid2 *cpuid; unsigned nent;
    struct kvm_regs regs; struct kvm_sregs sregs; struct kvm_sregs2 sregs2;
    struct kvm_xsave *xsave; struct kvm_xcrs xcrs; struct kvm_msrs *msrs;
    struct kvm_lapic_state lapic; struct kvm_mp_state mp; struct kvm_vcpu_events ev;
    struct kvm_debugregs dr; int tsc;
    struct kvm_nested_state *nested; unsigned nested_len;
};

static struct parts P;

/* Buffers sized like the Python side: cpuid nent entries, xsave_len bytes,
 * msrs n entries, nested_len bytes (>= KVM_CAP_NESTED_STATE). */
int setup(unsigned nent, unsigned xsave_len, const uint32_t *idx, unsigned n, unsigned nested_len,
          int flags) {
    P.nent = nent;
    P.cpuid = calloc(1, sizeof(*P.cpuid) + nent * sizeof(struct kvm_cpuid_entry2));
    P.xsave = calloc(1, xsave_len);
    P.msrs = calloc(1, sizeof(*P.msrs) + n * sizeof(struct kvm_msr_entry));
    P.msrs->nmsrs = n;
    for (unsigned i = 0; i < n; i++) P.msrs->entries[i].index = idx[i];
    P.nested_len = nested_len;
    P.nested = nested_len ? calloc(1, nested_len) : NULL;
    return flags;
}

#define TRY(x) do { if ((x) < 0) return -1; } while (0)

static int save(int fd, int flags) {
    P.cpuid->nent = P.nent;
    TRY(ioctl(fd, KVM_GET_CPUID2, P.cpuid));
    TRY(ioctl(fd, KVM_GET_REGS, &P.regs));
    TRY(ioctl(fd, (flags & 1) ? KVM_GET_XSAVE2 : KVM_GET_XSAVE, P.xsave));
    TRY(ioctl(fd, KVM_GET_XCRS, &P.xcrs));
    TRY(ioctl(fd, KVM_GET_SREGS, &P.sregs));
    TRY(ioctl(fd, KVM_GET_SREGS2, &P.sregs2));
    if (ioctl(fd, KVM_GET_MSRS, P.msrs) != (int)P.msrs->nmsrs) return -1;
    TRY(ioctl(fd, KVM_GET_LAPIC, &P.lapic));
    TRY(ioctl(fd, KVM_GET_MP_STATE, &P.mp));
    TRY(ioctl(fd, KVM_GET_VCPU_EVENTS, &P.ev));
    TRY(ioctl(fd, KVM_GET_DEBUGREGS, &P.dr));
    TRY(P.tsc = ioctl(fd, KVM_GET_TSC_KHZ, 0));
    if (P.nested) {
        P.nested->size = P.nested_len;
        TRY(ioctl(fd, KVM_GET_NESTED_STATE, P.nested));
    }
    return 0;
}

static int restore(int fd) {
    TRY(ioctl(fd, KVM_SET_CPUID2, P.cpuid));
    TRY(ioctl(fd, KVM_SET_SREGS, &P.sregs));
    TRY(ioctl(fd, KVM_SET_SREGS2, &P.sregs2));
    if (P.nested) TRY(ioctl(fd, KVM_SET_NESTED_STATE, P.nested));
    TRY(ioctl(fd, KVM_GET_TSC_KHZ, 0));
    TRY(ioctl(fd, KVM_SET_REGS, &P.regs));
    TRY(ioctl(fd, KVM_SET_XSAVE, P.xsave));
    TRY(ioctl(fd, KVM_SET_XCRS, &P.xcrs));
    TRY(ioctl(fd, KVM_SET_LAPIC, &P.lapic));
    if (ioctl(fd, KVM_SET_MSRS, P.msrs) != (int)P.msrs->nmsrs) return -1;
    TRY(ioctl(fd, KVM_SET_VCPU_EVENTS, &P.ev));
    TRY(ioctl(fd, KVM_SET_MP_STATE, &P.mp));
    TRY(ioctl(fd, KVM_SET_DEBUGREGS, &P.dr));
    return 0;
}

double bench(int fd, int what, long n, int flags) {
    if (save(fd, flags)) return -1;
    uint64_t t0 = now();
    for (long i = 0; i < n; i++)
        if ((what ? restore(fd) : save(fd, flags))) return -1;
    return (double)(now() - t0) / n;
}
"""


def build(workdir: Path) -> ctypes.CDLL:
    argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_int]
    return compile_c(workdir, "state", C_SOURCE, argtypes)


best = best_ns


def throughput(fn: Callable[[], object], nbytes: int, seconds: float = 0.5) -> float:
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        count += 1
    return nbytes * count / (time.perf_counter() - t0) / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp, kvmstate.Kvm() as kvm:
        dll = build(Path(tmp))
        with kvm.create_vm() as vm:
            vm.create_irqchip()
            with vm.create_vcpu(0) as vcpu:
                vcpu.set_cpuid2(kvm.get_supported_cpuid())
                state = vcpu.save_state()  # also settles the readable MSR list
                if state.sregs2 is None or state.lapic is None or state.xsave is None:
                    print("this KVM lacks sregs2, an irqchip or XSAVE: the C loop assumes them")
                    return 1
                indices = sorted(state.msrs or {})
                idx = (ctypes.c_uint32 * len(indices))(*indices)
                nested_len = vcpu.nested_state_size if state.nested is not None else 0
                xsave_len = vcpu.xsave_size
                flags = 1 if xsave_len > 4096 else 0
                assert state.cpuid is not None
                dll.setup(len(state.cpuid), xsave_len, idx, len(indices), nested_len, flags)
                fd = vcpu.fileno()
                n, r = args.iterations, args.repeat
                print(
                    f"parts: {', '.join(state.parts())}; {len(indices)} MSRs; "
                    f"nested: {'yes' if nested_len else 'absent'}"
                )
                print(f"{n} iterations, best of {r}\n")
                print(f"{'operation':<16}{'Python us':>10}{'C us':>8}{'ratio':>8}  target")
                for label, what, fn in (
                    ("save_state", 0, vcpu.save_state),
                    ("restore_state", 1, lambda: vcpu.restore_state(state)),
                ):
                    p = best(fn, n, r)
                    c = min(dll.bench(fd, what, n, flags) for _ in range(r))
                    if c < 0:
                        raise RuntimeError(f"the C baseline failed on {label}")
                    print(f"{label:<16}{p / 1000:>10.1f}{c / 1000:>8.1f}{p / c:>7.2f}x  <= 1.20x")

    blob = state.to_bytes()
    text = json.dumps(snapshot.to_dict(state))
    size = len(blob)
    print(f"\nformats, one vCPU ({size} bytes binary, {len(text)} bytes JSON):")
    rows = [
        ("binary encode", lambda: state.to_bytes(), size),
        ("binary decode", lambda: VcpuState.from_bytes(blob), size),
        ("JSON encode", lambda: json.dumps(snapshot.to_dict(state)), len(text)),
        ("JSON decode", lambda: snapshot.from_dict(json.loads(text)), len(text)),
    ]
    for label, fn, nbytes in rows:
        print(f"  {label:<14}{throughput(fn, nbytes):>9.1f} MB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
