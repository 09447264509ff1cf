"""AMP choice on GPUs that do not exist here: torch.cuda's device queries are monkeypatched."""

import pytest
import torch

from vocseg.engine.precision import amp_dtype, describe
from vocseg.errors import UserError

CUDA = torch.device("cuda", 0)


@pytest.fixture
def gpu(monkeypatch):
    def fake(capability, name):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        # What emulation answers on pre-Ampere GPUs: it must not decide anything.
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)

    return fake


@pytest.mark.parametrize(
    "capability, name, expected",
    [
        ((7, 0), "Tesla V100-SXM2-16GB", torch.float16),
        ((7, 5), "Tesla T4", torch.float16),
        ((8, 0), "NVIDIA A100-SXM4-40GB", torch.bfloat16),
        ((9, 0), "NVIDIA H100 80GB HBM3", torch.bfloat16),
    ],
)
def test_auto_is_bf16_from_ampere_on_and_fp16_below(gpu, capability, name, expected):
    gpu(capability, name)
    assert amp_dtype("auto", CUDA) == expected
    assert amp_dtype("fp16", CUDA) == torch.float16
    assert amp_dtype("off", CUDA) is None


def test_explicit_bf16_on_an_older_gpu_is_one_line_error(gpu):
    gpu((7, 5), "Tesla T4")
    with pytest.raises(UserError) as caught:
        amp_dtype("bf16", CUDA, where="configs/train/x.py")
    message = str(caught.value)
    assert "\n" not in message
    assert "Tesla T4" in message and "7.5" in message and "amp='fp16'" in message and "configs/train/x.py" in message


def test_cpu_runs_fp32_and_bad_values_are_named():
    assert amp_dtype("auto", torch.device("cpu")) is None and amp_dtype("bf16", torch.device("cpu")) is None
    with pytest.raises(UserError, match="amp='float16'.*'auto', 'bf16', 'fp16', 'off'"):
        amp_dtype("float16", torch.device("cpu"))


def test_log_names_the_precision():
    assert describe(None) == "fp32"
    assert describe(torch.bfloat16) == "bf16 autocast"
    assert describe(torch.float16) == "fp16 autocast with GradScaler"
