# Seconds-long CPU config for tests; knobs come from TINY_* env vars so one file serves every test.
import os

import torch

from vocseg.dataflow import get_dataloaders
from vocseg.datasets import voc_root_from_env
from vocseg.losses import DeepLabLoss
from vocseg.models import deeplabv3
from vocseg.optim import optimizer_steps, poly_lr, sgd

seed = 7
device = "cpu"
amp = "off"
batch_size = int(os.environ.get("TINY_BATCH_SIZE", 4))
num_workers = int(os.environ.get("TINY_WORKERS", 0))
train_loader, val_loader, train_eval_loader = get_dataloaders(
    voc_root_from_env(),
    batch_size=batch_size,
    val_batch_size=4,
    num_workers=num_workers,
    crop_size=64,
    seed=seed,
    train_eval_num_samples=6,
    limit_val_num_samples=int(os.environ.get("TINY_VAL_LIMIT", 0)) or None,
)
num_classes = 21
aux_loss = False
model = deeplabv3(
    "mobilenet_v3_large",
    aux_loss=aux_loss,
    pretrained_backbone=bool(int(os.environ.get("TINY_PRETRAINED", 0))),
    bn_momentum=0.1,
)


class NaNAfter(torch.nn.Module):
    """Turns the loss into NaN from a given iteration on, to exercise the NaN guard."""

    def __init__(self, loss, after):
        super().__init__()
        self.loss, self.after, self.calls = loss, after, 0

    def forward(self, outputs, target):
        self.calls += 1
        value = self.loss(outputs, target)
        return value * float("nan") if self.after and self.calls > self.after else value


nan_after = int(os.environ.get("TINY_NAN_AFTER", 0))
if os.environ.get("TINY_NAN_RANK", os.environ.get("RANK")) != os.environ.get("RANK"):
    nan_after = 0  # TINY_NAN_RANK confines the NaN to one process of a distributed run
criterion = NaNAfter(DeepLabLoss(), nan_after)
num_epochs = int(os.environ.get("TINY_EPOCHS", 2))
accumulation_steps = int(os.environ.get("TINY_ACCUMULATION", 1))
optimizer = sgd(model, lr=0.01, momentum=0.9, weight_decay=1e-4)
lr_scheduler = poly_lr(optimizer, optimizer_steps(train_loader, num_epochs, accumulation_steps))
val_interval = 1
save_every_iters = int(os.environ.get("TINY_SAVE_EVERY", 2))
log_every_iters = int(os.environ.get("TINY_LOG_EVERY", 2))
es_patience = int(os.environ.get("TINY_ES_PATIENCE", 0)) or None
sync_bn = bool(int(os.environ.get("TINY_SYNC_BN", 0)))
resume_from = os.environ.get("RESUME_FROM")


# TINY_WARN_DURING=iteration|validation|checkpoint, in a SLURM batch job: rank 0 has SLURM warn its job with USR1
# (`scancel --signal=USR1 --batch`, as a time limit would) during its second training iteration, its first
# validation, or its first training checkpoint's write, and goes on once the signal has reached it.
def _warn_the_job(when):
    import subprocess
    import time

    from vocseg.runtime import signals

    if _warned or os.environ.get("SLURM_PROCID", "0") != "0" or os.environ.get("SLURM_RESTART_COUNT", "0") != "0":
        return  # rank 0 of the job's first run only: the requeued run goes on undisturbed
    _warned.append(when)
    print(f"tiny: rank 0 asks SLURM to warn job {os.environ['SLURM_JOB_ID']} during {when}", flush=True)
    subprocess.run(["scancel", "--signal=USR1", "--batch", os.environ["SLURM_JOB_ID"]], check=True)
    deadline = time.monotonic() + 30
    while not signals.stop_requested() and time.monotonic() < deadline:
        time.sleep(0.05)


# TINY_FAIL_RANK=R: the task of SLURM_PROCID R dies (exit 3) in its second training iteration, a real failure.
_warned, _warn_during = [], os.environ.get("TINY_WARN_DURING")
_fails = "SLURM_PROCID" in os.environ and os.environ.get("TINY_FAIL_RANK") == os.environ["SLURM_PROCID"]
if _warn_during in ("iteration", "validation") or _fails:
    _forwards = []

    def _warn_in_forward(module, _inputs):
        _forwards.append(module.training)
        if _fails and _forwards.count(True) == 2:
            os._exit(3)
        if _warn_during == "validation" and not module.training:
            _warn_the_job("validation")
        elif _warn_during == "iteration" and _forwards.count(True) == 2:
            _warn_the_job("iteration 2")

    model.register_forward_pre_hook(_warn_in_forward)
elif _warn_during == "checkpoint":
    _torch_save = torch.save

    def _save_and_warn(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and "trainer" in obj:  # a training checkpoint, being written to its temporary file
            _warn_the_job("checkpoint write")
        return _torch_save(obj, f, *args, **kwargs)

    torch.save = _save_and_warn
