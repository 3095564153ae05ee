"""What ``import kvmstate`` loads, and the names it leaves to first use (issue 16).

The import-time cost itself is a benchmark (``benchmarks/bench_core.py``);
these tests hold the structure that keeps it low: no ``typing`` (with the
``re`` and ``contextlib`` it pulls in) at run time, and the enum views of the
UAPI made only when one is asked for, through its ``kvmstate.uapi`` name.
"""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvmstate import _fd, uapi, uapi_enums, vmcb, x86
from kvmstate._struct import flag_kind

ROOT = Path(__file__).resolve().parent.parent


def _fresh(code: str) -> str:
    """Run ``code`` in a new interpreter without site (nothing preloaded), from this tree."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-S", "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


def test_import_kvmstate_leaves_typing_and_the_heavy_layers_unloaded() -> None:
    loaded = set(_fresh("import sys, kvmstate; print(' '.join(sys.modules))").split())
    assert "kvmstate.vcpu" in loaded  # the import did happen
    unwanted = {
        "typing",
        "re",
        "contextlib",
        "kvmstate.uapi_enums",
        "kvmstate.state",
        "kvmstate.check",
        "kvmstate.formats",
    }
    assert loaded & unwanted == set()


def test_an_enum_view_is_imported_on_first_use_and_kept() -> None:
    out = _fresh(
        "import sys; from kvmstate import uapi; "
        "before = 'kvmstate.uapi_enums' in sys.modules; "
        "kind = uapi.ExitReason; "
        "from kvmstate import uapi_enums; "
        "print(before, kind is uapi_enums.ExitReason, 'ExitReason' in vars(uapi), "
        "repr(uapi.kvm_mp_state(mp_state=uapi.KVM_MP_STATE_HALTED)))"
    )
    assert out == "False True True kvm_mp_state(mp_state=HALTED)"


@pytest.mark.parametrize("name", uapi_enums.__all__)
def test_every_enum_view_has_its_uapi_name(name: str) -> None:
    assert getattr(uapi, name) is getattr(uapi_enums, name)
    assert name in uapi.__all__


def test_a_name_uapi_does_not_have_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'KVM_EXIT_NOPE'"):
        uapi.KVM_EXIT_NOPE  # noqa: B018
    assert not hasattr(uapi, "Nope")


def test_flag_kind_reads_an_enum_or_its_name() -> None:
    # kvm_mp_state names its enum (made on first use); the VMCB holds x86.Cr0 itself.
    assert isinstance(uapi.kvm_mp_state._flags_["mp_state"], str)
    assert flag_kind(uapi.kvm_mp_state, "mp_state") is uapi.MpState
    assert flag_kind(uapi.kvm_mp_state(), "mp_state") is uapi.MpState
    assert flag_kind(vmcb.vmcb_save_area, "cr0") is x86.Cr0
    assert flag_kind(uapi.kvm_regs, "rip") is None
    assert flag_kind(None, "x") is None


def test_run_exit_reason_reads_by_name_in_a_repr() -> None:
    run = uapi.kvm_run(exit_reason=uapi.KVM_EXIT_HLT)
    assert "exit_reason=HLT" in repr(run)


def test_unmap_closes_a_mapping_nobody_holds() -> None:
    mem = mmap.mmap(-1, mmap.PAGESIZE)
    _fd.unmap(mem)
    assert mem.closed


def test_unmap_leaves_a_viewed_mapping_to_the_gc() -> None:
    mem = mmap.mmap(-1, mmap.PAGESIZE)
    view = memoryview(mem)
    _fd.unmap(mem)  # no BufferError: the view still reads the pages
    assert not mem.closed
    view[0] = 7
    assert mem[0] == 7
    view.release()
    _fd.unmap(mem)
    assert mem.closed
