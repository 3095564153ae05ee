"""Live migration of a running SVM L1 and its L2, inside the emulated AMD guest.

The L1 of tests/support/svm_l1.py executes VMRUN for real, handles its L2's
#VMEXITs and injects an event into it; its L2 computes a checksum over memory
it writes itself. The same run is done twice per nested-paging variant:
never migrated, and migrated into a new VM (tests/support/migrate.py) at
every exit to the test, including right after a VMRUN whose entry is still
pending (single-stepped). The result must be the same bit for bit, and every
field that came back different after a restore must be one KVM is known to
refresh (:data:`COUNTERS`, :data:`NESTED_REFRESHED`, each with its reason
from the 6.1 sources; 6.12's say the same, except that its
svm_copy_vmrun_state also restores DEBUGCTL and the LBR fields where the
CPU has LBR virtualization, which the emulated CPU lacks).

The tests marked ``svm_guest`` run inside tests/guest/run --cpu amd (one boot
for all, per kernel series: 6.1 and 6.12); the unmarked ones check the
helpers on the host's own /dev/kvm.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import kvmstate
from kvmstate import uapi
from kvmstate.nested import HEADER_SIZE, SVM_MAX_SIZE, NestedState
from kvmstate.uapi import NestedFlag
from kvmstate.vmcb import SvmExit
from kvmstate.vmstate import VmState
from tests.kvm_fixtures import start_real_mode
from tests.support import migrate, svm_l1
from tests.support.migrate import Machine

LAYOUT = [(0, svm_l1.MEMORY)]
MASK = 0xFFFF_FFFF
GIF, GUEST = NestedFlag.GIF_SET, NestedFlag.GUEST_MODE | NestedFlag.GIF_SET
PENDING = NestedFlag.GUEST_MODE | NestedFlag.RUN_PENDING | NestedFlag.GIF_SET
MSR_IA32_TSC = 0x10
STEP = uapi.KVM_GUESTDBG_ENABLE | uapi.KVM_GUESTDBG_SINGLESTEP

# What comes back different after restoring into a new VM, each with its reason in the
# Linux 6.1 sources. Counters and clocks may differ at any stop (the TSC always does):
COUNTERS = {
    "msrs[0x10]": "x86.c kvm_synchronize_tsc: a host TSC write within 1 s of the VM's own TSC "
    "is taken as a sync and keeps the new VM's offset; and the TSC counts on",
    "msrs[0x40000010]": "hyperv.c kvm_hv_get_msr: HV VP_RUNTIME is the calling thread's CPU "
    "time plus the restored offset, so it counts while the test runs",
    "msrs[0x40000020]": "hyperv.c: HV TIME_REF_COUNT ignores host writes "
    "(kvm_hv_set_msr_pw); get_time_ref_counter reads the kvmclock, which KVM_SET_CLOCK "
    "restores with the time since the save added: it runs on",
}
# Nested-state fields KVM refreshes, with the one stage where they differ in these runs:
NESTED_REFRESHED = {
    "nested.vmcb12.save.dr6": (
        "right after VMRUN, entry pending",
        "nested.c svm_get_nested_state copies all of vmcb01.save but svm_set_nested_state "
        "restores only svm_copy_vmrun_state's fields, and svm.c svm_vcpu_run sets DR6 only in "
        "the VMCB it runs: vmcb01 of a vCPU that ran L1 holds DR6_ACTIVE_LOW, a restored one 0",
    ),
}


# --- the expected result, computed here without the guest ----------------------------------


def rol(value: int, n: int) -> int:
    return (value << n | value >> (32 - n)) & MASK


@dataclasses.dataclass(frozen=True)
class Expected:
    result: int
    hashes: list[int]  # what L2 writes to the port L1 intercepts, per round
    accumulators: list[int]  # what L2 passes in EBX at each HC_ROUND


def expected() -> Expected:
    """The L2 workload and L1's answers as the module docstring of svm_l1 describes them."""
    acc, events = svm_l1.SEED, 0
    hashes, accs = [], []
    for round_ in range(svm_l1.ROUNDS):
        x = (acc ^ svm_l1.ROUND_KEY) | 1
        h = svm_l1.FNV_OFFSET
        for _ in range(svm_l1.WORDS):
            x ^= x << 13 & MASK
            x ^= x >> 17
            x ^= x << 5 & MASK
            h = (h ^ x) * svm_l1.FNV_PRIME & MASK
        hashes.append(h)
        acc = (acc + (h ^ svm_l1.CPUID_MAGIC)) & MASK
        accs.append(acc)
        if round_ + 1 == svm_l1.INJECT_AFTER:
            events += 1  # delivered at the VMRUN that returns from this round's VMMCALL
        acc = rol((acc + events * svm_l1.EVENT_MIX) & MASK, svm_l1.ROTATE)
    return Expected(acc, hashes, accs)


