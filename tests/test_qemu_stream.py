"""QEMU migration streams: read by field, checked, written back and accepted by QEMU.

Host-side tests use streams synthesized around the vCPU records captured
from a real QEMU 7.2 stream (tests/data/qemu-svm-cpu.json, see
tests/support/qemu_capture.py). The ``svm_guest`` tests make real streams:
inside the emulated AMD guest, QEMU with ``-enable-kvm`` boots the
project's multiboot payload (tests/support/qemu_payload.py), which VMRUNs
into a counting L2; the stream is migrated out, decoded, changed, and
started again with ``-incoming``.
"""

from __future__ import annotations

import array
import dataclasses
import json
import random
import re
import shutil
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvmstate import check as kcheck
from kvmstate import uapi, vmcb
from kvmstate.formats import _qemu_stream, qemu
from kvmstate.nested import HEADER_SIZE, SVM_MAX_SIZE, VMX_MAX_SIZE, NestedState
from kvmstate.uapi import NestedFlag, NestedFormat
from tests.support import asm, qemu_payload, qemu_streams

CAP = qemu_streams.capture()
PAYLOAD = CAP["payload"]
LABELS = PAYLOAD["labels"]
COUNTER_AT_CAPTURE = int.from_bytes(bytes.fromhex(CAP["pages"]["pc.ram:0x10a000"])[:4], "little")
SVM_NESTED_FIELDS = 4142  # flags..size (8) + 0x05, len, name (24), version (4), vmcb_pa, vmcb12


@pytest.fixture
def data() -> bytes:
    return qemu_streams.synthesize()


@pytest.fixture
def stream(data: bytes) -> qemu.QemuStream:
    return qemu.read(data)


def vmx_state(size: int = VMX_MAX_SIZE, vmxon: int = 0x11000) -> NestedState:
    state = NestedState(size)
    state.format = NestedFormat.VMX
    state.size = size
    state.flags = NestedFlag.GUEST_MODE if size > HEADER_SIZE else 0
    state.vmx.vmxon_pa = vmxon
    state.vmx.vmcs12_pa = 0x12000 if size > HEADER_SIZE else (1 << 64) - 1
    state.vmx.smm.flags = 0
    for i in range(HEADER_SIZE, size):
        state.buffer[i] = (i * 7 + 3) & 0xFF
    return state


# --- the payload ----------------------------------------------------------------------------


def test_payload_is_a_multiboot_image() -> None:
    image, labels = qemu_payload.program()
    magic, flags, checksum, header, load, load_end, bss_end, entry = struct.unpack_from(
        "<8I", image
    )
    assert (magic, flags) == (0x1BAD_B002, 0x1_0000)  # a.out kludge: the addresses below
    assert (magic + flags + checksum) & 0xFFFF_FFFF == 0
    assert header == load == qemu_payload.LOAD
    assert load_end == load + len(image) and bss_end == qemu_payload.BSS_END
    assert entry == labels["entry"]
    with pytest.raises(ValueError, match="progress_mask"):
        qemu_payload.program(0)


@pytest.mark.skipif(not shutil.which("objdump"), reason="objdump is not installed (binutils)")
def test_payload_disassembles_as_written(tmp_path: Path) -> None:
    image, labels = qemu_payload.program()
    listing = dict(asm.objdump(image, qemu_payload.LOAD, tmp_path))
    assert listing[labels["entry"]] == "cli"
    assert listing[labels["after_vmrun"] - 3] == "vmrun"
    assert listing[labels["l2_loop"]] == "inc    ebx"
    assert listing[labels["l2_loop"] + 1] == f"mov    DWORD PTR ds:{qemu_payload.COUNTER:#x},ebx"
    for name in ("out_print", "out_hex", "out_l2_newline"):
        assert listing[labels[name]] == "out    0xe9,al"
    wrmsr = [a for a, text in listing.items() if text == "wrmsr" and a < labels["run"]]
    assert len(wrmsr) == 2  # EFER.SVME and VM_HSAVE_PA


# --- host side: reading ------------------------------------------------------------------------


def test_is_stream(data: bytes) -> None:
    assert qemu.is_stream(data)
    assert qemu.is_stream(memoryview(data)[:8])
    assert not qemu.is_stream(b"QEVM\0\0\0\x02")
    assert not qemu.is_stream(b"\x00" * 16)
    assert not qemu.is_stream(b"QEV")
    assert not qemu.is_stream(b"")
    assert qemu.is_stream(memoryview(array.array("I", data[:8])))  # any buffer format
    with pytest.raises(TypeError, match="bytes-like"):
        qemu.is_stream("QEVM")  # type: ignore[arg-type]


