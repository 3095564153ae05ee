"""Cross-version migration of the SVM L1, run inside one AMD guest boot per kernel series.

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
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path
from typing import Any

import kvmstate
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


def kvmstate_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvmstate", *args], capture_output=True, text=True, timeout=300
    )


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


def check_first(save: Path, target: Path) -> dict[str, Any]:
    """``kvmstate check SAVE --target TARGET --json``: the verdict before the restore."""
    proc = kvmstate_cli("check", str(save), "--target", str(target), "--json")
    if proc.returncode not in (0, 1):
        return {"status": proc.returncode, "error": proc.stderr.strip(), "rules": []}
    (entry,) = json.loads(proc.stdout)["vcpus"]
    rules = [f["rule"] for f in entry.get("preflight", {}).get("refusals", [])]
    rules += [p["rule_id"] or p["rule"] for p in entry["problems"] if p["certain"]]
    undecided = [p["rule_id"] or p["rule"] for p in entry["problems"] if not p["certain"]]
    messages = [f"{f['part']}: {f['message']}" for f in entry.get("preflight", {}).get(
        "refusals", [])] + [f"{p['field']}: {p['rule']}" for p in entry["problems"]]  # fmt: skip
    return {"status": proc.returncode, "refused": entry["refused"], "rules": rules,
            "undecided": undecided, "messages": messages}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--kernel", required=True)
    parser.add_argument("--peer", required=True)
    args = parser.parse_args(argv)
    exchange: Path = args.dir
    mine, theirs = exchange / args.kernel, exchange / args.peer
    mine.mkdir(exist_ok=True)
    made = kvmstate_cli("target")
    if made.returncode != 0:
        print(made.stderr, file=sys.stderr)
        return 1
    target = exchange / f"target-{args.kernel}.json"
    write_atomic(target, made.stdout.encode())

    started = time.monotonic()
    with kvmstate.Kvm() as kvm:
        saved = [entry for v in VARIANTS for entry in save_stages(kvm, mine, v)]
        write_atomic(mine / "manifest.json", json.dumps(saved, indent=1).encode())
        print(f"saved {len(saved)} stages in {time.monotonic() - started:.1f} s", flush=True)

        deadline = time.monotonic() + WAIT
        while not (theirs / "manifest.json").exists():
            if time.monotonic() > deadline:
                print(f"no saves from {args.peer} after {WAIT:.0f} s", file=sys.stderr)
                return 1
            time.sleep(2)
        waited = time.monotonic()
        rows = []
        for entry in json.loads((theirs / "manifest.json").read_text()):
            save = theirs / entry["name"]
            verdict = check_first(save.with_suffix(".kvmstate"), target)
            outcome = restore_one(kvm, save, entry["result_before"])
            rows.append({**entry, "from": args.peer, "to": args.kernel, "check": verdict,
                         **dataclasses.asdict(outcome)})  # fmt: skip
            retry = outcome.retry
            print(f"{args.peer} -> {args.kernel} {entry['variant']} {entry['stage']}: "
                  f"check {verdict.get('rules') or 'ok'}; {outcome.restore} "
                  f"{outcome.error or outcome.detail} {outcome.kernel_says}"
                  + (f"; at the target's TSC rate: {retry.restore} {retry.error or retry.detail}"
                     if retry else ""), flush=True)  # fmt: skip
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
