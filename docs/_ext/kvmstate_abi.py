"""Sphinx extension: byte maps, field tables and CLI help generated from kvmstate itself.

Nothing here holds an offset: every number comes from the ctypes mirrors
(``CField.offset``/``size``, ``ctypes.sizeof``) when the docs are built, so
the pages cannot drift from the code that talks to the kernel.

Directives (usable from MyST as ```` ```{abi-table} kvmstate.uapi.kvm_nested_state_header ````):

``abi-table CLASS``
    One row per field, nested structures and unions expanded: offset, size,
    C type, dotted name, notes. ``:base: N`` adds a column of offsets in the
    nested-state blob (N + offset); ``:only: PREFIX`` keeps the rows under
    one field; ``:depth: N`` stops expanding below N levels.
``abi-grid CLASS``
    An SVG picture, eight bytes per row, one picture per ``:views:`` entry
    (``vmx=hdr.vmx svm=hdr.svm``: which union member to draw).
``abi-layout``
    An SVG of the whole ``kvm_nested_state`` for each format: header and
    data pages, with their offsets.
``kvmstate-cli-help``
    ``kvmstate --help`` and every subcommand's help, from the real parser.

Mirror classes and enums in the API reference also get a generated field or
member table (the ``autodoc-process-docstring`` hook).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import enum
import html
import importlib
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

__all__ = [
    "Row",
    "cli_help",
    "ctype_name",
    "grid_svg",
    "layout_segments",
    "layout_svg",
    "rows",
    "setup",
]

_SCALARS: dict[Any, str] = {
    ctypes.c_uint8: "u8",
    ctypes.c_uint16: "u16",
    ctypes.c_uint32: "u32",
    ctypes.c_uint64: "u64",
    ctypes.c_int8: "s8",
    ctypes.c_int16: "s16",
    ctypes.c_int32: "s32",
    ctypes.c_int64: "s64",
    ctypes.c_char: "char",
}


@dataclass(frozen=True)
class Row:
    """One field of a mirror, at its place in the outermost structure."""

    path: str  #: dotted name from the outermost structure (``hdr.svm.vmcb_pa``)
    offset: int  #: byte offset from the start of the outermost structure
    size: int  #: bytes the field's storage unit covers
    ctype: str  #: C-like type: ``u64``, ``u8[120]``, ``struct vmcb_seg``, ``union ...``
    depth: int  #: 0 for a top-level field
    container: bool  #: a structure or union whose fields follow as rows
    bits: tuple[int, int] | None = None  #: (first bit, bit count) for a bit field
    note: str = ""
    hidden: bool = False  #: reserved or padding (hidden in the mirror's repr)


def ctype_name(ctype: Any) -> str:
    """A C-like name for a ctypes type: ``u32``, ``u8[8][16]``, ``struct kvm_segment``."""
    dims = []
    while isinstance(ctype, type) and issubclass(ctype, ctypes.Array):
        dims.append(ctype._length_)
        ctype = ctype._type_
    if ctype in _SCALARS:
        base = _SCALARS[ctype]
    elif isinstance(ctype, type) and issubclass(ctype, ctypes.Union):
        base = f"union {ctype.__name__}"
    elif isinstance(ctype, type) and issubclass(ctype, ctypes.Structure):
        base = f"struct {ctype.__name__}"
    else:
        base = getattr(ctype, "__name__", repr(ctype))
    return base + "".join(f"[{d}]" for d in dims)


def _fields(cls: type) -> Iterator[tuple[str, Any, int | None]]:
    """``(name, ctype, bit width)`` in layout order, the base classes' fields first."""
    for klass in reversed(cls.__mro__):
        for entry in klass.__dict__.get("_fields_", ()):
            yield entry[0], entry[1], entry[2] if len(entry) > 2 else None


def _bit_position(descriptor: Any, width: int) -> int:
    """The first bit of a bit field, from its ctypes descriptor."""
    if hasattr(descriptor, "bit_offset"):  # Python 3.14 names it
        return int(descriptor.bit_offset)
    return int(descriptor.size) & 0xFFFF  # before: (width << 16) | first bit


