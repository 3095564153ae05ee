"""QEMU migration streams: each vCPU's nested state by field, the registers around it, written back.

QEMU (``migrate "exec:cat > FILE"``, ``savevm``-style files, anything that
starts with ``QEVM``) saves a vCPU's KVM nested state in the ``cpu``
section's ``cpu/nested_state`` subsection, big-endian and split by vendor:
``cpu/kvm_nested_state`` (flags, format, size), then ``.../vmx``
(vmxon_pa, vmcs12_pa, smm.flags) with ``.../vmx/vmcs12`` and
``.../vmx/shadow_vmcs12``, or ``.../svm`` (vmcb_pa and the vmcb12 page).
:func:`read` walks the whole stream, using the JSON description QEMU
appends after EOF to step over device state it does not parse, and
rebuilds each vCPU's :class:`~kvmstate.nested.NestedState` in the kernel's
own format.

    >>> stream = qemu.read(open("vm.mig", "rb").read())
    >>> cpu = stream.vcpus[0]
    >>> cpu.nested
    NestedState(format=SVM, flags=GUEST_MODE|GIF_SET, size=4224, vmcb_pa=0x104000)
    >>> cpu.nested.vmcb12.control.asid
    1
    >>> cpu.not_migrated["hdr.svm.gpat"]
    'QEMU keeps only vmcb_pa of the SVM header: ...'
    >>> cpu.nested.vmcb12.control.set_intercept(vmcb.INTERCEPT_IOIO_PROT)
    >>> open("new.mig", "wb").write(stream.write())   # QEMU accepts it with -incoming

What QEMU keeps and drops (QEMU 7.2, target/i386/machine.c and kvm.c):

* kept: flags, format, size, the VMX header's vmxon_pa, vmcs12_pa and
  smm.flags, vmcs12 and shadow vmcs12, the SVM header's vmcb_pa, vmcb12;
* dropped: the VMX header's ``flags`` and the preemption-timer deadline
  (KVM_STATE_VMX_PREEMPTION_TIMER_DEADLINE), the SVM header's ``flags`` and
  ``gpat`` (:attr:`QemuVcpu.not_migrated` lists them; they read as 0);
* GUEST_MODE and GIF_SET are kept twice: in the nested flags and in
  ``env.hflags`` / ``env.hflags2`` (HF_GUEST_MASK, HF2_GIF_MASK). On
  restore QEMU takes them from the latter, and refuses a stream whose
  hflags say guest mode without GUEST_MODE in the nested flags. The writer
  keeps both in step;
* QEMU sends ``cpu/nested_state`` only for VMX with vmxon_pa != -1 and for
  SVM with size > 128: an idle vCPU's header-only state is not in the stream.

Registers: the same ``cpu`` section holds the vCPU's registers in QEMU's
own layout. :attr:`QemuVcpu.state` is a :class:`~kvmstate.state.VcpuState`
with only the parts that map exactly (``regs``, ``debugregs``, ``xcrs``,
``mp_state``, ``tsc_khz``, the MSRs QEMU names, ``nested``); the others are
in ``state.absent`` with the reason. All of QEMU's own fields are in
:attr:`QemuVcpu.fields`.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from kvmstate import uapi
from kvmstate.formats import _qemu_stream as _s
from kvmstate.nested import HEADER_SIZE, NestedState
from kvmstate.state import VcpuState
from kvmstate.uapi import NestedFlag, NestedFormat

__all__ = [
    "HF2_GIF_MASK",
    "HF_GUEST_MASK",
    "MSR_FIELDS",
    "QemuStream",
    "QemuVcpu",
    "Section",
    "Segment",
    "StreamError",
    "is_stream",
    "read",
]

StreamError = _s.StreamError

#: env.hflags bit 21: "SVM intercepts are active", i.e. the vCPU is in guest mode (L2).
HF_GUEST_MASK = 1 << 21
#: env.hflags2 bit 0: the global interrupt flag (GIF) is set.
HF2_GIF_MASK = 1 << 0

_PAGE = uapi.KVM_STATE_NESTED_VMX_VMCS_SIZE  # 4096, the vmcs12/vmcb12 page
_NO_VMXON = (1 << 64) - 1

#: QEMU's cpu fields and subsection fields that hold one MSR's value as KVM_GET_MSRS gave it.
MSR_FIELDS: Mapping[str, int] = MappingProxyType(
    {
        "env.sysenter_cs": 0x174,
        "env.sysenter_esp": 0x175,
        "env.sysenter_eip": 0x176,
        "env.star": 0xC000_0081,
        "env.lstar": 0xC000_0082,
        "env.cstar": 0xC000_0083,
        "env.fmask": 0xC000_0084,
        "env.kernelgsbase": 0xC000_0102,
        "env.pat": 0x277,
        "env.vm_hsave": 0xC001_0117,
        "env.tsc": 0x10,
        "env.tsc_aux": 0xC000_0103,
        "env.mtrr_deftype": 0x2FF,
        "env.mcg_status": 0x17A,
        "env.async_pf_en_msr": 0x4B56_4D02,
        "env.pv_eoi_en_msr": 0x4B56_4D04,
        "env.steal_time_msr": 0x4B56_4D03,
        "env.poll_control_msr": 0x4B56_4D05,
        "env.tsc_adjust": 0x3B,
        "env.tsc_deadline": 0x6E0,
        "env.msr_ia32_misc_enable": 0x1A0,
        "env.msr_ia32_feature_control": 0x3A,
        "env.spec_ctrl": 0x48,
        "env.virt_ssbd": 0xC001_011F,
        "env.xss": 0xDA0,
        "env.msr_smi_count": 0x34,
        "env.mcg_ext_ctl": 0x4D0,
    }
)
# The fixed-range MTRRs in env.mtrr_fixed's order (64K, 16K x 2, 4K x 8).
_MTRR_FIXED = (0x250, 0x258, 0x259, *range(0x268, 0x270))

# QEMU's register order in env.regs (R_EAX ... R_EDI, R8 ... R15).
_REGS = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
         *(f"r{i}" for i in range(8, 16)))  # fmt: skip
_SEGMENTS = ("es", "cs", "ss", "ds", "fs", "gs")

_NOT_MAPPED = {
    "sregs": (
        "not mapped: QEMU keeps segments as descriptor flag words, folding KVM's present and "
        "unusable bits into one P bit, CR8 and the APIC base in the apic section and pending "
        "interrupts as one vector; see QemuVcpu.segments, .cr0-.cr4, .efer"
    ),
    "sregs2": "not mapped: as sregs; the PDPTEs are in the cpu/pdptrs subsection when present",
    "fpu": "not mapped: QEMU splits the FPU/SSE state into its own fields",
    "xsave": (
        "not mapped: QEMU splits the XSAVE area into its own fields; rebuilding it needs "
        "the XSAVE layout of the source CPU's CPUID"
    ),
    "lapic": "not in the cpu section: the apic device section keeps it in QEMU's own layout",
    "events": (
        "not mapped: QEMU keeps exception, interrupt, NMI and SMI state in its own fields "
        "(and turns a pending exception into an injected one outside guest mode)"
    ),
    "cpuid": "not migrated: QEMU rebuilds CPUID from its command line",
}

_SVM_SUB = "cpu/kvm_nested_state/svm"
_VMX_SUB = "cpu/kvm_nested_state/vmx"
_VMCS12_SUB = "cpu/kvm_nested_state/vmx/vmcs12"
_SHADOW_SUB = "cpu/kvm_nested_state/vmx/shadow_vmcs12"
_NESTED_SUB = "cpu/nested_state"
_KVM_NESTED = "cpu/kvm_nested_state"


def is_stream(data: bytes | bytearray | memoryview) -> bool:
    """Whether ``data`` starts like a QEMU migration stream (``QEVM``, version 3).

    >>> qemu.is_stream(open("vm.mig", "rb").read(8))
    True
    """
    try:
        head = bytes(memoryview(data).cast("B")[:8])
    except TypeError:
        raise TypeError(
            f"is_stream() needs a bytes-like object, not {type(data).__name__}"
        ) from None
    return head[:4] == _s.MAGIC and int.from_bytes(head[4:8], "big") == _s.VERSION


def read(data: bytes | bytearray | memoryview) -> QemuStream:
    """Parse a whole migration stream; ValueError naming the offset for anything malformed.

    >>> stream = qemu.read(open("vm.mig", "rb").read())
    >>> [cpu.nested for cpu in stream.vcpus]
    [NestedState(format=SVM, flags=GUEST_MODE|GIF_SET, size=4224, vmcb_pa=0x104000)]
    """
    try:
        raw = bytes(memoryview(data).cast("B"))
    except TypeError:
        raise TypeError(f"read() needs a bytes-like object, not {type(data).__name__}") from None
    return QemuStream(raw)


@dataclasses.dataclass(frozen=True)
class Section:
    """One top-level record of the stream: where it is and what it names.

    ``kind`` is the record's name (``SECTION_FULL``, ``SECTION_START``,
    ``CONFIGURATION``, ``EOF``...); ``end`` is past its footer.
    """

    kind: str
    offset: int
    end: int
    section_id: int | None = None
    name: str | None = None
    instance_id: int | None = None
    version_id: int | None = None


@dataclasses.dataclass(frozen=True)
class Segment:
    """A segment register as QEMU keeps it: ``flags`` is the descriptor's high word layout."""

    selector: int
    base: int
    limit: int
    flags: int


