"""kvmstate.formats.cbor: RFC 8949's own examples, hostile input, and a fuzz.

The expected encodings are RFC 8949 Appendix A's table (the standard, not
this code), and a second encoder written apart from the library
(tests/support/vmm_files.py) must agree with :func:`cbor.dumps`.
"""

from __future__ import annotations

import contextlib
import doctest
import math
import tracemalloc
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmstate.formats import cbor
from kvmstate.formats.cbor import CborError, Tag
from tests.support import vmm_files

# RFC 8949, Appendix A: value -> encoding (those whose encoding is the shortest form).
RFC_EXAMPLES: list[tuple[Any, str]] = [
    (0, "00"),
    (1, "01"),
    (10, "0a"),
    (23, "17"),
    (24, "1818"),
    (25, "1819"),
    (100, "1864"),
    (1000, "1903e8"),
    (1000000, "1a000f4240"),
    (1000000000000, "1b000000e8d4a51000"),
    (18446744073709551615, "1bffffffffffffffff"),
    (-18446744073709551616, "3bffffffffffffffff"),
    (-1, "20"),
    (-10, "29"),
    (-100, "3863"),
    (-1000, "3903e7"),
    (0.0, "f90000"),
    (-0.0, "f98000"),
    (1.0, "f93c00"),
    (1.1, "fb3ff199999999999a"),
    (1.5, "f93e00"),
    (65504.0, "f97bff"),
    (100000.0, "fa47c35000"),
    (3.4028234663852886e38, "fa7f7fffff"),
    (1.0e300, "fb7e37e43c8800759c"),
    (5.960464477539063e-8, "f90001"),
    (0.00006103515625, "f90400"),
    (-4.0, "f9c400"),
    (-4.1, "fbc010666666666666"),
    (math.inf, "f97c00"),
    (-math.inf, "f9fc00"),
    (False, "f4"),
    (True, "f5"),
    (None, "f6"),
    (b"", "40"),
    (bytes.fromhex("01020304"), "4401020304"),
    ("", "60"),
    ("a", "6161"),
    ("IETF", "6449455446"),
    ('"\\', "62225c"),
    ("\u00fc", "62c3bc"),
    ("\u6c34", "63e6b0b4"),
    ("\U00010151", "64f0908591"),
    ([], "80"),
    ([1, 2, 3], "83010203"),
    ([1, [2, 3], [4, 5]], "8301820203820405"),
    (list(range(1, 26)), "98190102030405060708090a0b0c0d0e0f101112131415161718181819"),
    ({}, "a0"),
    ({1: 2, 3: 4}, "a201020304"),
    ({"a": 1, "b": [2, 3]}, "a26161016162820203"),
    (["a", {"b": "c"}], "826161a161626163"),
    (
        {"a": "A", "b": "B", "c": "C", "d": "D", "e": "E"},
        "a56161614161626142616361436164614461656145",
    ),
]


@pytest.mark.parametrize(("value", "encoded"), RFC_EXAMPLES, ids=[e for _, e in RFC_EXAMPLES])
def test_rfc_examples_decode_and_encode(value: Any, encoded: str) -> None:
    data = bytes.fromhex(encoded)
    got = cbor.loads(data)
    assert got == value and type(got) is type(value)
    if isinstance(value, float) and value == 0:
        assert math.copysign(1, got) == math.copysign(1, value)
    assert cbor.dumps(value).hex() == encoded


def test_nan_decodes_and_encodes_as_ciborium_does() -> None:
    assert math.isnan(cbor.loads(bytes.fromhex("f97e00")))
    assert math.isnan(cbor.loads(bytes.fromhex("fa7fc00000")))
    assert cbor.dumps(math.nan).hex() == "f97e00"


def test_non_shortest_forms_are_read() -> None:
    # RFC 8949 allows a longer head than needed; the same value comes back.
    assert cbor.loads(bytes.fromhex("1b0000000000000001")) == 1
    assert cbor.loads(bytes.fromhex("b900010102")) == {1: 2}


