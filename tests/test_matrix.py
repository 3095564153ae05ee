"""tests/support/matrix.py: the docs' test matrix from a junit file."""

from __future__ import annotations

from pathlib import Path

from tests.support import matrix

RUN = """<testsuites><testsuite>
<testcase classname="tests.test_check" name="test_a[amd-6.1]"/>
<testcase classname="tests.test_check" name="test_b[case-intel-6.12]">
  <skipped message="no bochs here"/></testcase>
<testcase classname="tests.test_check" name="test_c"/>
<testcase classname="tests.test_x" name="test_d[1-2]"><failure message="boom"/></testcase>
</testsuite></testsuites>"""


def test_matrix_counts_by_group_and_where(tmp_path: Path) -> None:
    path = tmp_path / "run.xml"
    path.write_text(RUN)
    assert matrix.table(str(path)).splitlines() == [
        "| group | host | amd-6.1 | intel-6.12 |",
        "| --- | --- | --- | --- |",
        "| test_check | 1 passed | 1 passed | 0 passed, 1 skipped (no bochs here) |",
        "| test_x | 0 passed, **1 failed** |  |  |",
    ]
