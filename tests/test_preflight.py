"""The restore pre-flight (kvmstate.preflight) and its MSR policy, against the real /dev/kvm.

A state saved here is restored into a fresh vCPU here: the target is this
kernel, its facts read with ``Target.from_vcpu``. Another kernel's facts are
this kernel's with one difference made on purpose (an MSR it does not list,
no nested state), which is what a target file of that kernel would say.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest

import kvmstate
from kvmstate import snapshot
from kvmstate.nested import SVM_MAX_SIZE, NestedState
from kvmstate.preflight import (
    REQUIRED_MSRS,
    DroppedMsrWarning,
    PreflightError,
    Target,
    msr_policy,
    preflight,
)
from kvmstate.state import MSR_IA32_FEATURE_CONTROL, StateError, VcpuState
from kvmstate.uapi import NestedFlag, NestedFormat

_BESIDE = Path(sys.executable).with_name("kvmstate")
KVMSTATE = str(_BESIDE) if _BESIDE.is_file() else shutil.which("kvmstate")

MSR_IA32_TSC, MSR_LSTAR, MSR_SYSENTER_EIP, MSR_PAT = 0x10, 0xC0000082, 0x176, 0x277
# IA32_FIXED_CTR0 (a PMU counter) and HV_X64_MSR_TSC_INVARIANT_CONTROL (Hyper-V): the two
# MSRs the 2026-12-01 cross-version restores stopped at; neither is an architectural must.
FIXED_CTR0, HV_TSC_INVARIANT = 0x309, 0x40000118


def unlisted(target: Target, *indices: int) -> Target:
    """``target`` as a kernel that does not list ``indices``."""
    assert target.msrs is not None
    return dataclasses.replace(target, msrs=target.msrs - set(indices))


def moved_rip(vcpu: kvmstate.Vcpu) -> VcpuState:
    """A saved state whose RIP differs from a fresh vCPU's, to see whether it was written."""
    state = vcpu.save_state()
    assert state.regs is not None
    state.regs.rip = 0x1234
    return state


def with_fixed_ctr0(
    machine: Callable[[], kvmstate.Vcpu], value: int
) -> tuple[kvmstate.Vcpu, Target, VcpuState]:
    """A fresh vCPU, its target, and another vCPU's moved-RIP state that saved ``value`` in
    IA32_FIXED_CTR0, an MSR this kernel does not list (skipped where it does)."""
    source, dest = machine(), machine()
    target = Target.from_vcpu(dest)
    assert target.msrs is not None
    if FIXED_CTR0 in target.msrs:
        pytest.skip("this kernel lists IA32_FIXED_CTR0 (its PMU has fixed counters)")
    state = moved_rip(source)
    assert state.msrs is not None
    state.msrs[FIXED_CTR0] = value
    return dest, target, state


# --- the policy -------------------------------------------------------------------------------


def test_architectural_msrs_are_never_dropped() -> None:
    # Each of these is state the guest set once and relies on (SDM vol. 3 / APM vol. 2).
    for index in (MSR_IA32_TSC, MSR_LSTAR, MSR_SYSENTER_EIP, MSR_PAT, 0xC0000080, 0xC0010117):
        assert msr_policy(index) == "required", hex(index)
    assert msr_policy(MSR_IA32_FEATURE_CONTROL) == "required"
    for index in range(0x480, 0x492):  # every VMX capability MSR
        assert msr_policy(index) == "required", hex(index)
    assert REQUIRED_MSRS[MSR_LSTAR] == "LSTAR"


def test_pmu_paravirtual_and_record_msrs_may_go() -> None:
    assert msr_policy(FIXED_CTR0) == "if-zero"
    assert msr_policy(HV_TSC_INVARIANT) == "if-zero"
    assert msr_policy(0x4B564D01) == "if-zero"  # MSR_KVM_SYSTEM_TIME_NEW
    assert msr_policy(0x1D9) == "if-zero"  # DEBUGCTL: only zero means "no LBR, no BTF"
    assert msr_policy(0x1DB) == "record"  # LASTBRANCHFROMIP: what the CPU recorded


# --- against this kernel ------------------------------------------------------------------------


