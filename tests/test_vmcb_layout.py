"""The VMCB mirrors against the kernel's own svm.h, compiled by gcc and read back by gdb.

The headers come from the Debian linux-source tarballs (/usr/src), extracted
into pytest's tmp dir: the struct and enum definitions are cut out of them,
compiled with stand-in typedefs, and gdb reports every field's offset and
size (tests/ctypes_oracle.py). Constants are printed by a compiled program.
No expected offset, size or value is typed in here.

6.12 is the reference (names and layout); 6.1, when its tarball is
installed, must differ only as ``LINUX_6_1_NAMES``/``LINUX_6_1_SIZES`` say.
"""

from __future__ import annotations

import ctypes
import enum
import random
import re
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

from kvmstate import nested, uapi, vmcb
from tests import ctypes_oracle as oracle

TARBALLS = {
    "6.12": Path("/usr/src/linux-source-6.12.tar.xz"),
    "6.1": Path("/usr/src/linux-source-6.1.tar.xz"),
}
MEMBERS = (
    "arch/x86/include/asm/svm.h",
    "arch/x86/include/asm/hyperv-tlfs.h",
    "arch/x86/include/asm/msr-index.h",
    "arch/x86/include/uapi/asm/svm.h",
    "arch/x86/include/uapi/asm/processor-flags.h",
    "arch/x86/kvm/svm/svm.h",
)
# Mirror class -> C type; hv_enlightenments_control and the anonymous union are reached
# through their parents.
MIRRORS: dict[str, type[Any]] = {
    "struct hv_vmcb_enlightenments": vmcb.hv_vmcb_enlightenments,
    "struct vmcb_control_area": vmcb.vmcb_control_area,
    "struct vmcb_seg": vmcb.vmcb_seg,
    "struct vmcb_save_area": vmcb.vmcb_save_area,
    "struct vmcb": vmcb.vmcb,
}
# The padding to a 4096-byte page: not in C on purpose.
PADDING = vmcb.vmcb.field_names()[-1]
# 6.12's SEV-ES host save area overlaid on vmcb.save: deliberately not mirrored.
NOT_MIRRORED = "host_sev_es_save"

PRELUDE = """\
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
#define __packed __attribute__((packed))
#define BIT(n) (1UL << (n))
#define BIT_ULL(n) (1ULL << (n))
#define GENMASK_ULL(h, l) (((~0ULL) << (l)) & (~0ULL >> (63 - (h))))
#define PAGE_SIZE 4096UL
"""

needs_tools = pytest.mark.skipif(
    oracle.tools_missing() is not None, reason=str(oracle.tools_missing())
)


# --- extracting and cutting the kernel headers ---------------------------------------


def _extract(version: str, dest: Path) -> dict[str, str]:
    tarball = TARBALLS[version]
    if not tarball.exists():
        pytest.skip(f"{tarball} missing (apt-get install linux-source-{version})")
    wanted = set(MEMBERS)
    found: dict[str, str] = {}
    # Streamed: the members sit early in the archive, so stop once they are all read.
    with tarfile.open(tarball, "r|xz") as archive:
        for member in archive:
            rel = member.name.split("/", 1)[-1]
            if rel in wanted and member.isfile():
                stream = archive.extractfile(member)
                assert stream is not None
                found[rel] = stream.read().decode()
                wanted.discard(rel)
                if not wanted:
                    break
    assert not wanted, f"{tarball} lacks {sorted(wanted)}"
    for rel, text in found.items():
        path = dest / version / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return found


def _strip_comments(text: str) -> str:
    return re.sub(r"/\*.*?\*/|//[^\n]*", " ", text, flags=re.S)


def _blocks(text: str, head: str) -> list[str]:
    """Top-level definitions whose opening line matches ``head`` (up to the brace)."""
    text = _strip_comments(text)
    out = []
    for match in re.finditer(rf"^{head}\s*\{{", text, flags=re.M):
        depth, i = 0, match.end() - 1
        while True:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
            if depth == 0:
                break
        out.append(text[match.start() : text.index(";", i) + 1])
    return out


def _struct(text: str, name: str) -> str:
    found = _blocks(text, rf"struct\b[^;{{\n]*?\b{name}")
    assert len(found) == 1, f"struct {name}: {len(found)} definitions"
    return found[0]


