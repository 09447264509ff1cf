"""The one exception type that means "the user gave us something wrong".

Scripts catch it at the top level and print a single line (no traceback) before exiting non-zero,
so every message must name the file, variable or key at fault and say how to fix it.
"""

import sys


class UserError(Exception):
    """Bad input from the user: config, env var, dataset file or checkpoint."""


def one_line(exc: BaseException) -> str:
    # Errors raised inside DataLoader workers come back with the worker's traceback folded into the
    # message; the last non-empty line is the message we raised.
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[-1] if lines else type(exc).__name__
    prefix = f"{type(exc).__name__}: "
    return text[len(prefix):] if text.startswith(prefix) else text


def exit_with(exc: BaseException, code: int = 2) -> None:
    print(f"error: {one_line(exc)}", file=sys.stderr, flush=True)
    sys.exit(code)
