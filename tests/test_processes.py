"""How many processes a plain launch starts itself (launch.processes_per_node). GPUs cannot exist here:
torch.cuda.device_count is monkeypatched; the CPU path is run for real in the online suite (an agent's clone)."""

import pytest
import torch

from vocseg.config import ConfigSource, with_overrides
from vocseg.errors import UserError
from vocseg.runtime import launch


def processes_per_node(path, mutations=None):
    # As the entry point decides it: the settings' nproc_per_node and device, then the launcher.
    source = with_overrides(ConfigSource(path, None, mutations or {}))
    return launch.processes_per_node(source.setting("nproc_per_node"), source.setting("device"))


@pytest.fixture
def config(tmp_path, monkeypatch):
    for name in ("WORLD_SIZE", "NPROC_PER_NODE", "CONFIG_OVERRIDES"):
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
    with pytest.raises(UserError, match=f"NPROC_PER_NODE='{given}' is not allowed: set it to None or an integer >= 1"):
        processes_per_node(config())


def test_config_overrides_choose_the_processes(config, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    path = config('device = "cuda"\nnproc_per_node = 2\n')
    monkeypatch.setenv("NPROC_PER_NODE", "3")
    monkeypatch.setenv("CONFIG_OVERRIDES", "nproc_per_node=1")
    assert processes_per_node(path) == 1  # CONFIG_OVERRIDES > environment > config
    monkeypatch.delenv("NPROC_PER_NODE")
    monkeypatch.setenv("CONFIG_OVERRIDES", "device=cpu")
    assert processes_per_node(config('device = "cuda"\n')) == 1


@pytest.mark.slow
def test_a_plain_launch_says_how_many_processes_it_starts(synthetic_voc, tmp_path):
    from test_training import TINY, make_env, run_script

    env = make_env(synthetic_voc, tmp_path, NPROC_PER_NODE="2", CONFIG_OVERRIDES="num_epochs=1")
    proc = run_script("training", TINY, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "vocseg: starting 2 processes on this machine" in proc.stderr
    assert "NPROC_PER_NODE=1 or CONFIG_OVERRIDES=nproc_per_node=1 runs one" in proc.stderr
