"""pytest plugin: tests marked ``svm_guest`` / ``vmx_guest`` run inside the emulated
AMD / Intel guest (``tests/guest/run``), whose KVM has nested virtualization,
once per guest kernel series.

Each marked test is parametrized by target, a (vendor, kernel series) pair:
``test_x[amd-6.1]``, ``test_x[amd-6.12]``, ``test_x[case-intel-6.12]``. On
the host, the first test of a target boots that guest once for the whole
session and runs there, in one pytest process, every selected test of that
target; each host item then reports its guest result (the test body never
runs on the host, its fixtures are not set up there). Inside a guest
(``KVMSTATE_GUEST`` and ``KVMSTATE_GUEST_KERNEL`` set), the marked tests get
only that guest's target, so node ids are the host's; the others are
deselected, and each result is printed as one ``KVMSTATE-RESULT <json>``
line for the host to read.

A missing emulator (or harness status 123, e.g. no kernel package of a
series) skips that target's tests; a guest that times out, cannot boot or
gives no result for a test fails them. A guest whose tests have started and
that then prints nothing for ``--guest-stall`` seconds is stopped (its log
has the inner pytest's traceback dump from before) and booted once more for
the tests that gave no result; the terminal summary says so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from shutil import which
from typing import IO, Any

import pytest

from . import _common

RUN = Path(__file__).with_name("run")
RESULT = "KVMSTATE-RESULT "
# Only against a hung guest, so generous: the Intel session took 385 s with both cores busy
# and a warm cache, 754 s beside two other Bochs runs; a cold cache adds the saved machine's
# build (183 s idle), and waiting for another run's build counts too.
DEFAULT_TIMEOUT = 3600.0
# Silence of a guest whose tests have started, after which its session is taken as hung: the
# longest test prints its result well within this (the AMD and Intel migration runs, a few
# minutes on a loaded machine). Seen once: the AMD 6.12 guest silent for over 50 minutes in
# test_real_stream_modified_runs_on, which passes on every other boot.
DEFAULT_STALL = 900.0
# Inner pytest's traceback dump, so that a hang's log says where each thread was.
_DUMP_BEFORE_STALL = 120.0
# The harness's own exit statuses (see tests/guest/run --help).
EXIT_PREREQ, EXIT_TIMEOUT, EXIT_BOOT = 123, 124, 125
#: Not the harness's: the host stopped a guest that had gone silent (--guest-stall).
EXIT_STALL = -1
#: The kernel series every marked test runs on (tests/guest/run --kernel).
KERNELS = tuple(_common.KERNEL_PACKAGES)
#: The pseudo-fixture a marked test is parametrized by (its value: a :class:`Target`).
PARAM = "kvmstate_guest"


@dataclasses.dataclass(frozen=True)
class Guest:
    kind: str  #: ``run --cpu`` and the value of KVMSTATE_GUEST inside
    marker: str
    emulator: str  #: the host executable the guest needs
    package: str  #: the Debian package providing it


GUESTS = (
    Guest("amd", "svm_guest", "qemu-system-x86_64", "qemu-system-x86"),
    Guest("intel", "vmx_guest", "bochs", "bochs"),
)


@dataclasses.dataclass(frozen=True)
class Target:
    """Where a marked test runs: a guest and its kernel series (``run --kernel``)."""

    guest: Guest
    kernel: str

    @property
    def id(self) -> str:
        """The test id part, e.g. ``amd-6.12``."""
        return f"{self.guest.kind}-{self.kernel}"

    @property
    def name(self) -> str:
        """For messages, e.g. ``amd 6.12 guest``."""
        return f"{self.guest.kind} {self.kernel} guest"


def guests_of(item: pytest.Item | pytest.Function | Any) -> tuple[Guest, ...]:
    return tuple(g for g in GUESTS if item.get_closest_marker(g.marker) is not None)


def target_of(item: pytest.Item) -> Target | None:
    callspec = getattr(item, "callspec", None)
    target = callspec.params.get(PARAM) if callspec is not None else None
    return target if isinstance(target, Target) else None


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("kvmstate guests")
    group.addoption(
        "--guest-timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="S",
        help=f"seconds for one guest session (boot and all its tests; default {DEFAULT_TIMEOUT:g})",
    )
    group.addoption(
        "--guest-stall",
        type=float,
        default=DEFAULT_STALL,
        metavar="S",
        help=f"seconds of silence after a guest's tests started before it is taken as hung "
        f"and booted again, once, for the tests left (default {DEFAULT_STALL:g})",
    )
    group.addoption(
        "--guest-kernel",
        action="append",
        choices=KERNELS,
        metavar="SERIES",
        help=f"run the guest tests on this kernel series only (repeatable; default: all of "
        f"{', '.join(KERNELS)})",
    )
    group.addoption(
        "--kvmstate-guest-report",
        action="store_true",
        help="(inside a guest) print each result as a KVMSTATE-RESULT line for the host",
    )


def pytest_configure(config: pytest.Config) -> None:
    inside = os.environ.get("KVMSTATE_GUEST")
    if inside:
        if config.getoption("kvmstate_guest_report"):
            config.pluginmanager.register(GuestReporter(), "kvmstate-guest-reporter")
    else:
        config.stash[SESSION] = HostSession(config)


@pytest.fixture(autouse=True)
def kvmstate_guest(request: pytest.FixtureRequest) -> Target | None:
    """The :class:`Target` a marked test runs on (None for other tests)."""
    target = getattr(request, "param", None)
    return target if isinstance(target, Target) else None


@pytest.hookimpl(trylast=True)  # after @parametrize: the target is the id's last part
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    guests = guests_of(metafunc.definition)
    if not guests or PARAM not in metafunc.fixturenames:
        return
    inside = os.environ.get("KVMSTATE_GUEST")
    if inside:
        kernel = os.environ.get("KVMSTATE_GUEST_KERNEL") or _common.DEFAULT_KERNEL
        targets = [Target(g, kernel) for g in guests if g.kind == inside]
    else:
        kernels = metafunc.config.getoption("guest_kernel") or KERNELS
        targets = [Target(g, k) for g in guests for k in dict.fromkeys(kernels)]
    if targets:
        metafunc.parametrize(PARAM, targets, ids=[t.id for t in targets])


@pytest.hookimpl(trylast=True)  # after -m/-k deselection: only selected tests go in
def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    inside = os.environ.get("KVMSTATE_GUEST")
    if inside:
        keep = [item for item in items if any(g.kind == inside for g in guests_of(item))]
        dropped = [item for item in items if item not in keep]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = keep
        return
    for i, item in enumerate(items):
        target = target_of(item)
        if target is not None and item.parent is not None:
            items[i] = GuestItem.from_parent(
                item.parent, name=item.name, origin=item, target=target
            )


# --------------------------------------------------------------------------- inside


class GuestReporter:
    """Prints one KVMSTATE-RESULT line per test, once all its phases are done."""

    def __init__(self) -> None:
        # A copy of the real stdout: pytest_configure runs while capture is suspended.
        self._out: IO[str] = os.fdopen(os.dup(1), "w")
        self._results: dict[str, dict[str, Any]] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        result = self._results.setdefault(
            report.nodeid, {"nodeid": report.nodeid, "outcome": "passed", "longrepr": ""}
        )
        if report.failed:
            phase = "" if report.when == "call" else f"error in {report.when}: "
            result["outcome"] = "failed"
            text = str(report.longrepr)
            for title, content in report.sections:
                text += f"\n{'-' * 20} {title} {'-' * 20}\n{content}"
            result["longrepr"] += phase + text + "\n"
        elif report.skipped and result["outcome"] == "passed":
            result["outcome"] = "skipped"
            longrepr = report.longrepr
            if hasattr(report, "wasxfail"):  # its longrepr is the expected failure
                result["wasxfail"] = report.wasxfail
            elif isinstance(longrepr, tuple):
                result["reason"] = longrepr[2].removeprefix("Skipped: ")
            else:
                result["reason"] = str(longrepr)
        if report.when == "teardown":
            self._out.write(f"\n{RESULT}{json.dumps(result)}\n")
            self._out.flush()


# --------------------------------------------------------------------------- host


@dataclasses.dataclass
class GuestRun:
    """What one guest session gave: a status, results by node id, its log."""

    target: Target
    status: int
    results: dict[str, dict[str, Any]]
    log: Path | None
    message: str  #: the harness's own explanation (its kvmstate-guest: lines)
    seconds: float = 0.0  #: the session's wall time, boot included
    #: Logs of boots stopped as hung (the session was resumed in a new boot after each).
    stalled: list[Path] = dataclasses.field(default_factory=list)

    def failed(self) -> bool:
        return self.status != 0


class GuestFailure(Exception):
    """A test failed (or could not run) inside the guest; the text says why."""


class HostSession:
    """Boots each target (guest and kernel) at most once per pytest session, on first need."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.runs: dict[Target, GuestRun] = {}

    def run(self, target: Target, items: list[pytest.Item]) -> GuestRun:
        if target not in self.runs:
            nodeids = [i.nodeid for i in items if isinstance(i, GuestItem) and i.target == target]
            self.runs[target] = self._boot(target, nodeids)
        return self.runs[target]

    def _boot(self, target: Target, nodeids: list[str]) -> GuestRun:
        run = self._boot_once(target, nodeids)
        if run.status != EXIT_STALL:
            return run
        # Once more for the tests that gave no result, the one that hung among them.
        left = [n for n in nodeids if n not in run.results]
        again = self._boot_once(target, left)
        again.results = {**run.results, **again.results}
        again.message = "\n".join(
            m
            for m in (run.message, f"resumed in a new boot for {len(left)} tests", again.message)
            if m
        )
        again.seconds += run.seconds
        again.stalled = [*run.stalled, *again.stalled]
        return again

    def _boot_once(self, target: Target, nodeids: list[str]) -> GuestRun:
        guest = target.guest
        if which(guest.emulator) is None:
            return GuestRun(
                target, EXIT_PREREQ, {}, None,
                f"{guest.emulator} is not installed (apt-get install -y {guest.package})",
            )  # fmt: skip
        config = self.config
        stall = float(config.getoption("guest_stall"))
        command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider"]
        command += ["--rootdir", str(config.rootpath), "--kvmstate-guest-report", "-v"]
        command += ["-o", f"faulthandler_timeout={max(stall - _DUMP_BEFORE_STALL, 1):g}"]
        if config.inipath is not None:
            command += ["-c", str(config.inipath)]
        command += ["--color=no", *nodeids]
        argv = [sys.executable, str(RUN), "--cpu", guest.kind, "--kernel", target.kernel]
        argv += ["--timeout", str(config.getoption("guest_timeout")), "--", *command]
        fd, name = tempfile.mkstemp(prefix=f"kvmstate-guest-{target.id}-", suffix=".log")
        started = time.monotonic()
        with os.fdopen(fd, "w") as log:
            log.write(f"$ cd {config.rootpath} && {subprocess.list2cmdline(argv)}\n")
            log.flush()
            # From the rootdir, with its config, so that node ids mean the same inside.
            process = subprocess.Popen(
                argv, cwd=config.rootpath, stdout=log, stderr=subprocess.STDOUT
            )
            stalled = _wait_unless_silent(process, Path(name), stall)
            status = EXIT_STALL if stalled else process.returncode
        seconds = time.monotonic() - started
        results: dict[str, dict[str, Any]] = {}
        harness: list[str] = []
        for line in Path(name).read_text(errors="replace").splitlines():
            if line.startswith(RESULT):
                # A result line cut short by a dying guest is just a missing result.
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    result = json.loads(line[len(RESULT) :])
                    results[result["nodeid"]] = result
            elif line.startswith("kvmstate-guest: "):
                harness.append(line)
        if stalled:
            last = _started_without_result(Path(name), results)
            harness.append(
                f"kvmstate-guest: stopped after {stall:g} s of silence"
                + (f" in {last}" if last else "")
            )
        run = GuestRun(target, status, results, Path(name), "\n".join(harness), seconds)
        run.stalled = [Path(name)] if stalled else []
        return run

    def outcome(self, item: GuestItem) -> None:
        """Report ``item``'s result in its target guest as this host test's outcome."""
        target = item.target
        run = self.run(target, item.session.items)
        where = f"(full {target.name} output: {run.log})"
        if run.status == EXIT_PREREQ:
            pytest.skip(f"{target.name} unavailable: {run.message}")
        if run.status in (EXIT_TIMEOUT, EXIT_BOOT):
            raise GuestFailure(
                f"{target.name} failed (status {run.status}):\n{run.message}\n{where}"
            )
        result = run.results.get(item.nodeid)
        if result is None:
            raise GuestFailure(
                f"no result from the {target.name} for this test "
                f"(guest pytest exit status {run.status})\n{run.message}\n{_tail(run.log)}\n"
                f"{where}"
            )
        if result["outcome"] == "failed":
            raise GuestFailure(f"failed in the {target.name}:\n{result['longrepr']}\n{where}")
        if result["outcome"] == "skipped":
            if "wasxfail" in result:
                pytest.xfail(f"in the {target.name}: {result['wasxfail']}")
            raise pytest.skip.Exception(
                f"in the {target.name}: {result.get('reason', '')}", _use_item_location=True
            )


