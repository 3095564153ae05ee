"""What the three fd wrappers share: ownership, closing, and the only roads into the kernel.

Every ioctl the library issues goes through this module, by one of two paths:

* :func:`ioctl`, the checked path: a failure becomes a :class:`KvmError`
  with errno, the request's name and the cause where errno alone misleads;
* :func:`raw_ioctl`, the fast path, for the hot loops (nested GET/SET, the
  parts of a whole-vCPU save): ``fcntl.ioctl`` and nothing more (no
  try/except, no name lookup); an ``OSError`` comes out unconverted, and the caller turns
  it into a :class:`KvmError` with :func:`kvm_error` (or
  :meth:`FdWrapper.kvm_error`) once it has looked at errno (E2BIG, ENXIO).

Either way the argument is an int or a writable ctypes object. With an
object, ``fcntl.ioctl`` copies up to 1024 bytes into a 1024-byte stack
buffer and passes larger objects by address; the kernel may write only as
many bytes as the object has, and each caller says why that holds.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import warnings

from kvmstate.errors import KvmError
from kvmstate.ioctls import IOCTL_NAMES

TYPE_CHECKING = False  # typing is not imported at run time (see kvmstate._struct)
if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "DEFAULT_PATH",
    "FdWrapper",
    "int_arg",
    "ioctl",
    "kvm_error",
    "raw_ioctl",
    "unmap",
]

#: Where the KVM system device lives.
DEFAULT_PATH = "/dev/kvm"


def int_arg(value: object) -> int:
    """Check an int ioctl argument (``fcntl.ioctl`` passes it as a C int)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"expected an int, not {type(value).__name__}")
    if not 0 <= value <= 0x7FFF_FFFF:
        raise ValueError(f"{value} is out of range for this ioctl argument")
    return value


def unmap(mem: mmap.mmap) -> None:
    """Close ``mem`` unless a caller still holds a view of it; then the GC unmaps it later.

    >>> unmap(mmap.mmap(-1, 4096))
    """
    # Not contextlib.suppress: contextlib is not imported at run time (kvmstate._struct).
    try:  # noqa: SIM105
        mem.close()
    except BufferError:
        pass


def ioctl(fd: int, request: int, arg: Any = 0, *, pid: int | None = None) -> int:
    """Issue one KVM ioctl; any failure becomes a :class:`KvmError` with errno and name.

    ``pid`` is the process that opened ``fd``, for the cause of an EIO.
    """
    try:
        return int(fcntl.ioctl(fd, request, arg))
    except OSError as exc:
        raise kvm_error(exc, request, pid=pid) from None


def raw_ioctl(fd: int, request: int, arg: Any) -> int:
    """The fast path: ``fcntl.ioctl`` with a writable buffer (changed in place), nothing else.

    An ``OSError`` is the caller's to convert (:func:`kvm_error`) once it has
    looked at errno. ``fcntl.ioctl`` is looked up per call, not bound at import,
    so a test can watch what reaches the kernel by patching it. Its answer is
    returned as it is: with an int or a writable buffer (the only arguments
    taken here) ``fcntl.ioctl`` answers the ioctl's int.
    """
    result: int = fcntl.ioctl(fd, request, arg)
    return result


def kvm_error(exc: OSError, request: int | str | None, *, pid: int | None = None) -> KvmError:
    """The :class:`KvmError` for a failed ioctl, naming the cause where errno alone does not.

    ``request`` is the ioctl's number or name; ``pid`` the process that
    opened the descriptor. KVM answers EIO to every VM and vCPU ioctl from a
    process other than the one whose memory (mm) created the VM: a
    ``fork()`` child, or a process the descriptor was passed to.
    """
    name = request if isinstance(request, str) or request is None else IOCTL_NAMES.get(request)
    message = exc.strerror
    if exc.errno == errno.EIO:
        here = os.getpid()
        if pid is not None and pid != here:
            why = (
                f"KVM serves a VM only in the process that created it (its mm); this is "
                f"pid {here}, a fork() child of pid {pid}, which opened the descriptor: "
                "use the VM in that process, or create one here"
            )
        else:
            why = (
                "KVM serves a VM only in the process that created it (its mm): not in a "
                "fork() child nor in a process the descriptor was passed to; it also "
                "answers EIO for a VM it has marked dead"
            )
        message = f"{exc.strerror}: {why}"
    return KvmError(exc.errno, message, ioctl=name)


