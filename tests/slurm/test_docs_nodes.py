"""The SLURM and several-node commands of README.md and docs/*.md, run as written on the two-node cluster.

tests/test_docs.py runs every other shell block; a block with, on the line just above its fence,

    <!-- run by tests/slurm/test_docs_nodes.py on two SLURM nodes: WHAT -->

runs here instead (``make test-slurm``, on ``SLURM_LOCAL_NODES=2`` slurm-local: two slurmd on one host, CPU
tasks, gloo over loopback), in the sandbox test_docs gives a page: a copy of the repository, synthetic VOC + SBD
data in ``$HOME/data``, a random ResNet-101 backbone, no ClearML; in its environment also ``CONFIG_OVERRIDES``
(NODES_TINY: the ResNet-101 configs train for seconds on the CPU) and ``OMP_NUM_THREADS=1``. Each block is changed
only by SUBSTITUTIONS below (what a cluster of CPU nodes on one host needs) and must exit 0; every batch job it
submits must end COMPLETED; every training command it holds must leave a completed run (metrics.json) of the
world size its substituted command asks for.
Not tested: GPUs, a real network between nodes, NCCL.
"""

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from test_docs import REPO, TINY, Block, _sandbox, all_blocks

HERE = str(Path(__file__).resolve().relative_to(REPO))
BLOCKS = [block for block in all_blocks() if block.elsewhere == HERE]

# The substitutions, in the order they apply: (pattern, replacement, why). Nothing else of a block changes.
FIRST_NODE = '$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)'
SUBSTITUTIONS = [
    (r" --gpus-per-(?:node|task)=\d+", "", "no GPUs: the nodes are CPU nodes"),
    (r"--nproc_per_node=\d+", "--nproc_per_node=1", "one torchrun process per node (one per GPU on a real node)"),
    (r"--ntasks-per-node=\d+", "--ntasks-per-node=1", "one task per node (one per GPU on a real node)"),
    (r"--ntasks=\d+", "--ntasks=2", "two tasks on a one-node step (a node here has 2 CPUs)"),
    (r"(?m)^(\s*)sbatch ", r"\1sbatch --cpus-per-task=1 ", "a task asks 1 CPU, not the script's 8: a node has 2"),
    (r"\bnode1:", FIRST_NODE + ":", "the rendezvous host node1: the job's first node, as slurm.md computes it"),
    (r":29500\b", ":{port}", "the rendezvous port: a free one (another test may hold 29500)"),
]
# A torchrun --nnodes=N block not started by srun runs once per node, as on N machines:
ONCE_PER_NODE = "srun --nodes={nodes} --ntasks-per-node=1 bash -c {block}"
# CONFIG_OVERRIDES (test_docs's TINY, with 2 images per process: one is refused with several processes).
NODES_TINY = TINY.replace("batch_size=2", "batch_size=4")
BLOCK_TIMEOUT_S = 300


def script(block: Block, port: int) -> str:
    """The block as it runs here: SUBSTITUTIONS applied, a bare torchrun --nnodes started once per node."""
    text = block.text
    for pattern, replacement, _why in SUBSTITUTIONS:
        text = re.sub(pattern, replacement.replace("{port}", str(port)), text)
    assert "gpu" not in text.lower(), f"{block}: a GPU request the substitutions leave:\n{text}"
    nnodes = re.search(r"torchrun\b.*--nnodes=(\d+)", text, re.S)
    if nnodes and not text.lstrip().startswith("srun "):
        text = ONCE_PER_NODE.format(nodes=nnodes.group(1), block=shlex.quote(text))
    assert re.search(r"^\s*(srun|sbatch) ", text, re.M), f"{block}: neither srun nor sbatch: nothing runs on SLURM"
    return text


