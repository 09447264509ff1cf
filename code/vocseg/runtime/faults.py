"""Faults of the machine, not of the code: a full disk and a DataLoader worker killed (the kernel's OOM killer).

Either ends the run with one line (the folder or the worker, the likely cause, the checkpoint to continue from)
and a non-zero exit, instead of a traceback: the user fixes the machine, then runs the same command again.
"""

import contextlib
import errno
import re
import shutil
import signal
import threading
import time
from pathlib import Path

from vocseg.errors import UserError

DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
# torch.save reports a short write of its zip writer as a RuntimeError, not as an OSError: "[enforce fail at
# inline_container.cc:672] . unexpected pos 66070464 vs 66070352" or "PytorchStreamWriter failed writing file".
_SHORT_WRITE = re.compile(r"unexpected pos|PytorchStreamWriter failed|file write failed")
# torch's words for a worker that died under its loader: by a signal (SIGCHLD handler), or noticed later.
_WORKER_GONE = re.compile(
    r"DataLoader worker \(pid(?:\(s\))? [\d, ]+\) (?:is killed by signal: (?P<signal>[^.]+)|exited unexpectedly)"
)


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def free_bytes(folder) -> int:
    """Free space of the file system holding ``folder`` (or its nearest existing parent)."""
    path = Path(folder)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def disk_full(exc: BaseException, folder, needed: int) -> bool:
    """Whether ``exc`` (or an exception it came from) is a write that failed for want of space in ``folder``.

    torch's short-write error carries no errno, so it counts only when less than ``needed`` bytes are free now
    (a network file system's I/O error on a disk with room stays a traceback: it is not the user's to fix)."""
    for error in _chain(exc):
        if isinstance(error, OSError) and error.errno in DISK_FULL:
            return True
        if isinstance(error, RuntimeError) and _SHORT_WRITE.search(str(error)):
            return free_bytes(folder) < needed
    return False


def worker_killed(exc: BaseException) -> str | None:
    """How a DataLoader worker died (e.g. "killed (signal: Killed)") when ``exc`` comes from its death, or None."""
    for error in _chain(exc):
        found = _WORKER_GONE.search(str(error)) if isinstance(error, RuntimeError) else None
        if found and found["signal"]:
            return f"killed (signal: {found['signal']})"
        # "exited unexpectedly" says no more; a worker killed while the loader received a batch from it breaks
        # the connection first, and torch passes that error on as it is: the worker's exit code tells.
        if found or isinstance(error, ConnectionError | EOFError):
            how = _dead_worker(error.__traceback__)
            if how or found:
                return how or "lost (it exited unexpectedly)"
    return None


def _dead_worker(traceback, wait_s: float = 3.0) -> str | None:
    loaders = []
    while traceback is not None:
        frame = traceback.tb_frame
        if frame.f_code.co_filename.endswith("torch/utils/data/dataloader.py"):
            loaders.append(frame.f_locals.get("self"))
        traceback = traceback.tb_next
    workers = [w for loader in loaders for w in getattr(loader, "_workers", None) or []]
    deadline = time.monotonic() + wait_s
    while workers:
        dead = [w.exitcode for w in workers if w.exitcode is not None]
        if dead:
            code = dead[0]
            return f"killed (signal: {signal.strsignal(-code)})" if code < 0 else f"lost (exit code {code})"
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    return None


def megabytes(n: int) -> str:
    return f"{n / 2**20:.0f} MB" if n >= 2**20 else f"{n / 2**10:.0f} KB"


def checkpoint_bytes(folder, tensors=()) -> int:
    """What the next training checkpoint in ``folder`` needs: the size of the newest one there, else the bytes of
    ``tensors`` (the model's and the optimiser's state)."""
    found = sorted(Path(folder).glob("training_checkpoint_*.pt"), key=lambda p: p.stat().st_mtime)
    if found:
        return found[-1].stat().st_size
    return sum(t.numel() * t.element_size() for t in tensors)


