"""The ``kvmstate`` command (also ``python -m kvmstate``).

Commands: ``info`` (what this machine's KVM offers for nested state) and
``decode FILE`` (a saved nested-state blob by field names). Bad input is
one ``kvmstate: error: ...`` line and exit status 2, never a traceback.
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
from kvmstate.errors import NestedStateUnavailableError
from kvmstate.nested import NestedState
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
    except OSError as exc:
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


def _load_blob(path: str) -> NestedState:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BLOB + 1)
    except OSError as exc:
        raise CliError(f"{path}: {exc.strerror or exc}") from None
    if len(data) > MAX_BLOB:
        raise CliError(f"{path}: larger than {MAX_BLOB} bytes, not a nested state")
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