def test_same_kernel_takes_everything(machine: Callable[[], kvmstate.Vcpu]) -> None:
    source, dest = machine(), machine()
    state = source.save_state()
    target = Target.from_vcpu(dest)
    report = preflight(state, target)
    assert report.ok and not report.dropped, report.lines()
    assert report.msrs == state.msrs
    assert target.msrs is not None and set(state.msrs or {}) <= target.msrs
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to drop, nothing to warn about
        dest.restore_state(state)
    assert dest.save_state().regs.rip == state.regs.rip  # type: ignore[union-attr]


def test_unknown_zero_msr_is_dropped_with_a_warning(
    machine: Callable[[], kvmstate.Vcpu],
) -> None:
    dest, target, state = with_fixed_ctr0(machine, 0)  # the 6.1 AMD guest's: the counter unused
    assert preflight(state, target).dropped == {FIXED_CTR0: 0}
    with pytest.warns(DroppedMsrWarning, match="0x309=0x0") as seen:
        dest.restore_state(state)
    (warning,) = [w.message for w in seen if isinstance(w.message, DroppedMsrWarning)]
    assert warning.dropped == {FIXED_CTR0: 0}
    assert dest.get_regs().rip == 0x1234  # and the rest was restored


def test_unknown_nonzero_msr_is_refused_before_anything_is_written(
    machine: Callable[[], kvmstate.Vcpu],
) -> None:
    dest, _, state = with_fixed_ctr0(machine, 0x1000)  # a counter that counted
    rip, cpuid = dest.get_regs().rip, bytes(dest.get_cpuid2().to_bytes())
    with pytest.raises(PreflightError, match=r"MSR 0x309 = 0x1000.*msr-unknown-nonzero") as info:
        dest.restore_state(state)
    assert info.value.errno == 22 and [f.rule for f in info.value.findings] == [
        "msr-unknown-nonzero"
    ]
    assert isinstance(info.value, StateError) and info.value.part == "msrs"
    assert dest.get_regs().rip == rip != 0x1234  # nothing was written
    assert bytes(dest.get_cpuid2().to_bytes()) == cpuid
    with pytest.raises(PreflightError, match="msr-unknown"):
        dest.restore_state(dataclasses.replace(state, msrs={**(state.msrs or {}), FIXED_CTR0: 0}),
                           drop_msrs=False)  # fmt: skip


def test_required_msr_the_target_lacks_is_refused(machine: Callable[[], kvmstate.Vcpu]) -> None:
    vcpu = machine()
    state = vcpu.save_state()
    target = unlisted(Target.from_vcpu(vcpu), MSR_LSTAR, FIXED_CTR0)
    state.msrs = {**(state.msrs or {}), FIXED_CTR0: 0}
    report = preflight(state, target)
    assert [(f.part, f.rule) for f in report.refusals] == [("msrs", "msr-unknown-required")]
    assert "LSTAR" in str(report.refusals[0]) and report.dropped == {FIXED_CTR0: 0}
    assert MSR_LSTAR not in report.msrs


def test_every_refusal_is_listed_at_once(machine: Callable[[], kvmstate.Vcpu]) -> None:
    vcpu = machine()
    state = vcpu.save_state()
    nested = NestedState(SVM_MAX_SIZE)
    nested.format, nested.size, nested.flags = NestedFormat.SVM, SVM_MAX_SIZE, NestedFlag.GIF_SET
    state.nested = nested
    base = Target.from_vcpu(vcpu)
    vmx_target = dataclasses.replace(base, vendor="vmx", nested_state_size=8320)
    assert [f.rule for f in preflight(state, vmx_target).refusals] == ["nested-format"]
    small = dataclasses.replace(base, vendor="svm", nested_state_size=1024, sregs2=False)
    rules = {f.rule for f in preflight(state, small).refusals}
    assert "nested-size" in rules
    assert ("sregs2-unsupported" in rules) == (state.sregs2 is not None)
    none = dataclasses.replace(base, nested_state_size=0)
    assert [f.rule for f in preflight(state, none).refusals] == ["nested-unsupported"]
    # A header alone with GIF set says nesting was never used: no refusal (some kernels
    # without KVM_CAP_NESTED_STATE take it, tests/test_hostile.py's SVM_GIF_ONLY_SET).
    idle = NestedState(128)
    idle.format, idle.size, idle.flags = NestedFormat.SVM, 128, NestedFlag.GIF_SET
    assert preflight(dataclasses.replace(state, nested=idle), none).ok


