"""Nested virtualization state: :class:`NestedState`, an aligned buffer with typed views.

A :class:`NestedState` is the Python counterpart of rust-vmm's
``KvmNestedStateBuffer``: ctypes-backed storage, 8-byte aligned, with
typed views of the 128-byte header (``flags``, ``format``, ``size``,
``hdr.vmx`` / ``hdr.svm``) and of the data area (``vmcs12``,
``shadow_vmcs12``, ``vmcb12``). Unlike that type it is sized to what the
kernel reports (4224 bytes on AMD, 8320 on Intel) or to any explicit size
of at least 128 bytes, and a 128-byte, header-only state is a state like
any other (VMXON without a current VMCS, SVM's GIF).

The storage is either the object's own or a caller's writable buffer
(:meth:`NestedState.from_buffer`), so state can live in the caller's
``bytearray``, ``mmap`` or ctypes array with no copy.

This module only knows bytes and layouts; :class:`kvmstate.vcpu.Vcpu`
moves them to and from the kernel.
"""

from __future__ import annotations

import array
import ctypes
import functools
import mmap
import operator
import struct
from collections.abc import Mapping

from kvmstate import uapi
from kvmstate._struct import format_value
from kvmstate.uapi import NestedFlag, NestedFormat

TYPE_CHECKING = False  # typing is not imported at run time (see kvmstate._struct)
if TYPE_CHECKING:
    from typing import Any, TypeAlias

    from kvmstate.vmcb import vmcb as Vmcb
    from kvmstate.vmcs12 import vmcs12 as Vmcs12

__all__ = [
    "HEADER_SIZE",
    "KNOWN_FLAGS",
    "SVM_MAX_SIZE",
    "VMX_MAX_SIZE",
    "NestedState",
    "ReadableBuffer",
    "WritableBuffer",
    "vendor_of_capability",
]

# collections.abc.Buffer (3.12) and typing_extensions.Buffer are not available on
# 3.10 without a dependency, and no Protocol can name the buffer protocol before
# 3.12: the aliases list the stdlib types that have it. At run time any object
# with the buffer protocol is accepted; these are what the type checker allows.

#: A writable buffer the kernel can fill in place, as accepted by
#: :meth:`NestedState.from_buffer` and ``Vcpu.get_nested_state(out)``:
#: ``bytearray``, ``memoryview`` (writable), ``mmap.mmap``, ``array.array`` or a
#: ctypes array. It must also be C-contiguous and 8-byte aligned (checked when used).
#:
#: >>> NestedState.from_buffer((ctypes.c_uint64 * 528)()).capacity  # 528 words, aligned
#: 4224
WritableBuffer: TypeAlias = (
    "bytearray | memoryview | mmap.mmap | array.array[Any] | ctypes.Array[Any]"
)
#: A :data:`WritableBuffer` or ``bytes``: state read, never written, as by
#: ``Vcpu.set_nested_state`` and :func:`kvmstate.check.check` (which copy it).
ReadableBuffer: TypeAlias = "bytes | WritableBuffer"

#: Bytes of the fixed header (flags, format, size and the 120-byte vendor
#: header union) before the data pages: ``sizeof(struct kvm_nested_state)``.
HEADER_SIZE = uapi.NESTED_STATE_HEADER_SIZE  # 128
#: Largest VMX state: header, vmcs12, shadow vmcs12 (KVM_CAP_NESTED_STATE on Intel).
VMX_MAX_SIZE = HEADER_SIZE + 2 * uapi.KVM_STATE_NESTED_VMX_VMCS_SIZE  # 8320
#: Largest SVM state: header and vmcb12 (KVM_CAP_NESTED_STATE on AMD).
SVM_MAX_SIZE = HEADER_SIZE + uapi.KVM_STATE_NESTED_SVM_VMCB_SIZE  # 4224


def vendor_of_capability(size: int | None) -> str | None:
    """``"vmx"`` or ``"svm"`` for a ``KVM_CAP_NESTED_STATE`` answer (8320 kvm_intel,
    4224 kvm_amd), None for 0 or any other size.

    >>> vendor_of_capability(4224)
    'svm'
    """
    return _VENDOR_BY_CAPABILITY.get(size or 0)


