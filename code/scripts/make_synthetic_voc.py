"""Write a small synthetic Pascal VOC 2012 + SBD dataset for smoke tests and quick experiments.

python code/scripts/make_synthetic_voc.py OUT --train 200 --val 50 [--test 30] [--size 128 128] [--seed 0]
"""

import argparse

from vocseg.data.synthetic import make_synthetic_voc
from vocseg.errors import UserError, exit_with


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder to create VOCdevkit/ and SBD/ in")
    parser.add_argument("--train", type=int, required=True, help="number of VOC train images")
    parser.add_argument("--val", type=int, required=True, help="number of VOC val images (>= 20 covers every class)")
    parser.add_argument(
        "--test",
        type=int,
        default=0,
        help="number of VOC test images: JPEGs and ImageSets/Segmentation/test.txt, no masks",
    )
    parser.add_argument("--size", type=int, nargs=2, default=(128, 128), metavar=("H", "W"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        summary = make_synthetic_voc(
            args.out, args.train, args.val, size=tuple(args.size), seed=args.seed, n_test=args.test
        )
    except UserError as exc:
        exit_with(exc)
    print(
        f"wrote {summary['images']} images: VOC train {summary['voc_train']} / val {summary['voc_val']} / "
        f"test {summary['voc_test']}, "
        f"SBD train {summary['sbd_train']} / val {summary['sbd_val']} / train_noval {summary['sbd_train_noval']}"
    )
    print(f"export DATASET_PATH={summary['voc_root'].resolve()}")
    print(f"export SBD_DATASET_PATH={summary['sbd_root'].resolve()}")


if __name__ == "__main__":
    main()
