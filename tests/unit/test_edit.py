"""Interventions on a tiny conv model with planted concepts (truth known by construction).

The model: a 1x1 conv copies the 4 input channels into the layer ``feat`` (ReLU, so the layer is
non-negative), then global average pooling and a fixed linear read-out. Channel 0 is concept A
(reads as class 0), channel 1 concept B (class 1), channel 2 a shortcut S that the model also
reads as class 0, channel 3 an irrelevant distractor.
"""
import pytest
import torch
from torch import nn

from unveil import DirectionPairs, ValidationError
from unveil.edit import CorrectedModel, choose_strength, counterfactual, edit_layer, edit_maps
from unveil.edit.correction import default_grid

torch.set_num_threads(1)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1, bias=False)
        self.feat = nn.ReLU()
        self.fc = nn.Linear(4, 2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(4)[:, :, None, None])
            self.fc.weight.copy_(torch.tensor([[10.0, 0.0, 10.0, 0.0], [0.0, 10.0, 0.0, 0.0]]))
            self.fc.bias.copy_(torch.tensor([0.0, 0.1]))

    def forward(self, x):
        f = self.feat(self.conv(x))
        return self.fc(f.mean(dim=(2, 3)))


def planted_pairs():
    # detectors fire where a channel exceeds 0.5; signal vectors are the channels
    W = torch.eye(4)[:3] * 10.0
    return DirectionPairs(W, torch.full((3,), 5.0), torch.eye(4)[:3], names=["A", "B", "S"], meta={"layer": "feat"})


def images(kind: str, n: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 4, 4, 4)
    x[:, 3] = torch.rand(n, 4, 4, generator=g) * 0.3  # distractor, never detected
    if kind in ("A", "AS"):
        x[:, 0, :2, :2] = 1.0
    if kind in ("B", "BS"):
        x[:, 1, :2, :2] = 1.0
    if kind in ("AS", "BS"):
        x[:, 2, 3, 2:] = 4.0  # the shortcut stamp (2 positions): logit 0 rises by 10 * 4 * 2/16 = 5
    return x


@pytest.fixture
def model():
    return Tiny().eval()


def test_strength_zero_is_identity(model):
    x = torch.cat([images("A"), images("BS")])
    fixed = CorrectedModel(model, "feat", planted_pairs(), [0, 2], strength=0.0, direction="signal")
    assert torch.equal(fixed(x), model(x))
    maps = torch.rand(3, 4, 2, 2)
    assert torch.equal(edit_maps(maps, planted_pairs(), [0, 1, 2], strength=0.0), maps)


def test_removing_planted_concept_flips_its_prediction(model):
    xa = images("A")
    cf = counterfactual(model, "feat", planted_pairs(), xa, concept="A")
    assert (cf.pred_before == 0).all() and (cf.pred_after == 1).all()
    assert bool(cf.flipped.all())
    # removing a concept that is absent changes nothing (its detector is silent everywhere)
    xb = images("B")
    cf_b = counterfactual(model, "feat", planted_pairs(), xb, concept=0)
    assert torch.allclose(cf_b.probs_after, cf_b.probs_before, atol=1e-4)
    assert not cf_b.flipped.any()


def test_insert_at_region_flips_towards_the_concept(model):
    xa = images("A")
    region = torch.zeros(4, 4)
    region[2:, 2:] = 1.0
    cf = counterfactual(model, "feat", planted_pairs(), xa, concept=1, mode="insert", strength=2.0, region=region)
    assert (cf.pred_before == 0).all() and (cf.pred_after == 1).all()
    # B added on 4 of 16 positions with value 2: its logit rises by exactly 10 * 4 * 2 / 16 = 5
    rise = cf.logits_after[:, 1] - cf.logits_before[:, 1]
    assert torch.allclose(rise, torch.full_like(rise, 5.0), atol=1e-5)