# Each vendor's KVM_CAP_NESTED_STATE is its largest state.
_VENDOR_BY_CAPABILITY = {VMX_MAX_SIZE: "vmx", SVM_MAX_SIZE: "svm"}
#: Every flag KVM_SET_NESTED_STATE accepts (x86.c refuses the others).
KNOWN_FLAGS = int(
    NestedFlag.GUEST_MODE
    | NestedFlag.RUN_PENDING
    | NestedFlag.EVMCS
    | NestedFlag.MTF_PENDING
    | NestedFlag.GIF_SET
)
_KNOWN_FORMATS = frozenset(int(f) for f in NestedFormat)
# Largest capacity accepted, to turn a nonsense size into an error, not an allocation.
_MAX_CAPACITY = 1 << 24

_DATA_SIZE = uapi.KVM_STATE_NESTED_VMX_VMCS_SIZE  # == KVM_STATE_NESTED_SVM_VMCB_SIZE


def _check_capacity(capacity: object) -> int:
    if not isinstance(capacity, int) or isinstance(capacity, bool):
        raise TypeError(f"capacity must be an int, not {type(capacity).__name__}")
    if capacity < HEADER_SIZE:
        raise ValueError(f"capacity {capacity} is below the {HEADER_SIZE}-byte header")
    if capacity > _MAX_CAPACITY:
        raise ValueError(f"capacity {capacity} is above the {_MAX_CAPACITY}-byte limit")
    return capacity


