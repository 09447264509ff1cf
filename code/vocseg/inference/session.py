"""Trained weights on images without ground truth: an eval config's model and TTA, one image at a time."""

import ast
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from vocseg.config import load_config
from vocseg.data.normalize import normalize
from vocseg.dataflow import chw_tensor
from vocseg.engine.checkpoints import load_weights, resolve_weights
from vocseg.engine.steps import autocast, predict
from vocseg.errors import UserError
from vocseg.models import model_for
from vocseg.runtime import device_plan


def _assigned_names(path: Path) -> set:
    try:
        tree = ast.parse(path.read_text(), filename=str(path))
    except (OSError, SyntaxError):
        return set()  # load_config reports both with the file and line
    return {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Name)}


def inference_config(config_path):
    """An eval config loaded for its model, TTA, device and weights only.

    Its ``data_loader`` is replaced by None before the file runs: building it would need DATASET_PATH
    and a VOC val split, which predicting on a folder of photos has no use for.
    """
    path = Path(config_path)
    mutations = {"data_loader": None} if "data_loader" in _assigned_names(path) else None
    config = load_config(path, mutations)
    if not isinstance(config.get("model"), torch.nn.Module):
        raise UserError(
            f"config {path} defines no `model`: use an eval config such as configs/eval/baseline_resnet101.py"
        )
    return config


class Predictor:
    """Class scores and masks at each image's own size (no padding), with the config's flip/scale TTA."""

    def __init__(self, config_path, weights=None, device: str | None = None):
        config = inference_config(config_path)
        weights = weights or config.get("weights_path")
        if not weights:
            raise UserError(
                f"no weights: pass --weights /path/to/best_model.pt (or a ClearML model id), or set "
                f"WEIGHTS_PATH / weights_path in {config_path}"
            )
        where = "--device" if device else f"config {config_path}"
        # Full precision unless the config asks for amp, as the evaluation script.
        plan = device_plan.for_inference(device or config.get("device", "cpu"), config.get("amp", "off"), where)
        self.device, self.dtype = plan.device, plan.amp_dtype
        self.weights = str(weights)
        local = resolve_weights(weights, env="--weights")
        self.model = model_for(config.model, local)
        load_weights(self.model, local, env="--weights")
        self.model.eval().to(self.device)
        self.flip, self.scales = bool(config.get("tta_flip", False)), tuple(config.get("tta_scales", (1.0,)))

    def describe(self) -> str:
        return f"weights {self.weights} | device {self.device} | flip {self.flip} | scales {self.scales}"

    def scores(self, image: np.ndarray) -> torch.Tensor:
        """HxWx3 RGB uint8 -> 1xCxHxW class probabilities (float32, on the device)."""
        x = normalize(chw_tensor(image)[None].to(self.device).float())
        with autocast(self.device, self.dtype):
            return predict(self.model, x, flip=self.flip, scales=self.scales)

    def mask(self, image: np.ndarray, max_side: int | None = None) -> np.ndarray:
        """HxW uint8 class ids. With ``max_side``, larger images are scored shrunk to it (memory and time grow
        with the pixel count) and the scores brought back to the full size before the argmax."""
        height, width = image.shape[:2]
        if max_side and max(height, width) > max_side:
            factor = max_side / max(height, width)
            small = cv2.resize(
                image, (max(1, round(width * factor)), max(1, round(height * factor))), interpolation=cv2.INTER_AREA
            )
            scores = F.interpolate(self.scores(small), size=(height, width), mode="bilinear", align_corners=False)
        else:
            scores = self.scores(image)
        return scores.argmax(1)[0].to(torch.uint8).cpu().numpy()
