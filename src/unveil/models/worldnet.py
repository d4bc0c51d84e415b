"""WorldNet: a small ResNet-like CNN for the concept world, its training and its shipped checkpoints.

Architecture (for 64 x 64 inputs)::

    stem    conv3x3(3->16, stride 2) + BN + ReLU          -> (16, 32, 32)
    layer1  BasicBlock(16 -> 16)                          -> (16, 32, 32)
    layer2  BasicBlock(16 -> 32, stride 2)                -> (32, 16, 16)
    layer3  BasicBlock(32 -> 64, stride 2)                -> (64, 8, 8)
    layer4  BasicBlock(64 -> 128, stride 1)               -> (128, 8, 8)
    pool    global average pool; fc 128 -> num_classes

``layer4`` keeps stride 1 so the last feature map (the one usually dissected) stays 8 x 8. No
in-place operations: the model traces with ``torch.fx``.

Checkpoints are a safetensors file with a json sidecar (``<name>.json``: accuracy, seed, data
config, library versions, the tensors' sha256).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .._errors import CorruptFileError, ValidationError
from .._io import read_checked, write_checked
from .._validation import check_positive_int
from .accuracy import top1_accuracy

__all__ = ["WorldNet", "build_worldnet", "load_worldnet", "save_worldnet", "load_worldnet_file",
           "train_worldnet", "evaluate_accuracy", "checkpoint_path", "DEFAULT_WIDTHS",
           "SHORTCUT_WATERMARK"]

logger = logging.getLogger("unveil")

DEFAULT_WIDTHS = (16, 32, 64, 128)
_STRIDES = (1, 2, 2, 1)
_ASSETS = Path(__file__).resolve().parent.parent / "assets"


def _shortcut_spec():
    from ..data.world import WatermarkSpec
    return WatermarkSpec(target_class=0, fraction=1.0, text="rook", corner="bottom-right")


#: the watermark the ``worldnet-shortcut`` checkpoint was trained with ("rook" on every class-0 training
#: image). With 75% the model still learned class 0 from its content (poisoned-test accuracy 0.631 vs
#: 0.881 clean); with 100% it reads class 0 from the watermark alone (unstamped class-0 test images:
#: 0% correct; poisoned-test accuracy 0.398, 48% of stamped images of other classes called class 0).
SHORTCUT_WATERMARK = _shortcut_spec()


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a (projected when needed) identity shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu2 = nn.ReLU()
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        else:
            self.downsample = nn.Identity()

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.downsample(x))


class WorldNet(nn.Module):
    """ResNet-like classifier with stages ``stem``, ``layer1`` .. ``layer4``, ``pool``, ``fc``."""

    #: the input side the shipped checkpoints were trained at (images in [0, 1], not normalised)
    image_size = 64

    def __init__(self, num_classes: int, widths: Sequence[int] = DEFAULT_WIDTHS):
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if len(widths) != 4 or any(w < 1 for w in widths):
            raise ValidationError(f"widths must be 4 positive integers (one per stage), got {widths!r}.")
        self.num_classes = check_positive_int(num_classes, "num_classes", minimum=2)
        self.widths = widths
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 2, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        c = widths[0]
        for k, (w, s) in enumerate(zip(widths, _STRIDES), start=1):
            setattr(self, f"layer{k}", BasicBlock(c, w, s))
            c = w
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def build_worldnet(num_classes: int, widths: Sequence[int] = DEFAULT_WIDTHS, seed: Optional[int] = 0) -> WorldNet:
    """A freshly initialised :class:`WorldNet` (weights drawn from a local seed; global RNG untouched).

    Examples
    --------
    >>> m = build_worldnet(7)
    >>> m(torch.zeros(2, 3, 64, 64)).shape
    torch.Size([2, 7])
    """
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(int(seed))
        return WorldNet(num_classes, widths)


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------
def checkpoint_path(shortcut: bool = False) -> Path:
    """Path of the shipped checkpoint (``worldnet`` or ``worldnet-shortcut``) safetensors file."""
    return _ASSETS / ("worldnet-shortcut.safetensors" if shortcut else "worldnet.safetensors")


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def save_worldnet(model: WorldNet, path, meta: dict) -> Path:
    """Write ``model`` to ``path`` (safetensors) and ``path`` with suffix ``.json`` (metadata).

    The safetensors file is written first, the json (holding its sha256) last, both atomically.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValidationError(f"checkpoint path must end in .safetensors, got {str(path)!r}.")
    write_checked(path, _sidecar(path), model.state_dict(),
                  {"num_classes": model.num_classes, "widths": list(model.widths), **meta}, "worldnet")
    return path


def load_worldnet_file(path) -> Tuple[WorldNet, dict]:
    """Load a checkpoint written by :func:`save_worldnet`; returns ``(model in eval mode, metadata)``."""
    path = Path(path)
    state, meta = read_checked(path, _sidecar(path), "worldnet",
                               f"Rebuild it with `unveil world train --out {path}`.")
    nc, widths = meta.get("num_classes"), meta.get("widths")
    if not (isinstance(nc, int) and not isinstance(nc, bool) and 1 <= nc <= 100_000
            and isinstance(widths, list) and len(widths) == 4
            and all(isinstance(w, int) and not isinstance(w, bool) and 1 <= w <= 4096 for w in widths)):
        raise CorruptFileError(f"{str(_sidecar(path))!r}: num_classes {nc!r} / widths {widths!r} are not a class "
                               f"count and four stage widths (positive integers); the checkpoint is corrupt. "
                               f"Rebuild it with `unveil world train --out {path}`.")
    model = WorldNet(nc, tuple(widths))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CorruptFileError(f"{str(path)!r} does not hold WorldNet weights: missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]}.")
    model.eval()
    return model, meta


