"""Model builders, backbone weights without network, the DeepLab optimiser recipe."""

import logging

import pytest
import torch
from torchvision.models import resnet18

from vocseg import models
from vocseg.errors import UserError
from vocseg.models import deeplabv3
from vocseg.optim import poly_lr, sgd


@pytest.fixture(autouse=True)
def no_network_no_cache(monkeypatch, tmp_path):
    # Tests never leave loopback: pretend the weights host is unreachable and the hub cache empty.
    monkeypatch.setattr(models, "_reachable", lambda url, timeout=3.0: False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.delenv("PRETRAINED_BACKBONE", raising=False)


def test_backbone_from_local_file(monkeypatch, tmp_path):
    reference = resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)  # an ImageNet checkpoint: includes fc.* the backbone lacks
    monkeypatch.setenv("PRETRAINED_BACKBONE", str(path))
    model = deeplabv3("resnet18", aux_loss=False, pretrained_backbone=True)
    assert torch.equal(model.backbone["conv1"].weight, reference.conv1.weight)
    assert torch.equal(model.backbone["layer3"][1].conv2.weight, reference.layer3[1].conv2.weight)


def test_missing_backbone_file_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("PRETRAINED_BACKBONE", str(tmp_path / "nope.pth"))
    with pytest.raises(UserError, match="PRETRAINED_BACKBONE=.*nope.pth"):
        deeplabv3("resnet18", aux_loss=False)


def test_unrelated_backbone_file_is_refused(monkeypatch, tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"something.else": torch.zeros(3)}, path)
    monkeypatch.setenv("PRETRAINED_BACKBONE", str(path))
    with pytest.raises(UserError, match="shares no weights"):
        deeplabv3("resnet18", aux_loss=False)


def test_no_weights_anywhere_warns_and_starts_from_random(caplog):
    with caplog.at_level(logging.WARNING, logger="vocseg.models"):
        model = deeplabv3("resnet18", aux_loss=False, pretrained_backbone=True)
    assert "random init" in caplog.text and "PRETRAINED_BACKBONE" in caplog.text
    assert model(torch.zeros(2, 3, 64, 64))["out"].shape == (2, 21, 64, 64)


def test_unknown_backbone():
    with pytest.raises(UserError, match="unknown.*resnet101"):
        deeplabv3("vgg16")


def test_bn_momentum_override():
    model = deeplabv3("mobilenet_v3_large", aux_loss=False, pretrained_backbone=False, bn_momentum=0.1)
    momenta = {m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert momenta == {0.1}


def test_heads_at_ten_times_the_backbone_lr_and_poly_decay():
    model = deeplabv3("resnet18", aux_loss=False, pretrained_backbone=False)
    optimizer = sgd(model, lr=0.01, head_lr_mult=10.0)
    backbone, head = optimizer.param_groups
    assert (backbone["lr"], head["lr"]) == (0.01, pytest.approx(0.1))
    assert {id(p) for p in head["params"]} == {id(p) for p in model.classifier.parameters()}
    assert len(backbone["params"]) + len(head["params"]) == len(list(model.parameters()))
    scheduler = poly_lr(optimizer, num_steps=10, power=0.9)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    assert backbone["lr"] == pytest.approx(0.01 * (1 - 4 / 10) ** 0.9)
    assert head["lr"] == pytest.approx(0.1 * (1 - 4 / 10) ** 0.9)


def test_backbone_file_of_another_architecture_is_refused(monkeypatch, tmp_path):
    from torchvision.models import resnet50

    path = tmp_path / "resnet50.pth"
    torch.save(resnet50().state_dict(), path)
    monkeypatch.setenv("PRETRAINED_BACKBONE", str(path))
    with pytest.raises(UserError, match="does not fit the resnet18 backbone"):
        deeplabv3("resnet18", aux_loss=False)