def _is_aggregate(ctype: Any) -> bool:
    return isinstance(ctype, type) and issubclass(ctype, (ctypes.Structure, ctypes.Union))


def _note(cls: type, name: str) -> str:
    """What the library knows about one field: flag decoding, kernel versions, reserved."""
    from kvmstate import uapi, vmcb, vmcs12
    from kvmstate._struct import flag_kind

    parts = []
    key = (cls.__name__, name)
    if key in uapi.NEWER_FIELDS:
        # The description opens with the release that brought the field ("Linux 7.2: ...").
        release = uapi.NEWER_FIELDS[key].split(":")[0]
        parts.append(f"new in {release}: not in the 6.1 or 6.12 header, which leave it 0")
    if cls is vmcs12.vmcs12 and name in vmcs12.NEWER_FIELDS:
        parts.append("6.18 (CET); zero before")
    if key in vmcb.LINUX_6_1_NAMES:
        parts.append(f"6.1 name: {vmcb.LINUX_6_1_NAMES[key]}")
    if key in vmcb.LINUX_6_1_SIZES:
        parts.append(f"{vmcb.LINUX_6_1_SIZES[key] * 8}-bit in 6.1")
    kind = flag_kind(cls, name)
    if kind is not None:
        parts.append(f"decoded as {kind.__name__}")
    if name in getattr(cls, "_hidden_", frozenset()):
        parts.append("reserved/padding: hidden in repr")
    return "; ".join(parts)


def rows(cls: type, *, depth: int | None = None, _base: int = 0, _prefix: str = "") -> list[Row]:
    """Every field of ``cls`` as a :class:`Row`, nested structures and unions expanded."""
    out: list[Row] = []
    level = _prefix.count(".")
    for name, ctype, width in _fields(cls):
        descriptor = getattr(cls, name)
        offset = _base + int(descriptor.offset)
        path = _prefix + name
        bits = None
        if width is not None:
            bits = (_bit_position(descriptor, width), width)
        expand = _is_aggregate(ctype) and (depth is None or level < depth)
        out.append(
            Row(
                path=path,
                offset=offset,
                size=ctypes.sizeof(ctype),
                ctype=ctype_name(ctype),
                depth=level,
                container=expand,
                bits=bits,
                note=_note(cls, name),
                hidden=name in getattr(cls, "_hidden_", frozenset()),
            )
        )
        if expand:
            out.extend(rows(ctype, depth=depth, _base=offset, _prefix=path + "."))
    return out


def _import(dotted: str) -> Any:
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


# --- tables ---------------------------------------------------------------------------


def _table(header: list[str], body: list[list[nodes.Node]], widths: list[int]) -> nodes.table:
    table = nodes.table(classes=["kvmstate-abi"])
    group = nodes.tgroup(cols=len(header))
    table += group
    for width in widths:
        group += nodes.colspec(colwidth=width)
    head = nodes.thead()
    group += head
    row = nodes.row()
    for text in header:
        row += nodes.entry("", nodes.paragraph("", text))
    head += row
    tbody = nodes.tbody()
    group += tbody
    for cells in body:
        row = nodes.row()
        for cell in cells:
            row += nodes.entry("", nodes.paragraph("", "", cell))
        tbody += row
    return table


def _size_text(row: Row) -> str:
    if row.bits is not None:
        first, width = row.bits
        return f"bits {first}-{first + width - 1}" if width > 1 else f"bit {first}"
    return str(row.size)


def table_cells(selected: list[Row], base: int | None) -> tuple[list[str], list[list[nodes.Node]]]:
    """Header and cells of an ``abi-table`` (offsets in hex, sizes in bytes).

    The field's name comes right after its offsets, so that a narrow window
    shows it before the table has to scroll.
    """
    header = ["Offset", "Field", "Size", "Type", "Notes"]
    if base is not None:
        header.insert(1, "In blob")
    body = []
    for row in selected:
        indent = "\u00a0\u00a0\u00a0" * row.depth
        name = row.path.rsplit(".", 1)[-1]
        cells: list[nodes.Node] = [
            nodes.literal("", f"{row.offset:#05x}"),
            nodes.inline("", "", nodes.Text(indent), nodes.literal("", name)),
            nodes.Text(_size_text(row)),
            nodes.Text(row.ctype),
            nodes.Text(row.note),
        ]
        if base is not None:
            cells.insert(1, nodes.literal("", f"{base + row.offset:#06x}"))
        body.append(cells)
    return header, body


