"""Scoring trained weights on VOC val at full resolution, with optional flip / multi-scale TTA."""

import logging
from pathlib import Path

import ignite.distributed as idist
import torch
from ignite.engine import Events

from vocseg import outputs
from vocseg.config import check_inference
from vocseg.data.voc import VOC_CLASSES, save_palette_png
from vocseg.engine.checkpoints import load_weights, resolve_weights
from vocseg.engine.metrics import scalar_metrics
from vocseg.engine.prepare import prepare
from vocseg.engine.steps import create_evaluator
from vocseg.models import model_for
from vocseg.runtime import device_plan, faults

log = logging.getLogger("vocseg")


def _save_predictions(evaluator, folder: Path) -> None:
    out, batch = evaluator.state.output, evaluator.state.batch
    preds = out["y_pred"].argmax(1).to(torch.uint8).cpu().numpy()
    for pred, image_id, (h, w) in zip(preds, batch["id"], batch["size"].tolist()):
        save_palette_png(folder / f"{image_id}.png", pred[:h, :w])


def evaluation_name(run_name=None) -> str:
    """eval-<name>: never a training run's folder, even under the same RUN_NAME or SLURM job."""
    return f"eval-{outputs.run_name(run_name)}"


def evaluate(config_path, mutations=None, tracker_factory=None, run_name=None, output_dir=None) -> dict:
    """Scores the config's weights on its data_loader; rank 0 writes metrics.json. Returns the results.
    ``output_dir``: the evaluation's folder (default: ``outputs.run_dir`` of ``evaluation_name(run_name)``)."""
    weights = {}
    config, _seed, output_dir, logger = prepare(
        config_path,
        mutations,
        "evaluation",
        {"data_loader": "data_loader"},
        check_inference,
        # Before the schema check, whose "missing weights_path" would not say what to set.
        first=lambda loaded: weights.update(path=resolve_weights(loaded.get("weights_path"))),
        output_dir=output_dir,
        name=evaluation_name(run_name),
    )
    plan = device_plan.current() or device_plan.plan_process(
        device_plan.Request(device=config.get("device"), amp=config.get("amp", "off"), where=f"config {config_path}")
    )
    evaluator, tta = _evaluator(config, weights["path"], plan)
    logger.info(
        "evaluating %s on %d images | device %s | precision %s | flip %s | scales %s | output %s",
        config.weights_path,
        len(config.data_loader.dataset),
        plan.device,
        plan.precision,
        tta["flip"],
        tuple(tta["scales"]),
        output_dir,
    )
    loader = config.data_loader
    workers = config.get("num_workers", getattr(loader, "num_workers", None))
    with faults.evaluation_in_one_line(output_dir, workers, getattr(loader, "batch_size", None)):
        return _score(config, evaluator, tta, output_dir, tracker_factory, logger)


def _score(config, evaluator, tta, output_dir, tracker_factory, logger) -> dict:
    """Runs the evaluator (predictions saved as it goes); rank 0 writes metrics.json."""
    if config.get("save_predictions", False):
        folder = output_dir / "predictions"
        folder.mkdir(exist_ok=True)
        evaluator.add_event_handler(Events.ITERATION_COMPLETED, _save_predictions, folder)

    evaluator.run(config.data_loader)
    metrics = scalar_metrics(evaluator.state.metrics)
    per_class = {name: float(v) for name, v in zip(VOC_CLASSES, evaluator.state.metrics["IoU"])}
    result = {
        "val": {**metrics, "IoU": per_class},
        "weights_path": str(config.weights_path),
        "tta": tta,
        "output_dir": str(output_dir),
    }
    if idist.get_rank() == 0:
        outputs.write_json(output_dir / "metrics.json", result)
        if tracker_factory:
            tracker_factory(config=config, output_dir=output_dir, result=result, evaluator=evaluator).close()
    logger.info("val %s", " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    logger.info("metrics written to %s", output_dir / "metrics.json")
    return result


def _evaluator(config, weights_path, plan):
    """The evaluator of the config's model with the weights loaded, and its test-time augmentation. Its
    precision is the plan's: full precision unless the config asks for amp (vocseg.entry)."""
    model = model_for(config.model, weights_path)
    load_weights(model, weights_path)
    model = model.to(plan.device)  # each process scores a shard with the bare model: no DDP
    flip, scales = bool(config.get("tta_flip", False)), tuple(config.get("tta_scales", (1.0,)))
    evaluator = create_evaluator(
        model,
        device=plan.device,
        amp_dtype=plan.amp_dtype,
        flip=flip,
        scales=scales,
        num_classes=int(config.get("num_classes", 21)),
    )
    return evaluator, {"flip": flip, "scales": list(scales)}
