"""The ``kvmstate`` command (also ``python -m kvmstate``).

Commands: ``info`` (what this machine's KVM offers for nested state),
``decode FILE`` (a saved nested-state blob by field names), ``check FILE``
(which rules of KVM_SET_NESTED_STATE it breaks) and ``diff A B``.

The exit status is the command's, whatever happens to its output: a reader
that closes the pipe early (``| head -1``) ends the output quietly, a write
that fails otherwise (a full disk) is an error. Bad input is one
``kvmstate: error: ...`` line and exit status 2, Ctrl-C exits 130, never a
traceback. Only regular files are read (a FIFO would block). File names
are shown on one line, undecodable bytes as ``\\xNN``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import stat
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

from kvmstate import __version__, describe, uapi
from kvmstate import check as checks
from kvmstate import diff as diffs
from kvmstate.errors import NestedStateUnavailableError
from kvmstate.nested import HEADER_SIZE, NestedState
from kvmstate.system import Kvm

__all__ = ["main"]

#: Largest file ``decode`` reads: far above any nested state (8320 bytes today).
MAX_BLOB = 1 << 20
#: Exit status after Ctrl-C (128 + SIGINT, as shells report it).
INTERRUPTED = 130

_NESTED_PARAMS = {
    "kvm_intel": "/sys/module/kvm_intel/parameters/nested",
    "kvm_amd": "/sys/module/kvm_amd/parameters/nested",
}


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


# --- output that never raises -------------------------------------------------------------


class _Output:
    """Writes to stdout and stderr that never raise, so that the status stays the command's.

    A closed pipe (EPIPE) sends the rest of that stream to /dev/null, quietly,
    as the reader asked; any other write error does too, and is remembered
    for :func:`main` to report.
    """

    def __init__(self) -> None:
        self.failure: str | None = None

    def write(self, text: str, *, err: bool = False) -> None:
        stream = sys.stderr if err else sys.stdout
        if stream is None:  # started with that descriptor closed
            return
        try:
            stream.write(text)
        except (OSError, ValueError) as exc:  # ValueError: the stream was closed
            self._failed(stream, exc, err)

    def flush(self) -> None:
        for stream, err in ((sys.stdout, False), (sys.stderr, True)):
            if stream is not None:
                try:
                    stream.flush()
                except (OSError, ValueError) as exc:
                    self._failed(stream, exc, err)

    def _failed(self, stream: TextIO, exc: Exception, err: bool) -> None:
        _discard(stream)
        if not isinstance(exc, BrokenPipeError) and not err and self.failure is None:
            self.failure = getattr(exc, "strerror", None) or str(exc)


_OUT = _Output()


def _discard(stream: TextIO) -> None:
    """Point the stream's descriptor at /dev/null: what is still buffered goes nowhere.

    Python flushes stdout at exit; into a closed pipe that would print
    "Exception ignored" and change the status, into a full one it would block.
    """
    try:
        fd = stream.fileno()
    except (OSError, ValueError):  # not a real file (a StringIO), or closed
        return
    devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def _print(*lines: str) -> None:
    _OUT.write("".join(f"{line}\n" for line in lines))


def _error(message: str) -> None:
    _OUT.write(f"kvmstate: error: {_shown(message)}\n", err=True)


def _shown(text: str) -> str:
    """``text`` on one printable line, with escapes.

    A byte the file system name could not decode (``surrogateescape``) is
    shown as ``\\xNN``; newlines and other control characters as Python
    writes them (``\\n``, ``\\x1b``), so a file name can neither break the
    one-line error rule nor send terminal escapes.
    """
    out = []
    for ch in text:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(ascii(ch)[1:-1])
    return "".join(out)


def _escaping_streams() -> Callable[[], None]:
    """Make stdout and stderr escape what their encoding lacks (``PYTHONIOENCODING=ascii``).

    Returns a function that restores their error handlers.
    """
    undo: list[tuple[Callable[..., None], str]] = []
    for stream in (sys.stdout, sys.stderr):
        errors = getattr(stream, "errors", None)
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is None or not isinstance(errors, str) or errors == "backslashreplace":
            continue
        try:
            reconfigure(errors="backslashreplace")  # flushes first
        except (OSError, ValueError):
            continue
        undo.append((reconfigure, errors))

    def restore() -> None:
        for reconfigure, errors in undo:
            with contextlib.suppress(OSError, ValueError):
                reconfigure(errors=errors)

    return restore


def _cpu_vendor() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _read_param(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def info(path: str = "/dev/kvm") -> dict[str, Any]:
    """What ``kvmstate info`` reports, as a dict.

    >>> info()["nested_state_size"]  # on AMD with nested=1
    4224
    """
    out: dict[str, Any] = {"device": path, "cpu_vendor": _cpu_vendor()}
    out["nested_parameter"] = {mod: _read_param(p) for mod, p in _NESTED_PARAMS.items()}
    try:
        kvm = Kvm(path)
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
        out["available"] = False
        out["error"] = str(exc)
        return out
    with kvm:
        out["available"] = True
        out["api_version"] = kvm.api_version
        size = kvm.nested_state_size
        out["nested_state_size"] = size
        out["nested_format"] = {8320: "VMX", 4224: "SVM"}.get(size)
        if size == 0:
            out["missing"] = NestedStateUnavailableError.HINT
    return out


def _print_info(data: dict[str, Any]) -> None:
    _print(f"device:               {_shown(data['device'])}")
    if not data["available"]:
        _print(f"  not usable: {_shown(data['error'])}")
    else:
        _print(f"KVM API version:      {data['api_version']}")
        size = data["nested_state_size"]
        fmt = f" ({data['nested_format']} format)" if data.get("nested_format") else ""
        _print(f"KVM_CAP_NESTED_STATE: {size}{fmt}")
    _print(f"CPU vendor:           {data['cpu_vendor'] or 'unknown'}")
    for module, value in data["nested_parameter"].items():
        label = f"{module} nested:"
        _print(f"{label:<22}{value if value is not None else '(module not loaded)'}")
    if data.get("missing"):
        _print(f"nested state unavailable: {data['missing']}")


_FILE_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def _require_regular(mode: int, name: str) -> None:
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        raise CliError(f"{name}: Is a directory")
    what = _FILE_KINDS.get(stat.S_IFMT(mode), "an unknown kind of file")
    raise CliError(f"{name}: Is {what}, not a regular file")


def _read_fd(fd: int, limit: int, data: bytearray) -> None:
    """Read until EOF or until ``data`` holds more than ``limit`` bytes."""
    while len(data) <= limit:
        chunk = os.read(fd, min(limit + 1 - len(data), 1 << 20))
        if not chunk:
            return
        data += chunk


def _read_blob(path: str) -> bytes:
    """A FILE argument's bytes (CliError if unreadable).

    Only regular files: stat first, then open without blocking and check the
    descriptor again (the name may have been replaced in between).
    """
    name = _shown(path)
    try:
        _require_regular(os.stat(path).st_mode, name)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise CliError(f"{name}: {exc.strerror or exc}") from None
    except ValueError as exc:  # a NUL in the name
        raise CliError(f"{name}: {exc}") from None
    data = bytearray()
    try:
        _require_regular(os.fstat(fd).st_mode, name)
        _read_fd(fd, MAX_BLOB, data)
    except OSError as exc:
        raise CliError(f"{name}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_BLOB:
        raise CliError(f"{name}: larger than {MAX_BLOB} bytes, not a nested state")
    return bytes(data)


def _load_blob(path: str) -> NestedState:
    data = _read_blob(path)
    try:
        return NestedState.from_bytes(data)
    except ValueError as exc:
        raise CliError(f"{_shown(path)}: {exc}") from None


def _cmd_info(args: argparse.Namespace) -> int:
    data = info(args.device)
    if args.json:
        _print(json.dumps(data, indent=2))
    else:
        _print_info(data)
    return 0 if data["available"] else 1


def _uncovered(state: NestedState, hidden: bool) -> Iterator[tuple[str, bytes]]:
    """The bytes no field covers, as ``bytes[start:end]`` ranges (the names ``diff`` uses).

    The header union past the vendor header (shown with ``hidden`` or when
    not all zero) and the data past the last whole page (always: a blob whose
    ``size`` ends inside a page).
    """
    raw = state.to_bytes()
    vmx = state.header.format == uapi.KVM_STATE_NESTED_FORMAT_VMX
    vendor = state.vmx if vmx else state.svm
    start = uapi.kvm_nested_state_header.hdr.offset + ctypes.sizeof(vendor)
    rest = raw[start:HEADER_SIZE]
    if rest and (hidden or any(rest)):
        yield f"bytes[{start:#x}:{HEADER_SIZE:#x}]", rest
    pages = (state.vmcs12, state.shadow_vmcs12, state.vmcb12)
    end = HEADER_SIZE + sum(ctypes.sizeof(p) for p in pages if p is not None)
    if len(raw) > end:
        yield f"bytes[{end:#x}:{len(raw):#x}]", raw[end:]


def _decoded(state: NestedState, hidden: bool) -> dict[str, Any]:
    out = describe.nested_state_dict(state, hidden=hidden)
    for path, raw in _uncovered(state, hidden):
        out["fields"][path] = raw.hex()
    return out


def _print_nested(state: NestedState, hidden: bool, head: str = "") -> None:
    _print(f"{head}{state!r}")
    for path, _raw, text in describe.nested_state_fields(state, hidden=hidden):
        _print(f"  {path} = {text}")
    for path, raw in _uncovered(state, hidden):
        _print(f"  {path} = {raw.hex()}")


def _cmd_decode(args: argparse.Namespace) -> int:
    state = _load_blob(args.file)
    if args.json:
        _print(json.dumps(_decoded(state, args.all), indent=2))
    else:
        _print_nested(state, args.all)
    return 0


def _facts(args: argparse.Namespace) -> checks.Facts:
    pairs: list[tuple[str, str]] = []
    for item in args.fact:
        name, sep, value = item.partition("=")
        if not sep:
            raise CliError(f"--fact {item!r}: expected NAME=VALUE")
        pairs.append((name.strip(), value))
    given = {name for name, _ in pairs}
    vendor = "svm" if args.svm else "vmx" if args.vmx else None
    if vendor:
        # --svm/--vmx: a vCPU of that vendor with the feature in its CPUID.
        pairs += [(n, v) for n, v in (("vendor", vendor), (f"has_{vendor}", "1")) if n not in given]
    try:
        return checks.Facts.from_strings(pairs)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _cmd_check(args: argparse.Namespace) -> int:
    data = _read_blob(args.file)
    if len(data) < HEADER_SIZE:
        raise CliError(
            f"{_shown(args.file)}: truncated nested state: {len(data)} bytes, "
            f"the header alone is {HEADER_SIZE}"
        )
    facts = _facts(args)
    problems = checks.check(data, facts)
    refused = any(p.certain for p in problems)
    if args.json:
        report = {
            "file": _shown(args.file),
            "refused": refused,
            "facts": {k: _json_fact(v) for k, v in facts.known().items()},
            "problems": [p.to_dict() for p in problems],
        }
        _print(json.dumps(report, indent=2))
    else:
        _print(f"{_shown(args.file)}: {checks.format_problems(problems)}")
    return 1 if refused or (args.strict and problems) else 0


def _json_fact(value: Any) -> Any:
    if isinstance(value, frozenset):
        return sorted(value)
    if isinstance(value, tuple):
        return list(value)
    if hasattr(value, "items"):
        return {hex(k): v for k, v in value.items()}
    return value


def _cmd_diff(args: argparse.Namespace) -> int:
    found = diffs.diff(_load_blob(args.a), _load_blob(args.b))
    if args.json:
        _print(json.dumps({"equal": not found, "differences": found.to_list()}, indent=2))
    elif found:
        _print(*map(str, found))
    else:
        _print("equal")
    return 1 if found else 0


class _Parser(argparse.ArgumentParser):
    """argparse, writing its help, usage and errors through :data:`_OUT` (never raising)."""

    def print_usage(self, file: Any = None) -> None:
        _OUT.write(self.format_usage(), err=file is sys.stderr)

    def print_help(self, file: Any = None) -> None:
        _OUT.write(self.format_help(), err=file is sys.stderr)

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            _OUT.write(message, err=True)
        raise SystemExit(status)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="kvmstate",
        description="Read, check and explore KVM nested virtualization state.",
    )
    # Not argparse's "version" action: it writes without print_help, past _OUT.
    parser.add_argument(
        "--version", action="store_true", help="show program's version number and exit"
    )
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser("info", help="what this machine's KVM offers for nested state")
    p.add_argument("--device", default="/dev/kvm", help="KVM device (default: /dev/kvm)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser(
        "decode",
        help="show a saved nested-state blob by field names",
        description="The nested state by field names: header, vendor header, data pages, and "
        "any bytes no field covers.",
    )
    p.add_argument("file", help="the blob, in the kernel's format (exactly `size` bytes)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--all", action="store_true", help="include reserved and padding fields")
    p.set_defaults(func=_cmd_decode)

    p = sub.add_parser(
        "check",
        help="which rules of KVM_SET_NESTED_STATE a saved state breaks",
        description="Exit status: 0 no rule surely broken, 1 the kernel would refuse the "
        "state (with --strict: or may refuse it), 2 the file cannot be read.",
    )
    p.add_argument("file", help="the blob, in the kernel's format (exactly `size` bytes)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    vendor = p.add_mutually_exclusive_group()
    vendor.add_argument("--svm", action="store_true", help="the target is a kvm_amd vCPU with SVM")
    vendor.add_argument(
        "--vmx", action="store_true", help="the target is a kvm_intel vCPU with VMX"
    )
    p.add_argument(
        "--fact",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="what is known of the target vCPU, e.g. maxphyaddr=48, efer=0x1000, in_smm=0, "
        "kernel_version=6.1.0, cpu_features=svm,lm,nx (repeatable)",
    )
    p.add_argument(
        "--strict", action="store_true", help="also fail on problems that depend on unknown facts"
    )
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("diff", help="the fields that differ between two saved states")
    p.add_argument("a", help="the first blob")
    p.add_argument("b", help="the second blob")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_diff)
    return parser


def _run(argv: Sequence[str] | None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        if args.version:
            _print(f"kvmstate {__version__}")
            return 0
        if args.command is None:
            parser.error("the following arguments are required: command")
    except SystemExit as exc:  # --help or a usage error: argparse has printed
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    try:
        return int(args.func(args))
    except CliError as exc:
        _error(str(exc))
        return 2
    except Exception as exc:  # a bug in kvmstate: still one line, never a traceback
        _error(f"internal error (a bug in kvmstate, please report it): {exc!r}")
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kvmstate`` command; returns the exit status.

    >>> main(["check", "state.bin"])  # 0: no rule broken, 1: refused, 2: bad input
    0
    """
    _OUT.failure = None
    restore = _escaping_streams()
    try:
        status = _run(argv)
        _OUT.flush()  # here, not at exit: a broken pipe must not change the status
    except KeyboardInterrupt:
        # Quietly, and without the exit-time flush blocking on a full pipe.
        if sys.stdout is not None:
            _discard(sys.stdout)
        return INTERRUPTED
    finally:
        restore()
    if _OUT.failure is not None:
        _error(f"writing the output failed: {_OUT.failure}")
        return max(status, 2)
    return status


if __name__ == "__main__":
    sys.exit(main())