def test_read_finds_the_records(stream: qemu.QemuStream, data: bytes) -> None:
    assert stream.version == 3
    assert stream.machine == CAP["machine"] == "pc-i440fx-7.2"
    assert stream.page_size == 4096
    assert dict(stream.ram_blocks) == CAP["ram_blocks"]
    kinds = [(s.kind, s.name) for s in stream.sections]
    assert kinds == [
        ("CONFIGURATION", "configuration"),
        ("SECTION_START", "ram"),
        ("SECTION_PART", "ram"),
        ("SECTION_END", "ram"),
        ("SECTION_FULL", "cpu_common"),
        ("SECTION_FULL", "cpu"),
        ("EOF", None),
    ]
    cpu = next(s for s in stream.sections if s.name == "cpu")
    assert (cpu.instance_id, cpu.version_id) == (0, 12)
    assert data[cpu.end - 5] == 0x7E  # the footer
    assert [c.index for c in stream.vcpus] == [0]
    eof = stream.sections[-1]
    assert data[eof.offset] == 0 and data[eof.end] == 0x06  # then the description
    with pytest.raises(KeyError, match=r"instance id 5"):
        stream.vcpu(5)
    assert stream.vcpu(0) is stream.vcpus[0]
    assert "pc-i440fx-7.2" in repr(stream)
    assert stream.summary()["vcpus"] == [0]


def test_nested_state_by_field(stream: qemu.QemuStream) -> None:
    cpu = stream.vcpus[0]
    nested = cpu.nested
    assert nested is not None
    assert nested.format == NestedFormat.SVM
    assert nested.flags == NestedFlag.GUEST_MODE | NestedFlag.GIF_SET
    assert nested.size == SVM_MAX_SIZE
    assert nested.svm.vmcb_pa == PAYLOAD["VMCB"]
    vmcb12 = nested.vmcb12
    assert vmcb12 is not None
    # The control area KVM caches: what the payload's L1 wrote into its VMCB.
    assert vmcb12.control.asid == 1
    assert vmcb12.control.is_intercept(vmcb.INTERCEPT_VMRUN)
    assert not vmcb12.control.is_intercept(vmcb.INTERCEPT_IOIO_PROT)
    assert vmcb12.control.iopm_base_pa == PAYLOAD["IOPM"]
    assert vmcb12.control.msrpm_base_pa == PAYLOAD["MSRPM"]
    # The save area holds L1's state from VMRUN: it resumes after its VMRUN.
    assert vmcb12.save.rip == LABELS["after_vmrun"]
    assert vmcb12.save.cr3 == PAYLOAD["PAGE_DIR"]
    assert vmcb12.save.efer & vmcb.EFER_SVME
    assert vmcb12.save.cr0 & 0x8000_0001 == 0x8000_0001
    assert cpu.nested_subsections == ("cpu/kvm_nested_state/svm",)
    assert set(cpu.not_migrated) == {"hdr.svm.flags", "hdr.svm.gpat"}
    assert cpu.guest_mode and cpu.hflags is not None and cpu.hflags & qemu.HF_GUEST_MASK
    assert cpu.hflags2 is not None and cpu.hflags2 & qemu.HF2_GIF_MASK
    assert cpu.notes == ()
    assert cpu.state.nested is nested
    assert "SVM" in repr(cpu)


def test_registers_map_to_vcpu_state(stream: qemu.QemuStream) -> None:
    cpu = stream.vcpus[0]
    state = cpu.state
    regs = state.regs
    assert regs is not None
    # In guest mode KVM reports L2's registers: L2 is in its loop, counting in EBX.
    assert LABELS["l2_entry"] <= regs.rip < LABELS["l2_loop_end"] or (
        LABELS["print"] <= regs.rip < LABELS["l2_entry"]
    )
    assert regs.rbx in (COUNTER_AT_CAPTURE, COUNTER_AT_CAPTURE + 1)
    assert regs.rsp in (PAYLOAD["L2_STACK"], PAYLOAD["L2_STACK"] - 4)
    assert regs.rflags & 0x2
    # L2's state from the payload's VMCB.
    assert cpu.efer is not None and cpu.efer & vmcb.EFER_SVME
    assert cpu.cr3 == PAYLOAD["PAGE_DIR"]
    assert cpu.cr0 is not None and cpu.cr0 & 0x8000_0001 == 0x8000_0001
    assert cpu.cr4 is not None and cpu.cr4 & qemu_payload.CR4_PSE
    assert state.debugregs is not None
    assert (state.debugregs.dr6, state.debugregs.dr7) == (0xFFFF_0FF0, 0x400)
    assert state.xcrs is not None and state.xcrs.nr_xcrs == 1 and state.xcrs.xcrs[0].value & 1
    assert state.mp_state is not None and state.mp_state.mp_state == uapi.KVM_MP_STATE_RUNNABLE
    assert state.tsc_khz is not None and state.tsc_khz > 0
    assert state.msrs is not None
    assert state.msrs[0xC001_0117] == PAYLOAD["HSAVE"]  # VM_HSAVE_PA, written by L1
    assert state.msrs[0x277] == qemu_payload.DEFAULT_PAT
    assert 0xC000_0080 not in state.msrs  # EFER is an sregs field, not an MSR part
    assert {"sregs", "sregs2", "xsave", "fpu", "lapic", "events", "cpuid"} <= set(state.absent)
    assert "unusable" in state.absent["sregs"]
    assert cpu.segments["cs"] == qemu.Segment(0x08, 0, 0xFFFF_FFFF, cpu.segments["cs"].flags)
    assert cpu.segments["cs"].flags >> 8 & 0xFF == 0x9B  # present, ring 0, code
    assert cpu.segments["gdt"].base == LABELS["gdt"]
    assert cpu.fields["env.eip"] == regs.rip
    # The parts VcpuState carries are the kernel's own structures: they serialize.
    assert set(state.parts()) == {
        "nested", "tsc_khz", "regs", "xcrs", "msrs", "mp_state", "debugregs",
    }  # fmt: skip
    assert type(state).from_bytes(state.to_bytes()) == state


