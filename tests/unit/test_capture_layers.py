"""Layer names, hooks that never survive, and capture of feature maps."""
import pytest
import torch
from torch import nn

from unveil import LayerError, ValidationError
from unveil.capture import capture, get_layer, hooks, list_layers
from unveil.models import load_model


@pytest.fixture(scope="module")
def resnet():
    model, _, _ = load_model("resnet18", num_classes=5)
    return model


def _n_hooks(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def test_unknown_layer_suggests_closest(resnet):
    with pytest.raises(LayerError, match=r"no layer named 'layer5'.*Did you mean 'layer4'"):
        get_layer(resnet, "layer5")
    with pytest.raises(LayerError, match=r"Did you mean 'layer1\.0\.conv2' or 'layer1\.0\.conv1'"):
        capture(resnet, "layer1.0.conv", torch.zeros(1, 3, 32, 32))


def test_list_layers_shapes_and_buffers_untouched():
    model, _, _ = load_model("resnet18", num_classes=5)
    model.train()  # a model in train mode: the probe must not change its running statistics
    before = {k: v.clone() for k, v in model.named_buffers()}
    infos = {i.name: i for i in list_layers(model, 64)}
    assert infos["layer4"].shape == (1, 512, 2, 2)
    assert infos["layer1"].shape == (1, 64, 16, 16)
    assert infos["fc"].shape == (1, 5)
    assert infos["layer4"].cut is True and infos["layer1.0.conv1"].cut is False
    assert infos["layer1.0.relu"].calls == 2  # the block's ReLU module runs twice
    assert model.training
    for k, v in model.named_buffers():
        assert torch.equal(v, before[k]), k
    assert _n_hooks(model) == 0


def test_no_hook_survives_normal_exit_and_exception(resnet):
    x = torch.rand(2, 3, 32, 32)
    with hooks(resnet, ["layer2", "layer3"]) as rec:
        assert _n_hooks(resnet) == 2
        resnet(x)
    assert rec["layer2"].shape == (2, 128, 4, 4)
    assert _n_hooks(resnet) == 0
    with pytest.raises(RuntimeError, match="boom"):
        with hooks(resnet, "layer2"):
            assert _n_hooks(resnet) == 1
            raise RuntimeError("boom")
    assert _n_hooks(resnet) == 0
    # an exception raised inside the model's forward (wrong input) while capturing
    with pytest.raises(RuntimeError):
        capture(resnet, "layer2", torch.rand(2, 5, 32, 32))
    assert _n_hooks(resnet) == 0
    capture(resnet, "layer3", x, batch_size=1)
    assert _n_hooks(resnet) == 0


def test_capture_matches_manual_forward_and_leaves_model_as_given(resnet):
    x = torch.rand(5, 3, 32, 32)
    maps = capture(resnet, "layer2", x, batch_size=2)
    with torch.no_grad():
        ref = resnet.layer2(resnet.layer1(resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(x))))))
    assert maps.shape == (5, 128, 4, 4) and maps.dtype == torch.float32
    assert torch.allclose(maps, ref, rtol=1e-5, atol=1e-5)
    assert not resnet.training  # load_model put it in eval mode; capture did not change that
    model, _, _ = load_model("resnet18")
    model.train()
    capture(model, "layer1", x[:2])
    assert model.training  # never switched to eval silently


def test_capture_copies_outputs_before_inplace_ops():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(inplace=True), nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(3, 3, 4, 4)
    net(x)
    maps = capture(net, "0", x)
    assert (maps < 0).any(), "the conv output must be captured before the in-place ReLU"


def test_shared_module_is_refused():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.conv(self.conv(x)).mean(dim=(2, 3))

    with pytest.raises(LayerError, match="called 2 times"):
        capture(Twice(), "conv", torch.rand(1, 3, 4, 4))


def test_capture_bad_images(resnet):
    with pytest.raises(ValidationError, match=r"\(N, C, H, W\) tensor"):
        capture(resnet, "layer1", torch.rand(3, 32, 32))
    with pytest.raises(ValidationError, match="batch_size"):
        capture(resnet, "layer1", torch.rand(1, 3, 32, 32), batch_size=0)


def test_vit_tokens_become_grid_and_cls_is_explicit():
    model, _, _ = load_model("vit-tiny")
    x = torch.rand(2, 3, 32, 32)
    with hooks(model, "blocks.1") as rec:
        with torch.no_grad():
            model(x)
    tokens = rec["blocks.1"]  # (N, T, D)
    maps = capture(model, "blocks.1", x)
    assert maps.shape == (2, 64, 8, 8)
    # position (i, j) of the grid is token i * 8 + j
    assert torch.allclose(maps[:, :, 2, 5], tokens[:, 2 * 8 + 5, :], rtol=0, atol=1e-6)

    cls_model, _, _ = load_model("vit-tiny", class_token=True)
    with hooks(cls_model, "blocks.1") as rec:
        with torch.no_grad():
            cls_model(x)
    tokens = rec["blocks.1"]
    patches = capture(cls_model, "blocks.1", x)
    everything = capture(cls_model, "blocks.1", x, tokens="all")
    assert patches.shape == (2, 64, 8, 8) and everything.shape == (2, 64, 65, 1)
    assert torch.allclose(everything[:, :, 0, 0], tokens[:, 0], rtol=0, atol=1e-6)  # CLS first
    assert torch.allclose(patches[:, :, 0, 0], tokens[:, 1], rtol=0, atol=1e-6)     # CLS dropped
    with pytest.raises(ValidationError, match="tokens must be one of"):
        capture(cls_model, "blocks.1", x, tokens="cls")
