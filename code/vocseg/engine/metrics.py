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


# One number each, in the order logs, TensorBoard and ClearML show them.
SCALAR_METRICS = ("mIoU", "mIoU_no_bg", "pixel_accuracy", "mean_class_accuracy")
CLASS_IOU = "IoU"  # the per-class vector behind the means


def _mean_iou(iou: torch.Tensor) -> float:
    return _nanmean(iou)


def _mean_iou_no_background(iou: torch.Tensor) -> float:
    return _nanmean(iou[1:])


def _pixel_accuracy(cm: torch.Tensor) -> float:
    return float(cm.diag().sum().item() / max(cm.sum().item(), 1))


def _mean_class_accuracy(cm: torch.Tensor) -> float:
    return _nanmean(_class_accuracy(cm))


def segmentation_metrics(num_classes: int = NUM_CLASSES, output_transform=lambda out: out) -> dict:
    """Metrics keyed as they appear in logs, TensorBoard, ClearML and metrics.json."""
    cm = ConfusionMatrix(num_classes=num_classes, output_transform=output_transform)
    iou = MetricsLambda(_iou, cm)
    scalars = (
        MetricsLambda(_mean_iou, iou),
        MetricsLambda(_mean_iou_no_background, iou),
        MetricsLambda(_pixel_accuracy, cm),
        MetricsLambda(_mean_class_accuracy, cm),
    )
    return {**dict(zip(SCALAR_METRICS, scalars, strict=True)), CLASS_IOU: iou, "cm": cm}


def scalar_metrics(metrics: dict) -> dict:
    """The numbers of SCALAR_METRICS (not the matrix nor the per-class vector) for logs and metrics.json."""
    return {name: float(metrics[name]) for name in SCALAR_METRICS if name in metrics}
