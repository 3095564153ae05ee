"""Hostile input against every public entry point, on the real /dev/kvm.

Each case feeds one entry point something wrong (a bad type, an out-of-range
int, a closed wrapper, a dead or foreign descriptor, a lying blob, a
malformed dict, an unusable buffer, a bad file for the CLI) and states what
it must give. A case is one row, ``"expression": "expectation"``: the
expression is both the call and the case id, evaluated with the names of
:func:`scope`; the expectation is ``"ValueError: fragment"``,
``"KvmError[EINVAL]: fragment"`` (errno checked) or ``"ok: check"`` (a
success whose result ``r`` must pass ``check``). Every case runs under
:func:`run_case`:

* ``fcntl.ioctl`` is replaced by :class:`IoctlGuard`, which makes the real
  call on a copy of the argument followed by a guard pattern, after checking
  that what the kernel will honour (the request's size, ``nmsrs``/``nent``,
  the nested ``size``) fits in the caller's buffer: a kernel write past the
  buffer, or a count beyond it, counts as out-of-bounds;
* buffers a caller lends the library sit between guard regions (:func:`guarded`);
* ``/proc/self/fd`` is compared before and after, and ResourceWarnings are
  recorded: a leaked descriptor or unclosed wrapper counts as a leak;
* a timer bounds the case: a hang is an outcome, not a stuck CI job.

``risky`` cases (an out-of-bounds read, huge allocations) run only in a child
interpreter under an address-space limit. ``test_battery_in_a_fresh_interpreter``
runs the whole table again in a child with faulthandler on and requires a
normal exit: nothing may crash the interpreter. Known bugs are
``xfail(strict=True)`` with a ``BUG:`` reason; their leaks and stray writes
still count. ``test_zz_totals`` (last) checks the totals and prints them,
also without ``-s``.

``python -m tests.test_hostile [--case ID ...]`` runs the table without
pytest: one JSON line per case, then a summary line.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import errno
import fcntl
import gc
import inspect
import io
import json
import mmap
import os
import pickle
import re
import resource
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import types
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import kvmstate
from kvmstate import (
    check as checks,
)
from kvmstate import (
    cli as kcli,
)
from kvmstate import (
    describe,
    ioctls,
    records,
    snapshot,
    uapi,
    vmcb,
    vmcs12,
)
from kvmstate._struct import Mirror
from kvmstate.errors import KvmError, NestedStateUnavailableError
from kvmstate.nested import HEADER_SIZE, SVM_MAX_SIZE, NestedState, check_for_set
from kvmstate.state import StateError, VcpuState

REPO = Path(__file__).resolve().parent.parent
# Never a valid descriptor: above any RLIMIT_NOFILE, still a C int.
NEVER_FD = 0x7FFF_FFFF

# --- the out-of-bounds oracle for kernel calls --------------------------------------------

_IO = ioctls.IOCTLS
# Variable-length requests: (head bytes, bytes per element); the count is the first u32.
_FLEX = {
    _IO["KVM_GET_MSRS"]: (8, 16),
    _IO["KVM_SET_MSRS"]: (8, 16),
    _IO["KVM_SET_CPUID2"]: (8, 40),
    _IO["KVM_GET_CPUID2"]: (8, 40),
    _IO["KVM_GET_SUPPORTED_CPUID"]: (8, 40),
    _IO["KVM_GET_MSR_INDEX_LIST"]: (4, 4),
    _IO["KVM_GET_MSR_FEATURE_INDEX_LIST"]: (4, 4),
}
_GET_NESTED, _SET_NESTED = _IO["KVM_GET_NESTED_STATE"], _IO["KVM_SET_NESTED_STATE"]
_XSAVE = {_IO["KVM_GET_XSAVE2"], _IO["KVM_SET_XSAVE"]}


def _caps() -> tuple[int, int]:
    """KVM_CAP_NESTED_STATE and KVM_CAP_XSAVE2, asked with the real fcntl.ioctl."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return 0, 0
    try:
        check = _IO["KVM_CHECK_EXTENSION"]
        nested = fcntl.ioctl(fd, check, uapi.KVM_CAP_NESTED_STATE)
        return nested, fcntl.ioctl(fd, check, uapi.KVM_CAP_XSAVE2)
    finally:
        os.close(fd)


NESTED_CAP, XSAVE2_CAP = _caps()
# What the nested ioctls answer on this KVM. A fresh vCPU's GET: EINVAL where the KVM has no
# nesting (KVM_CAP_NESTED_STATE 0), the 128-byte header-only state on kvm_amd and kvm_intel.
FRESH_NESTED_GET = "ok: r.size == 128" if NESTED_CAP else "Unavailable: KVM_GET_NESTED_STATE"
# An SVM header with only GIF_SET: what svm_set_nested_state takes while EFER.SVME is clear;
# kvm_intel refuses the format.
SVM_GIF_ONLY_SET = {0: "Unavailable", SVM_MAX_SIZE: "ok"}.get(NESTED_CAP, "KvmError[EINVAL]")


def _feature_msrs() -> list[int]:
    """KVM_GET_MSR_FEATURE_INDEX_LIST: the MSRs /dev/kvm itself answers KVM_GET_MSRS for."""
    try:
        with kvmstate.Kvm() as kvm:
            return kvm.get_msr_feature_index_list()
    except OSError:
        return []


FEATURE_MSRS = _feature_msrs()


class IoctlGuard:
    """Stands in for ``fcntl.ioctl``: a bounds check, then the real call on a guarded copy.

    The copy is at least 1025 bytes, so ``fcntl.ioctl`` hands the kernel its
    address rather than a 1024-byte stack copy, and its guard covers all the
    kernel may touch: a kernel write past the caller's bytes lands in the
    guard, where it is seen, never in the test's heap. The caller's buffer
    gets the kernel's bytes back also when the call fails (E2BIG writes
    counts back).
    """

    PATTERN = b"\xa5"

    def __init__(self) -> None:
        self.real = fcntl.ioctl
        self.calls = 0
        self.violations: list[str] = []

    @staticmethod
    def extent(request: int, view: memoryview) -> int:
        """How many bytes of the argument the kernel may read or write."""
        u32 = [
            int.from_bytes(view[i : i + 4], "little") if len(view) >= i + 4 else 0 for i in (0, 4)
        ]
        if request in _FLEX:
            head, item = _FLEX[request]
            return head + u32[0] * item
        if request == _GET_NESTED:
            # SVM writes vmcb12 (KVM_CAP_NESTED_STATE bytes in all) before it checks size.
            return max(u32[1], NESTED_CAP)
        if request == _SET_NESTED:
            return u32[1]
        if request in _XSAVE:
            return max(4096, XSAVE2_CAP)
        return (request >> 16) & 0x3FFF  # _IOC_SIZE

    def __call__(self, fd: Any, request: int, arg: Any = 0, mutate: bool = True) -> Any:
        self.calls += 1
        if isinstance(arg, (int, str, bytes)) or not mutate:
            return self.real(fd, request, arg, mutate)
        view = memoryview(arg).cast("B")
        n = view.nbytes
        name = ioctls.IOCTL_NAMES.get(request, hex(request))
        need = self.extent(request, view)
        if need > n:
            self.violations.append(f"{name}: the kernel may touch {need} bytes of {n}")
        pad = max(256, 1025 - n, need - n + 256)
        copy = bytearray(view) + self.PATTERN * pad
        try:
            return self.real(fd, request, copy, True)
        finally:
            if copy[n:] != self.PATTERN * pad:
                self.violations.append(f"{name}: the kernel wrote past the {n}-byte buffer")
            if not view.readonly:
                view[:] = copy[:n]


class OutOfBounds(AssertionError):
    """The library wrote outside the region a caller lent it."""


def guarded(n: int, call: Callable[[memoryview], Any], fill: bytes = b"", offset: int = 0) -> Any:
    """``call(region)``: ``n`` bytes, 8-byte aligned (plus ``offset``), between guard regions.

    Both guards are checked afterwards; a stray write beats whatever the call raised.
    """
    pre, post, mark = 64, 4096, 0x5A
    words = (pre + offset + n + post + 7) // 8
    backing = (ctypes.c_uint64 * words)()
    raw = memoryview(backing).cast("B")
    raw[:] = bytes([mark]) * len(raw)
    start, end = pre + offset, pre + offset + n
    raw[start:end] = fill.ljust(n, b"\0")[:n]
    try:
        return call(raw[start:end])
    finally:
        if raw[:start].tobytes().strip(bytes([mark])) or raw[end:].tobytes().strip(bytes([mark])):
            raise OutOfBounds(f"a write outside the {n}-byte region")


# --- the environment -----------------------------------------------------------------------


@dataclasses.dataclass
class Env:
    """What the cases share; the KVM objects are None where /dev/kvm is unusable."""

    kvm: kvmstate.Kvm | None
    vm: kvmstate.Vm | None
    vcpu: kvmstate.Vcpu | None
    tmp: Path
    fds: dict[str, int]


def _why_no_kvm() -> str | None:
    try:
        kvmstate.Kvm().close()
    except OSError as exc:
        return f"/dev/kvm is not usable: {exc}"
    return None


NO_KVM = _why_no_kvm()


@contextlib.contextmanager
def make_env() -> Iterator[Env]:
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kvmstate-hostile-")))
        fds: dict[str, int] = {}

        def keep(kind: str, fd: int) -> None:
            fds[kind] = fd
            stack.callback(os.close, fd)

        keep("devnull", os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC))
        r, w = os.pipe()
        keep("pipe", r)  # the read end: mmap(MAP_SHARED, PROT_WRITE) gives EACCES
        stack.callback(os.close, w)
        (tmp / "file").write_bytes(bytes(16))
        keep("file", os.open(tmp / "file", os.O_RDWR | os.O_CLOEXEC))
        a, b = socket.socketpair()
        stack.callback(b.close)
        keep("socket", a.detach())
        kvm = vm = vcpu = None
        if NO_KVM is None:
            kvm = stack.enter_context(kvmstate.Kvm())
            vm = stack.enter_context(kvm.create_vm())
            vcpu = stack.enter_context(vm.create_vcpu(0))
            fds.update(kvm=kvm.fileno(), vm=vm.fileno(), vcpu=vcpu.fileno())
        write_cli_files(tmp)
        yield Env(kvm, vm, vcpu, tmp, fds)


class Fds:
    """``fd[kind]`` in case expressions: the env's descriptors, plus ``dead`` and ``never``."""

    def __init__(self, env: Env) -> None:
        self.env = env

    def __getitem__(self, kind: str) -> int:
        if kind == "dead":
            # Just closed, and nothing opens before the case uses it (one thread).
            fd = os.open(os.devnull, os.O_RDONLY)
            os.close(fd)
            return fd
        if kind == "never":
            return NEVER_FD
        return self.env.fds[kind]


# --- helpers the case expressions use ---------------------------------------------------------


def blob(fmt: int = 1, size: int = HEADER_SIZE, flags: int = 0, n: int | None = None) -> bytes:
    """A nested state whose header says ``fmt``/``size``/``flags``, ``n`` bytes long (``size``)."""
    n = size if n is None else n
    return (struct.pack("<HHI", flags, fmt, size) + bytes(max(n - 8, 0)))[:n]


def vfile(*parts: tuple[str, bytes]) -> bytes:
    """A kvmstate file holding one vCPU made of ``(tag, payload)`` records."""
    body = b"".join(records.record(tag, payload) for tag, payload in parts)
    return records.file_header() + records.record("vcpu", body)


