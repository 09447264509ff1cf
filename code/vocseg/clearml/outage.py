"""A ClearML server that stops answering in the middle of a run (stopped, restarted, behind a network cut) must not
stall training.

The SDK retries every request until the server answers; its reporter and upload threads keep what they could not
send yet. The calls the training thread itself makes to the server run in threads it waits for a few seconds only
(``ServerWatch``): one that does not finish in time is left to finish on its own, the run says once that the server
does not answer, and skips further calls until that one has finished, which is when the server answers again and
reporting goes on on the same task. At the end, a task that cannot be closed in a short time is left as it is, and
what did not reach the server is listed.
"""

import logging
import threading
import time

log = logging.getLogger("vocseg")

ANSWER_S = 10.0  # how long training waits for one call to the server
CLOSE_S = 20.0  # how long the end of a run waits for the task to close when the server does not answer
BACKOFF_MAX_S = 5.0  # the SDK's default, 120 s, would leave reports waiting two minutes after the server is back


def sdk_retry_overrides() -> dict:
    """ClearML configuration overrides, applied before Task.init: the SDK retries a request that gets no answer
    forever (its threads are left waiting, see ServerWatch), but never sleeps long between two tries."""
    return {"api": {"http": {"retries": {"backoff_max": BACKOFF_MAX_S}}}}


class ServerWatch:
    """Runs the training thread's calls to the ClearML server with a time bound, and says when the server stops
    and starts answering."""

    def __init__(self, task, host: str):
        self.task, self.host = task, host
        self.stuck: threading.Thread | None = None  # a call still waiting on the server
        self.warned = False

    def away(self) -> bool:
        """True while a call that timed out is still waiting on the server."""
        if self.stuck is not None and not self.stuck.is_alive():
            self.stuck = None
            log.info("ClearML server %s answers again: reporting goes on on task %s", self.host, self.task.id)
        return self.stuck is not None

    def call(self, what: str, fn, limit: float = ANSWER_S, always: bool = False) -> bool:
        """Runs ``fn()`` in a thread and waits at most ``limit`` s; True when it finished in time. While an earlier
        call is still waiting, ``fn`` is not run at all, unless ``always``."""
        if self.away() and not always:
            return False
        failed = []

        def guarded():
            try:
                fn()
            except Exception as exc:  # the run goes on; the caller reports what is missing
                failed.append(exc)

        thread = threading.Thread(target=guarded, name=f"vocseg-clearml {what}", daemon=True)
        started = time.monotonic()
        thread.start()
        thread.join(limit)
        if thread.is_alive():
            self.stuck = thread
            if not self.warned:
                self.warned = True
                log.warning(
                    "ClearML server %s did not answer within %.0f s (%s): training goes on without it; reports "
                    "wait for it (or are dropped at the end), and what is not uploaded is listed at the end",
                    self.host,
                    time.monotonic() - started,
                    what,
                )
            return False
        if failed:
            log.warning("ClearML: %s failed: %s: %s", what, type(failed[0]).__name__, failed[0])
        return not failed


def abandon_task_exit(task) -> None:
    """Keeps ClearML's exit hook from closing ``task`` at exit: with the server away it would wait on it without
    end (what it would send is kept in the run folder instead, see ``pending``). The hook returns at once for a
    task whose shutdown has begun; the SDK has no public way to say so."""
    task._at_exit_called = True


def abandon_sdk_exit_waits() -> None:
    """Lets the process exit while the SDK's background threads (reporter, console log) still wait on the server:
    its exit hooks and logging's shutdown would join them without a time limit. Those threads are daemons, so
    forgetting them is enough; the SDK has no public way to do it."""
    from clearml.utilities.process.mp import BackgroundMonitor

    for monitors in list(BackgroundMonitor._instances.values()):
        for monitor in list(monitors):
            if isinstance(monitor._thread, threading.Thread):
                monitor._thread = None  # stop() returns at once on a monitor without a thread
