"""A vCPU file descriptor (:class:`Vcpu`): registers, MSRs, CPUID, events, nested state.

Every structure handed to the kernel here is a ctypes object of exactly
the size the request encodes, or a variable-length one whose count field
was set, right before the call, to no more than the elements it holds;
each call site says why its buffer is big enough.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import mmap
import os
import struct
from collections.abc import Callable, Iterable, Mapping

from kvmstate import ioctls as io
from kvmstate import uapi
from kvmstate._fd import DEFAULT_PATH, FdWrapper, int_arg, ioctl, raw_ioctl, unmap
from kvmstate.errors import (
    KvmError,
    NestedStateRejectedError,
    NestedStateTooLargeError,
    NestedStateUnavailableError,
    UnsupportedKvmError,
)
from kvmstate.nested import (
    HEADER_SIZE,
    VMX_MAX_SIZE,
    NestedState,
    ReadableBuffer,
    WritableBuffer,
    check_for_set,
)

TYPE_CHECKING = False  # typing is not imported at run time (see kvmstate._struct)
if TYPE_CHECKING:
    import weakref
    from typing import Any

    from kvmstate.state import VcpuState

__all__ = ["Vcpu"]

_GET_NESTED = io.KVM_GET_NESTED_STATE
_SIZE = struct.Struct("<I")  # kvm_nested_state.size, at offset 4
_SET_NESTED = io.KVM_SET_NESTED_STATE
# The largest nested_state_size taken (NestedState's own capacity limit).
_NESTED_SIZE_MAX = 1 << 24
# Vcpu._nested_need before it is known: above any buffer's capacity.
_UNKNOWN_NEED = 1 << 62
# Vcpu._nested_source before any caller's buffer was bound: no buffer is this object.
_NO_BUFFER = object()
_addressof, _sizeof = ctypes.addressof, ctypes.sizeof


class Vcpu(FdWrapper):
    """A KVM vCPU.

    Made by :meth:`Vm.create_vcpu <kvmstate.vm.Vm.create_vcpu>` (owned), or
    around a descriptor another VMM owns with :meth:`borrow`. ``vcpu_id`` is
    the id it was created with (None when a borrowed vCPU was not told it);
    ``nested_state_size`` follows the rules of :meth:`borrow`.

    >>> with kvmstate.Kvm() as kvm, kvm.create_vm() as vm, vm.create_vcpu(0) as vcpu:
    ...     vcpu.vcpu_id, hex(vcpu.get_regs().rip)  # the reset vector
    (0, '0xfff0')

    :raises TypeError: ``fd``, ``vcpu_id`` or ``nested_state_size`` is not an int.
    :raises ValueError: one of them is negative (checked before the
        descriptor is taken, so a refused argument does not close it).
    """

    def __init__(
        self,
        fd: int,
        *,
        vm: Any = None,
        owned: bool = True,
        nested_state_size: int | None = None,
        vcpu_id: int | None = None,
        capabilities: Mapping[int, int] | None = None,
        mmap_size: int | None = None,
        msr_index_list: Iterable[int] | None = None,
    ) -> None:
        # Checked before the descriptor is taken: a refused argument must not close it.
        given = _nested_size_arg(nested_state_size)
        vcpu_id = _vcpu_id_arg(vcpu_id)
        caps = dict(capabilities or {})
        indices = None if msr_index_list is None else tuple(msr_index_list)
        super().__init__(fd, owned=owned)
        self.vm = vm
        self.vcpu_id = vcpu_id
        # Handed down by Vm.create_vcpu (KVM_CHECK_EXTENSION answers, KVM_GET_VCPU_MMAP_SIZE,
        # KVM_GET_MSR_INDEX_LIST), so the vCPU never reaches back to its VM or /dev/kvm.
        self._capabilities = caps
        self._mmap_size = mmap_size
        self._msr_index_list = indices
        self._given_nested_size = given
        self._nested_state_size: int | None = None
        # The smallest buffer KVM_GET_NESTED_STATE may fill, once nested_state_size
        # has worked it out; until then larger than any buffer, so no call skips that.
        self._nested_need = _UNKNOWN_NEED
        self._nested_cap: int | None = None  # /dev/kvm's own answer, once asked
        # The last view of a caller's buffer (see _view_of): kept, or weakly.
        self._nested_kept: NestedState | None = None
        self._nested_kept_at = self._nested_kept_size = 0  # the kept view's address, size
        self._nested_kept_storage: Any = None  # and its storage
        self._nested_source: object = _NO_BUFFER  # the buffer the last view is of
        self._nested_weak: Callable[[], NestedState | None] = _no_view
        # The last NestedState of its own storage a GET filled, with its storage and capacity.
        self._nested_own: object = _NO_BUFFER
        self._nested_own_io: tuple[Any, int] = (None, 0)
        self._xsave_size: int | None = None
        self._cpuid_entries: int | None = None  # last KVM_GET_CPUID2 count: the next guess
        # Whether KVM_GET_CPUID2 writes the count back into nent (6.12 does, 6.1 not).
        self._cpuid_nent_reported = False
        self._run_map: mmap.mmap | None = None
        self._run: uapi.kvm_run | None = None
        self._sync_regs_cap: int | None = None

    @classmethod
    def borrow(
        cls, fd: int, *, nested_state_size: int | None = None, vcpu_id: int | None = None
    ) -> Vcpu:
        """Wrap a vCPU descriptor without taking ownership (``close()`` leaves it open).

        ``vcpu_id`` is shown in the repr when given. ``nested_state_size``
        is ``KVM_CAP_NESTED_STATE``, which a vCPU fd cannot answer (EINVAL);
        it must be 0 (no nesting) or 128..2**24 (TypeError for a bool or
        float, ValueError otherwise). The buffer handed to
        ``KVM_GET_NESTED_STATE`` is never smaller than what the kernel may
        write, whatever is given:

        * when ``/dev/kvm`` can be asked, :attr:`nested_state_size` is its
          answer, or the given size if that is larger (a smaller one is
          raised to it);
        * when it cannot, :attr:`nested_state_size` is the given size (8320,
          the largest known state, when none is given), but the buffer is
          never below 8320: nothing confirms a smaller capability.

        Likewise :attr:`kvm_run` maps ``KVM_GET_VCPU_MMAP_SIZE`` bytes asked of
        ``/dev/kvm`` (one page when it cannot be opened).

        >>> theirs = Vcpu.borrow(fd, vcpu_id=1)                 # doctest: +SKIP
        >>> theirs.nested_state_size   # /dev/kvm's answer: 8320 Intel, 4224 AMD
        """
        return cls(fd, owned=False, nested_state_size=nested_state_size, vcpu_id=vcpu_id)

    # --- capabilities ----------------------------------------------------------

    @property
    def nested_state_size(self) -> int:
        """``KVM_CAP_NESTED_STATE`` for this vCPU's KVM (0 without nesting; see :meth:`borrow`)."""
        if self._nested_state_size is None:
            cap: int | None = self._capabilities.get(uapi.KVM_CAP_NESTED_STATE)
            if cap is None:
                cap = _ask_dev_kvm(io.KVM_CHECK_EXTENSION, uapi.KVM_CAP_NESTED_STATE, -1)
                cap = None if cap < 0 else cap
            given = self._given_nested_size
            if cap is not None:
                size = cap if given is None else max(given, cap)
                # The kernel's own answer bounds what it writes.
                self._nested_need = max(size, HEADER_SIZE)
            else:
                size = VMX_MAX_SIZE if given is None else given
                # Unconfirmed: never below the largest state any vendor writes.
                self._nested_need = max(size, VMX_MAX_SIZE)
            self._nested_cap = cap
            self._nested_state_size = size
        return self._nested_state_size

    def _describe(self) -> str:
        return "" if self.vcpu_id is None else f" id={self.vcpu_id}"

    # --- registers ----------------------------------------------------------------

    def get_regs(self) -> uapi.kvm_regs:
        """``KVM_GET_REGS``."""
        regs = uapi.kvm_regs()
        # kvm_regs is the size KVM_GET_REGS encodes.
        self._ioctl(io.KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs: uapi.kvm_regs) -> None:
        """``KVM_SET_REGS``."""
        self._ioctl(io.KVM_SET_REGS, _exact(regs, uapi.kvm_regs))

    def get_sregs(self) -> uapi.kvm_sregs:
        """``KVM_GET_SREGS``."""
        sregs = uapi.kvm_sregs()
        # kvm_sregs is the size KVM_GET_SREGS encodes.
        self._ioctl(io.KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs: uapi.kvm_sregs) -> None:
        """``KVM_SET_SREGS`` (before nested state: EFER.SVME / CR4.VMXE must be in place)."""
        self._ioctl(io.KVM_SET_SREGS, _exact(sregs, uapi.kvm_sregs))

    def get_vcpu_events(self) -> uapi.kvm_vcpu_events:
        """``KVM_GET_VCPU_EVENTS``."""
        events = uapi.kvm_vcpu_events()
        # kvm_vcpu_events is the size KVM_GET_VCPU_EVENTS encodes.
        self._ioctl(io.KVM_GET_VCPU_EVENTS, events)
        return events

    def set_vcpu_events(self, events: uapi.kvm_vcpu_events) -> None:
        """``KVM_SET_VCPU_EVENTS``."""
        self._ioctl(io.KVM_SET_VCPU_EVENTS, _exact(events, uapi.kvm_vcpu_events))

    # --- MSRs ------------------------------------------------------------------------

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        """``KVM_GET_MSRS``: ``{index: value}`` for the given MSR indices.

        Raises :class:`KvmError` naming the first MSR the kernel could not read.
        """
        wanted = uapi.msr_index_array(indices)
        words = uapi.msrs_words(wanted)
        # nmsrs == len(wanted), and words holds that many entries: the kernel reads and
        # writes only those.
        done = self._ioctl(io.KVM_GET_MSRS, words)
        if done != len(wanted):
            raise _msr_error("KVM_GET_MSRS", wanted.tolist(), done)
        return dict(zip(wanted.tolist(), words[2::2].tolist(), strict=True))

    def set_msrs(self, values: Mapping[int, int]) -> None:
        """``KVM_SET_MSRS`` from ``{index: value}``.

        Raises :class:`KvmError` naming the first MSR the kernel refused.
        """
        if not isinstance(values, Mapping):
            raise TypeError(
                f"set_msrs() needs a mapping of index to value, not {type(values).__name__}"
            )
        wanted = uapi.msr_index_array(values.keys())
        words = uapi.msrs_words(wanted)
        words[2::2] = uapi.msr_value_array(values)
        # nmsrs == len(wanted), and words holds that many entries: the kernel reads only those.
        done = self._ioctl(io.KVM_SET_MSRS, words)
        if done != len(wanted):
            raise _msr_error("KVM_SET_MSRS", wanted.tolist(), done)

    def get_sregs2(self) -> uapi.kvm_sregs2:
        """``KVM_GET_SREGS2`` (needs ``KVM_CAP_SREGS2``): sregs plus the PAE PDPTRs."""
        sregs2 = uapi.kvm_sregs2()
        # kvm_sregs2 is the size KVM_GET_SREGS2 encodes.
        self._ioctl(io.KVM_GET_SREGS2, sregs2)
        return sregs2

    def set_sregs2(self, sregs2: uapi.kvm_sregs2) -> None:
        """``KVM_SET_SREGS2``."""
        self._ioctl(io.KVM_SET_SREGS2, _exact(sregs2, uapi.kvm_sregs2))

    def get_fpu(self) -> uapi.kvm_fpu:
        """``KVM_GET_FPU``: legacy x87/SSE state."""
        fpu = uapi.kvm_fpu()
        # kvm_fpu is the size KVM_GET_FPU encodes.
        self._ioctl(io.KVM_GET_FPU, fpu)
        return fpu

    def set_fpu(self, fpu: uapi.kvm_fpu) -> None:
        """``KVM_SET_FPU``."""
        self._ioctl(io.KVM_SET_FPU, _exact(fpu, uapi.kvm_fpu))

    @property
    def xsave_size(self) -> int:
        """Bytes of the XSAVE area: ``KVM_CAP_XSAVE2`` on the VM, else 4096."""
        if self._xsave_size is None:
            self._xsave_size = max(self.check_extension(uapi.KVM_CAP_XSAVE2), 4096)
        return self._xsave_size

    def get_xsave(self) -> uapi.kvm_xsave:
        """``KVM_GET_XSAVE2`` (or ``KVM_GET_XSAVE``): the XSAVE area, :attr:`xsave_size` bytes."""
        size = self.xsave_size
        xsave = uapi.kvm_xsave.sized(size)
        # XSAVE2 writes KVM_CAP_XSAVE2 bytes and the buffer has exactly that many;
        # plain XSAVE writes 4096, the buffer's minimum.
        self._ioctl(io.KVM_GET_XSAVE2 if size > 4096 else io.KVM_GET_XSAVE, xsave)
        return xsave

    def set_xsave(self, xsave: uapi.kvm_xsave) -> None:
        """``KVM_SET_XSAVE`` from an area of at least :attr:`xsave_size` bytes."""
        if not isinstance(xsave, uapi.kvm_xsave):
            raise TypeError(f"expected kvm_xsave, not {type(xsave).__name__}")
        if ctypes.sizeof(xsave) < self.xsave_size:
            raise ValueError(
                f"the XSAVE area is {ctypes.sizeof(xsave)} bytes; this VM's is {self.xsave_size}"
            )
        # The kernel reads KVM_CAP_XSAVE2 bytes (4096 without it): checked above.
        self._ioctl(io.KVM_SET_XSAVE, xsave)

    def get_xcrs(self) -> uapi.kvm_xcrs:
        """``KVM_GET_XCRS``: XCR0 and friends."""
        xcrs = uapi.kvm_xcrs()
        # kvm_xcrs is the size KVM_GET_XCRS encodes.
        self._ioctl(io.KVM_GET_XCRS, xcrs)
        return xcrs

    def set_xcrs(self, xcrs: uapi.kvm_xcrs) -> None:
        """``KVM_SET_XCRS``."""
        xcrs = _exact(xcrs, uapi.kvm_xcrs)
        if xcrs.nr_xcrs > uapi.KVM_MAX_XCRS:
            raise ValueError(f"nr_xcrs {xcrs.nr_xcrs} is above KVM_MAX_XCRS ({uapi.KVM_MAX_XCRS})")
        self._ioctl(io.KVM_SET_XCRS, xcrs)

    def get_debugregs(self) -> uapi.kvm_debugregs:
        """``KVM_GET_DEBUGREGS``."""
        regs = uapi.kvm_debugregs()
        # kvm_debugregs is the size KVM_GET_DEBUGREGS encodes.
        self._ioctl(io.KVM_GET_DEBUGREGS, regs)
        return regs

    def set_debugregs(self, regs: uapi.kvm_debugregs) -> None:
        """``KVM_SET_DEBUGREGS``."""
        self._ioctl(io.KVM_SET_DEBUGREGS, _exact(regs, uapi.kvm_debugregs))

    def get_mp_state(self) -> uapi.kvm_mp_state:
        """``KVM_GET_MP_STATE``."""
        state = uapi.kvm_mp_state()
        # kvm_mp_state is the size KVM_GET_MP_STATE encodes.
        self._ioctl(io.KVM_GET_MP_STATE, state)
        return state

    def set_mp_state(self, state: uapi.kvm_mp_state) -> None:
        """``KVM_SET_MP_STATE``."""
        self._ioctl(io.KVM_SET_MP_STATE, _exact(state, uapi.kvm_mp_state))

    def get_lapic(self) -> uapi.kvm_lapic_state:
        """``KVM_GET_LAPIC`` (needs an in-kernel irqchip: ``Vm.create_irqchip``).

        Without one the kernel answers EINVAL; the error then says so.
        """
        lapic = uapi.kvm_lapic_state()
        try:
            # kvm_lapic_state is the size KVM_GET_LAPIC encodes.
            self._ioctl(io.KVM_GET_LAPIC, lapic)
        except KvmError as exc:
            if exc.errno != errno.EINVAL:
                raise
            raise _no_lapic(exc) from None
        return lapic

    def set_lapic(self, lapic: uapi.kvm_lapic_state) -> None:
        """``KVM_SET_LAPIC`` (needs an in-kernel irqchip, like :meth:`get_lapic`)."""
        lapic = _exact(lapic, uapi.kvm_lapic_state)
        try:
            self._ioctl(io.KVM_SET_LAPIC, lapic)
        except KvmError as exc:
            # EINVAL also refuses a bad state (an x2APIC id that moved): a failing
            # KVM_GET_LAPIC tells the missing LAPIC apart.
            if exc.errno != errno.EINVAL or self._has_lapic():
                raise
            raise _no_lapic(exc) from None

    def _has_lapic(self) -> bool:
        try:
            self.get_lapic()
        except KvmError as exc:
            return exc.errno != errno.EINVAL
        return True

    def get_tsc_khz(self) -> int:
        """``KVM_GET_TSC_KHZ``: the guest TSC frequency in kHz.

        After a refused :meth:`set_tsc_khz` the kernel reports the refused
        rate here (docs/quirks.md).
        """
        return self._ioctl(io.KVM_GET_TSC_KHZ)

    def set_tsc_khz(self, khz: int) -> None:
        """``KVM_SET_TSC_KHZ``: the guest TSC rate in kHz.

        Without ``KVM_CAP_TSC_CONTROL`` KVM cannot scale the TSC: it takes
        the host's rate, and higher ones by catching up, and refuses lower
        ones (EINVAL, and the error says so).
        """
        try:
            self._ioctl(io.KVM_SET_TSC_KHZ, int_arg(khz))
        except KvmError as exc:
            control = self.check_extension(uapi.KVM_CAP_TSC_CONTROL)
            if exc.errno != errno.EINVAL or control < 0:
                raise
            if control == 0:
                why = (
                    f"KVM_CAP_TSC_CONTROL is 0: this KVM cannot scale the guest TSC, so it "
                    f"refuses {khz} kHz, a rate below the host's (KVM_GET_TSC_KHZ reports "
                    "it all the same)"
                )
            else:
                why = f"{khz} kHz is outside the rates this KVM can scale the guest TSC to"
            raise KvmError(exc.errno, f"{exc.strerror}: {why}", ioctl=exc.ioctl) from None

    def check_extension(self, capability: int) -> int:
        """A capability as the VM answers it: handed down at creation, else asked of the
        VM given, else of ``/dev/kvm`` (-1 when none can be asked).

        >>> vcpu.check_extension(uapi.KVM_CAP_XSAVE2)          # doctest: +SKIP
        4096
        """
        known = self._capabilities.get(capability)
        if known is not None:
            return known
        vm = self.vm
        if vm is not None and not vm.closed:
            return int(vm.check_extension(capability))
        return _ask_dev_kvm(io.KVM_CHECK_EXTENSION, capability, -1)

    # --- CPUID -------------------------------------------------------------------------

    def set_cpuid2(self, cpuid: uapi.kvm_cpuid2) -> None:
        """``KVM_SET_CPUID2`` (before nested state: the guest must see VMX or SVM)."""
        if not isinstance(cpuid, uapi.kvm_cpuid2):
            raise TypeError(
                f"expected a kvm_cpuid2 (kvm_cpuid2.new(n)), not {type(cpuid).__name__}"
            )
        if cpuid.nent > cpuid.capacity():
            raise ValueError(
                f"kvm_cpuid2.nent is {cpuid.nent} but the object holds {cpuid.capacity()} entries"
            )
        # nent <= capacity (checked above): the kernel reads only entries that exist.
        self._ioctl(io.KVM_SET_CPUID2, cpuid)

    def get_cpuid2(self, max_entries: int | None = None) -> uapi.kvm_cpuid2:
        """``KVM_GET_CPUID2``: the CPUID set on this vCPU (exactly its entries).

        Linux 6.12 writes the count back into ``nent``; 6.1 never does (it
        answers E2BIG below the count and leaves ``nent`` as given above
        it), so the count is found as the smallest ``nent`` that succeeds.

        >>> vcpu.set_cpuid2(kvm.get_supported_cpuid())         # doctest: +SKIP
        >>> len(vcpu.get_cpuid2()) == len(kvm.get_supported_cpuid())  # doctest: +SKIP
        True
        """
        n = max_entries or self._cpuid_entries or 256
        while True:
            cpuid = self._try_get_cpuid2(n)
            if cpuid is not None:
                break
            if max_entries is not None or n >= 4096:
                raise KvmError(errno.E2BIG, f"more than {n} CPUID entries", ioctl="KVM_GET_CPUID2")
            n = max(n * 2, 256)
        count = cpuid.nent
        if count < n:
            self._cpuid_nent_reported = True
        # nent == n: exactly n entries where the kernel reports the count (seen it lower
        # nent once), else maybe fewer (6.1 leaves nent as given): then ask with fewer.
        if (
            count == n
            and n > 0
            and not self._cpuid_nent_reported
            and self._try_get_cpuid2(n - 1) is not None
        ):
            # nent came back as given: a 6.1 kernel, and fewer entries than n.
            low, high = 0, n - 1  # the smallest count that succeeds is in [low, high]
            while low < high:
                mid = (low + high) // 2
                if self._try_get_cpuid2(mid) is None:
                    low = mid + 1
                else:
                    high = mid
            count = low
        self._cpuid_entries = count
        cpuid.nent = count
        return cpuid if count == n else cpuid.trimmed()

    def _try_get_cpuid2(self, n: int) -> uapi.kvm_cpuid2 | None:
        """One KVM_GET_CPUID2 with room for ``n`` entries; None on E2BIG (too few)."""
        cpuid = uapi.kvm_cpuid2.new(n)
        try:
            # nent == the array length: the kernel writes at most that many entries.
            self._ioctl(io.KVM_GET_CPUID2, cpuid)
        except KvmError as exc:
            if exc.errno != errno.E2BIG:
                raise
            return None
        return cpuid

    # --- running ------------------------------------------------------------------------

    @property
    def kvm_run(self) -> uapi.kvm_run:
        """The shared :class:`~kvmstate.uapi.kvm_run` (mapped on first use).

        The mapping is ``KVM_GET_VCPU_MMAP_SIZE`` bytes (the run structure, then
        the port I/O data and coalesced MMIO pages); a kernel that offers less
        than ``sizeof(struct kvm_run)`` gives :class:`UnsupportedKvmError`.
        """
        if self._run is None:
            fd = self.fileno()
            if self._mmap_size is not None:
                size = self._mmap_size
            else:
                # Borrowed: ask /dev/kvm. The run page is followed by more (port I/O
                # data at KVM_PIO_PAGE_OFFSET * 4096): one page is too few.
                size = _ask_dev_kvm(io.KVM_GET_VCPU_MMAP_SIZE, 0, mmap.PAGESIZE)
            need = ctypes.sizeof(uapi.kvm_run)
            if size < need:
                raise UnsupportedKvmError(
                    f"the vCPU mapping is {size} bytes, smaller than struct kvm_run ({need})",
                    ioctl="KVM_GET_VCPU_MMAP_SIZE",
                )
            self._run_map = mmap.mmap(fd, size, mmap.MAP_SHARED)
            # size >= sizeof(kvm_run) (checked above): the structure lies inside the mapping.
            self._run = uapi.kvm_run.from_buffer(self._run_map)
        return self._run

    # --- sync regs: registers shared through kvm_run.s ---------------------------------

    @property
    def sync_regs_supported(self) -> uapi.SyncRegs:
        """``KVM_CAP_SYNC_REGS``: the register sets KVM shares through ``kvm_run.s``.

        ``REGS|SREGS|EVENTS`` on x86; 0 where KVM offers none (old kernels,
        encrypted guests).
        """
        if self._sync_regs_cap is None:
            self._sync_regs_cap = max(self.check_extension(uapi.KVM_CAP_SYNC_REGS), 0)
        return uapi.SyncRegs(self._sync_regs_cap & uapi.KVM_SYNC_X86_VALID_FIELDS)

    @property
    def sync_regs(self) -> uapi.SyncRegs:
        """``kvm_run.kvm_valid_regs``: what KVM copies into ``kvm_run.s.regs`` at each exit.

        Set it once; after every :meth:`run` the chosen parts of
        ``vcpu.kvm_run.s.regs`` (``regs``, ``sregs``, ``events``) hold the
        vCPU's registers, without a ``KVM_GET_REGS``. Only what
        :attr:`sync_regs_supported` offers is accepted.

        >>> vcpu.sync_regs = SyncRegs.REGS | SyncRegs.SREGS
        >>> vcpu.run()
        <ExitReason.IO: 2>
        >>> hex(vcpu.kvm_run.s.regs.regs.rip)     # no KVM_GET_REGS
        '0x1002'
        """
        return uapi.SyncRegs(self.kvm_run.kvm_valid_regs)

    @sync_regs.setter
    def sync_regs(self, parts: int) -> None:
        self.kvm_run.kvm_valid_regs = self._sync_parts(parts, "sync_regs")

    @property
    def sync_regs_dirty(self) -> uapi.SyncRegs:
        """``kvm_run.kvm_dirty_regs``: what KVM loads from ``kvm_run.s.regs`` at the next run.

        After changing ``vcpu.kvm_run.s.regs`` (read it back from an exit
        first: every field of a part is loaded), set the parts changed; KVM
        loads them on entry, instead of a ``KVM_SET_REGS``, and clears the bits.

        >>> vcpu.kvm_run.s.regs.regs.rax = 0x99
        >>> vcpu.sync_regs_dirty = SyncRegs.REGS
        """
        return uapi.SyncRegs(self.kvm_run.kvm_dirty_regs)

    @sync_regs_dirty.setter
    def sync_regs_dirty(self, parts: int) -> None:
        self.kvm_run.kvm_dirty_regs = self._sync_parts(parts, "sync_regs_dirty")

    def _sync_parts(self, parts: object, name: str) -> int:
        if not isinstance(parts, int) or isinstance(parts, bool):
            raise TypeError(f"{name} takes SyncRegs bits (an int), not {type(parts).__name__}")
        unknown = parts & ~uapi.KVM_SYNC_X86_VALID_FIELDS
        if parts < 0 or unknown:
            raise ValueError(
                f"{name}: {parts:#x} is not a set of SyncRegs bits (REGS, SREGS, EVENTS)"
            )
        offered = self.sync_regs_supported
        missing = parts & ~offered
        if missing:
            raise UnsupportedKvmError(
                f"{name}: KVM_CAP_SYNC_REGS offers {_sync_names(offered)} here, "
                f"not {_sync_names(missing)}",
                ioctl="KVM_CHECK_EXTENSION",
            )
        return parts

    def run(self) -> uapi.ExitReason | int:
        """``KVM_RUN`` until the next exit; returns ``kvm_run.exit_reason``."""
        run = self.kvm_run
        self._ioctl(io.KVM_RUN)
        reason = run.exit_reason
        try:
            return uapi.ExitReason(reason)
        except ValueError:
            return int(reason)

    def io_data(self) -> bytes:
        """The bytes of the current ``KVM_EXIT_IO`` (``size * count`` at ``data_offset``)."""
        run = self.kvm_run
        if run.exit_reason != uapi.KVM_EXIT_IO:
            raise ValueError(f"the last exit was reason {run.exit_reason}, not KVM_EXIT_IO")
        io_ = run.io
        length = io_.size * io_.count
        assert self._run_map is not None  # mapped by kvm_run above
        if io_.data_offset + length > len(self._run_map):
            raise ValueError("the I/O data lies outside the kvm_run mapping")
        return self._run_map[io_.data_offset : io_.data_offset + length]

    def complete_io(self) -> None:
        """Finish a pending I/O or MMIO exit without running the guest further.

        KVM_RUN with ``immediate_exit`` set: KVM completes the instruction
        and returns EINTR. Needed before saving state at such an exit
        (the KVM API documentation says so).
        """
        run = self.kvm_run
        run.immediate_exit = 1
        try:
            self._ioctl(io.KVM_RUN)
        except KvmError as exc:
            if exc.errno != errno.EINTR:
                raise
        finally:
            run.immediate_exit = 0

    # --- nested state -----------------------------------------------------------------

    def get_nested_state(self, out: NestedState | WritableBuffer | None = None) -> NestedState:
        """``KVM_GET_NESTED_STATE`` into a new or a caller's buffer.

        ``out`` may be a :class:`NestedState` to reuse, or any writable,
        8-byte aligned buffer (``bytearray``, ``mmap``, ctypes array), which
        then holds the state (the returned object is a view of it). It must
        hold at least :attr:`nested_state_size` bytes.

        The ``size`` field handed to the kernel is always the buffer's real
        length, and the buffer is never smaller than ``KVM_CAP_NESTED_STATE``:
        the kernel may write that much before it checks ``size`` (SVM writes
        the 4096-byte vmcb12 in guest mode, then answers E2BIG). On E2BIG a
        buffer made here is replaced once by one of the size the kernel
        asks; a caller's buffer gives :class:`NestedStateTooLargeError`.

        The next call with the same buffer returns the same view instead of
        making another: always for a ctypes array (the vCPU keeps its last
        one, checked before each use to still be where the array is:
        ``ctypes.resize`` moves it), and for other buffers while the caller
        still holds the view (it holds the buffer's export; the vCPU does not
        keep a ``bytearray`` from growing). For example, ``vcpu.get_nested_state(buf) is
        vcpu.get_nested_state(buf)`` holds for a ``buf`` the caller keeps.

        >>> vcpu = kvmstate.Kvm().create_vm().create_vcpu(0)
        >>> try:
        ...     state = vcpu.get_nested_state()
        ... except kvmstate.NestedStateUnavailableError:  # KVM_CAP_NESTED_STATE is 0
        ...     state = None
        >>> state is None or state.size >= 128  # header-only while no L2 ran
        True

        :raises NestedStateUnavailableError: this KVM has no nested state
            (``KVM_CAP_NESTED_STATE`` is 0, or the module runs with ``nested=0``).
        :raises NestedStateTooLargeError: the kernel needs more than ``out`` holds.
        :raises ValueError: ``out`` is smaller than :attr:`nested_state_size`,
            or not 8-byte aligned.
        :raises TypeError: ``out`` is not a writable buffer.
        :raises KvmError: any other failure of the ioctl, errno kept.
        """
        # The usual call first, in as few steps as Python allows: a buffer bound
        # already (a NestedState, or the last view of this very caller's buffer, checked
        # below to be valid still) and at least the floor. Anything else takes the long way.
        # Bound before the type test, which corrects it: no cast() call on the hot path.
        state: NestedState = out  # type: ignore[assignment]
        if out is self._nested_own:
            # The NestedState of its own storage the last GET filled: its storage and
            # capacity never change, and the capacity was checked against the floor.
            storage, capacity = self._nested_own_io
        elif out is self._nested_source and self._nested_kept is not None:
            # The ctypes array the kept view is of: ctypes.resize may have moved, grown or
            # shrunk it since. The view was kept before its size was judged: judged here.
            array: Any = out
            capacity = self._nested_kept_size
            if (
                _addressof(array) != self._nested_kept_at
                or _sizeof(array) != capacity
                or capacity < self._nested_need
            ):
                return self._get_nested_state(out)
            state, storage = self._nested_kept, self._nested_kept_storage
        else:
            if type(out) is not NestedState:
                if out is self._nested_source:  # the buffer the last view is of (never None)
                    # Its view, while the caller still holds it (and with it the buffer's
                    # export, which keeps the memory where it is and its size), else None.
                    view = self._nested_weak()
                    if view is None:
                        return self._get_nested_state(out)
                    state = view
                elif out is None:
                    need = self._nested_need
                    if need == _UNKNOWN_NEED:
                        return self._get_nested_state(None)  # first call: learns the floor
                    state = NestedState(need)
                else:
                    return self._get_nested_state(out)
            capacity = state.capacity
            # The floor (_UNKNOWN_NEED until learnt, so the first call takes the long way).
            if capacity < self._nested_need:
                return self._get_nested_state(out)
            storage = state.storage
            if out is state and state.source is None:
                # Remembered strongly: it holds no caller's buffer (no export pinned).
                self._nested_own, self._nested_own_io = state, (storage, capacity)
        # The kernel may write up to size bytes, and size is the buffer's own
        # length, which is >= KVM_CAP_NESTED_STATE (checked just above).
        _SIZE.pack_into(storage, 4, capacity)
        try:
            raw_ioctl(self._fd, _GET_NESTED, storage)
        except ValueError:  # fcntl's answer to a closed vCPU's -1, before any ioctl
            self.fileno()  # raises: closed
            raise
        except OSError as exc:
            error = self._get_failed(exc, state)
            if out is not None or type(error) is not NestedStateTooLargeError:
                raise error from None
            # A buffer made here: regrow it once to what the kernel asked for.
            state = NestedState(state.size)
            self._get_nested(state)
        return state

    def _get_nested_state(self, out: Any) -> NestedState:
        """:meth:`get_nested_state` the long way: any buffer, first calls, E2BIG regrowth."""
        self.nested_state_size  # noqa: B018 - sets _nested_need, the buffer's floor
        need = self._nested_need
        if out is None:
            state = NestedState(need)
        else:
            state = out if type(out) is NestedState else self._view_of(out)
            if state.capacity < need:
                why = (
                    "KVM_CAP_NESTED_STATE says the kernel may write"
                    if self._nested_cap is not None
                    else "/dev/kvm cannot be asked for KVM_CAP_NESTED_STATE, so the kernel "
                    "may write up to the largest known state,"
                )
                raise ValueError(f"the buffer holds {state.capacity} bytes but {why} {need}")
        try:
            self._get_nested(state)
        except NestedStateTooLargeError:
            if out is not None:
                raise
            # A buffer made here: regrow it once to what the kernel asked for.
            state = NestedState(state.size)
            self._get_nested(state)
        return state

    def _view_of(self, out: Any) -> NestedState:
        """The view of a caller's buffer: the last one made, if it is of ``out``, else a new one.

        A ctypes array's view is kept (and with it the array) until another
        buffer comes: ctypes never refuses a resize for an export, so keeping
        it blocks nothing, and each reuse checks the array is still where the
        view points (``ctypes.resize`` moves it). Any other buffer's view is
        kept weakly, only while the caller holds it: it holds the buffer's
        export, which would stop a ``bytearray`` growing or an ``mmap`` closing.
        """
        view = self._nested_kept
        if view is None:
            view = self._nested_weak()
        if view is not None and view.source is out:
            if not isinstance(out, ctypes.Array):
                return view  # its export keeps the memory where it is, and its size
            if (
                ctypes.addressof(out) == ctypes.addressof(view.storage)
                and ctypes.sizeof(out) == view.capacity
            ):
                return view
        view = NestedState.from_buffer(out)
        # The view's source, held here for the fast path's identity test: holding the
        # buffer itself blocks no resize (only an export does), and while it is held
        # no other object can take its id.
        self._nested_source = out
        if isinstance(out, ctypes.Array):
            self._nested_kept, self._nested_weak = view, _no_view
            self._nested_kept_storage = view.storage
            self._nested_kept_at = ctypes.addressof(view.storage)
            self._nested_kept_size = view.capacity
        else:
            self._nested_kept, self._nested_weak = None, _weak_ref()(view)
        return view

    def _get_nested(self, state: NestedState) -> None:
        fd = self._fd
        if fd < 0:
            self.fileno()  # raises: closed
        capacity = state.capacity
        # The kernel may write up to size bytes, and size is the buffer's own
        # length, which is >= KVM_CAP_NESTED_STATE (checked by the caller).
        storage = state.storage
        _SIZE.pack_into(storage, 4, capacity)
        try:
            raw_ioctl(fd, _GET_NESTED, storage)
        except OSError as exc:
            raise self._get_failed(exc, state) from None

    def _get_failed(self, exc: OSError, state: NestedState) -> KvmError:
        """The error for a failed GET into ``state``: too small (E2BIG), or the kernel's."""
        wanted = state.size
        if exc.errno == errno.E2BIG and wanted > state.capacity:
            return NestedStateTooLargeError(wanted, state.capacity, ioctl="KVM_GET_NESTED_STATE")
        return self._nested_error(exc, "KVM_GET_NESTED_STATE")

    def set_nested_state(self, state: NestedState | ReadableBuffer) -> None:
        """``KVM_SET_NESTED_STATE`` from a :class:`NestedState` or any bytes-like object.

        Refused before the call, with the field named: ``size`` below 128 or
        beyond the buffer, unknown flags, RUN_PENDING without GUEST_MODE,
        an unknown format. The rest is the kernel's to judge; any non-zero
        return is raised as :class:`KvmError`.

        >>> bad = kvmstate.NestedState(128)
        >>> bad.format, bad.size = kvmstate.NestedFormat.SVM, 64
        >>> vcpu = kvmstate.Kvm().create_vm().create_vcpu(0)
        >>> vcpu.set_nested_state(bad)
        Traceback (most recent call last):
        ValueError: size 64 is below the 128-byte header

        :raises ValueError: the state fails the checks above (field named).
        :raises TypeError: ``state`` is neither a :class:`NestedState` nor bytes-like.
        :raises NestedStateUnavailableError: this KVM has no nested state.
        :raises NestedStateRejectedError: the kernel answered EINVAL; the
            message and ``problems`` say which rules the state breaks on this vCPU.
        :raises KvmError: any other failure, errno kept.
        """
        if type(state) is not NestedState and not isinstance(state, NestedState):
            state = _writable_copy(state)
        storage = check_for_set(state)
        try:
            # check_for_set: size <= capacity, and the kernel reads at most size bytes.
            result = raw_ioctl(self._fd, _SET_NESTED, storage)
        except ValueError:  # fcntl's answer to a closed vCPU's -1, before any ioctl
            self.fileno()  # raises: closed
            raise
        except OSError as exc:
            error = self._nested_error(exc, "KVM_SET_NESTED_STATE")
            if exc.errno == errno.EINVAL and type(error) is KvmError:
                error = self._explain_refusal(state, error)
            raise error from None
        if result != 0:
            raise KvmError(
                None,
                f"returned {result} instead of 0 (a failure without errno)",
                ioctl="KVM_SET_NESTED_STATE",
                result=result,
            )

    def _explain_refusal(self, state: NestedState, error: KvmError) -> KvmError:
        """The kernel's bare EINVAL, with the rules the state breaks on this vCPU."""
        # Imported here: the rules are a layer above, and only a refusal needs them.
        from kvmstate import check

        try:
            problems = check.check(state, check.Facts.from_vcpu(self))
            text = check.format_problems(problems)
        except Exception as exc:  # an explanation must never hide the kernel's answer
            return KvmError(
                error.errno, f"{error.strerror} (no explanation: {exc!r})", ioctl=error.ioctl
            )
        return NestedStateRejectedError(
            error.errno,
            f"{error.strerror}: {text}",
            ioctl=error.ioctl,
            problems=list(problems),
        )

    def _nested_error(self, exc: OSError, name: str) -> KvmError:
        size = self.nested_state_size
        # The kernel's own 0 says "no nesting", whatever size the caller gave.
        if exc.errno == errno.EINVAL and 0 in (size, self._nested_cap):
            return NestedStateUnavailableError(
                errno.EINVAL, NestedStateUnavailableError.HINT, ioctl=name
            )
        return self.kvm_error(exc, name)

    # --- events and debugging (issue 14) --------------------------------------------------

    def nmi(self) -> None:
        """``KVM_NMI``: queue an NMI; KVM delivers it (or exits to L1) at the next :meth:`run`.

        >>> vcpu.nmi(); vcpu.get_vcpu_events().nmi.pending       # doctest: +SKIP
        1
        """
        self._ioctl(io.KVM_NMI)

    def interrupt(self, vector: int) -> None:
        """``KVM_INTERRUPT``: an external interrupt of ``vector`` for the next :meth:`run`
        (no in-kernel irqchip, or a split one: then an ExtINT through the LAPIC).

        With a split irqchip KVM holds it where no GET ioctl reports it: do
        not save the vCPU between this call and the next run.

        >>> vcpu.interrupt(0x41)                                 # doctest: +SKIP
        """
        if not isinstance(vector, int) or isinstance(vector, bool):
            raise TypeError(f"vector must be an int, not {type(vector).__name__}")
        if not 0 <= vector < uapi.KVM_NR_INTERRUPTS:
            raise ValueError(f"vector {vector} is out of range (0..255)")
        # A kvm_interrupt, the size KVM_INTERRUPT encodes; the kernel only reads it.
        self._ioctl(io.KVM_INTERRUPT, uapi.kvm_interrupt(irq=vector))

    def set_guest_debug(self, control: int, debugreg: Iterable[int] = ()) -> None:
        """``KVM_SET_GUEST_DEBUG``: ``control`` is ``KVM_GUESTDBG_*`` (0 turns it off);
        ``debugreg`` up to eight DR0-DR7 values for hardware breakpoints.

        >>> step = uapi.KVM_GUESTDBG_ENABLE | uapi.KVM_GUESTDBG_SINGLESTEP
        >>> vcpu.set_guest_debug(step)                           # doctest: +SKIP
        >>> vcpu.run(), vcpu.kvm_run.debug.arch.pc               # doctest: +SKIP
        (<ExitReason.DEBUG: 4>, 4097)
        """
        arg = uapi.kvm_guest_debug(control=_u32(control, "control"))
        regs = list(debugreg)
        if len(regs) > 8:
            raise ValueError(f"debugreg: at most 8 values (DR0-DR7), not {len(regs)}")
        for i, value in enumerate(regs):
            arg.arch.debugreg[i] = _u64(value, f"debugreg[{i}]")
        # A kvm_guest_debug, the size KVM_SET_GUEST_DEBUG encodes; the kernel only reads it.
        self._ioctl(io.KVM_SET_GUEST_DEBUG, arg)

    def enable_cap(self, capability: int, *args: int, flags: int = 0) -> int:
        """``KVM_ENABLE_CAP`` on this vCPU (per-vCPU capabilities such as Hyper-V SynIC).

        >>> vcpu.enable_cap(123)  # KVM_CAP_HYPERV_SYNIC          # doctest: +SKIP
        """
        cap = uapi.kvm_enable_cap.build(capability, *args, flags=flags)
        # A kvm_enable_cap, the size KVM_ENABLE_CAP encodes; the kernel only reads it.
        return self._ioctl(io.KVM_ENABLE_CAP, cap)

    # --- whole-vCPU state ----------------------------------------------------------------

    @property
    def msr_index_list(self) -> tuple[int, ...] | None:
        """``KVM_GET_MSR_INDEX_LIST`` as the Kvm handed it down (None for a borrowed vCPU,
        unless its VM knows it): the MSRs :meth:`save_state` reads."""
        if self._msr_index_list is None:
            known = getattr(self.vm, "msr_index_list", None)
            return None if known is None else tuple(known)
        return self._msr_index_list

    def save_state(self) -> VcpuState:
        """Every part of this vCPU's state (see :mod:`kvmstate.save`, which does the work).

        A part this KVM lacks is ``None``, with the reason in ``absent``:

        >>> vcpu = kvmstate.Kvm().create_vm().create_vcpu(0)
        >>> saved = vcpu.save_state()
        >>> saved.regs.rip == 0xFFF0, saved.nested is not None or "nested" in saved.absent
        (True, True)

        :raises StateError: reading one part failed; ``part`` names it, errno kept.
        :raises ValueError: the vCPU was borrowed and no MSR list is known.
        """
        # Imported here: only a save needs it (import kvmstate stays small).
        from kvmstate import save

        return save.save(self)

    def restore_state(self, saved: VcpuState, *, drop_msrs: bool = True) -> None:
        """Write a :class:`~kvmstate.state.VcpuState` back, in the order nested state needs.

        Checked first against this vCPU (:mod:`kvmstate.preflight`): what it
        would refuse raises :class:`~kvmstate.preflight.PreflightError` before
        anything is written; MSRs this kernel does not know are dropped where
        the policy allows, with a :class:`~kvmstate.preflight.DroppedMsrWarning`
        that lists them (``drop_msrs=False``: refused instead)::

            vcpu.restore_state(saved)  # DroppedMsrWarning: ... dropped: 0x309=0x0, ...

        >>> vcpu = kvmstate.Kvm().create_vm().create_vcpu(0)
        >>> saved = vcpu.save_state()
        >>> regs = vcpu.get_regs()
        >>> regs.rip = 0x1000
        >>> vcpu.set_regs(regs)
        >>> vcpu.restore_state(saved)
        >>> hex(vcpu.get_regs().rip)
        '0xfff0'

        :raises TypeError: ``saved`` is not a VcpuState, or one of its parts
            is not the structure it should be (part named).
        :raises PreflightError: this vCPU would refuse a part or an MSR (nothing
            is written).
        :raises StateError: writing one part failed; ``part`` names it, errno kept.
        """
        from kvmstate import save, state

        if not isinstance(saved, state.VcpuState):
            raise TypeError(f"restore_state() needs a VcpuState, not {type(saved).__name__}")
        save.restore(self, saved, drop_msrs=drop_msrs)

    # --- lifetime ------------------------------------------------------------------------

    def _release(self) -> None:
        self._nested_kept, self._nested_weak, self._nested_source = None, _no_view, _NO_BUFFER
        self._nested_own, self._nested_own_io = _NO_BUFFER, (None, 0)
        self._nested_kept_storage = None
        self._run = None
        if self._run_map is not None:
            # A caller may still hold a kvm_run view; then the GC unmaps it later.
            unmap(self._run_map)
            self._run_map = None


