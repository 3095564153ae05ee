"""Two tiny L1 hypervisors for VMX tests, assembled here (no assembler needed at test time).

Both run in a KVM vCPU in 32-bit protected mode with paging (one 4 MiB PSE
page identity-mapping the first 4 MiB) and report through port I/O, which
KVM hands to userspace as KVM_EXIT_IO.

**The minimal L1** (:func:`program`, used by ``tests/test_vmx_guest.py``):

=====  ======================================================
port   value
=====  ======================================================
0x10   step reached (1..8, see ``Step``)
0x11   low byte of EFLAGS after a failed VMX instruction
0x13   the VM-instruction error number (VMfailValid)
0x12   the basic exit reason L1 read after L2 exited
0x30   written by L2 (the nested guest) before its VMCALL
=====  ======================================================

It reads IA32_VMX_BASIC for the revision id, sets IA32_FEATURE_CONTROL
(lock + VMX outside SMX) unless locked, sets CR4.VMXE, VMXON, VMCLEAR,
VMPTRLD, writes a minimal VMCS (controls at the TRUE MSRs' allowed-0
settings, host state = its own, L2 state = a copy with its own RIP/RSP)
and VMLAUNCHes an L2 that does ``out 0x30`` then ``vmcall``.

Memory map (guest-physical): code at ``CODE``, page directory at
``PAGE_DIR``, VMXON region at ``VMXON``, vmcs12 at ``VMCS``, L2 stack top
``L2_STACK``, L1 stack top ``L1_STACK``.

**The migration L1** (:func:`nested_image`, used by
``tests/test_vmx_migration.py``) is a hypervisor that keeps its L2 running
through many exits, so that a test can save and restore the vCPU at each
one. It enters L2 with VMLAUNCH and then VMRESUMEs after every exit it
handles: VMCALL, CPUID, I/O (through I/O bitmaps: only :attr:`Port.L1_IO`
exits to L1), NMIs and external interrupts (pin-based NMI and
external-interrupt exiting, acknowledge interrupt on exit) and the VMX
preemption timer. It reflects NMIs and interrupts into L2, and injects a
software interrupt, through the VM-entry interruption-information field; L2
records each event through its own IDT. On L2's request it turns on the
preemption timer (pin-based control and "save preemption timer value") and
VMCS shadowing (secondary control, VMREAD/VMWRITE bitmaps, a shadow VMCS,
its revision dword carrying the shadow-VMCS indicator, written by L1 with
VMWRITE while current and linked through the VMCS link pointer). L2 then
reads and writes that shadow VMCS with VMREAD/VMWRITE that do not exit to
L1. At the end L1 makes the shadow VMCS current again, VMREADs what L2 left
there, and leaves VMX operation with VMXOFF.

L2 does :data:`SCRIPT`: for each entry, one round of work over a buffer it
owns (a xorshift32 stream mixed into the previous contents, every word
folded into a running checksum), then the entry's action, whose results
(L1's answers, the events L2 saw, shadow-VMCS values) are folded into the
checksum too. The checksum goes to :attr:`Port.RESULT` at the end. The
state lives in registers (EBX: checksum, ESI: generator), on L2's stack and
in guest memory, so a vCPU or memory that comes back wrong after a restore
changes the result.

Every exit to userspace is a port write: L1 reports on :attr:`Port.STEP`
(see :class:`Phase`) and :attr:`Port.EXIT_REASON`; L2's own ports (0x30 ..
0x35) are not in L1's I/O bitmap, so they reach userspace while the vCPU is
in guest mode. Constants that shape the checksum are public so a test can
compute the expected value with its own model.
"""

from __future__ import annotations

import dataclasses
import enum
import mmap
import struct
from collections.abc import Mapping

from kvmstate import uapi
from kvmstate import vmcs12 as v12
from tests.support import asm

CODE = 0x1000
PAGE_DIR = 0x2000
VMXON = 0x3000
VMCS = 0x4000
L2_STACK = 0x7000
L1_STACK = 0x8000
MEMORY = 4 << 20

PORT_STEP, PORT_FAIL, PORT_EXIT_REASON, PORT_INSN_ERROR, PORT_L2 = 0x10, 0x11, 0x12, 0x13, 0x30
L2_MARK = 0x42


class Step(enum.IntEnum):
    """The steps the minimal L1 reports on port 0x10."""

    START = 1
    FEATURE_CONTROL = 2
    VMXE = 3
    VMXON = 4
    CURRENT_VMCS = 5  # VMCLEAR + VMPTRLD done
    VMCS_READY = 6
    LAUNCH = 7
    L1_AFTER_EXIT = 8


# VMCS field encodings (Intel SDM vol. 3, appendix B).
PIN_BASED, PROC_BASED, EXIT_CONTROLS, ENTRY_CONTROLS = 0x4000, 0x4002, 0x400C, 0x4012
HOST_CR0, HOST_CR3, HOST_CR4 = 0x6C00, 0x6C02, 0x6C04
HOST_SEL = {"es": 0x0C00, "cs": 0x0C02, "ss": 0x0C04, "ds": 0x0C06, "fs": 0x0C08, "gs": 0x0C0A}
HOST_TR_SEL, HOST_RSP, HOST_RIP = 0x0C0C, 0x6C14, 0x6C16
GUEST_CR0, GUEST_CR3, GUEST_CR4 = 0x6800, 0x6802, 0x6804
GUEST_SEL = {"es": 0x0800, "cs": 0x0802, "ss": 0x0804, "ds": 0x0806, "fs": 0x0808, "gs": 0x080A}
GUEST_TR_SEL = 0x080E
GUEST_LIMIT = {"es": 0x4800, "cs": 0x4802, "ss": 0x4804, "ds": 0x4806, "fs": 0x4808, "gs": 0x480A}
GUEST_TR_LIMIT, GUEST_GDTR_LIMIT, GUEST_IDTR_LIMIT = 0x480E, 0x4810, 0x4812
GUEST_AR = {"es": 0x4814, "cs": 0x4816, "ss": 0x4818, "ds": 0x481A, "fs": 0x481C, "gs": 0x481E}
GUEST_LDTR_AR, GUEST_TR_AR = 0x4820, 0x4822
GUEST_DR7, GUEST_RSP, GUEST_RIP, GUEST_RFLAGS = 0x681A, 0x681C, 0x681E, 0x6820
VMCS_LINK, VMCS_LINK_HIGH = 0x2800, 0x2801
VM_INSTRUCTION_ERROR, EXIT_REASON = 0x4400, 0x4402
# The fields only the migration L1 uses.
SECONDARY_CONTROLS = 0x401E
IO_BITMAP_A, IO_BITMAP_B = 0x2000, 0x2002  # each with its high half at +1
VMREAD_BITMAP, VMWRITE_BITMAP = 0x2026, 0x2028  # each with its high half at +1
ENTRY_INTR_INFO, ENTRY_INSTRUCTION_LEN = 0x4016, 0x401A
EXIT_INTR_INFO, EXIT_INSTRUCTION_LEN, EXIT_QUALIFICATION = 0x4404, 0x440C, 0x6400
PREEMPTION_TIMER_VALUE = 0x482E
GUEST_TR_BASE, GUEST_GDTR_BASE, GUEST_IDTR_BASE = 0x6814, 0x6816, 0x6818
HOST_TR_BASE, HOST_GDTR_BASE, HOST_IDTR_BASE = 0x6C0A, 0x6C0C, 0x6C0E
#: The shadow-VMCS fields of the migration L1: L1 writes the first (VMWRITE with the
#: shadow VMCS current), L2 reads it and writes the second through VMCS shadowing.
SHADOW_FIELD_L1, SHADOW_FIELD_L2 = 0x6806, 0x6808  # GUEST_ES_BASE, GUEST_CS_BASE

