"""Helper of test_empty_shards.py, started by torchrun (or plain python for one process): the val scores of
WEIGHTS on the first 1, 2, ... IMAGES val images, one image per process and batch, as one JSON line of rank 0.

    torchrun --nproc_per_node=N tests/shard_scores.py DATASET_PATH WEIGHTS IMAGES
"""

import json
import sys

import ignite.distributed as idist
import torch

from vocseg.dataflow import get_val_loader
from vocseg.engine.checkpoints import load_weights
from vocseg.engine.metrics import scalar_metrics
from vocseg.engine.steps import create_evaluator
from vocseg.models import deeplabv3


def scores(_, root, weights, images):
    model = deeplabv3("mobilenet_v3_large", aux_loss=False, pretrained_backbone=False)
    load_weights(model, weights)
    evaluator = create_evaluator(model, device=torch.device("cpu"))
    found = {}
    for n in range(1, int(images) + 1):
        loader = get_val_loader(root, batch_size=idist.get_world_size(), num_workers=0, limit_num_samples=n)
        evaluator.run(loader)
        found[n] = {**scalar_metrics(evaluator.state.metrics), "IoU": evaluator.state.metrics["IoU"].tolist()}
    if idist.get_rank() == 0:
        print(json.dumps(found), flush=True)


if __name__ == "__main__":
    with idist.Parallel(backend="gloo" if "WORLD_SIZE" in __import__("os").environ else None) as parallel:
        parallel.run(scores, *sys.argv[1:])
