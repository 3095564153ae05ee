"""Tests of the emulated-guest harness (tests/guest/run) and its pytest plugin.

What the harness does in a guest is checked per vendor with one set of
tests: the marked ones run in the AMD and the Intel guest on each kernel
series, and one probe boot per vendor serves the host-side checks of it
(the Intel guest's own pieces are in tests/test_guest_intel.py). The other
boots are AMD ones (about 7 s each), so they are few: one timeout, two
pytest sessions through the plugin, one exchange directory.
"""

from __future__ import annotations

import dataclasses
import fcntl
import io
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import kvmstate
from tests.guest import _common
from tests.guest.pytest_guest import Target
from tests.support import kernels

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "tests" / "guest" / "run"
KVM_CHECK_EXTENSION = 0xAE03
KVM_CAP_NESTED_STATE = 157

needs_qemu = pytest.mark.skipif(
    shutil.which("qemu-system-x86_64") is None,
    reason="qemu-system-x86_64 is not installed (apt-get install -y qemu-system-x86)",
)


def harness(
    *args: str, cwd: Path = REPO, timeout: float | None = None
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, str(RUN), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
    )
    if done.returncode == _common.EXIT_PREREQ:
        pytest.skip(f"guest prerequisites missing: {done.stderr.strip()}")
    return done


@dataclasses.dataclass(frozen=True)
class Vendor:
    """What the harness's behaviour looks like in one guest."""

    cpu: str  #: ``run --cpu``, and KVMSTATE_GUEST inside
    nested_state_size: int  #: KVM_CHECK_EXTENSION(KVM_CAP_NESTED_STATE) inside
    kvm_module: str
    emulator: str
    install: str  #: the apt line that brings the emulator
    started: str  #: the harness's line for a boot (on stderr)
    probe_cwd: Path
    probe_options: tuple[str, ...]  #: ``run`` options besides ``--cpu``
    pycache: str | None  #: PYTHONPYCACHEPREFIX inside
    dont_write_bytecode: str | None  #: PYTHONDONTWRITEBYTECODE inside


AMD = Vendor(
    "amd",
    4224,  # header (128) + vmcb12 (4096), on the guest's 6.1 and 6.12
    "kvm_amd",
    "qemu-system-x86_64",
    "apt-get install -y qemu-system-x86",
    "kvmstate-guest: AMD guest",
    # A subdirectory: the AMD guest's root is the host's, any cwd works (about 7 s a boot).
    REPO / "tests",
    (),
    _common.GUEST_PYCACHE,  # bytecode goes to the guest's tmpfs, not the host tree
    None,
)
INTEL = Vendor(
    "intel",
    8320,  # header (128) + vmcs12 (4096) + shadow vmcs12 (4096)
    "kvm_intel",
    "bochs",
    "apt-get install -y bochs bochsbios vgabios xorriso isolinux syslinux-common busybox-static",
    "kvmstate-guest: Intel guest",
    REPO,  # the Intel guest gets a copy of the cwd's tree: the checkout's root
    # The limit only stops a hung guest: a cold cache builds the saved machine first, and a
    # loaded machine takes twice as long (see DEFAULT_TIMEOUT in tests/guest/pytest_guest.py).
    ("--timeout", "3600"),
    None,  # shipped bytecode is kept visible: compiling the stdlib again costs seconds
    "1",
)
VENDORS = {vendor.cpu: vendor for vendor in (AMD, INTEL)}


# --------------------------------------------------------------------------- in each guest


def vendor_of(target: Target) -> Vendor:
    """The vendor a marked test runs on, checked against what the guest says it is."""
    assert os.environ["KVMSTATE_GUEST"] == target.guest.kind
    return VENDORS[target.guest.kind]


@pytest.mark.svm_guest
@pytest.mark.vmx_guest
def test_kvm_inside_has_the_vendors_nested_state(kvmstate_guest: Target) -> None:
    vendor = vendor_of(kvmstate_guest)
    fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    try:
        size = fcntl.ioctl(fd, KVM_CHECK_EXTENSION, KVM_CAP_NESTED_STATE)
        assert size == vendor.nested_state_size
    finally:
        os.close(fd)