# VM-exit reasons (basic, SDM vol. 3 appendix C).
EXIT_REASON_NMI, EXIT_REASON_EXTERNAL_INTERRUPT = 0, 1
EXIT_REASON_CPUID, EXIT_REASON_VMCALL, EXIT_REASON_IO = 10, 18, 30
EXIT_REASON_PREEMPTION_TIMER = 52

CS_SEL, DS_SEL, TR_SEL = 0x08, 0x10, 0x18
MSR_VMX_BASIC, MSR_FEATURE_CONTROL = 0x480, 0x3A
MSR_VMX_TRUE_PINBASED, MSR_VMX_TRUE_PROCBASED = 0x48D, 0x48E
MSR_VMX_TRUE_EXIT, MSR_VMX_TRUE_ENTRY, MSR_VMX_PROCBASED2 = 0x48F, 0x490, 0x48B
CR4_VMXE = 0x2000
SHADOW_VMCS_INDICATOR = 1 << 31  # bit 31 of a VMCS region's revision dword

REGS = tuple(asm.REG32)  # in encoding order
_ALU = {"add": 0, "or": 1, "and": 4, "sub": 5, "xor": 6, "cmp": 7}
_SHIFT = {"rol": 0, "shl": 4, "shr": 5}


@dataclasses.dataclass(frozen=True)
class At:
    """A memory operand: ``[disp]``, ``[disp + index*4]`` or ``[esp + disp]`` (``esp=True``)."""

    disp: int = 0
    index: str | None = None
    esp: bool = False


Operand = int | str | At  # an immediate, a register name or a label (an address), or memory


class _Asm(asm.Assembler):
    """Just enough 32-bit x86 to write the programs."""

    # --- generic encodings (the migration L1) -------------------------------------
    def _modrm(self, reg: int, rm: str | At) -> None:
        """ModRM (+ SIB, displacement) for ``reg`` (a register number or /digit) and ``rm``."""
        if isinstance(rm, str):
            self.emit(0xC0 | reg << 3 | REGS.index(rm))
        elif rm.esp:
            if -128 <= rm.disp < 128:
                self.emit(0x44 | reg << 3, 0x24, rm.disp & 0xFF)  # [esp + disp8]
            else:
                self.emit(0x84 | reg << 3, 0x24)  # [esp + disp32]
                self.u32(rm.disp)
        elif rm.index is None:
            self.emit(0x05 | reg << 3)  # [disp32]
            self.u32(rm.disp)
        else:
            self.emit(0x04 | reg << 3, 0x85 | REGS.index(rm.index) << 3)  # [disp32 + index*4]
            self.u32(rm.disp)

    def mov(self, dst: str | At, src: Operand) -> None:
        if isinstance(dst, str):
            if isinstance(src, At):
                self.emit(0x8B)
                self._modrm(REGS.index(dst), src)
            elif isinstance(src, str) and src in REGS:
                self.emit(0x89)
                self._modrm(REGS.index(src), dst)
            else:
                self.mov_imm(dst, src)
        elif isinstance(src, str) and src in REGS:
            self.emit(0x89)
            self._modrm(REGS.index(src), dst)
        elif isinstance(src, At):
            raise ValueError("no memory-to-memory mov")
        else:
            self.emit(0xC7)
            self._modrm(0, dst)
            self.u32(src)

    def alu(self, op: str, dst: str | At, src: Operand) -> None:
        """add/or/and/sub/xor/cmp ``dst``, ``src``."""
        n = _ALU[op]
        if isinstance(src, At):
            if not isinstance(dst, str):
                raise ValueError("no memory-to-memory operation")
            self.emit(n * 8 + 3)
            self._modrm(REGS.index(dst), src)
        elif isinstance(src, str) and src in REGS:
            self.emit(n * 8 + 1)
            self._modrm(REGS.index(src), dst)
        else:
            self.emit(0x81)
            self._modrm(n, dst)
            self.u32(src)

    def shift(self, op: str, dst: str, count: int) -> None:
        """rol/shl/shr ``dst``, ``count``."""
        self.emit(0xC1)
        self._modrm(_SHIFT[op], dst)
        self.emit(count)

    def test(self, dst: str | At, mask: int) -> None:
        self.emit(0xF7)
        self._modrm(0, dst)
        self.u32(mask)

    def not_(self, dst: str) -> None:
        self.emit(0xF7)
        self._modrm(2, dst)

    def imul(self, dst: str, src: str, factor: int) -> None:
        """imul ``dst``, ``src``, ``factor``: the low 32 bits of the product."""
        self.emit(0x69)
        self._modrm(REGS.index(dst), src)
        self.u32(factor)

    def inc(self, dst: At) -> None:
        self.emit(0xFF)
        self._modrm(0, dst)

    def push(self, value: int | str) -> None:
        if isinstance(value, str) and value in REGS:
            self.emit(0x50 + REGS.index(value))
        else:
            self.emit(0x68)
            self.u32(value)

    def pop(self, reg: str) -> None:
        self.emit(0x58 + REGS.index(reg))

    def out32(self, port: int) -> None:
        """out ``port``, eax."""
        self.emit(0xE7, port)

    def in32(self, port: int) -> None:
        """in eax, ``port``."""
        self.emit(0xE5, port)

    def vmread(self, dst: str, field: str) -> None:
        """VMREAD ``dst`` := the field whose encoding is in register ``field``."""
        self.emit(0x0F, 0x78)
        self._modrm(REGS.index(field), dst)

    def vmwrite_reg(self, field: str, value: str) -> None:
        """VMWRITE the field whose encoding is in register ``field`` := ``value`` (a register)."""
        self.emit(0x0F, 0x79)
        self._modrm(REGS.index(field), value)

    def vmw(self, field: int, value: int | str, fail: str = "fail") -> None:
        """VMWRITE ``field`` := ``value`` (a register, an immediate or a label), via eax/ebx."""
        if value == "eax" or not (isinstance(value, str) and value in REGS):
            self.mov("ebx", value)
            value = "ebx"
        self.mov("eax", field)
        self.vmwrite_reg("eax", value)
        self.jbe(fail)

    def vmr(self, dst: str, field: int, fail: str = "fail") -> None:
        """VMREAD ``dst`` := ``field`` (the encoding goes through eax, or ebx for eax)."""
        via = "ebx" if dst == "eax" else "eax"
        self.mov(via, field)
        self.vmread(dst, via)
        self.jbe(fail)

    # --- instructions of the minimal L1 -------------------------------------------
    def out(self, port: int, value: int | None = None) -> None:
        self.emit(0x66, 0xBA, asm.u16(port))  # mov dx, port
        if value is not None:
            self.emit(0xB0, value)  # mov al, value
        self.emit(0xEE)  # out dx, al

    def step(self, step: int) -> None:
        self.out(PORT_STEP, int(step))

    def vmwrite(self, field: int, value: int | str | None = None) -> None:
        """VMWRITE field := value (or := eax when value is None), jumping to fail on error."""
        if value is None:
            self.emit(0x89, 0xC3)  # mov ebx, eax
        else:
            self.mov_imm("ebx", value)
        self.mov_imm("eax", field)
        self.emit(0x0F, 0x79, 0xC3)  # vmwrite eax, ebx
        self.jbe("fail")

    def jbe(self, label: str) -> None:  # VMX failure: CF=1 (VMfailInvalid) or ZF=1 (VMfailValid)
        self.jcc("be", label)

    def vmwrite_msr(self, field: int, msr: int) -> None:
        self.rdmsr(msr)  # the allowed-0 settings are the low half
        self.vmwrite(field)

    def vmwrite_cr(self, field: int, cr: int) -> None:
        self.mov_from_cr(cr)
        self.vmwrite(field)

    def mem_op(self, prefix: bytes, label: int | str, fail: str = "fail") -> None:
        """VMXON/VMCLEAR/VMPTRLD [label]: 0F C7 /6 with a disp32 operand."""
        self.emit(prefix, 0x0F, 0xC7, 0x35)
        self.u32(label)
        self.jbe(fail)


