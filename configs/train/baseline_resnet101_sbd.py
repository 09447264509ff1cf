# DeepLabV3-ResNet101 on VOC 2012 train + SBD train/val (10,582 images, no VOC val image), validated on VOC val.
# Recipe: MMSegmentation's deeplabv3_r101-d8_512x512_20k_voc12aug (78.70 val mIoU single scale); what still
# differs is listed in the README's recipe table.
import math
import os

from vocseg.dataflow import get_dataloaders
from vocseg.datasets import sbd_root_from_env, voc_root_from_env
from vocseg.losses import DeepLabLoss
from vocseg.models import deeplabv3
from vocseg.optim import optimizer_steps, poly_lr, sgd

seed = 12
device = "cuda"  # CONFIG_OVERRIDES=device=cpu runs it on the CPU on purpose
amp = "auto"

# Data: batch_size is the total over all processes, per micro-batch (the anchor: 4 GPUs x 4 images).
batch_size = 16
num_workers = 8
crop_size = 512
train_loader, val_loader, train_eval_loader = get_dataloaders(
    voc_root_from_env(),
    sbd_root_from_env(),
    batch_size=batch_size,
    val_batch_size=8,
    num_workers=num_workers,
    crop_size=crop_size,
    seed=seed,
    train_eval_num_samples=500,
)

# Model: output stride 8, auxiliary FCN head on layer3 weighted 0.4, as the anchor.
num_classes = 21
output_stride = 8
model = deeplabv3(
    "resnet101", num_classes=num_classes, aux_loss=True, pretrained_backbone=True, output_stride=output_stride
)
criterion = DeepLabLoss(aux_weight=0.4)

# Optimisation: 20k iterations of SGD, one learning rate for every parameter, poly(0.9) per step.
num_iterations = 20_000
learning_rate = 0.01
weight_decay = 5e-4
# accumulation_steps > 1 sums that many micro-batches of batch_size into one optimiser step (batch 4 x 4 = 16
# images per step): num_iterations stays the number of optimiser steps, and the trainer steps across epochs.
accumulation_steps = 1
num_epochs = math.ceil(num_iterations * accumulation_steps / len(train_loader))
optimizer = sgd(model, lr=learning_rate, momentum=0.9, weight_decay=weight_decay, head_lr_mult=1.0)
lr_scheduler = poly_lr(optimizer, optimizer_steps(train_loader, num_epochs, accumulation_steps), power=0.9)

# Run control
val_interval = 10
save_every_iters = 1000
log_every_iters = 20
es_patience = None
resume_from = os.environ.get("RESUME_FROM")
