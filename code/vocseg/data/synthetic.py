"""A tiny stand-in for Pascal VOC 2012 + SBD, laid out exactly like the real downloads.

It lets the whole pipeline (readers, training, evaluation) run and be tested without the 2 GB
datasets. Objects are flat shapes whose colour identifies their class, so a small CNN learns
them in minutes and a broken pipeline shows up as a low score rather than a plausible one.
"""

import colorsys
import io
from pathlib import Path

import cv2
import numpy as np
import scipy.io
import scipy.sparse

from vocseg.data.voc import IGNORE_INDEX, NUM_CLASSES, save_palette_png
from vocseg.errors import UserError


def _class_colours() -> np.ndarray:
    # Ten hues at two tones: neighbouring ids differ in hue, id c and c+10 in brightness.
    colours = np.zeros((NUM_CLASSES, 3), np.float32)
    for c in range(1, NUM_CLASSES):
        saturation, value = (0.8, 0.95) if c <= 10 else (1.0, 0.55)
        colours[c] = np.array(colorsys.hsv_to_rgb(((c - 1) % 10) / 10, saturation, value)) * 255
    return colours


CLASS_COLOURS = _class_colours()
# savemat stamps the creation time into the header; a fixed one keeps reruns byte-identical.
_MAT_HEADER = b"MATLAB 5.0 MAT-file, written by vocseg.data.synthetic".ljust(116, b" ")