def test_auto_strength_makes_the_detector_read_the_mean():
    g = torch.Generator().manual_seed(1)
    D = 6
    W = torch.randn(2, D, generator=g) * 3
    S = torch.randn(2, D, generator=g)
    S = S / S.norm(dim=1, keepdim=True)
    mu = torch.randn(D, generator=g)
    pairs = DirectionPairs(W, torch.full((2,), -50.0), S, mean=mu)  # b = -50: detected everywhere (m = 1)
    X = torch.randn(5, D, 3, 3, generator=g)
    out = edit_maps(X, pairs, [0], nonneg=False)
    read = torch.einsum("ndhw,d->nhw", out, W[0])
    assert torch.allclose(read, torch.full_like(read, float(W[0] @ mu)), atol=1e-4)
    # the removed vector is along ŝ_0 only
    diff = (X - out).permute(0, 2, 3, 1).reshape(-1, D)
    cos = torch.nn.functional.cosine_similarity(diff, S[0][None].expand_as(diff), dim=1).abs()
    assert torch.allclose(cos, torch.ones_like(cos), atol=1e-4)


def test_relu_clamp_detected_and_forced():
    pairs = DirectionPairs(torch.eye(2) * 10, torch.full((2,), -200.0), torch.eye(2))  # m = 1
    X = torch.ones(1, 2, 1, 1)
    assert float(edit_maps(X, pairs, 0, strength=3.0).min()) == 0.0  # non-negative input: clamped
    assert float(edit_maps(X, pairs, 0, strength=3.0, nonneg=False)[0, 0]) == pytest.approx(-2.0, abs=1e-6)
    assert float((edit_maps(X - 5, pairs, 0, strength=3.0)[0, 0])) == pytest.approx(-7.0, abs=1e-6)


def test_corrected_model_save_load_roundtrip(model, tmp_path):
    x = torch.cat([images("AS"), images("BS", seed=3)])
    fixed = CorrectedModel(model, "feat", planted_pairs(), ["S", 0], strength=0.7, model_id="tiny", direction="signal")
    fixed.save(tmp_path / "corr")
    again = CorrectedModel.load(tmp_path / "corr", model)
    assert again.concepts == [2, 0] and again.strength == pytest.approx(0.7) and again.model_id == "tiny"
    assert torch.equal(again(x), fixed(x))
    assert not torch.allclose(fixed(x), model(x), atol=1e-3)  # the correction does something
    auto = CorrectedModel(model, "feat", planted_pairs(), [2], strength=None, direction="filter")
    auto.save(tmp_path / "auto")
    assert torch.equal(CorrectedModel.load(tmp_path / "auto", model)(x), auto(x))


def test_corrected_model_removes_planted_shortcut(model):
    pois = images("BS")  # class-1 images carrying the shortcut: the model says class 0
    assert (model(pois).argmax(1) == 0).all()
    for kw in ({"direction": "signal"}, {"reference": torch.cat([images("AS"), images("BS", seed=3)])}):
        fixed = CorrectedModel(model, "feat", planted_pairs(), [2], **kw)
        assert (fixed(pois).argmax(1) == 1).all()
        assert (fixed(images("A")).argmax(1) == 0).all()


def test_choose_strength_on_planted_shortcut(model):
    pois, clean = images("BS", n=8), torch.cat([images("A", n=4), images("B", n=4)])
    y_pois, y_clean = torch.ones(8, dtype=torch.long), torch.tensor([0] * 4 + [1] * 4)
    choice = choose_strength(model, "feat", planted_pairs(), [2], pois, y_pois, clean, y_clean, direction="signal")
    assert choice.accuracy_base == 0.0 and choice.accuracy == 1.0
    assert choice.clean_accuracy == choice.clean_accuracy_base == 1.0
    assert (model(pois).argmax(1) == 0).all()  # B alone gives logit 1 = 2.6 < 5 from the stamp
    ks = [r["strength"] for r in choice.table]
    assert ks[0] == 0.0 and choice.strength > 0
    smallest_fixing = min(r["strength"] for r in choice.table if r["accuracy"] == 1.0)
    assert choice.strength == smallest_fixing
    # the stamp (4.0) must lose more than 1.92 for logit 0 to fall below 2.6: the grid's 2.0 is the first that works
    assert choice.strength == pytest.approx(2.0, abs=1e-3)
    grid = default_grid(planted_pairs(), [2], pois)
    assert grid[4] == pytest.approx(4.0, abs=1e-3)  # multiplier 1 x the median signal value on the stamp


