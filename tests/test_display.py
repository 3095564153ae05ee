"""What states and mirrors look like: flag names, hex MSRs, CPUID by leaf, multi-line forms."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

import pytest

from kvmstate import describe, uapi
from kvmstate.state import VcpuState, msr_lines
from tests.kvm_fixtures import NO_KVM


class Printer:
    """IPython's printer protocol, every breakable a line break (IPython fits short groups)."""

    def __init__(self) -> None:
        self.out: list[str] = []
        self.indent = 0

    def text(self, s: str) -> None:
        self.out.append(s)

    def breakable(self, sep: str = " ") -> None:
        self.out.append("\n" + " " * self.indent)

    break_ = breakable

    @contextlib.contextmanager
    def group(self, indent: int = 0, open: str = "", close: str = "") -> Iterator[None]:
        self.text(open)
        self.indent += indent
        try:
            yield
        finally:
            self.indent -= indent
            self.text(close)

    def pretty(self, obj: Any) -> None:
        if hasattr(obj, "_repr_pretty_"):
            obj._repr_pretty_(self, False)
        else:
            self.text(repr(obj))

    def lines(self, obj: Any) -> list[str]:
        self.pretty(obj)
        return "".join(self.out).splitlines()


def cpuid(*leaves: tuple[int, int, int]) -> uapi.kvm_cpuid2:
    """A kvm_cpuid2 of (function, index, flags) entries, eax = function + index."""
    out = uapi.kvm_cpuid2.new(len(leaves))
    for entry, (function, index, flags) in zip(out.items(), leaves, strict=True):
        entry.function, entry.index, entry.flags = function, index, flags
        entry.eax = function + index
    return out


def test_vcpu_events_flags_read_as_valid_bits() -> None:
    events = uapi.kvm_vcpu_events(
        flags=uapi.KVM_VCPUEVENT_VALID_NMI_PENDING | uapi.KVM_VCPUEVENT_VALID_SMM
    )
    assert "flags=VALID_NMI_PENDING|VALID_SMM," in repr(events)
    assert "flags=VALID_NMI_PENDING|VALID_SMM," in [x.strip() for x in Printer().lines(events)]
    # The former short names still work, as aliases of the VALID_ ones.
    assert uapi.VcpuEventsFlag.SMM is uapi.VcpuEventsFlag.VALID_SMM
    assert "flags=VALID_SHADOW|0x80" in repr(uapi.kvm_vcpu_events(flags=0x84))


def test_cpuid_repr_is_short_and_its_long_form_one_leaf_per_line() -> None:
    leaves = [(f, 0, 0) for f in range(0x20)] + [(0x7, 1, 1), (0x40000000, 0, 0)]
    leaves += [(0x80000000 + f, 0, 0) for f in range(9)] + [(0xD, 19, 1)]
    c = cpuid(*leaves)
    text = repr(c)
    assert text == ("kvm_cpuid2(nent=44, leaves 0x0..0x1f, 0x40000000, 0x80000000..0x80000008)")
    body = str(c).splitlines()
    assert body[0] == "kvm_cpuid2(nent=44):" and len(body) == 45
    assert body[1].split() == [
        "0x00000000",
        "eax=0x00000000",
        "ebx=0x00000000",
        "ecx=0x00000000",
        "edx=0x00000000",
    ]
    assert any(line.startswith("  0x00000007.1  I   eax=0x00000008 ") for line in body)
    assert any(line.startswith("  0x0000000d.19 I   eax=0x00000020") for line in body)
    assert Printer().lines(c) == body
    assert repr(uapi.kvm_cpuid2.new(0)) == "kvm_cpuid2(nent=0)"
    many = cpuid(*[(f * 2, 0, 0) for f in range(10)])
    assert repr(many).endswith(", 0xa, ... 4 more ranges)")
    assert "flags=0x80 eax=0x00000001" in cpuid((1, 0, 0x80)).lines()[0]


@pytest.mark.skipif(NO_KVM is not None, reason=str(NO_KVM))
def test_a_real_cpuid_prints_every_leaf() -> None:
    import kvmstate

    with kvmstate.Kvm() as kvm:
        c = kvm.get_supported_cpuid()
    assert len(repr(c)) < 200
    lines = str(c).splitlines()[1:]
    assert len(lines) == len(c)
    for line, entry in zip(lines, c.items(), strict=True):
        assert line.split()[0].startswith(f"{entry.function:#010x}")
        assert f"ebx={entry.ebx:#010x}" in line


def state() -> VcpuState:
    return VcpuState(
        regs=uapi.kvm_regs(rip=0xFFF0),
        msrs={0xC0000080: 0x500, 0x10: 1234, 0x174: 0},
        cpuid=cpuid((0, 0, 0), (1, 0, 0)),
        tsc_khz=2600000,
        absent={"lapic": "no in-kernel irqchip"},
    )


def test_msrs_show_sorted_and_in_hex() -> None:
    assert msr_lines({0xC0000080: 0x500, 0x10: 1234}) == ["0x10: 0x4d2", "0xc0000080: 0x500"]
    lines = Printer().lines(state())
    start = lines.index("    msrs={")
    assert lines[start + 1 : start + 4] == [
        "        0x10: 0x4d2,",
        "        0x174: 0x0,",
        "        0xc0000080: 0x500},",
    ]
    paths = [p for p, _, _ in describe.vcpu_state_fields(state())]
    assert [p for p in paths if p.startswith("msrs")] == [
        "msrs[0x10]",
        "msrs[0x174]",
        "msrs[0xc0000080]",
    ]
    texts = dict((p, t) for p, _, t in describe.vcpu_state_fields(state()))
    assert texts["msrs[0x10]"] == "0x4d2" and texts["regs.rip"] == "0xfff0"
    assert texts["cpuid[0x1,0].eax"] == "1" and texts["absent.lapic"] == "no in-kernel irqchip"
    assert texts["tsc_khz"] == "2600000"
    with pytest.raises(TypeError, match="needs a VcpuState"):
        list(describe.vcpu_state_fields({}))  # type: ignore[arg-type]


def test_vcpu_state_has_a_multi_line_pretty_form() -> None:
    lines = Printer().lines(state())
    assert lines[0] == "VcpuState("
    assert lines[1] == "    rip=0xfff0,"
    assert lines[2] == "    cpuid=kvm_cpuid2(nent=2):"
    assert lines[3].startswith("      0x00000000 ")  # one leaf per line, indented under it
    assert lines[5:8] == ["    tsc_khz=2600000,", "    regs=kvm_regs(", "        rax=0,"]
    assert "    tsc_khz=2600000," in lines
    assert lines[-1] == "    absent={'lapic': 'no in-kernel irqchip'})"
    parts = [m[1] for line in lines if (m := re.match(r"    (\w+)=", line))]
    assert parts == ["rip", "cpuid", "tsc_khz", "regs", "msrs", "absent"]  # restore order
    empty = Printer().lines(VcpuState())
    assert empty == ["VcpuState()"]


def test_the_pretty_forms_under_ipython() -> None:
    pretty = pytest.importorskip("IPython.lib.pretty")
    text = pretty.pretty(state(), max_width=79)
    assert text.startswith("VcpuState(rip=0xfff0,\n") or text.startswith("VcpuState(\n")
    assert "0x10: 0x4d2" in text and "0xc0000080: 0x500" in text
    assert text.index("0x10: 0x4d2") < text.index("0x174: 0x0") < text.index("0xc0000080")
    assert "kvm_cpuid2(nent=2):\n" in text
    assert all(len(line) <= 100 for line in text.splitlines())
