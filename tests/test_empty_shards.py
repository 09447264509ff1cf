"""Fewer validation batches than processes: a process without a batch still takes part in the metric reduction
(its counts are zero), and the scores equal those of the same weights scored in one process."""

import json
import subprocess
import sys

import pytest

from test_distributed import REPO, TRAINING, rank_metrics, torchrun
from test_training import make_env, only_run_dir

pytestmark = pytest.mark.slow
SCALARS = ("mIoU", "mIoU_no_bg", "pixel_accuracy", "mean_class_accuracy")


@pytest.fixture(scope="module")
def one_val_batch(synthetic_voc, tmp_path_factory):
    """torchrun, 2 processes, 2 validation images: val_batch_size 4 is 2 per process, so rank 1 gets no batch."""
    out = tmp_path_factory.mktemp("one_val_batch")
    env = make_env(synthetic_voc, out, TINY_EPOCHS=1, TINY_VAL_LIMIT=2)
    proc = subprocess.run(
        torchrun("--nproc_per_node=2", *TRAINING), cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return only_run_dir(out), proc


@pytest.fixture(scope="module")
def scores(one_val_batch, synthetic_voc, tmp_path_factory):
    """``scores(nproc)``: {images: val results} of the trained weights on the first 1, 2 and 3 val images, one
    image per process and batch (so as many batches as images), scored by ``nproc`` processes."""
    weights = one_val_batch[0] / "checkpoints" / "training_checkpoint_6.pt"
    cache = {}

    def run(nproc):
        if nproc not in cache:
            launcher = torchrun(f"--nproc_per_node={nproc}") if nproc > 1 else [sys.executable]
            cmd = [*launcher, "tests/shard_scores.py", str(synthetic_voc), str(weights), "3"]
            proc = subprocess.run(
                cmd,
                cwd=REPO,
                env=make_env(synthetic_voc, tmp_path_factory.mktemp("scores")),
                capture_output=True,
                text=True,
            )
            assert proc.returncode == 0, proc.stderr[-3000:]
            cache[nproc] = {int(k): v for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}
        return cache[nproc]

    return run


def assert_same_scores(found, expected):
    assert {k: found[k] for k in SCALARS} == pytest.approx({k: expected[k] for k in SCALARS}, abs=1e-12)
    assert found["IoU"] == pytest.approx(expected["IoU"], abs=1e-12, nan_ok=True)


def test_training_validates_when_a_rank_has_no_batch(one_val_batch, scores):
    run_dir, proc = one_val_batch
    per_rank = rank_metrics(proc.stderr)
    assert set(per_rank) == {(1, 0), (1, 1)} and per_rank[1, 0] == per_rank[1, 1], proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["completed"] and metrics["val"]["mIoU"] == per_rank[1, 0]
    assert_same_scores(metrics["val"], scores(1)[2])


@pytest.mark.parametrize("nproc", [2, 3])
def test_sharded_scores_equal_one_process(nproc, scores):
    # 1 to 3 batches over 2 and 3 processes: the processes past the last batch score nothing.
    for images in (1, 2, 3):
        assert_same_scores(scores(nproc)[images], scores(1)[images])
