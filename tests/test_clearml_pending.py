"""What an online run could not deliver to its ClearML task, kept in its run folder (vocseg.clearml.pending) and
sent later by clearml_sync.py or a rerun: the file, the journal and the delivery, without a server (a stand-in
task records what would be sent). The online side is tests/server/test_server_outage.py."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from vocseg.clearml import pending
from vocseg.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SYNC = "code/scripts/clearml_sync.py"


class FakeLogger:
    def __init__(self, calls):
        self.calls = calls

    def report_scalar(self, title, series, value, iteration):
        self.calls.append(("scalar", title, series, iteration, value))

    def report_image(self, title, series, iteration, local_path):
        self.calls.append(("image", title, series, iteration, Path(local_path).name))

    def report_confusion_matrix(self, title, series, matrix, iteration, **kwargs):
        self.calls.append(("matrix", iteration))


class FakeTask:
    """What delivery asks of a clearml Task, recorded; ``fail_on`` names a step that raises."""

    def __init__(self, task_id="t" * 32, status="in_progress", fail_on=None):
        self.id, self.status, self.fail_on, self.calls = task_id, status, fail_on, []

    def is_offline(self):
        return False

    def get_logger(self):
        return FakeLogger(self.calls)

    def flush(self, wait_for_uploads=False):
        if self.fail_on == "flush":
            raise ConnectionError("server went away")
        self.calls.append(("flush", wait_for_uploads))

    def upload_artifact(self, name, artifact_object, metadata, wait_on_upload):
        self.calls.append(("artifact", name, Path(artifact_object).name, metadata["iteration"]))
        return True

    def reload(self):
        pass

    def get_status(self):
        return self.status

    def set_progress(self, value):
        pass

    def mark_completed(self, ignore_errors, force, status_message):
        self.status = "completed"
        self.calls.append(("status", "completed"))

    def stopped(self, ignore_errors, force, status_message):
        self.status = "stopped"
        self.calls.append(("status", "stopped"))

    def mark_failed(self, ignore_errors, force, status_reason, status_message):
        self.status = "failed"
        self.calls.append(("status", "failed", status_message))


@pytest.fixture
def registered(monkeypatch):
    """Best models 'registered' by delivery (the real one creates a clearml OutputModel)."""
    done = []

    def register(task, path, best):
        if task.fail_on == "model":
            raise ConnectionError("fileserver went away")
        task.calls.append(("model", path.name, best["iteration"]))
        done.append(path.name)

    monkeypatch.setattr(pending, "_register_model", register)
    return done


def run_folder(tmp_path) -> Path:
    folder = tmp_path / "run"
    (folder / "best").mkdir(parents=True)
    (folder / "checkpoints").mkdir()
    (folder / "best" / "best_model_2_val_mIoU=0.5.pt").write_bytes(b"w")
    (folder / "checkpoints" / "training_checkpoint_3.pt").write_bytes(b"c")
    (folder / "summary.png").write_bytes(b"png")
    (folder / "metrics.json").write_text("{}")
    return folder


def record(**extra):
    return {
        "task_id": "t" * 32,
        "server": "http://127.0.0.1:1",
        "scalars": [["val", "mIoU", 2, 0.5], ["train", "batch_loss", 4, float("nan")]],
        "images": [{"title": "summary", "series": "summary.png", "iteration": 2, "file": "summary.png"}],
        "confusion_matrix": {"matrix": [[1.0, 0.0], [0.0, 1.0]], "labels": ["0", "1"], "iteration": 2},
        "best_model": {"file": "best/best_model_2_val_mIoU=0.5.pt", "iteration": 2, "name": "x best", "labels": {}},
        "status": "completed",
        "status_message": None,
        **extra,
    }


def test_the_journal_forgets_only_what_a_flush_started_after_it_was_marked(tmp_path):
    journal = pending.Journal()
    journal.add("train", "batch_loss", 1, 1.5)
    journal.add("lr", "0", 1, 0.1)
    mark = journal.mark()
    journal.add("train", "batch_loss", 2, 1.25)  # reported while the flush runs: not known to be sent
    journal.confirm(mark)
    assert journal.entries() == [["train", "batch_loss", 2, 1.25]]
    journal.confirm(mark)  # a second confirmation of the same mark drops nothing more
    assert len(journal.entries()) == 1
    journal.confirm(journal.mark())
    assert journal.entries() == []


def test_the_journal_keeps_the_last_images_only_and_forgets_them_like_scalars():
    journal = pending.Journal()
    for epoch in range(1, 8):
        journal.add("val", "mIoU", epoch, 0.5)
        journal.add_image("val", "grid", epoch, count=epoch - 1, image=f"grid {epoch}")
    kept = [(im["iteration"], im["count"], im["image"]) for im in journal.images()]
    assert kept == [(e, e - 1, f"grid {e}") for e in range(3, 8)]
    assert len(journal.entries()) == 7  # the scalars are all there
    journal.add_image("val", "grid", 8, count=7, image="grid 8")
    mark = journal.mark()
    journal.add_image("val", "grid", 9, count=8, image="grid 9")
    journal.confirm(mark)
    assert [im["iteration"] for im in journal.images()] == [9] and journal.entries() == []


def test_a_journaled_logger_reports_through_and_journals(tmp_path):
    calls, journal = [], pending.Journal()
    logger = pending.JournaledLogger(FakeLogger(calls), journal)
    logger.report_scalar(title="val", series="mIoU", value=0.5, iteration=2)
    logger.report_image("a", "b", iteration=1, local_path="x.png")  # anything else passes through
    assert calls == [("scalar", "val", "mIoU", 2, 0.5), ("image", "a", "b", 1, "x.png")]
    assert journal.entries() == [["val", "mIoU", 2, 0.5]]


def test_the_pending_file_is_written_whole_and_merged_with_an_earlier_one_of_the_same_task(tmp_path):
    folder = run_folder(tmp_path)
    path = pending.keep(folder, record(scalars=[["val", "mIoU", 1, 0.25], ["val", "mIoU", 2, 0.4]]))
    assert path == folder / pending.PENDING_FILE
    assert not list(folder.glob(".*.tmp"))  # written through a temporary file, replaced at once
    pending.keep(folder, record(scalars=[["val", "mIoU", 2, 0.5], ["val", "mIoU", 3, 0.6]], status="stopped"))
    kept = pending.read(folder)
    assert sorted(tuple(s) for s in kept["scalars"]) == [
        ("val", "mIoU", 1, 0.25),
        ("val", "mIoU", 2, 0.5),
        ("val", "mIoU", 3, 0.6),
    ]
    assert kept["status"] == "stopped" and len(kept["images"]) == 1
    # Another task's record replaces it (the folder's task changed: the old one is no longer reachable).
    pending.keep(folder, record(task_id="u" * 32, scalars=[]))
    assert pending.read(folder)["task_id"] == "u" * 32 and pending.read(folder)["scalars"] == []


def test_an_unreadable_pending_file_is_one_line_naming_it(tmp_path):
    folder = run_folder(tmp_path)
    (folder / pending.PENDING_FILE).write_text('{"task_id": "t", "scal')
    with pytest.raises(UserError, match=f"{pending.PENDING_FILE} cannot be read .*delete it") as err:
        pending.read(folder)
    assert "\n" not in str(err.value)
    assert pending.read(tmp_path) is None  # no file: nothing pending


def test_delivery_sends_everything_once_then_there_is_nothing_left(tmp_path, registered):
    folder = run_folder(tmp_path)
    pending.keep(folder, record())
    task = FakeTask()
    sent = pending.deliver(folder, task=task)
    assert pending.describe(sent) == (
        "2 scalars, 1 image, the confusion matrix, best model best_model_2_val_mIoU=0.5.pt, status completed"
    )
    kinds = [c[0] for c in task.calls]
    # The reports reach the server (flush) before the model and the status; the status comes last.
    assert kinds == ["scalar", "scalar", "image", "matrix", "flush", "model", "status"]
    assert ("flush", True) in task.calls and task.status == "completed"
    assert not (folder / pending.PENDING_FILE).exists()
    assert pending.deliver(folder, task=task) is None  # a second sync sends nothing
    assert len(task.calls) == 7


def test_a_delivery_cut_short_keeps_exactly_what_was_not_sent(tmp_path, registered):
    folder = run_folder(tmp_path)
    pending.keep(folder, record())
    with pytest.raises(ConnectionError):
        pending.deliver(folder, task=FakeTask(fail_on="model"))
    kept = pending.read(folder)
    assert "scalars" not in kept and "images" not in kept and "confusion_matrix" not in kept
    assert kept["best_model"]["iteration"] == 2 and kept["status"] == "completed"
    task = FakeTask()
    pending.deliver(folder, task=task)
    assert [c[0] for c in task.calls] == ["model", "status"] and registered == ["best_model_2_val_mIoU=0.5.pt"]


def test_a_rerun_that_continues_the_task_leaves_the_status_and_the_checkpoint_to_its_own_end(tmp_path, registered):
    folder = run_folder(tmp_path)
    stopped = record(status="stopped", checkpoint={"file": "checkpoints/training_checkpoint_3.pt", "iteration": 3})
    pending.keep(folder, stopped)
    task = FakeTask()
    sent = pending.deliver(folder, task=task, set_status=False)
    assert "status" not in sent and "checkpoint" not in sent
    assert not any(c[0] in ("status", "artifact") for c in task.calls) and task.status == "in_progress"
    assert not (folder / pending.PENDING_FILE).exists()
    # A sync (no run continues the task) uploads the checkpoint and sets the status the run ended with.
    pending.keep(folder, stopped)
    task = FakeTask()
    pending.deliver(folder, task=task)
    assert ("artifact", "training_checkpoint", "training_checkpoint_3.pt", 3) in task.calls
    assert task.status == "stopped"


def test_at_a_reruns_start_a_failed_delivery_is_one_line_and_the_run_goes_on(tmp_path, registered):
    folder = run_folder(tmp_path)
    pending.keep(folder, record())
    said = []
    pending.deliver_on_start(folder, FakeTask(fail_on="flush"), said.append)
    (line,) = said
    assert "not sent to ClearML task" in line and "server went away" in line and "stays there" in line
    assert pending.read(folder)["scalars"]
    said.clear()
    pending.deliver_on_start(folder, FakeTask(), said.append)
    assert said[0].startswith(f"sent to ClearML task {'t' * 32} what an earlier run kept")
    assert "status" not in said[0]  # the rerun continues this task: its own end sets the status


def sync(folder, env, *args):
    proc = subprocess.run(
        [sys.executable, SYNC, *args, *([str(folder)] if folder else [])],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture
def no_server_env(tmp_path):
    """Credentials for a server on a port where nothing listens (answers at once: connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLEARML_", "TRAINS_"))}
    (tmp_path / "home").mkdir()
    env.update(
        HOME=str(tmp_path / "home"),
        CLEARML_API_HOST=f"http://127.0.0.1:{port}",
        CLEARML_API_ACCESS_KEY="x",
        CLEARML_API_SECRET_KEY="y",
    )
    return env


def test_clearml_sync_answers_help_and_says_in_one_line_what_is_wrong(tmp_path, no_server_env):
    status, out = sync(None, no_server_env, "--help")
    assert status == 0 and "RUN_FOLDER" in out and "clearml_pending.json" in out
    status, out = sync(tmp_path / "nope", no_server_env)
    assert status == 1 and out.strip().count("\n") == 0 and "does not exist" in out, out
    (tmp_path / "empty").mkdir()
    status, out = sync(tmp_path / "empty", no_server_env)
    assert status == 1 and out.strip().count("\n") == 0 and "is not a run folder" in out, out
    folder = run_folder(tmp_path)
    status, out = sync(folder, no_server_env)
    assert status == 0 and out.strip() == f"nothing to send: {folder} keeps no reports for a ClearML server"


def test_clearml_sync_without_its_server_keeps_what_is_pending(tmp_path, no_server_env):
    folder = run_folder(tmp_path)
    pending.keep(folder, record())
    before = (folder / pending.PENDING_FILE).read_text()
    status, out = sync(folder, no_server_env)
    assert status == 1 and out.strip().count("\n") == 0, out
    assert out.startswith("error: sending ") and "did not answer" in out
    assert (folder / pending.PENDING_FILE).read_text() == before
    assert json.loads(before)["task_id"] == "t" * 32


@pytest.fixture
def frozen_server_env(no_server_env):
    """Credentials for a loopback server that answers the project's probe and then nothing: a server frozen
    just after the sync started (every later request is read, then left without an answer)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held, stop = [], threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            request = conn.recv(65536)
            if b"/debug.ping" in request.split(b"\r\n", 1)[0]:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
                conn.close()
            else:
                held.append(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield {**no_server_env, "CLEARML_API_HOST": f"http://127.0.0.1:{listener.getsockname()[1]}"}
    stop.set()
    listener.close()
    for conn in held:
        conn.close()


def test_a_sync_whose_server_stops_answering_says_so_and_ends_on_ctrl_c_in_one_line(tmp_path, frozen_server_env):
    folder = run_folder(tmp_path)
    pending.keep(folder, record())
    before = (folder / pending.PENDING_FILE).read_text()
    proc = subprocess.Popen(
        [sys.executable, SYNC, str(folder)],
        cwd=ROOT,
        env=frozen_server_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines, deadline = [], threading.Timer(90, proc.kill)  # a sync that never says so would wait forever
    deadline.start()
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("still sending after "):
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.communicate(timeout=60)[0]
    deadline.cancel()
    assert proc.returncode == 130, "".join(lines) + rest
    assert f"waiting on the ClearML server {frozen_server_env['CLEARML_API_HOST']}" in lines[-1]
    assert rest.strip().count("\n") == 0 and rest.startswith("error: interrupted while sending"), rest
    assert f"stays in {folder / pending.PENDING_FILE}" in rest and "Traceback" not in rest
    assert (folder / pending.PENDING_FILE).read_text() == before


def test_a_kept_image_grid_is_sent_under_the_file_count_of_its_validation(tmp_path, registered):
    """The SDK names a debug image's file by a count of this process's reports of its series: a sync starting at
    0 would overwrite the file of the first validation's grid with the last one's."""
    from clearml.backend_interface.metrics.events import UploadEvent

    folder = run_folder(tmp_path)
    (folder / "val_grid.png").write_bytes(b"not read by the stand-in")
    grid = {"title": "val", "series": "a grid", "iteration": 4, "file": "val_grid.png", "count": 3}
    pending.keep(folder, record(images=[grid]))
    task = FakeTask()
    pending.deliver(folder, task=task)
    assert ("image", "val", "a grid", 4, "val_grid.png") in task.calls
    assert UploadEvent._get_metric_count("val", "a grid") == 3  # the count its report (the real one) takes
