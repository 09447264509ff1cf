"""SLURM as a launcher: srun starts one process per task through ignite's SLURM support, and a batch job
warned with USR1 checkpoints, requeues itself and continues exactly where it stopped."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
TINY = "tests/configs/tiny.py"
TRAIN = [sys.executable, "-m", "py_config_runner", "code/scripts/training.py", TINY]


def env_for(data, out, **extra):
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TINY_", "CLEARML", "RESUME_FROM", "RUN_NAME", "TORCHELASTIC", "SLURM_JOB", "SLURM_STEP"))
    }
    env.update(DATASET_PATH=str(data), OUTPUT_PATH=str(out), OMP_NUM_THREADS="1", **extra)
    return env


def srun_two_tasks(env):
    """Training of the tiny config as one srun step of two tasks (ignite reads the SLURM_* variables)."""
    return subprocess.run(
        ["srun", "--nodes=1", "--ntasks=2", "--cpus-per-task=1", *TRAIN],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def metrics(out):
    (found,) = Path(out).glob("tiny/*/metrics.json")
    return found.parent, json.loads(found.read_text())


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def start_requeued_job_now(job):
    """The requeued job starts at once instead of SLURM's delay (slurm-local: 11 s). Not within the second of the
    requeue: slurmd refuses a credential made in the second its job's old one was revoked ("Job credential
    revoked": the job then fails)."""
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True)


def job_state(job):
    shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    return dict(field.split("=", 1) for field in shown.split() if "=" in field)


def test_srun_two_tasks_match_torchrun_two_processes(synthetic_voc, tmp_path):
    srun = srun_two_tasks(env_for(synthetic_voc, tmp_path / "srun"))
    assert srun.returncode == 0, srun.stderr[-3000:]
    assert "world size 2" in srun.stderr
    run_dir, by_srun = metrics(tmp_path / "srun")
    assert run_dir.name.startswith("slurm-")  # the run is named after its job
    torchrun = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", *TRAIN[1:]],
        cwd=ROOT,
        env=env_for(synthetic_voc, tmp_path / "torchrun"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert torchrun.returncode == 0, torchrun.stderr[-3000:]
    _, by_torchrun = metrics(tmp_path / "torchrun")
    assert by_srun["completed"] and by_srun["iteration"] == by_torchrun["iteration"] == 12  # 6 per epoch
    assert by_srun["val"]["mIoU"] == by_torchrun["val"]["mIoU"]
    assert by_srun["train_eval"]["mIoU"] == by_torchrun["train_eval"]["mIoU"]


def test_config_overrides_reach_every_srun_task(synthetic_voc, tmp_path):
    env = env_for(synthetic_voc, tmp_path, CONFIG_OVERRIDES="num_epochs=1 run_name=overridden")
    srun = srun_two_tasks(env)
    assert srun.returncode == 0, srun.stderr[-3000:]
    run_dir, result = metrics(tmp_path)
    assert run_dir.name == "overridden" and "world size 2" in srun.stderr
    assert result["completed"] and result["epoch"] == 1 and result["iteration"] == 6  # 24 images, batch 4


def test_srun_on_the_smallest_dataset_validates_on_every_rank_and_matches_one_process(tmp_path):
    # --train 16 --val 8: the val images share one size, so their same-size batches go to rank 0 only.
    from vocseg.data.synthetic import make_synthetic_voc

    data = tmp_path / "data"
    make_synthetic_voc(data, 16, 8, seed=0)
    env = env_for(data, tmp_path / "out", CONFIG_OVERRIDES="num_epochs=1 run_name=small")
    srun = srun_two_tasks(env)
    assert srun.returncode == 0, srun.stderr[-3000:]
    run_dir, trained = metrics(tmp_path / "out")
    assert trained["completed"] and "world size 2" in srun.stderr
    (weights,) = sorted(
        (run_dir / "checkpoints").glob("training_checkpoint_*.pt"), key=lambda p: int(p.stem.rsplit("_", 1)[1])
    )[-1:]
    scored = subprocess.run(
        [sys.executable, "-m", "py_config_runner", "code/scripts/evaluation.py", "tests/configs/tiny_eval.py"],
        cwd=ROOT,
        env={**env_for(data, tmp_path / "eval"), "WEIGHTS_PATH": str(weights)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert scored.returncode == 0, scored.stderr[-3000:]
    (found,) = (tmp_path / "eval").glob("tiny_eval/*/metrics.json")
    one_process = json.loads(found.read_text())["val"]
    assert trained["val"]["mIoU"] == pytest.approx(one_process["mIoU"], abs=1e-9)


def test_batch_job_warned_with_usr1_requeues_itself_and_ends_like_an_uninterrupted_run(synthetic_voc, tmp_path):
    # No periodic checkpoint before the end: the run can only continue from the one USR1 asked for.
    env = env_for(synthetic_voc, tmp_path / "job", TINY_SAVE_EVERY="100", VOCSEG_PYTHON=sys.executable)
    log = tmp_path / "job.out"
    job = (
        subprocess.run(
            [
                "sbatch",
                "--parsable",
                "--ntasks=1",
                "--cpus-per-task=1",
                f"--output={log}",
                "experiments/slurm/train.sbatch",
                TINY,
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        .stdout.strip()
        .split(";")[0]
    )
    try:
        wait_for(lambda: log.is_file() and " iteration 2 loss " in log.read_text(), 300, "iteration 2")
        subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
        wait_for(lambda: job_state(job).get("Restarts") == "1", 120, "the job to requeue itself")
        start_requeued_job_now(job)
        # Right after the requeue the job can still show the first run's end (its script exits 75): wait for
        # the second run's script to start before reading an end state.
        wait_for(lambda: f"job {job} run 1:" in log.read_text(), 300, "the requeued job to start")
        state = wait_for(
            lambda: job_state(job).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED") and job_state(job),
            600,
            "the requeued job to end",
        )
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    text = log.read_text()
    assert state["JobState"] == "COMPLETED", text[-3000:]
    assert f"job {job} run 0:" in text and f"job {job} run 1:" in text  # SLURM_RESTART_COUNT 0, then 1
    stopped_at = int(text.split("SIGUSR1 received: checkpoint at iteration ")[1].split(" ")[0])
    assert 2 <= stopped_at < 12  # mid-run (an epoch's end too, after its validation)
    assert (
        f"resumed from {tmp_path / 'job'}/tiny/slurm-{job}/checkpoints/training_checkpoint_{stopped_at}.pt"
        f" at iteration {stopped_at}" in text
    )

    reference = subprocess.run(
        TRAIN,
        cwd=ROOT,
        env=env_for(synthetic_voc, tmp_path / "ref", TINY_SAVE_EVERY="100"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert reference.returncode == 0, reference.stderr[-3000:]
    (resumed,) = (tmp_path / "job").glob("tiny/*/checkpoints/training_checkpoint_12.pt")
    (uninterrupted,) = (tmp_path / "ref").glob("tiny/*/checkpoints/training_checkpoint_12.pt")
    a, b = (torch.load(p, map_location="cpu", weights_only=True) for p in (resumed, uninterrupted))
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert metrics(tmp_path / "job")[1]["val"]["mIoU"] == metrics(tmp_path / "ref")[1]["val"]["mIoU"]
