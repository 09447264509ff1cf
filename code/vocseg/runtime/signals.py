"""Signals: SIGTERM/Ctrl-C end a run with a message, SIGUSR1 asks for a checkpoint and a requeue."""

import contextlib
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
