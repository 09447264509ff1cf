"""The training step and evaluators on CPU: deferred NaN checks, no_sync, aux head skipped, compile, switches."""

import contextlib

import pytest
import torch
from ignite.engine import Events
from torch import nn

from vocseg.dataflow import SeededShuffleSampler, get_dataloaders
from vocseg.engine import steps as engines
from vocseg.engine import train as training
from vocseg.engine.metrics import CLASS_IOU, SCALAR_METRICS, scalar_metrics
from vocseg.engine.steps import NO_NONFINITE, create_evaluator, create_trainer, iteration_seed, prepare_batch
from vocseg.errors import UserError
from vocseg.losses import DeepLabLoss
from vocseg.models import deeplabv3


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 21, 3, padding=1)

    def forward(self, x):
        return {"out": self.conv(x)}


class Sampler:
    def set_epoch(self, epoch):
        pass


def batches(n, size=16):
    g = torch.Generator().manual_seed(0)
    return [
        {
            "image": torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8, generator=g),
            "mask": torch.randint(0, 21, (2, size, size), dtype=torch.uint8, generator=g),
        }
        for _ in range(n)
    ]


def trainer_for(model, **kwargs):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return create_trainer(
        model, optimizer, DeepLabLoss(), scheduler, Sampler(), device=torch.device("cpu"), seed=1, **kwargs
    )


class NaNFrom(nn.Module):
    def __init__(self, loss, start):
        super().__init__()
        self.loss, self.start, self.calls = loss, start, 0

    def forward(self, outputs, target):
        self.calls += 1
        return self.loss(outputs, target) * (float("nan") if self.calls >= self.start else 1.0)


def test_nonfinite_loss_is_found_at_the_next_boundary_with_its_exact_iteration():
    model = Tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    trainer = create_trainer(
        model,
        optimizer,
        NaNFrom(DeepLabLoss(), 6),
        scheduler,
        Sampler(),
        device=torch.device("cpu"),
        seed=1,
        check_every=(4,),
    )
    trainer.run(batches(10), max_epochs=1)
    # NaN from iteration 6, read at iteration 8 (the next multiple of 4), before anything later runs.
    assert trainer.state.nan_iteration == 6 and trainer.state.iteration == 8


def test_finite_run_has_no_nan_iteration():
    trainer = trainer_for(Tiny(), check_every=(2,))
    trainer.run(batches(4), max_epochs=1)
    assert trainer.state.nan_iteration is None and int(trainer.state.first_nonfinite) == NO_NONFINITE


def resumed_at_iteration_3_of_4(sampler):
    optimizer = torch.optim.SGD(Tiny().parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    trainer = create_trainer(Tiny(), optimizer, DeepLabLoss(), scheduler, sampler, device=torch.device("cpu"), seed=1)
    trainer.load_state_dict({"iteration": 3, "epoch_length": 4, "max_epochs": 1})
    return trainer


def test_a_resumed_epoch_skips_the_batches_it_trained_on():
    sampler = SeededShuffleSampler(16, seed=3, batch_size=2)
    sampler.set_epoch(0)
    order = list(sampler)
    trainer = resumed_at_iteration_3_of_4(sampler)
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: e.terminate())
    trainer.run(batches(4))
    assert list(sampler) == order[6:] and len(sampler) == 10


def test_resuming_mid_epoch_refuses_a_sampler_that_cannot_skip():
    trainer = resumed_at_iteration_3_of_4(Sampler())
    with pytest.raises(UserError, match=r"^the config's train_loader has a sampler \(Sampler\) without resume_at"):
        trainer.run(batches(4))


def test_gradient_accumulation_skips_the_all_reduce_except_on_updates():
    class DDPLike(nn.Module):  # the one DDP method the step uses
        def __init__(self):
            super().__init__()
            self.module, self.synced_off = Tiny(), []

        def forward(self, x):
            return self.module(x)

        @contextlib.contextmanager
        def no_sync(self):
            self.synced_off.append(True)
            yield

    model = DDPLike()
    trainer = trainer_for(model, accumulation_steps=2)
    iterations = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: iterations.append(len(model.synced_off)))
    trainer.run(batches(4), max_epochs=1)
    assert iterations == [1, 1, 2, 2]  # no_sync on iterations 1 and 3, a synchronised backward on 2 and 4


