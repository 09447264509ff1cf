"""A ClearML server that goes away in the middle of an online run: stopped (connections refused, and it comes back
empty, so it is not started again here) or frozen (no answer at all, as behind a network cut) and then back. Each
test has a server of its own, since it stops or freezes it."""

import json
import os
import shlex
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
print(json.dumps({"status": task.get_status(), "at": at, "models": models}))
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


def run_through_outage(state, env, checkout, actions: dict, timeout=240):
    """Trains the tiny config online, doing ``clearml-local ACTION`` when a line of its output holds the marker;
    returns (output, exit status, seconds from its last iteration to its exit). A run still alive after
    ``timeout`` s is killed."""
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
                    subprocess.run([CLEARML_LOCAL, action, str(state)], check=True, capture_output=True)
                    del actions[marker]
            if "last iteration 4 completed" in line:
                last = time.monotonic()
        status = proc.wait()
    finally:
        killer.cancel()
    output = "".join(lines)
    assert status == 0, f"exit {status} (-9: still running after {timeout} s):\n{output[-3000:]}"
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
    run_dir_of(tmp_path / "out")
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
