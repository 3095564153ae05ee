"""kvmstate.vmcs12 against the kernel's own sources.

The oracle is ``arch/x86/kvm/vmx/vmcs12.h`` as shipped in the Debian/Ubuntu
``linux-source-X.Y`` packages (/usr/src/linux-source-X.Y.tar.xz): its
``CHECK_OFFSET(field, offset)`` list, its ``#define``s, and the structure
itself compiled by gcc and read back by gdb. No offset or size is typed in
here. CI installs the packages with ``apt-get install linux-source-6.12
linux-source-6.1``; a missing tarball skips its version, with the reason.
"""

from __future__ import annotations

import ast
import ctypes
import enum
import json
import operator
import re
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from kvmstate import vmcs12 as m
from kvmstate.nested import HEADER_SIZE, NestedState
from kvmstate.uapi import NestedFormat

SRC = Path("/usr/src")
# The versions this module is written against; any other linux-source tarball is checked too.
WANTED = ("6.1", "6.12")
FOUND = sorted(p.name[len("linux-source-"):-len(".tar.xz")]
               for p in SRC.glob("linux-source-*.tar.xz"))
VERSIONS = sorted(set(WANTED) | set(FOUND), key=lambda v: tuple(int(x) for x in v.split(".")))
# The version the module's names follow (constants renamed later than it are not its concern).
REFERENCE = "6.12"

HEADERS = {
    "vmcs12": "arch/x86/kvm/vmx/vmcs12.h",
    "vmcs": "arch/x86/kvm/vmx/vmcs.h",
    "vmx": "arch/x86/include/asm/vmx.h",
    "vmxfeatures": "arch/x86/include/asm/vmxfeatures.h",
    "uapi_kvm": "arch/x86/include/uapi/asm/kvm.h",
}
CONTROL_PREFIXES = ("PIN_BASED_", "CPU_BASED_", "SECONDARY_EXEC_", "VM_EXIT_", "VM_ENTRY_")
OTHER_PREFIXES = ("GUEST_ACTIVITY_", "GUEST_INTR_STATE_")
# Flag/enum views and the constant prefix of their members.
VIEWS: dict[type[enum.IntEnum] | type[enum.IntFlag], str] = {
    m.PinBasedControls: "PIN_BASED_",
    m.CpuBasedControls: "CPU_BASED_",
    m.SecondaryExecControls: "SECONDARY_EXEC_",
    m.VmExitControls: "VM_EXIT_",
    m.VmEntryControls: "VM_ENTRY_",
    m.GuestInterruptibility: "GUEST_INTR_STATE_",
    m.GuestActivityState: "GUEST_ACTIVITY_",
}


# --- extracting the kernel sources ------------------------------------------------------


def _extract(tarball: Path, dest: Path) -> dict[str, str]:
    """The texts of HEADERS from one tarball (a single pass: xz cannot seek)."""
    wanted = {f"/{path}": key for key, path in HEADERS.items()}
    texts: dict[str, str] = {}
    if shutil.which("tar"):
        subprocess.run(
            ["tar", "-xJf", str(tarball), "-C", str(dest), "--wildcards",
             *(f"*{path}" for path in wanted)],
            capture_output=True, check=False,  # a header missing from an old tree is reported below
        )
        for path in dest.rglob("*.h"):
            for suffix, key in wanted.items():
                if path.as_posix().endswith(suffix):
                    texts[key] = path.read_text()
    else:
        with tarfile.open(tarball, "r|xz") as tar:
            for member in tar:
                found = [k for s, k in wanted.items() if member.name.endswith(s)]
                f = tar.extractfile(member) if found else None
                if f is not None:
                    texts[found[0]] = f.read().decode()
    return texts


@pytest.fixture(scope="session")
def kernel_sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    """version -> header key -> text, for every linux-source tarball present (in parallel)."""
    jobs = {v: (SRC / f"linux-source-{v}.tar.xz", tmp_path_factory.mktemp(f"linux-{v}"))
            for v in FOUND}
    with ThreadPoolExecutor() as pool:
        futures = {v: pool.submit(_extract, *args) for v, args in jobs.items()}
        return {v: f.result() for v, f in futures.items()}


@pytest.fixture(params=VERSIONS)
def source(request: pytest.FixtureRequest,
           kernel_sources: dict[str, dict[str, str]]) -> tuple[str, dict[str, str]]:
    version: str = request.param
    if version not in kernel_sources:
        pytest.skip(f"/usr/src/linux-source-{version}.tar.xz missing "
                    f"(apt-get install linux-source-{version})")
    texts = kernel_sources[version]
    missing = sorted(set(HEADERS) - set(texts))
    assert not missing, f"linux-source-{version} lacks {[HEADERS[k] for k in missing]}"
    return version, texts


