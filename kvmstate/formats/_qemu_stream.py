"""QEMU migration stream framing: records, the RAM section, VMState walked by the description.

Private to :mod:`kvmstate.formats.qemu`. Everything here works on offsets
into the stream's bytes and refuses what does not fit with
:class:`StreamError` (a ValueError) naming the offset and what was
expected there. Facts from QEMU 7.2's migration/savevm.c, vmstate.c,
ram.c and scripts/analyze-migration.py; checked against streams QEMU 7.2
wrote (docs/formats-qemu.md).

Stream layout (all integers big-endian):

* ``QEVM`` and version 3 (be32 each);
* records, each a type byte: CONFIGURATION (0x07: be32 length + machine
  name, then configuration subsections), SECTION_START (0x01) / FULL (0x04)
  (be32 section id, u8 length + idstr, be32 instance id, be32 version id,
  then the body), SECTION_PART (0x02) / END (0x03) (be32 section id, then
  the body), each section followed by a FOOTER (0x7E, be32 section id);
  COMMAND (0x08: be16 command, be16 length, data); EOF (0x00);
* after EOF, VMDESCRIPTION (0x06, be32 length, JSON): what every FULL
  section's VMState holds, field by field, with each field's size.

The RAM section (``ram``) frames itself: be64 words of page address | flags
(``RAM_SAVE_FLAG_*``), ended by EOS. Device sections are VMState: fields
back to back with no framing, then subsections (0x05, u8 length + name,
be32 version id, fields, their subsections); only the description says
where one field ends, so the walker follows it and checks that the bytes
agree (each subsection marker and name where the description puts it, each
struct's contents adding up to its declared size, the footer right after).
"""

from __future__ import annotations

import dataclasses
import json
import struct
from typing import Any

MAGIC = b"QEVM"
VERSION = 3

EOF, SECTION_START, SECTION_PART, SECTION_END, SECTION_FULL = 0x00, 0x01, 0x02, 0x03, 0x04
SUBSECTION, VMDESCRIPTION, CONFIGURATION, COMMAND, SECTION_FOOTER = 0x05, 0x06, 0x07, 0x08, 0x7E
RECORD_NAMES = {
    EOF: "EOF",
    SECTION_START: "SECTION_START",
    SECTION_PART: "SECTION_PART",
    SECTION_END: "SECTION_END",
    SECTION_FULL: "SECTION_FULL",
    SUBSECTION: "SUBSECTION",
    VMDESCRIPTION: "VMDESCRIPTION",
    CONFIGURATION: "CONFIGURATION",
    COMMAND: "COMMAND",
    SECTION_FOOTER: "SECTION_FOOTER",
}

# migration/ram.c (7.2); MULTIFD_FLUSH is 8.0's.
RAM_FULL, RAM_ZERO, RAM_MEM_SIZE, RAM_PAGE, RAM_EOS = 0x01, 0x02, 0x04, 0x08, 0x10
RAM_CONTINUE, RAM_XBZRLE, RAM_HOOK, RAM_COMPRESS_PAGE, RAM_MULTIFD_FLUSH = (
    0x20, 0x40, 0x80, 0x100, 0x200,
)  # fmt: skip
RAM_VERSION = 4
XBZRLE_ENCODING = 0x01
# MIG_CMD_PACKAGED wraps a whole device-state stream (postcopy); not walked.
MIG_CMD_PACKAGED = 7

# VMState info types the description names, as (struct format, signed) for integers.
_INT_TYPES = {
    "bool": ("B", False), "uint8": ("B", False), "uint16": (">H", False),
    "uint32": (">I", False), "uint64": (">Q", False), "int8": ("b", True),
    "int16": (">h", True), "int32": (">i", True), "int64": (">q", True),
    "uint8 equal": ("B", False), "uint16 equal": (">H", False),
    "uint32 equal": (">I", False), "int32 equal": (">i", True),
    "int64 equal": (">q", True), "int32 le": ("<i", True),
}  # fmt: skip

