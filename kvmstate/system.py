"""``/dev/kvm``: the system file descriptor (:class:`Kvm`)."""

from __future__ import annotations

import errno
import os

from kvmstate import ioctls as io
from kvmstate import uapi
from kvmstate._fd import DEFAULT_PATH, FdWrapper, int_arg
from kvmstate.errors import KvmError, UnsupportedKvmError
from kvmstate.vm import Vm

TYPE_CHECKING = False  # typing is not imported at run time (see kvmstate._struct)
if TYPE_CHECKING:
    from kvmstate.vmstate import VmState

__all__ = ["DEFAULT_PATH", "Kvm"]

# KVM_MAX_CPUID_ENTRIES is 256 in 6.1 and 6.12; the E2BIG retry covers more.
_CPUID_ENTRIES = 256
_CPUID_ENTRIES_MAX = 4096


class Kvm(FdWrapper):
    """An open ``/dev/kvm`` (``O_RDWR | O_CLOEXEC``), checked for API version 12.

    ``path`` is the device to open (another node of the same driver, or a
    test's). The descriptor is closed by :meth:`close` or the ``with`` block.

    >>> with kvmstate.Kvm() as kvm:
    ...     kvm.api_version, kvm.nested_state_size in (0, 4224, 8320)  # AMD 4224, Intel 8320
    (12, True)

    :raises OSError: ``path`` cannot be opened (``FileNotFoundError`` without
        KVM, ``PermissionError`` outside the ``kvm`` group), errno kept.
    :raises UnsupportedKvmError: the kernel answers ``KVM_GET_API_VERSION``
        with a version other than 12 (the descriptor is closed).
    :raises KvmError: ``KVM_GET_API_VERSION`` itself fails.
    """

    def __init__(self, path: str = DEFAULT_PATH) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        super().__init__(fd)
        self.path = path
        self._nested_state_size: int | None = None
        try:
            version = self._ioctl(io.KVM_GET_API_VERSION)
        except BaseException:
            self.close()
            raise
        if version != uapi.KVM_API_VERSION:
            self.close()
            raise UnsupportedKvmError(
                f"{path} speaks KVM API version {version}; kvmstate needs {uapi.KVM_API_VERSION}",
                ioctl="KVM_GET_API_VERSION",
            )
        self.api_version = version

    def check_extension(self, capability: int) -> int:
        """``KVM_CHECK_EXTENSION``: 0 when absent, else the capability's value."""
        return self._ioctl(io.KVM_CHECK_EXTENSION, int_arg(capability))

    @property
    def nested_state_size(self) -> int:
        """``KVM_CAP_NESTED_STATE``: the largest nested state in bytes, 0 without nesting."""
        if self._nested_state_size is None:
            self._nested_state_size = self.check_extension(uapi.KVM_CAP_NESTED_STATE)
        return self._nested_state_size

    @property
    def vcpu_mmap_size(self) -> int:
        """``KVM_GET_VCPU_MMAP_SIZE``: bytes to map from a vCPU fd for ``kvm_run``."""
        return self._ioctl(io.KVM_GET_VCPU_MMAP_SIZE)

    def create_vm(self, machine_type: int = 0) -> Vm:
        """``KVM_CREATE_VM``: a new VM, owned by the returned :class:`~kvmstate.vm.Vm`."""
        fd = self._ioctl(io.KVM_CREATE_VM, int_arg(machine_type))
        try:
            # Handed down: the VM and its vCPUs never reach back to /dev/kvm for these.
            nested, mmap_size = self.nested_state_size, self.vcpu_mmap_size
            msrs = self.get_msr_index_list()
        except BaseException:
            os.close(fd)
            raise
        return Vm(
            fd, kvm=self, nested_state_size=nested, vcpu_mmap_size=mmap_size, msr_index_list=msrs
        )

    def restore_vm(self, state: VmState) -> Vm:
        """A new VM built with ``state``'s layout and ``state`` restored into it
        (:func:`kvmstate.vmstate.restore_new`; its vCPUs are :attr:`Vm.vcpus`).

        >>> new = kvm.restore_vm(VmState.load("vm.kvmstate"))    # doctest: +SKIP
        >>> new.vcpus[0].run()                                   # doctest: +SKIP
        """
        from kvmstate import vmstate

        vm: Vm = vmstate.restore_new(self, state)
        return vm

    def get_supported_cpuid(self, max_entries: int = _CPUID_ENTRIES) -> uapi.kvm_cpuid2:
        """``KVM_GET_SUPPORTED_CPUID``: the CPUID leaves KVM can offer a guest."""
        if isinstance(max_entries, int) and not isinstance(max_entries, bool) and max_entries < 1:
            # 0 would never grow on E2BIG (n *= 4): at least one entry.
            raise ValueError(f"get_supported_cpuid(): {max_entries} entries is out of range (>= 1)")
        n = max_entries
        while True:
            cpuid = uapi.kvm_cpuid2.new(n)
            try:
                # nent == n: the kernel writes at most n entries into an n-entry array.
                self._ioctl(io.KVM_GET_SUPPORTED_CPUID, cpuid)
            except KvmError as exc:
                if exc.errno == errno.E2BIG and n < _CPUID_ENTRIES_MAX:
                    n *= 4
                    continue
                raise
            return cpuid.trimmed()

    def get_msr_index_list(self) -> list[int]:
        """``KVM_GET_MSR_INDEX_LIST``: the MSRs a vCPU save should include."""
        return self._msr_list(io.KVM_GET_MSR_INDEX_LIST)

    def get_msr_feature_index_list(self) -> list[int]:
        """``KVM_GET_MSR_FEATURE_INDEX_LIST``: feature MSRs (read-only capabilities)."""
        return self._msr_list(io.KVM_GET_MSR_FEATURE_INDEX_LIST)

    def _msr_list(self, request: int) -> list[int]:
        probe = uapi.kvm_msr_list.new(0)
        try:
            # nmsrs == 0: the kernel writes only the needed count back (E2BIG).
            self._ioctl(request, probe)
        except KvmError as exc:
            if exc.errno != errno.E2BIG:
                raise
        msrs = uapi.kvm_msr_list.new(probe.nmsrs)
        # nmsrs equals the array length, so the kernel stays inside it.
        self._ioctl(request, msrs)
        return [int(i) for i in msrs.items()[: len(msrs)]]

    def _describe(self) -> str:
        return f" {self.path} api={self.api_version}"
