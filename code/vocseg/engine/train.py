"""One training process, behind ``code/scripts/training.py`` (vocseg.entry wires settings -> launch -> here).

``train()`` reads top to bottom: prepare the config and the run folder, build the model and the engines (the
loss and the optimiser step: ``vocseg.engine.steps.train_step``), register every handler in one list, resume,
run. Everything the process works with is one ``Run``.
"""

import functools
import logging
import math
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ignite
import ignite.distributed as idist
import torch
import torchvision
from ignite.engine import Engine, Events
from ignite.handlers import EarlyStopping, ProgressBar, Timer

from vocseg import outputs
from vocseg.config import check_trainval
from vocseg.dataflow import check_images_per_process, images_scored
from vocseg.engine.checkpoints import (
    RunSettings,
    best_model_checkpointer,
    carry_best_models,
    newest_complete_checkpoint,
    resume,
    training_checkpointer,
)
from vocseg.engine.metrics import scalar_metrics
from vocseg.engine.prepare import prepare
from vocseg.engine.steps import create_evaluator, create_trainer
from vocseg.errors import UserError
from vocseg.models import ARCHITECTURE_FILE, architecture, backbone_source
from vocseg.runtime import device_plan, faults, ranks, signals
from vocseg.runtime.ranks import ALL_RANKS
from vocseg.visualize import comparison_grid

log = logging.getLogger("vocseg")


@dataclass
class Run:
    """What one training process works with: built once from the config, then driven by Ignite's engines."""

    config: Any
    output_dir: Path
    device: torch.device
    plan: device_plan.DevicePlan
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    trainer: Engine
    evaluators: dict  # tag -> evaluator: train_eval, then val
    train_loader: Any
    loaders: dict  # tag -> the loader its evaluator scores (None: not scored)
    to_save: dict  # what a training checkpoint holds
    accumulation_steps: int
    num_epochs: int
    val_interval: int
    save_every_iters: int
    log_every: int
    backbone_source: str | None
    best: Any = None  # the best-model checkpointer
    checkpointer: Any = None  # the training checkpointer
    results: dict = field(default_factory=dict)  # tag -> the latest validation's metrics
    preempted: str = ""  # the stop signal honoured, if any
    closers: list = field(default_factory=list)  # what must be closed when training ends, in order
    tracker: Any = None  # rank 0's ClearML tracker, when tracking


TRAIN_LOADERS = {"train": "train_loader", "val": "val_loader", "train_eval": "train_eval_loader"}


def train(config_path, script_path=None, mutations=None, tracker_factory=None, output_dir=None) -> dict:
    """Runs one training process (one rank). Returns the final metrics (rank 0 writes them too).
    ``output_dir``: the run folder (default: ``outputs.run_dir``)."""
    config, seed, output_dir, logger = prepare(
        config_path, mutations, "training", TRAIN_LOADERS, check_trainval, output_dir=output_dir
    )
    run = _build(config, config_path, seed, output_dir)
    _log_header(run, config_path)
    with _faults_in_one_line(run):  # from the run's first output file (TensorBoard's) to its last
        # Ignite calls the handlers of an event in this order: the checkpoint at an epoch's end must come after
        # that epoch's validation (so a resumed run loses none), and the tracker reads what the others set up.
        register_handlers(
            run,
            [
                save_checkpoints,
                keep_best_models,
                stop_early,
                validate,
                save_checkpoint_after_validation,
                stop_on_preemption_signal,  # after validate: a stop at an epoch's end comes after its validation
                log_progress,
                write_tensorboard,
                record_sources(config_path, script_path, mutations),
                track(tracker_factory, logger),
            ],
        )
        resumed_from = _resume(run, config.get("resume_from"))
        try:
            run.trainer.run(run.train_loader, max_epochs=run.num_epochs)
        except signals.Interrupted as exc:
            raise _how_to_continue(exc, run, resumed_from) from None
        finally:
            _close(run, finished=sys.exc_info()[1] is None)
        _raise_if_stopped(run)
        _write_results(run, {"completed": True})
    logger.info("done: metrics in %s", output_dir / "metrics.json")
    return {**run.results, "output_dir": str(output_dir)}


def register_handlers(run: Run, handlers) -> None:
    for attach in handlers:
        attach(run)


