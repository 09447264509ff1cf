# DeepLabV3-ResNet101 on Pascal VOC 2012 train, validated on VOC 2012 val.
import os

import torch

from vocseg.dataflow import get_dataloaders
from vocseg.datasets import voc_root_from_env
from vocseg.losses import DeepLabLoss
from vocseg.models import deeplabv3
from vocseg.optim import optimizer_steps, poly_lr, sgd

seed = 12
device = "cuda" if torch.cuda.is_available() else "cpu"
amp = "auto"  # bf16 where the GPU supports it, else fp16; off on CPU

# Data: batch_size is the total over all processes (about 9 images per 11 GB GPU at crop 480).
batch_size = 18
num_workers = 8
crop_size = 480
val_pad_size = 513
train_loader, val_loader, train_eval_loader = get_dataloaders(
    voc_root_from_env(), batch_size=batch_size, val_batch_size=8, num_workers=num_workers, crop_size=crop_size,
    val_pad_size=val_pad_size, seed=seed, train_eval_num_samples=500,
)

# Model
num_classes = 21
model = deeplabv3("resnet101", num_classes=num_classes, aux_loss=True, pretrained_backbone=True)
criterion = DeepLabLoss(aux_weight=0.4)

# Optimisation: SGD + poly(0.9) per optimiser step, heads at 10x the backbone learning rate.
num_epochs = 50
learning_rate = 0.007
weight_decay = 1e-4
accumulation_steps = 1
optimizer = sgd(model, lr=learning_rate, momentum=0.9, weight_decay=weight_decay, head_lr_mult=10.0)
lr_scheduler = poly_lr(optimizer, optimizer_steps(train_loader, num_epochs, accumulation_steps), power=0.9)

# Run control
val_interval = 2
save_every_iters = 1000
log_every_iters = 20
es_patience = None
resume_from = os.environ.get("RESUME_FROM")
