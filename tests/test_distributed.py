"""Distributed training on CPU (gloo): torchrun on one and two "nodes", the legacy launcher, exact sharded
metrics, and jobs that end, rather than hang, when a rank dies or the rendezvous cannot happen."""

import functools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from test_training import TINY, make_env, only_run_dir, run_script

REPO = Path(__file__).resolve().parents[1]
TRAINING = ["-m", "py_config_runner", "code/scripts/training.py", TINY]
pytestmark = pytest.mark.slow

# "epoch 2 rank 1/2: train_eval_mIoU=0.0864... val_mIoU=0.0275..." is logged by every rank (exact repr).
RANK_LINE = re.compile(r"epoch (\d+) rank (\d+)/\d+: train_eval_mIoU=\S+ val_mIoU=(\S+)")


def torchrun(*args):
    script = Path(sys.executable).with_name("torchrun")
    launcher = [str(script)] if script.exists() else [sys.executable, "-m", "torch.distributed.run"]
    return [*launcher, *args]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_node_commands(port, nproc_per_node=1):
    return [
        torchrun(
            "--nnodes=2",
            f"--nproc_per_node={nproc_per_node}",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint=127.0.0.1:{port}",
            "--rdzv_id=vocseg-test",
            "--rdzv_conf=join_timeout=60",
            *TRAINING,
        )
        for _ in range(2)
    ]


def start(cmds, env):
    return [
        subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        for cmd in cmds
    ]


def finish(procs, timeout):
    """Waits for every launcher; returns their return codes and combined output. Kills stragglers."""
    deadline, codes, text = time.time() + timeout, [], ""
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            codes.append("hung")
        else:
            codes.append(proc.returncode)
        text += out
    return codes, text


def rank_metrics(text):
    return {(int(epoch), int(rank)): float(miou) for epoch, rank, miou in RANK_LINE.findall(text)}


def workers(launchers):
    """{rank: process} for the training processes the launchers started."""
    found = {}
    for launcher in launchers:
        for child in psutil.Process(launcher.pid).children():
            try:
                rank = child.environ().get("RANK")
            except psutil.Error:
                continue
            if rank is not None:
                found[int(rank)] = child
    return found


