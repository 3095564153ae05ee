"""A tiny SVM L1 hypervisor and its L2, assembled here (no assembler needed at test time).

Both run in 64-bit long mode (paging on, which SVM needs: KVM's
nested_svm_check_permissions answers #UD to SVM instructions while the
guest's paging is off). Long mode rather than
32-bit PAE or PSE paging because it is the mode the kernel's own nested
tests (``state_test.c``, ``svm_util.c``) run L1 in, so with nested paging the
nCR3 table is the 4-level format KVM's shadow-NPT code is exercised with
most; the legacy and PAE nested formats are the rarely used corners.

L1 (in a KVM vCPU of the emulated AMD guest):

1. reports ``Stage.START`` (nothing nested yet), sets EFER.SVME
   (``Stage.SVME``), writes VM_HSAVE_PA (``Stage.HSAVE``);
2. clears its SVM pages, marks ``PORT_L1_IO`` in the IOPM, builds the
   nested-paging identity map when asked (``npt=True``), and writes a VMCB:
   intercepts VMRUN, VMMCALL, CPUID, HLT, SHUTDOWN, IOIO (IOPM) and MSR
   (an all-clear MSRPM), #UD/#DF/#GP/#PF; L2 state copied from its own CRs
   and EFER, its own RIP/RSP (``Stage.VMCB_READY``);
3. loops: CLGI, ``out PORT_VMRUN`` (the VMCB address; VMRUN is the very
   next instruction), VMRUN; on #VMEXIT it saves the L2 registers it uses,
   clears EVENTINJ, reports the exit code on ``PORT_EXIT`` (GIF still
   clear), STGI, and handles the exit: CPUID (answers ``eax ^ CPUID_MAGIC``,
   RIP += 2), IOIO (logs the value, RIP := EXITINFO2), VMMCALL (RIP += 3;
   ``HC_ROUND`` logs L2's EBX and after the ``INJECT_AFTER``-th one writes
   EVENTINJ and reports ``Stage.EVENT_PENDING``; ``HC_DONE`` ends the loop);
   L1 advances RIP itself because QEMU's TCG CPU has no NRIPS (CPUID
   0x8000000A EDX bit 3), so KVM fills in no ``next_rip`` there;
4. at ``HC_DONE`` writes L2's result (its EBX) to ``PORT_RESULT``, clears
   EFER.SVME (``Stage.SVME_OFF``) and halts.

L2 builds its own IDT gate for ``EVENT_VECTOR`` and loads it, then runs
``ROUNDS`` rounds: fill ``WORDS`` dwords at ``BUF`` with xorshift32 from a
seed drawn from its accumulator, FNV-1a them, send the hash to
``PORT_L1_IO`` (intercepted) and through CPUID (intercepted), add the CPUID
answer to the accumulator, write the round number to ``PORT_L2`` (*not* in
the IOPM: KVM exits to userspace with the vCPU in guest mode), VMMCALL
``HC_ROUND``, mix the event count into the accumulator; finally VMMCALL
``HC_DONE`` with the accumulator in EBX. The event handler records the
interrupted RIP and counts. Unexpected things end on ``PORT_FAIL`` with
the value L1 did not expect.

Every instruction carries the text objdump must print for it
(:func:`listing`, checked by tests/test_svm_l1.py).
"""

from __future__ import annotations

import enum
import mmap
import struct

import kvmstate
from kvmstate import uapi, vmcb
from kvmstate.vmcb import Intercept, SvmExit, vmcb_control_area, vmcb_save_area, vmcb_seg
from tests.support import asm
from tests.support.asm import REG32, REG64, u16, u32, u64

