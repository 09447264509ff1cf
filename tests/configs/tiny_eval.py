# Evaluation counterpart of the tiny test configs (same model).
import os

from vocseg.dataflow import get_val_loader
from vocseg.datasets import voc_root_from_env
from vocseg.models import deeplabv3

seed = 1
device = "cpu"
amp = "off"
data_loader = get_val_loader(
    voc_root_from_env(), batch_size=4, num_workers=0, limit_num_samples=int(os.environ.get("TINY_VAL_LIMIT", 0)) or None
)
model = deeplabv3("mobilenet_v3_large", aux_loss=False, pretrained_backbone=False)
weights_path = os.environ.get("WEIGHTS_PATH")
tta_flip = os.environ.get("TINY_TTA") == "1"
tta_scales = (0.75, 1.0) if os.environ.get("TINY_TTA") == "1" else (1.0,)
save_predictions = True
