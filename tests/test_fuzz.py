"""Bounded fuzzing of the parsers: only ValueError/TypeError escape; what is accepted round-trips.

Targets: ``NestedState.from_bytes``, ``snapshot.loads_vm``, ``snapshot.from_dict`` (through
JSON), ``Struct.from_bytes``/``from_dict`` of every mirror, and the CLI's blob loader.
Each target is an oracle function that raises AssertionError when a property breaks:

* an exception other than ValueError/TypeError (the CLI: other than its CliError) is a bug;
* an accepted input gives its bytes back: ``from_bytes(b).to_bytes() == b``; a loaded file,
  written again, is a fixed point of load/dump; an accepted dict gives a state whose bytes
  survive the file format and the dict form.

Two engines, both bounded so that the file runs in well under a minute:

* hypothesis, structure-aware (headers, records and dicts built from the formats, then
  damaged), with explicit ``max_examples`` and no per-example deadline;
* a coverage-guided mutation loop, what atheris does, in pure Python: ``sys.settrace``
  collects the (line, next line) edges an input makes kvmstate run, and inputs that reach
  new edges join the corpus and are mutated further. Seeded, so a failure reproduces; bounded
  by ``KVMSTATE_FUZZ_SECONDS`` (default 4 s) per target and a run count.

With atheris installed, ``test_atheris`` fuzzes the same byte targets in a child process
for a few seconds; it skips, saying so, when atheris is absent.

Known bugs (see the ``BUG:`` xfails in ``tests/test_hostile.py``) would stop these tests
at once, so the oracles tolerate them, by name, in ``KNOWN``: remove an entry when its
fix lands, and the fuzzers then enforce it. The counts are printed by ``test_zz_fuzz_totals``.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import importlib.util
import inspect
import io
import json
import os
import pickle
import random
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import kvmstate
from kvmstate import cli as kcli
from kvmstate import describe, snapshot, uapi, vmcb, vmcs12
from kvmstate._struct import Mirror
from kvmstate.nested import HEADER_SIZE, SVM_MAX_SIZE, VMX_MAX_SIZE, NestedState
from kvmstate.state import PART_TABLE, VcpuState

# The fixed-size parts, as the parts table lays them out.
FIXED_PARTS = {n: r.type for n, r in PART_TABLE.items() if r.codec == "fixed"}

PKG = str(Path(kvmstate.__file__).parent)
SECONDS = float(os.environ.get("KVMSTATE_FUZZ_SECONDS", "4"))
SCALE = max(1, int(os.environ.get("KVMSTATE_FUZZ_SCALE", "1")))
SEED = int(os.environ.get("KVMSTATE_FUZZ_SEED", "20261125"))

# Known bugs the oracles tolerate (and count): name -> the hostile-battery reason.
KNOWN: dict[str, str] = {}
TOTALS: dict[str, int] = {}


def count(key: str, n: int = 1) -> None:
    TOTALS[key] = TOTALS.get(key, 0) + n


def known(name: str) -> None:
    """Note that an input hit a known bug (the oracle then stops checking it)."""
    assert name in KNOWN, name
    count(f"known bug {name}")
    with contextlib.suppress(Exception):  # event() only works inside a hypothesis test
        event(f"known bug: {name}")


PARSE_ERRORS = (ValueError, TypeError)
# The coverage-guided loop traces only the parse (the checks after it would drown it).
Traced = Callable[[], contextlib.AbstractContextManager[Any]]

# --- oracles ------------------------------------------------------------------------------


def check_nested(data: bytes, traced: Traced = contextlib.nullcontext) -> NestedState | None:
    """NestedState.from_bytes: refuses with ValueError/TypeError, or round-trips everywhere."""
    count("nested")
    try:
        with traced():
            state = NestedState.from_bytes(data)
    except PARSE_ERRORS:
        return None
    count("nested accepted")
    assert state.to_bytes() == bytes(data)
    assert NestedState.from_bytes(state.to_bytes()) == state
    assert pickle.loads(pickle.dumps(state)) == state
    repr(state)
    json.dumps(describe.nested_state_dict(state))
    # The named form carries every byte too.
    d = json.loads(json.dumps(snapshot.to_dict(VcpuState(nested=state))))
    back = snapshot.from_dict(d).nested
    assert back is not None and back.to_bytes() == bytes(data)
    return state


def check_file(data: bytes, traced: Traced = contextlib.nullcontext) -> list[VcpuState] | None:
    """snapshot.loads_vm: refuses, or what it read is a fixed point of dump/load (and dict)."""
    count("file")
    try:
        with traced():
            states = snapshot.loads_vm(data)
    except PARSE_ERRORS:
        return None
    count("file accepted")
    canonical = snapshot.dumps_vm(states)
    again = snapshot.loads_vm(canonical)
    assert again == states and [s.absent for s in again] == [s.absent for s in states]
    assert snapshot.dumps_vm(again) == canonical
    for state in states:
        d = json.loads(json.dumps(snapshot.to_dict(state)))
        assert snapshot.from_dict(d).to_bytes() == state.to_bytes()
    return states


def _at(d: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        d = d[key]
    return d


def check_dict(
    d: Any, path: tuple[Any, ...] = (), traced: Traced = contextlib.nullcontext
) -> VcpuState | None:
    """snapshot.from_dict (of JSON): refuses, or gives a state the other forms carry exactly.

    ``path`` is where the input was damaged (an edited vendor header may override hdr_raw).
    """
    count("dict")
    text = json.dumps(d)
    try:
        with traced():
            state = snapshot.from_dict(json.loads(text))
    except PARSE_ERRORS:
        return None
    count("dict accepted")
    data = state.to_bytes()
    again = snapshot.loads_vcpu(data)
    assert again.to_bytes() == data
    d2 = json.loads(json.dumps(snapshot.to_dict(state)))
    assert snapshot.from_dict(d2).to_bytes() == data
    # Nothing accepted may be silently changed: the dict comes back as given,
    # but for hdr_raw, which an edited vendor header (vmx/svm) overrides by design.
    given = json.loads(text)
    if path[:3] in (("parts", "nested", "vmx"), ("parts", "nested", "svm")):
        given["parts"]["nested"].pop("hdr_raw"), d2["parts"]["nested"].pop("hdr_raw")
    assert d2["parts"] == given["parts"]
    assert d2["absent"] == given.get("absent", {})
    return state


MIRRORS = [
    c
    for m in (uapi, vmcb, vmcs12)
    for n, c in vars(m).items()
    if inspect.isclass(c) and issubclass(c, Mirror) and c.__module__ == m.__name__ and n[0] != "_"
]


def _plain_json(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {k: _plain_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_json(v) for v in value]
    return value


def _loses_padding(cls: Any) -> bool:
    """Whether the layout has bytes no field covers (from_dict could not give them back)."""
    full = cls.from_bytes(b"\xff" * ctypes.sizeof(cls))
    return bool(cls.from_dict(full.to_dict()) != full)


def test_no_mirror_loses_padding() -> None:
    """Implicit C padding is named (``_pad``): every byte survives the dict form."""
    assert [c.__name__ for c in MIRRORS if _loses_padding(c)] == []


def check_mirror_bytes(cls: Any, data: bytes) -> None:
    """Struct.from_bytes: exact length or ValueError; accepted bytes survive both dict forms."""
    count("mirror bytes")
    try:
        obj = cls.from_bytes(data)
    except PARSE_ERRORS:
        assert len(data) != ctypes.sizeof(cls)
        return
    count("mirror bytes accepted")
    assert obj.to_bytes() == bytes(data)
    for d in (obj.to_dict(), json.loads(json.dumps(_plain_json(obj.to_dict())))):
        assert cls.from_dict(d) == obj, f"{cls.__name__} changed"


def _union_member(cls: Any, path: tuple[Any, ...]) -> tuple[Any, Any] | None:
    """The (union, member) a to_dict path passes through first, or None (no union on it)."""
    obj = cls()
    for key in path:
        if isinstance(obj, ctypes.Union):
            return obj, getattr(obj, key)
        obj = obj[key] if isinstance(key, int) else getattr(obj, key)
    return None


def check_mirror_dict(cls: Any, d: Any, path: tuple[Any, ...]) -> None:
    """Struct.from_dict: refuses with ValueError/TypeError, or keeps exactly what it was given.

    Through a union the other members (which show the bytes before the edit) give way:
    the edited one is kept, unless it is a raw byte member (the structured ones win).
    """
    count("mirror dict")
    try:
        obj = cls.from_dict(d)
    except PARSE_ERRORS:
        return
    count("mirror dict accepted")
    assert cls.from_dict(obj.to_dict()) == obj
    given_back = _plain_json(obj.to_dict())
    if given_back != _plain_json(d):
        through = _union_member(cls, path)
        assert through is not None, f"from_dict changed {path}"
        count("mirror dict edited a union")
        _, member = through
        raw = isinstance(member, ctypes.Array) and member._type_ is ctypes.c_uint8
        if not raw:
            assert _at(given_back, path) == _at(_plain_json(d), path), f"{path} undone"


def check_cli(data: bytes, workdir: Path, traced: Traced = contextlib.nullcontext) -> None:
    """The CLI's loader: one CliError for bad blobs; ``decode`` never raises, status 0 or 2."""
    count("cli")
    path = workdir / "blob.bin"
    path.write_bytes(data)
    try:
        with traced():
            state = kcli._load_blob(str(path))
    except kcli.CliError:
        state = None
    else:
        count("cli accepted")
        assert state.to_bytes() == data
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = kcli.main(["decode", "--json", str(path)])
    assert status == (2 if state is None else 0), err.getvalue()
    if state is None:
        assert err.getvalue().count("\n") == 1 and out.getvalue() == ""
    else:
        assert json.loads(out.getvalue())["fields"]["size"] == len(data)


