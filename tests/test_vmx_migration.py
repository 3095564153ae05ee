"""Live migration of a running nested VMX guest into new VMs, at every exit.

The L1 of ``tests/support/vmx_l1.py`` (:func:`~tests.support.vmx_l1.nested_image`)
runs an L2 through VMLAUNCH, many VMRESUMEs, exits it handles (VMCALL,
CPUID, I/O, NMI, external interrupt, preemption timer), events it injects,
the VMX preemption timer and VMCS shadowing, and VMXOFF. This file's own
model of that run (:func:`model`: the same script and constants, its own
arithmetic) says which exits reach the test, in which order, what nested
state each must show, and the checksum L2 must report.

The guest tests (marked ``vmx_guest``: inside the emulated Intel guest)
run it never migrated, and migrated at every exit through
``tests/support/migrate_vmx.py``: save, close, restore into a new VM,
compare a fresh save with what was saved. Each exit is checked against
the model, each saved state against the stage's expected nested state,
and each field KVM gives back differently against :data:`REFRESHED`,
which says why KVM changes it. The entry still pending after VMLAUNCH or
VMRESUME (``KVM_STATE_NESTED_RUN_PENDING``) is reached by asking for an
interrupt window: KVM opens it right after emulating the instruction
(``vmx_interrupt_allowed`` answers -EBUSY, which ``vcpu_run`` takes for
yes). One exit is not migrated in the every-exit run: the entry pending
with an expired preemption timer, which KVM loses (a strict xfail shows
it); restore_state's own order, IA32_TSC before the nested state, keeps
an unexpired timer's deadline.
The host tests check the migration helper itself and the structures it
hands the kernel.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import signal
import struct
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

import kvmstate
from kvmstate import uapi
from kvmstate import vmcs12 as v12
from kvmstate.nested import HEADER_SIZE, VMX_MAX_SIZE
from kvmstate.state import VcpuState
from kvmstate.uapi import NestedFlag, VmxHeaderFlag
from kvmstate.vmcs12 import VMCS12_REVISION, VMCS12_SIZE, vmcs12
from kvmstate.vmstate import VmState
from tests.kvm_fixtures import needs_kvm, start_real_mode
from tests.support import migrate, migrate_vmx
from tests.support import vmx_l1 as l1
from tests.support.vmx_l1 import GPA, Action, Phase, Port

NO_ADDRESS = 0xFFFF_FFFF_FFFF_FFFF
ROOT_WITH_VMCS = HEADER_SIZE + VMCS12_SIZE  # 4224: header and vmcs12
WITH_SHADOW = ROOT_WITH_VMCS + VMCS12_SIZE  # 8320: and the shadow vmcs12
M32 = 0xFFFF_FFFF
MSR_IA32_TSC = migrate_vmx.MSR_IA32_TSC
HV_X64_MSR_VP_RUNTIME, HV_X64_MSR_TIME_REF_COUNT = 0x4000_0010, 0x4000_0020

LAYOUT = migrate_vmx.Layout(
    memory=((0, GPA.MEMORY),),
    tss_addr=0x7FFF_D000,  # three pages above guest memory
    split_irqchip_pins=24,  # an in-kernel LAPIC, so that KVM_INTERRUPT is an ExtINT
)

#: Fields a fresh save after a restore gives back differently, and why (6.1's
#: arch/x86/kvm/vmx/nested.c and x86.c).
REFRESHED = {
    f"msrs[{MSR_IA32_TSC:#x}]": "the TSC runs on between the restore and the fresh save",
    f"msrs[{HV_X64_MSR_VP_RUNTIME:#x}]": (
        "Hyper-V's VP runtime is the host task's run time plus an offset a host write sets "
        "(current_task_runtime_100ns): it grows while the vCPU's thread runs"
    ),
    f"msrs[{HV_X64_MSR_TIME_REF_COUNT:#x}]": (
        "Hyper-V's reference counter is the VM's kvmclock (get_time_ref_counter), which the "
        "VM snapshot's KVM_SET_CLOCK restores with the time since the save added: it runs on; "
        "KVM ignores host writes to it, and lists it even without Hyper-V in CPUID"
    ),
    "nested.vmcs12.vmx_preemption_timer_value": (
        "in guest mode with 'save preemption timer value' and no entry pending, "
        "sync_vmcs02_to_vmcs12 stores the time left until the deadline "
        "(vmx_get_preemption_timer_value), which runs on"
    ),
    "nested.vmcs12.guest_linear_address": (
        "read-only VM-exit information: sync_vmcs02_to_vmcs12 copies it from vmcs02 on every "
        "GET in guest mode, and the new vmcs02 has not exited yet"
    ),
}


# --------------------------------------------------------------------------- the model


def rol(value: int, count: int) -> int:
    return (value << count | value >> (32 - count)) & M32


def fold(h: int, value: int) -> int:
    return ((rol(h, 5) ^ value) * l1.MULTIPLIER) & M32


@dataclasses.dataclass(frozen=True)
class L2Result:
    """What L2 must end with: its checksum, the events it saw, the buffer, the shadow fields."""

    checksum: int
    events: tuple[int, ...]
    buffer: bytes
    shadow_l1: int  #: SHADOW_FIELD_L1 as L1 wrote it
    shadow_l2: tuple[int, ...]  #: SHADOW_FIELD_L2 as L2 wrote it, in order


@functools.cache
def l2_model() -> L2Result:
    """L2's run in Python: the script, the constants, and this model's own arithmetic."""
    h, x = l1.CHECKSUM_START, l1.SEED
    buf = [0] * l1.WORDS
    events: list[int] = []
    shadow_l1, shadow_l2 = 0, []

    def vmcall_answer() -> int:
        return rol(h, 11) ^ l1.VMCALL_SALT

    def fold_events() -> None:
        nonlocal h
        h = fold(h, len(events))
        h = fold(h, events[-1])

    for action in l1.SCRIPT:
        for i in range(l1.WORDS):
            x ^= (x << 13) & M32
            x ^= x >> 17
            x ^= (x << 5) & M32
            buf[i] = rol(buf[i], 3) ^ x
            h = fold(h, buf[i])
        if action in (Action.VMCALL, Action.TIMER_ON, Action.TIMER_ZERO, Action.SHADOW_ON):
            if action is Action.SHADOW_ON:
                shadow_l1 = h ^ l1.SHADOW_SALT_L1
            h = fold(h, vmcall_answer())
        elif action is Action.CPUID:
            ecx = h
            for value in (~ecx & M32, rol(ecx, 3), (ecx + l1.CPUID_ECX_ADD) & M32, l1.CPUID_EDX):
                h = fold(h, value)
        elif action is Action.IN_L1:
            # The exit qualification: 4 bytes (3), IN (bit 3), immediate port (bit 6), the port.
            h = fold(h, Port.L1_IO << 16 | 0x40 | 0x8 | 0x3)
        elif action in (Action.NMI, Action.NMI_EVENTS):
            events.append(l1.VECTOR_NMI)
            fold_events()
        elif action is Action.IRQ:
            events.append(l1.VECTOR_EXTERNAL)
            fold_events()
        elif action is Action.INJECT_SOFT:
            h = fold(h, vmcall_answer())
            events.append(l1.VECTOR_SOFT)
            fold_events()
        elif action is Action.SHADOW_RW:
            h = fold(h, shadow_l1)
            shadow_l2.append(h ^ l1.SHADOW_SALT_L2)
            h = fold(h, shadow_l2[-1])
    return L2Result(h, tuple(events), struct.pack(f"<{l1.WORDS}I", *buf), shadow_l1,
                    tuple(shadow_l2))  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Exit:
    """One exit to the test, as the model expects it, and the vCPU's state there."""

    port: int | None  #: None: KVM_EXIT_IRQ_WINDOW_OPEN right after VMLAUNCH/VMRESUME
    value: int | None
    stage: str
    vmxon: bool
    vmcs: int | None  #: the current VMCS (vmcs12_pa), None for none
    guest_mode: bool = False
    run_pending: bool = False
    timer: bool = False  #: L1 has turned the preemption timer on
    shadow: bool = False  #: L1 has turned VMCS shadowing on with a shadow VMCS linked
    inject: str | None = None  #: what the test injects after this exit
    entry_event: int = 0  #: at a pending entry: the VM-entry interruption information
    shadow_write: bool = False  #: L2 has VMWRITten the shadow VMCS since its last exit to L1


