"""Send what a run could not deliver to its ClearML task (its server did not answer at the run's end).

    python code/scripts/clearml_sync.py RUN_FOLDER

The run kept it in RUN_FOLDER/clearml_pending.json (its last line named this command): the last reports, the best
model, the final status. They go to the same task, and the file goes once the server has them all; a second sync
sends nothing. A rerun in the run folder sends them too, at its start. The server comes from ~/clearml.conf
(clearml-init), CLEARML_CONFIG_FILE or the CLEARML_API_* variables.
"""

import argparse
import time
from pathlib import Path

from vocseg.errors import UserError, exit_with, one_line


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
    try:
        sent = pending.deliver(folder, say=lambda line: print(line, flush=True))
    except UserError:
        raise
    except Exception as exc:
        raise UserError(
            f"{folder / pending.PENDING_FILE} not (fully) sent to ClearML task {record['task_id']}: "
            f"{one_line(exc)}; what was not sent stays there: run this again"
        ) from None
    return f"sent to ClearML task {record['task_id']} in {time.monotonic() - started:.1f} s: {pending.describe(sent)}"


if __name__ == "__main__":
    main()
