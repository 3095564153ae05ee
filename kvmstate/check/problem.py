"""Problem: one broken rule, and the text that reports a list of them."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from typing import Any

from kvmstate import uapi
from kvmstate import vmcb as svm
from kvmstate import vmcs12 as vmx
from kvmstate._struct import format_value


@dataclasses.dataclass(frozen=True)
class Problem:
    """One rule of KVM_SET_NESTED_STATE that a state breaks (or may break).

    ``field`` is a dotted path into the state (``hdr.svm.vmcb_pa``,
    ``vmcb12.control.asid``, ``flags``), or ``vcpu.<register>`` / ``kvm`` for
    a rule about the target rather than the state. ``certain`` is False when
    the verdict depends on something not known here; ``needs`` then names it
    (a :class:`Facts` field, or what else would decide it).
    """

    field: str
    value: int | None
    rule: str
    source: str
    certain: bool = True
    needs: str | None = None
    #: The rule function of this module that found it (``svm_controls``...), see :data:`RULES`.
    rule_id: str = ""

    @property
    def value_text(self) -> str:
        """The value as the field's own decoder shows it (flag names, hex); "-" if None."""
        return _show(self.field, self.value)

    @property
    def subject(self) -> str:
        """``field = value`` (just the field when the value is not known)."""
        return self.field if self.value is None else f"{self.field} = {self.value_text}"

    def __str__(self) -> str:
        text = f"{self.subject}: {self.rule} [{self.source}]"
        if not self.certain:
            text += f" (undecided: depends on {self.needs}, not known here)"
        return text

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: every field, plus ``value_text``."""
        out = dataclasses.asdict(self)
        out["value_text"] = None if self.value is None else self.value_text
        return out


# The structure that decodes each path prefix's fields (flag names, decimal counts).
_OWNERS: tuple[tuple[str, Any], ...] = (
    ("hdr.vmx.smm.", uapi.kvm_vmx_nested_state_hdr_smm),
    ("hdr.vmx.", uapi.kvm_vmx_nested_state_hdr),
    ("hdr.svm.", uapi.kvm_svm_nested_state_hdr),
    ("vmcb12.control.", svm.vmcb_control_area),
    ("vmcb12.save.cs.", svm.vmcb_seg),
    ("vmcb12.save.", svm.vmcb_save_area),
    ("vmcs12.", vmx.vmcs12),
    ("shadow_vmcs12.", vmx.vmcs12),
    ("vcpu.", svm.vmcb_save_area),  # efer, cr0, cr4 decode the same way
    ("", uapi.kvm_nested_state_header),
)


def _show(field: str, value: int | None) -> str:
    if value is None:
        return "-"
    owner = next(o for prefix, o in _OWNERS if field.startswith(prefix))
    name = re.sub(r"\[\d+\]$", "", field.rsplit(".", 1)[-1])
    return format_value(value, name, owner)


def format_problems(problems: Iterable[Problem]) -> str:
    """Problems as text: what the kernel refuses, then what depends on unknown facts."""
    problems = list(problems)
    sure = [p for p in problems if p.certain]
    unsure = [p for p in problems if not p.certain]
    if not problems:
        return "no rule of KVM_SET_NESTED_STATE known to kvmstate is broken"
    lines: list[str] = []
    if sure:
        fields = ", ".join(dict.fromkeys(p.field for p in sure))
        count = f"{len(sure)} problem{'s' if len(sure) > 1 else ''}"
        lines.append(f"KVM_SET_NESTED_STATE refuses this state ({count}: {fields}):")
        lines.extend(f"  - {p}" for p in sure)
    if unsure:
        if not sure:
            lines.append("no rule is surely broken, but the kernel may refuse this state:")
        else:
            lines.append("and it may also refuse it:")
        by_fact: dict[str, list[Problem]] = {}
        for p in unsure:
            by_fact.setdefault(p.needs or "?", []).append(p)
        for fact, items in by_fact.items():
            lines.append(f"  depending on {fact}:")
            lines.extend(f"    - {p.subject}: {p.rule} [{p.source}]" for p in items)
    return "\n".join(lines)