# Bounds that turn a hostile description into an error rather than a long loop.
_MAX_DEPTH = 32
_MAX_NAME = 255


class StreamError(ValueError):
    """A malformed QEMU stream (a ValueError): ``offset`` is where, the message what was
    expected there."""

    def __init__(self, offset: int, message: str) -> None:
        super().__init__(f"QEMU stream, offset {offset} ({offset:#x}): {message}")
        self.offset = offset


# Raised through, and documented by, the public module.
StreamError.__module__ = "kvmstate.formats.qemu"


class Reader:
    """Bounds-checked big-endian reads from the stream's bytes."""

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    def need(self, n: int, what: str) -> int:
        start = self.pos
        if n < 0 or start + n > self.end:
            raise StreamError(
                start,
                f"truncated: expected {what} ({n} bytes), "
                f"but the stream ends at {self.end} ({self.end:#x})",
            )
        self.pos = start + n
        return start

    def u8(self, what: str) -> int:
        return self.data[self.need(1, what)]

    def peek(self) -> int | None:
        return self.data[self.pos] if self.pos < self.end else None

    def be16(self, what: str) -> int:
        return int.from_bytes(self.data[self.need(2, what) : self.pos], "big")

    def be32(self, what: str) -> int:
        return int.from_bytes(self.data[self.need(4, what) : self.pos], "big")

    def be64(self, what: str) -> int:
        return int.from_bytes(self.data[self.need(8, what) : self.pos], "big")

    def take(self, n: int, what: str) -> bytes:
        return self.data[self.need(n, what) : self.pos]

    def name(self, what: str) -> str:
        """A u8 length and that many bytes of ASCII (idstrs, block and subsection names)."""
        start = self.pos
        raw = self.take(self.u8(f"the length of {what}"), what)
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise StreamError(start, f"{what} is not ASCII: {raw[:40]!r}") from None


# --- the description ------------------------------------------------------------------


def find_description(data: bytes) -> tuple[int, Any] | None:
    """Where the VMDESCRIPTION record starts and its parsed JSON, or None if there is none.

    The record is ``0x06, be32 length, JSON`` and ends the stream. JSON text
    has no raw control bytes, so the record's 0x06 is at or before the last
    control byte and the JSON starts within 5 bytes after it; the length
    must then reach exactly the end.
    """
    n = len(data)
    last = n - 1
    while last >= 0 and (data[last] >= 0x20 or data[last] in b"\t\n\r"):
        last -= 1
    for start in range(last + 1, min(last + 6, n)):
        marker = start - 5
        if (
            marker >= 0
            and data[marker] == VMDESCRIPTION
            and int.from_bytes(data[marker + 1 : start], "big") == n - start
            and data[start : start + 1] == b"{"
        ):
            try:
                description = json.loads(data[start:].decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError) as exc:
                raise StreamError(start, f"the VM description is not valid JSON: {exc}") from None
            if not isinstance(description, dict):
                raise StreamError(start, "the VM description is not a JSON object")
            return marker, description
    return None


def dump_description(description: Any) -> bytes:
    """JSON text the way QEMU's JSONWriter writes it (``", "`` and ``": "``, no newlines).

    Strings escape ``"``, ``\\`` and ``\\b \\f \\n \\r \\t`` by name and every
    other code point below 0x20 or from 0x7F as ``\\uXXXX`` (upper case hex,
    surrogate pairs above 0xFFFF), as qobject/json-writer.c does.
    """
    out: list[str] = []
    _dump(description, out)
    return "".join(out).encode("ascii")


_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
}


def _quote(text: str) -> str:
    parts = ['"']
    for char in text:
        cp = ord(char)
        if char in _ESCAPES:
            parts.append(_ESCAPES[char])
        elif cp < 0x20 or cp >= 0x7F:
            if cp >= 0x10000:
                cp -= 0x10000
                parts.append(f"\\u{0xD800 | cp >> 10:04X}\\u{0xDC00 | cp & 0x3FF:04X}")
            else:
                parts.append(f"\\u{cp:04X}")
        else:
            parts.append(char)
    parts.append('"')
    return "".join(parts)


