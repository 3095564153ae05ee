"""The documentation's examples, run as printed, and the documentation build.

Two kinds of fenced block in ``docs/*.md`` are examples:

- a block holding ``>>>`` lines is a doctest;
- a ``console`` block with a ``$ kvmstate ...`` command and output is a
  shell session: each ``$ `` line (a ``\\`` at its end continues it on the
  next line) runs in ``/bin/sh``, and what it writes, standard output and
  standard error together, must be the lines under it up to the next
  ``$ ``. ``kvmstate`` there is the package under test (this tree, run by
  this Python), and ``$?`` is the previous command's exit status. A block
  of commands without output, or without a ``kvmstate`` command, is an
  instruction (installing, running the tests), not an example: not run.

An HTML comment on the line before a block says what it needs::

    <!-- doctest: kvm -->                  /dev/kvm (any KVM, nested or not)
    <!-- doctest: kvm no-nested -->        /dev/kvm with KVM_CAP_NESTED_STATE 0
    <!-- doctest: svm-guest -->            a KVM with nested SVM: the emulated AMD guest
    <!-- doctest: requires=IPython -->     an importable module

A page's blocks run in order in one session, like a terminal beside a REPL:
one Python namespace, and one scratch folder that is the working directory
of both, so that a file the Python writes is there for the next command.
On the host they are the blocks with no need plus (where /dev/kvm opens)
the ``kvm`` ones, ``no-nested`` ones included where the KVM has no
nesting; in the AMD guest, all of the page's blocks but the ``no-nested``
ones. So a block may use what earlier blocks made that run wherever it runs.
"""

from __future__ import annotations

import atexit
import doctest
import importlib.util
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import kvmstate
from tests.kvm_fixtures import NO_KVM

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
NEEDS = frozenset({"kvm", "no-nested", "svm-guest"})
_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
_MARK = re.compile(r"^<!--\s*doctest:(?P<body>.*?)-->\s*$")
OPTIONS = doctest.ELLIPSIS
#: Seconds one shell command of an example may take (the guest's Python starts slowly).
COMMAND_TIMEOUT = 300


@dataclass(frozen=True)
class Command:
    """One ``$ `` line of a console block and the output printed under it."""

    line: int  #: 1-based line of the ``$`` in the page
    text: str  #: the command, continuation lines included
    want: str  #: the expected output, every line ending in a newline


@dataclass(frozen=True)
class Block:
    """One fenced block with examples: its text, where it starts, what it needs."""

    page: str
    line: int  #: 1-based line of the block's first content line
    text: str
    needs: frozenset[str]
    modules: tuple[str, ...]
    shell: bool = False  #: a console session rather than a doctest


def parse_console(text: str, first_line: int) -> list[Command]:
    """The ``$ `` commands of a console block, each with the output under it."""
    out: list[Command] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if not lines[i].startswith("$ "):
            raise ValueError(f"line {first_line + i}: output before the first command")
        start = i
        command = lines[i][2:]
        while command.endswith("\\") and i + 1 < len(lines):
            i += 1
            command += "\n" + lines[i]
        i += 1
        want: list[str] = []
        while i < len(lines) and not lines[i].startswith("$ "):
            want.append(lines[i] + "\n")
            i += 1
        out.append(Command(first_line + start, command, "".join(want)))
    return out


def _is_kvmstate_session(info: str, body: list[str]) -> bool:
    language = info.strip().split(" ")[0] if info.strip() else ""
    if language != "console" or not any(b.startswith("$ kvmstate") for b in body):
        return False
    return any(b and not b.startswith("$ ") for b in body)  # output: an example


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
        shell = _is_kvmstate_session(match["info"], body)
        if shell or any(b.lstrip().startswith(">>>") for b in body):
            before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            needs, modules = _marker(before, f"{path.name}:{i}")
            text = "\n".join(body) + "\n"
            out.append(Block(path.name, start + 1, text, needs, modules, shell))
        i = end + 1
    return out