class AbiTable(SphinxDirective):
    """``abi-table CLASS``: the field table of a mirror."""

    required_arguments = 1
    option_spec = {
        "base": directives.nonnegative_int,
        "only": directives.unchanged,
        "depth": directives.nonnegative_int,
    }

    def run(self) -> list[nodes.Node]:
        cls = _import(self.arguments[0])
        selected = rows(cls, depth=self.options.get("depth"))
        only = self.options.get("only")
        if only:
            selected = [r for r in selected if r.path == only or r.path.startswith(only + ".")]
            if not selected:
                raise self.error(f"{cls.__name__} has no field {only!r}")
        base = self.options.get("base")
        header, body = table_cells(selected, base)
        widths = [8, 26, 6, 14, 30] if base is None else [8, 8, 26, 6, 14, 30]
        table = _table(header, body, widths)
        caption = nodes.paragraph(
            "",
            "",
            nodes.strong("", f"{ctype_name(cls)}"),
            nodes.Text(f": {ctypes.sizeof(cls)} bytes, generated from "),
            nodes.literal("", self.arguments[0]),
        )
        return [caption, table]


# --- pictures -------------------------------------------------------------------------

_COLOURS = ("#cfe2f3", "#d9ead3", "#fff2cc", "#f4cccc", "#d9d2e9", "#fce5cd")
_GREY = "#eeeeee"
_FONT = "font-family:monospace;font-size:11px"


def _leaves(cls: type, view: dict[str, str]) -> list[Row]:
    """Leaf fields to draw, reserved and padding ones included (``Row.hidden``), each
    union reduced to the member ``view`` picks (``{"hdr": "hdr.vmx"}``), or to none."""
    all_rows = rows(cls)
    unions = {r.path for r in all_rows if r.container and r.ctype.startswith("union ")}
    out = []
    for row in all_rows:
        parts = row.path.split(".")
        chosen = all(
            view.get(".".join(parts[:i])) == ".".join(parts[: i + 1])
            for i in range(1, len(parts))
            if ".".join(parts[:i]) in unions
        )
        if chosen and not row.container:
            out.append(row)
    return out


