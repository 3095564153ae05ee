"""A multiboot L1 hypervisor for QEMU's ``-kernel``, assembled here: VMRUN into a counting L2.

QEMU boots it (SeaBIOS, then its multiboot option ROM) in 32-bit protected
mode with paging off. L1 then

1. loads its own GDT and stack, prints ``L1 start``;
2. checks CPUID for SVM (else prints ``L1 no svm`` and halts);
3. turns on paging (CR4.PSE, one page directory of 4 MiB pages identity-mapping
   the first 32 MiB): KVM answers #UD to SVM instructions while paging is off,
   and KVM_SET_NESTED_STATE wants L1's saved CR0 to have PG and PE;
4. sets EFER.SVME and VM_HSAVE_PA, fills an I/O permission map with ones
   (every port) but leaves the IOIO intercept off, and builds a VMCB: only
   VMRUN intercepted, ASID 1, L2's state a copy of its own with L2's RIP/RSP;
5. prints ``L1 vmrun`` and executes VMRUN.

L2 counts forever in EBX, storing the count at :data:`COUNTER` after each
increment, and every ``progress_mask + 1`` counts prints ``L2 <count in
hex>`` on the debug console (port 0xE9, QEMU's ``-debugcon``). L1 does not
intercept that port, so L2's output reaches QEMU directly and L2 keeps
running in guest mode.

If L2 ever exits to L1 (nothing in L1's own VMCB makes it), L1 counts the
exit at :data:`L1_EXITS`, prints ``L1 exit <code> next <exit_info_2>`` and,
for an IOIO exit (0x7B), resumes L2 after the OUT (EXITINFO2 holds the next
RIP) with its own VMCB, whose intercepts leave the port alone again. A
nested state whose vmcb12 controls gain the IOIO intercept therefore shows
up on the console as exactly one ``L1 exit 0000007b`` line, after which L2
goes on counting: what the migration tests modify and watch for.

Memory (guest-physical, all below :data:`BSS_END`; QEMU zeroes the part
past the image): see the constants below.
"""

from __future__ import annotations

from kvmstate import vmcb
from tests.support import asm
from tests.support.asm import REG32, u16, u64

LOAD = 0x10_0000  # where QEMU's multiboot loader puts the image (1 MiB)
PAGE_DIR = 0x10_2000
HSAVE = 0x10_3000  # VM_HSAVE_PA: the host save area VMRUN uses
VMCB = 0x10_4000  # L1's VMCB for L2: the nested state's vmcb_pa
IOPM = 0x10_5000  # 12 KiB, all ones: every port intercepted when IOIO is on
MSRPM = 0x10_8000  # 8 KiB, zero
COUNTER = 0x10_A000  # L2's count (u32)
L1_EXITS = 0x10_A004  # how many #VMEXITs L1 has seen (u32)
L2_STACK = 0x10_C000  # top of L2's stack
L1_STACK = 0x10_D000  # top of L1's stack
TSS = 0x10_D000  # 104 zero bytes for L2's TR
BSS_END = 0x10_E000
MEMORY_MIB = 32  # what the page directory maps; QEMU's -m must be at least this
DEBUG_PORT = 0xE9

CODE_SEL, DATA_SEL, TR_SEL = 0x08, 0x10, 0x18
CR0_PG, CR4_PSE = 0x8000_0000, 0x10
MSR_EFER, MSR_VM_HSAVE_PA = 0xC000_0080, 0xC001_0117
DEFAULT_PAT = 0x0007_0406_0007_0406
# VMCB segment attributes (type, S, DPL, P, AVL, L, DB, G in 12 bits): flat 32-bit ring 0.
CODE_ATTRIB, DATA_ATTRIB, TSS_ATTRIB = 0xC9B, 0xC93, 0x08B
MULTIBOOT_MAGIC, MULTIBOOT_AOUT_KLUDGE = 0x1BAD_B002, 0x0001_0000
# The default: a progress line every 2^20 counts.
PROGRESS_MASK = 0xF_FFFF

_CONTROL = vmcb.vmcb_control_area
_SAVE = vmcb.vmcb_save_area
_SAVE_AT = vmcb.vmcb.save.offset  # 0x400


def control_offset(name: str) -> int:
    """Where a vmcb12 control field is, from the gcc-checked mirror (``"asid"`` -> 0x58)."""
    return int(getattr(_CONTROL, name).offset)


