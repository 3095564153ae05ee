"""Checked access to decoded values, shared by the Cloud Hypervisor and crosvm readers.

Each reader names values in its own encoding's words (a JSON "object", a CBOR
"map"), so it passes those words in; the checks themselves are the same.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def keyed(
    value: Any, keys: tuple[str, ...], where: str, noun: str, kind: Callable[[Any], str]
) -> dict[Any, Any]:
    """``value`` if it is a dict holding every one of ``keys``, else ValueError naming ``where``.

    ``noun`` is what the encoding calls such a value and ``kind`` names what was found instead.

    >>> keyed({"rip": 1}, ("rip",), "regs", "an object", repr)
    {'rip': 1}
    >>> keyed({}, ("rip", "rsp"), "regs", "an object", repr)
    Traceback (most recent call last):
    ValueError: regs: missing rip, rsp
    """
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected {noun}, found {kind(value)}")
    missing = [k for k in keys if k not in value]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(missing)}")
    return value
