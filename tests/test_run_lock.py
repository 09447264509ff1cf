"""One live run per run folder: the same command started twice stops the second at once without touching the
first's files, and a run killed with kill -9 leaves nothing that blocks a rerun."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from test_training import REPO, TINY, make_env

pytestmark = pytest.mark.slow
TRAINING = [sys.executable, "-m", "py_config_runner", "code/scripts/training.py", TINY]


def snapshot(folder):
    return {p.relative_to(folder): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def test_second_run_in_a_live_run_folder_stops_at_once(synthetic_voc, tmp_path):
    env = make_env(synthetic_voc, tmp_path / "out", RUN_NAME="twice")
    run_dir = tmp_path / "out" / "tiny" / "twice"
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(TRAINING, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while not list(run_dir.glob("checkpoints/training_checkpoint_*.pt")) and first.poll() is None:
            assert time.time() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.05)
        os.kill(first.pid, signal.SIGSTOP)  # holds still (and alive) while the second run tries
        before = snapshot(run_dir)

        started = time.time()
        second = subprocess.run(TRAINING, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr[-3000:]
        line = second.stderr.strip().splitlines()[-1]
        assert line.startswith(f"error: run folder {run_dir} is in use by a live run "), line
        assert f"host {socket.gethostname()} pid {first.pid} started " in line, line
        assert "Traceback" not in second.stderr and time.time() - started < 60
        assert snapshot(run_dir) == before
    finally:
        first.kill()  # kill -9: its lock goes with it
        first.wait()

    third = subprocess.run(TRAINING, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "resumed from" in (run_dir / "training.log").read_text()
