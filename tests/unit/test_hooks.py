"""The one hook primitive, :func:`unveil.capture.on_layer`: record and/or replace a layer's output as maps."""
import pytest
import torch
from torch import nn

from unveil import LayerError, ValidationError
from unveil.capture import LayerRecord, TokenLayout, capture, on_layer
from unveil.edit import edit_layer
from unveil.models.vit import vit_tiny

torch.set_num_threads(1)


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(4, 5, 1),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3))
    return net.eval()


class Registers(nn.Module):
    """Tokens with two prefix tokens (CLS + one register), classified from the CLS token."""

    num_prefix_tokens = 2

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Conv2d(3, 6, 4, 4)
        self.prefix = nn.Parameter(torch.randn(1, 2, 6))
        self.block = nn.Linear(6, 6)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.prefix.expand(x.shape[0], -1, -1), t], dim=1)
        t = self.block(t)
        t = t + self.mix(t).mean(dim=1, keepdim=True)  # every token reaches the CLS token
        return self.head(t[:, 0])


def raw_output(model, layer, x):
    """The layer's output seen by a plain forward hook (a copy)."""
    seen = []
    h = dict(model.named_modules())[layer].register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        h.remove()
    return seen[0], logits


@torch.no_grad()
def test_record_equals_forward_hook_output_cnn():
    net, x = tiny_cnn(), torch.rand(2, 3, 6, 6)
    out, logits = raw_output(net, "0", x)
    with on_layer(net, "0", record=True) as rec:
        got = net(x)
    assert isinstance(rec, LayerRecord) and rec.calls == 1
    # the conv output is recorded before the in-place ReLU above it changes it
    assert torch.equal(rec.last, out) and (rec.last < 0).any()
    assert rec.layout.kind == "map"
    assert torch.equal(got, logits)


@torch.no_grad()
def test_identity_replace_leaves_logits_bit_for_bit():
    net, x = tiny_cnn(), torch.rand(2, 3, 6, 6)
    ref = net(x)
    for layer in ("0", "2", "4", "5"):
        with on_layer(net, layer, replace=lambda m: m):
            assert torch.equal(net(x), ref), layer
    vit, xv = vit_tiny(image_size=16, class_token=True).eval(), torch.rand(2, 3, 16, 16)
    ref = vit(xv)
    for tokens in ("patches", "all"):
        with on_layer(vit, "blocks.1", replace=lambda m: m, tokens=tokens):
            assert torch.equal(vit(xv), ref)
    reg, xr = Registers().eval(), torch.rand(2, 3, 12, 12)
    ref = reg(xr)
    with on_layer(reg, "block", replace=lambda m: m):
        assert torch.equal(reg(xr), ref)


@torch.no_grad()
def test_replace_with_a_known_function_cnn():
    net, x = tiny_cnn(), torch.rand(2, 3, 6, 6)
    h = net[2](net[1](net[0](x)))
    by_hand = net[5](net[4](net[3](2 * h + 1)))
    with on_layer(net, "2", replace=lambda m: 2 * m + 1, record=True) as rec:
        got = net(x)
    assert torch.equal(got, by_hand)
    assert torch.equal(rec.last, h)  # the record holds the layer's own output, not the replacement
    # a vector layer: its (N, D) output is passed as (N, D, 1, 1) maps
    v = net[4](net[3](h))
    with on_layer(net, "4", replace=lambda m: m.flip(1), record=True) as rec:
        got = net(x)
    assert rec.last.shape == (2, 5, 1, 1) and torch.equal(rec.last[:, :, 0, 0], v)
    assert torch.equal(got, net[5](v.flip(1)))


@torch.no_grad()
def test_record_tokens_on_the_patch_grid():
    vit, x = vit_tiny(image_size=16, class_token=True).eval(), torch.rand(2, 3, 16, 16)
    out, _ = raw_output(vit, "blocks.0", x)  # (2, 17, 64): CLS + a 4 x 4 grid
    with on_layer(vit, "blocks.0", record=True) as rec:
        vit(x)
    assert rec.last.shape == (2, 64, 4, 4)
    assert torch.equal(rec.last[:, :, 1, 2], out[:, 1 + 1 * 4 + 2])  # row-major patches after the CLS token
    assert rec.layout == TokenLayout("tokens", "patches", 17, 1, (4, 4))
    assert torch.equal(rec.last, capture(vit, "blocks.0", x))
    with on_layer(vit, "blocks.0", record=True, tokens="all") as rec:
        vit(x)
    assert torch.equal(rec.last, out.transpose(1, 2)[..., None])


