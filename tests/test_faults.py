"""Faults of the machine and slips of the user, each ended with one line and a non-zero exit instead of a
traceback: a full disk, a killed DataLoader worker, one image per process, a key given twice in
CONFIG_OVERRIDES, and two evaluations in one folder.

The full disk is real where the tests may mount a tmpfs (root): a small file system that a run fills, or one
filled beforehand; elsewhere those tests are skipped and the write errors are injected instead."""

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from test_distributed import TRAINING as TORCHRUN_TRAINING
from test_distributed import finish, free_port, start, torchrun, workers
from test_training import REPO, TINY, make_env
from vocseg.config import ConfigSource, with_overrides
from vocseg.dataflow import check_images_per_process
from vocseg.errors import UserError
from vocseg.runtime import faults

TRAIN = [sys.executable, "-m", "py_config_runner", "code/scripts/training.py", TINY]
EVALUATE = [sys.executable, "-m", "py_config_runner", "code/scripts/evaluation.py", "tests/configs/tiny_eval.py"]
MB = 2**20


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


# ---------------------------------------------------------------------------------------------------------
# A full disk.


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size) -> a folder on a tmpfs of that many MB (remount(size) resizes it); skipped without the right."""
    mounted = []

    def mount(size_mb: int, folder=None) -> Path:
        folder = folder or tmp_path / f"disk-{len(mounted)}"
        folder.mkdir(exist_ok=True)
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(folder)], capture_output=True
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()[:100]}): a full disk needs root")
        mounted.append(folder)
        return folder

    def remount(folder, size_mb: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size_mb}m", str(folder)], check=True)

    mount.remount = remount
    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture
def full_disk(tmpfs):
    """A folder on a file system with no byte left (a filler file took them)."""
    folder = tmpfs(4)
    with open(folder / "filler", "wb", buffering=0) as f, pytest.raises(OSError):
        while True:
            f.write(b"\0" * MB)
    (folder / "run").mkdir()  # a directory entry costs no data block on tmpfs
    return folder / "run"


@pytest.mark.slow
def test_a_disk_that_fills_during_a_run_stops_it_in_one_line_and_the_same_command_continues(
    synthetic_voc, tmp_path, tmpfs
):
    # 150 MB: the first checkpoint (about 85 MB) fits, the second (the first kept while it is written) does not;
    # torch.save says so as "RuntimeError: [enforce fail at inline_container.cc] ... unexpected pos".
    disk = tmpfs(150)
    env = make_env(synthetic_voc, disk, RUN_NAME="full", TINY_EPOCHS=1)
    run_dir = disk / "tiny" / "full"
    first = subprocess.run(TRAIN, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    line = last_line(first.stderr)
    assert first.returncode == 2, first.stderr[-3000:]
    assert "Traceback" not in first.stderr, first.stderr[-3000:]
    kept = run_dir / "checkpoints" / "training_checkpoint_2.pt"
    assert line.startswith(f"error: run folder {run_dir}: the disk is full ("), line
    assert "the next checkpoint needs about 84 MB" in line, line
    assert f"run the same command with RUN_NAME=full: it continues from {kept}" in line, line
    # Nothing written is lost, and no partial file holds the space.
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [kept.name]
    assert torch.load(kept, map_location="cpu", weights_only=True)["trainer"]["iteration"] == 2

    tmpfs.remount(disk, 400)  # space freed
    again = subprocess.run(TRAIN, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {kept} at iteration 2" in again.stderr


def test_metrics_tensorboard_and_summary_on_a_full_disk_end_in_one_line(full_disk, capfd):
    from torch.utils.tensorboard import SummaryWriter

    from vocseg import outputs
    from vocseg.engine.train import _write_summary

    told = dict(checkpoint=lambda: full_disk / "checkpoints" / "training_checkpoint_4.pt", needed=lambda: 90 * MB)
    with pytest.raises(UserError) as metrics:
        with faults.told_in_one_line(full_disk, **told):
            outputs.write_json(full_disk / "metrics.json", {"iteration": 4, "padding": "x" * 10_000})
    with pytest.raises(UserError) as events:
        with faults.told_in_one_line(full_disk, **told):
            writer = SummaryWriter(full_disk / "tb")
            for step in range(2000):  # TensorBoard's own thread writes; its error reaches the next call here
                writer.add_scalar("train/batch_loss", 1.0, step)
            writer.flush()
    with pytest.raises(UserError) as summary:
        _write_summary(full_disk)
    for error in (metrics, events):
        text = str(error.value)
        assert text.startswith(f"run folder {full_disk}: the disk is full (0 KB free; the next checkpoint needs "), text
        assert "about 90 MB): free space, then run the same command with RUN_NAME=run: it continues from " in text
        assert text.endswith("training_checkpoint_4.pt")
    assert str(summary.value).startswith(f"run folder {full_disk}: the disk is full (0 KB free) for summary.png")
    assert f"python -m vocseg.run_summary {full_disk} draws it" in str(summary.value)
    assert "Traceback" not in capfd.readouterr().err  # TensorBoard's thread keeps quiet: the line says it


def test_the_log_file_on_a_full_disk_warns_once_without_a_traceback(tmpfs, capfd):
    from vocseg.runtime.logs import setup_logging

    folder = tmpfs(1)
    (folder / "training.log").touch()  # the run opened it while there was space
    logger = setup_logging(folder)
    with open(folder / "filler", "wb", buffering=0) as f, pytest.raises(OSError):
        while True:
            f.write(b"\0" * 4096)
    for i in range(200):
        logger.info("line %d %s", i, "x" * 100)
    err = capfd.readouterr().err
    assert "line 199 " in err  # the console keeps every line
    assert (
        err.count(f"vocseg: warning: {folder / 'training.log'}: the disk is full; log lines go to the console only")
        == 1
    )
    assert "Logging error" not in err and "Traceback" not in err


def test_evaluation_outputs_on_a_full_disk_end_in_one_line(full_disk):
    from vocseg.data.voc import save_palette_png

    with pytest.raises(UserError) as error:
        with faults.evaluation_in_one_line(full_disk):
            for i in range(50):
                save_palette_png(full_disk / f"{i}.png", torch.randint(0, 21, (300, 300), dtype=torch.uint8).numpy())
    assert str(error.value) == (
        f"evaluation folder {full_disk}: the disk is full (0 KB free): free space, then run the same command again"
    )


def test_full_disk_errors_are_recognised_without_one(monkeypatch, tmp_path):
    # Where no tmpfs can be mounted: the errors a full disk raises, injected.
    no_space = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "metrics.json"))
    short_write = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 66070464 vs 66070352")
    assert faults.disk_full(no_space, tmp_path, needed=1)
    assert faults.disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"), tmp_path, needed=1)
    monkeypatch.setattr(faults.shutil, "disk_usage", lambda _path: shutil._ntuple_diskusage(100 * MB, 95 * MB, 5 * MB))
    assert faults.disk_full(short_write, tmp_path, needed=85 * MB)  # 5 MB free: the checkpoint cannot fit
    assert not faults.disk_full(short_write, tmp_path, needed=4 * MB)  # room enough: another fault, a traceback
    assert not faults.disk_full(OSError(errno.EIO, "I/O error"), tmp_path, needed=1)
    chained = RuntimeError("writing failed")
    chained.__cause__ = no_space
    assert faults.disk_full(chained, tmp_path, needed=1)

    calls = []

    def failing_write():
        with faults.told_in_one_line(tmp_path, checkpoint=lambda: calls.append(1), needed=lambda: 3 * MB):
            raise no_space

    with pytest.raises(UserError, match=r"the disk is full \(5 MB free; the next checkpoint needs about 3 MB\)"):
        failing_write()
    with pytest.raises(ValueError):  # anything else passes through unchanged
        with faults.told_in_one_line(tmp_path, checkpoint=lambda: None, needed=lambda: 1):
            raise ValueError("a bug")


# ---------------------------------------------------------------------------------------------------------
# A DataLoader worker killed.


def data_workers(pid):
    """The DataLoader worker processes of training process ``pid``."""
    return psutil.Process(pid).children()  # the loaders' workers are its only children


@pytest.mark.slow
def test_a_killed_loader_worker_stops_the_run_in_one_line(synthetic_voc, tmp_path):
    env = make_env(synthetic_voc, tmp_path / "out", RUN_NAME="oom", TINY_WORKERS=2, TINY_EPOCHS=3)
    proc = subprocess.Popen(TRAIN, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if " iteration 4 loss " in line:  # after the checkpoint of iteration 4
            os.kill(data_workers(proc.pid)[0].pid, signal.SIGKILL)  # as the OOM killer does
            break
    started = time.time()
    lines += proc.stderr.readlines()
    assert proc.wait(timeout=60) == 2, "".join(lines[-120:])
    assert time.time() - started < 30
    text = "".join(lines)
    checkpoint = tmp_path / "out" / "tiny" / "oom" / "checkpoints" / "training_checkpoint_4.pt"
    assert "Traceback" not in text, text[-3000:]
    assert last_line(text) == (
        "error: a DataLoader worker was killed (signal: Killed), most likely for memory (the kernel's out-of-memory "
        "killer): lower num_workers (now 2) or batch_size (now 4); then run the same command with RUN_NAME=oom: it "
        f"continues from {checkpoint}"
    )


@pytest.mark.slow
def test_a_killed_loader_worker_of_one_rank_ends_every_rank(synthetic_voc, tmp_path):
    env = make_env(synthetic_voc, tmp_path / "out", RUN_NAME="oom2", TINY_WORKERS=4, TINY_EPOCHS=3)
    (launcher,) = start([torchrun("--nproc_per_node=2", f"--master_port={free_port()}", *TORCHRUN_TRAINING)], env)
    deadline = time.time() + 180
    while time.time() < deadline and launcher.poll() is None:
        if list((tmp_path / "out").glob("tiny/oom2/checkpoints/training_checkpoint_2.pt")):
            break
        time.sleep(0.05)
    ranks = workers([launcher])
    assert set(ranks) == {0, 1}, finish([launcher], 1)[1][-3000:]
    os.kill(data_workers(ranks[1].pid)[0].pid, signal.SIGKILL)
    codes, text = finish([launcher], timeout=90)  # a hang is killed there and reads "hung"
    assert codes != ["hung"] and codes != [0], text[-3000:]
    assert "error: a DataLoader worker was killed (signal: Killed), most likely for memory" in text, text[-3000:]
    assert "lower num_workers (now 4) or batch_size (now 4); then run the same command with RUN_NAME=oom2" in text


# ---------------------------------------------------------------------------------------------------------
# One image per process.


@pytest.mark.parametrize(
    "per_process, world_size, sync_bn, refused",
    [
        (2, 1, False, False),
        (1, 1, False, "batch_size=1 over 1 process is 1 image per process"),
        (1, 2, False, "batch_size=2 over 2 processes is 1 image per process"),
        (1, 2, True, False),  # SyncBatchNorm sees both images
        (1, 1, True, "batch_size=1 over 1 process is 1 image per process"),  # nothing to sync with
        (None, 1, False, False),  # a loader of its own batches
    ],
)
def test_one_image_per_process_is_refused_unless_batchnorm_sees_more(per_process, world_size, sync_bn, refused):
    if not refused:
        check_images_per_process(per_process, world_size, sync_bn, "config c.py")
        return
    with pytest.raises(UserError) as error:
        check_images_per_process(per_process, world_size, sync_bn, "config c.py")
    text = str(error.value)
    assert text.startswith(f"config c.py: {refused}, and BatchNorm cannot train on one image: "), text
    assert f"set batch_size to {2 * world_size} or more (2+ images per process" in text
    assert ("sync_bn=True" in text) == (world_size > 1)


@pytest.mark.slow
def test_one_image_per_process_stops_before_training(synthetic_voc, tmp_path):
    env = make_env(synthetic_voc, tmp_path / "out", TINY_BATCH_SIZE=1, TINY_ACCUMULATION=2, TINY_SAVE_EVERY=4)
    done = subprocess.run(TRAIN, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert last_line(done.stderr) == (
        f"error: config {TINY}: batch_size=1 over 1 process is 1 image per process, and BatchNorm cannot train on "
        "one image: set batch_size to 2 or more (2+ images per process, with accumulation_steps for the total you "
        "want)"
    )
    assert "first iteration" not in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
def test_one_image_per_process_on_two_processes_stops_every_rank(synthetic_voc, tmp_path):
    env = make_env(synthetic_voc, tmp_path / "out", TINY_BATCH_SIZE=2)
    codes, text = finish(
        start([torchrun("--nproc_per_node=2", f"--master_port={free_port()}", *TORCHRUN_TRAINING)], env), 180
    )
    assert codes not in (["hung"], [0]), text[-3000:]
    assert text.count("batch_size=2 over 2 processes is 1 image per process") >= 2, text[-3000:]  # each rank
    assert "first iteration" not in text


# ---------------------------------------------------------------------------------------------------------
# A key given twice; two evaluations in one folder.


def test_a_key_given_twice_in_the_overrides_is_refused(monkeypatch):
    monkeypatch.setenv("CONFIG_OVERRIDES", "batch_size=8 num_epochs=2 batch_size=4")
    with pytest.raises(UserError) as error:
        with_overrides(ConfigSource(REPO / TINY, None, {}))
    assert (
        str(error.value) == "CONFIG_OVERRIDES: batch_size is given twice ('batch_size=8' and 'batch_size=4'): keep one"
    )


@pytest.mark.slow
def test_two_evaluations_under_one_run_name_never_share_their_folder(synthetic_voc, tmp_path):
    from vocseg.models import deeplabv3

    weights = tmp_path / "weights.pt"
    torch.save(deeplabv3("mobilenet_v3_large", aux_loss=False, pretrained_backbone=False).state_dict(), weights)
    env = make_env(synthetic_voc, tmp_path / "out", RUN_NAME="same", WEIGHTS_PATH=weights)
    folder = tmp_path / "out" / "tiny_eval" / "eval-same"
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(EVALUATE, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while not (folder / "training.log").exists() and first.poll() is None:
            assert time.time() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.02)
        os.kill(first.pid, signal.SIGSTOP)  # the first holds still, alive, in its folder
        second = subprocess.run(EVALUATE, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr[-3000:]
        assert last_line(second.stderr).startswith(f"error: run folder {folder} is in use by a live run (host "), (
            second.stderr[-3000:]
        )
        assert f"pid {first.pid} started" in second.stderr
    finally:
        first.kill()
        first.wait()
