"""DeepLabV3-ResNet101 training throughput on one GPU: fp32, AMP, channels_last, torch.compile, MFU.

    python benchmarks/gpu.py                 # crop 513 (the VOC baseline's), batch 8 per GPU, every variant
    python benchmarks/gpu.py --variants bf16_amp fp32
    python benchmarks/gpu.py --tiny          # without CUDA: a CPU smoke test of the measuring code

One training step = forward with the aux head + DeepLabLoss + backward + SGD step, on random uint8 batches
normalised on the device like ``prepare_batch`` (data loading is benchmarks/dataflow.py's subject).
Variants:
  fp32                  float32 (cuDNN may use TF32 for convolutions: torch's default)
  fp16_amp              autocast float16 + GradScaler
  bf16_amp              autocast bfloat16
  bf16_cudnn_benchmark  bf16_amp with torch.backends.cudnn.benchmark (training's default on GPUs)
  bf16_channels_last    bf16_cudnn_benchmark with the model and the batches in channels_last
  bf16_compile          bf16_channels_last + torch.compile(model)
The switches are the config's: amp, cudnn_benchmark, channels_last, compile_model.
FLOPs of one step are counted once with torch.utils.flop_counter.FlopCounterMode on the meta device (shapes
only: the count is the same as on a CPU or a GPU, and the parent process never allocates GPU memory, so each
measuring child has the whole device); MFU = achieved FLOP/s / the GPU's dense bf16 tensor-core peak (table
below, or --peak-tflops), for every variant alike. Each variant runs in a child process of its own.

Without CUDA it prints one JSON line with "measured": false and the command to run on a GPU machine.
"""

import argparse
import json
import subprocess
import sys
import time

import _common as C

