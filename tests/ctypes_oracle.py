"""Layout oracle: what gcc makes of a C type, read back through gdb's Python API.

``c_layouts(source, names)`` compiles ``source`` with ``gcc -g`` and returns,
for each C type name, a tree of fields (name, offset, size, bit size, kind,
members or array element). ``compare(cls, layout)`` lists every difference
between a ctypes mirror and that tree. Nothing here holds an expected
number: the compiler is the only source of truth.
"""

from __future__ import annotations

import ctypes
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

_GDB_SCRIPT = r"""
import gdb, json

def layout(t):
    t = t.strip_typedefs()
    out = {"size": t.sizeof}
    if t.code in (gdb.TYPE_CODE_STRUCT, gdb.TYPE_CODE_UNION):
        out["kind"] = "union" if t.code == gdb.TYPE_CODE_UNION else "struct"
        out["fields"] = [
            dict(name=f.name, offset=f.bitpos // 8, bitpos=f.bitpos, bitsize=f.bitsize,
                 type=layout(f.type))
            for f in t.fields()
        ]
    elif t.code == gdb.TYPE_CODE_ARRAY:
        low, high = t.range()
        out["kind"] = "array"
        out["count"] = high - low + 1
        out["elem"] = layout(t.target())
    else:
        out["kind"] = "scalar"
    return out

result = {}
for name in NAMES:
    result[name] = layout(gdb.lookup_type(name))
print("ORACLE-JSON " + json.dumps(result))
"""


def tools_missing() -> str | None:
    """Why the oracle cannot run here, or None."""
    for tool in ("gcc", "gdb"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install gcc gdb)"
    return None