def save_offset(name: str) -> int:
    """Where a vmcb12 save-area field is, from the VMCB's start (``"rip"`` -> 0x578)."""
    return int(_SAVE_AT + getattr(_SAVE, name).offset)


class _Asm(asm.Assembler):
    """Just enough 32-bit x86 for the program; backward jumps in reach take the short form."""

    def _branch(self, short: bytes, near: bytes, label: str) -> None:
        # Backward targets in reach get the short form; the rest the rel32 form.
        target = self.labels.get(label)
        if target is not None and -128 <= target - (self.here + len(short) + 1) <= 127:
            self.emit(short)
            self.rel8(label)
        else:
            self.emit(near)
            self.rel32(label)

    # --- instructions -------------------------------------------------------------
    def jmp(self, label: str) -> None:
        self._branch(b"\xeb", b"\xe9", label)

    def jz(self, label: str) -> None:
        self._branch(b"\x74", b"\x0f\x84", label)

    def jnz(self, label: str) -> None:
        self._branch(b"\x75", b"\x0f\x85", label)

    def jne(self, label: str) -> None:
        self.jnz(label)

    def store(self, address: int, value: int | str) -> None:
        """mov dword [address], imm32."""
        self.emit(0xC7, 0x05)
        self.u32(address)
        self.u32(value)

    def store_reg(self, address: int, reg: str) -> None:
        """mov [address], r32."""
        self.emit(0x89, 0x05 | REG32[reg] << 3)
        self.u32(address)

    def load_reg(self, reg: str, address: int) -> None:
        """mov r32, [address]."""
        self.emit(0x8B, 0x05 | REG32[reg] << 3)
        self.u32(address)

    def out_al(self, label: str | None = None) -> None:
        if label is not None:
            self.label(label)
        self.emit(0xE6, DEBUG_PORT)  # out 0xe9, al

    def putc(self, char: str, label: str | None = None) -> None:
        self.emit(0xB0, ord(char))  # mov al, char
        self.out_al(label)

    def print(self, label: str) -> None:
        self.mov_imm("esi", label)
        self.call("print")


# The console lines, NUL-terminated.
_STRINGS = {
    "msg_start": "L1 start\n",
    "msg_nosvm": "L1 no svm\n",
    "msg_vmrun": "L1 vmrun\n",
    "msg_exit": "L1 exit ",
    "msg_next": " next ",
    "msg_stop": "L1 stop\n",
    "msg_l2": "L2 ",
}


