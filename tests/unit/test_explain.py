"""Per-image explanations on a tiny conv model with planted concepts."""
import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from unveil import DirectionPairs, ValidationError  # noqa: E402
from unveil.capture import hooks  # noqa: E402
from unveil.explain import Explanation, explain, plot_explanation  # noqa: E402

torch.set_num_threads(1)


class TinyMix(nn.Module):
    """conv 3x3 (4 -> 5 channels, random but fixed) -> ReLU ('feat') -> pool -> fc (5 -> 3)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(4, 5, 3, padding=1)
        self.feat = nn.ReLU()
        self.fc = nn.Linear(5, 3)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(5, 4, 3, 3, generator=g) * 0.5)
            self.conv.bias.copy_(torch.randn(5, generator=g) * 0.1)
            self.fc.weight.copy_(torch.randn(3, 5, generator=g))
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(self.feat(self.conv(x)).mean(dim=(2, 3)))


class Planted(nn.Module):
    """Channel c of the input is concept c; the class is the concept with the most mass (plus a margin for 0)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1, bias=False)
        self.feat = nn.ReLU()
        self.fc = nn.Linear(3, 3)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(3)[:, :, None, None])
            self.fc.weight.copy_(torch.eye(3) * 10)
            self.fc.bias.copy_(torch.tensor([0.0, 0.0, 0.2]))

    def forward(self, x):
        return self.fc(self.feat(self.conv(x)).mean(dim=(2, 3)))


def random_pairs(D=5, I=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    S = torch.randn(I, D, generator=g)
    return DirectionPairs(torch.randn(I, D, generator=g) * 2, torch.randn(I, generator=g),
                          S / S.norm(dim=1, keepdim=True), mean=torch.rand(D, generator=g))


def test_contributions_match_direct_computation():
    model = TinyMix().eval()
    pairs = random_pairs()
    x = torch.rand(7, 4, 6, 6, generator=torch.Generator().manual_seed(2))
    expl = explain(model, "feat", pairs, x, top_k=2, batch_size=3)
    assert len(expl) == 7 and all(isinstance(e, Explanation) for e in expl)
    with hooks(model, "feat") as rec:
        logits = model(x).detach()
    X = rec["feat"]  # (7, 5, 6, 6), non-negative (post-ReLU)
    W, b, S, mu = pairs.decoders, pairs.biases, pairs.encoders, pairs.mean
    for n, e in enumerate(expl):
        c = int(logits[n].argmax())
        assert e.predicted == c
        torch.testing.assert_close(e.probs, logits[n].softmax(0), atol=1e-6, rtol=0)
        for i in range(pairs.n_concepts):
            xp = X[n].permute(1, 2, 0)                      # (h, w, D), by hand
            z = xp @ W[i]
            m = torch.sigmoid(z - b[i])
            a = (z - W[i] @ mu) / (W[i] @ S[i])           # the signal value at every position
            edited = torch.relu(xp - (m * a)[..., None] * S[i])
            logit_i = model.fc(edited.mean(dim=(0, 1))).detach()  # the head: pool + fc
            assert float(e.contributions[i]) == pytest.approx(float(logits[n, c] - logit_i[c]), abs=1e-5)
        assert torch.allclose(e.maps, torch.sigmoid(torch.einsum("dhw,id->ihw", X[n], W) - b[:, None, None]),
                              atol=1e-6)
        assert e.top == torch.argsort(e.contributions, descending=True)[:2].tolist()


def test_fixed_strength_and_planted_top_concept():
    model = Planted().eval()
    pairs = DirectionPairs(torch.eye(3) * 10, torch.full((3,), 5.0), torch.eye(3), names=["red", "green", "blue"])
    x = torch.zeros(2, 3, 4, 4)
    x[0, 0, :2] = 1.0   # image 0: concept 0 on 8 positions, concept 2 on 2
    x[0, 2, 3, :2] = 1.0
    x[1, 1, 1:3, 1:3] = 1.0  # image 1: concept 1 only
    e0, e1 = explain(model, "feat", pairs, x, top_k=3, class_names=["r", "g", "b"])
    assert (e0.predicted, e0.class_name, e1.predicted) == (0, "r", 1)
    assert e0.top[0] == 0 and e1.top[0] == 1
    # removing the concept that carries the class takes its logit: 10 * 8/16 * σ(5) (the signal value 1, masked)
    assert float(e0.contributions[0]) == pytest.approx(5.0 * torch.sigmoid(torch.tensor(5.0)).item(), abs=1e-4)
    assert float(e0.contributions[2]) == pytest.approx(0.0, abs=1e-6)  # concept 2 does not read as class 0
    # a fixed strength k removes m·k
    ek = explain(model, "feat", pairs, x[:1], remove_strength=0.5)[0]
    m = torch.sigmoid(torch.tensor(5.0)).item()
    assert float(ek.contributions[0]) == pytest.approx(10 * 8 / 16 * 0.5 * m, abs=1e-4)
    d = e0.to_dict()
    assert d["top"][0]["name"] == "red" and len(d["maps"]) == 3 and d["class_name"] == "r"


def test_plot_explanation_returns_axes():
    import matplotlib.pyplot as plt
    model = Planted().eval()
    pairs = DirectionPairs(torch.eye(3) * 10, torch.full((3,), 5.0), torch.eye(3))
    x = torch.zeros(1, 3, 4, 4)
    x[0, 0, :2] = 1.0
    e = explain(model, "feat", pairs, x)[0]
    ax = plot_explanation(e, x[0])
    assert ax.get_title().startswith("class 0 (p = ")
    assert len(ax.get_legend().get_texts()) == 3
    fig, ax2 = plt.subplots()
    assert plot_explanation(e, x[0].permute(1, 2, 0).numpy(), ax=ax2) is ax2
    plt.close("all")


def test_explain_errors_and_hooks_removed():
    model = TinyMix().eval()
    x = torch.rand(2, 4, 6, 6)
    with pytest.raises(ValidationError, match="has 5 channels, but these direction pairs"):
        explain(model, "feat", random_pairs(D=7), x)
    assert len(model.feat._forward_hooks) == 0
    with pytest.raises(ValidationError, match="top_k must be an integer >= 1"):
        explain(model, "feat", random_pairs(), x, top_k=0)
    with pytest.raises(ValidationError, match="strength must be >= 0"):
        explain(model, "feat", random_pairs(), x, remove_strength=-2.0)
    with pytest.raises(ValidationError, match="images must be a \\(N, C, H, W\\) tensor"):
        explain(model, "feat", random_pairs(), x[0])
    assert len(model.feat._forward_hooks) == 0


def test_unveil_explain_is_callable():
    import unveil
    model = Planted().eval()
    pairs = DirectionPairs(torch.eye(3) * 10, torch.full((3,), 5.0), torch.eye(3), names=["red", "green", "blue"])
    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    a, b = unveil.explain(model, "feat", pairs, x), explain(model, "feat", pairs, x)
    assert [e.top for e in a] == [e.top for e in b]
    torch.testing.assert_close(torch.stack([e.contributions for e in a]), torch.stack([e.contributions for e in b]))