def grid_svg(cls: type, view: dict[str, str], title: str, per_row: int = 8) -> str:
    """An SVG byte grid of ``cls``: ``per_row`` bytes a line, one box per field.

    Reserved and padding fields (hidden in reprs) are dashed boxes with their
    name; only bytes that no field of the view covers (the rest of a union
    whose other member is drawn) are grey, labelled with the union.
    """
    size = ctypes.sizeof(cls)
    cell, height, left, top = 64, 22, 56, 34
    lines = (size + per_row - 1) // per_row
    width = left + per_row * cell + 2
    total_height = top + lines * height + 4
    # A viewBox lets the page's CSS scale the picture down with a narrow column.
    svg = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{total_height}" '
        f'viewBox="0 0 {width} {total_height}" role="img" aria-label="{html.escape(title)}">',
        f'<text x="0" y="14" style="{_FONT};font-weight:bold">{html.escape(title)}</text>',
    ]
    for b in range(per_row):
        x = left + b * cell + cell / 2
        svg.append(f'<text x="{x}" y="{top - 6}" text-anchor="middle" style="{_FONT}">+{b}</text>')
    for line in range(lines):
        y = top + line * height + 15
        svg.append(f'<text x="0" y="{y}" style="{_FONT}">{line * per_row:#06x}</text>')
    covered = [False] * size
    members = tuple(m + "." for m in view.values())
    shown_fields = [r for r in _leaves(cls, view) if not r.hidden]
    for row in _leaves(cls, view):
        colour = "#ffffff" if row.hidden else _COLOURS[shown_fields.index(row) % len(_COLOURS)]
        dash = ' stroke-dasharray="4 3"' if row.hidden else ""
        label = row.path
        for member in members:
            label = label.removeprefix(member)
        first = True
        start, end = row.offset, row.offset + row.size
        for b in range(start, end):
            covered[b] = True
        pos = start
        while pos < end:
            line, col = divmod(pos, per_row)
            run = min(end - pos, per_row - col)
            x, y = left + col * cell, top + line * height
            svg.append(
                f'<rect x="{x}" y="{y}" width="{run * cell}" height="{height}" '
                f'fill="{colour}" stroke="#555"{dash}/>'
            )
            if first or run * cell >= 120:
                text = label if first else f"({label})"
                shown = text if len(text) * 7 <= run * cell - 4 else text[: max(1, run * 9 - 2)]
                style = _FONT + (";fill:#555;font-style:italic" if row.hidden else "")
                svg.append(
                    f'<text x="{x + run * cell / 2}" y="{y + 15}" text-anchor="middle" '
                    f'style="{style}"><title>{html.escape(row.path)}: {row.ctype} at '
                    f"{row.offset:#x}</title>{html.escape(shown)}</text>"
                )
            first = False
            pos += run
    unions = [r for r in rows(cls) if r.container and r.ctype.startswith("union ")]
    labelled: set[str] = set()
    pos = 0
    while pos < size:
        if covered[pos]:
            pos += 1
            continue
        line, col = divmod(pos, per_row)
        run = 1
        while col + run < per_row and pos + run < size and not covered[pos + run]:
            run += 1
        x, y = left + col * cell, top + line * height
        svg.append(
            f'<rect x="{x}" y="{y}" width="{run * cell}" height="{height}" '
            f'fill="{_GREY}" stroke="#bbb"/>'
        )
        owner = next((u for u in unions if u.offset <= pos < u.offset + u.size), None)
        if owner is not None and owner.path not in labelled and run * cell >= 240:
            labelled.add(owner.path)
            text = f"rest of {owner.path} ({owner.size}-byte union): no field"
            svg.append(
                f'<text x="{x + run * cell / 2}" y="{y + 15}" text-anchor="middle" '
                f'style="{_FONT};fill:#666">{html.escape(text)}</text>'
            )
        pos += run
    svg.append("</svg>")
    return "\n".join(svg)


@dataclass(frozen=True)
class Segment:
    """One region of a nested-state blob in the layout picture."""

    name: str
    start: int
    end: int
    colour: str
    padding: bool = False  #: a reserved or padding field: drawn dashed, like the grids'


def layout_segments() -> dict[str, list[Segment]]:
    """The regions of a VMX and an SVM nested state, offsets from the mirrors."""
    from kvmstate import uapi, vmcb, vmcs12

    data = uapi.kvm_nested_state.data.offset
    vmx_data = uapi.kvm_vmx_nested_state_data
    vmx = [Segment("header", 0, data, _COLOURS[0])]
    for i, name in enumerate(("vmcs12", "shadow_vmcs12")):
        field = getattr(vmx_data, name)
        start = data + field.offset
        vmx.append(Segment(name, start, start + field.size, _COLOURS[1 + i]))
    assert vmx[-1].end == ctypes.sizeof(uapi.kvm_nested_state)
    assert ctypes.sizeof(vmcs12.vmcs12) == vmx_data.vmcs12.size
    page = data + uapi.kvm_svm_nested_state_data.vmcb12.offset
    save = page + vmcb.vmcb.save.offset
    save_end = save + ctypes.sizeof(vmcb.vmcb_save_area)
    # The mirror's padding after the save area, to the end of the page (zero in a blob).
    rest = vmcb.vmcb._fields_[-1][0]
    assert page + getattr(vmcb.vmcb, rest).offset == save_end
    svm = [
        Segment("header", 0, data, _COLOURS[0]),
        Segment("vmcb12.control", page, page + vmcb.vmcb.control.size, _COLOURS[3]),
        Segment("vmcb12.save", save, save_end, _COLOURS[4]),
        Segment(f"vmcb12.{rest}", save_end, page + ctypes.sizeof(vmcb.vmcb), "#ffffff", True),
    ]
    return {"VMX (format 0)": vmx, "SVM (format 1)": svm}