@pytest.mark.svm_guest
@pytest.mark.vmx_guest
def test_vcpus_get_a_tsc_rate_the_guest_kernel_still_has(kvmstate_guest: Target) -> None:
    """KVM took its default vCPU TSC rate after the guest kernel refined its own (the
    harness waits for that): KVM_SET_TSC_KHZ takes the rate back as it is, where one
    more than 250 ppm off the kernel's needs TSC scaling (refused without it), so a
    restore of a vCPU's own rate never depends on how the boot calibrated."""
    vendor_of(kvmstate_guest)
    with kvmstate.Kvm() as kvm, kvm.create_vm() as vm, vm.create_vcpu(0) as vcpu:
        vcpu.set_tsc_khz(vcpu.get_tsc_khz())


@pytest.mark.svm_guest
@pytest.mark.vmx_guest
def test_guest_runs_the_kernel_series_asked_for(kvmstate_guest: Target) -> None:
    """Run once per series (in the plugin's sessions, no boot of its own): the booted
    kernel is of the series the test id names, and its kvm_amd / kvm_intel has nested on."""
    vendor = vendor_of(kvmstate_guest)
    series = os.environ["KVMSTATE_GUEST_KERNEL"]
    assert series == kvmstate_guest.kernel
    assert series in _common.KERNEL_PACKAGES
    assert os.uname().release.startswith(series + "."), os.uname().release
    nested = Path(f"/sys/module/{vendor.kvm_module}/parameters/nested").read_text().strip()
    assert nested in ("1", "Y"), nested


# --------------------------------------------------------------------------- one probe boot each

PROBE = (
    f"REPO = {str(REPO)!r}\n"
    + """
import fcntl, json, os, shutil, sys, tempfile
fd = os.open("/dev/kvm", os.O_RDWR)
with tempfile.NamedTemporaryFile() as f:
    f.write(b"written")
    f.flush()
    tmpfile = f.name
print(json.dumps({
    "cwd": os.getcwd(),
    "guest": os.environ.get("KVMSTATE_GUEST"),
    "tmpfile": tmpfile,
    "tmpdir": os.environ.get("TMPDIR"),
    "pycache": os.environ.get("PYTHONPYCACHEPREFIX"),
    "bytecode": os.environ.get("PYTHONDONTWRITEBYTECODE"),
    "executable": sys.executable,
    "nested_state": fcntl.ioctl(fd, 0xAE03, 157),
    "checkout": os.path.isfile(os.path.join(REPO, "tests", "guest", "intel.py")),
    "tools": shutil.which("uname") is not None,
}))
"""
)


@dataclasses.dataclass(frozen=True)
class Probe:
    vendor: Vendor
    done: subprocess.CompletedProcess[str]

    def found(self) -> dict[str, Any]:
        """What the probe printed (its JSON line: the Intel console may add others)."""
        lines = [line for line in self.done.stdout.splitlines() if line.startswith("{")]
        assert lines, f"no probe output\nstdout:\n{self.done.stdout}\nstderr:\n{self.done.stderr}"
        result: dict[str, Any] = json.loads(lines[-1])
        return result


@pytest.fixture(scope="module")
def probe(request: pytest.FixtureRequest) -> Probe:
    """One boot per vendor: the Python probe, which then exits 7, run from the vendor's
    ``probe_cwd``; in the AMD guest through sh (``&& exit 7``), in the Intel guest itself."""
    vendor: Vendor = request.param
    if shutil.which(vendor.emulator) is None:
        pytest.skip(f"{vendor.emulator} is not installed ({vendor.install})")
    if vendor is AMD:
        command = ["sh", "-c", '"$0" -c "$1" && exit 7', sys.executable, PROBE]
    else:
        command = [sys.executable, "-c", PROBE + "sys.exit(7)\n"]
    options = ["--cpu", vendor.cpu, *vendor.probe_options]
    return Probe(vendor, harness(*options, "--", *command, cwd=vendor.probe_cwd))


each_vendor = pytest.mark.parametrize("probe", [AMD, INTEL], ids=["amd", "intel"], indirect=True)


@each_vendor
def test_exit_status_is_the_commands(probe: Probe) -> None:
    assert probe.done.returncode == 7, probe.done.stderr
    assert probe.vendor.started in probe.done.stderr


@each_vendor
def test_kvm_inside_has_nested_state(probe: Probe) -> None:
    found = probe.found()
    assert found["guest"] == probe.vendor.cpu
    assert found["nested_state"] == probe.vendor.nested_state_size