def test_guest_memory(stream: qemu.QemuStream) -> None:
    assert int.from_bytes(stream.read_memory(PAYLOAD["COUNTER"], 4), "little") == COUNTER_AT_CAPTURE
    assert stream.ram_page("pc.ram", 0) == bytes(4096)  # sent as a zero page
    assert stream.ram_page("pc.ram", 0x5000) is None
    with pytest.raises(ValueError, match=r"no copy of pc.ram page 0x5000"):
        stream.read_memory(0x5FFE, 4)
    assert stream.read_memory(0xFFC, 4) == bytes(4)
    with pytest.raises(ValueError, match=r"page 0x1000"):
        stream.read_memory(0xFFE, 4)  # 0x1000 was not sent


def test_guest_memory_across_pages() -> None:
    cap = qemu_streams.capture()
    cap["pages"]["pc.ram:0x1000"] = "11223344"
    stream = qemu.read(qemu_streams.synthesize(cap=cap))
    assert stream.read_memory(0xFFE, 4) == b"\0\0\x11\x22"


def test_streams_without_footers_read_the_same(stream: qemu.QemuStream) -> None:
    bare = qemu.read(qemu_streams.synthesize(footers=False))
    assert bare.vcpus[0].nested == stream.vcpus[0].nested
    assert bare.vcpus[0].state == stream.vcpus[0].state


# --- host side: writing --------------------------------------------------------------------------


def test_write_unmodified_is_byte_identical(stream: qemu.QemuStream, data: bytes) -> None:
    assert stream.write() == data
    nested = stream.vcpus[0].nested
    assert nested is not None
    # Re-encoding the same state gives QEMU's own bytes and description text.
    assert stream.with_nested(0, nested.copy()) == data
    assert stream.with_nested(0, NestedState.from_bytes(nested.to_bytes())) == data


def test_kernel_bytes_round_trip(stream: qemu.QemuStream, data: bytes) -> None:
    nested = stream.vcpus[0].nested
    assert nested is not None
    raw = nested.to_bytes()
    assert len(raw) == SVM_MAX_SIZE
    assert struct.unpack_from("<HHI", raw) == (0x101, 1, SVM_MAX_SIZE)  # little-endian header
    assert struct.unpack_from("<Q", raw, 8)[0] == PAYLOAD["VMCB"]
    # QEMU stores the vmcb12 page as KVM wrote it: the same 4096 bytes in the stream.
    assert data.count(raw[HEADER_SIZE:]) == 1
    assert NestedState.from_bytes(raw) == nested


def test_with_nested_changes_one_field(stream: qemu.QemuStream, data: bytes) -> None:
    state = stream.vcpus[0].nested
    assert state is not None
    state = state.copy()
    state.vmcb12.control.set_intercept(vmcb.INTERCEPT_IOIO_PROT)  # type: ignore[union-attr]
    new = stream.with_nested(0, state)
    assert differing_bytes(new, data) == 1
    assert qemu.read(new).vcpus[0].nested == state
    assert stream.write() == data  # the stream object itself is unchanged


def test_write_after_editing_in_place(data: bytes) -> None:
    stream = qemu.read(data)
    cpu = stream.vcpus[0]
    assert cpu.nested is not None
    cpu.nested.vmcb12.control.asid = 7  # type: ignore[union-attr]
    new = qemu.read(stream.write())
    assert new.vcpus[0].nested.vmcb12.control.asid == 7  # type: ignore[union-attr]
    cpu.nested = None
    assert cpu.state.nested is None and "nested" in cpu.state.absent
    assert qemu.read(stream.write()).vcpus[0].nested is None
    with pytest.raises(TypeError, match=r"NestedState or None"):
        cpu.nested = b"\0" * 128  # type: ignore[assignment]


def test_with_nested_changes_sizes_and_description(stream: qemu.QemuStream, data: bytes) -> None:
    small = NestedState(HEADER_SIZE)
    small.format, small.flags, small.size = NestedFormat.SVM, NestedFlag.GIF_SET, HEADER_SIZE
    new = stream.with_nested(0, small)
    again = qemu.read(new)  # the reader checks every size the description gives
    cpu = again.vcpus[0]
    assert cpu.nested == small
    assert cpu.nested_subsections == ()
    assert not cpu.guest_mode  # HF_GUEST_MASK follows GUEST_MODE
    assert cpu.notes == ()
    assert "hdr.svm.vmcb_pa" in cpu.not_migrated
    desc = next(d for d in again.description["devices"] if d["name"] == "cpu")  # type: ignore[index]
    sub = next(s for s in desc["subsections"] if s["vmsd_name"] == "cpu/nested_state")
    assert sub["fields"][0]["size"] == 8
    assert "subsections" not in sub["fields"][0]["struct"]
    assert len(data) - len(new) > 4096
    # And back: the original bytes, description included.
    assert again.with_nested(0, stream.vcpus[0].nested) == data


