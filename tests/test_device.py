"""The one device decision of training, evaluation and the inference scripts."""

import ignite.distributed as idist
import pytest
import torch

from vocseg.errors import UserError
from vocseg.inference.session import Predictor
from vocseg.runtime import machine


@pytest.fixture
def allocator_calls(monkeypatch):
    calls = []
    monkeypatch.setattr(machine, "tune_cpu_allocator", lambda: calls.append(True))
    return calls


def test_cpu_is_taken_as_asked_and_tunes_the_allocator(allocator_calls):
    assert machine.choose_device("cpu", "config c.py") == torch.device("cpu")
    assert allocator_calls == [True]


def test_cuda_without_a_gpu_is_refused_in_one_line(monkeypatch, allocator_calls):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError) as refused:
        machine.choose_device("cuda:1", "config configs/train/x.py")
    assert str(refused.value) == (
        "config configs/train/x.py: device='cuda:1' but no GPU is visible: set device='cpu' "
        "(CONFIG_OVERRIDES=device=cpu runs it on the CPU on purpose)"
    )
    assert allocator_calls == []


def test_a_process_group_decides_the_device(monkeypatch, allocator_calls):
    monkeypatch.setattr(idist, "get_world_size", lambda: 2)
    monkeypatch.setattr(idist, "device", lambda: torch.device("cpu"))
    # A gloo group on CPU: the config's "cuda" does not apply to its processes.
    assert machine.choose_device("cuda", "config c.py") == torch.device("cpu")
    assert allocator_calls == [True]


def test_the_inference_scripts_ask_the_same_question(monkeypatch, allocator_calls):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # The weights are never read: the device is refused first.
    with pytest.raises(UserError, match=r"^--device: device='cuda' but no GPU is visible: set device='cpu'"):
        Predictor("tests/configs/tiny_eval.py", weights="unread.pt", device="cuda")