def _close(run: Run, finished: bool) -> None:
    # TensorBoard first, then the summary plot from its events (a finished run, a NaN stop included, not a
    # crash), then the tracker, which attaches summary.png. One that fails (a full disk) leaves the others to
    # close; its error is the run's.
    failed = None
    for closer in run.closers:
        try:
            closer(finished)
        except Exception as exc:
            failed = failed or exc
    if failed is not None:
        raise failed


def _raise_if_stopped(run: Run) -> None:
    state, folder = run.trainer.state, run.output_dir / "checkpoints"
    if run.preempted:
        message = (
            f"{run.preempted}: stopped at iteration {state.iteration} with checkpoint "
            f"{folder / run.checkpointer.last_checkpoint}; a rerun with the same run folder continues from it"
        )
        # No rank exits before rank 0 has written the checkpoint and closed the run: a launcher may stop every
        # rank when the first one exits (srun --kill-on-bad-exit).
        ranks.wait_for_every_rank("the checkpoint and the end of the run")
        raise signals.Preempted(message, signals.request_requeue(message, write=idist.get_rank() == 0))
    if state.nan_iteration is not None:
        good = run.checkpointer.last_checkpoint
        raise UserError(
            f"loss became NaN at iteration {state.nan_iteration}; training stopped. Last good checkpoint: "
            f"{folder / good if good else 'none yet'}. Lower the learning rate or check the data"
        )


def _how_to_continue(exc, run: Run, resumed_from) -> signals.Interrupted:
    last = run.checkpointer.last_checkpoint or resumed_from
    state = run.trainer.state
    where = f"{exc} at iteration {state.iteration} (epoch {state.epoch})"
    if not last:
        return signals.Interrupted(
            exc.signum,
            f"{where} before its first checkpoint (every {run.save_every_iters} iterations): rerun to start again",
        )
    return signals.Interrupted(exc.signum, f"{where}; last checkpoint {last}: continue with RESUME_FROM={last}")


def _faults_in_one_line(run: Run):
    """A full disk or a killed DataLoader worker ends the run with one line naming the checkpoint to continue from:
    the newest that loads in the run folder (what a rerun picks; a checkpoint fetched from ClearML lands there
    too), else RESUME_FROM's."""
    folder = run.output_dir / "checkpoints"
    return faults.told_in_one_line(
        run.output_dir,
        checkpoint=lambda: newest_complete_checkpoint(folder) or run.config.get("resume_from"),
        needed=lambda: faults.checkpoint_bytes(folder, _tensors([run.model.state_dict(), run.optimizer.state_dict()])),
        num_workers=run.config.get("num_workers", getattr(run.train_loader, "num_workers", None)),
        batch_size=run.config.get("batch_size", getattr(run.train_loader, "batch_size", None)),
    )


def _tensors(state):
    if isinstance(state, torch.Tensor):
        yield state
    elif isinstance(state, dict | list | tuple):
        for value in state.values() if isinstance(state, dict) else state:
            yield from _tensors(value)


# ---------------------------------------------------------------------------------------------------------
# Building the run from the loaded config.


def _device_plan(config, config_path) -> device_plan.DevicePlan:
    """This process's device plan (vocseg.entry decided it), with SyncBN decided from the loaded config, which
    may compute sync_bn. Called without a plan (a test calling train() directly), it decides one."""
    where = f"config {config_path}"
    plan = device_plan.current() or device_plan.plan_process(
        device_plan.Request(device=config.get("device"), amp=config.get("amp", "auto"), where=where)
    )
    asked = str(config.get("device") or "").split(":")[0]
    if asked and asked != plan.device.type:
        raise UserError(
            f"{where} computes device={config.get('device')!r} but this process was planned on {plan.device} from "
            "the device setting: write device as a literal (or use CONFIG_OVERRIDES=device=...)"
        )
    plan = device_plan.with_sync_bn(plan, config.get("sync_bn"))
    for said in plan.warnings:
        log.warning("%s", said)
    return plan


def _gpu_switches(config, device, model):
    """cudnn.benchmark (default on) and channels_last (default off: not yet measured faster here), on CUDA."""
    channels_last = device.type == "cuda" and bool(config.get("channels_last", False))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = bool(config.get("cudnn_benchmark", True))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, channels_last


