"""The baseline configs follow their anchors' recipes (README, "Recipes"): the numbers a run would use."""

from pathlib import Path

import pytest
import torch
from torchvision.models import resnet101

from vocseg.config import literal_constants, load_config
from vocseg.models import backbone_source

REPO = Path(__file__).resolve().parents[1]
# config -> (anchor's iterations, batch, crop, lr, weight decay, output stride, aux head)
RECIPES = {
    "configs/train/baseline_resnet101.py": (30_000, 16, 513, 0.007, 1e-4, 16, False),  # DeepLabV3 paper
    "configs/train/baseline_resnet101_sbd.py": (20_000, 16, 512, 0.01, 5e-4, 8, True),  # MMSegmentation R101-D8
}


@pytest.fixture(scope="module")
def backbone_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("backbone") / "resnet101.pth"
    torch.save(resnet101().state_dict(), path)
    return path


@pytest.mark.parametrize("config_path", sorted(RECIPES))
def test_baseline_follows_its_anchor(config_path, backbone_file, synthetic_voc, monkeypatch):
    monkeypatch.setenv("DATASET_PATH", str(synthetic_voc))
    monkeypatch.setenv("SBD_DATASET_PATH", str(synthetic_voc / "SBD"))
    monkeypatch.setenv("PRETRAINED_BACKBONE", str(backbone_file))
    iterations, batch, crop, lr, weight_decay, output_stride, aux = RECIPES[config_path]
    config = load_config(REPO / config_path, {"num_workers": 0})
    per_epoch = len(config.train_loader)
    total = config.num_epochs * per_epoch
    assert iterations <= total < iterations + per_epoch
    assert config.train_loader.batch_size == batch and config.crop_size == crop
    assert config.lr_scheduler.total_iters == total
    first = next(iter(config.train_loader))
    assert first["image"].shape[-2:] == (crop, crop)
    # One learning rate for every parameter, backbone and heads alike.
    assert {g["lr"] for g in config.optimizer.param_groups} == {lr}
    assert {g["weight_decay"] for g in config.optimizer.param_groups} == {weight_decay}
    model = config.model.eval()
    with torch.no_grad():
        features = model.backbone(torch.zeros(1, 3, 64, 64))
    assert features["out"].shape[-1] == 64 // output_stride
    assert (model.aux_classifier is not None) == aux and (config.criterion.aux_weight == 0.4 or not aux)
    assert backbone_source(model).startswith(f"file {backbone_file}")


CONFIGS = sorted(str(p.relative_to(REPO)) for p in [*REPO.glob("configs/*/*.py"), *REPO.glob("tests/configs/*.py")])


@pytest.mark.parametrize("config_path", CONFIGS)
def test_every_config_scores_mixed_and_larger_images_unpadded(
    config_path, backbone_file, mixed_size_voc, monkeypatch, tmp_path
):
    monkeypatch.setenv("DATASET_PATH", str(mixed_size_voc))
    monkeypatch.setenv("SBD_DATASET_PATH", str(mixed_size_voc / "SBD"))
    monkeypatch.setenv("PRETRAINED_BACKBONE", str(backbone_file))
    monkeypatch.setenv("CLEARML_OUTPUT_PATH", str(tmp_path))
    monkeypatch.setenv("TINY_WORKERS", "0")
    config_path = str(REPO / config_path)
    config = load_config(config_path, {"num_workers": 0} if "num_workers" in literal_constants(config_path) else None)
    loaders = [config.get(name) for name in ("val_loader", "train_eval_loader", "data_loader")]
    loaders = [loader for loader in loaders if loader is not None]
    assert loaders
    for loader in loaders:
        seen = 0
        for batch in loader:
            h, w = batch["size"][0].tolist()
            assert (batch["size"] == batch["size"][0]).all() and batch["image"].shape[-2:] == (h, w)
            assert batch["mask"].shape[-2:] == (h, w)
            seen += len(batch["id"])
        assert seen == loader.batch_sampler.num_images
