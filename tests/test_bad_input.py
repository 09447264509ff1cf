"""Bad input caught before training work, as one line naming what to fix; interruption that loses nothing.

The in-process tests call the checks directly; the `slow` ones run the scripts as a user would and assert the
exit code, the last stderr line and that files written before are unchanged. BAD_INPUT_KINDS counts the kinds.
"""

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import scipy.io
import torch
from ignite.engine import Engine
from PIL import Image

from test_training import REPO, TINY, last_line, make_env, only_run_dir, run_script
from vocseg import outputs
from vocseg.config import check_constants, check_run_controls
from vocseg.data.sample_check import check_loaders
from vocseg.data.voc import read_mask, save_palette_png
from vocseg.dataflow import get_dataloaders, get_val_loader
from vocseg.datasets import VOCSegmentation, read_split
from vocseg.engine import checkpoints
from vocseg.errors import UserError, one_line
from vocseg.models import deeplabv3
from vocseg.runtime import signals
from vocseg.settings import SETTINGS


@pytest.fixture
def data(synthetic_voc, tmp_path):
    """A private copy of the synthetic data that a test may break."""
    return Path(shutil.copytree(synthetic_voc, tmp_path / "data"))


def voc_dir(root):
    return Path(root) / "VOCdevkit" / "VOC2012"


def snapshot(folder):
    """Every file under ``folder`` -> its content hash: what "nothing already written changed" compares."""
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def single_line(excinfo) -> str:
    text = str(excinfo.value)
    assert text and "\n" not in text, text
    return text


# ---------------------------------------------------------------- run-control keys, one table (config.py)

BAD_VALUES = [
    ("val_interval", 0),
    ("save_every_iters", 0),
    ("accumulation_steps", 0),
    ("batch_size", "8"),
    ("batch_size", 0),
    ("seed", "abc"),
    ("seed", -1),
    ("es_patience", "five"),
    ("es_patience", 0),
    ("num_epochs", 0),
    ("num_epochs", 2.5),
    ("log_every_iters", 0),
    ("amp", "yes"),
    ("amp", True),
    ("sync_bn", "no"),
    ("sync_bn", 1),
    ("num_workers", -1),
    ("crop_size", "480"),
    ("num_classes", 1),
    ("dist_timeout", 0),
    ("dist_timeout", "2 min"),
    ("tta_flip", "yes"),
    ("tta_scales", ()),
    ("tta_scales", (1.0, -0.5)),
    ("save_predictions", None),
    ("val_interval", True),
    ("channels_last", "yes"),
    ("cudnn_benchmark", 1),
    ("compile_model", "max-autotune"),
]


@pytest.mark.parametrize("key,value", BAD_VALUES, ids=[f"{k}={v!r}" for k, v in BAD_VALUES])
def test_run_control_values_are_refused_naming_key_and_allowed_values(key, value):
    with pytest.raises(UserError) as excinfo:
        check_run_controls({"seed": 1, key: value}, "configs/x.py")
    text = single_line(excinfo)
    assert f"{key} = {value!r}" in text and "configs/x.py" in text
    assert f"set {key} to {SETTINGS[key].accepts}" in text


def test_every_config_in_the_repo_passes_the_constant_checks():
    configs = sorted(REPO.glob("configs/*/*.py")) + sorted(REPO.glob("tests/configs/*.py"))
    assert len(configs) >= 7
    for path in configs:
        check_constants(path)
    check_run_controls({"es_patience": None, "dist_timeout": 30.5, "amp": "bf16", "tta_scales": (0.75, 1)}, "x")


def test_mutations_are_checked_before_the_config_runs():
    with pytest.raises(UserError, match=r"val_interval = 0 .*set val_interval to an integer >= 1"):
        check_constants(REPO / TINY, {"val_interval": 0})


# -------------------------------------------------------- split files and samples (datasets.py, sample_check.py)


@pytest.mark.parametrize("split", ["train", "val"])
def test_split_listing_an_id_twice_is_refused(data, split):
    split_file = voc_dir(data) / "ImageSets/Segmentation" / f"{split}.txt"
    repeated = read_split(split_file)[3]
    split_file.write_text(split_file.read_text() + f"{repeated}\n")
    with pytest.raises(UserError) as excinfo:
        VOCSegmentation(data, split)
    text = single_line(excinfo)
    assert str(split_file) in text and repeated in text and "more than once" in text


