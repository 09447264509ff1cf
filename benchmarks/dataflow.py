"""Training-data throughput: our pipeline vs the same work in torchvision.transforms.v2 vs decoding alone.

    python benchmarks/dataflow.py            # VOC-sized synthetic JPEGs, the baseline config's loader settings
    python benchmarks/dataflow.py --tiny     # seconds; only checks that it runs

All three read the same files (500x375 JPEG + palette PNG mask, written by make_synthetic_voc into a
temporary folder) through a DataLoader with the same workers, batch size, drop_last, persistent workers and
default collate; the main process only receives the batches. Variants are measured in interleaved rounds
(one epoch each per round) after a warm-up epoch, so a change of machine load hits all of them alike.

- ours: ``get_dataloaders(...)[0]``, the real training loader (SegmentationSamples + train_transform +
  SeededShuffleSampler): uint8 CHW images, normalised later on the device by ``prepare_batch``.
- torchvision_v2: torchvision.io decode, RandomResize (scale 0.5-2.0 of these 375-px-high images), pad to
  the crop (0 / 255 for tv_tensors.Mask), RandomCrop, RandomHorizontalFlip, ToDtype(float32) + Normalize:
  what torchvision's segmentation reference does (its masks become int64; we keep them uint8, in its favour).
- decode_only: cv2.imread of the image and the mask, nothing else: the ceiling of any pipeline here.
"""

import argparse
import tempfile
import time
from pathlib import Path

import _common as C

BASELINE = C.REPO / "configs" / "train" / "baseline_resnet101.py"
IMAGE_SIZE = (375, 500)  # (h, w) of a typical VOC image


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a few images, one worker, one round: a smoke test")
    p.add_argument("--config", default=str(BASELINE), help="config whose num_workers/batch_size/crop_size to use")
    p.add_argument("--workers", type=int, help="DataLoader workers (default: the config's num_workers)")
    p.add_argument("--batch-size", type=int, help="batch size (default: the config's batch_size)")
    p.add_argument("--crop-size", type=int, help="crop (default: the config's crop_size)")
    p.add_argument("--images", type=int, default=540, help="training images per epoch")
    p.add_argument("--rounds", type=int, default=3, help="timed epochs per variant, interleaved")
    p.add_argument("--data", help="existing folder with VOCdevkit/ (default: generate one in a temp dir)")
    args = p.parse_args(argv)
    args.workers = args.workers if args.workers is not None else int(C.peek(args.config, "num_workers", 4))
    args.batch_size = args.batch_size or int(C.peek(args.config, "batch_size", 8))
    args.crop_size = args.crop_size or int(C.peek(args.config, "crop_size", 480))
    if args.tiny:
        args.workers, args.batch_size, args.images, args.rounds = 1, 4, 12, 1
    return args


# ------------------------------------------------------------------------------------------------------------
# The two reference pipelines (module level so that DataLoader workers can pickle them).


class DecodeOnly:
    def __init__(self, voc_dataset):
        self.images = [str(p) for p in voc_dataset.image_paths]
        self.masks = [str(p) for p in voc_dataset.mask_paths]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        import cv2
        import torch

        image = cv2.imread(self.images[index], cv2.IMREAD_COLOR)
        mask = cv2.imread(self.masks[index], cv2.IMREAD_UNCHANGED)
        return {"image": torch.from_numpy(image), "mask": torch.from_numpy(mask)}


def torchvision_v2_transform(crop_size: int, short_side: int):
    import torch
    from torchvision import tv_tensors
    from torchvision.transforms import v2
    from torchvision.transforms.v2 import functional as F

    from vocseg.data.normalize import MEAN, STD

    class PadIfSmaller(v2.Transform):
        """Bottom/right padding up to the crop: 0 for images, 255 (void) for masks (as torchvision's reference)."""

        def make_params(self, flat_inputs):
            height, width = v2.query_size(flat_inputs)
            return {"padding": [0, 0, max(crop_size - width, 0), max(crop_size - height, 0)]}

        def transform(self, inpt, params):
            if not any(params["padding"]):
                return inpt
            return F.pad(inpt, padding=params["padding"], fill=255 if isinstance(inpt, tv_tensors.Mask) else 0)

    return v2.Compose(
        [
            # Shorter side drawn in [0.5, 2.0] x 375 = scale 0.5-2.0 of the benchmark's 500x375 images.
            v2.RandomResize(min_size=round(0.5 * short_side), max_size=round(2.0 * short_side) + 1),
            PadIfSmaller(),
            v2.RandomCrop(crop_size),
            v2.RandomHorizontalFlip(0.5),
            v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
            v2.Normalize([m / 255 for m in MEAN], [s / 255 for s in STD]),
        ]
    )