def _defines(text: str) -> list[str]:
    """Every ``#define`` (continuations joined), conditionals ignored."""
    joined = _strip_comments(text).replace("\\\n", " ")
    return [line for line in joined.splitlines() if re.match(r"\s*#\s*define\s", line)]


class Kernel:
    """One kernel's headers, with the C sources the oracles compile."""

    def __init__(self, version: str, files: dict[str, str], root: Path) -> None:
        self.version = version
        self.files = files
        self.root = root
        self.svm_h = files["arch/x86/include/asm/svm.h"]

    def layout_source(self) -> str:
        svm = self.svm_h
        parts = [
            PRELUDE,
            *_blocks(svm, r"enum\s+intercept_words"),
            _struct(self.files["arch/x86/include/asm/hyperv-tlfs.h"], "hv_vmcb_enlightenments"),
            _struct(svm, "vmcb_control_area"),
            _struct(svm, "vmcb_seg"),
            _struct(svm, "vmcb_save_area"),
        ]
        if re.search(r"^struct sev_es_save_area\s*\{", svm, flags=re.M):
            parts.append(_struct(svm, "sev_es_save_area"))  # vmcb's union needs it (6.12)
        parts.append(_struct(svm, "vmcb"))
        return "\n\n".join(parts) + "\n"

    def constants_program(self, exprs: dict[str, str]) -> str:
        # The uapi headers are includable as they are; the others only give #defines.
        defines = [
            line
            for rel in (
                "arch/x86/include/asm/svm.h",
                "arch/x86/include/asm/msr-index.h",
                "arch/x86/kvm/svm/svm.h",
            )
            for line in _defines(self.files[rel])
        ]
        enums = _blocks(self.svm_h, r"enum\s+intercept_words") + [
            b for b in _blocks(self.svm_h, r"enum") if "INTERCEPT_VMRUN" in b
        ]
        lines = [
            "#include <stdio.h>",
            PRELUDE,
            '#include "asm/processor-flags.h"',
            '#include "asm/svm.h"',
            *defines,
            *enums,
            "int main(void) {",
        ]
        for label, expr in exprs.items():
            lines.append(f'  printf("{label} %lld %zu\\n", (long long)({expr}), sizeof({expr}));')
        lines += ["  return 0;", "}"]
        return "\n".join(lines) + "\n"

    def uapi_include_dir(self) -> Path:
        return self.root / self.version / "arch/x86/include/uapi"


@pytest.fixture(scope="session")
def kernel612(tmp_path_factory: pytest.TempPathFactory) -> Kernel:
    root = tmp_path_factory.mktemp("ksrc")
    return Kernel("6.12", _extract("6.12", root), root)


@pytest.fixture(scope="session")
def kernel61(tmp_path_factory: pytest.TempPathFactory) -> Kernel:
    root = tmp_path_factory.mktemp("ksrc")
    return Kernel("6.1", _extract("6.1", root), root)


def _layouts(kernel: Kernel, workdir: Path) -> dict[str, Any]:
    return oracle.c_layouts(kernel.layout_source(), list(MIRRORS), workdir)


