"""Helpers shared by the benchmarks: machine description, load average, the one JSON result line."""

import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load() -> list:
    """1, 5 and 15 minute load averages, rounded: how busy the (possibly shared) machine was."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def machine() -> dict:
    return {"nproc": os.cpu_count(), "cpu": cpu_model(), "python": platform.python_version()}


def emit(benchmark: str, results: dict, load_before: list, started: float, **extra) -> None:
    """Prints the benchmark's single JSON result line (stdout; progress goes to stderr)."""
    line = {
        "benchmark": benchmark,
        **results,
        "load_before": load_before,
        "load_after": load(),
        "machine": machine(),
        "wall_s": round(time.time() - started, 2),
        **extra,
    }
    print(json.dumps(line), flush=True)


def note(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def peek(config_path, name, default=None):
    """A literal constant of a py_config_runner config, read without running the config."""
    from vocseg.config import peek_constant

    return peek_constant(config_path, name, default=default)
