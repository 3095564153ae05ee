"""Kvm / Vm / Vcpu against the real /dev/kvm of this machine."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct

import pytest

import kvmstate
from kvmstate import ioctls, uapi
from kvmstate.errors import KvmError
from tests.kvm_fixtures import start_real_mode

SYSENTER_CS, SYSENTER_ESP, SYSENTER_EIP = 0x174, 0x175, 0x176


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def cloexec(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)


def test_kvm_opens_with_api_12_and_cloexec(kvm: kvmstate.Kvm) -> None:
    assert kvm.api_version == fcntl.ioctl(kvm.fileno(), ioctls.KVM_GET_API_VERSION) == 12
    assert cloexec(kvm.fileno())
    assert "api=12" in repr(kvm)


def test_check_extension_is_the_kernels_answer(kvm: kvmstate.Kvm, vm: kvmstate.Vm) -> None:
    raw = fcntl.ioctl(kvm.fileno(), ioctls.KVM_CHECK_EXTENSION, uapi.KVM_CAP_USER_MEMORY)
    assert kvm.check_extension(uapi.KVM_CAP_USER_MEMORY) == raw == 1
    assert vm.check_extension(uapi.KVM_CAP_NR_VCPUS) == fcntl.ioctl(
        vm.fileno(), ioctls.KVM_CHECK_EXTENSION, uapi.KVM_CAP_NR_VCPUS
    )
    raw_nested = fcntl.ioctl(kvm.fileno(), ioctls.KVM_CHECK_EXTENSION, uapi.KVM_CAP_NESTED_STATE)
    assert kvm.nested_state_size == raw_nested


def test_check_extension_rejects_bad_arguments(kvm: kvmstate.Kvm) -> None:
    with pytest.raises(TypeError):
        kvm.check_extension("157")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        kvm.check_extension(-1)
    with pytest.raises(ValueError):
        kvm.check_extension(1 << 40)


def test_vm_and_vcpu_fds_are_cloexec_and_closed_without_leaks(kvm: kvmstate.Kvm) -> None:
    before = open_fds()
    for _ in range(3):
        with kvm.create_vm() as vm, vm.create_vcpu(0) as vcpu:
            assert cloexec(vm.fileno()) and cloexec(vcpu.fileno())
            vcpu.get_regs()
            vcpu.kvm_run  # noqa: B018 - maps the run page, which close() must unmap
    assert open_fds() == before


def test_closed_wrappers_refuse_use(kvm: kvmstate.Kvm) -> None:
    vm = kvm.create_vm()
    vcpu = vm.create_vcpu(0)
    vcpu.close()
    vcpu.close()  # idempotent
    assert vcpu.closed and "closed" in repr(vcpu)
    with pytest.raises(ValueError, match="closed Vcpu"):
        vcpu.get_regs()
    vm.close()
    with pytest.raises(ValueError, match="closed Vm"):
        vm.create_vcpu(1)


def test_non_kvm_device_is_refused_and_closed() -> None:
    before = open_fds()
    with pytest.raises(KvmError) as info:
        kvmstate.Kvm("/dev/null")
    assert info.value.errno == errno.ENOTTY
    assert info.value.ioctl == "KVM_GET_API_VERSION"
    assert open_fds() == before


def test_missing_device_is_file_not_found() -> None:
    with pytest.raises(FileNotFoundError):
        kvmstate.Kvm("/dev/kvm-does-not-exist")


def test_regs_round_trip(vcpu: kvmstate.Vcpu) -> None:
    regs = vcpu.get_regs()
    for i, name in enumerate(regs.field_names()):
        setattr(regs, name, 0x1111_0000_0000 + i)
    regs.rflags = 0x202
    vcpu.set_regs(regs)
    assert vcpu.get_regs() == regs


def test_set_regs_needs_kvm_regs(vcpu: kvmstate.Vcpu) -> None:
    with pytest.raises(TypeError, match="kvm_regs"):
        vcpu.set_regs(vcpu.get_sregs())  # type: ignore[arg-type]


def test_sregs_round_trip(vcpu: kvmstate.Vcpu) -> None:
    sregs = vcpu.get_sregs()
    sregs.cs.base, sregs.cs.selector = 0x10000, 0x1000
    sregs.ds.base, sregs.ds.selector = 0x20000, 0x2000
    sregs.gdt.base, sregs.gdt.limit = 0x5000, 0xFF
    sregs.idt.base, sregs.idt.limit = 0x6000, 0x7FF
    vcpu.set_sregs(sregs)
    assert vcpu.get_sregs() == sregs


def test_msrs_round_trip(vcpu: kvmstate.Vcpu) -> None:
    # 32-bit values: AMD keeps only the low half of the SYSENTER MSRs.
    values = {SYSENTER_CS: 0x10, SYSENTER_ESP: 0x1234_5000, SYSENTER_EIP: 0x0567_8000}
    vcpu.set_msrs(values)
    assert vcpu.get_msrs(values) == values


def test_msr_refused_by_the_kernel_is_named(vcpu: kvmstate.Vcpu) -> None:
    with pytest.raises(KvmError, match="0xdeadbeef") as info:
        vcpu.get_msrs([SYSENTER_CS, 0xDEADBEEF])
    assert info.value.result == 1 and info.value.ioctl == "KVM_GET_MSRS"
    with pytest.raises(ValueError):
        vcpu.get_msrs([1 << 32])
    with pytest.raises(TypeError):
        vcpu.set_msrs({SYSENTER_CS: "1"})  # type: ignore[dict-item]


def test_msr_index_list_is_readable(kvm: kvmstate.Kvm, vcpu: kvmstate.Vcpu) -> None:
    indices = kvm.get_msr_index_list()
    assert SYSENTER_CS in indices and len(indices) == len(set(indices))
    assert set(vcpu.get_msrs([SYSENTER_CS, SYSENTER_ESP])) == {SYSENTER_CS, SYSENTER_ESP}


# --- CPUID: what KVM_SET_CPUID2 keeps and KVM_GET_CPUID2 gives back ---------------------

REGISTERS = ("eax", "ebx", "ecx", "edx")
ALL = 0xFFFF_FFFF
# The bits KVM rewrites in a vCPU's CPUID table from the vCPU's own state, at SET and
# whenever that state changes: __kvm_update_cpuid_runtime (arch/x86/kvm/cpuid.c, the
# same in 6.1 and 6.12). Keyed by (function, index); index None: any index.
RUNTIME_ADJUSTED: dict[tuple[int, int | None], dict[str, int]] = {
    (0x1, None): {"ecx": 1 << 27, "edx": 1 << 9},  # OSXSAVE = CR4.OSXSAVE, APIC = APIC_BASE.EN
    (0x7, 0): {"ecx": 1 << 4},  # OSPKE = CR4.PKE
    (0xD, 0): {"ebx": ALL},  # XSAVE area size for the vCPU's XCR0
    (0xD, 1): {"ebx": ALL},  # compacted size for XCR0 | IA32_XSS (with XSAVES/XSAVEC)
    (0x12, 1): {"ecx": ALL, "edx": ALL},  # 6.1: the SGX XFRM, masked by the supported XCR0
}
# Not in the list, because this test's vCPUs never meet the condition: MWAIT (1:ECX[3]),
# rewritten only with KVM_X86_QUIRK_MISC_ENABLE_NO_MWAIT disabled, and KVM_FEATURE_PV_UNHALT,
# cleared only with HLT exits disabled. KVM leaves the APIC IDs (1:EBX[31:24], 0xB and 0x1F
# EDX) and the rest of the topology as userspace set them (api.rst, "CPU topology").

# kvm_pvm, the host of the development machines (6.18.44 "-fc"), is not upstream KVM here:
# its KVM_SET_CPUID2 rewrites the feature leaves whatever the VMM set. Seen: AVX-512 bits the
# VMM left clear come back set, AMX-TILE (7.0:EDX[24]) and AVX10 (7.1:EDX[19]) set by the VMM
# or by the host CPU come back clear, 7.0 EAX becomes the host's, 0xD.0 EAX becomes 0xe7 (no
# AMX state, where the host's has 0x600e7), and a table with leaf 1 but no leaf 0xD gains
# 0xD.0-7; every bit it adds is the host CPU's. No public source has this: the PVM tree
# (github.com/virt-pvm/linux) keeps upstream's kvm_set_cpuid and an empty
# pvm_vcpu_after_set_cpuid. A PVM guest runs natively at CPL3, where the host's user-level
# features work whatever the table says, so presumably the table is made to say what the
# guest gets. It rewrites only leaves 1 (ECX, EDX), 7 and 0xD ...
PVM_REWRITTEN: dict[int, tuple[str, ...]] = {0x1: ("ecx", "edx"), 0x7: REGISTERS, 0xD: REGISTERS}
# ... and a feature bit it sets there is the host CPU's or was in the table set: checked in
# the registers that hold feature bits, not sizes. Keyed like RUNTIME_ADJUSTED.
PVM_FEATURE_BITS: dict[tuple[int, int | None], tuple[str, ...]] = {
    (0x1, None): ("ecx", "edx"),
    (0x7, None): REGISTERS,
    (0xD, 0): ("eax", "edx"),  # the XCR0 bits
    (0xD, 1): ("eax",),  # XSAVEOPT, XSAVEC, XGETBV1, XSAVES, XFD
}
# It drops the leaves that describe only the features it withholds, AMX and AVX10: dropped
# even when set with values and the feature bit, so a table with them cannot be kept whole.
# Allowed only where the kept table says the feature is absent: function -> the (function,
# index, register, bit) that enumerates the feature.
PVM_DROPPED_WITH_FEATURE: dict[int, tuple[int, int, str, int]] = {
    0x1D: (0x7, 0, "edx", 24),  # AMX tile palettes: AMX-TILE
    0x1E: (0x7, 0, "edx", 24),  # AMX TMUL information: AMX-TILE
    0x24: (0x7, 1, "edx", 19),  # AVX10 converged vector ISA: AVX10
}


def kvm_is_pvm() -> bool:
    return os.path.isdir("/sys/module/kvm_pvm")


def host_cpuid(function: int, index: int) -> dict[str, int] | None:
    """The host CPU's own CPUID (the cpuid driver, root only), or None where unreadable."""
    try:
        fd = os.open("/dev/cpu/0/cpuid", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        raw = os.pread(fd, 16, index << 32 | function)  # the driver's offset: ECX << 32 | EAX
    finally:
        os.close(fd)
    return dict(zip(REGISTERS, struct.unpack("<4I", raw), strict=True))


def adjusted(function: int, index: int) -> dict[str, int]:
    """Which bits of each register of entry (function, index) KVM may rewrite."""
    masks = dict.fromkeys(REGISTERS, 0)
    for key in ((function, index), (function, None)):
        for reg, mask in RUNTIME_ADJUSTED.get(key, {}).items():
            masks[reg] |= mask
    if kvm_is_pvm():
        for reg in PVM_REWRITTEN.get(function, ()):
            masks[reg] = ALL
    return masks


def cpuid_entries_held(vcpu: kvmstate.Vcpu) -> int:
    """How many entries the vCPU's CPUID table holds, from the kernel alone: KVM_GET_CPUID2
    answers E2BIG exactly when nent is below that count (kvm_vcpu_ioctl_get_cpuid2, 6.1 and
    6.12); its nent on success is no answer, 6.1 leaves the caller's there."""
    low, high = 0, 256  # KVM_MAX_CPUID_ENTRIES: no table holds more
    while low < high:
        n = (low + high) // 2
        # Room for n entries: the kernel copies its entries only when their count fits.
        arg = uapi.kvm_cpuid2.new(n)
        try:
            fcntl.ioctl(vcpu.fileno(), ioctls.KVM_GET_CPUID2, arg)
        except OSError as exc:
            assert exc.errno == errno.E2BIG, exc
            low = n + 1
        else:
            high = n
    return low


def check_cpuid_round_trip(kvm: kvmstate.Kvm, vcpu: kvmstate.Vcpu) -> None:
    """SET the supported CPUID, GET it back, and hold the result to what KVM promises."""
    supported = kvm.get_supported_cpuid()
    assert 0 < len(supported) == supported.capacity()
    vcpu.set_cpuid2(supported)
    back = vcpu.get_cpuid2()
    held = cpuid_entries_held(vcpu)
    assert len(back) == back.nent == held, f"get_cpuid2 gave {back.nent} entries, KVM holds {held}"
    sent = {(e.function, e.index): e for e in supported.entries}
    got = {(e.function, e.index): e for e in back.entries}
    assert len(sent) == len(supported) and len(got) == len(back)  # no duplicate leaves
    # Every entry returned is one that was set: same function, index and flags.
    assert set(got) <= set(sent), sorted(set(got) - set(sent))
    for key, entry in got.items():
        assert entry.flags == sent[key].flags, key
    # Upstream KVM keeps every entry (kvm_set_cpuid stores the array as given).
    dropped = sorted(set(sent) - set(got))
    if not kvm_is_pvm():
        assert dropped == [], [f"{f:#x}.{i}" for f, i in dropped]
    for function, index in dropped:
        assert function in PVM_DROPPED_WITH_FEATURE, f"dropped {function:#x}.{index}"
        leaf, sub, reg, bit = PVM_DROPPED_WITH_FEATURE[function]
        enumerating = got.get((leaf, sub))
        assert enumerating is None or not getattr(enumerating, reg) >> bit & 1, (function, leaf)
    # In every kept entry, only the bits named above may differ.
    for key, entry in got.items():
        masks = adjusted(*key)
        for reg in REGISTERS:
            set_value, got_value = getattr(sent[key], reg), getattr(entry, reg)
            changed = set_value ^ got_value
            assert changed & ~masks[reg] == 0, f"{key[0]:#x}.{key[1]} {reg}: {changed:#x}"
        assert entry.to_bytes()[28:] == sent[key].to_bytes()[28:], key  # the padding
    if not kvm_is_pvm():
        return
    for key, entry in got.items():
        regs = PVM_FEATURE_BITS.get(key, PVM_FEATURE_BITS.get((key[0], None), ()))
        host = host_cpuid(*key) if regs else None
        for reg in regs if host is not None else ():
            extra = getattr(entry, reg) & ~(getattr(sent[key], reg) | host[reg])
            assert extra == 0, f"{key[0]:#x}.{key[1]} {reg}: {extra:#x} neither set nor the host's"


def test_cpuid_round_trip(kvm: kvmstate.Kvm, vcpu: kvmstate.Vcpu) -> None:
    check_cpuid_round_trip(kvm, vcpu)


@pytest.mark.svm_guest
def test_cpuid_round_trip_on_upstream_kvm(kvm: kvmstate.Kvm, vcpu: kvmstate.Vcpu) -> None:
    """The same inside the emulated AMD guest, whose Debian kvm_amd is upstream's."""
    assert not kvm_is_pvm()
    check_cpuid_round_trip(kvm, vcpu)


def check_cpuid_counts(kvm: kvmstate.Kvm) -> None:
    """GET_CPUID2 gives exactly the entries set, whatever the kernel does with ``nent``."""
    supported = kvm.get_supported_cpuid()
    with kvm.create_vm() as vm:
        for vcpu_id, count in enumerate((0, 1, 3, len(supported))):
            with vm.create_vcpu(vcpu_id) as vcpu:
                if count:
                    table = uapi.kvm_cpuid2.new(count)
                    for i in range(count):
                        ctypes.memmove(
                            ctypes.addressof(table.entries[i]),
                            ctypes.addressof(supported.entries[i]),
                            ctypes.sizeof(uapi.kvm_cpuid_entry2),
                        )
                    vcpu.set_cpuid2(table)
                for _ in range(2):  # the second call starts from the remembered count
                    back = vcpu.get_cpuid2()
                    n = len(back)
                    assert n == back.capacity()
                    # The kernel's own count: one entry fewer is E2BIG, exactly n succeeds.
                    if n:
                        short = uapi.kvm_cpuid2.new(n - 1)
                        with pytest.raises(OSError) as info:
                            fcntl.ioctl(vcpu.fileno(), ioctls.KVM_GET_CPUID2, short)
                        assert info.value.errno == errno.E2BIG
                    exact = uapi.kvm_cpuid2.new(n)
                    fcntl.ioctl(vcpu.fileno(), ioctls.KVM_GET_CPUID2, exact)
                    assert exact.to_bytes()[8:] == back.to_bytes()[8:]
                    if not kvm_is_pvm():  # upstream keeps exactly the entries set
                        sent = [(e.function, e.index) for e in supported.entries[:count]]
                        assert [(e.function, e.index) for e in back.entries] == sent


def test_get_cpuid2_gives_the_entries_set(kvm: kvmstate.Kvm) -> None:
    check_cpuid_counts(kvm)


@pytest.mark.svm_guest
def test_get_cpuid2_gives_the_entries_set_on_upstream_kvm(kvm: kvmstate.Kvm) -> None:
    """Inside the AMD guest: 6.1's KVM_GET_CPUID2 never writes the count back."""
    assert not kvm_is_pvm()
    check_cpuid_counts(kvm)


def test_cpuid_count_beyond_the_allocation_is_refused(vcpu: kvmstate.Vcpu) -> None:
    cpuid = uapi.kvm_cpuid2.new(2)
    cpuid.nent = 1000
    with pytest.raises(ValueError, match="holds 2 entries"):
        vcpu.set_cpuid2(cpuid)


def test_vcpu_events_round_trip(vcpu: kvmstate.Vcpu) -> None:
    events = vcpu.get_vcpu_events()
    events.nmi.masked = 1
    events.flags = 0
    vcpu.set_vcpu_events(events)
    back = vcpu.get_vcpu_events()
    assert back.nmi.masked == 1
    assert back.exception.to_bytes() == events.exception.to_bytes()


def test_borrowed_vcpu_is_not_closed(vcpu: kvmstate.Vcpu) -> None:
    borrowed = kvmstate.Vcpu.borrow(vcpu.fileno())
    assert not borrowed.owned and "borrowed" in repr(borrowed)
    assert borrowed.get_regs() == vcpu.get_regs()
    borrowed.close()
    assert vcpu.get_regs() is not None  # the owner's fd still works
    with pytest.raises(ValueError):
        borrowed.get_regs()


def test_borrowed_vcpu_learns_nested_size_from_dev_kvm(
    kvm: kvmstate.Kvm, vcpu: kvmstate.Vcpu
) -> None:
    borrowed = kvmstate.Vcpu.borrow(vcpu.fileno())
    assert borrowed.nested_state_size == kvm.nested_state_size
    borrowed.close()


def load_real_mode(vm: kvmstate.Vm, vcpu: kvmstate.Vcpu, code: bytes) -> None:
    """Put ``code`` at 0x1000 and point the vCPU (real mode, CS base 0) at it."""
    mem = vm.add_memory(0, 0x10000)
    mem[0x1000 : 0x1000 + len(code)] = code
    start_real_mode(vcpu)


def test_run_real_mode_code_to_io_and_hlt(vm: kvmstate.Vm, vcpu: kvmstate.Vcpu) -> None:
    code = bytes([0xB0, 0x42, 0xE6, 0x10, 0xF4])  # mov al,0x42; out 0x10,al; hlt
    load_real_mode(vm, vcpu, code)
    assert vcpu.run() == uapi.ExitReason.IO
    io = vcpu.kvm_run.io
    assert (io.direction, io.port, io.size) == (uapi.KVM_EXIT_IO_OUT, 0x10, 1)
    assert vcpu.io_data() == b"\x42"
    assert vcpu.run() == uapi.ExitReason.HLT
    assert vcpu.get_regs().rip == 0x1000 + len(code)
    with pytest.raises(ValueError, match="not KVM_EXIT_IO"):
        vcpu.io_data()


def test_complete_io_finishes_the_exit_without_running(
    vm: kvmstate.Vm, vcpu: kvmstate.Vcpu
) -> None:
    load_real_mode(vm, vcpu, bytes([0xE6, 0x10, 0xF4]))  # out 0x10,al; hlt
    assert vcpu.run() == uapi.ExitReason.IO
    vcpu.complete_io()
    assert vcpu.kvm_run.immediate_exit == 0
    assert vcpu.get_regs().rip == 0x1002  # past the out, not yet at hlt's exit


def test_add_memory_rejects_unaligned(vm: kvmstate.Vm) -> None:
    with pytest.raises(ValueError, match="page size"):
        vm.add_memory(0x100, 0x1000)


def test_nested_unavailable_is_a_dedicated_oserror(no_nested_kvm: kvmstate.Kvm) -> None:
    with no_nested_kvm.create_vm() as vm, vm.create_vcpu(0) as vcpu:
        with pytest.raises(kvmstate.NestedStateUnavailableError) as info:
            vcpu.get_nested_state()
        assert isinstance(info.value, OSError)
        assert info.value.errno == errno.EINVAL
        assert info.value.ioctl == "KVM_GET_NESTED_STATE"
        assert "nested=1" in str(info.value)
        state = kvmstate.NestedState(128)
        state.size = 128
        with pytest.raises(kvmstate.NestedStateUnavailableError) as info:
            vcpu.set_nested_state(state)
        assert info.value.ioctl == "KVM_SET_NESTED_STATE"