# --- memory map (guest-physical; identity-mapped by 2 MiB pages) -----------------------
CODE = 0x1000  # L1 then L2 code, up to GDT
GDT = 0x4000
TSS = 0x4800  # only named by TR: nothing here switches stacks through it
PML4, PDPT, PD = 0x5000, 0x6000, 0x7000  # L1's (and L2's) page tables, written by load()
NPT_PML4, NPT_PDPT, NPT_PD = 0x8000, 0x9000, 0xA000  # the nCR3 identity map, built by L1
VMCB = 0x10000
HSAVE = 0x11000
IOPM = 0x12000  # 3 pages
MSRPM = 0x15000  # 2 pages
CLEAR_START, CLEAR_END = NPT_PML4, MSRPM + vmcb.MSRPM_SIZE  # what L1 zeroes first
L2_IDT = 0x17000
L1_DATA = 0x18000
IO_COUNT, ROUND_COUNT = L1_DATA, L1_DATA + 4
IO_LOG, ROUND_LOG = L1_DATA + 0x100, L1_DATA + 0x200  # u32 arrays
L2_DATA = 0x19000
EVENT_COUNT, EVENT_RIP, L2_IDTR = L2_DATA, L2_DATA + 8, L2_DATA + 0x10
L2_STACK = 0x1C000  # top
L1_STACK = 0x1E000  # top
BUF = 0x100000
MEMORY = 4 << 20
PAGE_2M = 2 << 20

# --- ports -----------------------------------------------------------------------------
PORT_STAGE = 0x10  # byte: a Stage (L1)
PORT_VMRUN = 0x11  # dword: the VMCB address, right before VMRUN (L1)
PORT_EXIT = 0x12  # dword: the exit code L1 is about to handle (L1)
PORT_RESULT = 0x13  # dword: L2's result, passed on by L1
PORT_FAIL = 0x14  # dword: the value L1 did not expect
PORT_L1_IO = 0x40  # dword from L2, intercepted by L1 through its IOPM
PORT_L2 = 0x44  # dword from L2 (the round), not in the IOPM: exits to L0's userspace


class Stage(enum.IntEnum):
    """What L1 reports on :data:`PORT_STAGE`."""

    START = 1  # nothing nested yet
    SVME = 2  # EFER.SVME set
    HSAVE = 3  # VM_HSAVE_PA written
    VMCB_READY = 4
    EVENT_PENDING = 5  # EVENTINJ written, VMRUN next
    SVME_OFF = 6  # L1 left nested mode: EFER.SVME clear again


# --- the work and the protocol ------------------------------------------------------------
SEED = 0x1234_5678
ROUNDS = 4
WORDS = 4096  # dwords per round
ROUND_KEY = 0x9E37_79B9
FNV_OFFSET, FNV_PRIME = 0x811C_9DC5, 0x0100_0193
CPUID_MAGIC = 0x4C31_4356
EVENT_MIX = 0x85EB_CA6B
ROTATE = 7
HC_ROUND, HC_DONE = 1, 2
INJECT_AFTER = 2  # L1 injects at the VMRUN after the 2nd HC_ROUND
EVENT_VECTOR = 0x30
EVENT_INJ = vmcb.SVM_EVTINJ_VALID | vmcb.SVM_EVTINJ_TYPE_INTR | EVENT_VECTOR

# --- machine constants ------------------------------------------------------------------
MSR_EFER, MSR_VM_HSAVE_PA = 0xC000_0080, 0xC001_0117
CS_SEL, DS_SEL, TR_SEL = 0x08, 0x10, 0x18
CR0 = 0x8000_0031  # PG | NE | ET | PE
CR4_PAE = 0x20
EFER_LONG = vmcb.EFER_LME | vmcb.EFER_LMA
CODE64_ATTRIB = 0xA9B  # vmcb_seg.attrib: type 0xb, S, P, L, G
DATA_ATTRIB = 0xC93  # type 3, S, P, DB, G
G_PAT = 0x0007_0406_0007_0406  # the power-on PAT
DR6_INIT, DR7_INIT = 0xFFFF_0FF0, 0x400
NPT_TABLE, NPT_PAGE = 0x7, 0x87  # P|RW|US (nested walks are user accesses), + PS
PAGE_TABLE, PAGE_2M_FLAGS = 0x3, 0x83  # P|RW, + PS


def ctl(name: str) -> int:
    """Guest-physical address of a VMCB control-area field."""
    return VMCB + int(getattr(vmcb_control_area, name).offset)


def save(name: str, part: str | None = None) -> int:
    """Guest-physical address of a VMCB save-area field (``part`` of a segment)."""
    address = VMCB + int(vmcb.vmcb.save.offset) + int(getattr(vmcb_save_area, name).offset)
    return address + (int(getattr(vmcb_seg, part).offset) if part else 0)


# --- the assembler --------------------------------------------------------------------------


