"""What a task records so that an agent can run it again; clones and queued runs executed by real clearml-agent
processes from the suite's origin."""

import os
import signal
import subprocess
import sys
import uuid

import pytest
from online import (
    AGENT,
    agent_execute,
    clone_of,
    console_text,
    iterations_of,
    poly_lr,
    run,
    scalar_events,
    task_id_of,
    train,
    wait_for_status,
)

CONFIG = "tests/configs/tiny_clearml.py"


def test_task_records_the_checkout_it_ran_from(online_run, origin, checkout):
    from clearml import Task

    script = Task.get_task(online_run["id"]).data.script
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=checkout, capture_output=True, text=True).stdout.strip()
    assert (script.repository, script.branch, script.version_num) == (str(origin), "main", head)
    assert script.entry_point == f"-m py_config_runner code/scripts/training.py {CONFIG}"
    assert script.working_dir == "." and not script.diff  # the clone is clean


def test_run_outside_a_checkout_says_once_that_agents_cannot_run_it(checkout, server_env, synthetic_voc, tmp_path):
    from clearml import Task
    from clearml.backend_api.session.client import APIClient

    queue = f"vocseg-nogit-{uuid.uuid4().hex[:8]}"  # enqueueing exits before training: a quick way to a task
    APIClient().queues.create(name=queue)
    elsewhere = tmp_path / "not-a-checkout"
    elsewhere.mkdir()
    proc = run(
        [sys.executable, "-m", "py_config_runner", str(checkout / "code/scripts/training.py"), str(checkout / CONFIG)],
        {
            **server_env,
            "CLEARML_OUTPUT_PATH": str(tmp_path / "out"),
            "DATASET_PATH": str(synthetic_voc),
            "CLEARML_QUEUE": queue,
        },
        elsewhere,
    )
    assert proc.returncode == 0, proc.output[-4000:]
    task = Task.get_task(task_id_of(proc.output))
    try:
        assert (
            proc.output.count(
                "not inside a git checkout: the task records no repository, so clones of it cannot be run by an agent"
            )
            == 1
        )
        assert task.data.script.repository == "" and task.data.script.version_num == ""
    finally:
        Task.dequeue(task)
        task.mark_stopped(force=True)


def test_clone_with_edited_hyperparameters_trains_with_the_edits(
    online_run, checkout, agent_env, synthetic_voc, tmp_path
):
    from clearml import Task

    # 8 training samples: batch_size 8 makes 1 iteration per epoch, so 3 epochs are 3 optimizer steps.
    clone = clone_of(online_run["id"], "tiny_clearml edited", learning_rate=0.05, batch_size=8, num_epochs=3)
    proc = agent_execute(
        clone.id,
        {**agent_env, "DATASET_PATH": str(synthetic_voc), "CLEARML_OUTPUT_PATH": str(tmp_path / "out")},
        tmp_path,
    )
    assert proc.returncode == 0, proc.output[-4000:]
    task = Task.get_task(clone.id)
    assert task.get_status() == "completed"
    events = scalar_events(task)
    at = iterations_of(events)
    assert at[("train", "batch_loss")] == [1, 2, 3] and at[("val", "mIoU")] == [1, 2, 3]
    lrs = {(s, i): v for m, s, i, v in events if m == "lr"}
    assert lrs[("0", 1)] == pytest.approx(poly_lr(0.05, 1, 3)) and lrs[("1", 2)] == pytest.approx(poly_lr(0.5, 2, 3))
    log = console_text(task)
    assert "batch_size=8 (was 4), learning_rate=0.05 (was 0.01), num_epochs=3 (was 2)" in log
    assert "train images 8 (1 iterations/epoch/process)" in log


def test_queued_run_exits_at_once_and_an_agent_daemon_completes_it(
    checkout, server_env, agent_env, synthetic_voc, tmp_path
):
    from clearml import Task

    queue = f"vocseg-suite-{uuid.uuid4().hex[:8]}"
    data = {"DATASET_PATH": str(synthetic_voc), "CLEARML_OUTPUT_PATH": str(tmp_path / "agent_out")}
    log = open(tmp_path / "daemon.log", "w")
    daemon = subprocess.Popen(
        [AGENT, "daemon", "--queue", queue, "--create-queue", "--cpu-only"],
        cwd=tmp_path,
        env={**agent_env, **data},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        local_out = tmp_path / "local_out"
        proc = train(checkout, server_env, local_out, DATASET_PATH=str(synthetic_voc), CLEARML_QUEUE=queue)
        assert proc.returncode == 0, proc.output[-4000:]
        assert f"enqueueing the task in queue {queue!r}" in proc.output
        # Nothing was built here: no data loaders, no model, no output folder.
        assert "train images" not in proc.output and not list(local_out.glob("tiny_clearml/*"))
        task = Task.get_task(task_id_of(proc.output))
        status = wait_for_status(task)
        assert status == "completed", (tmp_path / "daemon.log").read_text()[-4000:]
        assert iterations_of(scalar_events(task))[("val", "mIoU")] == [1, 2]
        assert "train images 8" in console_text(task)
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, signal.SIGKILL)
            daemon.wait()
        log.close()
