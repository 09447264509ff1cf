"""Masks and overlays for arbitrary image files: what code/scripts/predict.py writes."""

import glob
import sys
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from vocseg.data.voc import colorize, save_palette_png
from vocseg.datasets import read_image
from vocseg.errors import UserError


def collect_inputs(inputs) -> tuple[list[Path], list[str]]:
    """Files named, inside named folders (not recursive) or matched by glob patterns (``**`` recurses);
    returns them in order without duplicates, and one line for each input that matched nothing."""
    files, problems = {}, []
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        elif path.is_file():
            found = [path]
        else:
            found = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
        if not found:
            problems.append(f"{text}: no such file, or an empty folder or pattern")
        files.update((p.resolve(), None) for p in found)
    return list(files), problems


def output_paths(files, out: Path, overwrite: bool = False) -> dict:
    """input -> (mask PNG, overlay JPEG), named after the input's stem; clashes and old files are refused."""
    targets, seen = {}, {}
    for path in files:
        if path.stem in seen:
            raise UserError(
                f"{seen[path.stem]} and {path} would both write {out / path.stem}.png: "
                f"predict them into separate --out folders"
            )
        seen[path.stem] = path
        targets[path] = (out / f"{path.stem}.png", out / f"{path.stem}_overlay.jpg")
    existing = [str(p) for pair in targets.values() for p in pair if p.exists()]
    if existing and not overwrite:
        raise UserError(
            f"{existing[0]} already exists ({len(existing)} files would be replaced): "
            f"pick a new --out folder or pass --overwrite"
        )
    return targets


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """RGB image with the predicted objects tinted in their VOC colours; background left as it was."""
    blended = (image * (1 - alpha) + colorize(mask) * alpha).astype(np.uint8)
    return np.where((mask > 0)[..., None], blended, image)


def _write_jpeg(path: Path, rgb: np.ndarray) -> None:
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        raise UserError(f"OpenCV could not encode {path}")
    path.write_bytes(data.tobytes())


def predict_files(predictor, targets: dict, max_side=None) -> tuple[int, int]:
    """Writes each readable input's mask and overlay; reports each unreadable one in a line on stderr.
    Returns (written, skipped)."""
    written = skipped = 0
    for path, (mask_path, overlay_path) in tqdm(targets.items(), desc="images", unit="image"):
        try:
            image = read_image(path)
        except UserError:
            tqdm.write(f"skipped {path}: unreadable, truncated or not an image OpenCV reads", file=sys.stderr)
            skipped += 1
            continue
        mask = predictor.mask(image, max_side=max_side)
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        save_palette_png(mask_path, mask)
        _write_jpeg(overlay_path, overlay(image, mask))
        written += 1
    return written, skipped