@each_vendor
def test_runs_in_the_callers_checkout(probe: Probe) -> None:
    found = probe.found()
    assert found["cwd"] == str(probe.vendor.probe_cwd)  # the cwd is kept
    assert found["checkout"] is True
    assert found["executable"] == sys.executable
    assert found["tools"] is True  # uname on PATH (busybox applets in the Intel guest)


@each_vendor
def test_environment(probe: Probe) -> None:
    found = probe.found()
    assert found["tmpdir"] == _common.GUEST_TMP  # the guest's tmpfs, writable
    assert found["tmpfile"].startswith(found["tmpdir"] + "/")
    # Bytecode is not written to the host: elsewhere, or not at all.
    assert found["pycache"] == probe.vendor.pycache
    assert found["bytecode"] == probe.vendor.dont_write_bytecode


@pytest.mark.parametrize("probe", [AMD], ids=["amd"], indirect=True)
def test_stdout_is_only_the_commands_output(probe: Probe) -> None:
    assert probe.done.stdout.count("\n") == 1, probe.done.stdout + probe.done.stderr
    probe.found()  # exactly one line: the probe's
    # The harness speaks on stderr only, each line marked; on a cold cache it also says
    # what it downloads and unpacks, and the guest kernel's warnings are passed on.
    lines = probe.done.stderr.splitlines()
    assert all(line.startswith("kvmstate-guest: ") for line in lines), probe.done.stderr
    started = [line for line in lines if line.startswith(AMD.started)]
    assert len(started) == 1, probe.done.stderr


# --------------------------------------------------------------------------- other boots


@needs_qemu
def test_timeout_gives_124() -> None:
    # A command that never ends: whether the guest had booted by then or not, the limit
    # ends the run. The subprocess bound only keeps a broken limit from hanging CI (it
    # leaves room for a cold cache, where the kernel is first downloaded).
    done = harness("--timeout", "3", "--", "sh", "-c", "while :; do sleep 1; done", timeout=900)
    assert done.returncode == _common.EXIT_TIMEOUT, done.stderr
    assert "kvmstate-guest: timed out after 3 s (" in done.stderr
    assert "the command was still running" in done.stderr or "had not booted" in done.stderr


