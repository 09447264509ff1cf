"""What one rank does for all: log lines every rank prints, and rank 0's work handed to the others."""

import datetime
import logging
import time

import ignite.distributed as idist
import torch

from vocseg.errors import UserError, one_line

# extra= of a log call that every rank prints, not only rank 0 (e.g. each rank's metrics).
ALL_RANKS = {"all_ranks": True}

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


def wait_for_every_rank(what: str, wait: datetime.timedelta = RANK_ZERO_WAIT) -> None:
    """Returns once every rank got here (a barrier), so that no rank exits while another still works on ``what``
    (a launcher may stop all of them when the first one exits). Waits up to ``wait``, not the collective
    timeout: rank 0 may be uploading a checkpoint meanwhile."""
    if idist.get_world_size() == 1:
        return
    group = torch.distributed.new_group(backend="gloo", timeout=wait)
    try:
        torch.distributed.barrier(group=group)
    except RuntimeError as exc:  # DistBackendError: the wait ran out, or a process is gone
        raise UserError(
            f"rank {idist.get_rank()}: the other ranks did not finish {what} within {wait.total_seconds():g} s "
            f"({one_line(exc)[:200]})"
        ) from None
    finally:
        torch.distributed.destroy_process_group(group)