@torch.no_grad()
def test_replace_tokens_as_computed_by_hand():
    vit, x = vit_tiny(image_size=16, class_token=True).eval(), torch.rand(2, 3, 16, 16)

    def bump(m):
        m = m.clone()
        m[:, :, 3, 0] += 1.0
        return m

    def bump_by_hand(_m, _i, out):
        out = out.clone()
        out[:, 1 + 3 * 4 + 0] += 1.0  # the patch at row 3, column 0; the CLS token (0) is untouched
        return out

    h = vit.blocks[1].register_forward_hook(bump_by_hand)
    try:
        by_hand = vit(x)
    finally:
        h.remove()
    with on_layer(vit, "blocks.1", replace=bump):
        got = vit(x)
    assert torch.equal(got, by_hand) and not torch.equal(got, vit(x))


@torch.no_grad()
def test_prefix_tokens_from_the_model_and_edit_layer_agrees():
    reg, x = Registers().eval(), torch.rand(2, 3, 12, 12)
    out, _ = raw_output(reg, "block", x)  # (2, 2 + 9, 6)
    with on_layer(reg, "block", record=True) as rec:
        reg(x)
    assert rec.last.shape == (2, 6, 3, 3) and rec.layout.n_prefix == 2
    assert torch.equal(rec.last, out[:, 2:].transpose(1, 2).reshape(2, 6, 3, 3))
    seen = []

    def fn(m):
        seen.append(m)
        return m * 0

    with edit_layer(reg, "block", fn):  # the old name: the same primitive, the same maps as capture
        got = reg(x)
    assert torch.equal(seen[0], capture(reg, "block", x))
    with on_layer(reg, "block", replace=lambda m: m * 0):
        assert torch.equal(reg(x), got)


def test_stop_ends_the_forward_and_the_block_quietly():
    net, x = tiny_cnn(), torch.rand(1, 3, 6, 6)
    above = []
    h = net[5].register_forward_hook(lambda *a: above.append(1))
    try:
        with on_layer(net, "2", record=True, stop=True) as rec:
            net(x)
            raise AssertionError("not reached: the forward stops at layer '2'")
    finally:
        h.remove()
    assert rec.calls == 1 and not above


def test_gradients_and_hook_removal():
    net, x = tiny_cnn(), torch.rand(1, 3, 6, 6, requires_grad=True)
    with on_layer(net, "2", record=True, detach=False, clone=False) as rec:
        net(x)
    rec.last.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(RuntimeError, match="boom"):
        with on_layer(net, "2", replace=lambda m: m):
            raise RuntimeError("boom")
    assert all(not m._forward_hooks for m in net.modules())


def test_errors():
    net = tiny_cnn()
    with pytest.raises(LayerError, match="Did you mean"):
        with on_layer(net, "9", record=True):
            pass
    with pytest.raises(ValidationError, match="tokens"):
        with on_layer(net, "0", record=True, tokens="cls"):
            pass
    with pytest.raises(ValidationError, match="record=True"):
        with on_layer(net, "0"):
            pass
    with on_layer(net, "0", record=True) as rec:
        pass
    with pytest.raises(LayerError, match="not called"):
        rec.last


@torch.no_grad()
def test_a_layer_below_the_prefix_tokens_keeps_every_patch():
    vit, x = vit_tiny(image_size=16, class_token=True).eval(), torch.rand(2, 3, 16, 16)
    out, _ = raw_output(vit, "patch_embed", x)  # (2, 16, 64): the CLS token is added after this layer
    with on_layer(vit, "patch_embed", record=True) as rec:
        vit(x)
    assert rec.layout.n_prefix == 0 and rec.last.shape == (2, 64, 4, 4)
    assert torch.equal(rec.last, out.transpose(1, 2).reshape(2, 64, 4, 4))
    assert torch.equal(capture(vit, "patch_embed", x), rec.last)
