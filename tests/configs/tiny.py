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
log_every_iters = 2
es_patience = int(os.environ.get("TINY_ES_PATIENCE", 0)) or None
sync_bn = bool(int(os.environ.get("TINY_SYNC_BN", 0)))
resume_from = os.environ.get("RESUME_FROM")
