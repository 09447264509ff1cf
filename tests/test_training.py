"""End-to-end training on the synthetic dataset: outputs, metric correctness, exact resume, bad input."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from vocseg.datasets import VOCSegmentation
from vocseg.engine.steps import prepare_batch
from vocseg.models import deeplabv3

REPO = Path(__file__).resolve().parents[1]
TINY = "tests/configs/tiny.py"
pytestmark = pytest.mark.slow


def run_script(script, config, env, timeout=600, **popen):
    cmd = [sys.executable, "-m", "py_config_runner", f"code/scripts/{script}.py", config]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, **popen)


def make_env(data, out, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TINY_", "CLEARML", "RESUME_FROM", "WEIGHTS"))}
    env.update(
        DATASET_PATH=str(data), OUTPUT_PATH=str(out), OMP_NUM_THREADS="1", **{k: str(v) for k, v in extra.items()}
    )
    return env


def only_run_dir(out, stem="tiny"):
    runs = sorted((Path(out) / stem).iterdir())
    assert len(runs) == 1, runs
    return runs[0]


@pytest.fixture(scope="module")
def trained(synthetic_voc, tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    proc = run_script("training", TINY, make_env(synthetic_voc, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return only_run_dir(out), proc


def test_run_writes_every_output(trained):
    run_dir, proc = trained
    names = {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()}
    assert {"tiny.py", "training.py", "training.log", "metrics.json"} <= names
    # 24 images / batch 4 = 6 iterations per epoch, 2 epochs, a checkpoint every 2 iterations, last 2 kept.
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "training_checkpoint_10.pt",
        "training_checkpoint_12.pt",
    ]
    assert len(list((run_dir / "best").glob("best_model_*_val_mIoU=*.pt"))) == 2
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["completed"] and metrics["iteration"] == 12
    assert 0.0 <= metrics["val"]["mIoU"] <= 1.0 and len(metrics["val"]["IoU"]) == 21
    assert Path(metrics["best_model"]).is_file()
    log = (run_dir / "training.log").read_text()
    for needle in (
        "torch 2.",
        "world size 1",
        "train images 24",
        "val images 21",
        str(run_dir),
        "precision fp32",
        "backbone weights: none (pretrained_backbone=False",
    ):
        assert needle in log
    assert metrics["backbone_source"].startswith("none (pretrained_backbone=False") and metrics["precision"] == "fp32"
    checkpoint = torch.load(run_dir / "checkpoints" / "training_checkpoint_12.pt", weights_only=True)
    assert set(checkpoint) == {"settings", "trainer", "model", "optimizer", "lr_scheduler", "scaler", "best_models"}
    assert checkpoint["settings"] == {
        "seed": 7,
        "batch_size": 4,
        "num_epochs": 2,
        "accumulation_steps": 1,
        "world_size": 1,
        "iterations_per_epoch": 6,
    }
    assert checkpoint["trainer"]["iteration"] == 12


def numpy_miou(model, voc_root):
    """Independent scoring: OpenCV reads, one image at a time at its own size, a bincount confusion matrix."""
    from PIL import Image

    dataset = VOCSegmentation(voc_root, "val")
    cm = np.zeros((21, 21), dtype=np.int64)
    model.eval()
    for image_path, mask_path in zip(dataset.image_paths, dataset.mask_paths):
        image = cv2.cvtColor(cv2.imread(str(image_path)), cv2.COLOR_BGR2RGB)
        mask = np.array(Image.open(mask_path))
        x, _ = prepare_batch(
            {"image": torch.from_numpy(image).permute(2, 0, 1)[None], "mask": torch.from_numpy(mask)[None]}, "cpu"
        )
        with torch.no_grad():
            pred = model(x)["out"].argmax(1)[0].numpy()
        keep = mask != 255
        cm += np.bincount(mask[keep].astype(np.int64) * 21 + pred[keep], minlength=441).reshape(21, 21)
    inter = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1), np.nan)
    return float(np.nanmean(iou)), float(inter.sum() / cm.sum())


def check_against_numpy(run_dir, voc_root):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    model = deeplabv3("mobilenet_v3_large", aux_loss=False, pretrained_backbone=False)
    model.load_state_dict(torch.load(run_dir / "checkpoints" / "training_checkpoint_12.pt", weights_only=True)["model"])
    miou, pixel_accuracy = numpy_miou(model, voc_root)
    assert metrics["val"]["mIoU"] == pytest.approx(miou, abs=1e-9)
    assert metrics["val"]["pixel_accuracy"] == pytest.approx(pixel_accuracy, abs=1e-9)


def test_metrics_match_independent_numpy(trained, synthetic_voc):
    check_against_numpy(trained[0], synthetic_voc)


def test_mixed_and_larger_images_are_scored_unpadded(mixed_size_voc, tmp_path):
    proc = run_script("training", TINY, make_env(mixed_size_voc, tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_against_numpy(only_run_dir(tmp_path), mixed_size_voc)


def test_evaluation_reproduces_training_val_miou(trained, synthetic_voc, tmp_path):
    run_dir, _ = trained
    weights = run_dir / "checkpoints" / "training_checkpoint_12.pt"
    proc = run_script(
        "evaluation", "tests/configs/tiny_eval.py", make_env(synthetic_voc, tmp_path / "out", WEIGHTS_PATH=weights)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    eval_dir = only_run_dir(tmp_path / "out", "tiny_eval")
    result = json.loads((eval_dir / "metrics.json").read_text())
    trained_metrics = json.loads((run_dir / "metrics.json").read_text())
    assert result["val"]["mIoU"] == pytest.approx(trained_metrics["val"]["mIoU"], abs=1e-9)
    predictions = sorted((eval_dir / "predictions").glob("*.png"))
    assert len(predictions) == 21
    from PIL import Image

    first = Image.open(predictions[0])
    assert first.mode == "P" and first.size == (96, 96)


def test_exact_resume_after_kill(synthetic_voc, tmp_path):
    knobs = dict(TINY_EPOCHS=3, TINY_SAVE_EVERY=4, TINY_WORKERS=2)
    full = run_script("training", TINY, make_env(synthetic_voc, tmp_path / "full", **knobs))
    assert full.returncode == 0, full.stderr[-3000:]
    reference = torch.load(
        only_run_dir(tmp_path / "full") / "checkpoints" / "training_checkpoint_18.pt", weights_only=True
    )

    env = make_env(synthetic_voc, tmp_path / "killed", **knobs)
    cmd = [sys.executable, "-m", "py_config_runner", "code/scripts/training.py", TINY]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 300
    first = None
    while time.time() < deadline and proc.poll() is None:
        found = list((tmp_path / "killed").glob("tiny/*/checkpoints/training_checkpoint_*.pt"))
        if found:
            first = found[0]
            break
        time.sleep(0.02)
    assert first is not None and proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # Mid-epoch (iteration 4 of 6 per epoch) unless the kill landed later.
    checkpoints = sorted(first.parent.glob("training_checkpoint_*.pt"), key=lambda p: int(p.stem.split("_")[-1]))
    resume_from = checkpoints[-1]
    resumed = run_script(
        "training", TINY, make_env(synthetic_voc, tmp_path / "resumed", RESUME_FROM=resume_from, **knobs)
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in (only_run_dir(tmp_path / "resumed") / "training.log").read_text()
    final = torch.load(
        only_run_dir(tmp_path / "resumed") / "checkpoints" / "training_checkpoint_18.pt", weights_only=True
    )
    assert final["trainer"]["iteration"] == reference["trainer"]["iteration"] == 18
    for key, value in reference["model"].items():
        assert torch.equal(value, final["model"][key]), key
    for a, b in zip(reference["optimizer"]["state"].values(), final["optimizer"]["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])


def last_line(proc):
    return proc.stderr.strip().splitlines()[-1]


def kill_when(proc, run_root, ready, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if ready(run_root):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_resume_keeps_best_models_and_early_stopping(synthetic_voc, tmp_path):
    # Validation every epoch (6 iterations), a checkpoint every 2: kill once epoch 1's best model is saved and
    # a later checkpoint holds it. A resumed run that forgot it would keep only epoch 2's model as "best".
    knobs = dict(TINY_EPOCHS=2, TINY_SAVE_EVERY=2, TINY_ES_PATIENCE=3)
    full = run_script("training", TINY, make_env(synthetic_voc, tmp_path / "full", **knobs))
    assert full.returncode == 0, full.stderr[-3000:]
    full_dir = only_run_dir(tmp_path / "full")

    cmd = [sys.executable, "-m", "py_config_runner", "code/scripts/training.py", TINY]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=make_env(synthetic_voc, tmp_path / "killed", **knobs),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    kill_when(
        proc,
        tmp_path / "killed",
        lambda root: (
            list(root.glob("tiny/*/best/best_model_1_*.pt"))
            and list(root.glob("tiny/*/checkpoints/training_checkpoint_8.pt"))
        ),
    )
    killed_dir = only_run_dir(tmp_path / "killed")
    (first_best,) = [p.name for p in (killed_dir / "best").glob("best_model_1_*.pt")]
    checkpoints = sorted(
        (killed_dir / "checkpoints").glob("training_checkpoint_*.pt"), key=lambda p: int(p.stem.split("_")[-1])
    )
    state = torch.load(checkpoints[-1], weights_only=True)
    assert state["best_models"]["_saved"][0][1] == first_best
    epoch1_miou = float(first_best.split("=")[1][:-3])
    assert state["early_stopping"]["best_score"] == pytest.approx(epoch1_miou, abs=1e-4)

    resumed = run_script(
        "training", TINY, make_env(synthetic_voc, tmp_path / "resumed", RESUME_FROM=checkpoints[-1], **knobs)
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    resumed_dir = only_run_dir(tmp_path / "resumed")
    names = lambda run: sorted(p.name for p in (run / "best").glob("best_model_*.pt"))  # noqa: E731
    assert names(resumed_dir) == names(full_dir) and len(names(full_dir)) == 2 and first_best in names(full_dir)
    final = lambda run: torch.load(run / "checkpoints" / "training_checkpoint_12.pt", weights_only=True)  # noqa: E731
    assert final(resumed_dir)["best_models"] == final(full_dir)["best_models"]
    assert final(resumed_dir)["early_stopping"] == final(full_dir)["early_stopping"]
    best = json.loads((resumed_dir / "metrics.json").read_text())["best_model"]
    assert Path(best).is_file() and Path(best).parent == resumed_dir / "best"


def test_config_syntax_error_names_file_and_line(synthetic_voc, tmp_path):
    bad = tmp_path / "broken.py"
    bad.write_text("seed = 1\nmodel = (\n")
    proc = run_script("training", str(bad), make_env(synthetic_voc, tmp_path))
    assert proc.returncode != 0
    assert str(bad) in last_line(proc) and "line 2" in last_line(proc)


def test_missing_config_keys_are_listed(synthetic_voc, tmp_path):
    bad = tmp_path / "partial.py"
    bad.write_text("seed = 1\ndevice = 'cpu'\nnum_epochs = 1\n")
    proc = run_script("training", str(bad), make_env(synthetic_voc, tmp_path))
    assert proc.returncode != 0
    line = last_line(proc)
    assert str(bad) in line
    for key in ("model", "optimizer", "criterion", "train_loader", "val_loader", "lr_scheduler"):
        assert key in line


def test_missing_resume_file(synthetic_voc, tmp_path):
    proc = run_script("training", TINY, make_env(synthetic_voc, tmp_path, RESUME_FROM=tmp_path / "nope.pt"))
    assert proc.returncode != 0
    assert "nope.pt" in last_line(proc) and "RESUME_FROM" in last_line(proc)


def test_checkpoint_of_another_model_names_keys(synthetic_voc, tmp_path, trained):
    other = tmp_path / "other.pt"
    run_dir, _ = trained
    checkpoint = torch.load(run_dir / "checkpoints" / "training_checkpoint_12.pt", weights_only=True)
    checkpoint["model"] = deeplabv3("resnet50", aux_loss=False, pretrained_backbone=False).state_dict()
    torch.save(checkpoint, other)
    before = other.read_bytes()
    proc = run_script("training", TINY, make_env(synthetic_voc, tmp_path, RESUME_FROM=other))
    assert proc.returncode != 0
    assert "different model" in last_line(proc) and "backbone." in last_line(proc)
    assert other.read_bytes() == before


def test_unreachable_backbone_weights_stop_before_training(synthetic_voc, tmp_path):
    with socket.socket() as sock:  # a proxy port where nothing listens: the download fails at once, offline
        sock.bind(("127.0.0.1", 0))
        proxy = f"http://127.0.0.1:{sock.getsockname()[1]}"
    env = make_env(
        synthetic_voc, tmp_path, TINY_PRETRAINED=1, TORCH_HOME=tmp_path / "torch", HTTPS_PROXY=proxy, https_proxy=proxy
    )
    for name in ("NO_PROXY", "no_proxy", "PRETRAINED_BACKBONE"):
        env.pop(name, None)
    proc = run_script("training", TINY, env)
    assert proc.returncode != 0
    line = last_line(proc)
    assert line.startswith("error: no ImageNet weights for the mobilenet_v3_large backbone")
    assert "PRETRAINED_BACKBONE=/path/to/" in line and "pretrained_backbone=False" in line
    assert "Traceback" not in proc.stderr and "first iteration" not in proc.stdout + proc.stderr


def test_missing_weights_for_evaluation(synthetic_voc, tmp_path):
    proc = run_script(
        "evaluation",
        "configs/eval/baseline_resnet101.py",
        make_env(synthetic_voc, tmp_path, WEIGHTS_PATH=tmp_path / "missing.pt", CONFIG_OVERRIDES="device=cpu"),
    )
    assert proc.returncode != 0
    assert "missing.pt" in last_line(proc) and "WEIGHTS_PATH" in last_line(proc)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(synthetic_voc, tmp_path):
    proc = run_script("training", TINY, make_env(synthetic_voc, tmp_path, TINY_NAN_AFTER=5, TINY_SAVE_EVERY=2))
    assert proc.returncode != 0
    line = last_line(proc)
    assert "NaN at iteration 6" in line and "training_checkpoint_4.pt" in line
    run_dir = only_run_dir(tmp_path)
    saved = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert saved == ["training_checkpoint_2.pt", "training_checkpoint_4.pt"]
    state = torch.load(run_dir / "checkpoints" / "training_checkpoint_4.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_run_honours_the_mutations_of_the_config_object_it_is_given(synthetic_voc, tmp_path, monkeypatch):
    from py_config_runner import ConfigObject

    from vocseg.entry import run_training as run

    for name, value in make_env(synthetic_voc, tmp_path).items():
        monkeypatch.setenv(name, value)
    for name in [k for k in os.environ if k.startswith(("TINY_", "RESUME_FROM"))]:
        monkeypatch.delenv(name)
    run(
        ConfigObject(
            REPO / TINY,
            mutations={"num_epochs": 1, "save_every_iters": 3},
            script_filepath=REPO / "code/scripts/training.py",
        )
    )
    run_dir = only_run_dir(tmp_path)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["completed"] and metrics["epoch"] == 1 and metrics["iteration"] == 6
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "training_checkpoint_3.pt",
        "training_checkpoint_6.pt",
    ]
