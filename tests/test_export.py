"""TorchScript and ONNX exports of the quickstart architecture, checked against PyTorch with onnxruntime."""

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import onnxruntime
import pytest
import torch

from vocseg.datasets import VOCSegmentation
from vocseg.errors import UserError
from vocseg.inference.export import ONNX_OPSET, PixelsToLogits, check_agreement
from vocseg.inference.session import inference_config

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/eval/quickstart_cpu.py"


@pytest.fixture(scope="module")
def trained_weights(synthetic_voc, tmp_path_factory):
    """The quickstart's ResNet-18 DeepLabV3 after a few dozen steps: confident, varied logits to compare,
    unlike a fresh head whose outputs are all near zero."""
    torch.manual_seed(0)
    model = inference_config(REPO / CONFIG).model
    data = VOCSegmentation(synthetic_voc, "train")
    images = torch.stack([torch.from_numpy(data[i]["image"]).permute(2, 0, 1) for i in range(8)]).float()
    masks = torch.stack([torch.from_numpy(data[i]["mask"]) for i in range(8)]).long()
    net, optimizer = PixelsToLogits(model), torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(30):
        batch = slice(4 * (step % 2), 4 * (step % 2) + 4)
        loss = torch.nn.functional.cross_entropy(net.forward(images[batch]), masks[batch], ignore_index=255)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    path = tmp_path_factory.mktemp("weights") / "best_model.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_exports_match_pytorch_at_any_size(trained_weights, synthetic_voc, tmp_path):
    out = tmp_path / "export"
    val = synthetic_voc / "VOCdevkit/VOC2012/JPEGImages"
    ids = (synthetic_voc / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt").read_text().split()[:3]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATASET_PATH", "WEIGHTS"))}
    done = subprocess.run(
        [
            sys.executable,
            "code/scripts/export.py",
            "--config",
            CONFIG,
            "--weights",
            str(trained_weights),
            "--out",
            str(out),
            "--images",
            *(str(val / f"{i}.jpg") for i in ids),
        ],
        cwd=REPO,
        env={**env, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "export_check.json").read_text())
    assert sorted(report) == ["onnx", "torchscript"]
    for name, part in report.items():
        assert sorted(r["image"] for r in part["rows"]) == sorted(f"{i}.jpg" for i in ids)
        assert all(r["argmax_agreement"] > 0.999 and r["max_abs_diff"] < 1e-3 for r in part["rows"]), part
        assert done.stdout.count(f"{name} ") >= 4 and f"wrote {out / Path(part['path']).name}" in done.stdout

    # Independently of the script: onnxruntime and TorchScript on a batch of a size the export never saw.
    graph = onnx.load(out / "model.onnx")
    assert [o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")] == [ONNX_OPSET]
    dims = [d.dim_param or d.dim_value for d in graph.graph.input[0].type.tensor_type.shape.dim]
    assert dims[1] == 3 and all(isinstance(d, str) and d for d in (dims[0], dims[2], dims[3]))
    net = PixelsToLogits(inference_config(REPO / CONFIG).model)
    net.model.load_state_dict(torch.load(trained_weights, weights_only=True))
    x = torch.rand(2, 3, 75, 203, generator=torch.Generator().manual_seed(3)) * 255
    with torch.no_grad():
        expected = net(x)
        scripted = torch.jit.load(str(out / "model.torchscript.pt"))(x)
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
    assert expected.shape == got.shape == scripted.shape == (2, 21, 75, 203)
    assert expected.argmax(1).unique().numel() > 1 and expected.std() > 0.5  # a model with opinions
    for other in (got, scripted):
        assert (other.argmax(1) == expected.argmax(1)).double().mean() > 0.999
        assert (other - expected).abs().max() < 1e-3


def test_disagreement_is_refused():
    rows = [
        {"image": "a.jpg", "size": [10, 10], "max_abs_diff": 0.0, "argmax_agreement": 1.0},
        {"image": "b.jpg", "size": [20, 30], "max_abs_diff": 2.0, "argmax_agreement": 0.998},
    ]
    with pytest.raises(UserError, match="onnx export disagrees with PyTorch on b.jpg: argmax agreement 0.99800"):
        check_agreement("onnx", rows)
    check_agreement("onnx", rows[:1])