def rec(tag: bytes, length: int, payload: bytes = b"") -> bytes:
    """A file with one raw top-level record: any tag bytes, any declared length."""
    return (
        records.file_header()
        + struct.pack("<H", len(tag))
        + tag
        + struct.pack("<Q", length)
        + payload
    )


def sdict(top: dict[str, Any] | None = None, **parts: Any) -> dict[str, Any]:
    """A from_dict input with these parts (and ``top`` keys beside them)."""
    return {"kvmstate": "1.0", "parts": parts, **(top or {})}


def ndict(**changes: Any) -> dict[str, Any]:
    """A from_dict input holding a 128-byte SVM nested state, with header keys changed."""
    state = NestedState(HEADER_SIZE)
    state.format, state.size = uapi.KVM_STATE_NESTED_FORMAT_SVM, HEADER_SIZE
    d = snapshot.to_dict(VcpuState(nested=state))
    d["parts"]["nested"].update(changes)
    return d


def hstate(**fields: int) -> NestedState:
    """A 128-byte NestedState of size 128 with the given header fields."""
    state = NestedState(HEADER_SIZE)
    state.size = HEADER_SIZE
    for name, value in fields.items():
        setattr(state, name, value)
    return state


def view_of(fmt: int, size: int) -> Callable[[memoryview], NestedState]:
    def make(region: memoryview) -> NestedState:
        state = NestedState.from_buffer(region)
        state.format, state.size = fmt, size
        return state

    return make


def fill_views(fmt: int, size: int) -> Callable[[memoryview], list[str]]:
    """Write every byte of every data view a state in the region offers; name the views."""

    def fill(region: memoryview) -> list[str]:
        state = view_of(fmt, size)(region)
        names = []
        for name in ("vmcs12", "shadow_vmcs12", "vmcb12"):
            page = getattr(state, name)
            if page is not None:
                ctypes.memset(ctypes.addressof(page), 0xFF, ctypes.sizeof(page))
                names.append(name)
        state.flags, state.vmx.vmcs12_pa = 0xFFFF, 2**64 - 1
        # Reading it all back must stay inside the region too.
        repr(state)
        list(describe.nested_state_fields(state, hidden=True))
        describe.nested_state_dict(state)
        return names

    return fill


def over(cls: Any, n: int, count: int) -> Any:
    """A flex structure with room for ``n`` elements whose count field says ``count``."""
    obj = cls.new(n)
    setattr(obj, cls._count_, count)
    return obj


def io_exit(c: kvmstate.Vcpu, size: int, count: int, offset: int) -> bytes:
    """Fake a KVM_EXIT_IO in the shared page (userspace may write it); ask for its data."""
    run = c.kvm_run
    run.exit_reason = uapi.KVM_EXIT_IO
    run.io.size, run.io.count, run.io.data_offset = size, count, offset
    return c.io_data()


def restored_msr(c: kvmstate.Vcpu, msrs: dict[int, int], index: int) -> int:
    """Restore ``msrs`` alone; whatever happens, return what MSR ``index`` holds afterwards."""
    try:
        c.restore_state(VcpuState(msrs=msrs))
    finally:
        value = c.get_msrs([index])[index]
    return value


def resize_exported() -> None:
    backing = bytearray(HEADER_SIZE)
    state = NestedState.from_buffer(backing)
    try:
        backing.extend(b"x")  # the view would dangle: refused
    finally:
        del state


def edited_vmx(fill: int = 0, svm: int | None = None) -> int:
    """Edit vmx.vmxon_pa (and svm.vmcb_pa, which overlaps it) in a header's dict form."""
    d = uapi.kvm_nested_state_header.from_bytes(bytes([fill]) * 128).to_dict()
    d["hdr"]["vmx"]["vmxon_pa"] = 0x1000
    if svm is not None:
        d["hdr"]["svm"]["vmcb_pa"] = svm
    return int(uapi.kvm_nested_state_header.from_dict(d).hdr.vmx.vmxon_pa)


def mutated(cls: Any, want: type, value: Any) -> dict[str, Any]:
    """``cls().to_dict()`` with its first leaf of type ``want`` replaced by ``value``."""
    d = cls().to_dict()

    def walk(node: Any) -> bool:
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for k, v in items:
            if type(v) is want:
                node[k] = value
                return True
            if isinstance(v, (dict, list)) and walk(v):
                return True
        return False

    assert walk(d), f"{cls.__name__} has no {want.__name__} leaf"
    return d


def has_leaf(cls: Any, want: type) -> bool:
    try:
        mutated(cls, want, None)
    except AssertionError:
        return False
    return True


def write_cli_files(tmp: Path) -> None:
    files = {
        "empty": b"",
        "short": bytes(64),
        "format9": blob(fmt=9),
        "liar": blob(fmt=1, size=SVM_MAX_SIZE, n=HEADER_SIZE),
        "trailing": blob(fmt=0, n=HEADER_SIZE + 8),
        "huge": bytes(kcli.MAX_BLOB + 1),
        "ok": blob(fmt=1, size=SVM_MAX_SIZE, flags=0x101),
        "flags": blob(fmt=0, flags=0xFFFF),
        "vcpufile": vfile(),
        "vmfile": snapshot.dumps_vm([VcpuState(), VcpuState(nested=hstate(format=1))]),
        "vcpujson": json.dumps(snapshot.to_dict(VcpuState())).encode(),
        "badjson": b'{"kvmstate": "1.0", "parts": {"regs": {"rip": -1}}}',
        "deepjson": b"{" * 100_000,
    }
    for name, data in files.items():
        (tmp / name).write_bytes(data)
    (tmp / "dir").mkdir()
    os.mkfifo(tmp / "fifo")


def cli(*argv: Any) -> tuple[int, str, str]:
    """``kvmstate.cli.main`` in-process: (status, stdout, stderr); argparse exits included."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = kcli.main([str(a) for a in argv])
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else 2
    return status, out.getvalue(), err.getvalue()


def refused(r: tuple[int, str, str], fragment: str, status: int = 2) -> bool:
    """The CLI's contract for bad input: that status, no stdout, one stderr line naming it."""
    code, out, err = r
    one_line = err.count("\n") == 1 and "Traceback" not in err
    return code == status and out == "" and one_line and fragment in err