# --- running the L1 ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Stop:
    """One exit to the test: a label for the stage table and the raw facts."""

    label: str
    port: int | None = None
    value: int | None = None


STAGE_LABELS = {
    svm_l1.Stage.START: "before nested is enabled",
    svm_l1.Stage.SVME: "EFER.SVME set",
    svm_l1.Stage.HSAVE: "VM_HSAVE_PA set",
    svm_l1.Stage.VMCB_READY: "VMCB prepared",
    svm_l1.Stage.EVENT_PENDING: "event pending injection (EVENTINJ written)",
    svm_l1.Stage.SVME_OFF: "after L1 left nested mode (EFER.SVME clear)",
}
BEFORE_VMRUN = "before VMRUN (GIF clear)"
ENTRY_PENDING = "right after VMRUN, entry pending"
L2_TO_USERSPACE = "L2 exited to userspace (guest mode)"
RESULT = "L1 reports L2's result"
HALTED = "L1 halted at the end"


def handling(code: int) -> str:
    return f"L1 handling L2's #VMEXIT {SvmExit(code).name} (GIF clear)"


def next_stop(vcpu: kvmstate.Vcpu) -> Stop:
    reason = vcpu.run()
    run = vcpu.kvm_run
    if reason == uapi.ExitReason.IO:
        port = int(run.io.port)
        value = int.from_bytes(vcpu.io_data(), "little")
        if port == svm_l1.PORT_STAGE:
            return Stop(STAGE_LABELS[svm_l1.Stage(value)], port, value)
        labels = {
            svm_l1.PORT_VMRUN: BEFORE_VMRUN,
            svm_l1.PORT_L2: L2_TO_USERSPACE,
            svm_l1.PORT_RESULT: RESULT,
        }
        if port in labels:
            return Stop(labels[port], port, value)
        if port == svm_l1.PORT_FAIL:
            raise AssertionError(f"L1 failed: it did not expect {value:#x}")
        if port == svm_l1.PORT_EXIT and value in (SvmExit.CPUID, SvmExit.IOIO, SvmExit.VMMCALL):
            return Stop(handling(value), port, value)
        raise AssertionError(f"L1 stopped on port {port:#x} with {value:#x} (see svm_l1's ports)")
    if reason == uapi.ExitReason.DEBUG:
        return Stop(ENTRY_PENDING, value=vcpu.kvm_run.debug.arch.pc)
    if reason == uapi.ExitReason.HLT:
        return Stop(HALTED)
    raise AssertionError(f"unexpected exit {reason!r} at rip {vcpu.get_regs().rip:#x}")


@dataclasses.dataclass
class Row:
    """What one migration saw: the stop, the nested state saved there, what came back different."""

    stop: Stop
    nested: NestedState
    refreshed: list[str]


@dataclasses.dataclass
class Run:
    stops: list[Stop]
    rows: list[Row]  # one per stop when migrating, else none
    result: int
    io_log: list[int]
    round_log: list[int]
    event_count: int
    event_rip: int
    seconds: float


def boot(kvm: kvmstate.Kvm, npt: bool) -> Machine:
    machine = Machine(kvm, LAYOUT)
    svm_l1.load(machine.regions[0].memory, npt)
    svm_l1.prepare_vcpu(machine.vcpus[0], kvm.get_supported_cpuid())
    return machine