VMXON_OP, VMCLEAR_OP, VMPTRLD_OP = b"\xf3", b"\x66", b""  # prefixes of 0F C7 /6
VMLAUNCH, VMRESUME = b"\x0f\x01\xc2", b"\x0f\x01\xc3"
VMCALL, VMXOFF = b"\x0f\x01\xc1", b"\x0f\x01\xc4"


def program() -> bytes:
    """The minimal L1 program's machine code, to be loaded at :data:`CODE`."""
    a = _Asm(CODE)
    a.step(Step.START)
    a.rdmsr(0x480)  # IA32_VMX_BASIC: revision id in bits 30:0
    a.emit(0x25)
    a.u32(0x7FFF_FFFF)  # and eax, 0x7fffffff
    a.emit(0xA3)
    a.u32(VMXON)  # mov [VMXON], eax
    a.emit(0xA3)
    a.u32(VMCS)  # mov [VMCS], eax
    a.step(Step.FEATURE_CONTROL)
    a.rdmsr(0x3A)  # IA32_FEATURE_CONTROL
    a.emit(0xA8, 0x01)  # test al, 1 (locked?)
    a.emit(0x75, 0x05)  # jnz over the 5-byte or+wrmsr
    a.emit(0x83, 0xC8, 0x05)  # or eax, 5: lock + VMX outside SMX
    a.wrmsr()
    a.step(Step.VMXE)
    a.mov_from_cr(4)
    a.or_eax(0x2000)  # CR4.VMXE
    a.mov_to_cr(4)
    a.step(Step.VMXON)
    a.mem_op(VMXON_OP, "vmxon_ptr")  # vmxon [vmxon_ptr]
    a.step(Step.CURRENT_VMCS)
    a.mem_op(VMCLEAR_OP, "vmcs_ptr")  # vmclear [vmcs_ptr]
    a.mem_op(VMPTRLD_OP, "vmcs_ptr")  # vmptrld [vmcs_ptr]
    a.step(Step.VMCS_READY)

    # Controls: the TRUE capability MSRs' allowed-0 settings, nothing optional.
    a.vmwrite_msr(PIN_BASED, 0x48D)
    a.vmwrite_msr(PROC_BASED, 0x48E)
    a.vmwrite_msr(EXIT_CONTROLS, 0x48F)  # no host address-space size: L1 is 32-bit
    a.vmwrite_msr(ENTRY_CONTROLS, 0x490)  # no IA-32e guest
    # Host state: L1 itself.
    for field, cr in ((HOST_CR0, 0), (HOST_CR3, 3), (HOST_CR4, 4)):
        a.vmwrite_cr(field, cr)
    for seg, field in HOST_SEL.items():
        a.vmwrite(field, CS_SEL if seg == "cs" else DS_SEL)
    a.vmwrite(HOST_TR_SEL, TR_SEL)
    a.vmwrite(HOST_RSP, L1_STACK)
    a.vmwrite(HOST_RIP, "l1_exit")
    # Guest (L2) state: flat 32-bit segments like L1's, its own stack and entry.
    for field, cr in ((GUEST_CR0, 0), (GUEST_CR3, 3), (GUEST_CR4, 4)):
        a.vmwrite_cr(field, cr)
    for seg, field in GUEST_SEL.items():
        a.vmwrite(field, CS_SEL if seg == "cs" else DS_SEL)
        a.vmwrite(GUEST_LIMIT[seg], 0xFFFF_FFFF)
        a.vmwrite(GUEST_AR[seg], 0xC09B if seg == "cs" else 0xC093)
    a.vmwrite(GUEST_TR_SEL, TR_SEL)
    a.vmwrite(GUEST_TR_LIMIT, 0x67)
    a.vmwrite(GUEST_TR_AR, 0x008B)  # busy 32-bit TSS
    a.vmwrite(GUEST_LDTR_AR, 0x10000)  # unusable
    a.vmwrite(GUEST_GDTR_LIMIT, 0xFFFF)
    a.vmwrite(GUEST_IDTR_LIMIT, 0xFFFF)
    a.vmwrite(GUEST_DR7, 0x400)
    a.vmwrite(GUEST_RSP, L2_STACK)
    a.vmwrite(GUEST_RIP, "l2_entry")
    a.vmwrite(GUEST_RFLAGS, 0x2)
    a.vmwrite(VMCS_LINK, 0xFFFF_FFFF)
    a.vmwrite(VMCS_LINK_HIGH, 0xFFFF_FFFF)
    a.step(Step.LAUNCH)
    a.emit(VMLAUNCH)  # returns only on failure
    a.jmp("fail")

    a.label("l2_entry")
    a.out(PORT_L2, L2_MARK)  # not intercepted by L1: goes to L0's userspace in guest mode
    a.emit(VMCALL)  # always exits to L1
    a.emit(0xEB, 0xFE)  # jmp $

    a.label("l1_exit")
    a.step(Step.L1_AFTER_EXIT)
    a.mov_imm("eax", EXIT_REASON)
    a.emit(0x0F, 0x78, 0xC3)  # vmread ebx, eax
    a.emit(0x88, 0xD8)  # mov al, bl
    a.out(PORT_EXIT_REASON)
    a.emit(0xF4, 0xEB, 0xFE)  # hlt; jmp $

    a.label("fail")
    a.emit(0x9C, 0x59)  # pushfd; pop ecx
    a.emit(0x88, 0xC8)  # mov al, cl
    a.out(PORT_FAIL)
    a.emit(0xF6, 0xC1, 0x40)  # test cl, ZF
    a.emit(0x0F, 0x84)  # jz: VMfailInvalid (ZF=0) has no error number to read
    a.rel32("halt")
    a.mov_imm("eax", VM_INSTRUCTION_ERROR)
    a.emit(0x0F, 0x78, 0xC3)  # vmread ebx, eax
    a.emit(0x88, 0xD8)  # mov al, bl
    a.out(PORT_INSN_ERROR)
    a.label("halt")
    a.emit(0xF4, 0xEB, 0xFE)  # hlt; jmp $

    while a.here % 8:
        a.emit(0x90)
    a.label("vmxon_ptr")
    a.emit(asm.u64(VMXON))
    a.label("vmcs_ptr")
    a.emit(asm.u64(VMCS))
    return a.build()