def checkpoint_names(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").glob("training_checkpoint_*.pt"))


@pytest.fixture(scope="module")
def two_processes(synthetic_voc, tmp_path_factory):
    out = tmp_path_factory.mktemp("torchrun")
    proc = subprocess.run(
        torchrun("--nproc_per_node=2", *TRAINING),
        cwd=REPO,
        env=make_env(synthetic_voc, out),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return only_run_dir(out), proc


def test_torchrun_two_processes_write_one_set_of_outputs(two_processes):
    run_dir, _ = two_processes
    log = (run_dir / "training.log").read_text()
    # batch_size 4 is the total: 2 per process, so 24 images still make 6 iterations per epoch.
    assert "world size 2" in log and "train images 24 (6 iterations/epoch/process)" in log
    assert checkpoint_names(run_dir) == ["training_checkpoint_10.pt", "training_checkpoint_12.pt"]
    assert len(list((run_dir / "best").iterdir())) == 2
    assert len(list((run_dir / "tb").iterdir())) == 1
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["completed"] and metrics["iteration"] == 12


def test_every_rank_reports_the_single_process_metrics(two_processes, synthetic_voc, tmp_path):
    run_dir, proc = two_processes
    per_rank = rank_metrics(proc.stderr)
    assert set(per_rank) == {(1, 0), (1, 1), (2, 0), (2, 1)}, proc.stderr[-3000:]
    assert per_rank[1, 0] == per_rank[1, 1] and per_rank[2, 0] == per_rank[2, 1]
    final = json.loads((run_dir / "metrics.json").read_text())["val"]["mIoU"]
    assert per_rank[2, 0] == final

    # The sharded validation must score the saved model on every image exactly once.
    weights = run_dir / "checkpoints" / "training_checkpoint_12.pt"
    proc = run_script(
        "evaluation", "tests/configs/tiny_eval.py", make_env(synthetic_voc, tmp_path / "out", WEIGHTS_PATH=weights)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((only_run_dir(tmp_path / "out", "tiny_eval") / "metrics.json").read_text())
    assert result["val"]["mIoU"] == pytest.approx(final, abs=1e-9)


def test_legacy_launcher_resumes_every_rank_from_one_checkpoint(two_processes, synthetic_voc, tmp_path):
    run_dir, _ = two_processes
    # torch 2.14's launcher rejects the abbreviated --nproc as ambiguous; without --use_env it passes
    # --local-rank, which py_config_runner does not accept.
    cmd = [sys.executable, "-m", "torch.distributed.launch", "--nproc_per_node", "2", "--use_env", *TRAINING]
    env = make_env(synthetic_voc, tmp_path, RESUME_FROM=run_dir / "checkpoints" / "training_checkpoint_10.pt")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = only_run_dir(tmp_path)
    log = (resumed / "training.log").read_text()
    assert "world size 2" in log and "resumed from" in log
    reference = torch.load(run_dir / "checkpoints" / "training_checkpoint_12.pt", weights_only=True)
    final = torch.load(resumed / "checkpoints" / "training_checkpoint_12.pt", weights_only=True)
    for key, value in reference["model"].items():
        assert torch.equal(value, final["model"][key]), key


def test_two_nodes_over_loopback(synthetic_voc, tmp_path):
    env = make_env(synthetic_voc, tmp_path, TINY_EPOCHS=1, TINY_SYNC_BN=1)
    codes, text = finish(start(two_node_commands(free_port()), env), timeout=400)
    assert codes == [0, 0], text[-3000:]
    run_dir = only_run_dir(tmp_path)
    assert checkpoint_names(run_dir) == ["training_checkpoint_4.pt", "training_checkpoint_6.pt"]
    per_rank = rank_metrics(text)
    assert set(per_rank) == {(1, 0), (1, 1)} and per_rank[1, 0] == per_rank[1, 1]
    assert per_rank[1, 0] == json.loads((run_dir / "metrics.json").read_text())["val"]["mIoU"]
    # SyncBatchNorm is GPU-only in torch: on CPU the flag is ignored, and each rank says so.
    assert "[rank 1] WARNING: sync_bn=True ignored" in text and "vocseg WARNING: sync_bn=True ignored" in text


@pytest.mark.parametrize("nodes", [1, 2])
def test_killed_rank_ends_the_job(nodes, synthetic_voc, tmp_path):
    env = make_env(synthetic_voc, tmp_path, TINY_EPOCHS=3, TINY_SAVE_EVERY=2)
    cmds = [torchrun("--nproc_per_node=2", *TRAINING)] if nodes == 1 else two_node_commands(free_port())
    launchers = start(cmds, env)
    deadline = time.time() + 300
    while time.time() < deadline and all(p.poll() is None for p in launchers):
        if list(tmp_path.glob("tiny/*/checkpoints/training_checkpoint_*.pt")):
            break
        time.sleep(0.05)
    victims = workers(launchers)
    assert set(victims) == {0, 1} and all(p.poll() is None for p in launchers), finish(launchers, 1)[1][-3000:]

    victims[1].send_signal(signal.SIGKILL)
    killed_at = time.time()
    codes, text = finish(launchers, timeout=60)
    elapsed = time.time() - killed_at
    assert "hung" not in codes and all(code != 0 for code in codes), (codes, text[-3000:])
    assert elapsed < 60
    print(f"{nodes} node(s): job ended {elapsed:.1f} s after kill -9 of rank 1")
    # torchrun's report names the failed rank and its signal.
    assert re.search(r"Root Cause \(first observed failure\):\s*\[0\]:.*?rank\s*: 1 .*?Signal 9", text, re.S), text[
        -3000:
    ]
    run_dir = only_run_dir(tmp_path)
    saved = checkpoint_names(run_dir)
    assert saved
    for name in saved:
        state = torch.load(run_dir / "checkpoints" / name, weights_only=True)
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_nan_on_one_rank_stops_every_rank_before_it_is_saved(synthetic_voc, tmp_path):
    env = make_env(synthetic_voc, tmp_path, TINY_NAN_AFTER=5, TINY_NAN_RANK=1, TINY_SAVE_EVERY=2)
    proc = subprocess.run(
        torchrun("--nproc_per_node=2", *TRAINING), cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode != 0
    # Both ranks stop at iteration 6; torchrun may end one of them before it prints why.
    assert "error: loss became NaN at iteration 6" in proc.stderr, proc.stderr[-3000:]
    # Rank 0's own loss was finite, but its weights were not: it must not have saved iteration 6.
    assert checkpoint_names(only_run_dir(tmp_path)) == ["training_checkpoint_2.pt", "training_checkpoint_4.pt"]


def test_rendezvous_failures_end_within_their_timeouts(tmp_path):
    port = free_port()  # nothing listens there
    script = tmp_path / "never_runs.py"
    script.write_text("raise SystemExit('a worker started')\n")
    # A node given a wrong endpoint: it can only be a client (is_host=0) and gives up after read_timeout.
    wrong = torchrun(
        "--nnodes=2",
        "--nproc_per_node=1",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint=127.0.0.1:{port}",
        "--rdzv_conf=is_host=0,read_timeout=5",
        str(script),
    )
    # The node hosting the rendezvous while the other never arrives gives up after join_timeout.
    alone = torchrun(
        "--nnodes=2",
        "--nproc_per_node=1",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint=127.0.0.1:{free_port()}",
        "--rdzv_conf=join_timeout=5",
        str(script),
    )
    began = time.time()
    procs = start([wrong, alone], dict(os.environ, OMP_NUM_THREADS="1"))
    codes, text = finish(procs, timeout=90)
    print(f"rendezvous failures after {time.time() - began:.1f} s")
    assert codes[0] not in (0, "hung") and codes[1] not in (0, "hung"), (codes, text[-3000:])
    assert f"timed out after 5000ms while trying to connect to (127.0.0.1, {port})" in text
    assert "RendezvousConnectionError" in text and "RendezvousTimeoutError" in text
    assert "a worker started" not in text


def test_process_group_timeout_sources(tmp_path, monkeypatch):
    from vocseg.config import ConfigSource
    from vocseg.errors import UserError
    from vocseg.runtime.launch import process_group_timeout

    def timeout(path, backend, mutations=None):
        return process_group_timeout(backend, ConfigSource(path, None, mutations or {}).setting("dist_timeout"))

    config = tmp_path / "c.py"
    config.write_text("dist_timeout = 30\n")
    plain = tmp_path / "plain.py"
    plain.write_text("seed = 1\n")
    monkeypatch.delenv("DIST_TIMEOUT", raising=False)
    assert timeout(plain, "gloo").total_seconds() == 120
    assert timeout(plain, "nccl") is None  # torch's own NCCL default
    assert timeout(config, "gloo").total_seconds() == 30
    assert timeout(config, "gloo", {"dist_timeout": 45}).total_seconds() == 45  # a clone's edit
    monkeypatch.setenv("DIST_TIMEOUT", "7.5")
    assert timeout(config, "nccl").total_seconds() == 7.5
    monkeypatch.setenv("DIST_TIMEOUT", "soon")
    with pytest.raises(UserError, match="DIST_TIMEOUT='soon' is not allowed"):
        timeout(config, "gloo")


def _rank_zero_work(_local_rank, out_dir):
    # Spawned: module level, so that it pickles. The collective timeout is 1 s; rank 0's work takes longer.
    import datetime

    import ignite.distributed as idist

    from vocseg.errors import UserError
    from vocseg.runtime.ranks import from_rank_zero

    def work(sleep_s, fail=False):
        time.sleep(sleep_s)
        if fail:
            raise UserError("checkpoint x.pt does not load")
        return {"chosen": f"picked by rank {idist.get_rank()}"}

    if idist.get_rank() == 0:
        time.sleep(2.5)  # busy before it gets there too (training creates rank 0's ClearML tracker first)
    results = []
    for sleep_s, wait_s, fail in [(2.5, 60, False), (0, 60, True), (4, 1, False)]:
        try:
            results.append(
                from_rank_zero(
                    "the test's work", functools.partial(work, sleep_s, fail), wait=datetime.timedelta(seconds=wait_s)
                )
            )
        except UserError as exc:
            results.append(f"error: {exc}")
    Path(out_dir, f"rank{idist.get_rank()}.json").write_text(json.dumps(results))


def test_rank_zero_work_is_waited_for_past_the_collective_timeout(tmp_path):
    """Rank 0 alone sets up the ClearML task and fetches checkpoints (minutes over a real network): the other
    ranks wait for it up to their own bound, not the collective timeout, and get its result or its error."""
    import datetime

    import ignite.distributed as idist

    with idist.Parallel(
        backend="gloo", nproc_per_node=2, master_port=free_port(), timeout=datetime.timedelta(seconds=1)
    ) as parallel:
        parallel.run(_rank_zero_work, str(tmp_path))
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0[:2] == rank1[:2] == [{"chosen": "picked by rank 0"}, "error: checkpoint x.pt does not load"]
    # A wait that runs out names what rank 0 was doing and the bound.
    assert rank1[2].startswith("error: rank 1: rank 0 did not finish the test's work within 1 s (")
