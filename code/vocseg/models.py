"""torchvision DeepLabV3 builders whose ImageNet backbone either loads from a named source or stops the run."""

import contextlib
import hashlib
import json
import logging
import os
import socket
import urllib.parse
from pathlib import Path

import ignite.distributed as idist
import torch
from torch import nn
from torchvision.models import (
    MobileNet_V3_Large_Weights,
    ResNet18_Weights,
    ResNet50_Weights,
    ResNet101_Weights,
    resnet18,
    resnet50,
    resnet101,
)
from torchvision.models import segmentation as seg
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation.deeplabv3 import DeepLabHead, DeepLabV3
from torchvision.models.segmentation.fcn import FCNHead

from vocseg.data.voc import NUM_CLASSES
from vocseg.engine.checkpoints import load_file
from vocseg.errors import UserError

log = logging.getLogger(__name__)

# Seconds one blocking socket operation of the weights download may take: a dead network fails the run
# with the fix instead of hanging it (torch.hub's urlopen has no timeout of its own).
DOWNLOAD_TIMEOUT = 60.0
# ASPP dilations per output stride, as in the DeepLabV3 paper (6, 12, 18 at 16; doubled at 8).
_ASPP_RATES = {8: (12, 24, 36), 16: (6, 12, 18)}


def _deeplabv3_resnet18(*, num_classes, aux_loss, output_stride):
    """A CPU-sized DeepLabV3: ResNet-18 read at layer3 (output stride 16) under torchvision's DeepLab head.

    torchvision's BasicBlock cannot dilate, so instead of a stride-32 layer4 the head reads layer3, which
    keeps the map fine enough for segmentation at a fraction of ResNet-50's cost.
    """
    if aux_loss:
        raise UserError("the resnet18 backbone has no auxiliary head: set aux_loss=False")
    _check_output_stride("resnet18", output_stride, (16,))
    backbone = IntermediateLayerGetter(resnet18(), {"layer3": "out"})
    return DeepLabV3(backbone, DeepLabHead(256, num_classes), None)


def _dilated_resnet(factory):
    """torchvision's DeepLabV3-ResNet layout (same module names) with a choice of output stride."""

    def build(*, num_classes, aux_loss, output_stride):
        _check_output_stride(factory.__name__, output_stride, (8, 16))
        dilate = [False, output_stride == 8, True]
        layers = {"layer4": "out", **({"layer3": "aux"} if aux_loss else {})}
        backbone = IntermediateLayerGetter(factory(replace_stride_with_dilation=dilate), layers)
        aux = FCNHead(1024, num_classes) if aux_loss else None
        return DeepLabV3(backbone, DeepLabHead(2048, num_classes, _ASPP_RATES[output_stride]), aux)

    return build


def _deeplabv3_mobilenet(*, num_classes, aux_loss, output_stride):
    _check_output_stride("mobilenet_v3_large", output_stride, (16,))
    return seg.deeplabv3_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=aux_loss
    )


def _check_output_stride(name, output_stride, allowed):
    if output_stride not in allowed:
        raise UserError(
            f"output_stride={output_stride} is not available for the {name} backbone: use "
            f"{' or '.join(map(str, allowed))}"
        )


# name -> (builder, ImageNet weights, default output stride)
_BUILDERS = {
    "resnet101": (_dilated_resnet(resnet101), ResNet101_Weights.IMAGENET1K_V1, 8),
    "resnet18": (_deeplabv3_resnet18, ResNet18_Weights.IMAGENET1K_V1, 16),
    "resnet50": (_dilated_resnet(resnet50), ResNet50_Weights.IMAGENET1K_V1, 8),
    "mobilenet_v3_large": (_deeplabv3_mobilenet, MobileNet_V3_Large_Weights.IMAGENET1K_V1, 16),
}


def deeplabv3(
    backbone: str = "resnet101",
    num_classes: int = NUM_CLASSES,
    aux_loss: bool = True,
    pretrained_backbone: bool = True,
    bn_momentum: float | None = None,
    output_stride: int | None = None,
) -> nn.Module:
    """torchvision DeepLabV3 with an ImageNet-pretrained backbone (or none, on purpose).

    ``output_stride`` (8 or 16, ResNet-50/101 only; default 8 as torchvision) sets which ResNet stages dilate
    instead of striding, and the ASPP rates with it. The backbone weights come from ``PRETRAINED_BACKBONE``
    or torch hub's download/cache; where they came from is ``backbone_source(model)``. ``bn_momentum``
    overrides every BatchNorm's running-stats momentum: torchvision's MobileNetV3 uses 0.01, which leaves
    the running statistics near their initial values for the first thousand steps.
    """
    if backbone not in _BUILDERS:
        raise UserError(f"model backbone '{backbone}' is unknown: use one of {sorted(_BUILDERS)}")
    builder, weights, default_stride = _BUILDERS[backbone]
    model = builder(num_classes=num_classes, aux_loss=aux_loss, output_stride=output_stride or default_stride)
    # What built it, so that a run folder can say which architecture its weights need (architecture()).
    model.architecture = {
        "backbone": backbone,
        "num_classes": num_classes,
        "aux_loss": aux_loss,
        "output_stride": output_stride or default_stride,
    }
    if pretrained_backbone:
        state, source = _backbone_weights(weights, backbone)
        _load_backbone(model, state, source, backbone)
    else:
        source = "none (pretrained_backbone=False: random init on purpose)"
    model.backbone_source = source
    log.info("%s backbone weights: %s", backbone, source)
    if bn_momentum is not None:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = bn_momentum
    return model