def _schedule(config, config_path) -> dict:
    accumulation_steps = int(config.get("accumulation_steps", 1))
    save_every_iters = int(config.get("save_every_iters", 1000))
    if save_every_iters % accumulation_steps:
        raise UserError(
            f"config {config_path}: save_every_iters={save_every_iters} must be a multiple of "
            f"accumulation_steps={accumulation_steps} so checkpoints never split an accumulated step"
        )
    return dict(
        accumulation_steps=accumulation_steps,
        num_epochs=int(config.num_epochs),
        val_interval=int(config.get("val_interval", 1)),
        save_every_iters=save_every_iters,
        log_every=int(config.get("log_every_iters", 10)),
    )


def _build(config, config_path, seed: int, output_dir) -> Run:
    """The model on its device, the engines and the schedule, from the loaded config."""
    plan = _device_plan(config, config_path)
    device, amp_dtype = plan.device, plan.amp_dtype
    schedule = _schedule(config, config_path)
    check_images_per_process(config.train_loader.batch_size, plan.world_size, plan.sync_bn, f"config {config_path}")
    model, channels_last = _gpu_switches(config, device, config.model)
    model = device_plan.place_model(model, plan)
    trainer = create_trainer(
        model,
        config.optimizer,
        config.criterion.to(device),
        config.lr_scheduler,
        config.train_loader.sampler,
        device=device,
        seed=seed,
        amp_dtype=amp_dtype,
        accumulation_steps=schedule["accumulation_steps"],
        channels_last=channels_last,
        compile_model=config.get("compile_model", False),
        check_every=(schedule["save_every_iters"], schedule["log_every"]),
    )
    num_classes = int(config.get("num_classes", 21))
    evaluators = {
        tag: create_evaluator(
            model, device=device, amp_dtype=amp_dtype, num_classes=num_classes, channels_last=channels_last
        )
        for tag in ("train_eval", "val")
    }
    to_save = {
        "settings": _run_settings(config, schedule["accumulation_steps"]),
        "trainer": trainer,
        "model": model,
        "optimizer": config.optimizer,
        "lr_scheduler": config.lr_scheduler,
        "scaler": trainer.scaler,
    }
    return Run(
        config=config,
        output_dir=output_dir,
        device=device,
        plan=plan,
        model=model,
        optimizer=config.optimizer,
        trainer=trainer,
        evaluators=evaluators,
        train_loader=config.train_loader,
        loaders={"train_eval": config.train_eval_loader, "val": config.val_loader},
        to_save=to_save,
        backbone_source=backbone_source(model),
        **schedule,
    )


def _run_settings(config, accumulation_steps: int) -> RunSettings:
    # What fixes the schedule and the data order: resuming under other values would be another run.
    return RunSettings(
        {
            "seed": config.get("seed"),
            "batch_size": config.get("batch_size"),
            "num_epochs": int(config.num_epochs),
            "accumulation_steps": accumulation_steps,
            "world_size": idist.get_world_size(),
            "iterations_per_epoch": len(config.train_loader),
        },
        fixes="restore the old settings to continue, or unset RESUME_FROM to start a new run",
    )


def _log_header(run: Run, config_path) -> None:
    train_loader, val_loader, train_eval_loader = run.train_loader, run.loaders["val"], run.loaders["train_eval"]
    log.info(
        "vocseg %s | torch %s | torchvision %s | ignite %s | python %s",
        __import__("vocseg").__version__,
        torch.__version__,
        torchvision.__version__,
        ignite.__version__,
        platform.python_version(),
    )
    log.info("device %s | world size %d | config %s", run.plan.line(), idist.get_world_size(), config_path)
    log.info("backbone weights: %s", run.backbone_source or "not recorded (the model is not a vocseg.models build)")
    log.info(
        "train images %d (%d iterations/epoch/process) | val images %d | train-eval images %d",
        len(train_loader.dataset),
        len(train_loader),
        images_scored(val_loader),
        images_scored(train_eval_loader) if train_eval_loader is not None else 0,
    )
    log.info("output folder %s", run.output_dir)


# ---------------------------------------------------------------------------------------------------------
# Resuming.


