"""Which kernel series a test runs on, for expectations that differ between 6.1 and 6.12.

Inside the emulated guests every marked test runs once per series
(tests/guest/pytest_guest.py); a rule that one series has and the other
lacks is asserted per series, from the release the running kernel reports,
never weakened to "either answer".
"""

from __future__ import annotations

import os
import re

#: The series the guests boot (tests/guest/run --kernel), as (major, minor).
SERIES = ((6, 1), (6, 12))


def running() -> tuple[int, int]:
    """(major, minor) of the running kernel, from ``os.uname().release``.

    >>> running() >= (2, 6)
    True
    """
    found = re.match(r"(\d+)\.(\d+)", os.uname().release)
    if found is None:
        raise RuntimeError(f"no version in the kernel release {os.uname().release!r}")
    return int(found[1]), int(found[2])


def by_series(expected: dict[tuple[int, int], object]) -> object:
    """The expectation for the running kernel's series, out of one per series.

    A series missing from ``expected`` is a test bug (its expectation was not
    worked out), not a pass: it raises ``LookupError``, naming the release.
    """
    series = running()
    if series not in expected:
        raise LookupError(
            f"no expectation for Linux {series[0]}.{series[1]} ({os.uname().release}); "
            f"known: {sorted(expected)}"
        )
    return expected[series]


def harness_series() -> tuple[int, int] | None:
    """The series the harness booted (``KVMSTATE_GUEST_KERNEL``), None outside a guest:
    a second, independent source to check :func:`running` against."""
    value = os.environ.get("KVMSTATE_GUEST_KERNEL")
    if not value:
        return None
    major, minor = value.split(".")
    return int(major), int(minor)
