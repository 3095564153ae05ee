#!/usr/bin/env python3
"""Nested GET/SET and register round trips: kvmstate, bare ``fcntl.ioctl`` and C, side by side.

Run on demand (not part of the test suite):

    python3 benchmarks/bench_core.py [--iterations N] [--rounds R]

and, for real nested state, inside the emulated guests (every side runs
emulated there, so only the ratios mean anything):

    tests/guest/run -- python3 benchmarks/bench_core.py --iterations 2000
    tests/guest/run --cpu intel -- python3 benchmarks/bench_core.py --iterations 300

Each row times, on one vCPU descriptor, the library call, a bare
``fcntl.ioctl`` loop of exactly the same ioctls on the same fd (the floor
for any Python code) and a C loop compiled on the spot and loaded into this
process (KVM refuses vCPU ioctls from other processes): ns per operation,
best of R interleaved rounds (see benchmarks/_harness.py), then the ratios
library / bare and library / C. Each side is called as one callable: the
library call bound with ``functools.partial`` (the call a program makes, and
nothing around it), the bare side as a closure holding its ioctl loop body.
The nested rows move the guest-mode state where the KVM has one (AMD:
SVM guest mode by SET alone, 4224 bytes; Intel: L2 running under
tests/support/vmx_l1.py's L1); where the KVM has no nesting they time the
EINVAL path (an exception per call in Python). The
caller's-bytearray row keeps each returned view until the next call, as a
loop ``state = vcpu.get_nested_state(buf)`` does; the row under it drops
each view at once, so the buffer is bound anew every call. Also
printed: the time ``import kvmstate`` adds to ``import ctypes, fcntl``, with
bytecode compiled as a normal install has it, with site and without (``-S``:
the standard modules kvmstate needs counted too, as in a bare interpreter).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import fcntl
import os
import statistics
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import kvmstate  # noqa: E402  (after the path it is found by)
from benchmarks._harness import C_PRELUDE, Row, build_c, print_rows, run_rows  # noqa: E402
from kvmstate import ioctls, uapi, vmcb, x86  # noqa: E402
from kvmstate.nested import SVM_MAX_SIZE, VMX_MAX_SIZE  # noqa: E402

C_SOURCE = (
    C_PRELUDE
    + r"""
#define OK(r) ((r) >= 0 || errno == ok_errno)

/* ns per operation; -1 on an unexpected failure. len: the nested buffer's bytes
 * (>= KVM_CAP_NESTED_STATE); state: a nested state for "nested_set". ok_errno: the
 * errno the nested ioctls answer on a KVM without nesting (EINVAL), else 0. */
