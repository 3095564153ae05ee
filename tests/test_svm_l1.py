"""The hand-assembled SVM L1 (tests/support/svm_l1.py), checked on the host with objdump.

Every instruction's bytes must disassemble to exactly the text the assembler
wrote next to them; the VMCB the program would build is then replayed from
objdump's own decoding and read back by field name.
"""

from __future__ import annotations

import itertools
import re
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest

from kvmstate import vmcb
from kvmstate.vmcb import Intercept
from tests.support import asm, svm_l1


def objdump(code: bytes, workdir: Path) -> dict[int, str]:
    """address -> instruction text, as objdump -M intel prints it (x86-64)."""
    return dict(asm.objdump(code, svm_l1.CODE, workdir, bits=64))


def normal(text: str) -> str:
    """Lower case, single spaces, no spaces around commas."""
    return re.sub(r"\s*,\s*", ",", " ".join(text.lower().split()))


@pytest.fixture(scope="module", params=[False, True], ids=["shadow", "npt"])
def decoded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    if shutil.which("objdump") is None:
        pytest.skip("objdump is not installed (apt-get install binutils)")
    npt = request.param
    return npt, objdump(svm_l1.program(npt), tmp_path_factory.mktemp("svm_l1"))


def test_every_instruction_disassembles_to_its_text(decoded: Any) -> None:
    npt, got = decoded
    wanted = svm_l1.listing(npt)
    assert [address for address, _ in wanted] == sorted(got)  # same instruction boundaries
    for address, text in wanted:
        assert normal(got[address]) == normal(text), f"{address:#x}"
    assert "(bad)" not in " ".join(got.values())


def test_no_operand_is_rip_relative(decoded: Any) -> None:
    # ModRM rm=101 without SIB is RIP-relative in 64-bit mode: absolute operands must use SIB.
    _, got = decoded
    assert not [text for text in got.values() if "rip" in text]


def test_svm_instructions_in_order(decoded: Any) -> None:
    _, got = decoded
    svm = [text.split()[0] for _, text in sorted(got.items())]
    svm = [m for m in svm if m in ("clgi", "stgi", "vmrun", "vmmcall", "cpuid", "iretq")]
    # L1: CLGI, then the loop's VMRUN, STGI, CLGI; L2: CPUID and VMMCALLs; the handler's IRETQ.
    assert svm == ["clgi", "vmrun", "stgi", "clgi", "cpuid", "vmmcall", "vmmcall", "iretq"]


def replay(got: dict[int, str]) -> tuple[bytearray, dict[int, str]]:
    """Apply the program's immediate stores to zeroed memory, from objdump's decoding,
    in address order, skipping the run-time EVENTINJ writes (see the test of those).

    Returns the memory and the absolute destinations of register stores (address -> register).
    """
    memory = bytearray(svm_l1.MEMORY)
    from_regs = {}
    sizes = {"byte": 1, "word": 2, "dword": 4, "qword": 8}
    for text in got.values():
        m = re.fullmatch(r"mov\s+(byte|word|dword|qword) ptr ds:(0x[0-9a-f]+),(\S+)", text.lower())
        if not m:
            continue
        size, address, source = sizes[m.group(1)], int(m.group(2), 16), m.group(3)
        if address == svm_l1.ctl("event_inj"):
            continue
        if source.startswith("0x"):
            memory[address : address + size] = int(source, 16).to_bytes(size, "little")
        else:
            from_regs[address] = source
    return memory, from_regs