# --- seeds and grammars ---------------------------------------------------------------------


def nested_seed(fmt: int, size: int, flags: int = 0, fill: int = 0) -> bytes:
    body = bytearray(bytes([fill]) * size)
    struct.pack_into("<HHI", body, 0, flags, fmt, size)
    if size >= 24:
        struct.pack_into("<QQ", body, 8, 0x3000, 0x4000)
    return bytes(body)


NESTED_SEEDS = [
    nested_seed(0, HEADER_SIZE),
    nested_seed(0, HEADER_SIZE + 4096, flags=1),
    nested_seed(0, VMX_MAX_SIZE, flags=3, fill=0x11),
    nested_seed(1, HEADER_SIZE, flags=0x100),
    nested_seed(1, SVM_MAX_SIZE, flags=0x101, fill=0x22),
    nested_seed(1, 200),
]


def _sample_state(rng: random.Random) -> VcpuState:
    state = VcpuState()
    for part, cls in FIXED_PARTS.items():
        if rng.random() < 0.5:
            raw = bytes(rng.getrandbits(8) for _ in range(ctypes.sizeof(cls)))
            setattr(state, part, cls.from_bytes(raw))
    if rng.random() < 0.5:
        n = rng.randrange(4)
        cpuid = uapi.kvm_cpuid2.new(n)
        for entry in cpuid.items():
            entry.function, entry.eax = rng.getrandbits(32), rng.getrandbits(32)
        state.cpuid = cpuid
    if rng.random() < 0.5:
        state.msrs = {rng.getrandbits(32): rng.getrandbits(64) for _ in range(rng.randrange(4))}
    if rng.random() < 0.5:
        state.tsc_khz = rng.getrandbits(32)
    if rng.random() < 0.5:
        state.xsave = uapi.kvm_xsave.sized(4096 + 4 * rng.randrange(3))
    if rng.random() < 0.5:
        state.nested = NestedState.from_bytes(rng.choice(NESTED_SEEDS))
    if rng.random() < 0.3:
        state.absent["lapic"] = "no irqchip"
    if rng.random() < 0.3:
        state.extra["future.part"] = b"\x01\x02"
    return state


