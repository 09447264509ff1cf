"""clearml:// dataset addresses without a usable server: one line each, before any training work (the online
half is tests/server/test_datasets_online.py)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from vocseg.clearml import data as clearml_data
from vocseg.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def dead_host() -> str:
    with socket.socket() as s:  # a port nobody listens on once the socket is closed
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def run_training(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLEARML_", "TRAINS_"))}
    env.update(CI="true", HOME=str(tmp_path), **extra)
    return subprocess.run(
        [sys.executable, "-m", "py_config_runner", "code/scripts/training.py", "tests/configs/tiny_clearml.py"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


@pytest.mark.parametrize("address", ["clearml://x", "clearml:///VOC2012", "clearml://project/@1.0.0"])
def test_malformed_addresses(address):
    with pytest.raises(UserError, match=f"DATASET_PATH={address} is not a dataset address"):
        clearml_data.local_copy(address, "DATASET_PATH", "voc")


def test_a_server_that_does_not_answer_is_one_line(tmp_path):
    host = dead_host()
    proc = run_training(
        tmp_path,
        DATASET_PATH="clearml://0123456789abcdef0123456789abcdef",
        CLEARML_API_HOST=host,
        CLEARML_API_ACCESS_KEY="k",
        CLEARML_API_SECRET_KEY="s",
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and lines[-1].startswith("error: DATASET_PATH=clearml://0123"), proc.stderr[-3000:]
    assert f"needs the ClearML server {host}, which did not answer" in lines[-1]
    assert "Traceback" not in proc.stderr and "first iteration" not in proc.stderr


def test_no_server_configured_is_one_line(tmp_path):
    proc = run_training(tmp_path, SBD_DATASET_PATH="clearml://p/SBD", DATASET_PATH="clearml://p/VOC2012")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith("error: DATASET_PATH=clearml://p/VOC2012 needs a ClearML server, and none is configured")
    ), proc.stderr[-3000:]