_REASONS = {
    l1.EXIT_REASON_NMI: "NMI", l1.EXIT_REASON_EXTERNAL_INTERRUPT: "external interrupt",
    l1.EXIT_REASON_CPUID: "CPUID", l1.EXIT_REASON_VMCALL: "VMCALL", l1.EXIT_REASON_IO: "I/O",
    l1.EXIT_REASON_PREEMPTION_TIMER: "preemption timer",
}  # fmt: skip
_VALID = 1 << 31
_ENTRY_EVENTS = {
    "NMI": _VALID | 2 << 8 | l1.VECTOR_NMI,
    "external interrupt": _VALID | l1.VECTOR_EXTERNAL,
    "INT 0x43": _VALID | 4 << 8 | l1.VECTOR_SOFT,
}


@functools.cache
def model(pending_entries: bool) -> tuple[Exit, ...]:
    """Every exit to the test, in order; with ``pending_entries`` the test asks for an
    interrupt window before each VMLAUNCH/VMRESUME, which KVM opens with the entry pending."""
    result = l2_model()
    out: list[Exit] = []
    now: dict[str, Any] = dict(vmxon=False, vmcs=None, timer=False, shadow=False)

    def add(port: int | None, value: int | None, stage: str, **kw: object) -> None:
        out.append(Exit(port, value, stage, **{**now, **kw}))

    def step(phase: Phase, stage: str) -> None:
        add(Port.STEP, phase, stage)

    def enter(what: str, event: str | None = None) -> None:
        if pending_entries:
            stage = f"{what} pending" + (f", injecting {event}" if event else "")
            add(None, None, stage, guest_mode=True, run_pending=True,
                entry_event=_ENTRY_EVENTS[event] if event else 0)  # fmt: skip

    def l1_handles(reason: int, event: str | None = None, *, turns_on: str = "") -> None:
        step(Phase.L1_EXIT, "L2 exit reached L1")
        add(Port.EXIT_REASON, reason, f"L1 handles exit {reason} ({_REASONS[reason]})")
        if turns_on == "shadow":
            add(Port.STEP, Phase.SHADOW_CURRENT, "shadow VMCS current in L1", vmcs=GPA.SHADOW_VMCS)
        if turns_on:
            now[turns_on] = True
        step(Phase.RESUME, "VMRESUME next" + (f", injecting {event}" if event else ""))
        enter("VMRESUME", event)

    def l2(port: int, value: int, stage: str, inject: str | None = None) -> None:
        add(port, value, stage, guest_mode=True, inject=inject)

    step(Phase.START, "before VMXON")
    now["vmxon"] = True
    step(Phase.VMXON, "VMXON done")
    now["vmcs"] = GPA.VMCS
    step(Phase.CURRENT_VMCS, "VMCS current")
    step(Phase.LAUNCH, "VMCS written, VMLAUNCH next")
    enter("VMLAUNCH")
    for round_, action in enumerate(l1.SCRIPT):
        if action is Action.PROGRESS:
            l2(Port.PROGRESS, round_, "L2 running")
        elif action is Action.SHADOW_RW:
            add(Port.PROGRESS, round_, "L2 running, its VMWRITE only in the shadow vmcs12",
                guest_mode=True, shadow_write=True)  # fmt: skip
        elif action is Action.CPUID:
            l1_handles(l1.EXIT_REASON_CPUID)
        elif action is Action.IN_L1:
            l1_handles(l1.EXIT_REASON_IO)
        elif action in (Action.NMI, Action.NMI_EVENTS):
            how = "KVM_NMI" if action is Action.NMI else "KVM_SET_VCPU_EVENTS"
            l2(Port.NMI if action is Action.NMI else Port.NMI_EVENTS, round_,
               f"L2 asks for an NMI ({how})", inject=how)  # fmt: skip
            l1_handles(l1.EXIT_REASON_NMI, "NMI")
        elif action is Action.IRQ:
            l2(Port.IRQ, round_, "L2 asks for an interrupt (KVM_INTERRUPT)", inject="KVM_INTERRUPT")
            l1_handles(l1.EXIT_REASON_EXTERNAL_INTERRUPT, "external interrupt")
        elif action is Action.INJECT_SOFT:
            l1_handles(l1.EXIT_REASON_VMCALL, "INT 0x43")
        elif action is Action.TIMER_ON:
            l1_handles(l1.EXIT_REASON_VMCALL, turns_on="timer")
        elif action is Action.TIMER_ZERO:
            l1_handles(l1.EXIT_REASON_VMCALL)
            l1_handles(l1.EXIT_REASON_PREEMPTION_TIMER)
        elif action is Action.SHADOW_ON:
            l1_handles(l1.EXIT_REASON_VMCALL, turns_on="shadow")
        else:
            l1_handles(l1.EXIT_REASON_VMCALL)
    l2(Port.RESULT, result.checksum, "L2 reports its checksum")
    step(Phase.L1_EXIT, "L2 exit reached L1")
    add(Port.EXIT_REASON, l1.EXIT_REASON_VMCALL, "L1 handles exit 18 (VMCALL)")
    now["vmcs"] = GPA.SHADOW_VMCS
    add(Port.SHADOW, result.shadow_l1, "L1 read the shadow VMCS back")
    add(Port.SHADOW, result.shadow_l2[-1], "L1 read the shadow VMCS back")
    now.update(vmxon=False, vmcs=None, shadow=False, timer=False)
    step(Phase.VMXOFF, "after VMXOFF")
    step(Phase.DONE, "done")
    return tuple(out)


