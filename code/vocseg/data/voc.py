"""Pascal VOC class names, label conventions and the palette PNG format its masks use."""

from pathlib import Path

import numpy as np
from PIL import Image

from vocseg.errors import UserError

VOC_CLASSES = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
NUM_CLASSES = len(VOC_CLASSES)
# VOC marks object outlines and ambiguous regions with 255; losses and metrics must skip it.
IGNORE_INDEX = 255


def voc_palette() -> np.ndarray:
    """The (256, 3) uint8 colour map of the VOC devkit: bits of the index spread over R, G, B."""
    index = np.arange(256)
    palette = np.zeros((256, 3), dtype=np.int64)
    for bit in range(8):
        for channel in range(3):
            palette[:, channel] |= ((index >> (3 * bit + channel)) & 1) << (7 - bit)
    return palette.astype(np.uint8)


def colorize(mask: np.ndarray) -> np.ndarray:
    """HxW class indices -> HxWx3 RGB in VOC colours (255 becomes the devkit's cream outline colour)."""
    return voc_palette()[np.asarray(mask, dtype=np.uint8)]


def save_palette_png(path, mask: np.ndarray) -> None:
    """Write class indices as a palette PNG, the format of VOC's SegmentationClass/*.png."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.dtype != np.uint8:
        raise ValueError(f"mask must be a 2-D uint8 array, got shape {mask.shape} dtype {mask.dtype}")
    image = Image.fromarray(mask)
    image.putpalette(voc_palette().tobytes())  # turns the "L" image into "P" without touching indices
    image.save(path, format="PNG")


def read_mask(path) -> np.ndarray:
    """Read a palette PNG as its raw indices; converting to RGB first would lose the class ids."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            mask = np.array(image)
    except (OSError, SyntaxError, ValueError) as exc:  # PIL's ways of saying "corrupt or truncated"
        raise UserError(f"cannot read mask {path} ({exc}); replace it with a valid palette PNG") from None
    if mode not in ("P", "L"):
        raise UserError(f"mask {path} is a {mode!r} image; masks must be palette (P) PNGs holding class indices")
    return mask.astype(np.uint8, copy=False)
