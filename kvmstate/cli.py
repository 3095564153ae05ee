"""The ``kvmstate`` command (also ``python -m kvmstate``).

Commands: ``info`` (what this machine's KVM offers for nested state), ``target``
(what it accepts on restore, as JSON for ``check --target``),
``decode FILE`` (a saved nested state by field names), ``check FILE``
(which rules of KVM_SET_NESTED_STATE it breaks), ``diff A B`` and
``convert IN OUT --to KIND``.

A FILE is told apart by its content (``--from`` forces a kind): a
nested-state blob in the kernel's format, a kvmstate file
(:mod:`kvmstate.formats.native`: the binary file ``VcpuState.to_bytes`` writes,
or its JSON form), a QEMU migration stream, a Cloud Hypervisor
``state.json`` (or its snapshot directory) or a crosvm ``vcpu<N>``
fragment (:mod:`kvmstate.formats`). For the files of vCPUs the commands act
on each vCPU's nested part (``--vcpu N`` picks one vCPU) and say so when a
vCPU has none, and what the format does not carry; ``diff`` compares whole
vCPU states. ``convert`` writes the vCPUs (or one nested state) as another
kind, into a template's other sections for the VMM files, and refuses a
part that would not come back as it was, unless told ``--lossy``.

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
import dataclasses
import json
import os
import stat
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

from kvmstate import __version__, describe, snapshot, uapi
from kvmstate import check as checks
from kvmstate import diff as diffs
from kvmstate.errors import NestedStateUnavailableError
from kvmstate.formats import cloud_hypervisor, crosvm, qemu
from kvmstate.nested import HEADER_SIZE, NestedState, vendor_of_capability
from kvmstate.preflight import Preflight, Target, preflight
from kvmstate.state import PARTS, VcpuState
from kvmstate.system import Kvm
from kvmstate.vmstate import VmState

__all__ = ["main"]

#: Largest nested-state blob read: far above any nested state (8320 bytes today).
MAX_BLOB = 1 << 20
#: Largest kvmstate file (binary or JSON) read: a VM of many vCPUs, at ~20 KiB each.
MAX_SNAPSHOT = 1 << 26
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


# --- info ---------------------------------------------------------------------------------


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
        vendor = vendor_of_capability(size)
        out["nested_format"] = None if vendor is None else vendor.upper()
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


# --- reading FILE arguments -----------------------------------------------------------------

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


#: The kinds of FILE, as ``--from`` names them, and how messages name them.
KINDS = {
    "kernel": "nested state",
    "kvmstate": "kvmstate file",
    "json": "kvmstate JSON",
    "qemu": "QEMU migration stream",
    "ch": "Cloud Hypervisor state.json",
    "crosvm": "crosvm vCPU snapshot",
}
#: Largest QEMU migration stream read whole (its VM description is at the end): a stream
#: carries the guest's RAM, so this is a VM of about a GiB of touched memory.
MAX_STREAM = 1 << 30
# The most each kind may hold, checked before a file is read whole and parsed.
_LIMITS = {
    "kernel": MAX_BLOB,
    "kvmstate": MAX_SNAPSHOT,
    "json": MAX_SNAPSHOT,
    "qemu": MAX_STREAM,
    "ch": cloud_hypervisor.MAX_FILE_SIZE,
    "crosvm": crosvm.MAX_FILE_SIZE,
}
# How much of a file _sniff looks at (is_snapshot looks for "cpu-manager" in 4 KiB).
_SNIFF = 4096


def _sniff(data: bytes) -> str:
    """The kind of a FILE (a key of :data:`KINDS`), from its first bytes.

    Magic numbers first (``KVMSTATE``, ``QEVM``), then crosvm's CBOR map
    whose first key is ``vcpu_id``, then JSON: Cloud Hypervisor's
    ``{"snapshots": ... "cpu-manager"``, else kvmstate's JSON form. A
    nested state's ``format`` field (0 or 1, a u16) puts a NUL in its first
    four bytes and JSON text has none, so neither passes for the other; the
    magics read as a header have formats 0x534d (``KVMSTATE``) and 0x4d56
    (``QEVM``), which KVM never writes.
    """
    if data.startswith(snapshot.MAGIC):
        return "kvmstate"
    if data.startswith(b"QEVM"):
        return "qemu"
    if crosvm.is_vcpu_snapshot(data):
        return "crosvm"
    if cloud_hypervisor.is_snapshot(data):
        return "ch"
    if data.lstrip(b" \t\r\n")[:1] == b"{" and b"\0" not in data[:_SNIFF]:
        return "json"
    return "kernel"


def _read_fd(fd: int, limit: int, data: bytearray) -> None:
    """Read until EOF or until ``data`` holds more than ``limit`` bytes."""
    while len(data) <= limit:
        chunk = os.read(fd, min(limit + 1 - len(data), 1 << 20))
        if not chunk:
            return
        data += chunk


def _open_regular(path: str, name: str) -> int:
    """A read-only descriptor of a regular file (CliError for anything else).

    stat first (a FIFO would block the open), then open without blocking and
    check the descriptor again: the name may have been replaced in between.
    """
    try:
        _require_regular(os.stat(path).st_mode, name)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise CliError(f"{name}: {exc.strerror or exc}") from None
    except ValueError as exc:  # a NUL in the name
        raise CliError(f"{name}: {exc}") from None
    try:
        _require_regular(os.fstat(fd).st_mode, name)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _snapshot_dir(path: str, kind: str | None) -> str | None:
    """``DIR/state.json`` when ``path`` is a Cloud Hypervisor snapshot directory, else None."""
    if kind not in (None, "ch"):
        return None
    try:
        if not stat.S_ISDIR(os.stat(path).st_mode):
            return None
    except (OSError, ValueError):
        return None
    inner = os.path.join(path, cloud_hypervisor.STATE_FILE)
    return inner if os.path.lexists(inner) else None


def _read(path: str, kind: str | None = None) -> tuple[bytes, str, str]:
    """A FILE argument's bytes, its kind (:func:`_sniff`, or ``kind`` when forced) and its
    name as shown; CliError if it cannot be read or is larger than its kind holds.

    A Cloud Hypervisor snapshot directory stands for its ``state.json``.
    """
    inner = _snapshot_dir(path, kind)
    if inner is not None:
        path, kind = inner, "ch"
    name = _shown(path)
    fd = _open_regular(path, name)
    data = bytearray()
    try:
        _read_fd(fd, MAX_BLOB, data)
        if kind is None:
            kind = _sniff(bytes(data[:_SNIFF]))
        limit = _LIMITS[kind]
        # A file that says it is too large is refused unread; the read stops at the limit
        # too, for one that grows meanwhile.
        too_large = os.fstat(fd).st_size > limit
        if len(data) > MAX_BLOB and limit > MAX_BLOB and not too_large:
            _read_fd(fd, limit, data)
    except OSError as exc:
        raise CliError(f"{name}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if too_large or len(data) > limit:
        what = "a nested state" if kind == "kernel" else f"read as a {KINDS[kind]}"
        raise CliError(f"{name}: larger than {limit} bytes, the most {what} holds")
    return bytes(data), kind, name


@dataclasses.dataclass
class _Source:
    """A FILE argument, read: a nested-state blob (``raw``) or a file of vCPUs (``vcpus``).

    ``vcpus`` maps each vCPU's number (QEMU's cpu index, the VMM's vCPU id,
    the position in a kvmstate file) to its state; ``notes`` are what the
    file's reader says about a vCPU, ``not_carried`` the nested-state fields
    the format does not carry (they read as 0), ``facts`` what the file says
    of the vCPU beyond its saved parts (QEMU's control registers), and
    ``document`` the parsed file, for ``convert`` to write back into.
    """

    path: str
    name: str  # as shown
    kind: str  # a key of KINDS
    data: bytes
    raw: bytes | None = None
    vcpus: dict[int, VcpuState] | None = None
    notes: dict[int, list[str]] = dataclasses.field(default_factory=dict)
    not_carried: dict[int, dict[str, str]] = dataclasses.field(default_factory=dict)
    facts: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)
    document: Any = None
    memory: checks.Regions | None = None  # the guest memory a VM snapshot file carries

    @property
    def form(self) -> str:
        return KINDS[self.kind]


def _qemu_source(source: _Source) -> None:
    stream = qemu.read(source.data)
    source.document = stream
    source.vcpus = {}
    for cpu in stream.vcpus:
        source.vcpus[cpu.index] = cpu.state
        source.notes[cpu.index] = list(cpu.notes)
        source.not_carried[cpu.index] = dict(cpu.not_migrated)
        # QEMU puts the sregs before the nested state: the restored vCPU has these.
        registers = {"efer": cpu.efer, "cr0": cpu.cr0, "cr3": cpu.cr3, "cr4": cpu.cr4}
        source.facts[cpu.index] = {k: v for k, v in registers.items() if v is not None}


def _ch_source(source: _Source) -> None:
    snap = cloud_hypervisor.Snapshot(source.data, source.name)
    source.document = snap
    source.vcpus = snap.states()
    for i, entry in sorted(snap.vcpus.items()):
        source.notes[i] = list(entry.notes)


def _crosvm_source(source: _Source) -> None:
    snap = crosvm.load(source.data, name=source.name)
    source.document = snap
    source.vcpus = {snap.vcpu_id: snap.state}
    source.notes[snap.vcpu_id] = list(snap.notes)


def _kvmstate_source(source: _Source) -> None:
    source.vcpus = dict(enumerate(snapshot.loads_vm(source.data)))
    source.memory = _vm_memory(source.data)


def _vm_memory(data: bytes) -> checks.Regions | None:
    """The guest memory of a VM snapshot file (its slots' images), None for a file of vCPUs.

    ``check`` reads it to decide the rules that look at guest memory (the VMCS
    link pointer's page) instead of leaving them undecided.
    """
    try:
        vm = VmState.from_bytes(data)
    except (TypeError, ValueError):  # a file of vCPUs only: the vCPU reader has judged it
        return None
    return checks.Regions(
        (slot.guest_phys_addr, image)
        for slot, image in zip(vm.layout.slots, vm.memory, strict=True)
    )


def _json_source(source: _Source) -> None:
    try:
        document = json.loads(source.data.decode("utf-8"))
    except UnicodeDecodeError:
        raise CliError(f"{source.name}: starts like JSON but is not UTF-8 text") from None
    except (ValueError, RecursionError) as exc:
        raise CliError(f"{source.name}: starts like JSON but is not JSON: {exc}") from None
    source.vcpus = {0: snapshot.from_dict(document)}


_READERS: dict[str, Callable[[_Source], None]] = {
    "qemu": _qemu_source,
    "ch": _ch_source,
    "crosvm": _crosvm_source,
    "kvmstate": _kvmstate_source,
    "json": _json_source,
}


def _reason(text: str, name: str) -> str:
    """A reader's message without what the CLI's prefix says (the file's name, "QEMU stream")."""
    for lead in (f"{name}: ", f"{name}.", "QEMU stream, "):
        if text.startswith(lead):
            return text[len(lead) :]
    return text


def _open(path: str, kind: str | None = None) -> _Source:
    """Read and parse a FILE argument (``kind``: what ``--from`` forces, else by content)."""
    data, kind, name = _read(path, kind)
    source = _Source(path, name, kind, data)
    if kind == "kernel":
        source.raw = data
        return source
    try:
        _READERS[kind](source)
    except (ValueError, TypeError, RecursionError) as exc:
        raise CliError(f"{name}: {source.form}: {_reason(str(exc), name)}") from None
    if not source.vcpus:
        raise CliError(f"{name}: a {source.form} holding no vCPU")
    return source


def _nested(source: _Source) -> NestedState:
    """A nested-state blob's state (CliError naming the file if it is not one)."""
    assert source.raw is not None
    try:
        return NestedState.from_bytes(source.raw)
    except ValueError as exc:
        raise CliError(f"{source.name}: {exc}") from None


def _load_blob(path: str) -> NestedState:
    """A FILE that must be a nested-state blob."""
    source = _open(path)
    if source.raw is None:
        raise CliError(f"{source.name}: a {source.form}, not a nested-state blob")
    return _nested(source)


def _count(n: int) -> str:
    return f"{n} vCPU{'s' if n != 1 else ''}"


def _ids(ids: Iterable[int]) -> str:
    """``0..3`` for a run of numbers, else ``0, 2, 5``."""
    ordered = sorted(ids)
    if len(ordered) > 1 and ordered == list(range(ordered[0], ordered[-1] + 1)):
        return f"{ordered[0]}..{ordered[-1]}"
    return ", ".join(map(str, ordered))


def _chosen(source: _Source, index: int | None) -> list[tuple[int, VcpuState]]:
    """The vCPUs of a file that ``--vcpu`` selects (all of them without it)."""
    assert source.vcpus is not None
    if index is None:
        return sorted(source.vcpus.items())
    if index not in source.vcpus:
        n = len(source.vcpus)
        raise CliError(
            f"{source.name}: no vcpu {index}: the file holds {_count(n)} ({_ids(source.vcpus)})"
        )
    return [(index, source.vcpus[index])]


def _no_vcpu_option(args: argparse.Namespace, *sources: _Source) -> None:
    if args.vcpu is not None and all(s.raw is not None for s in sources):
        what = "is a nested-state blob" if len(sources) == 1 else "are nested-state blobs"
        names = " and ".join(s.name for s in sources)
        raise CliError(f"--vcpu: {names} {what}, not files of vCPUs")


def _why_absent(state: VcpuState) -> str:
    """Why a saved vCPU has no nested state, as the file says."""
    return state.absent.get("nested") or "the file gives no reason"


def _vcpu_arg(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a vCPU number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"not a vCPU number: {text!r}")
    return value


# --- decode ---------------------------------------------------------------------------------


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


def _print_nested(
    state: NestedState, hidden: bool, head: str = "", not_carried: dict[str, str] | None = None
) -> None:
    """The state's repr and fields; a field the file's format does not carry says so."""
    missing = dict(not_carried or {})
    _print(f"{head}{state!r}")
    for path, _raw, text in describe.nested_state_fields(state, hidden=hidden):
        why = missing.pop(path, None)
        _print(f"  {path} = {text}" if why is None else f"  {path} = absent ({why})")
    for path, raw in _uncovered(state, hidden):
        _print(f"  {path} = {raw.hex()}")
    for path, why in missing.items():  # not a field decode shows (hdr.svm.flags)
        _print(f"  {path}: absent ({why})")


def _cmd_decode(args: argparse.Namespace) -> int:
    source = _open(args.file, args.source_kind)
    if source.raw is not None:
        _no_vcpu_option(args, source)
        state = _nested(source)
        if args.json:
            _print(json.dumps(_decoded(state, args.all), indent=2))
        else:
            _print_nested(state, args.all)
        return 0
    assert source.vcpus is not None
    chosen = _chosen(source, args.vcpu)
    if args.json:
        vcpus: list[dict[str, Any]] = []
        for i, vcpu in chosen:
            entry: dict[str, Any] = {"vcpu": i, "nested": None}
            if vcpu.nested is None:
                entry["absent"] = _why_absent(vcpu)
            else:
                entry["nested"] = _decoded(vcpu.nested, args.all)
                if source.not_carried.get(i):
                    entry["absent_fields"] = source.not_carried[i]
            if source.notes.get(i):
                entry["notes"] = source.notes[i]
            vcpus.append(entry)
        report = {"source": source.form, "vcpu_count": len(source.vcpus), "vcpus": vcpus}
        _print(json.dumps(report, indent=2))
        return 0
    _print(f"{source.name}: {source.form}, {_count(len(source.vcpus))}")
    for i, vcpu in chosen:
        if vcpu.nested is None:
            _print(f"vcpu {i}: no nested state ({_why_absent(vcpu)})")
        else:
            _print_nested(vcpu.nested, args.all, f"vcpu {i}: ", source.not_carried.get(i))
        notes = [n for n in source.notes.get(i, ()) if vcpu.nested is not None or "nested" not in n]
        for note in notes:
            _print(f"  note: {note}")
    return 0


# --- check ----------------------------------------------------------------------------------


def _facts(args: argparse.Namespace) -> tuple[checks.Facts, dict[str, Any]]:
    """The ``--fact`` facts, and what ``--svm``/``--vmx`` imply where nothing else says.

    ``--svm`` means a kvm_amd target (``vendor``) whose vCPU has SVM in its
    CPUID (``has_svm``): the vendor is a fact about the target that no file
    holds, the CPUID one that a file may hold, and then the file's wins.
    """
    pairs: list[tuple[str, str]] = []
    for item in args.fact:
        name, sep, value = item.partition("=")
        if not sep:
            raise CliError(f"--fact {item!r}: expected NAME=VALUE")
        pairs.append((name.strip(), value))
    try:
        given = checks.Facts.from_strings(pairs)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    vendor = "svm" if args.svm else "vmx" if args.vmx else None
    implied: dict[str, Any] = {}
    if vendor:
        implied = {"vendor": vendor, f"has_{vendor}": True}
    return given, implied


def _merged(base: dict[str, Any], implied: dict[str, Any], given: checks.Facts) -> dict[str, Any]:
    """The facts to check with: ``base`` (what the file says), ``implied`` where it is
    silent, and the ``--fact`` facts over both."""
    facts = dict(base)
    for name, value in implied.items():
        if facts.get(name) is None:
            facts[name] = value
    overrides = given.known()
    if "cpu_features" in overrides:  # has_svm/has_vmx would outrank the given features
        overrides.setdefault("has_svm", None)
        overrides.setdefault("has_vmx", None)
    facts.update(overrides)
    return facts


def _load_target(args: argparse.Namespace) -> Target | None:
    """``--target FILE``: what ``kvmstate target`` wrote on the target host."""
    if args.target is None:
        return None
    name = _shown(args.target)
    try:
        with open(args.target, "rb") as f:
            return Target.from_json(f.read(1 << 22))
    except OSError as exc:
        raise CliError(f"{name}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise CliError(f"{name}: {exc}") from None


def _target_facts(target: Target) -> dict[str, Any]:
    """The facts of the target machine a saved state cannot tell (check's Facts fields)."""
    found: dict[str, Any] = {}
    if target.vendor is not None:
        found["vendor"] = target.vendor
    if target.nested_state_size is not None:
        found["nested_state_cap"] = target.nested_state_size
    if target.kernel is not None:
        version = checks.parse_kernel_version(target.kernel)
        if version is not None:
            found["kernel_version"] = version
    if target.npt is not None:
        found["npt_enabled"] = target.npt
    return found


def _json_fact(value: Any) -> Any:
    if isinstance(value, frozenset):
        return sorted(value)
    if isinstance(value, tuple):
        return list(value)
    if hasattr(value, "items"):
        return {hex(k): v for k, v in value.items()}
    return value


def _json_facts(facts: checks.Facts) -> dict[str, Any]:
    return {k: _json_fact(v) for k, v in facts.known().items()}


def _check_raw(args: argparse.Namespace, source: _Source, facts: checks.Facts) -> int:
    data = source.raw
    assert data is not None
    if len(data) < HEADER_SIZE:
        raise CliError(
            f"{source.name}: truncated nested state: {len(data)} bytes, "
            f"the header alone is {HEADER_SIZE}"
        )
    problems = checks.check(data, facts)
    refused = any(p.certain for p in problems)
    if args.json:
        report = {
            "file": source.name,
            "refused": refused,
            "facts": _json_facts(facts),
            "problems": [p.to_dict() for p in problems],
        }
        _print(json.dumps(report, indent=2))
    else:
        _print(f"{source.name}: {checks.format_problems(problems)}")
    return 1 if refused or (args.strict and problems) else 0


def _cmd_check(args: argparse.Namespace) -> int:
    source = _open(args.file, args.source_kind)
    given, implied = _facts(args)
    target = _load_target(args)
    # The target host's own facts, which no saved file holds; --fact still wins.
    machine = {} if target is None else _target_facts(target)
    if source.raw is not None:
        _no_vcpu_option(args, source)
        try:
            facts = checks.Facts(**_merged(dict(machine), implied, given))
        except (TypeError, ValueError) as exc:
            raise CliError(str(exc)) from None
        return _check_raw(args, source, facts)
    results = []
    reports: dict[int, Preflight] = {}
    for i, vcpu in _chosen(source, args.vcpu):
        if target is not None:
            reports[i] = preflight(vcpu, target)
        try:
            # What the saved vCPU tells of itself (and what the file says beside it).
            base = checks.Facts.from_state(vcpu).known()
            base.update(source.facts.get(i, {}))
            base.update(machine)
            facts = checks.Facts(**_merged(base, implied, given))
        except (TypeError, ValueError) as exc:
            raise CliError(f"{source.name}: vcpu {i}: {exc}") from None
        problems = None if vcpu.nested is None else checks.check(vcpu.nested, facts, source.memory)
        results.append((i, vcpu, facts, problems))
    refused = any(p.certain for *_, problems in results for p in problems or ())
    refused = refused or any(not r.ok for r in reports.values())
    unsure = any(problems for *_, problems in results)
    if args.json:
        vcpus = []
        for i, vcpu, facts, problems in results:
            entry: dict[str, Any] = {"vcpu": i, "nested": problems is not None}
            if problems is None:
                entry["absent"] = _why_absent(vcpu)
            elif source.not_carried.get(i):
                entry["absent_fields"] = source.not_carried[i]
            entry["refused"] = any(p.certain for p in problems or ())
            entry["facts"] = _json_facts(facts)
            entry["problems"] = [p.to_dict() for p in problems or ()]
            if i in reports:
                entry["preflight"] = reports[i].to_dict()
                entry["refused"] = entry["refused"] or not reports[i].ok
            vcpus.append(entry)
        report = {"file": source.name, "source": source.form, "refused": refused, "vcpus": vcpus}
        _print(json.dumps(report, indent=2))
    else:
        for i, vcpu, _facts_used, problems in results:
            label = f"{source.name} vcpu {i}"
            if problems is None:
                _print(f"{label}: no nested state to check ({_why_absent(vcpu)})")
            else:
                _print(f"{label}: {checks.format_problems(problems)}")
                missing = source.not_carried.get(i)
                if missing:
                    # What the kernel will get: the format restores these as 0.
                    _print(
                        f"  not carried by the {source.form}, checked as it restores them: "
                        f"{', '.join(missing)}"
                    )
            if i in reports:
                for line in reports[i].lines() or ["the target takes every part"]:
                    _print(f"{label}: {line}")
    return 1 if refused or (args.strict and unsure) else 0


# --- target ---------------------------------------------------------------------------------


def _cmd_target(args: argparse.Namespace) -> int:
    from kvmstate.system import Kvm

    try:
        with Kvm(args.device) as kvm, kvm.create_vm() as vm, vm.create_vcpu(0) as vcpu:
            target = Target.from_vcpu(vcpu)
    except OSError as exc:
        raise CliError(f"{_shown(args.device)}: {exc.strerror or exc}") from None
    _print(json.dumps(target.to_dict(), indent=2))
    return 0


# --- diff -----------------------------------------------------------------------------------

_PRESENT = "present"
# Byte strings longer than this are narrowed to the range that differs.
_NARROW = 16


def _prefixed(found: Iterable[diffs.Difference], prefix: str) -> list[diffs.Difference]:
    return [dataclasses.replace(d, path=prefix + d.path) for d in found]


def _byte_range(path: str, a: bytes, b: bytes) -> diffs.Difference:
    """The differing bytes of two byte strings, from the first to the last that differ."""
    length = max(len(a), len(b))
    differs = [i for i in range(length) if a[i : i + 1] != b[i : i + 1]]
    start, end = differs[0], differs[-1] + 1
    ra, rb = a[start:end], b[start:end]
    return diffs.Difference(
        f"{path}[{start:#x}:{end:#x}]", ra, rb, ra.hex() or diffs.ABSENT, rb.hex() or diffs.ABSENT
    )


def _narrowed(found: Iterable[diffs.Difference]) -> list[diffs.Difference]:
    """Long byte-array fields (``lapic.regs``) as the byte range that differs."""
    out = []
    for d in found:
        long_bytes = isinstance(d.a, bytes) and isinstance(d.b, bytes) and len(d.a) > _NARROW
        out.append(_byte_range(d.path, d.a, d.b) if long_bytes else d)
    return out


def _presence(path: str, a: Any, b: Any, why_a: str = "", why_b: str = "") -> diffs.Difference:
    """A part, MSR or entry that one side has and the other lacks."""

    def text(value: Any, why: str) -> str:
        if value is not None:
            return _PRESENT
        return f"{diffs.ABSENT} ({why})" if why else diffs.ABSENT

    return diffs.Difference(
        path,
        None if a is None else _PRESENT,
        None if b is None else _PRESENT,
        text(a, why_a),
        text(b, why_b),
    )


def _hex_or_absent(value: int | None) -> str:
    return diffs.ABSENT if value is None else f"{value:#x}"


def _diff_msrs(a: dict[int, int], b: dict[int, int]) -> list[diffs.Difference]:
    out = []
    for index in sorted(a.keys() | b.keys()):
        va, vb = a.get(index), b.get(index)
        if va != vb:
            out.append(
                diffs.Difference(
                    f"msrs[{index:#x}]", va, vb, _hex_or_absent(va), _hex_or_absent(vb)
                )
            )
    return out


def _diff_cpuid(a: uapi.kvm_cpuid2, b: uapi.kvm_cpuid2) -> list[diffs.Difference]:
    """Entry by entry, keyed ``cpuid[function,index]``, then the head's padding."""

    def entries(cpuid: uapi.kvm_cpuid2) -> dict[tuple[int, int], Any]:
        table: dict[tuple[int, int], Any] = {}
        for entry in list(cpuid.items())[: len(cpuid)]:
            table.setdefault((int(entry.function), int(entry.index)), entry)
        return table

    ea, eb = entries(a), entries(b)
    out: list[diffs.Difference] = []
    for key in sorted(ea.keys() | eb.keys()):
        path = f"cpuid[{key[0]:#x},{key[1]}]"
        if key not in ea or key not in eb:
            out.append(_presence(path, ea.get(key), eb.get(key)))
        else:
            out += _prefixed(diffs.diff_structs(ea[key], eb[key]), f"{path}.")
    if a.padding != b.padding:
        out.append(
            diffs.Difference("cpuid.padding", a.padding, b.padding, str(a.padding), str(b.padding))
        )
    if not out:  # the same entries, listed in another order
        out.append(diffs.Difference("cpuid", None, None, "entries in one order", "in another"))
    return out


def _diff_vcpu(a: VcpuState, b: VcpuState) -> list[diffs.Difference]:
    """Every difference between two saved vCPUs: part by part, field by field."""
    out: list[diffs.Difference] = []
    for part in PARTS:
        va, vb = getattr(a, part), getattr(b, part)
        if va is None and vb is None:
            continue
        if va is None or vb is None:
            out.append(
                _presence(
                    part, va, vb, a.absent.get(part, "not saved"), b.absent.get(part, "not saved")
                )
            )
            continue
        ba, bb = a.part_bytes(part), b.part_bytes(part)
        if ba == bb:
            continue
        if part == "nested":
            out += _prefixed(diffs.diff(va, vb), "nested.")
        elif part == "msrs":
            out += _diff_msrs(va, vb)
        elif part == "cpuid":
            out += _diff_cpuid(va, vb)
        elif part == "tsc_khz":
            out.append(diffs.Difference(part, va, vb, str(va), str(vb)))
        elif type(va) is type(vb):
            out += _narrowed(_prefixed(diffs.diff_structs(va, vb), f"{part}."))
        else:  # two XSAVE areas of different sizes
            out.append(_byte_range(part, ba, bb))
    for tag in sorted(a.extra.keys() | b.extra.keys()):
        xa, xb = a.extra.get(tag), b.extra.get(tag)
        if xa != xb:
            path = f"extra[{tag}]"
            if xa is None or xb is None:
                out.append(_presence(path, xa, xb))
            else:
                out.append(_byte_range(path, xa, xb))
    return out


def _one_vcpu(source: _Source, index: int | None) -> tuple[int, VcpuState]:
    assert source.vcpus is not None
    if index is None and len(source.vcpus) > 1:
        raise CliError(
            f"{source.name}: holds {_count(len(source.vcpus))}: choose one with --vcpu N"
        )
    return _chosen(source, index)[0]


def _diff_nested_parts(args: argparse.Namespace, a: _Source, b: _Source) -> list[diffs.Difference]:
    """A nested-state blob against a file's vCPU: their nested states."""
    states: list[NestedState | None] = []
    whys: list[str] = []
    for source in (a, b):
        if source.raw is not None:
            states.append(_nested(source))
            whys.append("")
        else:
            _i, vcpu = _one_vcpu(source, args.vcpu)
            states.append(vcpu.nested)
            whys.append(_why_absent(vcpu))
    na, nb = states
    if na is None or nb is None:
        return [_presence("nested", na, nb, *whys)]
    return list(diffs.diff(na, nb))


def _diff_files(args: argparse.Namespace, a: _Source, b: _Source) -> list[diffs.Difference]:
    """Two files of vCPUs: vCPU by vCPU number (``vcpu[i].`` paths when there are several)."""
    assert a.vcpus is not None and b.vcpus is not None
    if args.vcpu is not None:
        (_, va), (_, vb) = _chosen(a, args.vcpu)[0], _chosen(b, args.vcpu)[0]
        return _diff_vcpu(va, vb)
    if len(a.vcpus) == len(b.vcpus) == 1:  # one vCPU each: whatever their numbers
        return _diff_vcpu(next(iter(a.vcpus.values())), next(iter(b.vcpus.values())))
    out: list[diffs.Difference] = []
    na, nb = len(a.vcpus), len(b.vcpus)
    if na != nb:
        out.append(diffs.Difference("vcpus", na, nb, _count(na), _count(nb)))
    for i in sorted(a.vcpus.keys() & b.vcpus.keys()):
        out += _prefixed(_diff_vcpu(a.vcpus[i], b.vcpus[i]), f"vcpu[{i}].")
    for i in sorted(a.vcpus.keys() ^ b.vcpus.keys()):
        if na == nb:  # as many, numbered otherwise: say which
            out.append(_presence(f"vcpu[{i}]", a.vcpus.get(i), b.vcpus.get(i)))
    return out


def _cmd_diff(args: argparse.Namespace) -> int:
    a, b = _open(args.a, args.source_kind), _open(args.b, args.source_kind)
    found: list[diffs.Difference]
    if a.raw is not None and b.raw is not None:
        _no_vcpu_option(args, a, b)
        found = list(diffs.diff(_nested(a), _nested(b)))
    elif a.raw is not None or b.raw is not None:
        found = _diff_nested_parts(args, a, b)
    else:
        found = _diff_files(args, a, b)
    if args.json:
        listed = [d.to_dict() for d in found]
        _print(json.dumps({"equal": not found, "differences": listed}, indent=2))
    elif found:
        _print(*map(str, found))
    else:
        _print("equal")
    return 1 if found else 0


# --- convert --------------------------------------------------------------------------------

#: The kinds ``convert --to`` writes, as its messages name them.
OUTPUTS = {
    "kernel": "nested-state blob",
    "kvmstate": "kvmstate file",
    "json": "kvmstate JSON",
    "qemu": "QEMU migration stream",
    "ch": "Cloud Hypervisor state.json",
    "crosvm": "crosvm vCPU snapshot",
}
# The outputs that hold a whole VMM file, written over a template's other sections.
_TEMPLATED = ("qemu", "ch", "crosvm")


def _template(args: argparse.Namespace, source: _Source) -> _Source | None:
    """The VMM file whose other sections ``--to qemu|ch|crosvm`` keeps: ``--template``, or IN."""
    to = args.to
    if args.template is not None:
        template = _open(args.template, to)  # read as that kind: an error says why not
    elif source.kind == to:
        template = source
    elif to == "crosvm" and source.raw is None:
        return None  # a crosvm fragment holds only the vCPU: one can be written afresh
    else:
        raise CliError(
            f"--to {to}: {source.name} is a {source.form}; give the {KINDS[to]} to write into "
            f"with --template FILE (its other sections are kept)"
        )
    return template


def _inputs(
    args: argparse.Namespace, source: _Source, template: _Source | None
) -> list[tuple[int, VcpuState]]:
    """The vCPUs to write: IN's (``--vcpu`` picks one); a blob is the nested state of
    the template's vCPU (``--vcpu`` N, or its only one), the rest being the template's."""
    if source.raw is None:
        return _chosen(source, args.vcpu)
    nested = _nested(source)
    if template is None:
        return [(0 if args.vcpu is None else args.vcpu, VcpuState(nested=nested))]
    index, base = _one_vcpu(template, args.vcpu)
    state = dataclasses.replace(base, nested=nested, absent=dict(base.absent))
    state.absent.pop("nested", None)
    return [(index, state)]


def _single(args: argparse.Namespace, source: _Source, chosen: list[tuple[int, VcpuState]]) -> None:
    if len(chosen) > 1:
        raise CliError(
            f"{source.name}: holds {_count(len(chosen))} and a {OUTPUTS[args.to]} holds one: "
            "choose it with --vcpu N"
        )


def _header_only(state: VcpuState) -> bool:
    return state.nested is not None and state.nested.size == HEADER_SIZE


def _to_ch(
    args: argparse.Namespace, template: _Source, chosen: list[tuple[int, VcpuState]], name: str
) -> bytes:
    snap = template.document
    assert isinstance(snap, cloud_hypervisor.Snapshot)
    for i, state in chosen:
        if i not in snap.vcpus:
            raise CliError(
                f"{template.name}: no vcpu {i} to write into (it holds {_ids(snap.vcpus)})"
            )
        try:
            data = snap.with_vcpu(i, state, header_only=args.header_only)
        except ValueError as exc:
            if _header_only(state) and args.header_only is None:
                raise CliError(
                    f"{name}: vcpu {i}: a header-only nested state ({state.nested!r}) that Cloud "
                    "Hypervisor would drop (it stores null for 128 bytes or less): "
                    "--header-only keep writes the buffer (Cloud Hypervisor restores it), "
                    "--header-only drop writes null as Cloud Hypervisor does"
                ) from None
            raise CliError(f"{name}: vcpu {i}: {exc}") from None
        snap = cloud_hypervisor.Snapshot(data, template.name)
    return bytes(snap.data)


def _to_qemu(template: _Source, chosen: list[tuple[int, VcpuState]]) -> bytes:
    stream = qemu.read(template.data)  # a fresh copy: the template's own stays as read
    for i, state in chosen:
        try:
            stream.vcpu(i).nested = state.nested
        except KeyError:
            held = _ids(c.index for c in stream.vcpus)
            raise CliError(
                f"{template.name}: no vcpu {i} to write into (it holds {held})"
            ) from None
    try:
        return stream.write()
    except ValueError as exc:
        raise CliError(f"{exc}") from None


def _to_crosvm(template: _Source | None, chosen: list[tuple[int, VcpuState]], name: str) -> bytes:
    ((i, state),) = chosen
    try:
        if template is None:
            return crosvm.write_vcpu(state, vcpu_id=i)
        snap = template.document
        assert isinstance(snap, crosvm.VcpuSnapshot)
        if snap.vcpu_id != i:
            raise CliError(f"{template.name}: holds vcpu {snap.vcpu_id}, not vcpu {i}")
        return snap.with_vcpu(state)
    except ValueError as exc:
        raise CliError(f"{name}: vcpu {i}: {exc}") from None


def _encode(
    args: argparse.Namespace, source: _Source, template: _Source | None,
    chosen: list[tuple[int, VcpuState]],
) -> bytes:  # fmt: skip
    to = args.to
    if to == "kernel":
        _single(args, source, chosen)
        ((i, state),) = chosen
        if state.nested is None:
            raise CliError(
                f"{source.name}: vcpu {i} has no nested state ({_why_absent(state)}): "
                "nothing to write as a nested-state blob"
            )
        return bytes(state.nested.to_bytes())
    if to == "kvmstate":
        return snapshot.dumps_vm([state for _, state in chosen])
    if to == "json":
        _single(args, source, chosen)
        return (json.dumps(snapshot.to_dict(chosen[0][1]), indent=2) + "\n").encode()
    if to == "ch":
        assert template is not None
        return _to_ch(args, template, chosen, source.name)
    if to == "qemu":
        assert template is not None
        return _to_qemu(template, chosen)
    _single(args, source, chosen)
    return _to_crosvm(template, chosen, source.name)


def _read_back(args: argparse.Namespace, data: bytes, name: str) -> dict[int, VcpuState]:
    """What a reader of the written file gets, vCPU by number."""
    if args.to == "kernel":
        return {args.vcpu or 0: VcpuState(nested=NestedState.from_bytes(data))}
    source = _Source(name, name, args.to, data)
    try:
        _READERS[args.to](source)
    except (ValueError, TypeError) as exc:  # pragma: no cover - a bug in a writer
        raise CliError(
            f"internal error: the {KINDS[args.to]} written does not read: {exc}"
        ) from None
    assert source.vcpus is not None
    return source.vcpus


def _lost(
    args: argparse.Namespace, chosen: list[tuple[int, VcpuState]], back: dict[int, VcpuState]
) -> dict[int, list[str]]:
    """The parts of each written vCPU that do not come back from the file as they went in.

    A header-only nested state written as Cloud Hypervisor's null is not
    counted: the writer does that only when the state says no more than a
    fresh vCPU's, or when ``--header-only drop`` asked for it.
    """
    if args.to == "kernel":
        return {}
    lost: dict[int, list[str]] = {}
    numbered = args.to != "kvmstate"  # a kvmstate file numbers its vCPUs by position
    for position, (i, state) in enumerate(chosen):
        key = i if numbered else position
        if args.to == "json":
            key = 0
        out = back.get(key, VcpuState())
        parts = []
        for part in PARTS:
            if getattr(state, part) is None:
                continue
            if getattr(out, part) is None:
                if part == "nested" and args.to == "ch" and _header_only(state):
                    continue
                parts.append(part)
            elif state.part_bytes(part) != out.part_bytes(part):
                parts.append(part)
        if state.extra != out.extra:
            parts.append("extra")
        if parts:
            lost[i] = parts
    return lost


def _write_out(path: str, data: bytes) -> str:
    """Write ``data`` to ``path`` whole or not at all (a temporary file renamed over it)."""
    name = _shown(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        mode = None
    except (OSError, ValueError) as exc:
        raise CliError(f"{name}: {getattr(exc, 'strerror', None) or exc}") from None
    if mode is not None:
        _require_regular(mode, name)
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, f".{os.path.basename(path)}.kvmstate-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise CliError(f"{name}: {exc.strerror or exc}") from None
    return name


def _cmd_convert(args: argparse.Namespace) -> int:
    source = _open(args.input, args.source_kind)
    if args.header_only is not None and args.to != "ch":
        raise CliError(
            "--header-only: only for --to ch (Cloud Hypervisor drops header-only states)"
        )
    if args.template is not None and args.to not in _TEMPLATED:
        raise CliError(f"--template: only for --to {', '.join(_TEMPLATED)}")
    template = _template(args, source) if args.to in _TEMPLATED else None
    chosen = _inputs(args, source, template)
    data = _encode(args, source, template, chosen)
    back = _read_back(args, data, _shown(args.output))
    lost = _lost(args, chosen, back)
    what = "; ".join(f"vcpu {i}: {', '.join(parts)}" for i, parts in lost.items())
    if lost and not args.lossy:
        raise CliError(
            f"a {OUTPUTS[args.to]} written from {source.name} would not give back {what}; "
            "nothing written (--lossy writes it anyway)"
        )
    name = _write_out(args.output, data)
    tail = ""
    if template is not None and data == template.data:
        tail = f", identical to {template.name}"
    if args.to == "kernel":
        _print(f"{name}: {OUTPUTS[args.to]} of vcpu {chosen[0][0]}, {len(data)} bytes")
    else:
        _print(
            f"{name}: {OUTPUTS[args.to]}, {_count(len(chosen))} written, {len(data)} bytes{tail}"
        )
    if lost:
        _OUT.write(f"kvmstate: not carried (--lossy): {what}\n", err=True)
    if args.to == "kvmstate":  # a kvmstate file numbers its vCPUs by position
        moved = [f"vcpu {i} is vcpu {n}" for n, (i, _) in enumerate(chosen) if i != n]
        if moved:
            _print(f"  numbered by position in the file: {', '.join(moved)}")
    for i, state in chosen:
        if args.to == "ch" and _header_only(state) and back[i].nested is None:
            how = "dropped (--header-only drop)" if args.header_only else "a fresh vCPU's"
            _print(
                f"  vcpu {i}: header-only nested state ({how}) stored as null, as Cloud "
                "Hypervisor stores it: it restores no nested state"
            )
    return 0


# --- the parser and main ---------------------------------------------------------------------


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


_FILE_HELP = (
    "a nested-state blob (exactly `size` bytes), a kvmstate file, a QEMU migration stream, "
    "a Cloud Hypervisor state.json or a crosvm vcpu<N> fragment"
)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="kvmstate",
        description="Read, check and explore KVM nested virtualization state.",
        epilog="A FILE is a nested-state blob in the kernel's format, a kvmstate file "
        "(VcpuState.to_bytes, kvmstate.snapshot, or its JSON form), a QEMU migration stream, "
        "a Cloud Hypervisor state.json (or its snapshot directory) or a crosvm vcpu<N> "
        "fragment, told apart by content (--from forces it). Only regular files are read. "
        "Ctrl-C exits with status 130.",
    )
    # Not argparse's "version" action: it writes without print_help, past _OUT.
    parser.add_argument(
        "--version", action="store_true", help="show program's version number and exit"
    )
    sub = parser.add_subparsers(dest="command")

    def vcpu_option(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--vcpu",
            type=_vcpu_arg,
            metavar="N",
            help="in a file of several vCPUs (a VM), only vCPU N: QEMU's cpu index, the "
            "VMM's vCPU id, the position in a kvmstate file (from 0)",
        )
        p.add_argument(
            "--from",
            dest="source_kind",
            choices=tuple(KINDS),
            help="read FILE as this kind instead of telling it by content: kernel (a "
            "nested-state blob), kvmstate, json (kvmstate's JSON form), qemu (a migration "
            "stream), ch (Cloud Hypervisor state.json), crosvm (a vcpu<N> fragment)",
        )

    p = sub.add_parser("info", help="what this machine's KVM offers for nested state")
    p.add_argument("--device", default="/dev/kvm", help="KVM device (default: /dev/kvm)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser(
        "decode",
        help="show a saved nested state by field names",
        description="The nested state by field names: header, vendor header, data pages, and "
        "any bytes no field covers. For a kvmstate file, the nested state of each vCPU.",
    )
    p.add_argument("file", help=_FILE_HELP)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--all", action="store_true", help="include reserved and padding fields")
    vcpu_option(p)
    p.set_defaults(func=_cmd_decode)

    p = sub.add_parser(
        "check",
        help="which rules of KVM_SET_NESTED_STATE a saved state breaks",
        description="Exit status: 0 no rule surely broken, 1 the kernel would refuse the "
        "state (with --strict: or may refuse it), 2 the file cannot be read or an argument "
        "is bad. For a file of vCPUs, each vCPU's nested state is checked, with the facts "
        "its saved CPUID, sregs and MSRs give (--fact overrides them; --svm/--vmx fill in "
        "what the file does not say).",
    )
    p.add_argument("file", help=_FILE_HELP)
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
    p.add_argument(
        "--target",
        metavar="TARGET.json",
        help="what `kvmstate target` printed on the host that will restore the state: every "
        "part and MSR its vCPU would refuse is listed too, and its kernel, vendor and nested "
        "facts decide the rules",
    )
    vcpu_option(p)
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser(
        "target",
        help="what this machine's KVM accepts on restore, as JSON for check --target",
        description="Prints this kernel's MSR lists, capabilities, nested-state size, TSC "
        "scaling and supported CPUID (from a scratch VM and vCPU), for `kvmstate check STATE "
        "--target FILE` on the machine that saved STATE. Exit status 2 without a usable KVM.",
    )
    p.add_argument("--device", default="/dev/kvm", help="the KVM device (default: %(default)s)")
    p.set_defaults(func=_cmd_target)

    p = sub.add_parser(
        "diff",
        help="the fields that differ between two saved states",
        description="Exit status: 0 equal, 1 different, 2 a file cannot be read. Two files "
        "of vCPUs are compared vCPU by vCPU, part by part (regs.rip, msrs[0x174], "
        "nested.flags...); a blob and a file of vCPUs by their nested states.",
    )
    p.add_argument("a", help="the first state")
    p.add_argument("b", help="the second state")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    vcpu_option(p)
    p.set_defaults(func=_cmd_diff)

    p = sub.add_parser(
        "convert",
        help="write a saved state in another format",
        description="Write the vCPUs of IN (or its nested state) as another kind of file. "
        "qemu and ch write into a template's other sections (--template, or IN itself when "
        "it is of that kind), byte for byte where nothing changed. A part the output would "
        "not give back as IN has it is refused, naming it, unless --lossy. Exit status: "
        "0 written, 2 refused or unreadable (OUT is then untouched).",
    )
    p.add_argument("input", metavar="IN", help=_FILE_HELP)
    p.add_argument("output", metavar="OUT", help="the file to write (replaced whole)")
    p.add_argument(
        "--to",
        required=True,
        choices=tuple(OUTPUTS),
        help="kernel: the nested state as KVM_SET_NESTED_STATE takes it; kvmstate, json: "
        "kvmstate's files; qemu: a migration stream (the nested state is written); ch: a "
        "Cloud Hypervisor state.json; crosvm: a vcpu<N> fragment",
    )
    p.add_argument(
        "--template",
        metavar="FILE",
        help="for --to qemu, ch, crosvm: the file whose other sections and vCPUs are kept",
    )
    p.add_argument(
        "--header-only",
        choices=("keep", "drop"),
        help="for --to ch: write a header-only nested state that is not a fresh vCPU's as "
        "the buffer (keep; Cloud Hypervisor restores it) or as null (drop; as it saves)",
    )
    p.add_argument(
        "--lossy",
        action="store_true",
        help="write even if parts of IN do not come back from OUT (they are listed on stderr)",
    )
    vcpu_option(p)
    p.set_defaults(func=_cmd_convert)
    return parser


def _cmd_info(args: argparse.Namespace) -> int:
    data = info(args.device)
    if args.json:
        _print(json.dumps(data, indent=2))
    else:
        _print_info(data)
    return 0 if data["available"] else 1


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