def flat_segments(sregs: uapi.kvm_sregs) -> None:
    """Make CS, DS, ES, FS, GS and SS of ``sregs`` what both L1s run with: flat 32-bit
    ring-0 segments, code at :data:`CS_SEL` and data at :data:`DS_SEL` of their GDT."""
    flat = dict(base=0, limit=0xFFFF_FFFF, present=1, dpl=0, db=1, s=1, l=0, g=1)
    for name in ("cs", "ds", "es", "fs", "gs", "ss"):
        seg = getattr(sregs, name)
        for field, value in flat.items():
            setattr(seg, field, value)
        seg.selector, seg.type = (CS_SEL, 11) if name == "cs" else (DS_SEL, 3)


def page_directory() -> bytes:
    """One PDE: a present, writable 4 MiB page at 0 (CR4.PSE)."""
    return struct.pack("<I", 0x83)


# =============================================================================== the migration L1


class GPA:
    """Guest-physical memory map of the migration L1 (one page each unless said)."""

    GDT = 0x1000
    PAGE_DIR = 0x2000
    VMXON = 0x3000
    VMCS = 0x4000
    SHADOW_VMCS = 0x5000
    IO_BITMAP_A = 0x6000  # ports 0x0000-0x7fff
    IO_BITMAP_B = 0x7000  # ports 0x8000-0xffff
    VMREAD_BITMAP = 0x8000
    VMWRITE_BITMAP = 0x9000
    L2_IDT = 0xA000
    L1_IDT = 0xB000  # all gates absent: an exception in L1 ends in a triple fault
    TSS = 0xC000
    L1_DATA = 0xD000
    L2_DATA = 0xE000
    L2_STACK = 0x10000  # top (the stack is the page below)
    L1_STACK = 0x11000  # top
    CODE = 0x20000  # up to BUFFER
    BUFFER = 0x30800  # L2's work buffer, WORDS dwords (across a page boundary)
    MEMORY = 0x40000  # all of it, one memory slot at 0 (the 4 MiB page maps more)


# L1's variables (in GPA.L1_DATA) and L2's (in GPA.L2_DATA).
_REVISION = At(GPA.L1_DATA + 0x00)
_TIMER_ON = At(GPA.L1_DATA + 0x04)
_EXITS = At(GPA.L1_DATA + 0x08)
_TIMER_EXITS = At(GPA.L1_DATA + 0x0C)
_LAST_REASON = At(GPA.L1_DATA + 0x10)
_VMXON_PTR, _VMCS_PTR, _SHADOW_PTR = GPA.L1_DATA + 0x20, GPA.L1_DATA + 0x28, GPA.L1_DATA + 0x30
#: L2's event counter and log (one vector per dword) in GPA.L2_DATA.
EVENT_COUNT, EVENT_LOG = GPA.L2_DATA, GPA.L2_DATA + 0x10


class Port(enum.IntEnum):
    """The migration L1's ports; L1's below 0x30, L2's from 0x30 (32-bit writes, but STEP)."""

    STEP = 0x10  #: a :class:`Phase` (byte)
    FAIL = 0x11  #: EFLAGS after a failed VMX instruction (byte)
    EXIT_REASON = 0x12  #: the full exit reason L1 read after an L2 exit
    INSN_ERROR = 0x13  #: the VM-instruction error number after VMfailValid (byte)
    SHADOW = 0x14  #: the shadow-VMCS fields L1 reads at the end, L1's then L2's
    UNEXPECTED = 0x15  #: an exit L1 cannot handle: the exit reason, then the qualification
    PROGRESS = 0x30  #: L2: the round number (exits to userspace in guest mode)
    NMI = 0x31  #: L2 asks the VMM for an NMI (the test uses KVM_NMI)
    NMI_EVENTS = 0x32  #: L2 asks for an NMI (the test uses KVM_SET_VCPU_EVENTS)
    IRQ = 0x33  #: L2 asks for an external interrupt (the test uses KVM_INTERRUPT)
    RESULT = 0x34  #: L2's final checksum
    L2_FAIL = 0x35  #: EFLAGS after a failed VMREAD/VMWRITE in L2
    L1_IO = 0x50  #: in L1's I/O bitmap: L2's ``in`` from it exits to L1


class Phase(enum.IntEnum):
    """What the migration L1 reports on :attr:`Port.STEP`."""

    START = 1  #: before anything: no VMXON yet
    VMXON = 2  #: VMXON done
    CURRENT_VMCS = 3  #: VMCLEAR + VMPTRLD done, the VMCS not yet written
    LAUNCH = 4  #: the VMCS is written; VMLAUNCH is the next instruction after this port write
    L1_EXIT = 5  #: an L2 exit reached L1, which has read nothing yet
    RESUME = 6  #: VMRESUME follows (after L1 restores L2's registers)
    SHADOW_CURRENT = 7  #: the shadow VMCS is current and L1 has VMWRITten it
    VMXOFF = 8  #: VMXOFF done
    DONE = 9  #: the end


