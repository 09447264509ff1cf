"""ClearML tracking: offline sessions written by real training runs, unreachable servers, clones' overrides.

Subprocesses run with CI=true (Ignite's ClearML handlers would go to "bypass" mode) and HOME in a temporary
folder, so that no ~/clearml.conf is found and offline sessions land in HOME/.clearml/cache/offline/.
"""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vocseg.clearml import session as ct
from vocseg.config import load_config
from vocseg.engine import checkpoints
from vocseg.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "tests/configs/tiny_clearml.py"
SCRIPT = "code/scripts/training.py"


def clearml_env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLEARML_", "TRAINS_"))}
    env.update(CI="true", HOME=str(tmp_path / "home"), CLEARML_OUTPUT_PATH=str(tmp_path / "out"), **extra)
    (tmp_path / "home").mkdir(exist_ok=True)
    return env


def run_training(env, timeout=240):
    return subprocess.run(
        [sys.executable, "-m", "py_config_runner", SCRIPT, CONFIG],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def sessions(home: Path):
    return sorted(p for p in (home / ".clearml" / "cache" / "offline").glob("offline-*") if p.is_dir())


def events(session: Path):
    return [e for line in (session / "metrics.jsonl").read_text().splitlines() if line for e in json.loads(line)]


# ---------------------------------------------------------------------------------------------------------
# A real training run, tracked offline.


@pytest.fixture(scope="module")
def offline_run(synthetic_voc, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clearml_run")
    started = time.monotonic()
    proc = run_training(clearml_env(tmp, DATASET_PATH=str(synthetic_voc)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = sessions(tmp / "home")
    assert len(found) == 1, found
    session = found[0]
    return {
        "session": session,
        "task": json.loads((session / "task.json").read_text()),
        "events": events(session),
        "stderr": proc.stderr,
        "seconds": time.monotonic() - started,
    }


@pytest.mark.slow
def test_offline_session_records_the_config(offline_run):
    task = offline_run["task"]
    assert (task["project_name"], task["name"], task["type"]) == ("Pascal-VOC12 Training", "tiny_clearml", "training")
    params = {name: p["value"] for name, p in task["hyperparams"][ct.SECTION].items()}
    assert params["learning_rate"] == "0.01" and params["batch_size"] == "4" and params["num_epochs"] == "2"
    assert "api_token" not in params and "train_loader" not in params
    assert task["hyperparams"]["Model"]["backbone_source"]["value"].startswith("none (pretrained_backbone=False")
    assert task["configuration"]["config"]["value"] == (ROOT / CONFIG).read_text()
    artifacts = {a["key"]: Path(a["uri"]) for a in task["execution"]["artifacts"]}
    assert artifacts["config"].read_text() == (ROOT / CONFIG).read_text()
    assert artifacts["script"].read_text() == (ROOT / SCRIPT).read_text()
    assert "torch==" in task["script"]["requirements"]["pip"] and "-e ." in task["script"]["requirements"]["pip"]


@pytest.mark.slow
def test_offline_session_holds_metrics_images_matrix_and_models(offline_run):
    evs = offline_run["events"]
    scalars = {(e["metric"], e["variant"], e["iter"]) for e in evs if e["type"] == "training_stats_scalar"}
    assert {("val", "mIoU", 1), ("val", "mIoU", 2), ("train_eval", "mIoU", 2)} <= scalars
    assert ("train", "batch_loss", 1) in scalars and ("lr", "0", 1) in scalars and ("lr", "1", 1) in scalars
    assert ("val/IoU", "background", 2) in scalars
    images = [e for e in evs if e["type"] == "training_debug_image" and e["metric"] == "val"]
    assert sorted(e["iter"] for e in images) == [1, 2] and all(Path(e["url"]).is_file() for e in images)
    summary = [e for e in evs if e["type"] == "training_debug_image" and e["metric"] == "summary"]
    assert len(summary) == 1 and Path(summary[0]["url"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plots = [e for e in evs if e["type"] == "plot" and e["metric"] == "val confusion matrix"]
    assert len(plots) == 1 and "ground truth" in plots[0]["plot_str"]
    models = offline_run["task"]["offline_output_models"]
    assert models and all(Path(m["weights"]["weights_filename"]).is_file() for m in models)
    assert models[0]["init"]["framework"] == "PyTorch" and models[0]["init"]["label_enumeration"]["background"] == 0


@pytest.mark.slow
def test_offline_session_entry_point_reruns_the_same_command(offline_run):
    script = offline_run["task"]["script"]
    assert script["entry_point"] == f"-m py_config_runner {SCRIPT} {CONFIG}"
    assert script["working_dir"] == "." and script["binary"] == f"python{sys.version_info[0]}.{sys.version_info[1]}"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode == 0:
        assert script["version_num"] == head.stdout.strip()
    # What an agent does with it: run `python <entry_point>` in the working directory of its clone.
    argv = script["entry_point"].split()
    assert argv[:2] == ["-m", "py_config_runner"]
    assert all((ROOT / script["working_dir"] / a).is_file() for a in argv[2:])


@pytest.mark.slow
def test_offline_run_says_offline_once_and_how_to_import(offline_run):
    err = offline_run["stderr"]
    assert err.count("tracking OFFLINE") == 1
    archive = f"{offline_run['session']}.zip"
    assert Path(archive).is_file() and f"import_offline_session.py {archive}" in err


@pytest.mark.slow
def test_evaluation_is_tracked_as_a_testing_task(offline_run, synthetic_voc, tmp_path):
    best = sorted((offline_run["session"].parents[4] / "out").glob("tiny_clearml/*/best/best_model_*.pt"))
    assert best, "the training run saved no best model"
    env = clearml_env(
        tmp_path, DATASET_PATH=str(synthetic_voc), WEIGHTS_PATH=str(best[-1]), TINY_VAL_LIMIT="4", TINY_TTA="1"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "py_config_runner", "code/scripts/evaluation.py", "tests/configs/tiny_eval.py"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (session,) = sessions(tmp_path / "home")
    task = json.loads((session / "task.json").read_text())
    assert (task["name"], task["type"]) == ("tiny_eval", "testing")
    metrics = json.loads(next((tmp_path / "out" / "tiny_eval").glob("*/metrics.json")).read_text())
    assert metrics["tta"] == {"flip": True, "scales": [0.75, 1.0]}
    singles = {
        e["variant"]: e["value"]
        for e in events(session)
        if e["type"] == "training_stats_scalar" and e["metric"] == "Summary"
    }
    assert singles["val/mIoU"] == pytest.approx(metrics["val"]["mIoU"])
    assert any(e["type"] == "plot" and e["metric"] == "val confusion matrix" for e in events(session))


# ---------------------------------------------------------------------------------------------------------
# Servers that are not there, or do not answer.


@pytest.fixture
def silent_server():
    """A port that accepts connections and never answers: what a hung server looks like."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    accepted, stop = [], threading.Event()

    def accept():
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(sock.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    sock.close()


def dummy_server_env(tmp_path, host, **extra):
    return clearml_env(
        tmp_path,
        CLEARML_API_HOST=host,
        CLEARML_WEB_HOST=host,
        CLEARML_FILES_HOST=host,
        CLEARML_API_ACCESS_KEY="dummy",
        CLEARML_API_SECRET_KEY="dummy",
        **extra,
    )


# Prints the seconds from Task creation to close, imports excluded (they alone took 15 s on a loaded machine).
INIT_AND_CLOSE = (
    "import time, clearml; from vocseg.clearml import session as ct; started = time.monotonic(); "
    f"ct.finish(ct.init_task({CONFIG!r}, 'training', {SCRIPT!r})); "
    "print(f'elapsed {time.monotonic() - started:.2f}')"
)


@pytest.mark.parametrize("kind", ["refused", "silent"])
def test_unreachable_server_falls_back_to_offline_within_15_s(tmp_path, silent_server, kind):
    host = "http://127.0.0.1:9" if kind == "refused" else silent_server
    proc = subprocess.run(
        [sys.executable, "-c", INIT_AND_CLOSE],
        cwd=ROOT,
        env=dummy_server_env(tmp_path, host),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    elapsed = float(proc.stdout.split("elapsed ")[-1])
    assert elapsed < 15, f"took {elapsed:.1f} s"  # not the minutes ClearML's own retries take
    assert f"ClearML server {host} did not answer" in proc.stderr and "tracking OFFLINE" in proc.stderr
    assert len(sessions(tmp_path / "home")) == 1


def test_queue_with_unreachable_server_fails_clearly(tmp_path, synthetic_voc):
    started = time.monotonic()
    proc = run_training(
        dummy_server_env(tmp_path, "http://127.0.0.1:9", CLEARML_QUEUE="default", DATASET_PATH=str(synthetic_voc)),
        timeout=60,
    )
    # The 5 s probe, not ClearML's minutes of retries; the rest is start-up (imports), slow on a loaded machine.
    assert time.monotonic() - started < 45
    assert proc.returncode == 2
    assert "error: CLEARML_QUEUE=default needs a reachable ClearML server" in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing was built or trained


def test_offline_mode_variable_forces_offline_without_probing(monkeypatch):
    monkeypatch.setenv("CLEARML_OFFLINE_MODE", "1")
    monkeypatch.setattr(ct, "_credentials_configured", lambda: True)
    monkeypatch.setattr(ct, "probe_server", lambda *a, **k: pytest.fail("probed"))
    applied = []
    monkeypatch.setattr("ignite.handlers.clearml_logger.ClearMLLogger.set_bypass_mode", applied.append)
    assert ct.choose_offline() is True and applied == [True]


def test_reachable_server_is_used_online_even_under_ci(monkeypatch):
    monkeypatch.setenv("CI", "true")
    monkeypatch.delenv("CLEARML_OFFLINE_MODE", raising=False)
    monkeypatch.setattr(ct, "_credentials_configured", lambda: True)
    monkeypatch.setattr(ct, "_api_host", lambda: "http://clearml.example")
    monkeypatch.setattr(ct, "probe_server", lambda *a, **k: None)
    applied = []
    monkeypatch.setattr("ignite.handlers.clearml_logger.ClearMLLogger.set_bypass_mode", applied.append)
    assert ct.choose_offline() is False and applied == [False]


def test_probe_gives_up_after_its_timeout(silent_server):
    started = time.monotonic()
    problem = ct.probe_server(silent_server, timeout=1.0)
    assert problem and 0.9 < time.monotonic() - started < 3


# ---------------------------------------------------------------------------------------------------------
# Clones: edited hyperparameters become config mutations.


def test_config_constants_are_literal_and_not_secret():
    constants = ct.config_constants(ROOT / CONFIG)
    assert constants["learning_rate"] == 0.01 and constants["batch_size"] == 4 and constants["device"] == "cpu"
    assert not {"api_token", "resume_from", "train_loader", "model"} & set(constants)


def test_config_overrides_casts_strings_back():
    original = {"learning_rate": 0.01, "batch_size": 4, "device": "cpu", "debug": False, "num_epochs": 2}
    edited = {"learning_rate": "0.05", "batch_size": "8", "device": "cpu", "debug": "True", "num_epochs": "2"}
    assert ct.config_overrides(original, edited) == {"learning_rate": 0.05, "batch_size": 8, "debug": True}
    assert ct.config_overrides(original, {"batch_size": 8.0}) == {"batch_size": 8}


@pytest.mark.parametrize(
    "edited, message",
    [
        ({"lr": "0.1"}, "Config/lr is not a constant of the config"),
        ({"batch_size": "eight"}, "Config/batch_size='eight' is not a valid int"),
        ({"batch_size": "4.5"}, "is not a valid int"),
        ({"learning_rate": "fast"}, "is not a valid float"),
        ({"debug": "maybe"}, "is not a valid bool"),
    ],
)
def test_config_overrides_rejects_unknown_and_ill_typed(edited, message):
    original = {"learning_rate": 0.01, "batch_size": 4, "debug": False}
    with pytest.raises(UserError, match=message) as info:
        ct.config_overrides(original, edited)
    assert "\n" not in str(info.value)


def test_clone_edits_change_what_the_config_builds(monkeypatch, synthetic_voc):
    # What clone_edits does with a clone's Config/* values (read from the server: tests/server/).
    monkeypatch.setenv("DATASET_PATH", str(synthetic_voc))
    edited = {"learning_rate": "0.05", "batch_size": "2", "num_epochs": "3", "seed": "3"}
    mutations = ct.config_overrides(ct.config_constants(ROOT / CONFIG), edited)
    assert mutations == {"learning_rate": 0.05, "batch_size": 2, "num_epochs": 3}
    config = load_config(ROOT / CONFIG, mutations)
    assert config.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)  # backbone; the head has 10x
    assert config.train_loader.batch_size == 2 and config.num_epochs == 3
    untouched = load_config(ROOT / CONFIG)
    assert untouched.optimizer.param_groups[0]["lr"] == pytest.approx(0.01) and untouched.train_loader.batch_size == 4


# ---------------------------------------------------------------------------------------------------------
# Evaluation: weights_path as a model id.


def test_resolve_weights_keeps_local_paths(tmp_path):
    weights = tmp_path / "best.pt"
    assert checkpoints.resolve_weights(weights) == weights
    local = "output/run/best/best_model_3_val_mIoU=0.5.pt"
    assert checkpoints.resolve_weights(local) == local


def test_resolve_weights_model_id_without_a_server_is_a_user_error(monkeypatch):
    monkeypatch.setattr(ct, "_credentials_configured", lambda: False)
    with pytest.raises(UserError, match="needs a ClearML server, and none is configured"):
        checkpoints.resolve_weights("0123456789abcdef0123456789abcdef")


def test_resolve_weights_model_id_with_unreachable_server_is_a_user_error(monkeypatch):
    monkeypatch.setattr(ct, "_credentials_configured", lambda: True)
    monkeypatch.setattr(ct, "_api_host", lambda: "http://127.0.0.1:9")
    with pytest.raises(UserError, match="did not answer"):
        checkpoints.resolve_weights("0123456789abcdef0123456789abcdef")


def test_import_script_explains_missing_session(tmp_path):
    proc = subprocess.run(
        [sys.executable, "code/scripts/import_offline_session.py", str(tmp_path / "nope.zip")],
        cwd=ROOT,
        env=clearml_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "does not exist" in proc.stderr
