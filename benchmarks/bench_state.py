#!/usr/bin/env python3
"""``save_state``/``restore_state``: kvmstate, bare ``fcntl.ioctl`` and C; then format speed.

Run on demand (not part of the test suite):

    python3 benchmarks/bench_state.py [--iterations N] [--rounds R]

and inside the emulated AMD guest for a state with nested state in it:

    tests/guest/run -- python3 benchmarks/bench_state.py --iterations 300

Three sides run, on one vCPU descriptor, the ioctls a save or a restore
needs: the library's ``save_state``/``restore_state``; a bare
``fcntl.ioctl`` Python loop of the same ioctls (the same parts, the same
MSR list, the same buffer sizes; a save fills fresh buffers, as a save
must return new objects, and a restore hands the saved ones back); and C,
compiled on the spot into a shared library loaded into this process (KVM
refuses vCPU ioctls from other processes). Best of R interleaved rounds
(benchmarks/_harness.py); the ratios are library / bare and library / C.

Then the formats' throughput, best of R interleaved rounds of a fixed
number of calls: the KVMSTATE file (``to_bytes``/``from_bytes``) and the
JSON form (``json.dumps(to_dict(s))``/``from_dict(json.loads(text))``).
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import json
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import kvmstate  # noqa: E402  (after the path it is found by)
from benchmarks._harness import C_PRELUDE, Row, build_c, print_rows, run_rows  # noqa: E402
from kvmstate import ioctls as io  # noqa: E402
from kvmstate import records, snapshot, uapi  # noqa: E402
from kvmstate.state import PART_TABLE, VcpuState  # noqa: E402
from kvmstate.x86 import MSR_IA32_FEATURE_CONTROL, MSR_IA32_TSC  # noqa: E402

C_SOURCE = (
    C_PRELUDE
    + r"""
struct parts {
    struct kvm_cpuid2 *cpuid; unsigned nent;
    struct kvm_regs regs; struct kvm_sregs sregs; struct kvm_sregs2 sregs2;
    struct kvm_xsave *xsave; struct kvm_xcrs xcrs;
    struct kvm_msrs *msrs, *early, *tsc_msr, *rest; unsigned n_early, n_tsc;
    struct kvm_lapic_state lapic; struct kvm_mp_state mp; struct kvm_vcpu_events ev;
    struct kvm_debugregs dr; int tsc; int read_tsc;
    struct kvm_nested_state *nested; unsigned nested_len;
};

static struct parts P;

static struct kvm_msrs *msr_buffer(const uint32_t *idx, unsigned n) {
    struct kvm_msrs *m = calloc(1, sizeof(*m) + n * sizeof(struct kvm_msr_entry));
    m->nmsrs = n;
    for (unsigned i = 0; i < n; i++) m->entries[i].index = idx[i];
    return m;
}

/* Buffers sized like the Python side: cpuid nent entries, xsave_len bytes, msrs n
 * entries (on restore the first n_early written first, the next n_tsc, IA32_TSC or
 * nothing, after the TSC rate), nested_len bytes (>= KVM_CAP_NESTED_STATE).
 * idx: the MSRs in save order; order: in restore order. */
int setup(unsigned nent, unsigned xsave_len, const uint32_t *idx, unsigned n,
          const uint32_t *order, unsigned n_early, unsigned n_tsc, unsigned nested_len,
          int read_tsc) {
    P.read_tsc = read_tsc;
    P.nent = nent;
    P.cpuid = calloc(1, sizeof(*P.cpuid) + nent * sizeof(struct kvm_cpuid_entry2));
    P.xsave = calloc(1, xsave_len);
    P.msrs = msr_buffer(idx, n);
    P.n_early = n_early;
    P.n_tsc = n_tsc;
    P.early = msr_buffer(order, n_early);
    P.tsc_msr = msr_buffer(order + n_early, n_tsc);
    P.rest = msr_buffer(order + n_early + n_tsc, n - n_early - n_tsc);
    P.nested_len = nested_len;
    P.nested = nested_len ? calloc(1, nested_len) : NULL;
    return 0;
}