def _close_descriptors(globs: dict[str, object]) -> None:
    """Close what a page left open, vCPUs before VMs before /dev/kvm."""
    order = (kvmstate.Vcpu, kvmstate.Vm, kvmstate.Kvm)
    for kind in order:
        for value in list(globs.values()):
            if isinstance(value, kind) and not value.closed:
                value.close()


@contextmanager
def _working_directory(folder: Path) -> Iterator[None]:
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


class Session:
    """A page's examples run in order: one namespace, one folder, one ``$?``."""

    def __init__(self, page: str, folder: Path) -> None:
        self.page = page
        self.folder = folder
        self.globs: dict[str, object] = {"__name__": f"docs.{page}"}
        self.runner = doctest.DocTestRunner(verbose=False, optionflags=OPTIONS)
        self.report: list[str] = []
        self.examples = 0
        self.status = 0
        # `kvmstate` in the commands is this tree's, whatever is installed on PATH.
        python = shlex.quote(sys.executable)
        self.prelude = f'kvmstate() {{ {python} -m kvmstate "$@"; }}\n'
        self.env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONDONTWRITEBYTECODE="1")
        self.checker = doctest.OutputChecker()

    def run_python(self, block: Block) -> None:
        parser = doctest.DocTestParser()
        examples = parser.get_examples(block.text, f"{self.page}:{block.line}")
        for example in examples:
            example.lineno += block.line - 1
        test = doctest.DocTest(examples, self.globs, self.page, str(DOCS / self.page), 0, None)
        self.runner.run(test, out=self.report.append, clear_globs=False)
        self.globs = test.globs  # DocTest works on a copy: the next block sees this one's names
        self.examples += len(examples)

    def run_shell(self, block: Block) -> None:
        for command in parse_console(block.text, block.line):
            script = f"{self.prelude}(exit {self.status})\n{command.text}\n"
            done = subprocess.run(
                ["/bin/sh", "-c", script],
                cwd=self.folder,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=COMMAND_TIMEOUT,
                check=False,
            )
            self.status = done.returncode
            self.examples += 1
            if not self.checker.check_output(command.want, done.stdout, OPTIONS):
                example = doctest.Example(command.text, command.want)
                self.report.append(
                    f'File "{DOCS / self.page}", line {command.line}, in {self.page}\n'
                    f"Failed command:\n    $ {command.text}\n"
                    + self.checker.output_difference(example, done.stdout, OPTIONS)
                )
                self.runner.failures += 1  # counted with the doctests' failures

    def run(self, chosen: list[Block]) -> None:
        try:
            with _working_directory(self.folder):
                for block in chosen:
                    if block.shell:
                        self.run_shell(block)
                    else:
                        self.run_python(block)
        finally:
            _close_descriptors(self.globs)
        assert self.runner.failures == 0, "".join(self.report)


def run_page(page: str, chosen: list[Block], folder: Path) -> int:
    """Run ``chosen`` blocks of ``page`` as one session in ``folder``; the examples run."""
    session = Session(page, folder)
    session.run(chosen)
    assert session.examples == sum(_count(b) for b in chosen)
    return session.examples


def _count(block: Block) -> int:
    if block.shell:
        return len(parse_console(block.text, block.line))
    return len(doctest.DocTestParser().get_examples(block.text))


def _runnable_modules(block: Block) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in block.modules)


ALL = {path.name: blocks(path) for path in PAGES}
WITH_EXAMPLES = [page for page, found in ALL.items() if found]
GUEST_PAGES = [page for page, found in ALL.items() if any("svm-guest" in b.needs for b in found)]


def test_docs_have_examples() -> None:
    assert "quickstart.md" in WITH_EXAMPLES and GUEST_PAGES
    # The command line's page is shown, and checked, as shell sessions.
    assert any(b.shell for b in ALL["cli.md"])


@pytest.mark.parametrize("page", WITH_EXAMPLES)
def test_examples_without_kvm(page: str, tmp_path: Path) -> None:
    """The blocks that need nothing: they run everywhere."""
    chosen = [b for b in ALL[page] if not b.needs and _runnable_modules(b)]
    if not chosen:
        pytest.skip(f"{page}: every example needs a KVM")
    run_page(page, chosen, tmp_path)


