"""Shared fixtures. `synthetic_voc` is built once per session: treat it as read-only and copy
whatever a test needs to break (see copy_voc in test_datasets.py)."""

from pathlib import Path

import pytest

from vocseg.data.synthetic import make_synthetic_voc


@pytest.fixture(scope="session")
def synthetic_voc(tmp_path_factory):
    """Folder containing VOCdevkit/ (DATASET_PATH); SBD (SBD_DATASET_PATH) is its "SBD" child.

    24 VOC train and 21 VOC val images at 96x96, so every class appears in both splits.
    """
    out = tmp_path_factory.mktemp("synthetic_voc")
    make_synthetic_voc(out, 24, 21, size=(96, 96), seed=0)
    return out


# Suites that need a service outside this repo: collected only when asked for by path (make test-server,
# make test-slurm), so that `make test` and a plain `pytest` stay self-contained.
SERVICE_SUITES = [Path(__file__).resolve().parent / name for name in ("server", "slurm")]


def pytest_ignore_collect(collection_path, config):
    if collection_path in SERVICE_SUITES:
        asked = [Path(arg.split("::")[0]).resolve() for arg in config.args]
        return not any(a == collection_path or a.is_relative_to(collection_path) for a in asked)
    return None


@pytest.fixture(scope="session", autouse=True)
def sample_check_cache(tmp_path_factory):
    """Runs started by the tests (and their subprocesses) remember passed sample checks here, not in ~/.cache."""
    import os

    os.environ["VOCSEG_CACHE_DIR"] = str(tmp_path_factory.mktemp("vocseg_cache"))


@pytest.fixture(scope="session")
def mixed_size_voc(synthetic_voc, tmp_path_factory):
    """A copy of `synthetic_voc` whose first VOC val and train images come in other sizes, one far larger
    than the rest (the old val_pad_size would have rejected it). Read-only, like `synthetic_voc`."""
    import shutil

    import cv2
    import numpy as np

    from vocseg.data.voc import read_mask, save_palette_png
    from vocseg.datasets import VOCSegmentation

    root = shutil.copytree(synthetic_voc, tmp_path_factory.mktemp("mixed") / "data")
    for split in ("val", "train"):
        ds = VOCSegmentation(root, split)
        for i, (h, w) in enumerate([(80, 120), (120, 80), (200, 600), (80, 120)]):
            image = cv2.imread(str(ds.image_paths[i]))
            cv2.imwrite(str(ds.image_paths[i]), cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR))
            mask = cv2.resize(read_mask(ds.mask_paths[i]), (w, h), interpolation=cv2.INTER_NEAREST)
            save_palette_png(ds.mask_paths[i], np.ascontiguousarray(mask))
    return root
