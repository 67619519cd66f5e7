"""Markdown tables for benchmark output, printed and saved under ``bench/results/``."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(x: object) -> str:
        return f"{x:.3g}" if isinstance(x, float) else str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def write_result(name: str, title: str, body: str) -> Path:
    """Print ``body`` and save it, with a title and the machine it ran on, as ``<name>.md``."""
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    # The load average says how much other work shared the CPUs while this ran.
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, load {load}"
    text = f"# {title}\n\n{stamp}, {machine}, Python {platform.python_version()}\n\n{body}\n"
    print(text)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.md"
    path.write_text(text)
    return path
