"""Predict segmentation masks for any images: a palette PNG mask and an overlay JPEG per image.

    python code/scripts/predict.py --config configs/eval/baseline_resnet101.py --weights best_model.pt \
        --out output/predictions photo.jpg holiday/ 'scans/**/*.png'

INPUTS are files, folders (their files, not recursive) or quoted glob patterns, in any format OpenCV
reads. --weights is a best_model_*.pt, a training checkpoint or a ClearML model id. The model and the
TTA (tta_flip, tta_scales) come from the eval config; its data loader is never built.
"""

import argparse
import sys
from pathlib import Path

from vocseg.errors import UserError, exit_with
from vocseg.inference.options import add_model_options


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image file, folder or glob pattern")
    add_model_options(parser)
    parser.add_argument("--out", required=True, help="folder for <name>.png masks and <name>_overlay.jpg")
    parser.add_argument(
        "--max-side",
        type=int,
        default=1024,
        help="longer images are predicted at this many pixels on the long side and the mask scaled "
        "back to full size (0: always full size; default %(default)s)",
    )
    parser.add_argument("--device", help="override the config's device, e.g. cpu or cuda:1")
    parser.add_argument("--overwrite", action="store_true", help="replace masks and overlays already in --out")
    args = parser.parse_args(argv)
    try:
        from vocseg.inference.predictions import collect_inputs, output_paths, predict_files
        from vocseg.inference.session import Predictor

        files, problems = collect_inputs(args.inputs)
        for line in problems:
            print(f"skipped {line}", file=sys.stderr)
        if not files:
            raise UserError("no input files found: name image files, folders or glob patterns")
        targets = output_paths(files, Path(args.out), args.overwrite)
        predictor = Predictor(args.config, args.weights, args.device)
        size = f"long side above {args.max_side} px scaled to it" if args.max_side else "full size"
        print(f"{len(files)} files -> {args.out} | {predictor.describe()} | {size}", flush=True)
        written, skipped = predict_files(predictor, targets, args.max_side or None)
    except UserError as exc:
        exit_with(exc)
    print(f"wrote {written} masks and {written} overlays to {args.out}; skipped {skipped + len(problems)} inputs")
    if not written:
        exit_with(UserError("no input could be read as an image"), code=1)


if __name__ == "__main__":
    main()