# --------------------------------------------------------------------------- running it


IMAGE = l1.nested_image()
#: The allowed-1 bits the L1 needs, by capability MSR (SDM vol. 3, appendix A).
NEEDED = {
    l1.MSR_VMX_TRUE_PINBASED: {
        "external-interrupt exiting": v12.PIN_BASED_EXT_INTR_MASK,
        "NMI exiting": v12.PIN_BASED_NMI_EXITING,
        "VMX preemption timer": v12.PIN_BASED_VMX_PREEMPTION_TIMER,
    },
    l1.MSR_VMX_TRUE_PROCBASED: {
        "use I/O bitmaps": v12.CPU_BASED_USE_IO_BITMAPS,
        "activate secondary controls": v12.CPU_BASED_ACTIVATE_SECONDARY_CONTROLS,
    },
    l1.MSR_VMX_PROCBASED2: {"VMCS shadowing": v12.SECONDARY_EXEC_SHADOW_VMCS},
    l1.MSR_VMX_TRUE_EXIT: {
        "acknowledge interrupt on exit": v12.VM_EXIT_ACK_INTR_ON_EXIT,
        "save VMX-preemption timer value": v12.VM_EXIT_SAVE_VMX_PREEMPTION_TIMER,
    },
}
VMX_BASIC_TRUE_CONTROLS = 1 << 55  # IA32_VMX_BASIC: the TRUE_*_CTLS MSRs exist
#: The TSC the L1 starts with, in seconds. Small enough that the preemption timer's time
#: left, counted from a TSC of 0, still fits vmcs12's 32 bits (see TimerLate).
UPTIME_SECONDS = 10


