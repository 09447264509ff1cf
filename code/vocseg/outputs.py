"""A run's local outputs: its folder, the copied sources, TensorBoard, metrics.json (rank 0 only)."""

import json
import os
import shutil
import socket
import tempfile
from datetime import datetime
from pathlib import Path

import ignite.distributed as idist
from ignite.engine import Events
from ignite.handlers import TensorboardLogger
from ignite.handlers.tensorboard_logger import OptimizerParamsHandler, OutputHandler

from vocseg.clearml import agent_task_id
from vocseg.engine.metrics import CLASS_IOU, SCALAR_METRICS
from vocseg.errors import UserError


def output_base() -> Path:
    # CLEARML_OUTPUT_PATH switches tracking on and also moves local outputs there, as in the spec.
    return Path(os.environ.get("CLEARML_OUTPUT_PATH") or os.environ.get("OUTPUT_PATH") or "output")


def _unwritable(base: Path, exc: OSError) -> UserError:
    name = "CLEARML_OUTPUT_PATH" if os.environ.get("CLEARML_OUTPUT_PATH") else "OUTPUT_PATH"
    given = f"{name}={os.environ[name]}" if os.environ.get(name) else f"the default output folder {base.resolve()}"
    reason = exc.strerror or type(exc).__name__
    return UserError(
        f"{given} cannot hold the run's outputs ({reason}: {exc.filename or base}): set {name} to a writable folder"
    )


def check_output_base() -> Path:
    """Before any work, and creating nothing: the output folder, or the folder it would be created in, takes files."""
    base = output_base().resolve()
    existing = next(p for p in (base, *base.parents) if p.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, "Not a directory", str(existing))
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise _unwritable(base, exc) from None
    return base


def run_name(given: str | None = None) -> str:
    """The run's folder name: ``given`` (the run_name setting), else the identity a launcher gives the run, so
    that a restarted or requeued run finds its own folder again; else a timestamp."""
    if given:
        return str(given)
    if os.environ.get("SLURM_JOB_ID"):  # unchanged when the job is requeued
        return f"slurm-{os.environ['SLURM_JOB_ID']}"
    if os.environ.get("TORCHELASTIC_RUN_ID", "none") != "none":  # --rdzv-id, or --standalone's own
        return f"torchrun-{os.environ['TORCHELASTIC_RUN_ID']}"
    if "TORCHELASTIC_RESTART_COUNT" in os.environ:
        # torchrun's default id "none" names no run; its agent (this process's parent) is the same through
        # every --max-restarts restart of the group, and rank 0's name is the one every rank uses.
        return f"torchrun-{socket.gethostname()}-{os.getppid()}"
    if agent_task_id():  # a task enqueued again continues in the same folder
        return f"clearml-{agent_task_id()}"
    return datetime.now().strftime("%Y%m%d-%H%M%S-%f")


def run_dir(config_path, name: str | None = None) -> Path:
    """``<base>/<config stem>/<run name>``, chosen by rank 0 and shared with the other ranks (not created yet);
    ``name``: the run_name setting."""
    path = None
    if idist.get_rank() == 0:
        path = (output_base() / Path(config_path).stem / run_name(name)).resolve()
    if idist.get_world_size() > 1:
        path = Path(idist.broadcast(str(path) if path else "", src=0, safe_mode=True))
    return path


def make_output_dir(config_path, path=None, name: str | None = None) -> Path:
    """The run folder (``run_dir`` unless given), created by rank 0."""
    path = path or run_dir(config_path, name)
    if idist.get_rank() == 0:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _unwritable(output_base(), exc) from None
    return path


def copy_sources(output_dir: Path, *files) -> None:
    for f in files:
        if f:
            shutil.copy2(f, output_dir / Path(f).name)


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def setup_tensorboard(output_dir: Path, trainer, optimizer, evaluators: dict, log_every_iters: int):
    tb = TensorboardLogger(log_dir=output_dir / "tb")
    tb.attach(
        trainer,
        OutputHandler(tag="train", output_transform=lambda o: {"batch_loss": float(o["batch_loss"])}),
        event_name=Events.ITERATION_COMPLETED(every=log_every_iters),
    )
    tb.attach(
        trainer,
        OptimizerParamsHandler(optimizer, param_name="lr"),
        event_name=Events.ITERATION_COMPLETED(every=log_every_iters),
    )
    for tag, evaluator in evaluators.items():
        tb.attach(
            evaluator,
            OutputHandler(
                tag=tag,
                metric_names=[*SCALAR_METRICS, CLASS_IOU],
                global_step_transform=lambda *_: trainer.state.epoch,
            ),
            event_name=Events.COMPLETED,
        )

    def log_grid(engine):
        grid = getattr(engine.state, "grid", None)
        if grid is not None:
            tb.writer.add_image("val/image_gt_prediction", grid, trainer.state.epoch, dataformats="HWC")

    evaluators["val"].add_event_handler(Events.COMPLETED, log_grid)
    return tb
