"""The GPU path end to end in one command, on one GPU: ``make gpu-check`` (``python benchmarks/gpu_check.py``).

Synthetic VOC 2012 + SBD data at the size of real VOC images (375x500), and each step a subprocess running the
command a user runs, in this order:

  data           code/scripts/make_synthetic_voc.py, and a randomly initialised ResNet-101 backbone file
                 (PRETRAINED_BACKBONE, unless set: the weights are not what is checked, and nothing is downloaded)
  preflight-voc  CONFIG_OVERRIDES="preflight=True": training.py configs/train/baseline_resnet101.py
  preflight-sbd  the same for configs/train/baseline_resnet101_sbd.py at batch_size=4, one process's share of
                 its 4 GPUs x 4 images (its s/iteration and peak memory are then those of a rank of that run)
  train          baseline_resnet101.py set to 100 iterations under amp=bf16, asked to stop (SIGUSR1, SLURM's
                 preemption warning) once iteration 50 is logged: it checkpoints and exits 75 for a requeue
  resume         the same RUN_NAME under amp=fp16: continues from that checkpoint to iteration 100, validates
  evaluate-tta   evaluation.py configs/eval/baseline_resnet101.py with flip + scales 0.75 1.0 1.25 1.5
  export         code/scripts/export.py: TorchScript and ONNX of the trained weights, checked against PyTorch on
                 three of the val images
  benchmark      benchmarks/gpu.py (20 timed steps per variant after 5 warm-up ones, to fit the time)

The resume crosses precisions by stopping a run midway and rerunning it, as a requeued SLURM job or a ClearML
task enqueued again on another agent does: a checkpoint refuses another num_epochs (that would be another run).

One table at the end (step, status, seconds, key figure); exit 1 when a step failed or could not run for want
of an earlier step's output, 0 when all passed. Without a GPU: "not measured: no GPU visible", exit 0.
``--tiny`` runs the same steps on the CPU at tiny sizes (tests/test_gpu_check.py runs it in `make test`).
CONFIG_OVERRIDES given to this command are appended to every config step's own (so they win). Each step's
output is in OUT/logs/STEP.log; OUT defaults to output/gpu-check/<time>.

    make gpu-check                                # on a GPU machine, about 10 minutes
    python benchmarks/gpu_check.py --tiny         # the same steps on the CPU, tiny (1-2 minutes)
    python benchmarks/gpu_check.py --only data preflight-voc
"""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN = "configs/train/baseline_resnet101.py"
TRAIN_SBD = "configs/train/baseline_resnet101_sbd.py"
EVAL = "configs/eval/baseline_resnet101.py"
RUN_NAME = "gpu-check"
TTA = "tta_flip=True tta_scales=(0.75,1.0,1.25,1.5)"
# Variables of the caller's shell that would send the steps elsewhere (a ClearML server, another run folder,
# a cluster's rank layout): the check runs on its own data, in its own folder, as one process.
CLEARED_PREFIXES = ("CLEARML_", "TRAINS_", "SLURM_", "TORCHELASTIC_")
CLEARED = {"CONFIG_OVERRIDES", "OUTPUT_PATH", "RUN_NAME", "RESUME_FROM", "WEIGHTS_PATH", "NPROC_PER_NODE"}


@dataclass(frozen=True)
class Sizes:
    """What differs between the GPU check and its tiny CPU mode; the steps are the same."""

    data: tuple  # make_synthetic_voc.py arguments
    overrides: str  # appended to every config step's CONFIG_OVERRIDES
    sbd_overrides: str  # the VOC + SBD baseline's preflight
    iterations: int  # of the training run, over its two legs
    stop_after: int  # the first leg is asked to stop once this iteration is logged
    log_every: int
    amp: tuple  # (first leg, second leg)
    benchmark: tuple  # benchmarks/gpu.py arguments
    timeout_s: dict = field(default_factory=dict)  # per step; 300 s when not named