# --- the table ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    """One hostile call (``id``, an expression) and what it must give.

    ``raises`` None means the call must succeed and ``check(r)`` hold. ``bug``
    marks a known bug (a strict xfail); ``risky`` runs only in a child
    interpreter, with at most ``memory`` more bytes of address space.
    """

    id: str
    raises: type[BaseException] | None
    match: str = ""
    errno: int | None = None
    check: str | None = None
    kvm: bool = True
    bug: str | None = None
    risky: bool = False
    memory: int = 1 << 30
    timeout: float = 10.0
    group: str = ""

    @property
    def code(self) -> types.CodeType:
        return _compiled(self.id)


_CODE: dict[str, types.CodeType] = {}


def _compiled(source: str) -> types.CodeType:
    if source not in _CODE:
        _CODE[source] = compile(source, f"<case {source}>", "eval")
    return _CODE[source]


_UNAVAILABLE = NestedStateUnavailableError if NESTED_CAP == 0 else KvmError
EXCEPTIONS: dict[str, type[BaseException]] = {
    e.__name__: e
    for e in (
        TypeError,
        ValueError,
        KeyError,
        BufferError,
        OSError,
        FileNotFoundError,
        IsADirectoryError,
        PermissionError,
        KvmError,
        StateError,
        NestedStateUnavailableError,
    )
}
EXCEPTIONS["Unavailable"] = _UNAVAILABLE  # what the nested ioctls give on this KVM
_EXPECT = re.compile(r"(?P<exc>\w+)(?:\[(?P<errno>\w+)\])?(?::\s?(?P<rest>.*))?\Z", re.S)

CASES: list[Case] = []
_SECTION = [""]


def section(name: str) -> None:
    """The entry-point group the following rows belong to (for the totals)."""
    _SECTION[0] = name


def table(rows: dict[str, str], **options: Any) -> None:
    """Add ``{expression: expectation}`` rows; ``options`` are :class:`Case` fields."""
    options.setdefault("group", _SECTION[0])
    for source, expectation in rows.items():
        m = _EXPECT.match(expectation)
        assert m, expectation
        _compiled(source)  # a typo fails at import, not at run time
        rest = m["rest"] or ""
        if m["exc"] == "ok":
            CASES.append(Case(source, None, check=rest or None, **options))
            continue
        code = getattr(errno, m["errno"]) if m["errno"] else None
        CASES.append(Case(source, EXCEPTIONS[m["exc"]], rest, code, **options))


section("int arguments")
# Bad values for an int argument (source text) and what they must raise.
BAD_INTS = {
    "'1'": "TypeError: int, not str",
    "1.0": "TypeError: int, not float",
    "None": "TypeError: int, not NoneType",
    "True": "TypeError: int, not bool",
    "b'1'": "TypeError: int, not bytes",
    "object()": "TypeError: int, not object",
    "-1": "ValueError: out of range",
    "2**31": "ValueError: out of range",
    "2**32": "ValueError: out of range",
    "2**64": "ValueError: out of range",
    "2**1000": "ValueError: out of range",
}
for _call in (
    "kvm.check_extension",
    "kvm.create_vm",
    "vm.check_extension",
    "vm.create_vcpu",
    "vm.set_tss_addr",
    "vcpu.set_tsc_khz",
):
    table({f"{_call}({v})": x for v, x in BAD_INTS.items()})

section("fd arguments")
# A descriptor: any C int >= 0 is taken, but what no fd can be must be refused.
for _ctor in (
    "Vcpu.borrow({}, nested_state_size=0).get_regs()",
    "Vcpu({}, owned=False).get_regs()",
    "Vm({}, owned=False).check_extension(0)",
):
    table(
        {
            _ctor.format("'3'"): "TypeError: must be an int, not str",
            _ctor.format("3.0"): "TypeError: must be an int, not float",
            _ctor.format("None"): "TypeError: must be an int, not NoneType",
            _ctor.format("True"): "TypeError: must be an int, not bool",
            _ctor.format("b'3'"): "TypeError: must be an int, not bytes",
            _ctor.format("-1"): "ValueError: invalid file descriptor",
        },
        kvm=False,
    )
    table(
        {_ctor.format(v): "ValueError: file descriptor" for v in ("2**31", "2**64")},
        kvm=False,
    )

section("borrow arguments")
# KVM_CAP_NESTED_STATE is 0 or 128..2**24; the buffer is never below what /dev/kvm says.
_b = "Vcpu.borrow(fd['vcpu'], nested_state_size={})"
table(
    {
        _b.format("True"): "TypeError: nested_state_size must be an int, not bool",
        _b.format("1.5"): "TypeError: nested_state_size must be an int, not float",
        _b.format("'4224'"): "TypeError: nested_state_size must be an int, not str",
        _b.format("-1"): "ValueError: nested_state_size -1 is out of range",
        _b.format("100"): "ValueError: nested_state_size 100 is out of range",
        _b.format("2**24 + 1"): "ValueError: out of range",
        _b.format("2**64"): "ValueError: out of range",
        "Vcpu(fd['vcpu'], nested_state_size=100, owned=False)": "ValueError: out of range",
        _b.format(128) + ".nested_state_size": "ok: r == max(128, NESTED_CAP)",
        f"guarded(max(NESTED_CAP, 128) - 8, {_b.format(128)}.get_nested_state)": (
            "ValueError: below the 128-byte header"
        ),
        f"guarded(max(NESTED_CAP, 128), {_b.format(128)}.get_nested_state)": (
            "Unavailable: KVM_GET_NESTED_STATE"
        ),
        "Vcpu.borrow(fd['vcpu'], vcpu_id=True)": "TypeError: vcpu_id must be an int, not bool",
        "Vcpu.borrow(fd['vcpu'], vcpu_id=-1)": "ValueError: vcpu_id -1 is out of range",
        "Vcpu.borrow(fd['vcpu'], vcpu_id=2**31)": "ValueError: vcpu_id",
        "repr(Vcpu.borrow(fd['vcpu'], vcpu_id=7))": "ok: r.endswith(' borrowed id=7>')",
        "[x := v.create_vcpu(5), repr(x), x.close()][1]": "ok: r.endswith(' id=5>')",
    }
)

section("Kvm(path)")
table(
    {
        "Kvm(None)": "TypeError: path should be",
        "Kvm(5)": "TypeError: path should be",
        "Kvm(1.5)": "TypeError: path should be",
        "Kvm('/dev/\\0kvm')": "ValueError: null",
        "Kvm('')": "FileNotFoundError[ENOENT]",
        "Kvm('/nonexistent/kvm')": "FileNotFoundError[ENOENT]",
        "Kvm('/')": "IsADirectoryError[EISDIR]",
        "Kvm('/dev/null')": "KvmError[ENOTTY]: KVM_GET_API_VERSION",
        "Kvm(b'/dev/null')": "KvmError[ENOTTY]: KVM_GET_API_VERSION",
        "Kvm('/dev/zero')": "KvmError[ENOTTY]: KVM_GET_API_VERSION",
        "Kvm(tmp / 'file')": "KvmError[ENOTTY]: KVM_GET_API_VERSION",
        "Kvm(tmp / 'fifo')": "KvmError[ENOTTY]: KVM_GET_API_VERSION",
    },
    kvm=False,
)
# Anonymous inodes (VM, vCPU) cannot be reopened through /proc.
table(
    {
        "Kvm(f'/proc/self/fd/{fd[\"vm\"]}')": "OSError[ENXIO]",
        "Kvm(f'/proc/self/fd/{fd[\"vcpu\"]}')": "OSError[ENXIO]",
    }
)

section("closed wrappers")
# Closed wrappers: every method refuses before any syscall.
for _ops, _closed, _what in [
    (
        "fileno() detach() check_extension(0) nested_state_size vcpu_mmap_size create_vm() "
        "get_supported_cpuid() get_msr_index_list() get_msr_feature_index_list() __enter__()",
        "closed_kvm()",
        "Kvm",
    ),
    (
        "fileno() check_extension(0) create_vcpu(0) set_user_memory_region(0,0,4096,0) "
        "add_memory(0x100000,4096) set_tss_addr(0x1000) create_irqchip() __enter__()",
        "closed_vm()",
        "Vm",
    ),
    (
        "fileno() detach() get_regs() set_regs(V.kvm_regs()) get_sregs() set_sregs(V.kvm_sregs()) "
        "get_sregs2() get_fpu() get_xsave() set_xsave(V.kvm_xsave()) get_xcrs() get_debugregs() "
        "get_mp_state() get_lapic() get_vcpu_events() get_msrs([16]) set_msrs({0x174:0}) "
        "get_cpuid2() set_cpuid2(V.kvm_cpuid2.new(0)) get_tsc_khz() set_tsc_khz(1000) kvm_run "
        "run() io_data() complete_io() get_nested_state() set_nested_state(blob()) save_state() "
        "restore_state(VS(regs=V.kvm_regs())) __enter__()",
        "closed_vcpu()",
        "Vcpu",
    ),
]:
    table({f"{_closed}.{op}": f"ValueError: closed {_what}" for op in _ops.split()})
table({"closed_kvm().close()": "ok: r is None", "closed_vcpu().close()": "ok: r is None"})

section("copies and pickles")
# A copy would close the descriptor a second time (maybe another file's by then): refused.
for _w in ("kvm", "vm", "vcpu", "Vcpu.borrow(fd['vcpu'])", "closed_vcpu()"):
    _name = "Vcpu" if "cpu" in _w else _w.capitalize()
    table(
        {
            f"copy.copy({_w})": f"TypeError: a {_name} cannot be copied",
            f"copy.deepcopy({_w})": f"TypeError: a {_name} cannot be copied",
            f"pickle.dumps({_w})": f"TypeError: a {_name} cannot be pickled",
            f"pickle.dumps({_w}, 0)": f"TypeError: a {_name} cannot be pickled",
        }
    )
table({"copy.deepcopy([vm, {'c': vcpu}])": "TypeError: cannot be copied"})
table(
    {"[copy.copy(VS()), pickle.loads(pickle.dumps(hstate()))][1].size": "ok: r == 128"},
    kvm=False,
)

section("foreign and dead fds")
# Descriptors of the wrong kind, dead ones and never-valid ones, passed as a vCPU.
VCPU_ERRNO = {
    "devnull": "ENOTTY",
    "pipe": "ENOTTY",
    "file": "ENOTTY",
    "socket": "ENOTTY",
    "kvm": "EINVAL",  # /dev/kvm: kvm_arch_dev_ioctl's default
    "vm": "ENOTTY",  # a vCPU ioctl on a VM fd
    "dead": "EBADF",
    "never": "EBADF",
}
MMAP_OUTCOME = {  # mapping kvm_run from each kind
    "devnull": "OSError[ENODEV]",
    "pipe": "PermissionError[EACCES]",
    "file": "ValueError: mmap length is greater than file size",
    "socket": "OSError[ENODEV]",
    "kvm": "OSError[ENODEV]",
    "vm": "OSError[ENODEV]",
    "dead": "OSError[EBADF]",
    "never": "OSError[EBADF]",
}
for _kind, _e in VCPU_ERRNO.items():
    # Borrowed without nested_state_size: the nested calls ask /dev/kvm (and must close it).
    _nested = "Unavailable" if _kind == "kvm" else "KvmError"
    _c = f"Vcpu.borrow(fd[{_kind!r}])"
    table(
        {
            f"{_c}.get_regs()": f"KvmError[{_e}]: KVM_GET_REGS",
            f"{_c}.set_regs(V.kvm_regs())": f"KvmError[{_e}]: KVM_SET_REGS",
            f"{_c}.get_sregs()": f"KvmError[{_e}]: KVM_GET_SREGS",
            f"{_c}.set_msrs({{0x174: 0}})": f"KvmError[{_e}]: KVM_SET_MSRS",
            f"{_c}.get_cpuid2()": f"KvmError[{_e}]: KVM_GET_CPUID2",
            f"{_c}.set_cpuid2(V.kvm_cpuid2.new(0))": f"KvmError[{_e}]: KVM_SET_CPUID2",
            f"{_c}.get_xsave()": f"KvmError[{_e}]: KVM_GET_XSAVE",
            f"{_c}.get_vcpu_events()": f"KvmError[{_e}]: KVM_GET_VCPU_EVENTS",
            f"{_c}.get_nested_state()": f"{_nested}[{_e}]: KVM_GET_NESTED_STATE",
            f"{_c}.set_nested_state(blob())": f"{_nested}[{_e}]: KVM_SET_NESTED_STATE",
            f"{_c}.save_state()": f"StateError[{_e}]",
            f"{_c}.kvm_run": MMAP_OUTCOME[_kind],
            # /dev/kvm answers KVM_GET_MSRS itself, for the feature MSRs it lists.
            f"{_c}.get_msrs(FEATURE_MSRS[:1])": "ok: list(r) == FEATURE_MSRS[:1]"
            if _kind == "kvm"
            else f"KvmError[{_e}]: KVM_GET_MSRS",
        }
    )
# ... passed as a VM.
for _kind, _e in {**VCPU_ERRNO, "vm": "", "vcpu": "EINVAL"}.items():
    if not _e:
        continue
    _v = f"Vm(fd[{_kind!r}], owned=False)"
    table(
        {
            f"{_v}.create_vcpu(0)": f"KvmError[{_e}]: KVM_CREATE_VCPU",
            # KVM_CHECK_EXTENSION is also a /dev/kvm ioctl: there it answers.
            f"{_v}.check_extension(0)": "ok: r == 1"
            if _kind == "kvm"
            else f"KvmError[{_e}]: KVM_CHECK_EXTENSION",
            f"{_v}.set_user_memory_region(0, 0, 4096, 0)": f"KvmError[{_e}]: USER_MEMORY_REGION",
            f"{_v}.add_memory(0x100000, 4096)": f"KvmError[{_e}]: KVM_SET_USER_MEMORY_REGION",
            f"{_v}.set_tss_addr(0x1000)": f"KvmError[{_e}]: KVM_SET_TSS_ADDR",
            f"{_v}.create_irqchip()": f"KvmError[{_e}]: KVM_CREATE_IRQCHIP",
        }
    )

section("Kvm methods")
table(
    {
        "kvm.get_supported_cpuid(-1)": "ValueError: out of range",
        "kvm.get_supported_cpuid('8')": "TypeError: needs an int",
        "kvm.get_supported_cpuid(True)": "TypeError: needs an int",
        "kvm.get_supported_cpuid(2**32)": "ValueError: out of range",
        "kvm.get_supported_cpuid(1)": "ok: len(r) > 1",  # the E2BIG retry regrows it
        "kvm.create_vm(0x7fffffff)": "KvmError[EINVAL]: KVM_CREATE_VM",
        "v.create_vcpu(0x7fffffff)": "KvmError[EINVAL]: KVM_CREATE_VCPU",
        "v.check_extension(0x7fffffff)": "ok: r == 0",  # an unknown capability is absent
    }
)
table({"kvm.get_supported_cpuid(0)": "ValueError: entries"})
table(
    {"kvm.get_supported_cpuid(10**8)": "ValueError", "vcpu.get_cpuid2(10**8)": "ValueError"},
    risky=True,
)

section("Vm methods")
# --- Vm ---
table(
    {
        "vm.set_user_memory_region('0', 0, 4096, 0)": "TypeError",
        "v.add_memory(0, 0)": "ValueError: multiples of the page size",
        "v.add_memory(0, -4096)": "ValueError: multiples of the page size",
        "v.add_memory(0, 4095)": "ValueError: multiples of the page size",
        "v.add_memory(1, 4096)": "ValueError: multiples of the page size",
        "v.add_memory(0, 4096.0)": "TypeError",
        "v.add_memory(0, None)": "TypeError",
        "v.add_memory(4096.0, 4096)": "TypeError",
        "[v.add_memory(0x100000, 4096, slot=1), v.add_memory(0x200000, 4096, slot=1)]": (
            "ValueError: slot 1 is in use (0x100000..0x101000)"
        ),
        "[v.add_memory(0x100000, 4096, slot=1), v.add_memory(0x20000, 4096)][1].__len__()": (
            "ok: r == 4096"
        ),
        "[v.add_memory(0x100000, 8192, slot=3), v.add_memory(0x101000, 4096)]": (
            "ValueError: 0x101000..0x102000 overlaps slot 3 (0x100000..0x102000)"
        ),
        "[v.add_memory(0x100000, 8192), v.set_user_memory_region(5, 0x101000, 4096, 0)]": (
            "KvmError[EEXIST]: overlaps slot 0"
        ),
        "v.add_memory(2**64 - 4096, 8192)": "ValueError: beyond 2**64",
        "[v.create_irqchip(), v.create_irqchip()]": "KvmError[EEXIST]: KVM_CREATE_IRQCHIP",
        "[v.create_vcpu(0).close(), v.create_vcpu(0)]": "KvmError[EEXIST]: KVM_CREATE_VCPU",
    }
)
table(
    {
        "v.set_user_memory_region(2**32, 0x100000, 4096, 0)": "ValueError: slot",
        "v.set_user_memory_region(0, 2**64, 4096, 0)": "ValueError: guest_phys_addr",
        "v.set_user_memory_region(0, 0, 4096, 0, flags=-1)": "ValueError: flags",
        "v.add_memory(0, 2**64)": "ValueError: size",
        "v.add_memory(2**64, 4096)": "ValueError: guest_phys_addr",
        "v.add_memory(-4096, 4096)": "ValueError: guest_phys_addr",
        "v.add_memory(0x100000, 4096, slot=2**32)": "ValueError: slot",
        "v.add_memory(0x100000, 4096, slot=True)": "TypeError: slot",
        "v.set_user_memory_region(0, 0, 4096, 2**64)": "ValueError: userspace_addr",
        "v.set_user_memory_region(0, 0, -1, 0)": "ValueError: memory_size",
        # fcntl.ioctl passes an int argument as a C int: the message says so.
        "v.set_tss_addr(0xfffbd000)": "ValueError: below 2**31",
    },
)

section("Vcpu methods")
# --- Vcpu: setters given the wrong objects ---
for _set, _cls in [
    ("set_regs", "kvm_regs"),
    ("set_sregs", "kvm_sregs"),
    ("set_sregs2", "kvm_sregs2"),
    ("set_fpu", "kvm_fpu"),
    ("set_xsave", "kvm_xsave"),
    ("set_xcrs", "kvm_xcrs"),
    ("set_debugregs", "kvm_debugregs"),
    ("set_mp_state", "kvm_mp_state"),
    ("set_lapic", "kvm_lapic_state"),
    ("set_vcpu_events", "kvm_vcpu_events"),
    ("set_cpuid2", "kvm_cpuid2"),
]:
    _other = "kvm_regs" if _cls == "kvm_debugregs" else "kvm_debugregs"
    _bad = ["None", "0", f"bytes(sizeof(V.{_cls}))", f"bytearray(sizeof(V.{_cls}))"]
    _bad += [f"V.{_cls}().to_dict()", f"V.{_other}()"]
    table({f"vcpu.{_set}({b})": "TypeError: expected" for b in _bad})

# --- Vcpu: the right types with values the library or the kernel refuses ---
table(
    {
        "vcpu.set_xcrs(V.kvm_xcrs(nr_xcrs=17))": "ValueError: above KVM_MAX_XCRS",
        "vcpu.set_xcrs(V.kvm_xcrs(nr_xcrs=2**32-1))": "ValueError: above KVM_MAX_XCRS",
        "vcpu.set_xcrs(V.kvm_xcrs(nr_xcrs=1))": "KvmError[EINVAL]: KVM_SET_XCRS",  # XCR0 = 0
        "vcpu.set_mp_state(V.kvm_mp_state(99))": "KvmError[EINVAL]: KVM_SET_MP_STATE",
        "vcpu.set_vcpu_events(V.kvm_vcpu_events(flags=2**32-1))": "KvmError[EINVAL]: VCPU_EVENTS",
        "vcpu.set_debugregs(V.kvm_debugregs(flags=1))": "KvmError[EINVAL]: KVM_SET_DEBUGREGS",
        "vcpu.set_sregs2(V.kvm_sregs2(flags=0xffff))": "KvmError[EINVAL]: KVM_SET_SREGS2",
        # No in-kernel irqchip: the kernel's bare EINVAL, with the cause named.
        "vcpu.get_lapic()": "KvmError[EINVAL]: KVM_GET_LAPIC: Invalid argument: this vCPU has no",
        "vcpu.set_lapic(V.kvm_lapic_state())": "KvmError[EINVAL]: Vm.create_irqchip() before",
        "vcpu.set_cpuid2(over(V.kvm_cpuid2, 2, 3))": "ValueError: holds 2 entries",
        "vcpu.set_cpuid2(V.kvm_cpuid2(nent=2**32-1))": "ValueError: holds 0 entries",
        "vcpu.set_cpuid2(V.kvm_cpuid2.new(300))": "KvmError[E2BIG]: KVM_SET_CPUID2",
        "vcpu.get_msrs([0xdeadbeef])": "KvmError: MSR 0xdeadbeef was refused",
        "vcpu.set_msrs({0xdeadbeef: 0})": "KvmError: MSR 0xdeadbeef was refused",
        "vcpu.get_msrs(range(300))": "KvmError[E2BIG]: KVM_GET_MSRS",
        "vcpu.get_msrs(None)": "TypeError: not iterable",
        "vcpu.get_msrs(5)": "TypeError: not iterable",
        "vcpu.get_msrs('abc')": "TypeError: MSR index must be an int, not str",
        "vcpu.get_msrs([1.0])": "TypeError: MSR index must be an int, not float",
        "vcpu.get_msrs([-1])": "ValueError: does not fit in 32 bits",
        "vcpu.get_msrs([2**32])": "ValueError: does not fit in 32 bits",
        "vcpu.get_msrs([2**1000])": "ValueError: does not fit in 32 bits",
        "vcpu.set_msrs({'a': 0})": "TypeError: MSR index must be an int, not str",
        "vcpu.set_msrs({0x174: -1})": "ValueError: does not fit in 64 bits",
        "vcpu.set_msrs({0x174: 2**64})": "ValueError: does not fit in 64 bits",
        "vcpu.set_msrs({0x174: None})": "TypeError: must be an int, not NoneType",
        "vcpu.set_msrs({0x174: 1.5})": "TypeError: must be an int, not float",
        "vcpu.get_cpuid2(-1)": "ValueError: out of range",
        "vcpu.get_cpuid2('8')": "TypeError: needs an int",
        "vcpu.get_cpuid2(2**32)": "ValueError: out of range",
        "c.io_data()": "ValueError: not KVM_EXIT_IO",
        "io_exit(c, 1, 1, 2**64 - 1)": "ValueError: outside the kvm_run mapping",
        "io_exit(c, 255, 2**32 - 1, 0)": "ValueError: outside the kvm_run mapping",
        "io_exit(c, 1, 1, 1 << 20)": "ValueError: outside the kvm_run mapping",
        "io_exit(c, 1, 1, kvm.vcpu_mmap_size - 1)": "ok: r == b'\\0'",  # the last byte: fine
        "c.complete_io()": "ok: r is None",  # no pending exit: EINTR, swallowed
    }
)
table(
    {"io_exit(Vcpu.borrow(c.fileno()), 1, 1, 4096)": "ok: r == b'\\0'"},
    # KVM puts port I/O data at KVM_PIO_PAGE_OFFSET * 4096: a borrowed vCPU asks /dev/kvm.
)
table({"vcpu.set_msrs([0x174, 0])": "TypeError: mapping"})
table({"vcpu.set_msrs(None)": "TypeError: mapping"})
table({"vcpu.get_msrs([True])": "TypeError: bool"})
table({"c.set_msrs({0x174: True})": "TypeError: bool"})

section("nested state (kernel, guarded buffers)")
# --- nested state through the kernel, with buffers a caller lends ---
table(
    {
        "vcpu.get_nested_state()": FRESH_NESTED_GET,
        "vcpu.set_nested_state(blob(fmt=1, flags=0x100))": (
            "ok: r is None" if SVM_GIF_ONLY_SET == "ok" else f"{SVM_GIF_ONLY_SET}: SET_NESTED_STATE"
        ),
        "vcpu.get_nested_state(bytes(8320))": "TypeError: read-only",
        "vcpu.get_nested_state('x' * 200)": "TypeError: buffer protocol",
        "vcpu.get_nested_state(bytearray(64))": "ValueError: below the 128-byte header",
        "vcpu.get_nested_state(bytearray(2**24 + 8))": "ValueError: above the",
        "vcpu.set_nested_state(None)": "TypeError: NestedState or bytes-like",
        "vcpu.set_nested_state('x' * 200)": "TypeError: NestedState or bytes-like",
        "vcpu.set_nested_state(memoryview(bytes(512))[::2])": "TypeError: bytes-like",
        "vcpu.set_nested_state(bytes(64))": "ValueError: shorter than the 128-byte header",
        "vcpu.set_nested_state(blob(size=100, n=128))": "ValueError: below the 128-byte header",
        "vcpu.set_nested_state(blob(size=4224, n=128))": "ValueError: larger than the 128-byte",
        "vcpu.set_nested_state(blob(size=2**32-1, n=128))": "ValueError: larger than",
        "vcpu.set_nested_state(blob(flags=0x8000))": "ValueError: unknown bits 0x8000",
        "vcpu.set_nested_state(blob(flags=2))": "ValueError: RUN_PENDING without GUEST_MODE",
        "vcpu.set_nested_state(blob(fmt=2))": "ValueError: unknown format 2",
        "vcpu.set_nested_state(blob(fmt=0xffff))": "ValueError: unknown format 65535",
        "vcpu.set_nested_state(blob(size=2**24 + 8))": "ValueError: above the",
        "guarded(max(NESTED_CAP, 128), vcpu.get_nested_state)": FRESH_NESTED_GET,
        # An AMD-sized vCPU (4224) and a caller buffer with a hostile header (overwritten).
        "guarded(4224, amd(vcpu).get_nested_state, fill=b'\\xff' * 8)": (
            "ok: r.size == 128" if NESTED_CAP else "KvmError: GET_NESTED"
        ),
        "guarded(4216, amd(vcpu).get_nested_state)": "ValueError: may write 4224",
        "amd(vcpu).get_nested_state(NS(128))": "ValueError: may write 4224",
        "guarded(8320, vcpu.get_nested_state, offset=3)": "ValueError: not 8-byte aligned",
        "guarded(8320, lambda r: vcpu.get_nested_state(r.toreadonly()))": "TypeError: read-only",
        "guarded(2 * 8320, lambda r: vcpu.get_nested_state(r[::2]))": "ValueError: C-contiguous",
        "guarded(128, lambda r: vcpu.set_nested_state(view_of(1, 4224)(r)))": (
            "ValueError: larger than the 128-byte buffer"
        ),
        "guarded(4224, lambda r: vcpu.set_nested_state(view_of(1, 4224)(r)))": (
            "Unavailable: KVM_SET_NESTED_STATE"
        ),
    }
)

section("NestedState")
# --- NestedState offline: data views never reach past the region ---
table(
    {
        "guarded(128, fill_views(0, 8320))": "ok: r == []",  # size claims pages it lacks
        "guarded(4224, fill_views(0, 8320))": "ok: r == ['vmcs12']",
        "guarded(4224, fill_views(1, 8320))": "ok: r == ['vmcb12']",
        "guarded(4232, fill_views(1, 4224))": "ok: r == ['vmcb12']",
        "guarded(8312, fill_views(0, 8320))": "ok: r == ['vmcs12']",
        "guarded(8320, fill_views(0, 2**32-1))": "ok: r == ['vmcs12', 'shadow_vmcs12']",
        "guarded(8320, fill_views(7, 8320))": "ok: r == []",  # unknown format: no views
        "guarded(4224, fill_views(1, 4224), offset=8)": "ok: r == ['vmcb12']",
    },
    kvm=False,
)
for _v, _x in {
    "None": "TypeError: must be an int, not NoneType",
    "'4224'": "TypeError: must be an int, not str",
    "4224.0": "TypeError: must be an int, not float",
    "True": "TypeError: must be an int, not bool",
    "b'x'": "TypeError: must be an int, not bytes",
    "-1": "ValueError: below the 128-byte header",
    "127": "ValueError: below the 128-byte header",
    "2**24+1": "ValueError: above the",
    "2**64": "ValueError: above the",
    "2**1000": "ValueError: above the",
}.items():
    table({f"NS({_v})": _x}, kvm=False)
for _field, _bits in (("flags", 16), ("format", 16), ("size", 32)):
    table(
        {
            f"hstate({_field}={v})": x
            for v, x in {
                "None": "TypeError: must be an int",
                "'1'": "TypeError: must be an int",
                "1.0": "TypeError: must be an int",
                "True": "TypeError: must be an int",
                "-1": f"ValueError: does not fit in {_bits} bits",
                f"2**{_bits}": f"ValueError: does not fit in {_bits} bits",
                "2**1000": f"ValueError: does not fit in {_bits} bits",
            }.items()
        },
        kvm=False,
    )
table(
    {
        "NS.from_bytes(None)": "TypeError: bytes-like",
        "NS.from_bytes('x' * 128)": "TypeError: bytes-like",
        "NS.from_bytes(128)": "TypeError: bytes-like",
        "NS.from_bytes([0] * 128)": "TypeError: bytes-like",
        "NS.from_bytes(memoryview(bytes(256))[::2])": "TypeError: bytes-like",
        "NS.from_bytes(b'')": "ValueError: truncated nested state: 0 bytes",
        "NS.from_bytes(bytes(127))": "ValueError: truncated nested state: 127 bytes",
        "NS.from_bytes(blob(size=0, n=128))": "ValueError: size field says 0 bytes",
        "NS.from_bytes(blob(size=4224, n=128))": "ValueError: size field says 4224 bytes",
        "NS.from_bytes(blob(size=128, n=4224))": "ValueError: the blob has 4224",
        "NS.from_bytes(blob(size=2**32-1, n=128))": "ValueError: size field says 4294967295",
        "NS.from_bytes(blob(fmt=2))": "ValueError: unknown nested state format 2",
        "NS.from_bytes(blob(fmt=0xffff))": "ValueError: unknown nested state format 65535",
        "NS.from_bytes(blob(size=2**24 + 8))": "ValueError: above the",
        "NS.from_bytes(blob(flags=0xffff)).to_bytes()": "ok: r == blob(flags=0xffff)",
        "NS.from_bytes(memoryview(blob(size=256)).cast('B', (16, 16))).size": "ok: r == 256",
        "NS.from_buffer(None)": "TypeError: buffer protocol",
        "NS.from_buffer('x' * 200)": "TypeError: buffer protocol",
        "NS.from_buffer(bytes(200))": "TypeError: read-only",
        "NS.from_buffer(mmap.mmap(-1, 4096, prot=mmap.PROT_READ))": "TypeError: read-only",
        "NS.from_buffer(memoryview(bytearray(200)).toreadonly())": "TypeError: read-only",
        "NS.from_buffer(bytearray(127))": "ValueError: below the 128-byte header",
        "NS.from_buffer(bytearray(2**24 + 8))": "ValueError: above the",
        "NS.from_buffer(memoryview(bytearray(512))[::2])": "ValueError: not C-contiguous",
        "NS.from_buffer(memoryview(bytearray(300))[1:201])": "ValueError: not 8-byte aligned",
        "NS.from_buffer((ctypes.c_char * 200).from_buffer(bytearray(300), 3))": (
            "ValueError: not 8-byte aligned"
        ),
        "resize_exported()": "BufferError",
        "hstate(size=0).to_bytes()": "ValueError: between 128 and the buffer",
        "hstate(size=136).to_bytes()": "ValueError: between 128 and the buffer",
        "pickle.dumps(hstate(size=2**31))": "ValueError: between 128",
        "check_for_set(hstate(size=100))": "ValueError: below the 128-byte header",
        "check_for_set(hstate(size=136))": "ValueError: larger than the 128-byte buffer",
        "check_for_set(hstate(flags=0x8000))": "ValueError: unknown bits",
        "check_for_set(hstate(flags=2))": "ValueError: RUN_PENDING without",
        "check_for_set(hstate(format=3))": "ValueError: unknown format 3",
    },
    kvm=False,
)
table(
    {
        "check_for_set(bytes(128))": "TypeError: NestedState",
        "list(describe.fields(5))": "TypeError",
        "list(describe.nested_state_fields(bytes(128)))": "TypeError",
    },
    kvm=False,
)

section("flex structures")
# --- flex structures: counts beyond what the object holds, and their constructors ---
table(
    {
        "len(over(V.kvm_cpuid2, 2, 1000))": "ok: r == 2",
        "over(V.kvm_cpuid2, 2, 1000).trimmed().capacity()": "ok: r == 2",
        "len(over(V.kvm_msrs, 1, 99).items())": "ok: r == 1",
        "repr(over(V.kvm_msr_list, 3, 2**32-1))": "ok: 'nmsrs=4294967295' in r",
        "len(V.kvm_cpuid2.from_bytes(struct.pack('<II', 9, 0)).items())": "ok: r == 0",
        "V.kvm_xsave.sized('8192')": "ValueError: is not valid",
        "V.kvm_xsave.sized(8192.0)": "ValueError: is not valid",
        "V.kvm_xsave.sized(4095)": "ValueError: is not valid",
        "V.kvm_xsave.sized(4098)": "ValueError: is not valid",
        "V.kvm_xsave.sized(2**21)": "ValueError: is not valid",
        "ioctls._IOC(0, 0xae, 0, 1 << 14)": "ValueError: does not fit in 14 bits",
        "ioctls._IOC(0, 0xae, 0, -1)": "ValueError: does not fit in 14 bits",
    },
    kvm=False,
)
for _flex in ("kvm_cpuid2", "kvm_msrs", "kvm_msr_list"):
    table(
        {
            f"V.{_flex}.new('3')": "TypeError: needs an int, not str",
            f"V.{_flex}.new(3.0)": "TypeError: needs an int, not float",
            f"V.{_flex}.new(True)": "TypeError: needs an int, not bool",
            f"V.{_flex}.new(-1)": "ValueError: out of range",
            f"V.{_flex}.new(2**32)": "ValueError: out of range",
        },
        kvm=False,
    )
    table({f"V.{_flex}.new(10**9)": "ValueError"}, kvm=False, risky=True)
    table(
        {
            f"V.{_flex}.new(2**16).capacity()": "ok: r == 65536",
            f"V.{_flex}.new(2**16 + 1)": "ValueError: out of range (0..65536)",
        },
        kvm=False,
    )

section("mirrors from_bytes/from_dict")
# --- every mirror: from_bytes and from_dict ---
MIRRORS = {
    f"{m.__name__.rsplit('.', 1)[1]}.{n}": c
    for m in (uapi, vmcb, vmcs12)
    for n, c in vars(m).items()
    if inspect.isclass(c) and issubclass(c, Mirror) and c.__module__ == m.__name__ and n[0] != "_"
}
for _name, _cls in MIRRORS.items():
    _n = ctypes.sizeof(_cls)
    _rows = {
        f"{_name}.from_bytes(bytes({_n - 1}))": f"ValueError: is {_n} bytes, got {_n - 1}",
        f"{_name}.from_bytes(bytes({_n + 1}))": f"ValueError: is {_n} bytes, got {_n + 1}",
        f"{_name}.from_bytes(None)": "TypeError",
        f"{_name}.from_bytes('x' * {_n})": "TypeError",
        f"{_name}.from_dict(None)": "TypeError: expected a mapping, not NoneType",
        f"{_name}.from_dict([])": "TypeError: expected a mapping, not list",
        f"{_name}.from_dict({{}})": "ValueError: missing",
        f"{_name}.from_dict({{**{_name}().to_dict(), 'bogus': 0}})": "ValueError: ['bogus']",
    }
    if has_leaf(_cls, int):
        for _v, _x in {
            "'0x10'": "TypeError: expected an int, not str",
            "1.0": "TypeError: expected an int, not float",
            "True": "TypeError: expected an int, not bool",
            "-1": "ValueError: does not fit",
            "2**64": "ValueError: does not fit",
            "2**1000": "ValueError: does not fit",
        }.items():
            _rows[f"{_name}.from_dict(mutated({_name}, int, {_v}))"] = _x
    if has_leaf(_cls, bytes):
        _rows[f"{_name}.from_dict(mutated({_name}, bytes, 'zz'))"] = "ValueError: not a hex string"
        _rows[f"{_name}.from_dict(mutated({_name}, bytes, b'1'))"] = "ValueError: 1 bytes"
        _rows[f"{_name}.from_dict(mutated({_name}, bytes, 5))"] = "TypeError: bytes or a hex"
    if has_leaf(_cls, list):
        _rows[f"{_name}.from_dict(mutated({_name}, list, []))"] = "ValueError: a list of"
        _rows[f"{_name}.from_dict(mutated({_name}, list, 'abc'))"] = "ValueError: a list of"
    table(_rows, kvm=False)
# Keys of mixed types: named (sorted by repr), not a TypeError about '<'.
table({"uapi.kvm_regs.from_dict({1: 0, 'bogus': 0})": "ValueError: unknown fields"}, kvm=False)
table(
    {
        "uapi.kvm_run_mmio.from_dict(uapi.kvm_run_mmio.from_bytes(b'\\xff' * 24).to_dict())": (
            "ok: r.to_bytes() == b'\\xff' * 24"
        ),
        "uapi.kvm_run_fail_entry.from_dict(uapi.kvm_run_fail_entry.from_bytes(b'\\xff' * 16)"
        ".to_dict())": "ok: r.to_bytes() == b'\\xff' * 16",
    },
    kvm=False,
)
# A union: only the members edited away from its bytes are written; they must agree.
table(
    {
        "edited_vmx()": "ok: r == 0x1000",
        "edited_vmx(fill=7)": "ok: r == 0x1000",
        "edited_vmx(svm=0x2000)": "ValueError: overlap and disagree",
    },
    kvm=False,
)

section("file format (loads/dumps)")
# --- the file format ---
table(
    {
        "S.loads_vm(None)": "TypeError: expected bytes-like data",
        "S.loads_vm('KVMSTATE')": "TypeError: expected bytes-like data",
        "S.loads_vm([0] * 12)": "TypeError: expected bytes-like data",
        "S.loads_vm(memoryview(bytes(64))[::2])": "TypeError: expected bytes-like data",
        "S.loads_vm(b'')": "ValueError: the header alone is 12",
        "S.loads_vm(b'NOTKVMST' + bytes(4))": "ValueError: not a kvmstate file",
        "S.loads_vm(S.MAGIC + struct.pack('<HH', 2, 0))": "ValueError: 2.0 is not readable",
        "S.loads_vm(S.MAGIC + struct.pack('<HH', 0xffff, 0))": "ValueError: is not readable",
        "S.loads_vm(R.file_header() + b'\\x04\\x00vc')": "ValueError: truncated record header",
        "S.loads_vm(rec(b'vcpu', 2**64 - 1))": "ValueError: says 18446744073709551615 bytes",
        "S.loads_vm(rec(b'vcpu', 1))": "ValueError: says 1 bytes, only 0 remain",
        "S.loads_vm(rec(b'', 0))": "ValueError: invalid record tag",
        "S.loads_vm(rec(b'VCPU', 0))": "ValueError: invalid record tag",
        "S.loads_vm(rec(b'a' * 65, 0))": "ValueError: invalid record tag",
        "S.loads_vm(rec('é'.encode(), 0))": "ValueError: invalid record tag",
        "S.loads_vm(rec(b'a/b', 0))": "ValueError: invalid record tag",
        "S.loads_vm(vfile(('tsc_khz', bytes(4)), ('tsc_khz', bytes(4))))": "ValueError: twice",
        "S.loads_vm(vfile(('regs', bytes(143))))": "ValueError: regs: 143 bytes, kvm_regs is",
        "S.loads_vm(vfile(('cpuid', struct.pack('<II', 2, 0) + bytes(40))))": (
            "ValueError: its count says 2 entries"
        ),
        "S.loads_vm(vfile(('cpuid', struct.pack('<II', 2**32-1, 0))))": (
            "ValueError: its count says 4294967295"
        ),
        "S.loads_vm(vfile(('cpuid', bytes(4))))": "ValueError: shorter than its 8-byte head",
        "S.loads_vm(vfile(('msrs', struct.pack('<II', 2, 0) + bytes(16) * 2)))": (
            "ValueError: an MSR index appears twice"
        ),
        "S.loads_vm(vfile(('xsave', bytes(4095))))": "ValueError: 4095 bytes is not an XSAVE",
        "S.loads_vm(vfile(('xsave', bytes(4098))))": "ValueError: 4098 bytes is not an XSAVE",
        "S.loads_vm(vfile(('xsave', bytes(2**20 + 4))))": "ValueError: is not an XSAVE area",
        "S.loads_vm(vfile(('tsc_khz', bytes(3))))": "ValueError: tsc_khz: 3 bytes, expected 4",
        "S.loads_vm(vfile(('nested', bytes(64))))": "ValueError: nested: truncated",
        "S.loads_vm(vfile(('nested', blob(size=4224, n=128))))": "ValueError: nested: the size",
        "S.loads_vm(vfile(('absent', b'{')))": "ValueError: absent: not a JSON object",
        "S.loads_vm(vfile(('absent', b'\\xff')))": "ValueError: absent: not a JSON object",
        "S.loads_vm(vfile(('absent', b'[' * 100000)))": "ValueError: absent: not a JSON",
        "S.loads_vm(vfile(('absent', b'[]')))": "ValueError: not a JSON object of strings",
        "S.loads_vm(vfile(('absent', b'{\"a\": 1}')))": "ValueError: JSON object of strings",
        "S.loads_vm(vfile(('absent', b'{\"a\": ' + b'1' * 5000 + b'}')))": "ValueError: digits",
        "S.loads_vcpu(R.file_header())": "ValueError: holds 0 vCPUs",
        "S.loads_vcpu(vfile() + R.record('vcpu', b''))": "ValueError: holds 2 vCPUs",
        "VS.from_bytes('x')": "TypeError: bytes-like",
    },
    kvm=False,
)
# dumps must refuse what it cannot write as it is, or as loads would read it.
table(
    {
        "VS(regs='x').to_bytes()": "TypeError: regs",
        "VS(nested=b'x').to_bytes()": "TypeError: nested",
        "VS(cpuid=[]).to_bytes()": "TypeError: cpuid",
        "VS(tsc_khz=2**40).to_bytes()": "ValueError: tsc_khz",
        "VS(tsc_khz=-1).to_bytes()": "ValueError: tsc_khz",
        "VS(tsc_khz=1.9).to_bytes()": "TypeError: tsc_khz",
        "VS(cpuid=over(V.kvm_cpuid2, 2, 5)).to_bytes()": "ValueError: cpuid",
        "VS(cpuid=over(V.kvm_cpuid2, 5, 2)).to_bytes()": "ValueError: cpuid",
        "VS(extra={'Bad Tag': b''}).to_bytes()": "ValueError: tag",
        "VS(extra={'a' * 70000: b''}).to_bytes()": "ValueError: tag",
        "VS(absent={'x': 5}).to_bytes()": "TypeError: absent",
        "VS().part_bytes('bogus')": "KeyError: bogus",
        "VS(xsave=V.kvm_fpu()).to_bytes()": "TypeError: xsave",
        "VS(extra={'regs': b''}).to_bytes()": "ValueError: tag",
        "VS(extra={'regs/trailing': b'x'}).to_bytes()": "ValueError: needs regs",
        "VS(extra={'x': 'ab'}).to_bytes()": "TypeError: expected bytes",
    },
    kvm=False,
)
table(
    {
        "S.loads_vcpu(VS(msrs={2**32 + 0x174: 5}).to_bytes()).msrs": "ValueError: does not fit",
        "S.loads_vcpu(VS(msrs={-1: 5}).to_bytes()).msrs": "ValueError: does not fit",
        "S.loads_vcpu(VS(msrs={0x174: 2**64 + 1}).to_bytes()).msrs": "ValueError: does not fit",
    },
    kvm=False,
)
table({"VS().differing_parts(5)": "TypeError: VcpuState"}, kvm=False)

section("dict/JSON form (from_dict)")
# --- the named dict / JSON form ---
table(
    {
        "S.from_dict(None)": "ValueError: not a kvmstate dict",
        "S.from_dict([])": "ValueError: not a kvmstate dict",
        "S.from_dict({'parts': {}})": "ValueError: not a kvmstate dict",
        "S.from_dict({'kvmstate': '', 'parts': {}})": "ValueError: not a kvmstate dict",
        "S.from_dict({'kvmstate': '2.0', 'parts': {}})": "ValueError: 2.0 is not readable",
        "S.from_dict(sdict(bogus=1))": "ValueError: bogus: unknown part",
        "S.from_dict(sdict(regs=None))": "ValueError: regs: expected a mapping",
        "S.from_dict(sdict(regs={'rax': 0}))": "ValueError: regs: unknown fields",
        "S.from_dict(sdict(cpuid=5))": "ValueError: cpuid",
        "S.from_dict(sdict(cpuid=[None]))": "ValueError: cpuid",
        "S.from_dict(sdict(msrs=[1]))": "ValueError: msrs",
        "S.from_dict(sdict(msrs={'zz': 1}))": "ValueError: msrs",
        "S.from_dict(sdict(xsave='zz'))": "ValueError: xsave",
        "S.from_dict(sdict(xsave='00' * 10))": "ValueError: xsave: 10 bytes is not an XSAVE",
        "S.from_dict(sdict(tsc_khz='fast'))": "ValueError: tsc_khz",
        "S.from_dict(sdict(tsc_khz=None))": "ValueError: tsc_khz",
        "S.from_dict(sdict(nested='x'))": "ValueError: nested",
        "S.from_dict(sdict(nested={}))": "ValueError: nested",
        "S.from_dict(sdict({'extra': {'x': 'zz'}}))": "ValueError",
        "S.from_dict(sdict({'absent': 5}))": "TypeError",
        "S.from_dict(ndict(format=7))": "ValueError: unknown nested state format 7",
        "S.from_dict(ndict(size=4224))": "ValueError: size field says 4224",
        "S.from_dict(ndict(flags='x'))": "ValueError: nested",
        "S.from_dict(ndict(svm={'vmcb_pa': 0}))": "ValueError: nested",
        "S.from_dict(ndict(data_raw='0'))": "ValueError: nested",
    },
    kvm=False,
)
# from_dict must refuse what gives a VcpuState unlike the dict, or one dumps cannot write.
table(
    {
        "S.from_dict({'kvmstate': '1.0', 'parts': []})": "ValueError",
        "S.from_dict({'kvmstate': '1.0', 'parts': None})": "ValueError",
        "S.from_dict(sdict({'extra': [1]}))": "ValueError: extra",
        "S.from_dict(sdict(msrs={'0x174': 1.9}))": "ValueError: msrs",
        "S.from_dict(sdict(msrs={'0x174': 2**64+5}))": "ValueError: msrs",
        "S.from_dict(sdict(msrs={'-0x10': 1}))": "ValueError: msrs",
        "S.from_dict(sdict(tsc_khz=1.9))": "ValueError: tsc_khz",
        "S.from_dict(sdict(tsc_khz=2**40))": "ValueError: tsc_khz",
        "S.from_dict(sdict({'extra': {'Bad Tag': '00'}}))": "ValueError",
        "S.from_dict(sdict({'absent': {'x': 5}}))": "ValueError: absent",
        "S.from_dict(sdict(cpuid=''))": "ValueError: cpuid",
        "S.from_dict(sdict(cpuid={}))": "ValueError: cpuid",
        "S.from_dict(sdict(cpuid={'padding': 0, 'entries': []}))": "ValueError: plain list",
        "S.from_dict(sdict(cpuid={'padding': 2**32, 'entries': []}))": "ValueError: padding",
        "S.from_dict(sdict(cpuid={'padding': 1, 'entries': {}}))": "ValueError: cpuid",
        "S.from_dict(sdict(msrs={'0X174': 1}))": "ValueError: msrs",
        "S.from_dict(sdict(msrs={'0x174': True}))": "ValueError: msrs",
        "S.from_dict(sdict({'extra': {'regs/trailing': '00'}}))": "ValueError: needs regs",
        "S.from_dict(sdict({'extra': {'x': 5}}))": "ValueError: extra",
    },
    kvm=False,
)
table(
    {
        "S.from_dict(S.to_dict(S.loads_vcpu(vfile(('cpuid', struct.pack('<II', 0, 1)))))).cpuid"
        ".padding": "ok: r == 1",
    },
    kvm=False,
)
# The nested header: exactly 120 bytes of hdr_raw, and u16/u16/u32 ints (never wrapped).
table(
    {
        "S.from_dict(ndict(hdr_raw='')).nested.to_bytes()": "ValueError: hdr_raw",
        "S.from_dict(ndict(flags=0x10001))": "ValueError: flags",
        "S.from_dict(ndict(flags=True))": "ValueError: flags",
        "S.from_dict(ndict(format=-1))": "ValueError: format",
        "S.from_dict(ndict(size=2**32+128))": "ValueError: size",
        "S.from_dict(ndict(hdr_raw='00' * 121))": "ValueError: hdr_raw",
    },
    kvm=False,
)
# A heap bytes object: a read of 120 bytes would run 112 past it, so in a child interpreter.
table({"S.from_dict(ndict(hdr_raw='01' * 8))": "ValueError: hdr_raw"}, kvm=False, risky=True)

section("restore_state")
# --- whole-vCPU restore with bad states (each on a fresh vCPU) ---
table(
    {
        "c.restore_state(VS(regs=V.kvm_sregs()))": "TypeError: regs: expected kvm_regs",
        "c.restore_state(VS(regs=bytes(144)))": "TypeError: regs: expected kvm_regs",
        "c.restore_state(VS(sregs={}))": "TypeError: sregs: expected kvm_sregs",
        "c.restore_state(VS(xsave=V.kvm_fpu()))": "TypeError: xsave: expected kvm_xsave",
        "c.restore_state(VS(cpuid=5))": "TypeError: expected a kvm_cpuid2",
        "c.restore_state(VS(cpuid=over(V.kvm_cpuid2, 2, 3)))": "ValueError: holds 2 entries",
        "c.restore_state(VS(msrs={'a': 1}))": "TypeError",
        "c.restore_state(VS(msrs=[1, 2]))": "TypeError",
        "c.restore_state(VS(tsc_khz='fast'))": "TypeError: expected an int",
        "c.restore_state(VS(tsc_khz=-1))": "ValueError: out of range",
        "c.restore_state(VS(nested=bytes(10)))": "ValueError: shorter than the 128-byte",
        "c.restore_state(VS(nested=NS.from_bytes(blob(flags=0x8000))))": "ValueError: unknown bits",
        "c.restore_state(VS(mp_state=V.kvm_mp_state(99)))": "StateError[EINVAL]: mp_state",
        "Vcpu.borrow(c.fileno()).save_state()": "ValueError: saving MSRs needs the Kvm",
    }
)
table(
    {
        "c.restore_state(VS(nested=NS.from_bytes(blob(flags=0x100))))": (
            "ok: r is None" if SVM_GIF_ONLY_SET == "ok" else "StateError: nested"
        )
    }
)
table({"vcpu.restore_state(None)": "TypeError: VcpuState"})
table({"vcpu.restore_state({})": "TypeError: VcpuState"})
table(
    {
        # Refused before any write: ctypes would wrap it, and SYSENTER_CS (0x174) get 0x10.
        "restored_msr(c, {2**32 + 0x174: 0x10}, 0x174)": "ValueError: does not fit in 32 bits",
        "c.restore_state(VS(msrs={0x174: 2**64}))": "ValueError: does not fit in 64 bits",
    },
)

section("command line")
# --- the command line ---
for _file, _why in {
    "empty": "truncated nested state: 0 bytes",
    "short": "truncated nested state: 64 bytes",
    "format9": "unknown nested state format 9",
    "liar": "size field says 4224 bytes but the blob has 128",
    "trailing": "the blob has 136",
    "huge": "larger than 1048576 bytes",
    "badjson": "kvmstate JSON: regs: ",
    "deepjson": "starts like JSON but is not JSON",
    "dir": "Is a directory",
    # Refused before a read that would block (nobody writes the FIFO).
    "fifo": "Is a FIFO, not a regular file",
    "missing": "No such file",
}.items():
    table(
        {
            f"cli('decode', tmp / {_file!r})": f"ok: refused(r, {_why!r})",
            f"cli('decode', '--json', tmp / {_file!r})": f"ok: refused(r, {_why!r})",
        },
        kvm=False,
    )
table(
    {
        "cli('decode', '/dev/zero')": "ok: refused(r, 'Is a character device')",
        "cli('decode', '/dev/null')": "ok: refused(r, 'Is a character device')",
        "cli('check', tmp / 'fifo')": "ok: refused(r, 'Is a FIFO')",
        "cli('diff', tmp / 'ok', tmp / 'fifo')": "ok: refused(r, 'Is a FIFO')",
        # The library's own file: its nested part, or why it has none.
        "cli('decode', tmp / 'vcpufile')": "ok: r[0] == 0 and 'vcpu 0: no nested state' in r[1]",
        "cli('check', tmp / 'vcpufile')": "ok: r[0] == 0 and 'no nested state to check' in r[1]",
        "cli('diff', tmp / 'vcpufile', tmp / 'vcpujson')": "ok: r == (0, 'equal\\n', '')",
        "cli('diff', tmp / 'vmfile', tmp / 'vcpufile')": "ok: r[0] == 1 and 'vcpus: 2' in r[1]",
        "cli('decode', '--vcpu', '1', tmp / 'vmfile')": "ok: r[0] == 0 and 'format=SVM' in r[1]",
        "cli('decode', '--vcpu', '2', tmp / 'vmfile')": "ok: refused(r, 'no vcpu 2')",
        "cli('decode', '--vcpu', 'x', tmp / 'vmfile')": "ok: r[0] == 2 and 'usage:' in r[2]",
        "cli('decode', '--vcpu', '0', tmp / 'ok')": "ok: refused(r, 'is a nested-state blob')",
        "cli('diff', tmp / 'ok', tmp / 'vmfile')": "ok: refused(r, 'choose one with --vcpu')",
        "cli('decode', '--json', '--all', tmp / 'flags')": (
            "ok: 'hdr.vmx.pad' in json.loads(r[1])['fields']"
        ),
        "cli('decode', os.fsdecode(b'/nonexistent/\\xff.bin'))": "ok: refused(r, 'No such file')",
        "cli('decode', '--all', tmp / 'flags')": "ok: r[0] == 0 and '0xfef0' in r[1]",
        "cli('decode', '--json', tmp / 'ok')": "ok: json.loads(r[1])['fields']['size'] == 4224",
        # Out-of-range facts are bad arguments, not negative registers.
        "cli('check', tmp / 'ok', '--fact', 'efer=-1')": "ok: refused(r, 'fact efer is -1')",
        "cli('check', tmp / 'ok', '--fact', 'cr3=-1')": "ok: refused(r, 'fact cr3 is -1')",
        "cli('check', tmp / 'ok', '--fact', 'nested_state_cap=-5')": (
            "ok: refused(r, 'fact nested_state_cap is -5')"
        ),
        "cli('check', tmp / 'ok', '--fact', 'efer=0x10000000000000000')": (
            "ok: refused(r, 'fact efer is 0x10000000000000000')"
        ),
        "cli()": "ok: r[0] == 2 and 'usage:' in r[2]",
        "cli('bogus')": "ok: r[0] == 2 and 'usage:' in r[2]",
        "cli('decode')": "ok: r[0] == 2 and 'usage:' in r[2]",
        "cli('decode', 'a', 'b')": "ok: r[0] == 2 and 'usage:' in r[2]",
        "cli('info', '--json', '--device', '/dev/null')": "ok: r[0] == 1 and 'Errno 25' in r[1]",
        "cli('info', '--json', '--device', '/')": "ok: r[0] == 1 and 'Errno 21' in r[1]",
        "cli('info', '--json', '--device', '/nonexistent')": "ok: r[0] == 1 and 'Errno 2' in r[1]",
        "cli('info', '--json', '--device', '')": "ok: r[0] == 1 and 'Errno 2' in r[1]",
    },
    kvm=False,
)
table(
    {
        "cli('decode', 'a\\0b')": "ok: refused(r, 'null')",
        "cli('info', '--device', 'a\\0b')": "ok: r[0] == 1",
    },
    kvm=False,
)


section("describe")
table(
    {
        "describe.nested_state_dict(hstate(format=0), hidden=True)['fields']": (
            "ok: 'hdr.vmx.pad' in r and 'hdr.vmx.flags' in r"
        ),
        "describe.nested_state_dict(hstate(format=0))['fields']": "ok: 'hdr.vmx.pad' not in r",
        "describe.nested_state_dict(b'x' * 128, hidden=True)": "TypeError: expected a NestedState",
    },
    kvm=False,
)

section("check.Facts")
table(
    {
        "C.Facts(efer=-1)": "ValueError: fact efer is -1, outside 0..0xffffffffffffffff",
        "C.Facts(cr3=-1)": "ValueError: fact cr3 is -1",
        "C.Facts(cr0=2**64)": "ValueError: fact cr0 is 0x10000000000000000",
        "C.Facts(nested_state_cap=-5)": "ValueError: fact nested_state_cap is -5",
        "C.Facts(efer=True)": "TypeError: fact efer must be int",
        "C.Facts(efer=1.0)": "TypeError: fact efer must be int",
        "C.Facts(vmx_msrs={0x480: -1})": "ValueError: fact vmx_msrs[0x480] is -1",
        "C.Facts(vmx_msrs=5)": "TypeError: vmx_msrs must be a mapping",
        "C.Facts(kernel_version='6.1')": "ok: r.kernel_version == (6, 1)",
        "C.Facts(kernel_version='latest')": "ValueError: not a kernel release",
        "C.Facts(kernel_version=6)": "TypeError: tuple of ints",
        "C.Facts(cpu_features='svm')": "ok: r.cpu_features == {'svm'}",
        "C.Facts(cpu_features=b'svm')": "TypeError: a feature name must be a str",
        "C.Facts(cpu_features=None).cpu_features": "ok: r is None",
        "C.Facts(vendor=b'svm')": "TypeError: vendor must be a str",
        "C.Facts.from_strings({'efer': '-1'})": "ValueError: fact efer is -1",
        "C.Facts.from_strings({'maxphyaddr': '65'})": "ValueError: outside 0..64",
        "C.Facts.from_state(None)": "TypeError: needs a VcpuState",
        "C.Facts.from_state(VS())": "ok: r == C.Facts()",
        "C.explain(hstate(format=1), {})": "TypeError: needs facts as a Facts or None, not dict",
        "C.check(hstate(format=1), {'vendor': 'svm'})": "TypeError: needs facts as a Facts",
        "C.check(hstate(format=1), 'svm')": "TypeError: needs facts as a Facts or None, not str",
    },
    kvm=False,
)


# --- running a case ---------------------------------------------------------------------------


def _names(code: types.CodeType) -> set[str]:
    """Every global name an expression (and the lambdas in it) uses."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


