"""A ClearML server that goes away in the middle of an online run: stopped (connections refused, and it comes back
empty, so it is not started again here) or frozen (no answer at all, as behind a network cut) and then back, during
the run or only after it ended (what the run could not deliver is kept in its folder and reaches the same task with
clearml_sync.py or a rerun). Each test has a server of its own, since it stops or freezes it."""

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from online import ROOT, task_id_of

CLEARML_LOCAL = os.environ.get("CLEARML_LOCAL", str(ROOT.parent / "shared" / "clearml-server" / "clearml-local"))
TRAIN = [sys.executable, "-m", "py_config_runner", "code/scripts/training.py", "tests/configs/tiny_clearml.py"]
START = "first iteration 1 started"  # the task is set up; what follows must not wait on the server
PENDING = "clearml_pending.json"  # what a run could not deliver, in its run folder
EXIT_S = 90  # after the last iteration: the final evaluation, then at most ~35 s of waiting on the server

# What the server holds of a task, read in a process of its own (this one's SDK talks to the suite's server).
READ_BACK = """
import json, sys
from clearml import Task
task = Task.get_task(sys.argv[1])
at = {}
for m, series in task.get_reported_scalars().items():
    for s, values in series.items():
        at[f"{m}/{s}"] = sorted(values["x"])
models = [Path(m.url).name for m in task.models["output"]] if task.models["output"] else []
grids = task.get_debug_samples("val", "image | ground truth | prediction")
files = sorted({e["url"] for e in grids})  # one file each: none overwrote another's
grids = sorted(e["iter"] for e in grids)
print(json.dumps({"status": task.get_status(), "at": at, "models": models, "grids": grids, "grid_files": files}))
""".replace("import json, sys", "import json, sys\nfrom pathlib import Path")


@pytest.fixture
def own_server(server_env, tmp_path):
    """A throwaway server of this test's own: (its state folder, the environment of a run reporting to it)."""
    assert Path(CLEARML_LOCAL).is_file(), f"clearml-local not found at {CLEARML_LOCAL}: set CLEARML_LOCAL"
    state = tmp_path / "server"
    subprocess.run([CLEARML_LOCAL, "start", str(state)], check=True, stdout=subprocess.DEVNULL)
    try:
        lines = (state / "env.sh").read_text().splitlines()
        found = dict(shlex.split(line)[1].split("=", 1) for line in lines if line.startswith("export "))
        conf = tmp_path / "clearml.conf"
        conf.write_text(
            Path(found["CLEARML_CONFIG_FILE"]).read_text() + "\nsdk.development.report_use_subprocess: false\n"
        )
        env = {k: v for k, v in server_env.items() if not k.startswith("CLEARML_")}
        yield state, {**env, **found, "CLEARML_CONFIG_FILE": str(conf)}
    finally:
        subprocess.run([CLEARML_LOCAL, "resume", str(state)], capture_output=True)
        subprocess.run([CLEARML_LOCAL, "stop", str(state)], check=True, capture_output=True)


