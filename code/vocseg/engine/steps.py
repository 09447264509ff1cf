"""Ignite engines: ``train_step`` (the loss, AMP, accumulation, the optimiser and per-step LR) and the evaluators."""

import logging
from collections.abc import Sequence
from contextlib import nullcontext

import ignite.distributed as idist
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from torchvision.models.segmentation._utils import _SimpleSegmentationModel

from vocseg.data.normalize import normalize
from vocseg.engine.metrics import segmentation_metrics
from vocseg.errors import UserError


def prepare_batch(batch, device, non_blocking: bool = True, channels_last: bool = False):
    """uint8 NCHW images -> normalised float on the device; masks -> int64 with 255 kept."""
    images = normalize(batch["image"].to(device, non_blocking=non_blocking).float())
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    masks = batch["mask"].to(device, non_blocking=non_blocking).long()
    return images, masks


def autocast(device: torch.device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def iteration_seed(seed: int, iteration: int, rank: int = 0) -> int:
    # Every rank draws its own dropout masks; rank 0 keeps the single-process numbers.
    return (seed * 1_000_003 + iteration + rank * 2**40) % (2**63 - 1)


NO_NONFINITE = 2**62  # the on-device record's "no non-finite loss so far"
# Under fp16 a non-finite loss is an overflow that GradScaler answers by skipping the update (the weights stay
# as they were) and halving its scale: a skipped step, not a broken run. The run stops when the loss stays
# non-finite this many iterations in a row, which no rescaling has cured. In fp32 and bf16 the first one stops it.
FP16_NONFINITE_STREAK = 20


def create_trainer(
    model,
    optimizer,
    criterion,
    lr_scheduler,
    train_sampler,
    *,
    device,
    seed: int,
    amp_dtype=None,
    accumulation_steps: int = 1,
    channels_last: bool = False,
    compile_model=False,
    check_every: Sequence[int] = (),
) -> Engine:
    """The training step. ``amp_dtype`` comes from the device plan (vocseg.runtime.device_plan); ``compile_model``
    (True or torch.compile keywords) compiles the training forward only; ``check_every``: the iteration periods
    (logging, checkpoints) at which a non-finite loss is looked for, before anything registered later runs."""
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    net = model
    if compile_model:
        net = torch.compile(model, **(compile_model if isinstance(compile_model, dict) else {}))
    step = train_step(
        model,
        net,
        optimizer,
        criterion,
        lr_scheduler,
        scaler,
        device=device,
        amp_dtype=amp_dtype,
        accumulation_steps=accumulation_steps,
        channels_last=channels_last,
    )
    trainer = Engine(step)
    trainer.scaler = scaler
    trainer.state.nan_iteration = None
    trainer.add_event_handler(Events.STARTED, _no_nonfinite_yet, device)
    trainer.state.nonfinite_limit = FP16_NONFINITE_STREAK if scaler.is_enabled() else 1
    trainer.add_event_handler(Events.EPOCH_STARTED, _position_sampler, train_sampler)
    trainer.add_event_handler(Events.ITERATION_STARTED, _seed_iteration, seed, idist.get_rank())
    _attach_nonfinite_check(trainer, check_every)
    return trainer


def train_step(
    model, net, optimizer, criterion, lr_scheduler, scaler, *, device, amp_dtype, accumulation_steps, channels_last
):
    """Ignite's process function: forward and backward through ``net`` (``model``, compiled or not), the update
    every ``accumulation_steps`` iterations."""

    def step(engine: Engine, batch):
        model.train()
        images, masks = prepare_batch(batch, device, channels_last=channels_last)
        update = engine.state.iteration % accumulation_steps == 0
        # Under DDP, gradients are all-reduced only on the step that updates the weights.
        no_sync = model.no_sync() if not update and hasattr(model, "no_sync") else nullcontext()
        with no_sync:
            with autocast(device, amp_dtype):
                loss = criterion(net(images), masks)
            scaler.scale(loss / accumulation_steps).backward()
        if update:
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            lr_scheduler.step()
        loss = loss.detach()
        _record_nonfinite(engine.state, loss, engine.state.iteration)
        return {"batch_loss": loss}

    return step


def _no_nonfinite_yet(engine: Engine, device) -> None:
    engine.state.first_nonfinite = torch.tensor(NO_NONFINITE, device=device)
    engine.state.nonfinite_streak = torch.tensor(0, device=device)
    engine.state.skipped_steps = torch.tensor(0, device=device)


def _position_sampler(engine: Engine, train_sampler) -> None:
    # The iterator of this epoch is created after this handler: a resumed run skips exactly the
    # batches it already trained on, and every epoch gets its own seeded order.
    train_sampler.set_epoch(engine.state.epoch - 1)
    done = engine.state.iteration % engine.state.epoch_length
    resume_at = getattr(train_sampler, "resume_at", None)
    if resume_at is not None:
        resume_at(done)
    elif done:
        # Without it the resumed epoch would train again on batches it already trained on, unnoticed.
        raise UserError(
            f"the config's train_loader has a sampler ({type(train_sampler).__name__}) without resume_at(batches), "
            f"which resuming in the middle of an epoch needs: build train_loader with vocseg.dataflow's "
            f"get_dataloaders (its SeededShuffleSampler), or give the sampler resume_at"
        )


def _seed_iteration(engine: Engine, seed: int, rank: int) -> None:
    # Dropout and any other in-model randomness depend on the iteration and rank only, so an interrupted
    # and resumed run draws the same numbers as an uninterrupted one.
    torch.manual_seed(iteration_seed(seed, engine.state.iteration, rank))


def _record_nonfinite(state, loss: torch.Tensor, iteration: int) -> None:
    # On the device: the step never waits for the GPU; the record is read at the check boundaries only.
    bad = ~torch.isfinite(loss)
    limit = getattr(state, "nonfinite_limit", 1)
    state.nonfinite_streak = torch.where(bad, state.nonfinite_streak + 1, torch.zeros_like(state.nonfinite_streak))
    state.skipped_steps = state.skipped_steps + bad.long()
    first = state.first_nonfinite
    state.first_nonfinite = torch.where(
        (state.nonfinite_streak >= limit) & (first == NO_NONFINITE),
        torch.full_like(first, iteration - limit + 1),
        first,
    )


def _attach_nonfinite_check(trainer: Engine, check_every: Sequence[int]) -> None:
    periods = [int(n) for n in check_every if n]

    def boundary(engine, iteration):
        return iteration % engine.state.epoch_length == 0 or any(iteration % n == 0 for n in periods)

    # COMPLETED too: a run stopped between boundaries (a preemption signal) saves a checkpoint then.
    @trainer.on(Events.ITERATION_COMPLETED(event_filter=boundary) | Events.COMPLETED)
    def _stop_on_nonfinite(engine: Engine) -> None:
        first = engine.state.first_nonfinite
        if idist.get_world_size() > 1:
            # One rank's NaN reaches every rank's weights through the gradient all-reduce: all ranks must
            # stop together, or rank 0 would go on to checkpoint the ruined weights.
            first = idist.all_reduce(first.clone(), op="MIN")
        first = int(first)  # the one host sync, at a boundary
        skipped = int(engine.state.skipped_steps)
        if skipped and engine.state.nonfinite_limit > 1 and first == NO_NONFINITE:
            logging.getLogger("vocseg").warning(
                "fp16: %d iteration(s) with an overflowing loss up to iteration %d; GradScaler skipped their "
                "updates and lowered its scale (a run stops after %d in a row)",
                skipped,
                engine.state.iteration,
                engine.state.nonfinite_limit,
            )
            engine.state.skipped_steps.zero_()
        if first != NO_NONFINITE:
            engine.state.nan_iteration = first
            engine.terminate()


def main_scores(model, images: torch.Tensor) -> torch.Tensor:
    """The main head's class scores at the input size: the auxiliary head (a training loss) is not computed."""
    if isinstance(model, _SimpleSegmentationModel) and model.aux_classifier is not None:
        out = model.classifier(model.backbone(images)["out"])
        return F.interpolate(out, size=images.shape[-2:], mode="bilinear", align_corners=False)
    out = model(images)
    return out["out"] if isinstance(out, dict) else out


@torch.no_grad()
def predict(model, images: torch.Tensor, flip: bool = False, scales: Sequence[float] = (1.0,)) -> torch.Tensor:
    """Class scores at the input resolution, averaged over optional flips and scales."""
    height, width = images.shape[-2:]
    total = 0
    for scale in scales:
        x = images if scale == 1.0 else F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=False)
        variants = [x, x.flip(-1)] if flip else [x]
        for i, v in enumerate(variants):
            out = main_scores(model, v)
            if i == 1:
                out = out.flip(-1)
            if out.shape[-2:] != (height, width):
                out = F.interpolate(out, size=(height, width), mode="bilinear", align_corners=False)
            total = total + out.float().softmax(1)
    return total / (len(scales) * (2 if flip else 1))


