"""Evaluate trained weights on VOC val.

usage: WEIGHTS_PATH=WEIGHTS python -m py_config_runner code/scripts/evaluation.py CONFIG

  WEIGHTS_PATH=output/baseline_resnet101/<run>/best/best_model_<n>_val_mIoU=<score>.pt \\
      python -m py_config_runner code/scripts/evaluation.py configs/eval/baseline_resnet101.py

WEIGHTS_PATH is a .pt file (a best model or a training checkpoint) or a ClearML model id. Weights inside a training
run folder are loaded into the architecture that run recorded (its model.json), whatever the eval config's model;
the config gives the data, the test-time augmentation and the device. Results go to
<output>/<config name>/eval-<run name>/metrics.json, never into a training run's folder.
"""

import sys

from vocseg.entry import run_evaluation as run  # noqa: F401  (py_config_runner calls run(config))
from vocseg.entry import script_main

if __name__ == "__main__":
    sys.exit(script_main(__doc__))