def test_with_nested_removes_and_inserts(stream: qemu.QemuStream, data: bytes) -> None:
    without = qemu.read(stream.with_nested(0, None))
    cpu = without.vcpus[0]
    assert cpu.nested is None and "cpu/nested_state" not in cpu.subsections
    assert not cpu.guest_mode and cpu.notes == ()
    assert "nested" in cpu.state.absent
    # cpu/nested_state was the last subsection: inserting it again restores the stream.
    assert without.with_nested(0, stream.vcpus[0].nested) == data


def test_gif_follows_the_nested_flags(stream: qemu.QemuStream) -> None:
    state = stream.vcpus[0].nested.copy()  # type: ignore[union-attr]
    state.flags = NestedFlag.GUEST_MODE
    cpu = qemu.read(stream.with_nested(0, state)).vcpus[0]
    assert cpu.hflags2 is not None and not cpu.hflags2 & qemu.HF2_GIF_MASK
    assert cpu.guest_mode


@pytest.mark.parametrize(
    ("size", "vmxon", "subsections"),
    [
        (VMX_MAX_SIZE, 0x11000, ("vmx", "vmx/vmcs12", "vmx/shadow_vmcs12")),
        (HEADER_SIZE + 4096, 0x11000, ("vmx", "vmx/vmcs12")),
        (HEADER_SIZE, 0x11000, ("vmx",)),
    ],
)
def test_vmx_states(
    stream: qemu.QemuStream, size: int, vmxon: int, subsections: tuple[str, ...]
) -> None:
    state = vmx_state(size, vmxon)
    cpu = qemu.read(stream.with_nested(0, state)).vcpus[0]
    assert cpu.nested == state
    assert cpu.nested_subsections == tuple(f"cpu/kvm_nested_state/{s}" for s in subsections)
    assert {"hdr.vmx.flags", "hdr.vmx.preemption_timer_deadline"} <= set(cpu.not_migrated)
    assert cpu.guest_mode == bool(state.flags & NestedFlag.GUEST_MODE)
    nested = cpu.nested
    assert nested is not None
    assert (nested.vmcs12 is not None) == (size > HEADER_SIZE)
    assert (nested.shadow_vmcs12 is not None) == (size == VMX_MAX_SIZE)


def test_vmx_without_vmxon_has_no_vmx_subsection(stream: qemu.QemuStream) -> None:
    state = vmx_state(HEADER_SIZE, (1 << 64) - 1)
    cpu = qemu.read(stream.with_nested(0, state)).vcpus[0]
    assert cpu.nested == state
    assert cpu.nested_subsections == ()
    assert cpu.not_migrated["hdr.vmx.vmxon_pa"].startswith("not sent")


def test_two_vcpus_write_one() -> None:
    data = qemu_streams.synthesize(cpus=2)
    stream = qemu.read(data)
    assert [c.index for c in stream.vcpus] == [0, 1]
    state = vmx_state()
    new = qemu.read(stream.with_nested(1, state))
    assert new.vcpus[0].nested == stream.vcpus[0].nested
    assert new.vcpus[1].nested == state
    cpu0 = stream.vcpus[0]
    assert new.data[cpu0.offset : cpu0.end] == data[cpu0.offset : cpu0.end]
    with pytest.raises(KeyError):
        stream.with_nested(2, state)


def test_with_nested_refuses_what_qemu_cannot_carry(stream: qemu.QemuStream) -> None:
    with pytest.raises(TypeError, match=r"NestedState or None"):
        stream.with_nested(0, b"\0" * 128)  # type: ignore[arg-type]
    odd = NestedState(SVM_MAX_SIZE)
    odd.format, odd.size = 5, SVM_MAX_SIZE
    with pytest.raises(ValueError, match=r"format 5"):
        stream.with_nested(0, odd)
    short = NestedState(HEADER_SIZE)
    short.format, short.size = NestedFormat.SVM, SVM_MAX_SIZE
    with pytest.raises(ValueError, match=r"between 128 and the buffer's 128"):
        stream.with_nested(0, short)


def test_description_text_is_qemus() -> None:
    # qobject/json-writer.c: ", " and ": ", named escapes, \uXXXX upper case for the rest.
    text = _qemu_stream.dump_description(
        {"a": ['x\u00e9\n"\\', 1, True, None], "b": "\U0001f600\x7f"}
    )
    assert text == b'{"a": ["x\\u00E9\\n\\"\\\\", 1, true, null], "b": "\\uD83D\\uDE00\\u007F"}'
    assert json.loads(text) == {"a": ['x\u00e9\n"\\', 1, True, None], "b": "\U0001f600\x7f"}


# --- host side: bad streams ------------------------------------------------------------