@pytest.mark.parametrize(
    ("encoded", "number", "inner"),
    [("c074323031332d30332d32315432303a30343a30305a", 0, "2013-03-21T20:04:00Z"),
     ("c11a514b67b0", 1, 1363896240),
     ("d82076687474703a2f2f7777772e6578616d706c652e636f6d", 32, "http://www.example.com")],
)  # fmt: skip
def test_tags_are_refused_or_kept(encoded: str, number: int, inner: Any) -> None:
    data = bytes.fromhex(encoded)
    with pytest.raises(CborError, match=f"offset 0: tag {number} is not supported"):
        cbor.loads(data)
    assert cbor.loads(data, tags=True) == Tag(number, inner)
    assert cbor.dumps(Tag(number, inner)) == data


@pytest.mark.parametrize(
    ("encoded", "message"),
    [
        ("", "offset 0: truncated"),
        ("18", "offset 1: an argument needs 1 bytes, 0 are left"),
        ("1b0000", "needs 8 bytes, 2 are left"),
        ("5bffffffffffffffff", "a byte string needs 18446744073709551615 bytes"),
        ("7a7fffffff61", "a text string needs 2147483647 bytes, 1 are left"),
        ("9b00000000ffffffff00", "array of 4294967295 items cannot fit in the 1 bytes left"),
        ("bb0000000100000000", "map of 4294967296 items cannot fit in the 0 bytes left"),
        ("9f01ff", "offset 0: indefinite-length items are not supported"),
        ("5f4101ff", "indefinite-length"),
        ("1c", "offset 0: reserved additional information 28"),
        ("ff", "offset 0: indefinite-length items are not supported"),
        ("f7", "undefined is not supported"),
        ("f820", "simple value 32 is not supported"),
        ("f0", "simple 16"),
        ("62c328", "offset 0: text string is not UTF-8"),
        ("a2010201 03", "offset 3: repeated map key 1"),
        ("a1820102 03", "offset 1: map key of type list"),
        ("0102", "offset 1: 1 bytes after the item"),
        ("8301 02", "offset 0: array of 3 items cannot fit in the 2 bytes left"),
        ("820018", "offset 3: an argument needs 1 bytes, 0 are left"),
        ("a1000100", "offset 3: 1 bytes after the item"),
    ],
)
def test_malformed_input_is_refused_with_its_offset(encoded: str, message: str) -> None:
    with pytest.raises(CborError, match=message.replace("(", r"\(")) as info:
        cbor.loads(bytes.fromhex(encoded))
    assert isinstance(info.value, ValueError)
    assert str(info.value).startswith(f"offset {info.value.offset}: ")


def test_deep_nesting_stops_at_the_limit_without_recursing_further() -> None:
    data = b"\x81" * 100_000 + b"\x00"
    with pytest.raises(CborError, match=f"offset {cbor.MAX_DEPTH}: nested deeper than 64"):
        cbor.loads(data)
    assert cbor.loads(b"\x81" * 10 + b"\x00", max_depth=10) == [[[[[[[[[[0]]]]]]]]]]
    with pytest.raises(CborError, match="nested deeper than 9"):
        cbor.loads(b"\x81" * 10 + b"\x00", max_depth=9)


