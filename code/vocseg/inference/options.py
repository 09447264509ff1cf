"""The options that predict.py, submission.py and export.py share: which model, with which weights.

Only argparse here: ``--help`` answers without importing torch.
"""

import argparse

TTA_CONFIG = "eval config defining model, tta_flip, tta_scales, device"


def add_model_options(parser: argparse.ArgumentParser, config_help: str = TTA_CONFIG) -> None:
    """``--config`` (required) and ``--weights``, as Predictor takes them."""
    parser.add_argument("--config", required=True, help=config_help)
    parser.add_argument(
        "--weights",
        help="best_model_*.pt, a training checkpoint or a ClearML model id "
        "(default: weights_path of the config, i.e. WEIGHTS_PATH)",
    )
