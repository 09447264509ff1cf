"""Preempted runs continue their own ClearML task: a rerun in the same run folder (what a requeued SLURM job or a
restarted torchrun group is), and a task enqueued again after its agent and training process were killed."""

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from online import (
    AGENT,
    agent_execute,
    clone_of,
    console_text,
    iterations_of,
    scalar_events,
    task_id_of,
    wait_for_status,
)

CONFIG = "tests/configs/tiny_clearml.py"
TRAIN = [sys.executable, "-m", "py_config_runner", "code/scripts/training.py", CONFIG]


def values_of(task) -> dict:
    """(metric, variant, iteration) -> value, asserting that the server holds each of them once."""
    events = scalar_events(task)
    values = {(m, v, i): value for m, v, i, value in events}
    assert len(values) == len(events), "a scalar is stored twice"
    return values


def test_a_stopped_run_started_again_in_its_folder_continues_its_task(
    online_run, checkout, server_env, synthetic_voc, tmp_path
):
    """As a SLURM job sees itself (its id names the run folder), USR1-stopped, then requeued; no cluster needed:
    the SLURM suite runs the real requeue without a server."""
    from clearml import Task

    env = {
        **server_env,
        "CLEARML_OUTPUT_PATH": str(tmp_path / "out"),
        "DATASET_PATH": str(synthetic_voc),
        "SLURM_JOB_ID": "4242",
        "SLURM_RESTART_COUNT": "0",
    }
    proc = subprocess.Popen(TRAIN, cwd=checkout, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if " iteration 1 loss " in line:
            proc.send_signal(signal.SIGUSR1)  # SLURM's warning: checkpoint at the next iteration, exit 75
    assert proc.wait(timeout=300) == 75, "".join(lines[-30:])
    first = "".join(lines)
    task_id = task_id_of(first)
    run_dir = tmp_path / "out" / "tiny_clearml" / "slurm-4242"
    assert (run_dir / "clearml_task_id").read_text() == task_id
    stopped_at = re.search(r"stopped at iteration (\d+)", first).group(1)  # never an epoch's last (2)
    # Stopped, as a stop from the web UI reads: not failed for its exit 75, nor completed (train.sbatch's exit 0).
    assert Task.get_task(task_id).get_status() == "stopped"
    held = Task.get_task(task_id).artifacts["training_checkpoint"]
    assert held.metadata["iteration"] == stopped_at and Path(held.url).name == f"training_checkpoint_{stopped_at}.pt"

    again = subprocess.run(
        TRAIN, cwd=checkout, env={**env, "SLURM_RESTART_COUNT": "1"}, capture_output=True, text=True, timeout=300
    )
    output = again.stdout + again.stderr
    assert again.returncode == 0, output[-4000:]
    assert f"continuing task {task_id}, recorded in the run folder" in output and "created new task" not in output
    checkpoint = run_dir / "checkpoints" / f"training_checkpoint_{stopped_at}.pt"
    assert f"resumed from {checkpoint} at iteration {stopped_at}" in output

    task = Task.get_task(task_id)
    assert task.get_status() == "completed"
    continued, uninterrupted = values_of(task), values_of(Task.get_task(online_run["id"]))
    at = iterations_of([(*key, v) for key, v in continued.items()])
    assert at[("train", "batch_loss")] == [1, 2, 3, 4] and at[("val", "mIoU")] == [1, 2]
    # No offset, nothing missing, and exactly the values of the uninterrupted run of the same config and seed.
    assert continued == uninterrupted


def _task_processes(task_id) -> list:
    """The pids of the processes running the task (their environment names it)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and f"CLEARML_TASK_ID={task_id}".encode() in (proc / "environ").read_bytes().split(
                b"\0"
            ):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def _vanish(daemon, task_id) -> list:
    """SIGKILL the agent daemon's process group and every process running the task (the agent may start it in
    a session of its own): a spot instance vanishing. Returns the task's pids that were running."""
    running = _task_processes(task_id)
    for kill in (
        lambda: os.killpg(daemon.pid, signal.SIGKILL),
        *(lambda p=p: os.kill(p, signal.SIGKILL) for p in running),
    ):
        try:
            kill()
        except ProcessLookupError:
            pass
    daemon.wait(timeout=30)
    return running


