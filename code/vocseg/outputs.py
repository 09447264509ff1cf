"""A run's local outputs: its folder, the copied sources, TensorBoard, metrics.json (rank 0 only)."""

import json
import os
import shutil
from datetime import datetime
from pathlib import Path

import ignite.distributed as idist
from ignite.engine import Events
from ignite.handlers import TensorboardLogger
from ignite.handlers.tensorboard_logger import OptimizerParamsHandler, OutputHandler


def output_base() -> Path:
    # CLEARML_OUTPUT_PATH switches tracking on and also moves local outputs there, as in the spec.
    return Path(os.environ.get("CLEARML_OUTPUT_PATH") or os.environ.get("OUTPUT_PATH") or "output")


def make_output_dir(config_path) -> Path:
    """``<base>/<config stem>/<timestamp>``, created by rank 0 and shared with the other ranks."""
    path = None
    if idist.get_rank() == 0:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        path = (output_base() / Path(config_path).stem / stamp).resolve()
        path.mkdir(parents=True, exist_ok=False)
    if idist.get_world_size() > 1:
        path = Path(idist.broadcast(str(path) if path else "", src=0, safe_mode=True))
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
    tb.attach(trainer, OutputHandler(tag="train", output_transform=lambda o: {"batch_loss": float(o["batch_loss"])}),
              event_name=Events.ITERATION_COMPLETED(every=log_every_iters))
    tb.attach(trainer, OptimizerParamsHandler(optimizer, param_name="lr"),
              event_name=Events.ITERATION_COMPLETED(every=log_every_iters))
    for tag, evaluator in evaluators.items():
        tb.attach(evaluator, OutputHandler(tag=tag, metric_names=["mIoU", "mIoU_no_bg", "pixel_accuracy",
                                                                   "mean_class_accuracy", "IoU"],
                                           global_step_transform=lambda *_: trainer.state.epoch),
                  event_name=Events.COMPLETED)

    def log_grid(engine):
        grid = getattr(engine.state, "grid", None)
        if grid is not None:
            tb.writer.add_image("val/image_gt_prediction", grid, trainer.state.epoch, dataformats="HWC")

    evaluators["val"].add_event_handler(Events.COMPLETED, log_grid)
    return tb
