"""benchmarks/gpu_check.py (`make gpu-check`): its tiny CPU mode runs every step of the GPU check, as real
subprocesses of the real commands, and any step that fails or cannot run makes the whole check fail."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
STEPS = ["data", "preflight-voc", "preflight-sbd", "train", "resume", "evaluate-tta", "export", "benchmark"]
ROW = re.compile(r"^(\S+)\s+(ok|FAILED|skipped)\s+(\d+\.\d)\s+(.*)$")


def gpu_check(*args, overrides=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLEARML") and k != "CONFIG_OVERRIDES"}
    env["OMP_NUM_THREADS"] = "1"
    if overrides:
        env["CONFIG_OVERRIDES"] = overrides
    return subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def table(proc) -> dict:
    """step -> (status, seconds, key figure), from the table on stdout."""
    rows = {}
    for line in proc.stdout.splitlines():
        found = ROW.match(line)
        if found and found.group(1) in STEPS:
            rows[found.group(1)] = (found.group(2), float(found.group(3)), found.group(4))
    return rows


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: the check would run for real")
def test_without_a_gpu_the_check_says_not_measured():
    proc = gpu_check()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("gpu-check: not measured: no GPU visible")


@pytest.mark.slow
def test_tiny_check_runs_every_step(tmp_path):
    proc = gpu_check("--tiny", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = table(proc)
    assert list(rows) == STEPS, proc.stdout
    assert all(status == "ok" and seconds > 0 for status, seconds, _ in rows.values()), proc.stdout
    assert proc.stdout.rstrip().splitlines()[-1].startswith("gpu-check (tiny, on the CPU): all 8 steps passed")
    # The first leg stopped midway with a checkpoint; the second continued from it to the end.
    stopped = int(re.search(r"stopped at (\d+), exit 75", rows["train"][2]).group(1))
    assert 0 < stopped < 8
    assert f"resumed at iteration {stopped}, ended at 8" in rows["resume"][2]
    assert "flip True, scales [0.75, 1.0, 1.25, 1.5]" in rows["evaluate-tta"][2]
    assert "onnx argmax agreement" in rows["export"][2] and "torchscript argmax agreement" in rows["export"][2]
    assert (tmp_path / "export" / "model.onnx").is_file()
    assert {p.name for p in (tmp_path / "logs").iterdir()} == {f"{step}.log" for step in STEPS}


@pytest.mark.slow
def test_a_failing_step_fails_the_check(tmp_path):
    # An override the configs do not know, appended to the step's own: the preflight stops with its one-line error.
    only = ("--only", "data", "preflight-voc")
    proc = gpu_check("--tiny", "--out", str(tmp_path), *only, overrides="num_epochz=1")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = table(proc)
    assert rows["data"][0] == "ok"
    status, _, figure = rows["preflight-voc"]
    assert status == "FAILED" and "unknown key 'num_epochz'" in figure and "preflight-voc.log" in figure
    assert "1 of 2 steps did not pass (preflight-voc)" in proc.stdout


def test_a_step_without_its_input_fails_the_check(tmp_path):
    proc = gpu_check("--tiny", "--out", str(tmp_path), "--only", "evaluate-tta")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert table(proc) == {
        "evaluate-tta": ("skipped", pytest.approx(0, abs=0.1), "no data: the data step did not run or failed")
    }
    # A second check never continues an earlier one's run: it wants a folder of its own.
    (tmp_path / "logs").mkdir()
    again = gpu_check("--tiny", "--out", str(tmp_path), "--only", "evaluate-tta")
    assert again.returncode == 2 and "is not empty: pick a new --out folder" in again.stderr
