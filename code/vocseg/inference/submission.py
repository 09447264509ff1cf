"""A VOC2012 test-server submission: palette PNGs at each image's own size, checked, then packed.

The server scores ``results/VOC2012/Segmentation/<comp>_test_cls/<id>.png`` inside one archive: comp5
for models trained on VOC data only, comp6 for models that also saw other data (SBD among them).
"""

import tarfile
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from vocseg.data.voc import NUM_CLASSES, save_palette_png, voc_palette
from vocseg.datasets import read_image, read_split
from vocseg.errors import UserError

COMPETITIONS = {"comp5": "trained on VOC2012 data only", "comp6": "trained with extra data (e.g. SBD)"}


def results_folder(out, competition: str) -> Path:
    return Path(out) / "results" / "VOC2012" / "Segmentation" / f"{competition}_test_cls"


def listed_images(voc_root, image_set: str = "test") -> dict:
    """id -> JPEG path for every id of ImageSets/Segmentation/<image_set>.txt, all checked to exist."""
    voc = Path(voc_root) / "VOCdevkit" / "VOC2012"
    split_file = voc / "ImageSets" / "Segmentation" / f"{image_set}.txt"
    if not split_file.is_file():
        raise UserError(
            f"{split_file} does not exist: unpack VOC2012test.tar into {voc_root} (it adds the test "
            f"list and images to VOCdevkit/VOC2012)"
        )
    images = {image_id: voc / "JPEGImages" / f"{image_id}.jpg" for image_id in read_split(split_file)}
    missing = [str(p) for p in images.values() if not p.is_file()]
    if missing:
        raise UserError(
            f"{split_file} lists {len(missing)} images that do not exist (e.g. {missing[0]}): "
            f"unpack the whole test archive"
        )
    return images


def check_results(folder: Path, sizes: dict) -> None:
    """Every listed id has exactly one PNG, in mode P with the VOC palette, at its image's (h, w), ids 0..20."""
    found = {p.name for p in folder.iterdir()}
    expected = {f"{image_id}.png" for image_id in sizes}
    if found != expected:
        missing, extra = sorted(expected - found), sorted(found - expected)
        raise UserError(
            f"{folder} does not match the test list: missing {missing[:3]}, unexpected {extra[:3]}; "
            f"write the submission into a new --out folder"
        )
    for image_id, size in sizes.items():
        path = folder / f"{image_id}.png"
        with Image.open(path) as png:
            problem = _png_problem(png, size)
        if problem:
            raise UserError(f"{path}: {problem}; the server would reject it")


def _png_problem(png: Image.Image, size) -> str:
    height, width = size
    if png.mode != "P":
        return f"mode is {png.mode}, not P"
    palette = voc_palette()[:NUM_CLASSES].ravel().tolist()
    if png.getpalette()[: len(palette)] != palette:
        return "the palette is not VOC's"
    if png.size != (width, height):
        return f"it is {png.width}x{png.height}, not the image's {width}x{height}"
    if int(np.asarray(png).max()) >= NUM_CLASSES:
        return f"it holds class ids above {NUM_CLASSES - 1}"
    return ""


def pack(out: Path, competition: str) -> Path:
    # Only this competition's folder: an --out holding comp5 and comp6 results gives one archive each.
    folder = results_folder(out, competition)
    archive = Path(out) / f"{competition}_test_cls.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.relative_to(out).as_posix())
    return archive


def new_results_folder(out, competition: str) -> Path:
    """The empty ``<comp>_test_cls`` folder under ``out``; an earlier submission there is never overwritten."""
    if competition not in COMPETITIONS:
        raise UserError(
            f"competition {competition!r} is unknown: use comp5 ({COMPETITIONS['comp5']}) or "
            f"comp6 ({COMPETITIONS['comp6']})"
        )
    folder = results_folder(out, competition)
    if folder.exists() and any(folder.iterdir()):
        raise UserError(f"{folder} already holds predictions: pick a new --out folder or delete it")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_submission(predictor, images: dict, out, competition: str) -> Path:
    """Predicts every listed image (``listed_images``), writes and checks the PNGs, returns the archive."""
    folder = new_results_folder(out, competition)
    sizes = {}
    for image_id, path in tqdm(images.items(), desc="test images", unit="image"):
        image = read_image(path)
        sizes[image_id] = image.shape[:2]
        save_palette_png(folder / f"{image_id}.png", predictor.mask(image))
    check_results(folder, sizes)
    return pack(out, competition)
