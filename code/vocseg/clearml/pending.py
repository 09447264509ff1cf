"""What an online run could not deliver to its ClearML task, kept in the run folder until the server answers again.

A server that stops answering near the end of a run (or while a run stops early) leaves the task without the
last reports, the best model and its final status. The run writes them to ``clearml_pending.json`` in its run
folder (paths there are relative to the folder, so it can be moved); they reach the *same* task later:

- by themselves, when the run folder is run again (a requeued job, the same command again): at its start;
- with ``python code/scripts/clearml_sync.py RUN_FOLDER``.

Delivering is idempotent: the server stores a scalar under (task, metric, series, iteration), so one sent twice
overwrites itself, and each part leaves the file once the server has it (the file goes with the last part).

Which scalars: the tracker journals every scalar it reports (``Journal``) and forgets them once a flush that
waited on the server has sent them (before each checkpoint upload); what is left at the end is what the server
may lack.
"""

import json
import os
import threading
from pathlib import Path

from vocseg.errors import UserError, one_line

PENDING_FILE = "clearml_pending.json"
VERSION = 1
SYNC_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "clearml_sync.py"
STATUSES = ("completed", "stopped", "failed")


def sync_command(folder) -> str:
    script = os.path.relpath(SYNC_SCRIPT) if SYNC_SCRIPT.exists() else "code/scripts/clearml_sync.py"
    return f"python {script} {folder}"


IMAGES_KEPT = 5  # the SDK keeps the files of a debug image series' last 5 reports (its file_history_size)


class Journal:
    """The scalars and debug images reported to the task that the server may not hold yet, in the order
    reported. Of the images, the last IMAGES_KEPT only: the server keeps no more files of a series."""

    def __init__(self):
        self._lock = threading.Lock()
        self._entries: list = []  # scalars [title, series, iteration, value]; images dicts (see add_image)
        self._dropped = 0  # entries confirmed delivered and forgotten

    def add(self, title: str, series: str, iteration: int, value: float) -> None:
        with self._lock:
            self._entries.append([str(title), str(series), int(iteration), float(value)])

    def add_image(self, title: str, series: str, iteration: int, count: int, image) -> None:
        """An image (an HxWx3 RGB uint8 array) reported with the SDK's file count ``count`` of its series."""
        with self._lock:
            self._entries.append(dict(title=title, series=series, iteration=int(iteration), count=count, image=image))
            kept = [e for e in self._entries if isinstance(e, dict) and e["image"] is not None]
            for old in kept[:-IMAGES_KEPT]:
                old["image"] = None  # its place stays: marks count positions

    def mark(self) -> int:
        """A position: everything reported before it is delivered once a flush started after it ends."""
        with self._lock:
            return self._dropped + len(self._entries)

    def confirm(self, mark: int) -> None:
        with self._lock:
            done = mark - self._dropped
            if done > 0:
                del self._entries[:done]
                self._dropped = mark

    def entries(self) -> list:
        """The scalars."""
        with self._lock:
            return [list(e) for e in self._entries if isinstance(e, list)]

    def images(self) -> list:
        """The images: dicts of title, series, iteration, count and image."""
        with self._lock:
            return [dict(e) for e in self._entries if isinstance(e, dict) and e["image"] is not None]


class JournaledLogger:
    """Stands in for a clearml ``Logger``: every scalar reported through it is journaled as well."""

    def __init__(self, logger, journal: Journal):
        self._logger, self._journal = logger, journal

    def report_scalar(self, title, series, value, iteration):
        self._journal.add(title, series, iteration, value)
        return self._logger.report_scalar(title=title, series=series, value=value, iteration=iteration)

    def __getattr__(self, name):
        return getattr(self._logger, name)


# ---------------------------------------------------------------------------------------------------------
# The file.


def read(folder) -> dict | None:
    """The pending record of a run folder, or None when it holds none."""
    path = Path(folder) / PENDING_FILE
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} cannot be read ({one_line(exc)}): delete it to give up what it holds") from None
    if not isinstance(record, dict) or not record.get("task_id"):
        raise UserError(f"{path} is not a pending ClearML record: delete it to give up what it holds")
    return record


