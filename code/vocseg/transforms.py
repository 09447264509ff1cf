"""Albumentations + OpenCV pipelines.

Pipelines stop at uint8: images travel to the device as uint8 (4x less to copy than float32) and
are normalised there by ``engines.prepare_batch``. Masks keep 255 (void) everywhere: they are resized
with nearest neighbour and padded with 255, so void pixels never turn into background.
"""

import albumentations as A
import cv2

from vocseg.voc import IGNORE_INDEX

# ImageNet statistics of torchvision's pretrained backbones, in 0..255 units.
MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def train_transform(crop_size: int = 480, scale_range=(0.5, 2.0), hflip: float = 0.5) -> A.Compose:
    low, high = scale_range
    return A.Compose(
        [
            # RandomScale draws a factor in 1 + scale_limit.
            A.RandomScale(scale_limit=(low - 1.0, high - 1.0), interpolation=cv2.INTER_LINEAR, p=1.0),
            A.PadIfNeeded(
                crop_size, crop_size, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=IGNORE_INDEX,
                position="top_left",
            ),
            A.RandomCrop(crop_size, crop_size),
            A.HorizontalFlip(p=hflip),
        ]
    )


def val_transform(pad_size: int = 513) -> A.Compose:
    # Full resolution, padded bottom/right so every image of a batch has one shape; the 255 padding
    # is ignored by the metrics, so the scores equal those of unpadded images.
    return A.Compose(
        [
            A.PadIfNeeded(
                pad_size, pad_size, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=IGNORE_INDEX,
                position="top_left",
            ),
        ]
    )
