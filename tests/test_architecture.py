"""The package's shape, read from its source: layers, private names, the road into the kernel.

``kvmstate/__init__.py``'s docstring lists the layers, highest first. These
tests read every module's imports with :mod:`ast` (function-level imports
included: a lazy import is still a dependency) and hold the code to it: no
module imports one of its own layer or above, so there is no circle; no
module uses another module's underscore names; only ``_fd.py`` calls
``fcntl.ioctl``. Each checker is also run on a small planted package that
breaks its rule, to show it would catch a violation.
"""

from __future__ import annotations

import ast
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

import kvmstate

PACKAGE = Path(kvmstate.__file__).parent


@dataclass(frozen=True)
class Module:
    name: str
    tree: ast.Module


def load(root: Path, package: str) -> dict[str, Module]:
    """Every module under ``root`` (the directory of ``package``), by dotted name."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        name = ".".join(parts)
        out[name] = Module(name, ast.parse(path.read_text(), str(path)))
    return out


def imports(module: Module, known: dict[str, Module], package: str) -> set[str]:
    """The modules of ``package`` that ``module`` imports, anywhere in its body."""
    found: set[str] = set()
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == package)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] != package:
                continue
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
    found.discard(module.name)
    return found


def layers_of(docstring: str) -> list[list[str]]:
    """The layer list of a package docstring: one bullet per layer, highest first."""
    layers = []
    for bullet in re.split(r"\n\* ", docstring)[1:]:
        names = re.findall(r"``([\w.]+)``", bullet.split(" - ")[0])
        layers.append(names)
    return layers


def layer_violations(
    modules: dict[str, Module], layers: list[list[str]], package: str
) -> list[str]:
    """Each import of a module at the importer's layer or above, and each unlisted module."""
    rank = {name: len(layers) - i for i, layer in enumerate(layers) for name in layer}
    problems = [f"{name} is in no layer" for name in modules if name not in rank]
    for name, module in modules.items():
        for dep in sorted(imports(module, modules, package)):
            if name in rank and rank.get(dep, len(layers) + 1) >= rank[name]:
                problems.append(f"{name} imports {dep}, which is not below it")
    return problems


def _defined_private(module: Module) -> set[str]:
    """Underscore names a module defines: top-level, class members, ``self._x`` attributes."""
    names = set()
    for node in ast.walk(module.tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {n for n in names if n.startswith("_") and not n.endswith("_")}


def private_violations(modules: dict[str, Module], package: str) -> list[str]:
    """Uses of another module's underscore names: imported, or read as an attribute.

    Private *modules* (``_fd``, ``_struct``) may be imported; dunder and
    ctypes-style ``_sunder_`` names are protocol, not privacy. An attribute
    ``obj._x`` counts when ``_x`` is defined in some other module of the
    package and not in this one (``self``/``cls`` are the class's own).
    """
    defined = {name: _defined_private(m) for name, m in modules.items()}
    problems = []
    for name, module in modules.items():
        elsewhere = set().union(*(d for n, d in defined.items() if n != name)) - defined[name]
        for node in ast.walk(module.tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module.split(".")[0] != package:
                    continue
                for alias in node.names:
                    private = alias.name.startswith("_") and not alias.name.endswith("_")
                    if private and f"{node.module}.{alias.name}" not in modules:
                        problems.append(f"{name} imports {node.module}.{alias.name}")
            elif isinstance(node, ast.Attribute) and node.attr in elsewhere:
                own = isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
                if not own:
                    problems.append(f"{name}:{node.lineno} reads {ast.unparse(node)}")
    return problems


def ioctl_violations(modules: dict[str, Module], allowed: str) -> list[str]:
    """Every module but ``allowed`` that imports fcntl or names ``fcntl.ioctl``."""
    problems = []
    for name, module in modules.items():
        if name == allowed:
            continue
        for node in ast.walk(module.tree):
            if isinstance(node, ast.Import) and any(a.name == "fcntl" for a in node.names):
                problems.append(f"{name} imports fcntl")
            elif isinstance(node, ast.ImportFrom) and node.module == "fcntl":
                problems.append(f"{name} imports from fcntl")
    return problems


# --- the package itself --------------------------------------------------------------


MODULES = load(PACKAGE, "kvmstate")
LAYERS = layers_of(kvmstate.__doc__ or "")


def test_the_docstring_lists_every_module_once() -> None:
    listed = [name for layer in LAYERS for name in layer]
    assert len(listed) == len(set(listed)), listed
    assert set(listed) == set(MODULES), set(MODULES) ^ set(listed)


def test_each_module_imports_only_lower_layers() -> None:
    assert layer_violations(MODULES, LAYERS, "kvmstate") == []


def test_no_module_uses_another_modules_underscore_names() -> None:
    assert private_violations(MODULES, "kvmstate") == []


def test_every_kernel_call_goes_through_fd() -> None:
    assert ioctl_violations(MODULES, "kvmstate._fd") == []


# --- the checkers catch what they are for --------------------------------------------------


@pytest.fixture
def planted(tmp_path: Path) -> Path:
    """A package ``pkg`` that breaks every rule once: a circle, a private name, fcntl."""
    files = {
        "__init__.py": '''
            """Layers, highest first:

            * ``pkg.top`` - the top;
            * ``pkg.low``, ``pkg._fd`` - the bottom.
            """
        ''',
        "top.py": "from pkg.low import helper\n",
        # low imports top lazily: a circle, and low is below top.
        "low.py": """
            import fcntl

            def helper():
                from pkg import top
                return top

            def peek(obj):
                return obj._secret
        """,
        "_fd.py": """
            import fcntl

            class Wrapper:
                def __init__(self):
                    self._secret = 1

            def _hidden():
                return fcntl.ioctl
        """,
    }
    root = tmp_path / "pkg"
    root.mkdir()
    for name, text in files.items():
        (root / name).write_text(textwrap.dedent(text))
    (root / "extra.py").write_text("from pkg._fd import _hidden\n")
    return root


def test_a_planted_circle_and_an_unlisted_module_are_caught(planted: Path) -> None:
    modules = load(planted, "pkg")
    doc = ast.get_docstring(modules["pkg"].tree) or ""
    layers = layers_of(doc)
    assert layers == [["pkg.top"], ["pkg.low", "pkg._fd"]]
    problems = layer_violations(modules, layers, "pkg")
    assert "pkg.low imports pkg.top, which is not below it" in problems
    assert "pkg.extra is in no layer" in problems and "pkg is in no layer" in problems
    assert not any(p.startswith("pkg.top imports") for p in problems)  # down is fine


def test_a_planted_private_use_is_caught(planted: Path) -> None:
    problems = private_violations(load(planted, "pkg"), "pkg")
    assert "pkg.extra imports pkg._fd._hidden" in problems
    assert any(p.startswith("pkg.low:") and "obj._secret" in p for p in problems)
    assert not any(p.startswith("pkg._fd") for p in problems)  # its own names


def test_a_planted_fcntl_call_is_caught(planted: Path) -> None:
    assert ioctl_violations(load(planted, "pkg"), "pkg._fd") == ["pkg.low imports fcntl"]
