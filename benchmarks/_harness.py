"""What the benchmarks share: a C baseline built on the spot, and interleaved best-of timing.

Each row of a benchmark times three sides of one operation on the same vCPU
descriptor: the library, a bare-``fcntl.ioctl`` Python loop of exactly the
same ioctls (the floor any Python code stands on), and C. The sides run
interleaved, round after round (library, bare, C, next row, ..., next
round), and each side keeps its best round: on a machine shared with other
work, load comes and goes within a round, and the best round of each side
is the one least disturbed. The ratios printed are library / bare and
library / C.

Not part of the test suite: nothing here asserts a speed.
"""

from __future__ import annotations

import ctypes
import itertools
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

#: The headers and the monotonic clock every C baseline starts with.
C_PRELUDE = r"""
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <linux/kvm.h>

static uint64_t now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + ts.tv_nsec;
}
"""


def build_c(workdir: Path, source: str, name: str) -> ctypes.CDLL | None:
    """Compile ``source`` as a shared library and load it into this process.

    KVM refuses vCPU ioctls from a process other than the VM's creator
    (EIO), so the C loop must run here, on the same descriptor. None
    without gcc (the Intel guest copies only Python into Bochs): the C
    column is then left empty.
    """
    if shutil.which("gcc") is None:
        print("no gcc here: the C column is left empty")
        return None
    src, lib = workdir / f"{name}.c", workdir / f"{name}.so"
    src.write_text(source)
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    return ctypes.CDLL(str(lib))


def py_ns(fn: Callable[[], object], n: int) -> float:
    """Nanoseconds per call of ``fn`` over ``n`` calls (the loop's own cost included)."""
    t0 = time.perf_counter_ns()
    for _ in itertools.repeat(None, n):
        fn()
    return (time.perf_counter_ns() - t0) / n


def best_ns(fn: Callable[[], object], n: int, repeat: int) -> float:
    """Nanoseconds per call of ``fn``: the best of ``repeat`` runs of ``n`` calls."""
    return min(py_ns(fn, n) for _ in range(repeat))


@dataclass
class Row:
    """One operation: its library and bare-fcntl callables, and the C loop (ns per op)."""

    label: str
    library: Callable[[], object]
    bare: Callable[[], object]
    c: Callable[[int], float] | None
    target: str = ""
    best: dict[str, float] = field(default_factory=dict)

    def keep(self, side: str, ns: float) -> None:
        if ns < 0:
            raise RuntimeError(f"the C baseline failed on {self.label!r}")
        self.best[side] = min(ns, self.best.get(side, float("inf")))


def run_rows(rows: Sequence[Row], n: int, rounds: int) -> None:
    """Time every side of every row, ``rounds`` interleaved rounds of ``n`` calls each."""
    for row in rows:  # warm up: caches, lazily built plans, first-use imports
        row.library()
        row.bare()
    for _ in range(rounds):
        for row in rows:
            row.keep("library", py_ns(row.library, n))
            row.keep("bare", py_ns(row.bare, n))
            if row.c is not None:
                row.keep("c", row.c(n))


def print_rows(rows: Sequence[Row], unit: str = "ns", scale: float = 1.0) -> None:
    """The table: time per operation on each side, then library/bare and library/C."""
    head = f"{'operation':<34}{'library':>9}{'bare':>9}{'C':>9}{'lib/bare':>10}{'lib/C':>8}"
    print(f"{head}  target (times in {unit})")
    for row in rows:
        lib, bare = row.best["library"], row.best["bare"]
        c = row.best.get("c")
        c_text = f"{c / scale:>9.1f}" if c is not None else f"{'-':>9}"
        lc = f"{lib / c:>7.2f}x" if c is not None else f"{'-':>8}"
        print(
            f"{row.label:<34}{lib / scale:>9.1f}{bare / scale:>9.1f}{c_text}"
            f"{lib / bare:>9.2f}x{lc}  {row.target}"
        )
