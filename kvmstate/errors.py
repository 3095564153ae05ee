"""Exceptions. Kernel errors are ``OSError`` subclasses that keep ``errno``.

The whole tree: :class:`KvmError` and, below it, :class:`UnsupportedKvmError`,
the three nested-state errors and :class:`StateError` (one part of a whole-vCPU
save or restore). ``except OSError`` catches every kernel failure; ``exc.errno`` is the
kernel's answer and ``exc.ioctl`` the request's kernel name. Bad arguments
raise ``ValueError``/``TypeError`` before anything reaches the kernel.
"""

from __future__ import annotations

import errno as _errno
import os

__all__ = [
    "KvmError",
    "NestedStateRejectedError",
    "NestedStateTooLargeError",
    "NestedStateUnavailableError",
    "StateError",
    "UnsupportedKvmError",
]


class KvmError(OSError):
    """A KVM ioctl failed.

    ``errno`` is the kernel's error number, or ``None`` when the ioctl
    returned a positive value with no errno (some VMX paths do).
    ``ioctl`` is the request's kernel name; ``result`` the raw return value
    when it was positive.
    """

    def __init__(
        self,
        errno: int | None,
        message: str | None = None,
        *,
        ioctl: str | None = None,
        result: int | None = None,
    ) -> None:
        if message is None:
            message = os.strerror(errno) if errno is not None else "failed"
        super().__init__(errno, message)
        self.ioctl = ioctl
        self.result = result

    def __str__(self) -> str:
        where = f"{self.ioctl}: " if self.ioctl else ""
        code = f"[Errno {self.errno}] " if self.errno is not None else ""
        return f"{code}{where}{self.strerror}"

    def __reduce__(self) -> tuple[object, ...]:
        return (
            _rebuild,
            (type(self), self.errno, self.strerror, self.ioctl, self.result, self.__dict__),
        )


def _rebuild(
    cls: type[KvmError],
    errno: int | None,
    message: str | None,
    ioctl: str | None,
    result: int | None,
    state: dict[str, object],
) -> KvmError:
    exc = cls.__new__(cls)
    KvmError.__init__(exc, errno, message, ioctl=ioctl, result=result)
    exc.__dict__.update(state)
    return exc


class UnsupportedKvmError(KvmError):
    """The KVM at hand lacks something the library needs (API version, capability)."""

    def __init__(self, message: str, *, ioctl: str | None = None) -> None:
        super().__init__(_errno.ENOTSUP, message, ioctl=ioctl)


class NestedStateUnavailableError(KvmError):
    """This KVM cannot save or restore nested state.

    Raised when ``KVM_CAP_NESTED_STATE`` is 0 or the nested ioctls answer
    EINVAL on a KVM without nested support. ``errno`` is the kernel's.
    """

    HINT = (
        "KVM_CAP_NESTED_STATE is 0: this KVM has no nested virtualization. "
        "Check that the host CPU has VMX or SVM, that kvm_intel or kvm_amd is loaded "
        "with nested=1 (cat /sys/module/kvm_intel/parameters/nested or "
        "/sys/module/kvm_amd/parameters/nested), and that /dev/kvm is not a "
        "paravirtual KVM without nesting"
    )


class NestedStateTooLargeError(KvmError):
    """``KVM_GET_NESTED_STATE`` needs more room than the caller's buffer has (E2BIG).

    ``needed`` is the size the kernel asked for.
    """

    def __init__(self, needed: int, capacity: int, *, ioctl: str | None = None) -> None:
        super().__init__(
            _errno.E2BIG,
            f"the nested state is {needed} bytes; the buffer holds {capacity}",
            ioctl=ioctl,
        )
        self.needed = needed
        self.capacity = capacity


class NestedStateRejectedError(KvmError):
    """``KVM_SET_NESTED_STATE`` refused a state (EINVAL), with the rules it breaks.

    ``problems`` is :func:`kvmstate.check.check`'s list for the state and
    what could be read of the vCPU; the message explains them.
    """

    def __init__(
        self, errno: int | None, message: str, *, ioctl: str | None, problems: list[object]
    ) -> None:
        super().__init__(errno, message, ioctl=ioctl)
        self.problems = problems


class StateError(KvmError):
    """Saving or restoring one part of a vCPU failed; ``part`` names it, errno is kept."""

    def __init__(self, part: str, exc: OSError) -> None:
        ioctl = getattr(exc, "ioctl", None)
        super().__init__(exc.errno, f"{part}: {exc.strerror}", ioctl=ioctl)
        self.part = part
        self.result = getattr(exc, "result", None)
