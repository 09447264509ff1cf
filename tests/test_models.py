"""Model builders, where the backbone weights come from (never the real network), the DeepLab optimiser recipe."""

import hashlib
import socket
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from torchvision.models import ResNet18_Weights, mobilenet_v3_large, resnet18

from vocseg import models
from vocseg.errors import UserError
from vocseg.models import backbone_source, deeplabv3
from vocseg.optim import poly_lr, sgd


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch, tmp_path):
    """An empty torch hub cache, and every download sent to a proxy port where nothing listens (fails at once)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    proxy = f"http://127.0.0.1:{closed_port()}"
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(name, proxy)
    for name in ("NO_PROXY", "no_proxy", "PRETRAINED_BACKBONE"):
        monkeypatch.delenv(name, raising=False)
    # urlopen builds its opener (and reads the proxy variables) once per process: rebuild it for each test.
    monkeypatch.setattr(urllib.request, "_opener", None)
    return tmp_path / "torch" / "hub" / "checkpoints"


def sha12(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def test_backbone_from_the_hub_cache(offline_hub):
    reference = resnet18()
    offline_hub.mkdir(parents=True)
    cached = offline_hub / ResNet18_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[1]
    torch.save(reference.state_dict(), cached)
    model = deeplabv3("resnet18", aux_loss=False, pretrained_backbone=True)
    assert torch.equal(model.backbone["conv1"].weight, reference.conv1.weight)
    assert torch.equal(model.backbone["layer3"][1].conv2.weight, reference.layer3[1].conv2.weight)
    assert backbone_source(model) == f"hub {ResNet18_Weights.IMAGENET1K_V1.url} (sha256 {sha12(cached)})"


def test_backbone_from_local_file(monkeypatch, tmp_path):
    reference = resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)  # an ImageNet checkpoint: includes fc.* the backbone lacks
    monkeypatch.setenv("PRETRAINED_BACKBONE", str(path))
    model = deeplabv3("resnet18", aux_loss=False, pretrained_backbone=True)
    assert torch.equal(model.backbone["conv1"].weight, reference.conv1.weight)
    assert torch.equal(model.backbone["layer3"][1].conv2.weight, reference.layer3[1].conv2.weight)
    assert backbone_source(model) == f"file {path} (sha256 {sha12(path)})"


def test_mobilenet_backbone_from_local_file(monkeypatch, tmp_path):
    # The segmentation backbone is MobileNet's `features` block: the checkpoint's prefix has to go.
    reference = mobilenet_v3_large()
    path = tmp_path / "mobilenet.pth"
    torch.save(reference.state_dict(), path)
    monkeypatch.setenv("PRETRAINED_BACKBONE", str(path))
    model = deeplabv3("mobilenet_v3_large", aux_loss=False, pretrained_backbone=True)
    assert torch.equal(model.backbone["0"][0].weight, reference.features[0][0].weight)


def test_no_weights_anywhere_stops_with_both_fixes():
    started = time.monotonic()
    with pytest.raises(UserError) as caught:
        deeplabv3("resnet18", aux_loss=False, pretrained_backbone=True)
    message = str(caught.value)
    assert "\n" not in message and time.monotonic() - started < 30
    assert "PRETRAINED_BACKBONE=/path/to/resnet18-f37072fd.pth" in message and "pretrained_backbone=False" in message
    assert ResNet18_Weights.IMAGENET1K_V1.url in message


def test_download_goes_through_the_proxy(monkeypatch):
    seen = []

    class RefusingProxy(BaseHTTPRequestHandler):
        def do_CONNECT(self):  # noqa: N802 (http.server's naming)
            seen.append(self.path)
            self.send_error(403, "no tunnels in tests")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), RefusingProxy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{server.server_address[1]}")
        monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{server.server_address[1]}")
        with pytest.raises(UserError, match="could not be downloaded .*403.*PRETRAINED_BACKBONE"):
            deeplabv3("resnet18", aux_loss=False, pretrained_backbone=True)
    finally:
        server.shutdown()
        server.server_close()
    assert seen == ["download.pytorch.org:443"]


@pytest.mark.parametrize("local_rank", [0, 1])
def test_local_rank_zero_downloads_first(monkeypatch, local_rank):
    calls = []
    monkeypatch.setattr(models.idist, "get_local_rank", lambda: local_rank)
    monkeypatch.setattr(models.idist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(models, "_hub_download", lambda url: calls.append("download") or resnet18().state_dict())
    monkeypatch.setattr(models, "_short_sha256", lambda path: "0" * 12)
    deeplabv3("resnet18", aux_loss=False, pretrained_backbone=True)
    # Rank 0 fills the node's cache before releasing the others, which then only read it.
    assert calls == (["download", "barrier"] if local_rank == 0 else ["barrier", "download"])


def test_failed_download_still_releases_the_waiting_ranks(monkeypatch):
    calls = []
    monkeypatch.setattr(models.idist, "barrier", lambda: calls.append("barrier"))
    with pytest.raises(UserError):
        deeplabv3("resnet18", aux_loss=False, pretrained_backbone=True)
    assert calls == ["barrier"]


def test_random_init_on_purpose_is_recorded():
    model = deeplabv3("resnet18", aux_loss=False, pretrained_backbone=False)
    assert backbone_source(model).startswith("none (pretrained_backbone=False")


def test_missing_backbone_file_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("PRETRAINED_BACKBONE", str(tmp_path / "nope.pth"))
    with pytest.raises(UserError, match="PRETRAINED_BACKBONE=.*nope.pth"):
        deeplabv3("resnet18", aux_loss=False)


def test_unrelated_backbone_file_is_refused(monkeypatch, tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"something.else": torch.zeros(3)}, path)
    monkeypatch.setenv("PRETRAINED_BACKBONE", str(path))
    with pytest.raises(UserError, match="share no tensor"):
        deeplabv3("resnet18", aux_loss=False)


def test_backbone_file_of_another_architecture_is_refused(monkeypatch, tmp_path):
    from torchvision.models import resnet50

    path = tmp_path / "resnet50.pth"
    torch.save(resnet50().state_dict(), path)
    monkeypatch.setenv("PRETRAINED_BACKBONE", str(path))
    with pytest.raises(UserError, match="do not fit the resnet18 backbone"):
        deeplabv3("resnet18", aux_loss=False)


@pytest.mark.parametrize("output_stride, size, rates", [(8, 8, (12, 24, 36)), (16, 4, (6, 12, 18))])
def test_output_stride(output_stride, size, rates):
    model = deeplabv3("resnet50", aux_loss=True, pretrained_backbone=False, output_stride=output_stride).eval()
    with torch.no_grad():
        features = model.backbone(torch.zeros(1, 3, 64, 64))
        out = model(torch.zeros(1, 3, 64, 64))
    assert features["out"].shape[-2:] == (size, size) and features["aux"].shape[-2:] == (size, size)
    assert out["out"].shape == out["aux"].shape == (1, 21, 64, 64)
    aspp_rates = tuple(branch[0].dilation[0] for branch in list(model.classifier[0].convs)[1:4])
    assert aspp_rates == rates


def test_default_layout_is_torchvisions():
    from torchvision.models.segmentation import deeplabv3_resnet50

    ours = deeplabv3("resnet50", aux_loss=True, pretrained_backbone=False).state_dict()
    theirs = deeplabv3_resnet50(weights=None, weights_backbone=None, aux_loss=True).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_output_stride_not_available():
    with pytest.raises(UserError, match="output_stride=8 is not available for the resnet18 backbone: use 16"):
        deeplabv3("resnet18", aux_loss=False, pretrained_backbone=False, output_stride=8)
    with pytest.raises(UserError, match="output_stride=32.*use 8 or 16"):
        deeplabv3("resnet50", pretrained_backbone=False, output_stride=32)


def test_unknown_backbone():
    with pytest.raises(UserError, match="unknown.*resnet101"):
        deeplabv3("vgg16")


def test_bn_momentum_override():
    model = deeplabv3("mobilenet_v3_large", aux_loss=False, pretrained_backbone=False, bn_momentum=0.1)
    momenta = {m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert momenta == {0.1}


def test_heads_at_ten_times_the_backbone_lr_and_poly_decay():
    model = deeplabv3("resnet18", aux_loss=False, pretrained_backbone=False)
    optimizer = sgd(model, lr=0.01, head_lr_mult=10.0)
    backbone, head = optimizer.param_groups
    assert (backbone["lr"], head["lr"]) == (0.01, pytest.approx(0.1))
    assert {id(p) for p in head["params"]} == {id(p) for p in model.classifier.parameters()}
    assert len(backbone["params"]) + len(head["params"]) == len(list(model.parameters()))
    scheduler = poly_lr(optimizer, num_steps=10, power=0.9)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    assert backbone["lr"] == pytest.approx(0.01 * (1 - 4 / 10) ** 0.9)
    assert head["lr"] == pytest.approx(0.1 * (1 - 4 / 10) ** 0.9)