def missing_capabilities(vcpu: kvmstate.Vcpu) -> list[str]:
    """The VMX features the L1 needs that this vCPU's IA32_VMX_* MSRs do not offer."""
    msrs = vcpu.get_msrs([l1.MSR_VMX_BASIC, *NEEDED])
    missing = []
    if not msrs[l1.MSR_VMX_BASIC] & VMX_BASIC_TRUE_CONTROLS:
        missing.append(f"IA32_VMX_BASIC ({l1.MSR_VMX_BASIC:#x}) bit 55 (TRUE controls)")
    for msr, bits in NEEDED.items():
        allowed1 = msrs[msr] >> 32
        missing += [f"{name} (MSR {msr:#x}, bit {bit.bit_length() - 1})"
                    for name, bit in bits.items() if not allowed1 & bit]  # fmt: skip
    return missing


def setup_l1(kvm: kvmstate.Kvm, machine: migrate_vmx.Machine) -> None:
    """The image in memory and the vCPU at L1's entry: 32-bit protected mode, paging on."""
    IMAGE.load(machine.memory[0])
    vcpu = machine.vcpus[0]
    vcpu.set_cpuid2(kvm.get_supported_cpuid())
    missing = missing_capabilities(vcpu)
    if missing:
        pytest.fail("this KVM's nested VMX lacks what the L1 needs: " + "; ".join(missing))
    sregs = vcpu.get_sregs()
    l1.flat_segments(sregs)
    tr = sregs.tr
    tr.selector, tr.base, tr.limit, tr.type, tr.present, tr.s, tr.g = (
        l1.TR_SEL, GPA.TSS, 0x67, 11, 1, 0, 0
    )  # fmt: skip
    sregs.ldt.unusable = 1
    sregs.gdt.base, sregs.gdt.limit = GPA.GDT, l1.GDT_LIMIT
    sregs.idt.base, sregs.idt.limit = GPA.L1_IDT, l1.IDT_LIMIT
    sregs.cr0 = 0x8000_0031  # PG | NE | ET | PE
    sregs.cr3, sregs.cr4, sregs.efer = GPA.PAGE_DIR, 0x10, 0  # CR4.PSE
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rip, regs.rsp, regs.rflags = IMAGE.labels["l1_entry"], GPA.L1_STACK, 2
    vcpu.set_regs(regs)
    # A VM that has run for a while (UPTIME_SECONDS of TSC). A new VM's TSC starts at 0,
    # and KVM 6.1 takes a host write within one second of the TSC it expects for an
    # attempt to synchronize vCPUs (kvm_synchronize_tsc) and keeps its own offset: the
    # TSC of a VM saved within its first second would not come back.
    vcpu.set_msrs({MSR_IA32_TSC: UPTIME_SECONDS * vcpu.get_tsc_khz() * 1000})


class TimerLate(AssertionError):
    """L2's preemption timer is not where the deadline says after a restore."""


class GuestHung(Exception):
    """KVM_RUN did not come back: the guest runs without exiting."""


def _alarm(signum: int, frame: FrameType | None) -> None:
    raise GuestHung


@dataclasses.dataclass
class Record:
    """What one migration saw: the stage, its nested state and what KVM gave back differently."""

    stage: str
    size: int
    flags: str
    vmx_flags: str
    changes: tuple[str, ...]


RUN_SECONDS = 120  # for one KVM_RUN to reach the next exit: far more than the emulator needs


def every_exit(index: int, exit_: Exit) -> bool:
    return True


def no_exit(index: int, exit_: Exit) -> bool:
    return False