def _resume(run: Run, resume_from):
    """From ``RESUME_FROM`` when given, else from the newest complete checkpoint already in the run folder
    (a restarted, requeued or re-enqueued run finds its own folder again: outputs.run_name), else from the
    one its ClearML task holds (a task enqueued again on another machine). Returns the checkpoint it
    continued from, or None."""
    new_run = "unset RESUME_FROM to start a new run"
    if not resume_from:
        # Every rank resumes from the file rank 0 chose (and may have fetched), or stops with its error.
        found = ranks.from_rank_zero("choosing the checkpoint to resume from", functools.partial(_own_checkpoint, run))
        if not found:
            return None
        resume_from, new_run = found, f"set another RUN_NAME to start a new run (this one is {run.output_dir})"
    run.to_save["settings"].fixes = f"restore the old settings to continue, or {new_run}"
    resume(run.to_save, resume_from, optional=("best_models", "early_stopping"))
    total = run.num_epochs * len(run.train_loader)
    if run.trainer.state.iteration >= total:  # Ignite would silently start such a run again from iteration 1
        raise UserError(
            f"checkpoint {resume_from} ends a finished run (iteration {run.trainer.state.iteration} of "
            f"{total}): nothing left to train; {new_run}"
        )
    missing = carry_best_models(run.best, resume_from, run.output_dir / "best")
    stopper = run.to_save.get("early_stopping")
    log.info(
        "resumed from %s at iteration %d (epoch %d); best models %s%s",
        resume_from,
        run.trainer.state.iteration,
        run.trainer.state.epoch,
        [item.filename for item in run.best._saved] or "none yet",
        f"; early stopping counter {stopper.counter} best {stopper.best_score}" if stopper else "",
    )
    if missing:
        log.warning(
            "best models %s are not next to %s: their scores still count, the files are not copied",
            ", ".join(missing),
            resume_from,
        )
    return resume_from


def _own_checkpoint(run: Run):
    """The newest checkpoint of the run folder, else of its ClearML task (rank 0 alone has a tracker), else None.
    Raises UserError when the task's cannot be fetched."""
    found = newest_complete_checkpoint(run.output_dir / "checkpoints")
    if found is None and run.tracker is not None:
        found = run.tracker.fetch_checkpoint(run.output_dir / "checkpoints")
    return found


# ---------------------------------------------------------------------------------------------------------
# The handlers, in the order train() registers them.


def _save_if_sound(run: Run, engine: Engine) -> None:
    if engine.state.nan_iteration is None:  # never persist weights that a NaN step already ruined
        run.checkpointer(engine)


def save_checkpoints(run: Run) -> None:
    """A training checkpoint every ``save_every_iters`` iterations inside an epoch, and at the end (a stop on
    a signal included). It holds the best-model record and early stopping's state, so a resumed run remembers
    the scores it has to beat."""
    run.best = best_model_checkpointer(run.model, run.output_dir / "best", run.trainer)
    run.to_save["best_models"] = run.best
    run.checkpointer = training_checkpointer(run.to_save, run.output_dir / "checkpoints")
    every = run.save_every_iters
    run.trainer.add_event_handler(
        Events.ITERATION_COMPLETED(event_filter=lambda e, i: i % every == 0 and i % e.state.epoch_length != 0)
        | Events.COMPLETED,
        functools.partial(_save_if_sound, run),
    )


def keep_best_models(run: Run) -> None:
    """The best two models by val mIoU, in ``best/``."""
    run.evaluators["val"].add_event_handler(Events.COMPLETED, run.best)


def stop_early(run: Run) -> None:
    """Early stopping after ``es_patience`` validations without a better val mIoU, when set."""
    if run.config.get("es_patience"):
        stopper = EarlyStopping(
            int(run.config.es_patience), score_function=lambda e: e.state.metrics["mIoU"], trainer=run.trainer
        )
        run.evaluators["val"].add_event_handler(Events.COMPLETED, stopper)
        run.to_save["early_stopping"] = stopper