def test_the_vmcb_by_field_name(decoded: Any) -> None:
    npt, got = decoded
    memory, from_regs = replay(got)
    page = vmcb.vmcb.from_buffer_copy(memory[svm_l1.VMCB : svm_l1.VMCB + 4096])
    c, s = page.control, page.save
    for bit in (Intercept.VMRUN, Intercept.VMMCALL, Intercept.CPUID, Intercept.IOIO_PROT,
                Intercept.MSR_PROT, Intercept.HLT, Intercept.SHUTDOWN):  # fmt: skip
        assert c.is_intercept(bit), bit.name
    assert not c.is_intercept(Intercept.INTR)  # nothing else from word 3
    assert (c.iopm_base_pa, c.msrpm_base_pa, c.asid) == (svm_l1.IOPM, svm_l1.MSRPM, 1)
    assert c.nested_ctl == (vmcb.SVM_NESTED_CTL_NP_ENABLE if npt else 0)
    assert c.nested_cr3 == (svm_l1.NPT_PML4 if npt else 0)
    # EVENTINJ: cleared at every #VMEXIT, set once (valid, external interrupt, the vector).
    where = f"ds:{svm_l1.ctl('event_inj'):#x},"
    written = [t.split(",")[-1] for t in got.values() if where in t.lower()]
    assert [int(v, 16) for v in written] == [0, vmcb.SVM_EVTINJ_VALID | svm_l1.EVENT_VECTOR]
    assert (s.cs.selector, s.ss.selector, s.ds.selector) == (0x08, 0x10, 0x10)  # gdt()
    assert s.cs.attrib & vmcb.SVM_SELECTOR_L_MASK and not s.cs.attrib & vmcb.SVM_SELECTOR_DB_MASK
    assert (s.gdtr.base, s.gdtr.limit) == (svm_l1.GDT, len(svm_l1.gdt()) - 1)
    assert s.rip == svm_l1.labels(npt)["l2_entry"] and s.rsp == svm_l1.L2_STACK
    assert (s.dr6, s.dr7, s.rflags) == (0xFFFF0FF0, 0x400, 2)
    # CR0/CR3/CR4, EFER and the PAT come from registers at setup; at #VMEXITs the IOIO
    # handler sets RIP from EXITINFO2 and the CPUID handler sets L2's RAX.
    save = svm_l1.save
    wanted = {save(f): "rax" for f in ("cr0", "cr3", "cr4", "g_pat", "rip", "rax")}
    wanted |= {save("efer"): "eax", save("efer") + 4: "edx"}
    assert {a: r for a, r in from_regs.items() if svm_l1.VMCB <= a < svm_l1.VMCB + 4096} == wanted


