"""Readers for Pascal VOC 2012 and SBD segmentation data, returning raw uint8 arrays (no transforms).

Every item is {"image": HxWx3 RGB uint8, "mask": HxW uint8 class ids (255 = void), "id": str}.
Bad data raises UserError naming the file, so a broken dataset fails with one actionable line.
"""

import os
from pathlib import Path

import cv2
import numpy as np
import scipy.io
from PIL import Image
from torch.utils.data import Dataset

from vocseg.data.voc import IGNORE_INDEX, NUM_CLASSES, read_mask
from vocseg.errors import UserError

VOC_HINT = (
    "export DATASET_PATH=/path/that/contains/VOCdevkit "
    "(or create it with code/scripts/download_dataset.py or code/scripts/make_synthetic_voc.py)"
)
SBD_HINT = "set SBD_DATASET_PATH to the folder with cls/ img/ train.txt"


def voc_root_from_env() -> Path:
    root = os.environ.get("DATASET_PATH", "").strip()
    if not root:
        raise UserError(f"DATASET_PATH is not set; {VOC_HINT}")
    return _check_voc_root(_local_folder(root, "DATASET_PATH", "voc"))


def sbd_root_from_env() -> Path:
    root = os.environ.get("SBD_DATASET_PATH", "").strip()
    if not root:
        raise UserError(f"SBD_DATASET_PATH is not set; {SBD_HINT} (benchmark_RELEASE/dataset in the SBD download)")
    return _check_sbd_root(_local_folder(root, "SBD_DATASET_PATH", "sbd"))


def _local_folder(value: str, variable: str, kind: str) -> Path:
    """A folder as given, or the local copy of the ClearML dataset a clearml:// address names."""
    from vocseg.clearml import data as clearml_data

    return clearml_data.local_copy(value, variable, kind) if clearml_data.is_dataset_uri(value) else Path(value)


def _check_voc_root(root: Path) -> Path:
    if not (root / "VOCdevkit" / "VOC2012").is_dir():
        # Pointing at VOCdevkit itself is the usual slip.
        hint = " (it looks like VOCdevkit itself: use its parent)" if (root / "VOC2012").is_dir() else ""
        raise UserError(f"dataset path {root} has no VOCdevkit/VOC2012 sub-folder{hint}; {VOC_HINT}")
    return root


def _check_sbd_root(root: Path) -> Path:
    for sub in ("cls", "img"):
        if not (root / sub).is_dir():
            raise UserError(f"SBD path {root} has no {sub}/ sub-folder; {SBD_HINT}")
    return root


def read_split(path: Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"split file {path} does not exist; check the dataset path and the split name")
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise UserError(f"split file {path} lists no ids; restore it from the dataset archive")
    if len(set(ids)) < len(ids):
        # Twice listed = twice trained on or scored, silently: val mIoU would weigh that image double.
        seen = set()
        repeated = next(i for i in ids if i in seen or seen.add(i))
        raise UserError(f"split file {path} lists id {repeated} more than once; delete the repeated line(s)")
    return ids


def _require_files(split_file: Path, image_id: str, *paths: Path) -> None:
    for path in paths:
        if not path.is_file():
            raise UserError(f"split file {split_file} lists id {image_id} but {path} does not exist")


def _unreadable_image(path) -> UserError:
    return UserError(f"cannot read image {path}: missing, truncated or not an image; replace the file")


def _truncated_jpeg(head: bytes, tail: bytes) -> bool:
    # libjpeg decodes a cut-off JPEG as grey with only a warning, so look for its end marker;
    # the marker cannot occur inside compressed data, and the slack allows for trailing padding.
    return head[:2] == b"\xff\xd8" and b"\xff\xd9" not in tail[-1024:]


