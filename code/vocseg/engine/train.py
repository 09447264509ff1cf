"""The training run behind ``code/scripts/training.py``: config -> runtime -> dataflow -> model -> engines -> outputs.

``train()`` reads top to bottom: build what the config describes, attach the handlers (checkpoints,
validation, logging, tracking), resume if asked, run.
"""

import functools
import logging
import math
import platform
import sys
from types import SimpleNamespace

import ignite
import ignite.distributed as idist
import torch
import torchvision
from ignite.engine import Engine, Events
from ignite.handlers import EarlyStopping, ProgressBar, Timer

from vocseg import outputs
from vocseg.config import check_constants, check_loaded, check_seed, check_trainval, load_config, peek_constant
from vocseg.data import sample_check
from vocseg.dataflow import images_scored
from vocseg.engine import precision
from vocseg.engine.checkpoints import (
    RunSettings,
    best_model_checkpointer,
    carry_best_models,
    newest_complete_checkpoint,
    resume,
    training_checkpointer,
)
from vocseg.engine.metrics import scalar_metrics
from vocseg.engine.steps import create_evaluator, create_trainer
from vocseg.errors import UserError
from vocseg.models import backbone_source
from vocseg.runtime import folder_lock, launch, logs, machine, ranks, signals
from vocseg.runtime.ranks import ALL_RANKS
from vocseg.visualize import comparison_grid

log = logging.getLogger("vocseg")


def run(config, **_runner_kwargs) -> None:
    """py_config_runner entry point (it also passes its own logger, unused) of code/scripts/training.py."""
    launch.launch(config, _train_one_rank)


def _train_one_rank(source) -> None:
    from vocseg.clearml import reports as clearml_reports
    from vocseg.clearml import session as clearml_session

    tracker_factory = None
    outputs.check_output_base()
    output_dir = outputs.run_dir(source.config_path)
    folder_lock.hold_run_folder(output_dir)  # before ClearML: a second run must not continue the first's task
    if clearml_session.enabled():
        # ClearML first: the task may enqueue itself. A rerun in a run folder continues that folder's task.
        task = clearml_session.prepare(source.config_path, source.script_path, output_dir)
        tracker_factory = task and functools.partial(clearml_reports.ClearMLTracker, task)
    train(
        source.config_path,
        source.script_path,
        mutations=source.mutations or None,
        tracker_factory=tracker_factory,
        output_dir=output_dir,
    )


def train(config_path, script_path=None, mutations=None, tracker_factory=None, output_dir=None) -> dict:
    """Runs one training process (one rank). Returns the final metrics (rank 0 writes them too).
    ``output_dir``: the run folder (default: ``outputs.run_dir``)."""
    check_constants(config_path, mutations)
    seed = int(peek_constant(config_path, "seed", mutations, default=0))
    machine.seed_everything(seed)  # before the config builds its model
    config = load_config(config_path, mutations)
    check_trainval(config)
    check_seed(config, seed)
    check_loaded(config, config_path)
    checked = sample_check.check_loaders(
        {"train": config.train_loader, "val": config.val_loader, "train_eval": config.get("train_eval_loader")}
    )
    output_dir = outputs.make_output_dir(config_path, output_dir)
    logger = logs.setup_logging(output_dir)
    logger.info("before training: %s", checked)

    run = _build(config, config_path, seed)
    _log_header(run, config_path, output_dir)
    checkpointer = _attach_checkpoints(run, output_dir)
    _attach_preemption(run)
    results = _attach_validation(run, output_dir)
    run.save_after_validation()
    _attach_progress_logging(run)
    tb = (
        outputs.setup_tensorboard(output_dir, run.trainer, run.optimizer, run.evaluators, run.log_every)
        if idist.get_rank() == 0
        else None
    )
    if idist.get_rank() == 0:
        outputs.copy_sources(output_dir, config_path, script_path)
    tracker = (
        tracker_factory(
            config=config,
            output_dir=output_dir,
            trainer=run.trainer,
            evaluators=run.evaluators,
            optimizer=run.optimizer,
            model=run.model,
            best=run.best,
            logger=logger,
            checkpointer=checkpointer,
        )
        if tracker_factory
        else None
    )

    resumed_from = _resume(run, config.get("resume_from"), output_dir, tracker)
    try:
        run.trainer.run(run.train_loader, max_epochs=run.num_epochs)
    except signals.Interrupted as exc:
        raise _how_to_continue(exc, run, checkpointer, resumed_from) from None
    finally:
        if tb is not None:
            tb.close()
            if sys.exc_info()[1] is None:  # a finished run (a NaN stop included), not a crash
                _write_summary(output_dir)
        if tracker is not None:
            tracker.close()  # after the summary: the tracker attaches summary.png

    if run.trainer.state.preempted:
        raise signals.Preempted(
            f"{run.trainer.state.preempted}: stopped at iteration {run.trainer.state.iteration} "
            f"with checkpoint {output_dir / 'checkpoints' / checkpointer.last_checkpoint}; "
            f"a rerun with the same run folder continues from it"
        )
    if run.trainer.state.nan_iteration is not None:
        good = checkpointer.last_checkpoint
        raise UserError(
            f"loss became NaN at iteration {run.trainer.state.nan_iteration}; training stopped. Last good checkpoint: "
            f"{output_dir / 'checkpoints' / good if good else 'none yet'}. Lower the learning rate or check the data"
        )
    results.write({"completed": True})
    logger.info("done: metrics in %s", output_dir / "metrics.json")
    return {**results.values, "output_dir": str(output_dir)}


