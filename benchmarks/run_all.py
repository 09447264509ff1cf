"""Runs the CPU benchmarks (dataflow, trainer overhead, startup/exit) one after the other: `make bench`.

    python benchmarks/run_all.py            # about 5-8 minutes on 2 cores
    python benchmarks/run_all.py --tiny     # seconds each

Each benchmark's progress goes to stderr and its one JSON result line is printed here, in order; the last
line sums up the wall time. benchmarks/gpu.py is separate (it needs a CUDA machine).
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = ["dataflow.py", "trainer_overhead.py", "startup_exit.py", "cpu_bf16.py"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--only", nargs="+", choices=BENCHMARKS, help="a subset")
    args = p.parse_args(argv)
    started, failed = time.time(), []
    for name in args.only or BENCHMARKS:
        cmd = [sys.executable, str(HERE / name), *(["--tiny"] if args.tiny else [])]
        print(f"# {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # stderr streams through
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            failed.append(name)
            print(json.dumps({"benchmark": name, "error": f"exit {proc.returncode}"}), flush=True)
        else:
            print(lines[-1], flush=True)
    print(json.dumps({"run_all_wall_s": round(time.time() - started, 1), "failed": failed}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
