"""Evaluate trained weights on VOC val.

WEIGHTS_PATH=/path/to/best_model.pt \\
    python -m py_config_runner code/scripts/evaluation.py configs/eval/baseline_resnet101.py
"""

from vocseg.entry import run_evaluation as run  # noqa: F401  (py_config_runner calls run(config))