def _real_state() -> VcpuState | None:
    """A vCPU's real saved state, when /dev/kvm works: the best seed there is."""
    try:
        with kvmstate.Kvm() as kvm, kvm.create_vm() as vm:
            vm.create_irqchip()
            with vm.create_vcpu(0) as vcpu:
                vcpu.set_cpuid2(kvm.get_supported_cpuid())
                return vcpu.save_state()
    except OSError:
        return None


_rng = random.Random(SEED)
STATE_SEEDS = [_sample_state(_rng) for _ in range(6)]
_real = _real_state()
if _real is not None:
    STATE_SEEDS.append(_real)
FILE_SEEDS = [snapshot.dumps_vm([s]) for s in STATE_SEEDS] + [snapshot.dumps_vm(STATE_SEEDS[:3])]

INTERESTING = [0, 1, 2, 7, 8, 0x7F, 0x80, 0xFF, 0x100, 0xFFFF, 127, 128, 4096, 4224, 8320]
INTERESTING += [2**31 - 1, 2**31, 2**32 - 1, 2**63, 2**64 - 1]


def mutate_bytes(data: bytes, rng: random.Random, others: list[bytes]) -> bytes:
    """One random damage: flips, interesting words, inserts, deletes, splices, truncation."""
    b = bytearray(data)
    kind = rng.randrange(9)
    if kind == 0 and b:
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
    elif kind == 1 and b:
        b[rng.randrange(len(b))] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, rng.getrandbits(8)])
    elif kind == 2 and len(b) >= 8:
        width = rng.choice([2, 4, 8])
        i = rng.randrange(len(b) - width + 1)
        value = rng.choice([*INTERESTING, len(b), len(b) - 1, len(b) + 1]) % (1 << (8 * width))
        b[i : i + width] = value.to_bytes(width, "little")
    elif kind == 3:
        i = rng.randrange(len(b) + 1)
        b[i:i] = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 17)))
    elif kind == 4 and b:
        i = rng.randrange(len(b))
        del b[i : i + rng.randrange(1, 65)]
    elif kind == 5 and b:
        i = rng.randrange(len(b))
        chunk = b[i : i + rng.randrange(1, 65)]
        j = rng.randrange(len(b) + 1)
        b[j:j] = chunk
    elif kind == 6 and others:
        other = rng.choice(others)
        i, j = rng.randrange(len(b) + 1), rng.randrange(len(other) + 1)
        b = b[:i] + other[j:]
    elif kind == 7 and b:
        del b[rng.randrange(len(b)) :]
    elif kind == 8 and len(b) >= 8:
        # Keep a nested header self-consistent so the parser goes deeper.
        struct.pack_into("<HI", b, 2, rng.choice([0, 1]), len(b))
    return bytes(b)


