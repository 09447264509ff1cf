"""What runs report to their ClearML task: the training tracker and the evaluation report."""

import logging
import os
import sys
import warnings

import numpy as np
from ignite.engine import Events

from vocseg.clearml import pending
from vocseg.clearml.checkpoints import CheckpointUploads, fetch_checkpoint
from vocseg.clearml.outage import ANSWER_S, CLOSE_S, ServerWatch, abandon_sdk_exit_waits, abandon_task_exit
from vocseg.clearml.session import (
    SECTION,
    TASK_FILE,
    _api_host,
    announce_offline_session,
    config_constants,
    end_as_stopped,
    finish,
    probe_server,
)
from vocseg.data.voc import VOC_CLASSES
from vocseg.engine.metrics import CLASS_IOU, SCALAR_METRICS
from vocseg.models import backbone_source

log = logging.getLogger("vocseg")

GRID = ("val", "image | ground truth | prediction")  # debug image title and series
GRID_FOLDER = "val_grids"  # in the run folder: the grids the server did not take (see _keep_images)


def class_names(n: int):
    return list(VOC_CLASSES) if n == len(VOC_CLASSES) else [str(i) for i in range(n)]


def report_confusion_matrix(logger, cm, iteration: int) -> None:
    """The confusion matrix normalised by ground truth (rows sum to 1) as a ClearML plot."""
    cm = cm.double()
    names = class_names(cm.shape[0])
    logger.report_confusion_matrix(
        "val confusion matrix",
        "normalised by ground truth",
        matrix=(cm / cm.sum(1, keepdim=True).clamp(min=1)).numpy(),
        iteration=iteration,
        xaxis="predicted",
        yaxis="ground truth",
        xlabels=names,
        ylabels=names,
        yaxis_reversed=True,
    )


