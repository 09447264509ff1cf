"""Starting the processes of a run and their process group: this module knows processes, not configs or trackers.

``launch(main, *args, nproc_per_node=N)`` runs ``main(*args)`` once per process, however the processes were
started: by torchrun, torch.distributed.launch or ``srun`` (already N processes: it joins their group), or by
itself (N processes on this machine).
"""

import contextlib
import datetime
import gc
import os
import socket
import sys

import ignite.distributed as idist
import torch
from ignite.distributed.comp_models.native import _setup_ddp_vars_from_slurm_env

# How long a rank waits in a collective for a peer that is alive but stuck, unless dist_timeout says otherwise
# (a dead peer is noticed at once: its sockets close, and torchrun stops the job). nccl keeps torch's default.
GLOO_TIMEOUT_S = 120


def launch(main, *args, nproc_per_node: int = 1, backend: str | None = None, timeout_s: float | None = None):
    """Runs ``main(*args)`` in every process of the run. ``nproc_per_node`` is how many processes to start here
    when no launcher started them; ``backend`` is their process group's (the device plan's: gloo or nccl)."""
    with parallel_context(nproc_per_node, backend, timeout_s) as parallel:
        parallel.run(_one_rank, main, args, nproc_per_node)


def _one_rank(local_rank, main, args, spawned: int) -> None:
    # Module-level (not a lambda): processes started by Parallel(nproc_per_node=N) receive it pickled.
    if spawned > 1 and "OMP_NUM_THREADS" not in os.environ:
        # As torchrun does for its processes: N processes of all-core torch threads would fight for the cores.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // spawned))
    try:
        main(*args)
    finally:
        # The run's engines, DDP model and their reference cycles die here, before the process group is destroyed,
        # not at interpreter exit: gloo work that DDP still holds, freed during finalisation, aborts the process
        # ("terminate called without an active exception"), which srun reports as a failed task.
        gc.collect()


def joins_group() -> bool:
    """Whether a launcher started this process as one of several: torchrun / torch.distributed.launch (they set
    WORLD_SIZE), or an ``srun`` step of several tasks. A batch script's own shell (no SLURM_STEP_NUM_TASKS) is
    one process."""
    return "WORLD_SIZE" in os.environ or int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1


def process_group_timeout(backend, seconds: float | None):
    """The process group's collective timeout: ``seconds`` (the dist_timeout setting), else 120 s with gloo and
    torch's own default (10 min) with nccl. Raise it where one rank legitimately runs far ahead of the others."""
    if seconds is None:
        return datetime.timedelta(seconds=GLOO_TIMEOUT_S) if backend == "gloo" else None
    return datetime.timedelta(seconds=float(seconds))


@contextlib.contextmanager
def parallel_context(nproc: int = 1, backend: str | None = None, timeout_s: float | None = None):
    """idist.Parallel for however this process was launched, or starting ``nproc`` processes itself, with the
    process-group timeout applied. The device of each process is set before (vocseg.runtime.device_plan)."""
    timeout = process_group_timeout(backend, timeout_s)
    if not joins_group() and nproc > 1:
        _announce(backend, nproc, timeout)
        with idist.Parallel(
            backend=backend,
            nproc_per_node=nproc,
            master_addr="127.0.0.1",
            master_port=_free_port(),
            **({"timeout": timeout} if timeout else {}),
        ) as parallel:
            yield parallel
        return
    if not joins_group():
        with idist.Parallel() as parallel:
            yield parallel
        return
    _rendezvous_from_slurm()
    if os.environ["RANK"] == "0":
        _announce(backend, int(os.environ["WORLD_SIZE"]), timeout)
    # The group is started here, not by idist.initialize: ignite would set every rank's CUDA device to its local
    # rank, which is wrong where SLURM gives each task a GPU of its own (seen as device 0), and would touch CUDA
    # in a CPU run. ignite adopts the group (idist syncs from the context).
    with _torchrun_ranks_over_slurms():
        torch.distributed.init_process_group(
            backend,
            store=_restarted_group_store(timeout),
            rank=int(os.environ["RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]),
            **({"timeout": timeout} if timeout else {}),
        )
        idist.sync()  # ignite reads the ranks now, while SLURM's are hidden
    try:
        with idist.Parallel() as parallel:
            yield parallel
    finally:
        idist.finalize()


def _rendezvous_from_slurm() -> None:
    """RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT of an srun task, as ignite derives them (the
    first node of the job, a port from the job id), unless torchrun inside the task set them."""
    if "SLURM_JOB_ID" in os.environ and "TORCHELASTIC_RUN_ID" not in os.environ:
        os.environ.update({k: str(v) for k, v in _setup_ddp_vars_from_slurm_env(dict(os.environ)).items()})


@contextlib.contextmanager
def _torchrun_ranks_over_slurms():
    """torchrun started by srun (one per node): ignite takes SLURM_PROCID/SLURM_LOCALID for the ranks whenever
    SLURM_JOB_ID is set, and torchrun's differ: the c10d rendezvous numbers the nodes in any order, and torchrun's
    processes on a node share one SLURM task. While ignite adopts the process group, it does not see the job id
    (the run keeps its name, slurm-<job id>)."""
    job = os.environ.pop("SLURM_JOB_ID", None) if "TORCHELASTIC_RUN_ID" in os.environ else None
    try:
        yield
    finally:
        if job is not None:
            os.environ["SLURM_JOB_ID"] = job


def _announce(backend: str, world_size: int, timeout) -> None:
    # One line before any log exists: what a stuck collective will wait for is the first thing to check.
    waits = f"{timeout.total_seconds():g} s" if timeout else "torch's default"
    print(f"vocseg: process group {backend} of {world_size} processes, collective timeout {waits}", file=sys.stderr)


def _restarted_group_store(timeout):
    """The store of a group that torchrun restarted (``--max-restarts``), with a prefix of its own; else None.

    torchrun's default (static) rendezvous keeps one store, served by its agent, through every restart, so
    the new processes would find the keys the dead group left there (each rank's address) and connect to
    peers that are gone: a timeout or "connection refused" instead of a restart. A prefix per restart gives
    each group clean keys (the dynamic c10d rendezvous gets a new store anyway; the prefix costs nothing).
    """
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if restart == 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = torch.distributed.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        int(os.environ["WORLD_SIZE"]),
        is_master=False,
        **({"timeout": timeout} if timeout else {}),
    )
    return torch.distributed.PrefixStore(f"vocseg/restart_{restart}", store)


def _free_port() -> int:
    # ignite's default master port (15000) is shared by every run on the machine.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
