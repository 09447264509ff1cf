# Minutes-long CPU run on the synthetic dataset (make demo): a small torchvision DeepLabV3 that visibly learns.
import os

from vocseg.dataflow import get_dataloaders
from vocseg.datasets import voc_root_from_env
from vocseg.losses import DeepLabLoss
from vocseg.models import deeplabv3
from vocseg.optim import adamw, optimizer_steps, poly_lr

seed = 12
device = "cpu"
amp = "auto"  # bf16 where this CPU computes it natively (AVX512-BF16, AMX), else fp32; the log says which

batch_size = 8
num_workers = 2
crop_size = 96
train_loader, val_loader, train_eval_loader = get_dataloaders(
    voc_root_from_env(),
    batch_size=batch_size,
    val_batch_size=16,
    num_workers=num_workers,
    crop_size=crop_size,
    seed=seed,
    train_eval_num_samples=50,
)

num_classes = 21
# Offline by design (no ImageNet download): a ResNet-18 DeepLabV3 learns the synthetic data from scratch.
model = deeplabv3("resnet18", num_classes=num_classes, aux_loss=False, pretrained_backbone=False)
criterion = DeepLabLoss()

num_epochs = 24
learning_rate = 0.002
accumulation_steps = 1
optimizer = adamw(model, lr=learning_rate, weight_decay=1e-2)
lr_scheduler = poly_lr(optimizer, optimizer_steps(train_loader, num_epochs, accumulation_steps), power=0.9)

val_interval = 4
save_every_iters = 200
log_every_iters = 10
resume_from = os.environ.get("RESUME_FROM")