def _disp(address: int) -> bytes:
    """ModRM-less tail of an absolute [disp32] operand: SIB 0x25 (no base, no index).

    In 64-bit mode ModRM rm=101 alone would mean RIP-relative; the SIB form is absolute.
    The disp32 is sign-extended, so the address must be below 2 GiB.
    """
    if not 0 <= address < 0x8000_0000:
        raise ValueError(f"{address:#x} is not reachable as a sign-extended disp32")
    return b"\x25" + u32(address)


class Assembler(asm.Assembler):
    """Just enough x86-64 for the two programs, every instruction written with
    :meth:`insn`, so that each has the text objdump -M intel prints for it."""

    # --- moves --------------------------------------------------------------------------
    def movabs_rax(self, value: int) -> None:
        self.insn(f"movabs rax,{value:#x}", 0x48, 0xB8, u64(value))

    def store(self, address: int, value: int | str, size: int = 4) -> None:
        """mov byte/word/dword [address], imm (a label's address when a name)."""
        where = f"{address:#x}"
        if isinstance(value, str):
            assert size == 4
            self.insn(
                f"mov dword ptr ds:{where},{{{value}}}",
                0xC7, 0x04, _disp(address), asm.Fix(value, "abs32"),
            )  # fmt: skip
        elif size == 1:
            self.insn(f"mov byte ptr ds:{where},{value:#x}", 0xC6, 0x04, _disp(address), value)
        elif size == 2:
            self.insn(
                f"mov word ptr ds:{where},{value:#x}",
                0x66, 0xC7, 0x04, _disp(address), u16(value),
            )  # fmt: skip
        else:
            self.insn(
                f"mov dword ptr ds:{where},{value:#x}", 0xC7, 0x04, _disp(address), u32(value)
            )

    def store_reg(self, address: int, reg: str) -> None:
        """mov [address], r32 or r64."""
        self._mov_memory(0x89, reg, address)

    def load_reg(self, reg: str, address: int) -> None:
        """mov r32 or r64, [address]."""
        self._mov_memory(0x8B, reg, address)

    def _mov_memory(self, opcode: int, reg: str, address: int) -> None:
        """mov between ``reg`` and [address]: opcode 0x89 stores it, 0x8B loads it."""
        wide = reg in REG64
        memory = f"{'qword' if wide else 'dword'} ptr ds:{address:#x}"
        text = f"mov {memory},{reg}" if opcode == 0x89 else f"mov {reg},{memory}"
        modrm = 0x04 | (REG64 if wide else REG32)[reg] << 3
        self.insn(text, *(b"\x48" if wide else b""), opcode, modrm, _disp(address))

    def out_stage(self, stage: Stage) -> None:
        self.insn(f"mov al,{int(stage):#x}", 0xB0, int(stage))
        self.insn(f"out {PORT_STAGE:#x},al", 0xE6, PORT_STAGE)

    def out_eax(self, port: int) -> None:
        self.insn(f"out {port:#x},eax", 0xE7, port)

    # --- control flow -----------------------------------------------------------------------
    def jne_short(self, label: str) -> None:
        self.insn(f"jne {{{label}}}", 0x75, asm.Fix(label, "rel8"))

    def cmp_eax(self, value: int) -> None:
        self.insn(f"cmp eax,{value:#x}", 0x3D, u32(value))


GDT_LIMIT = 5 * 8 - 1  # null, code, data, and a 16-byte TSS descriptor