def test_compiled_training_step_matches_eager():
    torch.manual_seed(0)
    eager, compiled = Tiny(), Tiny()
    compiled.load_state_dict(eager.state_dict())
    data = batches(2)
    trainer_for(eager).run(data, max_epochs=1)
    trainer_for(compiled, compile_model=True).run(data, max_epochs=1)
    assert torch.allclose(eager.conv.weight, compiled.conv.weight, atol=1e-5)
    assert not any(k.startswith("_orig_mod") for k in compiled.state_dict())  # checkpoints keep plain names


def test_evaluation_does_not_compute_the_aux_head():
    model = deeplabv3("resnet50", aux_loss=True, pretrained_backbone=False, output_stride=16).eval()
    calls = []
    model.aux_classifier.register_forward_hook(lambda *a: calls.append(1))
    evaluator = create_evaluator(model, device=torch.device("cpu"))
    data = batches(1, size=32)
    evaluator.run(data)
    assert calls == []
    with torch.no_grad():
        expected = model(prepare_batch(data[0], "cpu")[0])["out"].softmax(1)
    assert len(calls) == 1 and torch.allclose(evaluator.state.output["y_pred"], expected, atol=1e-6)


def test_evaluators_report_the_one_list_of_metric_names():
    evaluator = create_evaluator(Tiny(), device=torch.device("cpu"))
    evaluator.run(batches(2))
    assert list(scalar_metrics(evaluator.state.metrics)) == list(SCALAR_METRICS)
    assert evaluator.state.metrics[CLASS_IOU].shape == (21,)


def test_channels_last_batches():
    images, _ = prepare_batch(batches(1)[0], "cpu", channels_last=True)
    assert images.is_contiguous(memory_format=torch.channels_last)


def test_gpu_switches(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    model, channels_last = training._gpu_switches({"channels_last": True}, torch.device("cuda"), Tiny())
    assert channels_last and torch.backends.cudnn.benchmark  # cudnn.benchmark defaults on
    assert model.conv.weight.is_contiguous(memory_format=torch.channels_last)
    _, channels_last = training._gpu_switches({"cudnn_benchmark": False}, torch.device("cuda"), Tiny())
    assert not channels_last and not torch.backends.cudnn.benchmark
    _, channels_last = training._gpu_switches({"channels_last": True}, torch.device("cpu"), Tiny())
    assert not channels_last


def test_each_rank_draws_its_own_numbers_and_rank_0_keeps_the_old_ones():
    assert iteration_seed(12, 5) == iteration_seed(12, 5, rank=0) == (12 * 1_000_003 + 5)
    assert len({iteration_seed(12, 5, rank) for rank in range(8)}) == 8


def test_total_batch_size_must_divide_by_the_processes(monkeypatch, synthetic_voc):
    monkeypatch.setattr(engines.idist, "get_world_size", lambda: 4)
    with pytest.raises(UserError, match=r"batch_size=18 .* 4 processes.*16 or 20"):
        get_dataloaders(synthetic_voc, batch_size=18, num_workers=0)
    with pytest.raises(UserError, match=r"val_batch_size=6 .* 4 processes.*4 or 8"):
        get_dataloaders(synthetic_voc, batch_size=8, val_batch_size=6, num_workers=0)


def test_seed_must_be_one_value(tmp_path, synthetic_voc, monkeypatch):
    from vocseg.config import check_seed, load_config, peek_constant

    path = tmp_path / "computed_seed.py"
    path.write_text("seed = int('7')\n")
    config = load_config(path)
    with pytest.raises(UserError, match="computed_seed.py: seed is read before the config runs and gave 0.*sets 7"):
        check_seed(config, peek_constant(path, "seed", default=0))
    check_seed(load_config(path, {"seed": 7}), 7)