def _dump(value: Any, out: list[str]) -> None:
    if isinstance(value, dict):
        out.append("{")
        for i, (key, item) in enumerate(value.items()):
            if i:
                out.append(", ")
            out.append(_quote(str(key)))
            out.append(": ")
            _dump(item, out)
        out.append("}")
    elif isinstance(value, list):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(", ")
            _dump(item, out)
        out.append("]")
    elif isinstance(value, bool):
        out.append("true" if value else "false")
    elif isinstance(value, int):
        out.append(str(value))
    elif isinstance(value, str):
        out.append(_quote(value))
    elif value is None:
        out.append("null")
    else:
        out.append(json.dumps(value))


# --- VMState walked by its description --------------------------------------------------------


@dataclasses.dataclass
class Field:
    """One described field: ``count`` elements of ``size`` bytes from ``start``."""

    name: str
    type: str
    start: int
    size: int
    count: int
    desc: dict[str, Any]
    children: list[Node]  # one per element for structs, else empty

    @property
    def end(self) -> int:
        return self.start + self.size * self.count

    def value(self, data: bytes) -> Any:
        """Integers decoded (a tuple for arrays of more than one), other types as bytes."""
        kind = _INT_TYPES.get(self.type)
        if kind is not None and struct.calcsize(kind[0]) == self.size:
            fmt = kind[0]
            values = [
                struct.unpack_from(fmt, data, self.start + i * self.size)[0]
                for i in range(self.count)
            ]
            if self.type == "bool":
                values = [bool(v) for v in values]
            return values[0] if self.count == 1 else tuple(values)
        return data[self.start : self.end]


@dataclasses.dataclass
class Node:
    """A walked VMState: its fields and subsections, with offsets.

    For a subsection, ``start`` is its 0x05 marker and ``body`` where its
    fields begin; for a section or struct both are where the fields begin.
    """

    name: str
    version: int
    start: int
    body: int
    end: int
    fields: list[Field]
    subsections: list[Node]
    desc: dict[str, Any]

    def field(self, name: str) -> Field | None:
        for item in self.fields:
            if item.name == name:
                return item
        return None

    def subsection(self, name: str) -> Node | None:
        for sub in self.subsections:
            if sub.name == name:
                return sub
        return None


class Budget:
    """Caps the work a description can ask for (fields walked), against hostile input."""

    def __init__(self, limit: int) -> None:
        self.left = limit

    def spend(self, offset: int) -> None:
        self.left -= 1
        if self.left < 0:
            raise StreamError(
                offset, "the VM description asks for more fields than the stream holds"
            )


def _desc_int(
    desc: dict[str, Any], key: str, where: str, offset: int, default: int | None = None
) -> int:
    value = desc.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise StreamError(offset, f"the VM description of {where} has no valid {key!r}: {value!r}")
    return value


def _desc_str(desc: dict[str, Any], key: str, where: str, offset: int) -> str:
    value = desc.get(key)
    if not isinstance(value, str):
        raise StreamError(offset, f"the VM description of {where} has no valid {key!r}: {value!r}")
    return value


def _desc_list(desc: dict[str, Any], key: str, where: str, offset: int) -> list[dict[str, Any]]:
    value = desc.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise StreamError(offset, f"the VM description of {where} has a malformed {key!r}")
    return value