def test_cpuid_the_kernel_refuses_is_named(machine: Callable[[], kvmstate.Vcpu]) -> None:
    vcpu = machine()
    state = vcpu.save_state()
    assert state.cpuid is not None
    leaves = [e for e in state.cpuid.items()[: state.cpuid.nent] if e.function == 0x80000008]
    if not leaves:
        pytest.skip("this KVM's CPUID has no leaf 0x80000008")
    leaves[0].eax = leaves[0].eax & ~0xFF00 | 40 << 8  # 40-bit virtual addresses
    (finding,) = preflight(state, Target()).refusals
    assert finding.rule == "cpuid-vaddr-bits"
    with pytest.raises(PreflightError, match="cpuid-vaddr-bits"):
        machine().restore_state(state)
    # And the kernel agrees: it refuses that CPUID itself.
    with pytest.raises(OSError) as info:
        machine().set_cpuid2(state.cpuid)
    assert info.value.errno == 22


def test_tsc_rate_rule_agrees_with_the_kernel(machine: Callable[[], kvmstate.Vcpu]) -> None:
    source = machine()
    target = Target.from_vcpu(machine())
    if target.tsc_control is not False or not target.tsc_khz:
        pytest.skip("this KVM scales the TSC (KVM_CAP_TSC_CONTROL): every rate is taken")
    state = source.save_state()
    # Just below the host's rate, within tsc_tolerance_ppm: the kernel takes it as the host's.
    state.tsc_khz = target.tsc_khz - 1
    assert preflight(state, target).ok
    machine().restore_state(state)
    # A tenth below: the kernel refuses it, so the pre-flight must, before anything is written.
    state.tsc_khz = target.tsc_khz * 9 // 10
    (finding,) = preflight(state, target).refusals
    assert finding.rule == "tsc-rate"
    with pytest.raises(OSError) as info:
        machine().set_tsc_khz(state.tsc_khz)
    assert info.value.errno == 22


def tolerance_ppm() -> int | None:
    """kvm's tsc_tolerance_ppm, read here (None where the module does not show it)."""
    try:
        return int(Path("/sys/module/kvm/parameters/tsc_tolerance_ppm").read_text())
    except OSError:
        return None


def test_lasting_target_is_the_vcpus_less_its_tsc_facts(
    machine: Callable[[], kvmstate.Vcpu],
) -> None:
    vcpu = machine()
    lasting = Target.lasting(vcpu)
    assert lasting.tsc_khz is None and lasting.tsc_tolerance_ppm is None
    whole = Target.from_vcpu(vcpu)
    assert dataclasses.replace(whole, tsc_khz=None, tsc_tolerance_ppm=None) == lasting
    assert lasting.msrs == frozenset(vcpu.msr_index_list or ())


