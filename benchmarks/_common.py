"""What the two benchmarks share: the C prelude, compiling the baseline, timing a loop.

The C baselines run in this process, on the very descriptor the Python side
uses: KVM answers EIO to vCPU ioctls from any process but the VM's creator.
"""

from __future__ import annotations

import ctypes
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


def compile_c(workdir: Path, name: str, body: str, argtypes: list[Any]) -> ctypes.CDLL:
    """Compile ``C_PRELUDE + body`` as a shared library with gcc -O2 and load it here.

    Its ``bench`` function returns a double (ns per operation, -1 on failure).
    """
    src, lib = workdir / f"{name}.c", workdir / f"{name}.so"
    src.write_text(C_PRELUDE + body)
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    dll = ctypes.CDLL(str(lib))
    dll.bench.restype = ctypes.c_double
    dll.bench.argtypes = argtypes
    return dll


def best_ns(fn: Callable[[], object], n: int, repeat: int) -> float:
    """Nanoseconds per call of ``fn``: the best of ``repeat`` runs of ``n`` calls."""
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter_ns()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter_ns() - t0) / n)
    return min(runs)
