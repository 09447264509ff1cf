"""What our Ignite trainer and its handlers cost over a plain PyTorch loop, on the same batches.

    python benchmarks/trainer_overhead.py                 # DeepLabV3-MobileNetV3 at 128 px on the CPU
    python benchmarks/trainer_overhead.py --model resnet50 --size 256
    python benchmarks/trainer_overhead.py --tiny          # seconds; only checks that it runs

Both sides train the same model (same seed, SGD with the 10x head, poly LR, DeepLabLoss) on the same
pre-collated uint8 batches held in memory (no data loading on either side), and evaluate the same
train-eval and val batches every ``val_interval`` epochs.

- plain: a hand-written loop: prepare_batch, forward, loss, backward, step, scheduler; evaluation with
  argmax + bincount confusion matrices.
- ours: ``vocseg.engine.train.train()`` on a config that hands it those batches, so every handler the
  baseline config gets is attached: create_trainer (per-iteration seeding, NaN guard), checkpoints every
  ``save_every_iters`` and at the end, best-model checkpoint, the two evaluators with all metrics and the
  comparison grid, Timer, loss log lines (a tqdm bar instead when stderr is a terminal), TensorBoard, and
  ClearML (offline: HOME is a temporary folder without clearml.conf) with its resource monitor.

The plain side runs with glibc's default allocator settings, as a user's script would; train() (on a CPU
device) tells glibc to keep freed blocks (``machine.tune_cpu_allocator``), which saves the page faults that otherwise
cost 5-10% of every CPU step. ``--pin-malloc`` gives both sides the same fixed allocator settings (through
MALLOC_*_ variables) to isolate what the trainer and its handlers themselves cost.

Each side runs in its own process, in the order plain, ours, ours, plain (... for more repeats), so that
a drift of the machine's load hits both alike. Per iteration: mean time between the ends of consecutive
iterations of an epoch (the first iteration of each epoch, which follows the validation, is left out).
Per epoch: from the end of the previous epoch (or the start) to the end of this one, validation included.
"""

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as C