class QemuStream:
    """A parsed QEMU migration stream (see :func:`read`).

    ``vcpus`` are the ``cpu`` sections in stream order; change a vCPU's
    ``nested`` (in place or by assigning) and :meth:`write` re-encodes it.
    """

    def __init__(self, data: bytes) -> None:
        #: The stream's bytes, as read.
        self.data = data
        parsed = _s.parse(data)
        self._parsed = parsed
        #: The stream format version (3).
        self.version = parsed.version
        #: The machine type from the CONFIGURATION record (``pc-i440fx-7.2``), None without one.
        self.machine = parsed.machine
        #: The target page size the RAM section counts in.
        self.page_size = parsed.page_size
        #: The JSON description QEMU appended after EOF (parsed), None without one.
        self.description = parsed.description
        #: Every top-level record, in order.
        self.sections = tuple(
            Section(
                _s.RECORD_NAMES.get(rec.kind, hex(rec.kind)),
                rec.offset,
                rec.end,
                rec.section_id,
                rec.name,
                rec.instance_id,
                rec.version_id,
            )
            for rec in parsed.records
        )
        #: RAM block name -> length in bytes, from the RAM section.
        self.ram_blocks: Mapping[str, int] = MappingProxyType(dict(parsed.ram_blocks))
        #: The migration capabilities the configuration lists (``x-ignore-shared``...).
        self.capabilities = tuple(parsed.capabilities)
        #: One :class:`QemuVcpu` per ``cpu`` section, in stream order.
        self.vcpus = tuple(
            QemuVcpu._from_record(data, rec)
            for rec in parsed.records
            if rec.name == "cpu" and rec.node is not None
        )

    # --- reading ----------------------------------------------------------------------

    def vcpu(self, index: int) -> QemuVcpu:
        """The vCPU whose ``cpu`` section has instance id ``index``; KeyError if none."""
        for cpu in self.vcpus:
            if cpu.index == index:
                return cpu
        raise KeyError(
            f"no cpu section with instance id {index} (have {[c.index for c in self.vcpus]})"
        )

    def ram_page(self, block: str, address: int) -> bytes | None:
        """The last copy of the page at ``address`` in RAM block ``block``, or None if not sent.

        Zero pages come back as their fill byte repeated; compressed and
        XBZRLE pages (not used by a plain ``migrate``) as None.
        """
        page = self._parsed.ram_pages.get((block, address - address % self.page_size))
        if page is None:
            return None
        if page.offset is None:
            return bytes([page.fill]) * self.page_size
        return self.data[page.offset : page.offset + self.page_size]

    def read_memory(self, address: int, length: int, block: str = "pc.ram") -> bytes:
        """``length`` bytes of guest RAM from the stream; ValueError where a page was not sent.

        >>> stream.read_memory(0x10a000, 4).hex()
        '8dedc604'
        """
        out = bytearray()
        while len(out) < length:
            at = address + len(out)
            page = self.ram_page(block, at)
            if page is None:
                raise ValueError(
                    f"the stream has no copy of {block} page {at - at % self.page_size:#x}"
                )
            start = at % self.page_size
            out += page[start : start + length - len(out)]
        return bytes(out)

    def summary(self) -> dict[str, Any]:
        """What ``repr`` shows, as a dict."""
        return {
            "machine": self.machine,
            "size": len(self.data),
            "ram": dict(self.ram_blocks),
            "devices": sum(1 for s in self.sections if s.kind == "SECTION_FULL"),
            "vcpus": [cpu.index for cpu in self.vcpus],
            "nested": {cpu.index: cpu.nested for cpu in self.vcpus},
        }

    def __repr__(self) -> str:
        nested = ", ".join(f"cpu {c.index}: {c.nested!r}" for c in self.vcpus)
        return (
            f"QemuStream(machine={self.machine!r}, {len(self.data)} bytes, {nested or 'no vCPUs'})"
        )

    # --- writing ----------------------------------------------------------------------

    def with_nested(self, cpu_index: int, state: NestedState | None) -> bytes:
        """The stream with vCPU ``cpu_index``'s nested state replaced (None: removed), as bytes.

        Everything else stays byte for byte; the description's sizes follow.
        This stream object is not changed.

        >>> new = stream.with_nested(0, state)
        >>> qemu.read(new).vcpus[0].nested == state
        True
        """
        if state is not None and not isinstance(state, NestedState):
            raise TypeError(
                f"with_nested() needs a NestedState or None, not {type(state).__name__}"
            )
        self.vcpu(cpu_index)  # KeyError for a missing vCPU
        return self._write({cpu_index: state})

    def write(self) -> bytes:
        """The stream with every vCPU's current ``nested``: the original bytes if none changed."""
        changes: dict[int, NestedState | None] = {}
        for cpu in self.vcpus:
            if not cpu._nested_unchanged():
                changes[cpu.index] = cpu.nested
        return self._write(changes) if changes else self.data

    def _write(self, changes: Mapping[int, NestedState | None]) -> bytes:
        if not changes:
            return self.data
        description = self._parsed.description
        if description is None or self._parsed.description_at is None:  # pragma: no cover
            raise ValueError("a stream without a VM description has no cpu sections to change")
        edits: list[tuple[int, int, bytes]] = []  # (start, end, new bytes), non-overlapping
        devices = description["devices"]
        new_devices = list(devices)
        for cpu in self.vcpus:
            if cpu.index not in changes:
                continue
            state = changes[cpu.index]
            new_devices[cpu._device_index] = cpu._rewrite(self.data, state, edits)
        new_description = dict(description)
        new_description["devices"] = new_devices
        try:
            text = _s.dump_description(new_description)
        except RecursionError:
            raise _s.StreamError(
                self._parsed.description_at, "the VM description nests too deep to write back"
            ) from None
        out = bytearray()
        pos = 0
        for start, end, new in sorted(edits):
            out += self.data[pos:start]
            out += new
            pos = end
        out += self.data[pos : self._parsed.description_at]
        out += bytes([_s.VMDESCRIPTION]) + struct.pack(">I", len(text)) + text
        return bytes(out)


