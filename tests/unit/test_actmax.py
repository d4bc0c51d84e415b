"""Activation maximisation on a model whose layer can only move along one known direction."""
import pytest
import torch
from torch import nn

from unveil import DirectionPairs, ValidationError
from unveil.explain.actmax import maximize_detectors, pattern_cav_directions

torch.set_num_threads(1)


class OneWay(nn.Module):
    """Layer 'feat' = a · (mean colour of each pixel): every change of the layer is along the vector a."""

    def __init__(self, a):
        super().__init__()
        self.conv = nn.Conv2d(3, a.numel(), 1, bias=False)
        self.feat = nn.Identity()
        self.fc = nn.Linear(a.numel(), 2)
        with torch.no_grad():
            self.conv.weight.copy_((a[:, None] / 3.0).expand(-1, 3)[:, :, None, None])

    def forward(self, x):
        return self.fc(self.feat(self.conv(x)).mean(dim=(2, 3)))


def test_delta_lies_along_the_only_encoding_direction():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, generator=g)
    a = a / a.norm()
    model = OneWay(a).eval()
    # detector 0 reads with a filter that is NOT the encoding direction; its signal vector is a
    w0 = a + 0.8 * torch.randn(5, generator=g)
    w1 = -a + 0.5 * torch.randn(5, generator=g)
    # the signal vectors: ±a, oriented so that wᵀŝ > 0 (as the pattern estimator gives them)
    S = torch.stack([a * torch.sign(w0 @ a), a * torch.sign(w1 @ a)])
    pairs = DirectionPairs(torch.stack([w0, w1]) * 4, torch.zeros(2), S)
    u = torch.rand(40, 1, 4, 4, generator=g) * 2 - 1
    ref = a[None, :, None, None] * u  # reference data: the layer's possible activations
    res = maximize_detectors(model, "feat", pairs, steps=40, lr=0.4, image_size=8, reference_maps=ref,
                             random_state=0)
    assert res.images.shape == (2, 3, 8, 8) and float(res.images.min()) >= 0 and float(res.images.max()) <= 1
    assert (res.objective_end > res.objective_start + 0.1).all()
    assert torch.allclose(res.cos_signal, torch.ones(2), atol=1e-4)
    expect = torch.nn.functional.cosine_similarity(S, torch.stack([w0, w1]), dim=1)
    assert torch.allclose(res.cos_filter, expect, atol=1e-4)
    assert (res.cos_filter < 0.95).all()
    assert torch.allclose(res.cos_pattern_cav, torch.ones(2), atol=1e-4)
    s = res.summary()
    assert s["cos_signal"]["mean"] == pytest.approx(1.0, abs=1e-4) and s["signal_beats_filter"] == 1.0
    # the all-positions measurement agrees here (every change is along a)
    assert torch.allclose(res.cos_signal_all, torch.ones(2), atol=1e-4)
    assert torch.allclose(res.cos_filter_all, expect, atol=1e-4)
    assert s["all_positions"]["signal_beats_filter"] == 1.0
    # delta is the detector-weighted change, delta_all the mean change: recomputed by hand
    from unveil.capture import capture
    with torch.no_grad():
        x1, x0 = capture(model, "feat", res.images), capture(model, "feat", res.start_images)
        for r, i in enumerate(res.detectors):
            resp = torch.sigmoid(torch.einsum("dhw,d->hw", x1[r], pairs.decoders[i]) - pairs.biases[i]).flatten()
            by_hand = ((x1[r] - x0[r]).flatten(1) * (resp / resp.sum())).sum(1)
            torch.testing.assert_close(res.delta[r], by_hand, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(res.delta_all[r], (x1[r] - x0[r]).mean(dim=(1, 2)), atol=1e-5, rtol=1e-4)
    assert len(model.feat._forward_hooks) == 0
    assert all(p.requires_grad for p in model.parameters())


def test_pattern_cav_difference_of_means():
    pairs = DirectionPairs(torch.tensor([[10.0, 0.0]]), torch.tensor([5.0]), torch.tensor([[1.0, 0.0]]))
    X = torch.zeros(1, 2, 2, 2)
    X[0, 0, 0, 0] = 1.0
    X[0, 1] = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    X[0, 1, 1, 1] = 3.0
    v = pattern_cav_directions(X, pairs)
    # positive: the one position (1, 2); negatives: (0, 0), (0, 0), (0, 3) -> mean (0, 1)
    torch.testing.assert_close(v, torch.tensor([[1.0, 1.0]]), atol=1e-6, rtol=0)
    assert torch.isnan(pattern_cav_directions(torch.zeros(1, 2, 2, 2), pairs)).all()


def test_actmax_errors():
    model = OneWay(torch.ones(5) / 5 ** 0.5).eval()
    pairs = DirectionPairs(torch.ones(1, 4), torch.zeros(1), torch.ones(1, 4))
    with pytest.raises(ValidationError, match="has 5 channels, but these direction pairs"):
        maximize_detectors(model, "feat", pairs, steps=1, image_size=8)
    assert len(model.feat._forward_hooks) == 0
    with pytest.raises(ValidationError, match="unknown concept index 3"):
        maximize_detectors(model, "feat", DirectionPairs(torch.ones(1, 5), torch.zeros(1), torch.ones(1, 5)),
                           detectors=[3], steps=1, image_size=8)
