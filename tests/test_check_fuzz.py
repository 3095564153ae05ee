"""A differential fuzzer for kvmstate.check: the kernel's verdict against check()'s.

Each guest test takes a real nested state, made by a real L1 inside the emulated
guest (tests/guest/run): on AMD the vmcb12 that VMRUN left while L2 runs
(tests/support/svm_l1.py), on Intel the vmcs12 of an L2 that runs
(tests/support/vmx_l1.py, through tests/test_vmx_migration.py's Run). It then
makes seeded random mutations of it, one to four fields each, and for every
mutation asks the kernel (a raw KVM_SET_NESTED_STATE on the vCPU that ran L1,
set back to the real state after each try) and :func:`kvmstate.check.check`
with the facts :meth:`Facts.from_vcpu` reads there, the running kernel's
version included.

A verdict of check() that is certain and differs from the kernel's is a failure
naming the seed, the fields and their values (rerun one with :func:`mutate`).
An undecided verdict is not compared, but it must name the fact that decides
it, and the undecided share counts against the agreement, which must be at
least :data:`TARGET`. Each test prints its numbers (``-s`` shows them).

The mutation engine itself (:func:`fields`, :func:`mutate`) is tested on the
host, where no nesting is needed.
"""

from __future__ import annotations

import ctypes
import dataclasses
import fcntl
import os
import random
import re
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

import kvmstate
from kvmstate import ioctls
from kvmstate import vmcb as svm
from kvmstate import vmcs12 as v12
from kvmstate.check import Facts, Problem, Regions, check
from kvmstate.nested import HEADER_SIZE, NestedState
from kvmstate.uapi import NestedFlag, kvm_nested_state_header
from tests.support.states import svm_guest

#: The least share of mutations where check() and the kernel must agree (undecided ones
#: count as not agreeing); no certain verdict may be wrong whatever the share.
TARGET = 0.99
#: Mutations per guest session; Python under TCG (AMD) is some 5 times faster than under
#: Bochs (Intel). Sized so that each session's added time stays under a minute.
COUNTS = {"svm": 1200, "vmx": 400}
SEED = 20261202


# --- the mutation engine ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Field:
    """One integer field of a nested state: its dotted name, byte offset and width."""

    name: str
    offset: int
    size: int


def _walk(struct: type[ctypes.Structure | ctypes.Union], base: int, prefix: str) -> Iterator[Field]:
    for entry in struct._fields_:
        name, kind = entry[0], entry[1]
        if len(entry) > 2 or name.startswith(("reserved", "pad", "padding")):
            continue  # bit fields and padding: no rule reads them
        offset = base + getattr(struct, name).offset
        if isinstance(kind, type) and issubclass(kind, (ctypes.Structure, ctypes.Union)):
            if all(len(sub) > 2 for sub in kind._fields_):  # bit fields: the word they fill
                yield Field(prefix + name, offset, ctypes.sizeof(kind))
            else:
                yield from _walk(kind, offset, f"{prefix}{name}.")
        elif isinstance(kind, type) and issubclass(kind, ctypes.Array):
            item = kind._type_
            if not issubclass(item, ctypes._SimpleCData) or ctypes.sizeof(item) > 8:
                continue
            step = ctypes.sizeof(item)
            if kind._length_ * step > 64:
                continue  # large arrays: byte-level data, not fields
            for i in range(kind._length_):
                yield Field(f"{prefix}{name}[{i}]", offset + i * step, step)
        elif ctypes.sizeof(kind) in (1, 2, 4, 8):
            yield Field(prefix + name, offset, ctypes.sizeof(kind))


def fields(vendor: str) -> tuple[Field, ...]:
    """The fields a mutation may change, by vendor: the header's, then vmcb12's or vmcs12's.

    ``format`` and ``size`` stay out (other tests cover them; a wrong size only
    moves where the kernel reads). The vmcs12 revision and shadow bit
    (``vmcs12.hdr``) are in: SET checks them.
    """
    header = [f for f in _walk(kvm_nested_state_header, 0, "") if f.name == "flags"]
    if vendor == "svm":
        hdr = [f for f in _walk(kvm_nested_state_header, 0, "") if f.name.startswith("hdr.svm.")]
        body = list(_walk(svm.vmcb, HEADER_SIZE, "vmcb12."))
    else:
        hdr = [f for f in _walk(kvm_nested_state_header, 0, "") if f.name.startswith("hdr.vmx.")]
        body = list(_walk(v12.vmcs12, HEADER_SIZE, "vmcs12."))
    return tuple(header + hdr + body)


