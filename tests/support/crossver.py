"""Cross-version migration of the nested L1s, run inside one guest boot per kernel series.

``python -m tests.support.crossver DIR --kernel 6.1 --peer 6.12`` (inside
``tests/guest/run --cpu amd --kernel 6.1 --exchange DIR``), with the same
command for the peer series booted at the same time:

1. writes ``DIR/target-<kernel>.json``: ``kvmstate target`` of this kernel;
2. runs the L1 of tests/support/svm_l1.py (both nested-paging variants) and
   at the first stop of each stage of the migration loop (the stages of
   tests/test_svm_migration.py, the entry-pending one by single-stepping
   VMRUN) saves the vCPU (``save_state``, a kvmstate file) and the guest
   memory into ``DIR/<kernel>/``, then ``DIR/<kernel>/manifest.json``;
3. waits for the peer's manifest, and for each of the peer's saves: runs
   ``kvmstate check SAVE --target DIR/target-<kernel>.json`` *before*
   anything is written, restores it into a new VM (``restore_state``),
   runs L1 to its end and records L2's result;
4. writes ``DIR/results-<kernel>.json`` for the host-side test
   (tests/test_crossver.py), which asserts on it.

Both boots run at once, so the exchange costs no boot beyond one per series.

``--vendor vmx`` does the same with the VMX L1 of tests/support/vmx_l1.py in
the Intel guest, at the first exit of each stage of tests/test_vmx_migration.py
(entries pending included), saving the whole VM (``Vm.save_state``, one
kvmstate file with the memory) and restoring it with ``Kvm.restore_vm``.
Bochs boots cannot see each other's files while they run (the exchange is a
copy in and back), so there the steps run in rounds: ``--round save`` (1 and
2, both series at once), then ``--round restore`` (3 and 4, both again), the
peer's saves already in DIR.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import re
import subprocess
import sys
import time
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kvmstate
import kvmstate.cli
from kvmstate import snapshot, uapi
from kvmstate.errors import KvmError
from kvmstate.preflight import DroppedMsrWarning, PreflightError
from kvmstate.state import VcpuState
from tests import test_svm_migration as svm
from tests.support import svm_l1
from tests.support.migrate import Machine

VARIANTS = {"shadow": False, "npt": True}
WAIT = 1500.0  # seconds for the peer's saves: its boot runs beside this one


def slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")[:48]


def kvmstate_cli(*args: str, in_process: bool = False) -> subprocess.CompletedProcess[str]:
    """The ``kvmstate`` command, in a process of its own, or with ``in_process`` its
    entry point (``kvmstate.cli.main``) here, its output captured: under Bochs a new
    Python process takes seconds to start and import the library."""
    argv = [sys.executable, "-m", "kvmstate", *args]
    if not in_process:
        return subprocess.run(argv, capture_output=True, text=True, timeout=300)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = kvmstate.cli.main(list(args))
    return subprocess.CompletedProcess(argv, status, out.getvalue(), err.getvalue())


def write_atomic(path: Path, data: bytes) -> None:
    # The peer polls this directory: it must never see half a file.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# --- saving -------------------------------------------------------------------------------------


def save_stages(kvm: kvmstate.Kvm, out: Path, variant: str) -> list[dict[str, Any]]:
    """Run L1 to its end, saving vCPU and memory at the first stop of each stage."""
    npt = VARIANTS[variant]
    machine = svm.boot(kvm, npt)
    saved: list[dict[str, Any]] = []
    seen: set[str] = set()
    result = None  # what L1 reported so far: a save after that stop will not see it again
    try:
        vcpu = machine.vcpus[0]
        for index in range(200):
            stop = svm.next_stop(vcpu)
            if stop.port == svm_l1.PORT_RESULT:
                result = stop.value
            if stop.label not in seen:
                seen.add(stop.label)
                vcpu.set_guest_debug(0)  # save the state, not the debugger
                vcpu.complete_io()  # what migrate() does first: the state is whole then
                state = vcpu.save_state()
                name = f"{variant}-{len(saved):02d}-{slug(stop.label)}"
                write_atomic(out / f"{name}.kvmstate", snapshot.dumps_vcpu(state))
                write_atomic(out / f"{name}.mem", zlib.compress(bytes(machine.regions[0].memory)))
                saved.append({"name": name, "variant": variant, "stage": stop.label,
                              "stop": index, "result_before": result})  # fmt: skip
            if stop.label == svm.HALTED:
                break
            if stop.label == svm.BEFORE_VMRUN:
                vcpu.complete_io()  # onto the VMRUN, then one step: the entry pending
                vcpu.set_guest_debug(uapi.KVM_GUESTDBG_ENABLE | uapi.KVM_GUESTDBG_SINGLESTEP)
            else:
                vcpu.set_guest_debug(0)
    finally:
        machine.close()
    return saved


# --- restoring ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    restore: str  # "restored", "refused by the pre-flight", "refused by the kernel"
    error: str = ""
    dropped: list[str] = dataclasses.field(default_factory=list)
    result_ok: bool | None = None  # L2's result and logs as expected (None: not run)
    detail: str = ""
    #: For each pre-flight refusal, what the kernel says to that one write alone.
    kernel_says: list[str] = dataclasses.field(default_factory=list)
    #: After a tsc-rate refusal: the restore again with the target's own TSC rate.
    retry: Outcome | None = None


def run_to_end(machine: Machine, result: int | None) -> tuple[bool, str]:
    """Run the restored L1 to HLT; whether L2's result and L1's logs are the expected ones."""
    vcpu = machine.vcpus[0]
    for _ in range(200):
        stop = svm.next_stop(vcpu)
        if stop.port == svm_l1.PORT_RESULT:
            result = stop.value
        if stop.label == svm.HALTED:
            break
    else:
        return False, "no HLT after 200 stops"
    want = svm.expected()
    io_count, round_count = machine.read_u32(svm_l1.IO_COUNT, 2)
    (events,) = machine.read_u32(svm_l1.EVENT_COUNT)
    got = (result, machine.read_u32(svm_l1.IO_LOG, io_count),
           machine.read_u32(svm_l1.ROUND_LOG, round_count), events)  # fmt: skip
    ok = got == (want.result, want.hashes, want.accumulators, 1)
    shown = "none" if result is None else f"{result:#010x}"
    return ok, f"result {shown} (expected {want.result:#010x}), {events} event(s)"


def kernel_verdicts(kvm: kvmstate.Kvm, state: VcpuState, exc: PreflightError) -> list[str]:
    """Each refused write, tried alone on a scratch vCPU: does this kernel refuse it too?"""
    out = []
    for finding in exc.findings:
        with kvm.create_vm() as vm, vm.create_vcpu(0) as vcpu:
            try:
                if finding.rule == "tsc-rate":
                    assert state.tsc_khz is not None
                    vcpu.set_tsc_khz(state.tsc_khz)
                elif finding.part == "msrs":
                    index = int(finding.message.split()[1], 16)
                    vcpu.set_msrs({index: (state.msrs or {})[index]})
                else:
                    out.append(f"{finding.rule}: not tried alone")
                    continue
            except OSError as error:
                out.append(f"{finding.rule}: refused too (errno {error.errno})")
            else:
                out.append(f"{finding.rule}: ACCEPTED alone")
    return out


def restore_one(
    kvm: kvmstate.Kvm, where: Path, result: int | None, *, keep_tsc: bool = False
) -> Outcome:
    state = snapshot.loads_vcpu(where.with_suffix(".kvmstate").read_bytes())
    if keep_tsc:
        state.tsc_khz = None  # StateError's own advice: keep this vCPU's rate
    machine = Machine(kvm, svm.LAYOUT)
    try:
        machine.regions[0].memory[:] = zlib.decompress(where.with_suffix(".mem").read_bytes())
        try:
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always", DroppedMsrWarning)
                machine.vcpus[0].restore_state(state)
        except PreflightError as exc:
            outcome = Outcome("refused by the pre-flight", str(exc))
            outcome.kernel_says = kernel_verdicts(kvm, state, exc)
            if not keep_tsc and {f.rule for f in exc.findings} == {"tsc-rate"}:
                outcome.retry = restore_one(kvm, where, result, keep_tsc=True)
            return outcome
        except KvmError as exc:
            return Outcome("refused by the kernel", str(exc))
        dropped = {i for w in seen if isinstance(w.message, DroppedMsrWarning)
                   for i in w.message.dropped}  # fmt: skip
        outcome = Outcome("restored", dropped=[hex(i) for i in sorted(dropped)])
        try:
            outcome.result_ok, outcome.detail = run_to_end(machine, result)
        except (AssertionError, OSError) as exc:
            outcome.result_ok, outcome.detail = False, f"the run failed: {exc}"
        return outcome
    finally:
        machine.close()


def check_first(save: Path, target: Path, *, in_process: bool = False) -> dict[str, Any]:
    """``kvmstate check SAVE --target TARGET --json``: the verdict before the restore."""
    proc = kvmstate_cli("check", str(save), "--target", str(target), "--json",
                        in_process=in_process)  # fmt: skip
    if proc.returncode not in (0, 1):
        return {"status": proc.returncode, "error": proc.stderr.strip(), "rules": []}
    (entry,) = json.loads(proc.stdout)["vcpus"]
    rules = [f["rule"] for f in entry.get("preflight", {}).get("refusals", [])]
    rules += [p["rule_id"] or p["rule"] for p in entry["problems"] if p["certain"]]
    undecided = [p["rule_id"] or p["rule"] for p in entry["problems"] if not p["certain"]]
    messages = [f"{f['part']}: {f['message']}" for f in entry.get("preflight", {}).get(
        "refusals", [])] + [f"{p['field']}: {p['rule']}" for p in entry["problems"]]  # fmt: skip
    dropped = sorted(entry.get("preflight", {}).get("dropped", {}))  # the MSRs it would drop
    return {"status": proc.returncode, "refused": entry["refused"], "rules": rules,
            "undecided": undecided, "messages": messages, "dropped": dropped}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Vendor:
    """What differs between the SVM and the VMX runs; the driver's steps are shared."""

    variants: tuple[str, ...]
    #: Run the L1 of one variant to its end, saving into the directory at each stage:
    #: the manifest entries (``name``, ``variant``, ``stage`` and what ``restore`` needs).
    save: Callable[[kvmstate.Kvm, Path, str], list[dict[str, Any]]]
    #: Restore one save (its path without suffix, its manifest entry) and run it to the end.
    restore: Callable[[kvmstate.Kvm, Path, dict[str, Any]], Outcome]
    #: Run ``kvmstate check`` through its entry point in this process (see kvmstate_cli).
    check_in_process: bool = False