def test_the_iopm_sends_only_the_l1_port_to_l1(decoded: Any) -> None:
    _, got = decoded
    memory, _ = replay(got)
    iopm = memory[svm_l1.IOPM : svm_l1.IOPM + vmcb.IOPM_SIZE]

    def intercepted(port: int) -> bool:
        return bool(iopm[port // 8] >> port % 8 & 1)

    assert all(intercepted(p) for p in range(svm_l1.PORT_L1_IO, svm_l1.PORT_L1_IO + 4))
    assert not any(intercepted(p) for p in range(svm_l1.PORT_L2, svm_l1.PORT_L2 + 4))
    assert sum(bin(b).count("1") for b in iopm) == 4


def test_the_l2_idt_gate_points_at_the_handler(decoded: Any) -> None:
    npt, got = decoded
    memory, _ = replay(got)
    gate = svm_l1.L2_IDT + 16 * svm_l1.EVENT_VECTOR
    low, selector, _ist, kind, mid, high = struct.unpack_from("<HHBBHI", memory, gate)
    assert low | mid << 16 | high << 32 == svm_l1.labels(npt)["event_handler"]
    assert (selector, kind) == (svm_l1.CS_SEL, 0x8E)  # present, DPL 0, 64-bit interrupt gate
    limit, base = struct.unpack_from("<HQ", memory, svm_l1.L2_IDTR)
    assert (limit, base) == (256 * 16 - 1, svm_l1.L2_IDT)


def test_the_nested_page_table_roots(decoded: Any) -> None:
    # The PD entries are written by a loop at run time; the two levels above are immediates.
    npt, got = decoded
    memory, _ = replay(got)
    (pml4e,) = struct.unpack_from("<Q", memory, svm_l1.NPT_PML4)
    (pdpte,) = struct.unpack_from("<Q", memory, svm_l1.NPT_PDPT)
    if not npt:
        assert pml4e == pdpte == 0
        return
    assert pml4e & ~0xFFF == svm_l1.NPT_PDPT and pdpte & ~0xFFF == svm_l1.NPT_PD
    assert pml4e & 0x7 == pdpte & 0x7 == 0x7  # present, writable, user: nested walks are user


def test_program_fits_and_the_memory_map_is_disjoint() -> None:
    for npt in (False, True):
        assert svm_l1.CODE + len(svm_l1.program(npt)) <= svm_l1.GDT
    regions = [
        (svm_l1.CODE, svm_l1.GDT), (svm_l1.GDT, svm_l1.PML4), (svm_l1.PML4, svm_l1.NPT_PML4),
        (svm_l1.NPT_PML4, svm_l1.VMCB), (svm_l1.VMCB, svm_l1.HSAVE),
        (svm_l1.HSAVE, svm_l1.IOPM), (svm_l1.IOPM, svm_l1.IOPM + vmcb.IOPM_SIZE),
        (svm_l1.MSRPM, svm_l1.MSRPM + vmcb.MSRPM_SIZE), (svm_l1.L2_IDT, svm_l1.L1_DATA),
        (svm_l1.L1_DATA, svm_l1.L2_DATA), (svm_l1.L2_DATA, svm_l1.L2_STACK - 0x1000),
        (svm_l1.L2_STACK - 0x1000, svm_l1.L2_STACK), (svm_l1.L1_STACK - 0x1000, svm_l1.L1_STACK),
        (svm_l1.BUF, svm_l1.BUF + 4 * svm_l1.WORDS),
    ]  # fmt: skip
    for (_, end), (start, _) in itertools.pairwise(regions):
        assert end <= start
    assert regions[-1][1] <= svm_l1.MEMORY
    assert all(a % 0x1000 == 0 for a in (svm_l1.VMCB, svm_l1.HSAVE, svm_l1.IOPM, svm_l1.MSRPM))
    assert (svm_l1.CLEAR_START, svm_l1.CLEAR_END) == (svm_l1.NPT_PML4, svm_l1.L2_IDT)


def test_gdt_descriptors() -> None:
    null, code, data, tss_low, tss_high = struct.unpack("<5Q", svm_l1.gdt())
    assert null == 0
    access, flags = code >> 40 & 0xFF, code >> 52 & 0xF
    assert access == 0x9B and flags == 0xA  # present code, L=1, D=0, G=1
    assert data >> 40 & 0xFF == 0x93 and data >> 52 & 0xF == 0xC  # present data, DB, G
    base = (tss_low >> 16 & 0xFF_FFFF) | (tss_low >> 56 & 0xFF) << 24 | tss_high << 32
    assert (base, tss_low & 0xFFFF, tss_low >> 40 & 0xFF) == (svm_l1.TSS, 0x67, 0x8B)


def test_page_tables_map_all_memory_identically() -> None:
    tables = svm_l1.page_tables()
    (pml4e,) = struct.unpack("<Q", tables[svm_l1.PML4])
    (pdpte,) = struct.unpack("<Q", tables[svm_l1.PDPT])
    assert pml4e & ~0xFFF == svm_l1.PDPT and pdpte & ~0xFFF == svm_l1.PD
    pdes = struct.unpack(f"<{len(tables[svm_l1.PD]) // 8}Q", tables[svm_l1.PD])
    assert [e & ~0xFFF for e in pdes] == list(range(0, svm_l1.MEMORY, svm_l1.PAGE_2M))
    assert all(e & 0x83 == 0x83 for e in pdes)  # present, writable, 2 MiB


def test_assembler_refuses_what_it_cannot_encode() -> None:
    a = svm_l1.Assembler(svm_l1.CODE)
    a.label("here")
    with pytest.raises(ValueError, match="defined twice"):
        a.label("here")
    with pytest.raises(ValueError, match="sign-extended disp32"):
        a.store(0x8000_0000, 1)
    a.jne_short("far")
    a.insn("nop", bytes(200))
    a.label("far")
    with pytest.raises(ValueError, match="short jump"):
        a.build()
