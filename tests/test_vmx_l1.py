"""The hand-assembled L1 hypervisor, checked by disassembling it with objdump."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.support import vmx_l1

pytestmark = pytest.mark.skipif(
    shutil.which("objdump") is None, reason="objdump is not installed (apt-get install binutils)"
)


@pytest.fixture(scope="module")
def listing(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[int, str]]:
    blob = tmp_path_factory.mktemp("l1") / "l1.bin"
    blob.write_bytes(vmx_l1.program())
    out = subprocess.run(
        ["objdump", "-D", "-b", "binary", "-mi386", "-Mintel", f"--adjust-vma={vmx_l1.CODE:#x}",
         str(blob)],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    lines = []
    for line in out.splitlines():
        m = re.match(r"\s+([0-9a-f]+):\t(?:[0-9a-f]{2} )+\s*\t(.*)", line)
        if m:
            lines.append((int(m.group(1), 16), m.group(2).strip()))
    return lines


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