def test_tsc_facts_are_read_only_where_the_rate_rule_needs_them(
    machine: Callable[[], kvmstate.Vcpu],
) -> None:
    vcpu = machine()
    rate = vcpu.get_tsc_khz()
    scaling = Target(tsc_control=True)
    assert scaling.with_tsc_of(vcpu, rate // 2) is scaling  # every rate is taken
    fixed = Target(tsc_control=False)
    assert fixed.with_tsc_of(vcpu, rate) is fixed  # at the vCPU's rate the rule passes
    assert fixed.with_tsc_of(vcpu, rate + 1) is fixed
    assert fixed.with_tsc_of(vcpu, None) is fixed  # no rate saved: nothing to check
    lower = fixed.with_tsc_of(vcpu, rate - 1)
    assert (lower.tsc_khz, lower.tsc_tolerance_ppm) == (rate, tolerance_ppm())


def test_restore_rereads_the_rate_each_time(machine: Callable[[], kvmstate.Vcpu]) -> None:
    vcpu = machine()
    if vcpu.check_extension(kvmstate.uapi.KVM_CAP_TSC_CONTROL) != 0:
        pytest.skip("this KVM scales the TSC (KVM_CAP_TSC_CONTROL): every rate is taken")
    state = vcpu.save_state()
    assert state.tsc_khz is not None
    vcpu.restore_state(state)  # the vCPU's lasting facts are now known
    state.tsc_khz = state.tsc_khz * 9 // 10  # a rate the kernel refuses (see above)
    with pytest.raises(PreflightError, match="tsc-rate"):
        vcpu.restore_state(state)


def test_unsaved_lists_what_the_target_knows_and_the_state_lacks() -> None:
    target = Target(msrs=frozenset({MSR_IA32_TSC, MSR_SYSENTER_EIP}))
    everything = preflight(VcpuState(msrs={MSR_IA32_TSC: 1, MSR_SYSENTER_EIP: 2}), target)
    assert everything.ok and everything.unsaved == [] and not everything.dropped
    # As many MSRs as the target lists, one of them EFER (taken, never listed): not the same.
    efer = preflight(VcpuState(msrs={MSR_IA32_TSC: 1, 0xC0000080: 0}), target)
    assert efer.ok and efer.unsaved == [MSR_SYSENTER_EIP]
    assert efer.msrs == {MSR_IA32_TSC: 1, 0xC0000080: 0}
    pmu = preflight(VcpuState(msrs={MSR_IA32_TSC: 1, FIXED_CTR0: 0}), target)
    assert pmu.unsaved == [MSR_SYSENTER_EIP] and pmu.dropped == {FIXED_CTR0: 0}


def test_unknown_facts_are_not_checked(machine: Callable[[], kvmstate.Vcpu]) -> None:
    state = machine().save_state()
    report = preflight(state, Target())
    assert report.ok and report.msrs == state.msrs and not report.unsaved


# --- the target file ---------------------------------------------------------------------------


def test_target_round_trips_through_json(machine: Callable[[], kvmstate.Vcpu]) -> None:
    target = Target.from_vcpu(machine())
    text = json.dumps(target.to_dict())
    assert Target.from_json(text) == target


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({}, "not a target file"),
        ({"format": "kvmstate-target-1", "colour": 1}, "unknown key 'colour'"),
        ({"format": "kvmstate-target-1", "msrs": ["0x1", 1 << 40]}, "msrs: .* 32-bit"),
        ({"format": "kvmstate-target-1", "vendor": "arm"}, "vendor: expected 'svm' or 'vmx'"),
        ({"format": "kvmstate-target-1", "sregs2": 1}, "sregs2: expected true or false"),
        ({"format": "kvmstate-target-1", "nested_state_size": -1}, "nested_state_size"),
    ],
)
def test_bad_target_files_are_value_errors(data: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Target.from_json(json.dumps(data))
    with pytest.raises(ValueError, match="not JSON"):
        Target.from_json(b"\xff")


# --- the command line -------------------------------------------------------------------------


def run(*args: str) -> subprocess.CompletedProcess[str]:
    if KVMSTATE is None:
        pytest.skip("the kvmstate script is not installed")
    return subprocess.run([KVMSTATE, *args], capture_output=True, text=True, timeout=60)


def test_cli_check_with_the_target_file(
    machine: Callable[[], kvmstate.Vcpu], tmp_path: Path, kvm: kvmstate.Kvm
) -> None:
    made = run("target")
    assert made.returncode == 0, made.stderr
    target = Target.from_json(made.stdout)
    assert target == Target.from_vcpu(machine())  # the same kernel, the same facts
    state = machine().save_state()
    path = tmp_path / "state.bin"
    path.write_bytes(snapshot.dumps_vcpu(state))
    (tmp_path / "here.json").write_text(made.stdout)
    ok = run("check", str(path), "--target", str(tmp_path / "here.json"))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "the target takes every part" in ok.stdout

    # A kernel that does not list SYSENTER_EIP: refused, the rule named.
    other = unlisted(target, MSR_SYSENTER_EIP)
    (tmp_path / "other.json").write_text(json.dumps(other.to_dict()))
    refused = run("check", str(path), "--target", str(tmp_path / "other.json"), "--json")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    (entry,) = json.loads(refused.stdout)["vcpus"]
    assert entry["refused"] and entry["preflight"]["refusals"][0]["rule"] == (
        "msr-unknown-required"
    )
    (tmp_path / "bad.json").write_text('{"format": "kvmstate-target-1", "msrs": 5}')
    bad = run("check", str(path), "--target", str(tmp_path / "bad.json"))
    assert bad.returncode == 2 and "msrs: expected a list" in bad.stderr
    assert "Traceback" not in bad.stderr
