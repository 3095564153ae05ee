"""The README's REPL session, replayed as printed."""

from __future__ import annotations

import doctest
from pathlib import Path

import pytest

from tests.kvm_fixtures import NO_KVM

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.mark.skipif(NO_KVM is not None, reason=str(NO_KVM))
def test_readme_session_runs_as_printed() -> None:
    # Code fences would otherwise read as expected output.
    text = "\n".join(
        "" if line.startswith("```") else line for line in README.read_text().splitlines()
    )
    test = doctest.DocTestParser().get_doctest(text, {}, "README.md", str(README), 0)
    assert test.examples, "README.md has no REPL session"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    runner.run(test, clear_globs=False)
    # Close what the session opened, so no descriptor outlives the test.
    vcpu = test.globs.get("vcpu")
    for obj in (vcpu, getattr(vcpu, "vm", None), test.globs.get("kvm")):
        if obj is not None:
            obj.close()
    result = runner.summarize(verbose=False)
    assert result.failed == 0 and result.attempted == len(test.examples)
