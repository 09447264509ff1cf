"""Scoring trained weights on VOC val at full resolution, with optional flip / multi-scale TTA."""

import logging
from pathlib import Path

import ignite.distributed as idist
import torch
from ignite.engine import Events

from vocseg import outputs
from vocseg.config import check_constants, check_inference, check_loaded, check_seed, load_config, peek_constant
from vocseg.data import sample_check
from vocseg.data.voc import VOC_CLASSES, save_palette_png
from vocseg.engine import precision
from vocseg.engine.checkpoints import load_weights, resolve_weights
from vocseg.engine.metrics import scalar_metrics
from vocseg.engine.steps import create_evaluator
from vocseg.runtime import logs, machine

log = logging.getLogger("vocseg")


def _save_predictions(evaluator, folder: Path) -> None:
    out, batch = evaluator.state.output, evaluator.state.batch
    preds = out["y_pred"].argmax(1).to(torch.uint8).cpu().numpy()
    for pred, image_id, (h, w) in zip(preds, batch["id"], batch["size"].tolist()):
        save_palette_png(folder / f"{image_id}.png", pred[:h, :w])


def evaluate(config_path, mutations=None, tracker_factory=None, run_name=None) -> dict:
    check_constants(config_path, mutations)
    seed = int(peek_constant(config_path, "seed", mutations, default=0))
    machine.seed_everything(seed)
    config = load_config(config_path, mutations)
    weights_path = resolve_weights(config.get("weights_path"))  # before the schema check: it names what to set
    check_inference(config)
    check_seed(config, seed)
    check_loaded(config, config_path)
    checked = sample_check.check_loaders({"data_loader": config.data_loader})
    # eval-<name>: never a training run's folder, even under the same RUN_NAME or SLURM job.
    output_dir = outputs.make_output_dir(config_path, name=f"eval-{outputs.run_name(run_name)}")
    logger = logs.setup_logging(output_dir)
    logger.info("before evaluation: %s", checked)
    device = idist.device() if idist.get_world_size() > 1 else torch.device(config.device)

    model = config.model
    load_weights(model, weights_path)
    model = model.to(device)
    flip, scales = bool(config.get("tta_flip", False)), tuple(config.get("tta_scales", (1.0,)))
    # Scores are reported in full precision unless the config asks for amp.
    amp_dtype = precision.amp_dtype(config.get("amp", "off"), device, where=f"config {config_path}")
    evaluator = create_evaluator(
        model,
        device=device,
        amp_dtype=amp_dtype,
        flip=flip,
        scales=scales,
        num_classes=int(config.get("num_classes", 21)),
    )
    logger.info(
        "evaluating %s on %d images | device %s | precision %s | flip %s | scales %s | output %s",
        config.weights_path,
        len(config.data_loader.dataset),
        device,
        precision.describe(amp_dtype),
        flip,
        scales,
        output_dir,
    )

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
        "tta": {"flip": flip, "scales": list(scales)},
        "output_dir": str(output_dir),
    }
    if idist.get_rank() == 0:
        outputs.write_json(output_dir / "metrics.json", result)
        if tracker_factory:
            tracker_factory(config=config, output_dir=output_dir, result=result, evaluator=evaluator).close()
    logger.info("val %s", " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    logger.info("metrics written to %s", output_dir / "metrics.json")
    return result