def differing_bytes(a: bytes, b: bytes) -> int:
    """How many bytes differ between two equally long blobs (page by page: fast under TCG)."""
    assert len(a) == len(b)
    count = 0
    for start in range(0, len(a), 4096):
        x, y = a[start : start + 4096], b[start : start + 4096]
        if x != y:
            count += sum(p != q for p, q in zip(x, y, strict=True))
    return count


def offset_of(message: str) -> int:
    match = re.search(r"offset (\d+) \(0x", message)
    assert match, message
    return int(match.group(1))


def test_refuses_not_a_stream() -> None:
    with pytest.raises(ValueError, match=r"offset 0 .*magic 'QEVM'"):
        qemu.read(b"QEVX\0\0\0\x03")
    with pytest.raises(ValueError, match=r"offset 4 .*version 3, found 2"):
        qemu.read(b"QEVM\0\0\0\x02")
    with pytest.raises(TypeError, match=r"bytes-like"):
        qemu.read("QEVM")  # type: ignore[arg-type]


def test_refuses_truncated(data: bytes) -> None:
    stream = qemu.read(data)
    part = stream.sections[2]  # RAM pages
    with pytest.raises(ValueError, match=f"offset {part.offset + 5} .*truncated: expected a RAM"):
        qemu.read(data[: part.offset + 10])
    # Cut anywhere later, the description QEMU appends at the end is gone too.
    cpu = stream.vcpus[0]
    with pytest.raises(ValueError, match=r"has none \(truncated"):
        qemu.read(data[: cpu.offset + 100])
    # Cut inside the description.
    with pytest.raises(ValueError, match=r"has none \(truncated"):
        qemu.read(data[:-10])


def test_refuses_unknown_record_type(data: bytes) -> None:
    stream = qemu.read(data)
    at = next(s.offset for s in stream.sections if s.name == "cpu_common")
    bad = data[:at] + b"\x09" + data[at + 1 :]
    with pytest.raises(ValueError, match=f"offset {at} .*unknown record type 0x09"):
        qemu.read(bad)


def test_refuses_a_description_that_disagrees(data: bytes) -> None:
    stream = qemu.read(data)
    desc = stream.description
    assert desc is not None
    cpu_desc = desc["devices"][1]
    cpu_desc["fields"][1]["size"] = 4  # env.eip is 8 bytes
    bad = resynth(data, desc)
    with pytest.raises(ValueError, match=r"expected subsection cpu/tsc_khz") as info:
        qemu.read(bad)
    assert offset_of(str(info.value)) > stream.vcpus[0].offset
    # A struct whose declared size is not what its fields take.
    desc = qemu.read(data).description
    sub = next(s for s in desc["devices"][1]["subsections"] if s["vmsd_name"] == "cpu/nested_state")  # type: ignore[index]
    sub["fields"][0]["size"] = 4000
    with pytest.raises(
        ValueError, match=r"env.nested_state is 4000 bytes, but its fields .* take 4142"
    ):
        qemu.read(resynth(data, desc))
    # Devices in another order than the stream's.
    desc = qemu.read(data).description
    desc["devices"].reverse()  # type: ignore[index]
    with pytest.raises(ValueError, match=r"VM description's device 0 is 'cpu'"):
        qemu.read(resynth(data, desc))


def resynth(data: bytes, description: Any) -> bytes:
    at = qemu.read(data).sections[-1].end  # past EOF
    text = json.dumps(description).encode()
    return data[:at] + b"\x06" + struct.pack(">I", len(text)) + text


def nested_offsets(stream: qemu.QemuStream) -> dict[str, int]:
    cpu = stream.vcpus[0]
    kvm = cpu._node.subsection("cpu/nested_state").fields[0].children[0]  # type: ignore[union-attr]
    out = {f.name: f.start for f in kvm.fields}
    out["svm"] = kvm.subsections[0].start
    return out


def test_refuses_nested_sizes_that_disagree(data: bytes) -> None:
    at = nested_offsets(qemu.read(data))
    no_vmcb12 = "size 128 says no vmcb12 follows, but cpu/kvm_nested_state/svm is there"
    for field, fmt, value, message in (
        ("size", ">I", 2000, f"offset {at['size']} .*SVM nested state size 2000"),
        ("size", ">I", 128, no_vmcb12),
        ("format", ">H", 7, "format 7"),
        ("format", ">H", 0, "format is VMX but the stream has cpu/kvm_nested_state/svm"),
    ):
        written = struct.pack(fmt, value)  # big-endian, as QEMU writes these fields
        bad = data[: at[field]] + written + data[at[field] + len(written) :]
        with pytest.raises(ValueError, match=message):
            qemu.read(bad)


