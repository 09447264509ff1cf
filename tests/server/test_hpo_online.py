"""Hyperparameter search through a real agent daemon: trials run with the values they were given, and the reported
best is the best trial. The bad-input cases need the server but no agent."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid

import pytest
from online import AGENT, poly_lr, run, scalar_events

from vocseg.clearml import search as hs
from vocseg.errors import UserError

HPO = "code/scripts/hpo.py"


def queue_exists(name) -> bool:
    from clearml.backend_api.session.client import APIClient

    return any(q.name == name for q in APIClient().queues.get_all(name=f"^{name}$"))


@pytest.fixture(scope="module")
def agent_queue(agent_env, synthetic_voc, tmp_path_factory):
    """One `clearml-agent daemon` serving a fresh queue; the trials find the data through DATASET_PATH."""
    queue = f"hpo-{uuid.uuid4().hex[:8]}"
    work = tmp_path_factory.mktemp("agent")
    data = {"DATASET_PATH": str(synthetic_voc), "CLEARML_OUTPUT_PATH": str(work / "out")}
    with open(work / "daemon.log", "w") as log:
        # Its own process group: stopping it stops the trial it may be running too.
        daemon = subprocess.Popen(
            [AGENT, "daemon", "--queue", queue, "--create-queue", "--cpu-only"],
            cwd=work,
            env={**agent_env, **data},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while not queue_exists(queue):
            assert daemon.poll() is None and time.monotonic() < deadline, (work / "daemon.log").read_text()[-3000:]
            time.sleep(1)
        yield queue
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, signal.SIGKILL)
            daemon.wait()


def last_value(events, metric, variant):
    return max((i, v) for m, s, i, v in events if (m, s) == (metric, variant))[1]


def test_search_runs_three_trials_and_reports_the_best(online_run, agent_queue, checkout, server_env):
    from clearml import Task

    proc = run(
        [
            sys.executable,
            HPO,
            online_run["id"],
            "--queue",
            agent_queue,
            "--trials",
            "3",
            "--concurrent",
            "1",
            "--param",
            "learning_rate=loguniform:1e-3:1e-1",
            "--param",
            "batch_size=choice:4,8",
            "--poll-seconds",
            "3",
            "--time-limit",
            "15",
        ],
        server_env,
        checkout,
        timeout=1000,
    )
    assert proc.returncode == 0, proc.output[-5000:]
    optimizer_id = re.search(r"optimiser task ([0-9a-f]{32})", proc.stdout).group(1)
    best_id, best_miou = re.search(r"best trial ([0-9a-f]{32}): val mIoU ([0-9.]+)", proc.stdout).groups()
    assert "hpo: 3 of 3 trials completed" in proc.stdout and proc.stdout.count("completed: val mIoU") >= 3

    trials = Task.get_tasks(task_filter={"parent": optimizer_id})
    assert len(trials) == 3 and all(t.get_status() == "completed" for t in trials)
    mious = {}
    for trial in trials:
        given = trial.get_parameters_as_dict()["Config"]
        lr, batch_size = float(given["learning_rate"]), int(given["batch_size"])
        assert 1e-3 <= lr <= 1e-1 and batch_size in (4, 8)
        events = scalar_events(trial)
        steps = 2 * (8 // batch_size)  # 8 training samples, 2 epochs
        lrs = {(s, i): v for m, s, i, v in events if m == "lr"}
        assert sorted(i for s, i in lrs if s == "0") == list(range(1, steps + 1))
        assert lrs[("0", 1)] == pytest.approx(poly_lr(lr, 1, steps))  # backbone group
        assert lrs[("1", 1)] == pytest.approx(poly_lr(10 * lr, 1, steps))  # head group
        mious[trial.id] = last_value(events, "val", "mIoU")
    assert max(mious.values()) == pytest.approx(float(best_miou), abs=1e-4)
    assert mious[best_id] == max(mious.values())

    recorded = Task.get_task(optimizer_id)
    summary = json.load(open(recorded.artifacts["best_trial"].get_local_copy()))
    assert summary["best"]["task_id"] == best_id and summary["best"]["val_mIoU"] == pytest.approx(mious[best_id])
    assert summary["best"]["parameters"] == {
        k: v
        for k, v in Task.get_task(best_id).get_parameters_as_dict()["Config"].items()
        if k in ("learning_rate", "batch_size")
    }
    assert sorted(summary["trials"]) == sorted(mious)


def optimiser_tasks():
    from clearml import Task

    return {t.id for t in Task.get_tasks(project_name="Pascal-VOC12 Training", task_filter={"type": ["optimizer"]})}


@pytest.mark.parametrize(
    "base, params, queue, message",
    [
        ("online", ["momentum=uniform:0.5:0.9"], "q-ok", "momentum is not a Config/ hyperparameter of base task"),
        ("online", ["batch_size=loguniform:1:64"], "q-ok", "not an int, the type of Config/batch_size=4"),
        ("online", ["learning_rate=loguniform:1e-3:1e-1"], " ", "--queue is empty"),
        (
            "0123456789abcdef0123456789abcdef",
            ["learning_rate=loguniform:1e-3:1e-1"],
            "q-ok",
            "base task 0123456789abcdef0123456789abcdef: no such task",
        ),
        ("no_such_config", ["learning_rate=loguniform:1e-3:1e-1"], "q-ok", "base task no_such_config: no completed"),
        (
            "tiny_clearml",
            ["learning_rate=loguniform:1e-3:1e-1"],
            "no-such-queue",
            "--queue no-such-queue: no such queue",
        ),
    ],
)
def test_bad_input_fails_before_anything_is_enqueued(base, params, queue, message, online_run):
    before = optimiser_tasks()
    with pytest.raises(UserError, match=re.escape(message)) as raised:
        hs.search(
            online_run["id"] if base == "online" else base,
            hs.parse_ranges(params),
            queue,
            "random",
            hs.Budget(3, 1, None, 3),
        )
    assert "\n" not in str(raised.value)
    assert optimiser_tasks() == before