def run_through_outage(state, env, checkout, actions: dict, timeout=240, expect=0):
    """Trains the tiny config online, doing ``clearml-local ACTION`` (or sending SIGUSR1, SLURM's warning, for
    "USR1") when a line of its output holds the marker; returns (output, seconds from its last iteration, or
    from the SIGUSR1, to its exit). A run still alive after ``timeout`` s is killed."""
    proc = subprocess.Popen(
        TRAIN, cwd=checkout, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    killer = threading.Timer(timeout, proc.kill)  # SIGKILL: ClearML's SIGTERM handler would wait on the server too
    killer.start()
    lines, last = [], None
    try:
        for line in proc.stdout:
            lines.append(line)
            for marker, action in list(actions.items()):
                if marker in line:
                    if action == "USR1":
                        proc.send_signal(signal.SIGUSR1)
                        last = time.monotonic()
                    else:
                        subprocess.run([CLEARML_LOCAL, action, str(state)], check=True, capture_output=True)
                    del actions[marker]
            if "last iteration 4 completed" in line:
                last = time.monotonic()
        status = proc.wait()
    finally:
        killer.cancel()
    output = "".join(lines)
    assert status == expect, f"exit {status} (-9: still running after {timeout} s):\n{output[-3000:]}"
    return output, time.monotonic() - last


def run_dir_of(out: Path) -> Path:
    (run_dir,) = (out / "tiny_clearml").iterdir()
    assert json.loads((run_dir / "metrics.json").read_text())["completed"] is True
    assert (run_dir / "summary.png").is_file() and (run_dir / "checkpoints" / "training_checkpoint_4.pt").is_file()
    return run_dir


def test_a_stopped_server_neither_stalls_training_nor_the_end_of_the_run(own_server, checkout, synthetic_voc, tmp_path):
    state, env = own_server
    env = {**env, "CLEARML_OUTPUT_PATH": str(tmp_path / "out"), "DATASET_PATH": str(synthetic_voc)}
    output, exit_s = run_through_outage(state, env, checkout, {START: "stop"})
    run_dir = run_dir_of(tmp_path / "out")
    print(f"stopped server: exit {exit_s:.1f} s after the last iteration")
    assert exit_s < EXIT_S, output[-3000:]
    assert output.count("did not answer within") == 1, output[-3000:]
    assert "training checkpoint training_checkpoint_4.pt not uploaded to the ClearML task" in output
    unclosed = next(line for line in output.splitlines() if "left unclosed" in line)
    assert "best model" in unclosed and str(run_dir) in unclosed
    assert "Traceback" not in output


def test_a_frozen_server_that_comes_back_gets_the_rest_of_the_run(own_server, checkout, synthetic_voc, tmp_path):
    state, env = own_server
    env = {**env, "CLEARML_OUTPUT_PATH": str(tmp_path / "out"), "DATASET_PATH": str(synthetic_voc)}
    # Frozen from the first iteration until the first validation is over: its best model cannot be registered.
    output, exit_s = run_through_outage(state, env, checkout, {START: "pause", "epoch 1 val:": "resume"})
    run_dir = run_dir_of(tmp_path / "out")
    assert not (run_dir / PENDING).exists()  # the server got everything: nothing is kept for later
    print(f"frozen, then back: exit {exit_s:.1f} s after the last iteration")
    assert output.count("did not answer within") == 1 and "answers again" in output, output[-3000:]
    task_id = task_id_of(output)
    read = subprocess.run(
        [sys.executable, "-c", READ_BACK, task_id], env=env, capture_output=True, text=True, timeout=120
    )
    assert read.returncode == 0, read.stderr[-2000:]
    held = json.loads(read.stdout.strip().splitlines()[-1])
    assert held["status"] == "completed"
    # Nothing reported while it was frozen is lost, and the same task gets the rest of the run.
    assert held["at"]["train/batch_loss"] == [1, 2, 3, 4] and held["at"]["val/mIoU"] == [1, 2]
    assert any(name.startswith("best_model_2_") for name in held["models"]), held["models"]


def read_back(task_id, env) -> dict:
    read = subprocess.run(
        [sys.executable, "-c", READ_BACK, task_id], env=env, capture_output=True, text=True, timeout=120
    )
    assert read.returncode == 0, read.stderr[-2000:]
    return json.loads(read.stdout.strip().splitlines()[-1])


def sync(run_dir, env, checkout):
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "code/scripts/clearml_sync.py", str(run_dir)],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - started