BASE_SCOPE: dict[str, Any] = {
    "V": uapi,
    "uapi": uapi,
    "vmcb": vmcb,
    "vmcs12": vmcs12,
    "S": snapshot,
    "R": records,
    "C": checks,
    "NS": NestedState,
    "VS": VcpuState,
    "Kvm": kvmstate.Kvm,
    "Vm": kvmstate.Vm,
    "Vcpu": kvmstate.Vcpu,
    "ctypes": ctypes,
    "mmap": mmap,
    "struct": struct,
    "pickle": pickle,
    "copy": copy,
    "json": json,
    "os": os,
    "ioctls": ioctls,
    "describe": describe,
    "sizeof": ctypes.sizeof,
    "check_for_set": check_for_set,
    "NESTED_CAP": NESTED_CAP,
    "FEATURE_MSRS": FEATURE_MSRS,
    **{
        f.__name__: f
        for f in (
            *(blob, vfile, rec, sdict, ndict, hstate, view_of, fill_views, over, io_exit),
            *(restored_msr, resize_exported, edited_vmx, mutated, guarded, refused, cli),
        )
    },
}


@contextlib.contextmanager
def scope(c: Case, env: Env) -> Iterator[dict[str, Any]]:
    """The names a case expression sees; ``v``/``c`` are a fresh VM/vCPU, made only if used."""
    ns = dict(BASE_SCOPE)
    ns.update(e=env, kvm=env.kvm, vm=env.vm, vcpu=env.vcpu, tmp=env.tmp, fd=Fds(env))
    ns["amd"] = lambda vcpu: kvmstate.Vcpu.borrow(vcpu.fileno(), nested_state_size=SVM_MAX_SIZE)

    def closed(make: Callable[[], Any]) -> Callable[[], Any]:
        def made() -> Any:
            obj = make()
            obj.close()
            return obj

        return made

    assert env.kvm is not None or not c.kvm
    kvm = env.kvm
    with contextlib.ExitStack() as stack:
        used = _names(c.code)
        if kvm is not None and used & {"v", "c"}:
            vm = stack.enter_context(kvm.create_vm())
            ns["v"] = vm
            if "c" in used:
                ns["c"] = stack.enter_context(vm.create_vcpu(0))
        ns["closed_kvm"] = closed(kvmstate.Kvm)
        if kvm is not None:
            ns["closed_vm"] = closed(kvm.create_vm)

            def closed_vcpu() -> kvmstate.Vcpu:
                with kvm.create_vm() as vm:
                    vcpu = vm.create_vcpu(0)
                    vcpu.close()
                return vcpu

            ns["closed_vcpu"] = closed_vcpu
        yield ns


