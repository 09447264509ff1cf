"""summary.png of a real (tiny) training run: what it is drawn from, and that it is drawn."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vocseg.run_summary import read_run, write_summary

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(synthetic_voc, tmp_path_factory):
    out = tmp_path_factory.mktemp("summary_run")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TINY_", "CLEARML", "RESUME_FROM", "WEIGHTS"))}
    env.update(DATASET_PATH=str(synthetic_voc), OUTPUT_PATH=str(out), OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-m", "py_config_runner", "code/scripts/training.py", "tests/configs/tiny.py"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = (out / "tiny").iterdir()
    assert f"summary {run / 'summary.png'} | curves: tensorboard --logdir {run / 'tb'}" in done.stderr
    return run


def test_summary_is_drawn_from_what_the_run_logged(run_dir):
    run = read_run(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    series = run["series"]
    # tiny.py: 12 iterations logged every 2, SGD with a backbone and a head group, validation every epoch.
    assert series["train/batch_loss"][0] == [2, 4, 6, 8, 10, 12]
    assert all(math.isfinite(v) and v > 0 for v in series["train/batch_loss"][1])
    assert sorted(t for t in series if t.startswith("lr/")) == ["lr/group_0", "lr/group_1"]
    assert series["lr/group_0"][1][0] > series["lr/group_0"][1][-1]  # poly decay
    for tag in ("train_eval", "val"):
        steps, values = series[f"{tag}/mIoU"]
        assert steps == [1, 2] and values[-1] == pytest.approx(metrics[tag]["mIoU"], abs=1e-6)
    assert run["val_iou"] == metrics["val"]["IoU"] or np.allclose(run["val_iou"], metrics["val"]["IoU"], equal_nan=True)
    assert run["grid"].shape == (4 * 96, 3 * 96, 3)  # 4 samples x (image | ground truth | prediction) at 96 px


def test_training_writes_summary_png_into_its_output_folder(run_dir):
    written = (run_dir / "summary.png").read_bytes()
    assert write_summary(run_dir) == run_dir / "summary.png"  # redrawn from the folder alone: the same picture
    assert (run_dir / "summary.png").read_bytes() == written
    with Image.open(run_dir / "summary.png") as png:
        assert png.format == "PNG" and png.size == (1500, 1400)
        pixels = np.asarray(png.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100  # curves, bars and the image grid, not a blank page