@pytest.fixture(scope="session")
def layouts612(kernel612: Kernel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _layouts(kernel612, tmp_path_factory.mktemp("oracle612"))


@pytest.fixture(scope="session")
def layouts61(kernel61: Kernel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _layouts(kernel61, tmp_path_factory.mktemp("oracle61"))


def _drop(layout: dict[str, Any], name: str) -> dict[str, Any]:
    """``layout`` without the member ``name`` (looked for in anonymous members too)."""
    fields = []
    for f in layout.get("fields", []):
        if f["name"] == name:
            continue
        if not f["name"] and "fields" in f["type"]:
            f = {**f, "type": _drop(f["type"], name)}
        fields.append(f)
    return {**layout, "fields": fields}


def _c_table(layout: dict[str, Any], base: int = 0) -> dict[str, tuple[int, int]]:
    """Field name -> (offset, size), anonymous members lifted; bit-fields as (bitpos, bits)."""
    out: dict[str, tuple[int, int]] = {}
    for f in layout["fields"]:
        if not f["name"]:
            out.update(_c_table(f["type"], base + f["offset"]))
        elif f["bitsize"]:
            out[f["name"]] = (base * 8 + f["bitpos"], f["bitsize"])
        else:
            out[f["name"]] = (base + f["offset"], f["type"]["size"])
    return out


def _bit_offset(desc: Any) -> int:
    # CField.size packs (bits << 16 | bit offset) before Python 3.14, which has bit_offset.
    return int(getattr(desc, "bit_offset", desc.size & 0xFFFF))


def _bit_size(desc: Any) -> int:
    return int(getattr(desc, "bit_size", desc.size >> 16))


def _py_table(cls: type[Any], base: int = 0) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    anonymous = set(getattr(cls, "_anonymous_", ()))
    for entry in cls._fields_:
        name, ftype = entry[0], entry[1]
        desc = getattr(cls, name)
        if name in anonymous:
            out.update(_py_table(ftype, base + desc.offset))
        elif len(entry) == 3:
            out[name] = (base * 8 + desc.offset * 8 + _bit_offset(desc), _bit_size(desc))
        else:
            out[name] = (base + desc.offset, ctypes.sizeof(ftype))
    return out


# --- 6.12: the reference layout ---------------------------------------------------------


@needs_tools
@pytest.mark.parametrize("c_name", list(MIRRORS))
def test_mirror_matches_612(c_name: str, layouts612: dict[str, Any]) -> None:
    layout = _drop(layouts612[c_name], NOT_MIRRORED)
    extra = frozenset({f"vmcb.{PADDING}"})
    assert oracle.compare(MIRRORS[c_name], layout, extra=extra) == []


@needs_tools
def test_bitfield_positions_612(layouts612: dict[str, Any]) -> None:
    c = _c_table(layouts612["struct hv_vmcb_enlightenments"]["fields"][0]["type"])
    assert _py_table(vmcb.hv_enlightenments_control) == c


@needs_tools
def test_vmcb_is_c_vmcb_padded_to_a_page(layouts612: dict[str, Any]) -> None:
    c = layouts612["struct vmcb"]
    # The 6.12 union with the SEV-ES area is larger than save; only save is mirrored.
    used = (
        layouts612["struct vmcb_control_area"]["size"] + layouts612["struct vmcb_save_area"]["size"]
    )
    assert getattr(vmcb.vmcb, PADDING).offset == used <= c["size"]
    assert ctypes.sizeof(vmcb.vmcb) == uapi.KVM_STATE_NESTED_SVM_VMCB_SIZE
    assert vmcb.vmcb.save.offset == _c_table(c)["save"][0]


def _expected_sizes(svm_h: str) -> dict[str, int]:
    return {
        m[1]: int(m[2], 0) for m in re.finditer(r"#define\s+(EXPECTED_\w+)\s+([0-9]\w*)\s", svm_h)
    }


def test_kernel_size_assertions_612(kernel612: Kernel) -> None:
    # svm.h's own BUILD_BUG_ONs: sizeof(save), sizeof(control), offsetof(vmcb, save).
    sizes = _expected_sizes(kernel612.svm_h)
    assert ctypes.sizeof(vmcb.vmcb_save_area) == sizes["EXPECTED_VMCB_SAVE_AREA_SIZE"]
    assert ctypes.sizeof(vmcb.vmcb_control_area) == sizes["EXPECTED_VMCB_CONTROL_AREA_SIZE"]
    assert vmcb.vmcb.save.offset == sizes["EXPECTED_VMCB_CONTROL_AREA_SIZE"]


def test_kernel_reserved_offsets_612(kernel612: Kernel) -> None:
    # BUILD_BUG_RESERVED_OFFSET(vmcb_save_area, y): field reserved_<y> sits at offset y.
    checks = re.findall(
        r"BUILD_BUG_RESERVED_OFFSET\(vmcb_save_area,\s*(0x[0-9a-fA-F]+)\)", kernel612.svm_h
    )
    assert checks, "svm.h has no BUILD_BUG_RESERVED_OFFSET for vmcb_save_area"
    for offset in checks:
        assert getattr(vmcb.vmcb_save_area, f"reserved_{offset}").offset == int(offset, 16)


def _raw_struct(text: str, name: str) -> str:
    """A struct's source with its comments: from its head to the closing brace in column 0."""
    match = re.search(rf"^struct\b[^;{{\n]*?\b{name}\s*\{{", text, flags=re.M)
    assert match, f"struct {name} not found"
    return text[match.start() : text.index("\n}", match.end())]


@pytest.mark.parametrize("struct", ["vmcb_control_area", "vmcb_save_area"])
def test_offset_comments_612(struct: str, kernel612: Kernel) -> None:
    # Field comments such as "/* Offset 0xe0 */" or "SPEC_CTRL at 0x2E0".
    pattern = r"(\w+)(?:\[[^\]]*\])?;[ \t]*/\*[^*]*?\b(?:Offset|at) (0x[0-9a-fA-F]+)"
    comments = re.findall(pattern, _raw_struct(kernel612.svm_h, struct))
    assert comments
    cls = getattr(vmcb, struct)
    for field, offset in comments:
        assert getattr(cls, field).offset == int(offset, 16), field


# --- 6.1: documented differences only --------------------------------------------------


def _renamed_61(table: dict[str, tuple[int, int]], struct: str) -> dict[str, tuple[int, int]]:
    back = {old: new for (s, new), old in vmcb.LINUX_6_1_NAMES.items() if s == struct}
    return {back.get(name, name): value for name, value in table.items()}


def _shrink_61(struct: str) -> int:
    """How many bytes smaller ``struct`` is in 6.1 (LINUX_6_1_SIZES)."""
    cls = getattr(vmcb, struct)
    return sum(
        getattr(cls, f).size - size for (s, f), size in vmcb.LINUX_6_1_SIZES.items() if s == struct
    )


@needs_tools
@pytest.mark.parametrize("c_name", list(MIRRORS))
def test_mirror_matches_61_with_documented_differences(
    c_name: str, layouts61: dict[str, Any]
) -> None:
    cls = MIRRORS[c_name]
    struct = c_name.split()[1]
    c = _renamed_61(_c_table(layouts61[c_name]), struct)
    expected = _py_table(cls)
    if cls is vmcb.vmcb:
        del expected[PADDING]
        offset, size = expected["save"]
        expected["save"] = (offset, size - _shrink_61("vmcb_save_area"))
    for (s, field), size in vmcb.LINUX_6_1_SIZES.items():
        if s == struct:
            expected[field] = (expected[field][0], size)
    assert c == expected
    if cls is not vmcb.vmcb:
        assert layouts61[c_name]["size"] == ctypes.sizeof(cls) - _shrink_61(struct)


def test_kernel_size_assertions_61(kernel61: Kernel) -> None:
    sizes = _expected_sizes(kernel61.svm_h)
    save = ctypes.sizeof(vmcb.vmcb_save_area) - _shrink_61("vmcb_save_area")
    assert save == sizes["EXPECTED_VMCB_SAVE_AREA_SIZE"]
    assert ctypes.sizeof(vmcb.vmcb_control_area) == sizes["EXPECTED_VMCB_CONTROL_AREA_SIZE"]


# --- constants and enum views ---------------------------------------------------------------

# Enum view -> how its members are spelled in C ("{}" is the member name).
ENUM_C_NAMES: dict[type[enum.Enum], str] = {
    vmcb.InterceptWord: "INTERCEPT_{}",
    vmcb.SvmExit: "SVM_EXIT_{}",
    vmcb.TlbControl: "TLB_CONTROL_{}",
    vmcb.IntCtl: "{}_MASK",
    vmcb.IntState: "SVM_{}_MASK",
    vmcb.NestedCtl: "SVM_NESTED_CTL_{}",
    vmcb.VirtExt: "{}_MASK",
    vmcb.EventInjFlag: "SVM_EVTINJ_{}",
    vmcb.EventType: "(SVM_EVTINJ_TYPE_{}) >> SVM_EVTINJ_TYPE_SHIFT",
    vmcb.Efer: "EFER_{}",
    vmcb.Cr0: "X86_CR0_{}",
    vmcb.Cr4: "X86_CR4_{}",
    vmcb.Rflags: "X86_EFLAGS_{}",
    vmcb.SegAttrib: "SVM_SELECTOR_{}_MASK",
}


def _intercept_c_name(member: str) -> str:
    return member if member.startswith("TRAP_") else f"INTERCEPT_{member}"


def _constants() -> dict[str, tuple[str, int]]:
    """label -> (C expression, Python value) for every constant and enum member."""
    out: dict[str, tuple[str, int]] = {}
    for name in vmcb.__all__:
        value = getattr(vmcb, name)
        if name.isupper() and isinstance(value, int):
            out[name] = (name, value)
    for kind, spelling in ENUM_C_NAMES.items():
        for member in kind:
            out[f"{kind.__name__}.{member.name}"] = (spelling.format(member.name), member.value)
    for member in vmcb.Intercept:
        out[f"Intercept.{member.name}"] = (_intercept_c_name(member.name), member.value)
    return out


CONSTANTS = _constants()


@pytest.fixture(scope="session")
def c_values(kernel612: Kernel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if oracle.tools_missing():
        pytest.skip(str(oracle.tools_missing()))
    work = tmp_path_factory.mktemp("consts")
    src, exe = work / "constants.c", work / "constants"
    src.write_text(kernel612.constants_program({k: e for k, (e, _) in CONSTANTS.items()}))
    proc = subprocess.run(
        ["gcc", "-w", "-I", str(kernel612.uapi_include_dir()), "-o", str(exe), str(src)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {
        label: (int(v), int(size)) for label, v, size in (ln.split() for ln in out.splitlines())
    }


@pytest.mark.parametrize("label", list(CONSTANTS))
def test_constant_matches_612(label: str, c_values: dict[str, tuple[int, int]]) -> None:
    c_value, size = c_values[label]
    value = CONSTANTS[label][1]
    # A C int such as (1 << 31) or -1 is equal modulo its width; the Python value must fit.
    bits = 8 * size
    assert -(1 << (bits - 1)) <= value < (1 << bits)
    assert value % (1 << bits) == c_value % (1 << bits)


def test_every_kernel_named_constant_is_checked() -> None:
    public = [n for n in vmcb.__all__ if n.isupper() and isinstance(getattr(vmcb, n), int)]
    assert len(public) > 100
    assert set(public) <= set(CONSTANTS)


# --- REPL behaviour ---------------------------------------------------------------------------


def _sample() -> vmcb.vmcb:
    v = vmcb.vmcb()
    c, s = v.control, v.save
    c.set_intercept(vmcb.INTERCEPT_VMRUN)
    c.asid = 1
    c.tlb_ctl = vmcb.TLB_CONTROL_FLUSH_ASID
    c.int_ctl = vmcb.V_INTR_MASKING_MASK | vmcb.V_GIF_ENABLE_MASK | 0x3
    c.nested_ctl = vmcb.SVM_NESTED_CTL_NP_ENABLE
    c.exit_code = vmcb.SVM_EXIT_ERR & 0xFFFFFFFF
    c.event_inj = vmcb.SVM_EVTINJ_VALID | vmcb.SVM_EVTINJ_TYPE_EXEPT | 14
    c.nested_cr3 = 0x1234000
    s.efer = vmcb.EFER_SVME | vmcb.EFER_LME | vmcb.EFER_LMA
    s.cr0 = vmcb.X86_CR0_PE | vmcb.X86_CR0_PG
    s.cs.attrib = vmcb.SVM_SELECTOR_P_MASK | vmcb.SVM_SELECTOR_L_MASK | 0xB
    s.rip = 0xFFFFFFFF81000000
    return v


def test_repr_names_and_decodes_fields() -> None:
    text = repr(_sample())
    for part in (
        "asid=1",
        "tlb_ctl=FLUSH_ASID",
        "int_ctl=V_INTR_MASKING|V_GIF_ENABLE|0x3",
        "nested_ctl=NP_ENABLE",
        "exit_code=ERR",
        "event_inj=VALID|0x30e",
        "nested_cr3=0x1234000",
        "efer=LME|LMA|SVME",
        "cr0=PE|PG",
        "attrib=P|L|0xb",
        "rip=0xffffffff81000000",
        "intercepts=[0, 0, 0, 0, 1, 0]",
    ):
        assert part in text


def test_unknown_values_show_in_hex() -> None:
    v = vmcb.vmcb()
    v.control.exit_code = 0x7FF
    v.control.tlb_ctl = 5
    text = repr(v.control)
    assert "exit_code=0x7ff" in text
    assert "tlb_ctl=0x5" in text


def test_reserved_fields_hidden_from_repr_but_kept_in_dict() -> None:
    v = _sample()
    assert "reserved" not in repr(v)
    assert "reserved_8" in v.control.to_dict()
    assert "reserved_0xd8" in v.save.to_dict()
    assert PADDING in v.to_dict()
    assert v.to_dict()["save"]["efer"] == v.save.efer


def test_pretty_printer_lists_fields() -> None:
    pretty = pytest.importorskip("IPython.lib.pretty")
    text = pretty.pretty(_sample())
    assert "efer=LME|LMA|SVME" in text
    assert "reserved" not in text


def test_intercept_helpers() -> None:
    c = vmcb.vmcb_control_area()
    c.set_intercept(vmcb.Intercept.VMRUN)
    c.set_intercept(vmcb.INTERCEPT_EXCEPTION_OFFSET + 14)
    c.set_intercept(1)
    assert c.intercepts[vmcb.InterceptWord.WORD4] == 1
    assert c.is_intercept(vmcb.INTERCEPT_VMRUN)
    assert not c.is_intercept(vmcb.INTERCEPT_VMMCALL)
    assert c.intercept_names() == ["bit1", "EXCEPTION_OFFSET+14", "VMRUN"]
    c.clr_intercept(vmcb.INTERCEPT_VMRUN)
    assert not c.is_intercept(vmcb.INTERCEPT_VMRUN)
    with pytest.raises(ValueError, match="outside"):
        c.is_intercept(32 * vmcb.MAX_INTERCEPT)


def test_decode_event() -> None:
    value = vmcb.SVM_EVTINJ_VALID | vmcb.SVM_EVTINJ_VALID_ERR | vmcb.SVM_EVTINJ_TYPE_EXEPT | 13
    assert vmcb.decode_event(value) == vmcb.Event(13, vmcb.EventType.EXEPT, True, True)
    assert vmcb.decode_event(5 << vmcb.SVM_EVTINJ_TYPE_SHIFT).type == 5


def test_hv_enlightenments_share_the_software_bytes() -> None:
    c = vmcb.vmcb_control_area()
    c.hv_enlightenments.hv_enlightenments_control.msr_bitmap = 1
    c.hv_enlightenments.hv_vm_id = 0x42
    assert bytes(c.reserved_sw)[:1] == b"\x02"
    assert (
        vmcb.vmcb_control_area.reserved_sw.offset == vmcb.vmcb_control_area.hv_enlightenments.offset
    )


# --- buffers -----------------------------------------------------------------------------------


def test_from_buffer_on_a_page_round_trips() -> None:
    page = bytearray(random.Random(12).randbytes(uapi.KVM_STATE_NESTED_SVM_VMCB_SIZE))
    original = bytes(page)
    v = vmcb.vmcb.from_buffer(page)
    assert v.to_bytes() == original
    assert vmcb.vmcb.from_bytes(original) == v
    v.save.efer = vmcb.EFER_SVME
    where = vmcb.vmcb.save.offset + vmcb.vmcb_save_area.efer.offset
    assert page[where : where + 8] == vmcb.EFER_SVME.to_bytes(8, "little")
    assert page[:where] == original[:where]
    assert page[where + 8 :] == original[where + 8 :]


def test_from_bytes_refuses_other_lengths() -> None:
    with pytest.raises(ValueError, match="4096"):
        vmcb.vmcb.from_bytes(bytes(uapi.KVM_STATE_NESTED_SVM_VMCB_SIZE - 1))


def test_view_of_nested_state_data_page() -> None:
    state = nested.NestedState(nested.SVM_MAX_SIZE)
    state.format = uapi.KVM_STATE_NESTED_FORMAT_SVM
    state.size = nested.SVM_MAX_SIZE
    v = vmcb.vmcb.from_buffer(state.buffer, nested.HEADER_SIZE)
    v.control.asid = 7
    v.control.set_intercept(vmcb.INTERCEPT_VMRUN)
    blob = state.to_bytes()
    again = vmcb.vmcb.from_bytes(blob[nested.HEADER_SIZE :])
    assert again.control.asid == 7
    assert again.control.is_intercept(vmcb.INTERCEPT_VMRUN)