def _records(data: bytes) -> list[tuple[bytes, bytes]] | None:
    """Split a record sequence leniently (None if it does not split)."""
    out, pos = [], 0
    while pos < len(data):
        if len(data) - pos < 10:
            return None
        (taglen,) = struct.unpack_from("<H", data, pos)
        tag = data[pos + 2 : pos + 2 + taglen]
        pos += 2 + taglen
        if len(data) - pos < 8:
            return None
        (length,) = struct.unpack_from("<Q", data, pos)
        pos += 8
        if length > len(data) - pos:
            return None
        out.append((tag, data[pos : pos + length]))
        pos += length
    return out


def _join(records: list[tuple[bytes, bytes]]) -> bytes:
    return b"".join(
        struct.pack("<H", len(t)) + t + struct.pack("<Q", len(p)) + p for t, p in records
    )


TAGS = [p.encode() for p in (*FIXED_PARTS, "xsave", "cpuid", "msrs", "tsc_khz", "nested")]
TAGS += [b"absent", b"meta", b"vcpu", b"future.part", b"BAD", b""]


def mutate_file(data: bytes, rng: random.Random, others: list[bytes]) -> bytes:
    """Structure-aware damage: change one record of one vCPU keeping lengths consistent."""
    head, body = data[:12], data[12:]
    top = _records(body)
    if top is None or rng.random() < 0.25:
        return mutate_bytes(data, rng, others)
    vcpus = [i for i, (t, _) in enumerate(top) if t == b"vcpu"]
    if not vcpus or rng.random() < 0.15:
        top.insert(rng.randrange(len(top) + 1), (rng.choice(TAGS), bytes(rng.randrange(20))))
        return head + _join(top)
    i = rng.choice(vcpus)
    parts = _records(top[i][1]) or []
    choice = rng.randrange(4)
    if choice == 0 or not parts:
        parts.insert(rng.randrange(len(parts) + 1), (rng.choice(TAGS), bytes(rng.randrange(64))))
    elif choice == 1:
        del parts[rng.randrange(len(parts))]
    elif choice == 2:
        j = rng.randrange(len(parts))
        parts[j] = (rng.choice(TAGS), parts[j][1])
    else:
        j = rng.randrange(len(parts))
        parts[j] = (parts[j][0], mutate_bytes(parts[j][1], rng, []))
    top[i] = (b"vcpu", _join(parts))
    return head + _join(top)


