"""Training checkpoints kept on the run's ClearML task, so that a task enqueued again after its machine vanished
(a spot instance reclaimed, an agent killed) continues on another agent from where it was.

Each new training checkpoint of an online run is uploaded in a background thread as the task's artifact
``training_checkpoint``; the artifact entry is replaced only once the upload is complete, so it always names a
whole file, and the remote file of the checkpoint it replaces is then deleted (one copy per task, not one per
save). Before each upload the task's reported scalars and images are flushed: a checkpoint on the server is
never ahead of the curves, so a run continued from it reports every iteration exactly once.
"""

import logging
import os
import shutil
import threading
import time
from pathlib import Path

from vocseg.engine.checkpoints import loads
from vocseg.errors import UserError

ARTIFACT = "training_checkpoint"
log = logging.getLogger("vocseg")


class CheckpointUploads:
    """Uploads the newest training checkpoint to the task, one at a time, newest wins.

    A checkpoint is hard-linked into ``staging`` when offered (the checkpointer may delete its file before the
    upload ends; the link keeps the data without a copy). A checkpoint offered during an upload waits, and a
    newer offer replaces it: only the latest one matters for continuing.
    """

    def __init__(self, task, staging: Path, journal=None):
        self.task, self.staging, self.journal = task, Path(staging), journal
        self.uploaded: str | None = None  # file name of the checkpoint the task holds now
        self.failures = 0
        self._pending, self._busy, self._closed = None, False, False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="vocseg-checkpoint-upload", daemon=True)
        self._thread.start()

    def offer(self, path: Path, iteration: int) -> None:
        self.staging.mkdir(parents=True, exist_ok=True)
        link = self.staging / path.name
        if link.exists():
            link.unlink()
        try:
            os.link(path, link)
        except OSError:  # a file system without hard links
            shutil.copy2(path, link)
        with self._cond:
            if self._pending is not None and self._pending[0] != link:
                self._pending[0].unlink(missing_ok=True)
            self._pending = (link, iteration)
            self._cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait()
                if self._pending is None:
                    return
                (link, iteration), self._pending, self._busy = self._pending, None, True
            try:
                self._upload(link, iteration)
            except Exception as exc:  # a failed upload must not stop training; the previous copy stays
                self.failures += 1
                log.warning(
                    "training checkpoint %s not uploaded to the ClearML task: %s: %s",
                    link.name,
                    type(exc).__name__,
                    exc,
                )
            finally:
                link.unlink(missing_ok=True)
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _upload(self, link: Path, iteration: int) -> None:
        previous = self.task.artifacts.get(ARTIFACT)
        started = time.monotonic()
        mark = self.journal.mark() if self.journal is not None else None
        self.task.flush(wait_for_uploads=True)  # the curves up to this checkpoint reach the server first
        if mark is not None:
            self.journal.confirm(mark)  # the server holds every scalar reported before the flush
        ok = self.task.upload_artifact(
            ARTIFACT, artifact_object=link, metadata={"iteration": iteration}, wait_on_upload=True
        )
        if not ok:
            raise RuntimeError("the ClearML SDK refused the upload")
        log.info(
            "training checkpoint %s uploaded to the ClearML task (%.0f MB in %.1f s)",
            link.name,
            link.stat().st_size / 2**20,
            time.monotonic() - started,
        )
        self.uploaded = link.name
        if previous is not None and previous.url and Path(previous.url).name != link.name:
            _delete_remote(previous.url)

    def wait(self, timeout: float = 600.0) -> bool:
        """Waits for the upload in progress and the one pending; True when nothing is left to upload."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while (self._pending is not None or self._busy) and time.monotonic() < deadline:
                self._cond.wait(timeout=max(0.0, deadline - time.monotonic()))
            return self._pending is None and not self._busy

    def close(self, upload_pending: bool, timeout: float = 600.0) -> None:
        """Stops the thread after the upload in progress; with ``upload_pending`` the newest checkpoint
        reaches the task first (a run that stops before its end), else it is dropped (a finished run)."""
        with self._cond:
            if not upload_pending and self._pending is not None:
                self._pending[0].unlink(missing_ok=True)
                self._pending = None
            waiting = [link.name for link in sorted(self.staging.glob("*.pt"))] if self.staging.is_dir() else []
        if not self.wait(timeout):
            log.warning(
                "training checkpoint %s not uploaded to the ClearML task after %.0f s: the task keeps %s",
                " and ".join(waiting) or "upload",
                timeout,
                self.uploaded or "none",
            )
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=5)


def _delete_remote(url: str) -> None:
    from clearml.storage.helper import StorageHelper

    try:
        StorageHelper.get(url).delete(url, silent=True)
    except Exception as exc:  # an old file left behind costs storage, not correctness
        log.warning("old training checkpoint %s not deleted from storage: %s", url, exc)


def fetch_checkpoint(task, folder: Path) -> Path | None:
    """The task's ``training_checkpoint`` artifact downloaded into ``folder`` (under its own file name), or
    None when the task holds none. One that cannot be downloaded or does not load stops the run: starting
    over from iteration 0 would overwrite the task's curves with a run that forgot its training."""
    artifact = task.artifacts.get(ARTIFACT)
    if artifact is None or not artifact.url:
        return None
    from clearml import StorageManager

    where = f"ClearML task {task.id} holds training checkpoint {artifact.url}"
    started = time.monotonic()
    target = folder / Path(artifact.url).name
    # Straight into the run folder, not through ClearML's cache: one copy of a file of several hundred MB.
    # The storage helper rebuilds the URL's folders under the staging folder; only the file is kept.
    staging = folder / ".clearml_fetch"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        local = StorageManager.download_file(
            artifact.url, local_folder=str(staging), overwrite=True, silence_errors=True
        )
        if not local:
            raise UserError(
                f"{where}, but it could not be downloaded: enqueue the task again once its storage "
                "answers, or clone it to start a new run"
            )
        os.replace(local, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not loads(target):
        target.unlink()
        raise UserError(
            f"{where}, but the downloaded file is not a readable checkpoint: clone the task to start a new run"
        )
    log.info(
        "fetched training checkpoint %s (iteration %s) from ClearML task %s: %.0f MB in %.1f s",
        target.name,
        (artifact.metadata or {}).get("iteration", "?"),
        task.id,
        target.stat().st_size / 2**20,
        time.monotonic() - started,
    )
    return target