# --- parsing ----------------------------------------------------------------------------


def _strip_comments(text: str) -> str:
    return re.sub(r"//[^\n]*", "", re.sub(r"/\*.*?\*/", "", text, flags=re.S))


def check_offsets(vmcs12_h: str) -> dict[str, int]:
    """``vmx_check_vmcs12_offsets()``: field -> pinned offset."""
    body = re.search(r"vmx_check_vmcs12_offsets\(void\)\s*\{(.*?)\n\}", vmcs12_h, re.S)
    assert body, "vmx_check_vmcs12_offsets() not found"
    pairs = re.findall(r"CHECK_OFFSET\(\s*(\w+)\s*,\s*(\d+)\s*\)", _strip_comments(body[1]))
    return {name: int(offset) for name, offset in pairs}


def defines(text: str) -> dict[str, str]:
    """One-line ``#define NAME value`` macros (no parameters), comments stripped."""
    out = {}
    for line in _strip_comments(text).splitlines():
        match = re.match(r"\s*#\s*define\s+(\w+)(?!\()\s+(.+?)\s*$", line)
        if match:
            out[match[1]] = match[2]
    return out


_OPS: dict[type, Callable[[int, int], int]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.BitAnd: operator.and_, ast.LShift: operator.lshift,
}


def _arith(expr: str) -> int:
    """Evaluate an integer expression of literals, + - * & << and parentheses."""
    def walk(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        raise ValueError(f"unsupported C expression: {expr!r}")
    return walk(ast.parse(expr.strip(), mode="eval").body)


def vmx_constants(texts: dict[str, str]) -> dict[str, int]:
    """Every integer-valued macro of asm/vmx.h, with VMCS_CONTROL_BIT() resolved."""
    vmx = defines(texts["vmx"])
    features = defines(texts["vmxfeatures"])
    # The one piece of macro semantics relied on below: check it is still what it was.
    body = re.sub(r"\s", "", _macro_body(texts["vmx"], "VMCS_CONTROL_BIT"))
    assert body == "BIT(VMX_FEATURE_##x&0x1f)", body
    out: dict[str, int] = {}
    for name, value in vmx.items():
        bit = re.fullmatch(r"VMCS_CONTROL_BIT\((\w+)\)", value)
        try:
            if bit:
                out[name] = 1 << (_arith(features[f"VMX_FEATURE_{bit[1]}"]) & 0x1F)
            else:
                out[name] = _arith(value)
        except (ValueError, SyntaxError, KeyError):
            continue  # not a plain number (BIT_ULL, casts, ...): not one of ours
    return out


def _macro_body(text: str, name: str) -> str:
    match = re.search(rf"#\s*define\s+{name}\(\w+\)\s+(.+)", _strip_comments(text))
    assert match, f"{name}() not defined"
    return match[1]


def resolve(texts: dict[str, str], name: str) -> int:
    """A #define of vmcs12.h, following one level of aliasing into the uapi header."""
    value = defines(texts["vmcs12"])[name]
    if re.fullmatch(r"[A-Za-z_]\w*", value):
        value = defines(texts["uapi_kvm"])[value]
    return _arith(value)


# --- the mirror -------------------------------------------------------------------------


def _bits(desc: Any) -> tuple[int, int] | None:
    """(bit offset, bit size) of a ctypes bitfield descriptor, None for a plain field."""
    if hasattr(desc, "is_bitfield"):  # Python 3.14+ descriptors say so directly
        return (desc.bit_offset, desc.bit_size) if desc.is_bitfield else None
    if desc.size >> 16:  # the older encoding: size holds (bits << 16) | offset
        return desc.size & 0xFFFF, desc.size >> 16
    return None


def mirror_fields(cls: type[ctypes.Structure]) -> dict[str, tuple[int, int]]:
    """name -> (offset, size) of a mirror's fields."""
    return {name: (getattr(cls, name).offset, ctypes.sizeof(ctype))
            for name, ctype, *_ in cls._fields_}


MIRROR = mirror_fields(m.vmcs12)
TAIL = "padding_tail"


# --- the CHECK_OFFSET oracle ------------------------------------------------------------


def test_check_offsets(source: tuple[str, dict[str, str]]) -> None:
    version, texts = source
    pinned = check_offsets(texts["vmcs12"])
    assert len(pinned) > 100, f"{version}: only {len(pinned)} CHECK_OFFSETs parsed"
    problems = [f"{name}: not mirrored" for name in pinned if name not in MIRROR]
    problems += [f"{name}: mirror at {MIRROR[name][0]}, {version} pins {offset}"
                 for name, offset in pinned.items()
                 if name in MIRROR and MIRROR[name][0] != offset]
    assert problems == [], version


def test_newer_fields_are_not_in_reference_kernels(source: tuple[str, dict[str, str]]) -> None:
    version, texts = source
    if _vkey(version) > _vkey(REFERENCE):
        pytest.skip(f"{version} is newer than {REFERENCE}: NEWER_FIELDS may be in it")
    assert set(m.NEWER_FIELDS) & set(check_offsets(texts["vmcs12"])) == set()


def test_revision_and_size(source: tuple[str, dict[str, str]]) -> None:
    _, texts = source
    revision, size = resolve(texts, "VMCS12_REVISION"), resolve(texts, "VMCS12_SIZE")
    assert (revision, size) == (m.VMCS12_REVISION, m.VMCS12_SIZE)
    assert ctypes.sizeof(m.vmcs12) == size


def _vkey(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in version.split("."))


# --- gcc + gdb: every field's offset and size -------------------------------------------

_GDB = r"""
import gdb, json
def fields(t):
    return [dict(name=f.name, offset=f.bitpos // 8, bitpos=f.bitpos, bitsize=f.bitsize,
                 size=f.type.sizeof, sub=fields(f.type.strip_typedefs())
                 if f.type.strip_typedefs().code == gdb.TYPE_CODE_STRUCT else [])
            for f in t.fields()]
t = gdb.lookup_type("struct vmcs12")
print("LAYOUT " + json.dumps(dict(size=t.sizeof, fields=fields(t))))
"""


def _c_struct(text: str, pattern: str) -> str:
    match = re.search(pattern + r"\s*\{.*?\n\};", _strip_comments(text), re.S)
    assert match, f"{pattern} not found"
    return match[0]


def c_layout(texts: dict[str, str], workdir: Path) -> dict[str, Any]:
    """gcc compiles the kernel's struct vmcs12, gdb reads its layout back."""
    code = "\n".join([
        "typedef unsigned short u16;",
        "typedef unsigned int u32;",
        "typedef unsigned long long u64;",
        "typedef u64 natural_width;",
        "#define __packed __attribute__((__packed__))",
        _c_struct(texts["vmcs"], r"struct\s+vmcs_hdr"),
        _c_struct(texts["vmcs12"], r"struct\s+__packed\s+vmcs12"),
        "struct vmcs12 oracle_instance;",
    ])
    (workdir / "vmcs12.c").write_text(code + "\n")
    (workdir / "layout.py").write_text(_GDB)
    subprocess.run(["gcc", "-g", "-O0", "-c", "vmcs12.c", "-o", "vmcs12.o"],
                   cwd=workdir, check=True, capture_output=True, text=True)
    out = subprocess.run(["gdb", "-batch", "-nx", "-ex", "source layout.py", "vmcs12.o"],
                         cwd=workdir, check=True, capture_output=True, text=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("LAYOUT "))
    return json.loads(line[len("LAYOUT "):])  # type: ignore[no-any-return]


def compare_layout(layout: dict[str, Any]) -> list[str]:
    """Differences between the mirror and one kernel's compiled struct vmcs12."""
    problems: list[str] = []
    c_fields = {f["name"]: f for f in layout["fields"]}
    carved: set[str] = set()
    for name, f in c_fields.items():
        start, end = f["offset"], f["offset"] + f["size"]
        if name not in MIRROR:
            problems.append(f"{name}: in C ({start}+{f['size']}) but not mirrored")
            continue
        offset, size = MIRROR[name]
        if (offset, size) == (start, f["size"]):
            continue
        if name.startswith("padding") and offset + size == end:
            # Newer kernels filled the front of this padding: those fields must tile the gap.
            inside = sorted((o, n) for n, (o, sz) in MIRROR.items()
                            if start <= o and o + sz <= offset)
            cursor = start
            for o, n in inside:
                if n not in m.NEWER_FIELDS or o != cursor:
                    problems.append(f"{n}: in {name}'s old span but not a documented newer field")
                cursor = o + MIRROR[n][1]
                carved.add(n)
            if cursor != offset:
                problems.append(f"{name}: {offset - cursor} bytes of its old span unaccounted for")
            continue
        problems.append(f"{name}: mirror {offset}+{size}, C {start}+{f['size']}")
    tail_start = MIRROR[TAIL][0]
    if tail_start < layout["size"]:
        problems.append(f"{TAIL} starts at {tail_start}, inside C's {layout['size']} bytes")
    for name, (offset, size) in MIRROR.items():
        if name in c_fields or name in carved or name == TAIL:
            continue
        if name in m.NEWER_FIELDS and layout["size"] <= offset and offset + size <= tail_start:
            continue  # appended after the older kernel's last field
        problems.append(f"{name}: mirrored at {offset}, absent from C and not accounted for")
    c_hdr = {f["name"]: (f["bitpos"], f["bitsize"]) for f in c_fields["hdr"]["sub"]}
    py_hdr = {name: _bits(getattr(m.vmcs_hdr, name)) for name, *_ in m.vmcs_hdr._fields_}
    if c_hdr != py_hdr:
        problems.append(f"hdr bits: mirror {py_hdr}, C {c_hdr}")
    return problems


def test_layout_against_gcc(source: tuple[str, dict[str, str]],
                            tmp_path: Path) -> None:
    version, texts = source
    for tool in ("gcc", "gdb"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install gcc gdb)")
    layout = c_layout(texts, tmp_path)
    assert len(layout["fields"]) > 100
    assert compare_layout(layout) == [], version
    # Every pinned offset is where gcc put the field (the list and the struct agree).
    c_offsets = {f["name"]: f["offset"] for f in layout["fields"]}
    assert {n: c_offsets.get(n) for n in check_offsets(texts["vmcs12"])} == \
        check_offsets(texts["vmcs12"])


def test_mirror_bitfields_exist() -> None:
    # compare_layout() skips hdr's bits only if ctypes stopped reporting them as bitfields.
    assert _bits(m.vmcs_hdr.revision_id) is not None
    assert _bits(m.vmcs_hdr.shadow_vmcs) is not None


# --- constants --------------------------------------------------------------------------


def _module_constants(prefixes: tuple[str, ...]) -> dict[str, int]:
    return {n: v for n, v in vars(m).items()
            if n.startswith(prefixes) and isinstance(v, int) and n.isupper()}


def test_constants_match_vmx_h(source: tuple[str, dict[str, str]]) -> None:
    version, texts = source
    kernel = vmx_constants(texts)
    ours = _module_constants(CONTROL_PREFIXES + OTHER_PREFIXES)
    assert len(ours) > 80
    wrong = {n: (v, kernel[n]) for n, v in ours.items() if n in kernel and kernel[n] != v}
    assert wrong == {}, version
    if _vkey(version) <= _vkey(REFERENCE):
        assert set(m.NEWER_CONSTANTS) & set(kernel) == set(), f"in {version} already"
    if version == REFERENCE:
        absent = set(ours) - set(kernel) - set(m.NEWER_CONSTANTS)
        assert absent == set(), "neither in the kernel nor in NEWER_CONSTANTS"
        # Complete: every control bit the reference kernel names is here.
        theirs = {n for n in kernel if n.startswith(CONTROL_PREFIXES + OTHER_PREFIXES)}
        assert theirs - set(ours) == set()


def test_views_match_constants() -> None:
    for view, prefix in VIEWS.items():
        members = {prefix + str(member.name): int(member) for member in view}
        assert members == {n: v for n, v in _module_constants((prefix,)).items()
                           if not n.endswith("ALWAYSON_WITHOUT_TRUE_MSR")}, view.__name__
    assert set(m.vmcs12._flags_) <= set(m.vmcs12.field_names())


def test_all_is_complete() -> None:
    public = {n for n, v in vars(m).items()
              if not n.startswith("_") and getattr(v, "__module__", m.__name__) == m.__name__
              and not isinstance(v, type(m))}
    assert set(m.__all__) == public


# --- REPL -------------------------------------------------------------------------------


def test_repr_names_fields_and_decodes_controls() -> None:
    v = m.vmcs12.new()
    v.guest_rip = 0xFFFFFFFF81000000
    v.cpu_based_vm_exec_control = (m.CPU_BASED_HLT_EXITING
                                   | m.CPU_BASED_ACTIVATE_SECONDARY_CONTROLS)
    v.secondary_vm_exec_control = m.SECONDARY_EXEC_ENABLE_EPT | m.SECONDARY_EXEC_SHADOW_VMCS
    v.pin_based_vm_exec_control = m.PIN_BASED_VMX_PREEMPTION_TIMER | (1 << 30)
    v.vm_entry_controls = m.VM_ENTRY_IA32E_MODE
    v.vm_exit_controls = m.VM_EXIT_HOST_ADDR_SPACE_SIZE
    v.launch_state = m.LaunchState.LAUNCHED
    v.guest_activity_state = m.GUEST_ACTIVITY_HLT
    v.vm_exit_msr_load_count = 12
    text = repr(v)
    assert text.startswith("vmcs12(hdr=vmcs_hdr(revision_id=0x11e57ed0, shadow_vmcs=0)")
    for part in (
        "guest_rip=0xffffffff81000000",
        "cpu_based_vm_exec_control=HLT_EXITING|ACTIVATE_SECONDARY_CONTROLS",
        "secondary_vm_exec_control=ENABLE_EPT|SHADOW_VMCS",
        "pin_based_vm_exec_control=VMX_PREEMPTION_TIMER|0x40000000",  # unknown bits kept
        "vm_entry_controls=IA32E_MODE",
        "vm_exit_controls=HOST_ADDR_SPACE_SIZE",
        "launch_state=LAUNCHED",
        "guest_activity_state=HLT",
        "vm_exit_msr_load_count=12",
        "guest_ssp=0",
    ):
        assert part in text
    names = re.findall(r"(\w+)=", text.split("(", 1)[1])
    shown = [n for n in m.vmcs12.field_names() if n not in m.vmcs12._hidden_]
    assert [n for n in names if n not in ("revision_id", "shadow_vmcs")] == shown


def test_repr_hides_padding() -> None:
    text = repr(m.vmcs12())
    for hidden in ("padding", "padding64", "paddingl", "padding32", "padding_tail",
                   "dead_space"):
        assert f" {hidden}=" not in text
        assert hidden in m.vmcs12._hidden_
    assert all(n in m.vmcs12._hidden_ for n in m.vmcs12.field_names()
               if n.startswith("padding"))
    assert "padding_tail" in m.vmcs12().to_dict()  # hidden from repr, not from data


def test_pretty_printer_one_field_per_line() -> None:
    class Printer:
        def __init__(self) -> None:
            self.out: list[str] = []

        def text(self, s: str) -> None:
            self.out.append(s)

        def breakable(self, sep: str = " ") -> None:
            self.out.append("\n")

        def pretty(self, obj: Any) -> None:
            self.out.append(repr(obj))

        def group(self, *_: Any) -> Any:
            import contextlib
            return contextlib.nullcontext()

    p = Printer()
    v = m.vmcs12.new()
    v.vm_entry_controls = m.VM_ENTRY_IA32E_MODE
    v._repr_pretty_(p, cycle=False)
    lines = "".join(p.out).splitlines()
    assert "vm_entry_controls=IA32E_MODE," in lines
    assert not any("padding" in line for line in lines)


# --- buffers ----------------------------------------------------------------------------


def test_from_buffer_round_trip() -> None:
    page = bytearray(m.VMCS12_SIZE)
    v = m.vmcs12.from_buffer(page)
    v.hdr.revision_id = m.VMCS12_REVISION
    v.hdr.shadow_vmcs = 1
    v.guest_rip = 0xFFF0
    v.secondary_vm_exec_control = m.SECONDARY_EXEC_SHADOW_VMCS
    v.guest_ssp = 0x7000
    v.guest_pml_index = 511
    # A view: the page holds the writes, at the mirror's offsets.
    desc = m.vmcs12.guest_rip
    assert int.from_bytes(page[desc.offset:desc.offset + desc.size], "little") == 0xFFF0
    assert int.from_bytes(page[:4], "little") == m.VMCS12_REVISION | 1 << 31
    copy = m.vmcs12.from_bytes(bytes(page))
    assert copy == v and copy.to_bytes() == bytes(page)
    assert copy.to_dict()["hdr"] == {"revision_id": m.VMCS12_REVISION, "shadow_vmcs": 1}
    assert copy.guest_ssp == 0x7000 and copy.guest_pml_index == 511
    with pytest.raises(ValueError, match="4096"):
        m.vmcs12.from_bytes(bytes(page[:-1]))


def test_view_of_a_nested_state_page() -> None:
    state = NestedState()
    state.format = NestedFormat.VMX
    state.size = HEADER_SIZE + 2 * m.VMCS12_SIZE
    for page in (state.vmcs12, state.shadow_vmcs12):
        v = m.vmcs12.from_buffer(page)
        v.hdr.revision_id = m.VMCS12_REVISION
        v.guest_cr3 = 0x1000
    data = state.to_bytes()
    first = data[HEADER_SIZE:HEADER_SIZE + m.VMCS12_SIZE]
    assert m.vmcs12.from_bytes(first).guest_cr3 == 0x1000
    assert data[HEADER_SIZE + m.VMCS12_SIZE:] == first
