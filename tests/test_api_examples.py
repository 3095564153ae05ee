"""The examples in the core calls' docstrings, run as printed.

tests/test_docs.py runs the examples of the pages (``docs/*.md``); the API
reference's examples live in docstrings, which it does not read. These are
run here, on the host: those of calls that need ``/dev/kvm`` skip where it
does not open, and every one of them is written to hold on any KVM (nested
or not, AMD or Intel), so the host's answer is the test.
"""

from __future__ import annotations

import doctest
import gc

import pytest

import kvmstate
from kvmstate import check, diff, system, vcpu, vm
from kvmstate.formats import native
from tests.kvm_fixtures import needs_kvm

#: The calls whose examples must run; the ones that open /dev/kvm second.
WITHOUT_KVM = [
    check.check,
    check.explain,
    diff.diff,
    native.dumps_vm,
    native.dumps_vcpu,
    native.loads_vm,
    native.to_dict,
    native.from_dict,
]
WITH_KVM = [
    system.Kvm,
    vm.Vm,
    vcpu.Vcpu,
    vcpu.Vcpu.get_nested_state,
    vcpu.Vcpu.set_nested_state,
    vcpu.Vcpu.save_state,
    vcpu.Vcpu.restore_state,
]


def _close(globs: dict[str, object]) -> None:
    """Close what an example opened, as a reader's session would end: the names it
    bound, and the Vm and Kvm a ``Kvm().create_vm().create_vcpu(0)`` chain keeps."""
    for value in list(globs.values()):
        for fd in (
            value,
            getattr(value, "vm", None),
            getattr(getattr(value, "vm", None), "kvm", None),
        ):
            if isinstance(fd, (kvmstate.Kvm, kvmstate.Vm, kvmstate.Vcpu)):
                fd.close()
    globs.clear()
    gc.collect()


def _run(obj: object) -> None:
    name = getattr(obj, "__qualname__", repr(obj))
    tests = doctest.DocTestFinder(recurse=False).find(obj, name, globs={"kvmstate": kvmstate})
    examples = sum(len(t.examples) for t in tests)
    assert examples, f"{name} has no example"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    report: list[str] = []
    for test in tests:
        runner.run(test, out=report.append, clear_globs=False)
        _close(test.globs)
    assert runner.failures == 0, "".join(report)


@pytest.mark.parametrize("obj", WITHOUT_KVM, ids=lambda o: o.__qualname__)
def test_example_without_kvm(obj: object) -> None:
    _run(obj)


@needs_kvm
@pytest.mark.parametrize("obj", WITH_KVM, ids=lambda o: o.__qualname__)
def test_example_with_kvm(obj: object) -> None:
    _run(obj)


@pytest.mark.parametrize("obj", WITHOUT_KVM + WITH_KVM, ids=lambda o: o.__qualname__)
def test_core_call_says_what_it_raises(obj: object) -> None:
    assert ":raises " in (obj.__doc__ or ""), obj


def test_buffer_alias_example() -> None:
    """The example in the ``WritableBuffer`` comment (module data has no docstring)."""
    import ctypes

    from kvmstate.nested import NestedState

    assert NestedState.from_buffer((ctypes.c_uint64 * 528)()).capacity == 528 * 8
