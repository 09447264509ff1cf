"""TorchScript and ONNX exports of a trained model, each checked against PyTorch before it is trusted.

Both take float32 RGB values 0..255 in NCHW of any batch, height and width and return the class
logits (N x 21 x H x W) at the input size: the normalisation is inside, so a consumer needs only the
pixels and an argmax over dim 1.
"""

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vocseg.data.normalize import ImageNetNormalize
from vocseg.errors import UserError

# Pinned so that a torch upgrade cannot silently change what a runtime must support; onnxruntime 1.31 runs it.
ONNX_OPSET = 18
MIN_ARGMAX_AGREEMENT = 0.999


class PixelsToLogits(nn.Module):
    """The segmentation model with the input normalisation folded in and the logits as a plain tensor."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = getattr(model, "module", model).eval()
        self.normalize = ImageNetNormalize()
        self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model(self.normalize(images))
        return out["out"] if isinstance(out, dict) else out


def example_input(height: int = 128, width: int = 160) -> torch.Tensor:
    return torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(0)) * 255


@torch.no_grad()
def export_torchscript(net: PixelsToLogits, path: Path) -> Path:
    # Tracing records the shape reads that the final upsampling uses, so the graph follows any input size.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch marks jit deprecated; LibTorch still loads it
        traced = torch.jit.trace(net, example_input(), check_trace=False)
    traced.save(str(path))
    return path


def export_onnx(net: PixelsToLogits, path: Path, opset: int = ONNX_OPSET) -> Path:
    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height"), 3: torch.export.Dim("width")}
    # The dynamo exporter (via onnxscript) is torch 2.14's default; one self-contained file is easiest to ship.
    torch.onnx.export(
        net,
        (example_input(),),
        str(path),
        dynamo=True,
        opset_version=opset,
        external_data=False,
        input_names=["image"],
        output_names=["logits"],
        dynamic_shapes={"images": dims},
        verbose=False,
    )
    return path


def onnx_runner(path: Path):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"image": x.numpy()})[0])


def torchscript_runner(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(path), map_location="cpu")
    return lambda x: module(x)


@torch.no_grad()
def compare(net: PixelsToLogits, runner, images: dict) -> list[dict]:
    """Per image ({name: HxWx3 RGB uint8}): the export's max abs logit difference and argmax agreement with PyTorch."""
    rows = []
    for name, image in images.items():
        x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None].float()
        expected, got = net(x), runner(x)
        if got.shape != expected.shape:
            raise UserError(
                f"export returned shape {tuple(got.shape)} for a {tuple(x.shape)} input, "
                f"PyTorch {tuple(expected.shape)}"
            )
        rows.append(
            {
                "image": name,
                "size": list(image.shape[:2]),
                "max_abs_diff": float((got - expected).abs().max()),
                "argmax_agreement": float((got.argmax(1) == expected.argmax(1)).double().mean()),
            }
        )
    return rows


def check_agreement(name: str, rows: list[dict]) -> None:
    worst = min(rows, key=lambda r: r["argmax_agreement"])
    if worst["argmax_agreement"] <= MIN_ARGMAX_AGREEMENT:
        raise UserError(
            f"{name} export disagrees with PyTorch on {worst['image']}: "
            f"argmax agreement {worst['argmax_agreement']:.5f} <= {MIN_ARGMAX_AGREEMENT}; do not use it"
        )