def run_l1(kvm: kvmstate.Kvm, npt: bool, *, migrating: bool, limit: int = 200) -> Run:
    """Run to the end; when ``migrating``, single-step every VMRUN and migrate at every stop."""
    start = time.monotonic()
    machine = boot(kvm, npt)
    stops: list[Stop] = []
    rows: list[Row] = []
    result: int | None = None
    try:
        for _ in range(limit):
            stop = next_stop(machine.vcpus[0])
            stops.append(stop)
            if stop.port == svm_l1.PORT_RESULT:
                result = stop.value
            if migrating:
                machine.vcpus[0].set_guest_debug(0)  # migrate the state, not the debugger
                moved = migrate.migrate(machine)
                machine = moved.machine
                assert set(moved.vm_refreshed) <= {"clock"}, moved.vm_refreshed
                nested = moved.saved[0].nested
                assert nested is not None
                rows.append(Row(stop, nested, moved.refreshed[0].paths()))
            if stop.label == HALTED:
                break
            if migrating and stop.label == BEFORE_VMRUN:
                # Finish the OUT first: its completion moves RIP onto the VMRUN, and a
                # single-step armed before it would stop right after the OUT instead.
                machine.vcpus[0].complete_io()
                machine.vcpus[0].set_guest_debug(STEP)
        else:
            raise AssertionError(f"no end after {limit} stops: {[s.label for s in stops[-5:]]}")
        assert result is not None, "L1 never reported a result"
        io_count, round_count = machine.read_u32(svm_l1.IO_COUNT, 2)
        (event_count,) = machine.read_u32(svm_l1.EVENT_COUNT)
        rip_low, rip_high = machine.read_u32(svm_l1.EVENT_RIP, 2)
        return Run(
            stops=stops,
            rows=rows,
            result=result,
            io_log=machine.read_u32(svm_l1.IO_LOG, io_count),
            round_log=machine.read_u32(svm_l1.ROUND_LOG, round_count),
            event_count=event_count,
            event_rip=rip_low | rip_high << 32,
            seconds=time.monotonic() - start,
        )
    finally:
        machine.close()


# --- fixtures: each run once per variant, shared by the tests -----------------------------------


@pytest.fixture(scope="module")
def nested_kvm() -> Iterator[kvmstate.Kvm]:
    with kvmstate.Kvm() as k:
        if not k.nested_state_size:
            pytest.skip("this KVM has no nested state (KVM_CAP_NESTED_STATE is 0)")
        yield k


@pytest.fixture(scope="module")
def runs(nested_kvm: kvmstate.Kvm) -> Callable[[bool, bool], Run]:
    """``runs(npt, migrating)``: the run, made on first use."""
    done: dict[tuple[bool, bool], Run] = {}

    def get(npt: bool, migrating: bool) -> Run:
        if (npt, migrating) not in done:
            done[npt, migrating] = run_l1(nested_kvm, npt, migrating=migrating)
        return done[npt, migrating]

    return get


VARIANTS = pytest.mark.parametrize("npt", [False, True], ids=["shadow", "npt"])
Runs = Callable[[bool, bool], Run]


# --- (a) never migrated -----------------------------------------------------------------------


@pytest.mark.svm_guest
@VARIANTS
def test_unmigrated_run_gives_the_expected_checksum(runs: Runs, npt: bool) -> None:
    run, want = runs(npt, False), expected()
    assert run.result == want.result
    assert run.io_log == want.hashes  # L1 saw every intercepted OUT, in order
    assert run.round_log == want.accumulators  # and every HC_ROUND's EBX
    assert run.event_count == 1  # the injected event reached L2's handler once,
    assert run.event_rip == svm_l1.labels(npt)["after_round_call"]  # right after the VMMCALL


@pytest.mark.svm_guest
@VARIANTS
def test_unmigrated_run_passes_every_stage(runs: Runs, npt: bool) -> None:
    labels = [s.label for s in runs(npt, False).stops]
    assert labels[:4] == [STAGE_LABELS[s] for s in list(svm_l1.Stage)[:4]]
    assert labels[-3:] == [RESULT, STAGE_LABELS[svm_l1.Stage.SVME_OFF], HALTED]
    vmruns = 1 + 3 * svm_l1.ROUNDS  # the first, then one per CPUID, IOIO and VMMCALL exit
    assert labels.count(BEFORE_VMRUN) == vmruns
    for code in (SvmExit.CPUID, SvmExit.IOIO):
        assert labels.count(handling(code)) == svm_l1.ROUNDS
    assert labels.count(handling(SvmExit.VMMCALL)) == svm_l1.ROUNDS + 1  # and HC_DONE
    assert labels.count(L2_TO_USERSPACE) == svm_l1.ROUNDS
    assert labels.count(STAGE_LABELS[svm_l1.Stage.EVENT_PENDING]) == 1
    assert ENTRY_PENDING not in labels  # nothing single-steps this run


