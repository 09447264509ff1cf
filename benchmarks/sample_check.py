"""How long the pre-training sample check takes (vocseg.data.sample_check), per 1,000 samples, and on VOC+SBD's 12,031.

    python benchmarks/sample_check.py            # 600 VOC + ~300 SBD samples at 500x375, about a minute
    python benchmarks/sample_check.py --tiny     # seconds; only checks that it runs

VOC samples (JPEG + palette PNG mask) and SBD samples (JPEG + .mat) are timed separately, because they cost
differently: a PNG mask is decoded, a .mat is parsed by scipy. The extrapolation uses the real mix of the
VOC+SBD baseline: 10,582 training samples (1,464 VOC train, 9,118 SBD) and 1,449 VOC val, 12,031 in all.
The files were just written, so they come from the page cache; a first read from disk adds its I/O (the
check reads each JPEG's header and last KiB, and each whole mask: about 2 KiB per sample).
The second pass of each is the cached case: unchanged files are only stat'ed.
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

import _common as C

VOC_SEG, SBD_ONLY, VOC_VAL = 1464, 9118, 1449


def timed(loaders) -> float:
    from vocseg.data.sample_check import check_loaders

    start = time.perf_counter()
    check_loaders(loaders)
    return time.perf_counter() - start


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--images", type=int, default=600, help="VOC train images to generate (SBD gets about half)")
    args = p.parse_args(argv)
    n = 8 if args.tiny else args.images
    started, load_before = time.time(), C.load()

    from torch.utils.data import DataLoader

    from vocseg.data.synthetic import make_synthetic_voc
    from vocseg.datasets import SBDSegmentation, VOCSegmentation

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["VOCSEG_CACHE_DIR"] = str(Path(tmp) / "cache")
        C.note(f"writing {n} VOC train images at 500x375 (+SBD) into {tmp}")
        make_synthetic_voc(tmp, n, 2, size=(375, 500), seed=0)
        voc = {"voc": DataLoader(VOCSegmentation(tmp, "train"))}
        sbd = {"sbd": DataLoader(SBDSegmentation(Path(tmp) / "SBD", "train"))}
        counts = {"voc": len(voc["voc"].dataset), "sbd": len(sbd["sbd"].dataset)}
        first = {"voc": timed(voc), "sbd": timed(sbd)}
        cached = {"voc": timed(voc), "sbd": timed(sbd)}

    per_1000 = {k: round(1000 * first[k] / counts[k], 2) for k in first}
    cached_per_1000 = {k: round(1000 * cached[k] / counts[k], 3) for k in cached}
    voc_sbd = ((VOC_SEG + VOC_VAL) * per_1000["voc"] + SBD_ONLY * per_1000["sbd"]) / 1000
    voc_sbd_cached = ((VOC_SEG + VOC_VAL) * cached_per_1000["voc"] + SBD_ONLY * cached_per_1000["sbd"]) / 1000
    C.note(
        f"first check: {per_1000} s per 1,000 samples; cached: {cached_per_1000}; "
        f"VOC+SBD 12,031 samples: {voc_sbd:.0f} s, then {voc_sbd_cached:.1f} s"
    )
    C.emit(
        "sample_check",
        {
            "samples": counts,
            "s_per_1000": per_1000,
            "cached_s_per_1000": cached_per_1000,
            "voc_sbd_12031_s": round(voc_sbd, 1),
            "voc_sbd_12031_cached_s": round(voc_sbd_cached, 2),
            "command": "python benchmarks/sample_check.py",
        },
        load_before,
        started,
    )


if __name__ == "__main__":
    main()