def architecture(model: nn.Module) -> dict | None:
    """The ``deeplabv3`` arguments that fix the model's layers, or None for a model built otherwise."""
    return getattr(getattr(model, "module", model), "architecture", None)


ARCHITECTURE_FILE = "model.json"


def model_of_run(weights_path) -> tuple[nn.Module, Path] | None:
    """The untrained model that the run holding ``weights_path`` trained (``<run>/best/*.pt`` or
    ``<run>/checkpoints/*.pt``, next to the run's ``model.json``) and that file; None for weights outside a run
    folder, or a run whose model was not built by ``deeplabv3``."""
    path = Path(str(weights_path))
    record = path.parent.parent / ARCHITECTURE_FILE
    if path.parent.name not in ("best", "checkpoints") or not record.is_file():
        return None
    try:
        arguments = json.loads(record.read_text())
        return deeplabv3(**arguments, pretrained_backbone=False), record
    except (ValueError, TypeError) as exc:
        raise UserError(f"{record} does not describe a model ({exc}): delete it to use the config's model") from None


def model_for(config_model, weights_path):
    """The model to load ``weights_path`` into: the architecture its training run recorded when the weights are
    in a run folder (so an eval config written for another recipe cannot refuse them), else the config's."""
    found = model_of_run(weights_path)
    if found is None:
        return config_model
    model, record = found
    logging.getLogger("vocseg").info(
        "model: the architecture of the run that trained %s (%s: %s), not the config's `model`",
        weights_path,
        record,
        json.dumps(model.architecture, sort_keys=True),
    )
    return model


def backbone_source(model: nn.Module) -> str | None:
    """Where the model's ImageNet weights came from ("hub URL (sha256 ...)", "file PATH (sha256 ...)", "none ...")."""
    return getattr(getattr(model, "module", model), "backbone_source", None)


def _short_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def _backbone_weights(weights, backbone: str):
    """(state dict, source) from PRETRAINED_BACKBONE, else torch hub; a UserError naming both fixes if neither."""
    path = os.environ.get("PRETRAINED_BACKBONE", "").strip()
    if path:
        if not Path(path).is_file():
            raise UserError(
                f"PRETRAINED_BACKBONE={path} does not exist: point it at an ImageNet backbone .pth or unset it"
            )
        state = load_file(path, "PRETRAINED_BACKBONE file", "PRETRAINED_BACKBONE")
        return state, f"file {path} (sha256 {_short_sha256(path)})"
    # Once per node: local rank 0 downloads into the hub cache while the others wait, then read the cache.
    error = None
    if idist.get_local_rank() > 0:
        idist.barrier()
    try:
        state = _hub_download(weights.url)
    except (OSError, RuntimeError, ValueError) as exc:  # URLError/timeouts are OSErrors; a bad hash RuntimeError
        state, error = None, exc
    if idist.get_local_rank() == 0:
        idist.barrier()
    if error is not None:
        reason = " ".join(str(getattr(error, "reason", error)).split())
        raise UserError(
            f"no ImageNet weights for the {backbone} backbone: {weights.url} could not be downloaded ({reason}); "
            f"set PRETRAINED_BACKBONE=/path/to/{Path(weights.url).name} (a local copy) or pretrained_backbone=False "
            "in the config (random init, on purpose)"
        )
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urllib.parse.urlsplit(weights.url).path).name
    return state, f"hub {weights.url} (sha256 {_short_sha256(cached)})"


@contextlib.contextmanager
def _socket_timeout(seconds: float):
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds if previous is None else previous)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _hub_download(url: str) -> dict:
    # torch.hub's own download: HTTPS_PROXY/NO_PROXY honoured, the file hash-checked, the cache reused.
    with _socket_timeout(DOWNLOAD_TIMEOUT):
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False, check_hash=True)


def _load_backbone(model: nn.Module, state, source: str, backbone_name: str) -> None:
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise UserError(f"backbone weights from {source} are not a state dict")
    backbone_keys = set(model.backbone.state_dict())
    # MobileNet's segmentation backbone is its `features` block; DDP checkpoints prefix everything with `module.`.
    for prefix in ("", "module.", "features.", "module.features."):
        stripped = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if backbone_keys & set(stripped):
            break
    else:
        raise UserError(
            f"backbone weights from {source} share no tensor with the {backbone_name} backbone: "
            "use an ImageNet checkpoint of that architecture"
        )
    try:
        # ImageNet checkpoints carry a classifier ('fc.*' / 'classifier.*') that the segmentation backbone lacks.
        result = model.backbone.load_state_dict(stripped, strict=False)
    except RuntimeError as exc:  # same names, other shapes: a checkpoint of another architecture
        first = str(exc).strip().splitlines()[-1].strip()
        raise UserError(f"backbone weights from {source} do not fit the {backbone_name} backbone: {first}") from None
    if result.missing_keys:
        raise UserError(
            f"backbone weights from {source} lack {len(result.missing_keys)} tensors of the "
            f"{backbone_name} backbone (e.g. {result.missing_keys[0]}): use a complete checkpoint"
        )


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