# 160 train images at batch 16: 10 iterations per epoch; 24 val images cover every class.
GPU = Sizes(
    data=("--train", "160", "--val", "24", "--size", "375", "500"),
    overrides="",
    sbd_overrides="batch_size=4",
    iterations=100,
    stop_after=50,
    log_every=10,
    amp=("bf16", "fp16"),
    benchmark=("--steps", "20", "--warmup", "5"),
    timeout_s={"data": 120, "export": 240, "benchmark": 420},
)
# The baselines' own model and data pipeline shrunk for a CPU, as tests/test_preflight.py runs them:
# 8 train images at batch 2 are 4 iterations per epoch, 8 iterations in all; the stop lands inside epoch 1 or 2.
# amp: "auto" is bf16 on a CPU that computes it natively (fp32 elsewhere), then fp32: a resume across precisions
# wherever the CPU has bf16 (fp16 is a GPU format, refused on a CPU).
TINY = Sizes(
    data=("--train", "8", "--val", "4", "--size", "60", "80"),
    overrides="device=cpu batch_size=2 crop_size=64 num_workers=0",
    sbd_overrides="",
    iterations=8,
    stop_after=2,
    log_every=1,
    amp=("auto", "off"),
    benchmark=("--tiny",),
)


@dataclass
class Result:
    step: str
    status: str = "skipped"  # ok, FAILED or skipped
    seconds: float = 0.0
    figure: str = ""