class Cmd(enum.IntEnum):
    """What L2 asks of L1 with VMCALL (in EAX)."""

    ROUND = 1  #: nothing but the answer
    TIMER_ON = 2  #: turn on the VMX preemption timer (and saving its value at exits)
    TIMER_ZERO = 3  #: the next VMRESUME with timer value 0: a preemption-timer exit at once
    INJECT_SOFT = 4  #: resume with a software interrupt (VECTOR_SOFT) injected, not past VMCALL
    SHADOW_ON = 5  #: make a shadow VMCS, write it, link it and turn on VMCS shadowing
    DONE = 6  #: read the shadow VMCS back, VMXOFF, stop


class Action(enum.Enum):
    """What L2 does after a round of work."""

    PROGRESS = "out PROGRESS, round"
    VMCALL = "vmcall ROUND"
    CPUID = "cpuid (L1 emulates it)"
    IN_L1 = "in from L1_IO (in L1's I/O bitmap)"
    NMI = "out NMI: an NMI from the VMM (KVM_NMI), reflected into L2"
    NMI_EVENTS = "out NMI_EVENTS: an NMI from KVM_SET_VCPU_EVENTS, reflected into L2"
    IRQ = "out IRQ: an external interrupt (KVM_INTERRUPT), reflected into L2"
    INJECT_SOFT = "vmcall INJECT_SOFT: L1 injects a software interrupt"
    TIMER_ON = "vmcall TIMER_ON"
    TIMER_ZERO = "vmcall TIMER_ZERO: a preemption-timer exit"
    SHADOW_ON = "vmcall SHADOW_ON"
    SHADOW_RW = "VMREAD/VMWRITE of the shadow VMCS around an out PROGRESS, round"


#: L2's plan: a round of work, then this action, for each entry (the round is its index).
SCRIPT = (
    Action.PROGRESS, Action.VMCALL, Action.CPUID, Action.IN_L1,
    Action.TIMER_ON, Action.PROGRESS, Action.NMI, Action.INJECT_SOFT, Action.TIMER_ZERO,
    Action.IRQ,
    Action.SHADOW_ON, Action.SHADOW_RW, Action.NMI_EVENTS, Action.CPUID, Action.SHADOW_RW,
    Action.PROGRESS,
)  # fmt: skip

# What shapes the checksum (a test's model uses these, and its own arithmetic).
WORDS = 1024  #: dwords in L2's buffer (4 KiB from GPA.BUFFER)
SEED = 0x1234_5678  #: xorshift32's first state
CHECKSUM_START = 0x811C_9DC5
MULTIPLIER = 0x9E37_79B1  #: fold(h, v) = (rol(h, 5) ^ v) * MULTIPLIER mod 2**32
VMCALL_SALT = 0xA5A5_A5A5  #: L1 answers every VMCALL with EAX = rol(L2's EBX, 11) ^ this
CPUID_LEAF = 0x4B56_3031  #: L1 answers it from ECX: ~ECX, rol(ECX, 3), ECX + 0x31, CPUID_EDX
CPUID_ECX_ADD = 0x31
CPUID_EDX = 0x4C31_4C31
SHADOW_SALT_L1 = 0x5EAD_5EAD  #: L1 writes SHADOW_FIELD_L1 = L2's EBX ^ this
SHADOW_SALT_L2 = 0x3C3C_3C3C  #: L2 writes SHADOW_FIELD_L2 = its checksum ^ this
VECTOR_NMI, VECTOR_EXTERNAL, VECTOR_SOFT = 2, 0x41, 0x43
TIMER_LONG = 1 << 31  #: the timer value L1 writes at every exit while the timer is on

# Event types of VM-exit and VM-entry interruption information (bits 10:8), and bit 31.
_VALID, _TYPE_EXT, _TYPE_NMI, _TYPE_SOFT = 1 << 31, 0 << 8, 2 << 8, 4 << 8
#: The direction bit of an I/O exit qualification (bit 3: IN).
IO_QUALIFICATION_IN = 0x8


@dataclasses.dataclass(frozen=True)
class Image:
    """The migration L1's memory: code and data, and the labels of the code."""

    code: bytes
    labels: Mapping[str, int]
    pages: Mapping[int, bytes]  #: guest-physical address -> initial bytes (code included)

    def load(self, memory: mmap.mmap | bytearray) -> None:
        """Write every part into ``memory`` (a buffer mapped at guest-physical 0)."""
        for address, data in self.pages.items():
            memory[address : address + len(data)] = data


def _gdt() -> bytes:
    tss_low = (GPA.TSS & 0xFFFF) << 16 | 0x67
    tss_high = (GPA.TSS & 0xFF00_0000) | 0x8B00 | (GPA.TSS >> 16 & 0xFF)  # busy 32-bit TSS
    return struct.pack("<QQQII", 0, 0x00CF_9B00_0000_FFFF, 0x00CF_9300_0000_FFFF, tss_low, tss_high)


GDT_LIMIT = len(_gdt()) - 1
IDT_LIMIT = 256 * 8 - 1


def _idt(handlers: Mapping[int, int]) -> bytes:
    """32-bit interrupt gates (present, DPL 0, CS_SEL) for ``{vector: address}``."""
    idt = bytearray(256 * 8)
    for vector, address in handlers.items():
        struct.pack_into(
            "<II", idt, vector * 8, CS_SEL << 16 | address & 0xFFFF, address & 0xFFFF_0000 | 0x8E00
        )
    return bytes(idt)


def _bitmap_page(clear: tuple[int, ...] = (), set_: tuple[int, ...] = (), fill: int = 0) -> bytes:
    page = bytearray([fill]) * 4096
    for bit in clear:
        page[bit >> 3] &= ~(1 << (bit & 7)) & 0xFF
    for bit in set_:
        page[bit >> 3] |= 1 << (bit & 7)
    return bytes(page)


def nested_image() -> Image:
    """The migration L1 and its L2, with the pages they start from (see the module doc)."""
    a = _Asm(GPA.CODE)
    _l1_setup(a)
    _l1_exit_handler(a)
    _l2(a)
    code = a.build()
    if GPA.CODE + len(code) > GPA.BUFFER:
        raise AssertionError("the code overlaps L2's buffer")
    labels = dict(a.labels)
    pages = {
        GPA.CODE: code,
        GPA.GDT: _gdt(),
        GPA.PAGE_DIR: page_directory(),
        GPA.IO_BITMAP_A: _bitmap_page(set_=(Port.L1_IO,)),
        GPA.IO_BITMAP_B: _bitmap_page(),
        # VMREAD/VMWRITE of every field exit to L1 but the two L2 uses.
        GPA.VMREAD_BITMAP: _bitmap_page(clear=(SHADOW_FIELD_L1, SHADOW_FIELD_L2), fill=0xFF),
        GPA.VMWRITE_BITMAP: _bitmap_page(clear=(SHADOW_FIELD_L2,), fill=0xFF),
        GPA.L2_IDT: _idt({v: labels[f"l2_vector_{v:#x}"] for v in _L2_VECTORS}),
        GPA.L1_IDT: bytes(256 * 8),
        GPA.L1_DATA + 0x20: struct.pack("<QQQ", GPA.VMXON, GPA.VMCS, GPA.SHADOW_VMCS),
    }
    return Image(code, labels, pages)