def test_refuses_lying_lengths(data: bytes) -> None:
    stream = qemu.read(data)
    svm = nested_offsets(stream)["svm"]
    # The subsection's name length says 30, the name is 24 bytes.
    bad = data[: svm + 1] + b"\x1e" + data[svm + 2 :]
    with pytest.raises(ValueError, match=r"expected subsection cpu/kvm_nested_state/svm"):
        qemu.read(bad)
    # The machine name's length is more than a name can be.
    bad = data[:8] + b"\x07" + struct.pack(">I", 300) + data[13:]
    with pytest.raises(ValueError, match=r"offset 9 .*machine name length 300"):
        qemu.read(bad)
    # A section name's length runs into the next fields.
    ram = stream.sections[1].offset
    bad = data[: ram + 5] + b"\x09" + data[ram + 6 :]
    with pytest.raises(ValueError, match=r"is not ASCII|RAM section version|iterative"):
        qemu.read(bad)
    # The description's length is one byte short: no description found.
    at = stream.sections[-1].end
    length = int.from_bytes(data[at + 1 : at + 5], "big")
    bad = data[: at + 1] + struct.pack(">I", length - 1) + data[at + 5 :]
    with pytest.raises(ValueError, match=r"needs the VM description"):
        qemu.read(bad)
    # A RAM block bigger than the total the size record announced.
    ram = stream.sections[1].offset + 1 + 4 + 4 + 4 + 4
    assert int.from_bytes(data[ram : ram + 8], "big") & 0xFFF == 4  # RAM_SAVE_FLAG_MEM_SIZE
    bad = data[:ram] + struct.pack(">Q", 0x100_0000 | 4) + data[ram + 8 :]
    with pytest.raises(ValueError, match=r"'pc.ram' is 0x2000000 bytes, more than the 0x1000000"):
        qemu.read(bad)


def test_refuses_bad_ram_records() -> None:
    cap = qemu_streams.capture()
    base = qemu_streams.synthesize(cap=cap)
    stream = qemu.read(base)
    part = stream.sections[2].offset + 5  # the SECTION_PART's first RAM record
    word = int.from_bytes(base[part : part + 8], "big")
    for flags, message in (
        (0x80, "RAM_SAVE_FLAG_HOOK"),
        (0x01, "RAM_SAVE_FLAG_FULL"),
        (0x400, "unknown RAM_SAVE_FLAG bits 0x400"),
        (0x08 | 0x02, "more than one kind of page"),
    ):
        bad = base[:part] + struct.pack(">Q", (word & ~0xFFF) | flags) + base[part + 8 :]
        with pytest.raises(ValueError, match=f"offset {part} .*{message}"):
            qemu.read(bad)
    # A page past its block's end.
    bad = base[:part] + struct.pack(">Q", 0x4000_0000 | (word & 0xFFF)) + base[part + 8 :]
    with pytest.raises(ValueError, match=r"past the end of RAM block 'pc.ram'"):
        qemu.read(bad)


def test_refuses_hostile_descriptions(data: bytes) -> None:
    desc = qemu.read(data).description
    deep: dict[str, Any] = {"vmsd_name": "x", "fields": []}
    node = deep
    for _ in range(100):
        child: dict[str, Any] = {"vmsd_name": "x", "fields": []}
        node["fields"].append({"name": "f", "type": "struct", "size": 0, "struct": child})
        node = child
    desc["devices"][0]["fields"] = [{"name": "d", "type": "struct", "size": 0, "struct": deep}]  # type: ignore[index]
    with pytest.raises(ValueError, match=r"nests deeper than 32"):
        qemu.read(resynth(data, desc))
    desc = qemu.read(data).description
    desc["devices"][0]["fields"][0]["array_len"] = 10**12  # type: ignore[index]
    with pytest.raises(ValueError, match=r"truncated: the VM description says"):
        qemu.read(resynth(data, desc))
    broken: Any
    for broken in ({"page_size": 4096}, {"page_size": 4096, "devices": [1]}, []):
        with pytest.raises(ValueError, match=r"VM description"):
            qemu.read(resynth(data, broken))
    at = qemu.read(data).sections[-1].end
    bad = data[:at] + b"\x06" + struct.pack(">I", 3) + b"{x}"
    with pytest.raises(ValueError, match=r"not valid JSON"):
        qemu.read(bad)
    nesting = b"[" * 100_000 + b"]" * 100_000
    text = b'{"a": ' + nesting + b"}"
    with pytest.raises(ValueError, match=r"not valid JSON"):
        qemu.read(data[:at] + b"\x06" + struct.pack(">I", len(text)) + text)


def test_hostile_truncations_and_bit_flips(data: bytes) -> None:
    """Every truncation and random corruption gives a stream or a ValueError, nothing else."""
    rng = random.Random(1303)
    outcomes = {"read": 0, "refused": 0}

    def attempt(blob: bytes) -> None:
        try:
            stream = qemu.read(blob)
        except ValueError as exc:
            assert str(exc).startswith("QEMU stream, offset "), exc
            outcomes["refused"] += 1
            return
        outcomes["read"] += 1
        for cpu in stream.vcpus:  # what was read must be usable
            repr(cpu)
            if cpu.nested is not None:
                cpu.nested.to_bytes()
        stream.write()

    boundaries = {b for s in qemu.read(data).sections for b in (s.offset, s.end)}
    cuts = sorted(boundaries | {rng.randrange(len(data)) for _ in range(300)})
    for cut in cuts:
        attempt(data[:cut])
    for _ in range(600):
        blob = bytearray(data)
        for _ in range(rng.choice((1, 1, 2, 8))):
            blob[rng.randrange(len(blob))] ^= 1 << rng.randrange(8)
        attempt(bytes(blob))
    assert outcomes["refused"] > 300 and outcomes["read"] > 10, outcomes


