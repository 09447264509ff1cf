"""Upload an offline ClearML session (a run tracked without a server) to the configured ClearML server.

    python code/scripts/import_offline_session.py ~/.clearml/cache/offline/offline-<id>.zip

The server comes from ~/clearml.conf (clearml-init), CLEARML_CONFIG_FILE or CLEARML_API_* variables.
"""

import argparse
from pathlib import Path

from vocseg.errors import UserError, exit_with


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("session", help="the session zip (or its unpacked folder) that the run printed at its end")
    args = parser.parse_args(argv)
    try:
        print(f"imported as task {import_session(Path(args.session))}")
    except UserError as exc:
        exit_with(exc)


def import_session(session: Path) -> str:
    from clearml import Task

    from vocseg.clearml import session as clearml_session

    if not session.exists():
        raise UserError(f"offline session {session} does not exist: pass the .zip path the training run printed")
    # An import needs the server: no offline fallback here, and no silent minutes-long wait either.
    clearml_session.choose_offline(need_server=f"importing {session}")
    try:
        return Task.import_offline_session(str(session))
    except ValueError as exc:
        raise UserError(f"{session} is not a ClearML offline session: {exc}") from None


if __name__ == "__main__":
    main()