class CaseTimeout(Exception):
    """The case ran past its time limit (a hang)."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def expire(signum: int, frame: Any) -> None:
        raise CaseTimeout(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def address_space_limit(extra: int) -> Iterator[None]:
    """At most ``extra`` more bytes of address space: a huge allocation fails, not the host."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        used = int(f.read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (used + extra, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def open_fds() -> set[int]:
    """This process's descriptors (less the one listdir used, closed by now)."""
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            os.fstat(int(name))
            fds.add(int(name))
    return fds


@dataclasses.dataclass
class Outcome:
    id: str
    exc: str | None = None
    message: str = ""
    errno: int | None = None
    result: str = ""
    leaked: list[int] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    oob: list[str] = dataclasses.field(default_factory=list)
    ioctls: int = 0
    timed_out: bool = False
    skipped: str | None = None
    verdict: str | None = None  # None: as specified; else how it differs


def judge(c: Case, exc: BaseException | None, result: Any) -> str | None:
    """None when the case behaved as specified, else how it did not."""
    if c.raises is None:
        if exc is not None:
            return f"raised {type(exc).__name__}: {exc}"
        if c.check and not eval(c.check, {**BASE_SCOPE, "r": result}):
            return f"the result failed `{c.check}`: {result!r:.200}"
        return None
    if exc is None:
        return f"returned {result!r:.200} instead of raising {c.raises.__name__}"
    if not isinstance(exc, c.raises):
        return f"raised {type(exc).__name__}: {exc} (expected {c.raises.__name__})"
    if c.match not in str(exc):
        return f"the message {str(exc)!r} lacks {c.match!r}"
    if c.errno is not None and getattr(exc, "errno", None) != c.errno:
        return f"errno {getattr(exc, 'errno', None)} instead of {c.errno}"
    return None


