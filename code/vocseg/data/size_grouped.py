"""Batches of same-size images, so full-resolution scoring needs no padding; each image once across ranks.

Padding a validation image changes the predictions on its real pixels (ASPP's image pooling and the
receptive fields see the padding), so images are scored at their own size: a batch only holds images of one
height and width, and a size that occurs once is a batch of one.
"""

from collections import defaultdict
from collections.abc import Sequence

from torch.utils.data import Sampler, Subset

from vocseg.datasets import image_size
from vocseg.errors import UserError


def image_sizes(dataset, indices: Sequence[int]) -> list:
    """(height, width) of the images behind ``indices``, read from the file headers (nothing is decoded)."""
    while isinstance(dataset, Subset):
        indices = [dataset.indices[i] for i in indices]
        dataset = dataset.dataset
    # The stored size: EXIF orientation is ignored, as when reading.
    return [image_size(dataset.image_paths[index]) for index in indices]


class SizeGroupedBatches(Sampler):
    """Rank ``rank``'s share of same-size batches of at most ``batch_size`` images.

    The batches are made once for all ranks (deterministically) and dealt out largest first, round robin,
    so every index appears in exactly one batch of one rank; shard lengths may differ by a few batches,
    which is harmless as metrics are reduced once at the end.
    """

    def __init__(self, indices: Sequence[int], sizes: Sequence, batch_size: int, num_replicas: int = 1, rank: int = 0):
        if batch_size < 1:
            raise UserError(f"validation batch size {batch_size} must be at least 1: raise val_batch_size")
        self.num_images = len(indices)  # over all ranks
        groups = defaultdict(list)
        for index, size in zip(indices, sizes):
            groups[tuple(size)].append(index)
        batches = [
            group[i : i + batch_size] for _, group in sorted(groups.items()) for i in range(0, len(group), batch_size)
        ]
        batches.sort(key=len, reverse=True)  # stable: same-length batches keep their size order
        self.batches = batches[rank::num_replicas]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    def set_epoch(self, epoch: int) -> None:  # same batches every validation
        pass