class Run:
    """The migration L1 in a VM built from :data:`LAYOUT`, driven exit by exit.

    ``migrate_when(index, exit)`` chooses the exits (of :func:`model`) where
    the VM is migrated.
    """

    def __init__(
        self,
        kvm: kvmstate.Kvm,
        *,
        migrate_when: Callable[[int, Exit], bool] = no_exit,
        pending_entries: bool = False,
        machine: migrate_vmx.Machine | None = None,
    ) -> None:
        self.kvm = kvm
        self.migrate_when = migrate_when
        self.pending_entries = pending_entries
        if machine is None:
            machine = migrate_vmx.Machine(kvm, LAYOUT)
            setup_l1(kvm, machine)
        self.machine = machine  # or one restored mid-run: then run(start=...)
        self.seen: list[tuple[int | None, int | None]] = []
        self.records: list[Record] = []
        self.migrations = 0
        self.migrate = False  # at the exit being handled

    @property
    def vcpu(self) -> kvmstate.Vcpu:
        return self.machine.vcpus[0]

    def close(self) -> None:
        self.machine.close()

    def run(self, until: int | None = None, start: int = 0) -> None:
        """Run to the end (or through exit ``until``), checking each exit against the model;
        ``start``: the first exit to expect (a machine restored after exit ``start - 1``)."""
        for index, want in enumerate(model(self.pending_entries)):
            if until is not None and index > until:
                return
            if index < start:
                continue
            self.migrate = self.migrate_when(index, want)
            got = self.next_exit()
            self.seen.append(got)
            if got != (want.port, want.value):
                raise AssertionError(
                    f"exit {len(self.seen)}: got {_show(got)}, the model expects "
                    f"{_show((want.port, want.value))} ({want.stage}); last exits: "
                    + ", ".join(map(_show, self.seen[-8:]))
                )
            self._checkpoint(want, want.stage)
            if want.inject is not None:
                self._inject(want.inject)
                if want.inject != "KVM_INTERRUPT":  # KVM keeps that one where no GET sees it
                    self._checkpoint(want, f"NMI pending ({want.inject})", nmi_pending=True)
            if self.pending_entries and want.port == Port.STEP and want.value in (
                Phase.LAUNCH, Phase.RESUME
            ):  # fmt: skip
                self.vcpu.kvm_run.request_interrupt_window = 1

    def next_exit(self) -> tuple[int | None, int | None]:
        vcpu = self.vcpu
        previous = signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(RUN_SECONDS)
        try:
            reason = vcpu.run()
        except GuestHung:
            raise AssertionError(
                f"no exit within {RUN_SECONDS} s after " + ", ".join(map(_show, self.seen[-8:]))
            ) from None
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
        run = vcpu.kvm_run
        if reason == uapi.ExitReason.IRQ_WINDOW_OPEN:
            run.request_interrupt_window = 0
            return (None, None)
        if reason != uapi.ExitReason.IO:
            raise AssertionError(f"exit {reason!r} after " + ", ".join(map(_show, self.seen[-8:])))
        port, value = int(run.io.port), int.from_bytes(vcpu.io_data(), "little")
        if port in (Port.FAIL, Port.UNEXPECTED, Port.L2_FAIL):
            detail = [value]
            if (port == Port.FAIL and value & 0x40) or port == Port.UNEXPECTED:
                vcpu.run()  # the error number / the qualification follows
                detail.append(int.from_bytes(vcpu.io_data(), "little"))
            raise AssertionError(
                f"{Port(port).name} {[hex(d) for d in detail]} after "
                + ", ".join(map(_show, self.seen[-8:]))
            )
        return (port, value)

    def _inject(self, how: str) -> None:
        if how == "KVM_NMI":
            self.vcpu.nmi()
        elif how == "KVM_SET_VCPU_EVENTS":
            events = self.vcpu.get_vcpu_events()
            events.nmi.pending = 1
            events.flags = uapi.KVM_VCPUEVENT_VALID_NMI_PENDING  # only nmi.pending is set
            self.vcpu.set_vcpu_events(events)
        else:
            self.vcpu.interrupt(l1.VECTOR_EXTERNAL)

    def _checkpoint(self, want: Exit, stage: str, *, nmi_pending: bool = False) -> None:
        if not self.migrate:
            return
        self.machine, done = migrate_vmx.migrate(self.kvm, self.machine)
        self.migrations += 1
        saved, fresh = done.snapshot.vcpus[0], done.fresh[0]
        where = f"at exit {len(self.seen)} ({stage})"
        check_stage(want, saved, done.snapshot.memory[0], where)
        if nmi_pending:
            assert saved.events is not None and saved.events.nmi.pending == 1, where
        unexplained = [str(c) for c in done.changes if c.path not in REFRESHED]
        assert not unexplained, f"{where}: restored differently: {unexplained}"
        # What REFRESHED says runs on, runs on: never backwards.
        assert saved.msrs is not None and fresh.msrs is not None
        assert fresh.msrs[MSR_IA32_TSC] >= saved.msrs[MSR_IA32_TSC], f"{where}: the TSC went back"
        nested, again = saved.nested, fresh.nested
        assert nested is not None and again is not None
        if nested.vmx.flags and not nested.flags & NestedFlag.RUN_PENDING:
            # Both are the time left to the same deadline, the second read later.
            assert nested.vmcs12 is not None and again.vmcs12 is not None
            left, left_after = (v.vmx_preemption_timer_value for v in (nested.vmcs12, again.vmcs12))
            if left_after > left:
                raise TimerLate(f"{where}: the preemption timer has {left_after} left, not {left}")
        self.records.append(
            Record(stage, nested.size, NestedFlag(nested.flags).name or "0",
                   VmxHeaderFlag(nested.vmx.flags).name or "0",
                   tuple(sorted({c.path for c in done.changes})))
        )  # fmt: skip


def _show(exit_: tuple[int | None, int | None]) -> str:
    port, value = exit_
    if port is None:
        return "IRQ window"
    name = Port(port).name if port in Port._value2member_map_ else hex(port)
    if port == Port.STEP and value is not None and value in Phase._value2member_map_:
        return f"STEP {Phase(value).name}"
    return f"{name} {value:#x}" if value is not None else name