def walk(
    reader: Reader,
    desc: dict[str, Any],
    where: str,
    budget: Budget,
    depth: int = 0,
    start: int | None = None,
) -> Node:
    """Walk one VMState (fields, then subsections) as ``desc`` describes it."""
    body = reader.pos
    if depth > _MAX_DEPTH:
        raise StreamError(
            body, f"the VM description nests deeper than {_MAX_DEPTH} levels at {where}"
        )
    name = desc.get("vmsd_name", where)
    if not isinstance(name, str):
        raise StreamError(body, f"the VM description of {where} has a malformed 'vmsd_name'")
    version = _desc_int(desc, "version", name, body, 0)
    node = Node(name, version, body if start is None else start, body, body, [], [], desc)
    for fdesc in _desc_list(desc, "fields", name, body):
        budget.spend(reader.pos)
        fname = _desc_str(fdesc, "name", f"a field of {name}", reader.pos)
        label = f"{name}.{fname}"
        ftype = fdesc.get("type", "unknown")
        if not isinstance(ftype, str):
            raise StreamError(reader.pos, f"the VM description of {label} has a malformed 'type'")
        size = _desc_int(fdesc, "size", label, reader.pos)
        count = _desc_int(fdesc, "array_len", label, reader.pos, 1)
        field = Field(fname, ftype, reader.pos, size, count, fdesc, [])
        if field.end > reader.end:
            raise StreamError(
                field.start,
                f"truncated: the VM description says {label} is {count} x {size} bytes, "
                f"but the stream ends at {reader.end} ({reader.end:#x})",
            )
        inner = fdesc.get("struct")
        if inner is None and isinstance(fdesc.get("fields"), list):
            inner = fdesc  # VMSTATE_WITH_TMP and VSTRUCT describe their fields inline
        if inner is not None:
            if not isinstance(inner, dict):
                raise StreamError(
                    reader.pos, f"the VM description of {label} has a malformed 'struct'"
                )
            for index in range(count):
                element = reader.pos
                child = walk(reader, inner, label, budget, depth + 1)
                if reader.pos - element != size:
                    raise StreamError(
                        element,
                        f"the VM description says {label}"
                        f"{f'[{index}]' if count > 1 else ''} is {size} bytes, "
                        f"but its fields and subsections take {reader.pos - element}",
                    )
                field.children.append(child)
                if child.end == element and count > 1:  # empty elements: nothing more to walk
                    break
            reader.pos = field.end
        else:
            reader.pos = field.end
        node.fields.append(field)
    for sdesc in _desc_list(desc, "subsections", name, reader.pos):
        budget.spend(reader.pos)
        sname = _desc_str(sdesc, "vmsd_name", f"a subsection of {name}", reader.pos)
        marker = reader.pos
        found = reader.u8(f"the subsection marker of {sname}")
        if found != SUBSECTION:
            raise StreamError(
                marker,
                f"expected subsection {sname} (marker 0x05, as the VM description says), "
                f"found byte {found:#04x}",
            )
        got = reader.name(f"the name of subsection {sname}")
        if got != sname:
            raise StreamError(
                marker + 2,
                f"expected subsection {sname} (as the VM description says), found {got!r}",
            )
        sversion = reader.be32(f"the version of subsection {sname}")
        wanted = _desc_int(sdesc, "version", sname, marker)
        if sversion != wanted:
            raise StreamError(
                reader.pos - 4,
                f"subsection {sname} is version {sversion}, the VM description says {wanted}",
            )
        node.subsections.append(walk(reader, sdesc, sname, budget, depth + 1, start=marker))
    node.end = reader.pos
    return node


# --- records --------------------------------------------------------------------------------


@dataclasses.dataclass
class Record:
    """One top-level record; ``end`` is past its footer (sections) or its last byte."""

    kind: int
    offset: int
    end: int
    section_id: int | None = None
    name: str | None = None
    instance_id: int | None = None
    version_id: int | None = None
    node: Node | None = None  # device sections: the walked VMState
    device_index: int | None = None  # its entry in the description's "devices"


@dataclasses.dataclass
class RamPage:
    """The last copy of one RAM page the stream carries: its bytes' offset, or a fill byte."""

    offset: int | None
    fill: int = 0


@dataclasses.dataclass
class Parsed:
    version: int
    machine: str | None
    page_size: int
    description: dict[str, Any] | None
    description_at: int | None  # the VMDESCRIPTION record's offset
    eof_at: int
    records: list[Record]
    ram_blocks: dict[str, int]
    capabilities: list[str]
    ram_pages: dict[tuple[str, int], RamPage]


