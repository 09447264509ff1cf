"""Precision across a run's life: resuming under another precision (CPU <-> bf16 <-> fp16, as a task re-enqueued
on another agent does), and what the NaN guard does when fp16's GradScaler skips a step."""

import logging

import pytest
import torch

from vocseg.engine.checkpoints import resume
from vocseg.engine.steps import FP16_NONFINITE_STREAK, create_trainer

# What each precision's training checkpoint holds: fp32 weights and optimiser whatever the precision; the
# GradScaler's state only under fp16 (a disabled scaler saves an empty dict).
PRECISIONS = {"cpu fp32": False, "bf16": False, "fp16": True}


def parts(seed: int, fp16: bool, learnt: bool = False):
    torch.manual_seed(seed)
    model = torch.nn.Conv2d(3, 4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 4, 4)).sum().backward()
    optimizer.step()  # a momentum buffer to carry
    scaler = torch.amp.GradScaler("cpu", enabled=fp16)
    if fp16 and learnt:
        scaler.scale(torch.ones(()))
        scaler.update(1024.0)  # a scale the run has learnt
    return {"model": model, "optimizer": optimizer, "scaler": scaler}


def checkpoint_of(precision: str) -> dict:
    saved = parts(1, PRECISIONS[precision], learnt=True)
    return {name: obj.state_dict() for name, obj in saved.items()}


@pytest.mark.parametrize("written", PRECISIONS)
@pytest.mark.parametrize("resumed", PRECISIONS)
def test_resume_continues_under_any_precision(tmp_path, caplog, written, resumed):
    path = tmp_path / "training_checkpoint_8.pt"
    torch.save(checkpoint_of(written), path)
    target = parts(2, PRECISIONS[resumed])
    with caplog.at_level(logging.INFO, logger="vocseg"):
        resume(target, path)
    saved = torch.load(path, weights_only=True)
    for key, value in saved["model"].items():
        assert torch.equal(target["model"].state_dict()[key], value)
    assert (
        target["optimizer"]
        .state_dict()["state"][0]["momentum_buffer"]
        .equal(saved["optimizer"]["state"][0]["momentum_buffer"])
    )
    lines = [r.getMessage() for r in caplog.records]
    if PRECISIONS[resumed] and not PRECISIONS[written]:
        assert any("this run is fp16: its loss scale starts afresh at 65536" in line for line in lines)
        assert target["scaler"].get_scale() == 65536.0
    elif PRECISIONS[written] and not PRECISIONS[resumed]:
        assert any(
            "was written under fp16; this run is not: its loss scale (1024) is not needed" in line for line in lines
        )
    elif PRECISIONS[written]:
        assert target["scaler"].get_scale() == 1024.0 and not lines  # fp16 to fp16 carries the scale silently
    else:
        assert not lines


def trainer_with(losses, amp_dtype=torch.float16):
    """A trainer whose loss is ``losses[iteration - 1]`` (inf stands for an fp16 overflow)."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(1, 1)

        def forward(self, images):
            return self.linear(images.mean(dim=(1, 2, 3))[:, None])

    class Sampler:
        def set_epoch(self, _):
            pass

        def resume_at(self, _):
            pass

    def criterion(out, _masks):
        return out.sum() * 0 + float(losses.pop(0))

    net = Net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    return create_trainer(
        net,
        optimizer,
        criterion,
        schedule,
        Sampler(),
        device=torch.device("cpu"),
        seed=0,
        amp_dtype=amp_dtype,
        check_every=(5,),
    )


BATCH = {"image": torch.zeros((2, 3, 2, 2), dtype=torch.uint8), "mask": torch.zeros((2, 2, 2), dtype=torch.uint8)}


def test_fp16_overflows_that_the_scaler_skips_do_not_stop_a_run(caplog):
    losses = [1.0, float("inf"), float("inf"), 1.0] + [1.0] * 6
    trainer = trainer_with(losses)
    with caplog.at_level(logging.WARNING, logger="vocseg"):
        trainer.run([BATCH] * 10, max_epochs=1)
    assert trainer.state.nan_iteration is None and trainer.state.iteration == 10
    assert "fp16: 2 iteration(s) with an overflowing loss up to iteration 5" in caplog.text


def test_fp16_stops_a_run_whose_loss_stays_non_finite():
    losses = [1.0] + [float("nan")] * (FP16_NONFINITE_STREAK + 5)
    trainer = trainer_with(losses)
    trainer.run([BATCH] * (FP16_NONFINITE_STREAK + 6), max_epochs=1)
    assert trainer.state.nan_iteration == 2  # the first of the streak


def test_in_fp32_the_first_non_finite_loss_stops_the_run():
    trainer = trainer_with([1.0, float("inf")] + [1.0] * 8, amp_dtype=None)
    trainer.run([BATCH] * 10, max_epochs=1)
    assert trainer.state.nan_iteration == 2