def _write_summary(output_dir) -> None:
    from vocseg import run_summary  # matplotlib and TensorBoard's reader load only when a run ends

    try:
        path = run_summary.write_summary(output_dir)
    except Exception as exc:  # a plot must not fail a run whose weights and metrics are already saved
        log.warning("summary.png not written: %s: %s", type(exc).__name__, exc)
        return
    log.info("summary %s | curves: tensorboard --logdir %s", path, output_dir / "tb")


def _how_to_continue(exc, run, checkpointer, resumed_from) -> signals.Interrupted:
    last = checkpointer.last_checkpoint or resumed_from
    state = run.trainer.state
    where = f"{exc} at iteration {state.iteration} (epoch {state.epoch})"
    if not last:
        return signals.Interrupted(
            exc.signum,
            f"{where} before its first checkpoint (every {run.save_every_iters} iterations): rerun to start again",
        )
    return signals.Interrupted(exc.signum, f"{where}; last checkpoint {last}: continue with RESUME_FROM={last}")


def _device(config, config_path) -> torch.device:
    device = idist.device() if idist.get_world_size() > 1 else torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"config {config_path}: device='cuda' but no GPU is visible: set device='cpu'")
    if device.type == "cpu":
        machine.tune_cpu_allocator()
    return device


def _sync_bn(config, device) -> bool:
    """On by default when several CUDA processes train (BatchNorm then sees the whole batch); ``sync_bn=False``
    opts out. torch's SyncBatchNorm raises on CPU tensors at the first training step."""
    requested = config.get("sync_bn")
    if idist.get_world_size() == 1:
        return False
    if device.type == "cpu":
        if requested:
            log.warning(
                "sync_bn=True ignored: SyncBatchNorm needs GPUs; each CPU process keeps its own BatchNorm "
                "statistics (rank 0's are the ones evaluated and saved)"
            )
        return False
    return True if requested is None else bool(requested)


def _gpu_switches(config, device, model):
    """cudnn.benchmark (default on) and channels_last (default off: not yet measured faster here), on CUDA."""
    channels_last = device.type == "cuda" and bool(config.get("channels_last", False))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = bool(config.get("cudnn_benchmark", True))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, channels_last