SESSION = pytest.StashKey[HostSession]()


class GuestItem(pytest.Item):
    """Stands on the host for a test that runs in a guest: same node id and
    location, no fixtures, and an outcome read from the guest's result."""

    def __init__(self, *, origin: pytest.Item, target: Target, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.origin = origin
        self.target = target
        self.own_markers = list(origin.own_markers)
        self.keywords.update(origin.keywords)

    def runtest(self) -> None:
        self.config.stash[SESSION].outcome(self)

    def reportinfo(self) -> tuple[Any, int | None, str]:
        return self.origin.reportinfo()

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> Any:
        if isinstance(excinfo.value, GuestFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    if SESSION not in config.stash:
        return
    for run in config.stash[SESSION].runs.values():
        if run.log is None:
            continue
        title = f"kvmstate {run.target.name}: {len(run.results)} test results"
        title += f", status {run.status}, {run.seconds:.0f} s, log {run.log}"
        for log in run.stalled:
            title += f"; resumed after a silent boot, log {log}"
        if run.failed():
            terminalreporter.section(title, sep="-")
            terminalreporter.write(run.log.read_text(errors="replace"))
        else:
            terminalreporter.write_line(title)


def _tail(log: Path | None, lines: int = 30) -> str:
    if log is None:
        return ""
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def _wait_unless_silent(process: subprocess.Popen[bytes], log: Path, stall: float) -> bool:
    """Wait for ``process``; True if it was stopped for ``stall`` s of silence in ``log``
    once the guest's pytest had started (a boot's own silence is the harness's timeout's)."""
    started = False
    last_size, last_change = -1, time.monotonic()
    while process.poll() is None:
        time.sleep(1.0)
        size = log.stat().st_size
        if size != last_size:
            last_size, last_change = size, time.monotonic()
            started = started or "test session starts" in log.read_text(errors="replace")
        elif started and time.monotonic() - last_change > stall:
            # tests/guest/run unwinds on SIGTERM and kills its emulator.
            process.terminate()
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            return True
    return False


def _started_without_result(log: Path, results: dict[str, dict[str, Any]]) -> str | None:
    """The last test the guest's pytest named that gave no result: the one that hung."""
    last = None
    for line in log.read_text(errors="replace").splitlines():
        nodeid = line.split(" ", 1)[0]
        if "::" in nodeid and not line.startswith(RESULT) and nodeid not in results:
            last = nodeid
    return last