@pytest.mark.parametrize("page", WITH_EXAMPLES)
def test_examples_with_kvm(page: str, tmp_path: Path) -> None:
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
    run_page(page, chosen, tmp_path)


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
def test_examples_in_svm_guest(page: str, tmp_path: Path) -> None:
    """Every block of the page, in a KVM with nested SVM (the emulated AMD guest)."""
    why = _why_no_nested_svm()
    if why is not None:
        pytest.skip(why)
    chosen = [b for b in ALL[page] if "no-nested" not in b.needs and _runnable_modules(b)]
    run_page(page, chosen, tmp_path)


def test_markers_are_known() -> None:
    with pytest.raises(ValueError, match="unknown doctest marker"):
        _marker("<!-- doctest: kmv -->", "x")
    assert _marker("<!-- doctest: svm-guest requires=IPython -->", "x") == (
        frozenset({"svm-guest"}),
        ("IPython",),
    )


# --- the shell-session runner ------------------------------------------------------------


def _page(tmp_path: Path, text: str) -> list[Block]:
    path = tmp_path / "page.md"
    path.write_text(text)
    return blocks(path)


def test_console_blocks_are_parsed_as_commands_and_output() -> None:
    commands = parse_console("$ kvmstate a \\\n  --b\none\n\ntwo\n$ echo $?\n0\n", 10)
    assert commands == [
        Command(10, "kvmstate a \\\n  --b", "one\n\ntwo\n"),
        Command(15, "echo $?", "0\n"),
    ]
    with pytest.raises(ValueError, match="line 3: output before the first command"):
        parse_console("stray\n$ kvmstate info\n", 3)


def test_only_kvmstate_sessions_are_run(tmp_path: Path) -> None:
    found = _page(
        tmp_path,
        "```console\n$ python3 -m pip install kvmstate\n```\n\n"
        "```console\n$ python3 -m pip install .\n$ kvmstate info\n```\n\n"
        "```sh\n$ kvmstate info\n```\n\n"
        "<!-- doctest: svm-guest -->\n```console\n$ kvmstate info\nx\n```\n",
    )
    assert [(b.line, b.shell, b.needs) for b in found] == [(16, True, frozenset({"svm-guest"}))]


def test_a_shell_session_runs_in_one_folder_with_status_and_pipes(tmp_path: Path) -> None:
    found = _page(
        tmp_path,
        "```pycon\n>>> from pathlib import Path\n"
        ">>> _ = Path('made.txt').write_text('hi\\n')\n```\n"
        "```console\n"
        "$ cat made.txt\nhi\n"
        "$ kvmstate decode made.txt 2>&1 | cut -c1-25\nkvmstate: error: made.txt\n"
        "$ kvmstate decode made.txt 2>/dev/null\n$ echo $? \\\n  more\n2 more\n"
        "```\n",
    )
    folder = tmp_path / "run"
    folder.mkdir()
    assert run_page("page.md", found, folder) == 6  # 2 doctest lines, 4 commands


def test_the_kvmstate_of_a_session_is_this_tree() -> None:
    session = Session("page.md", ROOT)
    where = "import kvmstate; print(kvmstate.__file__)"
    script = session.prelude + f"kvmstate --version; {shlex.quote(sys.executable)} -c '{where}'"
    done = subprocess.run(
        ["/bin/sh", "-c", script], env=session.env, capture_output=True, text=True, check=True
    )
    version, path = done.stdout.splitlines()
    assert version == f"kvmstate {kvmstate.__version__}"
    assert path == str(ROOT / "kvmstate" / "__init__.py")


def test_a_wrong_shell_output_fails_with_both_outputs(tmp_path: Path) -> None:
    found = _page(tmp_path, "```console\n$ kvmstate decode nothing.bin\nall fine\n```\n")
    with pytest.raises(AssertionError) as caught:
        run_page("page.md", found, tmp_path)
    report = str(caught.value)
    assert "$ kvmstate decode nothing.bin" in report and "all fine" in report
    assert "kvmstate: error: nothing.bin" in report


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
    assert notes["hdr.svm.gpat"].startswith("new in Linux 7.2: not in the 6.1 or 6.12 header")
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