def _write(folder, record: dict) -> Path:
    """Atomically: a reader sees the old record or the new one, never half of one."""
    path = Path(folder) / PENDING_FILE
    tmp = path.with_name(f".{PENDING_FILE}.tmp")
    with open(tmp, "w") as f:
        json.dump(record, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def _merge(old: dict, new: dict) -> dict:
    """A record written over one of the same task (a rerun that could not deliver the old one either)."""
    merged = {**old, **{k: v for k, v in new.items() if v is not None}}
    scalars = {(t, s, i): [t, s, i, v] for t, s, i, v in old.get("scalars", [])}
    scalars.update({(t, s, i): [t, s, i, v] for t, s, i, v in new.get("scalars", [])})
    merged["scalars"] = list(scalars.values())
    images = {(im["title"], im["series"], im["iteration"]): im for im in old.get("images", [])}
    images.update({(im["title"], im["series"], im["iteration"]): im for im in new.get("images", [])})
    merged["images"] = list(images.values())
    return merged


def keep(folder, record: dict) -> Path:
    """Writes what a run could not deliver (merged into what an earlier run of the folder left for the same
    task). Keys: task_id, server, scalars [[title, series, iteration, value]], images [{title, series,
    iteration, file}], confusion_matrix {matrix, labels, iteration}, best_model {file, iteration, name,
    labels}, checkpoint {file, iteration}, status (one of STATUSES), status_message. Files relative to folder."""
    folder = Path(folder)
    record = {"version": VERSION, **record}
    try:
        old = read(folder)
    except UserError:
        old = None
    if old and old.get("task_id") == record["task_id"]:
        record = _merge(old, record)
    return _write(folder, record)


def describe(record: dict) -> str:
    """What a record holds, in a few words: '12 scalars, best model best_model_2.pt, status completed'."""
    parts = []
    for key, word in (("scalars", "scalar"), ("images", "image")):
        if record.get(key):
            count = len(record[key])
            parts.append(f"{count} {word}{'s' if count > 1 else ''}")
    if record.get("confusion_matrix"):
        parts.append("the confusion matrix")
    if record.get("best_model"):
        parts.append(f"best model {Path(record['best_model']['file']).name}")
    if record.get("checkpoint"):
        parts.append(f"training checkpoint {Path(record['checkpoint']['file']).name}")
    if record.get("status"):
        parts.append(f"status {record['status']}")
    return ", ".join(parts) or "nothing"


# ---------------------------------------------------------------------------------------------------------
# Delivering.


def deliver(folder, task=None, set_status: bool = True, say=print) -> dict | None:
    """Sends what ``folder`` keeps to its task and removes it from the file, part by part; returns what was sent
    (None: nothing was pending). ``task``: the task object to use when this process already has it (a rerun
    that continues the task), else it is fetched by id. ``set_status``: False for a rerun that continues the
    task (its own end sets the status). Raises UserError when the task cannot be found; an SDK failure
    propagates with the unsent parts still in the file."""
    folder = Path(folder)
    record = read(folder)
    if record is None:
        return None
    task_id = record["task_id"]
    if task is None or task.id != task_id:
        task = _get_task(task_id, record.get("server"))
    sent = {k: v for k, v in record.items() if set_status or k not in ("checkpoint", "status")}

    def done(*keys):
        for key in keys:
            record.pop(key, None)
        _write(folder, record)

    logger = task.get_logger()
    if record.get("scalars") or record.get("images") or record.get("confusion_matrix"):
        for title, series, iteration, value in record.get("scalars", []):
            logger.report_scalar(title=title, series=series, value=value, iteration=iteration)
        for image in record.get("images", []):
            path = folder / image["file"]
            if path.is_file():
                if "count" in image:
                    next_image_count(image["title"], image["series"], image["count"])
                logger.report_image(image["title"], image["series"], iteration=image["iteration"], local_path=str(path))
        cm = record.get("confusion_matrix")
        if cm:
            logger.report_confusion_matrix(
                "val confusion matrix",
                "normalised by ground truth",
                matrix=cm["matrix"],
                iteration=cm["iteration"],
                xaxis="predicted",
                yaxis="ground truth",
                xlabels=cm["labels"],
                ylabels=cm["labels"],
                yaxis_reversed=True,
            )
        task.flush(wait_for_uploads=True)
        done("scalars", "images", "confusion_matrix")
    best = record.get("best_model")
    if best:
        path = folder / best["file"]
        if path.is_file():
            _register_model(task, path, best)
        else:
            say(f"best model {path} is no longer in the run folder: not sent")
        done("best_model")
    checkpoint = record.get("checkpoint")
    if checkpoint and set_status:  # a rerun that continues the task uploads its own newer ones
        path = folder / checkpoint["file"]
        if path.is_file():
            from vocseg.clearml.checkpoints import ARTIFACT

            ok = task.upload_artifact(
                ARTIFACT, artifact_object=path, metadata={"iteration": checkpoint["iteration"]}, wait_on_upload=True
            )
            if not ok:
                raise RuntimeError(f"the ClearML SDK refused the upload of {path}")
    if checkpoint:
        done("checkpoint")
    status = record.get("status")
    if status and set_status:
        _set_status(task, status, record.get("status_message"))
    (folder / PENDING_FILE).unlink(missing_ok=True)
    return sent


def next_image_count(title: str, series: str, count: int) -> None:
    """Has this process's next report of debug image ``title``/``series`` take the SDK's file count ``count``.
    The SDK names the file of each debug image by a count of this process's reports of that series (it keeps
    the last few files): a resumed run, or a sync, starting again at 0 would overwrite the file of an earlier
    iteration. The SDK has no public way to set it."""
    from clearml.backend_interface.metrics.events import UploadEvent

    counters = getattr(UploadEvent, "_metric_counters", None)
    if isinstance(counters, dict):
        counters[f"{title}_{series}"] = count - 1


def _get_task(task_id: str, server: str | None):
    from clearml import Task

    try:
        return Task.get_task(task_id=task_id)
    except Exception as exc:
        raise UserError(
            f"ClearML task {task_id} (recorded for server {server or '?'}) is not on this server "
            f"({one_line(exc)}): point CLEARML_API_HOST at the server the run reported to"
        ) from None


def _register_model(task, path: Path, best: dict) -> None:
    """The best model as the task's output model, in the entry the run created for it when there is one."""
    from clearml import OutputModel

    name = best.get("name") or f"{task.name} best"
    existing = [m for m in (task.models["output"] or []) if m.name == name]
    model = OutputModel(
        task=task,
        name=name,
        framework="PyTorch",
        label_enumeration=best.get("labels"),
        base_model_id=existing[-1].id if existing else None,
    )
    model.update_weights(weights_filename=str(path), iteration=best["iteration"], auto_delete_file=False)


def _set_status(task, status: str, message: str | None) -> None:
    task.reload()
    if task.get_status() == status:
        return
    if status == "completed":
        task.set_progress(100)
        task.mark_completed(ignore_errors=False, force=True, status_message=message)
    elif status == "stopped":
        task.stopped(ignore_errors=False, force=True, status_message=message)
    else:
        task.mark_failed(ignore_errors=False, force=True, status_reason=message, status_message=message)


DELIVER_S = 120.0  # how long the start of a rerun waits on delivering what an earlier run kept


def deliver_on_start(folder, task, say, limit: float = DELIVER_S) -> None:
    """At the start of a run in ``folder`` (a requeue, a rerun): what an earlier run kept reaches its task; when
    this run continues that task, the status is left to this run's end. Never stops the run: what cannot be
    sent stays in the file (and is said in one line)."""
    try:
        record = read(folder)
    except UserError as exc:
        say(f"{exc}; training goes on")
        return
    if record is None:
        return
    path = Path(folder) / PENDING_FILE
    if task.is_offline():
        say(f"{path} keeps reports for ClearML task {record['task_id']}; offline, they stay there")
        return
    continuing = record["task_id"] == task.id
    outcome = {}

    def send():
        try:
            outcome["sent"] = deliver(folder, task if continuing else None, set_status=not continuing, say=say)
        except Exception as exc:  # the run goes on; the file keeps what was not sent
            outcome["error"] = exc

    thread = threading.Thread(target=send, name="vocseg-clearml pending", daemon=True)
    thread.start()
    thread.join(limit)
    if thread.is_alive():
        say(
            f"sending {path} to ClearML task {record['task_id']} takes over {limit:.0f} s: it goes on in the "
            f"background; what is not sent stays there"
        )
    elif "error" in outcome:
        say(
            f"{path} not sent to ClearML task {record['task_id']} ({one_line(outcome['error'])}): it stays there; "
            f"training goes on"
        )
    else:
        say(f"sent to ClearML task {record['task_id']} what an earlier run kept in {path}: {describe(outcome['sent'])}")