#define TRY(x) do { if ((x) < 0) return -1; } while (0)

static int save(int fd, int xsave2) {
    P.cpuid->nent = P.nent;
    TRY(ioctl(fd, KVM_GET_CPUID2, P.cpuid));
    TRY(ioctl(fd, KVM_GET_REGS, &P.regs));
    TRY(ioctl(fd, xsave2 ? KVM_GET_XSAVE2 : KVM_GET_XSAVE, P.xsave));
    TRY(ioctl(fd, KVM_GET_XCRS, &P.xcrs));
    TRY(ioctl(fd, KVM_GET_SREGS, &P.sregs));
    TRY(ioctl(fd, KVM_GET_SREGS2, &P.sregs2));
    TRY(ioctl(fd, KVM_GET_LAPIC, &P.lapic));
    TRY(ioctl(fd, KVM_GET_MP_STATE, &P.mp));
    TRY(ioctl(fd, KVM_GET_VCPU_EVENTS, &P.ev));
    TRY(ioctl(fd, KVM_GET_DEBUGREGS, &P.dr));
    if (ioctl(fd, KVM_GET_MSRS, P.msrs) != (int)P.msrs->nmsrs) return -1;
    TRY(P.tsc = ioctl(fd, KVM_GET_TSC_KHZ, 0));
    if (P.nested) {
        P.nested->size = P.nested_len;
        TRY(ioctl(fd, KVM_GET_NESTED_STATE, P.nested));
    }
    return 0;
}

/* The saved values into the restore-order MSR buffers. */
static void split_msrs(void) {
    struct kvm_msrs *to[3] = {P.early, P.tsc_msr, P.rest};
    for (int k = 0; k < 3; k++)
        for (unsigned i = 0; i < to[k]->nmsrs; i++)
            for (unsigned j = 0; j < P.msrs->nmsrs; j++)
                if (P.msrs->entries[j].index == to[k]->entries[i].index)
                    to[k]->entries[i].data = P.msrs->entries[j].data;
}

static int restore(int fd) {
    if (P.read_tsc) TRY(ioctl(fd, KVM_GET_TSC_KHZ, 0));
    TRY(ioctl(fd, KVM_SET_CPUID2, P.cpuid));
    if (P.n_early && ioctl(fd, KVM_SET_MSRS, P.early) != (int)P.early->nmsrs) return -1;
    TRY(ioctl(fd, KVM_SET_TSC_KHZ, P.tsc));
    if (P.n_tsc && ioctl(fd, KVM_SET_MSRS, P.tsc_msr) != (int)P.tsc_msr->nmsrs) return -1;
    TRY(ioctl(fd, KVM_SET_SREGS, &P.sregs));
    TRY(ioctl(fd, KVM_SET_SREGS2, &P.sregs2));
    if (P.nested) TRY(ioctl(fd, KVM_SET_NESTED_STATE, P.nested));
    TRY(ioctl(fd, KVM_SET_REGS, &P.regs));
    TRY(ioctl(fd, KVM_SET_XSAVE, P.xsave));
    TRY(ioctl(fd, KVM_SET_XCRS, &P.xcrs));
    TRY(ioctl(fd, KVM_SET_LAPIC, &P.lapic));
    if (ioctl(fd, KVM_SET_MSRS, P.rest) != (int)P.rest->nmsrs) return -1;
    TRY(ioctl(fd, KVM_SET_VCPU_EVENTS, &P.ev));
    TRY(ioctl(fd, KVM_SET_MP_STATE, &P.mp));
    TRY(ioctl(fd, KVM_SET_DEBUGREGS, &P.dr));
    return 0;
}