def run_case(c: Case, env: Env) -> Outcome:
    """One case under the ioctl guard, the fd and warning checks, and the time limit."""
    out = Outcome(c.id)
    if c.kvm and env.kvm is None:
        out.skipped = NO_KVM
        return out
    guard = IoctlGuard()
    before = open_fds()
    exc: BaseException | None = None
    result: Any = None
    limit = address_space_limit(c.memory) if c.risky else contextlib.nullcontext()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fcntl.ioctl = guard  # type: ignore[assignment]
        try:
            with time_limit(c.timeout), limit, scope(c, env) as ns:
                result = eval(c.code, ns)
        except Exception as e:
            exc = e
        finally:
            fcntl.ioctl = guard.real
        out.verdict = judge(c, exc, result)
        out.result = repr(result)[:200] if exc is None else ""
        out.timed_out = isinstance(exc, CaseTimeout)
        if exc is not None:
            out.exc, out.message = type(exc).__name__, str(exc)[:300]
            out.errno = getattr(exc, "errno", None)
        stray = [str(exc)] if isinstance(exc, OutOfBounds) else []
        # Drop what the case made: refcounting closes what it can now. Only when a
        # descriptor is still open, a full collection (slow) looks for cycles.
        exc = result = ns = None
        if open_fds() != before:
            gc.collect()
    out.leaked = sorted(open_fds() - before)
    out.warnings = [f"{w.category.__name__}: {w.message}" for w in caught]
    out.warnings = [w for w in out.warnings if w.startswith("ResourceWarning")]
    out.oob = guard.violations + stray
    out.ioctls = guard.calls
    return out


