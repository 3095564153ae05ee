"""Small QEMU migration streams for host-side tests, built around real captured vCPU records.

:func:`synthesize` writes the container (header, configuration, a RAM
section with the counter page, the ``cpu_common`` and ``cpu`` sections,
EOF, the JSON description) around the section bodies and descriptions
that ``tests/data/qemu-svm-cpu.json`` captured from a real QEMU 7.2 stream
(:mod:`tests.support.qemu_capture`): every byte of the vCPU records is
QEMU's; only the framing is written here, independently of the library.
"""

from __future__ import annotations

import copy
import json
import struct
from functools import cache
from pathlib import Path
from typing import Any

CAPTURE = Path(__file__).resolve().parents[1] / "data" / "qemu-svm-cpu.json"

RAM_ZERO, RAM_MEM_SIZE, RAM_PAGE, RAM_EOS, RAM_CONTINUE = 0x02, 0x04, 0x08, 0x10, 0x20


@cache
def _capture() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(CAPTURE.read_text())
    return loaded


def capture() -> dict[str, Any]:
    """A fresh copy of the captured records and payload constants."""
    return copy.deepcopy(_capture())


def name(text: str) -> bytes:
    raw = text.encode("ascii")
    return bytes([len(raw)]) + raw


def section_header(kind: int, section_id: int, idstr: str, instance: int, version: int) -> bytes:
    return (
        bytes([kind])
        + struct.pack(">I", section_id)
        + name(idstr)
        + struct.pack(">II", instance, version)
    )


def footer(section_id: int) -> bytes:
    return b"\x7e" + struct.pack(">I", section_id)


def ram_setup(blocks: dict[str, int]) -> bytes:
    out = struct.pack(">Q", sum(blocks.values()) | RAM_MEM_SIZE)
    for block, length in blocks.items():
        out += name(block) + struct.pack(">Q", length)
    return out + struct.pack(">Q", RAM_EOS)


def ram_pages(pages: dict[tuple[str, int], bytes | int], page_size: int = 4096) -> bytes:
    """PAGE records for bytes, ZERO records for an int fill byte; CONTINUE within a block; EOS."""
    out = b""
    last = None
    for (block, addr), content in pages.items():
        cont = RAM_CONTINUE if block == last else 0
        if isinstance(content, int):
            out += struct.pack(">Q", addr | RAM_ZERO | cont)
            out += (b"" if cont else name(block)) + bytes([content])
        else:
            out += struct.pack(">Q", addr | RAM_PAGE | cont)
            out += (b"" if cont else name(block)) + content.ljust(page_size, b"\0")
        last = block
    return out + struct.pack(">Q", RAM_EOS)


def synthesize(
    cpus: int = 1,
    *,
    with_description: bool = True,
    footers: bool = True,
    cap: dict[str, Any] | None = None,
) -> bytes:
    """A stream with ``cpus`` copies of the captured vCPU (instance ids 0, 1, ...)."""
    cap = capture() if cap is None else cap
    page_size = cap["page_size"]
    out: bytes = b"QEVM" + struct.pack(">I", 3)
    machine = cap["machine"].encode()
    out += b"\x07" + struct.pack(">I", len(machine)) + machine
    ram_id = 2
    pages: dict[tuple[str, int], bytes | int] = {}
    for key, content in cap["pages"].items():
        block, addr = key.rsplit(":", 1)
        pages[block, int(addr, 16)] = bytes.fromhex(content)
    pages["pc.ram", 0] = 0  # a zero page too
    out += section_header(0x01, ram_id, "ram", 0, 4) + ram_setup(cap["ram_blocks"])
    out += footer(ram_id) if footers else b""
    out += b"\x02" + struct.pack(">I", ram_id) + ram_pages(pages, page_size)
    out += footer(ram_id) if footers else b""
    out += b"\x03" + struct.pack(">I", ram_id) + ram_pages({}, page_size)
    out += footer(ram_id) if footers else b""
    devices = []
    section_id = 3
    captured = {d["name"]: d for d in cap["devices"]}
    for index in range(cpus):
        for device in ("cpu_common", "cpu"):
            d = captured[device]
            out += section_header(0x04, section_id, device, index, d["version_id"])
            out += bytes.fromhex(d["body"])
            out += footer(section_id) if footers else b""
            desc = copy.deepcopy(d["description"])
            desc["instance_id"] = index
            devices.append(desc)
            section_id += 1
    out += b"\x00"
    if with_description:
        text = json.dumps({"page_size": page_size, "devices": devices}).encode()
        out += b"\x06" + struct.pack(">I", len(text)) + text
    return out
