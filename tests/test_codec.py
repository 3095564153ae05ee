"""The generated to_dict/from_dict of plain mirrors (kvmstate._codec) against ctypes itself.

The oracle is ctypes: each mirror's fields read one by one through its own
descriptors (whose offsets the gcc layout tests pin), on random bytes. The
fast write must give back the very bytes, and refuse what the generic walk
refuses with the same message naming the field.
"""

from __future__ import annotations

import ctypes
import inspect
import os
from typing import Any

import pytest

from kvmstate import _codec, uapi, vmcb
from kvmstate._struct import Mirror

MIRRORS = sorted(
    (
        cls
        for cls in vars(uapi).values()
        if inspect.isclass(cls)
        and issubclass(cls, Mirror)
        and cls.__module__ == uapi.__name__
        and "_fields_" in cls.__dict__
    ),
    key=lambda cls: cls.__name__,
)
FAST = [cls for cls in MIRRORS if _codec.codec(cls) is not None]


def by_ctypes(value: Any) -> Any:
    """What a field holds, read through ctypes: ints, dicts, lists, bytes for u8 arrays."""
    if isinstance(value, ctypes.Structure):
        names = [
            f[0] for k in reversed(type(value).__mro__) for f in k.__dict__.get("_fields_", ())
        ]
        return {n: by_ctypes(getattr(value, n)) for n in names}
    if isinstance(value, ctypes.Array):
        if value._type_ is ctypes.c_uint8:
            return bytes(value)
        return [by_ctypes(v) for v in value]
    assert type(value) is int
    return value


def random_mirror(cls: type[Any]) -> Any:
    return cls.from_buffer_copy(os.urandom(ctypes.sizeof(cls)))


def raw(obj: Any) -> bytes:
    return ctypes.string_at(ctypes.addressof(obj), ctypes.sizeof(obj))


def hexed(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {k: hexed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [hexed(v) for v in value]
    return value


def test_the_state_mirrors_have_a_codec() -> None:
    # Every fixed-size part of a VcpuState but the XSAVE area (1024 words: hex in JSON).
    for cls in (
        uapi.kvm_regs,
        uapi.kvm_sregs,
        uapi.kvm_sregs2,
        uapi.kvm_fpu,
        uapi.kvm_xcrs,
        uapi.kvm_vcpu_events,
        uapi.kvm_debugregs,
        uapi.kvm_mp_state,
        uapi.kvm_lapic_state,
        uapi.kvm_cpuid_entry2,
    ):
        assert cls in FAST, cls.__name__


def test_unions_and_bitfields_take_the_generic_walk() -> None:
    assert _codec.codec(uapi.kvm_nested_state_hdr) is None  # a union
    assert _codec.codec(vmcb.vmcb_control_area) is None  # bitfields and a union
    control = random_mirror(vmcb.vmcb_control_area)
    again = vmcb.vmcb_control_area.from_dict(control.to_dict())
    assert raw(again) == raw(control)


@pytest.mark.parametrize("cls", FAST, ids=lambda c: c.__name__)
def test_to_dict_reads_what_ctypes_reads(cls: type[Any]) -> None:
    for _ in range(3):
        obj = random_mirror(cls)
        expected = by_ctypes(obj)
        assert obj.to_dict() == expected
        assert obj.to_dict(hex_bytes=True) == hexed(expected)


@pytest.mark.parametrize("cls", FAST, ids=lambda c: c.__name__)
def test_from_dict_writes_the_very_bytes(cls: type[Any]) -> None:
    for _ in range(3):
        obj = random_mirror(cls)
        assert raw(cls.from_dict(by_ctypes(obj))) == raw(obj)
        assert raw(cls.from_dict(hexed(by_ctypes(obj)))) == raw(obj)


def sregs_dict() -> dict[str, Any]:
    return by_ctypes(random_mirror(uapi.kvm_sregs))  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("edit", "error", "message"),
    [
        (lambda d: d["cs"].update(base=True), TypeError, r"sregs\.cs\.base: expected an int"),
        (lambda d: d["cs"].update(base=1 << 64), ValueError, r"sregs\.cs\.base: .* 64 bits"),
        (lambda d: d["cs"].update(type=-1), ValueError, r"sregs\.cs\.type: -1 does not fit"),
        (lambda d: d.update(cr0=1.0), TypeError, r"sregs\.cr0: expected an int"),
        (lambda d: d.pop("efer"), ValueError, r"sregs: unknown fields \[\], missing \['efer'\]"),
        (lambda d: d.update(bogus=1), ValueError, r"sregs: unknown fields \['bogus'\]"),
        (lambda d: d.update(cs=[]), TypeError, r"sregs\.cs: expected a mapping"),
        (
            lambda d: d.update(interrupt_bitmap=[0, 0, 0]),
            ValueError,
            r"sregs\.interrupt_bitmap: expected a list of 4 items",
        ),
    ],
    ids=["bool", "too-big", "negative", "float", "missing", "unknown", "not-a-dict", "short"],
)
def test_from_dict_refuses_as_the_generic_walk(edit: Any, error: type, message: str) -> None:
    data = sregs_dict()
    edit(data)
    with pytest.raises(error, match=message):
        uapi.kvm_sregs.from_dict(data, path="sregs")


def test_byte_arrays_are_exact() -> None:
    lapic = by_ctypes(random_mirror(uapi.kvm_lapic_state))
    lapic["regs"] = lapic["regs"][:-1]
    with pytest.raises(ValueError, match=r"lapic\.regs: 1023 bytes, the field holds 1024"):
        uapi.kvm_lapic_state.from_dict(lapic, path="lapic")
    lapic["regs"] = "zz" * 1024
    with pytest.raises(ValueError, match=r"lapic\.regs: not a hex string"):
        uapi.kvm_lapic_state.from_dict(lapic, path="lapic")