# --- pytest -------------------------------------------------------------------------------------

TOTALS: dict[str, Any] = dict.fromkeys(
    ("tried", "as_specified", "known_bugs", "skipped", "leaks", "oob", "hangs", "ioctls"), 0
)
TOTALS.update(children=0, crashes=None, problems=[])


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    with make_env() as e:
        yield e


def _child(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-X", "faulthandler", "-m", "tests.test_hostile", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def _outcome_in_child(c: Case) -> Outcome:
    proc = _child(["--case", c.id], timeout=120)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines or lines[0].get("id") != c.id:
        died = f"the child died (status {proc.returncode}): {proc.stderr[-2000:]}"
        return Outcome(c.id, exc="crash", verdict=died)
    return Outcome(**lines[0])


def _param(c: Case) -> Any:
    marks = [pytest.mark.xfail(strict=True, reason=f"BUG: {c.bug}")] if c.bug else []
    return pytest.param(c, id=c.id, marks=marks)


@pytest.mark.parametrize("c", [_param(c) for c in CASES])
def test_case(c: Case, env: Env) -> None:
    if c.risky:
        TOTALS["children"] += 1
        out = _outcome_in_child(c)
    else:
        out = run_case(c, env)
    if out.skipped:
        TOTALS["skipped"] += 1
        pytest.skip(out.skipped)
    TOTALS["tried"] += 1
    TOTALS["ioctls"] += out.ioctls
    # Counted before the verdict: an xfail must not hide a leak or a stray write.
    problems = [f"leaked fds {out.leaked}"] * bool(out.leaked) + out.warnings + out.oob
    TOTALS["leaks"] += len(out.leaked) + len(out.warnings)
    TOTALS["oob"] += len(out.oob)
    TOTALS["hangs"] += out.timed_out
    if out.exc == "crash":
        TOTALS["crashes"] = (TOTALS["crashes"] or 0) + 1
    if problems:
        TOTALS["problems"].append(f"{c.id}: {problems}")
    if out.verdict is None:
        TOTALS["as_specified"] += 1
    elif c.bug:
        TOTALS["known_bugs"] += 1
    assert not problems, problems
    assert out.verdict is None, out.verdict


@pytest.mark.skipif(NO_KVM is not None, reason=str(NO_KVM))
def test_battery_in_a_fresh_interpreter() -> None:
    """Every case again, risky ones included, in a child that must exit normally."""
    proc = _child([], timeout=300)
    assert proc.returncode == 0, f"the battery crashed the interpreter:\n{proc.stderr[-4000:]}"
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    outcomes = {o["id"]: o for o in lines[:-1]}
    assert set(outcomes) == {c.id for c in CASES}
    for c in CASES:
        o = outcomes[c.id]
        assert not o["leaked"] and not o["warnings"] and not o["oob"], (c.id, o)
        assert c.bug or o["verdict"] is None, (c.id, o["verdict"])
    assert lines[-1]["tried"] == len(CASES)
    TOTALS["crashes"] = TOTALS["crashes"] or 0


def test_the_oracles_catch_what_they_should(env: Env) -> None:
    """Each detector fires on a planted fault: a leak, an unclosed wrapper, a hang,
    a stray write, a count beyond the buffer, a kernel write past it, a crash."""
    fd_leak = run_case(Case("os.open(os.devnull, os.O_RDONLY)", None, kvm=False), env)
    assert fd_leak.leaked
    for fd in fd_leak.leaked:
        os.close(fd)
    if env.kvm is not None:
        unclosed = run_case(Case("Kvm()", None), env)  # dropped unclosed: __del__ warns
        assert unclosed.warnings and not unclosed.leaked
    hang = run_case(Case("[0 for _ in iter(int, 1)]", None, kvm=False, timeout=0.2), env)
    assert hang.timed_out
    stray = run_case(
        Case("guarded(8, lambda r: r.obj.__setitem__(slice(60, 80), b'x' * 20))", None, kvm=False),
        env,
    )
    assert stray.oob and stray.exc == "OutOfBounds"
    if env.kvm is not None:
        with env.kvm.create_vm() as vm, vm.create_vcpu(0) as vcpu:
            vcpu.set_cpuid2(env.kvm.get_supported_cpuid())
            small = over(uapi.kvm_cpuid2, 1, 100)  # the kernel will write all its entries
            guard = IoctlGuard()
            guard(vcpu.fileno(), _IO["KVM_GET_CPUID2"], small)
            assert any("may touch" in v for v in guard.violations)
            assert any("wrote past" in v for v in guard.violations)
    proc = _child(["--expr", "ctypes.string_at(0)"], timeout=60)
    assert proc.returncode < 0 and "case: ctypes.string_at(0)" in proc.stderr


def test_the_table_is_sound() -> None:
    """Unique ids, and a bug reason that says what is wrong (the lead fixes by it)."""
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), "case ids must be unique"
    assert all(len(c.bug) > 30 for c in CASES if c.bug)


