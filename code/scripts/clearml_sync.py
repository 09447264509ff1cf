"""Send what a run could not deliver to its ClearML task (its server did not answer at the run's end).

    python code/scripts/clearml_sync.py RUN_FOLDER

The run kept it in RUN_FOLDER/clearml_pending.json (its last line named this command): the last reports, the best
model, the final status. They go to the same task, and the file goes once the server has them all; a second sync
sends nothing. A rerun in the run folder sends them too, at its start. The server comes from ~/clearml.conf
(clearml-init), CLEARML_CONFIG_FILE or the CLEARML_API_* variables.
"""

import argparse
import signal
import threading
import time
from pathlib import Path

from vocseg.errors import UserError, exit_with, one_line

STILL_S = 10.0  # a delivery taking longer says so: the SDK waits on a server that does not answer without a word


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[2:]).strip()
    )
    parser.add_argument("run_folder", help="the run folder that the run's last line named")
    args = parser.parse_args(argv)
    try:
        print(sync(Path(args.run_folder)))
    except UserError as exc:
        exit_with(exc, 1)


def sync(folder: Path) -> str:
    """Sends what ``folder`` keeps to its task; returns the line to print."""
    from vocseg.clearml import pending

    if not folder.is_dir():
        raise UserError(f"run folder {folder} does not exist: pass the folder that the run's last line named")
    if not (folder / pending.PENDING_FILE).is_file():
        if not any((folder / name).is_file() for name in ("metrics.json", "training.log")):
            raise UserError(f"{folder} is not a run folder (no metrics.json, no training.log): pass a run folder")
        return f"nothing to send: {folder} keeps no reports for a ClearML server"
    from vocseg.clearml import session  # imports torch: only when there is something to send
    from vocseg.runtime import folder_lock

    # A live run in the folder (a rerun sends the file itself, at its start) or a second sync: one line, no wait.
    folder_lock.hold_run_folder(folder)
    record = pending.read(folder)
    if record is None:  # sent meanwhile by whoever held the lock
        return f"nothing to send: {folder} keeps no reports for a ClearML server"
    session.require_server(f"sending {folder / pending.PENDING_FILE}")
    session._tune_sdk()
    started = time.monotonic()
    outcome = _deliver_watched(folder, record, session._api_host())
    if "error" in outcome:
        exc = outcome["error"]
        if isinstance(exc, UserError):
            raise exc
        raise UserError(
            f"{folder / pending.PENDING_FILE} not (fully) sent to ClearML task {record['task_id']}: "
            f"{one_line(exc)}; what was not sent stays there: run this again"
        )
    sent = outcome["sent"]
    return f"sent to ClearML task {record['task_id']} in {time.monotonic() - started:.1f} s: {pending.describe(sent)}"


def _deliver_watched(folder: Path, record: dict, host: str) -> dict:
    """Delivers in a thread of its own, so that a server that stops answering midway (the SDK then retries
    without end and without a word) is said after STILL_S and Ctrl-C ends the wait in one line."""
    import clearml  # noqa: F401  (here: an import half done in the thread below would hold up Ctrl-C's exit)

    from vocseg.clearml import pending

    outcome = {}

    def send():
        try:
            outcome["sent"] = pending.deliver(folder, say=lambda line: print(line, flush=True))
        except Exception as exc:  # said by the caller, in one line
            outcome["error"] = exc

    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C is KeyboardInterrupt, whatever took it
    thread = threading.Thread(target=send, name="vocseg-clearml sync", daemon=True)
    thread.start()
    try:
        thread.join(STILL_S)
        if thread.is_alive():
            print(
                f"still sending after {STILL_S:.0f} s: waiting on the ClearML server {host} (Ctrl-C stops; what is "
                f"not sent stays in {folder / pending.PENDING_FILE})",
                flush=True,
            )
        while thread.is_alive():
            thread.join(1.0)
    except KeyboardInterrupt:
        # At once: the SDK's threads still wait on the server, and exit hooks would join them.
        exit_with(
            UserError(
                f"interrupted while sending to ClearML task {record['task_id']} on {host}: what was not sent "
                f"stays in {folder / pending.PENDING_FILE}; run this again once the server answers"
            ),
            130,
            now=True,
        )
    return outcome


if __name__ == "__main__":
    main()
