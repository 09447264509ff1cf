"""The entry points' wiring, the same for every script: settings -> launch -> tracker -> train or evaluate.

``code/scripts/training.py`` and ``evaluation.py`` hand py_config_runner ``run_training`` and ``run_evaluation``.
Bad input ends the run with one line and a non-zero exit, on whichever rank it is found.
"""

import contextlib
import functools
import sys

from vocseg import outputs
from vocseg.clearml import reports as clearml_reports
from vocseg.clearml import session as clearml_session
from vocseg.clearml.clone_edits import clone_source
from vocseg.config import ConfigSource, config_source, with_overrides
from vocseg.engine.evaluate import evaluate
from vocseg.engine.train import train
from vocseg.errors import UserError, exit_with
from vocseg.runtime import folder_lock, launch, signals


def run_training(config, **_runner_kwargs) -> None:
    """py_config_runner's entry point (it also passes its own logger, unused) of code/scripts/training.py."""
    _run(config, _train_one_rank)


def run_evaluation(config, **_runner_kwargs) -> None:
    """py_config_runner's entry point of code/scripts/evaluation.py."""
    _run(config, _evaluate_one_rank)


def _run(config, one_rank) -> None:
    signals.stop_on_signals(in_process_group=launch.distributed_backend() is not None)
    with _exit_codes():
        # A clone run by clearml-agent loads its task's edits; CONFIG_OVERRIDES applies on top, in every process.
        source = with_overrides(clone_source(config_source(config)))
        device = source.setting("device")
        nproc = launch.processes_per_node(source.setting("nproc_per_node"), device)
        if nproc > 1 and clearml_session.enabled() and clearml_session.requested_queue(source):
            nproc = 1  # the agent that runs it will choose
        if nproc > 1:
            print(
                f"vocseg: starting {nproc} processes on this machine (one per visible GPU unless nproc_per_node says"
                " otherwise); NPROC_PER_NODE=1 or CONFIG_OVERRIDES=nproc_per_node=1 runs one",
                file=sys.stderr,
                flush=True,
            )
        on_gpu = not str(device or "").startswith("cpu")
        launch.launch(one_rank, source, nproc_per_node=nproc, on_gpu=on_gpu, timeout_s=source.setting("dist_timeout"))


@contextlib.contextmanager
def _exit_codes():
    try:
        yield
    except UserError as exc:
        exit_with(exc)
    except signals.Preempted as exc:
        print(f"stopped: {exc}", file=sys.stderr, flush=True)
        sys.exit(signals.PREEMPTED_EXIT)
    except signals.Interrupted as exc:
        exit_with(exc, 128 + exc.signum)  # the shell's convention: 143 after SIGTERM, 130 after Ctrl-C


def _train_one_rank(source: ConfigSource) -> None:
    outputs.check_output_base()
    output_dir = outputs.run_dir(source.config_path, source.setting("run_name"))
    folder_lock.hold_run_folder(output_dir)  # before ClearML: a second run must not continue the first's task
    try:
        tracker_factory = None
        if clearml_session.enabled():
            # ClearML first: the task may enqueue itself. A rerun in a run folder continues that folder's task.
            task = clearml_session.prepare(source, output_dir)
            tracker_factory = task and functools.partial(clearml_reports.ClearMLTracker, task)
        train(
            source.config_path,
            source.script_path,
            mutations=source.all_mutations() or None,
            tracker_factory=tracker_factory,
            output_dir=output_dir,
        )
    except UserError:
        folder_lock.release_if_unused(output_dir)  # bad input leaves no folder behind
        raise


def _evaluate_one_rank(source: ConfigSource) -> None:
    outputs.check_output_base()
    factory = None
    if clearml_session.enabled() and launch.idist.get_rank() == 0:
        task = clearml_session.init_task(source.config_path, "testing", source.script_path)
        factory = functools.partial(clearml_reports.EvaluationReport, task)
    evaluate(
        source.config_path,
        mutations=source.all_mutations() or None,
        tracker_factory=factory,
        run_name=source.setting("run_name"),
    )