def _program(npt: bool, handler: int) -> Assembler:
    """Both programs; ``handler`` is the event handler's address (for L2's IDT gate)."""
    a = Assembler(CODE)
    a.label("start")
    a.out_stage(Stage.START)
    a.rdmsr(MSR_EFER)
    a.or_eax(vmcb.EFER_SVME)
    a.wrmsr()
    a.out_stage(Stage.SVME)
    a.mov_imm("ecx", MSR_VM_HSAVE_PA)
    a.mov_imm("eax", HSAVE)
    a.insn("xor edx,edx", 0x31, 0xD2)
    a.wrmsr()
    a.out_stage(Stage.HSAVE)

    # Zero the nested page tables, VMCB, host save area, IOPM and MSRPM.
    a.insn("cld", 0xFC)
    a.insn("xor eax,eax", 0x31, 0xC0)
    a.mov_imm("edi", CLEAR_START)
    a.mov_imm("ecx", (CLEAR_END - CLEAR_START) // 8)
    a.insn("rep stos qword ptr es:[rdi],rax", 0xF3, 0x48, 0xAB)
    # IOPM: one bit per port; a 4-byte access to PORT_L1_IO checks its 4 bits.
    a.store(IOPM + PORT_L1_IO // 8, 0xF << PORT_L1_IO % 8, size=1)

    if npt:
        # nCR3: PML4[0] -> PDPT[0] -> PD of 2 MiB pages, identity over MEMORY.
        a.store(NPT_PML4, NPT_PDPT | NPT_TABLE)
        a.store(NPT_PDPT, NPT_PD | NPT_TABLE)
        a.mov_imm("eax", NPT_PAGE)
        a.mov_imm("edi", NPT_PD)
        a.label("npt_loop")
        a.insn("mov dword ptr [rdi],eax", 0x89, 0x07)
        a.insn(f"add eax,{PAGE_2M:#x}", 0x05, u32(PAGE_2M))
        a.insn("add rdi,0x8", 0x48, 0x83, 0xC7, 0x08)
        a.cmp_eax(MEMORY | NPT_PAGE)
        a.jcc("b", "npt_loop")

    # Control area.
    intercepts = [0] * vmcb.MAX_INTERCEPT
    bits: list[int] = [Intercept.VMRUN, Intercept.VMMCALL, Intercept.CPUID, Intercept.HLT,
            Intercept.SHUTDOWN, Intercept.IOIO_PROT, Intercept.MSR_PROT]  # fmt: skip
    bits += [Intercept.EXCEPTION_OFFSET + v for v in (6, 8, 13, 14)]  # #UD #DF #GP #PF
    for bit in bits:
        intercepts[bit // 32] |= 1 << bit % 32
    for word, value in enumerate(intercepts):
        if value:
            a.store(ctl("intercepts") + 4 * word, value)
    a.store(ctl("iopm_base_pa"), IOPM)
    a.store(ctl("msrpm_base_pa"), MSRPM)
    a.store(ctl("asid"), 1)
    if npt:
        a.store(ctl("nested_ctl"), vmcb.SVM_NESTED_CTL_NP_ENABLE)
        a.store(ctl("nested_cr3"), NPT_PML4)

    # Save area: L2 runs like L1 (same CRs, EFER, flat segments), on its own stack.
    for cr in (0, 3, 4):
        a.mov_from_cr(cr, "rax")
        a.store_reg(save(f"cr{cr}"), "rax")
    a.rdmsr(MSR_EFER)
    a.store_reg(save("efer"), "eax")
    a.store_reg(save("efer") + 4, "edx")
    for seg in ("es", "cs", "ss", "ds"):
        code = seg == "cs"
        a.store(save(seg, "selector"), CS_SEL if code else DS_SEL, size=2)
        a.store(save(seg, "attrib"), CODE64_ATTRIB if code else DATA_ATTRIB, size=2)
        a.store(save(seg, "limit"), 0xFFFF_FFFF)
    a.store(save("gdtr", "limit"), GDT_LIMIT)
    a.store(save("gdtr", "base"), GDT)
    a.store(save("dr6"), DR6_INIT)
    a.store(save("dr7"), DR7_INIT)
    a.store(save("rflags"), 0x2)
    a.store(save("rip"), "l2_entry")
    a.store(save("rsp"), L2_STACK)
    a.movabs_rax(G_PAT)
    a.store_reg(save("g_pat"), "rax")
    a.out_stage(Stage.VMCB_READY)
    a.insn("clgi", 0x0F, 0x01, 0xDD)

    # The run loop. L2's RBX, RCX, RDX are live in the registers across #VMEXIT.
    a.label("l1_loop")
    a.mov_imm("eax", VMCB)
    a.out_eax(PORT_VMRUN)
    a.label("vmrun")
    a.insn("vmrun", 0x0F, 0x01, 0xD8)
    a.insn("push rbx", 0x53)
    a.insn("push rcx", 0x51)
    a.insn("push rdx", 0x52)
    a.store(ctl("event_inj"), 0)  # KVM writes the cached EVENTINJ back into vmcb12
    a.load_reg("eax", ctl("exit_code"))
    a.out_eax(PORT_EXIT)
    a.insn("stgi", 0x0F, 0x01, 0xDC)
    a.cmp_eax(SvmExit.CPUID)
    a.jcc("e", "on_cpuid")
    a.cmp_eax(SvmExit.IOIO)
    a.jcc("e", "on_io")
    a.cmp_eax(SvmExit.VMMCALL)
    a.jcc("e", "on_vmmcall")
    a.jmp("fail")

    a.label("on_cpuid")  # L1's CPUID answers EAX only
    a.load_reg("eax", save("rax"))
    a.insn(f"xor eax,{CPUID_MAGIC:#x}", 0x35, u32(CPUID_MAGIC))
    a.store_reg(save("rax"), "rax")
    a.insn(f"add qword ptr ds:{save('rip'):#x},0x2", 0x48, 0x83, 0x04, _disp(save("rip")), 2)
    a.jmp("resume")

    a.label("on_io")
    a.load_reg("eax", ctl("exit_info_1"))
    a.insn("shr eax,0x10", 0xC1, 0xE8, 0x10)  # the port is in bits 31:16
    a.cmp_eax(PORT_L1_IO)
    a.jcc("ne", "fail")
    a.load_reg("eax", IO_COUNT)
    a.load_reg("ecx", save("rax"))  # an OUT's value is L2's EAX
    a.insn(f"mov dword ptr [rax*4+{IO_LOG:#x}],ecx", 0x89, 0x0C, 0x85, u32(IO_LOG))
    a.insn(f"inc dword ptr ds:{IO_COUNT:#x}", 0xFF, 0x04, _disp(IO_COUNT))
    a.load_reg("rax", ctl("exit_info_2"))  # EXITINFO2: the RIP after the IN/OUT
    a.store_reg(save("rip"), "rax")
    a.jmp("resume")

    a.label("on_vmmcall")
    a.insn(f"add qword ptr ds:{save('rip'):#x},0x3", 0x48, 0x83, 0x04, _disp(save("rip")), 3)
    a.load_reg("eax", save("rax"))
    a.cmp_eax(HC_DONE)
    a.jcc("e", "finish")
    a.cmp_eax(HC_ROUND)
    a.jcc("ne", "fail")
    a.load_reg("eax", ROUND_COUNT)
    a.insn("mov ecx,dword ptr [rsp+0x10]", 0x8B, 0x4C, 0x24, 0x10)  # L2's EBX, pushed first
    a.insn(f"mov dword ptr [rax*4+{ROUND_LOG:#x}],ecx", 0x89, 0x0C, 0x85, u32(ROUND_LOG))
    a.insn("inc eax", 0xFF, 0xC0)
    a.store_reg(ROUND_COUNT, "eax")
    a.cmp_eax(INJECT_AFTER)
    a.jcc("ne", "resume")
    a.store(ctl("event_inj"), EVENT_INJ)
    a.out_stage(Stage.EVENT_PENDING)

    a.label("resume")
    a.insn("clgi", 0x0F, 0x01, 0xDD)
    a.insn("pop rdx", 0x5A)
    a.insn("pop rcx", 0x59)
    a.insn("pop rbx", 0x5B)
    a.jmp("l1_loop")

    a.label("finish")
    a.insn("mov eax,dword ptr [rsp+0x10]", 0x8B, 0x44, 0x24, 0x10)  # L2's EBX: the result
    a.out_eax(PORT_RESULT)
    a.insn("add rsp,0x18", 0x48, 0x83, 0xC4, 0x18)
    a.rdmsr(MSR_EFER)
    a.insn(f"and eax,{~vmcb.EFER_SVME & 0xFFFF_FFFF:#x}", 0x25, u32(~vmcb.EFER_SVME))
    a.wrmsr()
    a.out_stage(Stage.SVME_OFF)
    a.label("halt")
    a.insn("hlt", 0xF4)
    a.jmp("halt")

    a.label("fail")
    a.out_eax(PORT_FAIL)
    a.insn("hlt", 0xF4)
    a.jmp("fail")

    _l2(a, handler)
    return a


def _l2(a: Assembler, handler: int) -> None:
    a.label("l2_entry")
    # Its own IDT: one 64-bit interrupt gate (present, DPL 0, type 0xe) for EVENT_VECTOR.
    gate = L2_IDT + 16 * EVENT_VECTOR
    a.store(gate, CS_SEL << 16 | handler & 0xFFFF)
    a.store(gate + 4, handler & 0xFFFF_0000 | 0x8E00)
    a.store(gate + 8, handler >> 32)
    a.store(gate + 12, 0)
    a.store(L2_IDTR, 256 * 16 - 1, size=2)
    a.store(L2_IDTR + 2, L2_IDT)
    a.store(L2_IDTR + 6, 0)
    a.insn(f"lidt ds:{L2_IDTR:#x}", 0x0F, 0x01, 0x1C, _disp(L2_IDTR))
    a.mov_imm("esi", SEED)  # the accumulator
    a.insn("xor r12d,r12d", 0x45, 0x31, 0xE4)  # the round

    a.label("round")
    a.insn("mov eax,esi", 0x89, 0xF0)
    a.insn(f"xor eax,{ROUND_KEY:#x}", 0x35, u32(ROUND_KEY))
    a.insn("or eax,0x1", 0x83, 0xC8, 0x01)  # xorshift32 needs a non-zero state
    a.mov_imm("edi", BUF)
    a.mov_imm("ecx", WORDS)
    a.label("fill")  # x ^= x << 13; x ^= x >> 17; x ^= x << 5; store x
    for shift, op, ext in ((13, "shl", 0xE2), (17, "shr", 0xEA), (5, "shl", 0xE2)):
        a.insn("mov edx,eax", 0x89, 0xC2)
        a.insn(f"{op} edx,{shift:#x}", 0xC1, ext, shift)
        a.insn("xor eax,edx", 0x31, 0xD0)
    a.insn("mov dword ptr [rdi],eax", 0x89, 0x07)
    a.insn("add rdi,0x4", 0x48, 0x83, 0xC7, 0x04)
    a.insn("dec ecx", 0xFF, 0xC9)
    a.jne_short("fill")
    a.mov_imm("edi", BUF)
    a.mov_imm("ecx", WORDS)
    a.mov_imm("ebx", FNV_OFFSET)
    a.label("hash")  # FNV-1a over the dwords
    a.insn("xor ebx,dword ptr [rdi]", 0x33, 0x1F)
    a.insn(f"imul ebx,ebx,{FNV_PRIME:#x}", 0x69, 0xDB, u32(FNV_PRIME))
    a.insn("add rdi,0x4", 0x48, 0x83, 0xC7, 0x04)
    a.insn("dec ecx", 0xFF, 0xC9)
    a.jne_short("hash")
    a.insn("mov eax,ebx", 0x89, 0xD8)
    a.out_eax(PORT_L1_IO)  # intercepted: L1 logs the hash
    a.insn("cpuid", 0x0F, 0xA2)  # intercepted: L1 answers eax ^ CPUID_MAGIC
    a.insn("add esi,eax", 0x01, 0xC6)
    a.insn("mov eax,r12d", 0x44, 0x89, 0xE0)
    a.out_eax(PORT_L2)  # not intercepted: userspace sees the vCPU in guest mode
    a.mov_imm("eax", HC_ROUND)
    a.insn("mov ebx,esi", 0x89, 0xF3)
    a.insn("vmmcall", 0x0F, 0x01, 0xD9)
    a.label("after_round_call")
    a.load_reg("eax", EVENT_COUNT)
    a.insn(f"imul eax,eax,{EVENT_MIX:#x}", 0x69, 0xC0, u32(EVENT_MIX))
    a.insn("add esi,eax", 0x01, 0xC6)
    a.insn(f"rol esi,{ROTATE:#x}", 0xC1, 0xC6, ROTATE)
    a.insn("inc r12d", 0x41, 0xFF, 0xC4)
    a.insn(f"cmp r12d,{ROUNDS:#x}", 0x41, 0x83, 0xFC, ROUNDS)
    a.jcc("b", "round")
    a.mov_imm("eax", HC_DONE)
    a.insn("mov ebx,esi", 0x89, 0xF3)
    a.insn("vmmcall", 0x0F, 0x01, 0xD9)
    a.label("l2_halt")
    a.insn("hlt", 0xF4)  # intercepted: L1 would report it and fail
    a.jmp("l2_halt")

    a.label("event_handler")
    a.insn("push rax", 0x50)
    a.insn("mov rax,qword ptr [rsp+0x8]", 0x48, 0x8B, 0x44, 0x24, 0x08)  # the interrupted RIP
    a.store_reg(EVENT_RIP, "rax")
    a.insn(f"inc dword ptr ds:{EVENT_COUNT:#x}", 0xFF, 0x04, _disp(EVENT_COUNT))
    a.insn("pop rax", 0x58)
    a.insn("iretq", 0x48, 0xCF)


def _assembled(npt: bool) -> Assembler:
    # Two passes: the gate's immediates need the handler's address, which lies
    # after them; every instruction has a fixed length, so nothing moves.
    first = _program(npt, handler=0)
    a = _program(npt, handler=first.labels["event_handler"])
    assert a.labels == first.labels
    return a


def program(npt: bool) -> bytes:
    """The L1+L2 machine code, to be loaded at :data:`CODE`."""
    return _assembled(npt).build()


def listing(npt: bool) -> list[tuple[int, str]]:
    """(address, the text objdump -M intel prints) for every instruction of :func:`program`."""
    a = _assembled(npt)
    a.build()
    return a.listing()


def labels(npt: bool) -> dict[str, int]:
    """Label addresses (``vmrun``, ``after_round_call``, ``l2_entry`` ...)."""
    return dict(_assembled(npt).labels)


def gdt() -> bytes:
    """Null, 64-bit code (0x08), data (0x10), and a 64-bit TSS descriptor (0x18)."""
    code = 0x00AF_9B00_0000_FFFF
    data = 0x00CF_9300_0000_FFFF
    limit = 0x67
    tss_low = limit | (TSS & 0xFF_FFFF) << 16 | 0x8B << 40 | (TSS >> 24 & 0xFF) << 56
    return struct.pack("<5Q", 0, code, data, tss_low, TSS >> 32)


def page_tables() -> dict[int, bytes]:
    """L1's identity map of :data:`MEMORY` by 2 MiB pages: {address: bytes}."""
    pdes = [i * PAGE_2M | PAGE_2M_FLAGS for i in range(MEMORY // PAGE_2M)]
    return {
        PML4: struct.pack("<Q", PDPT | PAGE_TABLE),
        PDPT: struct.pack("<Q", PD | PAGE_TABLE),
        PD: struct.pack(f"<{len(pdes)}Q", *pdes),
    }


def load(memory: mmap.mmap | bytearray, npt: bool) -> None:
    """Write the program, GDT and L1's page tables into guest memory at 0."""
    view = memoryview(memory)
    code = program(npt)
    if CODE + len(code) > GDT:
        raise ValueError(f"the program is {len(code)} bytes and runs into the GDT")
    view[CODE : CODE + len(code)] = code
    table = gdt()
    view[GDT : GDT + len(table)] = table
    for address, data in page_tables().items():
        view[address : address + len(data)] = data


def prepare_vcpu(vcpu: kvmstate.Vcpu, cpuid: uapi.kvm_cpuid2) -> None:
    """CPUID (SVM in it), 64-bit long mode with paging, RIP at :data:`CODE`."""
    vcpu.set_cpuid2(cpuid)
    sregs = vcpu.get_sregs()
    for name in ("cs", "ds", "es", "fs", "gs", "ss"):
        seg = getattr(sregs, name)
        seg.base, seg.limit, seg.present, seg.dpl, seg.s, seg.g = 0, 0xFFFF_FFFF, 1, 0, 1, 1
        if name == "cs":
            seg.selector, seg.type, seg.l, seg.db = CS_SEL, 11, 1, 0
        else:
            seg.selector, seg.type, seg.l, seg.db = DS_SEL, 3, 0, 1
    sregs.tr.selector, sregs.tr.base, sregs.tr.limit = TR_SEL, TSS, 0x67
    sregs.tr.type, sregs.tr.present, sregs.tr.s = 11, 1, 0  # busy 64-bit TSS
    sregs.gdt.base, sregs.gdt.limit = GDT, GDT_LIMIT
    sregs.idt.base, sregs.idt.limit = 0, 0
    sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = CR0, PML4, CR4_PAE, EFER_LONG
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rip, regs.rsp, regs.rflags = CODE, L1_STACK, 0x2
    vcpu.set_regs(regs)