_L2_VECTORS = (VECTOR_NMI, VECTOR_EXTERNAL, VECTOR_SOFT)


def _l1_setup(a: _Asm) -> None:
    a.label("l1_entry")
    a.emit(0xFA)  # cli: L1 never takes interrupts (and KVM opens no interrupt window in it)
    a.step(Phase.START)
    a.rdmsr(MSR_VMX_BASIC)
    a.alu("and", "eax", 0x7FFF_FFFF)  # the revision id
    a.mov(_REVISION, "eax")
    a.mov(At(GPA.VMXON), "eax")
    a.mov(At(GPA.VMCS), "eax")
    a.rdmsr(MSR_FEATURE_CONTROL)
    a.test("eax", 1)
    a.jcc("ne", "feature_control_locked")
    a.alu("or", "eax", 0x5)  # lock + VMX outside SMX
    a.wrmsr()
    a.label("feature_control_locked")
    a.mov_from_cr(4)
    a.alu("or", "eax", CR4_VMXE)
    a.mov_to_cr(4)
    a.mem_op(VMXON_OP, _VMXON_PTR)
    a.step(Phase.VMXON)
    a.mem_op(VMCLEAR_OP, _VMCS_PTR)
    a.mem_op(VMPTRLD_OP, _VMCS_PTR)
    a.step(Phase.CURRENT_VMCS)

    # Controls: the TRUE MSRs' allowed-0 settings plus what this L1 needs.
    for field, msr, extra in (
        (PIN_BASED, MSR_VMX_TRUE_PINBASED, v12.PIN_BASED_EXT_INTR_MASK | v12.PIN_BASED_NMI_EXITING),
        (PROC_BASED, MSR_VMX_TRUE_PROCBASED,
         v12.CPU_BASED_USE_IO_BITMAPS | v12.CPU_BASED_ACTIVATE_SECONDARY_CONTROLS),
        (EXIT_CONTROLS, MSR_VMX_TRUE_EXIT, v12.VM_EXIT_ACK_INTR_ON_EXIT),  # 32-bit host
        (ENTRY_CONTROLS, MSR_VMX_TRUE_ENTRY, 0),  # no IA-32e guest
    ):  # fmt: skip
        a.rdmsr(msr)
        if extra:
            a.alu("or", "eax", extra)
        a.vmw(field, "eax")
    a.vmw(SECONDARY_CONTROLS, 0)
    for field, page in ((IO_BITMAP_A, GPA.IO_BITMAP_A), (IO_BITMAP_B, GPA.IO_BITMAP_B)):
        a.vmw(field, page)
        a.vmw(field + 1, 0)
    # Host state: L1 itself.
    for field, cr in ((HOST_CR0, 0), (HOST_CR3, 3), (HOST_CR4, 4)):
        a.mov_from_cr(cr)
        a.vmw(field, "eax")
    for seg, field in HOST_SEL.items():
        a.vmw(field, CS_SEL if seg == "cs" else DS_SEL)
    a.vmw(HOST_TR_SEL, TR_SEL)
    a.vmw(HOST_TR_BASE, GPA.TSS)
    a.vmw(HOST_GDTR_BASE, GPA.GDT)
    a.vmw(HOST_IDTR_BASE, GPA.L1_IDT)
    a.vmw(HOST_RSP, GPA.L1_STACK)
    a.vmw(HOST_RIP, "l1_exit")
    # Guest (L2) state: flat 32-bit segments like L1's, its own stack, IDT and entry.
    for field, cr in ((GUEST_CR0, 0), (GUEST_CR3, 3), (GUEST_CR4, 4)):
        a.mov_from_cr(cr)
        a.vmw(field, "eax")
    for seg, field in GUEST_SEL.items():
        a.vmw(field, CS_SEL if seg == "cs" else DS_SEL)
        a.vmw(GUEST_LIMIT[seg], 0xFFFF_FFFF)
        a.vmw(GUEST_AR[seg], 0xC09B if seg == "cs" else 0xC093)
    a.vmw(GUEST_TR_SEL, TR_SEL)
    a.vmw(GUEST_TR_BASE, GPA.TSS)
    a.vmw(GUEST_TR_LIMIT, 0x67)
    a.vmw(GUEST_TR_AR, 0x008B)  # busy 32-bit TSS
    a.vmw(GUEST_LDTR_AR, 0x10000)  # unusable
    a.vmw(GUEST_GDTR_BASE, GPA.GDT)
    a.vmw(GUEST_GDTR_LIMIT, GDT_LIMIT)
    a.vmw(GUEST_IDTR_BASE, GPA.L2_IDT)
    a.vmw(GUEST_IDTR_LIMIT, IDT_LIMIT)
    a.vmw(GUEST_DR7, 0x400)
    a.vmw(GUEST_RSP, GPA.L2_STACK)
    a.vmw(GUEST_RIP, "l2_entry")
    a.vmw(GUEST_RFLAGS, 0x202)  # IF: L1 injects external interrupts, which need it
    a.vmw(VMCS_LINK, 0xFFFF_FFFF)
    a.vmw(VMCS_LINK_HIGH, 0xFFFF_FFFF)
    a.step(Phase.LAUNCH)
    a.emit(VMLAUNCH)  # returns only on failure
    a.jmp("fail")

    a.label("fail")  # EFLAGS, then the VM-instruction error when there is one
    a.emit(0x9C)  # pushfd
    a.pop("ecx")
    a.mov("eax", "ecx")
    a.out32(Port.FAIL)
    a.test("ecx", 0x40)  # ZF: VMfailValid
    a.jcc("e", "stop")
    a.mov("eax", VM_INSTRUCTION_ERROR)
    a.vmread("ecx", "eax")
    a.mov("eax", "ecx")
    a.out32(Port.INSN_ERROR)
    a.label("stop")
    a.emit(0xEB, 0xFE)  # jmp $ (not hlt: with an in-kernel LAPIC the vCPU would only block)

    a.label("unexpected")  # an exit L1 cannot handle: its reason and qualification
    a.mov("eax", _LAST_REASON)
    a.out32(Port.UNEXPECTED)
    a.vmr("ecx", EXIT_QUALIFICATION)
    a.mov("eax", "ecx")
    a.out32(Port.UNEXPECTED)
    a.jmp("stop")


# pushad's frame, from ESP up: EDI, ESI, EBP, (ESP), EBX, EDX, ECX, EAX.
_SAVED = {"edi": At(0, esp=True), "esi": At(4, esp=True), "ebx": At(16, esp=True),
          "edx": At(20, esp=True), "ecx": At(24, esp=True), "eax": At(28, esp=True)}  # fmt: skip


