"""A tiny L1 hypervisor for VMX tests, assembled here (no assembler needed at test time).

The program runs in a KVM vCPU in 32-bit protected mode with paging (one
4 MiB PSE page identity-mapping the first 4 MiB) and reports through port
I/O, which KVM hands to userspace as KVM_EXIT_IO:

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
"""

from __future__ import annotations

import enum
import struct

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
    """The steps L1 reports on port 0x10."""

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

CS_SEL, DS_SEL, TR_SEL = 0x08, 0x10, 0x18
EXIT_REASON_VMCALL = 18


class _Asm:
    """Just enough 32-bit x86 to write the program: bytes, labels, rel32 fixups."""

    def __init__(self, origin: int) -> None:
        self.origin = origin
        self.code = bytearray()
        self.labels: dict[str, int] = {}
        self.fixups: list[tuple[int, str, int]] = []  # (offset, label, size of the field)

    @property
    def here(self) -> int:
        return self.origin + len(self.code)

    def label(self, name: str) -> None:
        self.labels[name] = self.here

    def emit(self, *parts: int | bytes) -> None:
        for part in parts:
            self.code += bytes([part]) if isinstance(part, int) else part

    def imm32(self, value: int | str) -> None:
        if isinstance(value, str):
            self.fixups.append((len(self.code), value, 0))  # absolute address
            self.code += bytes(4)
        else:
            self.code += struct.pack("<I", value & 0xFFFF_FFFF)

    def rel32(self, label: str) -> None:
        self.fixups.append((len(self.code), label, 4))
        self.code += bytes(4)

    # --- instructions -----------------------------------------------------------
    def out(self, port: int, value: int | None = None) -> None:
        self.emit(0x66, 0xBA, struct.pack("<H", port))  # mov dx, port
        if value is not None:
            self.emit(0xB0, value)  # mov al, value
        self.emit(0xEE)  # out dx, al

    def step(self, step: Step) -> None:
        self.out(PORT_STEP, int(step))

    def mov_eax(self, value: int | str) -> None:
        self.emit(0xB8)
        self.imm32(value)

    def mov_ebx(self, value: int | str) -> None:
        self.emit(0xBB)
        self.imm32(value)

    def mov_ecx(self, value: int) -> None:
        self.emit(0xB9)
        self.imm32(value)

    def jbe(self, label: str) -> None:  # VMX failure: CF=1 (VMfailInvalid) or ZF=1 (VMfailValid)
        self.emit(0x0F, 0x86)
        self.rel32(label)

    def jmp(self, label: str) -> None:
        self.emit(0xE9)
        self.rel32(label)

    def vmwrite(self, field: int, value: int | str | None = None) -> None:
        """VMWRITE field := value (or := eax when value is None), jumping to fail on error."""
        if value is None:
            self.emit(0x89, 0xC3)  # mov ebx, eax
        else:
            self.mov_ebx(value)
        self.mov_eax(field)
        self.emit(0x0F, 0x79, 0xC3)  # vmwrite eax, ebx
        self.jbe("fail")

    def vmwrite_msr(self, field: int, msr: int) -> None:
        self.mov_ecx(msr)
        self.emit(0x0F, 0x32)  # rdmsr: the allowed-0 settings are the low half
        self.vmwrite(field)

    def vmwrite_cr(self, field: int, cr: int) -> None:
        self.emit(0x0F, 0x20, 0xC0 | (cr << 3))  # mov eax, crN
        self.vmwrite(field)

    def mem_op(self, prefix: bytes, label: str) -> None:
        """VMXON/VMCLEAR/VMPTRLD [label]: 0F C7 /6 with a disp32 operand."""
        self.emit(prefix, 0x0F, 0xC7, 0x35)
        self.imm32(label)
        self.jbe("fail")

    def build(self) -> bytes:
        for offset, label, size in self.fixups:
            target = self.labels[label]
            value = target - (self.origin + offset + 4) if size else target
            struct.pack_into("<i" if size else "<I", self.code, offset, value)
        return bytes(self.code)


def program() -> bytes:
    """The L1 program's machine code, to be loaded at :data:`CODE`."""
    a = _Asm(CODE)
    a.step(Step.START)
    a.mov_ecx(0x480)  # IA32_VMX_BASIC: revision id in bits 30:0
    a.emit(0x0F, 0x32)  # rdmsr
    a.emit(0x25)
    a.imm32(0x7FFF_FFFF)  # and eax, 0x7fffffff
    a.emit(0xA3)
    a.imm32(VMXON)  # mov [VMXON], eax
    a.emit(0xA3)
    a.imm32(VMCS)  # mov [VMCS], eax
    a.step(Step.FEATURE_CONTROL)
    a.mov_ecx(0x3A)  # IA32_FEATURE_CONTROL
    a.emit(0x0F, 0x32)  # rdmsr
    a.emit(0xA8, 0x01)  # test al, 1 (locked?)
    a.emit(0x75, 0x05)  # jnz over the 5-byte or+wrmsr
    a.emit(0x83, 0xC8, 0x05)  # or eax, 5: lock + VMX outside SMX
    a.emit(0x0F, 0x30)  # wrmsr
    a.step(Step.VMXE)
    a.emit(0x0F, 0x20, 0xE0)  # mov eax, cr4
    a.emit(0x0D)
    a.imm32(0x2000)  # or eax, CR4.VMXE
    a.emit(0x0F, 0x22, 0xE0)  # mov cr4, eax
    a.step(Step.VMXON)
    a.mem_op(b"\xf3", "vmxon_ptr")  # vmxon [vmxon_ptr]
    a.step(Step.CURRENT_VMCS)
    a.mem_op(b"\x66", "vmcs_ptr")  # vmclear [vmcs_ptr]
    a.mem_op(b"", "vmcs_ptr")  # vmptrld [vmcs_ptr]
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
    a.emit(0x0F, 0x01, 0xC2)  # vmlaunch: returns only on failure
    a.jmp("fail")

    a.label("l2_entry")
    a.out(PORT_L2, L2_MARK)  # not intercepted by L1: goes to L0's userspace in guest mode
    a.emit(0x0F, 0x01, 0xC1)  # vmcall: always exits to L1
    a.emit(0xEB, 0xFE)  # jmp $

    a.label("l1_exit")
    a.step(Step.L1_AFTER_EXIT)
    a.mov_eax(EXIT_REASON)
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
    a.mov_eax(VM_INSTRUCTION_ERROR)
    a.emit(0x0F, 0x78, 0xC3)  # vmread ebx, eax
    a.emit(0x88, 0xD8)  # mov al, bl
    a.out(PORT_INSN_ERROR)
    a.label("halt")
    a.emit(0xF4, 0xEB, 0xFE)  # hlt; jmp $

    while a.here % 8:
        a.emit(0x90)
    a.label("vmxon_ptr")
    a.emit(struct.pack("<Q", VMXON))
    a.label("vmcs_ptr")
    a.emit(struct.pack("<Q", VMCS))
    return a.build()


def page_directory() -> bytes:
    """One PDE: a present, writable 4 MiB page at 0 (CR4.PSE)."""
    return struct.pack("<I", 0x83)