def _no_view() -> NestedState | None:
    """Vcpu._nested_weak while no weakly held view is: the answer of a dead reference."""
    return None


@functools.cache
def _weak_ref() -> type[weakref.ref[Any]]:
    """``weakref.ref``, imported on first use: most programs never lend a buffer."""
    import weakref

    return weakref.ref


def _sync_names(parts: int) -> str:
    """``REGS|SREGS`` for SyncRegs bits, "nothing" for none."""
    return "|".join(p.name or "" for p in uapi.SyncRegs if parts & p) or "nothing"


def _nested_size_arg(value: object) -> int | None:
    """A ``nested_state_size`` argument: None, 0 (no nesting) or 128..2**24 bytes."""
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"nested_state_size must be an int, not {type(value).__name__}")
    if value != 0 and not HEADER_SIZE <= value <= _NESTED_SIZE_MAX:
        raise ValueError(
            f"nested_state_size {value} is out of range: KVM_CAP_NESTED_STATE is 0 (no "
            f"nesting) or a size from the {HEADER_SIZE}-byte header up to {_NESTED_SIZE_MAX}"
        )
    return value


def _vcpu_id_arg(value: object) -> int | None:
    """A vCPU id as ``KVM_CREATE_VCPU`` takes it (a C int >= 0), or None."""
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"vcpu_id must be an int, not {type(value).__name__}")
    if not 0 <= value <= 0x7FFF_FFFF:
        raise ValueError(f"vcpu_id {value} is out of range (0..0x7fffffff)")
    return value