def c_layouts(source: str, names: list[str], workdir: Path) -> dict[str, Any]:
    """Compile ``source`` and return gdb's layout of each type in ``names``."""
    c_file = workdir / "oracle.c"
    obj = workdir / "oracle.o"
    c_file.write_text(source)
    subprocess.run(
        [
            "gcc",
            "-g",
            "-O0",
            "-fno-eliminate-unused-debug-types",
            "-c",
            str(c_file),
            "-o",
            str(obj),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    script = workdir / "oracle_gdb.py"
    script.write_text(f"NAMES = {json.dumps(names)}\n{_GDB_SCRIPT}")
    proc = subprocess.run(
        ["gdb", "-batch", "-nx", "-ex", f"source {script}", str(obj)],
        check=True,
        capture_output=True,
        text=True,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("ORACLE-JSON "):
            return json.loads(line[len("ORACLE-JSON ") :])  # type: ignore[no-any-return]
    raise RuntimeError(f"gdb printed no layout:\n{proc.stdout}\n{proc.stderr}")


def _flatten_c(fields: list[dict[str, Any]], base: int = 0) -> dict[str, dict[str, Any]]:
    """Members by name; anonymous struct/union members are lifted into the parent."""
    out: dict[str, dict[str, Any]] = {}
    for f in fields:
        offset = base + f["offset"]
        if not f["name"]:
            out.update(_flatten_c(f["type"].get("fields", []), offset))
        elif not f["name"].startswith("__empty_"):  # __DECLARE_FLEX_ARRAY's filler
            out[f["name"]] = {**f, "offset": offset}
    return out


def _flatten_py(cls: type[Any], base: int = 0) -> dict[str, tuple[int, int, Any]]:
    """ctypes fields by name -> (offset, size, type); ``_anonymous_`` ones are lifted."""
    out: dict[str, tuple[int, int, Any]] = {}
    anonymous = set()
    for klass in reversed(cls.__mro__):
        anonymous |= set(klass.__dict__.get("_anonymous_", ()))
    for klass in reversed(cls.__mro__):
        for entry in klass.__dict__.get("_fields_", ()):
            name, ftype = entry[0], entry[1]
            desc = getattr(cls, name)
            offset = base + desc.offset
            if name in anonymous:
                out.update(_flatten_py(ftype, offset))
            else:
                out[name] = (offset, desc.size, ftype)
    return out


def compare(
    cls: type[Any],
    layout: dict[str, Any],
    *,
    path: str = "",
    partial: frozenset[str] = frozenset(),
    extra: frozenset[str] = frozenset(),
    omitted: frozenset[str] = frozenset(),
) -> list[str]:
    """Differences between mirror ``cls`` and C ``layout``; empty when they agree.

    ``partial``: mirror class names that cover only part of the C type
    (only their own fields are checked). ``extra``: dotted paths of mirror
    fields the C type lacks on purpose (newer kernels). ``omitted``: dotted
    paths (mirror class name, C member) of C members left unmirrored on
    purpose, such as other architectures' exits in ``kvm_run``; the rest of
    the type, its size included, is checked as usual. A mirror field named
    ``_pad*`` names implicit C padding: it must lie inside the C type and
    overlap no C member.
    """
    path = path or cls.__name__
    problems: list[str] = []
    is_partial = cls.__name__ in partial
    size = ctypes.sizeof(cls)
    # A C type ending in a zero-size member (flexible array) is larger in the mirror.
    flex_tail = any(
        f["type"]["size"] == 0 and f["offset"] == layout["size"] for f in layout.get("fields", [])
    )
    # So is one with fields newer than the header (checked to fit the C padding elsewhere).
    grown = flex_tail or any(e.startswith(f"{cls.__name__}.") for e in extra)
    if not is_partial and size != layout["size"] and not (grown and size > layout["size"]):
        problems.append(f"{path}: sizeof {size} != C {layout['size']}")
    c_fields = _flatten_c(layout.get("fields", []))
    py_fields = _flatten_py(cls)
    for name, (offset, size, ftype) in py_fields.items():
        where = f"{path}.{name}"
        c = c_fields.get(name)
        if c is None:
            if name.startswith("_pad"):
                problems.extend(_check_padding(offset, size, layout, c_fields, where))
            elif f"{cls.__name__}.{name}" not in extra:
                problems.append(f"{where}: not in the C type")
            continue
        if offset != c["offset"]:
            problems.append(f"{where}: offset {offset} != C {c['offset']}")
        problems.extend(_compare_type(ftype, size, c, where, partial, extra, omitted))
    if not is_partial:
        for name in sorted(c_fields.keys() - py_fields.keys()):
            if f"{cls.__name__}.{name}" not in omitted:
                problems.append(f"{path}.{name}: in C but not mirrored")
    return problems


def _check_padding(
    offset: int, size: int, layout: dict[str, Any], c_fields: dict[str, Any], where: str
) -> list[str]:
    """A ``_pad*`` mirror field: bytes of the C type that no C member covers."""
    if offset + size > layout["size"]:
        return [f"{where}: padding at {offset}+{size} runs past the C size {layout['size']}"]
    for name, c in c_fields.items():
        if c["offset"] < offset + size and offset < c["offset"] + c["type"]["size"]:
            return [f"{where}: padding at {offset}+{size} overlaps C member {name}"]
    return []


def _compare_type(
    ftype: Any,
    size: int,
    c: dict[str, Any],
    where: str,
    partial: frozenset[str],
    extra: frozenset[str],
    omitted: frozenset[str] = frozenset(),
) -> list[str]:
    ctype = c["type"]
    if c.get("bitsize"):
        bits = size >> 16
        if bits != c["bitsize"]:
            return [f"{where}: {bits} bits != C {c['bitsize']}"]
        return []
    if ctype["size"] == 0 and ctype["kind"] == "array":
        # A C flexible or zero-length array: the mirror sizes it; the element must match.
        elem = ctype["elem"]
        item = ftype._type_ if issubclass(ftype, ctypes.Array) else ftype
        if elem["kind"] in ("struct", "union"):
            return compare(item, elem, path=where, partial=partial, extra=extra, omitted=omitted)
        if ctypes.sizeof(item) != elem["size"]:
            return [f"{where}: element size {ctypes.sizeof(item)} != C {elem['size']}"]
        return []
    if ctype["kind"] in ("struct", "union"):
        if ctype["size"] == 0:  # C zero-size union of zero-length arrays (kvm_nested_state.data)
            problems = []
            members = _flatten_c(ctype["fields"])
            for name, (_, sub_size, sub_type) in _flatten_py(ftype).items():
                if name not in members:
                    problems.append(f"{where}.{name}: not in the C type")
                else:
                    problems.extend(
                        _compare_type(
                            sub_type,
                            sub_size,
                            members[name],
                            f"{where}.{name}",
                            partial,
                            extra,
                            omitted,
                        )
                    )
            return problems
        return compare(ftype, ctype, path=where, partial=partial, extra=extra, omitted=omitted)
    if size != ctype["size"]:
        return [f"{where}: size {size} != C {ctype['size']}"]
    if ctype["kind"] == "array":
        if not issubclass(ftype, ctypes.Array):
            return [f"{where}: C array, mirror is {ftype.__name__}"]
        if ftype._length_ != ctype["count"]:
            return [f"{where}: {ftype._length_} elements != C {ctype['count']}"]
        elem = ctype["elem"]
        if elem["kind"] in ("struct", "union"):
            return compare(
                ftype._type_, elem, path=f"{where}[]", partial=partial, extra=extra, omitted=omitted
            )
    return []


def c_constants(header: str, names: list[str], workdir: Path) -> dict[str, int | None]:
    """Values of preprocessor constants, as the compiler sees them (None: not defined)."""
    lines = [header, "#include <stdio.h>", "int main(void) {"]
    for name in names:
        lines += [
            f"#ifdef {name}",
            f'  printf("{name} %llu\\n", (unsigned long long)({name}));',
            "#else",
            f'  printf("{name} -\\n");',
            "#endif",
        ]
    lines += ["  return 0;", "}"]
    src = workdir / "constants.c"
    exe = workdir / "constants"
    src.write_text("\n".join(lines) + "\n")
    subprocess.run(["gcc", "-o", str(exe), str(src)], check=True, capture_output=True, text=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    values: dict[str, int | None] = {}
    for line in out.splitlines():
        name, value = line.split()
        values[name] = None if value == "-" else int(value)
    return values
