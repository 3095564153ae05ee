"""The documentation's examples, run as printed, and the documentation build.

Every fenced block of ``docs/*.md`` that holds ``>>>`` lines is a doctest.
An HTML comment on the line before a block says what it needs::

    <!-- doctest: kvm -->                  /dev/kvm (any KVM, nested or not)
    <!-- doctest: kvm no-nested -->        /dev/kvm with KVM_CAP_NESTED_STATE 0
    <!-- doctest: svm-guest -->            a KVM with nested SVM: the emulated AMD guest
    <!-- doctest: requires=IPython -->     an importable module

A page's blocks run in order in one namespace, like a REPL session: on the
host, the blocks with no need plus (where /dev/kvm opens) the ``kvm`` ones,
``no-nested`` ones included where the KVM has no nesting; in the AMD guest,
all of the page's blocks but the ``no-nested`` ones. So a block may use
names from earlier blocks that run wherever it runs.
"""

from __future__ import annotations

import doctest
import importlib.util
import itertools
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import kvmstate
from tests.kvm_fixtures import NO_KVM

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = sorted(DOCS.glob("*.md"))
NEEDS = frozenset({"kvm", "no-nested", "svm-guest"})
_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
_MARK = re.compile(r"^<!--\s*doctest:(?P<body>.*?)-->\s*$")
OPTIONS = doctest.ELLIPSIS


@dataclass(frozen=True)
class Block:
    """One fenced block with examples: its text, where it starts, what it needs."""

    page: str
    line: int  #: 1-based line of the block's first content line
    text: str
    needs: frozenset[str]
    modules: tuple[str, ...]


def _marker(line: str, where: str) -> tuple[frozenset[str], tuple[str, ...]]:
    match = _MARK.match(line.strip())
    if match is None:
        return frozenset(), ()
    needs: set[str] = set()
    modules: list[str] = []
    for word in match["body"].split():
        if word.startswith("requires="):
            modules.extend(m for m in word[len("requires=") :].split(",") if m)
        elif word in NEEDS:
            needs.add(word)
        else:
            raise ValueError(f"{where}: unknown doctest marker {word!r}")
    return frozenset(needs), tuple(modules)


def blocks(path: Path) -> list[Block]:
    """The blocks of one page that hold examples, in page order."""
    lines = path.read_text().splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        fence = match["fence"]
        start = i + 1
        end = start
        while end < len(lines) and not lines[end].strip().startswith(fence):
            end += 1
        body = lines[start:end]
        if any(b.lstrip().startswith(">>>") for b in body):
            before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            needs, modules = _marker(before, f"{path.name}:{i}")
            out.append(Block(path.name, start + 1, "\n".join(body) + "\n", needs, modules))
        i = end + 1
    return out


def _close_descriptors(globs: dict[str, object]) -> None:
    """Close what a page left open, vCPUs before VMs before /dev/kvm."""
    order = (kvmstate.Vcpu, kvmstate.Vm, kvmstate.Kvm)
    for kind in order:
        for value in list(globs.values()):
            if isinstance(value, kind) and not value.closed:
                value.close()


def run_page(page: str, chosen: list[Block]) -> doctest.TestResults:
    """Run ``chosen`` blocks as one session; fail with doctest's report on a mismatch."""
    parser = doctest.DocTestParser()
    examples: list[doctest.Example] = []
    for block in chosen:
        for example in parser.get_examples(block.text, f"{page}:{block.line}"):
            example.lineno += block.line - 1
            examples.append(example)
    globs: dict[str, object] = {"__name__": f"docs.{page}"}
    test = doctest.DocTest(examples, globs, page, str(DOCS / page), 0, None)
    output: list[str] = []
    runner = doctest.DocTestRunner(verbose=False, optionflags=OPTIONS)
    try:
        runner.run(test, out=output.append, clear_globs=False)
    finally:
        _close_descriptors(globs)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, "".join(output)
    assert result.attempted == len(examples)
    return result


def _runnable_modules(block: Block) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in block.modules)


ALL = {path.name: blocks(path) for path in PAGES}
WITH_EXAMPLES = [page for page, found in ALL.items() if found]
GUEST_PAGES = [page for page, found in ALL.items() if any("svm-guest" in b.needs for b in found)]


