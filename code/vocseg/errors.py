"""The one exception type that means "the user gave us something wrong".

Scripts catch it at the top level and print a single line (no traceback) before exiting non-zero,
so every message must name the file, variable or key at fault and say how to fix it.
"""

import json
import os
import sys
import time


class UserError(Exception):
    """Bad input from the user: config, env var, dataset file or checkpoint."""

    def __init__(self, message: str = ""):
        text = str(message)
        if text.startswith("Caught UserError in DataLoader worker"):
            # torch re-raises a worker's exception as type(exc)(text), the text carrying the worker's whole
            # traceback: keep the message we raised, its last line, so the user reads one line.
            text = one_line_text(text)
        super().__init__(text)


def one_line_text(text: str) -> str:
    """The last non-empty line of ``text``, without the exception name that a traceback puts before it."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    for prefix in ("vocseg.errors.UserError: ", "UserError: "):
        if last.startswith(prefix):
            return last[len(prefix) :]
    return last


def one_line(exc: BaseException) -> str:
    text = one_line_text(str(exc))
    prefix = f"{type(exc).__name__}: "
    text = text[len(prefix) :] if text.startswith(prefix) else text
    return text or type(exc).__name__


def exit_with(exc: BaseException, code: int = 2, now: bool = False) -> None:
    """Prints ``exc`` in one line and exits with ``code``; ``now``: without running exit hooks or joining
    threads (one of them still waits on something that does not answer)."""
    line = f"error: {one_line(exc)}"
    _record_for_torchrun(line)
    print(line, file=sys.stderr, flush=True)
    if now:
        sys.stdout.flush()
        os._exit(code)
    sys.exit(code)


def _record_for_torchrun(line: str) -> None:
    # torchrun ends with a ~30-line report on the failed rank; the error file it names in
    # TORCHELASTIC_ERROR_FILE supplies that report's "traceback" entry, so our line is also the last thing
    # it prints (format: torch.distributed.elastic.multiprocessing.errors.ProcessFailure).
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        with open(path, "w") as f:
            json.dump({"message": line, "timestamp": int(time.time())}, f)
    except OSError:
        pass  # the report then says "To enable traceback ..."; our line is still printed above it