def parse(data: bytes) -> Parsed:
    """Walk the whole stream; StreamError at the first thing that does not fit."""
    r = Reader(data)
    if len(data) < 8 or data[:4] != MAGIC:
        raise StreamError(0, f"expected the QEMU migration magic 'QEVM', found {data[:4]!r}")
    r.pos = 4
    version = r.be32("the stream version")
    if version != VERSION:
        raise StreamError(4, f"expected stream version {VERSION}, found {version}")
    found = find_description(data)
    description, description_at = (found[1], found[0]) if found else (None, None)
    end = len(data) if description_at is None else description_at
    r.end = end
    devices = _devices(description, description_at)
    page_size = 4096
    if description is not None and "page_size" in description:
        page_size = _desc_int(description, "page_size", "the stream", description_at or 0)
        if page_size < 512 or page_size & (page_size - 1) or page_size > 1 << 22:
            raise StreamError(description_at or 0, f"page_size {page_size} is not a page size")
    p = Parsed(version, None, page_size, description, description_at, -1, [], {}, [], {})
    budget = Budget(4 * len(data) + 1000)
    open_sections: dict[int, Record] = {}
    next_device = 0
    ram = _Ram(p)
    while True:
        at = r.pos
        kind = r.u8("a record type (or EOF)")
        if kind == EOF:
            p.eof_at = at
            p.records.append(Record(EOF, at, r.pos))
            break
        if kind == CONFIGURATION:
            _configuration(r, p, at, budget)
        elif kind in (SECTION_START, SECTION_FULL):
            section_id = r.be32("the section id")
            name = r.name("the section's idstr")
            instance = r.be32(f"the instance id of section {name}")
            sversion = r.be32(f"the version id of section {name}")
            rec = Record(kind, at, at, section_id, name, instance, sversion)
            if name == "ram":
                if sversion != RAM_VERSION:
                    raise StreamError(
                        r.pos - 4, f"expected RAM section version 4, found {sversion}"
                    )
                ram.read(r)
                if kind == SECTION_START:
                    open_sections[section_id] = rec
            elif kind == SECTION_START:
                raise StreamError(
                    at, f"section {name!r} is iterative and only 'ram' is understood here"
                )
            else:
                if devices is None:
                    raise StreamError(
                        at,
                        f"device section {name!r} needs the VM description QEMU appends "
                        "after EOF (QEMU_VM_VMDESCRIPTION), and this stream has none "
                        "(truncated, or saved with suppress-vmdesc=on)",
                    )
                if next_device >= len(devices):
                    raise StreamError(
                        at,
                        f"section {name!r} has no entry in the VM description "
                        f"(it lists {len(devices)})",
                    )
                desc = devices[next_device]
                want_name = desc.get("name")
                want_instance = desc.get("instance_id")
                if want_name != name or want_instance != instance:
                    raise StreamError(
                        at,
                        f"section {name!r} instance {instance} is device {next_device} of the "
                        f"stream, but the VM description's device {next_device} is {want_name!r} "
                        f"instance {want_instance!r}",
                    )
                if desc.get("version", sversion) != sversion:
                    raise StreamError(
                        r.pos - 4,
                        f"section {name!r} is version {sversion}, "
                        f"the VM description says {desc.get('version')!r}",
                    )
                rec.node = walk(r, desc, name, budget)
                rec.device_index = next_device
                next_device += 1
            _footer(r, section_id, name)
            rec.end = r.pos
            p.records.append(rec)
        elif kind in (SECTION_PART, SECTION_END):
            section_id = r.be32("the section id")
            opened = open_sections.get(section_id)
            if opened is None:
                raise StreamError(
                    at,
                    f"{RECORD_NAMES[kind]} for section id {section_id}, "
                    "which no SECTION_START opened",
                )
            ram.read(r)
            _footer(r, section_id, opened.name or "")
            if kind == SECTION_END:
                del open_sections[section_id]
            p.records.append(Record(kind, at, r.pos, section_id, opened.name, opened.instance_id))
        elif kind == COMMAND:
            command = r.be16("the command number")
            length = r.be16("the command's data length")
            if command == MIG_CMD_PACKAGED:
                raise StreamError(at, "a PACKAGED command (postcopy) is not understood here")
            r.take(length, f"the {length} bytes of command {command}")
            p.records.append(Record(COMMAND, at, r.pos, section_id=command))
        elif kind == SECTION_FOOTER:
            raise StreamError(at, "a section footer (0x7e) outside a section")
        else:
            raise StreamError(
                at,
                f"unknown record type {kind:#04x} "
                "(expected EOF 0x00, a section 0x01-0x04, CONFIGURATION 0x07 or COMMAND 0x08)",
            )
    if r.pos != end:
        raise StreamError(
            r.pos,
            "expected the VM description (0x06) right after EOF"
            if description_at is not None
            else f"expected the end of the stream after EOF, found {end - r.pos} more bytes",
        )
    if devices is not None and next_device != len(devices):
        raise StreamError(
            p.eof_at,
            f"the VM description lists {len(devices)} devices, the stream has {next_device}",
        )
    return p