def test_hooks_removed_after_exception(model):
    x = images("A")

    def boom(m):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with edit_layer(model, "feat", boom):
            model(x)
    assert len(model.feat._forward_hooks) == 0
    wrong = DirectionPairs(torch.eye(5), torch.zeros(5), torch.eye(5))
    fixed = CorrectedModel(model, "feat", wrong, [0], strength=1.0, direction="signal")
    with pytest.raises(ValidationError, match="has 4 channels, but these direction pairs"):
        fixed(x)
    assert len(model.feat._forward_hooks) == 0
    torch.testing.assert_close(model(x), Tiny().eval()(x), atol=0, rtol=0)


def test_bad_inputs_give_clear_errors(model):
    pairs, x = planted_pairs(), images("A")
    with pytest.raises(ValidationError, match="unknown concept index 5: these direction pairs have 3 concepts"):
        CorrectedModel(model, "feat", pairs, [5], strength=1.0)
    with pytest.raises(ValidationError, match="unknown concept name 'Z'"):
        counterfactual(model, "feat", pairs, x, concept="Z")
    with pytest.raises(ValidationError, match="listed twice"):
        edit_maps(torch.ones(1, 4, 2, 2), pairs, [1, 1])
    with pytest.raises(ValidationError, match="needs an explicit strength"):
        counterfactual(model, "feat", pairs, x, concept=0, mode="insert")
    with pytest.raises(ValidationError, match="strength must be >= 0"):
        CorrectedModel(model, "feat", pairs, [0], strength=-1.0)
    with pytest.raises(ValidationError, match="mode must be one of"):
        edit_maps(torch.ones(1, 4, 2, 2), pairs, 0, mode="add")
    with pytest.raises(ValidationError, match="region must be a mask on the layer's 4 x 4 grid"):
        counterfactual(model, "feat", pairs, x, concept=0, region=torch.ones(3, 3))
    with pytest.raises(ValidationError, match="images must be a \\(N, C, H, W\\) tensor"):
        counterfactual(model, "feat", pairs, x[0], concept=0)
    with pytest.raises(ValidationError, match="direction tensors must have shape \\(1, 4\\)"):
        edit_maps(torch.ones(1, 4, 2, 2), pairs, 0, direction=torch.ones(2, 4))
    from unveil import LayerError
    with pytest.raises(LayerError, match="Did you mean 'feat'"):
        CorrectedModel(model, "fet", pairs, [0])


def test_mean_difference_directions_match_a_direct_computation():
    from unveil.edit import mean_difference_directions
    g = torch.Generator().manual_seed(0)
    X = torch.randn(7, 4, 3, 5, generator=g)
    pairs = DirectionPairs(torch.randn(3, 4, generator=g) * 4, torch.zeros(3), torch.randn(3, 4, generator=g))
    V = mean_difference_directions(X, pairs, normalize=False, batch_size=2)
    P = X.permute(0, 2, 3, 1).reshape(-1, 4)
    Y = pairs.detect(X).permute(0, 2, 3, 1).reshape(-1, 3) > 0.5
    for i in range(3):
        assert 0 < int(Y[:, i].sum()) < len(P)
        torch.testing.assert_close(V[i], P[Y[:, i]].mean(0) - P[~Y[:, i]].mean(0), atol=1e-5, rtol=1e-5)
    U = mean_difference_directions(X, pairs, [2, 0])
    torch.testing.assert_close(U, V[[2, 0]] / V[[2, 0]].norm(dim=1, keepdim=True), atol=1e-6, rtol=1e-6)