def check_stage(want: Exit, saved: VcpuState, memory: bytes, where: str) -> None:
    """The saved nested state is what the model says L1 has done by now."""
    n = saved.nested
    assert n is not None, f"{where}: no nested state saved"
    vmx = n.vmx
    if not want.vmxon:
        assert (n.size, n.flags, vmx.vmxon_pa, vmx.vmcs12_pa) == (
            HEADER_SIZE, 0, NO_ADDRESS, NO_ADDRESS
        ), f"{where}: {n!r}"  # fmt: skip
        return
    assert vmx.vmxon_pa == GPA.VMXON, where
    assert vmx.vmcs12_pa == (want.vmcs if want.vmcs is not None else NO_ADDRESS), f"{where}: {n!r}"
    # vmx_get_nested_state: the shadow vmcs12 only in guest mode, with shadowing and a link.
    size = WITH_SHADOW if want.guest_mode and want.shadow else ROOT_WITH_VMCS
    assert n.size == (size if want.vmcs is not None else HEADER_SIZE), f"{where}: {n!r}"
    flags = (NestedFlag.GUEST_MODE if want.guest_mode else 0) | (
        NestedFlag.RUN_PENDING if want.run_pending else 0
    )
    assert n.flags == flags, f"{where}: {n!r}"
    # The deadline is only kept in guest mode, once the timer is on.
    deadline = VmxHeaderFlag.PREEMPTION_TIMER_DEADLINE if want.guest_mode and want.timer else 0
    assert vmx.flags == deadline, f"{where}: {n!r}"
    if want.vmcs is None:
        assert n.vmcs12 is None, where
        return
    v = n.vmcs12
    assert v is not None and v.hdr.revision_id == VMCS12_REVISION, where
    assert v.hdr.shadow_vmcs == (want.vmcs == GPA.SHADOW_VMCS), where
    if want.run_pending:
        # The event L1 asked for goes in with the pending entry; an old one has its valid
        # bit cleared (prepare_vmcs12 clears only that bit at the exit after an injection).
        entry = v.vm_entry_intr_info_field
        assert (entry if want.entry_event else entry & _VALID) == want.entry_event, (
            f"{where}: VM-entry interruption information {entry:#x}"
        )
    if n.size == WITH_SHADOW:
        shadow = n.shadow_vmcs12
        assert shadow is not None and shadow.hdr.shadow_vmcs == 1, where
        assert shadow.hdr.revision_id == VMCS12_REVISION, where
        assert shadow.guest_es_base == l2_model().shadow_l1, where
        if want.shadow_write:
            # L2's VMWRITE is in KVM's cached shadow vmcs12, which the nested state carries;
            # guest memory still has the page as it was at the last exit to L1.
            in_memory = vmcs12.from_bytes(memory[GPA.SHADOW_VMCS : GPA.SHADOW_VMCS + VMCS12_SIZE])
            assert shadow.guest_cs_base in l2_model().shadow_l2, where
            assert in_memory.guest_cs_base != shadow.guest_cs_base, where


def finish(run: Run) -> None:
    """What the end of every run must show, migrated or not."""
    result = l2_model()
    memory = run.machine.memory[0]
    count = struct.unpack_from("<I", memory, l1.EVENT_COUNT)[0]
    assert struct.unpack_from(f"<{count}I", memory, l1.EVENT_LOG) == result.events
    assert bytes(memory[GPA.BUFFER : GPA.BUFFER + 4 * l1.WORDS]) == result.buffer


# --------------------------------------------------------------------------- in the guest


@pytest.mark.vmx_guest
def test_never_migrated_run_gives_the_models_checksum(kvm: kvmstate.Kvm) -> None:
    run = Run(kvm)
    try:
        run.run()  # every exit, RESULT's checksum and the shadow fields as the model says
        finish(run)
    finally:
        run.close()


def print_table(run: Run) -> None:
    """The stage table (``pytest -s`` shows it): each stage once, with what KVM refreshed."""
    rows: dict[tuple[str, int, str, str], set[str]] = {}
    for r in run.records:
        rows.setdefault((r.stage, r.size, r.flags, r.vmx_flags), set()).update(r.changes)
    print(f"\nVMX ({run.migrations} migrations)")
    print(f"| stage | nested size | flags | vmx flags | came back different |\n|{' --- |' * 5}")
    for (stage, size, flags, vmx_flags), changes in rows.items():
        print(f"| {stage} | {size} | {flags} | {vmx_flags} | {', '.join(sorted(changes))} |")


def expired_timer(index: int) -> bool:
    """Whether exit ``index`` of ``model(True)`` is the entry pending with a timer of 0."""
    exits = model(True)
    return exits[index].port is None and exits[index + 2].value == l1.EXIT_REASON_PREEMPTION_TIMER


