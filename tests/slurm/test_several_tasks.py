"""Several tasks and several nodes (`SLURM_LOCAL_NODES=2` slurm-local: two slurmd on this host, CPU, gloo over
loopback): a warned multi-task batch job always ends in a requeue that continues exactly; srun -N2 trains as
srun -N1; torchrun started once per node by srun trains like the SLURM launch; per-node work runs once per node
and per-job work once."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_slurm import ROOT, TINY, TRAIN, env_for, job_state, metrics, start_requeued_job_now, wait_for

LAYOUTS = {
    "2 nodes x 1 task": ["--nodes=2", "--ntasks-per-node=1"],
    "1 node x 2 tasks": ["--nodes=1", "--ntasks-per-node=2"],
}
TOTAL = 12  # 2 epochs of 6 iterations: 24 images, a batch of 4 split over 2 processes


def two_nodes():
    nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True).stdout.split()
    if len(set(nodes)) < 2:
        pytest.fail(
            "this test needs a cluster of two nodes: "
            'eval "$(SLURM_LOCAL_NODES=2 ../shared/slurm-local/slurm-local start /tmp/slurm)"'
        )


def srun(layout, env, command=TRAIN):
    return subprocess.run(
        ["srun", *LAYOUTS[layout], "--cpus-per-task=1", *command],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def final_weights(out):
    (path,) = Path(out).glob(f"tiny/*/checkpoints/training_checkpoint_{TOTAL}.pt")
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def one_node(synthetic_voc, tmp_path_factory):
    """The uninterrupted reference: srun -N1 -n2."""
    out = tmp_path_factory.mktemp("one_node")
    proc = srun("1 node x 2 tasks", env_for(synthetic_voc, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, metrics(out)[1], proc.stderr


def test_srun_on_two_nodes_trains_as_on_one_node(one_node, synthetic_voc, tmp_path):
    two_nodes()
    proc = srun("2 nodes x 1 task", env_for(synthetic_voc, tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir, result = metrics(tmp_path)
    reference_dir, reference, _ = one_node
    assert result["completed"] and result["iteration"] == reference["iteration"] == TOTAL
    assert result["val"]["mIoU"] == reference["val"]["mIoU"]
    assert result["train_eval"]["mIoU"] == reference["train_eval"]["mIoU"]
    assert same_weights(final_weights(tmp_path), final_weights(reference_dir))
    # Per-job work once: one run folder, one lock, one set of checkpoints and events (global rank 0).
    assert [p.name for p in (tmp_path / "tiny").iterdir()] == [run_dir.name]
    assert proc.stderr.count("output folder ") == 1 and proc.stderr.count("done: metrics in") == 1
    assert len(list((run_dir / "tb").glob("events.out.tfevents.*"))) == 1


def submit(env, log, layout, config=TINY):
    return (
        subprocess.run(
            ["sbatch", "--parsable", *LAYOUTS[layout], "--cpus-per-task=1", f"--output={log}"]
            + ["experiments/slurm/train.sbatch", config],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        .stdout.strip()
        .split(";")[0]
    )


def run_to_the_end(job, log, requeues):
    """Waits for the job (and its requeue, if expected) to end; returns its final state."""
    try:
        if requeues:
            wait_for(lambda: job_state(job).get("Restarts") == "1", 300, "the job to requeue itself")
            start_requeued_job_now(job)
            wait_for(lambda: f"job {job} run 1:" in log.read_text(), 300, "the requeued job to start")
        return wait_for(
            lambda: job_state(job).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED") and job_state(job),
            600,
            "the job to end",
        )
    finally:
        subprocess.run(["scancel", job], capture_output=True)


# Where the warning lands (tests/configs/tiny.py has rank 0 ask SLURM for it: scancel --signal=USR1 --batch,
# what a time limit's warning does) and the stop it gives: (layout, when, settings, the iteration it stops at).
WARNINGS = [
    # inside an epoch, checks every iteration: the next iteration ends the first run
    ("2 nodes x 1 task", "iteration", {"TINY_LOG_EVERY": "1"}, 2),
    # during validation, checks every 6 iterations = the epoch (never stopped before): at the epoch's end
    ("1 node x 2 tasks", "validation", {"TINY_LOG_EVERY": "6"}, 6),
    # during rank 0's checkpoint write at iteration 4, checks every 3 iterations: at the epoch's end
    ("2 nodes x 1 task", "checkpoint", {"TINY_LOG_EVERY": "3", "TINY_SAVE_EVERY": "4"}, 6),
]


@pytest.mark.parametrize(
    "layout, when, settings, stops_at", WARNINGS, ids=[f"{w[0]}, during {w[1]}".replace(" ", "_") for w in WARNINGS]
)
def test_warned_multi_task_job_requeues_and_ends_like_an_uninterrupted_run(
    layout, when, settings, stops_at, one_node, synthetic_voc, tmp_path
):
    if layout.startswith("2 nodes"):
        two_nodes()
    settings = {"TINY_SAVE_EVERY": "96", **settings}  # no periodic checkpoint unless asked for
    env = env_for(synthetic_voc, tmp_path / "job", TINY_WARN_DURING=when, VOCSEG_PYTHON=sys.executable, **settings)
    log = tmp_path / "job.out"
    job = submit(env, log, layout)
    state = run_to_the_end(job, log, requeues=True)
    text = log.read_text()
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", text[-4000:]
    assert f"tiny: rank 0 asks SLURM to warn job {job} during {when}" in text
    # Every task stopped at the same exact point and waited for rank 0; none was killed, and the step said
    # "requeue me" through the request file.
    assert text.count(f"SIGUSR1 received: checkpoint at iteration {stops_at} ") == 2, text[-4000:]
    assert "stopped for a requeue: SIGUSR1: stopped at iteration" in text and "STEP" not in text, text[-4000:]
    assert "Terminated" not in text and "error: task" not in text.lower(), text[-4000:]
    checkpoint = f"{tmp_path / 'job'}/tiny/slurm-{job}/checkpoints/training_checkpoint_{stops_at}.pt"
    assert f"resumed from {checkpoint} at iteration {stops_at}" in text, text[-4000:]
    assert not list(ROOT.glob(f".vocseg-requeue-{job}*"))  # the request file is gone once taken

    reference_dir, reference, _ = one_node
    assert same_weights(final_weights(tmp_path / "job"), final_weights(reference_dir))
    assert metrics(tmp_path / "job")[1]["val"]["mIoU"] == reference["val"]["mIoU"]


def test_a_task_that_fails_fails_the_job_without_a_requeue(synthetic_voc, tmp_path):
    two_nodes()
    env = env_for(synthetic_voc, tmp_path / "job", TINY_FAIL_RANK="1", VOCSEG_PYTHON=sys.executable)
    log = tmp_path / "job.out"
    job = submit(env, log, "2 nodes x 1 task")
    state = run_to_the_end(job, log, requeues=False)
    text = log.read_text()
    assert state["JobState"] == "FAILED" and state["Restarts"] == "0", text[-3000:]
    assert "requeue" not in text.lower(), text[-3000:]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_once_per_node_by_srun_trains_like_the_slurm_launch(one_node, synthetic_voc, tmp_path):
    two_nodes()
    # One torchrun per node (srun -N2 --ntasks-per-node=1), a c10d rendezvous on the job's first node. The first
    # node joins last, so the rendezvous gives rank 0 to the other node: torchrun's ranks are not SLURM's.
    torchrun = (
        'first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1); [ "$SLURM_NODEID" = 0 ] && sleep 3; '
        f'exec "{sys.executable}" '
        f"-m torch.distributed.run --nnodes=2 --nproc_per_node=1 --rdzv_backend=c10d "
        f'--rdzv_endpoint="$first:{free_port()}" --rdzv_id="$SLURM_JOB_ID" --rdzv_conf=join_timeout=60 '
        + " ".join(TRAIN[1:])
    )
    proc = srun("2 nodes x 1 task", env_for(synthetic_voc, tmp_path), ["bash", "-c", torchrun])
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir, result = metrics(tmp_path)
    reference_dir, reference, _ = one_node
    assert "world size 2" in proc.stderr and result["iteration"] == TOTAL
    assert run_dir.name.startswith("slurm-")  # named after the job still
    assert result["val"]["mIoU"] == reference["val"]["mIoU"]
    assert same_weights(final_weights(tmp_path), final_weights(reference_dir))
    assert [p.name for p in (tmp_path / "tiny").iterdir()] == [run_dir.name]


PROBE = """
import json, os, sys, time
import ignite.distributed as idist
from vocseg import models
from vocseg.runtime import folder_lock, launch

