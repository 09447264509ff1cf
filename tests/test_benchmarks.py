"""Every benchmark runs in --tiny mode and ends with one parseable JSON line, so none of them can rot.

They measure nothing meaningful at this size; benchmarks/README.md has the real figures.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vocseg.config import literal_constants

REPO = Path(__file__).resolve().parents[1]
COMMON = {"benchmark", "load_before", "load_after", "machine", "wall_s"}


def run(script, *args, timeout=300, env=None):
    proc = subprocess.run(
        [sys.executable, f"benchmarks/{script}", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines, proc.stderr[-3000:]
    return [json.loads(line) for line in lines], proc


def check(result, name, keys):
    assert result["benchmark"] == name
    assert COMMON | set(keys) <= set(result), sorted(set(keys) - set(result))
    assert result["machine"]["nproc"] >= 1 and len(result["load_before"]) == 3


def test_gpu_says_not_measured_without_cuda():
    (result,), _ = run("gpu.py", "--tiny")
    check(result, "gpu", ["measured"])
    if not result["measured"]:
        assert result["command"] == "python benchmarks/gpu.py"
        smoke = result["cpu_smoke_test"]
        assert smoke["flops_per_step"] > 0 and smoke["images_per_s"] > 0
        # Counted on the meta device (no memory anywhere): the same count as on real CPU tensors.
        assert smoke["flops_per_step"] == smoke["flops_per_step_counted_on_cpu"]
    else:
        assert {"fp32", "bf16_amp"} <= set(result["variants"])


def test_run_all_with_dataflow():  # ~5 s
    results, _ = run("run_all.py", "--tiny", "--only", "dataflow.py")
    dataflow, summary = results
    check(dataflow, "dataflow", ["images_per_s", "ours_vs_torchvision_v2", "ours_vs_decode_only", "targets"])
    assert set(dataflow["images_per_s"]) == {"ours", "torchvision_v2", "decode_only"}
    assert all(v > 0 for v in dataflow["images_per_s"].values())
    # Our loader really delivers the training crops: uint8 CHW images and HW masks.
    crop = literal_constants(REPO / "configs/train/baseline_resnet101.py")["crop_size"]
    assert dataflow["batch_shapes"]["ours"]["image"] == [[4, 3, crop, crop], "uint8"]
    assert dataflow["batch_shapes"]["torchvision_v2"]["image"] == [[4, 3, crop, crop], "float32"]
    assert summary["failed"] == []


@pytest.mark.slow
def test_trainer_overhead():
    (result,), _ = run("trainer_overhead.py", "--tiny")
    check(
        result,
        "trainer_overhead",
        ["iteration_s", "ratio_per_iteration", "ratio_per_epoch_with_validation", "ratio_per_iteration_cpu", "targets"],
    )
    assert result["runs"]["ours"][0]["clearml"] is True
    assert result["ratio_per_iteration"] > 0 and result["iteration_s"]["plain"] > 0


@pytest.mark.slow
def test_startup_exit():
    (result,), _ = run("startup_exit.py", "--tiny")
    check(result, "startup_exit", ["plain", "clearml", "targets"])
    for mode in ("plain", "clearml"):
        timings = result[mode]
        assert 0 < timings["command_to_first_iteration_s"] < timings["total_s"]
        assert 0 < timings["last_iteration_to_exit_s"] < timings["total_s"]
    assert result["runs"]["clearml"][0]["offline_session"] is True


def test_sample_check():  # ~5 s
    (result,), _ = run("sample_check.py", "--tiny")
    check(result, "sample_check", ["samples", "s_per_1000", "cached_s_per_1000", "voc_sbd_12031_s", "command"])
    assert result["samples"]["voc"] == 8 and result["samples"]["sbd"] > 0
    assert all(v > 0 for v in result["s_per_1000"].values())


def test_memory_estimate_counts_something():
    (result,), _ = run("memory_estimate.py", "--tiny")
    check(result, "memory_estimate", ["recipes", "command"])
    (tiny,) = result["recipes"]
    assert tiny["params_m"] > 1 and tiny["activations_gib_per_image"] > 0
    assert tiny["optimizer_state_gib"] < tiny["estimate_gib"]["4"] < tiny["estimate_gib"]["8"]


def test_checkpoint_upload_measures_the_checkpoint_and_says_when_no_server_is_there(tmp_path):
    import os

    # No ClearML configuration at all: the user's ~/clearml.conf may name a real server.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLEARML_", "TRAINS_"))}
    (result,), _ = run("checkpoint_upload.py", "--tiny", env={**env, "HOME": str(tmp_path)})
    check(result, "checkpoint_upload", ["checkpoint", "clearml"])
    assert result["checkpoint"]["size_mb"] > 7 * result["checkpoint"]["params_m"]  # weights + momentum, 4 bytes each
    assert result["clearml"] == {"measured": False, "why": "no ClearML server configured"}


def test_preflight():
    (result,), _ = run("preflight.py", "--tiny")
    check(result, "preflight", ["projected_s", "measured_s", "projected_over_measured", "summary"])
    assert result["projected_s"] > 0 and result["measured_s"] > 0


def test_cpu_bf16_times_both_precisions_and_says_what_auto_picks():
    (result,), _ = run("cpu_bf16.py", "--tiny")
    check(result, "cpu_bf16", ["fp32_s_per_step", "bf16_s_per_step", "bf16_speedup", "native_bf16", "amp_auto_picks"])
    assert result["fp32_s_per_step"] > 0 and result["bf16_s_per_step"] > 0
    assert result["amp_auto_picks"] == ("bf16" if result["native_bf16"] else "fp32")
