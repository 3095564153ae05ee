"""The test matrix of docs/testing.md from a real run: ``python -m tests.support.matrix RUN.xml``.

``RUN.xml`` is what ``python -m pytest --junitxml RUN.xml`` wrote. Rows are
test groups (test modules), columns where the tests ran: the host's
/dev/kvm, or a guest and kernel series (the ``[amd-6.12]`` part of a test
id). Each cell counts passed / skipped / failed, and names why tests were
skipped, so the table says what ran where and what did not.
"""

from __future__ import annotations

import collections
import re
import sys
import xml.etree.ElementTree as ET

_TARGET = re.compile(r"[\[-]((?:amd|intel)-6\.\d+)\]$")


def cells(path: str) -> dict[tuple[str, str], collections.Counter[str]]:
    """(group, where) -> counts of passed/skipped/failed and of each skip reason."""
    out: dict[tuple[str, str], collections.Counter[str]] = collections.defaultdict(
        collections.Counter
    )
    for case in ET.parse(path).getroot().iter("testcase"):
        group = case.get("classname", "").rsplit(".", 1)[-1]
        match = _TARGET.search(case.get("name", ""))
        where = match.group(1) if match else "host"
        counts = out[group, where]
        skipped = case.find("skipped")
        if skipped is not None:
            counts["skipped"] += 1
            reason = (skipped.get("message") or "").strip()
            reason = re.sub(r"^Skipped: ", "", reason).split("\n")[0][:90]
            counts["why: " + reason] += 1
        elif case.find("failure") is not None or case.find("error") is not None:
            counts["failed"] += 1
        else:
            counts["passed"] += 1
    return out


def table(path: str) -> str:
    found = cells(path)
    wheres = sorted({w for _, w in found}, key=lambda w: (w != "host", w))
    groups = sorted({g for g, _ in found})
    lines = ["| group | " + " | ".join(wheres) + " |", "| --- |" + " --- |" * len(wheres)]
    for group in groups:
        row = []
        for where in wheres:
            counts = found.get((group, where))
            if not counts:
                row.append("")
                continue
            text = f"{counts['passed']} passed"
            if counts["skipped"]:
                reasons = sorted(k[5:] for k in counts if k.startswith("why: "))
                text += f", {counts['skipped']} skipped ({'; '.join(reasons)})"
            if counts["failed"]:
                text += f", **{counts['failed']} failed**"
            row.append(text)
        lines.append(f"| {group} | " + " | ".join(row) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(sys.argv[1]))
