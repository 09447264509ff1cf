"""Same-size validation batches: no padding needed, each image exactly once across ranks."""

import numpy as np
from PIL import Image

from vocseg.data.size_grouped import SizeGroupedBatches, image_sizes


def test_batches_hold_one_size_and_cover_every_index_once():
    sizes = [(375, 500), (500, 375), (375, 500), (333, 500), (375, 500), (500, 375), (375, 500)]
    indices = list(range(10, 17))
    for world in (1, 2, 3):
        shards = [list(SizeGroupedBatches(indices, sizes, 2, world, rank)) for rank in range(world)]
        seen = [i for shard in shards for batch in shard for i in batch]
        assert sorted(seen) == indices
        for shard in shards:
            assert shard, "every rank scores something"
            for batch in shard:
                assert 1 <= len(batch) <= 2 and len({sizes[i - 10] for i in batch}) == 1


def test_sizes_come_from_headers_of_the_real_files(tmp_path):
    class Files:
        image_paths = []

    for i, (h, w) in enumerate([(40, 60), (60, 40)]):
        path = tmp_path / f"{i}.jpg"
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(path)
        Files.image_paths.append(path)
    import torch

    subset = torch.utils.data.Subset(Files(), [1, 0])
    assert image_sizes(Files(), [0, 1]) == [(40, 60), (60, 40)]
    assert image_sizes(subset, [0]) == [(60, 40)]
