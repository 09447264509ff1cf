"""One live run per run folder: a second run started with the same RUN_NAME stops before it touches the folder.

Rank 0 holds an exclusive ``flock`` on ``<run folder>/run.lock`` for the life of its process. The kernel drops
the lock when the process ends, however it ends (kill -9 and a lost node included: the file server forgets
the locks of a client it no longer hears from), so a lock never outlives its run. The file also names its
holder (host, pid, start time) for the error the second run prints.

Where it holds: on a local disk, and across nodes on file systems that pass flock to their server (NFS v4, or
v3 with lockd; GPFS; CephFS; Lustre mounted with ``-o flock``). Lustre's ``localflock`` and BeeGFS without
global file locks only see the runs of the same node; a file system without locks at all gets a warning.
"""

import contextlib
import datetime
import errno
import fcntl
import functools
import os
import socket
import sys
from pathlib import Path

from vocseg.errors import UserError
from vocseg.runtime.ranks import from_rank_zero

LOCK_FILE = "run.lock"
_NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}
_held = {}  # lock path -> file descriptor, open (so locked) until this process ends
_created = {}  # lock path -> the folders taking the lock created, deepest first


@contextlib.contextmanager
def run_folder(folder: Path, hold: bool = True):
    """The run folder for the block's work: locked first when ``hold`` (hold_run_folder); bad input raised inside
    leaves no lock nor folder behind (release_if_unused)."""
    if hold:
        hold_run_folder(folder)
    try:
        yield folder
    except UserError:
        release_if_unused(folder)
        raise


def hold_run_folder(folder: Path) -> None:
    """Rank 0 takes the run folder's lock (creating the folder); every rank raises the UserError of a folder
    that another live run holds."""
    from_rank_zero("locking the run folder", functools.partial(_lock, Path(folder)))


def _lock(folder: Path) -> None:
    from vocseg import outputs

    created = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    path = outputs.make_output_dir(None, folder) / LOCK_FILE
    if path in _held:
        return
    _created[path] = created
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise UserError(f"run folder {folder}: cannot open {path} ({exc.strerror}): check its permissions") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise UserError(
            f"run folder {folder} is in use by a live run ({holder}): wait for it to end or stop it, "
            f"or set another RUN_NAME to start a new run"
        ) from None
    except OSError as exc:
        os.close(fd)
        if exc.errno not in _NO_LOCKS:
            raise
        print(
            f"warning: run folder {folder}: its file system does not support locks ({exc.strerror}), so a second "
            "run started with the same RUN_NAME would not be stopped",
            file=sys.stderr,
            flush=True,
        )
        return
    started = datetime.datetime.now().isoformat(timespec="seconds")
    os.ftruncate(fd, 0)
    os.write(fd, f"host {socket.gethostname()} pid {os.getpid()} started {started}\n".encode())
    _held[path] = fd
    # A forked child (a DataLoader worker) would share the lock and keep it after a kill -9 of this process.
    os.register_at_fork(after_in_child=functools.partial(_forget, path))


def release_if_unused(folder: Path) -> None:
    """Rank 0, when a run stops before writing anything (bad input found after the lock was taken): the lock
    and the folders taking it created go, so that bad input leaves nothing behind. The file is removed while
    still locked: a run that opened it meanwhile finds a lock on a file no longer in the folder, and a
    rerun creates a new one."""
    path = Path(folder) / LOCK_FILE
    fd = _held.get(path)
    if fd is None:
        return
    try:
        if os.listdir(folder) != [LOCK_FILE]:
            return
        os.unlink(path)
    except OSError:
        return
    os.close(_held.pop(path))
    for created in _created.pop(path, []):
        try:
            created.rmdir()
        except OSError:  # not empty: another run's folder, or files written meanwhile
            break


def _forget(path: Path) -> None:
    fd = _held.pop(path, None)
    if fd is not None:
        os.close(fd)  # the child's reference only: the lock stays with the parent


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "its host and pid are not written yet"