def world_sizes(text: str) -> list[int]:
    """The world size of each training command of a substituted block, in order."""
    sizes = []
    for command in re.sub(r"\\\n", " ", text).splitlines():
        if "training.py" not in command and "train.sbatch" not in command:
            continue
        value = dict(re.findall(r"--(nnodes|nproc_per_node|nodes|ntasks-per-node|ntasks)=(\d+)", command))
        if "nnodes" in value:
            sizes.append(int(value["nnodes"]) * int(value.get("nproc_per_node", 1)))
        elif "ntasks" in value:
            sizes.append(int(value["ntasks"]))
        else:
            sizes.append(int(value.get("nodes", 1)) * int(value.get("ntasks-per-node", 1)))
    return sizes


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """One sandbox for every block (each run gets a folder of its own: slurm-<job id>)."""
    import torch
    from torchvision.models import resnet101

    backbone = tmp_path_factory.mktemp("backbone") / "resnet101.pth"
    torch.save(resnet101().state_dict(), backbone)
    repo, env = _sandbox(tmp_path_factory.mktemp("docs_nodes"), backbone)
    # The cluster's config (test_docs clears every SLURM_ variable of the developer's shell); the venv's own
    # python, since torchrun starts its processes with its own interpreter: CONFIG_OVERRIDES alone makes it tiny.
    # One thread per process, as tests/slurm does: two processes of two threads on 2 cores train 6x slower.
    env.update(
        CONFIG_OVERRIDES=NODES_TINY,
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]]),
        OMP_NUM_THREADS="1",
    )
    if os.environ.get("SLURM_CONF"):
        env["SLURM_CONF"] = os.environ["SLURM_CONF"]
    return repo, env


def run_folders(repo: Path) -> set[Path]:
    return {p.parent for p in (repo / "output").glob("*/*/metrics.json")}


def two_nodes():
    nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True).stdout.split()
    if len(set(nodes)) < 2:
        pytest.fail('needs two nodes: eval "$(SLURM_LOCAL_NODES=2 ../shared/slurm-local/slurm-local start DIR)"')


# Blocks of the same text (README.md repeats docs/training.md's torchrun) run once, under every place's id.
UNIQUE = {}
for _block in BLOCKS:
    UNIQUE.setdefault(_block.text, []).append(_block)


@pytest.mark.parametrize(
    "same", list(UNIQUE.values()), ids=[" = ".join(str(b) for b in same) for same in UNIQUE.values()]
)
def test_block_runs_as_written_on_two_nodes(same, sandbox):
    from test_slurm import job_state, wait_for

    two_nodes()
    block, (repo, env) = same[0], sandbox
    text = script(block, free_port())
    before = run_folders(repo)
    proc = subprocess.Popen(
        ["bash", "-c", "set -eo pipefail\n" + text],
        cwd=repo,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # whatever it leaves running is killed with it
    )
    jobs = []
    try:
        out, err = proc.communicate(timeout=BLOCK_TIMEOUT_S)
        jobs = re.findall(r"^Submitted batch job (\d+)$", out, re.M)
        ended = {
            job: wait_for(
                lambda job=job: (
                    job_state(job).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") and job_state(job)
                ),
                BLOCK_TIMEOUT_S,
                f"job {job} to end",
            )
            for job in jobs
        }
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{block}: over {BLOCK_TIMEOUT_S} s; it ran\n{text}\nstderr ends:\n{err[-3000:]}")
    finally:
        for job in jobs:
            subprocess.run(["scancel", job], capture_output=True)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, f"{block} failed (exit {proc.returncode}); it ran\n{text}\nstderr:\n{err[-4000:]}"
    logs = {job: (repo / f"slurm-{job}.out").read_text() for job in jobs}
    for job, state in ended.items():
        assert state["JobState"] == "COMPLETED", f"{block}: job {job} {state['JobState']}:\n{logs[job][-4000:]}"

    runs = sorted(run_folders(repo) - before, key=lambda p: (len(p.name), p.name))  # slurm-<job id>: in job order
    if jobs:
        assert [p.name for p in runs] == [f"slurm-{job}" for job in jobs], f"{block}: runs {runs} of jobs {jobs}"
    sizes = world_sizes(text)
    assert len(runs) == len(sizes), f"{block}: {len(sizes)} training commands, runs {[p.name for p in runs]}"
    for run, size in zip(runs, sizes):
        log = (run / "training.log").read_text()
        assert f"world size {size} " in log, f"{block}: {run.name} is not of world size {size}:\n{log[-2000:]}"
        result = json.loads((run / "metrics.json").read_text())
        assert result["completed"] and result["iteration"] > 0, f"{block}: {run.name}: {result}"
    print(f"{', '.join(str(b) for b in same)}: ran\n{text}\nruns {[p.name for p in runs]} of world sizes {sizes}")
