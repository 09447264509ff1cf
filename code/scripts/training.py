"""Train a segmentation model from a config file.

python -m py_config_runner code/scripts/training.py configs/train/baseline_resnet101.py
torchrun --nproc_per_node=2 -m py_config_runner code/scripts/training.py configs/train/baseline_resnet101.py
"""

from vocseg.entry import run_training as run  # noqa: F401  (py_config_runner calls run(config))
