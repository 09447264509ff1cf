"""Albumentations + OpenCV pipelines.

Pipelines stop at uint8: images travel to the device as uint8 (4x less to copy than float32) and
are normalised there by ``vocseg.data.normalize``. Masks keep 255 (void) everywhere: they are resized
with nearest neighbour and padded with 255, so void pixels never turn into background.
"""

import albumentations as A
import cv2
import numpy as np
from albumentations.core.transforms_interface import DualTransform

from vocseg.data.voc import IGNORE_INDEX


def _crop_axis(length: int, scale: float, crop: int, u: float) -> tuple:
    """(source start, source length, output length) of one axis of RandomScaleCrop."""
    scaled = max(1, int(length * scale))  # the size RandomScale would give this axis
    if scaled <= crop:
        return 0, length, scaled  # all of it, padded up to the crop afterwards
    # The source pixels that become the crop: resizing them alone equals cropping the scaled image, up to
    # rounding the window to whole source pixels (the scale then differs by at most one pixel over the crop).
    span = min(length, max(1, round(crop * length / scaled)))
    return int(u * (length - span + 1)), span, crop


class RandomScaleCrop(DualTransform):
    """RandomScale(scale_range) + PadIfNeeded(top_left, 0 / 255) + RandomCrop, as one step that resizes only
    the source window that ends up in the crop.

    Same distribution of crops as the three transforms in a row, but the work no longer grows with the
    scale: at scale 2.0 the chained version resizes a 500x375 image to 1000x750 and then throws 70% of it
    away. Images are resized bilinearly, masks with nearest neighbour at pixel centres (INTER_NEAREST_EXACT,
    aligned with the bilinear image); padding is bottom/right with ``fill`` / ``fill_mask``.
    """

    def __init__(
        self, crop_size: int = 480, scale_range=(0.5, 2.0), fill: int = 0, fill_mask: int = IGNORE_INDEX, p: float = 1.0
    ):
        super().__init__(p=p)
        self.crop_size, self.scale_range = int(crop_size), tuple(scale_range)
        self.fill, self.fill_mask = fill, fill_mask

    def get_params_dependent_on_data(self, params, data):
        height, width = params["shape"][:2]
        scale = self.py_random.uniform(*self.scale_range)
        u_row, u_col = self.py_random.random(), self.py_random.random()
        return {
            "rows": _crop_axis(height, scale, self.crop_size, u_row),
            "cols": _crop_axis(width, scale, self.crop_size, u_col),
        }

    def _crop(self, array: np.ndarray, rows, cols, interpolation: int, fill) -> np.ndarray:
        (top, height, out_h), (left, width, out_w) = rows, cols
        array = array[top : top + height, left : left + width]
        if (out_h, out_w) != (height, width):
            array = cv2.resize(array, (out_w, out_h), interpolation=interpolation)
        size = self.crop_size
        if (out_h, out_w) != (size, size):
            array = cv2.copyMakeBorder(array, 0, size - out_h, 0, size - out_w, cv2.BORDER_CONSTANT, value=fill)
        return np.ascontiguousarray(array)

    def apply(self, img, rows=None, cols=None, **params):
        return self._crop(img, rows, cols, cv2.INTER_LINEAR, (self.fill,) * 4)

    def apply_to_mask(self, mask, rows=None, cols=None, **params):
        return self._crop(mask, rows, cols, cv2.INTER_NEAREST_EXACT, (self.fill_mask,) * 4)

    def get_transform_init_args_names(self):
        return ("crop_size", "scale_range", "fill", "fill_mask")


def train_transform(crop_size: int = 480, scale_range=(0.5, 2.0), hflip: float = 0.5) -> A.Compose:
    return A.Compose(
        [RandomScaleCrop(crop_size, scale_range, fill=0, fill_mask=IGNORE_INDEX), A.HorizontalFlip(p=hflip)]
    )
