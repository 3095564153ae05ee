"""Every mirror, constant and ioctl number against the installed kernel headers.

The expectations come from gcc compiling <linux/kvm.h> and gdb reading the
result back (tests/ctypes_oracle.py), never from numbers typed in here.
"""

from __future__ import annotations

import ctypes
import re
import tarfile
from pathlib import Path
from typing import Any

import pytest

from kvmstate import ioctls, uapi
from tests import ctypes_oracle as oracle

pytestmark = pytest.mark.skipif(
    oracle.tools_missing() is not None, reason=str(oracle.tools_missing())
)

HEADER = "#include <linux/kvm.h>\n"
if not Path("/usr/include/linux/kvm.h").exists():
    pytestmark = pytest.mark.skip(reason="<linux/kvm.h> missing (apt-get install linux-libc-dev)")

# Mirror -> C type. Anonymous C sub-structures are reached through their parents.
MIRRORS: dict[str, Any] = {
    "struct kvm_nested_state": uapi.kvm_nested_state,
    "struct kvm_vmx_nested_state_hdr": uapi.kvm_vmx_nested_state_hdr,
    "struct kvm_svm_nested_state_hdr": uapi.kvm_svm_nested_state_hdr,
    "struct kvm_vmx_nested_state_data": uapi.kvm_vmx_nested_state_data,
    "struct kvm_svm_nested_state_data": uapi.kvm_svm_nested_state_data,
    "struct kvm_regs": uapi.kvm_regs,
    "struct kvm_segment": uapi.kvm_segment,
    "struct kvm_dtable": uapi.kvm_dtable,
    "struct kvm_sregs": uapi.kvm_sregs,
    "struct kvm_vcpu_events": uapi.kvm_vcpu_events,
    "struct kvm_msr_entry": uapi.kvm_msr_entry,
    "struct kvm_msrs": uapi.kvm_msrs.new(3).__class__,
    "struct kvm_msr_list": uapi.kvm_msr_list.new(5).__class__,
    "struct kvm_cpuid_entry2": uapi.kvm_cpuid_entry2,
    "struct kvm_cpuid2": uapi.kvm_cpuid2.new(2).__class__,
    "struct kvm_userspace_memory_region": uapi.kvm_userspace_memory_region,
    "struct kvm_run": uapi.kvm_run,
    "struct kvm_sync_regs": uapi.kvm_sync_regs,
    "struct kvm_debug_exit_arch": uapi.kvm_debug_exit_arch,
    "struct kvm_hyperv_exit": uapi.kvm_hyperv_exit,
    "struct kvm_sregs2": uapi.kvm_sregs2,
    "struct kvm_fpu": uapi.kvm_fpu,
    "struct kvm_xsave": uapi.kvm_xsave.sized(4096 + 64).__class__,
    "struct kvm_xcr": uapi.kvm_xcr,
    "struct kvm_xcrs": uapi.kvm_xcrs,
    "struct kvm_debugregs": uapi.kvm_debugregs,
    "struct kvm_mp_state": uapi.kvm_mp_state,
    "struct kvm_lapic_state": uapi.kvm_lapic_state,
    # The VM snapshot's devices and clock, and the vCPU event ioctls (issue 14).
    "struct kvm_clock_data": uapi.kvm_clock_data,
    "struct kvm_pic_state": uapi.kvm_pic_state,
    "struct kvm_ioapic_state": uapi.kvm_ioapic_state,
    "struct kvm_irqchip": uapi.kvm_irqchip,
    "struct kvm_pit_config": uapi.kvm_pit_config,
    "struct kvm_pit_channel_state": uapi.kvm_pit_channel_state,
    "struct kvm_pit_state2": uapi.kvm_pit_state2,
    "struct kvm_guest_debug_arch": uapi.kvm_guest_debug_arch,
    "struct kvm_guest_debug": uapi.kvm_guest_debug,
    "struct kvm_enable_cap": uapi.kvm_enable_cap,
    "struct kvm_interrupt": uapi.kvm_interrupt,
}
PARTIAL: frozenset[str] = frozenset()
EXTRA = frozenset(f"{s}.{f}" for s, f in uapi.NEWER_FIELDS)
# kvm_run's exit union: the members of other architectures and Xen are left to its
# padding (everything else in kvm_run, its size included, is compared).
NOT_X86_EXITS = (
    "s390_sieic", "s390_reset_flags", "s390_ucontrol", "dcr", "osi", "papr_hcall",
    "s390_tsch", "epr", "s390_stsi", "arm_nisv", "xen", "riscv_sbi", "riscv_csr",
)  # fmt: skip
OMITTED = frozenset(f"kvm_run.{name}" for name in NOT_X86_EXITS)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return oracle.c_layouts(HEADER, list(MIRRORS), tmp_path_factory.mktemp("oracle"))