def test_docs_have_examples() -> None:
    assert "quickstart.md" in WITH_EXAMPLES and GUEST_PAGES


@pytest.mark.parametrize("page", WITH_EXAMPLES)
def test_examples_without_kvm(page: str) -> None:
    """The blocks that need nothing: they run everywhere."""
    chosen = [b for b in ALL[page] if not b.needs and _runnable_modules(b)]
    if not chosen:
        pytest.skip(f"{page}: every example needs a KVM")
    run_page(page, chosen)


@pytest.mark.parametrize("page", WITH_EXAMPLES)
def test_examples_with_kvm(page: str) -> None:
    """Those blocks plus the ``kvm`` ones, against this machine's /dev/kvm."""
    if not any("kvm" in b.needs for b in ALL[page]):
        pytest.skip(f"{page}: no example needs /dev/kvm")
    if NO_KVM is not None:
        pytest.skip(NO_KVM)
    nested = _nested_state_size() != 0
    chosen = [
        b
        for b in ALL[page]
        if b.needs <= {"kvm", "no-nested"}
        and not (nested and "no-nested" in b.needs)
        and _runnable_modules(b)
    ]
    run_page(page, chosen)


def _nested_state_size() -> int:
    with kvmstate.Kvm() as kvm:
        return kvm.nested_state_size


def _why_no_nested_svm() -> str | None:
    if NO_KVM is not None:
        return NO_KVM
    size = _nested_state_size()
    if size != 4224:
        return f"this KVM has no nested SVM (KVM_CAP_NESTED_STATE = {size}, not 4224)"
    return None


@pytest.mark.svm_guest
@pytest.mark.parametrize("page", GUEST_PAGES)
def test_examples_in_svm_guest(page: str) -> None:
    """Every block of the page, in a KVM with nested SVM (the emulated AMD guest)."""
    why = _why_no_nested_svm()
    if why is not None:
        pytest.skip(why)
    run_page(page, [b for b in ALL[page] if "no-nested" not in b.needs and _runnable_modules(b)])


def test_markers_are_known() -> None:
    with pytest.raises(ValueError, match="unknown doctest marker"):
        _marker("<!-- doctest: kmv -->", "x")
    assert _marker("<!-- doctest: svm-guest requires=IPython -->", "x") == (
        frozenset({"svm-guest"}),
        ("IPython",),
    )


# --- the generated byte maps ------------------------------------------------------------


def _abi() -> Any:
    sys.path.insert(0, str(DOCS / "_ext"))
    try:
        if importlib.util.find_spec("sphinx") is None:
            pytest.skip("sphinx is not installed (pip install -e '.[docs]')")
        import kvmstate_abi
    finally:
        sys.path.remove(str(DOCS / "_ext"))
    return kvmstate_abi


def test_byte_map_of_the_header_is_the_kernels() -> None:
    abi = _abi()
    from kvmstate import uapi

    got = {r.path: (r.offset, r.size, r.ctype) for r in abi.rows(uapi.kvm_nested_state_header)}
    assert got["flags"] == (0, 2, "u16")
    assert got["format"] == (2, 2, "u16")
    assert got["size"] == (4, 4, "u32")
    assert got["hdr"] == (8, 120, "union kvm_nested_state_hdr")
    assert got["hdr.vmx.vmcs12_pa"] == (16, 8, "u64")
    assert got["hdr.vmx.preemption_timer_deadline"] == (32, 8, "u64")
    assert got["hdr.svm.vmcb_pa"] == (8, 8, "u64")
    # gpat right after vmcb_pa, as commit 4f256d5770fe (Linux 7.2) declares it.
    assert got["hdr.svm.gpat"] == (16, 8, "u64")
    notes = {r.path: r.note for r in abi.rows(uapi.kvm_nested_state_header)}
    assert "newer than the 6.1 header (Linux 7.2)" in notes["hdr.svm.gpat"]
    assert not any(p.startswith(("hdr.svm.flags", "hdr.svm.reserved")) for p in got)


