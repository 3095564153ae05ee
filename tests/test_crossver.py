"""Migration across kernel series: nested L1 and L2 saved on 6.1 restored on 6.12, and back.

One host-side test module, for both vendors. AMD: it boots the AMD guest on
both series at once (``tests/guest/run --exchange DIR``, a host directory
both boots may write), each running tests/support/crossver.py, which saves
the L1 of tests/support/svm_l1.py at every stage of the migration loop,
writes its kernel's ``kvmstate target`` file, and restores the other boot's
saves after ``kvmstate check --target`` has given its verdict. Intel: the
same with the VMX L1 of tests/support/vmx_l1.py and whole-VM snapshots, in
two rounds of two Bochs boots at once (Bochs's exchange directory is a copy
that comes back when the boot ends): both series save, then both restore
the other's saves. Here: a restore the kernel (or the pre-flight, on the
kernel's behalf) refuses must have been refused by check first, naming the
rule, and the kernel must refuse that write alone too; a restore it takes
must end with L2's expected result. ``-m "not crossver"`` leaves it out.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests import test_svm_migration as svm
from tests import test_vmx_migration as vmx
from tests.guest import pytest_guest

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "tests" / "guest" / "run"
SERIES = ("6.1", "6.12")
TIMEOUT = 2400  # both boots share two cores with the rest of the suite
#: An Intel restore round runs the VMX L1's rest 32 times under Bochs: 8 to 10 min
#: with the machine to itself, four times that on a loaded one.
TIMEOUTS = {"amd": TIMEOUT, "intel": 3600}
VENDORS = {"amd": "AMD (SVM)", "intel": "Intel (VMX)"}
#: What each guest needs on the host, and the apt line that brings it.
EMULATORS = {
    "amd": ("qemu-system-x86_64", "apt-get install qemu-system-x86"),
    "intel": ("bochs", "apt-get install bochs bochsbios vgabios xorriso isolinux"),
}

pytestmark = [
    pytest.mark.crossver,
    pytest.mark.skipif(
        "KVMSTATE_GUEST" in os.environ, reason="boots guests itself: runs on the host only"
    ),
]

Results = dict[str, dict[str, Any]]
Crossed = tuple[Results, Path, float, str]


def boot_both(cpu: str, exchange: Path, *driver_args: str) -> dict[str, str]:
    """One boot per series at once, each running the driver; their outputs, by kernel."""
    procs = {}
    for kernel, peer in zip(SERIES, reversed(SERIES), strict=True):
        # The Intel guest carries the running Python's tree: start the harness with it.
        harness = [sys.executable, str(RUN), "--cpu", cpu, "--kernel", kernel,
                   "--timeout", str(TIMEOUTS[cpu]), "--exchange", str(exchange)]  # fmt: skip
        driver = ["-m", "tests.support.crossver", str(exchange), "--kernel", kernel,
                  "--peer", peer, *driver_args]  # fmt: skip
        argv = [*harness, "--", sys.executable, *driver]
        procs[kernel] = subprocess.Popen(
            argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    outputs = {k: p.communicate(timeout=TIMEOUTS[cpu] + 120)[0] for k, p in procs.items()}
    for kernel, proc in procs.items():
        if proc.returncode == pytest_guest.EXIT_PREREQ:
            pytest.skip(f"the {kernel} {cpu} guest cannot run: {outputs[kernel].strip()}")
        assert proc.returncode == 0, f"{kernel} boot: status {proc.returncode}\n{outputs[kernel]}"
    return outputs


@pytest.fixture(scope="module", params=tuple(VENDORS))
def crossed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Crossed:
    """Both directions of one vendor; ``(results by restoring kernel, exchange dir,
    seconds, vendor)``. AMD: both boots at once. Intel: both save, then both restore."""
    cpu: str = request.param
    emulator, apt = EMULATORS[cpu]
    if shutil.which(emulator) is None:
        pytest.skip(f"no {emulator} for the {cpu} guest ({apt})")
    exchange = tmp_path_factory.mktemp(f"crossver-{cpu}")
    started = time.monotonic()
    if cpu == "amd":
        boot_both(cpu, exchange)
    else:
        for round_ in ("save", "restore"):
            boot_both(cpu, exchange, "--vendor", "vmx", "--round", round_)
            print(f"Intel round {round_!r} done after {time.monotonic() - started:.0f} s")
    seconds = time.monotonic() - started
    results = {k: json.loads((exchange / f"results-{k}.json").read_text()) for k in SERIES}
    print(table(results, cpu))
    return results, exchange, seconds, cpu


def expected_stages(cpu: str) -> dict[str, set[str]]:
    """Every stage the migration loop stops at, by variant, from each test file's model."""
    if cpu == "amd":
        return {variant: set(svm.EXPECTED_STATE) for variant in ("shadow", "npt")}
    exits = vmx.model(True)
    nmi = {f"NMI pending ({e.inject})" for e in exits if e.inject and e.inject != "KVM_INTERRUPT"}
    return {"vmx": {e.stage for e in exits} | nmi}