def layout_svg() -> str:
    """Both formats as bars to one scale (the header drawn wider than its share)."""
    layouts = layout_segments()
    total = max(s[-1].end for s in layouts.values())
    left, width, minimum, bar, gap = 120, 640, 64, 30, 78
    svg_height = 24 + len(layouts) * (bar + gap)
    svg_width = left + width + 60
    svg = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{svg_width}" height="{svg_height}" '
        f'viewBox="0 0 {svg_width} {svg_height}" role="img" '
        'aria-label="kvm_nested_state layouts">'
    ]
    for i, (title, segments) in enumerate(layouts.items()):
        y = 24 + i * (bar + gap)
        svg.append(f'<text x="0" y="{y + 19}" style="{_FONT};font-weight:bold">{title}</text>')
        scale = (width - minimum) / (total - segments[0].end)
        x = float(left)
        groups: dict[str, list[float]] = {}
        for seg in segments:
            w = minimum if seg.start == 0 else (seg.end - seg.start) * scale
            group, _, short = seg.name.rpartition(".")
            if group:
                span = groups.setdefault(group, [x, x])
                span[1] = x + w
            dash = ' stroke-dasharray="4 3"' if seg.padding else ""
            svg.append(
                f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{bar}" '
                f'fill="{seg.colour}" stroke="#555"{dash}><title>{seg.name}: {seg.start:#x}-'
                f"{seg.end:#x} ({seg.end - seg.start} bytes)</title></rect>"
            )
            if w >= 7 * len(short) + 4:
                style = _FONT + (";fill:#555;font-style:italic" if seg.padding else "")
                svg.append(
                    f'<text x="{x + w / 2:.1f}" y="{y + 19}" text-anchor="middle" '
                    f'style="{style}">{html.escape(short)}</text>'
                )
            svg.append(
                f'<text x="{x + 2:.1f}" y="{y + bar + 14}" style="{_FONT}">{seg.start:#x}</text>'
            )
            x += w
        svg.append(
            f'<text x="{x - 2:.1f}" y="{y + bar + 28}" text-anchor="end" '
            f'style="{_FONT}">{segments[-1].end:#x} = {segments[-1].end}</text>'
        )
        for group, (x0, x1) in groups.items():
            svg.append(
                f'<path d="M{x0:.1f},{y - 2} v-5 H{x1:.1f} v5" fill="none" stroke="#555"/>'
                f'<text x="{(x0 + x1) / 2:.1f}" y="{y - 10}" text-anchor="middle" '
                f'style="{_FONT}">{html.escape(group)} (one page)</text>'
            )
    svg.append("</svg>")
    return "\n".join(svg)


def _figure(svg: str, caption: str) -> list[nodes.Node]:
    # Inline SVG: HTML only; other builders keep the caption and the tables.
    figcaption = f"<figcaption>{html.escape(caption)}</figcaption>"
    body = f'<figure class="kvmstate-abi">{svg}{figcaption}</figure>'
    return [nodes.raw("", body, format="html")]


class AbiGrid(SphinxDirective):
    """``abi-grid CLASS`` with ``:views: vmx=hdr.vmx svm=hdr.svm``: one picture per view."""

    required_arguments = 1
    option_spec = {"views": directives.unchanged}

    def run(self) -> list[nodes.Node]:
        cls = _import(self.arguments[0])
        views: list[tuple[str, dict[str, str]]] = []
        for item in (self.options.get("views") or "").split():
            label, _, member = item.partition("=")
            owner = member.rpartition(".")[0]
            views.append((label, {owner: member}))
        out: list[nodes.Node] = []
        for label, view in views or [("", {})]:
            title = f"{cls.__name__}" + (f", {label} view" if label else "")
            out += _figure(grid_svg(cls, view, title), f"{title}: generated from the mirror")
        return out


class AbiLayout(SphinxDirective):
    """``abi-layout``: the VMX and SVM nested-state blobs, region by region."""

    def run(self) -> list[nodes.Node]:
        return _figure(layout_svg(), "kvm_nested_state, both formats, offsets from the mirrors")