# --- (c) saved to a file, finished in a new process --------------------------------------------

FILE_STOP = 2  # saved at L1's second L2_TO_USERSPACE stop: L2 in guest mode, mid-run


def save_to_file(path: str) -> None:
    """In a first process: run the nested-paging L1 to :data:`FILE_STOP`, save the VM."""
    with kvmstate.Kvm() as kvm:
        machine = boot(kvm, True)
        try:
            seen = 0
            while seen < FILE_STOP:
                seen += next_stop(machine.vcpus[0]).label == L2_TO_USERSPACE
            machine.vm.save_state(machine.vcpus).write(path)
        finally:
            machine.close()


def finish_from_file(path: str) -> dict[str, object]:
    """In a second process: restore from ``path``, run to the end; what L1 logged."""
    with kvmstate.Kvm() as kvm:
        machine = Machine(kvm, LAYOUT, vm=kvm.restore_vm(VmState.load(path)))
        try:
            result = None
            while (stop := next_stop(machine.vcpus[0])).label != HALTED:
                if stop.port == svm_l1.PORT_RESULT:
                    result = stop.value
            io_count, round_count = machine.read_u32(svm_l1.IO_COUNT, 2)
            return {
                "result": result,
                "io_log": machine.read_u32(svm_l1.IO_LOG, io_count),
                "round_log": machine.read_u32(svm_l1.ROUND_LOG, round_count),
                "event_count": machine.read_u32(svm_l1.EVENT_COUNT)[0],
            }
        finally:
            machine.close()


@pytest.mark.svm_guest
def test_a_vm_saved_to_a_file_finishes_in_a_new_process(tmp_path: Path) -> None:
    path = str(tmp_path / "l1.kvmstate")
    saved, logs = migrate.in_two_processes(save_to_file, finish_from_file, path, timeout=600)
    nested = saved.vcpus[0].nested
    assert nested is not None and nested.size == SVM_MAX_SIZE
    assert nested.flags == GUEST  # saved with L2 running
    want = expected()
    assert logs["result"] == want.result  # bit for bit, as a run never saved
    assert logs["io_log"] == want.hashes and logs["round_log"] == want.accumulators
    assert logs["event_count"] == 1


# --- (b) migrated at every stop -------------------------------------------------------------------


@pytest.mark.svm_guest
@VARIANTS
def test_migrated_at_every_stop_gives_the_same_result(runs: Runs, npt: bool) -> None:
    plain, moved = runs(npt, False), runs(npt, True)
    assert moved.result == plain.result == expected().result
    assert moved.io_log == plain.io_log and moved.round_log == plain.round_log
    assert (moved.event_count, moved.event_rip) == (plain.event_count, plain.event_rip)
    # The same stops with the same values, plus a single-step stop after each VMRUN.
    assert [s for s in moved.stops if s.label != ENTRY_PENDING] == plain.stops
    assert len(moved.rows) == len(moved.stops)  # migrated at every one


@pytest.mark.svm_guest
@VARIANTS
def test_single_step_stops_right_after_vmrun_with_the_entry_pending(runs: Runs, npt: bool) -> None:
    moved = runs(npt, True)
    vmrun = svm_l1.labels(npt)["vmrun"]
    labels = [row.stop.label for row in moved.rows]
    pending = [i for i, label in enumerate(labels) if label == ENTRY_PENDING]
    assert len(pending) == labels.count(BEFORE_VMRUN)
    event = labels.index(STAGE_LABELS[svm_l1.Stage.EVENT_PENDING])
    for i in pending:
        row = moved.rows[i]
        assert labels[i - 1] == BEFORE_VMRUN
        assert row.stop.value == vmrun + 3  # KVM skipped the 3-byte VMRUN, then stopped
        assert row.nested.flags == PENDING and row.nested.svm.vmcb_pa == svm_l1.VMCB
        vmcb12 = row.nested.vmcb12
        assert vmcb12 is not None
        assert vmcb12.save.rip == vmrun + 3  # L1's state, to resume at #VMEXIT
        # The entry that carries the event is the one right after L1 wrote EVENTINJ.
        carries = i == event + 2
        assert vmcb12.control.event_inj == (svm_l1.EVENT_INJ if carries else 0), i


