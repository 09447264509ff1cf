"""The settings table (vocseg.settings): its generated page, CONFIG_OVERRIDES under python and torchrun, and the
one-line refusals of unknown keys, wrong types and near-miss names."""

import json
import subprocess

import pytest

from test_distributed import free_port, torchrun
from test_training import REPO, TINY, make_env, only_run_dir, run_script
from vocseg import settings
from vocseg.config import ConfigSource, with_overrides
from vocseg.errors import UserError

pytestmark = pytest.mark.slow


def test_docs_configs_page_is_generated_from_the_table():
    page = (REPO / "docs" / "configs.md").read_text()
    assert page == settings.markdown(), "docs/configs.md is stale: python -m vocseg.settings > docs/configs.md"
    for key, setting in settings.SETTINGS.items():
        assert f"| `{key}` |" in page and (setting.env is None or f"`{setting.env}`" in page)


def overrides(monkeypatch, text, path=REPO / TINY):
    monkeypatch.setenv("CONFIG_OVERRIDES", text)
    return with_overrides(ConfigSource(path, None, {})).overrides


def test_overrides_are_python_literals_and_bare_words_are_strings(monkeypatch):
    got = overrides(monkeypatch, "num_epochs=3 device=cpu amp='off' tta_scales=(1.0,0.5) learning_rate=1e-3")
    assert got == {"num_epochs": 3, "device": "cpu", "amp": "off", "tta_scales": (1.0, 0.5), "learning_rate": 1e-3}


@pytest.mark.parametrize(
    "text, expected",
    [
        ("num_epoch=3", "unknown key 'num_epoch': did you mean num_epochs?"),
        ("num_epochs=two", "num_epochs = 'two' is not allowed: set num_epochs to an integer >= 1"),
        ("num_epochs", "'num_epochs' is not key=value"),
        ("amp=yes", "amp = 'yes' is not allowed: set amp to 'auto', 'bf16', 'fp16' or 'off'"),
    ],
)
def test_bad_overrides_are_refused_in_one_line(monkeypatch, text, expected):
    with pytest.raises(UserError) as excinfo:
        overrides(monkeypatch, text)
    assert "\n" not in str(excinfo.value) and expected in str(excinfo.value), str(excinfo.value)


def test_an_override_keeps_the_type_of_the_config_literal(monkeypatch, tmp_path):
    config = tmp_path / "c.py"
    config.write_text("head_lr_mult = 10.0\n")
    assert overrides(monkeypatch, "head_lr_mult=2", config) == {"head_lr_mult": 2}
    with pytest.raises(UserError, match="head_lr_mult='fast' is a str, but .* sets head_lr_mult = 10.0"):
        overrides(monkeypatch, "head_lr_mult=fast", config)


def test_the_rule_overrides_then_environment_then_config(monkeypatch, tmp_path):
    config = tmp_path / "c.py"
    config.write_text("run_name = 'from-config'\n")
    monkeypatch.delenv("RUN_NAME", raising=False)
    monkeypatch.delenv("CONFIG_OVERRIDES", raising=False)
    plain = with_overrides(ConfigSource(config, None, {}))
    assert plain.setting("run_name") == "from-config"
    assert ConfigSource(config, None, {"run_name": "clone-edit"}).setting("run_name") == "clone-edit"
    monkeypatch.setenv("RUN_NAME", "2024")  # a name, not a number
    assert plain.setting("run_name") == "2024"
    assert overrides(monkeypatch, "run_name=mine", config) == {"run_name": "mine"}


def test_overrides_change_a_real_run_and_are_recorded(synthetic_voc, tmp_path):
    # num_epochs is computed in tiny.py (from TINY_EPOCHS); log_every_iters is not in it at all.
    env = make_env(synthetic_voc, tmp_path, CONFIG_OVERRIDES="num_epochs=1 log_every_iters=3 save_every_iters=3")
    proc = run_script("training", TINY, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epoch"] == 1 and metrics["iteration"] == 6
    recorded = json.loads((run_dir / "overrides.json").read_text())
    assert recorded == {"num_epochs": 1, "log_every_iters": 3, "save_every_iters": 3}
    assert "iteration 3 loss" in (run_dir / "training.log").read_text()


def test_unknown_override_stops_the_script_in_one_line_before_any_work(synthetic_voc, tmp_path):
    proc = run_script("training", TINY, make_env(synthetic_voc, tmp_path, CONFIG_OVERRIDES="num_epoch=3"))
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert lines[-1] == "error: CONFIG_OVERRIDES: unknown key 'num_epoch': did you mean num_epochs?", proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "tiny").exists()


def test_a_near_miss_name_in_the_config_is_reported(tmp_path, synthetic_voc):
    config = tmp_path / "tiny_typo.py"
    config.write_text((REPO / TINY).read_text() + "\nval_intervall = 1\n")
    env = make_env(synthetic_voc, tmp_path, CONFIG_OVERRIDES="num_epoch=1")  # stops right after the checks
    proc = run_script("training", str(config), env)
    assert f"config {config} sets val_intervall (did you mean val_interval?): no code reads it" in proc.stderr


def test_overrides_reach_every_torchrun_process(synthetic_voc, tmp_path):
    env = make_env(synthetic_voc, tmp_path, CONFIG_OVERRIDES="num_epochs=1 run_name=overridden")
    cmd = torchrun("--nproc_per_node=2", f"--master_port={free_port()}", "-m", "py_config_runner")
    proc = subprocess.run(
        [*cmd, "code/scripts/training.py", TINY], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "tiny" / "overridden"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # 24 images, batch 4 over 2 processes: 6 iterations an epoch, one epoch.
    assert metrics["epoch"] == 1 and metrics["iteration"] == 6