def _no_lapic(exc: KvmError) -> KvmError:
    return KvmError(
        exc.errno,
        f"{exc.strerror}: this vCPU has no in-kernel LAPIC: its VM needs an in-kernel "
        "irqchip, made by Vm.create_irqchip() before the vCPUs are created",
        ioctl=exc.ioctl,
    )


def _u64(value: object, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not 0 <= value <= 0xFFFF_FFFF_FFFF_FFFF:
        raise ValueError(f"{name} {value:#x} does not fit in 64 bits")
    return value


def _u32(value: object, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not 0 <= value <= 0xFFFF_FFFF:
        raise ValueError(f"{name} {value:#x} does not fit in 32 bits")
    return value


def _exact(obj: object, kind: type[Any]) -> Any:
    if type(obj) is not kind:
        raise TypeError(f"expected {kind.__name__}, not {type(obj).__name__}")
    return obj


def _msr_error(name: str, indices: list[int], done: int) -> KvmError:
    return KvmError(
        None,
        f"processed {done} of {len(indices)} MSRs; MSR {indices[done]:#x} was refused",
        ioctl=name,
        result=done,
    )


def _writable_copy(data: Any) -> NestedState:
    """Copy a bytes-like state into an aligned buffer of its own (reads need no more)."""
    try:
        view = memoryview(data).cast("B")
    except TypeError:
        raise TypeError(
            f"a nested state must be a NestedState or bytes-like, not {type(data).__name__}"
        ) from None
    if view.nbytes < HEADER_SIZE:
        raise ValueError(f"{view.nbytes} bytes is shorter than the {HEADER_SIZE}-byte header")
    state = NestedState(view.nbytes)
    state.buffer[: view.nbytes] = view
    return state


def _ask_dev_kvm(request: int, arg: int, default: int) -> int:
    """A system ioctl's answer from ``/dev/kvm`` for a borrowed vCPU, or ``default``."""
    try:
        fd = os.open(DEFAULT_PATH, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return default
    try:
        return ioctl(fd, request, arg)
    except KvmError:
        return default
    finally:
        os.close(fd)
