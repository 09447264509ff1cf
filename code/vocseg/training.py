"""The training run behind ``code/scripts/training.py``: config -> dataflow -> model -> engines -> tracking."""

import contextlib
import ctypes
import datetime
import logging
import os
import platform
import random
import sys
from pathlib import Path

import ignite
import ignite.distributed as idist
import numpy as np
import torch
import torchvision
from ignite.engine import Engine, Events
from ignite.handlers import EarlyStopping, ProgressBar, Timer

from vocseg import tracking
from vocseg.checkpoints import best_model_checkpointer, resume, training_checkpointer
from vocseg.config import check_trainval, load_config, peek_constant
from vocseg.engines import create_evaluator, create_trainer
from vocseg.errors import UserError
from vocseg.metrics import scalar_metrics
from vocseg.visualize import comparison_grid

log = logging.getLogger("vocseg")


def distributed_backend():
    """gloo on CPU, nccl on GPU, nothing for a plain single process."""
    if "WORLD_SIZE" not in os.environ:
        return None
    return "nccl" if torch.cuda.is_available() else "gloo"


def process_group_timeout(config_path, backend):
    """How long a rank waits in a collective for the others: DIST_TIMEOUT (seconds, env) or ``dist_timeout``
    in the config; by default 120 s with gloo and torch's own default (10 min) with nccl.

    A dead peer is noticed at once (its sockets close, and torchrun stops the job); this bounds the wait for
    a peer that is alive but stuck. Raise it where one rank legitimately runs far ahead of the others.
    """
    seconds = os.environ.get("DIST_TIMEOUT") or peek_constant(config_path, "dist_timeout")
    if seconds is None:
        return datetime.timedelta(seconds=120) if backend == "gloo" else None
    try:
        return datetime.timedelta(seconds=float(seconds))
    except (TypeError, ValueError):
        raise UserError(f"process-group timeout {seconds!r} is not a number of seconds: fix DIST_TIMEOUT or "
                        f"dist_timeout in {config_path}") from None


@contextlib.contextmanager
def parallel_context(config_path):
    """idist.Parallel for however this process was launched, with the process-group timeout applied."""
    backend = distributed_backend()
    if backend is None:
        with idist.Parallel() as parallel:
            yield parallel
        return
    # ignite 0.5.5 hands Parallel(timeout=...) to init_process_group only when it spawns the processes
    # itself, never under torchrun: initialise here, and Parallel() runs the function in this group.
    timeout = process_group_timeout(config_path, backend)
    idist.initialize(backend, **({"timeout": timeout} if timeout else {}))
    try:
        with idist.Parallel() as parallel:
            yield parallel
    finally:
        idist.finalize()


def keep_freed_memory() -> None:
    """CPU training: let glibc keep freed autograd buffers for the next step instead of handing them back.

    By default it unmaps or trims those large blocks after every step and the next step page-faults them
    in again: 10-20k faults, 5-10% of a CPU step (benchmarks/trainer_overhead.py); PyTorch's CUDA allocator
    caches for the same reason. Memory stays at its peak, which the next step needs anyway. No-op without glibc.
    """
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None) if sys.platform.startswith("linux") else None
    if mallopt is not None:
        m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
        mallopt(m_mmap_threshold, 32 << 20)  # glibc's maximum: blocks below it come from the reusable heap
        mallopt(m_trim_threshold, 2**31 - 1)
        mallopt(m_top_pad, 64 << 20)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup_logging(output_dir):
    from ignite.utils import setup_logger

    rank = idist.get_rank()
    logger = setup_logger("vocseg", filepath=output_dir / "training.log" if rank == 0 else None,
                          distributed_rank=rank, format="%(asctime)s %(name)s %(levelname)s: %(message)s",
                          reset=True)  # vocseg.* module loggers propagate here
    if rank > 0:
        # The other ranks print only warnings and the lines logged with extra=ALL_RANKS (e.g. their metrics):
        # enough to see which rank failed or disagrees, without a copy of every message per process.
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(name)s [rank {rank}] %(levelname)s: %(message)s"))
        handler.addFilter(lambda record: record.levelno >= logging.WARNING or getattr(record, "all_ranks", False))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    return logger


ALL_RANKS = {"all_ranks": True}


def _capture_grid(evaluator: Engine) -> None:
    # The first validation batch of rank 0 becomes the image | ground truth | prediction grid.
    if evaluator.state.iteration == 1 and idist.get_rank() == 0:
        out = evaluator.state.output
        evaluator.state.grid = comparison_grid(evaluator.state.batch["image"], out["y"], out["y_pred"].argmax(1))


