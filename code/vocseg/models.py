"""torchvision DeepLabV3 builders with an ImageNet backbone that never waits on the network."""

import logging
import os
import socket
import urllib.parse
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torchvision.models import MobileNet_V3_Large_Weights, ResNet18_Weights, ResNet50_Weights, ResNet101_Weights, resnet18
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models import segmentation as seg
from torchvision.models.segmentation.deeplabv3 import DeepLabHead, DeepLabV3

from vocseg.checkpoints import load_file
from vocseg.errors import UserError
from vocseg.voc import NUM_CLASSES

log = logging.getLogger(__name__)

def _deeplabv3_resnet18(*, weights=None, weights_backbone=None, num_classes=NUM_CLASSES, aux_loss=False):
    """A CPU-sized DeepLabV3: ResNet-18 read at layer3 (output stride 16) under torchvision's DeepLab head.

    torchvision's BasicBlock cannot dilate, so instead of a stride-32 layer4 the head reads layer3, which
    keeps the map fine enough for segmentation at a fraction of ResNet-50's cost.
    """
    if aux_loss:
        raise UserError("the resnet18 backbone has no auxiliary head: set aux_loss=False")
    backbone = IntermediateLayerGetter(resnet18(weights=weights_backbone), {"layer3": "out"})
    return DeepLabV3(backbone, DeepLabHead(256, num_classes), None)


_BUILDERS = {
    "resnet101": (seg.deeplabv3_resnet101, ResNet101_Weights.IMAGENET1K_V1),
    "resnet18": (_deeplabv3_resnet18, ResNet18_Weights.IMAGENET1K_V1),
    "resnet50": (seg.deeplabv3_resnet50, ResNet50_Weights.IMAGENET1K_V1),
    "mobilenet_v3_large": (seg.deeplabv3_mobilenet_v3_large, MobileNet_V3_Large_Weights.IMAGENET1K_V1),
}


def _reachable(url: str, timeout: float = 3.0) -> bool:
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _backbone_source(weights) -> str:
    """'env', 'cache', 'download' or 'none' -- decided without ever blocking on a dead network."""
    if os.environ.get("PRETRAINED_BACKBONE"):
        return "env"
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urllib.parse.urlsplit(weights.url).path).name
    if cached.is_file():
        return "cache"
    return "download" if _reachable(weights.url) else "none"


def _load_backbone_file(model: nn.Module, path: str, backbone_name: str) -> None:
    file = Path(path)
    if not file.is_file():
        raise UserError(f"PRETRAINED_BACKBONE={path} does not exist: point it at an ImageNet backbone .pth or unset it")
    state = load_file(file, "PRETRAINED_BACKBONE file", "PRETRAINED_BACKBONE")
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    # ImageNet checkpoints carry a classifier ('fc.*' / 'classifier.*') that the segmentation backbone lacks.
    backbone_keys = set(model.backbone.state_dict())
    if not backbone_keys & set(state):
        raise UserError(f"PRETRAINED_BACKBONE={path} shares no weights with the {type(model.backbone).__name__} backbone")
    try:
        result = model.backbone.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # same names, other shapes: a checkpoint of another architecture
        first = str(exc).strip().splitlines()[-1].strip()
        raise UserError(f"PRETRAINED_BACKBONE={path} does not fit the {backbone_name} backbone: {first}") from None
    missing = [k for k in result.missing_keys if k in backbone_keys]
    if missing:
        log.warning("PRETRAINED_BACKBONE=%s: %d backbone tensors missing, they stay random", path, len(missing))


def deeplabv3(backbone: str = "resnet101", num_classes: int = NUM_CLASSES, aux_loss: bool = True,
              pretrained_backbone: bool = True, bn_momentum: Optional[float] = None) -> nn.Module:
    """torchvision DeepLabV3 (output stride 8 for ResNets) with an optional ImageNet-pretrained backbone.

    ``bn_momentum`` overrides every BatchNorm's running-stats momentum: torchvision's MobileNetV3 uses
    0.01, which leaves the running statistics near their initial values for the first thousand steps,
    so a short run from scratch would evaluate far worse than it trains.
    """
    model = _build(backbone, num_classes, aux_loss, pretrained_backbone)
    if bn_momentum is not None:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = bn_momentum
    return model


def _build(backbone, num_classes, aux_loss, pretrained_backbone) -> nn.Module:
    if backbone not in _BUILDERS:
        raise UserError(f"model backbone '{backbone}' is unknown: use one of {sorted(_BUILDERS)}")
    builder, weights = _BUILDERS[backbone]
    source = _backbone_source(weights) if pretrained_backbone else "off"
    if source in ("cache", "download"):
        return builder(weights=None, weights_backbone=weights, num_classes=num_classes, aux_loss=aux_loss)
    model = builder(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=aux_loss)
    if source == "env":
        _load_backbone_file(model, os.environ["PRETRAINED_BACKBONE"], backbone)
        log.info("backbone weights loaded from PRETRAINED_BACKBONE=%s", os.environ["PRETRAINED_BACKBONE"])
    elif source == "none":
        log.warning(
            "No ImageNet weights for the %s backbone (%s is unreachable and not in the torch hub cache): "
            "training from random init. Set PRETRAINED_BACKBONE=/path/to/%s to use a local copy.",
            backbone, weights.url, Path(weights.url).name,
        )
    return model


def head_parameters(model: nn.Module):
    """(backbone params, head params): DeepLab recipes train the freshly initialised heads faster."""
    model = getattr(model, "module", model)
    head_ids = set()
    for name in ("classifier", "aux_classifier"):
        part = getattr(model, name, None)
        if part is not None:
            head_ids.update(id(p) for p in part.parameters())
    params = [p for p in model.parameters() if p.requires_grad]
    return [p for p in params if id(p) not in head_ids], [p for p in params if id(p) in head_ids]