/* ns per save (what = 0) or restore (1), -1 on a failure. */
double bench(int fd, int what, long n, int xsave2) {
    if (save(fd, xsave2)) return -1;
    split_msrs();
    uint64_t t0 = now();
    for (long i = 0; i < n; i++)
        if ((what ? restore(fd) : save(fd, xsave2))) return -1;
    return (double)(now() - t0) / n;
}
"""
)


def load_c(workdir: Path) -> ctypes.CDLL | None:
    dll = build_c(workdir, C_SOURCE, "state")
    if dll is None:
        return None
    dll.bench.restype = ctypes.c_double
    dll.bench.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_int]
    return dll


_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")


def _msr_template(indices: list[int]) -> bytes:
    """A ``struct kvm_msrs`` with these indices: nmsrs, pad, then (index, pad, data) entries."""
    out = bytearray(8 + 16 * len(indices))
    _U32.pack_into(out, 0, len(indices))
    for i, index in enumerate(indices):
        _U32.pack_into(out, 8 + 16 * i, index)
    return bytes(out)


def restore_order(msrs: dict[int, int]) -> tuple[list[int], list[int], list[int]]:
    """The MSRs in the three writes of a restore (kvmstate.save's order): the early ones
    (FEATURE_CONTROL, the VMX capabilities), IA32_TSC (after the TSC rate), the rest."""
    ordered = sorted(msrs)
    early = [i for i in ordered if i == MSR_IA32_FEATURE_CONTROL or 0x480 <= i < 0x492]
    tsc = [i for i in ordered if i == MSR_IA32_TSC]
    return early, tsc, [i for i in ordered if i not in early and i not in tsc]


def bare_sides(
    fd: int, state: VcpuState, xsave_len: int, nested_len: int, read_tsc: bool
) -> tuple[Callable[[], object], Callable[[], object]]:
    """The bare-fcntl save and restore: the library's ioctls, in its order, nothing else.

    ``read_tsc``: the restore first reads the vCPU's TSC rate, as the library's
    pre-flight does on a KVM without TSC scaling (a rate below it may be refused).
    """
    assert state.cpuid is not None and state.msrs is not None and state.tsc_khz is not None
    nent = len(state.cpuid)
    cpuid_template = bytes(_U32.pack(nent)) + bytes(4 + 40 * nent)
    msr_save = _msr_template(list(state.msrs))  # the save's order: the readable MSR list
    fixed = [
        (io.KVM_GET_REGS, ctypes.sizeof(uapi.kvm_regs)),
        (io.KVM_GET_XSAVE2 if xsave_len > 4096 else io.KVM_GET_XSAVE, xsave_len),
        (io.KVM_GET_XCRS, ctypes.sizeof(uapi.kvm_xcrs)),
        (io.KVM_GET_SREGS, ctypes.sizeof(uapi.kvm_sregs)),
        (io.KVM_GET_SREGS2, ctypes.sizeof(uapi.kvm_sregs2)),
        (io.KVM_GET_LAPIC, ctypes.sizeof(uapi.kvm_lapic_state)),
        (io.KVM_GET_MP_STATE, ctypes.sizeof(uapi.kvm_mp_state)),
        (io.KVM_GET_VCPU_EVENTS, ctypes.sizeof(uapi.kvm_vcpu_events)),
        (io.KVM_GET_DEBUGREGS, ctypes.sizeof(uapi.kvm_debugregs)),
    ]
    ioctl = fcntl.ioctl

    def save() -> tuple[list[bytearray], int]:
        out: list[bytearray] = []
        cpuid = bytearray(cpuid_template)
        ioctl(fd, io.KVM_GET_CPUID2, cpuid)
        out.append(cpuid)
        for request, size in fixed:
            buf = bytearray(size)
            ioctl(fd, request, buf)
            out.append(buf)
        msrs = bytearray(msr_save)
        ioctl(fd, io.KVM_GET_MSRS, msrs)
        out.append(msrs)
        tsc = ioctl(fd, io.KVM_GET_TSC_KHZ)
        if nested_len:
            nested = bytearray(nested_len)
            _U32.pack_into(nested, 4, nested_len)
            ioctl(fd, io.KVM_GET_NESTED_STATE, nested)
            out.append(nested)
        return out, tsc

    # The restore hands back what one save read, in the library's order.
    saved, tsc = save()
    cpuid, regs, xsave, xcrs, sregs, sregs2, lapic, mp, events, debugregs = saved[:10]
    nested = saved[11] if nested_len else None
    early, tsc_msr, rest = restore_order(state.msrs)

    def msr_buf(indices: list[int]) -> bytearray:
        buf = bytearray(_msr_template(indices))
        for k, index in enumerate(indices):
            _U64.pack_into(buf, 8 + 16 * k + 8, state.msrs[index])  # type: ignore[index]
        return buf

    early_buf, tsc_buf, rest_buf = msr_buf(early), msr_buf(tsc_msr), msr_buf(rest)

    def restore() -> None:
        if read_tsc:
            ioctl(fd, io.KVM_GET_TSC_KHZ)
        ioctl(fd, io.KVM_SET_CPUID2, cpuid)
        if early:
            ioctl(fd, io.KVM_SET_MSRS, early_buf)
        ioctl(fd, io.KVM_SET_TSC_KHZ, tsc)
        if tsc_msr:
            ioctl(fd, io.KVM_SET_MSRS, tsc_buf)
        ioctl(fd, io.KVM_SET_SREGS, sregs)
        ioctl(fd, io.KVM_SET_SREGS2, sregs2)
        if nested is not None:
            ioctl(fd, io.KVM_SET_NESTED_STATE, nested)
        ioctl(fd, io.KVM_SET_REGS, regs)
        ioctl(fd, io.KVM_SET_XSAVE, xsave)
        ioctl(fd, io.KVM_SET_XCRS, xcrs)
        ioctl(fd, io.KVM_SET_LAPIC, lapic)
        ioctl(fd, io.KVM_SET_MSRS, rest_buf)
        ioctl(fd, io.KVM_SET_VCPU_EVENTS, events)
        ioctl(fd, io.KVM_SET_MP_STATE, mp)
        ioctl(fd, io.KVM_SET_DEBUGREGS, debugregs)

    return save, restore


def _file_floors(state: VcpuState, blob: bytes) -> tuple[Callable[[], object], ...]:
    """The least Python does for the same file: one join of ready chunks (encode), and one
    ``from_buffer_copy`` a record at offsets found beforehand (decode)."""
    chunks, size = state.record_chunks()
    # The file header, meta record and vcpu record head, made already, then the parts.
    ready = [records.file_header(), records.meta_record(), records.record_head("vcpu", size)]
    ready += chunks
    plan: list[tuple[type, int]] = []
    (payload, _, base) = records.vcpu_payloads(blob)[0]
    for _tag, part, offset in records.iter_records(payload, "vcpu", base):
        start = offset + 2 + len(_tag) + 8
        row = PART_TABLE.get(_tag)
        kind = row.type if row is not None and row.codec == "fixed" else None
        if kind is None or ctypes.sizeof(kind) != len(part):
            kind = ctypes.c_uint8 * len(part)
        plan.append((kind, start))

    def encode() -> bytes:
        return b"".join(ready)

    def decode() -> list[object]:
        return [kind.from_buffer_copy(blob, at) for kind, at in plan]  # type: ignore[attr-defined]

    return encode, decode


def format_rates(state: VcpuState, calls: int, rounds: int) -> None:
    blob = state.to_bytes()
    text = json.dumps(snapshot.to_dict(state))
    plain = json.loads(text)
    floor_encode, floor_decode = _file_floors(state, blob)
    rows: list[tuple[str, Callable[[], object], int]] = [
        ("KVMSTATE file encode", state.to_bytes, len(blob)),
        ("  floor: one join", floor_encode, len(blob)),
        ("KVMSTATE file decode", lambda: VcpuState.from_bytes(blob), len(blob)),
        ("  floor: from_buffer_copy", floor_decode, len(blob)),
        ("JSON encode", lambda: json.dumps(snapshot.to_dict(state)), len(text)),
        ("  floor: json.dumps(dict)", lambda: json.dumps(plain), len(text)),
        ("JSON decode", lambda: snapshot.from_dict(json.loads(text)), len(text)),
        ("  floor: json.loads", lambda: json.loads(text), len(text)),
    ]
    best = [float("inf")] * len(rows)
    for _ in range(rounds):
        for k, (_, fn, _) in enumerate(rows):
            t0 = time.perf_counter_ns()
            for _ in range(calls):
                fn()
            best[k] = min(best[k], (time.perf_counter_ns() - t0) / calls)
    print(
        f"\nformats, one vCPU ({len(blob)} bytes file, {len(text)} bytes JSON), "
        f"best of {rounds} interleaved rounds of {calls} calls:"
    )
    for (label, _, nbytes), ns in zip(rows, best, strict=True):
        print(f"  {label:<28}{nbytes / ns * 1000:>9.1f} MB/s  {ns / 1000:>8.1f} us a call")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--format-calls", type=int, default=200)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp, kvmstate.Kvm() as kvm:
        dll = load_c(Path(tmp))
        with kvm.create_vm() as vm:
            vm.create_irqchip()
            with vm.create_vcpu(0) as vcpu:
                vcpu.set_cpuid2(kvm.get_supported_cpuid())
                state = vcpu.save_state()  # also settles the readable MSR list
                if state.sregs2 is None or state.lapic is None or state.xsave is None:
                    print("this KVM lacks sregs2, an irqchip or XSAVE: the loops assume them")
                    return 1
                assert state.cpuid is not None and state.msrs is not None
                indices = list(state.msrs)
                early, tsc_msr, rest = restore_order(state.msrs)
                nested_len = vcpu.nested_state_size if state.nested is not None else 0
                xsave_len = vcpu.xsave_size
                xsave2 = 1 if xsave_len > 4096 else 0
                # Without TSC scaling the library's restore reads the current rate first.
                read_tsc = vcpu.check_extension(uapi.KVM_CAP_TSC_CONTROL) <= 0
                if dll is not None:
                    dll.setup(
                        len(state.cpuid),
                        xsave_len,
                        (ctypes.c_uint32 * len(indices))(*indices),
                        len(indices),
                        (ctypes.c_uint32 * len(indices))(*early, *tsc_msr, *rest),
                        len(early),
                        len(tsc_msr),
                        nested_len,
                        int(read_tsc),
                    )
                fd = vcpu.fileno()
                bare_save, bare_restore = bare_sides(fd, state, xsave_len, nested_len, read_tsc)
                rows = [
                    Row(
                        "save_state",
                        vcpu.save_state,
                        bare_save,
                        None if dll is None else lambda count: dll.bench(fd, 0, count, xsave2),
                        "<= 1.10x bare, <= 1.25x C",
                    ),
                    Row(
                        "restore_state",
                        lambda: vcpu.restore_state(state),
                        bare_restore,
                        None if dll is None else lambda count: dll.bench(fd, 1, count, xsave2),
                        "<= 1.10x bare, <= 1.25x C",
                    ),
                ]
                print(
                    f"parts: {', '.join(state.parts())}; {len(indices)} MSRs; "
                    f"nested: {f'{state.nested.size} bytes' if state.nested else 'absent'}"
                )
                print(f"{args.iterations} iterations a round, best of {args.rounds} rounds\n")
                run_rows(rows, args.iterations, args.rounds)
                print_rows(rows, "us", 1000.0)
    format_rates(state, args.format_calls, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