def train(config_path, script_path=None, mutations=None, tracker_factory=None) -> dict:
    """Runs one training process (one rank). Returns the final metrics (rank 0 writes them too)."""
    rank = idist.get_rank()
    seed = int(peek_constant(config_path, "seed", mutations, default=0))
    seed_everything(seed)
    config = load_config(config_path, mutations)
    check_trainval(config)

    output_dir = tracking.make_output_dir(config_path)
    logger = setup_logging(output_dir)
    device = idist.device() if idist.get_world_size() > 1 else torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"config {config_path}: device='cuda' but no GPU is visible: set device='cpu'")
    if device.type == "cpu":
        keep_freed_memory()

    train_loader, val_loader, train_eval_loader = config.train_loader, config.val_loader, config.train_eval_loader
    accumulation_steps = int(config.get("accumulation_steps", 1))
    save_every_iters = int(config.get("save_every_iters", 1000))
    if save_every_iters % accumulation_steps:
        raise UserError(f"config {config_path}: save_every_iters={save_every_iters} must be a multiple of "
                        f"accumulation_steps={accumulation_steps} so checkpoints never split an accumulated step")

    sync_bn = bool(config.get("sync_bn", False))
    if sync_bn and device.type == "cpu" and idist.get_world_size() > 1:
        # torch's SyncBatchNorm raises on CPU tensors at the first training step.
        logger.warning("sync_bn=True ignored: SyncBatchNorm needs GPUs; each CPU process keeps its own BatchNorm "
                       "statistics (rank 0's are the ones evaluated and saved)")
        sync_bn = False
    model = idist.auto_model(config.model, sync_bn=sync_bn)
    if device.type == "cpu" and idist.get_world_size() == 1:
        model = model.to(device)
    optimizer, lr_scheduler, criterion = config.optimizer, config.lr_scheduler, config.criterion.to(device)

    amp = config.get("amp", "auto")
    trainer = create_trainer(model, optimizer, criterion, lr_scheduler, train_loader.sampler, device=device,
                             seed=seed, amp=amp, accumulation_steps=accumulation_steps)
    num_classes = int(config.get("num_classes", 21))
    evaluator = create_evaluator(model, device=device, amp=amp, num_classes=num_classes)
    train_evaluator = create_evaluator(model, device=device, amp=amp, num_classes=num_classes)
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, _capture_grid)

    logger.info("vocseg %s | torch %s | torchvision %s | ignite %s | python %s", __import__("vocseg").__version__,
                torch.__version__, torchvision.__version__, ignite.__version__, platform.python_version())
    logger.info("device %s | world size %d | amp %s | config %s", device, idist.get_world_size(), amp, config_path)
    logger.info("train images %d (%d iterations/epoch/process) | val images %d | train-eval images %d",
                len(train_loader.dataset), len(train_loader), len(val_loader.dataset), len(train_eval_loader.sampler) *
                idist.get_world_size() if train_eval_loader is not None else 0)
    logger.info("output folder %s", output_dir)

    to_save = {"trainer": trainer, "model": model, "optimizer": optimizer, "lr_scheduler": lr_scheduler,
               "scaler": trainer.scaler}
    checkpointer = training_checkpointer(to_save, output_dir / "checkpoints")

    def save_checkpoint(engine):
        if engine.state.nan_iteration is None:  # never persist weights that a NaN step already ruined
            checkpointer(engine)

    trainer.add_event_handler(Events.ITERATION_COMPLETED(every=save_every_iters) | Events.COMPLETED, save_checkpoint)

    best = best_model_checkpointer(model, output_dir / "best", trainer)
    evaluator.add_event_handler(Events.COMPLETED, best)

    es_patience = config.get("es_patience")
    if es_patience:
        evaluator.add_event_handler(Events.COMPLETED, EarlyStopping(
            int(es_patience), score_function=lambda e: e.state.metrics["mIoU"], trainer=trainer))

    timer = Timer(average=True)
    timer.attach(trainer, start=Events.EPOCH_STARTED, resume=Events.ITERATION_STARTED,
                 pause=Events.ITERATION_COMPLETED, step=Events.ITERATION_COMPLETED)

    # When training really starts and stops, in the log (benchmarks/startup_exit.py measures from them).
    first_logged = []

    @trainer.on(Events.ITERATION_STARTED)
    def _log_first_iteration(engine):
        if not first_logged:
            first_logged.append(True)
            logger.info("first iteration %d started", engine.state.iteration)

    @trainer.on(Events.ITERATION_COMPLETED(
        event_filter=lambda engine, i: i == engine.state.max_epochs * engine.state.epoch_length))
    def _log_last_iteration(engine):
        logger.info("last iteration %d completed", engine.state.iteration)

    num_epochs = int(config.num_epochs)
    val_interval = int(config.get("val_interval", 1))
    results = {}

    def write_metrics(extra=None):
        if rank == 0:
            best_path = best.last_checkpoint and str(output_dir / "best" / best.last_checkpoint)
            tracking.write_json(output_dir / "metrics.json", {
                **results, "epoch": trainer.state.epoch, "iteration": trainer.state.iteration,
                "best_model": best_path, "output_dir": str(output_dir), **(extra or {})})

    @trainer.on(Events.EPOCH_COMPLETED)
    def validate(engine):
        epoch = engine.state.epoch
        if epoch % val_interval and epoch != num_epochs:
            return
        logger.info("epoch %d: %.3f s/iteration", epoch, timer.value())
        for tag, ev, loader in (("train_eval", train_evaluator, train_eval_loader), ("val", evaluator, val_loader)):
            if loader is None:
                continue
            ev.run(loader)
            results[tag] = scalar_metrics(ev.state.metrics)
            results[tag]["IoU"] = [float(v) for v in ev.state.metrics["IoU"]]
            logger.info("epoch %d %s: %s", epoch, tag,
                        " ".join(f"{k}={v:.4f}" for k, v in results[tag].items() if k != "IoU"))
        if idist.get_world_size() > 1:
            # Exact values from every rank: they must agree, as the confusion matrices are summed over ranks.
            logger.info("epoch %d rank %d/%d: %s", epoch, rank, idist.get_world_size(),
                        " ".join(f"{tag}_mIoU={m['mIoU']!r}" for tag, m in results.items()), extra=ALL_RANKS)
        write_metrics()

    if rank == 0:
        if sys.stderr.isatty():
            ProgressBar(persist=False).attach(trainer, output_transform=lambda o: {"loss": float(o["batch_loss"])})
        else:  # logs and CI get plain lines instead of carriage-return redraws
            log_every = int(config.get("log_every_iters", 10))

            @trainer.on(Events.ITERATION_COMPLETED(every=log_every))
            def _log_loss(engine):
                logger.info("epoch %d iteration %d loss %.4f lr %s", engine.state.epoch, engine.state.iteration,
                            float(engine.state.output["batch_loss"]),
                            " ".join(f"{g['lr']:.3g}" for g in optimizer.param_groups))

        tracking.copy_sources(output_dir, config_path, script_path)
        tb = tracking.setup_tensorboard(output_dir, trainer, optimizer, {"train_eval": train_evaluator,
                                                                           "val": evaluator},
                                        int(config.get("log_every_iters", 10)))
    tracker = tracker_factory(config=config, output_dir=output_dir, trainer=trainer, evaluators={
        "train_eval": train_evaluator, "val": evaluator}, optimizer=optimizer, model=model, best=best,
        logger=logger) if tracker_factory else None

    resume_from = config.get("resume_from")
    if resume_from:
        resume(to_save, resume_from)
        logger.info("resumed from %s at iteration %d (epoch %d)", resume_from, trainer.state.iteration,
                    trainer.state.epoch)

    try:
        trainer.run(train_loader, max_epochs=num_epochs)
    finally:
        if rank == 0:
            tb.close()
        if tracker is not None:
            tracker.close()

    if trainer.state.nan_iteration is not None:
        good = checkpointer.last_checkpoint
        raise UserError(
            f"loss became NaN at iteration {trainer.state.nan_iteration}; training stopped. Last good checkpoint: "
            f"{output_dir / 'checkpoints' / good if good else 'none yet'}. Lower the learning rate or check the data")
    write_metrics({"completed": True})
    logger.info("done: metrics in %s", output_dir / "metrics.json")
    return {**results, "output_dir": str(output_dir)}


def launch(config, one_rank) -> None:
    """Runs ``one_rank(config_path, script_path)`` in every process however they were started (python,
    torchrun, torch.distributed.launch); bad input ends the run with one line and a non-zero exit."""
    from vocseg.errors import exit_with

    given = config.__dict__["__internal_config_object_data_dict__"]  # the paths, without loading the config
    config_path, script_path = Path(given["config_filepath"]), given.get("script_filepath")
    try:
        with parallel_context(config_path) as parallel:
            parallel.run(lambda local_rank: one_rank(config_path, script_path))
    except UserError as exc:
        exit_with(exc)


def run(config, **kwargs) -> None:
    """py_config_runner entry point of code/scripts/training.py."""

    def one_rank(config_path, script_path):
        from vocseg import clearml_tracking

        # ClearML first: the task may enqueue itself, or carry a clone's edited hyperparameters.
        tracked = clearml_tracking.prepare(config_path, script_path) if clearml_tracking.enabled() else {}
        train(config_path, script_path, **{**kwargs, **tracked})

    launch(config, one_rank)
