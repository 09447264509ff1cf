"""fp32 and bf16 autocast side by side on this CPU: one training step of the quickstart's model, interleaved.

    python benchmarks/cpu_bf16.py            # ResNet-18 DeepLabV3, batch 8 at 96 px (configs/train/quickstart_cpu.py)
    python benchmarks/cpu_bf16.py --tiny     # seconds; only checks that it runs

The device plan (vocseg.runtime.device_plan) uses bf16 on a CPU only where the kernel reports native bf16
(avx512_bf16, amx_bf16 or Arm's bf16): elsewhere torch emulates it, which this benchmark shows as slower. It
times both on any CPU and prints which one ``amp="auto"`` picks here. Steps alternate fp32, bf16, bf16, fp32 ...
in one process, on the same batch and from the same weights, so that the machine's load hits both alike; the
median step time of each is reported.
"""

import argparse
import statistics
import time

import torch

import _common as C
from vocseg.losses import DeepLabLoss
from vocseg.models import deeplabv3
from vocseg.optim import adamw
from vocseg.runtime.device_plan import Launch, Machine, Request, cpu_has_bf16, decide


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="32 px, batch 2, 2 steps of each")
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=20, help="timed steps of each precision")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps of each precision first")
    args = p.parse_args(argv)
    if args.tiny:
        args.size, args.batch_size, args.steps, args.warmup = 32, 2, 2, 1
    return args


def one_step(model, optimizer, criterion, images, masks, dtype) -> float:
    started = time.perf_counter()
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        loss = criterion(model(images), masks)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def main(argv=None):
    args = parse_args(argv)
    started, load_before = time.time(), C.load()
    torch.manual_seed(12)
    model = deeplabv3("resnet18", num_classes=21, aux_loss=False, pretrained_backbone=False).train()
    optimizer = adamw(model, lr=0.002, weight_decay=1e-2)
    criterion = DeepLabLoss()
    images = torch.randn(args.batch_size, 3, args.size, args.size)
    masks = torch.randint(0, 21, (args.batch_size, args.size, args.size))
    times = {"fp32": [], "bf16": []}
    dtypes = {"fp32": None, "bf16": torch.bfloat16}
    order = ["fp32", "bf16", "bf16", "fp32"]
    for i in range(2 * (args.warmup + args.steps)):
        name = order[i % 4]
        seconds = one_step(model, optimizer, criterion, images, masks, dtypes[name])
        if i >= 2 * args.warmup:
            times[name].append(seconds)
        C.note(f"step {i + 1}: {name} {seconds:.3f} s")
    fp32, bf16 = statistics.median(times["fp32"]), statistics.median(times["bf16"])
    native = cpu_has_bf16()
    auto = decide(Request("cpu", "auto"), Machine(cpu_bf16=native), Launch()).precision_name
    C.emit(
        "cpu_bf16",
        {
            "fp32_s_per_step": round(fp32, 4),
            "bf16_s_per_step": round(bf16, 4),
            "bf16_speedup": round(fp32 / bf16, 3),
            "native_bf16": native,
            "amp_auto_picks": auto,
            "steps_each": args.steps,
            "batch": args.batch_size,
            "size": args.size,
            "torch_threads": torch.get_num_threads(),
        },
        load_before,
        started,
        command="python benchmarks/cpu_bf16.py" + (" --tiny" if args.tiny else ""),
    )


if __name__ == "__main__":
    main()