def _start_daemon(queue, env, folder):
    log = open(folder / "daemon.log", "w")
    return subprocess.Popen(
        [AGENT, "daemon", "--queue", queue, "--create-queue", "--cpu-only"],
        cwd=folder,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _stop_daemon(daemon):
    try:
        os.killpg(daemon.pid, signal.SIGTERM)
        daemon.wait(timeout=30)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(daemon.pid, signal.SIGKILL)
        daemon.wait()


def test_a_task_whose_agent_vanished_continues_on_another_agent(
    online_run, checkout, agent_env, synthetic_voc, tmp_path
):
    from clearml import Task
    from clearml.backend_api.session.client import APIClient

    # 2 iterations an epoch (8 samples, batch 4), a checkpoint after every epoch's validation.
    edits = dict(num_epochs=8, save_every_iters=2)
    data = {"DATASET_PATH": str(synthetic_voc)}
    reference = clone_of(online_run["id"], "tiny_clearml uninterrupted", **edits)
    proc = agent_execute(reference.id, {**agent_env, **data, "CLEARML_OUTPUT_PATH": str(tmp_path / "ref")}, tmp_path)
    assert proc.returncode == 0, proc.output[-4000:]

    spot = clone_of(online_run["id"], "tiny_clearml on a spot instance", **edits)
    queue = f"vocseg-spot-{uuid.uuid4().hex[:8]}"
    APIClient().queues.create(name=queue)
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
    first = _start_daemon(
        queue, {**agent_env, **data, "CLEARML_OUTPUT_PATH": str(tmp_path / "first" / "out")}, tmp_path / "first"
    )
    try:
        Task.enqueue(spot, queue_name=queue)
        deadline, held = time.monotonic() + 300, None
        while time.monotonic() < deadline and held is None:
            held = Task.get_task(spot.id).artifacts.get("training_checkpoint")
            time.sleep(0.2)
        assert held is not None, (tmp_path / "first" / "daemon.log").read_text()[-4000:]
        assert _vanish(first, spot.id), "no process of the task was running"
        assert not _task_processes(spot.id)
    finally:
        _stop_daemon(first)
    task = Task.get_task(spot.id)
    assert task.get_status() == "in_progress"  # what a vanished machine leaves behind
    killed_at = int(held.metadata["iteration"])
    assert killed_at < 16

    # What a user does in the web UI: abort the orphaned task, enqueue it again; another machine takes it.
    task.mark_stopped(force=True)
    Task.enqueue(task, queue_name=queue)
    second = _start_daemon(
        queue, {**agent_env, **data, "CLEARML_OUTPUT_PATH": str(tmp_path / "second" / "out")}, tmp_path / "second"
    )
    try:
        status = wait_for_status(Task.get_task(spot.id), wanted=("completed", "failed"))
        assert status == "completed", (tmp_path / "second" / "daemon.log").read_text()[-4000:]
    finally:
        _stop_daemon(second)

    log = console_text(Task.get_task(spot.id))
    assert f"from ClearML task {spot.id}" in log and "fetched training checkpoint training_checkpoint_" in log
    assert " at iteration " in log.split("fetched training checkpoint", 1)[1]
    assert not list((tmp_path / "second" / "out").rglob(".clearml_fetch"))  # downloaded straight into the run folder
    continued, uninterrupted = values_of(Task.get_task(spot.id)), values_of(Task.get_task(reference.id))
    at = iterations_of([(*key, v) for key, v in continued.items()])
    assert at[("train", "batch_loss")] == list(range(1, 17)) and at[("val", "mIoU")] == list(range(1, 9))
    assert continued[("val", "mIoU", 8)] == uninterrupted[("val", "mIoU", 8)]
    assert continued == uninterrupted
    images = Task.get_task(spot.id).get_debug_samples("val", "image | ground truth | prediction")
    assert sorted(e["iter"] for e in images) == list(range(1, 9))


# A task's process that ends the way train.sbatch's ranks end after a warning: told to end stopped, exit 0.
ENDS_STOPPED = """
import sys
from clearml import Task
from vocseg.clearml.session import end_as_stopped
task = Task.init(project_name="vocseg-tests", task_name=sys.argv[1])
print("task", task.id, flush=True)
end_as_stopped(task)
sys.exit(0)
"""


def test_a_run_that_exits_0_for_its_requeue_ends_stopped_not_completed(server_env, checkout):
    """The exit of a rank whose launcher named VOCSEG_REQUEUE_FILE is 0: ClearML's exit hook alone marks that
    completed, which an HPO search or a dashboard would take for a finished run."""
    from clearml import Task

    name = f"requeue-exit-0-{uuid.uuid4().hex[:8]}"
    proc = subprocess.run(
        [sys.executable, "-c", ENDS_STOPPED, name], cwd=checkout, env=server_env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (task_id,) = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("task ")]
    assert Task.get_task(task_id).get_status() == "stopped"