class TorchvisionV2:
    def __init__(self, voc_dataset, crop_size: int, short_side: int):
        self.images = [str(p) for p in voc_dataset.image_paths]
        self.masks = [str(p) for p in voc_dataset.mask_paths]
        self.crop_size, self.short_side = crop_size, short_side
        self.transform = None

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        import torch
        from torchvision import tv_tensors
        from torchvision.io import ImageReadMode, decode_jpeg, decode_png, read_file

        if self.transform is None:
            self.transform = torchvision_v2_transform(self.crop_size, self.short_side)
        image = tv_tensors.Image(decode_jpeg(read_file(self.images[index]), mode=ImageReadMode.RGB))
        mask = tv_tensors.Mask(decode_png(read_file(self.masks[index]))[0])  # palette indices, HW
        image, mask = self.transform(image, mask)
        return {"image": image.as_subclass(torch.Tensor), "mask": mask.as_subclass(torch.Tensor)}


# ------------------------------------------------------------------------------------------------------------


def build_loaders(root: Path, args):
    import torch
    from torch.utils.data import DataLoader, RandomSampler

    from vocseg.dataflow import get_dataloaders
    from vocseg.datasets import VOCSegmentation

    ours = get_dataloaders(
        root, batch_size=args.batch_size, num_workers=args.workers, crop_size=args.crop_size, seed=12
    )[0]
    voc = VOCSegmentation(root, "train")
    common = dict(
        batch_size=args.batch_size,
        num_workers=args.workers,
        drop_last=True,
        pin_memory=ours.pin_memory,
        persistent_workers=args.workers > 0,
    )

    def loader(dataset, seed):
        return DataLoader(
            dataset, sampler=RandomSampler(dataset, generator=torch.Generator().manual_seed(seed)), **common
        )

    return {
        "ours": ours,
        "torchvision_v2": loader(TorchvisionV2(voc, args.crop_size, min(IMAGE_SIZE)), 1),
        "decode_only": loader(DecodeOnly(voc), 2),
    }


def one_epoch(loader, epoch: int):
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    images, shapes = 0, None
    start = time.perf_counter()
    for batch in loader:
        images += batch["image"].shape[0]
        shapes = shapes or {
            k: [list(batch[k].shape), str(batch[k].dtype).replace("torch.", "")] for k in ("image", "mask")
        }
    return images, time.perf_counter() - start, shapes


def main(argv=None):
    args = parse_args(argv)
    started, load_before = time.time(), C.load()
    from vocseg.data.synthetic import make_synthetic_voc

    with tempfile.TemporaryDirectory(prefix="vocseg-bench-dataflow-") as tmp:
        root = Path(args.data) if args.data else Path(tmp)
        if not args.data:
            C.note(f"writing {args.images} synthetic {IMAGE_SIZE[1]}x{IMAGE_SIZE[0]} images to {root}")
            make_synthetic_voc(root, args.images, 1, size=IMAGE_SIZE, seed=0)
        loaders = build_loaders(root, args)
        shapes, totals, rounds = {}, {name: [0, 0.0] for name in loaders}, []
        for loader in loaders.values():  # warm-up: starts the persistent workers, fills caches
            one_epoch(loader, 1000)
        for r in range(args.rounds):
            row = {}
            # Rotate the order so that no variant always runs first (or last) in a round.
            names = list(loaders)[r % len(loaders) :] + list(loaders)[: r % len(loaders)]
            for name in names:
                n, seconds, shapes[name] = one_epoch(loaders[name], r)
                totals[name][0] += n
                totals[name][1] += seconds
                row[name] = round(n / seconds, 1)
            rounds.append(row)
            C.note(f"round {r + 1}/{args.rounds}: {row} load {C.load()}")
        ips = {name: round(n / s, 1) for name, (n, s) in totals.items()}

    vs_tv = ips["ours"] / ips["torchvision_v2"]
    vs_decode = ips["ours"] / ips["decode_only"]
    C.emit(
        "dataflow",
        {
            "images_per_s": ips,
            "ours_vs_torchvision_v2": round(vs_tv, 3),
            "ours_vs_decode_only": round(vs_decode, 3),
            "targets": {"ours_vs_torchvision_v2>=1.3": vs_tv >= 1.3, "ours_vs_decode_only>=0.7": vs_decode >= 0.7},
            "rounds": rounds,
            "batch_shapes": shapes,
            "settings": {
                "workers": args.workers,
                "batch_size": args.batch_size,
                "crop_size": args.crop_size,
                "images_per_epoch": args.images,
                "rounds": args.rounds,
                "image_hw": list(IMAGE_SIZE),
                "tiny": args.tiny,
            },
        },
        load_before,
        started,
    )


if __name__ == "__main__":
    main()