def test_hostile_field_types(data: bytes) -> None:
    """A description that retypes the cpu fields: the mapping leaves them out, never crashes."""
    rng = random.Random(7)
    types = ["uint8", "uint16", "uint32", "uint64", "int64", "int32 le", "bool", "buffer", "timer"]
    seen_absent = set()
    for _ in range(200):
        desc = qemu.read(data).description
        assert desc is not None
        cpu_desc = desc["devices"][1]
        for field in rng.sample(cpu_desc["fields"], 6):
            if "struct" not in field:
                field["type"] = rng.choice(types)
        try:
            stream = qemu.read(resynth(data, desc))
        except ValueError as exc:
            assert str(exc).startswith("QEMU stream, offset "), exc
            continue
        cpu = stream.vcpus[0]
        seen_absent |= set(cpu.state.absent)
        cpu.state.to_bytes()  # whatever was mapped is a well-formed part
        assert stream.write() == stream.data
    assert {"regs", "debugregs"} & seen_absent


# --- inside the AMD guest: real streams ------------------------------------------------

GUEST_MASK = 0x3F_FFFF  # a progress line every 4 Mi counts (a few per second under TCG)
L2_LINE = r"L2 ([0-9a-f]{8})\n"


@dataclasses.dataclass
class GuestRun:
    work: Path
    kernel: Path
    labels: dict[str, int]
    source: Path  # the stream the source QEMU wrote
    console: str  # the source's console until migration
    timings: dict[str, float]


@pytest.fixture(scope="module")
def guest_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GuestRun]:
    from tests.support import qemu_vm

    why = qemu_vm.available()
    if why:
        pytest.skip(why)
    work = tmp_path_factory.mktemp("qemu")
    image, labels = qemu_payload.program(GUEST_MASK)
    kernel = work / "l1.bin"
    kernel.write_bytes(image)
    timings: dict[str, float] = {}
    start = time.monotonic()
    with qemu_vm.QemuVm(kernel, work, "source") as vm:
        vm.wait_console(L2_LINE, count=2)
        timings["boot_to_l2"] = time.monotonic() - start
        timings["migrate"] = vm.migrate_to(work / "source.mig")
        console = vm.read_console()
    yield GuestRun(work, kernel, labels, work / "source.mig", console, timings)


def resume(run: GuestRun, stream: bytes, name: str, lines: int = 2) -> tuple[str, bytes]:
    """Start QEMU from ``stream``, wait for L2 progress, migrate again: (console, new stream)."""
    from tests.support import qemu_vm

    path = run.work / f"{name}.mig"
    path.write_bytes(stream)
    start = time.monotonic()
    with qemu_vm.QemuVm(run.kernel, run.work, name, incoming=path) as vm:
        vm.wait_console(L2_LINE, count=lines)
        run.timings[f"{name}_to_l2"] = time.monotonic() - start
        vm.migrate_to(run.work / f"{name}.out.mig")
        console = vm.read_console()
    return console, (run.work / f"{name}.out.mig").read_bytes()


def counter(stream: qemu.QemuStream) -> int:
    return int.from_bytes(stream.read_memory(qemu_payload.COUNTER, 4), "little")


@pytest.mark.svm_guest
def test_real_stream_decodes_by_field(guest_run: GuestRun) -> None:
    data = guest_run.source.read_bytes()
    assert data[:8] == b"QEVM\0\0\0\x03"
    assert re.findall(L2_LINE, guest_run.console)  # L2 ran before the migration
    stream = qemu.read(data)
    assert stream.machine is not None and stream.machine.startswith("pc-i440fx-")
    # QEMU's description text is what this library writes for the same description.
    assert _qemu_stream.dump_description(stream.description) == data[data.rindex(b'{"page_size"') :]
    (cpu,) = stream.vcpus
    nested = cpu.nested
    assert nested is not None
    assert nested.format == NestedFormat.SVM
    assert nested.flags == NestedFlag.GUEST_MODE | NestedFlag.GIF_SET
    assert nested.size == SVM_MAX_SIZE
    assert nested.svm.vmcb_pa == qemu_payload.VMCB
    assert cpu.nested_subsections == ("cpu/kvm_nested_state/svm",)
    control, save = nested.vmcb12.control, nested.vmcb12.save  # type: ignore[union-attr]
    assert control.asid == 1
    assert control.is_intercept(vmcb.INTERCEPT_VMRUN)
    assert not control.is_intercept(vmcb.INTERCEPT_IOIO_PROT)
    assert (control.iopm_base_pa, control.msrpm_base_pa) == (qemu_payload.IOPM, qemu_payload.MSRPM)
    assert save.rip == guest_run.labels["after_vmrun"]
    assert save.cr3 == qemu_payload.PAGE_DIR
    assert save.efer & vmcb.EFER_SVME
    assert cpu.guest_mode and cpu.notes == ()
    regs = cpu.state.regs
    assert regs is not None
    assert guest_run.labels["print"] <= regs.rip < guest_run.labels["l2_loop_end"]
    assert regs.rbx - counter(stream) in (0, 1)
    assert cpu.state.msrs is not None and cpu.state.msrs[0xC001_0117] == qemu_payload.HSAVE
    # The stream's size and the section sizes, for the record.
    print(f"stream {len(data)} bytes, cpu section {cpu.end - cpu.offset}, {guest_run.timings}")