class QemuVcpu:
    """One vCPU's ``cpu`` section: QEMU's fields, the nested state, the mapped registers.

    ``nested`` is the :class:`~kvmstate.nested.NestedState` QEMU carries
    (None when the stream has no ``cpu/nested_state``), in the kernel's
    format with ``size`` as QEMU saved it; ``not_migrated`` names the
    header fields QEMU does not carry (they read as 0) and why. ``state``
    holds the parts that map exactly onto KVM's structures.
    """

    #: The ``cpu`` section's instance id: QEMU's vCPU index.
    index: int
    #: The ``cpu`` section's version (12 in QEMU 7.2).
    version: int
    #: Where the section starts in the stream, and where it ends (past its footer).
    offset: int
    end: int
    #: Every field of the section and of its subsections, by QEMU's name, decoded
    #: (integers; tuples for arrays; dicts for structs; bytes for the rest).
    fields: Mapping[str, Any]
    #: The section's subsections, in stream order.
    subsections: tuple[str, ...]
    #: The nested-state subsections present (``cpu/kvm_nested_state/svm`` ...).
    nested_subsections: tuple[str, ...]
    #: Nested-state header fields the stream does not carry, and why (they read as 0).
    not_migrated: Mapping[str, str]
    #: Where the stream contradicts itself in ways QEMU resolves (hflags against nested flags).
    notes: tuple[str, ...]
    #: ``es``, ``cs``, ``ss``, ``ds``, ``fs``, ``gs``, ``ldt``, ``tr``, ``gdt``, ``idt``.
    segments: Mapping[str, Segment]
    #: The parts that map exactly onto KVM's structures; ``state.absent`` says why the rest not.
    state: VcpuState
    _node: _s.Node
    _device_index: int
    _nested: NestedState | None
    _saved_nested: NestedState | None

    @classmethod
    def _from_record(cls, data: bytes, rec: _s.Record) -> QemuVcpu:
        self = cls.__new__(cls)
        node = rec.node
        assert node is not None and rec.instance_id is not None and rec.device_index is not None
        self._node = node
        self._device_index = rec.device_index
        self.index = rec.instance_id
        self.version = rec.version_id or 0
        self.offset, self.end = rec.offset, rec.end
        values: dict[str, Any] = {}
        for field in node.fields:
            values[field.name] = _field_value(data, field)
        for sub in node.subsections:
            if sub.name == _NESTED_SUB:
                continue
            for field in sub.fields:
                values.setdefault(field.name, _field_value(data, field))
        self.fields = MappingProxyType(values)
        self.subsections = tuple(sub.name for sub in node.subsections)
        notes: list[str] = []
        nested_node = node.subsection(_NESTED_SUB)
        self._nested, self._saved_nested, self.nested_subsections, not_migrated = (
            _read_nested(data, nested_node) if nested_node is not None else (None, None, (), {})
        )
        self.not_migrated = MappingProxyType(not_migrated)
        self.segments = MappingProxyType(_segments(values))
        hflags, hflags2 = self.hflags, self.hflags2
        nested = self._nested
        if hflags is not None:
            guest = bool(hflags & HF_GUEST_MASK)
            flagged = bool(nested is not None and nested.flags & NestedFlag.GUEST_MODE)
            if guest != flagged:
                notes.append(
                    f"env.hflags says {'guest mode' if guest else 'not guest mode'} but the nested "
                    f"flags {'have' if flagged else 'lack'} GUEST_MODE: QEMU restores GUEST_MODE "
                    "from env.hflags"
                    + (" and refuses the stream (cpu_post_load)" if guest and not flagged else "")
                )
        if hflags2 is not None and nested is not None and nested.format == NestedFormat.SVM:
            gif = bool(hflags2 & HF2_GIF_MASK)
            if gif != bool(nested.flags & NestedFlag.GIF_SET):
                notes.append(
                    f"env.hflags2 has GIF {'set' if gif else 'clear'} but the nested flags "
                    f"{'lack' if gif else 'have'} GIF_SET: QEMU restores GIF_SET from env.hflags2"
                )
        self.notes = tuple(notes)
        self.state = self._map_state(values, node)
        return self

    # --- the nested state ----------------------------------------------------------------

    @property
    def nested(self) -> NestedState | None:
        """The nested state QEMU carries for this vCPU (assign to replace it for :meth:`write`)."""
        return self._nested

    @nested.setter
    def nested(self, state: NestedState | None) -> None:
        if state is not None and not isinstance(state, NestedState):
            raise TypeError(f"nested must be a NestedState or None, not {type(state).__name__}")
        self._nested = state
        self.state.nested = state
        if state is None:
            self.state.absent["nested"] = "no cpu/nested_state subsection"
        else:
            self.state.absent.pop("nested", None)

    def _nested_unchanged(self) -> bool:
        current, saved = self._nested, self._saved_nested
        if current is None or saved is None:
            return current is saved
        return bool(current == saved)

    # --- QEMU's fields by name --------------------------------------------------------------

    def _int(self, name: str) -> int | None:
        value = self.fields.get(name)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    @property
    def hflags(self) -> int | None:
        """``env.hflags`` (HF_GUEST_MASK: guest mode)."""
        return self._int("env.hflags")

    @property
    def hflags2(self) -> int | None:
        """``env.hflags2`` (HF2_GIF_MASK: GIF)."""
        return self._int("env.hflags2")

    @property
    def guest_mode(self) -> bool:
        """Whether QEMU will restore this vCPU in guest mode (env.hflags' HF_GUEST_MASK)."""
        return bool((self.hflags or 0) & HF_GUEST_MASK)

    @property
    def efer(self) -> int | None:
        """``env.efer``: in guest mode, L2's EFER (KVM reports the running guest's)."""
        return self._int("env.efer")

    @property
    def cr0(self) -> int | None:
        """``env.cr[0]``."""
        return self._int("env.cr[0]")

    @property
    def cr2(self) -> int | None:
        """``env.cr[2]``."""
        return self._int("env.cr[2]")

    @property
    def cr3(self) -> int | None:
        """``env.cr[3]``."""
        return self._int("env.cr[3]")

    @property
    def cr4(self) -> int | None:
        """``env.cr[4]``."""
        return self._int("env.cr[4]")

    def __repr__(self) -> str:
        rip = self.state.regs.rip if self.state.regs is not None else None
        where = f", rip={rip:#x}" if rip is not None else ""
        return (
            f"QemuVcpu({self.index}{where}, guest_mode={self.guest_mode}, nested={self.nested!r})"
        )

    # --- mapping onto KVM's structures ----------------------------------------------------------

    def _map_state(self, values: Mapping[str, Any], node: _s.Node) -> VcpuState:
        state = VcpuState()
        regs = _as_uints(values.get("env.regs"), 64, 16)
        rip, rflags = _as_uint(values.get("env.eip"), 64), _as_uint(values.get("env.eflags"), 64)
        if regs is not None and rip is not None and rflags is not None:
            named = dict(zip(_REGS, regs, strict=True))
            state.regs = uapi.kvm_regs(**named, rip=rip, rflags=rflags)
        else:
            state.absent["regs"] = "env.regs (16 x u64), env.eip or env.eflags missing or malformed"
        dr = _as_uints(values.get("env.dr"), 64, 8)
        if dr is not None:
            # QEMU's kvm_get_debugregs: dr[0..3] = db, dr[6] = dr6, dr[7] = dr7 (flags are 0).
            debug = uapi.kvm_debugregs()
            for i in range(4):
                debug.db[i] = dr[i]
            debug.dr6, debug.dr7 = dr[6], dr[7]
            state.debugregs = debug
        else:
            state.absent["debugregs"] = "env.dr (8 x u64) missing or malformed"
        xcr0 = _as_uint(values.get("env.xcr0"), 64)
        if xcr0 is not None:
            # KVM_GET_XCRS on a host with XSAVE: XCR0 alone, the rest zero.
            xcrs = uapi.kvm_xcrs(nr_xcrs=1)
            xcrs.xcrs[0].xcr = 0
            xcrs.xcrs[0].value = xcr0
            state.xcrs = xcrs
        else:
            state.absent["xcrs"] = "env.xcr0 missing (cpu section older than version 12)"
        mp = _as_uint(values.get("env.mp_state"), 32)
        if mp is not None:
            state.mp_state = uapi.kvm_mp_state(mp_state=mp)
        else:
            state.absent["mp_state"] = "env.mp_state (u32) missing or malformed"
        khz = _as_uint(values.get("env.tsc_khz"), 32)
        if khz:
            state.tsc_khz = khz
        else:
            state.absent["tsc_khz"] = "no cpu/tsc_khz subsection (QEMU sends it for pc-* >= 2.6)"
        state.msrs = _msrs(values)
        if self._nested is not None:
            state.nested = self._nested
        else:
            state.absent["nested"] = "no cpu/nested_state subsection"
        for part, why in _NOT_MAPPED.items():
            state.absent[part] = why
        return state

    # --- writing ------------------------------------------------------------------------------

    def _rewrite(
        self, data: bytes, state: NestedState | None, edits: list[tuple[int, int, bytes]]
    ) -> dict[str, Any]:
        """Queue the byte edits for a new nested state; the cpu device's new description."""
        node = self._node
        old = node.subsection(_NESTED_SUB)
        desc = dict(node.desc)
        subs = list(node.desc.get("subsections", []))
        if state is None:
            new_bytes, new_desc = b"", None
        else:
            new_bytes, new_desc = _encode_nested(state)
        if old is not None:
            edits.append((old.start, old.end, new_bytes))
            position = node.subsections.index(old)
            if new_desc is None:
                del subs[position]
            else:
                subs[position] = new_desc
        elif new_desc is not None:
            # The loader finds subsections by name, in any order: append after the last one.
            edits.append((node.end, node.end, new_bytes))
            subs.append(new_desc)
        if subs:
            desc["subsections"] = subs
        else:
            desc.pop("subsections", None)
        # GUEST_MODE and GIF_SET also live in hflags/hflags2, which QEMU restores them from.
        flags = int(state.flags) if state is not None else 0
        self._patch_flag(
            data, "env.hflags", HF_GUEST_MASK, bool(flags & NestedFlag.GUEST_MODE), edits
        )
        if state is not None and state.format == NestedFormat.SVM:
            self._patch_flag(
                data, "env.hflags2", HF2_GIF_MASK, bool(flags & NestedFlag.GIF_SET), edits
            )
        return desc

    def _patch_flag(
        self, data: bytes, name: str, mask: int, on: bool, edits: list[tuple[int, int, bytes]]
    ) -> None:
        field = self._node.field(name)
        if field is None or field.size != 4 or field.count != 1:
            raise ValueError(
                f"cpu {self.index}: no 4-byte {name} to keep in step with the nested flags"
            )
        value = int.from_bytes(data[field.start : field.end], "big")
        new = value | mask if on else value & ~mask
        if new != value:
            edits.append((field.start, field.end, new.to_bytes(4, "big")))


