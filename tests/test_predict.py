"""code/scripts/predict.py on files, folders and globs of mixed formats and sizes, with unreadable ones among them."""

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from vocseg.datasets import read_image
from vocseg.errors import UserError
from vocseg.inference.predictions import collect_inputs, output_paths, overlay
from vocseg.inference.session import Predictor, inference_config

REPO = Path(__file__).resolve().parents[1]
EVAL_CONFIG = "tests/configs/tiny_eval.py"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # A training checkpoint (model + optimizer ...), the other kind of file --weights accepts; untrained weights.
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("weights") / "training_checkpoint_12.pt"
    torch.save({"model": inference_config(REPO / EVAL_CONFIG).model.state_dict(), "optimizer": {}}, path)
    return path


@pytest.fixture
def inputs(tmp_path):
    rng = np.random.default_rng(0)
    folder, nested = tmp_path / "in", tmp_path / "in" / "nested"
    nested.mkdir(parents=True)
    cv2.imwrite(str(folder / "photo.jpg"), rng.integers(0, 255, (50, 70, 3), dtype=np.uint8))
    cv2.imwrite(str(folder / "alpha.png"), rng.integers(0, 255, (40, 33, 4), dtype=np.uint8))
    cv2.imwrite(str(nested / "grey.bmp"), rng.integers(0, 255, (30, 90), dtype=np.uint8))
    cv2.imwrite(str(nested / "large.tiff"), rng.integers(0, 255, (240, 160, 3), dtype=np.uint8))
    data = (folder / "photo.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(data[: len(data) // 2])
    (folder / "notes.txt").write_text("not an image")
    return folder


def predict(*args, **env):
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("TINY_", "DATASET_PATH", "WEIGHTS", "CLEARML"))}
    environ.update(OMP_NUM_THREADS="1", **env)
    cmd = [sys.executable, "code/scripts/predict.py", "--config", EVAL_CONFIG, *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, env=environ, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_folder_and_glob_give_a_mask_and_overlay_per_readable_image(inputs, checkpoint, tmp_path):
    out = tmp_path / "out"
    done = predict(
        "--weights",
        checkpoint,
        "--out",
        out,
        "--max-side",
        120,
        inputs,
        inputs / "nested" / "*",
        tmp_path / "missing.jpg",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    skipped = sorted(line for line in done.stderr.splitlines() if line.startswith("skipped"))
    assert [line.split()[1] for line in skipped] == [
        f"{inputs / 'cut.jpg'}:",
        f"{inputs / 'notes.txt'}:",
        f"{tmp_path / 'missing.jpg'}:",
    ]
    assert f"wrote 4 masks and 4 overlays to {out}; skipped 3 inputs" in done.stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{n}{s}" for n in ("photo", "alpha", "grey", "large") for s in (".png", "_overlay.jpg")
    )

    predictor = Predictor(REPO / EVAL_CONFIG, checkpoint)
    for source in [inputs / "photo.jpg", inputs / "alpha.png", *sorted((inputs / "nested").iterdir())]:
        image = read_image(source)
        with Image.open(out / f"{source.stem}.png") as png:
            assert png.mode == "P" and png.size == (image.shape[1], image.shape[0])
            mask = np.asarray(png)
        assert mask.max() <= 20
        assert np.array_equal(mask, predictor.mask(image, max_side=120))
        with Image.open(out / f"{source.stem}_overlay.jpg") as jpeg:
            assert jpeg.format == "JPEG" and jpeg.size == (image.shape[1], image.shape[0])


def test_large_images_are_scored_shrunk_but_masks_come_back_full_size(checkpoint):
    predictor = Predictor(REPO / EVAL_CONFIG, checkpoint)
    image = np.random.default_rng(2).integers(0, 255, (240, 160, 3), dtype=np.uint8)
    assert predictor.mask(image, max_side=64).shape == predictor.mask(image).shape == (240, 160)


def test_overlay_tints_objects_and_keeps_background():
    image = np.full((2, 2, 3), 100, np.uint8)
    mask = np.array([[0, 15], [0, 0]], np.uint8)  # 15 = person, VOC colour (192, 128, 128)
    out = overlay(image, mask)
    assert out[0, 0].tolist() == [100, 100, 100] and out[0, 1].tolist() == [146, 114, 114]


def test_clashing_names_and_old_outputs_are_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for name in ("a/x.jpg", "b/x.png", "b/y.png"):
        (tmp_path / name).write_bytes(b"")
    files, problems = collect_inputs([str(tmp_path / "a"), str(tmp_path / "b" / "*.png")])
    assert len(files) == 3 and not problems
    with pytest.raises(UserError, match="would both write"):
        output_paths(files, tmp_path / "out")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "y_overlay.jpg").write_bytes(b"earlier")
    with pytest.raises(UserError, match="y_overlay.jpg already exists"):
        output_paths(files[1:], tmp_path / "out")
    assert len(output_paths(files[1:], tmp_path / "out", overwrite=True)) == 2


@pytest.mark.slow
def test_nothing_readable_or_unknown_model_id_fails_in_one_line(tmp_path, checkpoint):
    (tmp_path / "junk.png").write_text("junk")
    done = predict("--weights", checkpoint, "--out", tmp_path / "out", tmp_path / "junk.png")
    assert done.returncode != 0 and done.stderr.splitlines()[-1] == "error: no input could be read as an image"
    done = predict(
        "--weights",
        "0123456789abcdef0123456789abcdef",
        "--out",
        tmp_path / "out2",
        tmp_path / "junk.png",
        HOME=str(tmp_path),
    )
    assert done.returncode != 0 and done.stderr.count("\n") == 1
    assert "(a ClearML model id) needs a ClearML server, and none is configured" in done.stderr
