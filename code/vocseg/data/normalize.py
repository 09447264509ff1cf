"""The ImageNet normalisation every model input goes through: training, evaluation, prediction and exports.

Images stay uint8 until they are on the device (4x less to copy than float32); there they become float and
are normalised here, with the statistics of torchvision's pretrained backbones.
"""

import functools

import torch
from torch import nn

# ImageNet statistics of torchvision's pretrained backbones, in 0..255 units.
MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


class ImageNetNormalize(nn.Module):
    """Float NCHW RGB values 0..255 -> inputs of a pretrained backbone.

    A module with its statistics as buffers, so that a traced or exported model carries them.
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean) / self.std


@functools.cache
def _on(device: torch.device) -> ImageNetNormalize:
    # Built once per device: on a GPU fresh statistics would be another host-to-device copy per batch.
    return ImageNetNormalize().to(device)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """Float NCHW RGB values 0..255 -> normalised, on the images' own device."""
    return _on(images.device)(images)
