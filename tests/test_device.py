"""The device refusals that every script shares (the plan itself: tests/test_device_plan.py)."""

import pytest
import torch

from vocseg.errors import UserError
from vocseg.inference.session import Predictor
from vocseg.runtime import device_plan


def test_cuda_without_a_gpu_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError) as refused:
        device_plan.for_inference("cuda:1", "off", "config configs/train/x.py")
    assert str(refused.value) == (
        "config configs/train/x.py: device='cuda:1' but no GPU is visible: set device='cpu' "
        "(CONFIG_OVERRIDES=device=cpu runs it on the CPU on purpose)"
    )


def test_the_inference_scripts_ask_the_same_question(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # The weights are never read: the device is refused first.
    with pytest.raises(UserError, match=r"^--device: device='cuda' but no GPU is visible: set device='cpu'"):
        Predictor("tests/configs/tiny_eval.py", weights="unread.pt", device="cuda")
