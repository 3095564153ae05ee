"""The hand-assembled L1 hypervisors, checked by disassembling them with objdump."""

from __future__ import annotations

import itertools
import shutil
import struct
from collections import Counter
from pathlib import Path

import pytest

from tests.support import asm, vmx_l1

pytestmark = pytest.mark.skipif(
    shutil.which("objdump") is None, reason="objdump is not installed (apt-get install binutils)"
)


def disassemble(code: bytes, origin: int, workdir: Path) -> list[tuple[int, str]]:
    """objdump's (address, instruction) for 32-bit ``code`` loaded at ``origin``."""
    return asm.objdump(code, origin, workdir)


@pytest.fixture(scope="module")
def listing(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[int, str]]:
    return disassemble(vmx_l1.program(), vmx_l1.CODE, tmp_path_factory.mktemp("l1"))


def code_part(listing: list[tuple[int, str]]) -> list[tuple[int, str]]:
    # Up to the 8-byte aligned pointers at the end, which are data.
    end = next(i for i, (_, text) in enumerate(listing) if text == "nop")
    return listing[:end]


def test_vmx_instructions_in_order(listing: list[tuple[int, str]]) -> None:
    mnemonics = [text.split()[0] for _, text in code_part(listing)]
    order = [m for m in mnemonics if m in ("vmxon", "vmclear", "vmptrld", "vmlaunch", "vmcall")]
    assert order == ["vmxon", "vmclear", "vmptrld", "vmlaunch", "vmcall"]
    assert mnemonics.count("vmwrite") >= 40
    assert mnemonics.count("vmread") == 2


def test_every_jump_lands_on_an_instruction(listing: list[tuple[int, str]]) -> None:
    code = code_part(listing)
    starts = {address for address, _ in code}
    jumps = [text for _, text in code if text.split()[0] in ("jbe", "je", "jne", "jmp")]
    assert jumps
    for text in jumps:
        target = int(text.split()[1], 16)
        assert target in starts, text


def test_pointers_hold_the_regions() -> None:
    blob = vmx_l1.program()
    assert blob.endswith(vmx_l1.VMXON.to_bytes(8, "little") + vmx_l1.VMCS.to_bytes(8, "little"))
    assert len(blob) < vmx_l1.PAGE_DIR - vmx_l1.CODE  # fits below the page directory