def test_a_server_back_only_after_the_run_ended_gets_the_rest_with_clearml_sync(
    own_server, checkout, synthetic_voc, tmp_path
):
    state, env = own_server
    env = {**env, "CLEARML_OUTPUT_PATH": str(tmp_path / "out"), "DATASET_PATH": str(synthetic_voc)}
    # Frozen after the last training iteration: the last validation's reports, its best model and the close are
    # all left waiting; the run ends in bounded time and keeps them.
    output, exit_s = run_through_outage(state, env, checkout, {"epoch 2 iteration 4 loss": "pause"})
    run_dir = run_dir_of(tmp_path / "out")
    print(f"frozen at the end: exit {exit_s:.1f} s after the last iteration")
    assert exit_s < EXIT_S, output[-3000:]
    task_id = task_id_of(output)
    (unclosed,) = [line for line in output.splitlines() if "left unclosed" in line]
    assert "best model best_model_2_" in unclosed and "status completed" in unclosed and " images" in unclosed
    assert f"clearml_sync.py {run_dir}` once the server answers" in unclosed
    assert json.loads((run_dir / PENDING).read_text())["task_id"] == task_id
    subprocess.run([CLEARML_LOCAL, "resume", str(state)], check=True, capture_output=True)

    status, out, took = sync(run_dir, env, checkout)
    print(f"clearml_sync.py: {took:.1f} s")
    assert status == 0 and f"sent to ClearML task {task_id}" in out and "status completed" in out, out[-3000:]
    assert not (run_dir / PENDING).exists()
    held = read_back(task_id, env)
    assert held["status"] == "completed"
    assert held["at"]["train/batch_loss"] == [1, 2, 3, 4] and held["at"]["val/mIoU"] == [1, 2]
    assert held["at"]["val/IoU/background"] == [1, 2]
    assert any(name.startswith("best_model_2_") for name in held["models"]), held["models"]
    # The last validation's image grid, reported while frozen: kept, then sent in a file of its own.
    assert held["grids"] == [1, 2] and len(held["grid_files"]) == 2, held
    # A second sync sends nothing again.
    status, out, _ = sync(run_dir, env, checkout)
    assert status == 0 and out.strip().endswith(f"nothing to send: {run_dir} keeps no reports for a ClearML server")


def test_a_run_stopped_early_while_its_server_is_away_is_completed_by_its_rerun(
    own_server, checkout, synthetic_voc, tmp_path
):
    """A SLURM job warned (USR1) while its server is frozen, requeued once the server is back: the rerun sends
    what the first run kept, continues the same task and completes it."""
    state, env = own_server
    env = {
        **env,
        "CLEARML_OUTPUT_PATH": str(tmp_path / "out"),
        "DATASET_PATH": str(synthetic_voc),
        "SLURM_JOB_ID": "4343",
        "SLURM_RESTART_COUNT": "0",
    }
    actions = {START: "pause", " iteration 1 loss ": "USR1"}
    output, exit_s = run_through_outage(state, env, checkout, actions, expect=75)
    print(f"stopped early while frozen: exit {exit_s:.1f} s after SIGUSR1")
    assert exit_s < EXIT_S, output[-3000:]
    task_id = task_id_of(output)
    run_dir = tmp_path / "out" / "tiny_clearml" / "slurm-4343"
    (line,) = [line for line in output.splitlines() if "left open by a run that stopped early" in line]
    assert "status stopped" in line and "clearml_sync.py" in line and str(run_dir) in line
    kept = json.loads((run_dir / PENDING).read_text())
    assert kept["status"] == "stopped" and kept["scalars"]
    subprocess.run([CLEARML_LOCAL, "resume", str(state)], check=True, capture_output=True)

    again = subprocess.run(
        TRAIN, cwd=checkout, env={**env, "SLURM_RESTART_COUNT": "1"}, capture_output=True, text=True, timeout=300
    )
    output = again.stdout + again.stderr
    assert again.returncode == 0, output[-4000:]
    assert f"continuing task {task_id}" in output and "created new task" not in output
    assert f"sent to ClearML task {task_id} what an earlier run kept in {run_dir / PENDING}" in output
    assert not (run_dir / PENDING).exists()
    held = read_back(task_id, env)
    assert held["status"] == "completed"
    # The reports of the first run (lost with its process) and of the rerun, on the same task.
    assert held["at"]["train/batch_loss"] == [1, 2, 3, 4] and held["at"]["val/mIoU"] == [1, 2]
    assert any(name.startswith("best_model_2_") for name in held["models"]), held["models"]
