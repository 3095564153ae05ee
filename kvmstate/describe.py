"""Turning states into words: flat ``path = value`` listings and JSON-ready dicts.

Used by the command line (``kvmstate decode``) and by :func:`kvmstate.diff.diff`.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from typing import Any

from kvmstate import uapi
from kvmstate._struct import Mirror, format_value, to_jsonable
from kvmstate.nested import NestedState
from kvmstate.state import VcpuState

__all__ = ["fields", "nested_state_dict", "nested_state_fields", "vcpu_state_fields"]


def fields(obj: Any, prefix: str = "", *, hidden: bool = False) -> Iterator[tuple[str, Any, str]]:
    """Walk a mirror: ``(dotted path, raw value, formatted value)`` for every leaf field.

    Byte arrays are one leaf; arrays of scalars or structures are indexed
    (``interrupt_bitmap[0]``). Reserved/padding fields are skipped unless
    ``hidden``. TypeError for anything but a mirror (a :class:`~kvmstate._struct.Struct`).
    """
    if not isinstance(obj, Mirror):
        raise TypeError(f"fields() needs a kernel structure mirror, not {type(obj).__name__}")
    names = obj.field_names() if hidden else obj.shown_fields()
    for name in names:
        value = getattr(obj, name)
        path = f"{prefix}{name}"
        if isinstance(value, Mirror):
            yield from fields(value, f"{path}.", hidden=hidden)
        elif isinstance(value, ctypes.Array) and value._type_ not in (
            ctypes.c_uint8,
            ctypes.c_char,
            ctypes.c_byte,
        ):
            for i, item in enumerate(value):
                if isinstance(item, Mirror):
                    yield from fields(item, f"{path}[{i}].", hidden=hidden)
                else:
                    yield f"{path}[{i}]", item, format_value(item, name, obj)
        else:
            raw = bytes(value) if isinstance(value, ctypes.Array) else value
            yield path, raw, format_value(value, name, obj)


def nested_state_fields(
    state: NestedState, *, hidden: bool = False
) -> Iterator[tuple[str, Any, str]]:
    """Every field of a nested state by name: header, vendor header, then data pages."""
    if not isinstance(state, NestedState):
        raise TypeError(f"expected a NestedState, not {type(state).__name__}")
    h = state.header
    yield "flags", h.flags, format_value(h.flags, "flags", h)
    yield "format", h.format, format_value(h.format, "format", h)
    yield "size", h.size, str(h.size)
    vendor = "vmx" if h.format == uapi.KVM_STATE_NESTED_FORMAT_VMX else "svm"
    yield from fields(getattr(h.hdr, vendor), f"hdr.{vendor}.", hidden=hidden)
    for page in ("vmcs12", "shadow_vmcs12", "vmcb12"):
        view = getattr(state, page)
        if view is None:
            continue
        if isinstance(view, Mirror):
            yield from fields(view, f"{page}.", hidden=hidden)
        else:
            raw = bytes(view)
            yield page, raw, format_value(view, page, None)


def vcpu_state_fields(state: VcpuState, *, hidden: bool = False) -> Iterator[tuple[str, Any, str]]:
    """Every field of a whole-vCPU state by name, part by part in restore order.

    Mirrors as :func:`fields` under their part (``sregs.cs.base``); CPUID
    leaves by function and index (``cpuid[0x7,0].ebx``); MSRs sorted by
    index, in hex (``msrs[0x174]``); the nested state as
    :func:`nested_state_fields` under ``nested.``; ``absent.PART`` the reason.

    >>> [p for p, _, t in vcpu_state_fields(VcpuState(msrs={0x176: 1, 0x10: 2}))]
    ['msrs[0x10]', 'msrs[0x176]']
    """
    if not isinstance(state, VcpuState):
        raise TypeError(f"vcpu_state_fields() needs a VcpuState, not {type(state).__name__}")
    for part, value in state.parts().items():
        if part == "msrs":
            for index, data in sorted(value.items()):
                yield f"msrs[{index:#x}]", data, hex(data)
        elif part == "cpuid":
            for entry in list(value.items())[: len(value)]:
                leaf = f"cpuid[{entry.function:#x},{entry.index}]."
                yield from fields(entry, leaf, hidden=hidden)
        elif part == "nested":
            for path, raw, text in nested_state_fields(value, hidden=hidden):
                yield f"nested.{path}", raw, text
        elif part == "tsc_khz":
            yield part, value, str(value)
        elif part == "xsave":
            raw = value.to_bytes()
            yield part, raw, format_value(raw, part, None)
        else:
            yield from fields(value, f"{part}.", hidden=hidden)
    for part, why in sorted(state.absent.items()):
        yield f"absent.{part}", why, why


def nested_state_dict(state: NestedState, *, hidden: bool = False) -> dict[str, Any]:
    """The state for JSON: ``{"fields": {path: int or hex string}, "decoded": {path: names}}``.

    ``decoded`` holds the fields whose values have names (flags, formats);
    ``hidden`` includes the reserved and padding fields, as for
    :func:`nested_state_fields`::

        >>> "hdr.vmx.pad" in nested_state_dict(vmx_state, hidden=True)["fields"]
        True
    """
    values: dict[str, Any] = {}
    decoded: dict[str, str] = {}
    for path, raw, text in nested_state_fields(state, hidden=hidden):
        values[path] = to_jsonable(raw)
        if isinstance(raw, int) and text not in (str(raw), hex(raw)):
            decoded[path] = text
    return {"fields": values, "decoded": decoded}