def _devices(description: dict[str, Any] | None, at: int | None) -> list[dict[str, Any]] | None:
    if description is None:
        return None
    devices = description.get("devices")
    if not isinstance(devices, list) or not all(isinstance(d, dict) for d in devices):
        raise StreamError(at or 0, "the VM description has no list of devices")
    return devices


def _footer(r: Reader, section_id: int, name: str) -> None:
    # Footers are on for every machine type since pc-*-2.4; older streams have none.
    if r.peek() != SECTION_FOOTER:
        return
    at = r.pos
    r.pos += 1
    found = r.be32(f"the section id in the footer of section {name!r}")
    if found != section_id:
        raise StreamError(
            at, f"the footer of section {name!r} says section id {found}, expected {section_id}"
        )


def _configuration(r: Reader, p: Parsed, at: int, budget: Budget) -> None:
    if p.machine is not None:
        raise StreamError(at, "a second CONFIGURATION record")
    desc = p.description.get("configuration") if p.description else None
    if isinstance(desc, dict):
        # Newer QEMUs describe the configuration section too: walk it like a device.
        node = walk(r, desc, "configuration", budget)
        machine = node.field("name")
        p.machine = machine.value(r.data).decode("ascii", "replace") if machine else ""
        caps = node.subsection("configuration/capabilities")
        if caps is not None:
            p.capabilities = _capabilities(r.data, caps.body, caps.end)
        p.records.append(Record(CONFIGURATION, at, r.pos, name="configuration", node=node))
        return
    length = r.be32("the machine name's length")
    if length > _MAX_NAME:
        raise StreamError(r.pos - 4, f"machine name length {length} (expected at most {_MAX_NAME})")
    p.machine = r.take(length, "the machine name").decode("ascii", "replace")
    while r.peek() == SUBSECTION:
        marker = r.pos
        r.pos += 1
        name = r.name("a configuration subsection's name")
        r.be32(f"the version of {name}")
        if name == "configuration/target-page-bits":
            bits = r.be32("the target page bits")
            if not 9 <= bits <= 22:
                raise StreamError(r.pos - 4, f"target page bits {bits} (expected 9..22)")
            p.page_size = 1 << bits
        elif name == "configuration/capabilities":
            start = r.pos
            count = r.be32("the capability count")
            for _ in range(count):
                r.name("a capability name")
            p.capabilities = _capabilities(r.data, start, r.pos)
        elif name == "configuration/uuid":
            r.take(16, "the VM's UUID")
        else:
            raise StreamError(marker, f"unknown configuration subsection {name!r}")
    p.records.append(Record(CONFIGURATION, at, r.pos, name="configuration"))


def _capabilities(data: bytes, start: int, end: int) -> list[str]:
    r = Reader(data, start, end)
    return [r.name("a capability name") for _ in range(r.be32("the capability count"))]


