"""Segmentation loss for torchvision's dict outputs, ignoring void (255) pixels."""

from torch import nn

from vocseg.data.voc import IGNORE_INDEX


class DeepLabLoss(nn.Module):
    """Cross-entropy on ``out`` plus ``aux_weight`` x cross-entropy on ``aux`` when the model has it."""

    def __init__(self, aux_weight: float = 0.4, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.aux_weight = aux_weight
        self.ce = nn.CrossEntropyLoss(ignore_index=ignore_index)

    def forward(self, outputs, target):
        if not isinstance(outputs, dict):
            return self.ce(outputs, target)
        loss = self.ce(outputs["out"], target)
        if self.aux_weight and "aux" in outputs:
            loss = loss + self.aux_weight * self.ce(outputs["aux"], target)
        return loss
