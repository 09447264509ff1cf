import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torchvision
from PIL import Image

from vocseg.data.synthetic import make_synthetic_voc
from vocseg.data.voc import IGNORE_INDEX, colorize, read_mask, voc_palette
from vocseg.datasets import SBDSegmentation, VOCSegmentation
from vocseg.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def split(path):
    return Path(path).read_text().split()


def voc_split(root, name):
    return split(root / "VOCdevkit/VOC2012/ImageSets/Segmentation" / f"{name}.txt")


def snapshot(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_palette_matches_the_devkit():
    palette = voc_palette()
    assert palette.shape == (256, 3) and palette.dtype == np.uint8
    assert palette[0].tolist() == [0, 0, 0]
    assert palette[1].tolist() == [128, 0, 0]  # aeroplane
    assert palette[15].tolist() == [192, 128, 128]  # person
    assert palette[255].tolist() == [224, 224, 192]  # void outline
    assert len({tuple(c) for c in palette}) == 256
    assert colorize(np.array([[0, 15, 255]], np.uint8)).tolist() == [[[0, 0, 0], [192, 128, 128], [224, 224, 192]]]


@pytest.mark.parametrize("image_set", ["train", "val", "trainval"])
def test_torchvision_reads_voc_unchanged(synthetic_voc, image_set):
    reference = torchvision.datasets.VOCSegmentation(
        root=synthetic_voc, year="2012", image_set=image_set, download=False
    )
    ours = VOCSegmentation(synthetic_voc, image_set)
    assert [Path(p).stem for p in reference.images] == ours.ids == voc_split(synthetic_voc, image_set)
    for i in range(len(ours)):
        ref_image, ref_mask = reference[i]
        item = ours[i]
        assert ref_mask.mode == "P"
        assert np.array_equal(np.array(ref_mask), item["mask"])
        # Two JPEG decoders may round differently, but channel order or geometry bugs would be large.
        assert np.abs(np.asarray(ref_image, np.int16) - item["image"]).mean() < 2


@pytest.mark.parametrize("image_set", ["train", "val", "train_noval"])
def test_torchvision_reads_sbd_unchanged(synthetic_voc, image_set):
    sbd = synthetic_voc / "SBD"
    reference = torchvision.datasets.SBDataset(sbd, image_set=image_set, mode="segmentation", download=False)
    ours = SBDSegmentation(sbd, image_set)
    assert [Path(p).stem for p in reference.images] == ours.ids == split(sbd / f"{image_set}.txt")
    for i in range(len(ours)):
        assert np.array_equal(np.array(reference[i][1]), ours[i]["mask"])


def test_sbd_mat_files_have_sbd_structure(synthetic_voc):
    sbd = synthetic_voc / "SBD"
    boundaries = torchvision.datasets.SBDataset(sbd, image_set="val", mode="boundaries", download=False)
    _, edges = boundaries[0]
    image_id = split(sbd / "val.txt")[0]
    cls = scipy.io.loadmat(sbd / "cls" / f"{image_id}.mat")["GTcls"][0, 0]
    inst = scipy.io.loadmat(sbd / "inst" / f"{image_id}.mat")["GTinst"][0, 0]
    semantic = cls["Segmentation"]
    assert semantic.dtype == np.uint8
    assert edges.shape == (20, *semantic.shape)
    present = sorted(set(np.unique(semantic).tolist()) - {0})
    assert cls["CategoriesPresent"].ravel().tolist() == present
    for c in range(1, 21):
        # outlines lie on their own class and exist exactly for the classes present
        assert not (edges[c - 1].astype(bool) & (semantic != c)).any()
        assert edges[c - 1].any() == (c in present)
    instances, categories = inst["Segmentation"], inst["Categories"].ravel()
    assert inst["Boundaries"].shape == (len(categories), 1)
    assert sorted(set(np.unique(instances).tolist()) - {0}) == list(range(1, len(categories) + 1))
    for k, c in enumerate(categories, start=1):
        assert (semantic[instances == k] == c).all()


def test_masks_are_palette_pngs(synthetic_voc):
    image_id = voc_split(synthetic_voc, "train")[0]
    with Image.open(synthetic_voc / f"VOCdevkit/VOC2012/SegmentationClass/{image_id}.png") as png:
        assert png.mode == "P"
        assert png.getpalette()[: 3 * 21] == voc_palette()[:21].ravel().tolist()


def test_every_class_appears_in_train_and_val(synthetic_voc):
    for image_set in ("train", "val"):
        ds = VOCSegmentation(synthetic_voc, image_set)
        seen = set().union(*(np.unique(ds[i]["mask"]).tolist() for i in range(len(ds))))
        assert seen == set(range(21)) | {IGNORE_INDEX}


def test_voc_masks_have_void_outlines_and_sbd_none(synthetic_voc):
    voc = VOCSegmentation(synthetic_voc, "trainval")
    sbd = SBDSegmentation(synthetic_voc / "SBD", "train")
    shared = 0
    for i, image_id in enumerate(voc.ids):
        mask = voc[i]["mask"]
        assert 0 < (mask == IGNORE_INDEX).mean() < 0.3
        if image_id in sbd.ids:
            shared += 1
            sbd_mask = sbd[sbd.ids.index(image_id)]["mask"]
            off_band = mask != IGNORE_INDEX
            assert np.array_equal(mask[off_band], sbd_mask[off_band])
    assert shared > 0
    for i in range(len(sbd)):
        assert IGNORE_INDEX not in sbd[i]["mask"]


def test_splits_overlap_like_the_real_datasets(synthetic_voc):
    train, val, trainval = (set(voc_split(synthetic_voc, s)) for s in ("train", "val", "trainval"))
    sbd_train, sbd_val, noval = (
        set(split(synthetic_voc / "SBD" / f"{s}.txt")) for s in ("train", "val", "train_noval")
    )
    assert not train & val and trainval == train | val
    assert not sbd_train & sbd_val
    assert sbd_train & val and sbd_val & val  # VOC val leaks into both SBD splits
    assert (sbd_train | sbd_val) & train
    assert (sbd_train | sbd_val) - trainval  # images VOC never segmented
    assert noval == sbd_train - val
    jpegs = {p.stem for p in (synthetic_voc / "VOCdevkit/VOC2012/JPEGImages").glob("*.jpg")}
    pngs = {p.stem for p in (synthetic_voc / "VOCdevkit/VOC2012/SegmentationClass").glob("*.png")}
    assert pngs == trainval and jpegs == trainval | sbd_train | sbd_val


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        make_synthetic_voc(tmp_path / name, 4, 3, size=(40, 48), seed=seed)
    a, b, c = (snapshot(tmp_path / name) for name in "abc")
    assert a == b
    assert a != c
    image = read_mask(next((tmp_path / "a/VOCdevkit/VOC2012/SegmentationClass").glob("*.png")))
    assert image.shape == (40, 48)


def test_refuses_to_write_over_existing_data(tmp_path):
    make_synthetic_voc(tmp_path, 1, 1, size=(32, 32))
    with pytest.raises(UserError, match="already holds"):
        make_synthetic_voc(tmp_path, 1, 1, size=(32, 32))


def test_script_writes_data_and_prints_exports(tmp_path):
    out = tmp_path / "syn"
    cmd = [
        sys.executable,
        "code/scripts/make_synthetic_voc.py",
        str(out),
        "--train",
        "3",
        "--val",
        "2",
        "--size",
        "32",
        "32",
    ]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"export DATASET_PATH={out.resolve()}\n" in done.stdout
    assert f"export SBD_DATASET_PATH={out.resolve() / 'SBD'}\n" in done.stdout
    assert len(VOCSegmentation(out, "val")) == 2

    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode != 0
    assert again.stderr.count("\n") == 1 and str(out) in again.stderr


def test_test_split_is_laid_out_like_voc2012test(tmp_path):
    make_synthetic_voc(tmp_path / "plain", 4, 3, size=(40, 48), seed=5)
    summary = make_synthetic_voc(tmp_path / "with_test", 4, 3, size=(40, 48), seed=5, n_test=6)
    root = tmp_path / "with_test"
    voc = root / "VOCdevkit/VOC2012"
    test = voc_split(root, "test")
    assert len(test) == len(set(test)) == summary["voc_test"] == 6
    assert not set(test) & (set(voc_split(root, "trainval")) | set(split(root / "SBD/train.txt")))
    assert not any((voc / "SegmentationClass" / f"{i}.png").exists() for i in test)  # no ground truth, as on the server
    sizes = set()
    for image_id in test:
        with Image.open(voc / "JPEGImages" / f"{image_id}.jpg") as jpeg:
            assert jpeg.format == "JPEG" and jpeg.mode == "RGB"
            assert 30 <= jpeg.height <= 50 and 36 <= jpeg.width <= 60
            sizes.add(jpeg.size)
    assert len(sizes) > 1  # a submission must follow each image's own size
    # Everything else is byte-identical to a dataset generated without the test split.
    with_test = snapshot(root)
    assert {
        k: v for k, v in with_test.items() if not any(i in k for i in test) and not k.endswith("test.txt")
    } == snapshot(tmp_path / "plain")