class _Ram:
    """Reads RAM section bodies: block sizes, then page records up to EOS."""

    def __init__(self, parsed: Parsed) -> None:
        self.p = parsed
        self.block: str | None = None

    def read(self, r: Reader) -> None:
        page = self.p.page_size
        while True:
            at = r.pos
            word = r.be64("a RAM record (page address | RAM_SAVE_FLAG_*)")
            flags, addr = word & (page - 1), word & ~(page - 1)
            if flags & RAM_MEM_SIZE:
                self._blocks(r, addr)
                flags &= ~RAM_MEM_SIZE
            kinds = flags & (
                RAM_ZERO | RAM_PAGE | RAM_XBZRLE | RAM_COMPRESS_PAGE | RAM_HOOK | RAM_FULL
            )
            if kinds & (kinds - 1):
                raise StreamError(
                    at, f"RAM record with flags {flags:#x}: more than one kind of page"
                )
            if kinds & (RAM_HOOK | RAM_FULL):
                what = "RAM_SAVE_FLAG_HOOK: RDMA" if kinds & RAM_HOOK else "RAM_SAVE_FLAG_FULL"
                raise StreamError(
                    at, f"RAM record with flag {kinds:#x} ({what}), which this reader does not take"
                )
            if kinds:
                block = self._block(r, at, flags)
                length = self.p.ram_blocks[block]
                if addr + page > length:
                    raise StreamError(
                        at,
                        f"page {addr:#x} is past the end of RAM block {block!r} "
                        f"({length:#x} bytes)",
                    )
                if kinds == RAM_ZERO:
                    self.p.ram_pages[block, addr] = RamPage(
                        None, r.u8("the fill byte of a zero page")
                    )
                elif kinds == RAM_PAGE:
                    self.p.ram_pages[block, addr] = RamPage(
                        r.need(page, f"page {addr:#x} of {block!r}")
                    )
                elif kinds == RAM_COMPRESS_PAGE:
                    r.take(r.be32("a compressed page's length"), "a compressed page")
                    self.p.ram_pages.pop((block, addr), None)  # zlib data: not kept
                else:
                    encoding = r.u8("the XBZRLE encoding byte")
                    if encoding != XBZRLE_ENCODING:
                        raise StreamError(
                            r.pos - 1, f"XBZRLE encoding {encoding:#x} (expected 0x1)"
                        )
                    r.take(r.be16("an XBZRLE page's length"), "an XBZRLE page")
                    self.p.ram_pages.pop((block, addr), None)  # a delta: not kept
            flags &= ~(kinds | RAM_CONTINUE | RAM_MULTIFD_FLUSH)
            if flags & RAM_EOS:
                flags &= ~RAM_EOS
                if flags:
                    raise StreamError(at, f"unknown RAM_SAVE_FLAG bits {flags:#x}")
                return
            if flags:
                raise StreamError(at, f"unknown RAM_SAVE_FLAG bits {flags:#x}")

    def _blocks(self, r: Reader, total: int) -> None:
        ignore_shared = "x-ignore-shared" in self.p.capabilities
        while total > 0:
            name = r.name("a RAM block's name")
            length = r.be64(f"the length of RAM block {name!r}")
            if ignore_shared:
                r.be64(f"the address of RAM block {name!r}")
            if length > total:
                raise StreamError(
                    r.pos - 8,
                    f"RAM block {name!r} is {length:#x} bytes, more than the {total:#x} "
                    "the RAM_SAVE_FLAG_MEM_SIZE record has left",
                )
            self.p.ram_blocks[name] = length
            total -= length

    def _block(self, r: Reader, at: int, flags: int) -> str:
        if flags & RAM_CONTINUE:
            if self.block is None:
                raise StreamError(at, "RAM_SAVE_FLAG_CONTINUE before any page named its block")
            return self.block
        name = r.name("a RAM block's name")
        if name not in self.p.ram_blocks:
            raise StreamError(at + 8, f"RAM page for block {name!r}, which the RAM size list lacks")
        self.block = name
        return name
