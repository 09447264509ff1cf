"""Helpers of the online suite: start processes like a user does, read what the server stored."""

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

AGENT = str(Path(sys.executable).with_name("clearml-agent"))
_TASK_ID = re.compile(r"ClearML Task: created new task id=([0-9a-f]{32})")


def task_id_of(output: str) -> str:
    found = _TASK_ID.findall(output)
    assert len(found) == 1, f"expected one new task, found {found}:\n{output[-3000:]}"
    return found[0]


def run(cmd, env, cwd, timeout=420):
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        # What it printed before it was killed: the only trace of a hang (the run folder holds little then).
        said = "".join(_text(part) for part in (exc.stdout, exc.stderr))
        raise AssertionError(f"{cmd[:4]} still running after {timeout} s; it printed:\n{said[-6000:]}") from None
    proc.output = proc.stdout + proc.stderr
    return proc


def _text(part) -> str:
    return part.decode(errors="replace") if isinstance(part, bytes) else part or ""


def scalar_events(task):
    """Every scalar event of a task as stored, one (metric, variant, iteration, value) each: unlike the SDK's
    getters, nothing is merged, so a value reported twice shows twice."""
    from clearml.backend_api.services import events

    found, scroll_id = [], None
    while True:
        response = task.send(
            events.GetTaskEventsRequest(
                task=task.id, event_type="training_stats_scalar", scroll_id=scroll_id, batch_size=1000
            )
        ).response
        batch = response.events or []
        found += [(e["metric"], e["variant"], e["iter"], e["value"]) for e in batch]
        if len(batch) < 1000 or not response.scroll_id:
            return found
        scroll_id = response.scroll_id


def console_text(task) -> str:
    return "\n".join(task.get_reported_console_output(number_of_reports=10000))


def train(checkout, env, out, config="tests/configs/tiny_clearml.py", launcher=(sys.executable,), **extra):
    """A training run started the way a user starts it, from the clone; returns the finished process."""
    cmd = [*launcher, "-m", "py_config_runner", "code/scripts/training.py", config]
    return run(cmd, {**env, "CLEARML_OUTPUT_PATH": str(out), **extra}, checkout)


def poly_lr(base: float, iteration: int, total: int, power: float = 0.9) -> float:
    """The LR the config's poly schedule reports after `iteration` of `total` optimizer steps."""
    return base * (1 - iteration / total) ** power


def iterations_of(events) -> dict:
    """(metric, variant) -> the sorted iterations at which it was reported."""
    at = {}
    for metric, variant, iteration, _ in events:
        at.setdefault((metric, variant), []).append(iteration)
    return {key: sorted(its) for key, its in at.items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def agent_execute(task_id, env, cwd, timeout=420):
    """`clearml-agent execute --id`: the agent clones the task's repository and runs its entry point."""
    return run([AGENT, "execute", "--id", task_id], env, cwd, timeout)


def clone_of(task_id, name, **edits):
    """A draft copy of a task with `Config/<name>` hyperparameters edited, as done in the web UI."""
    from clearml import Task

    clone = Task.clone(source_task=task_id, name=name)
    if edits:
        clone.set_parameters({f"Config/{k}": v for k, v in edits.items()})
    return clone


def wait_for_status(task, wanted=("completed", "failed", "stopped"), timeout=420.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = task.get_status()
        if status in wanted:
            return status
        time.sleep(2)
    return task.get_status()
