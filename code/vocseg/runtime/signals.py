"""Signals: SIGTERM/Ctrl-C end a run with a message, SIGUSR1 asks for a checkpoint and a requeue."""

import contextlib
import os
import signal
import threading


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


def stop_on_signals(in_process_group: bool) -> None:
    """SIGTERM and SIGINT raise Interrupted in the main thread (Python's default for SIGTERM is to die on the
    spot: no message, and DataLoader workers left running until they notice).

    Not SIGTERM in a process group: a Python handler runs only between bytecodes, and a rank blocked in a
    collective or a store wait (its peer gone) would then never end on torchrun's or a user's SIGTERM."""
    for signum in (signal.SIGINT,) if in_process_group else (signal.SIGTERM, signal.SIGINT):
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


# What a scheduler's warning signal asks for: a checkpoint at the next exact point, then an exit that makes the
# launcher requeue the run: PREEMPTED_EXIT, or 0 and a request file where the launcher names one (below).
PREEMPTED_EXIT = 75  # EX_TEMPFAIL: "try again later"
# A launcher that runs several processes and stops them all when one fails (srun --kill-on-bad-exit) cannot take
# a non-zero exit as "requeue me": the first rank to exit would take down rank 0 while it still writes. Such a
# launcher (experiments/slurm/train.sbatch) names a file here; a run that stopped for a requeue then has rank 0
# write it once every rank is done, and every rank exits 0.
REQUEUE_FILE_ENV = "VOCSEG_REQUEUE_FILE"
_requested_stop = []


class Preempted(Exception):
    """The run stopped on request after saving a checkpoint it can continue from; ``exit_code`` is what the
    process exits with (requeue_exit_code)."""

    def __init__(self, message: str, exit_code: int = PREEMPTED_EXIT):
        super().__init__(message)
        self.exit_code = exit_code


def catch_preemption_signal(signum=signal.SIGUSR1) -> None:
    """SLURM's ``--signal=[B:]USR1@<seconds>`` warning (or ``scancel --signal=USR1``) asks the run to stop."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signum, lambda received, _frame: _requested_stop.append(signal.Signals(received).name))


def stop_requested() -> str:
    """The name of the signal that asked this process to stop, or ''."""
    return _requested_stop[0] if _requested_stop else ""


def request_requeue(message: str, write: bool) -> int:
    """The exit code of a process that stopped for a requeue, once every rank has stopped: 0 when the launcher
    named a request file in VOCSEG_REQUEUE_FILE (``write``: this process, rank 0, writes ``message`` there,
    atomically), else PREEMPTED_EXIT."""
    path = os.environ.get(REQUEUE_FILE_ENV)
    if not path:
        return PREEMPTED_EXIT
    if write:
        partial = f"{path}.{os.getpid()}.tmp"
        with open(partial, "w") as f:
            f.write(message + "\n")
        os.replace(partial, path)
    return 0
