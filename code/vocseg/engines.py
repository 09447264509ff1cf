"""Ignite engines: the training step (AMP, accumulation, per-step LR) and the evaluators."""

import functools
import math
from contextlib import nullcontext
from typing import Sequence

import ignite.distributed as idist
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events

from vocseg.metrics import segmentation_metrics
from vocseg.transforms import MEAN, STD


@functools.lru_cache(maxsize=None)
def _mean_std(device: torch.device):
    # Built once per device: on a GPU each fresh tensor would be another host-to-device copy per batch.
    return (torch.tensor(MEAN, device=device).view(1, 3, 1, 1), torch.tensor(STD, device=device).view(1, 3, 1, 1))


def prepare_batch(batch, device, non_blocking: bool = True):
    """uint8 NCHW images -> normalised float on the device; masks -> int64 with 255 kept."""
    images = batch["image"].to(device, non_blocking=non_blocking).float()
    mean, std = _mean_std(torch.device(device))
    images = (images - mean) / std
    masks = batch["mask"].to(device, non_blocking=non_blocking).long()
    return images, masks


def amp_settings(device: torch.device, amp: str):
    """``amp`` in {"off", "fp16", "bf16", "auto"}: mixed precision exists here only on CUDA."""
    if device.type != "cuda" or amp in ("off", None, False):
        return None
    if amp == "auto":
        amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[amp]


def autocast(device: torch.device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def iteration_seed(seed: int, iteration: int) -> int:
    return (seed * 1_000_003 + iteration) % (2**63 - 1)


def create_trainer(model, optimizer, criterion, lr_scheduler, train_sampler, *, device, seed: int,
                   amp: str = "auto", accumulation_steps: int = 1) -> Engine:
    dtype = amp_settings(device, amp)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def step(engine: Engine, batch):
        model.train()
        images, masks = prepare_batch(batch, device)
        with autocast(device, dtype):
            outputs = model(images)
            loss = criterion(outputs, masks)
        scaler.scale(loss / accumulation_steps).backward()
        if engine.state.iteration % accumulation_steps == 0:
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            lr_scheduler.step()
        return {"batch_loss": loss.detach()}

    trainer = Engine(step)
    trainer.scaler = scaler

    @trainer.on(Events.EPOCH_STARTED)
    def _position_sampler(engine: Engine) -> None:
        # The iterator of this epoch is created after this handler: a resumed run skips exactly the
        # batches it already trained on, and every epoch gets its own seeded order.
        train_sampler.set_epoch(engine.state.epoch - 1)
        train_sampler.skip_batches = engine.state.iteration % engine.state.epoch_length

    @trainer.on(Events.ITERATION_STARTED)
    def _seed_iteration(engine: Engine) -> None:
        # Dropout and any other in-model randomness depend on the iteration only, so an interrupted and
        # resumed run draws the same numbers as an uninterrupted one.
        torch.manual_seed(iteration_seed(seed, engine.state.iteration))

    @trainer.on(Events.ITERATION_COMPLETED)
    def _stop_on_nan(engine: Engine) -> None:
        loss = engine.state.output["batch_loss"]
        if idist.get_world_size() > 1:
            # One rank's NaN reaches every rank's weights through the gradient all-reduce: all ranks must
            # stop at that step, or rank 0 would go on to checkpoint the ruined weights.
            loss = idist.all_reduce(loss.clone())
        if not math.isfinite(float(loss)):
            engine.state.nan_iteration = engine.state.iteration
            engine.terminate()

    trainer.state.nan_iteration = None
    return trainer


@torch.no_grad()
def predict(model, images: torch.Tensor, flip: bool = False, scales: Sequence[float] = (1.0,)) -> torch.Tensor:
    """Class scores at the input resolution, averaged over optional flips and scales."""
    height, width = images.shape[-2:]
    total = 0
    for scale in scales:
        x = images if scale == 1.0 else F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=False)
        variants = [x, x.flip(-1)] if flip else [x]
        for i, v in enumerate(variants):
            out = model(v)
            out = out["out"] if isinstance(out, dict) else out
            if i == 1:
                out = out.flip(-1)
            if out.shape[-2:] != (height, width):
                out = F.interpolate(out, size=(height, width), mode="bilinear", align_corners=False)
            total = total + out.float().softmax(1)
    return total / (len(scales) * (2 if flip else 1))


def create_evaluator(model, *, device, amp: str = "auto", flip: bool = False, scales: Sequence[float] = (1.0,),
                     num_classes: int = 21) -> Engine:
    dtype = amp_settings(device, amp)
    # Shards of unequal length must not meet a collective inside DDP's forward: evaluate the bare module.
    net = getattr(model, "module", model)

    def step(engine: Engine, batch):
        net.eval()
        images, masks = prepare_batch(batch, device)
        with autocast(device, dtype):
            scores = predict(net, images, flip=flip, scales=scales)
        return {"y_pred": scores, "y": masks}

    evaluator = Engine(step)

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