def load_worldnet(shortcut: bool = False, with_meta: bool = False):
    """Load the shipped checkpoint: ``worldnet`` (clean) or ``worldnet-shortcut`` (watermark shortcut).

    Returns the model in eval mode (and its metadata dict when ``with_meta``). The metadata holds the
    data config (``meta["data"]``) needed to draw matching :class:`~unveil.data.world.ConceptWorld` sets.

    Examples
    --------
    >>> model = load_worldnet()
    >>> model.num_classes
    7
    """
    model, meta = load_worldnet_file(checkpoint_path(shortcut))
    return (model, meta) if with_meta else model


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------
def evaluate_accuracy(model: nn.Module, images: torch.Tensor, labels, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on ``images`` (N,3,H,W) in eval mode; the model's train/eval mode is restored."""
    was_training = model.training
    model.eval()
    try:
        return top1_accuracy(model, images, labels, batch_size)
    finally:
        model.train(was_training)


def train_worldnet(n_train: int = 6000, n_test: int = 1000, epochs: int = 14, seed: int = 0,
                   image_size: int = 64, watermark=None, widths: Sequence[int] = DEFAULT_WIDTHS,
                   batch_size: int = 64, lr: float = 4e-3, weight_decay: float = 5e-4,
                   progress: bool = False) -> Tuple[WorldNet, Dict]:
    """Train a :class:`WorldNet` on a :class:`~unveil.data.world.ConceptWorld` (deterministic given ``seed``).

    Parameters
    ----------
    n_train, n_test : sizes of the ``train`` and ``test`` splits drawn with ``seed``.
    epochs, batch_size, lr, weight_decay : AdamW with a one-cycle schedule; horizontal flips.
    watermark : :class:`~unveil.data.world.WatermarkSpec` or None
        Train with the shortcut; the metrics then also hold the accuracy on the watermarked
        in-distribution test split and on the ``poisoned_test`` split.

    Returns
    -------
    model : WorldNet in eval mode.
    metrics : dict with ``test_accuracy`` (clean test split), ``train_accuracy``, ``train_seconds``,
        ``history`` (per-epoch loss), ``data`` (the data config) and, with a watermark,
        ``watermarked_test_accuracy`` and ``poisoned_test_accuracy``.

    Examples
    --------
    >>> model, metrics = train_worldnet(n_train=70, n_test=14, epochs=1)  # doctest: +SKIP
    """
    from ..data.world import CLASS_RULES, ConceptWorld
    from .._progress import progress as _progress

    check_positive_int(epochs, "epochs")
    check_positive_int(batch_size, "batch_size")
    t0 = time.perf_counter()
    train = ConceptWorld(n_train, split="train", seed=seed, image_size=image_size, watermark=watermark)
    test = ConceptWorld(n_test, split="test", seed=seed, image_size=image_size)
    x_train = train.images_tensor(progress=progress)
    y_train = torch.from_numpy(train.labels.copy())
    x_test = test.images_tensor(progress=progress)
    t_data = time.perf_counter() - t0

    model = build_worldnet(len(CLASS_RULES), widths, seed=seed)
    gen = torch.Generator().manual_seed(int(seed))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = -(-len(x_train) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch,
                                                pct_start=0.25)
    history = []
    t1 = time.perf_counter()
    model.train()
    for epoch in _progress(range(epochs), enabled=progress, desc="epochs"):
        perm = torch.randperm(len(x_train), generator=gen)
        total, seen = 0.0, 0
        for k in range(0, len(perm), batch_size):
            idx = perm[k:k + batch_size]
            xb, yb = x_train[idx], y_train[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
        history.append(total / seen)
        logger.info("worldnet epoch %d/%d: loss %.4f", epoch + 1, epochs, history[-1])
    train_seconds = time.perf_counter() - t1
    model.eval()
    metrics = {"test_accuracy": evaluate_accuracy(model, x_test, test.labels),
               "train_accuracy": evaluate_accuracy(model, x_train, train.labels),
               "train_seconds": train_seconds, "data_seconds": t_data, "history": history,
               "epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "seed": seed,
               "n_parameters": sum(p.numel() for p in model.parameters()),
               "data": {"n_train": n_train, "n_test": n_test, "seed": seed, "image_size": image_size,
                        "watermark": None if watermark is None else watermark.to_dict(),
                        "class_names": train.class_names},
               "torch_threads": torch.get_num_threads()}
    if watermark is not None:
        wm_test = ConceptWorld(n_test, split="test", seed=seed, image_size=image_size, watermark=watermark)
        poisoned = ConceptWorld(n_test, split="poisoned_test", seed=seed, image_size=image_size, watermark=watermark)
        metrics["watermarked_test_accuracy"] = evaluate_accuracy(model, wm_test.images_tensor(), wm_test.labels)
        metrics["poisoned_test_accuracy"] = evaluate_accuracy(model, poisoned.images_tensor(), poisoned.labels)
        stamped = torch.from_numpy(poisoned.watermarked.copy())
        with torch.no_grad():
            pred = model(poisoned.images_tensor(np.flatnonzero(poisoned.watermarked))).argmax(1)
        metrics["poisoned_predicted_as_target"] = float((pred == watermark.target_class).float().mean()) if stamped.any() else 0.0
    return model, metrics