@needs_qemu
def test_pytest_plugin_reports_guest_results(tmp_path: Path) -> None:
    """A pass, a skip and a failure inside the guest are those outcomes on the host."""
    ini = "[pytest]\nmarkers =\n    svm_guest: guest\n    vmx_guest: guest\n"
    (tmp_path / "pytest.ini").write_text(ini)
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["tests.guest.pytest_guest"]\n')
    (tmp_path / "test_plumbing.py").write_text(
        textwrap.dedent(
            """
            import os
            import pytest

            @pytest.mark.svm_guest
            def test_passes():
                assert os.environ["KVMSTATE_GUEST"] == "amd"

            @pytest.mark.svm_guest
            def test_skips():
                pytest.skip("a reason given inside")

            @pytest.mark.svm_guest
            def test_fails():
                assert os.environ["KVMSTATE_GUEST"] == "deliberately wrong"

            def test_on_host():
                assert "KVMSTATE_GUEST" not in os.environ
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if k != "KVMSTATE_GUEST"}
    env["PYTHONPATH"] = str(REPO)
    # One kernel series: this test is about outcomes (per kernel: see the next test).
    pytest_argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA"]
    done = subprocess.run(
        [*pytest_argv, "--guest-kernel", "6.1", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    out = done.stdout
    assert done.returncode == 1, out
    assert "1 failed, 2 passed, 1 skipped" in out
    assert "in the amd 6.1 guest: a reason given inside" in out
    assert "deliberately wrong" in out  # the guest's assertion text
    assert "full amd 6.1 guest output: " in out  # the log's path
    assert "[amd-6.12]" not in out  # --guest-kernel 6.1


@needs_qemu
def test_kernel_option_boots_the_newest_of_that_series() -> None:
    done = harness("--kernel", "6.12", "--", "sh", "-c", 'uname -r; echo "$KVMSTATE_GUEST_KERNEL"')
    assert done.returncode == 0, done.stderr
    release, series = done.stdout.split()
    assert series == "6.12"
    assert re.fullmatch(r"6\.12\.\d+\+deb12-amd64", release), release
    assert f"Linux {release}, running the command" in done.stderr


@needs_qemu
def test_pytest_plugin_runs_each_test_on_each_kernel(tmp_path: Path) -> None:
    """One session per kernel series, each test reported per kernel."""
    ini = "[pytest]\nmarkers =\n    svm_guest: guest\n    vmx_guest: guest\n"
    (tmp_path / "pytest.ini").write_text(ini)
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["tests.guest.pytest_guest"]\n')
    (tmp_path / "test_kernels.py").write_text(
        textwrap.dedent(
            """
            import os
            import pytest

            @pytest.mark.svm_guest
            @pytest.mark.parametrize("n", [1])
            def test_series(n, kvmstate_guest):
                assert kvmstate_guest.kernel == os.environ["KVMSTATE_GUEST_KERNEL"]
                assert os.uname().release.startswith(kvmstate_guest.kernel + ".")

            @pytest.mark.svm_guest
            def test_only_on_6_12():
                assert os.uname().release.startswith("6.12."), "deliberately per kernel"
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if k != "KVMSTATE_GUEST"}
    env["PYTHONPATH"] = str(REPO)

    def pytest_run(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", *args],
            cwd=tmp_path, env=env, capture_output=True, text=True, check=False,
        )  # fmt: skip
        return done.stdout

    out = pytest_run("--co", "-q")
    for kernel in _common.KERNEL_PACKAGES:
        assert f"test_kernels.py::test_series[1-amd-{kernel}]" in out, out
        assert f"test_kernels.py::test_only_on_6_12[amd-{kernel}]" in out, out
    out = pytest_run()
    assert "1 failed, 3 passed" in out, out
    assert "PASSED test_kernels.py::test_only_on_6_12[amd-6.12]" in out
    assert "FAILED test_kernels.py::test_only_on_6_12[amd-6.1]" in out
    assert "failed in the amd 6.1 guest" in out
    for kernel in _common.KERNEL_PACKAGES:  # one session each, named in the summary
        assert out.count(f"kvmstate amd {kernel} guest: 2 test results") == 1, out


# --------------------------------------------------------------------------- no boot


def test_help_documents_the_kernel_series() -> None:
    done = subprocess.run(
        [sys.executable, str(RUN), "--help"], capture_output=True, text=True, check=True
    )
    assert "--kernel 6.1|6.12" in done.stdout
    assert "KVMSTATE_GUEST_KERNEL" in done.stdout


def test_unknown_kernel_series_is_a_usage_error() -> None:
    done = subprocess.run(
        [sys.executable, str(RUN), "--kernel", "5.10", "--", "true"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 2  # argparse's usage error, before anything is prepared
    assert "invalid choice: '5.10'" in done.stderr


@pytest.mark.parametrize(
    ("series", "names", "newest"),
    [
        ("6.1", ["linux-image-6.1.0-9-amd64-unsigned", "linux-image-6.1.0-57-amd64-unsigned",
                 "linux-image-6.1.0-57-cloud-amd64-unsigned", "linux-image-6.1.0-57-amd64"],
         "linux-image-6.1.0-57-amd64-unsigned"),
        ("6.12", ["linux-image-6.12.117+deb12-amd64-unsigned",
                  "linux-image-6.12.9+deb12-amd64-unsigned",
                  "linux-image-6.12.200+deb12-rt-amd64-unsigned",
                  "linux-image-6.1.0-57-amd64-unsigned"],
         "linux-image-6.12.117+deb12-amd64-unsigned"),
    ],
)  # fmt: skip
def test_kernel_package_of_a_series_is_its_newest_plain_flavour(
    series: str, names: list[str], newest: str
) -> None:
    pattern = _common.KERNEL_PACKAGES[series]
    matching = [n for n in names if re.match(pattern, n)]
    assert max(matching, key=_common._package_order) == newest
    assert not any(re.match(pattern, n) for n in names if "cloud" in n or "-rt-" in n)


def test_kernel_series_without_a_package_is_123_naming_the_apt_line(tmp_path: Path) -> None:
    """apt itself, configured with no package source, knows no kernel of the series."""
    if shutil.which("apt-cache") is None:
        pytest.skip("apt-cache is not installed (not a Debian host)")
    for d in ("lists/partial", "cache/archives/partial", "sources.list.d", "prefs.d"):
        (tmp_path / "apt" / d).mkdir(parents=True)
    (tmp_path / "apt" / "sources.list").write_text("")
    conf = tmp_path / "apt.conf"
    conf.write_text(
        f'Dir::State::Lists "{tmp_path}/apt/lists";\n'
        f'Dir::Cache "{tmp_path}/apt/cache";\n'
        f'Dir::Etc::SourceList "{tmp_path}/apt/sources.list";\n'
        f'Dir::Etc::SourceParts "{tmp_path}/apt/sources.list.d";\n'
        f'Dir::Etc::PreferencesParts "{tmp_path}/apt/prefs.d";\n'
    )
    env = {**os.environ, "APT_CONFIG": str(conf), "KVMSTATE_GUEST_CACHE": str(tmp_path / "c")}
    done = subprocess.run(
        [sys.executable, str(RUN), "--kernel", "6.12", "--", "true"],
        cwd=REPO, env=env, capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    if "missing on the host" in done.stderr:
        pytest.skip(f"guest prerequisites missing: {done.stderr.strip()}")
    assert done.returncode == _common.EXIT_PREREQ, done.stderr
    assert "6.12" in done.stderr
    assert "apt-get update" in done.stderr  # the apt line to run


def test_help_documents_exit_statuses() -> None:
    done = subprocess.run(
        [sys.executable, str(RUN), "--help"], capture_output=True, text=True, check=True
    )
    for status in ("123", "124", "125"):
        assert f"\n  {status}  " in done.stdout


def test_console_filter_keeps_output_and_markers_apart() -> None:
    out = io.BytesIO()
    started: list[str] = []
    console = _common.ConsoleFilter("n0", out, started.append)
    stream = b"boot noise\r\nKVMSTATE-GUEST n0 start 6.1\noutput\nno newline"
    stream += b"KVMSTATE-GUEST n0 kmsg <4>[ 1.0] warned\nKVMSTATE-GUEST n0 exit 3\npoweroff\n"
    for i in range(len(stream)):  # byte by byte: markers split across reads
        console.feed(stream[i : i + 1])
    assert started == ["6.1"]
    assert out.getvalue() == b"output\nno newline"
    assert console.kernel_messages == ["<4>[ 1.0] warned"]
    assert console.exit_status == 3


def test_cpio_is_newc() -> None:
    cpio = _common.Cpio()
    cpio.file("init", b"#!/bin/sh\n", 0o755)
    archive = cpio.finish()
    assert archive.startswith(b"070701")
    assert len(archive) % 512 == 0
    assert b"init\0" in archive
    assert b"TRAILER!!!\0" in archive


def _bzimage(payload: bytes) -> bytes:
    """A bzImage as the boot protocol lays it out: one setup sector after the boot
    sector, then the protected-mode code, the compressed kernel at payload_offset."""
    setup_sects, offset = 1, 0x40
    image = bytearray((setup_sects + 1) * 512 + offset)
    image[0x1F1] = setup_sects
    image[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", image, 0x206, 0x20F)  # boot protocol 2.15
    struct.pack_into("<II", image, 0x248, offset, len(payload))
    return bytes(image) + payload + b"trailing setup data"


ELF = b"\x7fELF" + bytes(range(256)) * 64


@pytest.mark.parametrize("method", ["xz", "zstd"])
def test_vmlinux_is_unpacked_from_the_bzimage_payload(tmp_path: Path, method: str) -> None:
    """6.1's bzImage holds an xz kernel, 6.12's a zstd one followed by its 4-byte size."""
    if method == "xz":
        payload = lzma.compress(ELF, format=lzma.FORMAT_XZ)
    else:
        if shutil.which("zstd") is None:
            pytest.skip("zstd is not installed (apt-get install -y zstd)")
        done = subprocess.run(["zstd", "-q", "-c"], input=ELF, capture_output=True, check=True)
        payload = done.stdout + struct.pack("<I", len(ELF))
    image = tmp_path / "vmlinuz"
    image.write_bytes(_bzimage(payload))
    assert _common._extract_vmlinux(image) == ELF
    image.write_bytes(_bzimage(payload)[:-40])  # cut inside the payload
    assert _common._extract_vmlinux(image) is None


def test_per_series_expectation_needs_the_running_series() -> None:
    """tests/support/kernels.py: an expectation is looked up by the running kernel's
    series; a series nobody worked out is an error naming the release, not a pass."""
    here = kernels.running()
    assert re.match(rf"{here[0]}\.{here[1]}\D", os.uname().release + " ")
    assert kernels.by_series({here: "expected", (0, 1): "other"}) == "expected"
    with pytest.raises(LookupError, match=re.escape(os.uname().release)):
        kernels.by_series({(0, 1): "other"})


@needs_qemu
def test_exchange_directory_is_writable_at_its_own_path(tmp_path: Path) -> None:
    (tmp_path / "from-host").write_text("in\n")
    script = (
        'cat "$KVMSTATE_GUEST_EXCHANGE/from-host" && echo out > "$KVMSTATE_GUEST_EXCHANGE/back"'
    )
    done = harness("--exchange", str(tmp_path), "--", "sh", "-c", script, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "in\n"  # the host's file, seen inside
    assert (tmp_path / "back").read_text() == "out\n"  # and the guest's, seen outside


def test_exchange_directory_is_refused_where_it_cannot_work(tmp_path: Path) -> None:
    done = harness("--exchange", str(tmp_path / "missing"), "--", "true")
    assert done.returncode == _common.EXIT_BOOT and "is not a directory" in done.stderr


# --- a guest that goes silent: stopped, and booted again for the tests left ------------------

FAKE_RUN = """
import json, os, pathlib, sys, time
nodeids = [a for a in sys.argv[sys.argv.index("--") + 1 :] if "::" in a]
print("============ test session starts ============", flush=True)
hang = pathlib.Path(os.environ["FAKE_GUEST_HANG"])
for nodeid in nodeids:
    print(nodeid + " ", flush=True)
    if nodeid == "t.py::test_b" and hang.exists():
        hang.unlink()  # hangs in this boot only
        time.sleep(600)
    result = {"nodeid": nodeid, "outcome": "passed", "longrepr": ""}
    print("KVMSTATE-RESULT " + json.dumps(result), flush=True)
"""


@dataclasses.dataclass
class _FakeConfig:
    """What HostSession reads of a pytest config."""

    rootpath: Path
    stall: float
    inipath: Path | None = None

    def getoption(self, name: str) -> float:
        return {"guest_timeout": 600.0, "guest_stall": self.stall}[name]


def test_a_silent_guest_is_stopped_and_the_tests_left_run_in_a_new_boot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.guest import pytest_guest

    fake = tmp_path / "run"
    fake.write_text(FAKE_RUN)
    hang = tmp_path / "hang"
    hang.touch()
    monkeypatch.setenv("FAKE_GUEST_HANG", str(hang))
    monkeypatch.setattr(pytest_guest, "RUN", fake)
    monkeypatch.setattr(pytest_guest, "which", lambda name: f"/usr/bin/{name}")
    session = pytest_guest.HostSession(_FakeConfig(tmp_path, stall=2.0))  # type: ignore[arg-type]
    target = pytest_guest.Target(pytest_guest.GUESTS[0], "6.1")
    nodeids = ["t.py::test_a", "t.py::test_b", "t.py::test_c"]
    run = session._boot(target, nodeids)
    assert sorted(run.results) == nodeids
    assert {r["outcome"] for r in run.results.values()} == {"passed"}
    assert run.status == 0
    assert len(run.stalled) == 1
    assert "stopped after 2 s of silence in t.py::test_b" in run.message
    assert "resumed in a new boot for 2 tests" in run.message
    first = run.stalled[0].read_text()
    assert "test_a" in first and '"t.py::test_b"' not in first  # b gave no result there


def test_a_guest_silent_before_its_tests_start_is_left_to_the_timeout(tmp_path: Path) -> None:
    from tests.guest import pytest_guest

    log = tmp_path / "log"
    with log.open("w") as out:
        quiet = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(4)"], stdout=out)
        assert pytest_guest._wait_unless_silent(quiet, log, stall=1.0) is False
    assert quiet.returncode == 0  # ran to its end: a boot's silence is not a hang


def test_a_guest_silent_after_its_tests_started_is_stopped(tmp_path: Path) -> None:
    from tests.guest import pytest_guest

    log = tmp_path / "log"
    code = "print('== test session starts ==', flush=True); import time; time.sleep(600)"
    with log.open("w") as out:
        hung = subprocess.Popen([sys.executable, "-c", code], stdout=out)
        assert pytest_guest._wait_unless_silent(hung, log, stall=1.0) is True
    assert hung.returncode is not None and hung.returncode != 0
