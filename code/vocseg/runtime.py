"""What every script does before its own work: start the processes, the process group, logging, seeds.

Switches (environment):
- ``DIST_TIMEOUT``: seconds a rank waits in a collective for the others (config: ``dist_timeout``).
- ``NPROC_PER_NODE``: processes a plain launch starts itself (config: ``nproc_per_node``; default: one per
  visible GPU).
- ``VOCSEG_CPU_ALLOCATOR=default``: leave glibc's allocator alone in CPU runs (see ``tune_cpu_allocator``).
"""

import contextlib
import ctypes
import datetime
import logging
import os
import random
import signal
import socket
import sys
import threading
import time

import ignite.distributed as idist
import numpy as np
import torch

from vocseg.config import config_source, peek_constant
from vocseg.errors import UserError, exit_with, one_line

# extra= of a log call that every rank prints, not only rank 0 (e.g. each rank's metrics).
ALL_RANKS = {"all_ranks": True}


def launch(config, one_rank) -> None:
    """Runs ``one_rank(source)`` (a ``config.ConfigSource``) in every process however they were started
    (python, torchrun, torch.distributed.launch, or by this function: see ``processes_per_node``); bad input
    ends the run with one line and a non-zero exit. Under clearml-agent, ``source`` carries the clone's edits."""
    from vocseg import clearml_session
    from vocseg.clone_edits import clone_source

    stop_on_signals()
    try:
        source = clone_source(config_source(config))
        nproc = processes_per_node(source.config_path, source.mutations)
        if nproc > 1 and clearml_session.enabled() and clearml_session.requested_queue(source.config_path):
            nproc = 1  # the agent that runs it will choose
        with parallel_context(source.config_path, nproc, source.mutations) as parallel:
            parallel.run(_one_rank, one_rank, source, nproc)
    except UserError as exc:
        exit_with(exc)
    except Preempted as exc:
        print(f"stopped: {exc}", file=sys.stderr, flush=True)
        sys.exit(PREEMPTED_EXIT)
    except Interrupted as exc:
        exit_with(exc, 128 + exc.signum)  # the shell's convention: 143 after SIGTERM, 130 after Ctrl-C


class Interrupted(KeyboardInterrupt):
    """SIGTERM (schedulers, clearml-agent, torchrun stopping a job) or Ctrl-C, raised where the main thread was.

    A KeyboardInterrupt, so that DataLoader workers, which inherit the handler, exit quietly as they do on
    Ctrl-C; the message is what the user reads last (training adds the checkpoint to resume from)."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message or f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


_signals = {"writing": False, "pending": None}


def _interrupt(signum, _frame) -> None:
    if _signals["writing"]:
        _signals["pending"] = signum
        return
    raise Interrupted(signum)


def stop_on_signals() -> None:
    """SIGTERM and SIGINT raise Interrupted in the main thread (Python's default for SIGTERM is to die on the
    spot: no message, and DataLoader workers left running until they notice).

    Not SIGTERM in a process group: a Python handler runs only between bytecodes, and a rank blocked in a
    collective or a store wait (its peer gone) would then never end on torchrun's or a user's SIGTERM."""
    for signum in (signal.SIGINT,) if distributed_backend() else (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _interrupt)


@contextlib.contextmanager
def uninterrupted():
    """SIGTERM / Ctrl-C arriving inside this block (a checkpoint write) take effect when it ends."""
    if _signals["writing"]:
        yield
        return
    _signals["writing"] = True
    try:
        yield
    finally:
        _signals["writing"], signum = False, _signals["pending"]
        _signals["pending"] = None
        if signum is not None:
            raise Interrupted(signum)


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


# How long the other ranks wait while rank 0 alone talks to ClearML (setting up its task, fetching a checkpoint
# of several hundred MB): minutes over a real network, past the collective timeout that bounds stuck peers.
RANK_ZERO_WAIT = datetime.timedelta(minutes=30)


def from_rank_zero(what: str, fn, wait: datetime.timedelta = RANK_ZERO_WAIT):
    """``fn()`` run by rank 0 alone, and its (picklable) result on every rank; a UserError it raises is raised
    on every rank. ``what`` names rank 0's work in the error the others raise when it takes over ``wait``."""
    if idist.get_world_size() == 1:
        return fn()
    # A side group of its own, so the wait is not the collective timeout; gloo, so it also works beside nccl.
    group = torch.distributed.new_group(backend="gloo", timeout=wait)
    box = [None]
    try:
        if idist.get_rank() == 0:
            started = time.monotonic()
            try:
                box = [(fn(), None)]
            except UserError as exc:
                box = [(None, str(exc))]
            took = time.monotonic() - started
            if took > 60:  # the others sat idle meanwhile: say where the time went
                logging.getLogger("vocseg").warning("rank 0 took %.0f s for %s; the other ranks waited", took, what)
        try:
            torch.distributed.broadcast_object_list(box, src=0, group=group)
        except RuntimeError as exc:  # DistBackendError: the wait ran out, or a process is gone
            rank, why = idist.get_rank(), one_line(exc)[:200]
            if rank == 0:
                raise UserError(f"rank 0 could not hand the result of {what} to the other ranks ({why})") from None
            raise UserError(
                f"rank {rank}: rank 0 did not finish {what} within {wait.total_seconds():g} s ({why})"
            ) from None
    finally:
        torch.distributed.destroy_process_group(group)
    result, error = box[0]
    if error:
        raise UserError(error)
    return result