_BUILT: dict[str, tuple[Path, subprocess.CompletedProcess[str]]] = {}


def built_html() -> Path:
    """The HTML docs, built with ``sphinx -W`` once per test session into a fresh
    temporary folder (tests/test_docs_browser.py renders the same build); skips
    where the docs toolchain is missing.

    Not into docs/_build: the Intel guest copies the checkout onto a 64 MiB disk,
    and the build, doctrees included, is a quarter of that.
    """
    missing = [m for m in ("sphinx", "myst_parser") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (pip install -e '.[docs]')")
    if "html" not in _BUILT:
        out = Path(tempfile.mkdtemp(prefix="kvmstate-docs-"))
        atexit.register(shutil.rmtree, out, ignore_errors=True)
        command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html"]
        command += ["-d", str(out / "doctrees"), str(DOCS), str(out / "html")]
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        _BUILT["html"] = (out / "html", done)
    html, done = _BUILT["html"]
    assert done.returncode == 0, done.stdout + done.stderr
    return html


def test_docs_build_without_warnings() -> None:
    """``sphinx -W``: a broken reference, a bad directive or a docstring autodoc
    cannot parse fails here (and in CI, where the docs extra is installed)."""
    html = built_html()
    assert (html / "abi.html").exists()
    assert (html / "_static" / "kvmstate.css").exists()
    # The schema is offered for download from the format's page.
    assert list(html.glob("_downloads/*/snapshot.schema.json"))


# --- the JSON form's schema (docs/snapshot.schema.json) ----------------------------------

SCHEMA = DOCS / "snapshot.schema.json"
#: The JSON Schema keywords the schema may use: those validate() checks, and annotations.
_CHECKED = frozenset(
    {
        "$ref",
        "type",
        "enum",
        "properties",
        "required",
        "additionalProperties",
        "propertyNames",
        "items",
        "minItems",
        "maxItems",
        "pattern",
        "minimum",
        "maximum",
        "anyOf",
        "oneOf",
    }
)
_ANNOTATIONS = frozenset({"$schema", "$defs", "title", "description"})
_TYPES: dict[str, Any] = {
    "object": dict,
    "array": list,
    "string": str,
    "integer": int,
}


def validate(
    value: Any, schema: dict[str, Any], root: dict[str, Any], where: str = "$"
) -> list[str]:
    """Why ``value`` does not match ``schema`` (draft 2020-12 semantics), or nothing.

    Only the keywords in :data:`_CHECKED` are known; a schema using any other
    keyword is refused (ValueError) rather than half-checked.
    """
    unknown = set(schema) - _CHECKED - _ANNOTATIONS
    if unknown:
        raise ValueError(f"{where}: keywords this validator does not check: {sorted(unknown)}")
    if "$ref" in schema:
        ref = schema["$ref"]
        if not ref.startswith("#/$defs/"):
            raise ValueError(f"{where}: only local #/$defs/ references, not {ref!r}")
        referenced = validate(value, root["$defs"][ref[len("#/$defs/") :]], root, where)
        if referenced:
            return referenced
    if "type" in schema:
        kind = _TYPES[schema["type"]]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            return [f"{where}: {type(value).__name__}, not {schema['type']}"]
    if "enum" in schema and not any(value == e and type(value) is type(e) for e in schema["enum"]):
        return [f"{where}: {value!r} is not one of {schema['enum']}"]
    errors: list[str] = []
    if isinstance(value, dict):
        for key in schema.get("required", ()):
            if key not in value:
                errors.append(f"{where}: no {key!r}")
        properties = schema.get("properties", {})
        for key, item in value.items():
            if "propertyNames" in schema:
                errors += validate(key, schema["propertyNames"], root, f"{where} key {key!r}")
            if key in properties:
                errors += validate(item, properties[key], root, f"{where}.{key}")
            elif schema.get("additionalProperties") is False:
                errors.append(f"{where}: unexpected {key!r}")
            elif isinstance(schema.get("additionalProperties"), dict):
                errors += validate(item, schema["additionalProperties"], root, f"{where}.{key}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            errors.append(f"{where}: {len(value)} items, fewer than {schema['minItems']}")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errors.append(f"{where}: {len(value)} items, more than {schema['maxItems']}")
        if "items" in schema:
            for i, item in enumerate(value):
                errors += validate(item, schema["items"], root, f"{where}[{i}]")
    if isinstance(value, str) and "pattern" in schema and not re.search(schema["pattern"], value):
        errors.append(f"{where}: {value[:40]!r} does not match {schema['pattern']}")
    number = isinstance(value, int) and not isinstance(value, bool)
    if number and not schema.get("minimum", value) <= value <= schema.get("maximum", value):
        errors.append(
            f"{where}: {value} is outside {schema.get('minimum')}..{schema.get('maximum')}"
        )
    for keyword, wanted in (("anyOf", "at least one"), ("oneOf", "exactly one")):
        if keyword in schema:
            matched = [not validate(value, s, root, where) for s in schema[keyword]]
            if sum(matched) == 0 or (keyword == "oneOf" and sum(matched) != 1):
                errors.append(f"{where}: matches {sum(matched)} of {keyword}, not {wanted}")
    return errors


def _schema() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(SCHEMA.read_text())
    return loaded


def _schema_errors(document: Any) -> list[str]:
    schema = _schema()
    return validate(document, schema, schema)


def test_validator_checks_what_it_claims() -> None:
    root = {
        "$defs": {"u8": {"type": "integer", "minimum": 0, "maximum": 255}},
        "type": "object",
        "required": ["a"],
        "additionalProperties": False,
        "properties": {
            "a": {"$ref": "#/$defs/u8"},
            "b": {"type": "array", "items": {"type": "string", "pattern": "^x+$"}, "maxItems": 2},
            "c": {"oneOf": [{"type": "integer"}, {"enum": [1, "one"]}]},
        },
    }
    assert validate({"a": 7, "b": ["x", "xx"], "c": "one"}, root, root) == []
    assert validate({"a": 256}, root, root) == ["$.a: 256 is outside 0..255"]
    assert validate({"a": True}, root, root) == ["$.a: bool, not integer"]
    assert validate({"b": ["y"], "d": 1}, root, root) == [
        "$: no 'a'",
        "$.b[0]: 'y' does not match ^x+$",
        "$: unexpected 'd'",
    ]
    assert validate({"a": 1, "c": 1}, root, root) == ["$.c: matches 2 of oneOf, not exactly one"]
    assert validate({"a": 1, "b": ["x"] * 3}, root, root) == ["$.b: 3 items, more than 2"]
    with pytest.raises(ValueError, match="does not check: \\['const'\\]"):
        validate(1, {"const": 1}, {})


def _nested_examples() -> list[kvmstate.NestedState]:
    """Nested states of every shape to_dict writes: header only, each data page, a size
    that ends inside a page (data_raw), non-zero union bytes past the vendor header."""
    from kvmstate import vmcb

    out = []
    vmxon = kvmstate.NestedState(128)
    vmxon.format, vmxon.size = kvmstate.NestedFormat.VMX, 128
    vmxon.vmx.vmxon_pa, vmxon.vmx.vmcs12_pa = 0x3000, 2**64 - 1
    out.append(vmxon)
    for size in (4224, 8320, 4224 + 100):
        vmx = kvmstate.NestedState(size)
        vmx.format, vmx.size = kvmstate.NestedFormat.VMX, size
        vmx.vmx.vmxon_pa, vmx.vmx.vmcs12_pa = 0x3000, 0x4000
        out.append(vmx)
    l2 = kvmstate.NestedState(4224)
    l2.format, l2.size = kvmstate.NestedFormat.SVM, 4224
    l2.flags = kvmstate.NestedFlag.GUEST_MODE | kvmstate.NestedFlag.GIF_SET
    l2.svm.vmcb_pa, l2.svm.gpat = 0x10000, 0x0007040600070406
    page = l2.vmcb12
    assert page is not None
    page.control.set_intercept(vmcb.Intercept.VMRUN)
    page.save.efer = vmcb.EFER_SVME
    out.append(l2)
    gif = kvmstate.NestedState(128)
    gif.format, gif.size, gif.flags = kvmstate.NestedFormat.SVM, 128, kvmstate.NestedFlag.GIF_SET
    gif.header.hdr.pad[100] = 0xAB  # a byte no vendor header names
    out.append(gif)
    return out


def _states_without_kvm() -> list[Any]:
    from kvmstate import snapshot, uapi

    states = [
        snapshot.loads_vcpu(snapshot.dumps_vcpu(_minimal_state(n))) for n in _nested_examples()
    ]
    cpuid = uapi.kvm_cpuid2.new(2)
    cpuid.padding = 5  # written as {"padding": 5, "entries": [...]}
    plain = _minimal_state(None)
    plain.cpuid = cpuid
    plain.msrs = {0x10: 1, 0xC0000080: 0x500}
    plain.tsc_khz = 2_000_000
    plain.absent = {"nested": "KVM_CAP_NESTED_STATE is 0"}
    plain.extra = {"future.part": b"\x01\x02"}
    return [*states, plain]


def _minimal_state(nested: kvmstate.NestedState | None) -> Any:
    from kvmstate import state, uapi

    regs = uapi.kvm_regs()
    regs.rip = 0xFFF0
    return state.VcpuState(regs=regs, sregs=uapi.kvm_sregs(), nested=nested)


def test_schema_accepts_the_json_form_of_every_kind_of_state() -> None:
    from kvmstate import snapshot

    for state in _states_without_kvm():
        document = json.loads(json.dumps(snapshot.to_dict(state)))
        assert _schema_errors(document) == [], document.get("parts", {}).get("nested")


def test_schema_accepts_a_real_vcpus_json_form(vm: kvmstate.Vm, kvm: kvmstate.Kvm) -> None:
    """Everything this machine's KVM saves, LAPIC (in-kernel irqchip) and CPUID included."""
    from kvmstate import snapshot

    vm.create_irqchip()
    with vm.create_vcpu(0) as vcpu:
        vcpu.set_cpuid2(kvm.get_supported_cpuid())
        saved = vcpu.save_state()
        saved.fpu = vcpu.get_fpu()
    document = json.loads(json.dumps(snapshot.to_dict(saved)))
    assert {"regs", "sregs", "msrs", "cpuid", "lapic", "fpu"} <= set(document["parts"])
    assert document["parts"]["cpuid"], "no CPUID entries to check"
    assert _schema_errors(document) == []


@pytest.mark.parametrize(
    ("path", "bad", "error"),
    [
        (("kvmstate",), "2.0", "does not match"),
        (("parts", "msrs"), {"0x010": 1}, "does not match"),
        (("parts", "msrs"), {"0x10": -1}, "outside"),
        (("parts", "regs", "rip"), "0xfff0", "not integer"),
        (("parts", "nested", "hdr_raw"), "00" * 119, "does not match"),
        (("parts", "nested", "format"), 2, "is not one of"),
        (("parts", "nested", "svm", "flags"), 0, "unexpected 'flags'"),
        (("parts", "cpuid"), {"padding": 0, "entries": []}, "matches 0 of oneOf"),
        (("parts", "lapic"), {"regs": "00"}, "does not match"),
        (("absent", "lapic"), 1, "not string"),
    ],
)
def test_schema_refuses_what_from_dict_refuses(path: tuple[str, ...], bad: Any, error: str) -> None:
    """Each change breaks the document for kvmstate's own reader, and for the schema."""
    from kvmstate import snapshot

    states = _states_without_kvm()
    l2, plain = states[4], states[-1]
    assert l2.nested is not None and l2.nested.vmcb12 is not None
    l2.cpuid = plain.cpuid
    document = json.loads(json.dumps(snapshot.to_dict(l2)))
    document["parts"]["lapic"] = {"regs": "00" * 1024}
    document["absent"] = {}
    assert _schema_errors(document) == []
    snapshot.from_dict(document)
    target = document
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = bad
    errors = _schema_errors(document)
    assert errors and any(error in e for e in errors), errors
    with pytest.raises((ValueError, TypeError)):
        snapshot.from_dict(document)