def test_zz_totals(capsys: pytest.CaptureFixture[str]) -> None:
    """The battery's totals: every case tried; no crash, leak, stray write or unknown hang."""
    ran = TOTALS["tried"] + TOTALS["skipped"]
    if ran < len(CASES):
        pytest.skip(f"only {ran} of {len(CASES)} cases ran (a -k selection?): no totals")
    marked = sum(1 for c in CASES if c.bug)
    line = (
        f"hostile battery: {len(CASES)} cases, {TOTALS['tried']} tried "
        f"({TOTALS['children']} in child interpreters), {TOTALS['skipped']} skipped; "
        f"{TOTALS['as_specified']} as specified, {TOTALS['known_bugs']} known-bug xfails "
        f"({marked} marked); crashes {TOTALS['crashes']}, fd leaks {TOTALS['leaks']}, "
        f"out-of-bounds {TOTALS['oob']}, hangs {TOTALS['hangs']} (known bugs); "
        f"{TOTALS['ioctls']} ioctls guarded"
    )
    groups: dict[str, int] = {}
    for c in CASES:
        groups[c.group] = groups.get(c.group, 0) + 1
    by_group = ", ".join(f"{g} {n}" for g, n in groups.items())
    with capsys.disabled():
        print(f"\n{line}\n  by entry point: {by_group}")
    assert TOTALS["leaks"] == 0 and TOTALS["oob"] == 0, TOTALS["problems"]
    assert not TOTALS["crashes"], "a child interpreter crashed"
    assert TOTALS["as_specified"] + TOTALS["known_bugs"] == TOTALS["tried"]
    assert TOTALS["hangs"] <= sum(1 for c in CASES if c.bug and c.timeout < 10)


# --- without pytest -----------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    """``--case ID`` (repeatable) runs those cases, ``--expr SOURCE`` an ad-hoc one; else all."""
    wanted = {argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--case"}
    adhoc = [Case(argv[i + 1], None) for i, a in enumerate(argv[:-1]) if a == "--expr"]
    chosen = adhoc or [c for c in CASES if not wanted or c.id in wanted]
    summary = dict.fromkeys(("tried", "as_specified", "leaks", "oob", "hangs"), 0)
    with make_env() as e:
        for c in chosen:
            # The id first, on stderr: after a crash, faulthandler's dump follows it.
            print(f"case: {c.id}", file=sys.stderr, flush=True)
            out = run_case(c, e)
            print(json.dumps(dataclasses.asdict(out)), flush=True)
            summary["tried"] += out.skipped is None
            summary["as_specified"] += out.verdict is None and out.skipped is None
            summary["leaks"] += len(out.leaked) + len(out.warnings)
            summary["oob"] += len(out.oob)
            summary["hangs"] += out.timed_out
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