class NestedState:
    """KVM nested state (``struct kvm_nested_state`` and its data) in an aligned buffer.

    ``NestedState()`` makes an empty 8320-byte buffer (enough for any VMX
    or SVM state), ``NestedState(4224)`` a smaller one; ``Vcpu.get_nested_state``
    fills one sized from ``KVM_CAP_NESTED_STATE``.

    Header fields are read and written by name (``state.flags``,
    ``state.format``, ``state.size``, ``state.hdr.vmx.vmcs12_pa``,
    ``state.hdr.svm.vmcb_pa``). ``vmcs12``, ``shadow_vmcs12`` and ``vmcb12``
    are writable views into the buffer, or ``None`` when the format does
    not have them or ``size``/the buffer does not cover them.
    """

    # __weakref__: a Vcpu remembers the last view it made of a caller's buffer, weakly.
    __slots__ = ("__weakref__", "_capacity", "_hdr_view", "_source", "_storage")

    _storage: ctypes.Array[Any]
    _hdr_view: uapi.kvm_nested_state_header | None
    _capacity: int
    _source: Any  # the caller's buffer a view was made of (None for own storage)

    def __init__(self, capacity: int = VMX_MAX_SIZE) -> None:
        if type(capacity) is not int or not HEADER_SIZE <= capacity <= _MAX_CAPACITY:
            capacity = _check_capacity(capacity)  # raises, naming what is wrong
        # Whole 64-bit words: ctypes allocates them 8-byte (in practice 16-byte) aligned.
        words = (capacity + 7) >> 3
        self._storage = _words(words)()
        self._capacity = words << 3
        self._hdr_view = None
        self._source = None

    def _bind(self, storage: ctypes.Array[Any], source: object) -> None:
        self._storage = storage
        self._capacity = ctypes.sizeof(storage)
        self._hdr_view = None
        self._source = source

    @property
    def source(self) -> object:
        """The caller's buffer this is a view of (:meth:`from_buffer`), else None.

        >>> NestedState.from_buffer(buf).source is buf        # doctest: +SKIP
        True
        """
        return self._source

    @property
    def _header(self) -> uapi.kvm_nested_state_header:
        # Made on first use: a get that only fills the buffer never needs it.
        view = self._hdr_view
        if view is None:
            view = self._hdr_view = uapi.kvm_nested_state_header.from_buffer(self._storage)
        return view

    # --- construction --------------------------------------------------------

    @classmethod
    def from_buffer(cls, buffer: NestedState | WritableBuffer) -> NestedState:
        """A view of a caller's writable buffer (no copy): ``bytearray``, ``mmap``, ctypes...

        The buffer must be C-contiguous, writable, at least 128 bytes and
        8-byte aligned; it stays exported (a ``bytearray`` cannot be resized)
        while the view lives. Its current bytes are kept as they are.
        """
        if isinstance(buffer, NestedState):
            return buffer
        # Always writable and contiguous: bound directly, without a memoryview.
        if type(buffer) is bytearray:
            return cls._view(_chars(_check_capacity(len(buffer))).from_buffer(buffer), buffer)
        if isinstance(buffer, ctypes.Array):
            size = _check_capacity(ctypes.sizeof(buffer))
            return cls._view(_chars(size).from_buffer(buffer), buffer)
        try:
            view = memoryview(buffer)
        except TypeError:
            raise TypeError(
                f"a nested-state buffer must support the buffer protocol, "
                f"not {type(buffer).__name__}"
            ) from None
        if view.readonly:
            raise TypeError(
                f"the {type(buffer).__name__} buffer is read-only; the kernel writes it"
            )
        if not view.c_contiguous:
            raise ValueError("the buffer is not C-contiguous")
        view = view.cast("B")
        _check_capacity(view.nbytes)
        return cls._view(_chars(view.nbytes).from_buffer(view), buffer)

    @classmethod
    def _view(cls, storage: ctypes.Array[Any], source: object) -> NestedState:
        address = ctypes.addressof(storage)
        if address % 8:
            raise ValueError(
                f"the buffer at {address:#x} is not 8-byte aligned "
                "(struct kvm_nested_state holds 64-bit fields)"
            )
        self = cls.__new__(cls)
        self._bind(storage, source)
        return self

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> NestedState:
        """Parse a saved state (the kernel's format: exactly ``size`` bytes), copying it.

        Raises ValueError, naming the field, for a blob shorter than the
        header, a ``size`` field that disagrees with the blob's length, or an
        unknown ``format``.
        """
        try:
            view = memoryview(data).cast("B")
        except TypeError:
            raise TypeError(
                f"from_bytes() needs a bytes-like object, not {type(data).__name__}"
            ) from None
        if view.nbytes < HEADER_SIZE:
            raise ValueError(
                f"truncated nested state: {view.nbytes} bytes, the header alone is {HEADER_SIZE}"
            )
        header = uapi.kvm_nested_state_header.from_buffer_copy(view[:HEADER_SIZE])
        if header.format not in _KNOWN_FORMATS:
            raise ValueError(
                f"unknown nested state format {header.format} (known: 0 = VMX, 1 = SVM)"
            )
        if header.size != view.nbytes:
            raise ValueError(
                f"the size field says {header.size} bytes but the blob has {view.nbytes}"
            )
        self = cls(view.nbytes)
        ctypes.memmove(self._storage, bytes(view), view.nbytes)
        return self

    def copy(self) -> NestedState:
        """A copy with its own storage of the same capacity."""
        other = NestedState(self.capacity)
        ctypes.memmove(other._storage, self._storage, self.capacity)
        return other

    # --- raw access ------------------------------------------------------------

    if TYPE_CHECKING:

        @property
        def capacity(self) -> int:
            """How many bytes the buffer holds (own buffers round up to 8-byte words)."""

        @property
        def storage(self) -> ctypes.Array[Any]:
            """The ctypes array the kernel reads and writes."""

    else:
        # Read-only, and read by C (attrgetter): no Python frame on the ioctl paths,
        # which read both on every call. Neither changes after construction.
        capacity = property(
            operator.attrgetter("_capacity"),
            doc="""How many bytes the buffer holds (own buffers round up to 8-byte words).

            >>> NestedState(4220).capacity
            4224
            """,
        )
        storage = property(
            operator.attrgetter("_storage"),
            doc="""The ctypes array the kernel reads and writes: ``capacity`` bytes, 8-byte aligned.

            What an ioctl is handed, without the memoryview :attr:`buffer` makes per call.

            >>> ctypes.sizeof(NestedState(4096).storage)
            4096
            """,
        )

    @property
    def buffer(self) -> memoryview:
        """A writable byte view of the whole buffer (``capacity`` bytes)."""
        return memoryview(self._storage).cast("B")

    @property
    def header(self) -> uapi.kvm_nested_state_header:
        """The 128-byte header as a ctypes view (flags, format, size, hdr)."""
        return self._header

    def to_bytes(self) -> bytes:
        """The state in the kernel's own format: exactly ``size`` bytes."""
        size = self._header.size
        if not HEADER_SIZE <= size <= self.capacity:
            raise ValueError(
                f"the size field ({size}) must be between {HEADER_SIZE} and the "
                f"buffer's {self.capacity} bytes"
            )
        return ctypes.string_at(ctypes.addressof(self._storage), size)

    # --- header fields ------------------------------------------------------------

    @property
    def flags(self) -> NestedFlag:
        """``KVM_STATE_NESTED_*`` flags, decoded."""
        return NestedFlag(self._header.flags)

    @flags.setter
    def flags(self, value: int) -> None:
        self._header.flags = _u(value, 16, "flags")

    @property
    def format(self) -> NestedFormat | int:
        """``VMX`` or ``SVM`` (a plain int for an unknown format)."""
        fmt = self._header.format
        return NestedFormat(fmt) if fmt in _KNOWN_FORMATS else fmt

    @format.setter
    def format(self, value: int) -> None:
        self._header.format = _u(value, 16, "format")

    @property
    def size(self) -> int:
        """The ``size`` field: how many bytes of this buffer the state uses."""
        return int(self._header.size)

    @size.setter
    def size(self, value: int) -> None:
        self._header.size = _u(value, 32, "size")

    @property
    def hdr(self) -> uapi.kvm_nested_state_hdr:
        """The vendor header union: ``hdr.vmx`` or ``hdr.svm``."""
        return self._header.hdr  # type: ignore[no-any-return]

    @property
    def vmx(self) -> uapi.kvm_vmx_nested_state_hdr:
        """Shortcut for ``hdr.vmx`` (meaningful when ``format`` is VMX)."""
        return self._header.hdr.vmx  # type: ignore[no-any-return]

    @property
    def svm(self) -> uapi.kvm_svm_nested_state_hdr:
        """Shortcut for ``hdr.svm`` (meaningful when ``format`` is SVM)."""
        return self._header.hdr.svm  # type: ignore[no-any-return]

    # --- data views -------------------------------------------------------------------

    def _page(self, fmt: int, index: int) -> Any:
        end = HEADER_SIZE + (index + 1) * _DATA_SIZE
        if self._header.format != fmt or self._header.size < end or self.capacity < end:
            return None
        return _page_type(fmt).from_buffer(self._storage, end - _DATA_SIZE)

    @property
    def vmcs12(self) -> Vmcs12 | None:
        """The cached vmcs12 (VMX, ``size`` >= 4224): a writable :class:`~kvmstate.vmcs12.vmcs12`
        view into the buffer, else None."""
        return self._page(NestedFormat.VMX, 0)  # type: ignore[no-any-return]

    @property
    def shadow_vmcs12(self) -> Vmcs12 | None:
        """The shadow vmcs12 (VMX, ``size`` >= 8320): a writable view, else None."""
        return self._page(NestedFormat.VMX, 1)  # type: ignore[no-any-return]

    @property
    def vmcb12(self) -> Vmcb | None:
        """The vmcb12 (SVM, ``size`` >= 4224): a writable :class:`~kvmstate.vmcb.vmcb` view
        (``vmcb12.control.asid``, ``vmcb12.save.rip``), else None."""
        return self._page(NestedFormat.SVM, 0)  # type: ignore[no-any-return]

    # --- Python protocol ------------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NestedState):
            return NotImplemented
        try:
            return self.to_bytes() == other.to_bytes()
        except ValueError:
            return False

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __len__(self) -> int:
        return self.size

    def __bytes__(self) -> bytes:
        return self.to_bytes()

    def __reduce__(self) -> tuple[Any, ...]:
        return (NestedState.from_bytes, (self.to_bytes(),))

    def summary(self) -> dict[str, Any]:
        """The header as readable fields: what ``repr`` shows, as a dict."""
        h = self._header
        out: dict[str, Any] = {
            "format": self.format,
            "flags": self.flags,
            "size": self.size,
        }
        if h.format == NestedFormat.VMX:
            vmx = h.hdr.vmx
            out["vmxon_pa"] = vmx.vmxon_pa
            out["vmcs12_pa"] = vmx.vmcs12_pa
            if vmx.smm.flags:
                out["smm.flags"] = uapi.NestedSmmFlag(vmx.smm.flags)
            if vmx.flags:
                out["vmx.flags"] = uapi.VmxHeaderFlag(vmx.flags)
            if vmx.flags & uapi.KVM_STATE_VMX_PREEMPTION_TIMER_DEADLINE:
                out["preemption_timer_deadline"] = vmx.preemption_timer_deadline
        elif h.format == NestedFormat.SVM:
            svm = h.hdr.svm
            out["vmcb_pa"] = svm.vmcb_pa
            if svm.gpat:  # 0 unless L2 has its own PAT (Linux 7.2+, quirk disabled)
                out["gpat"] = svm.gpat
        return out

    def __repr__(self) -> str:
        parts = []
        for name, value in self.summary().items():
            if isinstance(value, NestedFormat):
                text = value.name
            elif name.endswith("flags"):
                text = format_value(int(value), "flags", _FLAG_OWNER.get(name))
            else:
                text = format_value(value, name, _DECIMAL)
            parts.append(f"{name}={text}")
        if self.capacity != self.size:
            parts.append(f"capacity={self.capacity}")
        return f"NestedState({', '.join(parts)})"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        """IPython: the summary, then the vendor header and data views."""
        p.text(repr(self))
        if cycle:
            return
        fmt = self._header.format
        with p.indent(2):
            p.break_()
            p.text("hdr.vmx=" if fmt == NestedFormat.VMX else "hdr.svm=")
            p.pretty(self.vmx if fmt == NestedFormat.VMX else self.svm)
            for name in ("vmcs12", "shadow_vmcs12", "vmcb12"):
                view = getattr(self, name)
                if view is not None:
                    p.break_()
                    p.text(f"{name}=")
                    p.pretty(view)


