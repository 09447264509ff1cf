"""Scoring trained weights on VOC val at full resolution, with optional flip / multi-scale TTA."""

import logging
from pathlib import Path

import ignite.distributed as idist
import torch
from ignite.engine import Events

from vocseg import tracking
from vocseg.checkpoints import load_weights
from vocseg.clearml_tracking import resolve_weights
from vocseg.config import check_inference, load_config, peek_constant
from vocseg.engines import create_evaluator
from vocseg.errors import UserError
from vocseg.metrics import scalar_metrics
from vocseg.training import launch, seed_everything, setup_logging
from vocseg.voc import VOC_CLASSES, save_palette_png

log = logging.getLogger("vocseg")


def _resolve_weights(weights_path):
    if not weights_path:
        raise UserError("weights_path is empty: set WEIGHTS_PATH=/path/to/best_model.pt (or a ClearML model id) "
                        "or weights_path in the config")
    return resolve_weights(weights_path)


def _save_predictions(evaluator, folder: Path) -> None:
    out, batch = evaluator.state.output, evaluator.state.batch
    preds = out["y_pred"].argmax(1).to(torch.uint8).cpu().numpy()
    for pred, image_id, (h, w) in zip(preds, batch["id"], batch["size"].tolist()):
        save_palette_png(folder / f"{image_id}.png", pred[:h, :w])


def evaluate(config_path, mutations=None, tracker_factory=None) -> dict:
    seed_everything(int(peek_constant(config_path, "seed", mutations, default=0)))
    config = load_config(config_path, mutations)
    check_inference(config)
    output_dir = tracking.make_output_dir(config_path)
    logger = setup_logging(output_dir)
    device = idist.device() if idist.get_world_size() > 1 else torch.device(config.device)

    model = config.model
    load_weights(model, _resolve_weights(config.weights_path))
    model = model.to(device)
    flip, scales = bool(config.get("tta_flip", False)), tuple(config.get("tta_scales", (1.0,)))
    evaluator = create_evaluator(model, device=device, amp=config.get("amp", "auto"), flip=flip, scales=scales,
                                 num_classes=int(config.get("num_classes", 21)))
    logger.info("evaluating %s on %d images | device %s | flip %s | scales %s | output %s", config.weights_path,
                len(config.data_loader.dataset), device, flip, scales, output_dir)

    if config.get("save_predictions", False):
        folder = output_dir / "predictions"
        folder.mkdir(exist_ok=True)
        evaluator.add_event_handler(Events.ITERATION_COMPLETED, _save_predictions, folder)

    evaluator.run(config.data_loader)
    metrics = scalar_metrics(evaluator.state.metrics)
    per_class = {name: float(v) for name, v in zip(VOC_CLASSES, evaluator.state.metrics["IoU"])}
    result = {"val": {**metrics, "IoU": per_class}, "weights_path": str(config.weights_path),
              "tta": {"flip": flip, "scales": list(scales)}, "output_dir": str(output_dir)}
    if idist.get_rank() == 0:
        tracking.write_json(output_dir / "metrics.json", result)
        if tracker_factory:
            tracker_factory(config=config, output_dir=output_dir, result=result, evaluator=evaluator).close()
    logger.info("val %s", " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    logger.info("metrics written to %s", output_dir / "metrics.json")
    return result


def run(config, **kwargs) -> None:
    """py_config_runner entry point of code/scripts/evaluation.py."""

    def one_rank(config_path, script_path):
        from vocseg import clearml_tracking

        factory = clearml_tracking.evaluation_tracker(config_path, script_path) if clearml_tracking.enabled() else None
        evaluate(config_path, tracker_factory=factory, **kwargs)

    launch(config, one_rank)