def continue_hint(run_dir, checkpoint) -> str:
    """How the same command continues the run in ``run_dir`` from ``checkpoint`` (None: from the start)."""
    rerun = f"run the same command with RUN_NAME={Path(run_dir).name}"
    if checkpoint is None:
        return f"{rerun} to start again (no checkpoint yet)"
    return f"{rerun}: it continues from {checkpoint}"


def disk_full_error(run_dir, needed: int, checkpoint) -> UserError:
    return UserError(
        f"run folder {run_dir}: the disk is full ({megabytes(free_bytes(run_dir))} free; the next checkpoint needs "
        f"about {megabytes(needed)}): free space, then {continue_hint(run_dir, checkpoint)}"
    )


def summary_disk_full_error(run_dir) -> UserError:
    return UserError(
        f"run folder {run_dir}: the disk is full ({megabytes(free_bytes(run_dir))} free) for summary.png at the end "
        f"of training (checkpoints and metrics.json are saved): free space, then python -m vocseg.run_summary "
        f"{run_dir} draws it"
    )


def worker_killed_error(how: str, run_dir, checkpoint, num_workers, batch_size) -> UserError:
    return UserError(
        f"a DataLoader worker was {how}, most likely for memory (the kernel's out-of-memory killer): lower "
        f"num_workers (now {num_workers}) or batch_size (now {batch_size}); then {continue_hint(run_dir, checkpoint)}"
    )


@contextlib.contextmanager
def told_in_one_line(run_dir, checkpoint, needed, num_workers=None, batch_size=None):
    """A full disk or a killed DataLoader worker inside the block becomes one UserError.

    ``checkpoint()``: the checkpoint a rerun continues from; ``needed()``: the bytes of the next checkpoint;
    both asked only when such a fault happens."""
    hook = threading.excepthook

    def quiet_disk_full(args):
        # TensorBoard writes its events in a thread of its own, which prints its error with a traceback and
        # hands it to the next write of this thread: that write says it, in one line.
        if not (isinstance(args.exc_value, OSError) and args.exc_value.errno in DISK_FULL):
            hook(args)

    def explain(exc):
        how = worker_killed(exc)
        if how is not None:
            return worker_killed_error(how, run_dir, checkpoint(), num_workers, batch_size)
        needs = needed()
        return disk_full_error(run_dir, needs, checkpoint()) if disk_full(exc, run_dir, needs) else None

    threading.excepthook = quiet_disk_full
    try:
        yield
    except UserError:
        raise
    except Exception as exc:
        error = _explained(exc, explain)
        if error is None:
            raise
        raise error from None
    finally:
        threading.excepthook = hook


def _explained(exc, explain):
    """``explain(exc)``, safe from torch's SIGCHLD handler: it raises "DataLoader worker ... is killed" in the main
    thread wherever it is, here too when the worker's death first showed as a broken connection."""
    if threading.current_thread() is threading.main_thread():
        # The process ends either way: no more of those from the loader's other workers as they exit.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for _ in range(3):
        try:
            return explain(exc)
        except Exception as late:
            if not isinstance(late, RuntimeError) or worker_killed(late) is None:
                return None  # not understood: the original error is the one to show, with its traceback
            exc = late
    return None


@contextlib.contextmanager
def evaluation_in_one_line(folder, num_workers=None, batch_size=None):
    """An evaluation's full disk or killed DataLoader worker as one UserError: nothing to continue from, the same
    command starts it again."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:
        how = _explained(exc, worker_killed)
        if how is not None:
            raise UserError(
                f"a DataLoader worker was {how}, most likely for memory (the kernel's out-of-memory killer): lower "
                f"num_workers (now {num_workers}) or batch_size (now {batch_size}), then run the same command again"
            ) from None
        if disk_full(exc, folder, 1):
            raise UserError(
                f"evaluation folder {folder}: the disk is full ({megabytes(free_bytes(folder))} free): free space, "
                "then run the same command again"
            ) from None
        raise