def _l1_exit_handler(a: _Asm) -> None:
    a.label("l1_exit")
    a.emit(0x60)  # pushad: L2's registers, which VMX does not save
    a.step(Phase.L1_EXIT)
    a.vmr("ecx", EXIT_REASON)
    a.mov(_LAST_REASON, "ecx")
    a.mov("eax", "ecx")
    a.out32(Port.EXIT_REASON)
    a.inc(_EXITS)
    # While the timer is on, give L2 a full timer again at every exit it takes.
    a.alu("cmp", _TIMER_ON, 0)
    a.jcc("e", "timer_armed")
    a.vmw(PREEMPTION_TIMER_VALUE, TIMER_LONG)
    a.label("timer_armed")
    a.mov("ecx", _LAST_REASON)
    a.alu("and", "ecx", 0xFFFF)  # the basic exit reason (bit 31 would be a failed entry)
    for reason, label in (
        (EXIT_REASON_VMCALL, "on_vmcall"),
        (EXIT_REASON_CPUID, "on_cpuid"),
        (EXIT_REASON_IO, "on_io"),
        (EXIT_REASON_NMI, "on_nmi"),
        (EXIT_REASON_EXTERNAL_INTERRUPT, "on_interrupt"),
        (EXIT_REASON_PREEMPTION_TIMER, "on_timer"),
    ):
        a.alu("cmp", "ecx", reason)
        a.jcc("e", label)
    a.jmp("unexpected")

    a.label("advance")  # guest RIP += the exit's instruction length (a subroutine)
    a.vmr("ecx", EXIT_INSTRUCTION_LEN)
    a.vmr("edx", GUEST_RIP)
    a.alu("add", "edx", "ecx")
    a.vmw(GUEST_RIP, "edx")
    a.emit(0xC3)  # ret

    a.label("resume")
    a.step(Phase.RESUME)
    a.emit(0x61)  # popad
    a.emit(VMRESUME)  # returns only on failure
    a.jmp("fail")

    a.label("on_vmcall")  # every VMCALL answers EAX = rol(EBX, 11) ^ VMCALL_SALT
    a.mov("edx", _SAVED["eax"])
    a.mov("eax", _SAVED["ebx"])
    a.shift("rol", "eax", 11)
    a.alu("xor", "eax", VMCALL_SALT)
    a.mov(_SAVED["eax"], "eax")
    for cmd in Cmd:
        a.alu("cmp", "edx", int(cmd))
        a.jcc("e", f"cmd_{cmd.name.lower()}")
    a.jmp("unexpected")

    a.label("cmd_round")
    a.call("advance")
    a.jmp("resume")

    a.label("cmd_timer_on")
    a.vmr("eax", PIN_BASED)
    a.alu("or", "eax", v12.PIN_BASED_VMX_PREEMPTION_TIMER)
    a.vmw(PIN_BASED, "eax")
    a.vmr("eax", EXIT_CONTROLS)
    a.alu("or", "eax", v12.VM_EXIT_SAVE_VMX_PREEMPTION_TIMER)
    a.vmw(EXIT_CONTROLS, "eax")
    a.vmw(PREEMPTION_TIMER_VALUE, TIMER_LONG)
    a.mov(_TIMER_ON, 1)
    a.call("advance")
    a.jmp("resume")

    a.label("cmd_timer_zero")
    a.vmw(PREEMPTION_TIMER_VALUE, 0)
    a.call("advance")
    a.jmp("resume")

    a.label("cmd_inject_soft")  # INT 0x43 "at" the VMCALL: L2 returns past it
    a.vmr("ecx", EXIT_INSTRUCTION_LEN)
    a.vmw(ENTRY_INSTRUCTION_LEN, "ecx")
    a.vmw(ENTRY_INTR_INFO, _VALID | _TYPE_SOFT | VECTOR_SOFT)
    a.jmp("resume")

    a.label("cmd_shadow_on")
    a.mov(At(GPA.SHADOW_VMCS), SHADOW_VMCS_INDICATOR)
    a.mov("eax", _REVISION)
    a.alu("or", At(GPA.SHADOW_VMCS), "eax")
    a.mem_op(VMCLEAR_OP, _SHADOW_PTR)
    a.mem_op(VMPTRLD_OP, _SHADOW_PTR)
    a.mov("ecx", _SAVED["ebx"])
    a.alu("xor", "ecx", SHADOW_SALT_L1)
    a.vmw(SHADOW_FIELD_L1, "ecx")
    a.step(Phase.SHADOW_CURRENT)
    a.mem_op(VMPTRLD_OP, _VMCS_PTR)
    a.vmw(VMCS_LINK, GPA.SHADOW_VMCS)
    a.vmw(VMCS_LINK_HIGH, 0)
    for field, page in ((VMREAD_BITMAP, GPA.VMREAD_BITMAP), (VMWRITE_BITMAP, GPA.VMWRITE_BITMAP)):
        a.vmw(field, page)
        a.vmw(field + 1, 0)
    a.vmr("eax", SECONDARY_CONTROLS)
    a.alu("or", "eax", v12.SECONDARY_EXEC_SHADOW_VMCS)
    a.vmw(SECONDARY_CONTROLS, "eax")
    a.call("advance")
    a.jmp("resume")

    a.label("cmd_done")
    a.mem_op(VMPTRLD_OP, _SHADOW_PTR)
    for field in (SHADOW_FIELD_L1, SHADOW_FIELD_L2):
        a.vmr("ecx", field)
        a.mov("eax", "ecx")
        a.out32(Port.SHADOW)
    a.mem_op(VMCLEAR_OP, _SHADOW_PTR)
    a.emit(VMXOFF)
    a.jbe("fail")
    a.step(Phase.VMXOFF)
    a.step(Phase.DONE)
    a.jmp("stop")

    a.label("on_cpuid")
    a.alu("cmp", _SAVED["eax"], CPUID_LEAF)
    a.jcc("ne", "unexpected")
    a.mov("ecx", _SAVED["ecx"])
    a.mov("eax", "ecx")
    a.not_("eax")
    a.mov(_SAVED["eax"], "eax")
    a.mov("eax", "ecx")
    a.shift("rol", "eax", 3)
    a.mov(_SAVED["ebx"], "eax")
    a.mov("eax", "ecx")
    a.alu("add", "eax", CPUID_ECX_ADD)
    a.mov(_SAVED["ecx"], "eax")
    a.mov(_SAVED["edx"], CPUID_EDX)
    a.call("advance")
    a.jmp("resume")

    a.label("on_io")  # only IN from L1_IO is in the bitmap: answer with the qualification
    a.vmr("ecx", EXIT_QUALIFICATION)
    a.mov("eax", "ecx")
    a.shift("shr", "eax", 16)
    a.alu("cmp", "eax", Port.L1_IO)
    a.jcc("ne", "unexpected")
    a.test("ecx", IO_QUALIFICATION_IN)
    a.jcc("e", "unexpected")
    a.mov(_SAVED["eax"], "ecx")
    a.call("advance")
    a.jmp("resume")

    a.label("on_nmi")  # reflect the NMI into L2, then unblock NMIs in L1 with an IRET
    a.vmr("ecx", EXIT_INTR_INFO)
    a.alu("cmp", "ecx", _VALID | _TYPE_NMI | VECTOR_NMI)
    a.jcc("ne", "unexpected")
    a.vmw(ENTRY_INTR_INFO, _VALID | _TYPE_NMI | VECTOR_NMI)
    a.emit(0x9C)  # pushfd
    a.push(CS_SEL)
    a.push("nmi_unblocked")
    a.emit(0xCF)  # iretd
    a.label("nmi_unblocked")
    a.jmp("resume")

    a.label("on_interrupt")  # acknowledged on exit: reflect the vector into L2
    a.vmr("ecx", EXIT_INTR_INFO)
    a.mov("eax", "ecx")
    a.alu("and", "eax", _VALID | 0x700)
    a.alu("cmp", "eax", _VALID | _TYPE_EXT)
    a.jcc("ne", "unexpected")
    a.vmw(ENTRY_INTR_INFO, "ecx")
    a.jmp("resume")

    a.label("on_timer")  # the timer was armed again above
    a.inc(_TIMER_EXITS)
    a.jmp("resume")


