"""summary.png: one picture of a training run, drawn from its output folder alone.

The curves come from the run's TensorBoard events (tb/), the final per-class IoU from metrics.json,
so the picture shows exactly what was logged and can be redrawn for any finished run:
``python -m vocseg.run_summary OUTPUT_DIR``.
"""

import io
import json
import math
import sys
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vocseg.data.voc import VOC_CLASSES

GRID_TAG = "val/image_gt_prediction"


def read_run(output_dir) -> dict:
    """Series {tag: (steps, values)} for loss, learning rates and mIoU, the last image grid, the final IoU."""
    output_dir = Path(output_dir)
    events = EventAccumulator(str(output_dir / "tb"), size_guidance={"scalars": 0, "images": 1})
    events.Reload()
    tags = events.Tags()
    wanted = ["train/batch_loss", "train_eval/mIoU", "val/mIoU"] + sorted(
        (t for t in tags["scalars"] if t.startswith("lr/")), key=lambda t: int(t.rsplit("_", 1)[-1])
    )
    series = {}
    for tag in wanted:
        if tag in tags["scalars"]:
            points = events.Scalars(tag)
            series[tag] = ([p.step for p in points], [p.value for p in points])
    grid = None
    if GRID_TAG in tags["images"]:
        grid = np.array(Image.open(io.BytesIO(events.Images(GRID_TAG)[-1].encoded_image_string)).convert("RGB"))
    metrics_file = output_dir / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    return {
        "series": series,
        "grid": grid,
        "val_iou": metrics.get("val", {}).get("IoU"),
        "epoch": metrics.get("epoch"),
        "name": f"{output_dir.parent.name}/{output_dir.name}",
    }


def _curves(ax, series: dict, tags, xlabel: str, title: str, log: bool = False) -> None:
    for tag in tags:
        steps, values = series[tag]
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, label=tag)
    ax.set(title=title, xlabel=xlabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if log:
        ax.set_yscale("log", nonpositive="mask")  # poly decay ends at exactly 0
    ax.grid(alpha=0.3)
    if tags:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)


def _class_bars(ax, iou) -> None:
    values = (
        np.array([np.nan if v is None else v for v in iou], dtype=float) if iou else np.full(len(VOC_CLASSES), np.nan)
    )
    x = np.arange(len(values))
    ax.bar(x, np.nan_to_num(values), color="tab:blue")
    for i, v in enumerate(values):
        ax.text(
            i,
            (0 if math.isnan(v) else v) + 0.01,
            "n/a" if math.isnan(v) else f"{v:.2f}",
            ha="center",
            va="bottom",
            fontsize=7,
        )
    ax.set_xticks(x, VOC_CLASSES[: len(values)], rotation=45, ha="right", fontsize=8)
    ax.set(ylim=(0, 1.1), ylabel="IoU")
    miou = np.nanmean(values) if np.isfinite(values).any() else float("nan")
    ax.set_title(f"final val IoU per class (mIoU {miou:.3f}; n/a: class absent from val and predictions)")


def _image_grid(ax, grid) -> None:
    if grid is None:
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no validation image logged", ha="center", va="center", transform=ax.transAxes)
        return
    ax.imshow(grid, interpolation="nearest")
    width = grid.shape[1]
    ax.set_xticks([width / 6, width / 2, 5 * width / 6], ["image", "ground truth", "prediction"])
    ax.set_yticks([])
    ax.tick_params(length=0)
    ax.set_title("last validation, first batch")


def plot_summary(run: dict, path) -> Path:
    fig = Figure(figsize=(15, 14), layout="constrained")
    FigureCanvasAgg(fig)
    grid_spec = fig.add_gridspec(4, 2, width_ratios=(1.4, 1))
    series = run["series"]
    _curves(
        fig.add_subplot(grid_spec[0, 0]),
        series,
        [t for t in ("train/batch_loss",) if t in series],
        "iteration",
        "training loss (per logged batch)",
    )
    _curves(
        fig.add_subplot(grid_spec[1, 0]),
        series,
        [t for t in series if t.startswith("lr/")],
        "iteration",
        "learning rate per parameter group (log scale; zero not drawn)",
        log=True,
    )
    ax = fig.add_subplot(grid_spec[2, 0])
    _curves(ax, series, [t for t in ("train_eval/mIoU", "val/mIoU") if t in series], "epoch", "mIoU per validation")
    ax.set_ylim(0, 1)
    _image_grid(fig.add_subplot(grid_spec[0:3, 1]), run["grid"])
    _class_bars(fig.add_subplot(grid_spec[3, :]), run["val_iou"])
    fig.suptitle(f"{run['name']} (epoch {run['epoch']})")
    fig.savefig(path, dpi=100)
    return Path(path)


def write_summary(output_dir) -> Path:
    """Draws OUTPUT_DIR/summary.png from OUTPUT_DIR's tb/ and metrics.json."""
    return plot_summary(read_run(output_dir), Path(output_dir) / "summary.png")


if __name__ == "__main__":
    for folder in sys.argv[1:]:
        print(write_summary(folder))
