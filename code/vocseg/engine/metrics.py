"""VOC segmentation metrics from one Ignite ConfusionMatrix (255 falls outside [0, 21) and is ignored).

Classes absent from both the ground truth and the predictions have an undefined IoU (NaN) and are left
out of the means instead of counting as 0, which matters on small or partial validation sets.
"""

import torch
from ignite.metrics import ConfusionMatrix, MetricsLambda

from vocseg.data.voc import NUM_CLASSES


def _iou(cm: torch.Tensor) -> torch.Tensor:
    cm = cm.double()
    inter = cm.diag()
    union = cm.sum(0) + cm.sum(1) - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.full_like(inter, float("nan")))


def _class_accuracy(cm: torch.Tensor) -> torch.Tensor:
    cm = cm.double()
    support = cm.sum(1)
    return torch.where(support > 0, cm.diag() / support.clamp(min=1), torch.full_like(support, float("nan")))


def _nanmean(x: torch.Tensor) -> float:
    return float(torch.nanmean(x).item())


def segmentation_metrics(num_classes: int = NUM_CLASSES, output_transform=lambda out: out) -> dict:
    """Metrics keyed as they appear in logs, TensorBoard, ClearML and metrics.json."""
    cm = ConfusionMatrix(num_classes=num_classes, output_transform=output_transform)
    iou = MetricsLambda(_iou, cm)
    return {
        "mIoU": MetricsLambda(_nanmean, iou),
        "mIoU_no_bg": MetricsLambda(lambda v: _nanmean(v[1:]), iou),
        "pixel_accuracy": MetricsLambda(lambda m: float(m.diag().sum().item() / max(m.sum().item(), 1)), cm),
        "mean_class_accuracy": MetricsLambda(lambda m: _nanmean(_class_accuracy(m)), cm),
        "IoU": iou,
        "cm": cm,
    }


def scalar_metrics(metrics: dict) -> dict:
    """Numbers only (drops the matrix and the per-class vector) for logs and metrics.json."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