@pytest.mark.svm_guest
def test_real_state_passes_check(guest_run: GuestRun) -> None:
    import kvmstate

    stream = qemu.read(guest_run.source.read_bytes())
    cpu = stream.vcpus[0]
    with kvmstate.Kvm() as kvm, kvm.create_vm() as vm, vm.create_vcpu(0) as vcpu:
        vcpu.set_cpuid2(kvm.get_supported_cpuid())
        facts = kcheck.Facts.from_vcpu(vcpu)
    # The destination vCPU as QEMU restores it: the stream's control registers, not in SMM.
    facts = dataclasses.replace(
        facts, efer=cpu.efer, cr0=cpu.cr0, cr3=cpu.cr3, cr4=cpu.cr4, in_smm=False
    )
    assert facts.nested_state_cap == SVM_MAX_SIZE
    assert cpu.nested is not None
    assert kcheck.check(cpu.nested, facts) == []


@pytest.mark.svm_guest
def test_real_state_kernel_bytes_round_trip(guest_run: GuestRun) -> None:
    data = guest_run.source.read_bytes()
    stream = qemu.read(data)
    nested = stream.vcpus[0].nested
    assert nested is not None
    raw = nested.to_bytes()
    assert struct.unpack_from("<HHIQ", raw) == (0x101, 1, SVM_MAX_SIZE, qemu_payload.VMCB)
    assert data.count(raw[HEADER_SIZE:]) == 1
    back = NestedState.from_bytes(raw)
    assert back == nested
    assert stream.with_nested(0, back) == data
    assert stream.write() == data


@pytest.mark.svm_guest
def test_real_stream_unmodified_runs_on(guest_run: GuestRun) -> None:
    data = guest_run.source.read_bytes()
    stream = qemu.read(data)
    written = stream.with_nested(0, stream.vcpus[0].nested)
    assert written == data
    saved = counter(stream)
    console, after = resume(guest_run, written, "unmodified")
    counts = [int(c, 16) for c in re.findall(L2_LINE, console)]
    assert counts and all(c > saved for c in counts), (saved, counts)
    assert "L1 exit" not in console
    later = qemu.read(after)
    assert counter(later) > saved
    assert int.from_bytes(later.read_memory(qemu_payload.L1_EXITS, 4), "little") == 0
    assert later.vcpus[0].guest_mode


@pytest.mark.svm_guest
def test_real_stream_modified_runs_on(guest_run: GuestRun) -> None:
    """vmcb12 gains the IOIO intercept: L2's next OUT exits to L1, which says so and goes on."""
    data = guest_run.source.read_bytes()
    stream = qemu.read(data)
    state = stream.vcpus[0].nested
    assert state is not None
    state = state.copy()
    state.vmcb12.control.set_intercept(vmcb.INTERCEPT_IOIO_PROT)  # type: ignore[union-attr]
    written = stream.with_nested(0, state)
    assert differing_bytes(written, data) == 1
    saved = counter(stream)
    console, after = resume(guest_run, written, "modified")
    exits = re.findall(r"L1 exit ([0-9a-f]{8}) next ([0-9a-f]{8})\n", console)
    assert len(exits) == 1, console
    code, next_rip = (int(x, 16) for x in exits[0])
    assert code == vmcb.SVM_EXIT_IOIO
    outs = {guest_run.labels[n] + 2 for n in ("out_print", "out_hex", "out_l2_newline")}
    assert next_rip in outs  # EXITINFO2: the instruction after one of L2's OUTs
    after_exit = console[console.index("L1 exit") :]
    counts = [int(c, 16) for c in re.findall(L2_LINE, after_exit)]
    assert counts and all(c > saved for c in counts), (saved, counts)
    later = qemu.read(after)
    assert counter(later) > saved
    assert int.from_bytes(later.read_memory(qemu_payload.L1_EXITS, 4), "little") == 1
    nested = later.vcpus[0].nested
    assert nested is not None and nested.flags & NestedFlag.GUEST_MODE
    # L1 re-entered L2 with its own VMCB: the intercept is gone again.
    assert not nested.vmcb12.control.is_intercept(vmcb.INTERCEPT_IOIO_PROT)  # type: ignore[union-attr]
    print(f"timings {guest_run.timings}")


def test_guest_helpers_need_qemu(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.support import qemu_vm

    monkeypatch.setattr(qemu_vm, "QEMU", "qemu-system-does-not-exist")
    assert qemu_vm.available() == "qemu-system-does-not-exist is not installed"
