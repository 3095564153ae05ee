"""Capture the vCPU records of a real QEMU stream with SVM nested state, for host-side tests.

Run inside the AMD guest (its KVM has nested SVM); it boots the payload of
:mod:`tests.support.qemu_payload` in ``qemu-system-x86_64 -enable-kvm``,
migrates once L2 runs, and prints one JSON line between ``CAPTURE-BEGIN``
and ``CAPTURE-END``: QEMU's version, the machine, the RAM block list, the
``cpu_common`` and ``cpu`` sections' headers and bodies (hex) with their
entries of QEMU's own JSON description, the page holding L2's counter, and
the payload constants the values refer to. ``tests/data/qemu-svm-cpu.json``
was made with::

    tests/guest/run -- python3 -m tests.support.qemu_capture > capture.out
    python3 -m tests.support.qemu_capture --extract capture.out > tests/data/qemu-svm-cpu.json

The streams of :mod:`tests.support.qemu_streams` are built from it. The
values differ from run to run (TSC, counters), the structure does not.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from kvmstate.formats import qemu
from tests.support import qemu_payload, qemu_vm

PROGRESS_MASK = 0x3F_FFFF
KEPT_DEVICES = ("cpu_common", "cpu")


def capture(workdir: Path) -> dict[str, Any]:
    kernel = workdir / "l1.bin"
    kernel.write_bytes(qemu_payload.image(PROGRESS_MASK))
    stream_path = workdir / "capture.mig"
    with qemu_vm.QemuVm(kernel, workdir, "capture") as vm:
        vm.wait_console(r"L2 [0-9a-f]{8}\n", count=2)
        vm.migrate_to(stream_path)
        argv = vm.argv
    data = stream_path.read_bytes()
    stream = qemu.read(data)
    assert stream.description is not None
    devices = []
    for section in stream.sections:
        if section.kind != "SECTION_FULL" or section.name not in KEPT_DEVICES:
            continue
        index = [s for s in stream.sections if s.kind == "SECTION_FULL"].index(section)
        header = 1 + 4 + 1 + len(section.name) + 4 + 4
        footer = 5
        devices.append(
            {
                "section_id": section.section_id,
                "name": section.name,
                "instance_id": section.instance_id,
                "version_id": section.version_id,
                "body": data[section.offset + header : section.end - footer].hex(),
                "description": stream.description["devices"][index],
            }
        )
    counter_page = qemu_payload.COUNTER - qemu_payload.COUNTER % stream.page_size
    page = stream.ram_page("pc.ram", counter_page) or b""
    version = subprocess.run(
        [qemu_vm.QEMU, "--version"], capture_output=True, text=True, check=True
    ).stdout.splitlines()[0]
    _, labels = qemu_payload.program(PROGRESS_MASK)
    return {
        "qemu": version,
        "kernel": os.uname().release,
        "argv": [a.replace(str(workdir), "WORKDIR") for a in argv],
        "machine": stream.machine,
        "page_size": stream.page_size,
        "stream_size": len(data),
        "ram_blocks": dict(stream.ram_blocks),
        "pages": {f"pc.ram:{counter_page:#x}": page.rstrip(b"\0").hex()},
        "devices": devices,
        "payload": {
            "progress_mask": PROGRESS_MASK,
            "labels": {k: v for k, v in labels.items() if not k.startswith("msg_")},
            **{
                name: getattr(qemu_payload, name)
                for name in ("VMCB", "HSAVE", "IOPM", "MSRPM", "PAGE_DIR", "COUNTER", "L2_STACK")
            },
        },
    }


def extract(text: str) -> dict[str, Any]:
    match = re.search(r"CAPTURE-BEGIN\s*(\{.*?\})\s*CAPTURE-END", text, re.S)
    if match is None:
        raise SystemExit("no CAPTURE-BEGIN ... CAPTURE-END in the input")
    found: dict[str, Any] = json.loads(match.group(1).replace("\r", ""))
    return found


def main(argv: list[str]) -> int:
    if argv[:1] == ["--extract"]:
        print(json.dumps(extract(Path(argv[1]).read_text()), indent=1))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        result = capture(Path(tmp))
    print("CAPTURE-BEGIN")
    print(json.dumps(result, separators=(",", ":")))
    print("CAPTURE-END")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
