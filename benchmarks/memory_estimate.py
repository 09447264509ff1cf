"""GPU memory per process of the baseline recipes, estimated on the CPU (no GPU needed).

    python benchmarks/memory_estimate.py            # both baselines at their crop, batch 4 and 8 per GPU
    python benchmarks/memory_estimate.py --tiny     # small model and crop: checks the counting code

Estimate = fp32 weights + gradients + SGD momentum (12 bytes per parameter) + the tensors autograd keeps for
backward in one fp32 training forward (counted once per storage with saved_tensors_hooks, per image, times the
batch). Not counted: cuDNN workspaces, the caching allocator's slack, the CUDA context (~0.5 GiB), and the
input batch itself; AMP keeps most saved activations in 16 bits, roughly halving that part.
"""

import argparse
import time

import _common as C

# name -> (backbone, output stride, aux head, crop): the models configs/train/baseline_resnet101*.py build.
RECIPES = {"baseline_resnet101": ("resnet101", 16, False, 513), "baseline_resnet101_sbd": ("resnet101", 8, True, 512)}


def saved_bytes(model, crop: int) -> int:
    import torch

    from vocseg.losses import DeepLabLoss

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    # Batch 2: ASPP's image-pooling BatchNorm cannot train on one image; the count is halved below.
    x = torch.randn(2, 3, crop, crop)
    target = torch.randint(0, 21, (2, crop, crop))
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = DeepLabLoss(aux_weight=0.4)(model(x), target)
    del loss
    return sum(seen.values()) // 2


def estimate(name, backbone, output_stride, aux, crop, batches):
    from vocseg.models import deeplabv3

    model = deeplabv3(backbone, aux_loss=aux, pretrained_backbone=False, output_stride=output_stride)
    n_params = sum(p.numel() for p in model.parameters())
    per_image = saved_bytes(model, crop)
    gib = 2**30
    return {
        "recipe": name,
        "backbone": backbone,
        "output_stride": output_stride,
        "aux": aux,
        "crop": crop,
        "params_m": round(n_params / 1e6, 2),
        "optimizer_state_gib": round(12 * n_params / gib, 2),
        "activations_gib_per_image": round(per_image / gib, 3),
        "estimate_gib": {str(b): round((12 * n_params + b * per_image) / gib, 2) for b in batches},
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args(argv)
    started, load_before = time.time(), C.load()
    import torch

    torch.set_num_threads(1 if args.tiny else torch.get_num_threads())
    recipes = {"tiny": ("resnet50", 16, True, 64)} if args.tiny else RECIPES
    results = []
    for name, (backbone, stride, aux, crop) in recipes.items():
        results.append(estimate(name, backbone, stride, aux, crop, (4, 8)))
        C.note(str(results[-1]))
    C.emit(
        "memory_estimate", {"recipes": results}, load_before, started, command="python benchmarks/memory_estimate.py"
    )


if __name__ == "__main__":
    main()
