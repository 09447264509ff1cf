"""Train/val pipelines: shapes, void padding, nearest-neighbour masks, per-sample seeding."""

import numpy as np
import pytest
import torch
from torchvision.transforms.v2.functional import normalize as torchvision_normalize

from vocseg.data.normalize import ImageNetNormalize, normalize
from vocseg.data.transforms import train_transform
from vocseg.dataflow import SegmentationSamples


def sample(h=100, w=120, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(1, 255, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), np.uint8)
    mask[20:60, 30:90] = 7
    mask[58:62, 28:92] = 255
    return image, mask


def test_small_scale_pads_image_with_0_and_mask_with_255():
    image, mask = sample()
    t = train_transform(crop_size=96, scale_range=(0.5, 0.5), hflip=0.0)
    t.set_random_seed(1)
    out = t(image=image, mask=mask)
    assert out["image"].shape == (96, 96, 3) and out["mask"].shape == (96, 96)
    # 100x120 at scale 0.5 is 50x60, placed top-left.
    assert (out["mask"][50:, :] == 255).all() and (out["mask"][:, 60:] == 255).all()
    assert (out["image"][50:, :] == 0).all() and (out["image"][:, 60:] == 0).all()
    assert set(np.unique(out["mask"][:50, :60])) <= {0, 7, 255}


@pytest.mark.parametrize("scale", [0.7, 1.0, 1.6, 2.0])
def test_masks_keep_their_labels_at_any_scale(scale):
    image, mask = sample()
    t = train_transform(crop_size=64, scale_range=(scale, scale))
    for seed in range(5):
        t.set_random_seed(seed)
        out = t(image=image, mask=mask)
        assert out["image"].shape == (64, 64, 3) and out["image"].dtype == np.uint8
        assert set(np.unique(out["mask"])) <= {0, 7, 255}


def test_same_seed_same_sample_other_seed_other_sample():
    image, mask = sample()
    t = train_transform(crop_size=64)
    outs = []
    for seed in (3, 3, 4):
        t.set_random_seed(seed)
        outs.append(t(image=image, mask=mask))
    assert np.array_equal(outs[0]["image"], outs[1]["image"]) and np.array_equal(outs[0]["mask"], outs[1]["mask"])
    assert not np.array_equal(outs[0]["image"], outs[2]["image"])


def test_full_resolution_samples_are_the_images_as_they_are():
    image, mask = sample(100, 120)
    out = SegmentationSamples([{"image": image, "mask": mask, "id": "2008_000001"}])[0]
    assert out["image"].shape == (3, 100, 120) and out["mask"].shape == (100, 120)
    assert np.array_equal(out["image"].permute(1, 2, 0).numpy(), image) and np.array_equal(out["mask"].numpy(), mask)
    assert out["size"].tolist() == [100, 120]


def test_one_normalisation_for_batches_predictions_and_exports():
    images = torch.randint(0, 256, (2, 3, 5, 7), generator=torch.Generator().manual_seed(0)).float()
    expected = torchvision_normalize(images / 255, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    torch.testing.assert_close(normalize(images), expected)
    torch.testing.assert_close(ImageNetNormalize()(images), expected)