def _build(config, config_path, seed: int) -> SimpleNamespace:
    """The model on its device, the engines and the run controls, from the loaded config."""
    device = _device(config, config_path)
    accumulation_steps = int(config.get("accumulation_steps", 1))
    save_every_iters = int(config.get("save_every_iters", 1000))
    if save_every_iters % accumulation_steps:
        raise UserError(
            f"config {config_path}: save_every_iters={save_every_iters} must be a multiple of "
            f"accumulation_steps={accumulation_steps} so checkpoints never split an accumulated step"
        )
    amp_dtype = precision.amp_dtype(config.get("amp", "auto"), device, where=f"config {config_path}")
    sync_bn = _sync_bn(config, device)
    model, channels_last = _gpu_switches(config, device, config.model)
    model = idist.auto_model(model, sync_bn=sync_bn)
    if device.type == "cpu" and idist.get_world_size() == 1:
        model = model.to(device)
    optimizer, lr_scheduler = config.optimizer, config.lr_scheduler
    num_classes, log_every = int(config.get("num_classes", 21)), int(config.get("log_every_iters", 10))
    trainer = create_trainer(
        model,
        optimizer,
        config.criterion.to(device),
        lr_scheduler,
        config.train_loader.sampler,
        device=device,
        seed=seed,
        amp_dtype=amp_dtype,
        accumulation_steps=accumulation_steps,
        channels_last=channels_last,
        compile_model=config.get("compile_model", False),
        check_every=(save_every_iters, log_every),
    )
    evaluators = {
        tag: create_evaluator(
            model, device=device, amp_dtype=amp_dtype, num_classes=num_classes, channels_last=channels_last
        )
        for tag in ("train_eval", "val")
    }
    return SimpleNamespace(
        config=config,
        device=device,
        amp=precision.describe(amp_dtype),
        sync_bn=sync_bn,
        model=model,
        optimizer=optimizer,
        trainer=trainer,
        evaluators=evaluators,
        train_loader=config.train_loader,
        loaders={"train_eval": config.train_eval_loader, "val": config.val_loader},
        to_save={
            "settings": _run_settings(config, accumulation_steps),
            "trainer": trainer,
            "model": model,
            "optimizer": optimizer,
            "lr_scheduler": lr_scheduler,
            "scaler": trainer.scaler,
        },
        accumulation_steps=accumulation_steps,
        num_epochs=int(config.num_epochs),
        val_interval=int(config.get("val_interval", 1)),
        save_every_iters=save_every_iters,
        log_every=log_every,
        best=None,
        backbone_source=backbone_source(model),
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


def _resume(run, resume_from, output_dir, tracker=None):
    """From ``RESUME_FROM`` when given, else from the newest complete checkpoint already in the run folder
    (a restarted, requeued or re-enqueued run finds its own folder again: outputs.run_name), else from the
    one its ClearML task holds (a task enqueued again on another machine). Returns the checkpoint it
    continued from, or None."""
    new_run = "unset RESUME_FROM to start a new run"
    if not resume_from:
        # Every rank resumes from the file rank 0 chose (and may have fetched), or stops with its error.
        found = ranks.from_rank_zero(
            "choosing the checkpoint to resume from", functools.partial(_own_checkpoint, output_dir, tracker)
        )
        if not found:
            return None
        resume_from, new_run = found, f"set another RUN_NAME to start a new run (this one is {output_dir})"
    run.to_save["settings"].fixes = f"restore the old settings to continue, or {new_run}"
    resume(run.to_save, resume_from, optional=("best_models", "early_stopping"))
    total = run.num_epochs * len(run.train_loader)
    if run.trainer.state.iteration >= total:  # Ignite would silently start such a run again from iteration 1
        raise UserError(
            f"checkpoint {resume_from} ends a finished run (iteration {run.trainer.state.iteration} of "
            f"{total}): nothing left to train; {new_run}"
        )
    missing = carry_best_models(run.best, resume_from, output_dir / "best")
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


def _own_checkpoint(output_dir, tracker):
    """The newest checkpoint of the run folder, else of its ClearML task (rank 0 alone has a tracker), else None.
    Raises UserError when the task's cannot be fetched."""
    found = newest_complete_checkpoint(output_dir / "checkpoints")
    if found is None and tracker is not None:
        found = tracker.fetch_checkpoint(output_dir / "checkpoints")
    return found


def _log_header(run, config_path, output_dir) -> None:
    train_loader, val_loader, train_eval_loader = run.train_loader, run.loaders["val"], run.loaders["train_eval"]
    log.info(
        "vocseg %s | torch %s | torchvision %s | ignite %s | python %s",
        __import__("vocseg").__version__,
        torch.__version__,
        torchvision.__version__,
        ignite.__version__,
        platform.python_version(),
    )
    log.info(
        "device %s | world size %d | precision %s | sync_bn %s | config %s",
        run.device,
        idist.get_world_size(),
        run.amp,
        "on" if run.sync_bn else "off",
        config_path,
    )
    log.info("backbone weights: %s", run.backbone_source or "not recorded (the model is not a vocseg.models build)")
    log.info(
        "train images %d (%d iterations/epoch/process) | val images %d | train-eval images %d",
        len(train_loader.dataset),
        len(train_loader),
        images_scored(val_loader),
        images_scored(train_eval_loader) if train_eval_loader is not None else 0,
    )
    log.info("output folder %s", output_dir)


def _attach_checkpoints(run, output_dir):
    """Training checkpoints every ``save_every_iters`` and at the end; the best two models by val mIoU. The
    training checkpoint holds the best-model record and early stopping's state, so a resumed run remembers
    the scores it has to beat; one that falls at the end of an epoch is written after that epoch's validation.
    """
    run.best = best_model_checkpointer(run.model, output_dir / "best", run.trainer)
    run.evaluators["val"].add_event_handler(Events.COMPLETED, run.best)
    run.to_save["best_models"] = run.best
    if run.config.get("es_patience"):
        stopper = EarlyStopping(
            int(run.config.es_patience), score_function=lambda e: e.state.metrics["mIoU"], trainer=run.trainer
        )
        run.evaluators["val"].add_event_handler(Events.COMPLETED, stopper)
        run.to_save["early_stopping"] = stopper
    checkpointer = training_checkpointer(run.to_save, output_dir / "checkpoints")

    def save_checkpoint(engine):
        if engine.state.nan_iteration is None:  # never persist weights that a NaN step already ruined
            checkpointer(engine)

    every = run.save_every_iters
    run.trainer.add_event_handler(
        Events.ITERATION_COMPLETED(event_filter=lambda e, i: i % every == 0 and i % e.state.epoch_length != 0)
        | Events.COMPLETED,
        save_checkpoint,
    )
    run.save_after_validation = lambda: run.trainer.add_event_handler(
        Events.EPOCH_COMPLETED(event_filter=lambda e, _: e.state.iteration % every == 0), save_checkpoint
    )
    return checkpointer


def _attach_preemption(run) -> None:
    """A stop signal (SLURM's warning before preemption or the time limit) ends the run at the next iteration
    boundary where a checkpoint is exact: the COMPLETED checkpoint then saves it (``_attach_checkpoints``).

    Never on an epoch's last iteration: its validation runs first, so a resumed run loses none. Ranks agree
    through one all_reduce every ``log_every_iters`` iterations (a collective per step would stall GPUs).
    """
    signals.catch_preemption_signal()
    run.trainer.state.preempted = ""
    every = math.lcm(run.accumulation_steps, 1 if idist.get_world_size() == 1 else run.log_every)

    @run.trainer.on(Events.ITERATION_COMPLETED(every=every))
    def _stop_if_asked(engine):
        asked = signals.stop_requested()
        if idist.get_world_size() > 1 and idist.all_reduce(int(bool(asked)), op="MAX"):
            asked = asked or "SIGUSR1 on another rank"
        if asked and engine.state.iteration % engine.state.epoch_length and engine.state.nan_iteration is None:
            log.warning(
                "%s received: checkpoint at iteration %d, then exit %d for a requeue",
                asked,
                engine.state.iteration,
                signals.PREEMPTED_EXIT,
            )
            engine.state.preempted = asked
            engine.terminate()


class _Results:
    """The latest validation results, kept in metrics.json (rank 0) after every validation."""

    def __init__(self, run, output_dir):
        self.run, self.output_dir, self.values = run, output_dir, {}

    def write(self, extra=None) -> None:
        if idist.get_rank() == 0:
            best = self.run.best.last_checkpoint
            outputs.write_json(
                self.output_dir / "metrics.json",
                {
                    **self.values,
                    "epoch": self.run.trainer.state.epoch,
                    "iteration": self.run.trainer.state.iteration,
                    "best_model": best and str(self.output_dir / "best" / best),
                    "output_dir": str(self.output_dir),
                    "backbone_source": self.run.backbone_source,
                    "precision": self.run.amp,
                    **(extra or {}),
                },
            )


def _capture_grid(evaluator: Engine) -> None:
    # The first validation batch of rank 0 becomes the image | ground truth | prediction grid.
    if evaluator.state.iteration == 1 and idist.get_rank() == 0:
        out = evaluator.state.output
        evaluator.state.grid = comparison_grid(evaluator.state.batch["image"], out["y"], out["y_pred"].argmax(1))


def _attach_validation(run, output_dir) -> _Results:
    """train_eval then val every ``val_interval`` epochs and after the last one."""
    results = _Results(run, output_dir)
    timer = Timer(average=True)
    timer.attach(
        run.trainer,
        start=Events.EPOCH_STARTED,
        resume=Events.ITERATION_STARTED,
        pause=Events.ITERATION_COMPLETED,
        step=Events.ITERATION_COMPLETED,
    )
    run.evaluators["val"].add_event_handler(Events.ITERATION_COMPLETED, _capture_grid)
    rank, world_size = idist.get_rank(), idist.get_world_size()

    @run.trainer.on(
        Events.EPOCH_COMPLETED(event_filter=lambda _, epoch: epoch % run.val_interval == 0 or epoch == run.num_epochs)
    )
    def validate(engine):
        epoch = engine.state.epoch
        log.info("epoch %d: %.3f s/iteration", epoch, timer.value())
        for tag, evaluator in run.evaluators.items():
            if run.loaders[tag] is None:
                continue
            evaluator.run(run.loaders[tag])
            values = results.values[tag] = scalar_metrics(evaluator.state.metrics)
            values["IoU"] = [float(v) for v in evaluator.state.metrics["IoU"]]
            log.info("epoch %d %s: %s", epoch, tag, " ".join(f"{k}={v:.4f}" for k, v in values.items() if k != "IoU"))
        if world_size > 1:
            # Exact values from every rank: they must agree, as the confusion matrices are summed over ranks.
            log.info(
                "epoch %d rank %d/%d: %s",
                epoch,
                rank,
                world_size,
                " ".join(f"{tag}_mIoU={m['mIoU']!r}" for tag, m in results.values.items()),
                extra=ALL_RANKS,
            )
        results.write()

    return results


def _attach_progress_logging(run) -> None:
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
            log.info(
                "epoch %d iteration %d loss %.4f lr %s",
                engine.state.epoch,
                engine.state.iteration,
                float(engine.state.output["batch_loss"]),
                " ".join(f"{g['lr']:.3g}" for g in optimizer.param_groups),
            )

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
