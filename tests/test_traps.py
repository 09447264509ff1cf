"""The traps between a fresh clone and a first real run (issue 21), each closed and tested."""

import json
import subprocess
import sys

import pytest

from test_training import REPO, TINY, last_line, make_env, only_run_dir, run_script


def test_evaluation_builds_the_architecture_of_the_run_it_evaluates(synthetic_voc, tmp_path):
    # Trained with an auxiliary head through CONFIG_OVERRIDES; tiny_eval.py's model has none.
    env = make_env(synthetic_voc, tmp_path / "out", TINY_EPOCHS=1, CONFIG_OVERRIDES="aux_loss=True")
    proc = run_script("training", TINY, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = only_run_dir(tmp_path / "out")
    best = sorted((run_dir / "best").glob("best_model_*.pt"))[-1]
    env = make_env(synthetic_voc, tmp_path / "eval", WEIGHTS_PATH=best, TINY_VAL_LIMIT=4)
    proc = run_script("evaluation", "tests/configs/tiny_eval.py", env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the architecture of the run that trained" in proc.stderr
    result = json.loads((only_run_dir(tmp_path / "eval", "tiny_eval") / "metrics.json").read_text())
    assert 0.0 <= result["val"]["mIoU"] <= 1.0
    assert json.loads((run_dir / "model.json").read_text())["aux_loss"] is True


def test_weights_outside_a_run_folder_still_need_the_configs_model(synthetic_voc, tmp_path):
    import torch

    from vocseg.models import deeplabv3

    weights = tmp_path / "aux.pt"
    torch.save(deeplabv3("mobilenet_v3_large", aux_loss=True, pretrained_backbone=False).state_dict(), weights)
    env = make_env(synthetic_voc, tmp_path / "eval", WEIGHTS_PATH=weights, TINY_VAL_LIMIT=4)
    proc = run_script("evaluation", "tests/configs/tiny_eval.py", env)
    assert proc.returncode != 0 and "saved from a different model" in last_line(proc)


BASELINES = ["configs/train/baseline_resnet101.py", "configs/train/baseline_resnet101_sbd.py"]


@pytest.fixture(scope="module")
def small_backbone(tmp_path_factory):
    import torch
    from torchvision.models import resnet101

    path = tmp_path_factory.mktemp("backbone") / "resnet101.pth"
    torch.save(resnet101().state_dict(), path)
    return path


@pytest.mark.parametrize("config_path", BASELINES)
def test_recipe_iterations_are_optimiser_steps_whatever_the_accumulation(
    config_path, small_backbone, synthetic_voc, monkeypatch
):
    from vocseg.config import load_config

    monkeypatch.setenv("DATASET_PATH", str(synthetic_voc))
    monkeypatch.setenv("SBD_DATASET_PATH", str(synthetic_voc / "SBD"))
    monkeypatch.setenv("PRETRAINED_BACKBONE", str(small_backbone))
    seen = {}
    for batch, accumulation in [(16, 1), (8, 2), (4, 4)]:
        mutations = {"num_workers": 0, "device": "cpu", "batch_size": batch, "accumulation_steps": accumulation}
        config = load_config(REPO / config_path, mutations)
        micro = len(config.train_loader)
        steps = config.num_epochs * micro // accumulation  # the trainer updates every accumulation-th micro-batch
        assert config.lr_scheduler.total_iters == steps
        # num_iterations optimiser steps, rounded up to the end of an epoch.
        assert config.num_iterations <= steps < config.num_iterations + micro / accumulation
        seen[(batch, accumulation)] = (steps, config.train_loader.batch_size * accumulation)
    assert len(set(seen.values())) == 1, seen


def test_a_gpu_config_stops_with_one_line_when_no_gpu_is_visible(synthetic_voc, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    proc = run_script("training", TINY, make_env(synthetic_voc, tmp_path, CONFIG_OVERRIDES="device=cuda"), timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "no GPU is visible" in last_line(proc) and "CONFIG_OVERRIDES=device=cpu" in last_line(proc)
    assert not (tmp_path / "tiny").exists()


@pytest.mark.parametrize("config_path", [*BASELINES, "configs/eval/baseline_resnet101.py"])
def test_gpu_recipes_ask_for_the_gpu_plainly(config_path):
    from vocseg.config import literal_constants

    assert literal_constants(REPO / config_path)["device"] == "cuda"


def test_a_baseline_stops_before_it_builds_anything_without_a_gpu(synthetic_voc, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    env = make_env(synthetic_voc, tmp_path, PRETRAINED_BACKBONE=tmp_path / "absent.pth")
    proc = run_script("training", BASELINES[0], env, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "device='cuda' but no GPU is visible" in last_line(proc)


SCRIPTS = sorted(p.name for p in (REPO / "code" / "scripts").glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_answers_help_with_its_usage(script):
    proc = subprocess.run(
        [sys.executable, f"code/scripts/{script}", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage" in proc.stdout.lower() and not proc.stderr.strip()


@pytest.mark.parametrize("script", ["training.py", "evaluation.py"])
def test_py_config_runner_answers_help(script):
    proc = subprocess.run(
        [sys.executable, "-m", "py_config_runner", f"code/scripts/{script}", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "Usage:" in proc.stdout and "CONFIG_FILEPATH" in proc.stdout


def test_entry_scripts_run_directly_say_how_to_start_them():
    proc = subprocess.run(
        [sys.executable, "code/scripts/training.py", "configs/train/quickstart_cpu.py"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "python -m py_config_runner code/scripts/training.py" in proc.stderr


def test_docker_variables_are_not_clearml_agents_own(monkeypatch):
    from vocseg import settings

    envs = {s.env for s in settings.SETTINGS.values() if s.env}
    assert not any(env.startswith("CLEARML_DOCKER") for env in envs)
    monkeypatch.setenv("CLEARML_DOCKER_IMAGE", "what-clearml-agent-reads")
    monkeypatch.setenv("VOCSEG_DOCKER_IMAGE", "vocseg-agent:latest")
    monkeypatch.setenv("VOCSEG_DOCKER_ARGUMENTS", "--ipc=host --shm-size=8g")
    assert settings.resolve("clearml_docker_image", {}, {}) == "vocseg-agent:latest"
    assert settings.resolve("clearml_docker_arguments", {}, {}) == "--ipc=host --shm-size=8g"
    monkeypatch.delenv("VOCSEG_DOCKER_IMAGE")
    assert settings.resolve("clearml_docker_image", {}, {}) is None