def test_byte_map_rows_stay_inside_their_structure() -> None:
    abi = _abi()
    from kvmstate import uapi, vmcb, vmcs12

    for cls in (uapi.kvm_nested_state, vmcb.vmcb, vmcs12.vmcs12):
        table = abi.rows(cls)
        size = abi.ctypes.sizeof(cls)
        assert all(r.offset >= 0 and r.offset + r.size <= size for r in table), cls
        top = [r for r in table if r.depth == 0]
        # The top-level fields of a structure tile it, in order, without overlap.
        assert top[0].offset == 0 and top[-1].offset + top[-1].size == size, cls
        for a, b in itertools.pairwise(top):
            assert a.offset + a.size == b.offset, (a, b)
    bits = {r.path: r.bits for r in abi.rows(vmcs12.vmcs12) if r.bits}
    assert bits == {"hdr.revision_id": (0, 31), "hdr.shadow_vmcs": (31, 1)}


def test_layout_picture_is_the_mirrors() -> None:
    abi = _abi()
    segments = abi.layout_segments()
    vmx, svm = segments["VMX (format 0)"], segments["SVM (format 1)"]
    assert [(s.name, s.start, s.end) for s in vmx] == [
        ("header", 0, 128),
        ("vmcs12", 128, 4224),
        ("shadow_vmcs12", 4224, 8320),
    ]
    assert (svm[1].start, svm[2].start, svm[-1].end) == (128, 128 + 0x400, 4224)
    import xml.etree.ElementTree as ET

    ET.fromstring(abi.layout_svg())  # well-formed SVG
    from kvmstate import uapi

    grid = abi.grid_svg(uapi.kvm_nested_state_header, {"hdr": "hdr.svm"}, "svm")
    ET.fromstring(grid)
    assert ">vmcb_pa<" in grid and "vmxon_pa" not in grid


def test_grid_draws_padding_fields_as_fields_and_scales() -> None:
    """Grey is for bytes of no field only: the VMX header's ``pad`` is a dashed box
    with its name, and the grey starts after the VMX header; pictures have a viewBox."""
    import ctypes
    import xml.etree.ElementTree as ET

    from kvmstate import uapi

    abi = _abi()
    ns = "{http://www.w3.org/2000/svg}"
    cls = uapi.kvm_nested_state_header
    svg = abi.grid_svg(cls, {"hdr": "hdr.vmx"}, "vmx")
    root = ET.fromstring(svg)
    pad = cls.hdr.offset + uapi.kvm_vmx_nested_state_hdr.pad.offset
    box = None
    pad_box = None
    for element in root:
        if element.tag == ns + "rect":
            box = element
        title = element.find(ns + "title")
        if title is not None and title.text == f"hdr.vmx.pad: u16 at {pad:#x}":
            pad_box = box
    assert pad_box is not None, "no box for hdr.vmx.pad"
    assert pad_box.get("stroke-dasharray") and pad_box.get("fill") != abi._GREY
    # Rows are labelled with their first offset; the first grey row is the one after
    # the VMX header, and the grey is labelled with the union it belongs to.
    labels = {e.text: float(e.get("y", 0)) for e in root.iter(ns + "text")}
    vmx_end = cls.hdr.offset + ctypes.sizeof(uapi.kvm_vmx_nested_state_hdr)
    grey = min(float(r.get("y", 0)) for r in root.iter(ns + "rect") if r.get("fill") == abi._GREY)
    row = vmx_end // 8 * 8
    assert labels[f"{row - 8:#06x}"] < grey < labels[f"{row:#06x}"]
    assert sum(1 for text in labels if text and text.startswith("rest of hdr (120-byte")) == 1
    for picture in (svg, abi.layout_svg()):
        top = ET.fromstring(picture)
        assert top.get("viewBox") == f"0 0 {top.get('width')} {top.get('height')}"


# --- the build --------------------------------------------------------------------------


def test_docs_build_without_warnings(tmp_path: Path) -> None:
    """``sphinx -W``: a broken reference, a bad directive or a docstring autodoc
    cannot parse fails here (and in CI, where the docs extra is installed)."""
    missing = [m for m in ("sphinx", "myst_parser") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (pip install -e '.[docs]')")
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html"]
    command += ["-d", str(tmp_path / "doctrees"), str(DOCS), str(tmp_path / "html")]
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "html" / "abi.html").exists()
