"""The preflight (``CONFIG_OVERRIDES="preflight=True"``): the real config, launcher, data and model for a few
training iterations, one checkpoint written and read back, and a validation over a few batches on every rank;
then one summary line with the projected wall time of the run, and exit 0.

Everything it writes goes to a temporary folder that is removed at the end: it takes no run folder (nor its
lock), starts no ClearML task and leaves no checkpoint, so it can run next to the real run or before it.
"""

import logging
import math
import tempfile
import time
from pathlib import Path

import ignite.distributed as idist
from ignite.engine import Events

from vocseg.config import check_trainval
from vocseg.engine.checkpoints import check_model_state, load_file, training_checkpointer
from vocseg.engine.prepare import prepare
from vocseg.engine.train import TRAIN_LOADERS, Run, _build
from vocseg.runtime import device_plan

log = logging.getLogger("vocseg")

WARMUP = 2  # iterations not timed: the first ones start the loader's workers and warm up kernels and allocators
TIMED = 5
VAL_BATCHES = 3
FREE_MARGIN = 0.10  # below this share of a GPU left free, the summary warns


def preflight(config_path, mutations=None) -> dict:
    """Times one training process's work (every rank runs it) and prints the summary on rank 0. Returns it."""
    with tempfile.TemporaryDirectory(prefix="vocseg-preflight-") as scratch:
        config, seed, output_dir, _logger = prepare(
            config_path, mutations, "preflight", TRAIN_LOADERS, check_trainval, output_dir=Path(scratch)
        )
        run = _build(config, config_path, seed, output_dir)
        times = {"iteration": _time_iterations(run)}
        times.update(_time_checkpoint(run, Path(scratch) / "checkpoints"))
        times["validation"] = {
            tag: _time_validation(evaluator, run.loaders[tag], run.plan)
            for tag, evaluator in run.evaluators.items()
            if run.loaders[tag] is not None
        }
        times["loader"] = _loader_images_per_s(run.train_loader)
        summary = _summary(run, times)
    if idist.get_rank() == 0:
        print(summary["line"], flush=True)
        log.info("%s", summary["line"])
    return summary


def _time_iterations(run: Run) -> float:
    """Seconds per training iteration (a micro-batch, data loading included) after the warm-up, the slowest
    rank's: the ranks wait for each other at every optimiser step."""
    count = WARMUP + TIMED
    stamps = []

    def stamp(_):
        # CUDA runs the step's kernels after the step returns: wait for them, or the queue runs ahead of the clock.
        device_plan.synchronize(run.plan)
        stamps.append(time.perf_counter())

    run.trainer.add_event_handler(Events.ITERATION_COMPLETED, stamp)
    run.trainer.add_event_handler(Events.ITERATION_COMPLETED(once=count), lambda engine: engine.terminate())
    per_epoch = len(run.train_loader)
    run.trainer.run(run.train_loader, max_epochs=math.ceil(count / per_epoch))
    if run.trainer.state.nan_iteration is not None:
        log.warning("preflight: the loss became NaN at iteration %d", run.trainer.state.nan_iteration)
    seconds = (stamps[-1] - stamps[WARMUP - 1]) / (len(stamps) - WARMUP)
    return _slowest(seconds)


def _time_checkpoint(run: Run, folder: Path) -> dict:
    """One training checkpoint written (rank 0, as in a run) and read back, with its size."""
    checkpointer = training_checkpointer(run.to_save, folder)
    device_plan.synchronize(run.plan)  # the last step's leftover work is not the checkpoint's
    started = time.perf_counter()
    checkpointer(run.trainer)
    written = time.perf_counter() - started
    size, read = 0, 0.0
    if idist.get_rank() == 0:
        path = folder / checkpointer.last_checkpoint
        size = path.stat().st_size
        started = time.perf_counter()
        state = load_file(path, "preflight checkpoint", "the preflight")
        check_model_state(run.model, state["model"], path)
        read = time.perf_counter() - started
    return {"checkpoint_write": _slowest(written), "checkpoint_read": read, "checkpoint_bytes": size}


