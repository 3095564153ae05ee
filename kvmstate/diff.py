"""What differs between two nested states (or two mirrors), field by field, by name.

:func:`diff` walks two :class:`~kvmstate.nested.NestedState` objects the way
``kvmstate decode`` shows them (:func:`kvmstate.describe.nested_state_fields`):
header, vendor header, then the vmcs12/vmcb12 pages, and returns a
:class:`Differences` list whose reprs speak (flag names, hex addresses)::

    >>> diff(before, after)
    Differences(2):
      flags: GIF_SET -> GUEST_MODE|GIF_SET
      vmcb12.control.asid: 0 -> 1

A difference in ``size`` or ``format`` comes first; a vendor header or a data
page that one state has and the other lacks is one difference, not one per
field. Reserved and padding fields are compared too, and bytes no field
covers (the rest of the header union) still show up, so an empty result
means the two states have the same bytes. :func:`diff_structs` does the same
for any two mirrors of one type (two ``vmcb_save_area``, two ``kvm_sregs``...).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from typing import Any

from kvmstate import describe
from kvmstate._struct import Mirror, to_jsonable
from kvmstate.nested import NestedState

__all__ = ["ABSENT", "Difference", "Differences", "diff", "diff_structs"]

#: The text shown for a side that does not have the field or page.
ABSENT = "absent"
_PRESENT = "present"
# The top-level parts of a state a missing side is reported for as a whole.
_UNITS = ("hdr.vmx", "hdr.svm", "vmcs12", "shadow_vmcs12", "vmcb12")


@dataclasses.dataclass(frozen=True)
class Difference:
    """One field (or page) that differs: its path, both raw values and how they read.

    A side without the field or page has the raw value None and the text
    :data:`ABSENT`.
    """

    path: str
    a: Any
    b: Any
    a_text: str
    b_text: str

    def __str__(self) -> str:
        return f"{self.path}: {self.a_text} -> {self.b_text}"

    def __repr__(self) -> str:
        return f"Difference({self.path}: {self.a_text} -> {self.b_text})"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ints stay ints, bytes become hex strings."""
        return {
            "path": self.path,
            "a": to_jsonable(self.a),
            "b": to_jsonable(self.b),
            "a_text": self.a_text,
            "b_text": self.b_text,
        }


class Differences(list[Difference]):
    """The result of :func:`diff`: a list of :class:`Difference`, one per line in a repr."""

    def __repr__(self) -> str:
        if not self:
            return "Differences(0): equal"
        return "\n".join([f"Differences({len(self)}):", *(f"  {d}" for d in self)])

    __str__ = __repr__

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        """IPython: the same lines as the repr."""
        p.text(repr(self) if not cycle else "Differences(...)")

    def paths(self) -> list[str]:
        """The paths that differ, in order."""
        return [d.path for d in self]

    def to_list(self) -> list[dict[str, Any]]:
        """JSON-ready list of :meth:`Difference.to_dict`."""
        return [d.to_dict() for d in self]


def _unit(path: str) -> str | None:
    for unit in _UNITS:
        if path == unit or path.startswith(unit + "."):
            return unit
    return None


def _walk(state: NestedState) -> dict[str, tuple[Any, str]]:
    """Every field of the state, reserved ones included: path -> (raw, text)."""
    return {
        path: (raw, text) for path, raw, text in describe.nested_state_fields(state, hidden=True)
    }


def _raw(state: NestedState) -> bytes:
    """The bytes the state uses (its ``size``, within the buffer)."""
    return bytes(state.buffer[: min(max(state.size, 0), state.capacity)])


def diff(a: NestedState, b: NestedState) -> Differences:
    """Every difference between two nested states, by field name (see the module doc).

    >>> from kvmstate.diff import diff
    >>> a = kvmstate.NestedState(4224)
    >>> a.format, a.size = kvmstate.NestedFormat.SVM, 4224
    >>> b = a.copy()
    >>> b.vmcb12.control.asid = 1
    >>> diff(a, b).paths()
    ['vmcb12.control.asid']

    :raises TypeError: ``a`` or ``b`` is not a NestedState.
    """
    for name, value in (("a", a), ("b", b)):
        if not isinstance(value, NestedState):
            raise TypeError(
                f"diff() needs two NestedState objects; {name} is {type(value).__name__}"
            )
    fa, fb = _walk(a), _walk(b)
    out = Differences()
    first = ("size", "format")
    for path in first:
        (ra, ta), (rb, tb) = fa[path], fb[path]
        if ra != rb:
            out.append(Difference(path, ra, rb, ta, tb))
    units_a = {u for u in map(_unit, fa) if u}
    units_b = {u for u in map(_unit, fb) if u}
    reported: set[str] = set()
    for path in [*fa, *(p for p in fb if p not in fa)]:
        if path in first:
            continue
        unit = _unit(path)
        if unit is not None and (unit in units_a) != (unit in units_b):
            if unit not in reported:
                reported.add(unit)
                a_has = unit in units_a
                out.append(
                    Difference(
                        unit,
                        _PRESENT if a_has else None,
                        None if a_has else _PRESENT,
                        _PRESENT if a_has else ABSENT,
                        ABSENT if a_has else _PRESENT,
                    )
                )
            continue
        (ra, ta), (rb, tb) = fa[path], fb[path]
        if ra != rb:
            out.append(Difference(path, ra, rb, ta, tb))
    if not out:
        out.extend(_byte_differences(_raw(a), _raw(b)))
    return out


def _byte_differences(a: bytes, b: bytes) -> Iterator[Difference]:
    """Bytes no field covers (the unused part of the header union): one range."""
    if a == b:
        return
    length = min(len(a), len(b))
    start = next((i for i in range(length) if a[i] != b[i]), length)
    end = max(i for i in range(max(len(a), len(b))) if a[i : i + 1] != b[i : i + 1]) + 1
    path = f"bytes[{start:#x}:{end:#x}]"
    ra, rb = a[start:end], b[start:end]
    yield Difference(path, ra, rb, ra.hex() or ABSENT, rb.hex() or ABSENT)


def diff_structs(a: Any, b: Any) -> Differences:
    """Every field that differs between two mirrors of the same type (reserved ones included)."""
    if not isinstance(a, Mirror) or type(a) is not type(b):
        raise TypeError(
            f"diff_structs() needs two mirrors of one type, not {type(a).__name__} "
            f"and {type(b).__name__}"
        )
    out = Differences()
    pairs: Iterable[tuple[tuple[str, Any, str], tuple[str, Any, str]]] = zip(
        describe.fields(a, hidden=True), describe.fields(b, hidden=True), strict=True
    )
    for (path, ra, ta), (_, rb, tb) in pairs:
        if ra != rb:
            out.append(Difference(path, ra, rb, ta, tb))
    return out