VARIANTS = ["fp32", "fp16_amp", "bf16_amp", "bf16_cudnn_benchmark", "bf16_channels_last", "bf16_compile"]
# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' data sheets.
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 80GB HBM3": 989.0,
    "H100 PCIe": 756.0,
    "H100": 756.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 70.0,
    "L4": 121.0,
    "RTX 4090": 165.0,
    "V100": 125.0,
}
COMMAND = "python benchmarks/gpu.py"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="small model, few steps (on CPU without CUDA)")
    p.add_argument("--model", default="resnet101", choices=["resnet101", "resnet50", "mobilenet_v3_large"])
    p.add_argument("--crop-size", type=int, default=513)
    p.add_argument("--batch-size", type=int, default=8, help="per GPU")
    p.add_argument("--steps", type=int, default=30, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (torch.compile compiles here)")
    p.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    p.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, if not in the table")
    p.add_argument("--variant", help=argparse.SUPPRESS)  # worker: measure one variant in this process
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tiny:
        args.model, args.crop_size, args.batch_size, args.steps, args.warmup = "mobilenet_v3_large", 64, 2, 2, 1
    return args


def new_model(args):
    from vocseg.models import deeplabv3

    return deeplabv3(args.model, num_classes=21, aux_loss=True, pretrained_backbone=False)


def build(args, device, variant):
    import torch

    from vocseg.losses import DeepLabLoss

    torch.manual_seed(0)
    model = new_model(args).to(device)
    channels_last = variant in ("bf16_channels_last", "bf16_compile")
    torch.backends.cudnn.benchmark = channels_last or variant == "bf16_cudnn_benchmark"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    dtype = {"fp16_amp": torch.float16, "fp32": None}.get(variant, torch.bfloat16)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    net = torch.compile(model) if variant == "bf16_compile" else model
    criterion = DeepLabLoss(aux_weight=0.4)
    g = torch.Generator().manual_seed(1)
    images = torch.randint(
        0, 256, (args.batch_size, 3, args.crop_size, args.crop_size), generator=g, dtype=torch.uint8
    ).to(device)
    masks = torch.randint(0, 21, (args.batch_size, args.crop_size, args.crop_size), generator=g).to(device)
    mean = torch.tensor([123.7, 116.3, 103.5], device=device).view(1, 3, 1, 1)
    std = torch.tensor([58.4, 57.1, 57.4], device=device).view(1, 3, 1, 1)

    def step():
        x = (images.float() - mean) / std
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = criterion(net(x), masks)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def count_flops(args, device="meta") -> float:
    """FLOPs of one fp32 training step (forward with the aux head, loss, backward) of the whole batch.

    On the meta device by default: tensors without storage, so nothing is computed or allocated (the counter
    takes each matmul's and convolution's FLOPs from the shapes). The SGD update is not counted (it is no
    matmul or convolution) for the meta count and the real one alike."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from vocseg.losses import DeepLabLoss

    device = torch.device(device)
    with torch.device(device):
        model = new_model(args)
        images = torch.zeros(args.batch_size, 3, args.crop_size, args.crop_size, dtype=torch.uint8)
        masks = torch.zeros(args.batch_size, args.crop_size, args.crop_size, dtype=torch.long)
        mean = torch.tensor([123.7, 116.3, 103.5]).view(1, 3, 1, 1)
        std = torch.tensor([58.4, 57.1, 57.4]).view(1, 3, 1, 1)
    counter = FlopCounterMode(display=False)
    with counter:
        loss = DeepLabLoss(aux_weight=0.4)(model((images.float() - mean) / std), masks)
        loss.backward()
    return float(counter.get_total_flops())


def measure(args, variant) -> dict:
    import torch

    device = torch.device(args.device)
    # What the device has free before this child allocates anything: the parent holds none of it.
    free_at_start, total = torch.cuda.mem_get_info(device) if device.type == "cuda" else (None, None)
    step = build(args, device, variant)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync()
    seconds = time.perf_counter() - start
    if not torch.isfinite(loss):
        raise SystemExit(f"{variant}: loss is not finite")
    result = {"images_per_s": args.steps * args.batch_size / seconds, "step_s": seconds / args.steps}
    if device.type == "cuda":
        result.update(
            gpu=torch.cuda.get_device_name(device),
            device_free_gib_at_start=free_at_start / 2**30,
            device_total_gib=total / 2**30,
            peak_memory_gib=torch.cuda.max_memory_allocated(device) / 2**30,
            peak_reserved_gib=torch.cuda.max_memory_reserved(device) / 2**30,
        )
    return result


def peak_tflops(name: str, override):
    if override:
        return override
    for key, value in PEAK_BF16_TFLOPS.items():  # most specific names first
        if key in name:
            return value
    return None


def main(argv=None):
    args = parse_args(argv)
    if args.variant:  # worker
        print(json.dumps(measure(args, args.variant)), flush=True)
        return
    started, load_before = time.time(), C.load()
    import torch

    if not torch.cuda.is_available():
        smoke = None
        if args.tiny:  # keeps the measuring code from rotting on CPU-only machines
            args.device, args.steps, args.warmup = "cpu", 1, 1
            torch.set_num_threads(1)
            smoke = {
                "model": args.model,
                "crop_size": args.crop_size,
                "batch_size": args.batch_size,
                "flops_per_step": count_flops(args),
                "flops_per_step_counted_on_cpu": count_flops(args, "cpu"),  # the meta count's cross-check
                **measure(args, "fp32"),
            }
        C.emit(
            "gpu",
            {
                "measured": False,
                "reason": "no CUDA device on this machine",
                "command": COMMAND,
                "cpu_smoke_test": smoke,
            },
            load_before,
            started,
        )
        return

    # Nothing below touches the GPU in this process: the FLOPs are counted on the meta device and every
    # variant is measured in a child of its own, which finds the whole device free.
    flops = count_flops(args)
    results, name = {}, None
    for variant in args.variants:
        cmd = [sys.executable, __file__, *(sys.argv[1:] if argv is None else argv), "--variant", variant]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            results[variant] = {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
        else:
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            name = name or r.get("gpu")
            results[variant] = r
        C.note(f"{variant}: {results[variant]}")
    peak = peak_tflops(name or "", args.peak_tflops)
    for r in results.values():
        if "step_s" in r:
            achieved = flops / r["step_s"] / 1e12
            r.update(achieved_tflops=achieved, mfu=achieved / peak if peak else None)
            r.pop("gpu", None)
            r.update({k: round(v, 4) for k, v in r.items() if isinstance(v, float)})
    C.emit(
        "gpu",
        {
            "measured": True,
            "gpu": name,
            "peak_bf16_tflops": peak,
            "flops_per_step": flops,
            "flops_per_image": flops / args.batch_size,
            "flops_counted_on": "meta device (no GPU memory in the parent)",
            "variants": results,
            "settings": {
                "model": args.model,
                "crop_size": args.crop_size,
                "batch_size": args.batch_size,
                "steps": args.steps,
                "warmup": args.warmup,
                "torch": torch.__version__,
                "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            },
        },
        load_before,
        started,
    )


if __name__ == "__main__":
    main()