def dict_paths(d: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path in a to_dict tree (containers and leaves), hdr_raw excluded.

    hdr_raw of the wrong length makes from_dict read past it (a known memory-safety bug,
    xfail in test_hostile): fuzzing it in-process could crash the interpreter.
    """
    out = [prefix] if prefix else []
    if prefix[-1:] == ("hdr_raw",):
        return []
    items = d.items() if isinstance(d, dict) else enumerate(d) if isinstance(d, list) else ()
    for k, v in items:
        out += dict_paths(v, (*prefix, k))
    return out


def replaced(d: Any, path: tuple[Any, ...], value: Any) -> Any:
    d = copy.deepcopy(d)
    node = d
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return d


def random_json(rng: random.Random) -> Any:
    return rng.choice(
        [
            lambda: rng.choice(INTERESTING),
            lambda: -rng.choice(INTERESTING),
            lambda: 2**1000,
            lambda: rng.random() * 100,
            lambda: rng.choice([True, False, None]),
            lambda: rng.choice(["", "zz", "0x10", "00", "1.0", "ab" * 60, "00" * 4096]),
            lambda: [rng.randrange(3) for _ in range(rng.randrange(3))],
            lambda: {"x": 1} if rng.random() < 0.5 else {},
        ]
    )()


# --- hypothesis ---------------------------------------------------------------------------


def hsettings(examples: int) -> Any:
    # No per-example deadline: the count bounds the run, and a loaded machine is no bug.
    return settings(
        max_examples=examples * SCALE,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@st.composite
def patched(draw: st.DrawFn, base: bytes) -> bytes:
    """``base`` with a few random patches (sparse: big blobs stay within hypothesis's buffer)."""
    b = bytearray(base)
    for _ in range(draw(st.integers(0, 6))):
        if not b:
            break
        at = draw(st.integers(0, len(b) - 1))
        chunk = draw(st.binary(min_size=1, max_size=16))
        b[at : at + len(chunk)] = chunk[: len(b) - at]
    return bytes(b)


@st.composite
def nested_blobs(draw: st.DrawFn) -> bytes:
    length = draw(st.sampled_from([0, 8, 127, 128, 129, 200, 4224, 4225, 8320, 8321]))
    fmt = draw(st.sampled_from([0, 1, 0, 1, 2, 0xFFFF]))
    size = draw(
        st.one_of(st.just(length), st.sampled_from(INTERESTING[:15]), st.integers(0, 2**32 - 1))
    )
    body = bytearray(draw(patched(bytes(length))))
    if length >= 8:
        struct.pack_into("<HHI", body, 0, draw(st.integers(0, 0xFFFF)), fmt, size % 2**32)
    return bytes(body)


@hsettings(300)
@given(nested_blobs())
def test_nested_from_bytes(data: bytes) -> None:
    check_nested(data)


@st.composite
def damaged_files(draw: st.DrawFn) -> bytes:
    data = draw(st.sampled_from(FILE_SEEDS))
    rng = random.Random(draw(st.integers(0, 2**32)))
    for _ in range(draw(st.integers(0, 3))):
        data = mutate_file(data, rng, FILE_SEEDS)
    return draw(patched(data)) if draw(st.booleans()) else data


@hsettings(150)
@given(damaged_files())
def test_loads_vm(data: bytes) -> None:
    check_file(data)


JSON_VALUES = st.one_of(
    st.integers(-(2**70), 2**70),
    st.sampled_from([*INTERESTING, 2**1000, -1]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.none(),
    st.text(max_size=8),
    st.binary(max_size=8).map(bytes.hex),
    st.lists(st.integers(0, 3), max_size=3),
    st.dictionaries(st.sampled_from(["x", "rax", "0x10"]), st.integers(0, 3), max_size=2),
)
STATE_DICTS = [json.loads(json.dumps(snapshot.to_dict(s))) for s in STATE_SEEDS]


@hsettings(400)
@given(st.sampled_from(STATE_DICTS), st.data())
def test_from_dict(d: dict[str, Any], data: st.DataObject) -> None:
    paths = dict_paths(d)
    path = data.draw(st.sampled_from(paths)) if paths else ()
    damaged = replaced(d, path, data.draw(JSON_VALUES)) if path else d
    check_dict(damaged, path)


@hsettings(300)
@given(st.sampled_from(MIRRORS), st.sampled_from([0, 0, 0, -1, 1, -8, 8]), st.data())
def test_mirror_from_bytes(cls: Any, delta: int, data: st.DataObject) -> None:
    n = max(ctypes.sizeof(cls) + delta, 0)
    check_mirror_bytes(cls, data.draw(patched(bytes(n))))


@hsettings(300)
@given(st.sampled_from(MIRRORS), st.data())
def test_mirror_from_dict(cls: Any, data: st.DataObject) -> None:
    d = cls.from_bytes(data.draw(patched(bytes(ctypes.sizeof(cls))))).to_dict()
    paths = dict_paths(d)
    path = data.draw(st.sampled_from(paths))
    check_mirror_dict(cls, replaced(d, path, data.draw(JSON_VALUES)), path)


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="kvmstate-fuzz-") as tmp:
        yield Path(tmp)


@hsettings(150)
@given(nested_blobs())
def test_cli_blob_loader(workdir: Path, data: bytes) -> None:
    check_cli(data, workdir)


# --- the coverage-guided loop -----------------------------------------------------------------


class Edges:
    """The (code, line, next line) edges of kvmstate code run inside :meth:`traced`."""

    def __init__(self) -> None:
        self.seen: set[tuple[Any, int, int]] = set()
        self.last: set[tuple[Any, int, int]] = set()

    @contextlib.contextmanager
    def traced(self) -> Iterator[None]:
        edges = self.last = set()

        def on_call(frame: Any, event_: str, arg: Any) -> Any:
            code = frame.f_code
            if not code.co_filename.startswith(PKG):
                return None
            last = [0]

            def on_line(frame: Any, event_: str, arg: Any) -> Any:
                if event_ == "line":
                    edges.add((code, last[0], frame.f_lineno))
                    last[0] = frame.f_lineno
                return on_line

            return on_line

        previous = sys.gettrace()
        sys.settrace(on_call)
        try:
            yield
        finally:
            sys.settrace(previous)


def guided(
    name: str,
    oracle: Callable[[Any, Traced], Any],
    seeds: list[Any],
    mutate: Callable[[Any, random.Random, list[Any]], Any],
    show: Callable[[Any], str] = lambda x: bytes(x).hex(),
) -> None:
    """Mutate the corpus for SECONDS; keep inputs that reach new edges; the oracle judges each."""
    rng = random.Random(f"{SEED}:{name}")
    cover = Edges()
    corpus = list(seeds)
    for s in corpus:
        oracle(s, cover.traced)
        cover.seen |= cover.last
    start_edges = len(cover.seen)
    runs, deadline = 0, time.monotonic() + SECONDS
    while time.monotonic() < deadline and runs < 200_000:
        child = mutate(rng.choice(corpus), rng, corpus)
        runs += 1
        try:
            oracle(child, cover.traced)
        except BaseException as exc:
            pytest.fail(f"{name}: {type(exc).__name__}: {exc}\nreproducer: {show(child)[:4000]}")
        new = cover.last - cover.seen
        if new:
            cover.seen |= new
            corpus.append(child)
    count(f"guided {name} runs", runs)
    count(f"guided {name} edges", len(cover.seen))
    count(f"guided {name} corpus", len(corpus))
    assert len(cover.seen) >= start_edges


def test_guided_nested_from_bytes() -> None:
    guided("nested", check_nested, NESTED_SEEDS, mutate_bytes)


def test_guided_loads_vm() -> None:
    guided("file", check_file, FILE_SEEDS, mutate_file)


def test_guided_cli_blob_loader(workdir: Path) -> None:
    guided("cli", lambda b, t: check_cli(b, workdir, t), NESTED_SEEDS[:4], mutate_bytes)


def _mutate_dict(item: Any, rng: random.Random, corpus: list[Any]) -> Any:
    d, _ = item
    paths = dict_paths(d)
    if not paths:
        return item
    path = rng.choice(paths)
    return replaced(d, path, random_json(rng)), path


def test_guided_from_dict() -> None:
    guided(
        "dict",
        lambda item, t: check_dict(*item, traced=t),
        [(d, ()) for d in STATE_DICTS],
        _mutate_dict,
        show=lambda item: f"path {item[1]}: {json.dumps(item[0])}",
    )


# --- atheris (optional) -------------------------------------------------------------------------

ATHERIS_SCRIPT = """
import sys, atheris
with atheris.instrument_imports():
    from tests import test_fuzz as f
targets = [f.check_nested, f.check_file]

def one(data):
    if not data:
        return
    targets[data[0] % len(targets)](data[1:])

atheris.Setup(sys.argv, one)
atheris.Fuzz()
"""


def test_atheris() -> None:
    if importlib.util.find_spec("atheris") is None:
        pytest.skip("atheris is not installed (optional: pip install atheris)")
    seconds = max(1, int(SECONDS))
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-c", ATHERIS_SCRIPT, f"-max_total_time={seconds}", "-rss_limit_mb=2048"],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=seconds + 120,
        env={**os.environ, "PYTHONPATH": str(repo)},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_zz_fuzz_totals(capsys: pytest.CaptureFixture[str]) -> None:
    """Print what the fuzzers ran (shown without -s too)."""
    parts = ", ".join(f"{k} {v}" for k, v in sorted(TOTALS.items()))
    with capsys.disabled():
        print(f"\nfuzz ({SECONDS:g} s per guided target, scale {SCALE}, seed {SEED}): {parts}")