BASELINE = C.REPO / "configs" / "train" / "baseline_resnet101.py"
SEED = 12


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="64 px, 3 iterations x 2 epochs, one run each")
    p.add_argument("--model", default="mobilenet_v3_large", choices=["mobilenet_v3_large", "resnet50", "resnet101"])
    p.add_argument("--size", type=int, default=128, help="square crop in pixels")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--iters", type=int, default=25, help="training iterations per epoch")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--val-batches", type=int, default=3)
    p.add_argument("--train-eval-batches", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="runs of each side (ABBA order)")
    p.add_argument("--no-clearml", action="store_true", help="leave ClearML out of 'ours'")
    p.add_argument(
        "--pin-malloc",
        action="store_true",
        help="both sides with glibc's mmap/trim thresholds fixed high (MALLOC_*_ env): no page faulting "
        "of autograd buffers, which otherwise varies from process to process",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads, both sides (0: torch's default, one per core); see the docstring",
    )
    p.add_argument("--config", default=str(BASELINE), help="config whose val_interval/log/save intervals to copy")
    p.add_argument("--worker", choices=["plain", "ours"], help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tiny:
        args.size, args.batch_size, args.iters, args.epochs = 64, 2, 3, 2
        args.val_batches, args.train_eval_batches, args.repeats = 1, 1, 1
    args.val_interval = int(C.peek(args.config, "val_interval", 1))
    args.log_every_iters = int(C.peek(args.config, "log_every_iters", 10))
    args.save_every_iters = int(C.peek(args.config, "save_every_iters", 1000))
    return args


# ------------------------------------------------------------------------------------------------------------
# The shared ingredients (the config of 'ours' imports this module to build them).


class InMemoryLoader:
    """Pre-collated batches with what train() reads from a DataLoader (sampler, dataset, len)."""

    def __init__(self, batches, batch_size):
        from vocseg.dataflow import SeededShuffleSampler

        self.batches, self.batch_size = batches, batch_size
        self.dataset = range(len(batches) * batch_size)
        # create_trainer positions it every epoch; the batches themselves are always the same.
        self.sampler = SeededShuffleSampler(len(self.dataset), SEED, batch_size)
        self.batch_sampler = None

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def make_batches(n, batch_size, size, seed):
    import torch

    g = torch.Generator().manual_seed(seed)
    batches = []
    for i in range(n):
        mask = torch.randint(0, 21, (batch_size, size, size), generator=g, dtype=torch.uint8)
        mask[:, :, size - size // 8 :] = 255  # some void, as padding would leave
        batches.append(
            {
                "image": torch.randint(0, 256, (batch_size, 3, size, size), generator=g, dtype=torch.uint8),
                "mask": mask,
                "index": torch.arange(i * batch_size, (i + 1) * batch_size),
                "id": [f"img{i * batch_size + k}" for k in range(batch_size)],
                "size": torch.tensor([[size, size]] * batch_size),
            }
        )
    return batches


def build(settings: dict) -> dict:
    """Model, loss, optimiser, schedule and the three in-memory loaders; call after seeding."""
    from vocseg.losses import DeepLabLoss
    from vocseg.models import deeplabv3
    from vocseg.optim import optimizer_steps, poly_lr, sgd

    s = settings
    model = deeplabv3(s["model"], num_classes=21, aux_loss=False, pretrained_backbone=False)
    train_loader = InMemoryLoader(make_batches(s["iters"], s["batch_size"], s["size"], 1), s["batch_size"])
    val_loader = InMemoryLoader(make_batches(s["val_batches"], s["batch_size"], s["size"], 2), s["batch_size"])
    train_eval_loader = InMemoryLoader(
        make_batches(s["train_eval_batches"], s["batch_size"], s["size"], 3), s["batch_size"]
    )
    optimizer = sgd(model, lr=0.01, momentum=0.9, weight_decay=1e-4, head_lr_mult=10.0)
    lr_scheduler = poly_lr(optimizer, optimizer_steps(train_loader, s["epochs"]), power=0.9)
    return dict(
        model=model,
        criterion=DeepLabLoss(),
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        train_loader=train_loader,
        val_loader=val_loader,
        train_eval_loader=train_eval_loader,
    )


CONFIG = """# Written by benchmarks/trainer_overhead.py: train() on batches held in memory.
import json

from trainer_overhead import build  # the worker runs benchmarks/trainer_overhead.py: its folder is on sys.path

seed = {seed}
device = "cpu"
amp = "off"
num_classes = 21
num_epochs = {epochs}
val_interval = {val_interval}
save_every_iters = {save_every_iters}
log_every_iters = {log_every_iters}
es_patience = None
resume_from = None
_objects = build(json.loads({settings!r}))
model, criterion = _objects["model"], _objects["criterion"]
optimizer, lr_scheduler = _objects["optimizer"], _objects["lr_scheduler"]
train_loader, val_loader, train_eval_loader = (_objects["train_loader"], _objects["val_loader"],
                                               _objects["train_eval_loader"])
"""


# ------------------------------------------------------------------------------------------------------------
# The two sides.


def stamp():
    """(wall s, CPU s, minor page faults). The CPU time of the whole process includes its background threads
    (ClearML, TensorBoard) but not the time a neighbour's process holds the core. Page faults show how often
    glibc handed the big autograd buffers back to the kernel and had to fault them in again."""
    import resource

    return time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def summarise(iteration_ends, epoch_ends, start) -> dict:
    """iteration_ends: [(epoch, stamp)]; epoch_ends: [stamp]; start: stamp before the first iteration."""
    out = {}
    for k, name in ((0, ""), (1, "_cpu")):
        periods = [b[1][k] - a[1][k] for a, b in zip(iteration_ends, iteration_ends[1:]) if a[0] == b[0]]
        edges = [start[k], *(e[k] for e in epoch_ends)]
        out[f"iteration{name}_s"] = sum(periods) / len(periods)
        out[f"iteration{name}_median_s"] = sorted(periods)[len(periods) // 2]
        out[f"epoch{name}_s"] = [b - a for a, b in zip(edges, edges[1:])]
    faults = [b[1][2] - a[1][2] for a, b in zip(iteration_ends, iteration_ends[1:]) if a[0] == b[0]]
    out["page_faults_per_iteration"] = sum(faults) / len(faults)
    out["iterations_timed"] = len(periods)
    return out


def run_plain(args, settings) -> dict:
    import torch

    from vocseg.engine.steps import prepare_batch
    from vocseg.runtime.machine import seed_everything

    seed_everything(SEED)
    o = build(settings)
    model, criterion, optimizer, scheduler = o["model"], o["criterion"], o["optimizer"], o["lr_scheduler"]
    device = torch.device("cpu")

    @torch.no_grad()
    def evaluate(loader):
        model.eval()
        cm = torch.zeros(21 * 21, dtype=torch.int64)
        for batch in loader:
            images, masks = prepare_batch(batch, device)
            pred = model(images)["out"].argmax(1)
            valid = masks != 255
            cm += torch.bincount(masks[valid] * 21 + pred[valid], minlength=21 * 21)
        cm = cm.view(21, 21).double()
        return (cm.diag() / (cm.sum(0) + cm.sum(1) - cm.diag()).clamp(min=1)).mean().item()

    iteration_ends, epoch_ends = [], []
    start = stamp()
    for epoch in range(1, args.epochs + 1):
        for batch in o["train_loader"]:
            model.train()
            images, masks = prepare_batch(batch, device)
            loss = criterion(model(images), masks)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            iteration_ends.append((epoch, stamp()))
        if epoch % args.val_interval == 0 or epoch == args.epochs:
            evaluate(o["train_eval_loader"])
            evaluate(o["val_loader"])
        epoch_ends.append(stamp())
    return summarise(iteration_ends, epoch_ends, start)


def run_ours(args, settings, workdir: Path) -> dict:
    from ignite.engine import Events

    from vocseg.clearml import reports as clearml_reports
    from vocseg.clearml import session as clearml_session
    from vocseg.config import ConfigSource
    from vocseg.engine.train import train

    config_path = workdir / "inmemory.py"
    config_path.write_text(
        CONFIG.format(
            seed=SEED,
            epochs=args.epochs,
            val_interval=args.val_interval,
            save_every_iters=args.save_every_iters,
            log_every_iters=args.log_every_iters,
            settings=json.dumps(settings),
        )
    )
    task = None if args.no_clearml else clearml_session.prepare(ConfigSource(Path(config_path), None, {}))
    clearml_factory = task and functools.partial(clearml_reports.ClearMLTracker, task)
    iteration_ends, epoch_ends, start = [], [], []

    def factory(**kwargs):
        tracker = clearml_factory(**kwargs) if clearml_factory else None
        trainer = kwargs["trainer"]  # registered last: the timestamps include every other handler
        trainer.add_event_handler(Events.STARTED, lambda e: start.append(stamp()))
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: iteration_ends.append((e.state.epoch, stamp())))
        trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: epoch_ends.append(stamp()))
        return tracker

    train(config_path, None, tracker_factory=factory)
    return {
        **summarise(iteration_ends, epoch_ends, start[0]),
        "clearml": clearml_factory is not None,
        "progress": "tqdm" if sys.stderr.isatty() else "log lines",
    }


def worker(args):
    settings = {
        k: getattr(args, k)
        for k in ("model", "size", "batch_size", "iters", "epochs", "val_batches", "train_eval_batches")
    }
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="vocseg-bench-trainer-") as tmp:
        result = run_plain(args, settings) if args.worker == "plain" else run_ours(args, settings, Path(tmp))
        result.update(load=C.load(), threads=torch.get_num_threads())
        Path(args.result).write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------------------------


PINNED_MALLOC = {
    "MALLOC_MMAP_THRESHOLD_": str(2**25),
    "MALLOC_TRIM_THRESHOLD_": str(2**36),  # 32 MiB: glibc's max
    "MALLOC_TOP_PAD_": str(2**30),
}


def side_env(tmp: Path, pin_malloc: bool = False) -> dict:
    """ClearML offline, as a user without a server: a fresh HOME without clearml.conf, no credentials."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLEARML", "TRAINS"))}
    home = tmp / "home"
    home.mkdir(exist_ok=True)
    env.update(HOME=str(home), CLEARML_OUTPUT_PATH=str(tmp / "clearml"), OUTPUT_PATH=str(tmp / "output"))
    if pin_malloc:
        env.update(PINNED_MALLOC)
    return env


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    started, load_before = time.time(), C.load()
    order = (["plain", "ours", "ours", "plain"] * args.repeats)[: 2 * args.repeats]
    runs = {"plain": [], "ours": []}
    with tempfile.TemporaryDirectory(prefix="vocseg-bench-trainer-") as tmp:
        tmp = Path(tmp)
        passthrough = sys.argv[1:] if argv is None else list(argv)
        for i, side in enumerate(order):
            result = tmp / f"{i}-{side}.json"
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                *passthrough,
                "--worker",
                side,
                "--result",
                str(result),
            ]
            proc = subprocess.run(
                cmd,
                env=side_env(tmp, args.pin_malloc),
                stdout=sys.stderr,
                stderr=subprocess.PIPE,
                text=True,
                timeout=1800,
            )
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr[-5000:])
                raise SystemExit(f"{side} run failed (exit {proc.returncode})")
            runs[side].append(json.loads(result.read_text()))
            r = runs[side][-1]
            C.note(
                f"{side}: {r['iteration_s']:.4f} s/iteration ({r['iteration_cpu_s']:.4f} CPU), epochs "
                f"{[round(e, 2) for e in r['epoch_s']]} load {C.load()}"
            )

    def mean(side, key):
        return sum(r[key] for r in runs[side]) / len(runs[side])

    def epochs(side, cpu=""):
        return sum(sum(r[f"epoch{cpu}_s"]) for r in runs[side]) / len(runs[side])

    def spread(side, key="iteration_s"):
        values = [r[key] for r in runs[side]]
        return round((max(values) - min(values)) / (sum(values) / len(values)), 4)

    per_iter = mean("ours", "iteration_s") / mean("plain", "iteration_s")
    per_iter_cpu = mean("ours", "iteration_cpu_s") / mean("plain", "iteration_cpu_s")
    per_epoch = epochs("ours") / epochs("plain")
    C.emit(
        "trainer_overhead",
        {
            "iteration_s": {
                "plain": round(mean("plain", "iteration_s"), 5),
                "ours": round(mean("ours", "iteration_s"), 5),
            },
            "epochs_s": {"plain": round(epochs("plain"), 3), "ours": round(epochs("ours"), 3)},
            "ratio_per_iteration": round(per_iter, 4),
            "ratio_per_epoch_with_validation": round(per_epoch, 4),
            "overhead_per_iteration_pct": round(100 * (per_iter - 1), 2),
            # The same ratios in CPU seconds of each process: insensitive to neighbours taking the cores.
            "ratio_per_iteration_cpu": round(per_iter_cpu, 4),
            "ratio_per_epoch_with_validation_cpu": round(epochs("ours", "_cpu") / epochs("plain", "_cpu"), 4),
            # Noise floor: (max - min) / mean of the per-iteration time over the runs of one side.
            "run_to_run_spread": {"plain": spread("plain"), "ours": spread("ours")},
            "page_faults_per_iteration": {
                "plain": round(mean("plain", "page_faults_per_iteration")),
                "ours": round(mean("ours", "page_faults_per_iteration")),
            },
            "targets": {
                "overhead_per_iteration<=3%": per_iter <= 1.03,
                "overhead_per_iteration_cpu<=3%": per_iter_cpu <= 1.03,
            },
            "runs": runs,
            "settings": {
                k: getattr(args, k)
                for k in (
                    "model",
                    "size",
                    "batch_size",
                    "iters",
                    "epochs",
                    "val_batches",
                    "train_eval_batches",
                    "repeats",
                    "threads",
                    "pin_malloc",
                    "val_interval",
                    "log_every_iters",
                    "save_every_iters",
                    "no_clearml",
                    "tiny",
                )
            },
        },
        load_before,
        started,
    )


if __name__ == "__main__":
    main()