def program(progress_mask: int = PROGRESS_MASK) -> tuple[bytes, dict[str, int]]:
    """The image to load at :data:`LOAD` (multiboot header first) and its labels' addresses.

    ``progress_mask``: L2 prints a line each time ``count & progress_mask``
    is 0. The labels name addresses the tests check: ``after_vmrun`` (where
    L1 resumes after a #VMEXIT: the RIP saved in vmcb12's save area while L2
    runs), ``l2_loop``/``l2_loop_end`` (L2's counting loop), ``entry``, and
    ``out_print``, ``out_hex``, ``out_l2_newline``: the OUT instructions L2
    reaches (2 bytes each), one of which an IOIO exit interrupts.
    """
    if not 0 < progress_mask < 1 << 32:
        raise ValueError(f"progress_mask {progress_mask:#x} must fit in 32 bits and not be 0")
    a = _Asm(LOAD)
    # Multiboot header with the a.out kludge: the addresses say where to load what.
    a.u32(MULTIBOOT_MAGIC)
    a.u32(MULTIBOOT_AOUT_KLUDGE)
    a.u32(-(MULTIBOOT_MAGIC + MULTIBOOT_AOUT_KLUDGE) & 0xFFFF_FFFF)
    a.u32("header")  # header_addr
    a.u32("header")  # load_addr
    a.u32("image_end")  # load_end_addr
    a.u32(BSS_END)  # bss_end_addr: QEMU zeroes from the image's end to here
    a.u32("entry")  # entry_addr
    a.labels["header"] = LOAD

    a.label("entry")
    a.emit(0xFA)  # cli
    a.emit(0x0F, 0x01, 0x15)  # lgdt [gdtr]
    a.u32("gdtr")
    a.emit(0xEA)  # jmp far CODE_SEL:reload
    a.u32("reload")
    a.emit(u16(CODE_SEL))
    a.label("reload")
    a.emit(0x66, 0xB8, u16(DATA_SEL))  # mov ax, DATA_SEL
    for sreg in (0xD8, 0xC0, 0xD0, 0xE0, 0xE8):  # mov ds/es/ss/fs/gs, ax
        a.emit(0x8E, sreg)
    a.mov_imm("esp", L1_STACK)
    a.print("msg_start")

    a.mov_imm("eax", 0x8000_0001)
    a.emit(0x0F, 0xA2)  # cpuid
    a.emit(0xF7, 0xC1)  # test ecx, SVM (bit 2)
    a.u32(1 << 2)
    a.jz("no_svm")

    # Paging: PDE i maps 4 MiB at i * 4 MiB (present, writable, PS).
    a.mov_imm("edi", PAGE_DIR)
    a.mov_imm("eax", 0x83)
    a.mov_imm("ecx", MEMORY_MIB // 4)
    a.label("fill_pd")
    a.emit(0x89, 0x07)  # mov [edi], eax
    a.emit(0x83, 0xC7, 0x04)  # add edi, 4
    a.emit(0x05)  # add eax, 4 MiB
    a.u32(0x40_0000)
    a.emit(0x49)  # dec ecx
    a.jnz("fill_pd")
    a.mov_from_cr(4)
    a.or_eax(CR4_PSE)
    a.mov_to_cr(4)
    a.mov_imm("eax", PAGE_DIR)
    a.mov_to_cr(3)
    a.mov_from_cr(0)
    a.or_eax(CR0_PG)
    a.mov_to_cr(0)

    a.rdmsr(MSR_EFER)
    a.or_eax(vmcb.EFER_SVME)
    a.wrmsr()
    a.mov_imm("ecx", MSR_VM_HSAVE_PA)
    a.mov_imm("eax", HSAVE)
    a.emit(0x31, 0xD2)  # xor edx, edx
    a.wrmsr()

    a.emit(0xFC)  # cld
    a.mov_imm("edi", IOPM)
    a.mov_imm("eax", 0xFFFF_FFFF)
    a.mov_imm("ecx", vmcb.IOPM_SIZE // 4)
    a.emit(0xF3, 0xAB)  # rep stosd

    # The VMCB (zero: it is past the image). Controls first.
    word4 = control_offset("intercepts") + 4 * vmcb.INTERCEPT_WORD4
    a.store(VMCB + word4, 1 << (vmcb.INTERCEPT_VMRUN - 32 * vmcb.INTERCEPT_WORD4))
    a.store(VMCB + control_offset("iopm_base_pa"), IOPM)
    a.store(VMCB + control_offset("msrpm_base_pa"), MSRPM)
    a.store(VMCB + control_offset("asid"), 1)
    # Save area: L2 runs like L1, flat 32-bit ring 0, same paging.
    segments = {"es": DATA_SEL, "cs": CODE_SEL, "ss": DATA_SEL, "ds": DATA_SEL,
                "fs": DATA_SEL, "gs": DATA_SEL}  # fmt: skip
    for name, selector in segments.items():
        attrib = CODE_ATTRIB if name == "cs" else DATA_ATTRIB
        at = VMCB + save_offset(name)
        a.store(at, selector | attrib << 16)  # selector (u16), attrib (u16)
        a.store(at + 4, 0xFFFF_FFFF)  # limit; base (u64) stays 0
    gdtr = VMCB + save_offset("gdtr")
    a.store(gdtr + 4, 0x17)
    a.store(gdtr + 8, "gdt")
    tr = VMCB + save_offset("tr")
    a.store(tr, TR_SEL | TSS_ATTRIB << 16)
    a.store(tr + 4, 0x67)
    a.store(tr + 8, TSS)
    a.rdmsr(MSR_EFER)
    a.store_reg(VMCB + save_offset("efer"), "eax")
    a.store_reg(VMCB + save_offset("efer") + 4, "edx")
    for cr in (0, 3, 4):
        a.mov_from_cr(cr)
        a.store_reg(VMCB + save_offset(f"cr{cr}"), "eax")
    a.store(VMCB + save_offset("dr7"), 0x400)
    a.store(VMCB + save_offset("dr6"), 0xFFFF_0FF0)
    a.store(VMCB + save_offset("rflags"), 0x2)
    a.store(VMCB + save_offset("rip"), "l2_entry")
    a.store(VMCB + save_offset("rsp"), L2_STACK)
    a.store(VMCB + save_offset("g_pat"), DEFAULT_PAT & 0xFFFF_FFFF)
    a.store(VMCB + save_offset("g_pat") + 4, DEFAULT_PAT >> 32)
    a.print("msg_vmrun")

    a.label("run")
    a.mov_imm("eax", VMCB)
    a.emit(0x0F, 0x01, 0xD8)  # vmrun
    a.label("after_vmrun")
    a.emit(0xFF, 0x05)  # inc dword [L1_EXITS]
    a.u32(L1_EXITS)
    a.print("msg_exit")
    a.load_reg("eax", VMCB + control_offset("exit_code"))
    a.call("print_hex")
    a.print("msg_next")
    a.load_reg("eax", VMCB + control_offset("exit_info_2"))
    a.call("print_hex")
    a.putc("\n")
    a.emit(0x81, 0x3D)  # cmp dword [exit_code], SVM_EXIT_IOIO
    a.u32(VMCB + control_offset("exit_code"))
    a.u32(vmcb.SVM_EXIT_IOIO)
    a.jne("stop")
    # Resume L2 after its OUT: EXITINFO2 is the next RIP.
    a.load_reg("eax", VMCB + control_offset("exit_info_2"))
    a.store_reg(VMCB + save_offset("rip"), "eax")
    a.store(VMCB + save_offset("rip") + 4, 0)
    a.jmp("run")
    a.label("stop")
    a.print("msg_stop")
    a.jmp("halt")
    a.label("no_svm")
    a.print("msg_nosvm")
    a.label("halt")
    a.emit(0xF4)  # hlt
    a.jmp("halt")

    # print: the NUL-terminated string at esi to the debug port (clobbers eax, esi).
    a.label("print")
    a.emit(0xAC)  # lodsb
    a.emit(0x84, 0xC0)  # test al, al
    a.jz("print_done")
    a.out_al("out_print")
    a.jmp("print")
    a.label("print_done")
    a.emit(0xC3)  # ret

    # print_hex: eax as 8 hex digits (clobbers eax, ecx, edx).
    a.label("print_hex")
    a.emit(0x89, 0xC2)  # mov edx, eax
    a.mov_imm("ecx", 8)
    a.label("hex_digit")
    a.emit(0xC1, 0xC2, 0x04)  # rol edx, 4
    a.emit(0x88, 0xD0)  # mov al, dl
    a.emit(0x24, 0x0F)  # and al, 0x0f
    a.emit(0x3C, 0x0A)  # cmp al, 10
    a.emit(0x72, 0x02)  # jb +2 (over the add)
    a.emit(0x04, ord("a") - ord("0") - 10)  # add al, 'a' - '0' - 10
    a.emit(0x04, ord("0"))  # add al, '0'
    a.out_al("out_hex")
    a.emit(0x49)  # dec ecx
    a.jnz("hex_digit")
    a.emit(0xC3)  # ret

    # L2: count in ebx, keep the count in memory, print now and then.
    a.label("l2_entry")
    a.load_reg("ebx", COUNTER)
    a.label("l2_loop")
    a.emit(0x43)  # inc ebx
    a.store_reg(COUNTER, "ebx")
    a.emit(0xF7, 0xC3)  # test ebx, progress_mask
    a.u32(progress_mask)
    a.jnz("l2_loop")
    a.print("msg_l2")
    a.emit(0x89, 0xD8)  # mov eax, ebx
    a.call("print_hex")
    a.putc("\n", "out_l2_newline")
    a.jmp("l2_loop")
    a.label("l2_loop_end")

    for name, text in _STRINGS.items():
        a.label(name)
        a.emit(text.encode() + b"\0")
    while a.here % 8:
        a.emit(0)
    a.label("gdt")
    a.emit(u64(0))
    a.emit(u64(0x00CF_9B00_0000_FFFF))  # CODE_SEL: flat 32-bit code
    a.emit(u64(0x00CF_9300_0000_FFFF))  # DATA_SEL: flat 32-bit data
    a.label("gdtr")
    a.emit(u16(0x17))
    a.u32("gdt")
    a.label("image_end")
    image = a.build()
    if a.labels["image_end"] > PAGE_DIR:
        raise AssertionError("the program grew into the page directory")
    return image, dict(a.labels)


def image(progress_mask: int = PROGRESS_MASK) -> bytes:
    """The multiboot image file for ``qemu-system-x86_64 -kernel``."""
    return program(progress_mask)[0]
