"""The SLURM suite (`make test-slurm`): real slurmctld/slurmd, real srun and sbatch, real signals and requeues.

It runs against the cluster that `sinfo` reaches (SLURM_CONF or /etc/slurm/slurm.conf). Without one it stops
at once with one line saying how to start one; it never skips. `.ci/run` starts a throwaway local cluster.
"""

import shutil
import subprocess

import pytest

HOW = (
    'start a cluster first: `eval "$(SLURM_LOCAL_NODES=2 ../shared/slurm-local/slurm-local start /tmp/slurm)"` '
    "(a throwaway two-node cluster on this machine), or run on a machine where `sinfo` reaches yours"
)


def pytest_configure(config):
    if shutil.which("sbatch") is None:
        raise pytest.UsageError(f"make test-slurm: SLURM's commands are not installed: {HOW}")
    probe = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0 or not probe.stdout.strip():
        problem = (probe.stderr.strip().splitlines() or ["no partition"])[-1]
        raise pytest.UsageError(f"make test-slurm: no SLURM cluster answers ({problem}): {HOW}")
