"""Export trained weights to TorchScript and ONNX (dynamic batch, height, width) and check both against PyTorch.

    python code/scripts/export.py --config configs/eval/baseline_resnet101.py --weights best_model.pt \
        --out output/export [--images val_samples/]

Writes OUT/model.torchscript.pt, OUT/model.onnx and OUT/export_check.json. Each export runs on the
--images (default: three seeded random images of different sizes) next to PyTorch: the max abs logit
difference is reported and the argmax must agree on more than 99.9% of the pixels of every image.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from vocseg.errors import UserError, exit_with
from vocseg.inference.options import add_model_options

FORMATS = {"torchscript": "model.torchscript.pt", "onnx": "model.onnx"}


def check_images(inputs) -> dict:
    from vocseg.datasets import read_image
    from vocseg.inference.predictions import collect_inputs

    if not inputs:
        rng = np.random.default_rng(0)
        return {
            f"random {h}x{w}": rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            for h, w in ((97, 131), (160, 120), (211, 250))
        }
    files, problems = collect_inputs(inputs)
    images = {}
    for path in files:
        try:
            images[path.name] = read_image(path)
        except UserError:
            problems.append(f"{path}: not an image OpenCV reads")
    for line in problems:
        print(f"skipped {line}", file=sys.stderr)
    if not images:
        raise UserError("none of --images could be read: name image files, folders or glob patterns")
    return images


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_options(parser, config_help="eval config defining the model")
    parser.add_argument("--out", required=True, help="folder for the exports and export_check.json")
    parser.add_argument("--formats", nargs="+", choices=sorted(FORMATS), default=sorted(FORMATS))
    parser.add_argument("--images", nargs="*", default=[], help="image files, folders or globs to check on")
    args = parser.parse_args(argv)
    try:
        run(args)
    except UserError as exc:
        exit_with(exc)


def run(args) -> None:
    from vocseg.inference import export
    from vocseg.inference.session import Predictor

    out = Path(args.out)
    existing = [str(out / FORMATS[f]) for f in args.formats if (out / FORMATS[f]).exists()]
    if existing:
        raise UserError(f"{existing[0]} already exists: pick a new --out folder or delete it")
    images = check_images(args.images)
    net = export.PixelsToLogits(Predictor(args.config, args.weights, device="cpu").model)
    out.mkdir(parents=True, exist_ok=True)
    report = {}
    for name in args.formats:
        path = out / FORMATS[name]
        if name == "onnx":
            export.export_onnx(net, path)
            runner = export.onnx_runner(path)
        else:
            export.export_torchscript(net, path)
            runner = export.torchscript_runner(path)
        rows = export.compare(net, runner, images)
        report[name] = {"path": str(path), "rows": rows, **({"opset": export.ONNX_OPSET} if name == "onnx" else {})}
        (out / "export_check.json").write_text(json.dumps(report, indent=2))
        for row in rows:
            print(
                f"{name:<11} {row['image']} ({row['size'][0]}x{row['size'][1]}): "
                f"max abs logit difference {row['max_abs_diff']:.3g}, "
                f"argmax agreement {100 * row['argmax_agreement']:.3f}%"
            )
        export.check_agreement(name, rows)
        print(f"{name:<11} wrote {path}")


if __name__ == "__main__":
    main()