@pytest.mark.parametrize("c_name", list(MIRRORS))
def test_mirror_matches_c(c_name: str, layouts: dict[str, Any]) -> None:
    problems = oracle.compare(
        MIRRORS[c_name], layouts[c_name], partial=PARTIAL, extra=EXTRA, omitted=OMITTED
    )
    assert problems == []


def test_kvm_run_is_the_whole_structure(layouts: dict[str, Any]) -> None:
    c = layouts["struct kvm_run"]
    assert ctypes.sizeof(uapi.kvm_run) == c["size"]
    members = {f["name"]: f for f in c["fields"]}
    assert uapi.kvm_run.s.offset == members["s"]["offset"]
    assert ctypes.sizeof(uapi.kvm_run_s) == members["s"]["type"]["size"]
    (union,) = [f for f in c["fields"] if not f["name"]]  # the anonymous exit union
    assert ctypes.sizeof(uapi.kvm_run_exit) == union["type"]["size"]
    assert uapi.kvm_run.u.offset == union["offset"]
    # Every member of the union is mirrored but the other architectures' ones.
    c_members = {f["name"] for f in union["type"]["fields"]}
    assert c_members - set(uapi.kvm_run_exit.field_names()) == set(NOT_X86_EXITS)


def test_every_exit_member_is_a_member() -> None:
    for reason, member in uapi.EXIT_MEMBERS.items():
        assert uapi.ExitReason(reason).value == reason
        assert member in uapi.kvm_run_exit.field_names()


def test_header_is_the_c_sizeof(layouts: dict[str, Any]) -> None:
    # The fixed part alone is what C calls sizeof(struct kvm_nested_state).
    assert ctypes.sizeof(uapi.kvm_nested_state_header) == layouts["struct kvm_nested_state"]["size"]
    assert layouts["struct kvm_nested_state"]["size"] == uapi.NESTED_STATE_HEADER_SIZE


def test_newer_fields_fit_in_the_c_padding(layouts: dict[str, Any]) -> None:
    # Fields newer than the header must not move anything: they live inside hdr's 120 bytes.
    hdr = next(f for f in layouts["struct kvm_nested_state"]["fields"] if f["name"] == "hdr")
    for struct_name, field in uapi.NEWER_FIELDS:
        cls = getattr(uapi, struct_name)
        desc = getattr(cls, field)
        assert desc.offset + desc.size <= hdr["type"]["size"], (struct_name, field)


# Commit 4f256d5770fe (Linux 7.2, uapi.GPAT_COMMIT) adds one line to
# arch/x86/include/uapi/asm/kvm.h: "__u64 gpat;" right after the "__u64 vmcb_pa;" of
# struct kvm_svm_nested_state_hdr. The installed header (6.1) predates it, so the
# upstream ABI is the installed header with that line added, compiled like the rest.
ASM_KVM_H = [Path("/usr/include/x86_64-linux-gnu/asm/kvm.h"), Path("/usr/include/asm/kvm.h")]
_SVM_HDR = re.compile(r"(struct kvm_svm_nested_state_hdr \{\n\s*__u64 vmcb_pa;\n)((?:.*\n)*?)(\};)")
UPSTREAM = {
    "struct kvm_svm_nested_state_hdr": uapi.kvm_svm_nested_state_hdr,
    "struct kvm_nested_state": uapi.kvm_nested_state,
}


def _upstream_header() -> str:
    path = next((p for p in ASM_KVM_H if p.exists()), None)
    if path is None:
        pytest.skip("<asm/kvm.h> missing (apt-get install linux-libc-dev)")
    text = path.read_text()
    found = _SVM_HDR.search(text)
    assert found is not None, f"no struct kvm_svm_nested_state_hdr in {path}"
    if "gpat" not in found[2]:  # a header older than the commit: apply its one line
        text = text[: found.end(1)] + "\t__u64 gpat;\n" + text[found.end(1) :]
    # asm/kvm.h's include guard keeps linux/kvm.h from reading the unpatched copy.
    return text + "\n#include <linux/kvm.h>\n"


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return oracle.c_layouts(_upstream_header(), list(UPSTREAM), tmp_path_factory.mktemp("up"))


@pytest.mark.parametrize("c_name", list(UPSTREAM))
def test_svm_header_matches_the_merged_abi(c_name: str, upstream: dict[str, Any]) -> None:
    # Nothing skipped: every field, gpat included, where the merged header puts it.
    problems = oracle.compare(UPSTREAM[c_name], upstream[c_name], partial=PARTIAL)
    assert problems == []