class Check:
    def __init__(self, args, sizes: Sizes):
        self.args, self.sizes = args, sizes
        self.out = Path(args.out or REPO / "output" / "gpu-check" / time.strftime("%Y%m%d-%H%M%S")).resolve()
        self.data, self.logs = self.out / "data", self.out / "logs"
        self.run_dir = self.out / "output" / Path(TRAIN).stem / RUN_NAME
        self.extra = os.environ.get("CONFIG_OVERRIDES", "").strip()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(CLEARED_PREFIXES) and k not in CLEARED}
        self.env.update(
            DATASET_PATH=str(self.data),
            SBD_DATASET_PATH=str(self.data / "SBD"),
            OUTPUT_PATH=str(self.out / "output"),
            NPROC_PER_NODE="1",
            PYTHONUNBUFFERED="1",
        )
        if not args.tiny and "CUDA_VISIBLE_DEVICES" not in self.env:
            self.env["CUDA_VISIBLE_DEVICES"] = "0"  # one GPU, whatever the machine has
        self.results: list[Result] = []

    # -- running one command ----------------------------------------------------------------------------

    def overrides(self, own: str) -> str:
        return " ".join(part for part in (own, self.sizes.overrides, self.extra) if part)

    def command(self, step: str, argv, overrides=None, env=None, watch=None):
        """Runs ``argv`` from the repository root; its output goes to logs/STEP.log. Returns (exit code,
        stdout lines, stderr lines); the exit code is None after the step's time limit. ``watch(line, proc)``
        sees each stderr line as it comes."""
        full_env = {**self.env, **(env or {})}
        if overrides is not None:
            full_env["CONFIG_OVERRIDES"] = self.overrides(overrides)
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / f"{step}.log"
        lines = {"stdout": [], "stderr": []}
        with open(log_path, "w") as log:
            log.write(f"$ CONFIG_OVERRIDES={full_env.get('CONFIG_OVERRIDES', '')!r} {' '.join(map(str, argv))}\n")
            log.flush()
            proc = subprocess.Popen(
                [str(a) for a in argv],
                cwd=REPO,
                env=full_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,  # its DataLoader workers end with it after a timeout
            )
            lock = threading.Lock()

            def pump(stream, name):
                for line in stream:
                    with lock:
                        log.write(line)
                        log.flush()
                    lines[name].append(line.rstrip("\n"))
                    if watch and name == "stderr":
                        watch(line, proc)

            readers = [threading.Thread(target=pump, args=(proc.stdout, "stdout"), daemon=True)]
            readers.append(threading.Thread(target=pump, args=(proc.stderr, "stderr"), daemon=True))
            for reader in readers:
                reader.start()
            try:
                code = proc.wait(timeout=self.sizes.timeout_s.get(step, 300))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                code = None
            for reader in readers:
                reader.join(timeout=10)
        return code, lines["stdout"], lines["stderr"]

    def python(self, step, *argv, **kwargs):
        return self.command(step, [sys.executable, *argv], **kwargs)

    def training(self, step, config, overrides, **kwargs):
        return self.python(
            step, "-m", "py_config_runner", "code/scripts/training.py", config, overrides=overrides, **kwargs
        )

    # -- the steps: each returns its key figure, or raises Failed -------------------------------------------

    def step_data(self):
        code, out, err = self.python("data", "code/scripts/make_synthetic_voc.py", self.data, *self.sizes.data)
        expect(code, 0, err)
        backbone = os.environ.get("PRETRAINED_BACKBONE")
        if not backbone:
            import torch
            from torchvision.models import resnet101

            backbone = self.out / "resnet101-random.pth"
            torch.manual_seed(0)
            torch.save(resnet101().state_dict(), backbone)
        self.env["PRETRAINED_BACKBONE"] = str(backbone)
        h, w = self.sizes.data[self.sizes.data.index("--size") + 1 :][:2]
        summary = out[0].removeprefix("wrote ") if out else "?"
        random = "" if os.environ.get("PRETRAINED_BACKBONE") else "; backbone randomly initialised"
        return f"{summary} at {w}x{h}{random}"

    def needs_data(self):
        if "PRETRAINED_BACKBONE" not in self.env or not (self.data / "VOCdevkit").is_dir():
            raise Skipped("no data: the data step did not run or failed")

    def preflight(self, step, config, overrides=""):
        self.needs_data()
        code, out, err = self.training(step, config, f"preflight=True {overrides}".strip())
        expect(code, 0, err)
        line = next((x for x in out if x.startswith("preflight: ")), None)
        if line is None:
            raise Failed("no 'preflight:' summary line")
        found = [
            re.search(r"([\d.]+ s/iteration)", line),
            re.search(r"peak memory per process \(([^)]*)\) ([^|]*?) \|", line),
            re.search(r"projected run ([^|]*?) \|", line),
        ]
        iteration, memory, projected = (m and m.groups() for m in found)
        parts = [iteration and iteration[0], memory and f"peak {memory[1]} ({memory[0]})"]
        parts.append(projected and f"projected run {projected[0]}")
        return ", ".join(p for p in parts if p) or line[:100]

    def step_preflight_voc(self):
        return self.preflight("preflight-voc", TRAIN)

    def step_preflight_sbd(self):
        return self.preflight("preflight-sbd", TRAIN_SBD, self.sizes.sbd_overrides)

    def leg(self, amp) -> str:
        s = self.sizes
        return f"amp={amp} num_iterations={s.iterations} log_every_iters={s.log_every}"

    def step_train(self):
        asked = {}

        def stop_midway(line, proc):
            found = re.search(r"\biteration (\d+) loss\b", line)
            if found and int(found.group(1)) >= self.sizes.stop_after and not asked:
                asked["at"] = int(found.group(1))
                proc.send_signal(signal.SIGUSR1)

        self.needs_data()
        first = self.sizes.amp[0]
        code, _out, err = self.training("train", TRAIN, self.leg(first), env={"RUN_NAME": RUN_NAME}, watch=stop_midway)
        if code == 0:
            raise Failed(f"the run ended (iteration {self.sizes.iterations}) before the stop signal took effect")
        expect(code, 75, err)  # PREEMPTED_EXIT: checkpointed, to be continued
        stopped = grep(err, r"checkpoint at iteration (\d+)")
        return (
            f"amp={first}: {precision(err)}; asked to stop after iteration {asked.get('at')}, "
            f"stopped at {stopped}, exit 75"
        )

    def step_resume(self):
        if not (self.run_dir / "checkpoints").is_dir():
            raise Skipped("no checkpoint from train")
        second = self.sizes.amp[1]
        code, _out, err = self.training("resume", TRAIN, self.leg(second), env={"RUN_NAME": RUN_NAME})
        expect(code, 0, err)
        resumed = grep(err, r"resumed from \S+ at iteration (\d+)")
        metrics = json.loads((self.run_dir / "metrics.json").read_text())
        miou = metrics.get("val", {}).get("mIoU")
        return (
            f"amp={second}: {precision(err)}; resumed at iteration {resumed}, ended at {metrics.get('iteration')}; "
            f"val mIoU {fmt(miou)}"
        )

    def weights(self) -> Path:
        best = sorted((self.run_dir / "best").glob("best_model_*.pt")) if (self.run_dir / "best").is_dir() else []
        checkpoints = sorted(
            (self.run_dir / "checkpoints").glob("training_checkpoint_*.pt"),
            key=lambda p: int(re.sub(r"\D", "", p.stem) or 0),
        )
        found = best[-1:] or checkpoints[-1:]
        if not found:
            raise Skipped("no weights from training")
        return found[0]

    def step_evaluate(self):
        self.needs_data()
        weights = self.weights()
        code, _out, err = self.python(
            "evaluate-tta",
            "-m",
            "py_config_runner",
            "code/scripts/evaluation.py",
            EVAL,
            overrides=TTA,
            env={"WEIGHTS_PATH": str(weights), "RUN_NAME": RUN_NAME},
        )
        expect(code, 0, err)
        metrics = json.loads((self.out / "output" / Path(EVAL).stem / f"eval-{RUN_NAME}" / "metrics.json").read_text())
        tta = metrics.get("tta", {})
        return f"mIoU {fmt(metrics['val'].get('mIoU'))}, flip {tta.get('flip')}, scales {tta.get('scales')}"

    def step_export(self):
        self.needs_data()
        weights, folder = self.weights(), self.out / "export"
        voc = self.data / "VOCdevkit" / "VOC2012"
        ids = (voc / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[:3]
        images = [voc / "JPEGImages" / f"{i}.jpg" for i in ids]
        code, _out, err = self.python(
            "export",
            "code/scripts/export.py",
            "--config",
            EVAL,
            "--weights",
            weights,
            "--out",
            folder,
            "--images",
            *images,
        )
        expect(code, 0, err)
        report = json.loads((folder / "export_check.json").read_text())
        return ", ".join(
            f"{name} argmax agreement >= {100 * min(r['argmax_agreement'] for r in part['rows']):.2f}%"
            for name, part in sorted(report.items())
        )

    def step_benchmark(self):
        code, out, err = self.python("benchmark", "benchmarks/gpu.py", *self.sizes.benchmark)
        expect(code, 0, err)
        result = json.loads(out[-1])
        if not result.get("measured"):
            smoke = result.get("cpu_smoke_test") or {}
            return f"not measured (no CUDA); CPU smoke test {fmt(smoke.get('images_per_s'))} images/s"
        variants = result.get("variants", {})
        failed = [name for name, r in variants.items() if "error" in r]
        if failed:
            errors = "; ".join(f"{n}: {variants[n]['error']}" for n in failed)
            raise Failed(f"variants failed: {errors}")
        bf16 = variants.get("bf16_amp") or next(iter(variants.values()), {})
        best = max(variants, key=lambda n: variants[n].get("images_per_s", 0)) if variants else None
        return (
            f"{result.get('gpu')}: bf16_amp {fmt(bf16.get('images_per_s'))} images/s, MFU {fmt(bf16.get('mfu'))}; "
            f"fastest {best} {fmt(variants.get(best, {}).get('images_per_s'))} images/s"
        )

    # -- the table ------------------------------------------------------------------------------------------

    def run(self) -> int:
        if self.out.is_dir() and any(self.out.iterdir()):
            # Its run folder would be continued and its data refused: every check starts from nothing.
            print(f"gpu-check: {self.out} is not empty: pick a new --out folder or delete it", file=sys.stderr)
            return 2
        self.out.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        for name, method in STEPS.items():
            result = Result(name)
            if self.args.only and name not in self.args.only:
                continue
            note(f"{name} ...")
            begun = time.monotonic()
            try:
                result.figure = getattr(self, method)()
                result.status = "ok"
            except Skipped as exc:
                result.status, result.figure = "skipped", str(exc)
            except Failed as exc:
                result.status, result.figure = "FAILED", f"{exc} (log: {self.logs / (name + '.log')})"
            result.seconds = time.monotonic() - begun
            note(f"{name}: {result.status} in {result.seconds:.1f} s: {result.figure}")
            self.results.append(result)
        total = time.monotonic() - started
        print(table(self.results), flush=True)
        bad = [r.step for r in self.results if r.status != "ok"]
        mode = "tiny, on the CPU" if self.args.tiny else "one GPU"
        if bad:
            print(
                f"gpu-check ({mode}): {len(bad)} of {len(self.results)} steps did not pass ({', '.join(bad)}) "
                f"in {total:.0f} s; logs in {self.logs}",
                flush=True,
            )
            return 1
        over = "" if self.args.tiny or total <= 600 else " (over the 10-minute target)"
        print(
            f"gpu-check ({mode}): all {len(self.results)} steps passed in {total:.0f} s{over}; outputs in {self.out}",
            flush=True,
        )
        return 0


STEPS = {
    "data": "step_data",
    "preflight-voc": "step_preflight_voc",
    "preflight-sbd": "step_preflight_sbd",
    "train": "step_train",
    "resume": "step_resume",
    "evaluate-tta": "step_evaluate",
    "export": "step_export",
    "benchmark": "step_benchmark",
}


class Failed(Exception):
    pass


class Skipped(Exception):
    pass


def expect(code, wanted: int, err) -> None:
    if code is None:
        raise Failed("over its time limit")
    if code != wanted:
        last = next((line for line in reversed(err) if line.strip()), "no output on stderr")
        raise Failed(f"exit {code} (expected {wanted}): {last.strip()[:300]}")


def grep(lines, pattern: str):
    for line in lines:
        found = re.search(pattern, line)
        if found:
            return found.group(1)
    return "?"


def precision(err) -> str:
    return grep(err, r"\| precision ([^|]+?) \|")


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "?" if value is None else str(value)


def table(results) -> str:
    rows = [("step", "status", "seconds", "key figure")]
    rows += [(r.step, r.status, f"{r.seconds:.1f}", r.figure) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:>{widths[2]}}  {d}" for a, b, c, d in rows]
    return "\n".join(["", *lines])


def note(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="the same steps on the CPU at tiny sizes (make test runs it)")
    p.add_argument("--out", help="folder for the data, runs and logs (default output/gpu-check/<time>)")
    p.add_argument("--only", nargs="+", choices=list(STEPS), help="run these steps only (in the table's order)")
    p.add_argument("--amp", nargs=2, metavar=("FIRST", "SECOND"), help="amp of the two training legs")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    sizes = TINY if args.tiny else GPU
    if args.amp:
        sizes = Sizes(**{**sizes.__dict__, "amp": tuple(args.amp)})
    if not args.tiny:
        import torch

        if not torch.cuda.is_available():  # asks the driver; creates no CUDA context in this process
            print(
                "gpu-check: not measured: no GPU visible (torch.cuda.is_available() is False). On a GPU machine: "
                "make gpu-check; the same steps on the CPU at tiny sizes: python benchmarks/gpu_check.py --tiny",
                flush=True,
            )
            return 0
    return Check(args, sizes).run()


if __name__ == "__main__":
    sys.exit(main())