class _Owner:
    def __init__(self, flags: Any = None, decimal: frozenset[str] = frozenset()) -> None:
        self._flags_: Mapping[str, Any] = {"flags": flags} if flags else {}
        self._decimal_ = decimal


_DECIMAL = _Owner(decimal=frozenset({"size"}))
_FLAG_OWNER = {
    "flags": _Owner(NestedFlag),
    "smm.flags": _Owner(uapi.NestedSmmFlag),
    "vmx.flags": _Owner(uapi.VmxHeaderFlag),
}


# The typed view class of each data page (format, page index).
def _page_type(fmt: int) -> Any:
    """The mirror of a format's data page, imported on first use.

    The VMCB and vmcs12 modules are the bulk of ``import kvmstate``; most
    programs never look inside a page.
    """
    if fmt == NestedFormat.SVM:
        from kvmstate.vmcb import vmcb

        return vmcb
    from kvmstate.vmcs12 import vmcs12

    return vmcs12


def _u(value: int, bits: int, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not 0 <= value < (1 << bits):
        raise ValueError(f"{name} {value} does not fit in {bits} bits")
    return value


def check_for_set(state: NestedState) -> ctypes.Array[Any]:
    """Refuse, naming the field, what KVM_SET_NESTED_STATE refuses for sure (x86.c).

    Checked: ``size`` at least the header and within the buffer (the kernel
    reads up to ``size`` bytes), only known flags, RUN_PENDING only with
    GUEST_MODE, a known format. Everything else is the kernel's to judge.
    TypeError for anything but a :class:`NestedState`. Returns the state's
    :attr:`~NestedState.storage`, the buffer to hand the kernel.

    >>> state = NestedState(128)
    >>> state.size = 128
    >>> check_for_set(state) is state.storage
    True
    """
    if type(state) is not NestedState and not isinstance(state, NestedState):
        raise TypeError(f"check_for_set() needs a NestedState, not {type(state).__name__}")
    storage = state._storage
    head, size = _HEAD_SIZE.unpack_from(storage)
    # The usual answer first, in one test: every rule below holds.
    if head in _GOOD_HEADS and HEADER_SIZE <= size <= state._capacity:
        return storage
    flags, fmt = head & 0xFFFF, head >> 16
    if size < HEADER_SIZE:
        raise ValueError(f"size {size} is below the {HEADER_SIZE}-byte header")
    if size > state._capacity:
        raise ValueError(f"size {size} is larger than the {state._capacity}-byte buffer")
    if flags & ~KNOWN_FLAGS:
        raise ValueError(
            f"flags {flags:#x} has unknown bits {flags & ~KNOWN_FLAGS:#x} "
            f"(known: {NestedFlag(KNOWN_FLAGS)!r})"
        )
    if flags & _RUN_PENDING and not flags & _GUEST_MODE:
        raise ValueError("flags has RUN_PENDING without GUEST_MODE (a pending VM-entry needs L2)")
    if fmt not in _KNOWN_FORMATS:
        raise ValueError(f"unknown format {fmt} (known: 0 = VMX, 1 = SVM)")
    return storage  # not reached: the test above passes whenever no rule here fails


# flags and format (one u32: flags | format << 16), then size: the first 8 bytes of
# struct kvm_nested_state.
_HEAD_SIZE = struct.Struct("<II")
_RUN_PENDING = int(NestedFlag.RUN_PENDING)
_GUEST_MODE = int(NestedFlag.GUEST_MODE)
# Every flags | format << 16 that check_for_set takes: known flags only, RUN_PENDING only
# with GUEST_MODE, a known format (5 flags: 24 combinations a format).
_GOOD_HEADS = frozenset(
    flags | fmt << 16
    for fmt in _KNOWN_FORMATS
    for flags in range(KNOWN_FLAGS + 1)
    if not flags & ~KNOWN_FLAGS and (flags & _GUEST_MODE or not flags & _RUN_PENDING)
)


@functools.lru_cache(maxsize=16)
def _words(n: int) -> type[ctypes.Array[ctypes.c_uint64]]:
    return ctypes.c_uint64 * n


@functools.lru_cache(maxsize=16)
def _chars(n: int) -> type[ctypes.Array[ctypes.c_char]]:
    return ctypes.c_char * n