def _first(data, split="val"):
    image_id = read_split(voc_dir(data) / "ImageSets/Segmentation" / f"{split}.txt")[2]
    return voc_dir(data) / "JPEGImages" / f"{image_id}.jpg", voc_dir(data) / "SegmentationClass" / f"{image_id}.png"


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _mask_with(path, fn):
    save_palette_png(path, fn(read_mask(path)))


def _sbd_mat(data):
    """An SBD-only training sample's .mat (its id is in SBD's lists but has no VOC mask)."""
    voc_ids = set(read_split(voc_dir(data) / "ImageSets/Segmentation/train.txt"))
    voc_ids |= set(read_split(voc_dir(data) / "ImageSets/Segmentation/val.txt"))
    image_id = next(i for i in read_split(data / "SBD/train.txt") if i not in voc_ids)
    return data / "SBD/cls" / f"{image_id}.mat"


BAD_SAMPLES = {
    "truncated jpeg": lambda data: (_truncate(_first(data)[0]), _first(data)[0])[1],
    "zero-byte jpeg": lambda data: (_first(data)[0].write_bytes(b""), _first(data)[0])[1],
    "not a jpeg": lambda data: (_first(data)[0].write_text("hello"), _first(data)[0])[1],
    "truncated png": lambda data: (_truncate(_first(data)[1]), _first(data)[1])[1],
    "zero-byte png": lambda data: (_first(data)[1].write_bytes(b""), _first(data)[1])[1],
    "mask of another size": lambda data: (
        save_palette_png(_first(data)[1], np.zeros((64, 80), np.uint8)),
        _first(data)[1],
    )[1],
    "mask value 42": lambda data: (
        _mask_with(_first(data)[1], lambda m: np.where(m == 0, 42, m).astype(np.uint8)),
        _first(data)[1],
    )[1],
    "rgb mask": lambda data: (Image.fromarray(np.zeros((96, 96, 3), np.uint8)).save(_first(data)[1]), _first(data)[1])[
        1
    ],
    "16-bit mask": lambda data: (
        Image.fromarray(np.full((96, 96), 300, np.uint16)).save(_first(data)[1]),
        _first(data)[1],
    )[1],
    "sbd mat without GTcls": lambda data: (scipy.io.savemat(_sbd_mat(data), {"other": np.zeros(3)}), _sbd_mat(data))[1],
    "sbd mask value 30": lambda data: (
        scipy.io.savemat(_sbd_mat(data), {"GTcls": {"Segmentation": np.full((96, 96), 30, np.uint8)}}),
        _sbd_mat(data),
    )[1],
}


@pytest.mark.parametrize("kind", sorted(BAD_SAMPLES))
def test_every_listed_sample_is_checked_before_training(data, kind, monkeypatch, tmp_path):
    monkeypatch.setenv("VOCSEG_CACHE_DIR", str(tmp_path / "cache"))
    bad = BAD_SAMPLES[kind](data)
    before = snapshot(data)
    sbd = data / "SBD" if "sbd" in kind else None
    with pytest.raises(UserError) as excinfo:  # validation loaders read image sizes as they are built
        train, val, train_eval = get_dataloaders(data, sbd, batch_size=4, num_workers=0, crop_size=64)
        check_loaders({"train": train, "val": val, "train_eval": train_eval})
    text = single_line(excinfo)
    assert str(bad) in text
    assert any(fix in text for fix in ("replace", "fix or drop", "must match", "must be", "needs GTcls", "raise"))
    assert snapshot(data) == before
    assert not list((tmp_path / "cache").rglob("*.*")) and not list(tmp_path.glob("cache/sample-checks/*"))


def test_a_passed_check_is_cached_until_a_file_changes(data, monkeypatch, tmp_path):
    monkeypatch.setenv("VOCSEG_CACHE_DIR", str(tmp_path / "cache"))
    loaders = dict(
        zip(
            ("train", "val", "train_eval"),
            get_dataloaders(data, data / "SBD", batch_size=4, num_workers=0, crop_size=64),
        )
    )
    assert check_loaders(loaders).startswith("checked ")
    assert "unchanged since their last check" in check_loaders(loaders)
    image, mask = _first(data)
    _mask_with(mask, lambda m: np.where(m == 0, 42, m).astype(np.uint8))  # new size or mtime: checked again
    with pytest.raises(UserError, match=str(mask)):
        check_loaders(loaders)
    evaluation = {"data_loader": get_val_loader(data, batch_size=4, num_workers=0, limit_num_samples=2)}
    assert check_loaders(evaluation).startswith("checked 2 samples")