def probe(out):
    calls = []

    def download(url):  # a download into the node's own cache (slow); a read when it is there
        cache = os.path.join(out, "hub-cache-node" + os.environ["SLURM_NODEID"])
        if not os.path.exists(cache):
            time.sleep(1)
            open(cache, "w").close()
            calls.append("downloaded")
        return {}

    models._hub_download = download
    try:
        models._backbone_weights(type("W", (), {"url": "https://example.invalid/w.pth"}), "test")
    except FileNotFoundError:  # its hash of the cached file: nothing was fetched
        pass
    folder_lock.hold_run_folder(__import__("pathlib").Path(out, "run"))  # per job: global rank 0
    record = {"rank": idist.get_rank(), "local_rank": idist.get_local_rank(), "node": os.environ["SLURM_NODEID"],
              "fetched": calls, "locked": bool(folder_lock._held)}
    with open(os.path.join(out, f"rank{idist.get_rank()}.json"), "w") as f:
        json.dump(record, f)

with launch.parallel_context() as parallel:
    parallel.run(lambda _local_rank, out: probe(out), sys.argv[1])
"""


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_per_node_work_runs_once_per_node_and_per_job_work_once(layout, tmp_path):
    if layout.startswith("2 nodes"):
        two_nodes()
    (tmp_path / "probe.py").write_text(PROBE)
    proc = srun(layout, env_for(tmp_path, tmp_path), [sys.executable, str(tmp_path / "probe.py"), str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    fetched_on = sorted(r["node"] for r in records if r["fetched"])
    locked = [r["rank"] for r in records if r["locked"]]
    if layout.startswith("2 nodes"):
        assert [(r["node"], r["local_rank"]) for r in records] == [("0", 0), ("1", 0)]
        assert fetched_on == ["0", "1"]  # once on each node
    else:
        assert [(r["node"], r["local_rank"]) for r in records] == [("0", 0), ("0", 1)]
        assert fetched_on == ["0"]  # once on the one node
    assert locked == [0]  # the run folder's lock: once for the job
    assert (tmp_path / "run" / "run.lock").is_file()