def test_merged_gpat_follows_vmcb_pa(upstream: dict[str, Any]) -> None:
    svm = {f["name"]: f for f in upstream["struct kvm_svm_nested_state_hdr"]["fields"]}
    assert list(svm) == ["vmcb_pa", "gpat"]
    assert uapi.kvm_svm_nested_state_hdr.gpat.offset == svm["gpat"]["offset"]
    hdr = next(f for f in upstream["struct kvm_nested_state"]["fields"] if f["name"] == "hdr")
    assert ctypes.sizeof(uapi.kvm_nested_state_hdr) == hdr["type"]["size"]
    assert upstream["struct kvm_nested_state"]["size"] == uapi.NESTED_STATE_HEADER_SIZE
    assert not hasattr(uapi, "SvmHeaderFlag") and not hasattr(uapi, "KVM_STATE_SVM_VALID_GPAT")


LINUX_6_12 = Path("/usr/src/linux-source-6.12.tar.xz")
UAPI_6_12 = ("arch/x86/include/uapi/asm/kvm.h", "include/uapi/linux/kvm.h")
# 6.12's uapi headers before headers_install: linux/bits.h is newer than the installed
# 6.1 set (taken from the tarball too) and linux/compiler.h is stripped on install.
BITS_H = "include/uapi/linux/bits.h"


@pytest.fixture(scope="module")
def values_6_12(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int | None]:
    """NEWER_CONSTANTS as Debian's 6.12 source defines them (None: not there)."""
    if not LINUX_6_12.exists():
        pytest.skip(f"{LINUX_6_12} missing (apt-get install linux-source-6.12)")
    dest = tmp_path_factory.mktemp("linux-6.12")
    wanted = {*UAPI_6_12, BITS_H}
    with tarfile.open(LINUX_6_12, "r|xz") as archive:  # streamed: stop once all are read
        for member in archive:
            rel = member.name.split("/", 1)[-1]
            if rel in wanted and member.isfile():
                stream = archive.extractfile(member)
                assert stream is not None
                (dest / rel.replace("/", "_")).write_bytes(stream.read())
                wanted.discard(rel)
                if not wanted:
                    break
    assert not wanted, f"{LINUX_6_12} lacks {sorted(wanted)}"
    bits = dest / BITS_H.replace("/", "_")
    for rel in UAPI_6_12:
        path = dest / rel.replace("/", "_")
        text = path.read_text().replace("#include <linux/compiler.h>", "")
        path.write_text(text.replace("<linux/bits.h>", f'"{bits}"'))
    # asm/kvm.h first: its include guard keeps linux/kvm.h off the installed 6.1 copy.
    header = "#define __user\n"  # compiler.h's annotation, which headers_install strips
    header += "".join(f'#include "{dest / rel.replace("/", "_")}"\n' for rel in UAPI_6_12)
    return oracle.c_constants(header, sorted(uapi.NEWER_CONSTANTS), dest)


@pytest.mark.parametrize("name", sorted(uapi.NEWER_CONSTANTS))
def test_newer_constant_is_where_it_says(name: str, values_6_12: dict[str, int | None]) -> None:
    if "6.12" in uapi.NEWER_CONSTANTS[name]:
        assert values_6_12[name] == getattr(uapi, name)
    else:  # newer than 6.12 too (the gPAT quirk, Linux 7.2)
        assert values_6_12[name] is None


def _public_constants() -> list[str]:
    return sorted(n for n, v in vars(uapi).items() if n.startswith("KVM_") and isinstance(v, int))


@pytest.fixture(scope="module")
def c_values(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int | None]:
    names = _public_constants() + list(ioctls.IOCTLS)
    return oracle.c_constants(HEADER, names, tmp_path_factory.mktemp("consts"))


@pytest.mark.parametrize("name", _public_constants())
def test_constant_matches_c(name: str, c_values: dict[str, int | None]) -> None:
    if c_values[name] is None:
        assert name in uapi.NEWER_CONSTANTS, f"{name} is neither in the header nor documented"
        return
    assert name not in uapi.NEWER_CONSTANTS, f"{name} is in the header now: drop it from NEWER"
    assert getattr(uapi, name) == c_values[name]


@pytest.mark.parametrize("name", list(ioctls.IOCTLS))
def test_ioctl_number_matches_c(name: str, c_values: dict[str, int | None]) -> None:
    assert ioctls.IOCTLS[name] == c_values[name]
    assert getattr(ioctls, name) == c_values[name]


def test_ioc_encoding_rejects_oversized_arguments() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        ioctls._IOW(uapi.KVMIO, 1, 1 << 14)


def test_enum_views_match_constants() -> None:
    assert uapi.NestedFlag.GIF_SET == uapi.KVM_STATE_NESTED_GIF_SET
    for flag in uapi.NestedFlag:
        assert getattr(uapi, f"KVM_STATE_NESTED_{flag.name}") == flag
    for fmt in uapi.NestedFormat:
        assert getattr(uapi, f"KVM_STATE_NESTED_FORMAT_{fmt.name}") == fmt
    for reason in uapi.ExitReason:
        assert getattr(uapi, f"KVM_EXIT_{reason.name}") == reason