# --- the command line --------------------------------------------------------------------


@contextlib.contextmanager
def _plain_terminal() -> Iterator[None]:
    """Fixed width and no colour, so that argparse's help is the same on every machine."""
    saved = {k: os.environ.get(k) for k in ("COLUMNS", "NO_COLOR")}
    os.environ["COLUMNS"], os.environ["NO_COLOR"] = "88", "1"
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def cli_help() -> list[tuple[str, str]]:
    """``(command line, help text)`` for ``kvmstate`` and each subcommand."""
    import argparse

    from kvmstate import cli

    with _plain_terminal():
        parser = cli._parser()
        out = [("kvmstate --help", parser.format_help())]
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    out.append((f"kvmstate {name} --help", sub.format_help()))
    return out


class CliHelp(SphinxDirective):
    """``kvmstate-cli-help``: every ``--help`` text of the command, from its parser."""

    def run(self) -> list[nodes.Node]:
        out: list[nodes.Node] = []
        for command, text in cli_help():
            block = nodes.literal_block(
                "", f"$ {command}\n{text}", language="text", classes=["kvmstate-cli"]
            )
            out.append(block)
        return out


# --- API reference: generated field and member tables ----------------------------------


def _process_docstring(
    app: Sphinx, what: str, name: str, obj: Any, options: Any, lines: list[str]
) -> None:
    """Append a mirror's field table, an enum's members, or a module's constants."""
    if what == "module":
        lines += _constants(name, obj)
        return
    if what != "class" or not isinstance(obj, type):
        return
    from kvmstate._struct import Mirror

    if issubclass(obj, Mirror) and hasattr(obj, "_fields_"):
        top = [r for r in rows(obj, depth=0)]
        if not top:
            return
        lines += ["", f"Layout ({ctypes.sizeof(obj)} bytes, from the mirror):", ""]
        lines += [".. list-table::", "   :header-rows: 1", "", "   * - Offset", "     - Size"]
        lines += ["     - Type", "     - Field"]
        for r in top:
            lines += [
                f"   * - ``{r.offset:#05x}``",
                f"     - {_size_text(r)}",
                f"     - {r.ctype}",
                f"     - ``{r.path}``",
            ]
        lines.append("")
    elif issubclass(obj, enum.Enum) and issubclass(obj, int) and len(obj.__members__):
        # The members' one listing (autodoc's own is skipped in _skip_member), in hex
        # because most are bit flags or kernel codes.
        lines += ["", "Members:", "", ".. list-table::", "   :header-rows: 1", ""]
        lines += ["   * - Name", "     - Value"]
        for n, m in obj.__members__.items():
            lines += [f"   * - ``{n}``", f"     - ``{int(m):#x}``"]
        lines.append("")


def _constants(name: str, module: Any) -> list[str]:
    """A table of the integer constants a module exports without a doc comment.

    autodoc lists only module data that has a ``#:`` comment; the kernel's
    constants (``KVM_STATE_NESTED_GUEST_MODE``, ``INTERCEPT_VMRUN``, the
    ioctl numbers) are documented by their kernel names and values instead.
    """
    from sphinx.pycode import ModuleAnalyzer

    if not name.startswith("kvmstate."):
        return []
    try:
        documented = {attr for (cls, attr) in ModuleAnalyzer.for_module(name).find_attr_docs()}
    except Exception:  # no source: list them all
        documented = set()
    values = []
    for attr in getattr(module, "__all__", ()):
        value = getattr(module, attr, None)
        if attr in documented or isinstance(value, (bool, enum.Enum)) or type(value) is not int:
            continue
        values.append((attr, value))
    if not values:
        return []
    out = ["", "Constants (kernel names, values from the module):", ""]
    out += [".. list-table::", "   :header-rows: 1", "", "   * - Name", "     - Value"]
    for attr, value in values:
        shown = f"{value:#x}" if value >= 10 else str(value)
        if value < 0:
            shown = str(value)
        out += [f"   * - ``{attr}``", f"     - ``{shown}``"]
    return [*out, ""]


