import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from vocseg.data.voc import IGNORE_INDEX, read_mask, save_palette_png
from vocseg.datasets import (
    SBDSegmentation,
    VOCSBDTrain,
    VOCSegmentation,
    check_disjoint,
    read_split,
    sbd_root_from_env,
    voc_root_from_env,
)
from vocseg.errors import UserError


@pytest.fixture
def data(synthetic_voc, tmp_path):
    """A private copy of the synthetic data that a test may break."""
    return Path(shutil.copytree(synthetic_voc, tmp_path / "data"))


def voc_dir(root):
    return root / "VOCdevkit" / "VOC2012"


def message(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text
    return text


def test_voc_items_are_raw_rgb_and_class_ids(synthetic_voc):
    ds = VOCSegmentation(synthetic_voc, "val")
    assert ds.ids == read_split(voc_dir(synthetic_voc) / "ImageSets/Segmentation/val.txt")
    item = ds[0]
    assert set(item) == {"image", "mask", "id"} and item["id"] == ds.ids[0]
    image, mask = item["image"], item["mask"]
    assert image.dtype == np.uint8 and image.shape == (96, 96, 3)
    assert mask.dtype == np.uint8 and mask.shape == (96, 96)
    with Image.open(ds.image_paths[0]) as reference:
        assert np.abs(np.asarray(reference.convert("RGB"), np.int16) - image).mean() < 2  # RGB, not BGR
    assert np.array_equal(mask, read_mask(ds.mask_paths[0]))
    assert IGNORE_INDEX in mask


def test_sbd_items(synthetic_voc):
    ds = SBDSegmentation(synthetic_voc / "SBD", "train_noval")
    item = ds[len(ds) - 1]
    assert item["image"].shape == (96, 96, 3) and item["mask"].dtype == np.uint8
    assert item["mask"].max() < 21 and ds.sources == ["sbd"] * len(ds)


def test_voc_sbd_train_is_the_union_minus_voc_val(synthetic_voc):
    sbd = synthetic_voc / "SBD"
    splits = voc_dir(synthetic_voc) / "ImageSets/Segmentation"
    voc_train = set((splits / "train.txt").read_text().split())
    voc_val = set((splits / "val.txt").read_text().split())
    sbd_all = set((sbd / "train.txt").read_text().split()) | set((sbd / "val.txt").read_text().split())
    expected = (voc_train | sbd_all) - voc_val

    ds = VOCSBDTrain(synthetic_voc, sbd)
    assert len(ds) == len(expected) and set(ds.ids) == expected
    assert not set(ds.ids) & voc_val
    assert sbd_all & voc_val  # the exclusion was actually exercised

    both = voc_train & sbd_all
    assert both
    for i, image_id in enumerate(ds.ids):
        assert ds.sources[i] == ("voc" if image_id in voc_train else "sbd")
        if image_id in both:
            # VOC's mask, recognisable by its void outline, wins over SBD's re-annotation
            assert ds.mask_paths[i] == voc_dir(synthetic_voc) / "SegmentationClass" / f"{image_id}.png"
            assert IGNORE_INDEX in ds[i]["mask"]
        if ds.sources[i] == "sbd":
            assert IGNORE_INDEX not in ds[i]["mask"]


def test_leaked_val_ids_are_refused():
    with pytest.raises(UserError, match="val.txt") as excinfo:
        check_disjoint(["2008_000001", "2008_000002"], {"2008_000002"}, "val.txt")
    assert "2008_000002" in message(excinfo)


def test_env_roots(monkeypatch, synthetic_voc):
    monkeypatch.setenv("DATASET_PATH", str(synthetic_voc))
    monkeypatch.setenv("SBD_DATASET_PATH", str(synthetic_voc / "SBD"))
    assert voc_root_from_env() == synthetic_voc
    assert sbd_root_from_env() == synthetic_voc / "SBD"


@pytest.mark.parametrize("value", [None, ""])
def test_unset_dataset_path(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("DATASET_PATH", raising=False)
    else:
        monkeypatch.setenv("DATASET_PATH", value)
    with pytest.raises(UserError) as excinfo:
        voc_root_from_env()
    assert "export DATASET_PATH=/path/that/contains/VOCdevkit" in message(excinfo)


def test_dataset_path_without_vocdevkit(monkeypatch, tmp_path, synthetic_voc):
    monkeypatch.setenv("DATASET_PATH", str(tmp_path))
    with pytest.raises(UserError) as excinfo:
        voc_root_from_env()
    assert str(tmp_path) in message(excinfo) and "VOCdevkit/VOC2012" in message(excinfo)
    with pytest.raises(UserError, match="use its parent"):
        VOCSegmentation(synthetic_voc / "VOCdevkit")


def test_unset_sbd_path(monkeypatch):
    monkeypatch.delenv("SBD_DATASET_PATH", raising=False)
    with pytest.raises(UserError, match="SBD_DATASET_PATH"):
        sbd_root_from_env()


def test_sbd_path_without_cls(tmp_path):
    (tmp_path / "img").mkdir()
    with pytest.raises(UserError) as excinfo:
        SBDSegmentation(tmp_path, "train")
    text = message(excinfo)
    assert str(tmp_path) in text and "cls/" in text and "SBD_DATASET_PATH" in text


def test_missing_split_file(data):
    (voc_dir(data) / "ImageSets/Segmentation/val.txt").unlink()
    with pytest.raises(UserError) as excinfo:
        VOCSegmentation(data, "val")
    assert str(voc_dir(data) / "ImageSets/Segmentation/val.txt") in message(excinfo)
    with pytest.raises(UserError, match="val.txt"):
        VOCSBDTrain(data, data / "SBD")


def test_split_lists_id_without_files(data):
    split_file = voc_dir(data) / "ImageSets/Segmentation/train.txt"
    split_file.write_text(split_file.read_text() + "2099_000001\n")
    with pytest.raises(UserError) as excinfo:
        VOCSegmentation(data, "train")
    text = message(excinfo)
    assert str(split_file) in text and "2099_000001" in text and "JPEGImages/2099_000001.jpg" in text


def test_missing_mask_named(data):
    image_id = read_split(voc_dir(data) / "ImageSets/Segmentation/val.txt")[3]
    mask = voc_dir(data) / "SegmentationClass" / f"{image_id}.png"
    mask.unlink()
    with pytest.raises(UserError) as excinfo:
        VOCSegmentation(data, "val")
    assert str(mask) in message(excinfo)


def test_missing_sbd_mat_named(data):
    image_id = read_split(data / "SBD/train.txt")[0]
    (data / "SBD/cls" / f"{image_id}.mat").unlink()
    with pytest.raises(UserError) as excinfo:
        SBDSegmentation(data / "SBD", "train")
    assert f"cls/{image_id}.mat" in message(excinfo) and "train.txt" in message(excinfo)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_truncated_jpeg(data):
    ds = VOCSegmentation(data, "val")
    truncate(ds.image_paths[2])
    with pytest.raises(UserError) as excinfo:
        ds[2]
    assert str(ds.image_paths[2]) in message(excinfo)


def test_corrupt_png_and_mat(data):
    voc = VOCSegmentation(data, "val")
    voc.mask_paths[0].write_bytes(b"not a png at all")
    with pytest.raises(UserError) as excinfo:
        voc[0]
    assert str(voc.mask_paths[0]) in message(excinfo)

    sbd = SBDSegmentation(data / "SBD", "val")
    truncate(sbd.mask_paths[0])
    with pytest.raises(UserError) as excinfo:
        sbd[0]
    assert str(sbd.mask_paths[0]) in message(excinfo)


def test_mask_with_unknown_class(data):
    ds = VOCSegmentation(data, "train")
    mask = read_mask(ds.mask_paths[1])
    mask[:5, :5] = 42
    save_palette_png(ds.mask_paths[1], mask)
    with pytest.raises(UserError) as excinfo:
        ds[1]
    text = message(excinfo)
    assert str(ds.mask_paths[1]) in text and "42" in text


def test_image_and_mask_sizes_differ(data):
    ds = VOCSegmentation(data, "train")
    save_palette_png(ds.mask_paths[0], np.zeros((64, 80), np.uint8))
    with pytest.raises(UserError) as excinfo:
        ds[0]
    text = message(excinfo)
    assert str(ds.image_paths[0]) in text and str(ds.mask_paths[0]) in text
    assert "96x96" in text and "80x64" in text


def test_exif_orientation_is_ignored(data):
    # A phone-style JPEG whose EXIF says "rotate 90 degrees": its mask matches the stored pixels, unrotated.
    ds = VOCSegmentation(data, "train")
    with Image.open(ds.image_paths[0]) as original:
        pixels = np.asarray(original.convert("RGB"))[:64]
    save_palette_png(ds.mask_paths[0], read_mask(ds.mask_paths[0])[:64])
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW
    Image.fromarray(pixels).save(ds.image_paths[0], quality=95, exif=exif)
    raw = np.fromfile(ds.image_paths[0], np.uint8)
    assert cv2.imdecode(raw, cv2.IMREAD_COLOR).shape == (96, 64, 3)  # the tag is real: OpenCV's default rotates
    item = ds[0]
    assert item["image"].shape == (64, 96, 3) and item["mask"].shape == (64, 96)
    with Image.open(ds.image_paths[0]) as reread:
        assert np.abs(np.asarray(reread.convert("RGB"), np.int16) - item["image"]).mean() < 2


def test_corrupt_image_inside_dataloader_worker(data):
    ds = VOCSegmentation(data, "val")
    truncate(ds.image_paths[0])
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1)
    with pytest.raises(Exception) as excinfo:
        next(iter(loader))
    assert str(ds.image_paths[0]) in str(excinfo.value)