def rows(results: Results) -> list[dict[str, Any]]:
    return [row for kernel in SERIES for row in results[kernel]["rows"]]


def verdict(row: dict[str, Any]) -> str:
    check = row["check"]
    return "refused: " + ", ".join(check["rules"]) if check.get("refused") else "accepted"


def outcome(row: dict[str, Any]) -> str:
    text = row["restore"]
    if row["dropped"]:
        text += f" ({len(row['dropped'])} idle MSRs dropped)"
    if row["result_ok"] is not None:
        text += ", L2 result " + ("as expected" if row["result_ok"] else "WRONG")
    retry = row.get("retry")
    if retry:
        text += f"; at the target's TSC rate: {outcome(retry)}"
    return text


def table(results: Results, cpu: str = "amd") -> str:
    lines = [
        "| direction | vendor | variant | stage | check beforehand | restore |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows(results):
        lines.append(f"| {row['from']} -> {row['to']} | {VENDORS[cpu]} | {row['variant']} | "
                     f"{row['stage']} | {verdict(row)} | {outcome(row)} |")  # fmt: skip
    return "\n".join(lines)


def test_every_stage_of_both_variants_crosses_both_ways(crossed: Crossed) -> None:
    results, _, seconds, cpu = crossed
    print(f"{cpu}: all boots {seconds:.0f} s wall")
    for kernel, peer in zip(SERIES, reversed(SERIES), strict=True):
        for variant, stages in expected_stages(cpu).items():
            seen = {r["stage"] for r in results[kernel]["rows"] if r["variant"] == variant}
            assert stages <= seen, (peer, kernel, variant, stages - seen)


def test_a_refusal_was_named_by_check_and_the_kernel_agrees(crossed: Crossed) -> None:
    for row in rows(crossed[0]):
        where = f"{row['from']} -> {row['to']} {row['variant']} {row['stage']}"
        if row["restore"] == "restored":
            assert not row["check"]["refused"], (where, row["check"])
            continue
        # Refused: check said so first, naming the rule (from the target's facts alone).
        assert row["check"]["refused"] and row["check"]["rules"], (where, row["check"])
        assert row["restore"] == "refused by the pre-flight", (where, row["error"])
        for rule in {part.split(": ")[0] for part in row["kernel_says"]}:
            assert rule in row["check"]["rules"], (where, rule)
        # And the kernel refuses each such write by itself too: no refusal is made up.
        assert row["kernel_says"], where
        assert all("refused too" in said for said in row["kernel_says"]), (where, row)


def test_an_accepted_restore_ends_with_the_expected_result(crossed: Crossed) -> None:
    restored = 0
    for row in rows(crossed[0]):
        for attempt in (row, row.get("retry")):
            if attempt and attempt["restore"] == "restored":
                restored += 1
                assert attempt["result_ok"], (row["from"], row["stage"], attempt["detail"])
    assert restored >= len(rows(crossed[0]))  # every save ran to its end one way or another


def test_only_msrs_the_target_does_not_list_are_dropped(crossed: Crossed) -> None:
    results, exchange, _, _ = crossed
    listed = {
        k: {int(i, 16) for i in json.loads((exchange / f"target-{k}.json").read_text())["msrs"]}
        for k in SERIES
    }
    for row in rows(results):
        for attempt in (row, row.get("retry")):
            if attempt and attempt["restore"] == "restored":
                dropped = {int(i, 16) for i in attempt["dropped"]}
                # Each dropped MSR is one the source lists and the target does not.
                assert dropped <= listed[row["from"]] - listed[row["to"]], row["stage"]


def test_check_foretold_the_msrs_the_restore_dropped(crossed: Crossed) -> None:
    # `kvmstate check --target` lists what the restore will leave out, before it is sent.
    for row in rows(crossed[0]):
        for attempt in (row, row.get("retry")):
            if attempt and attempt["restore"] == "restored":
                assert attempt["dropped"] == row["check"]["dropped"], (row["from"], row["stage"])