EMPTY_BATCH = {
    "image": torch.zeros((0, 3, 1, 1), dtype=torch.uint8),
    "mask": torch.zeros((0, 1, 1), dtype=torch.uint8),
    "index": [],
    "id": [],
    "size": torch.zeros((0, 2), dtype=torch.long),
}


class ShardEvaluator(Engine):
    """An evaluator that also runs on a process whose shard holds no batch (fewer batches than processes).

    Such a process still has to take part in every collective of the run (rank 0's BatchNorm buffers at the
    start, the metrics' all-reduce at the end), so it scores one batch of zero images: its confusion matrix
    stays zero and the reduced scores are those of the images the other processes scored.
    """

    def run(self, data=None, *args, **kwargs):
        if data is not None and not args and not kwargs and hasattr(data, "__len__") and len(data) == 0:
            data = [EMPTY_BATCH]
        return super().run(data, *args, **kwargs)


def create_evaluator(
    model,
    *,
    device,
    amp_dtype=None,
    flip: bool = False,
    scales: Sequence[float] = (1.0,),
    num_classes: int = 21,
    channels_last: bool = False,
) -> Engine:
    # Shards of unequal length must not meet a collective inside DDP's forward: evaluate the bare module.
    net = getattr(model, "module", model)

    def step(engine: Engine, batch):
        net.eval()
        images, masks = prepare_batch(batch, device, channels_last=channels_last)
        if not len(images):  # the stand-in batch of a process without any (ShardEvaluator)
            return {"y_pred": images.new_zeros((0, num_classes, *masks.shape[-2:])), "y": masks}
        with autocast(device, amp_dtype):
            scores = predict(net, images, flip=flip, scales=scales)
        return {"y_pred": scores, "y": masks}

    evaluator = ShardEvaluator(step)

    benchmark = []

    @evaluator.on(Events.STARTED)
    def _no_cudnn_autotuning(_):
        # Full-resolution images come in many sizes: autotuning every new shape would cost more than it saves.
        benchmark.append(torch.backends.cudnn.benchmark)
        torch.backends.cudnn.benchmark = False

    @evaluator.on(Events.COMPLETED | Events.TERMINATE)
    def _restore_cudnn_autotuning(_):
        if benchmark:
            torch.backends.cudnn.benchmark = benchmark.pop()

    @evaluator.on(Events.EXCEPTION_RAISED)
    def _restore_and_reraise(engine, exc):
        # Ignite raises no further once an EXCEPTION_RAISED handler exists: raise it again, or a failed
        # validation would pass as one without metrics.
        _restore_cudnn_autotuning(engine)
        raise exc

    @evaluator.on(Events.STARTED)
    def _rank0_buffers(_):
        # Without SyncBatchNorm every DDP rank updates the BatchNorm running statistics from its own batches
        # (DDP re-broadcasts rank 0's only at the next training forward). Scoring shards with them would
        # measure a model that no checkpoint holds: evaluate rank 0's, which are the ones saved.
        if idist.get_world_size() > 1:
            for buffer in net.buffers():
                buffer.copy_(idist.broadcast(buffer, src=0))

    for name, metric in segmentation_metrics(num_classes, lambda o: (o["y_pred"], o["y"])).items():
        metric.attach(evaluator, name)
    return evaluator
