"""pytest plugin: tests marked ``svm_guest`` / ``vmx_guest`` run inside the emulated
AMD / Intel guest (``tests/guest/run``), whose KVM has nested virtualization.

On the host, the first marked test of a kind boots that guest once for the
whole session and runs there, in one pytest process, every selected test of
that kind; each host item then reports its guest result (the test body never
runs on the host, its fixtures are not set up there). Inside a guest
(``KVMSTATE_GUEST`` set), only the tests marked for it run, and each result is
printed as one ``KVMSTATE-RESULT <json>`` line for the host to read.

A missing emulator (or harness status 123) skips the marked tests; a guest
that times out, cannot boot or gives no result for a test fails them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from shutil import which
from typing import IO, Any

import pytest

RUN = Path(__file__).with_name("run")
RESULT = "KVMSTATE-RESULT "
# Only against a hung guest, so generous: the Intel session took 385 s with both cores busy
# and a warm cache, 754 s beside two other Bochs runs; a cold cache adds the saved machine's
# build (183 s idle), and waiting for another run's build counts too.
DEFAULT_TIMEOUT = 3600.0
# The harness's own exit statuses (see tests/guest/run --help).
EXIT_PREREQ, EXIT_TIMEOUT, EXIT_BOOT = 123, 124, 125


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


def guests_of(item: pytest.Item) -> tuple[Guest, ...]:
    return tuple(g for g in GUESTS if item.get_closest_marker(g.marker) is not None)


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
        guests = guests_of(item)
        if guests and item.parent is not None:
            items[i] = GuestItem.from_parent(
                item.parent, name=item.name, origin=item, guests=guests
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

    guest: Guest
    status: int
    results: dict[str, dict[str, Any]]
    log: Path | None
    message: str  #: the harness's own explanation (its kvmstate-guest: lines)

    def failed(self) -> bool:
        return self.status != 0


class GuestFailure(Exception):
    """A test failed (or could not run) inside the guest; the text says why."""


class HostSession:
    """Boots each guest kind at most once per pytest session, on first need."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.runs: dict[str, GuestRun] = {}

    def run(self, guest: Guest, items: list[pytest.Item]) -> GuestRun:
        if guest.kind not in self.runs:
            nodeids = [i.nodeid for i in items if isinstance(i, GuestItem) and guest in i.guests]
            self.runs[guest.kind] = self._boot(guest, nodeids)
        return self.runs[guest.kind]

    def _boot(self, guest: Guest, nodeids: list[str]) -> GuestRun:
        if which(guest.emulator) is None:
            return GuestRun(
                guest, EXIT_PREREQ, {}, None,
                f"{guest.emulator} is not installed (apt-get install -y {guest.package})",
            )  # fmt: skip
        config = self.config
        command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider"]
        command += ["--rootdir", str(config.rootpath), "--kvmstate-guest-report", "-v"]
        if config.inipath is not None:
            command += ["-c", str(config.inipath)]
        command += ["--color=no", *nodeids]
        argv = [sys.executable, str(RUN), "--cpu", guest.kind]
        argv += ["--timeout", str(config.getoption("guest_timeout")), "--", *command]
        fd, name = tempfile.mkstemp(prefix=f"kvmstate-guest-{guest.kind}-", suffix=".log")
        with os.fdopen(fd, "w") as log:
            log.write(f"$ cd {config.rootpath} && {subprocess.list2cmdline(argv)}\n")
            log.flush()
            # From the rootdir, with its config, so that node ids mean the same inside.
            status = subprocess.run(
                argv, cwd=config.rootpath, stdout=log, stderr=subprocess.STDOUT, check=False
            ).returncode
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
        return GuestRun(guest, status, results, Path(name), "\n".join(harness))

    def outcome(self, item: GuestItem, guest: Guest) -> None:
        """Report ``item``'s result in ``guest`` as this host test's outcome."""
        run = self.run(guest, item.session.items)
        where = f"(full {guest.kind} guest output: {run.log})"
        if run.status == EXIT_PREREQ:
            pytest.skip(f"{guest.kind} guest unavailable: {run.message}")
        if run.status in (EXIT_TIMEOUT, EXIT_BOOT):
            raise GuestFailure(
                f"{guest.kind} guest failed (status {run.status}):\n{run.message}\n{where}"
            )
        result = run.results.get(item.nodeid)
        if result is None:
            raise GuestFailure(
                f"no result from the {guest.kind} guest for this test "
                f"(guest pytest exit status {run.status})\n{_tail(run.log)}\n{where}"
            )
        if result["outcome"] == "failed":
            raise GuestFailure(f"failed in the {guest.kind} guest:\n{result['longrepr']}\n{where}")
        if result["outcome"] == "skipped":
            if "wasxfail" in result:
                pytest.xfail(f"in the {guest.kind} guest: {result['wasxfail']}")
            raise pytest.skip.Exception(
                f"in the {guest.kind} guest: {result.get('reason', '')}", _use_item_location=True
            )


SESSION = pytest.StashKey[HostSession]()


class GuestItem(pytest.Item):
    """Stands on the host for a test that runs in a guest: same node id and
    location, no fixtures, and an outcome read from the guest's result."""

    def __init__(self, *, origin: pytest.Item, guests: tuple[Guest, ...], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.origin = origin
        self.guests = guests
        self.own_markers = list(origin.own_markers)
        self.keywords.update(origin.keywords)

    def runtest(self) -> None:
        for guest in self.guests:
            self.config.stash[SESSION].outcome(self, guest)

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
        title = f"kvmstate {run.guest.kind} guest: {len(run.results)} test results"
        title += f", status {run.status}, log {run.log}"
        if run.failed():
            terminalreporter.section(title, sep="-")
            terminalreporter.write(run.log.read_text(errors="replace"))
        else:
            terminalreporter.write_line(title)


def _tail(log: Path | None, lines: int = 30) -> str:
    if log is None:
        return ""
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