def _time_validation(evaluator, loader, plan) -> float:
    """Seconds one full pass over ``loader`` would take, from the first few batches (its start included)."""
    batches = len(loader)
    device_plan.synchronize(plan)
    started = time.perf_counter()
    if batches <= VAL_BATCHES:
        evaluator.run(loader)
    else:
        evaluator.run(loader, epoch_length=VAL_BATCHES)
    device_plan.synchronize(plan)
    seconds = (time.perf_counter() - started) * max(1, batches) / max(1, min(batches, VAL_BATCHES))
    return _slowest(seconds)


def _loader_images_per_s(loader) -> float:
    """Training images per second that this process's loader delivers alone (its workers' start excluded)."""
    batches = iter(loader)
    next(batches)
    images, started = 0, time.perf_counter()
    for _, batch in zip(range(TIMED), batches):
        images += len(batch["image"])
    seconds = time.perf_counter() - started
    return images / seconds if images else float("nan")


def _slowest(seconds: float) -> float:
    return float(idist.all_reduce(float(seconds), op="MAX")) if idist.get_world_size() > 1 else seconds


def _peak_memory(plan) -> list:
    """Each process's peak memory: on a GPU the peak reserved by torch's allocator (what running out of memory
    is measured against; the CUDA context and NCCL's buffers come on top), with the device's total; on the CPU
    the peak resident memory."""
    peak = device_plan.peak_memory(plan)
    if idist.get_world_size() == 1:
        return [(peak["reserved"], peak["total"] or 0.0)]
    reserved, totals = idist.all_gather(float(peak["reserved"])), idist.all_gather(float(peak["total"] or 0.0))
    return [(float(p), float(t)) for p, t in zip(reserved, totals)]


def _memory(peaks: list, on_gpu: bool) -> tuple[str, str]:
    """The summary's memory part, and its warning when a GPU would be left with under 10% free."""
    if not on_gpu:
        return "peak memory per process (peak RSS) " + ", ".join(f"{p / 2**30:.2f} GiB" for p, _ in peaks), ""
    text = "peak GPU memory per process (reserved of total) " + ", ".join(
        f"{p / 2**30:.2f} of {t / 2**30:.1f} GiB" for p, t in peaks
    )
    tight = [i for i, (p, t) in enumerate(peaks) if t and t - p < FREE_MARGIN * t]
    warning = ""
    if tight:
        warning = (
            f" | WARNING: rank(s) {', '.join(map(str, tight))} would leave under {FREE_MARGIN:.0%} of the GPU free"
            " (the CUDA context and NCCL need some): lower batch_size and raise accumulation_steps"
        )
    return text, warning


def _validations(num_epochs: int, val_interval: int) -> int:
    return sum(1 for epoch in range(1, num_epochs + 1) if epoch % val_interval == 0 or epoch == num_epochs)


def _summary(run: Run, times: dict) -> dict:
    """The projection: every iteration at the measured pace, every validation and checkpoint at theirs."""
    iterations = run.num_epochs * len(run.train_loader)
    validations = _validations(run.num_epochs, run.val_interval)
    validation = sum(times["validation"].values())
    checkpoints = iterations // run.save_every_iters + 1
    total = iterations * times["iteration"] + validations * validation + checkpoints * times["checkpoint_write"]
    peaks = _peak_memory(run.plan)
    memory, warning = _memory(peaks, run.device.type == "cuda")
    parts = " + ".join(f"{tag} {_duration(s)}" for tag, s in times["validation"].items())
    line = (
        f"preflight: {run.config.get('config_filepath')} | {idist.get_world_size()} process(es) on {run.device.type}"
        f" | {times['iteration']:.3f} s/iteration ({TIMED} timed after {WARMUP} warm-up)"
        f" | {memory}"
        f" | loader {times['loader']:.0f} images/s per process"
        f" | checkpoint {times['checkpoint_bytes'] / 2**20:.0f} MiB written in {times['checkpoint_write']:.2f} s,"
        f" read back in {times['checkpoint_read']:.2f} s"
        f" | each validation ~{_duration(validation)} ({parts}) x {validations}"
        f" | projected run {_duration(total)} ({iterations} iterations, {run.num_epochs} epochs)"
        " | nothing written to the run folder"
        f"{warning}"
    )
    return {
        **times,
        "peak_memory_bytes": [p for p, _ in peaks],
        "device_memory_bytes": [t for _, t in peaks],
        "iterations": iterations,
        "validations": validations,
        "projected_validation_s": validation,
        "projected_total_s": total,
        "line": line,
    }


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
