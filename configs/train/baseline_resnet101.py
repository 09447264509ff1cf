# DeepLabV3-ResNet101 on Pascal VOC 2012 train (1,464 images), validated on VOC 2012 val.
# Recipe: the DeepLabV3 paper's training protocol (Chen et al. 2017, output stride 16 in training); the
# paper trains on train_aug (baseline_resnet101_sbd.py's data), so its 77.21 is an upper reference here.
# What still differs is listed in the README's recipe table.
import math
import os

from vocseg.dataflow import get_dataloaders
from vocseg.datasets import voc_root_from_env
from vocseg.losses import DeepLabLoss
from vocseg.models import deeplabv3
from vocseg.optim import optimizer_steps, poly_lr, sgd

seed = 12
device = "cuda"  # CONFIG_OVERRIDES=device=cpu runs it on the CPU on purpose
amp = "auto"  # bf16 on compute capability 8.0+, fp16 below; bf16 on a CPU only where it is native

# Data: batch_size is the total over all processes, per micro-batch (the paper: 16).
batch_size = 16
num_workers = 8
crop_size = 513
train_loader, val_loader, train_eval_loader = get_dataloaders(
    voc_root_from_env(),
    batch_size=batch_size,
    val_batch_size=8,
    num_workers=num_workers,
    crop_size=crop_size,
    seed=seed,
    train_eval_num_samples=500,
)

# Model: output stride 16 (ASPP rates 6, 12, 18), no auxiliary head, BatchNorm decay 0.9997, as the paper.
num_classes = 21
output_stride = 16
model = deeplabv3(
    "resnet101",
    num_classes=num_classes,
    aux_loss=False,
    pretrained_backbone=True,
    output_stride=output_stride,
    bn_momentum=1 - 0.9997,
)
criterion = DeepLabLoss()

# Optimisation: 30k iterations of SGD, one learning rate for every parameter, poly(0.9) per step.
num_iterations = 30_000
learning_rate = 0.007
weight_decay = 1e-4
# accumulation_steps > 1 sums that many micro-batches of batch_size into one optimiser step (batch 4 x 4 = 16
# images per step): num_iterations stays the number of optimiser steps, and the trainer steps across epochs.
accumulation_steps = 1
num_epochs = math.ceil(num_iterations * accumulation_steps / len(train_loader))
optimizer = sgd(model, lr=learning_rate, momentum=0.9, weight_decay=weight_decay, head_lr_mult=1.0)
lr_scheduler = poly_lr(optimizer, optimizer_steps(train_loader, num_epochs, accumulation_steps), power=0.9)

# Run control
val_interval = 25
save_every_iters = 1000
log_every_iters = 20
es_patience = None
resume_from = os.environ.get("RESUME_FROM")
