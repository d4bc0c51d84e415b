"""Which direction to edit with, on planted data where the right one is known.

- Linear latent factors (the paper's synthetic recipe): every concept is written along one direction
  s_i with a continuous strength, so the positive-only signal vector ŝ_i is the exact encoder and the
  mean difference carries the other concepts' anti-correlation (method.md §3).
- A stamped shortcut whose detector also reads a nuisance channel: the stamp is a fixed vector (no
  variation in strength), so within the detector's positives the only variation is the nuisance and
  ŝ points at it, while the mean difference ("absent → present") points at the stamp.
"""
import inspect

import pytest
import torch
from torch import nn

from unveil import DirectionPairs, ValidationError
from unveil.data.synthetic import make_synthetic, train_head
from unveil.edit import CorrectedModel, choose_concepts, choose_strength, mean_difference_directions
from unveil.experiments.editing import METRICS, EditingReport, score_edit_directions

torch.set_num_threads(1)


def positive_pattern(X, w, b):
    """ŝ = cov[x, z] / var[z] over the patches with wᵀx > b (method.md §3), by the formula."""
    P = X.permute(0, 2, 3, 1).reshape(-1, X.shape[1]).double()
    z = P @ w.double()
    pos = z > b
    Pp, zp = P[pos], z[pos]
    s = ((Pp - Pp.mean(0)) * (zp - zp.mean())[:, None]).mean(0) / zp.var(unbiased=False)
    return (s / s.norm()).float()


@pytest.fixture(scope="module")
def planted():
    data = make_synthetic(n_per_class=1000, random_state=0)
    head, acc = train_head(data, epochs=300, random_state=0)
    F = data.ideal_filters() * 20
    b = 20 * (2.5 + data.info["offset"] * data.ideal_filters().sum(1))
    S_hat = torch.stack([positive_pattern(data.X, F[i], float(b[i])) for i in range(3)])
    pairs = DirectionPairs(F, b, S_hat, mean=data.X.mean(dim=(0, 2, 3)))
    return data, head, pairs


def test_signal_vector_is_the_right_edit_for_linear_latent_factors(planted):
    data, head, pairs = planted
    rand = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    rep = score_edit_directions(data, head, pairs, {"signal": "signal", "mean-difference": "mean-difference",
                                                    "filter": "filter", "true": data.S, "random": rand})
    t = rep.table()
    assert rep.assignment == [0, 1, 2]
    # the true direction with the true amounts is the ideal edit itself
    assert t["true"]["logit_r2_remove"] == pytest.approx(1.0, abs=1e-6)
    assert t["true"]["leak_remove"] == pytest.approx(0.0, abs=1e-6)
    # ŝ estimated on the positives is the encoder: it moves only its own concept and the head as planted
    assert t["signal"]["encoder_cosine"] > 0.99
    assert t["signal"]["leak_remove"] < 0.05 and t["signal"]["leak_insert"] < 0.05
    assert t["signal"]["logit_r2_remove"] > 0.99 and t["signal"]["logit_r2_insert"] > 0.99
    # the mean difference and the filter leak into the other concepts, the head sees it
    for other in ("mean-difference", "filter"):
        assert t[other]["leak_remove"] > 0.3, other
        assert t[other]["logit_r2_remove"] < t["signal"]["logit_r2_remove"] - 0.02, other
    assert t["mean-difference"]["logit_r2_remove"] < 0.9
    assert t["random"]["logit_r2_remove"] < 0.5
    # the strength is read by the detector: every direction removes the intended amount of its concept
    for name in ("signal", "mean-difference", "filter", "true"):
        assert t[name]["removed"] == pytest.approx(1.0, abs=0.05), name
    again = EditingReport.from_dict(rep.to_dict())
    assert again.assignment == rep.assignment
    for n in t:
        for m in METRICS:
            assert again.table()[n][m] == pytest.approx(t[n][m], abs=1e-12), (n, m)


def test_score_edit_directions_errors(planted):
    data, head, pairs = planted
    with pytest.raises(ValidationError, match=r"direction 'x' must be a \(3, 16\) tensor"):
        score_edit_directions(data, head, pairs, {"x": torch.ones(2, 16)})
    with pytest.raises(ValidationError, match="assignment must give a detector"):
        score_edit_directions(data, head, pairs, {"signal": "signal"}, assignment=[0, 1])


