"""VOC2012 test-server submission on a synthetic test split: format, sizes, archive layout, refusals."""

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vocseg.data.synthetic import make_synthetic_voc
from vocseg.data.voc import save_palette_png, voc_palette
from vocseg.datasets import read_image
from vocseg.errors import UserError
from vocseg.inference.session import Predictor, inference_config
from vocseg.inference.submission import check_results, results_folder

REPO = Path(__file__).resolve().parents[1]
EVAL_CONFIG = "tests/configs/tiny_eval.py"
PREFIX = "results/VOC2012/Segmentation/comp6_test_cls/"


@pytest.fixture(scope="module")
def test_split(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc_test")
    make_synthetic_voc(root, 2, 1, size=(64, 80), seed=2, n_test=5)
    ids = (root / "VOCdevkit/VOC2012/ImageSets/Segmentation/test.txt").read_text().split()
    return root, ids


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    # Untrained weights: the format is under test here, not the accuracy.
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "best_model.pt"
    torch.save(inference_config(REPO / EVAL_CONFIG).model.state_dict(), path)
    return path


def submit(data, weights, out, *extra, **env):
    cmd = [
        sys.executable,
        "code/scripts/submission.py",
        "--config",
        EVAL_CONFIG,
        "--weights",
        str(weights),
        "--competition",
        "comp6",
        "--out",
        str(out),
        *extra,
    ]
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("TINY_", "DATASET_PATH", "WEIGHTS"))}
    environ.update(DATASET_PATH=str(data), OMP_NUM_THREADS="1", **env)
    return subprocess.run(cmd, cwd=REPO, env=environ, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_archive_holds_one_valid_png_per_test_image(test_split, weights, tmp_path, monkeypatch):
    data, ids = test_split
    done = submit(data, weights, tmp_path, TINY_TTA="1")
    assert done.returncode == 0, done.stderr[-2000:]
    archive = tmp_path / "comp6_test_cls.tar.gz"
    assert f"checked and packed: {archive}" in done.stdout
    with tarfile.open(archive) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    assert sorted(files) == sorted(PREFIX + f"{i}.png" for i in ids)

    monkeypatch.setenv("TINY_TTA", "1")  # the same flip + two-scale TTA as the script ran with
    predictor = Predictor(REPO / EVAL_CONFIG, weights)
    assert predictor.flip and predictor.scales == (0.75, 1.0)
    sizes = set()
    for image_id in ids:
        image = read_image(data / "VOCdevkit/VOC2012/JPEGImages" / f"{image_id}.jpg")
        with Image.open(tmp_path / PREFIX / f"{image_id}.png") as png:
            assert png.mode == "P"
            assert png.getpalette()[:63] == voc_palette()[:21].ravel().tolist()
            assert png.size == (image.shape[1], image.shape[0])
            mask = np.asarray(png)
        assert mask.max() <= 20
        assert np.array_equal(mask, predictor.mask(image))  # each image alone, at its own size
        sizes.add(png.size)
    assert len(sizes) > 1


def test_check_results_rejects_what_the_server_would(tmp_path):
    sizes = {"a": (30, 40), "b": (20, 20)}
    save_palette_png(tmp_path / "a.png", np.zeros((30, 40), np.uint8))
    with pytest.raises(UserError, match=r"missing \['b.png'\]"):
        check_results(tmp_path, sizes)
    save_palette_png(tmp_path / "b.png", np.zeros((20, 21), np.uint8))
    with pytest.raises(UserError, match="b.png: it is 21x20, not the image's 20x20"):
        check_results(tmp_path, sizes)
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / "b.png")
    with pytest.raises(UserError, match="b.png: mode is L, not P"):
        check_results(tmp_path, sizes)
    save_palette_png(tmp_path / "b.png", np.full((20, 20), 21, np.uint8))
    with pytest.raises(UserError, match="class ids above 20"):
        check_results(tmp_path, sizes)
    save_palette_png(tmp_path / "b.png", np.zeros((20, 20), np.uint8))
    check_results(tmp_path, sizes)
    (tmp_path / "c.png").write_bytes(b"")
    with pytest.raises(UserError, match=r"unexpected \['c.png'\]"):
        check_results(tmp_path, sizes)


@pytest.mark.slow
def test_bad_input_fails_in_one_line_before_predicting(test_split, weights, tmp_path):
    data, ids = test_split
    no_test = tmp_path / "no_test"
    make_synthetic_voc(no_test, 1, 1, size=(32, 32))
    done = submit(no_test, weights, tmp_path / "a")
    assert done.returncode != 0 and done.stderr.count("\n") == 1
    assert "test.txt does not exist: unpack VOC2012test.tar" in done.stderr

    earlier = results_folder(tmp_path / "b", "comp6")
    earlier.mkdir(parents=True)
    (earlier / f"{ids[0]}.png").write_bytes(b"earlier")
    done = submit(data, weights, tmp_path / "b")
    assert done.returncode != 0 and "already holds predictions" in done.stderr and done.stderr.count("\n") == 1
    assert (earlier / f"{ids[0]}.png").read_bytes() == b"earlier"

    done = submit(data, tmp_path / "nope.pt", tmp_path / "c")
    assert done.returncode != 0 and "nope.pt does not exist" in done.stderr and done.stderr.count("\n") == 1