def _skip_member(app: Sphinx, what: str, name: str, obj: Any, skip: bool, options: Any) -> Any:
    """ctypes field descriptors and int enum members are listed in the generated
    layout and member tables, not one by one."""
    if type(obj).__name__ == "CField":
        return True
    if what == "class" and isinstance(obj, enum.Enum) and isinstance(obj, int):
        return True
    return None


def _resolve_short_name(app: Sphinx, env: Any, node: Any, contnode: Any) -> Any:
    """Link ``:class:`Vcpu``` and the like to the one documented kvmstate object of that name.

    Docstrings name classes of other modules without their module
    (``KvmError`` in vcpu.py); Python's domain does not search for them.
    Only a name that matches exactly one object, preferring the current
    module's, is linked; anything else stays plain text, as before.
    """
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "").lstrip(".~")
    if not target or target.startswith("kvmstate."):
        return None
    domain = env.get_domain("py")
    # A re-exported class is one object under two names (``kvmstate.Vcpu`` and its
    # canonical ``kvmstate.vcpu.Vcpu``): the alias is not a second match.
    found = [
        n
        for n, entry in domain.objects.items()
        if n.startswith("kvmstate.") and n.endswith("." + target) and not entry.aliased
    ]
    module = node.get("py:module") or ""
    local = [n for n in found if module and n.startswith(module + ".")]
    if len(local) == 1:
        found = local
    if len(found) != 1:
        return None
    from sphinx.util.nodes import make_refnode

    entry = domain.objects[found[0]]
    return make_refnode(
        app.builder, node["refdoc"], entry.docname, entry.node_id, contnode, found[0]
    )


def _dataclass_fields_once(app: Sphinx, domain: str, objtype: str, content: Any) -> None:
    """A dataclass's fields are listed once, as its attributes (with type and
    default): drop the "Parameters" list autodoc would make of the same names
    from the generated ``__init__``. Runs before autodoc's own merge (priority)."""
    if domain != "py" or objtype not in ("class", "exception"):
        return
    signature = content.parent[0]
    fullname = f"{signature.get('module', '')}.{signature.get('fullname', '')}"
    obj: Any = sys.modules.get(signature.get("module", ""))
    for part in str(signature.get("fullname", "")).split("."):
        obj = getattr(obj, part, None)
    if isinstance(obj, type) and dataclasses.is_dataclass(obj):
        app.env.temp_data.get("annotations", {}).pop(fullname, None)


_DOCTEST_MARK = re.compile(r"^<!--\s*doctest:(?P<body>.*?)-->\s*$")
_MARK_TEXT = {
    "kvm": "Needs /dev/kvm.",
    "no-nested": "Output of a KVM without nested support.",
    "svm-guest": "Needs a KVM with nested SVM (run in the test suite's emulated AMD machine).",
}


def _show_doctest_marks(app: Sphinx, doctree: nodes.document) -> None:
    """Turn the pages' ``<!-- doctest: ... -->`` comments (read by tests/test_docs.py)
    into a visible note on the example they precede."""
    for raw in list(doctree.findall(nodes.raw)):
        match = _DOCTEST_MARK.match(raw.astext().strip())
        if match is None:
            continue
        words = match["body"].split()
        texts = [_MARK_TEXT[w] for w in words if w in _MARK_TEXT]
        texts += [f"Needs {w.partition('=')[2]}." for w in words if w.startswith("requires=")]
        note = nodes.paragraph("", "", nodes.emphasis("", " ".join(texts)))
        note["classes"].append("kvmstate-needs")
        raw.replace_self(note if texts else [])


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("abi-table", AbiTable)
    app.add_directive("abi-grid", AbiGrid)
    app.add_directive("abi-layout", AbiLayout)
    app.add_directive("kvmstate-cli-help", CliHelp)
    app.connect("autodoc-process-docstring", _process_docstring)
    app.connect("autodoc-skip-member", _skip_member)
    app.connect("missing-reference", _resolve_short_name)
    app.connect("doctree-read", _show_doctest_marks)
    app.connect("object-description-transform", _dataclass_fields_once, priority=400)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