def test_huge_declared_lengths_are_refused_before_any_allocation() -> None:
    lies = [b"\x9b" + b"\xff" * 8, b"\xbb" + b"\xff" * 8, b"\x5b" + b"\xff" * 8 + b"\x00"]
    tracemalloc.start()
    try:
        for data in lies:
            with pytest.raises(CborError, match=r"cannot fit|needs"):
                cbor.loads(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20  # not the 2**64 items or bytes the heads declare


def test_dumps_refuses_what_has_no_cbor_form() -> None:
    with pytest.raises(TypeError, match="cannot encode set"):
        cbor.dumps({1, 2})
    with pytest.raises(ValueError, match="does not fit in a CBOR integer"):
        cbor.dumps(1 << 64)
    with pytest.raises(ValueError, match="does not fit in a CBOR integer"):
        cbor.dumps(-(1 << 64) - 1)
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(ValueError, match="nested deeper than 64"):
        cbor.dumps(loop)
    with pytest.raises(ValueError, match="tag number"):
        cbor.dumps(Tag(-1, 0))
    with pytest.raises(TypeError, match="bytes-like"):
        cbor.loads("a0")  # type: ignore[arg-type]


def test_head_is_the_shortest() -> None:
    assert [cbor.head(4, n).hex() for n in (0, 23, 24, 255, 256, 65536, 1 << 32)] == [
        "80", "97", "9818", "98ff", "990100", "9a00010000", "9b0000000100000000",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="no CBOR head"):
        cbor.head(8, 0)


def test_map_items_gives_each_values_own_bytes() -> None:
    data = bytes.fromhex("a3 6161 1903e8 6162 82 01 f6 01 a0".replace(" ", ""))
    assert cbor.map_items(data) == [
        ("a", 1000, bytes.fromhex("1903e8")),
        ("b", [1, None], bytes.fromhex("8201f6")),
        (1, {}, bytes.fromhex("a0")),
    ]
    with pytest.raises(CborError, match="offset 0: expected a map"):
        cbor.map_items(b"\x80")
    with pytest.raises(CborError, match="offset 4: repeated map key 'a'"):
        cbor.map_items(bytes.fromhex("a2616101616102"))
    with pytest.raises(CborError, match="bytes after the map"):
        cbor.map_items(bytes.fromhex("a0 00".replace(" ", "")))


def test_module_examples() -> None:
    result = doctest.testmod(cbor, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 4 and result.failed == 0


# --- properties --------------------------------------------------------------------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 64), max_value=(1 << 64) - 1)
    | st.floats(allow_nan=False)
    | st.binary(max_size=40)
    | st.text(max_size=20)
)
_keys = st.integers(min_value=-(1 << 64), max_value=(1 << 64) - 1) | st.text(max_size=8)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(_keys, inner, max_size=6),
    max_leaves=30,
)


@given(_values)
@settings(max_examples=300, deadline=None)
def test_round_trip(value: Any) -> None:
    data = cbor.dumps(value)
    assert cbor.loads(data) == value
    assert cbor.dumps(cbor.loads(data)) == data


@given(_values.filter(lambda v: not _has_float(v)))
@settings(max_examples=200, deadline=None)
def test_agrees_with_an_independent_encoder(value: Any) -> None:
    assert cbor.dumps(value) == vmm_files.cbor(value)


def _has_float(value: Any) -> bool:
    if isinstance(value, float):
        return True
    if isinstance(value, list):
        return any(_has_float(v) for v in value)
    if isinstance(value, dict):
        return any(_has_float(v) for v in value.values())
    return False


@given(st.binary(max_size=200))
@settings(max_examples=2000, deadline=None)
def test_fuzz_random_bytes_decode_or_raise_value_error(data: bytes) -> None:
    with contextlib.suppress(CborError):
        cbor.loads(data, tags=True)
    with contextlib.suppress(CborError):
        cbor.map_items(data)


_SAMPLE = cbor.dumps(
    {"vcpu_id": 3, "regs": {"rax": 1 << 40, "rip": 0xFFF0}, "xs": list(range(300)), "n": None}
)


@given(
    st.lists(st.tuples(st.integers(0, len(_SAMPLE) - 1), st.integers(0, 255)), max_size=8),
    st.integers(0, len(_SAMPLE)),
)
@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_fuzz_mutated_documents_decode_or_raise_value_error(
    pokes: list[tuple[int, int]], cut: int
) -> None:
    data = bytearray(_SAMPLE)
    for offset, value in pokes:
        data[offset] = value
    for candidate in (bytes(data), bytes(data[:cut])):
        with contextlib.suppress(CborError):
            cbor.loads(candidate)
