"""ClearML Datasets as the data source: upload the synthetic set, reuse it unchanged, train from clearml://<id>."""

import json
import shutil
import sys
import uuid

import pytest
from online import run, task_id_of, train

from vocseg.clearml import data as clearml_data
from vocseg.errors import UserError

UPLOAD = "code/scripts/upload_dataset.py"


@pytest.fixture(scope="module")
def project():
    return f"vocseg online suite/datasets {uuid.uuid4().hex[:8]}"  # a fresh project: no versions from earlier runs


@pytest.fixture(scope="module")
def uploaded(project, checkout, server_env, synthetic_voc):
    proc = run(
        [sys.executable, UPLOAD, str(synthetic_voc), "--sbd", str(synthetic_voc / "SBD"), "--project", project],
        server_env,
        checkout,
    )
    assert proc.returncode == 0, proc.output[-4000:]
    exports = dict(line.split()[1].split("=", 1) for line in proc.stdout.splitlines() if line.startswith("export "))
    assert set(exports) == {"DATASET_PATH", "SBD_DATASET_PATH"}
    assert f"{project}/VOC2012: uploaded version 1.0.0" in proc.stdout
    return exports


def test_upload_rerun_on_unchanged_data_reuses_the_version(uploaded, project, checkout, server_env, synthetic_voc):
    proc = run(
        [sys.executable, UPLOAD, str(synthetic_voc), "--sbd", str(synthetic_voc / "SBD"), "--project", project],
        server_env,
        checkout,
    )
    assert proc.returncode == 0, proc.output[-4000:]
    assert f"{project}/VOC2012: unchanged: reusing version 1.0.0" in proc.stdout
    assert f"export DATASET_PATH={uploaded['DATASET_PATH']}" in proc.stdout
    assert f"export SBD_DATASET_PATH={uploaded['SBD_DATASET_PATH']}" in proc.stdout


def test_changed_data_makes_a_child_version(uploaded, project, tmp_path, synthetic_voc):
    from clearml import Dataset

    changed = tmp_path / "voc"
    shutil.copytree(synthetic_voc / "VOCdevkit", changed / "VOCdevkit")
    (changed / "VOCdevkit" / "VOC2012" / "extra.txt").write_text("one more file\n")
    result = clearml_data.upload(changed, "voc", "VOC2012", project)
    first = uploaded["DATASET_PATH"][len("clearml://") :]
    assert not result.reused and result.version == "1.0.1" and result.id != first
    child = Dataset.get(dataset_id=result.id)
    assert child.get_dependency_graph()[result.id] == [first]
    assert "VOCdevkit/VOC2012/extra.txt" in child.list_added_files()
    # By name and version, and by name alone (the newest version).
    by_version = clearml_data.local_copy(f"clearml://{project}/VOC2012@1.0.0", "DATASET_PATH", "voc")
    assert not (by_version / "VOCdevkit" / "VOC2012" / "extra.txt").exists()
    newest = clearml_data.local_copy(f"clearml://{project}/VOC2012", "DATASET_PATH", "voc")
    assert (newest / "VOCdevkit" / "VOC2012" / "extra.txt").read_text() == "one more file\n"


def test_training_from_clearml_records_the_dataset_and_matches_the_local_folder(
    uploaded, online_run, checkout, server_env, tmp_path
):
    from clearml import Task

    proc = train(checkout, server_env, tmp_path / "out", DATASET_PATH=uploaded["DATASET_PATH"])
    assert proc.returncode == 0, proc.output[-4000:]
    dataset_id = uploaded["DATASET_PATH"][len("clearml://") :]
    assert f"DATASET_PATH={uploaded['DATASET_PATH']}: ClearML dataset {dataset_id}" in proc.output
    task = Task.get_task(task_id_of(proc.output))
    assert task.get_status() == "completed"
    assert task.get_parameters_as_dict()["Datasets"]["DATASET_PATH"] == dataset_id
    from_clearml = json.loads(next((tmp_path / "out" / "tiny_clearml").glob("*/metrics.json")).read_text())
    from_folder = json.loads((online_run["run_dir"] / "metrics.json").read_text())
    # Same seed, same files: the very same numbers.
    assert from_clearml["val"]["mIoU"] == from_folder["val"]["mIoU"]
    assert from_clearml["val"]["IoU"] == from_folder["val"]["IoU"]


@pytest.mark.parametrize(
    "address, message",
    [
        ("clearml://0123456789abcdef0123456789abcdef", "no such finalised ClearML dataset"),
        ("clearml://vocseg online suite/no such project/VOC2012", "no such finalised ClearML dataset"),
        ("clearml://VOC2012", "is not a dataset address"),
    ],
)
def test_unknown_datasets_are_one_line_errors(address, message):
    with pytest.raises(UserError, match=message) as raised:
        clearml_data.local_copy(address, "DATASET_PATH", "voc")
    assert str(raised.value).startswith(f"DATASET_PATH={address}") and "\n" not in str(raised.value)


def test_a_dataset_without_vocdevkit_is_refused(uploaded):
    sbd = uploaded["SBD_DATASET_PATH"]
    assert (clearml_data.local_copy(sbd, "SBD_DATASET_PATH", "sbd") / "cls").is_dir()
    with pytest.raises(UserError, match=r"has no VOCdevkit/ at its top \(it holds cls, img, "):
        clearml_data.local_copy(sbd, "DATASET_PATH", "voc")