# --- (c) what each stage looks like, and what KVM refreshes -------------------------------------

# What the saved nested state must be at each stage, from the architecture: CLGI
# clears GIF and a #VMEXIT leaves it clear until STGI; VMRUN enters guest mode with
# GIF set; the entry is pending until the vCPU runs.
EXPECTED_STATE = {
    STAGE_LABELS[svm_l1.Stage.START]: (HEADER_SIZE, GIF),
    STAGE_LABELS[svm_l1.Stage.SVME]: (HEADER_SIZE, GIF),
    STAGE_LABELS[svm_l1.Stage.HSAVE]: (HEADER_SIZE, GIF),
    STAGE_LABELS[svm_l1.Stage.VMCB_READY]: (HEADER_SIZE, GIF),
    BEFORE_VMRUN: (HEADER_SIZE, NestedFlag(0)),
    ENTRY_PENDING: (SVM_MAX_SIZE, PENDING),
    L2_TO_USERSPACE: (SVM_MAX_SIZE, GUEST),
    handling(SvmExit.CPUID): (HEADER_SIZE, NestedFlag(0)),
    handling(SvmExit.IOIO): (HEADER_SIZE, NestedFlag(0)),
    handling(SvmExit.VMMCALL): (HEADER_SIZE, NestedFlag(0)),
    STAGE_LABELS[svm_l1.Stage.EVENT_PENDING]: (HEADER_SIZE, GIF),
    RESULT: (HEADER_SIZE, GIF),
    STAGE_LABELS[svm_l1.Stage.SVME_OFF]: (HEADER_SIZE, GIF),
    HALTED: (HEADER_SIZE, GIF),
}


def stage_table(run: Run) -> list[tuple[str, str, str, str, int]]:
    """(stage, nested sizes, flags, refreshed fields, times seen), in order of first sight."""
    table: dict[str, list[Row]] = {}
    for row in run.rows:
        table.setdefault(row.stop.label, []).append(row)
    out = []
    for label, rows in table.items():
        sizes = sorted({row.nested.size for row in rows})
        flags = sorted({row.nested.flags.name or "0" for row in rows})
        fields = sorted({field for row in rows for field in row.refreshed})
        out.append(
            (label, "/".join(map(str, sizes)), "/".join(flags), ", ".join(fields), len(rows))
        )
    return out


def print_table(title: str, run: Run) -> None:
    print(f"\n{title} ({len(run.rows)} migrations, {run.seconds:.1f} s)")
    print(f"| stage | nested size | flags | came back different | seen |\n|{' --- |' * 5}")
    for label, size, flags, fields, count in stage_table(run):
        print(f"| {label} | {size} | {flags} | {fields} | {count} |")


@pytest.mark.svm_guest
@VARIANTS
def test_each_stage_has_its_nested_state_and_only_known_refreshes(runs: Runs, npt: bool) -> None:
    moved = runs(npt, True)
    print_table(f"SVM, {'nested paging' if npt else 'no nested paging'}", moved)
    print(f"unmigrated run: {runs(npt, False).seconds:.1f} s")

    assert {row.stop.label for row in moved.rows} == EXPECTED_STATE.keys()
    for row in moved.rows:
        where = f"{row.stop.label} ({row.stop})"
        assert (row.nested.size, row.nested.flags) == EXPECTED_STATE[row.stop.label], where
        assert f"msrs[{MSR_IA32_TSC:#x}]" in row.refreshed, where
        nested = {f for f, (stage, _) in NESTED_REFRESHED.items() if stage == row.stop.label}
        assert set(row.refreshed) - COUNTERS.keys() == nested, where


# --- the helpers themselves, on the host's /dev/kvm (no nesting needed) ------------------------

# Real mode at 0x1000: count in the byte at 0x2000 and report each value, five times.
COUNTER = 0x2000
COUNT_TO_FIVE = bytes(
    [
        0xFE, 0x06, 0x00, 0x20,  # inc byte [0x2000]
        0xA0, 0x00, 0x20,  # mov al, [0x2000]
        0xE6, 0x10,  # out 0x10, al
        0x3C, 0x05,  # cmp al, 5
        0x75, 0xF3,  # jne 0x1000
        0xF4,  # hlt
    ]
)  # fmt: skip


