"""Train a segmentation model from a config file.

usage: python -m py_config_runner code/scripts/training.py CONFIG

  python -m py_config_runner code/scripts/training.py configs/train/baseline_resnet101.py
  torchrun --nproc_per_node=2 -m py_config_runner code/scripts/training.py configs/train/baseline_resnet101.py
  CONFIG_OVERRIDES="batch_size=8 accumulation_steps=2" python -m py_config_runner code/scripts/training.py CONFIG
  CONFIG_OVERRIDES="preflight=True" python -m py_config_runner code/scripts/training.py CONFIG

A plain launch starts one process per visible GPU (NPROC_PER_NODE=1 runs one). CONFIG_OVERRIDES="key=value ..."
changes any setting without editing the config; preflight=True times a few iterations, a checkpoint and a
validation, projects the run's wall time and exits, writing nothing. Every setting: docs/configs.md.

The code, in the order it runs: vocseg/entry.py (settings -> launch -> tracker), vocseg/engine/train.py (train():
every handler in one list), vocseg/engine/steps.py (train_step: the loss and the optimiser step).
"""

import sys

from vocseg.entry import run_training as run  # noqa: F401  (py_config_runner calls run(config))
from vocseg.entry import script_main

if __name__ == "__main__":
    sys.exit(script_main(__doc__))