# --- helpers -------------------------------------------------------------------------------------


def _field_value(data: bytes, field: _s.Field) -> Any:
    if field.children:
        items = [_struct_values(data, child) for child in field.children]
        return items[0] if field.count == 1 else tuple(items)
    return field.value(data)


def _struct_values(data: bytes, node: _s.Node) -> dict[str, Any]:
    return {f.name: _field_value(data, f) for f in node.fields}


def _segments(values: Mapping[str, Any]) -> dict[str, Segment]:
    out: dict[str, Segment] = {}

    def make(item: Any) -> Segment | None:
        if not isinstance(item, dict):
            return None
        parts = [item.get(k) for k in ("selector", "base", "limit", "flags")]
        ints = [p for p in parts if isinstance(p, int)]
        return Segment(*ints) if len(ints) == 4 else None

    segs = values.get("env.segs")
    if isinstance(segs, tuple) and len(segs) == len(_SEGMENTS):
        for name, item in zip(_SEGMENTS, segs, strict=True):
            seg = make(item)
            if seg is not None:
                out[name] = seg
    for name in ("ldt", "tr", "gdt", "idt"):
        seg = make(values.get(f"env.{name}"))
        if seg is not None:
            out[name] = seg
    return out


def _as_uint(value: Any, bits: int) -> int | None:
    """``value`` if it is an int that fits in ``bits`` unsigned bits, else None."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << bits:
        return value
    return None


def _as_uints(value: Any, bits: int, count: int | None = None) -> tuple[int, ...] | None:
    """A tuple of such ints (of ``count`` items when given), else None."""
    if not isinstance(value, tuple) or (count is not None and len(value) != count):
        return None
    items = [_as_uint(v, bits) for v in value]
    return tuple(i for i in items if i is not None) if None not in items else None


def _msrs(values: Mapping[str, Any]) -> dict[int, int]:
    msrs: dict[int, int] = {}
    for name, index in MSR_FIELDS.items():
        value = _as_uint(values.get(name), 64)
        if value is not None:
            msrs[index] = value
    fixed = _as_uints(values.get("env.mtrr_fixed"), 64, len(_MTRR_FIXED))
    if fixed is not None:
        msrs.update(zip(_MTRR_FIXED, fixed, strict=True))
    var = values.get("env.mtrr_var")
    if isinstance(var, tuple):
        for i, item in enumerate(var):
            if isinstance(item, dict):
                base, mask = _as_uint(item.get("base"), 64), _as_uint(item.get("mask"), 64)
                if base is not None and mask is not None:
                    msrs[0x200 + 2 * i], msrs[0x201 + 2 * i] = base, mask
    cap, banks = _as_uint(values.get("env.mcg_cap"), 64), _as_uints(values.get("env.mce_banks"), 64)
    if cap is not None and banks is not None:
        # QEMU writes MC0_CTL.. for the banks MCG_CAP counts, four MSRs each.
        for i in range(min(len(banks), (cap & 0xFF) * 4)):
            msrs[0x400 + i] = banks[i]
    return dict(sorted(msrs.items()))


def _read_nested(
    data: bytes, outer: _s.Node
) -> tuple[NestedState, NestedState, tuple[str, ...], dict[str, str]]:
    """The kernel-format nested state from ``cpu/nested_state``; ValueError if inconsistent."""
    field = outer.field("env.nested_state")
    if field is None or len(field.children) != 1:
        raise _s.StreamError(outer.body, "cpu/nested_state has no env.nested_state struct")
    node = field.children[0]
    if node.name != _KVM_NESTED:
        raise _s.StreamError(
            node.body, f"expected {_KVM_NESTED} in cpu/nested_state, found {node.name!r}"
        )
    flags = _int_field(data, node, "flags", 2)
    fmt = _int_field(data, node, "format", 2)
    size = _int_field(data, node, "size", 4)
    where = node.field("size")
    at = where.start if where else node.body
    names = tuple(sub.name for sub in node.subsections)
    svm, vmx = node.subsection(_SVM_SUB), node.subsection(_VMX_SUB)
    unknown = [n for n in names if n not in (_SVM_SUB, _VMX_SUB)]
    if unknown:
        raise _s.StreamError(node.end, f"unknown nested-state subsections {unknown}")
    all_names = list(names)
    not_migrated: dict[str, str] = {}
    allowed: tuple[int, ...]
    if fmt == NestedFormat.SVM:
        allowed = (HEADER_SIZE, HEADER_SIZE + _PAGE)
        if size not in allowed:
            raise _s.StreamError(
                at, f"SVM nested state size {size}: KVM writes {allowed[0]} or {allowed[1]}"
            )
        if vmx is not None:
            raise _s.StreamError(vmx.start, f"format is SVM but the stream has {_VMX_SUB}")
        if (svm is not None) != (size > HEADER_SIZE):
            raise _s.StreamError(
                svm.start if svm else node.end,
                f"size {size} says {'a' if size > HEADER_SIZE else 'no'} vmcb12 follows, "
                f"but {_SVM_SUB} is {'absent' if svm is None else 'there'} "
                "(QEMU sends it when size > 128)",
            )
        state = NestedState(size)
        state.flags, state.format, state.size = flags, fmt, size
        if svm is not None:
            state.svm.vmcb_pa = _int_field(data, svm, "hdr.svm.vmcb_pa", 8)
            _copy_page(data, svm, "data.svm[0].vmcb12", state, 0)
        else:
            not_migrated["hdr.svm.vmcb_pa"] = "not sent with size 128: QEMU restores 0"
        not_migrated["hdr.svm.flags"] = (
            "QEMU keeps only vmcb_pa of the SVM header: "
            "the flags (KVM_STATE_SVM_VALID_GPAT) read as 0"
        )
        not_migrated["hdr.svm.gpat"] = (
            "QEMU keeps only vmcb_pa of the SVM header: L2's gPAT is not migrated and reads as 0"
        )
    elif fmt == NestedFormat.VMX:
        allowed = (HEADER_SIZE, HEADER_SIZE + _PAGE, HEADER_SIZE + 2 * _PAGE)
        if size not in allowed:
            raise _s.StreamError(at, f"VMX nested state size {size}: KVM writes 128, 4224 or 8320")
        if svm is not None:
            raise _s.StreamError(svm.start, f"format is VMX but the stream has {_SVM_SUB}")
        state = NestedState(size)
        state.flags, state.format, state.size = flags, fmt, size
        if vmx is None:
            if size > HEADER_SIZE:
                raise _s.StreamError(
                    node.end, f"size {size} says a vmcs12 follows, but {_VMX_SUB} is absent"
                )
            state.vmx.vmxon_pa = state.vmx.vmcs12_pa = _NO_VMXON
            not_migrated["hdr.vmx.vmxon_pa"] = "not sent (no VMXON): QEMU restores -1"
            not_migrated["hdr.vmx.vmcs12_pa"] = "not sent (no VMXON): QEMU restores -1"
        else:
            state.vmx.vmxon_pa = _int_field(data, vmx, "hdr.vmx.vmxon_pa", 8)
            state.vmx.vmcs12_pa = _int_field(data, vmx, "hdr.vmx.vmcs12_pa", 8)
            state.vmx.smm.flags = _int_field(data, vmx, "hdr.vmx.smm.flags", 2)
            all_names += [sub.name for sub in vmx.subsections]
            for index, (sub_name, field_name) in enumerate(
                ((_VMCS12_SUB, "data.vmx[0].vmcs12"), (_SHADOW_SUB, "data.vmx[0].shadow_vmcs12"))
            ):
                sub = vmx.subsection(sub_name)
                wanted = size > HEADER_SIZE + index * _PAGE
                if (sub is not None) != wanted:
                    raise _s.StreamError(
                        sub.start if sub else vmx.end,
                        f"size {size} says {'a' if wanted else 'no'} "
                        f"{sub_name.rsplit('/', 1)[1]} follows, "
                        f"but {sub_name} is {'absent' if sub is None else 'there'}",
                    )
                if sub is not None:
                    _copy_page(data, sub, field_name, state, index)
            extra = [s.name for s in vmx.subsections if s.name not in (_VMCS12_SUB, _SHADOW_SUB)]
            if extra:
                raise _s.StreamError(vmx.end, f"unknown VMX nested-state subsections {extra}")
        not_migrated["hdr.vmx.flags"] = (
            "QEMU 7.2 does not migrate it: KVM_STATE_VMX_PREEMPTION_TIMER_DEADLINE reads as 0"
        )
        not_migrated["hdr.vmx.preemption_timer_deadline"] = (
            "not migrated: L2's VMX preemption timer restarts from its vmcs12 value"
        )
    else:
        raise _s.StreamError(
            where.start - 2 if where else node.body,
            f"nested state format {fmt} (expected 0 = VMX or 1 = SVM; QEMU refuses others)",
        )
    return state, state.copy(), tuple(all_names), not_migrated


def _int_field(data: bytes, node: _s.Node, name: str, size: int) -> int:
    field = node.field(name)
    if field is None or field.size != size or field.count != 1:
        raise _s.StreamError(
            node.body, f"{node.name} has no {size}-byte field {name} (the VM description disagrees)"
        )
    return int.from_bytes(data[field.start : field.end], "big")


def _copy_page(data: bytes, node: _s.Node, name: str, state: NestedState, index: int) -> None:
    field = node.field(name)
    if field is None or field.size * field.count != _PAGE:
        raise _s.StreamError(node.body, f"{node.name} has no {_PAGE}-byte {name}")
    start = HEADER_SIZE + index * _PAGE
    state.buffer[start : start + _PAGE] = data[field.start : field.end]


# --- encoding a nested state the way QEMU 7.2 writes it -------------------------------------------


def _uint(name: str, size: int) -> dict[str, Any]:
    return {"name": name, "type": f"uint{8 * size}", "size": size}


def _page_desc(name: str) -> dict[str, Any]:
    return {"name": name, "array_len": _PAGE, "type": "uint8", "size": 1}


def _sub(name: str, body: bytes, desc: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
    raw = name.encode("ascii")
    return bytes([_s.SUBSECTION, len(raw)]) + raw + struct.pack(">I", 1) + body, desc


def _encode_nested(state: NestedState) -> tuple[bytes, dict[str, Any]]:
    """``cpu/nested_state`` bytes and description for ``state``, subsections as QEMU 7.2 picks them.

    QEMU's rules (the ``needed`` functions): ``.../vmx`` when the format is
    VMX and vmxon_pa != -1, its ``vmcs12`` when size > 128 and
    ``shadow_vmcs12`` when size > 4224; ``.../svm`` when the format is SVM
    and size > 128. ValueError for a state QEMU cannot carry.
    """
    flags, fmt, size = int(state.flags), int(state.format), state.size
    if fmt not in (NestedFormat.VMX, NestedFormat.SVM):
        raise ValueError(f"nested state format {fmt}: QEMU carries only VMX (0) and SVM (1)")
    if size < HEADER_SIZE or size > state.capacity:
        raise ValueError(
            f"nested state size {size} must be between 128 and the buffer's {state.capacity}"
        )
    buf = state.buffer

    def page(index: int) -> bytes:
        start = HEADER_SIZE + index * _PAGE
        if state.capacity < start + _PAGE:
            raise ValueError(
                f"size {size} needs page {index} but the buffer holds {state.capacity} bytes"
            )
        return bytes(buf[start : start + _PAGE])

    body = struct.pack(">HHI", flags, fmt, size)
    subs: list[tuple[bytes, dict[str, Any]]] = []
    if fmt == NestedFormat.VMX and state.vmx.vmxon_pa != _NO_VMXON:
        inner: list[tuple[bytes, dict[str, Any]]] = []
        for index, (name, field) in enumerate(
            ((_VMCS12_SUB, "data.vmx[0].vmcs12"), (_SHADOW_SUB, "data.vmx[0].shadow_vmcs12"))
        ):
            if size > HEADER_SIZE + index * _PAGE:
                desc = {"vmsd_name": name, "version": 1, "fields": [_page_desc(field)]}
                inner.append(_sub(name, page(index), desc))
        vmx_body = struct.pack(">QQH", state.vmx.vmxon_pa, state.vmx.vmcs12_pa, state.vmx.smm.flags)
        vmx_desc: dict[str, Any] = {
            "vmsd_name": _VMX_SUB,
            "version": 1,
            "fields": [
                _uint("hdr.vmx.vmxon_pa", 8),
                _uint("hdr.vmx.vmcs12_pa", 8),
                _uint("hdr.vmx.smm.flags", 2),
            ],
        }
        if inner:
            vmx_desc["subsections"] = [d for _, d in inner]
        subs.append(_sub(_VMX_SUB, vmx_body + b"".join(b for b, _ in inner), vmx_desc))
    elif fmt == NestedFormat.SVM and size > HEADER_SIZE:
        svm_desc = {
            "vmsd_name": _SVM_SUB,
            "version": 1,
            "fields": [_uint("hdr.svm.vmcb_pa", 8), _page_desc("data.svm[0].vmcb12")],
        }
        subs.append(_sub(_SVM_SUB, struct.pack(">Q", state.svm.vmcb_pa) + page(0), svm_desc))
    struct_body = body + b"".join(b for b, _ in subs)
    kvm_desc: dict[str, Any] = {
        "vmsd_name": _KVM_NESTED,
        "version": 1,
        "fields": [_uint("flags", 2), _uint("format", 2), _uint("size", 4)],
    }
    if subs:
        kvm_desc["subsections"] = [d for _, d in subs]
    outer_desc = {
        "vmsd_name": _NESTED_SUB,
        "version": 1,
        "fields": [
            {
                "name": "env.nested_state",
                "type": "struct",
                "struct": kvm_desc,
                "size": len(struct_body),
            }
        ],
    }
    return _sub(_NESTED_SUB, struct_body, outer_desc)