def read_image(path) -> np.ndarray:
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError:
        data = np.empty(0, np.uint8)
    truncated = _truncated_jpeg(data[:2].tobytes(), data[-1024:].tobytes())
    # EXIF orientation is ignored: the masks were drawn on the stored pixels, and PIL/torchvision read them so too.
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    image = None if truncated or not data.size else cv2.imdecode(data, flags)
    if image is None:
        raise _unreadable_image(path)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def image_size(path) -> tuple[int, int]:
    """(height, width) from the file's header, after read_image's truncation check, without decoding."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
            f.seek(max(0, os.fstat(f.fileno()).st_size - 1024))
            tail = f.read()
        with Image.open(path) as image:
            width, height = image.size
    except (OSError, SyntaxError, ValueError):  # PIL's ways of saying "not an image"
        raise _unreadable_image(path) from None
    if _truncated_jpeg(head, tail):
        raise _unreadable_image(path)
    return height, width


def read_sbd_mask(path) -> np.ndarray:
    try:
        mask = scipy.io.loadmat(str(path))["GTcls"]["Segmentation"][0, 0]
    except Exception as exc:  # scipy reports corrupt files with many exception types
        raise UserError(
            f"cannot read SBD mask {path} ({type(exc).__name__}: {exc}); it needs GTcls.Segmentation"
        ) from None
    if mask.ndim != 2:
        raise UserError(f"SBD mask {path} has shape {mask.shape}; GTcls.Segmentation must be 2-D")
    return mask


def check_mask_values(mask: np.ndarray, path) -> np.ndarray:
    # One vectorised pass over the pixels (np.unique would sort them all, ~25x slower on every sample);
    # sorting happens only to report a bad mask.
    invalid = ((mask < 0) | (mask >= NUM_CLASSES)) & (mask != IGNORE_INDEX)
    bad = np.unique(mask[invalid]) if invalid.any() else invalid[:0]
    if bad.size:
        shown = ", ".join(str(v) for v in bad[:10].tolist())
        raise UserError(
            f"mask {path} has values {shown} outside 0..{NUM_CLASSES - 1} and {IGNORE_INDEX}; fix or drop it"
        )
    return mask.astype(np.uint8, copy=False)


class _SegmentationFiles(Dataset):
    """Image/mask path pairs; subclasses fill ids, image_paths, mask_paths and sources ("voc"/"sbd")."""

    ids: list[str]
    image_paths: list[Path]
    mask_paths: list[Path]
    sources: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    def _mask(self, index: int) -> np.ndarray:
        path = self.mask_paths[index]
        return check_mask_values(read_mask(path) if self.sources[index] == "voc" else read_sbd_mask(path), path)

    def _check_sizes(self, index: int, image_hw, mask_hw) -> None:
        if tuple(image_hw) != tuple(mask_hw):
            raise UserError(
                f"image {self.image_paths[index]} is {image_hw[1]}x{image_hw[0]} but mask {self.mask_paths[index]} "
                f"is {mask_hw[1]}x{mask_hw[0]} (WxH); they must match"
            )

    def __getitem__(self, index: int) -> dict:
        image = read_image(self.image_paths[index])
        mask = self._mask(index)
        self._check_sizes(index, image.shape[:2], mask.shape)
        return {"image": image, "mask": mask, "id": self.ids[index]}

    def check(self, index: int) -> tuple[int, int]:
        """What drawing sample ``index`` would reject, found without decoding its image (header, end marker,
        the whole mask); returns its (height, width)."""
        size = image_size(self.image_paths[index])
        self._check_sizes(index, size, self._mask(index).shape)
        return size


def _voc_files(voc: Path, image_id: str) -> tuple[Path, Path]:
    return voc / "JPEGImages" / f"{image_id}.jpg", voc / "SegmentationClass" / f"{image_id}.png"


def _sbd_files(sbd: Path, image_id: str) -> tuple[Path, Path]:
    return sbd / "img" / f"{image_id}.jpg", sbd / "cls" / f"{image_id}.mat"


class VOCSegmentation(_SegmentationFiles):
    """VOC 2012 segmentation split (train, val or trainval); root is the folder containing VOCdevkit/."""

    def __init__(self, root, image_set: str = "train"):
        self.root = _check_voc_root(Path(root))
        voc = self.root / "VOCdevkit" / "VOC2012"
        split_file = voc / "ImageSets" / "Segmentation" / f"{image_set}.txt"
        self.ids = read_split(split_file)
        self.image_paths, self.mask_paths = [], []
        for image_id in self.ids:
            image_path, mask_path = _voc_files(voc, image_id)
            _require_files(split_file, image_id, image_path, mask_path)
            self.image_paths.append(image_path)
            self.mask_paths.append(mask_path)
        self.sources = ["voc"] * len(self.ids)


class SBDSegmentation(_SegmentationFiles):
    """SBD split (train, val or train_noval); root is the folder holding cls/ img/ train.txt."""

    def __init__(self, root, image_set: str = "train"):
        self.root = _check_sbd_root(Path(root))
        split_file = self.root / f"{image_set}.txt"
        self.ids = read_split(split_file)
        self.image_paths, self.mask_paths = [], []
        for image_id in self.ids:
            image_path, mask_path = _sbd_files(self.root, image_id)
            _require_files(split_file, image_id, image_path, mask_path)
            self.image_paths.append(image_path)
            self.mask_paths.append(mask_path)
        self.sources = ["sbd"] * len(self.ids)


def check_disjoint(ids, val_ids, val_file) -> None:
    leaked = sorted(set(ids) & set(val_ids))
    if leaked:
        raise UserError(
            f"{len(leaked)} ids of {val_file} (e.g. {leaked[0]}) ended up in the training set; report this bug"
        )


class VOCSBDTrain(_SegmentationFiles):
    """The usual augmented training set: VOC train + SBD train + SBD val, minus every VOC val id.

    SBD re-annotated some VOC images; where VOC has its own mask for an id, VOC's is used
    (it carries the void outline that evaluation assumes).
    """

    def __init__(self, voc_root, sbd_root):
        self.voc_root = _check_voc_root(Path(voc_root))
        self.sbd_root = _check_sbd_root(Path(sbd_root))
        voc = self.voc_root / "VOCdevkit" / "VOC2012"
        splits = voc / "ImageSets" / "Segmentation"
        val_file = splits / "val.txt"
        val_ids = set(read_split(val_file))
        voc_train_file = splits / "train.txt"
        listed: dict[str, Path] = {}  # id -> first split file naming it, for error messages
        for split_file in (voc_train_file, self.sbd_root / "train.txt", self.sbd_root / "val.txt"):
            for image_id in read_split(split_file):
                listed.setdefault(image_id, split_file)
        self.ids = sorted(image_id for image_id in listed if image_id not in val_ids)
        self.image_paths, self.mask_paths, self.sources = [], [], []
        for image_id in self.ids:
            image_path, mask_path = _voc_files(voc, image_id)
            # VOC's JPEGImages holds SBD-only images too, so only a VOC mask makes an id "VOC's".
            source = "voc" if mask_path.is_file() or listed[image_id] == voc_train_file else "sbd"
            if source == "sbd":
                image_path, mask_path = _sbd_files(self.sbd_root, image_id)
            _require_files(listed[image_id], image_id, image_path, mask_path)
            self.image_paths.append(image_path)
            self.mask_paths.append(mask_path)
            self.sources.append(source)
        check_disjoint(self.ids, val_ids, val_file)