@pytest.mark.vmx_guest
def test_migrated_at_every_exit_gives_the_same_checksum(kvm: kvmstate.Kvm) -> None:
    # All but one: there KVM loses the expired timer (test_an_expired_preemption_timer...).
    run = Run(kvm, migrate_when=lambda i, e: not expired_timer(i), pending_entries=True)
    try:
        run.run()
        finish(run)
    finally:
        run.close()
    print_table(run)
    stages = {r.stage for r in run.records}
    sizes = {r.size for r in run.records}
    assert {HEADER_SIZE, ROOT_WITH_VMCS, VMX_MAX_SIZE} <= sizes
    assert any("RUN_PENDING" in r.flags for r in run.records)
    assert any("PREEMPTION_TIMER_DEADLINE" in r.vmx_flags for r in run.records)
    for stage in ("before VMXON", "VMXON done", "VMCS current", "VMLAUNCH pending",
                  "L2 running", "L1 handles exit 18 (VMCALL)", "NMI pending (KVM_NMI)",
                  "VMRESUME pending, injecting INT 0x43", "shadow VMCS current in L1",
                  "after VMXOFF"):  # fmt: skip
        assert stage in stages, stage
    assert run.migrations == len(run.records) > len(model(True))


@pytest.mark.vmx_guest
def test_restore_state_alone_keeps_the_preemption_timer_deadline(kvm: kvmstate.Kvm) -> None:
    # kvmstate.state.restore writes IA32_TSC before KVM_SET_NESTED_STATE, which starts L2's
    # preemption timer from the deadline and the vCPU's TSC: written after it, the TSC of
    # a new vCPU (about 0) would make the timer late by the whole saved TSC (TimerLate).
    first = next(i for i, e in enumerate(model(False)) if e.guest_mode and e.timer)
    run = Run(kvm, migrate_when=lambda i, e: i == first)
    try:
        run.run(until=first)  # migrated there with the library's own restore order
    finally:
        run.close()


@pytest.mark.vmx_guest
@pytest.mark.xfail(
    strict=True,
    raises=TimerLate,
    reason="KVM (6.1, and 6.12 alike) computes the timer left at KVM_SET_NESTED_STATE as the "
    "deadline minus the TSC, unsigned (vmx_calc_preemption_timer_value): a deadline already "
    "past, as when the timer has expired with the entry pending, wraps to some 88 minutes",
)
def test_an_expired_preemption_timer_survives_a_restore(kvm: kvmstate.Kvm) -> None:
    target = next(i for i in range(len(model(True))) if expired_timer(i))
    run = Run(kvm, migrate_when=lambda i, e: i == target, pending_entries=True)
    try:
        run.run(until=target)
        after = run.next_exit()  # L1 must see the timer exit next
        if after != (Port.STEP, Phase.L1_EXIT):
            raise TimerLate(f"after the restore L2 ran on to {_show(after)}")
    finally:
        run.close()


def file_stage() -> int:
    """The exit where the from-file run is saved: L2 running with the shadow VMCS linked
    (the 8320-byte state) and nothing injected after it (KVM_INTERRUPT would be lost)."""
    return next(
        i
        for i, e in enumerate(model(False))
        if e.guest_mode and e.shadow and e.timer and e.inject is None and e.port is not None
    )


def save_to_file(path: str) -> None:
    """In a first process: run the L1 to :func:`file_stage`, save the VM to ``path``."""
    with kvmstate.Kvm() as kvm:
        run = Run(kvm)
        try:
            run.run(until=file_stage())
            run.machine.vm.save_state(run.machine.vcpus).write(path)
        finally:
            run.close()


def finish_from_file(path: str) -> None:
    """In a second process: restore the VM from ``path`` and run L2 and L1 to the end."""
    with kvmstate.Kvm() as kvm:
        state = VmState.load(path)
        machine = migrate_vmx.Machine(kvm, LAYOUT, kvm.restore_vm(state))
        run = Run(kvm, machine=machine)
        try:
            run.run(start=file_stage() + 1)  # every later exit as the model says
            finish(run)  # the checksum, the event log and L2's buffer
        finally:
            run.close()


@pytest.mark.vmx_guest
def test_a_vm_saved_to_a_file_finishes_in_a_new_process(tmp_path: Path) -> None:
    path = str(tmp_path / "l1.kvmstate")
    # finish_from_file checks the end of the run itself (the checksum, events, buffer).
    saved, _ = migrate.in_two_processes(save_to_file, finish_from_file, path, timeout=1800)
    nested = saved.vcpus[0].nested
    assert nested is not None and nested.size == VMX_MAX_SIZE  # the shadow VMCS
    assert nested.flags & NestedFlag.GUEST_MODE
    assert nested.vmx.flags & VmxHeaderFlag.PREEMPTION_TIMER_DEADLINE


# --------------------------------------------------------------------------- on the host


