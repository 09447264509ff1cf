"""Starting the processes of a run and their process group: this module knows processes, not configs or trackers.

``launch(main, *args, nproc_per_node=N)`` runs ``main(*args)`` once per process, however the processes were
started: by torchrun, torch.distributed.launch or ``srun`` (already N processes: it joins their group), or by
itself (N processes on this machine).
"""

import contextlib
import datetime
import os
import socket
import sys

import ignite.distributed as idist
import torch

# How long a rank waits in a collective for a peer that is alive but stuck, unless dist_timeout says otherwise
# (a dead peer is noticed at once: its sockets close, and torchrun stops the job). nccl keeps torch's default.
GLOO_TIMEOUT_S = 120


def launch(main, *args, nproc_per_node: int = 1, on_gpu: bool = False, timeout_s: float | None = None) -> None:
    """Runs ``main(*args)`` in every process of the run. ``nproc_per_node`` is how many processes to start here
    when no launcher started them; ``on_gpu`` picks nccl over gloo for them."""
    with parallel_context(nproc_per_node, on_gpu, timeout_s) as parallel:
        parallel.run(_one_rank, main, args, nproc_per_node)


def _one_rank(local_rank, main, args, spawned: int) -> None:
    # Module-level (not a lambda): processes started by Parallel(nproc_per_node=N) receive it pickled.
    if spawned > 1 and "OMP_NUM_THREADS" not in os.environ:
        # As torchrun does for its processes: N processes of all-core torch threads would fight for the cores.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // spawned))
    main(*args)


def processes_per_node(given: int | None, device: str | None) -> int:
    """How many processes ``launch`` starts itself: none more under torchrun or srun (they started them);
    else ``given`` (the nproc_per_node setting); else one per visible GPU when there are several and the config
    does not ask for the CPU -- so a clone on an agent given ``--gpus 0,1`` uses both."""
    if distributed_backend() is not None:
        return 1
    if given is not None:
        return int(given)
    if str(device or "").startswith("cpu"):
        return 1
    return max(1, torch.cuda.device_count())


def distributed_backend():
    """gloo on CPU, nccl on GPU, nothing for a plain single process.

    A process group is needed under torchrun / torch.distributed.launch (they set WORLD_SIZE) and under an
    ``srun`` step of several tasks, where ignite reads the ranks and the rendezvous from the SLURM_* variables.
    A batch script's own shell (no SLURM_STEP_NUM_TASKS) is one process.
    """
    if "WORLD_SIZE" not in os.environ and int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) <= 1:
        return None
    return "nccl" if torch.cuda.is_available() else "gloo"


def process_group_timeout(backend, seconds: float | None):
    """The process group's collective timeout: ``seconds`` (the dist_timeout setting), else 120 s with gloo and
    torch's own default (10 min) with nccl. Raise it where one rank legitimately runs far ahead of the others."""
    if seconds is None:
        return datetime.timedelta(seconds=GLOO_TIMEOUT_S) if backend == "gloo" else None
    return datetime.timedelta(seconds=float(seconds))


@contextlib.contextmanager
def parallel_context(nproc: int = 1, on_gpu: bool = False, timeout_s: float | None = None):
    """idist.Parallel for however this process was launched, or starting ``nproc`` processes itself, with the
    process-group timeout applied."""
    backend = distributed_backend()
    if backend is None and nproc > 1:
        backend = "nccl" if on_gpu and torch.cuda.is_available() else "gloo"
        timeout = process_group_timeout(backend, timeout_s)
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
    if backend is None:
        with idist.Parallel() as parallel:
            yield parallel
        return
    # ignite 0.5.5 hands Parallel(timeout=...) to init_process_group only when it spawns the processes
    # itself, never under torchrun: initialise here, and Parallel() runs the function in this group.
    timeout = process_group_timeout(backend, timeout_s)
    if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":
        _announce(backend, int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_STEP_NUM_TASKS") or 1), timeout)
    with _torchrun_ranks_over_slurms():
        store = _restarted_group_store(timeout)
        if store is None:
            idist.initialize(backend, **({"timeout": timeout} if timeout else {}))
        else:  # ignite adopts a process group that exists (idist syncs from the context)
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
            torch.distributed.init_process_group(
                backend,
                store=store,
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


@contextlib.contextmanager
def _torchrun_ranks_over_slurms():
    """torchrun started by srun (one per node): ignite takes SLURM_PROCID/SLURM_LOCALID for the ranks whenever
    SLURM_JOB_ID is set, and on several nodes refuses torchrun's RANK where they differ, which they do: the c10d
    rendezvous numbers the nodes in any order, and torchrun's processes on a node share one SLURM task. While the
    process group is set up, ignite does not see the job id (the run keeps its name, slurm-<job id>)."""
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