def real_mode_machine(kvm: kvmstate.Kvm) -> Machine:
    machine = Machine(kvm, [(0, 0x10000)])
    with machine.memory(0x1000, len(COUNT_TO_FIVE)) as view:
        view[:] = COUNT_TO_FIVE
    start_real_mode(machine.vcpus[0])
    return machine


def test_migrate_carries_memory_and_registers_into_a_new_vm(kvm: kvmstate.Kvm) -> None:
    machine = real_mode_machine(kvm)
    seen = []
    try:
        while machine.vcpus[0].run() == uapi.ExitReason.IO:
            seen.append(machine.vcpus[0].io_data()[0])
            old = machine
            moved = migrate.migrate(machine)
            machine = moved.machine
            assert old.vm.closed and machine.vm is not old.vm
            assert moved.saved[0].regs is not None and moved.saved[0].regs.rip == 0x1009
            unexplained = set(moved.refreshed[0].paths()) - COUNTERS.keys()
            assert not unexplained
            assert moved.vm_refreshed in ([], ["clock"])  # memory came back the same
        assert seen == [1, 2, 3, 4, 5]  # the count went on in each new VM's memory
        assert machine.memory(COUNTER, 1)[0] == 5
    finally:
        machine.close()


def test_compare_names_each_field_by_part(kvm: kvmstate.Kvm) -> None:
    machine = real_mode_machine(kvm)
    try:
        before = machine.vcpus[0].save_state()
        after = machine.vcpus[0].save_state()
    finally:
        machine.close()
    assert before.regs is not None and after.regs is not None and after.sregs is not None
    assert after.msrs is not None
    after.regs.rip += 1
    after.sregs.cs.base = 0x10
    after.msrs[MSR_IA32_TSC] = (before.msrs or {})[MSR_IA32_TSC] + 1
    after.tsc_khz = None
    paths = migrate.compare(before, after).paths()
    assert {"regs.rip", "sregs.cs.base", f"msrs[{MSR_IA32_TSC:#x}]", "tsc_khz"} <= set(paths)
    assert migrate.compare(before, before).paths() == []


def test_machine_refuses_what_it_cannot_hold(kvm: kvmstate.Kvm) -> None:
    with pytest.raises(ValueError, match="at least one vCPU"):
        Machine(kvm, [(0, 0x10000)], vcpus=0)
    machine = Machine(kvm, [(0, 0x10000)])
    try:
        with pytest.raises(ValueError, match="not inside one memory region"):
            machine.memory(0xFFF0, 0x20)
    finally:
        machine.close()


def test_single_step_stops_after_each_instruction(kvm: kvmstate.Kvm) -> None:
    machine = real_mode_machine(kvm)
    vcpu = machine.vcpus[0]
    try:
        vcpu.set_guest_debug(STEP)
        pcs = []
        for _ in range(2):
            assert vcpu.run() == uapi.ExitReason.DEBUG
            pcs.append(vcpu.kvm_run.debug.arch.pc)
        assert pcs == [0x1004, 0x1007]  # after the 4-byte inc, after the 3-byte mov
        vcpu.set_guest_debug(0)
        assert vcpu.run() == uapi.ExitReason.IO  # off again: runs to the next exit
    finally:
        machine.close()


def child_report(*args: object) -> list[object]:
    """For run_in_child's own test: the process it ran in and what it was given."""
    return [os.getpid(), list(args)]


def child_fails(message: str) -> None:
    raise RuntimeError(message)


def test_run_in_child_calls_in_another_process_and_returns_the_result() -> None:
    pid, args = migrate.run_in_child(child_report, "/a path", 3, timeout=120)
    assert pid != os.getpid() and args == ["/a path", 3]
    with pytest.raises(AssertionError, match=r"(?s)exit status 1.*RuntimeError: deliberately"):
        migrate.run_in_child(child_fails, "deliberately", timeout=120)
    with pytest.raises(ValueError, match="cannot be imported by name"):
        migrate.run_in_child(lambda: None, timeout=120)
