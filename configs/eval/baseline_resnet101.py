# Score DeepLabV3-ResNet101 weights on VOC 2012 val at full resolution.
import os

from vocseg.dataflow import get_val_loader
from vocseg.datasets import voc_root_from_env
from vocseg.models import deeplabv3

seed = 12
device = "cuda"  # CONFIG_OVERRIDES=device=cpu runs it on the CPU on purpose
amp = "off"  # scores in full precision; "auto" (bf16 or fp16 by GPU) is faster

data_loader = get_val_loader(voc_root_from_env(), batch_size=4, num_workers=8)
# The architecture of the training config: baseline_resnet101_sbd.py (below) or, for baseline_resnet101.py,
# output_stride = 16 and aux_loss = False.
output_stride = 8
aux_loss = True
model = deeplabv3(
    "resnet101", num_classes=21, aux_loss=aux_loss, pretrained_backbone=False, output_stride=output_stride
)

# A local .pt (best_model_*.pt or a training checkpoint) or a ClearML model id.
weights_path = os.environ.get("WEIGHTS_PATH")
tta_flip = False
tta_scales = (1.0,)  # e.g. (0.75, 1.0, 1.25, 1.5) for multi-scale testing
save_predictions = False  # colour PNGs in the VOC palette under <output>/predictions/