def test_memory_map_is_disjoint() -> None:
    regions = [vmx_l1.CODE, vmx_l1.PAGE_DIR, vmx_l1.VMXON, vmx_l1.VMCS, vmx_l1.L2_STACK - 0x1000]
    assert sorted(regions) == regions and len(set(r // 0x1000 for r in regions)) == len(regions)


# --------------------------------------------------------------------------- the migration L1

IMAGE = vmx_l1.nested_image()
GPA = vmx_l1.GPA
JUMPS = ("jbe", "je", "jne", "jb", "jmp", "call")


@pytest.fixture(scope="module")
def nested(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[int, str]]:
    return disassemble(IMAGE.code, GPA.CODE, tmp_path_factory.mktemp("nested"))


def test_nested_code_decodes_to_the_end(nested: list[tuple[int, str]]) -> None:
    assert not [text for _, text in nested if "(bad)" in text]
    last, text = nested[-1]
    assert text == f"jmp    {last:#x}"  # L2's failure path ends in jmp $: nothing runs past it


def test_nested_jumps_and_labels_land_on_instructions(nested: list[tuple[int, str]]) -> None:
    starts = {address for address, _ in nested}
    targets = [int(t.split()[1], 16) for _, t in nested if t.split()[0] in JUMPS]
    assert len(targets) > 100
    assert set(targets) <= starts
    assert set(IMAGE.labels.values()) <= starts


def test_nested_vmx_instructions(nested: list[tuple[int, str]]) -> None:
    counts = Counter(text.split()[0] for _, text in nested)
    # VMCLEAR/VMPTRLD of the VMCS at the start; of the shadow VMCS, and back, for
    # SHADOW_ON; VMPTRLD and VMCLEAR of the shadow VMCS at the end.
    once = ("vmxon", "vmlaunch", "vmresume", "vmxoff")
    assert [counts[m] for m in once] == [1, 1, 1, 1]
    assert (counts["vmclear"], counts["vmptrld"]) == (3, 4)
    vmcalls = [a for a in vmx_l1.SCRIPT if a.name in
               ("VMCALL", "INJECT_SOFT", "TIMER_ON", "TIMER_ZERO", "SHADOW_ON")]  # fmt: skip
    assert counts["vmcall"] == len(vmcalls) + 1  # and DONE
    assert counts["cpuid"] == vmx_l1.SCRIPT.count(vmx_l1.Action.CPUID)
    assert counts["pusha"] == counts["popa"] == 1  # L1's save and restore of L2's registers
    # Two VMREADs and one VMWRITE of the shadow VMCS in L2 for each SHADOW_RW.
    l2 = [t for a, t in nested if a >= IMAGE.labels["l2_entry"]]
    shadow_rw = vmx_l1.SCRIPT.count(vmx_l1.Action.SHADOW_RW)
    assert sum(t.startswith("vmread") for t in l2) == 2 * shadow_rw
    assert sum(t.startswith("vmwrite") for t in l2) == shadow_rw


def test_nested_idt_gates_reach_handlers_that_return(nested: list[tuple[int, str]]) -> None:
    idt = IMAGE.pages[GPA.L2_IDT]
    text = dict(nested)
    order = [address for address, _ in nested]
    present = []
    for vector in range(256):
        low, high = struct.unpack_from("<II", idt, vector * 8)
        if not high & 0x8000:
            continue
        present.append(vector)
        assert low >> 16 == vmx_l1.CS_SEL and high & 0x1F00 == 0x0E00  # 32-bit interrupt gate
        handler = (high & 0xFFFF_0000) | (low & 0xFFFF)
        body = [text[a] for a in order[order.index(handler) :][:8]]
        assert body[0] == "push   eax" and "iret" in body
    assert present == sorted((vmx_l1.VECTOR_NMI, vmx_l1.VECTOR_EXTERNAL, vmx_l1.VECTOR_SOFT))


def test_nested_memory_map() -> None:
    pages = sorted((a, len(d)) for a, d in IMAGE.pages.items())
    for (a, n), (b, _) in itertools.pairwise(pages):
        assert a + n <= b, hex(b)  # no part overlaps the next
    assert GPA.CODE + len(IMAGE.code) <= GPA.BUFFER
    assert GPA.BUFFER + 4 * vmx_l1.WORDS <= GPA.MEMORY
    assert GPA.BUFFER // 4096 != (GPA.BUFFER + 4 * vmx_l1.WORDS - 1) // 4096  # two pages
    assert GPA.L2_STACK <= GPA.L1_STACK - 0x1000 and GPA.L1_STACK <= GPA.CODE


def test_nested_bitmaps() -> None:
    def bit(page: int, n: int) -> bool:
        return bool(IMAGE.pages[page][n >> 3] >> (n & 7) & 1)

    io = [p for p in range(0x8000) if bit(GPA.IO_BITMAP_A, p)]
    assert io == [vmx_l1.Port.L1_IO] and not any(IMAGE.pages[GPA.IO_BITMAP_B])
    # L2 reads both shadow fields and writes its own without exiting; every other field exits.
    fields = (vmx_l1.SHADOW_FIELD_L1, vmx_l1.SHADOW_FIELD_L2)
    assert [f for f in range(0x8000) if not bit(GPA.VMREAD_BITMAP, f)] == list(fields)
    assert [f for f in range(0x8000) if not bit(GPA.VMWRITE_BITMAP, f)] == [fields[1]]
