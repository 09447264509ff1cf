"""The preflight (CONFIG_OVERRIDES="preflight=True"): the real config for a few iterations, a checkpoint and a
short validation, one summary line with the projected wall time, exit 0, and nothing left behind."""

import subprocess
import sys

import pytest
import torch
from torchvision.models import resnet101

from test_distributed import torchrun
from test_training import REPO, make_env

pytestmark = pytest.mark.slow
QUICKSTART = "configs/train/quickstart_cpu.py"
BASELINE = "configs/train/baseline_resnet101.py"
# The ResNet-101 baseline shrunk for a CPU: its real model and data pipeline, small crops, 2 images per process
# under torchrun (BatchNorm in ASPP's pooling branch needs more than one per process).
TINY_BASELINE = "preflight=True device=cpu batch_size=4 crop_size=64 num_workers=0"


@pytest.fixture(scope="module")
def backbone_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("backbone") / "resnet101.pth"
    torch.save(resnet101().state_dict(), path)
    return path


def preflight(config, env, launcher=()):
    cmd = [*launcher, "-m", "py_config_runner", "code/scripts/training.py", config]
    if not launcher:
        cmd = [sys.executable, *cmd]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def check_summary(proc, tmp_path, processes):
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("preflight: ")]
    assert len(lines) == 1, proc.stdout[-2000:]  # one summary, from rank 0
    line = lines[0]
    for needle in ("s/iteration", "peak memory per process (peak RSS)", "images/s", "projected run", "validation"):
        assert needle in line
    assert f"{processes} process(es) on cpu" in line and line.count(" GiB") == processes
    # Nothing written: no run folder under OUTPUT_PATH, no checkpoint or scratch folder left in TMPDIR.
    assert not (tmp_path / "out").exists()
    # (torchrun keeps a torchelastic_* folder of its own there.)
    left = [p for p in (tmp_path / "tmp").rglob("*") if p.name.startswith("vocseg-preflight-") or p.suffix == ".pt"]
    assert not left


def env_for(data, tmp_path, overrides, **extra):
    (tmp_path / "tmp").mkdir()
    return make_env(data, tmp_path / "out", TMPDIR=tmp_path / "tmp", CONFIG_OVERRIDES=overrides, **extra)


def test_preflight_of_the_quickstart(synthetic_voc, tmp_path):
    proc = preflight(QUICKSTART, env_for(synthetic_voc, tmp_path, "preflight=True num_workers=0"))
    check_summary(proc, tmp_path, 1)


def test_preflight_of_the_quickstart_under_torchrun(synthetic_voc, tmp_path):
    env = env_for(synthetic_voc, tmp_path, "preflight=True num_workers=0")
    proc = preflight(QUICKSTART, env, launcher=torchrun("--nproc_per_node=2"))
    check_summary(proc, tmp_path, 2)


def test_preflight_of_a_baseline_on_cpu(synthetic_voc, tmp_path, backbone_file):
    env = env_for(synthetic_voc, tmp_path, TINY_BASELINE, PRETRAINED_BACKBONE=backbone_file)
    check_summary(preflight(BASELINE, env), tmp_path, 1)


def test_preflight_of_a_baseline_under_torchrun(synthetic_voc, tmp_path, backbone_file):
    env = env_for(synthetic_voc, tmp_path, TINY_BASELINE, PRETRAINED_BACKBONE=backbone_file)
    check_summary(preflight(BASELINE, env, launcher=torchrun("--nproc_per_node=2")), tmp_path, 2)


def test_gpu_memory_is_reserved_against_the_total_and_warns_under_ten_percent_free():
    from vocseg.engine.preflight import _memory

    gib = 2**30
    text, warning = _memory([(30 * gib, 80 * gib), (73 * gib, 80 * gib)], on_gpu=True)
    assert text == "peak GPU memory per process (reserved of total) 30.00 of 80.0 GiB, 73.00 of 80.0 GiB"
    assert "rank(s) 1 would leave under 10% of the GPU free" in warning
    assert _memory([(30 * gib, 80 * gib)], on_gpu=True)[1] == ""
    assert _memory([(3 * gib, 0.0)], on_gpu=False) == ("peak memory per process (peak RSS) 3.00 GiB", "")


def test_every_timestamp_waits_for_the_device(monkeypatch):
    # CUDA queues the step's kernels and returns: a clock read without synchronising times the queueing.
    from vocseg.engine import preflight as pre

    events = []
    monkeypatch.setattr(pre.device_plan, "synchronize", lambda plan: events.append("sync"))
    monkeypatch.setattr(pre.time, "perf_counter", lambda: events.append("clock") or float(len(events)))

    class Evaluator:
        def run(self, loader, epoch_length=None):
            events.append("work")

    pre._time_validation(Evaluator(), [1, 2], plan=None)
    assert events == ["sync", "clock", "work", "sync", "clock"]
