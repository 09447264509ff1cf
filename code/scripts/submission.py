"""Predict the VOC2012 test images and pack them for the evaluation server.

    python code/scripts/submission.py --config configs/eval/baseline_resnet101.py --weights best_model.pt \
        --competition comp6 --out output/submission

Reads ImageSets/Segmentation/test.txt and JPEGImages/ under DATASET_PATH (or --dataset-path), predicts
with the config's model and TTA, writes OUT/results/VOC2012/Segmentation/<comp>_test_cls/<id>.png and
packs OUT/<comp>_test_cls.tar.gz once every PNG has been checked.
"""

import argparse
import os

from vocseg.errors import UserError, exit_with
from vocseg.inference.options import add_model_options


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_options(parser)
    parser.add_argument(
        "--competition",
        required=True,
        choices=("comp5", "comp6"),
        help="comp5: trained on VOC2012 data only; comp6: trained with extra data such as SBD",
    )
    parser.add_argument(
        "--dataset-path",
        default=os.environ.get("DATASET_PATH"),
        help="folder containing VOCdevkit/ with the test images (default: DATASET_PATH)",
    )
    parser.add_argument("--out", default="output/submission", help="folder for results/ and the archive")
    parser.add_argument("--device", help="override the config's device, e.g. cpu or cuda:1")
    args = parser.parse_args(argv)
    try:
        if not args.dataset_path:
            raise UserError("no dataset: set DATASET_PATH (or --dataset-path) to the folder containing VOCdevkit/")
        from vocseg.inference.session import Predictor
        from vocseg.inference.submission import listed_images, new_results_folder, write_submission

        # The data and the output folder are checked before the model is built.
        images = listed_images(args.dataset_path)
        new_results_folder(args.out, args.competition)
        predictor = Predictor(args.config, args.weights, args.device)
        print(f"{len(images)} test images -> {args.competition} | {predictor.describe()}", flush=True)
        archive = write_submission(predictor, images, args.out, args.competition)
    except UserError as exc:
        exit_with(exc)
    print(f"checked and packed: {archive}")


if __name__ == "__main__":
    main()