def test_model_exits_follow_the_script() -> None:
    plain, pending = model(False), model(True)
    progress = [r for r, a in enumerate(l1.SCRIPT) if a in (Action.PROGRESS, Action.SHADOW_RW)]
    assert [e.value for e in plain if e.port == Port.PROGRESS] == progress
    assert [e.value for e in plain if e.port == Port.RESULT] == [l2_model().checksum]
    # The pending run is the plain one with a window right after each VMLAUNCH/VMRESUME step.
    entries = [(Port.STEP, Phase.LAUNCH), (Port.STEP, Phase.RESUME)]
    windows = [i for i, e in enumerate(pending) if e.port is None]
    assert all((pending[i - 1].port, pending[i - 1].value) in entries for i in windows)
    assert len(windows) == sum((e.port, e.value) in entries for e in plain)
    assert [(e.port, e.value) for e in pending if e.port is not None] == [
        (e.port, e.value) for e in plain
    ]
    # L1 handles one exit per other action (VMCALL, CPUID, IN, the event asked for), one
    # more for the timer at zero and one for the final VMCALL.
    reasons = [e.value for e in plain if e.port == Port.EXIT_REASON]
    assert len(reasons) == len(l1.SCRIPT) - len(progress) + 2
    assert reasons.count(l1.EXIT_REASON_PREEMPTION_TIMER) == 1
    assert {e.stage for e in plain if e.shadow_write} == {
        "L2 running, its VMWRITE only in the shadow vmcs12"
    }


@needs_kvm
def test_migrate_a_running_vm_on_this_host(kvm: kvmstate.Kvm) -> None:
    layout = migrate_vmx.Layout(memory=((0, 0x10000),))
    machine = migrate_vmx.Machine(kvm, layout)
    # Real mode at 0x1000: inc al; out 0x10, al; cmp al, 5; jne back; hlt.
    code = bytes([0xFE, 0xC0, 0xE6, 0x10, 0x3C, 0x05, 0x75, 0xF8, 0xF4])
    machine.memory[0][0x1000 : 0x1000 + len(code)] = code
    start_real_mode(machine.vcpus[0])  # AL counts from 0, as KVM resets RAX
    seen = []
    try:
        while (reason := machine.vcpus[0].run()) == uapi.ExitReason.IO:
            seen.append(machine.vcpus[0].io_data()[0])
            machine, done = migrate_vmx.migrate(kvm, machine)
            assert done.snapshot.vcpus[0].regs is not None
            assert not [c for c in done.changes if c.path.startswith(("regs", "sregs"))]
        assert reason == uapi.ExitReason.HLT
    finally:
        machine.close()
    assert seen == [1, 2, 3, 4, 5]


@needs_kvm
def test_machine_repeats_the_layout_and_carries_events(kvm: kvmstate.Kvm) -> None:
    layout = migrate_vmx.Layout(
        memory=((0, 0x10000), (0x100000, 0x4000)),
        tss_addr=0x7FFF_D000,
        identity_map_addr=0x7FFF_C000,
        split_irqchip_pins=24,
    )
    machine = migrate_vmx.Machine(kvm, layout)
    try:
        for slot, mem in enumerate(machine.memory):
            mem[:4] = bytes([slot + 1] * 4)
        machine.vcpus[0].nmi()
        machine, done = migrate_vmx.migrate(kvm, machine)
        assert [bytes(m[:4]) for m in machine.memory] == [b"\x01" * 4, b"\x02" * 4]
        assert [len(m) for m in machine.memory] == [0x10000, 0x4000]
        saved, fresh = done.snapshot.vcpus[0], done.fresh[0]
        assert saved.lapic is not None and fresh.lapic is not None  # the split irqchip's LAPIC
        assert saved.events is not None and saved.events.nmi.pending == 1
        assert fresh.events is not None and fresh.events.nmi.pending == 1
        assert {c.path for c in done.changes} <= {f"msrs[{MSR_IA32_TSC:#x}]"}
    finally:
        machine.close()


@needs_kvm
def test_an_interrupt_from_kvm_interrupt_is_held_where_no_get_sees_it(kvm: kvmstate.Kvm) -> None:
    layout = migrate_vmx.Layout(memory=((0, 0x10000),), split_irqchip_pins=24)
    with migrate_vmx.Machine(kvm, layout) as machine:
        vcpu = machine.vcpus[0]
        vcpu.interrupt(0x41)
        with pytest.raises(OSError) as info:  # one ExtINT at a time: it is pending
            vcpu.interrupt(0x42)
        assert info.value.errno == errno.EEXIST
        events = vcpu.get_vcpu_events()
        assert (events.interrupt.injected, events.interrupt.nr) == (0, 0)


@needs_kvm
def test_compare_names_each_field(kvm: kvmstate.Kvm) -> None:
    with migrate_vmx.Machine(kvm, migrate_vmx.Layout(memory=((0, 0x10000),))) as machine:
        saved = machine.vcpus[0].save_state()
    other = VcpuState.from_bytes(saved.to_bytes())
    assert migrate_vmx.compare(saved, other) == []
    assert other.regs is not None and other.msrs is not None
    other.regs.rip += 1
    index = next(iter(other.msrs))
    other.msrs[index] ^= 1
    del other.msrs[next(i for i in other.msrs if i != index)]
    other.debugregs = None
    paths = [c.path for c in migrate_vmx.compare(saved, other, vcpu=3)]
    assert paths[0] == "regs.rip" and f"msrs[{index:#x}]" in paths and "debugregs" in paths
    assert len(paths) == 4
    assert all(c.vcpu == 3 for c in migrate_vmx.compare(saved, other, vcpu=3))
    assert "absent" in str(migrate_vmx.compare(saved, other)[-1])
