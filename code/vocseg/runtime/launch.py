"""Starting the processes of a run and their process group; nothing about configs' contents or trackers.

Switches (environment):
- ``DIST_TIMEOUT``: seconds a rank waits in a collective for the others (config: ``dist_timeout``).
- ``NPROC_PER_NODE``: processes a plain launch starts itself (config: ``nproc_per_node``; default: one per
  visible GPU).
"""

import contextlib
import datetime
import os
import socket
import sys

import ignite.distributed as idist
import torch

from vocseg.config import config_source, peek_constant
from vocseg.errors import UserError, exit_with
from vocseg.runtime import signals


def launch(config, one_rank) -> None:
    """Runs ``one_rank(source)`` (a ``config.ConfigSource``) in every process however they were started
    (python, torchrun, torch.distributed.launch, or by this function: see ``processes_per_node``); bad input
    ends the run with one line and a non-zero exit. Under clearml-agent, ``source`` carries the clone's edits."""
    from vocseg.clearml import session as clearml_session
    from vocseg.clearml.clone_edits import clone_source

    signals.stop_on_signals(in_process_group=distributed_backend() is not None)
    try:
        source = clone_source(config_source(config))
        nproc = processes_per_node(source.config_path, source.mutations)
        if nproc > 1 and clearml_session.enabled() and clearml_session.requested_queue(source.config_path):
            nproc = 1  # the agent that runs it will choose
        with parallel_context(source.config_path, nproc, source.mutations) as parallel:
            parallel.run(_one_rank, one_rank, source, nproc)
    except UserError as exc:
        exit_with(exc)
    except signals.Preempted as exc:
        print(f"stopped: {exc}", file=sys.stderr, flush=True)
        sys.exit(signals.PREEMPTED_EXIT)
    except signals.Interrupted as exc:
        exit_with(exc, 128 + exc.signum)  # the shell's convention: 143 after SIGTERM, 130 after Ctrl-C


def _one_rank(local_rank, one_rank, source, spawned: int) -> None:
    # Module-level (not a lambda): processes started by Parallel(nproc_per_node=N) receive it pickled.
    if spawned > 1 and "OMP_NUM_THREADS" not in os.environ:
        # As torchrun does for its processes: N processes of all-core torch threads would fight for the cores.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // spawned))
    one_rank(source)


def processes_per_node(config_path, mutations=None) -> int:
    """How many processes ``launch`` starts itself: none more under torchrun (it started them); else
    NPROC_PER_NODE (environment) or ``nproc_per_node`` (config); else one per visible GPU when there are
    several and the config does not ask for the CPU -- so a clone on an agent given ``--gpus 0,1`` uses both."""
    if distributed_backend() is not None:  # torchrun, torch.distributed.launch, srun: already N processes
        return 1
    given = os.environ.get("NPROC_PER_NODE") or peek_constant(config_path, "nproc_per_node", mutations)
    if given is not None:
        try:
            count = int(given)
        except (TypeError, ValueError):
            count = 0
        if count < 1 or str(count) != str(given).strip():
            raise UserError(
                f"nproc_per_node {given!r} is not a whole number of processes >= 1: fix "
                f"NPROC_PER_NODE or nproc_per_node in {config_path}"
            )
        return count
    if str(peek_constant(config_path, "device", mutations, default="")).startswith("cpu"):
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


def process_group_timeout(config_path, backend):
    """How long a rank waits in a collective for the others: DIST_TIMEOUT (seconds, env) or ``dist_timeout``
    in the config; by default 120 s with gloo and torch's own default (10 min) with nccl.

    A dead peer is noticed at once (its sockets close, and torchrun stops the job); this bounds the wait for
    a peer that is alive but stuck. Raise it where one rank legitimately runs far ahead of the others.
    """
    seconds = os.environ.get("DIST_TIMEOUT") or peek_constant(config_path, "dist_timeout")
    if seconds is None:
        return datetime.timedelta(seconds=120) if backend == "gloo" else None
    try:
        return datetime.timedelta(seconds=float(seconds))
    except (TypeError, ValueError):
        raise UserError(
            f"process-group timeout {seconds!r} is not a number of seconds: fix DIST_TIMEOUT or "
            f"dist_timeout in {config_path}"
        ) from None


@contextlib.contextmanager
def parallel_context(config_path, nproc: int = 1, mutations=None):
    """idist.Parallel for however this process was launched, or starting ``nproc`` processes itself, with the
    process-group timeout applied."""
    backend = distributed_backend()
    if backend is None and nproc > 1:
        on_gpu = torch.cuda.is_available() and not str(
            peek_constant(config_path, "device", mutations, default="")
        ).startswith("cpu")
        backend = "nccl" if on_gpu else "gloo"
        timeout = process_group_timeout(config_path, backend)
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
    timeout = process_group_timeout(config_path, backend)
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
    try:
        with idist.Parallel() as parallel:
            yield parallel
    finally:
        idist.finalize()


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
