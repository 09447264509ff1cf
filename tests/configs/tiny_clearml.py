# Seconds-long CPU run for the ClearML tests: two epochs on a handful of synthetic images.
import os

from vocseg.dataflow import get_dataloaders
from vocseg.datasets import voc_root_from_env
from vocseg.losses import DeepLabLoss
from vocseg.models import deeplabv3
from vocseg.optim import optimizer_steps, poly_lr, sgd

seed = 3
device = "cpu"
amp = "off"

batch_size = 4
num_workers = 0
crop_size = 64
train_loader, val_loader, train_eval_loader = get_dataloaders(
    voc_root_from_env(),
    batch_size=batch_size,
    val_batch_size=4,
    num_workers=num_workers,
    crop_size=crop_size,
    seed=seed,
    train_eval_num_samples=4,
    limit_train_num_samples=8,
    limit_val_num_samples=4,
)

num_classes = 21
model = deeplabv3("mobilenet_v3_large", num_classes=num_classes, aux_loss=False, pretrained_backbone=False)
criterion = DeepLabLoss()

num_epochs = 2
learning_rate = 0.01
optimizer = sgd(model, lr=learning_rate, momentum=0.9, weight_decay=1e-4, head_lr_mult=10.0)
lr_scheduler = poly_lr(optimizer, optimizer_steps(train_loader, num_epochs), power=0.9)

val_interval = 1
save_every_iters = 100
log_every_iters = 1
# Stays out of the recorded hyperparameters: it looks like a secret.
api_token = "not-a-real-token"
resume_from = os.environ.get("RESUME_FROM")