# The fields the kernel's SET path reads (from the sources, not from check()): a mutation
# picks one of them half the time, any field the other half.
_FOCUS = {
    "svm": re.compile(
        r"^(flags|hdr\.svm\.vmcb_pa|vmcb12\.control\.(intercepts\[\d\]|asid|nested_ctl|"
        r"nested_cr3|msrpm_base_pa|iopm_base_pa|int_ctl|tlb_ctl|virt_ext)|"
        r"vmcb12\.save\.(efer|cr0|cr3|cr4|dr6|dr7|rflags|cs\.attrib|g_pat|dbgctl))$"
    ),
    "vmx": re.compile(
        r"^(flags|hdr\.vmx\..*|vmcs12\.(hdr|.*_control.*|host_.*|guest_cr[034]|"
        r"guest_ia32_.*|guest_dr7|guest_rflags|guest_activity_state|"
        r"guest_interruptibility_info|vmcs_link_pointer|io_bitmap_[ab]|msr_bitmap|"
        r"ept_pointer|vm_(entry|exit)_.*|virtual_apic_page_addr|apic_access_addr|"
        r"posted_intr_.*|cr3_target_count|tpr_threshold|virtual_processor_id|"
        r"eoi_exit_bitmap\d|pml_address|vmread_bitmap|vmwrite_bitmap|guest_pml_index))$"
    ),
}
# Values that sit on the rules' edges: canonical boundaries at 48 and 57 bits, the top of a
# 36-, 39-, 40-, 46- and 52-bit physical space, the all-ones "no address".
_EDGES = (
    0, 1, 0x1000, 0x0000_7FFF_FFFF_F000, 0x0000_8000_0000_0000, 0xFFFF_8000_0000_0000,
    0x00FF_FFFF_FFFF_F000, 0x0100_0000_0000_0000, 0xFF00_0000_0000_0000, 1 << 36, 1 << 39,
    1 << 40, 1 << 46, 1 << 52, (1 << 64) - 1, (1 << 63),
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Change:
    field: str
    old: int
    new: int

    def __str__(self) -> str:
        return f"{self.field}: {self.old:#x} -> {self.new:#x}"


def _new_value(rng: random.Random, old: int, bits: int) -> int:
    mask = (1 << bits) - 1
    roll = rng.random()
    if roll < 0.45:
        return old ^ (1 << rng.randrange(bits))
    if roll < 0.55:
        return 0
    if roll < 0.60:
        return mask
    if roll < 0.75:
        return rng.getrandbits(bits)
    if roll < 0.90:
        return rng.choice(_EDGES) & mask
    return (old + rng.choice((1, -1, 0x10, 0x1000, -0x1000))) & mask  # near the real value


def mutate(base: bytes, vendor: str, seed: int) -> tuple[bytes, list[Change]]:
    """``base`` with one to four fields changed, the same for the same ``seed``.

    >>> data, changes = mutate(state.to_bytes(), "svm", 7)
    >>> print(*changes)  # e.g. vmcb12.control.asid: 0x1 -> 0x0
    """
    rng = random.Random(seed)
    table = fields(vendor)
    focus = [f for f in table if _FOCUS[vendor].match(f.name)]
    count = 1 if rng.random() < 0.6 else rng.randint(2, 4)
    data = bytearray(base)
    changes: list[Change] = []
    for _ in range(count):
        field = rng.choice(focus if rng.random() < 0.5 else table)
        if field.offset + field.size > len(data):
            continue
        old = int.from_bytes(data[field.offset : field.offset + field.size], "little")
        new = _new_value(rng, old, 8 * field.size)
        if new == old:
            continue
        data[field.offset : field.offset + field.size] = new.to_bytes(field.size, "little")
        changes.append(Change(field.name, old, new))
    return bytes(data), changes


# --- comparing verdicts ---------------------------------------------------------------------


def kernel_set(vcpu: kvmstate.Vcpu, data: bytes) -> int:
    """The kernel's answer to SET with ``data``, no library check in between: 0, an errno,
    or the positive value vmx_set_nested_state passes up when L2 cannot be entered."""
    # A buffer of the state's own length, which ``size`` (kept from the real state) equals.
    buffer = ctypes.create_string_buffer(data, len(data))
    try:
        return int(fcntl.ioctl(vcpu.fileno(), ioctls.KVM_SET_NESTED_STATE, buffer))
    except OSError as exc:
        return exc.errno or -1


@dataclasses.dataclass
class Tally:
    """The outcome of a fuzzing run."""

    vendor: str
    kernel: str
    total: int = 0
    agree: int = 0
    refused: int = 0  #: by the kernel
    undecided: dict[str, int] = dataclasses.field(default_factory=dict)  #: by deciding fact
    wrong: list[str] = dataclasses.field(default_factory=list)
    unnamed: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    @property
    def share(self) -> float:
        return self.agree / self.total if self.total else 0.0

    def summary(self) -> str:
        undecided = sum(self.undecided.values())
        return (
            f"check fuzz {self.vendor} on {self.kernel}: {self.total} mutations in "
            f"{self.seconds:.1f} s, kernel refused {self.refused}; agree {self.agree} "
            f"({100 * self.share:.2f}%), undecided {undecided} {dict(self.undecided)}, "
            f"wrong {len(self.wrong)}"
        )


def judge(tally: Tally, seed: int, changes: Sequence[Change], answer: int,
          problems: Sequence[Problem]) -> None:  # fmt: skip
    """Count one mutation: agreement, a wrong certain verdict, or an undecided one."""
    tally.total += 1
    refused = answer != 0
    tally.refused += refused
    where = f"seed {seed} [{'; '.join(map(str, changes)) or 'no change'}]"
    sure = [p for p in problems if p.certain]
    unsure = [p for p in problems if not p.certain]
    for p in unsure:
        if not p.needs or p.needs in ("an unnamed fact", "a fix in kvmstate"):
            tally.unnamed.append(f"{where}: {p}")
    if sure:
        if refused:
            tally.agree += 1
        else:
            tally.wrong.append(f"{where}: the kernel accepts, check says {sure[0]}")
    elif unsure:
        needs = sorted({p.needs or "?" for p in unsure})
        key = ", ".join(needs)
        tally.undecided[key] = tally.undecided.get(key, 0) + 1
    elif refused:
        tally.wrong.append(f"{where}: the kernel refuses ({answer}), check finds nothing")
    else:
        tally.agree += 1


def fuzz(vcpu: kvmstate.Vcpu, base: NestedState, vendor: str, count: int, seed: int,
         facts: Facts, restore: Callable[[], None],
         memory: Regions | None = None) -> Tally:  # fmt: skip
    """``count`` mutations of ``base``, each judged (check() gets ``memory``), ``restore``
    run after each."""
    kernel = os.uname().release
    tally = Tally(vendor, kernel)
    data = base.to_bytes()[: int(base.size)]
    start = time.monotonic()
    for i in range(count):
        case_seed = seed * 1_000_003 + i
        mutated, changes = mutate(data, vendor, case_seed)
        answer = kernel_set(vcpu, mutated)
        # check() after the kernel, on the memory the kernel read: a SET on a vCPU in guest
        # mode first writes KVM's cached shadow vmcs12 back to guest memory.
        problems = check(mutated, facts, memory=memory)
        judge(tally, case_seed, changes, answer, problems)
        restore()
    tally.seconds = time.monotonic() - start
    return tally


def assert_good(tally: Tally, capsys: pytest.CaptureFixture[str]) -> None:
    """Print the numbers (uncaptured: the guest's log keeps them), then judge them."""
    with capsys.disabled():
        print("\n" + tally.summary())
        for line in tally.wrong[:20]:
            print("  wrong:", line)
    assert not tally.unnamed, "undecided without the deciding fact:\n" + "\n".join(
        tally.unnamed[:10]
    )
    assert not tally.wrong, f"{tally.summary()}\n" + "\n".join(tally.wrong[:30])
    assert tally.share >= TARGET, tally.summary()


# --- the engine, on the host ------------------------------------------------------------------


def test_fields_cover_the_headers_and_the_vmcb_and_vmcs12() -> None:
    names = {f.name for f in fields("svm")}
    assert {"flags", "hdr.svm.vmcb_pa", "vmcb12.control.asid", "vmcb12.save.efer",
            "vmcb12.control.intercepts[4]", "vmcb12.save.cs.attrib"} <= names  # fmt: skip
    assert "size" not in names and "format" not in names
    by_name = {f.name: f for f in fields("svm")}
    # Offsets from the AMD APM's VMCB layout: control area at 0, save area at 0x400.
    assert by_name["vmcb12.control.asid"].offset == HEADER_SIZE + 0x58
    assert by_name["vmcb12.save.efer"].offset == HEADER_SIZE + 0x400 + 0xD0
    vmx = {f.name: f for f in fields("vmx")}
    assert {"hdr.vmx.vmxon_pa", "vmcs12.vmcs_link_pointer", "vmcs12.host_cr0"} <= vmx.keys()
    assert vmx["vmcs12.hdr"].offset == HEADER_SIZE


def test_mutations_are_seeded_and_named() -> None:
    base = svm_guest().to_bytes()
    first = [mutate(base, "svm", seed) for seed in range(200)]
    assert first == [mutate(base, "svm", seed) for seed in range(200)]
    sizes = {len(changes) for _, changes in first}
    assert 1 in sizes and max(sizes) >= 3
    by_name = {f.name: f for f in fields("svm")}
    for data, changes in first:
        assert len(data) == len(base)
        for change in changes:
            f = by_name[change.field]
            # The last change of a field wins; earlier ones to the same field are overwritten.
            if change is [c for c in changes if c.field == change.field][-1]:
                assert int.from_bytes(data[f.offset : f.offset + f.size], "little") == change.new
        untouched = set(range(len(base))) - {
            i for c in changes for i in range(by_name[c.field].offset,
                                               by_name[c.field].offset + by_name[c.field].size)
        }  # fmt: skip
        assert all(data[i] == base[i] for i in untouched)


def test_judge_counts_each_kind() -> None:
    tally = Tally("svm", "test")
    sure = Problem("vmcb12.control.asid", 0, "r", "arch/x86/kvm/svm/nested.c")
    unsure = Problem("vcpu.cr3", None, "r", "s", certain=False, needs="cr3")
    judge(tally, 1, [], 22, [sure])  # both refuse
    judge(tally, 2, [], 0, [])  # both accept
    judge(tally, 3, [], 0, [sure])  # check wrong
    judge(tally, 4, [Change("x", 1, 2)], 22, [])  # check misses it
    judge(tally, 5, [], 22, [unsure])
    assert (tally.total, tally.agree, tally.refused) == (5, 2, 3)
    assert tally.undecided == {"cr3": 1}
    assert len(tally.wrong) == 2 and "seed 4 [x: 0x1 -> 0x2]" in tally.wrong[1]


# --- in the guests ----------------------------------------------------------------------------


@pytest.mark.svm_guest
def test_svm_fuzz_against_kvm_amd(capsys: pytest.CaptureFixture[str]) -> None:
    from tests.support import migrate, svm_l1
    from tests.test_svm_migration import L2_TO_USERSPACE, boot, next_stop

    with kvmstate.Kvm() as kvm:
        if not kvm.nested_state_size:
            pytest.skip("this KVM has no nested state (KVM_CAP_NESTED_STATE is 0)")
        machine: migrate.Machine = boot(kvm, npt=True)
        try:
            vcpu = machine.vcpus[0]
            for _ in range(60):
                if next_stop(vcpu).label == L2_TO_USERSPACE:
                    break
            else:
                raise AssertionError("L2 never exited to userspace")
            vcpu.complete_io()
            base = vcpu.get_nested_state()
            assert base.flags & NestedFlag.GUEST_MODE and base.vmcb12 is not None
            assert int(base.svm.vmcb_pa) == svm_l1.VMCB  # made by L1's VMRUN
            sregs = vcpu.get_sregs()
            facts = Facts.from_vcpu(vcpu)
            tally = fuzz(vcpu, base, "svm", COUNTS["svm"], SEED, facts,
                         _restorer(vcpu, base, sregs))  # fmt: skip
        finally:
            machine.close()
    assert_good(tally, capsys)


def _restorer(vcpu: kvmstate.Vcpu, base: NestedState, sregs: object) -> Callable[[], None]:
    """Put the real state back: the nested state, and the vCPU's registers where a mutated
    SET left guest mode (which loads L1's registers into the vCPU)."""
    data = base.to_bytes()[: int(base.size)]
    wanted = tuple(getattr(sregs, r) for r in ("efer", "cr0", "cr3", "cr4"))

    def restore() -> None:
        answer = kernel_set(vcpu, data)
        assert answer == 0, f"the real state was refused ({answer}) after a mutation"
        now = vcpu.get_sregs()
        if tuple(getattr(now, r) for r in ("efer", "cr0", "cr3", "cr4")) != wanted:
            vcpu.set_sregs(sregs)  # type: ignore[arg-type]
            assert kernel_set(vcpu, data) == 0

    return restore


@dataclasses.dataclass
class InL2:
    """A vCPU stopped in a running L2, with its real nested state and guest memory."""

    vcpu: kvmstate.Vcpu
    base: NestedState
    restore: Callable[[], None]
    memory: Regions
    facts: Facts
    ram: list[tuple[int, Any]]  #: (guest-physical address, the mmap behind it)


@pytest.fixture(scope="module")
def vmx_in_l2() -> Iterator[InL2]:
    """The L1 of tests/support/vmx_l1.py run to its first exit from an L2 with VMCS shadowing
    on: the vmcs12 has SHADOW_VMCS and a link pointer to the shadow VMCS L1 wrote."""
    from tests import test_vmx_migration as mig
    from tests.support import vmx_l1

    with kvmstate.Kvm() as kvm:
        if not kvm.nested_state_size:
            pytest.skip("this KVM has no nested state (KVM_CAP_NESTED_STATE is 0)")
        exits = mig.model(False)
        stage = next(i for i, e in enumerate(exits) if e.guest_mode and e.shadow)
        run = mig.Run(kvm)
        try:
            run.run(until=stage)
            vcpu = run.vcpu
            vcpu.complete_io()
            base = vcpu.get_nested_state()
            assert base.flags & NestedFlag.GUEST_MODE and base.vmcs12 is not None
            assert base.vmcs12.vmcs_link_pointer == vmx_l1.GPA.SHADOW_VMCS
            memory = Regions.from_vm(run.machine.vm, dict(enumerate(run.machine.memory)))
            layout = run.machine.layout.memory
            ram = [(gpa, mem) for (gpa, _), mem in zip(layout, run.machine.memory, strict=True)]
            sregs = vcpu.get_sregs()
            restore = _restorer(vcpu, base, sregs)
            yield InL2(vcpu, base, restore, memory, Facts.from_vcpu(vcpu), ram)
        finally:
            run.close()


@pytest.mark.vmx_guest
def test_vmx_fuzz_against_kvm_intel(vmx_in_l2: InL2, capsys: pytest.CaptureFixture[str]) -> None:
    r = vmx_in_l2
    tally = fuzz(r.vcpu, r.base, "vmx", COUNTS["vmx"], SEED, r.facts, r.restore, r.memory)
    assert_good(tally, capsys)


@pytest.mark.vmx_guest
def test_vmx_link_pointer_page_agrees_with_guest_memory(vmx_in_l2: InL2) -> None:
    """nested_vmx_check_vmcs_link_ptr reads the page at the link pointer: the real shadow
    VMCS passes; L1's code page (no VMCS header), a page outside guest memory and the
    shadow VMCS with its shadow bit cleared in memory are refused; check() with the VM's
    memory says the same each time, and without memory says it cannot know."""
    from tests.support.vmx_l1 import GPA

    r = vmx_in_l2
    shadow_page = GPA.SHADOW_VMCS
    outside = 1 << 32  # below any MAXPHYADDR, above the VM's memory
    failures = []
    for name, link, clear_bit, refused in (
        ("the shadow VMCS", shadow_page, False, False),
        ("L1's page directory", GPA.PAGE_DIR, False, True),
        ("no memory slot", outside, False, True),
        ("shadow bit cleared in memory", shadow_page, True, True),
    ):
        state = r.base.copy()
        assert state.vmcs12 is not None
        state.vmcs12.vmcs_link_pointer = link
        data = state.to_bytes()[: int(state.size)]
        page = r.memory.read_physical(shadow_page, 4)
        assert page is not None
        saved_header = int.from_bytes(page, "little")
        if clear_bit:
            # Leave guest mode first: a SET on a vCPU in guest mode writes the shadow vmcs12
            # KVM caches back to the link pointer's page (vmx_leave_nested ->
            # nested_flush_cached_shadow_vmcs12), which would undo the change below. A
            # migration target is a fresh vCPU, which has nothing to write back.
            root = r.base.copy()
            root.flags = NestedFlag(0)
            assert kernel_set(r.vcpu, root.to_bytes()[: int(root.size)]) == 0
            _write_u32(r.ram, shadow_page, saved_header & 0x7FFF_FFFF)
        try:
            answer = kernel_set(r.vcpu, data)
            problems = check(data, r.facts, memory=r.memory)
            blind = check(data, r.facts)
        finally:
            _write_u32(r.ram, shadow_page, saved_header)
            r.restore()
        found = [p for p in problems if p.field == "vmcs12.vmcs_link_pointer"]
        if (
            (answer != 0) != refused
            or bool(found) != refused
            or not all(p.certain for p in problems)
        ):
            failures.append(f"{name}: kernel {answer}, check {[str(p) for p in problems]}")
        if link != outside and not any(
            not p.certain and "memory" in (p.needs or "") for p in blind
        ):
            failures.append(f"{name}: without memory: {[str(p) for p in blind]}")
    assert not failures, "\n".join(failures)


def _write_u32(ram: list[tuple[int, Any]], gpa: int, value: int) -> None:
    """Write guest memory through the VM's own mmap (which Regions reads)."""
    for base, mem in ram:
        if base <= gpa < base + len(mem):
            mem[gpa - base : gpa - base + 4] = value.to_bytes(4, "little")
            return
    raise AssertionError(f"{gpa:#x} is not in guest memory")