class ClearMLTracker:
    """Reports a training run to its task with Ignite's ClearML handlers; created by ``train()``."""

    def __init__(
        self, task, *, config, output_dir, trainer, evaluators, optimizer, model, best, logger, checkpointer=None
    ):
        from clearml import OutputModel
        from ignite.handlers.clearml_logger import ClearMLLogger

        self.task, self.trainer, self.evaluators, self.best = task, trainer, evaluators, best
        self.output_dir, self.checkpointer, self.uploads, self.offered = output_dir, checkpointer, None, None
        source = backbone_source(model)
        if source:  # where the ImageNet weights came from, next to the hyperparameters
            task.set_parameter("Model/backbone_source", source)
        with warnings.catch_warnings():
            # Ignite's word for offline mode, which choose_offline() has already announced.
            warnings.filterwarnings("ignore", message=".*running in bypass mode")
            self.clearml = ClearMLLogger()  # adopts the current task
        self.journal = None
        if not task.is_offline():
            # What the server may not hold yet, kept in the run folder if it does not answer at the end.
            self.journal = pending.Journal()
            self.clearml.clearml_logger = pending.JournaledLogger(self.clearml.clearml_logger, self.journal)
        every = Events.ITERATION_COMPLETED(every=int(config.get("log_every_iters", 10)))
        self.clearml.attach_output_handler(
            trainer, every, tag="train", output_transform=lambda o: {"batch_loss": float(o["batch_loss"])}
        )
        self.clearml.attach_opt_params_handler(trainer, every, optimizer, param_name="lr")
        for tag, evaluator in evaluators.items():
            self.clearml.attach_output_handler(
                evaluator,
                Events.COMPLETED,
                tag=tag,
                metric_names=list(SCALAR_METRICS),
                global_step_transform=lambda *_: trainer.state.epoch,
            )
            evaluator.add_event_handler(Events.COMPLETED, self._report_class_iou, tag)
        # After the best-model checkpointer (registered earlier on the same event), so its file exists.
        evaluators["val"].add_event_handler(Events.COMPLETED, self._after_validation)
        self.names = class_names(int(config.get("num_classes", len(VOC_CLASSES))))
        self.val_interval = int(config.get("val_interval", 1))
        trainer.add_event_handler(Events.STARTED, self._number_images_on)
        self.model_name = f"{task.name} best"
        self.model_entry = OutputModel(
            task=task,
            name=self.model_name,
            framework="PyTorch",
            label_enumeration={n: i for i, n in enumerate(self.names)},
        )
        self.registered = None  # the best model the task holds (set once its registration returned)
        self.stopped_by = ""  # the stop signal a run honoured (set by train() before close)
        self.best_epochs = {}  # best model file -> the epoch whose validation saved it
        self.summary_image = None  # (title, series, iteration, file) of summary.png, once reported
        self.watch = None if task.is_offline() else ServerWatch(task, _api_host())
        if not task.is_offline():
            # A rerun in this folder (a requeued job, a restarted group) continues this task.
            (output_dir / TASK_FILE).write_text(task.id)
            if checkpointer is not None:
                # Registered after the checkpoint and scalar handlers of the same events: the file exists and
                # the scalars of its iteration are queued when it is offered.
                self.uploads = CheckpointUploads(task, output_dir / ".clearml_upload", journal=self.journal)
                for event in (Events.ITERATION_COMPLETED, Events.EPOCH_COMPLETED, Events.COMPLETED):
                    trainer.add_event_handler(event, self._offer_checkpoint)

    def _number_images_on(self, engine) -> None:
        """A resumed run's image grids continue the SDK's file count from the validations already done (see
        pending.next_image_count: the server would otherwise show one image per file)."""
        done = engine.state.iteration // engine.state.epoch_length // self.val_interval
        if done:
            pending.next_image_count(*GRID, done)

    def _offer_checkpoint(self, engine) -> None:
        latest = self.checkpointer.last_checkpoint
        if latest and latest != self.offered:
            self.offered = latest
            self.uploads.offer(self.output_dir / "checkpoints" / latest, engine.state.iteration)

    def fetch_checkpoint(self, folder):
        """The task's training checkpoint, for a run enqueued again with an empty run folder (or None)."""
        return None if self.task.is_offline() else fetch_checkpoint(self.task, folder)

    def _report_class_iou(self, evaluator, tag: str) -> None:
        for name, value in zip(self.names, evaluator.state.metrics[CLASS_IOU].tolist()):
            if value == value:  # NaN: the class is absent from both truth and prediction
                self.clearml.report_scalar(f"{tag}/IoU", name, value, self.trainer.state.epoch)

    def _after_validation(self, evaluator) -> None:
        epoch = self.trainer.state.epoch
        if self.best.last_checkpoint and self.best.last_checkpoint not in self.best_epochs:
            self.best_epochs[self.best.last_checkpoint] = epoch
        grid = getattr(evaluator.state, "grid", None)
        if grid is not None:
            self.clearml.report_image(*GRID, iteration=epoch, image=grid)
            if self.journal is not None:
                # The SDK's file count of this grid: one per validation (see _number_images_on).
                self.journal.add_image(*GRID, epoch, count=epoch // self.val_interval - 1, image=grid)
        if not self.task.is_offline():
            # The upload itself goes on in the background while training goes on; creating the model entry waits
            # on the server, hence the bound.
            self.watch.call(f"best model {self.best.last_checkpoint}", self._register_best)

    def _register_best(self) -> None:
        latest = self.best.last_checkpoint
        if not latest or latest == self.registered or not (self.output_dir / "best" / latest).is_file():
            return  # (a resumed record may name a best model left on another machine)
        path, epoch = str(self.output_dir / "best" / latest), self.trainer.state.epoch
        if self.task.is_offline():
            # clearml 2.1.12's update_weights() fails offline before reaching its own offline branch
            # (its placeholder model has no `locked`); call that branch directly.
            self.model_entry._update_weights_offline(weights_filename=path, iteration=epoch)
        else:
            self.model_entry.update_weights(weights_filename=path, iteration=epoch, auto_delete_file=False)
        self.registered = latest

    def close(self) -> None:
        if self.task.is_offline():
            # Offline, each registration copies the weights into the session, which is zipped at the end:
            # one copy, of the final best model, keeps the exit short.
            self._register_best()
        cm = self.evaluators["val"].state.metrics.get("cm")
        if cm is not None:
            report_confusion_matrix(self.clearml, cm, self.trainer.state.epoch)
        summary = self.output_dir / "summary.png"
        if summary.is_file():  # written by train() just before
            self.summary_image = ("summary", "summary.png", self.trainer.state.epoch, summary.name)
            self.clearml.report_image(
                "summary", "summary.png", iteration=self.trainer.state.epoch, local_path=str(summary)
            )
        self.clearml.flush()
        state = self.trainer.state
        error = sys.exc_info()[1]
        unfinished = error is not None or state.nan_iteration is not None or bool(self.stopped_by)
        answers = self.watch is None or self._server_answers()
        if self.uploads is not None:
            # A run that stops before its end leaves its newest checkpoint on the task for whoever continues it.
            self.uploads.close(upload_pending=bool(unfinished), timeout=600.0 if answers else ANSWER_S)
        if unfinished:
            # Left open, ClearML's exit hook marks the task at exit (closing it now would mark it completed):
            # failed on a NaN or an error, and told to, stopped on a signal, as the pending record says.
            if self._stop_status(error)[0] == "stopped":
                end_as_stopped(self.task)
            if self.task.is_offline():
                announce_offline_session(self.task.get_offline_mode_folder())
                return
            limit = 600.0 if answers else CLOSE_S
            if not self.watch.call("sending the last reports", lambda: self.task.flush(wait_for_uploads=True), limit):
                # The exit hook would wait on the server without end: what it would send is kept instead.
                self._keep_what_is_missing(self._stop_status(error), left="left open by a run that stopped early")
                abandon_task_exit(self.task)
            return
        if self.watch is None:
            finish(self.task)
        elif not self.watch.call("closing the task", lambda: finish(self.task), 600.0 if answers else CLOSE_S, True):
            self._keep_what_is_missing(("completed", None), left="left unclosed")

    def _server_answers(self) -> bool:
        """Whether the server answers at the end of the run: no call is still waiting on it and it answers a
        probe. If not, the end of the run waits on it for a short time only."""
        if self.watch.away() or probe_server(self.watch.host) is not None:
            return False
        if self.registered != self.best.last_checkpoint:  # skipped while the server did not answer
            self.watch.call(f"best model {self.best.last_checkpoint}", self._register_best)
        return True

    def _stop_status(self, error) -> tuple:
        """The status of a task whose run stopped early, and why: stopped on a signal, failed on a NaN or an error."""
        if self.stopped_by:
            return "stopped", f"{self.stopped_by}: stopped at iteration {self.trainer.state.iteration}"
        if self.trainer.state.nan_iteration is not None:
            return "failed", f"NaN loss at iteration {self.trainer.state.nan_iteration}"
        if isinstance(error, KeyboardInterrupt) or getattr(error, "signum", None) in (2, 15):
            return "stopped", f"interrupted at iteration {self.trainer.state.iteration}"
        return "failed", f"{type(error).__name__} at iteration {self.trainer.state.iteration}"

    def _pending_record(self, status: tuple) -> dict:
        """Everything the server may lack: the journaled scalars, the end's images and matrix, the best model
        unless registered, the newest checkpoint of a run stopped early unless uploaded, the status."""
        epoch = self.trainer.state.epoch
        record = {"task_id": self.task.id, "server": self.watch.host, "status": status[0], "status_message": status[1]}
        record["scalars"] = self.journal.entries()
        if self.summary_image:
            title, series, iteration, file = self.summary_image
            record["images"] = [{"title": title, "series": series, "iteration": iteration, "file": file}]
        cm = self.evaluators["val"].state.metrics.get("cm")
        if cm is not None:
            cm = cm.double()
            matrix = (cm / cm.sum(1, keepdim=True).clamp(min=1)).tolist()
            record["confusion_matrix"] = {"matrix": matrix, "labels": class_names(len(matrix)), "iteration": epoch}
        best = self.best.last_checkpoint
        if best and best != self.registered and (self.output_dir / "best" / best).is_file():
            labels = {n: i for i, n in enumerate(self.names)}
            record["best_model"] = {
                "file": self._in_folder("best", best),
                "iteration": self.best_epochs.get(best, epoch),
                "name": self.model_name,
                "labels": labels,
            }
        latest = self.checkpointer.last_checkpoint if self.checkpointer is not None else None
        if status[0] != "completed" and latest and self.uploads is not None and self.uploads.uploaded != latest:
            record["checkpoint"] = {
                "file": self._in_folder("checkpoints", latest),
                "iteration": self.trainer.state.iteration,
            }
        return record

    def _keep_images(self, record: dict) -> None:
        """The journaled image grids, as files of the run folder named in ``record``: the SDK's queue of images
        the server has not taken yet ends with this process."""
        import cv2

        for entry in self.journal.images():
            path = self.output_dir / GRID_FOLDER / f"epoch_{entry['iteration']}.png"
            path.parent.mkdir(exist_ok=True)
            partial = path.with_suffix(".partial.png")
            if not cv2.imwrite(str(partial), np.ascontiguousarray(entry["image"][:, :, ::-1])):  # RGB -> BGR
                raise OSError(f"OpenCV could not write {partial}")
            os.replace(partial, path)
            image = {k: entry[k] for k in ("title", "series", "iteration", "count")}
            record["images"] = [*record.get("images", []), {**image, "file": self._in_folder(GRID_FOLDER, path.name)}]

    def _in_folder(self, *parts) -> str:
        """A file of the run folder as the pending record names it: relative to the folder when inside it."""
        path = self.output_dir.joinpath(*parts)
        return path.relative_to(self.output_dir).as_posix() if path.is_relative_to(self.output_dir) else str(path)

    def _keep_what_is_missing(self, status: tuple, left: str) -> None:
        """One line: the task was left without its end, what it lacks, and where that is kept for later."""
        record = self._pending_record(status)
        try:
            self._keep_images(record)
            kept = pending.keep(self.output_dir, record)
            how = (
                f"kept in {kept}: send it with `{pending.sync_command(self.output_dir)}` once the server "
                f"answers (a rerun in this run folder sends it too)"
            )
        except OSError as exc:
            how = f"could not be kept ({exc.strerror or exc}): the run folder {self.output_dir} holds everything"
        what = pending.describe(record)
        log.warning(
            "ClearML task %s %s: server %s does not answer; not on the server: %s; %s",
            self.task.id,
            left,
            self.watch.host,
            what,
            how,
        )
        abandon_sdk_exit_waits()


class EvaluationReport:
    """The ``tracker_factory`` of evaluation runs: a *testing* task holding the scores and the matrix."""

    def __init__(self, task, *, config, output_dir, result, evaluator):
        self.task, self.result, self.evaluator = task, result, evaluator
        task.connect(config_constants(config["config_filepath"]), name=SECTION)

    def close(self) -> None:
        report = self.task.get_logger()
        for name, value in self.result["val"].items():
            if isinstance(value, float):
                report.report_single_value(f"val/{name}", value)
        for name, value in self.result["val"]["IoU"].items():
            report.report_single_value(f"val/IoU/{name}", value)
        report_confusion_matrix(report, self.evaluator.state.metrics["cm"], iteration=0)
        self.task.upload_artifact("metrics", artifact_object=self.result, wait_on_upload=True)
        report.flush()
        finish(self.task)