class Stamped(nn.Module):
    """Layer ``feat`` = the 3 input channels (ReLU); the head reads channel 0 as class 0 and channel 1 as
    class 1. Channel 0 also carries a shortcut stamp (a fixed +4), channel 2 is a nuisance."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1, bias=False)
        self.feat = nn.ReLU()
        self.fc = nn.Linear(3, 2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(3)[:, :, None, None])
            self.fc.weight.copy_(torch.tensor([[10.0, 0.0, 0.0], [0.0, 10.0, 0.0]]))
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(self.feat(self.conv(x)).mean(dim=(2, 3)))


def stamped_images(n, label, stamp, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 3, 4, 4)
    x[:, 2] = torch.rand(n, 4, 4, generator=g) * 2.0  # nuisance, everywhere
    x[:, label, :2, :2] = 1.0  # the class's own concept
    if stamp:
        x[:, 0, 3, 2:] += 4.0  # the stamp: fixed strength, 2 positions -> logit 0 rises by 5
    return x


def test_mean_difference_is_the_right_edit_for_a_stamped_shortcut():
    model = Stamped().eval()
    # the shortcut detector fires on the stamp (channel 0 + channel 2 > 3.5: only stamped positions reach it)
    # but also reads the nuisance channel
    w = torch.tensor([1.0, 0.0, 1.0]) * 5
    b = 17.5
    held = torch.cat([stamped_images(8, 1, True, 1), stamped_images(8, 0, False, 2), stamped_images(8, 1, False, 3)])
    from unveil.capture import capture
    maps = capture(model, "feat", held)
    s_hat = positive_pattern(maps, w, b)
    pairs = DirectionPairs(w[None], torch.tensor([b]), s_hat[None], mean=maps.mean(dim=(0, 2, 3)),
                           meta={"layer": "feat"})
    md = mean_difference_directions(maps, pairs)
    # ŝ follows the variation *within* the positives, which is the nuisance; the mean difference the stamp
    assert float(s_hat[2]) > 0.9 and float(md[0, 0]) > 0.9
    pois, y_pois = stamped_images(8, 1, True, 4), torch.ones(8, dtype=torch.long)
    clean = torch.cat([stamped_images(4, 0, False, 5), stamped_images(4, 1, False, 6)])
    y_clean = torch.tensor([0] * 4 + [1] * 4)
    assert (model(pois).argmax(1) == 0).all()
    by_md = choose_strength(model, "feat", pairs, [0], pois, y_pois, clean, y_clean)  # the default direction
    by_s = choose_strength(model, "feat", pairs, [0], pois, y_pois, clean, y_clean, direction="signal")
    assert by_md.direction == "mean_difference" and by_s.direction == "signal"
    assert by_md.accuracy == 1.0 and by_md.clean_accuracy == 1.0
    assert by_s.accuracy == 0.0  # no strength along ŝ helps: it removes the nuisance, not the stamp
    fixed = CorrectedModel(model, "feat", pairs, [0], by_md.strength, reference=torch.cat([pois, clean]))
    assert fixed.direction_kind == "mean_difference"
    assert (fixed(stamped_images(8, 1, True, 7)).argmax(1) == 1).all()
    assert (fixed(clean).argmax(1) == y_clean).all()


def test_the_default_edit_direction_is_the_mean_difference():
    from unveil.cli import build_parser
    for fn in (CorrectedModel.__init__, choose_strength, choose_concepts):
        assert inspect.signature(fn).parameters["direction"].default == "mean-difference", fn
    args = build_parser().parse_args(["correct", "--model", "m", "--layer", "l", "--pairs", "p", "--concepts", "0",
                                      "--out", "o"])
    assert args.direction == "mean-difference"
    model = Stamped().eval()
    pairs = DirectionPairs(torch.tensor([[5.0, 0, 5.0]]), torch.tensor([17.5]), torch.eye(3)[:1])
    with pytest.raises(ValidationError, match="the default edit direction 'mean-difference' is measured on images: "
                                              "pass reference=images"):
        CorrectedModel(model, "feat", pairs, [0], 1.0)
    ref = torch.cat([stamped_images(4, 1, True, 0), stamped_images(4, 0, False, 1)])
    from unveil.capture import capture
    V = mean_difference_directions(capture(model, "feat", ref), pairs)
    x = stamped_images(3, 1, True, 9)
    torch.testing.assert_close(CorrectedModel(model, "feat", pairs, [0], 2.0, reference=ref)(x),
                               CorrectedModel(model, "feat", pairs, [0], 2.0, direction=V)(x), atol=0, rtol=0)
