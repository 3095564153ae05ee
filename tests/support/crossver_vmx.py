"""The VMX side of tests/support/crossver.py: the Intel guest's L1, saved and restored whole.

The L1 of tests/support/vmx_l1.py runs as tests/test_vmx_migration.py runs
it (entries pending included: an interrupt window is asked for before each
VMLAUNCH and VMRESUME), exit by exit against that file's model. At the
first exit of each stage (and after each NMI the test injects, the NMI
pending) the whole VM is saved (``Vm.save_state``: memory, clock, irqchip,
the vCPU with its nested state) into one kvmstate file, and the run goes
on. The one exit never saved is the entry pending with an expired
preemption timer, which KVM loses on any restore (that file's strict xfail).

A restore is ``Kvm.restore_vm`` into a new VM, then what the test did
after that exit and the save could not carry (the event it injects, the
interrupt window it asks for), then the run from the next exit to the
end, every exit and L2's checksum, events and buffer as the model says.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import kvmstate
from kvmstate.errors import KvmError
from kvmstate.preflight import DroppedMsrWarning, PreflightError
from kvmstate.vmstate import VmRestoreError, VmState
from tests import test_vmx_migration as vmx
from tests.support import migrate_vmx
from tests.support.crossver import Outcome, Vendor, kernel_verdicts, slug, write_atomic
from tests.support.vmx_l1 import Phase, Port

VARIANT = "vmx"


def window_after(want: vmx.Exit) -> bool:
    """Whether the test asks for an interrupt window after this exit (VMLAUNCH/VMRESUME next)."""
    return want.port == Port.STEP and want.value in (Phase.LAUNCH, Phase.RESUME)


class Saver(vmx.Run):
    """The model's run, saving the VM (not migrating it) at each stage's first exit."""

    def __init__(self, kvm: kvmstate.Kvm, out: Path) -> None:
        super().__init__(kvm, migrate_when=self._choose, pending_entries=True)
        self.out = out
        self.saved: list[dict[str, Any]] = []
        self.index = -1

    def _choose(self, index: int, want: vmx.Exit) -> bool:
        self.index = index
        return not vmx.expired_timer(index)

    def _checkpoint(self, want: vmx.Exit, stage: str, *, nmi_pending: bool = False) -> None:
        if not self.migrate or stage in {s["stage"] for s in self.saved}:
            return
        state = self.machine.vm.save_state(self.machine.vcpus)  # pending I/O completed first
        name = f"{VARIANT}-{len(self.saved):02d}-{slug(stage)}"
        write_atomic(self.out / f"{name}.kvmstate", state.to_bytes())
        self.saved.append({
            "name": name, "variant": VARIANT, "stage": stage, "exit": self.index,
            # What the test does after this exit, which the restore must do again.
            "inject": None if nmi_pending else want.inject,
            "window": window_after(want),
        })  # fmt: skip


def save_stages(kvm: kvmstate.Kvm, out: Path, variant: str) -> list[dict[str, Any]]:
    """Run L1 to its end (every exit as the model says), saving at each stage."""
    run = Saver(kvm, out)
    try:
        run.run()
        vmx.finish(run)
    finally:
        run.close()
    return run.saved


def run_to_end(run: vmx.Run, entry: dict[str, Any]) -> tuple[bool, str]:
    """Redo what followed the saved exit, run the rest; whether it ended as the model says."""
    if entry["inject"] is not None:
        run._inject(entry["inject"])
    if entry["window"]:
        run.vcpu.kvm_run.request_interrupt_window = 1
    want = vmx.l2_model()
    try:
        run.run(start=entry["exit"] + 1)
        vmx.finish(run)
    except AssertionError as exc:
        return False, f"the run went wrong: {str(exc)[:300]}"
    results = [value for port, value in run.seen if port == Port.RESULT]
    shown = ", ".join(f"{v:#010x}" for v in results if v is not None) or "none after the save"
    exits = len(run.seen)
    return True, f"checksum {shown} (expected {want.checksum:#010x}), {exits} exits as modelled"


def restore_one(
    kvm: kvmstate.Kvm, where: Path, entry: dict[str, Any], *, keep_tsc: bool = False
) -> Outcome:
    state = VmState.load(str(where.with_suffix(".kvmstate")))
    vcpu_state = state.vcpus[0]
    if keep_tsc:
        vcpu_state.tsc_khz = None  # StateError's own advice: keep this vCPU's rate
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always", DroppedMsrWarning)
            vm = kvm.restore_vm(state)
    except VmRestoreError as exc:
        # The vCPU's pre-flight refused it (the new VM is closed); its findings are the cause.
        refused = exc.__context__
        if not isinstance(refused, PreflightError):
            return Outcome("refused by the kernel", str(exc))
        outcome = Outcome("refused by the pre-flight", str(refused))
        outcome.kernel_says = kernel_verdicts(kvm, vcpu_state, refused)
        if not keep_tsc and {f.rule for f in refused.findings} == {"tsc-rate"}:
            outcome.retry = restore_one(kvm, where, entry, keep_tsc=True)
        return outcome
    except KvmError as exc:
        return Outcome("refused by the kernel", str(exc))
    dropped = {i for w in seen if isinstance(w.message, DroppedMsrWarning)
               for i in w.message.dropped}  # fmt: skip
    outcome = Outcome("restored", dropped=[hex(i) for i in sorted(dropped)])
    run = vmx.Run(kvm, machine=migrate_vmx.Machine(kvm, vmx.LAYOUT, vm), pending_entries=True)
    try:
        outcome.result_ok, outcome.detail = run_to_end(run, entry)
    except OSError as exc:
        outcome.result_ok, outcome.detail = False, f"the run failed: {exc}"
    finally:
        run.close()
    return outcome


#: ``kvmstate check`` in this process: 32 Python starts would cost minutes under Bochs.
VMX = Vendor((VARIANT,), save_stages, restore_one, check_in_process=True)
