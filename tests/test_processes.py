"""How many processes a plain launch starts itself (launch.processes_per_node). GPUs cannot exist here:
torch.cuda.device_count is monkeypatched; the CPU path is run for real in the online suite (an agent's clone)."""

import pytest
import torch

from vocseg.errors import UserError
from vocseg.runtime.launch import processes_per_node


@pytest.fixture
def config(tmp_path, monkeypatch):
    for name in ("WORLD_SIZE", "NPROC_PER_NODE"):
        monkeypatch.delenv(name, raising=False)

    def write(text=""):
        path = tmp_path / "c.py"
        path.write_text(text)
        return path

    return write


def test_one_process_per_visible_gpu(config, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert processes_per_node(config('device = "cuda"\n')) == 2
    assert processes_per_node(config("import torch\ndevice = 'cuda' if torch.cuda.is_available() else 'cpu'\n")) == 2
    assert processes_per_node(config('device = "cpu"\n')) == 1  # a CPU config asks for nothing more
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert processes_per_node(config('device = "cuda"\n')) == 1


def test_nproc_per_node_from_config_mutation_or_environment(config, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    path = config('device = "cpu"\nnproc_per_node = 2\n')
    assert processes_per_node(path) == 2
    assert processes_per_node(path, {"nproc_per_node": 3}) == 3
    monkeypatch.setenv("NPROC_PER_NODE", "1")
    assert processes_per_node(config('device = "cuda"\n')) == 1


def test_already_distributed_launch_starts_nothing_more(config, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert processes_per_node(config("nproc_per_node = 2\n")) == 1


@pytest.mark.parametrize("given", ["0", "two", "1.5"])
def test_bad_nproc_per_node_is_one_line(config, monkeypatch, given):
    monkeypatch.setenv("NPROC_PER_NODE", given)
    with pytest.raises(UserError, match=f"nproc_per_node '{given}' is not a whole number .* fix NPROC_PER_NODE"):
        processes_per_node(config())