def test_mean_difference_recovers_a_planted_write_and_flags_absent_concepts():
    from unveil.edit import mean_difference_directions
    g = torch.Generator().manual_seed(1)
    s = torch.tensor([0.6, 0.0, -0.8, 0.0])  # how concept A is written (unit length)
    X = torch.randn(200, 4, 4, 4, generator=g) * 0.2
    present = torch.rand(200, 1, 4, 4, generator=g) < 0.3
    X = X + present * 3.0 * s[None, :, None, None]
    pairs = DirectionPairs(torch.stack([s * 10, torch.tensor([0.0, 10, 0, 0])]), torch.tensor([15.0, 100.0]),
                           torch.eye(4)[:2])
    V = mean_difference_directions(X, pairs)
    assert float(V[0] @ s) > 0.99
    assert torch.isnan(V[1]).all()  # concept 1 never fires: its mean difference is undefined


def test_corrected_model_with_mean_difference_directions(model, tmp_path):
    from unveil.edit import mean_difference_directions
    from unveil.capture import capture
    pairs = planted_pairs()
    held = torch.cat([images("AS"), images("BS", seed=3)])
    V = mean_difference_directions(capture(model, "feat", held), pairs, [2])
    assert float(V[0, 2]) > 0.99  # the shortcut channel
    fixed = CorrectedModel(model, "feat", pairs, [2], direction=V, direction_name="mean_difference")
    assert (fixed(images("BS")).argmax(1) == 1).all()
    fixed.save(tmp_path / "md")
    again = CorrectedModel.load(tmp_path / "md", model)
    assert again.direction_kind == "mean_difference" and torch.equal(again(held), fixed(held))


def test_choose_concepts_keeps_the_candidates_that_help(model):
    from unveil.edit import choose_concepts
    pois, clean = images("BS", n=8), torch.cat([images("A", n=4), images("B", n=4)])
    y_pois, y_clean = torch.ones(8, dtype=torch.long), torch.tensor([0] * 4 + [1] * 4)
    args = (model, "feat", planted_pairs())
    sig = {"direction": "signal"}  # the planted concepts are written along single channels: ŝ is exact
    # B first (always kept, does not help: the stamp still wins), then S fixes the poisoned images
    sel = choose_concepts(*args, ["B", "S"], pois, y_pois, clean, y_clean, **sig)
    assert sel.concepts == [1, 2] and sel.choice.accuracy == 1.0 and sel.choice.clean_accuracy == 1.0
    assert [s["kept"] for s in sel.steps] == [True, True] and sel.steps[0]["accuracy"] == 0.0
    # S alone already fixes everything: B adds nothing and is dropped
    sel = choose_concepts(*args, ["S", "B"], pois, y_pois, clean, y_clean, **sig)
    assert sel.concepts == [2] and [s["kept"] for s in sel.steps] == [True, False]
    assert sel.strength == pytest.approx(choose_strength(*args, [2], pois, y_pois, clean, y_clean, **sig).strength)
    # direction rows follow the candidates: S along channel 2 helps, S along channel 1 cannot
    E = torch.eye(4)
    assert choose_concepts(*args, ["B", "S"], pois, y_pois, clean, y_clean, direction=E[[1, 2]]).concepts == [1, 2]
    assert choose_concepts(*args, ["B", "S"], pois, y_pois, clean, y_clean, direction=E[[2, 1]]).concepts == [1]


def test_mean_difference_carries_what_the_concept_excludes(model):
    """B's positions never hold the stamp, so "B present minus B absent" has a negative shortcut component,
    while B's signal vector (its channel) has none: removing B along the mean difference adds shortcut."""
    from unveil.capture import capture
    from unveil.edit import mean_difference_directions
    held = torch.cat([images("BS", n=8), images("A", n=4), images("B", n=4)])
    pairs = planted_pairs()
    V = mean_difference_directions(capture(model, "feat", held), pairs, ["B"])
    assert float(V[0, 1]) > 0.9 and float(V[0, 2]) < -0.05
    assert float(pairs.encoders[1, 2]) == 0.0
    pois = images("BS", n=4)
    by_md = edit_maps(capture(model, "feat", pois), pairs, ["B"], strength=1.0, direction=V)
    assert float(by_md[:, 2].sum()) > float(capture(model, "feat", pois)[:, 2].sum())  # shortcut channel grew
