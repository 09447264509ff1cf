"""An online training run read back from the server; evaluation of its model by id; an offline session of the
same run imported afterwards."""

import hashlib
import json
import sys

import pytest
import torch
from online import console_text, iterations_of, poly_lr, run, scalar_events, task_id_of, train
from PIL import Image

PROJECT = "Pascal-VOC12 Training"
CONFIG = "tests/configs/tiny_clearml.py"


def sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_online_run_records_everything_on_the_server(online_run, checkout):
    from clearml import Task
    from clearml.storage import StorageManager

    task = Task.get_task(online_run["id"])
    assert (task.get_status(), task.get_project_name(), task.name) == ("completed", PROJECT, "tiny_clearml")
    params = task.get_parameters_as_dict()["Config"]
    assert (params["learning_rate"], params["batch_size"], params["num_epochs"]) == ("0.01", "4", "2")
    assert task.get_configuration_object("config") == (checkout / CONFIG).read_text()
    assert open(task.artifacts["config"].get_local_copy()).read() == (checkout / CONFIG).read_text()
    assert open(task.artifacts["script"].get_local_copy()).read() == (checkout / "code/scripts/training.py").read_text()

    # 8 training samples in batches of 4 for 2 epochs: iterations 1-4; validation after each epoch.
    events = scalar_events(task)
    at = iterations_of(events)
    assert at[("train", "batch_loss")] == [1, 2, 3, 4]
    assert at[("lr", "0")] == at[("lr", "1")] == [1, 2, 3, 4]  # backbone and head groups
    for tag in ("val", "train_eval"):
        for name in ("mIoU", "mIoU_no_bg", "pixel_accuracy", "mean_class_accuracy"):
            assert at[(tag, name)] == [1, 2], (tag, name)
    assert at[("val/IoU", "background")] == [1, 2]
    lrs = {(s, i): v for m, s, i, v in events if m == "lr"}
    assert lrs[("0", 1)] == pytest.approx(poly_lr(0.01, 1, 4)) and lrs[("1", 4)] == pytest.approx(poly_lr(0.1, 4, 4))
    local = json.loads((online_run["run_dir"] / "metrics.json").read_text())
    final_val = {i: v for m, s, i, v in events if (m, s) == ("val", "mIoU")}[2]
    assert final_val == pytest.approx(local["val"]["mIoU"], abs=1e-6)

    images = task.get_debug_samples("val", "image | ground truth | prediction")
    assert sorted(e["iter"] for e in images) == [1, 2]
    image = Image.open(StorageManager.get_local_copy(images[-1]["url"]))
    assert image.size == (3 * 96, 4 * 96)  # image | ground truth | prediction for the 4 samples of a val batch

    plots = [p for p in task.get_reported_plots(max_iterations=10) if p["metric"] == "val confusion matrix"]
    assert len(plots) == 1 and "ground truth" in plots[0]["plot_str"]

    log = console_text(task)
    assert "world size 1" in log and "epoch 2 iteration 4 loss" in log and "epoch 2 val: mIoU=" in log

    (model,) = task.models["output"]
    assert model.url.startswith("http") and model.framework == "PyTorch" and model.labels["background"] == 0
    weights = model.get_weights()
    best = sorted((online_run["run_dir"] / "best").glob("best_model_*.pt"))[-1]
    assert sha256(weights) == sha256(best)
    assert isinstance(torch.load(weights, map_location="cpu", weights_only=True), dict)


def test_evaluation_fetches_the_model_by_id_and_reproduces_val_miou(
    online_run, checkout, server_env, synthetic_voc, tmp_path
):
    from clearml import Task

    model_id = Task.get_task(online_run["id"]).models["output"][-1].id
    env = {
        **server_env,
        "CLEARML_OUTPUT_PATH": str(tmp_path / "out"),
        "DATASET_PATH": str(synthetic_voc),
        "WEIGHTS_PATH": model_id,
        "TINY_VAL_LIMIT": "4",
    }
    proc = run(
        [sys.executable, "-m", "py_config_runner", "code/scripts/evaluation.py", "tests/configs/tiny_eval.py"],
        env,
        checkout,
    )
    assert proc.returncode == 0, proc.output[-4000:]
    trained = json.loads((online_run["run_dir"] / "metrics.json").read_text())
    evaluated = json.loads(next((tmp_path / "out" / "tiny_eval").glob("*/metrics.json")).read_text())
    assert evaluated["val"]["mIoU"] == pytest.approx(trained["val"]["mIoU"], abs=1e-6)
    evaluation = Task.get_task(task_id_of(proc.output))
    assert evaluation.task_type.value == "testing" and evaluation.get_status() == "completed"
    singles = {v: val for m, v, _, val in scalar_events(evaluation) if m == "Summary"}
    assert singles["val/mIoU"] == pytest.approx(evaluated["val"]["mIoU"])


def test_offline_session_imports_with_scalars_and_model(checkout, server_env, synthetic_voc, tmp_path):
    from clearml import Task

    proc = train(checkout, server_env, tmp_path / "out", DATASET_PATH=str(synthetic_voc), CLEARML_OFFLINE_MODE="1")
    assert proc.returncode == 0, proc.output[-4000:]
    assert "tracking OFFLINE" in proc.output
    (archive,) = [w for w in proc.output.split() if w.endswith(".zip") and "offline-" in w][-1:]
    imported = run([sys.executable, "code/scripts/import_offline_session.py", archive], server_env, checkout)
    assert imported.returncode == 0, imported.output[-4000:]
    task_id = imported.stdout.split("imported as task")[-1].split()[0]
    task = Task.get_task(task_id)
    assert task.name == "tiny_clearml" and task.get_parameters_as_dict()["Config"]["learning_rate"] == "0.01"
    at = iterations_of(scalar_events(task))
    assert at[("train", "batch_loss")] == [1, 2, 3, 4] and at[("val", "mIoU")] == [1, 2]
    (model,) = task.models["output"]
    best = sorted(next((tmp_path / "out" / "tiny_clearml").iterdir()).glob("best/best_model_*.pt"))[-1]
    assert sha256(model.get_weights()) == sha256(best)
