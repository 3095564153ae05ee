"""The assembler the hand-assembled test programs share: bytes, labels, fixups.

tests/support/svm_l1.py (64-bit), vmx_l1.py and qemu_payload.py (32-bit)
each build on :class:`Assembler` with the instructions their programs need.
What is here is the same in all of them: the code buffer at an origin,
labels, fields filled in from a label's address at :meth:`Assembler.build`
(absolute 32-bit, or relative 32- and 8-bit), little-endian packing, and the
few encodings that mean the same in 32-bit and 64-bit mode.

An instruction written with :meth:`Assembler.insn` carries the text
``objdump -M intel`` prints for it (``{label}`` for a label's address), so a
program written with nothing else can be checked instruction by instruction
(:meth:`Assembler.listing`, tests/test_svm_l1.py); :func:`objdump` gives
what binutils makes of the bytes, for the tests to compare.
"""

from __future__ import annotations

import dataclasses
import re
import struct
import subprocess
from pathlib import Path

REG32 = {"eax": 0, "ecx": 1, "edx": 2, "ebx": 3, "esp": 4, "ebp": 5, "esi": 6, "edi": 7}
REG64 = {"rax": 0, "rcx": 1, "rdx": 2, "rbx": 3, "rsp": 4, "rbp": 5, "rsi": 6, "rdi": 7}
#: Condition codes of Jcc (0F 80+cc rel32), by the suffix after ``j``.
CC = {"b": 0x2, "ae": 0x3, "e": 0x4, "ne": 0x5, "be": 0x6, "a": 0x7}


def u16(value: int) -> bytes:
    return struct.pack("<H", value)


def u32(value: int) -> bytes:
    """The low 32 bits of ``value`` (so ``~mask`` and negative numbers pack as x86 has them)."""
    return struct.pack("<I", value & 0xFFFF_FFFF)


def u64(value: int) -> bytes:
    return struct.pack("<Q", value)


@dataclasses.dataclass(frozen=True)
class Fix:
    """A field :meth:`Assembler.build` fills in from ``label``'s address."""

    label: str
    kind: str  # "abs32" (the address), "rel32" or "rel8" (from the field's end)

    @property
    def width(self) -> int:
        return 1 if self.kind == "rel8" else 4


class Assembler:
    """Machine code at ``origin``: emit bytes, name addresses, refer to names before they exist."""

    def __init__(self, origin: int) -> None:
        self.origin = origin
        self.code = bytearray()
        self.labels: dict[str, int] = {}
        self.fixups: list[tuple[int, Fix]] = []  # (offset in code, the field)
        self.texts: list[tuple[int, str]] = []  # (address, objdump text) of insn()'s

    @property
    def here(self) -> int:
        return self.origin + len(self.code)

    def label(self, name: str) -> None:
        if name in self.labels:
            raise ValueError(f"label {name} defined twice")
        self.labels[name] = self.here

    def emit(self, *parts: int | bytes | Fix) -> None:
        """Bytes (an int is one byte); a :class:`Fix` reserves its field."""
        for part in parts:
            if isinstance(part, Fix):
                self.fixups.append((len(self.code), part))
                self.code += bytes(part.width)
            elif isinstance(part, int):
                self.code.append(part)
            else:
                self.code += part

    def insn(self, text: str, *parts: int | bytes | Fix) -> None:
        """One instruction: its bytes, and the text objdump prints for it."""
        self.texts.append((self.here, text))
        self.emit(*parts)

    def u32(self, value: int | str) -> None:
        """A dword: ``value``, or the address of the label it names."""
        self.emit(Fix(value, "abs32") if isinstance(value, str) else u32(value))

    def rel32(self, label: str) -> None:
        self.emit(Fix(label, "rel32"))

    def rel8(self, label: str) -> None:
        self.emit(Fix(label, "rel8"))

    def build(self) -> bytes:
        """The code with every field filled in; a short jump out of reach is a ValueError."""
        for offset, fix in self.fixups:
            target = self.labels[fix.label]
            if fix.kind == "abs32":
                struct.pack_into("<I", self.code, offset, target)
                continue
            delta = target - (self.origin + offset + fix.width)
            if fix.kind == "rel8" and not -128 <= delta <= 127:
                raise ValueError(f"short jump to {fix.label} is {delta} bytes away")
            struct.pack_into("<b" if fix.width == 1 else "<i", self.code, offset, delta)
        return bytes(self.code)

    def listing(self) -> list[tuple[int, str]]:
        """(address, objdump text) of every :meth:`insn`, labels resolved (after build)."""
        names = {name: f"{address:#x}" for name, address in self.labels.items()}
        return [(address, text.format(**names)) for address, text in self.texts]

    # --- encodings alike in 32-bit and 64-bit mode ------------------------------------
    def mov_imm(self, reg: str, value: int | str) -> None:
        """mov r32, imm32 (B8+r; a label's address when ``value`` is a name)."""
        if isinstance(value, str):
            self.insn(f"mov {reg},{{{value}}}", 0xB8 + REG32[reg], Fix(value, "abs32"))
        else:
            self.insn(f"mov {reg},{value:#x}", 0xB8 + REG32[reg], u32(value))

    def or_eax(self, value: int) -> None:
        self.insn(f"or eax,{value:#x}", 0x0D, u32(value))

    def jmp(self, label: str) -> None:
        """jmp rel32."""
        self.insn(f"jmp {{{label}}}", 0xE9, Fix(label, "rel32"))

    def jcc(self, cc: str, label: str) -> None:
        """j<cc> rel32, ``cc`` one of :data:`CC` (``"e"``, ``"ne"``, ``"be"`` ...)."""
        self.insn(f"j{cc} {{{label}}}", 0x0F, 0x80 + CC[cc], Fix(label, "rel32"))

    def call(self, label: str) -> None:
        self.insn(f"call {{{label}}}", 0xE8, Fix(label, "rel32"))

    def mov_from_cr(self, cr: int, reg: str = "eax") -> None:
        """mov eax (or rax in 64-bit mode), crN."""
        if reg not in ("eax", "rax"):
            raise ValueError(f"mov from cr{cr} is written to eax or rax here, not {reg}")
        self.insn(f"mov {reg},cr{cr}", 0x0F, 0x20, 0xC0 | cr << 3)

    def mov_to_cr(self, cr: int) -> None:
        """mov crN, eax."""
        self.insn(f"mov cr{cr},eax", 0x0F, 0x22, 0xC0 | cr << 3)

    def rdmsr(self, msr: int) -> None:
        """mov ecx, msr; rdmsr."""
        self.mov_imm("ecx", msr)
        self.insn("rdmsr", 0x0F, 0x32)

    def wrmsr(self) -> None:
        self.insn("wrmsr", 0x0F, 0x30)


def objdump(code: bytes, origin: int, workdir: Path, *, bits: int = 32) -> list[tuple[int, str]]:
    """(address, instruction text) as ``objdump -M intel`` decodes ``code`` loaded at
    ``origin``, in 32-bit or 64-bit mode; ``workdir`` takes the file it reads."""
    blob = workdir / f"code-{origin:#x}.bin"
    blob.write_bytes(code)
    machine = {32: "i386", 64: "i386:x86-64"}[bits]
    out = subprocess.run(
        ["objdump", "-D", "-b", "binary", f"-m{machine}", "-Mintel",
         f"--adjust-vma={origin:#x}", str(blob)],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    found = (
        re.match(r"\s+([0-9a-f]+):\t(?:[0-9a-f]{2} )+\s*\t(.*)", line) for line in out.splitlines()
    )
    return [(int(m[1], 16), m[2].strip()) for m in found if m]