def test_error_from_a_dataloader_worker_is_one_line(data):
    ds = VOCSegmentation(data, "val")
    _truncate(ds.image_paths[0])
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1)
    with pytest.raises(UserError) as excinfo:
        next(iter(loader))
    text = single_line(excinfo)
    assert text.startswith(f"cannot read image {ds.image_paths[0]}") and one_line(excinfo.value) == text


# ---------------------------------------------------------------- files and variables


def _unwritable_folder(tmp_path) -> Path:
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):  # root writes anywhere it may chmod; sysfs refuses even root
        return Path("/sys/vocseg-output")
    return folder


@pytest.mark.parametrize("variable", ["OUTPUT_PATH", "CLEARML_OUTPUT_PATH"])
@pytest.mark.parametrize("kind", ["a file", "unwritable"])
def test_output_folder_that_cannot_be_written(variable, kind, monkeypatch, tmp_path):
    target = tmp_path / "a-file" if kind == "a file" else _unwritable_folder(tmp_path)
    if kind == "a file":
        target.write_text("keep me")
    monkeypatch.delenv("CLEARML_OUTPUT_PATH", raising=False)
    monkeypatch.setenv(variable, str(target))
    with pytest.raises(UserError) as excinfo:
        outputs.check_output_base()
    text = single_line(excinfo)
    assert f"{variable}={target}" in text and f"set {variable} to a writable folder" in text
    if kind == "a file":
        assert target.read_text() == "keep me"


def test_output_folder_check_creates_nothing(monkeypatch, tmp_path):
    monkeypatch.delenv("CLEARML_OUTPUT_PATH", raising=False)
    monkeypatch.setenv("OUTPUT_PATH", str(tmp_path / "new" / "out"))
    assert outputs.check_output_base() == tmp_path / "new" / "out"
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv("OUTPUT_PATH", str(tmp_path / "a-file" / "out"))
    (tmp_path / "a-file").write_text("keep me")
    with pytest.raises(UserError, match="set OUTPUT_PATH to a writable folder"):
        outputs.check_output_base()


def test_resume_from_a_folder_names_a_file_to_set(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "training_checkpoint_6.pt").write_bytes(b"x")
    with pytest.raises(UserError) as excinfo:
        checkpoints.load_file(tmp_path, "checkpoint", "RESUME_FROM")
    text = single_line(excinfo)
    assert f"RESUME_FROM={tmp_path} is a folder" in text
    assert f"RESUME_FROM={tmp_path / 'checkpoints' / 'training_checkpoint_6.pt'}" in text


def test_pretrained_backbone_that_is_not_a_checkpoint(monkeypatch, tmp_path):
    path = tmp_path / "backbone.pth"
    path.write_text("<html>404 not found</html>")
    monkeypatch.setenv("PRETRAINED_BACKBONE", str(path))
    with pytest.raises(UserError) as excinfo:
        deeplabv3("mobilenet_v3_large", aux_loss=False, pretrained_backbone=True)
    text = single_line(excinfo)
    assert str(path) in text and "not a readable PyTorch checkpoint" in text and "PRETRAINED_BACKBONE" in text


# ---------------------------------------------------------------- checkpoint writes and signals


class SignalDuringPickling:
    """Pickled inside torch.save: records the checkpoint folder at that moment and, optionally, sends a signal."""

    seen = []

    def __init__(self, folder, signum=None):
        self.folder, self.signum = folder, signum

    def __reduce__(self):
        SignalDuringPickling.seen.append(
            sorted(p.name for p in Path(self.folder).iterdir() if p.name.startswith("training_"))
        )
        if self.signum:
            os.kill(os.getpid(), self.signum)
        return (dict, ())


class Holder:
    def __init__(self, value):
        self.value = value

    def state_dict(self):
        return {"payload": self.value}

    def load_state_dict(self, state):
        pass