def stop_on_preemption_signal(run: Run) -> None:
    """A stop signal (SLURM's warning before preemption or the time limit) ends the run at the first exact point
    after it where the ranks agree: an iteration that closes an accumulated step, inside an epoch (the COMPLETED
    checkpoint saves it), or an epoch's end once its validation is done (train() registers this after
    ``validate``), so a resumed run loses none.

    Several ranks agree through one all_reduce every lcm(accumulation_steps, log_every_iters) iterations (a
    collective per step would stall GPUs) and after every epoch's validation; one process checks every
    accumulated step. So a warned run trains at most that period more (plus one validation), whatever the
    epoch's length: a period that divides the epoch still stops, at an epoch's end.
    """
    signals.catch_preemption_signal()
    accumulation, several = run.accumulation_steps, idist.get_world_size() > 1
    every = math.lcm(accumulation, run.log_every if several else 1)

    def agreed_stop(engine) -> str:
        asked = signals.stop_requested()
        if several and idist.all_reduce(int(bool(asked)), op="MAX"):  # every rank takes part, asked or not
            asked = asked or "SIGUSR1 on another rank"
        # A run already ending (NaN, early stopping: the same on every rank) ends as such, not for a requeue.
        return "" if engine.should_terminate or engine.state.nan_iteration is not None else asked

    def stop(engine, asked: str) -> None:
        log.warning(
            "%s received: checkpoint at iteration %d (epoch %d), then stop for a requeue",
            asked,
            engine.state.iteration,
            engine.state.epoch,
        )
        run.preempted = asked
        engine.terminate()

    @run.trainer.on(Events.ITERATION_COMPLETED(event_filter=lambda e, i: i % every == 0 and i % e.state.epoch_length))
    def _inside_an_epoch(engine):
        asked = agreed_stop(engine)
        if asked:
            stop(engine, asked)

    def exact_epoch_end(engine, epoch) -> bool:
        # The last epoch's end is the run's end; an epoch that ends inside an accumulated step is not exact.
        return epoch < engine.state.max_epochs and engine.state.iteration % accumulation == 0

    @run.trainer.on(Events.EPOCH_COMPLETED(event_filter=exact_epoch_end))
    def _after_validation(engine):
        asked = agreed_stop(engine)
        if asked:
            stop(engine, asked)


def validate(run: Run) -> None:
    """train_eval then val every ``val_interval`` epochs and after the last one; metrics.json after each."""
    timer = Timer(average=True)
    timer.attach(
        run.trainer,
        start=Events.EPOCH_STARTED,
        resume=Events.ITERATION_STARTED,
        pause=Events.ITERATION_COMPLETED,
        step=Events.ITERATION_COMPLETED,
    )
    run.evaluators["val"].add_event_handler(Events.ITERATION_COMPLETED, _capture_grid)

    @run.trainer.on(
        Events.EPOCH_COMPLETED(event_filter=lambda _, epoch: epoch % run.val_interval == 0 or epoch == run.num_epochs)
    )
    def _validate(engine):
        epoch = engine.state.epoch
        log.info("epoch %d: %.3f s/iteration", epoch, timer.value())
        for tag, evaluator in run.evaluators.items():
            if run.loaders[tag] is None:
                continue
            evaluator.run(run.loaders[tag])
            values = run.results[tag] = scalar_metrics(evaluator.state.metrics)
            values["IoU"] = [float(v) for v in evaluator.state.metrics["IoU"]]
            log.info("epoch %d %s: %s", epoch, tag, " ".join(f"{k}={v:.4f}" for k, v in values.items() if k != "IoU"))
        if idist.get_world_size() > 1:
            # Exact values from every rank: they must agree, as the confusion matrices are summed over ranks.
            log.info(
                "epoch %d rank %d/%d: %s",
                epoch,
                idist.get_rank(),
                idist.get_world_size(),
                " ".join(f"{tag}_mIoU={m['mIoU']!r}" for tag, m in run.results.items()),
                extra=ALL_RANKS,
            )
        _write_results(run)


def _capture_grid(evaluator: Engine) -> None:
    # The first validation batch of rank 0 becomes the image | ground truth | prediction grid.
    if evaluator.state.iteration == 1 and idist.get_rank() == 0:
        out = evaluator.state.output
        evaluator.state.grid = comparison_grid(evaluator.state.batch["image"], out["y"], out["y_pred"].argmax(1))


def _write_results(run: Run, extra=None) -> None:
    """metrics.json (rank 0): the latest validation's results and where the run stands."""
    if idist.get_rank() > 0:
        return
    best = run.best.last_checkpoint
    outputs.write_json(
        run.output_dir / "metrics.json",
        {
            **run.results,
            "epoch": run.trainer.state.epoch,
            "iteration": run.trainer.state.iteration,
            "best_model": best and str(run.output_dir / "best" / best),
            "output_dir": str(run.output_dir),
            "backbone_source": run.backbone_source,
            "precision": run.plan.precision_name,  # fp32, bf16 or fp16 autocast
            "device": str(run.device),
            **(extra or {}),
        },
    )