class FdWrapper:
    """A file descriptor the wrapper may own: ``fileno()``, ``close()``, ``with``.

    An owned descriptor is closed by :meth:`close` (and, with a
    ``ResourceWarning``, when the object is collected unclosed). A borrowed
    one (``owned=False``: a descriptor that another VMM owns) is never
    closed by the library; :meth:`close` only detaches from it.

    A wrapper cannot be copied or pickled (``copy.copy``, ``copy.deepcopy``,
    ``pickle`` raise TypeError): a copy would hold the same descriptor
    number, and closing it would close whatever file has since reused that
    number. Share the object instead, or wrap a duplicate yourself::

        >>> vcpu2 = Vcpu(os.dup(vcpu.fileno()), vm=vcpu.vm)   # doctest: +SKIP

    A vCPU's state copies freely: ``copy.deepcopy(vcpu.save_state())``.
    """

    _fd: int = -1
    _owned: bool = False
    _pid: int | None = None

    def __init__(self, fd: int, *, owned: bool = True) -> None:
        if not isinstance(fd, int) or isinstance(fd, bool):
            raise TypeError(f"a file descriptor must be an int, not {type(fd).__name__}")
        if not 0 <= fd <= 0x7FFF_FFFF:
            # A descriptor is a C int: what is outside never names an open file.
            raise ValueError(f"invalid file descriptor {fd} (a C int: 0..0x7fffffff)")
        self._fd = fd
        self._owned = owned
        self._pid = os.getpid()  # KVM serves a VM only in its creator's process (EIO)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has run."""
        return self._fd < 0

    @property
    def owned(self) -> bool:
        """Whether :meth:`close` closes the descriptor (False for borrowed ones)."""
        return self._owned

    def fileno(self) -> int:
        """The descriptor; ValueError once closed."""
        if self._fd < 0:
            raise ValueError(f"I/O operation on closed {type(self).__name__}")
        return self._fd

    def _release(self) -> None:
        """Hook for subclasses: drop what depends on the descriptor (mappings)."""

    def close(self) -> None:
        """Close the descriptor if owned; idempotent."""
        if self._fd < 0:
            return
        self._release()
        fd, self._fd = self._fd, -1
        if self._owned:
            os.close(fd)

    def detach(self) -> int:
        """Give up the descriptor without closing it and return it."""
        fd = self.fileno()
        self._release()
        self._fd = -1
        return fd

    def __enter__(self) -> Any:
        self.fileno()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if self._fd >= 0 and self._owned:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2, source=self)
            self.close()

    # A copy would share the descriptor number and close it twice (the second time,
    # maybe an unrelated file that reused it): refused, whatever the protocol.
    def __copy__(self) -> Any:
        raise TypeError(self._no_copy("copied"))

    def __deepcopy__(self, memo: object) -> Any:
        raise TypeError(self._no_copy("copied"))

    def __reduce_ex__(self, protocol: object) -> Any:
        raise TypeError(self._no_copy("pickled"))

    def _no_copy(self, what: str) -> str:
        name = type(self).__name__
        return (
            f"a {name} cannot be {what}: it wraps a file descriptor that only one object "
            f"may close; share the {name}, or wrap os.dup({name.lower()}.fileno()) yourself"
        )

    def _ioctl(self, request: int, arg: Any = 0) -> int:
        # ioctl() and fileno() inlined: this is every wrapper's path into the kernel.
        fd = self._fd
        if fd < 0:
            self.fileno()  # raises: closed
        try:
            return int(fcntl.ioctl(fd, request, arg))
        except OSError as exc:
            raise kvm_error(exc, request, pid=self._pid) from None

    def kvm_error(self, exc: OSError, request: int | str) -> KvmError:
        """The :class:`KvmError` for ``exc`` from ``request`` on this descriptor (cause named).

        For callers on the fast path (:func:`raw_ioctl`): an EIO in a
        ``fork()`` child says so.

        >>> vcpu.kvm_error(OSError(errno.EIO, "Input/output error"), "KVM_RUN")  # doctest: +SKIP
        """
        return kvm_error(exc, request, pid=self._pid)

    def __repr__(self) -> str:
        if self._fd < 0:
            return f"<{type(self).__name__} closed>"
        own = "" if self._owned else " borrowed"
        return f"<{type(self).__name__} fd={self._fd}{own}{self._describe()}>"

    def _describe(self) -> str:
        return ""