def _l2(a: _Asm) -> None:
    a.label("l2_entry")  # EBX: checksum, ESI: xorshift32 state, for the whole run
    a.mov("esi", SEED)
    a.mov("ebx", CHECKSUM_START)
    for round_, action in enumerate(SCRIPT):
        a.call("l2_work")
        _l2_action(a, round_, action)
    a.mov("eax", "ebx")
    a.out32(Port.RESULT)
    a.mov("eax", int(Cmd.DONE))
    a.emit(VMCALL)
    a.emit(0xEB, 0xFE)  # jmp $: L1 does not come back

    a.label("l2_work")  # one round over the buffer
    a.mov("ecx", 0)
    a.label("l2_work_loop")
    for op, count in (("shl", 13), ("shr", 17), ("shl", 5)):  # xorshift32
        a.mov("eax", "esi")
        a.shift(op, "eax", count)
        a.alu("xor", "esi", "eax")
    word = At(GPA.BUFFER, index="ecx")
    a.mov("eax", word)
    a.shift("rol", "eax", 3)
    a.alu("xor", "eax", "esi")
    a.mov(word, "eax")
    a.call("l2_fold")
    a.alu("add", "ecx", 1)
    a.alu("cmp", "ecx", WORDS)
    a.jcc("b", "l2_work_loop")
    a.emit(0xC3)

    a.label("l2_fold")  # EBX = (rol(EBX, 5) ^ EAX) * MULTIPLIER
    a.shift("rol", "ebx", 5)
    a.alu("xor", "ebx", "eax")
    a.imul("ebx", "ebx", MULTIPLIER)
    a.emit(0xC3)

    a.label("l2_fold_events")  # the event count, then the last vector logged
    a.mov("eax", At(EVENT_COUNT))
    a.call("l2_fold")
    a.mov("eax", At(EVENT_COUNT))
    a.mov("eax", At(EVENT_LOG - 4, index="eax"))
    a.call("l2_fold")
    a.emit(0xC3)

    for vector in _L2_VECTORS:
        a.label(f"l2_vector_{vector:#x}")
        a.push("eax")
        a.mov("eax", At(EVENT_COUNT))
        a.mov(At(EVENT_LOG, index="eax"), vector)
        a.inc(At(EVENT_COUNT))
        a.pop("eax")
        a.emit(0xCF)  # iretd

    a.label("l2_fail")
    a.emit(0x9C)  # pushfd
    a.pop("eax")
    a.out32(Port.L2_FAIL)
    a.emit(0xEB, 0xFE)


def _l2_action(a: _Asm, round_: int, action: Action) -> None:
    def vmcall(cmd: Cmd) -> None:
        a.mov("eax", int(cmd))
        a.emit(VMCALL)
        a.call("l2_fold")

    if action is Action.PROGRESS:
        a.mov("eax", round_)
        a.out32(Port.PROGRESS)
    elif action is Action.VMCALL:
        vmcall(Cmd.ROUND)
    elif action is Action.CPUID:
        a.push("ebx")
        a.mov("ecx", "ebx")
        a.mov("eax", CPUID_LEAF)
        a.emit(0x0F, 0xA2)  # cpuid
        a.mov("edi", "ebx")
        a.pop("ebx")
        a.call("l2_fold")
        for reg in ("edi", "ecx", "edx"):
            a.mov("eax", reg)
            a.call("l2_fold")
    elif action is Action.IN_L1:
        a.in32(Port.L1_IO)
        a.call("l2_fold")
    elif action in (Action.NMI, Action.NMI_EVENTS, Action.IRQ):
        port = {Action.NMI: Port.NMI, Action.NMI_EVENTS: Port.NMI_EVENTS, Action.IRQ: Port.IRQ}
        a.mov("eax", round_)
        a.out32(port[action])
        a.call("l2_fold_events")
    elif action is Action.INJECT_SOFT:
        vmcall(Cmd.INJECT_SOFT)
        a.call("l2_fold_events")
    elif action is Action.TIMER_ON:
        vmcall(Cmd.TIMER_ON)
    elif action is Action.TIMER_ZERO:
        vmcall(Cmd.TIMER_ZERO)
    elif action is Action.SHADOW_ON:
        vmcall(Cmd.SHADOW_ON)
    elif action is Action.SHADOW_RW:
        a.vmr("ecx", SHADOW_FIELD_L1, fail="l2_fail")
        a.mov("eax", "ecx")
        a.call("l2_fold")
        a.mov("ecx", "ebx")
        a.alu("xor", "ecx", SHADOW_SALT_L2)
        a.mov("eax", SHADOW_FIELD_L2)
        a.vmwrite_reg("eax", "ecx")
        a.jbe("l2_fail")
        # Now SHADOW_FIELD_L2 lives only in KVM's cached shadow vmcs12 (and so in a
        # saved nested state), not in guest memory: KVM writes it back at the next exit to L1.
        a.mov("eax", round_)
        a.out32(Port.PROGRESS)
        a.vmr("ecx", SHADOW_FIELD_L2, fail="l2_fail")
        a.mov("eax", "ecx")
        a.call("l2_fold")
    else:  # pragma: no cover - every action is handled above
        raise AssertionError(action)
