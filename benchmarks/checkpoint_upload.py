"""What keeping training checkpoints on the ClearML task costs: size, save, upload and download time.

    python benchmarks/checkpoint_upload.py          # the SBD baseline's training checkpoint (ResNet-101, aux head)
    python benchmarks/checkpoint_upload.py --tiny   # a small model: checks the code

The checkpoint is what a run saves (model + SGD momentum after one step + scheduler and trainer state), built on
the CPU with random weights. With a ClearML server configured (CLEARML_CONFIG_FILE, CLEARML_API_* or
~/clearml.conf) it is uploaded through the same code a run uses (vocseg.clearml.checkpoints) to a throwaway task
of project "vocseg benchmarks", fetched back the way a continued run fetches it, and the task deleted;
without a server those figures are "not measured". The throughput is that of the server measured: a
local fileserver shows the overhead of the SDK and the disk, not your network.
"""

import argparse
import tempfile
import time
from pathlib import Path

import _common as C


def build_checkpoint(tiny: bool, folder: Path) -> dict:
    import torch

    from vocseg.losses import DeepLabLoss
    from vocseg.models import deeplabv3
    from vocseg.optim import poly_lr, sgd

    backbone, crop = ("mobilenet_v3_large", 64) if tiny else ("resnet101", 65)
    model = deeplabv3(backbone, aux_loss=not tiny, pretrained_backbone=False, output_stride=8 if not tiny else None)
    optimizer = sgd(model, lr=0.01, momentum=0.9, weight_decay=5e-4)
    scheduler = poly_lr(optimizer, 20000)
    loss = DeepLabLoss(aux_weight=0.0 if tiny else 0.4)(
        model(torch.randn(2, 3, crop, crop)), torch.randint(0, 21, (2, crop, crop))
    )
    loss.backward()
    optimizer.step()  # creates the momentum buffers a real checkpoint holds
    scheduler.step()
    path = folder / "training_checkpoint_1000.pt"
    started = time.monotonic()
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": scheduler.state_dict(),
            "trainer": {"iteration": 1000, "epoch": 3},
        },
        path,
    )
    return {
        "backbone": backbone,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "path": path,
        "size_mb": round(path.stat().st_size / 2**20, 1),
        "save_s": round(time.monotonic() - started, 2),
    }


def upload_and_fetch(path: Path, folder: Path) -> dict:
    from clearml import Task

    from vocseg.clearml.checkpoints import CheckpointUploads, fetch_checkpoint
    from vocseg.clearml.session import unusable_server

    unusable = unusable_server()
    if unusable:
        return {
            "measured": False,
            "why": f"ClearML server {unusable[0]} did not answer ({unusable[1]})"
            if unusable[0]
            else "no ClearML server configured",
        }
    task = Task.create(project_name="vocseg benchmarks", task_name="checkpoint upload")
    try:
        uploads = CheckpointUploads(task, folder / "staging")
        started = time.monotonic()
        uploads.offer(path, 1000)
        uploads.close(upload_pending=True)
        upload_s = time.monotonic() - started
        if uploads.failures or uploads.uploaded != path.name:
            return {"measured": False, "why": "the upload failed (see the warning above)"}
        reread = Task.get_task(task_id=task.id)
        started = time.monotonic()
        fetched = fetch_checkpoint(reread, folder / "fetched")
        fetch_s = time.monotonic() - started
        assert fetched is not None and fetched.stat().st_size == path.stat().st_size
        size = path.stat().st_size / 2**20
        return {
            "measured": True,
            "stored_at": reread.artifacts["training_checkpoint"].url.split("/")[2],
            "upload_s": round(upload_s, 2),
            "upload_mb_per_s": round(size / upload_s, 1),
            "fetch_s": round(fetch_s, 2),
            "fetch_mb_per_s": round(size / fetch_s, 1),
        }
    finally:
        task.delete(delete_artifacts_and_models=True, raise_on_error=False)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args(argv)
    started, load_before = time.time(), C.load()
    with tempfile.TemporaryDirectory(prefix="vocseg-ckpt-bench-") as tmp:
        checkpoint = build_checkpoint(args.tiny, Path(tmp))
        C.note(
            f"checkpoint {checkpoint['size_mb']} MB ({checkpoint['params_m']} M parameters), saved in "
            f"{checkpoint['save_s']} s"
        )
        server = upload_and_fetch(checkpoint.pop("path"), Path(tmp))
        C.note(str(server))
    C.emit(
        "checkpoint_upload",
        {"checkpoint": checkpoint, "clearml": server},
        load_before,
        started,
        command="python benchmarks/checkpoint_upload.py",
    )


if __name__ == "__main__":
    main()
