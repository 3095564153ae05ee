"""The ``kvmstate`` command (also ``python -m kvmstate``).

Commands: ``info`` (what this machine's KVM offers for nested state),
``decode FILE`` (a saved nested-state blob by field names), ``check FILE``
(which rules of KVM_SET_NESTED_STATE it breaks) and ``diff A B``. Bad input
is one ``kvmstate: error: ...`` line and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvmstate import __version__, describe
from kvmstate import check as checks
from kvmstate import diff as diffs
from kvmstate.errors import NestedStateUnavailableError
from kvmstate.nested import HEADER_SIZE, NestedState
from kvmstate.system import Kvm

__all__ = ["main"]

#: Largest file ``decode`` reads: far above any nested state (8320 bytes today).
MAX_BLOB = 1 << 20

_NESTED_PARAMS = {
    "kvm_intel": "/sys/module/kvm_intel/parameters/nested",
    "kvm_amd": "/sys/module/kvm_amd/parameters/nested",
}


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


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
    """What ``kvmstate info`` reports, as a dict."""
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
    print(f"device:               {data['device']}")
    if not data["available"]:
        print(f"  not usable: {data['error']}")
    else:
        print(f"KVM API version:      {data['api_version']}")
        size = data["nested_state_size"]
        fmt = f" ({data['nested_format']} format)" if data.get("nested_format") else ""
        print(f"KVM_CAP_NESTED_STATE: {size}{fmt}")
    print(f"CPU vendor:           {data['cpu_vendor'] or 'unknown'}")
    for module, value in data["nested_parameter"].items():
        label = f"{module} nested:"
        print(f"{label:<22}{value if value is not None else '(module not loaded)'}")
    if data.get("missing"):
        print(f"nested state unavailable: {data['missing']}")


def _read_blob(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BLOB + 1)
    except OSError as exc:
        raise CliError(f"{path}: {exc.strerror or exc}") from None
    except ValueError as exc:  # a NUL in the path: shown escaped, on one line
        shown = path.replace("\0", "\\0")
        raise CliError(f"{shown}: {exc}") from None
    if len(data) > MAX_BLOB:
        raise CliError(f"{path}: larger than {MAX_BLOB} bytes, not a nested state")
    return data


def _load_blob(path: str) -> NestedState:
    data = _read_blob(path)
    try:
        return NestedState.from_bytes(data)
    except ValueError as exc:
        raise CliError(f"{path}: {exc}") from None


def _cmd_info(args: argparse.Namespace) -> int:
    data = info(args.device)
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        _print_info(data)
    return 0 if data["available"] else 1


def _cmd_decode(args: argparse.Namespace) -> int:
    state = _load_blob(args.file)
    if args.json:
        print(json.dumps(describe.nested_state_dict(state), indent=2))
        return 0
    print(repr(state))
    for path, _raw, text in describe.nested_state_fields(state, hidden=args.all):
        print(f"  {path} = {text}")
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
            f"{args.file}: truncated nested state: {len(data)} bytes, "
            f"the header alone is {HEADER_SIZE}"
        )
    facts = _facts(args)
    problems = checks.check(data, facts)
    refused = any(p.certain for p in problems)
    if args.json:
        report = {
            "file": args.file,
            "refused": refused,
            "facts": {k: _json_fact(v) for k, v in facts.known().items()},
            "problems": [p.to_dict() for p in problems],
        }
        print(json.dumps(report, indent=2))
    else:
        print(f"{args.file}: {checks.format_problems(problems)}")
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
        print(json.dumps({"equal": not found, "differences": found.to_list()}, indent=2))
    elif found:
        for difference in found:
            print(difference)
    else:
        print("equal")
    return 1 if found else 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvmstate",
        description="Read, check and explore KVM nested virtualization state.",
    )
    parser.add_argument("--version", action="version", version=f"kvmstate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="what this machine's KVM offers for nested state")
    p.add_argument("--device", default="/dev/kvm", help="KVM device (default: /dev/kvm)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("decode", help="show a saved nested-state blob by field names")
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kvmstate`` command; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except CliError as exc:
        print(f"kvmstate: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # Output piped into `head`: not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
