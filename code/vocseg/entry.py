"""The entry points' wiring, the same for every script: settings -> launch -> tracker -> train or evaluate.

``code/scripts/training.py`` and ``evaluation.py`` hand py_config_runner ``run_training`` and ``run_evaluation``.
Bad input ends the run with one line and a non-zero exit, on whichever rank it is found.
"""

import contextlib
import functools
import sys

import ignite.distributed as idist
import torch.multiprocessing

from vocseg import outputs, settings
from vocseg.clearml import reports as clearml_reports
from vocseg.clearml import session as clearml_session
from vocseg.clearml.clone_edits import clone_source
from vocseg.config import ConfigSource, config_source, with_overrides
from vocseg.engine.evaluate import evaluate, evaluation_name
from vocseg.engine.preflight import preflight
from vocseg.engine.train import train
from vocseg.errors import UserError, exit_with
from vocseg.runtime import device_plan, folder_lock, launch, machine, signals


def script_main(usage: str, argv=None) -> int:
    """``python code/scripts/training.py --help`` (or evaluation.py): the script's usage, exit 0.

    py_config_runner imports these scripts and calls their ``run``; run directly with anything but --help, they
    say how to start them instead of doing nothing."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(usage.strip())
        return 0
    print(usage.strip(), file=sys.stderr)
    print("error: start it through py_config_runner, as above", file=sys.stderr)
    return 2


def run_training(config, **_runner_kwargs) -> None:
    """py_config_runner's entry point (it also passes its own logger, unused) of code/scripts/training.py."""
    _run(config, _train_one_rank)


def run_evaluation(config, **_runner_kwargs) -> None:
    """py_config_runner's entry point of code/scripts/evaluation.py."""
    _run(config, _evaluate_one_rank, amp_default="off")  # scores in full precision unless the config asks


def _run(config, one_rank, amp_default=settings.MISSING) -> None:
    signals.stop_on_signals(in_process_group=launch.joins_group())
    with _exit_codes():
        # A clone run by clearml-agent loads its task's edits; CONFIG_OVERRIDES applies on top, in every process.
        source = with_overrides(clone_source(config_source(config)))
        request = _device_request(source, amp_default)
        plan = device_plan.plan_process(request)  # before anything could touch CUDA; one line on bad input
        if plan.spawn > 1:
            print(
                f"vocseg: starting {plan.spawn} processes on this machine (one per visible GPU unless nproc_per_node"
                " says otherwise); NPROC_PER_NODE=1 or CONFIG_OVERRIDES=nproc_per_node=1 runs one",
                file=sys.stderr,
                flush=True,
            )
        rank_main = functools.partial(_one_process, one_rank, request, plan.spawn > 1)
        try:
            launch.launch(
                rank_main,
                source,
                nproc_per_node=plan.spawn,
                backend=plan.backend,
                timeout_s=source.setting("dist_timeout"),
            )
        finally:
            device_plan.release()


def _device_request(source: ConfigSource, amp_default) -> device_plan.Request:
    where = f"config {source.config_path}"
    if _enqueued(source):
        # An agent's machine, not this one, needs the GPU of an enqueued run; it decides its own processes.
        return device_plan.Request(device=None, nproc_per_node=1, where=where)
    return device_plan.Request(
        device=source.setting("device"),
        amp=source.setting("amp", amp_default),
        sync_bn=source.setting("sync_bn"),
        nproc_per_node=source.setting("nproc_per_node"),
        where=where,
    )


def _one_process(one_rank, request: device_plan.Request, spawned: bool, source: ConfigSource) -> None:
    # A process this launch started ends with its own one line and exit code; its parent then exits quietly.
    with _exit_codes() if spawned else contextlib.nullcontext():
        if spawned:  # it decides its own plan: its rank picks its GPU
            device_plan.plan_process(request, spawned_rank=idist.get_local_rank(), spawned=idist.get_world_size())
        if device_plan.current().device.type == "cpu":
            machine.tune_cpu_allocator()
        one_rank(source)


def _enqueued(source: ConfigSource) -> bool:
    """Whether this run goes to a ClearML queue instead of training here (a preflight always runs here)."""
    return bool(
        not source.setting("preflight") and clearml_session.enabled() and clearml_session.requested_queue(source)
    )


@contextlib.contextmanager
def _exit_codes():
    try:
        yield
    except UserError as exc:
        exit_with(exc)
    except signals.Preempted as exc:
        print(f"stopped: {exc}", file=sys.stderr, flush=True)
        sys.exit(exc.exit_code)  # 75, or 0 where the launcher took the requeue request (signals.request_requeue)
    except signals.Interrupted as exc:
        exit_with(exc, 128 + exc.signum)  # the shell's convention: 143 after SIGTERM, 130 after Ctrl-C
    except torch.multiprocessing.ProcessExitedException as exc:
        sys.exit(exc.exit_code or 1)  # a process this launch started said why in its own line


def _train_one_rank(source: ConfigSource) -> None:
    outputs.check_output_base()
    if source.setting("preflight"):
        # No run folder, no lock and no ClearML task: the real run may be running, or start next.
        preflight(source.config_path, mutations=source.all_mutations() or None)
        return
    output_dir = outputs.run_dir(source.config_path, source.setting("run_name"))
    # Locked before ClearML (a second run must not continue the first's task), unless the run is enqueued: it
    # trains on an agent, in a folder of its own.
    with folder_lock.run_folder(output_dir, hold=not _enqueued(source)):
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


def _evaluate_one_rank(source: ConfigSource) -> None:
    if source.setting("preflight"):
        raise UserError("preflight=True times a training run: use it with code/scripts/training.py")
    outputs.check_output_base()
    output_dir = outputs.run_dir(source.config_path, evaluation_name(source.setting("run_name")))
    # Locked: two evaluations under one RUN_NAME would write one folder at once.
    with folder_lock.run_folder(output_dir):
        factory = None
        if clearml_session.enabled() and idist.get_rank() == 0:
            task = clearml_session.init_task(source.config_path, "testing", source.script_path)
            factory = functools.partial(clearml_reports.EvaluationReport, task)
        evaluate(
            source.config_path,
            mutations=source.all_mutations() or None,
            tracker_factory=factory,
            output_dir=output_dir,
        )