def _draw_object(canvas: np.ndarray, value: int, rng: np.random.Generator) -> None:
    h, w = canvas.shape
    radius = min(h, w) * rng.uniform(0.10, 0.30)
    cx, cy = rng.uniform(0.15, 0.85) * w, rng.uniform(0.15, 0.85) * h
    kind = rng.integers(3)
    if kind == 0:
        axes = (round(radius), round(radius * rng.uniform(0.5, 1.0)))
        cv2.ellipse(canvas, (round(cx), round(cy)), axes, float(rng.uniform(0, 180)), 0, 360, value, -1)
        return
    if kind == 1:
        box = ((cx, cy), (2 * radius, 2 * radius * rng.uniform(0.5, 1.0)), float(rng.uniform(0, 90)))
        points = cv2.boxPoints(box)
    else:
        # Evenly spread angles keep the polygon blob-like instead of a sliver.
        n = int(rng.integers(5, 9))
        angles = (np.arange(n) + rng.uniform(-0.3, 0.3, n)) * 2 * np.pi / n + rng.uniform(0, 2 * np.pi)
        radii = radius * rng.uniform(0.6, 1.0, n)
        points = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)
    cv2.fillPoly(canvas, [np.round(points).astype(np.int32)], value)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    # Grey-ish so that only objects carry saturated colour; smooth blotches give it texture.
    blotches = cv2.resize(rng.normal(0, 20, (6, 6)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    tint = rng.uniform(70, 190) + rng.normal(0, 6, 3)
    return blotches[:, :, None] + tint.astype(np.float32)


def _render(rng: np.random.Generator, guaranteed_class: int, size) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RGB image, instance-id map and instance -> class table for one picture."""
    h, w = size
    # The guaranteed object is drawn last, on top, so it is always visible.
    classes = [int(c) for c in rng.integers(1, NUM_CLASSES, int(rng.integers(0, 4)))] + [guaranteed_class]
    instances = np.zeros((h, w), np.uint8)
    for k in range(1, len(classes) + 1):
        _draw_object(instances, k, rng)
    image = _background(rng, h, w)
    for k, c in enumerate(classes, start=1):
        image[instances == k] = CLASS_COLOURS[c] + rng.normal(0, 6, 3)
    image += rng.normal(0, 7, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), instances, np.array([0] + classes, np.uint8)


def _void_band(instances: np.ndarray) -> np.ndarray:
    # VOC outlines every object with 255 (about 5 px at 500 px); scale that to the image size.
    r = max(1, round(min(instances.shape) / 200))
    kernel = np.ones((2 * r + 1, 2 * r + 1), np.uint8)
    return cv2.dilate(instances, kernel) != cv2.erode(instances, kernel)


def _boundaries(masks: list[np.ndarray]) -> np.ndarray:
    """MATLAB cell (n x 1) of sparse logical 1-px inner outlines, as SBD stores them."""
    cell = np.empty((len(masks), 1), dtype=object)
    for i, m in enumerate(masks):
        m = m.astype(np.uint8)
        cell[i, 0] = scipy.sparse.csc_matrix((m > 0) & (cv2.erode(m, np.ones((3, 3), np.uint8)) == 0))
    return cell


def _write_mat(path: Path, name: str, struct: dict) -> None:
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, {name: struct})
    path.write_bytes(_MAT_HEADER + buffer.getvalue()[len(_MAT_HEADER) :])


def _write_sbd_mats(sbd: Path, image_id: str, semantic: np.ndarray, instances: np.ndarray, table: np.ndarray) -> None:
    present = [c for c in range(1, NUM_CLASSES) if (semantic == c).any()]
    _write_mat(
        sbd / "cls" / f"{image_id}.mat",
        "GTcls",
        {
            "Segmentation": semantic,
            "Boundaries": _boundaries([semantic == c for c in range(1, NUM_CLASSES)]),
            "CategoriesPresent": np.array(present, np.uint8).reshape(-1, 1),
        },
    )
    # Hidden instances vanish from the instance map; the rest are renumbered 1..n as in SBD.
    visible = [k for k in range(1, len(table)) if (instances == k).any()]
    renumber = np.zeros(256, np.uint8)
    renumber[visible] = np.arange(1, len(visible) + 1)
    _write_mat(
        sbd / "inst" / f"{image_id}.mat",
        "GTinst",
        {
            "Segmentation": renumber[instances],
            "Boundaries": _boundaries([instances == k for k in visible]),
            "Categories": table[visible].reshape(-1, 1),
        },
    )


def _image_id(k: int) -> str:
    # Spread over the VOC years so splits mix them like the real lists do; distinct for every k.
    return f"{2007 + k % 5}_{k // 5 + 1:06d}"


def _jpeg(image: np.ndarray, image_id: str) -> bytes:
    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    if not ok:
        raise RuntimeError(f"OpenCV could not encode {image_id}.jpg")
    return jpeg.tobytes()


def _write_split(path: Path, ids) -> None:
    path.write_text("".join(f"{i}\n" for i in sorted(ids)))


def _write_test_split(voc: Path, n_test: int, first: int, size, seed: int) -> None:
    """JPEGImages plus ImageSets/Segmentation/test.txt and no masks, as VOC2012test.tar unpacks.

    Real test images differ in size, and a submission must come back at each one's own size, so
    every side is drawn between 3/4 and 5/4 of ``size``. Numbering continues after the other
    splits' images (``first``), which leaves those byte-identical to a run without a test split.
    """
    ids = []
    for k in range(first, first + n_test):
        rng = np.random.default_rng([seed, k])
        h, w = (int(round(side * rng.uniform(0.75, 1.25))) for side in size)
        image, _, _ = _render(rng, (k - first) % (NUM_CLASSES - 1) + 1, (h, w))
        image_id = _image_id(k)
        (voc / "JPEGImages" / f"{image_id}.jpg").write_bytes(_jpeg(image, image_id))
        ids.append(image_id)
    _write_split(voc / "ImageSets" / "Segmentation" / "test.txt", ids)


def _assign_splits(rng, n_train: int, n_val: int):
    """Image ids and their VOC / SBD splits: SBD re-annotates every 2nd VOC train and every 3rd VOC val image
    and adds images of its own, a quarter of each group going to SBD val."""
    n_sbd_only = max(2, n_train // 2)
    total = n_train + n_val + n_sbd_only
    all_ids = [_image_id(k) for k in range(total)]
    order = rng.permutation(total)
    voc_train = sorted(all_ids[k] for k in order[:n_train])
    voc_val = sorted(all_ids[k] for k in order[n_train : n_train + n_val])
    sbd_only = sorted(all_ids[k] for k in order[n_train + n_val :])
    sbd_train, sbd_val = [], []
    for group in (voc_train[::2], voc_val[::3], sbd_only):
        for i, image_id in enumerate(group):
            (sbd_val if i % 4 == 1 else sbd_train).append(image_id)
    return all_ids, voc_train, voc_val, sbd_only, sbd_train, sbd_val


def _check_request(out: Path, n_train: int, n_val: int, n_test: int, h: int, w: int) -> None:
    if n_train < 1 or n_val < 1 or n_test < 0:
        raise UserError(
            f"need at least 1 train and 1 val image and no negative count, got --train {n_train} "
            f"--val {n_val} --test {n_test}"
        )
    if min(h, w) < 16:
        raise UserError(f"--size {h} {w} is too small; use at least 16 16")
    if (out / "VOCdevkit").exists() or (out / "SBD").exists():
        raise UserError(f"{out} already holds VOCdevkit/ or SBD/; pick a new output folder or delete them")


def _make_folders(voc: Path, sbd: Path) -> None:
    for folder in (
        voc / "JPEGImages",
        voc / "SegmentationClass",
        voc / "ImageSets" / "Segmentation",
        sbd / "img",
        sbd / "cls",
        sbd / "inst",
    ):
        folder.mkdir(parents=True, exist_ok=True)


def _write_images(voc: Path, sbd: Path, all_ids, voc_ids, sbd_ids, groups, size, seed: int) -> None:
    """Every image of ``all_ids`` as a JPEG, with a VOC mask when in ``voc_ids`` and SBD files when in
    ``sbd_ids``; ``groups`` are the splits whose every class should appear in."""
    # Cycling the guaranteed class through each split puts every class in every split of >= 20.
    guaranteed = {image_id: i % (NUM_CLASSES - 1) + 1 for group in groups for i, image_id in enumerate(group)}
    for k, image_id in enumerate(all_ids):
        image, instances, table = _render(np.random.default_rng([seed, k]), guaranteed[image_id], size)
        semantic = table[instances]
        jpeg = _jpeg(image, image_id)
        # Real VOC2012 JPEGImages also holds the SBD-only images; only SegmentationClass is partial.
        (voc / "JPEGImages" / f"{image_id}.jpg").write_bytes(jpeg)
        if image_id in voc_ids:
            voc_mask = semantic.copy()
            voc_mask[_void_band(instances)] = IGNORE_INDEX
            save_palette_png(voc / "SegmentationClass" / f"{image_id}.png", voc_mask)
        if image_id in sbd_ids:
            (sbd / "img" / f"{image_id}.jpg").write_bytes(jpeg)
            _write_sbd_mats(sbd, image_id, semantic, instances, table)


def _write_split_files(voc: Path, sbd: Path, voc_train, voc_val, sbd_train, sbd_val) -> list:
    """VOC's and SBD's split lists; returns SBD's train_noval (its train without VOC val images)."""
    splits = voc / "ImageSets" / "Segmentation"
    _write_split(splits / "train.txt", voc_train)
    _write_split(splits / "val.txt", voc_val)
    _write_split(splits / "trainval.txt", voc_train + voc_val)
    train_noval = sorted(set(sbd_train) - set(voc_val))
    _write_split(sbd / "train.txt", sbd_train)
    _write_split(sbd / "val.txt", sbd_val)
    _write_split(sbd / "train_noval.txt", train_noval)
    return train_noval


def make_synthetic_voc(out, n_train: int, n_val: int, size=(128, 128), seed: int = 0, n_test: int = 0) -> dict:
    """Write OUT/VOCdevkit/VOC2012 and OUT/SBD; return their paths and split sizes.

    SBD overlaps VOC as in reality: it re-annotates some VOC train and some VOC val images and
    adds images VOC never segmented, so the VOC val exclusion of VOC+SBD training is exercised.
    ``n_test`` adds a ``test`` split laid out like the VOC2012 test archive (see ``_write_test_split``).
    """
    out = Path(out)
    h, w = (int(v) for v in size)
    _check_request(out, n_train, n_val, n_test, h, w)
    all_ids, voc_train, voc_val, sbd_only, sbd_train, sbd_val = _assign_splits(
        np.random.default_rng(seed), n_train, n_val
    )
    total = len(all_ids)
    voc = out / "VOCdevkit" / "VOC2012"
    sbd = out / "SBD"
    _make_folders(voc, sbd)
    _write_images(
        voc,
        sbd,
        all_ids,
        voc_ids=set(voc_train) | set(voc_val),
        sbd_ids=set(sbd_train) | set(sbd_val),
        groups=(voc_train, voc_val, sbd_only),
        size=(h, w),
        seed=seed,
    )
    train_noval = _write_split_files(voc, sbd, voc_train, voc_val, sbd_train, sbd_val)
    if n_test:
        _write_test_split(voc, n_test, total, (h, w), seed)
    return {
        "voc_root": out,
        "sbd_root": sbd,
        "images": total + n_test,
        "voc_test": n_test,
        "voc_train": len(voc_train),
        "voc_val": len(voc_val),
        "sbd_train": len(sbd_train),
        "sbd_val": len(sbd_val),
        "sbd_train_noval": len(train_noval),
    }