def _svm_restore(kvm: kvmstate.Kvm, where: Path, entry: dict[str, Any]) -> Outcome:
    return restore_one(kvm, where, entry["result_before"])


SVM = Vendor(tuple(VARIANTS), save_stages, _svm_restore)


def _vendor(name: str) -> Vendor:
    if name == "svm":
        return SVM
    from tests.support import crossver_vmx  # the Intel guest only: it builds the VMX L1

    return crossver_vmx.VMX


def save_all(vendor: Vendor, kvm: kvmstate.Kvm, exchange: Path, kernel: str) -> bool:
    """Steps 1 and 2: this kernel's target file, every save, the manifest last."""
    mine = exchange / kernel
    mine.mkdir(exist_ok=True)
    made = kvmstate_cli("target")
    if made.returncode != 0:
        print(made.stderr, file=sys.stderr)
        return False
    write_atomic(exchange / f"target-{kernel}.json", made.stdout.encode())
    started = time.monotonic()
    saved = [entry for v in vendor.variants for entry in vendor.save(kvm, mine, v)]
    write_atomic(mine / "manifest.json", json.dumps(saved, indent=1).encode())
    print(f"saved {len(saved)} stages in {time.monotonic() - started:.1f} s", flush=True)
    return True


def restore_all(
    vendor: Vendor, kvm: kvmstate.Kvm, exchange: Path, kernel: str, peer: str
) -> list[dict[str, Any]]:
    """Step 3: check, then restore and run, each of the peer's saves; the result rows."""
    theirs, target = exchange / peer, exchange / f"target-{kernel}.json"
    rows = []
    for entry in json.loads((theirs / "manifest.json").read_text()):
        save = theirs / entry["name"]
        verdict = check_first(save.with_suffix(".kvmstate"), target,
                              in_process=vendor.check_in_process)  # fmt: skip
        outcome = vendor.restore(kvm, save, entry)
        rows.append({**entry, "from": peer, "to": kernel, "check": verdict,
                     **dataclasses.asdict(outcome)})  # fmt: skip
        retry = outcome.retry
        print(f"{peer} -> {kernel} {entry['variant']} {entry['stage']}: "
              f"check {verdict.get('rules') or 'ok'}; {outcome.restore} "
              f"{outcome.error or outcome.detail} {outcome.kernel_says}"
              + (f"; at the target's TSC rate: {retry.restore} {retry.error or retry.detail}"
                 if retry else ""), flush=True)  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--kernel", required=True)
    parser.add_argument("--peer", required=True)
    parser.add_argument("--vendor", choices=("svm", "vmx"), default="svm")
    parser.add_argument(
        "--round", choices=("both", "save", "restore"), default="both",
        help="save: steps 1-2; restore: steps 3-4 with the peer's saves already there; "
        "both (default): all, waiting for the peer's saves",
    )  # fmt: skip
    args = parser.parse_args(argv)
    exchange: Path = args.dir
    vendor = _vendor(args.vendor)
    started = time.monotonic()
    with kvmstate.Kvm() as kvm:
        if args.round != "restore" and not save_all(vendor, kvm, exchange, args.kernel):
            return 1
        if args.round == "save":
            return 0
        manifest = exchange / args.peer / "manifest.json"
        wait = WAIT if args.round == "both" else 0.0
        deadline = time.monotonic() + wait
        while not manifest.exists():
            if time.monotonic() > deadline:
                print(f"no saves from {args.peer} after {wait:.0f} s", file=sys.stderr)
                return 1
            time.sleep(2)
        waited = time.monotonic()
        rows = restore_all(vendor, kvm, exchange, args.kernel, args.peer)
    results = {
        "kernel": args.kernel,
        "release": os.uname().release,
        "rows": rows,
        "save_seconds": waited - started,
        "restore_seconds": time.monotonic() - waited,
    }
    write_atomic(exchange / f"results-{args.kernel}.json", json.dumps(results, indent=1).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
