"""The vocseg logger of a run: the log file and console on rank 0, warnings from the other ranks."""

import errno
import functools
import logging
import sys

import ignite.distributed as idist


def setup_logging(output_dir):
    from ignite.utils import setup_logger

    rank = idist.get_rank()
    logger = setup_logger(
        "vocseg",
        filepath=output_dir / "training.log" if rank == 0 else None,
        distributed_rank=rank,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        reset=True,
    )  # vocseg.* module loggers propagate here
    for handler in logger.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handleError = functools.partial(_file_error, handler)
    if rank > 0:
        # The other ranks print only warnings and the lines logged with extra=ALL_RANKS (e.g. their metrics):
        # enough to see which rank failed or disagrees, without a copy of every message per process.
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(name)s [rank {rank}] %(levelname)s: %(message)s"))
        handler.addFilter(lambda record: record.levelno >= logging.WARNING or getattr(record, "all_ranks", False))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    # Ignite logs every exception that ends an engine before re-raising it (twice when validation fails inside
    # training); the script prints that exception as its last line, so the copies only bury it.
    # Ignite names an engine's logger after its class: the evaluators are vocseg.engine.steps.ShardEvaluator.
    for engine_class in ("Engine", "ShardEvaluator"):
        logging.getLogger(f"ignite.engine.engine.{engine_class}").addFilter(_not_an_exception_copy)
    return logger


def _not_an_exception_copy(record) -> bool:
    return "terminating due to exception" not in record.getMessage()


def _file_error(handler: logging.FileHandler, record) -> None:
    # A full disk would print logging's "--- Logging error ---" and a traceback for every line; the console still
    # has every line, and the run stops with its own line at its next write that matters (a checkpoint).
    exc = sys.exc_info()[1]
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        if not getattr(handler, "disk_full_said", False):
            handler.disk_full_said = True
            print(
                f"vocseg: warning: {handler.baseFilename}: the disk is full; log lines go to the console only",
                file=sys.stderr,
                flush=True,
            )
        return
    logging.FileHandler.handleError(handler, record)