double bench(int fd, const char *op, long n, unsigned len, const void *state, int ok_errno) {
    /* The buffer is len bytes and size says len: the kernel writes at most that. */
    struct kvm_nested_state *reused = calloc(1, len);
    struct kvm_regs regs;
    struct kvm_sregs sregs;
    int which = !strcmp(op, "nested_reused") ? 0 : !strcmp(op, "nested_fresh") ? 1
              : !strcmp(op, "nested_set") ? 2 : !strcmp(op, "regs") ? 3
              : !strcmp(op, "sregs") ? 4 : -1;
    if (which < 0) return -1;
    uint64_t t0 = now();
    for (long i = 0; i < n; i++) {
        switch (which) {
        case 0:
            reused->size = len;
            if (!OK(ioctl(fd, KVM_GET_NESTED_STATE, reused))) return -1;
            break;
        case 1: {
            struct kvm_nested_state *fresh = calloc(1, len);
            fresh->size = len;
            if (!OK(ioctl(fd, KVM_GET_NESTED_STATE, fresh))) return -1;
            free(fresh);
            break;
        }
        case 2:
            if (!OK(ioctl(fd, KVM_SET_NESTED_STATE, state))) return -1;
            break;
        case 3:
            if (ioctl(fd, KVM_GET_REGS, &regs) || ioctl(fd, KVM_SET_REGS, &regs)) return -1;
            break;
        case 4:
            if (ioctl(fd, KVM_GET_SREGS, &sregs) || ioctl(fd, KVM_SET_SREGS, &sregs)) return -1;
            break;
        }
    }
    double ns = (double)(now() - t0) / n;
    free(reused);
    return ns;
}
"""
)

GET, SET = ioctls.KVM_GET_NESTED_STATE, ioctls.KVM_SET_NESTED_STATE
_SIZE = struct.Struct("<I")  # kvm_nested_state.size, at offset 4


def load_c(workdir: Path) -> ctypes.CDLL | None:
    dll = build_c(workdir, C_SOURCE, "core")
    if dll is None:
        return None
    dll.bench.restype = ctypes.c_double
    dll.bench.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_long,
        ctypes.c_uint,
        ctypes.c_void_p,
        ctypes.c_int,
    ]
    return dll


def import_overhead_ms(runs: int = 21, *, bare: bool = False) -> tuple[float, float]:
    """Median in-process time of ``import ctypes, fcntl`` and then of ``import kvmstate``.

    ``bare``: without site (``python -S``), so nothing a venv's ``.pth`` files load
    (an editable install's finder brings ``re``, ``enum``, ``contextlib``) is counted
    as free: what a program pays that has imported nothing else yet.
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    flags = ["-S"] if bare else []
    code = (
        "import time; t=time.perf_counter(); import ctypes, fcntl; a=time.perf_counter()-t; "
        "t=time.perf_counter(); import kvmstate; b=time.perf_counter()-t; print(a, b)"
    )
    subprocess.run([sys.executable, *flags, "-c", "import kvmstate"], env=env, check=True)  # .pyc
    base, extra = [], []
    for _ in range(runs):
        out = subprocess.run(
            [sys.executable, *flags, "-c", code],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
        a, b = map(float, out.stdout.split())
        base.append(a * 1000)
        extra.append(b * 1000)
    return statistics.median(base), statistics.median(extra)


def enter_svm_guest_mode(kvm: kvmstate.Kvm, vcpu: kvmstate.Vcpu) -> str:
    """Put an AMD vCPU in guest mode by SET alone, so GET moves the full 4224 bytes."""
    vcpu.set_cpuid2(kvm.get_supported_cpuid())
    sregs = vcpu.get_sregs()
    sregs.efer |= x86.EFER_SVME
    vcpu.set_sregs(sregs)
    state = kvmstate.NestedState(SVM_MAX_SIZE)
    state.format = kvmstate.NestedFormat.SVM
    state.flags = kvmstate.NestedFlag.GUEST_MODE | kvmstate.NestedFlag.GIF_SET
    state.size = SVM_MAX_SIZE
    state.svm.vmcb_pa = 0x10000
    vmcb12 = state.vmcb12
    assert vmcb12 is not None  # format SVM, size 4224: the page is there
    control, save = vmcb12.control, vmcb12.save
    control.set_intercept(vmcb.INTERCEPT_VMRUN)
    control.asid = 1
    control.iopm_base_pa, control.msrpm_base_pa = 0x20000, 0x30000
    save.efer = x86.EFER_SVME
    save.cr0 = x86.X86_CR0_PG | x86.X86_CR0_PE
    save.dr6, save.dr7, save.rflags = 0xFFFF0FF0, 0x400, 2
    vcpu.set_nested_state(state)
    return f"SVM guest mode, {vcpu.get_nested_state().size} bytes"


@contextlib.contextmanager
def vcpu_for(kvm: kvmstate.Kvm) -> Iterator[tuple[kvmstate.Vcpu, str]]:
    """A vCPU whose nested state is the largest this KVM's vendor reaches simply."""
    cap = kvm.nested_state_size
    if cap == VMX_MAX_SIZE:
        # L2 running under the test suite's L1 program: VMXON, a current VMCS, VMLAUNCH.
        from tests.support import vmx_l1
        from tests.test_vmx_guest import L1

        runner = L1(kvm)
        try:
            runner.run_until(vmx_l1.PORT_L2, vmx_l1.L2_MARK)
            size = runner.vcpu.get_nested_state().size
            yield runner.vcpu, f"VMX, L2 running, {size} bytes"
        finally:
            runner.close()
        return
    with kvm.create_vm() as vm, vm.create_vcpu(0) as vcpu:
        if cap == SVM_MAX_SIZE:
            yield vcpu, enter_svm_guest_mode(kvm, vcpu)
        else:
            yield vcpu, "no nesting: the nested rows time the EINVAL path"


def swallow(fn: Callable[[], object], code: int) -> Callable[[], object]:
    """``fn``, with an OSError of errno ``code`` taken as its answer (0: none expected)."""
    if not code:
        return fn

    def call() -> object:
        try:
            return fn()
        except OSError as exc:
            if exc.errno != code:
                raise
            return None

    return call


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-import", action="store_true", help="skip the import-time row")
    args = parser.parse_args()
    n, rounds = args.iterations, args.rounds

    with tempfile.TemporaryDirectory() as tmp, kvmstate.Kvm() as kvm:
        dll = load_c(Path(tmp))
        cap = kvm.nested_state_size
        # Where the KVM has no nesting every nested ioctl answers EINVAL.
        code = 0 if cap else errno.EINVAL
        length = max(cap, 128)
        words = (length + 7) // 8
        with vcpu_for(kvm) as (vcpu, mode):
            fd = vcpu.fileno()
            # The state SET hands back: the current one, or a header-only one where
            # there is no nesting (the kernel refuses any).
            current = vcpu.get_nested_state() if cap else kvmstate.NestedState(128)
            if not cap:
                current.size = 128
            # The same bytes in a plain buffer for the bare and C sides (SET only reads them).
            set_buf = (ctypes.c_uint64 * words)()
            ctypes.memmove(set_buf, current.to_bytes(), current.size)
            reused = kvmstate.NestedState(length)
            raw = (ctypes.c_uint64 * words)()
            barray = bytearray(words * 8)
            dropped = bytearray(words * 8)  # no view of it outlives a call
            bare_raw = (ctypes.c_uint64 * words)()
            bare_barray = bytearray(words * 8)

            def bare_get(buf: Any) -> Callable[[], object]:
                def get() -> object:
                    _SIZE.pack_into(buf, 4, length)
                    return fcntl.ioctl(fd, GET, buf)

                return swallow(get, code)

            def bare_fresh() -> object:
                buf = (ctypes.c_uint64 * words)()
                _SIZE.pack_into(buf, 4, length)
                return fcntl.ioctl(fd, GET, buf)

            held: list[object] = [None]

            def keep_view() -> object:
                # As a loop reusing the buffer does (state = vcpu.get_nested_state(buf)):
                # the last view lives on while the next call runs.
                held[0] = vcpu.get_nested_state(barray)
                return held[0]

            def c(op: str, state: int | None = None) -> Callable[[int], float] | None:
                if dll is None:
                    return None
                return lambda count: dll.bench(fd, op.encode(), count, length, state, code)

            regs_buf, sregs_buf = uapi.kvm_regs(), uapi.kvm_sregs()
            rows = [
                Row(
                    "nested GET, reused NestedState",
                    swallow(partial(vcpu.get_nested_state, reused), code),
                    bare_get(bare_raw),
                    c("nested_reused"),
                    "<= 1.05x bare",
                ),
                Row(
                    "nested GET, caller's ctypes array",
                    swallow(partial(vcpu.get_nested_state, raw), code),
                    bare_get(bare_raw),
                    c("nested_reused"),
                    "<= 1.20x bare",
                ),
                Row(
                    "nested GET, caller's bytearray",
                    swallow(keep_view, code),
                    bare_get(bare_barray),
                    c("nested_reused"),
                    "<= 1.20x bare",
                ),
                Row(
                    "  the same, each view dropped",
                    swallow(partial(vcpu.get_nested_state, dropped), code),
                    bare_get(bare_barray),
                    c("nested_reused"),
                ),
                Row(
                    "nested GET, fresh buffer",
                    swallow(vcpu.get_nested_state, code),
                    swallow(bare_fresh, code),
                    c("nested_fresh"),
                    "<= 1.10x bare",
                ),
                Row(
                    "nested SET (checks included)",
                    swallow(partial(vcpu.set_nested_state, current), code),
                    swallow(lambda: fcntl.ioctl(fd, SET, set_buf), code),
                    c("nested_set", ctypes.addressof(set_buf)),
                    "<= 1.10x bare",
                ),
                Row(
                    "regs GET+SET",
                    lambda: vcpu.set_regs(vcpu.get_regs()),
                    lambda: (
                        fcntl.ioctl(fd, ioctls.KVM_GET_REGS, regs_buf),
                        fcntl.ioctl(fd, ioctls.KVM_SET_REGS, regs_buf),
                    ),
                    c("regs"),
                ),
                Row(
                    "sregs GET+SET",
                    lambda: vcpu.set_sregs(vcpu.get_sregs()),
                    lambda: (
                        fcntl.ioctl(fd, ioctls.KVM_GET_SREGS, sregs_buf),
                        fcntl.ioctl(fd, ioctls.KVM_SET_SREGS, sregs_buf),
                    ),
                    c("sregs"),
                ),
            ]
            print(f"KVM_CAP_NESTED_STATE = {cap}; {mode}")
            print(f"{n} iterations a round, best of {rounds} interleaved rounds\n")
            run_rows(rows, n, rounds)
            print_rows(rows)
    if not args.no_import:
        print()
        for bare, how in ((False, "with site"), (True, "python -S, nothing preloaded")):
            base, extra = import_overhead_ms(bare=bare)
            print(
                f"import ctypes, fcntl: {base:.1f} ms; import kvmstate on top: {extra:.1f} ms "
                f"({how}; median of 21; target <= 5 ms)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