def setup_logging(output_dir):
    from ignite.utils import setup_logger

    rank = idist.get_rank()
    logger = setup_logger(
        "vocseg",
        filepath=output_dir / "training.log" if rank == 0 else None,
        distributed_rank=rank,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        reset=True,
    )  # vocseg.* module loggers propagate here
    if rank > 0:
        # The other ranks print only warnings and the lines logged with extra=ALL_RANKS (e.g. their metrics):
        # enough to see which rank failed or disagrees, without a copy of every message per process.
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(name)s [rank {rank}] %(levelname)s: %(message)s"))
        handler.addFilter(lambda record: record.levelno >= logging.WARNING or getattr(record, "all_ranks", False))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    # Ignite logs every exception that ends an engine before re-raising it (twice when validation fails inside
    # training); the script prints that exception as its last line, so the copies only bury it.
    logging.getLogger("ignite.engine.engine.Engine").addFilter(_not_an_exception_copy)
    return logger


def _not_an_exception_copy(record) -> bool:
    return "terminating due to exception" not in record.getMessage()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def tune_cpu_allocator() -> bool:
    """CPU training: let glibc keep freed autograd buffers for the next step instead of handing them back.

    By default it unmaps or trims those large blocks after every step and the next step page-faults them
    in again: 10-20k faults, 5-10% of a CPU step (benchmarks/trainer_overhead.py); PyTorch's CUDA allocator
    caches for the same reason. Memory stays at its peak, which the next step needs anyway. Applies to the
    whole process; ``VOCSEG_CPU_ALLOCATOR=default`` opts out. No-op without glibc. True when applied.
    """
    if os.environ.get("VOCSEG_CPU_ALLOCATOR", "") == "default" or not sys.platform.startswith("linux"):
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    mallopt(m_mmap_threshold, 32 << 20)  # glibc's maximum: blocks below it come from the reusable heap
    mallopt(m_trim_threshold, 2**31 - 1)
    mallopt(m_top_pad, 64 << 20)
    return True


# What a scheduler's warning signal asks for: a checkpoint at the next iteration boundary, then exit with
# PREEMPTED_EXIT so that the launcher requeues the run (experiments/slurm/train.sbatch does).
PREEMPTED_EXIT = 75  # EX_TEMPFAIL: "try again later"
_requested_stop = []


class Preempted(Exception):
    """The run stopped on request after saving a checkpoint it can continue from."""


def catch_preemption_signal(signum=signal.SIGUSR1) -> None:
    """SLURM's ``--signal=[B:]USR1@<seconds>`` warning (or ``scancel --signal=USR1``) asks the run to stop."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signum, lambda received, _frame: _requested_stop.append(signal.Signals(received).name))


def stop_requested() -> str:
    """The name of the signal that asked this process to stop, or ''."""
    return _requested_stop[0] if _requested_stop else ""
