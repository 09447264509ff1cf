"""Image | ground truth | prediction grids in the VOC palette, for TensorBoard and ClearML."""

import numpy as np
import torch

from vocseg.data.voc import colorize


def comparison_grid(images: torch.Tensor, masks: torch.Tensor, preds: torch.Tensor, max_rows: int = 4) -> np.ndarray:
    """uint8 HxWx3 grid: one row per sample, columns image | ground truth | prediction."""
    rows = []
    for img, gt, pr in list(zip(images, masks, preds))[:max_rows]:
        img = img.cpu().numpy().transpose(1, 2, 0).astype(np.uint8)
        rows.append(
            np.concatenate(
                [img, colorize(gt.cpu().numpy().astype(np.uint8)), colorize(pr.cpu().numpy().astype(np.uint8))], axis=1
            )
        )
    return np.concatenate(rows, axis=0)