def save_checkpoint_after_validation(run: Run) -> None:
    """A checkpoint that falls on an epoch's end, written once that epoch's validation is done."""
    every = run.save_every_iters
    run.trainer.add_event_handler(
        Events.EPOCH_COMPLETED(event_filter=lambda e, _: e.state.iteration % every == 0),
        functools.partial(_save_if_sound, run),
    )


def log_progress(run: Run) -> None:
    """Rank 0: a progress bar on a terminal, plain loss/LR lines every ``log_every_iters`` otherwise, and the
    first and last iterations (benchmarks/startup_exit.py measures start-up and exit from them)."""
    trainer, optimizer = run.trainer, run.optimizer
    if idist.get_rank() > 0:
        return
    if sys.stderr.isatty():
        ProgressBar(persist=False).attach(trainer, output_transform=lambda o: {"loss": float(o["batch_loss"])})
    else:  # logs and CI get plain lines instead of carriage-return redraws

        @trainer.on(Events.ITERATION_COMPLETED(every=run.log_every))
        def _log_loss(engine):
            lrs = " ".join(f"{g['lr']:.3g}" for g in optimizer.param_groups)
            loss = float(engine.state.output["batch_loss"])
            log.info("epoch %d iteration %d loss %.4f lr %s", engine.state.epoch, engine.state.iteration, loss, lrs)

    first_logged = []  # a resumed run starts at its checkpoint's iteration, not at 1

    @trainer.on(Events.ITERATION_STARTED)
    def _log_first_iteration(engine):
        if not first_logged:
            first_logged.append(True)
            log.info("first iteration %d started", engine.state.iteration)

    @trainer.on(
        Events.ITERATION_COMPLETED(
            event_filter=lambda engine, i: i == engine.state.max_epochs * engine.state.epoch_length
        )
    )
    def _log_last_iteration(engine):
        log.info("last iteration %d completed", engine.state.iteration)


def write_tensorboard(run: Run) -> None:
    """Rank 0: TensorBoard events in ``tb/``; when the run ends, summary.png from them."""
    if idist.get_rank() > 0:
        return
    tb = outputs.setup_tensorboard(run.output_dir, run.trainer, run.optimizer, run.evaluators, run.log_every)

    def close(finished: bool) -> None:
        tb.close()
        if finished:
            _write_summary(run.output_dir)

    run.closers.append(close)


def _write_summary(output_dir) -> None:
    from vocseg import run_summary  # matplotlib and TensorBoard's reader load only when a run ends

    try:
        path = run_summary.write_summary(output_dir)
    except Exception as exc:  # a plot must not fail a run whose weights and metrics are already saved
        if isinstance(exc, OSError) and exc.errno in faults.DISK_FULL:  # ... but a full disk is said, not warned
            raise faults.summary_disk_full_error(output_dir) from None
        log.warning("summary.png not written: %s: %s", type(exc).__name__, exc)
        return
    log.info("summary %s | curves: tensorboard --logdir %s", path, output_dir / "tb")


def record_sources(config_path, script_path, mutations):
    """Rank 0: the config and the script next to the outputs, and what this run changed in the config
    (CONFIG_OVERRIDES, a clone's edits) in overrides.json, and the model's architecture in model.json."""

    def attach(run: Run) -> None:
        if idist.get_rank() > 0:
            return
        outputs.copy_sources(run.output_dir, config_path, script_path)
        built = architecture(run.model)
        if built is not None:  # evaluation builds the model that these weights need from it
            outputs.write_json(run.output_dir / ARCHITECTURE_FILE, built)
        if mutations:
            outputs.write_json(run.output_dir / "overrides.json", dict(mutations))

    return attach


def _close_tracker(run: Run) -> None:
    run.tracker.stopped_by = run.preempted  # a run stopped on a signal is unfinished: its task is not completed
    run.tracker.close()


def track(tracker_factory, logger):
    """Rank 0 with tracking on: the tracker (ClearML) attaches its own handlers to the engines."""

    def attach(run: Run) -> None:
        if tracker_factory is None:
            return
        run.tracker = tracker_factory(
            config=run.config,
            output_dir=run.output_dir,
            trainer=run.trainer,
            evaluators=run.evaluators,
            optimizer=run.optimizer,
            model=run.model,
            best=run.best,
            logger=logger,
            checkpointer=run.checkpointer,
        )
        run.closers.append(lambda _finished: _close_tracker(run))

    return attach
