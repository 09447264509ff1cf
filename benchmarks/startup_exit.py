"""Seconds from the training command to its first iteration, and from its last iteration to process exit.

    python benchmarks/startup_exit.py           # configs/train/quickstart_cpu.py, with and without ClearML
    python benchmarks/startup_exit.py --tiny    # tests/configs/tiny.py, one epoch: only checks that it runs

Runs ``python -m py_config_runner code/scripts/training.py CONFIG`` on a small synthetic dataset (two
batches per epoch: the run's length in between does not matter here), once plainly (OUTPUT_PATH) and once
with ClearML switched on (CLEARML_OUTPUT_PATH) and offline, as for a user without a server: HOME is a
fresh temporary folder without clearml.conf and no CLEARML_* credentials are set.

The command's start and end are time.time() around the subprocess; the points in between come from the
run's training.log (millisecond timestamps): its first line (imports done, config loaded, model built),
"first iteration N started" (first batch loaded), "last iteration N completed", and "done: metrics in"
(after the final validation, the last checkpoint and the trackers' close). The target is on
last iteration -> exit.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import _common as C

QUICKSTART = "configs/train/quickstart_cpu.py"
TINY = "tests/configs/tiny.py"
STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
MARKS = {"first_iteration": "first iteration ", "last_iteration": "last iteration ", "done": "done: metrics in"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="the seconds-long test config, one epoch")
    p.add_argument("--config", help=f"training config (default {QUICKSTART}; {TINY} with --tiny)")
    p.add_argument("--repeats", type=int, default=1, help="runs per mode")
    p.add_argument("--timeout", type=int, default=900, help="seconds before a run counts as hung")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="OMP_NUM_THREADS of the runs (0: torch's default, one per core). On a shared machine two "
        "OpenMP threads stall at every barrier while a neighbour holds a core, which would swamp "
        "what is measured here",
    )
    args = p.parse_args(argv)
    args.config = args.config or (TINY if args.tiny else QUICKSTART)
    return args


def log_times(log: Path) -> dict:
    times = {}
    for line in log.read_text().splitlines():
        m = STAMP.match(line)
        if not m:
            continue
        t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        times.setdefault("first_log", t)
        for key, text in MARKS.items():
            if text in line:
                times.setdefault(key, t)
    return times


def run_once(mode: str, args, data: Path, tmp: Path, index: int) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CLEARML", "TRAINS", "TINY_", "RESUME_FROM", "WEIGHTS_PATH", "OUTPUT_PATH"))
    }
    out = tmp / f"out-{mode}-{index}"
    env.update(DATASET_PATH=str(data), SBD_DATASET_PATH=str(data / "SBD"))
    if args.tiny:
        env.update(TINY_EPOCHS="1")
    if args.threads > 0:
        env.update(OMP_NUM_THREADS=str(args.threads))
    if mode == "clearml":
        home = tmp / f"home-{index}"  # no clearml.conf: offline
        home.mkdir()
        env.update(CLEARML_OUTPUT_PATH=str(out), HOME=str(home))
    else:
        env.update(OUTPUT_PATH=str(out))
    cmd = [sys.executable, "-m", "py_config_runner", "code/scripts/training.py", args.config]
    start = time.time()
    proc = subprocess.run(cmd, cwd=C.REPO, env=env, capture_output=True, text=True, timeout=args.timeout)
    end = time.time()
    logs = sorted(out.glob("*/*/training.log"))
    if proc.returncode != 0 or not logs:
        sys.stderr.write(proc.stderr[-5000:])
        raise SystemExit(f"{mode} run failed (exit {proc.returncode}, logs {logs})")
    t = log_times(logs[-1])
    missing = [k for k in ("first_log", *MARKS) if k not in t]
    if missing:
        raise SystemExit(f"{logs[-1]} lacks the lines {missing}")
    result = {
        "command_to_first_log_s": t["first_log"] - start,
        "command_to_first_iteration_s": t["first_iteration"] - start,
        "first_to_last_iteration_s": t["last_iteration"] - t["first_iteration"],
        "last_iteration_to_done_s": t["done"] - t["last_iteration"],
        "done_to_exit_s": end - t["done"],
        "last_iteration_to_exit_s": end - t["last_iteration"],
        "total_s": end - start,
        "offline_session": "offline session" in proc.stderr if mode == "clearml" else None,
        "load": C.load(),
    }
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}


def main(argv=None):
    args = parse_args(argv)
    started, load_before = time.time(), C.load()
    from vocseg.config import peek_constant
    from vocseg.data.synthetic import make_synthetic_voc

    config = C.REPO / args.config
    batch = int(peek_constant(config, "batch_size", default=4) or 4)
    # Images of the quickstart's synthetic size (96 for the tiny test config).
    pad = 96 if args.tiny else 128
    runs = {"plain": [], "clearml": []}
    with tempfile.TemporaryDirectory(prefix="vocseg-bench-startup-") as tmp:
        tmp = Path(tmp)
        make_synthetic_voc(tmp / "data", 2 * batch, 8, size=(pad, pad), seed=0)
        for i in range(args.repeats):
            for mode in runs:
                runs[mode].append(run_once(mode, args, tmp / "data", tmp, i))
                C.note(f"{mode}: {runs[mode][-1]}")

    def mean(mode, key):
        return round(sum(r[key] for r in runs[mode]) / len(runs[mode]), 3)

    keys = [
        "command_to_first_iteration_s",
        "last_iteration_to_exit_s",
        "command_to_first_log_s",
        "last_iteration_to_done_s",
        "done_to_exit_s",
        "total_s",
    ]
    summary = {mode: {k: mean(mode, k) for k in keys} for mode in runs}
    C.emit(
        "startup_exit",
        {
            **summary,
            "targets": {
                f"{mode}_exit_within_3s_of_last_iteration": all(
                    r["last_iteration_to_exit_s"] <= 3.0 for r in runs[mode]
                )
                for mode in runs
            },
            "runs": runs,
            "settings": {
                "config": args.config,
                "repeats": args.repeats,
                "train_images": 2 * batch,
                "val_images": 8,
                "image_size": pad,
                "threads": args.threads,
                "tiny": args.tiny,
            },
        },
        load_before,
        started,
    )


if __name__ == "__main__":
    main()
