"""How close the preflight's projection of a run's wall time comes to the run itself.

    python benchmarks/preflight.py           # configs/train/quickstart_cpu.py on a small synthetic dataset
    python benchmarks/preflight.py --tiny    # tests/configs/tiny.py, one epoch: only checks that it runs

Runs ``CONFIG_OVERRIDES="preflight=True" python -m py_config_runner code/scripts/training.py CONFIG`` and reads
the projected run time from its summary line, then trains the same config for real and measures, from its
training.log, the time from the first iteration to "done" (what the projection covers: the iterations, the
validations and the checkpoints; not the start-up before the first iteration).
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as C
from startup_exit import log_times

QUICKSTART = "configs/train/quickstart_cpu.py"
TINY = "tests/configs/tiny.py"
PROJECTED = re.compile(r"projected run ([0-9.]+) (s|min|h) ")
UNITS = {"s": 1, "min": 60, "h": 3600}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="the seconds-long test config, one epoch")
    p.add_argument("--config", help=f"training config (default {QUICKSTART}; {TINY} with --tiny)")
    p.add_argument("--train-images", type=int, default=48, help="synthetic training images")
    p.add_argument("--timeout", type=int, default=1800, help="seconds before a run counts as hung")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the runs (0: torch's default)")
    args = p.parse_args(argv)
    args.config = args.config or (TINY if args.tiny else QUICKSTART)
    return args


def run(args, data: Path, out: Path, overrides: str):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLEARML", "TRAINS", "TINY_", "RESUME_FROM"))}
    env.update(DATASET_PATH=str(data), SBD_DATASET_PATH=str(data / "SBD"), OUTPUT_PATH=str(out))
    env.update(CONFIG_OVERRIDES=overrides, **({"TINY_EPOCHS": "1"} if args.tiny else {}))
    if args.threads > 0:
        env.update(OMP_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, "-m", "py_config_runner", "code/scripts/training.py", args.config]
    proc = subprocess.run(cmd, cwd=C.REPO, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-5000:])
        raise SystemExit(f"{overrides or 'the run'} failed (exit {proc.returncode})")
    return proc


def main(argv=None):
    args = parse_args(argv)
    started, load_before = time.time(), C.load()
    from vocseg.data.synthetic import make_synthetic_voc

    with tempfile.TemporaryDirectory(prefix="vocseg-bench-preflight-") as tmp:
        tmp = Path(tmp)
        train_images = 8 if args.tiny else args.train_images
        make_synthetic_voc(tmp / "data", train_images, 8, size=(96, 96) if args.tiny else (128, 128), seed=0)
        begun = time.time()
        proc = run(args, tmp / "data", tmp / "preflight", "preflight=True")
        preflight_s = time.time() - begun
        line = next(text for text in proc.stdout.splitlines() if text.startswith("preflight: "))
        C.note(line)
        value, unit = PROJECTED.search(line).groups()
        projected = float(value) * UNITS[unit]
        run(args, tmp / "data", tmp / "out", "")
        times = log_times(next((tmp / "out").glob("*/*/training.log")))
        measured = times["done"] - times["first_iteration"]
    C.emit(
        "preflight",
        {
            "projected_s": round(projected, 2),
            "measured_s": round(measured, 2),
            "projected_over_measured": round(projected / measured, 3),
            "preflight_wall_s": round(preflight_s, 2),
            "summary": line,
            "settings": {"config": args.config, "train_images": train_images, "threads": args.threads},
        },
        load_before,
        started,
    )


if __name__ == "__main__":
    main()
