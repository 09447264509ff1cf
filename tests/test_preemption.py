"""Runs that know themselves: a stable run folder, automatic resume from it, and a stop signal that checkpoints."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from test_training import REPO, TINY, make_env
from vocseg.engine.checkpoints import newest_complete_checkpoint
from vocseg.outputs import run_name

TRAIN = [sys.executable, "-m", "py_config_runner", "code/scripts/training.py", TINY]


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"RUN_NAME": "mine", "SLURM_JOB_ID": "7"}, "mine"),
        ({"SLURM_JOB_ID": "7", "TORCHELASTIC_RUN_ID": "abc"}, "slurm-7"),
        ({"TORCHELASTIC_RUN_ID": "abc", "CLEARML_TASK_ID": "f00"}, "torchrun-abc"),
        ({"TORCHELASTIC_RUN_ID": "none", "CLEARML_TASK_ID": "f00"}, "clearml-f00"),
    ],
)
def test_run_name_comes_from_the_launcher(monkeypatch, env, expected):
    for name in ("RUN_NAME", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID", "CLEARML_TASK_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert run_name(os.environ.get("RUN_NAME")) == expected


def test_run_name_is_a_timestamp_without_an_identity(monkeypatch):
    for name in ("RUN_NAME", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID", "CLEARML_TASK_ID"):
        monkeypatch.delenv(name, raising=False)
    assert run_name()[:2] == "20" and run_name() != run_name()


def test_a_damaged_newest_checkpoint_is_never_picked(tmp_path):
    for iteration in (4, 10):
        torch.save({"iteration": iteration}, tmp_path / f"training_checkpoint_{iteration}.pt")
    good = (tmp_path / "training_checkpoint_10.pt").read_bytes()
    (tmp_path / "training_checkpoint_12.pt").write_bytes(good[: len(good) // 2])  # cut short
    assert newest_complete_checkpoint(tmp_path) == tmp_path / "training_checkpoint_10.pt"
    assert newest_complete_checkpoint(tmp_path / "absent") is None


def final_weights(run_dir):
    return torch.load(run_dir / "checkpoints" / "training_checkpoint_12.pt", map_location="cpu", weights_only=True)[
        "model"
    ]


@pytest.mark.slow
def test_stop_signal_checkpoints_and_a_rerun_continues_exactly(synthetic_voc, tmp_path):
    env = make_env(synthetic_voc, tmp_path / "out", RUN_NAME="spot", TINY_SAVE_EVERY=100)
    proc = subprocess.Popen(TRAIN, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if " iteration 2 loss " in line:
            proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=300) == 75, "".join(lines[-20:])
    run_dir = tmp_path / "out" / "tiny" / "spot"
    saved = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert len(saved) == 1 and lines[-1].startswith("stopped: SIGUSR1: stopped at iteration ")
    assert str(run_dir / "checkpoints" / saved[0]) in lines[-1]
    assert not (run_dir / "metrics.json").exists() or not json.loads((run_dir / "metrics.json").read_text()).get(
        "completed"
    )

    again = subprocess.run(TRAIN, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / saved[0]} at iteration" in again.stderr

    reference = subprocess.run(
        TRAIN, cwd=REPO, env={**env, "RUN_NAME": "reference"}, capture_output=True, text=True, timeout=300
    )
    assert reference.returncode == 0, reference.stderr[-3000:]
    resumed, uninterrupted = final_weights(run_dir), final_weights(tmp_path / "out" / "tiny" / "reference")
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)

    # The same folder with settings that change the schedule: refused, naming the key and both fixes.
    before = {p: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").iterdir()}
    changed = subprocess.run(
        TRAIN, cwd=REPO, env={**env, "TINY_EPOCHS": "3"}, capture_output=True, text=True, timeout=300
    )
    last = changed.stderr.strip().splitlines()[-1]
    assert changed.returncode == 2 and last.startswith("error: checkpoint ")
    assert "num_epochs=2 there, 3 now" in last and "RUN_NAME" in last and "old settings" in last
    # A finished run is not trained again.
    finished = subprocess.run(TRAIN, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    last = finished.stderr.strip().splitlines()[-1]
    assert finished.returncode == 2 and "ends a finished run (iteration 12 of 12)" in last and "RUN_NAME" in last
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").iterdir()} == before


@pytest.mark.slow
def test_torchrun_restart_continues_from_the_last_checkpoint(synthetic_voc, tmp_path):
    from test_distributed import TRAINING, finish, free_port, start, torchrun, workers

    env = make_env(synthetic_voc, tmp_path / "out", TINY_SAVE_EVERY=2)
    (launcher,) = start(
        [torchrun("--max-restarts=2", "--nproc_per_node=2", f"--master_port={free_port()}", *TRAINING)], env
    )
    deadline = time.time() + 300
    while time.time() < deadline and launcher.poll() is None:
        if list((tmp_path / "out").glob("tiny/*/checkpoints/training_checkpoint_4.pt")):
            break
        time.sleep(0.05)
    victims = workers([launcher])
    assert set(victims) == {0, 1}, finish([launcher], 1)[1][-3000:]
    # kill -9 of one rank mid-epoch: torchrun restarts the whole group, whose processes find their run folder
    # again and continue from its newest checkpoint (a group restarted over the keys the dead one left in
    # torchrun's store would not even connect: launch._restarted_group_store).
    victims[1].kill()
    codes, text = finish([launcher], timeout=600)
    assert codes == [0], text[-3000:]
    (run_dir,) = (tmp_path / "out" / "tiny").iterdir()  # one run folder, one metrics.json
    assert json.loads((run_dir / "metrics.json").read_text())["completed"]
    assert re.search(r"resumed from \S+training_checkpoint_\d+\.pt at iteration \d+", text), text[-3000:]

    reference = subprocess.run(
        torchrun("--nproc_per_node=2", f"--master_port={free_port()}", *TRAINING),
        cwd=REPO,
        env=make_env(synthetic_voc, tmp_path / "ref", TINY_SAVE_EVERY=2),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert reference.returncode == 0, reference.stderr[-3000:]
    (ref_dir,) = (tmp_path / "ref" / "tiny").iterdir()
    resumed, uninterrupted = final_weights(run_dir), final_weights(ref_dir)
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)
