"""Writing results: Markdown tables, the machine's conditions, CPU accounting, plots."""

from __future__ import annotations

import math
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from . import harness
from .harness import PROJECT, RESULTS


def ms(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def pct(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value * 100:.1f}%"


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    """One line on where and when this ran, so numbers are read against their conditions."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],  # noqa: S607 (git from PATH)
            cwd=PROJECT,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],  # noqa: S607
            cwd=PROJECT,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except OSError:
        commit, dirty = "unknown", ""
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    quick = (
        f"**A quick run (--quick: every duration x{harness.QUICK_FACTOR}): rough numbers.** "
        if harness.quick
        else ""
    )
    return quick + (
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.node()}: "
        f"{psutil.cpu_count()} CPUs, load average {load} at the end, Python "
        f"{platform.python_version()}, commit {commit or 'unknown'}"
        f"{' with local changes' if dirty else ''}. Client and server processes share the "
        "same CPUs."
    )


def results_dir() -> Path:
    """bench/results, or for a --quick run a scratch directory, so that rough numbers never
    replace real ones."""
    path = harness.quick_results() if harness.quick else RESULTS
    path.mkdir(parents=True, exist_ok=True)
    return path


def write(name: str, text: str) -> Path:
    path = results_dir() / f"{name}.md"
    path.write_text(text.rstrip() + "\n")
    return path


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(figure, name: str) -> Path:
    path = results_dir() / f"{name}.png"
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot().close(figure)
    return path


# --- CPU accounting ----------------------------------------------------------------------


@dataclass
class CpuMeter:
    """CPU seconds used by named processes (and by everything else) over a stretch of time.

    On a shared machine the "others" column says how much of the CPU was not ours: numbers
    taken while it is large are noisy.
    """

    pids: dict[str, int]
    _start: dict[str, float] = field(default_factory=dict)
    _wall: float = 0.0
    _total: float = 0.0

    @staticmethod
    def _cpu(pid: int) -> float:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.Error:
            return math.nan
        return times.user + times.system

    @staticmethod
    def _busy() -> float:
        times = psutil.cpu_times()
        return times.user + times.system + getattr(times, "nice", 0.0) + times.irq + times.softirq

    def start(self) -> None:
        self._start = {name: self._cpu(pid) for name, pid in self.pids.items()}
        self._wall = time.monotonic()
        self._total = self._busy()

    def stop(self) -> dict[str, float]:
        """CPU seconds per process, 'others' (the rest of the machine) and 'wall'."""
        used = {name: self._cpu(pid) - self._start[name] for name, pid in self.pids.items()}
        busy = self._busy() - self._total
        used["others"] = max(0.0, busy - sum(v for v in used.values() if not math.isnan(v)))
        used["wall"] = time.monotonic() - self._wall
        return used


def redis_pid() -> int | None:
    """The redis-server behind REDIS_URL, when it runs on this machine and can be found."""
    from django.conf import settings

    needle = settings.REDIS_URL.split("?")[0]
    needle = needle.removeprefix("unix://")
    if needle.startswith("redis://"):
        needle = needle.removeprefix("redis://").split("/")[0].split("@")[-1]
    for process in psutil.process_iter(["name", "cmdline"]):
        if process.info["name"] != "redis-server":
            continue
        if any(needle in part for part in process.info["cmdline"] or []):
            return process.pid
    return None
