"""The test matrix of docs/testing.md from a real run: ``python -m tests.support.matrix FILE...``.

A FILE ending in ``.xml`` is what ``python -m pytest --junitxml RUN.xml``
wrote; any other is a guest session's log (``$TMPDIR/kvmstate-guest-*.log``,
its ``KVMSTATE-RESULT`` lines), for a run still going. Rows are
test groups (test modules), columns where the tests ran: the host's
/dev/kvm, or a guest and kernel series (the ``[amd-6.12]`` part of a test
id). Each cell counts passed / skipped / failed, and names why tests were
skipped, so the table says what ran where and what did not.
"""

from __future__ import annotations

import collections
import json
import re
import sys
import xml.etree.ElementTree as ET

_TARGET = re.compile(r"[\[-]((?:amd|intel)-6\.\d+)\]$")


Cells = dict[tuple[str, str], collections.Counter[str]]


def _log_cells(path: str, out: Cells) -> None:
    with open(path, errors="replace") as f:
        for line in f:
            if not line.startswith("KVMSTATE-RESULT "):
                continue
            result = json.loads(line.split(" ", 1)[1])
            module, _, name = result["nodeid"].partition("::")
            match = _TARGET.search(name)
            where = match.group(1) if match else "host"
            counts = out[module.rsplit("/", 1)[-1].removesuffix(".py"), where]
            outcome = result["outcome"]
            if result.get("wasxfail"):
                counts["xfailed"] += 1
            elif outcome == "skipped":
                counts["skipped"] += 1
                why = result.get("reason") or result.get("longrepr", "")
                why = why[-1] if isinstance(why, list) else str(why)
                counts["why: " + re.sub(r"^Skipped: ", "", why).split("\n")[0][:90]] += 1
            else:
                counts["failed" if outcome == "failed" else "passed"] += 1


def cells(*paths: str) -> Cells:
    """(group, where) -> counts of passed/skipped/failed and of each skip reason."""
    out: Cells = collections.defaultdict(collections.Counter)
    for path in paths:
        if path.endswith(".xml"):
            _junit_cells(path, out)
        else:
            _log_cells(path, out)
    return out


def _junit_cells(path: str, out: Cells) -> None:
    for case in ET.parse(path).getroot().iter("testcase"):
        group = case.get("classname", "").rsplit(".", 1)[-1]
        match = _TARGET.search(case.get("name", ""))
        where = match.group(1) if match else "host"
        counts = out[group, where]
        skipped = case.find("skipped")
        if skipped is not None and skipped.get("type") == "pytest.xfail":
            counts["xfailed"] += 1
        elif skipped is not None:
            counts["skipped"] += 1
            reason = (skipped.get("message") or "").strip()
            reason = re.sub(r"^Skipped: ", "", reason).split("\n")[0][:90]
            counts["why: " + reason] += 1
        elif case.find("failure") is not None or case.find("error") is not None:
            counts["failed"] += 1
        else:
            counts["passed"] += 1


def table(*paths: str) -> str:
    found = cells(*paths)
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
            if counts["xfailed"]:
                text += f", {counts['xfailed']} xfailed"
            if counts["skipped"]:
                reasons = sorted(k[5:] for k in counts if k.startswith("why: "))
                text += f", {counts['skipped']} skipped ({'; '.join(reasons)})"
            if counts["failed"]:
                text += f", **{counts['failed']} failed**"
            row.append(text)
        lines.append(f"| {group} | " + " | ".join(row) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(*sys.argv[1:]))
