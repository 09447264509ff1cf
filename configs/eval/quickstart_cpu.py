# Score the weights of `make demo` (configs/train/quickstart_cpu.py) on the synthetic val split; predict.py,
# submission.py and export.py read the model and TTA from here too.
import os

from vocseg.dataflow import get_val_loader
from vocseg.datasets import voc_root_from_env
from vocseg.models import deeplabv3

seed = 12
device = "cpu"
amp = "off"

data_loader = get_val_loader(voc_root_from_env(), batch_size=16, num_workers=2)
model = deeplabv3("resnet18", num_classes=21, aux_loss=False, pretrained_backbone=False)

weights_path = os.environ.get("WEIGHTS_PATH")
tta_flip = False
tta_scales = (1.0,)
save_predictions = False