def test_two_complete_checkpoints_exist_during_every_write(tmp_path):
    engine = Engine(lambda e, b: None)
    checkpointer = checkpoints.training_checkpointer({"x": Holder(SignalDuringPickling(tmp_path))}, tmp_path)
    SignalDuringPickling.seen.clear()
    for iteration in (2, 4, 6, 8, 8):  # the last iteration is saved twice (every N and at COMPLETED)
        engine.state.iteration = iteration
        checkpointer(engine)
    assert SignalDuringPickling.seen[2:] == [
        ["training_x_2.pt", "training_x_4.pt"],
        ["training_x_4.pt", "training_x_6.pt"],
        ["training_x_6.pt", "training_x_8.pt"],
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["training_x_6.pt", "training_x_8.pt"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_a_checkpoint_write_takes_effect_after_it(tmp_path, signum):
    engine = Engine(lambda e, b: None)
    holder = Holder(None)
    checkpointer = checkpoints.training_checkpointer({"x": holder}, tmp_path)
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signals.stop_on_signals(in_process_group=False)
    try:
        for iteration in (2, 4):
            engine.state.iteration = iteration
            checkpointer(engine)
        holder.value = SignalDuringPickling(tmp_path, signum)
        engine.state.iteration = 6
        with pytest.raises(signals.Interrupted) as excinfo:
            checkpointer(engine)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    assert excinfo.value.signum == signum and str(excinfo.value) == f"stopped by {signal.Signals(signum).name}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["training_x_4.pt", "training_x_6.pt"]
    assert torch.load(tmp_path / "training_x_6.pt", weights_only=False) == {"payload": {}}  # complete


# ================================================================ end to end (scripts as a user runs them)


def tiny_variant(tmp_path, **replace) -> str:
    """tests/configs/tiny.py with some ``name = value`` lines replaced (a user's edit)."""
    text = (REPO / TINY).read_text()
    for name, value in replace.items():
        lines = [line for line in text.splitlines() if line.startswith(f"{name} = ")]
        assert len(lines) == 1, name
        text = text.replace(lines[0], f"{name} = {value}")
    path = tmp_path / "edited_tiny.py"
    path.write_text(text)
    return str(path)


@pytest.fixture(scope="module")
def finished(synthetic_voc, tmp_path_factory):
    """A finished two-epoch tiny run: checkpoints at iterations 10 and 12 (6 per epoch)."""
    out = tmp_path_factory.mktemp("finished")
    proc = run_script("training", TINY, make_env(synthetic_voc, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return only_run_dir(out)


def assert_refused(proc, *needles, code=2):
    assert proc.returncode == code, proc.stderr[-3000:]
    line = last_line(proc)
    assert line.startswith("error: ") and all(n in line for n in needles), line
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.slow
def test_bad_run_control_fails_before_anything_is_written(synthetic_voc, tmp_path):
    proc = run_script("training", tiny_variant(tmp_path, val_interval="0"), make_env(synthetic_voc, tmp_path / "out"))
    assert_refused(proc, "edited_tiny.py", "val_interval = 0", "set val_interval to an integer >= 1")
    assert not list((tmp_path / "out").rglob("*"))


@pytest.mark.slow
def test_num_epochs_zero_computed_in_the_config(synthetic_voc, tmp_path, monkeypatch):
    from vocseg.engine.train import train

    for name, value in make_env(synthetic_voc, tmp_path, TINY_EPOCHS=0).items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UserError) as excinfo:  # launch() prints it as "error: ..." and exits 2
        train(REPO / TINY)
    assert "num_epochs = 0 is not allowed: set num_epochs to an integer >= 1" in single_line(excinfo)
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("metrics.json"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "case,checkpoint,knobs,needles",
    [
        ("finished", 12, {}, ["ends a finished run (iteration 12 of 12)", "unset RESUME_FROM"]),
        (
            "other batch_size",
            10,
            {"TINY_BATCH_SIZE": 3},
            ["batch_size=4 there, 3 now", "iterations_per_epoch=6 there, 8 now", "unset RESUME_FROM"],
        ),
        ("more epochs", 10, {"TINY_EPOCHS": 3}, ["num_epochs=2 there, 3 now", "restore the old settings"]),
    ],
)
def test_resume_that_would_train_wrongly_is_refused(
    case, checkpoint, knobs, needles, finished, synthetic_voc, tmp_path
):
    before = snapshot(finished)
    resume_from = finished / "checkpoints" / f"training_checkpoint_{checkpoint}.pt"
    proc = run_script("training", TINY, make_env(synthetic_voc, tmp_path, RESUME_FROM=resume_from, **knobs))
    assert_refused(proc, str(resume_from), *needles)
    assert snapshot(finished) == before
    assert not list(tmp_path.glob("tiny/*/checkpoints/*.pt"))


@pytest.mark.slow
def test_bad_val_sample_fails_before_the_first_iteration(synthetic_voc, tmp_path):
    data = Path(shutil.copytree(synthetic_voc, tmp_path / "data"))
    image, mask = _first(data)
    _mask_with(mask, lambda m: np.where(m == 0, 42, m).astype(np.uint8))
    proc = run_script("training", TINY, make_env(data, tmp_path / "out", TINY_WORKERS=2))
    assert_refused(proc, str(mask), "42")
    assert not list((tmp_path / "out").rglob("*"))


@pytest.mark.slow
def test_worker_error_during_validation_is_one_line(synthetic_voc, tmp_path):
    """A file broken after its check passed (same size and mtime, so the cache trusts it) fails in a worker. A
    mask: an image is also read for its size when the validation loader is built, before any worker starts."""
    data = Path(shutil.copytree(synthetic_voc, tmp_path / "data"))
    env = make_env(data, tmp_path / "out", TINY_EPOCHS=1, TINY_WORKERS=1)
    assert run_script("training", TINY, env).returncode == 0
    first_run = snapshot(tmp_path / "out")
    _, mask = _first(data)
    stat = mask.stat()
    mask.write_bytes(b"\0" * stat.st_size)
    os.utime(mask, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    proc = run_script("training", TINY, env)
    assert {p: h for p, h in snapshot(tmp_path / "out").items() if p in first_run} == first_run
    assert_refused(proc, f"cannot read mask {mask}", "replace it")
    # No worker traceback, no copies from Ignite's engines: the message appears once, as the last line.
    assert "DataLoader worker" not in proc.stderr and proc.stderr.count(f"cannot read mask {mask}") == 1, proc.stderr
    runs = sorted((tmp_path / "out" / "tiny").iterdir())
    assert "unchanged since their last check" in (runs[-1] / "training.log").read_text()


@pytest.mark.slow
def test_unwritable_output_path_end_to_end(synthetic_voc, tmp_path):
    target = tmp_path / "a-file"
    target.write_text("keep me")
    proc = run_script("training", TINY, make_env(synthetic_voc, target))
    assert_refused(proc, f"OUTPUT_PATH={target}", "set OUTPUT_PATH to a writable folder")
    assert target.read_text() == "keep me"


@pytest.mark.slow
def test_evaluation_without_weights_path_says_what_to_set(synthetic_voc, tmp_path):
    proc = run_script("evaluation", "tests/configs/tiny_eval.py", make_env(synthetic_voc, tmp_path))
    assert_refused(proc, "WEIGHTS_PATH is not set", "set WEIGHTS_PATH=")
    assert "invalid keys" not in proc.stderr


@pytest.mark.slow
def test_torchrun_report_ends_with_the_projects_line(synthetic_voc, tmp_path):
    from test_distributed import TRAINING, torchrun

    data = Path(shutil.copytree(synthetic_voc, tmp_path / "data"))
    _, mask = _first(data, "train")
    _mask_with(mask, lambda m: np.where(m == 0, 42, m).astype(np.uint8))
    proc = subprocess.run(
        torchrun("--nproc_per_node=2", *TRAINING),
        cwd=REPO,
        env=make_env(data, tmp_path / "out"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    lines = [line.strip() for line in proc.stderr.strip().splitlines() if line.strip("= ")]
    # torchrun's report closes with the root cause's "traceback" entry, read from the rank's error file.
    assert lines[-1].startswith("traceback : error: ") and str(mask) in lines[-1], proc.stderr[-3000:]
    assert not list((tmp_path / "out").rglob("*"))


def _workers(proc):
    for _ in range(50):  # a child may end while psutil walks the tree (a short-lived helper process)
        try:
            return [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            time.sleep(0.1)
    return []


def _alive(pid) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_the_run_with_the_checkpoint_to_resume_from(signum, synthetic_voc, tmp_path):
    env = make_env(synthetic_voc, tmp_path, TINY_EPOCHS=50, TINY_SAVE_EVERY=2, TINY_WORKERS=2)
    cmd = [sys.executable, "-m", "py_config_runner", "code/scripts/training.py", TINY]
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:  # a file, not a pipe: nothing blocks the run's logging while the test waits
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if len(list(tmp_path.glob("tiny/*/checkpoints/training_checkpoint_*.pt"))) >= 2:
            break
        time.sleep(0.05)
    workers = _workers(proc)
    assert proc.poll() is None and workers, "the run ended before it could be stopped"
    proc.send_signal(signum)
    proc.wait(timeout=60)
    stderr = log.read_text()
    assert proc.returncode == 128 + signum, stderr[-3000:]
    line = stderr.strip().splitlines()[-1]
    name = signal.Signals(signum).name
    assert line.startswith(f"error: stopped by {name} at iteration ") and "RESUME_FROM=" in line, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    resume_from = Path(line.split("RESUME_FROM=")[1])
    assert resume_from.is_file() and torch.load(resume_from, weights_only=True)["trainer"]["iteration"] > 0
    assert not [pid for pid in workers if _alive(pid)]  # the DataLoader workers went with it
    assert len(list(resume_from.parent.glob("training_checkpoint_*.pt"))) == 2
