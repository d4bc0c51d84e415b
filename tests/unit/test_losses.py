"""Each EDDP loss on a case computed by hand (method.md §2–§4)."""
import math

import pytest
import torch

from unveil.directions import losses as L

Y = torch.tensor([[0.5, 0.25], [0.8, 0.2]], dtype=torch.float64)
H1 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))  # q = (2/3, 1/3)
H2 = -(0.8 * math.log2(0.8) + 0.2 * math.log2(0.2))  # q = (0.8, 0.2)


def test_self_weighted_reduction():
    assert float(L.self_weighted(torch.tensor([1.0, 2.0]))) == pytest.approx(33 / 17, rel=1e-6)
    assert float(L.self_weighted(torch.zeros(3))) == pytest.approx(0.0, abs=1e-12)
    # a smooth maximum: between the mean and the max
    v = torch.tensor([0.1, 0.2, 3.0])
    assert 1.0 < float(L.self_weighted(v)) <= 3.0


def test_sparsity_and_max_activation():
    assert float(L.sparsity_loss(Y)) == pytest.approx((H1 + H2) / 2, rel=1e-6)
    ma1 = -(2 / 3 * math.log2(0.5) + 1 / 3 * math.log2(0.25))
    assert float(L.max_activation_loss(Y)) == pytest.approx((ma1 + H2) / 2, rel=1e-6)
    assert float(L.sparsity_bound_loss(Y)) == pytest.approx((H1 ** 5 + H2 ** 5) / (H1 ** 4 + H2 ** 4), rel=1e-6)


def test_inactive_excessive_margin():
    # E_p[y] = (0.65, 0.225); tau = 0.9, I = 2 -> nu = 0.45
    assert float(L.inactive_loss(Y, tau=0.9, gamma=1.0)) == pytest.approx(0.5 * (0.45 - 0.225) / 0.45, rel=1e-6)
    # rho = 0.3: only detector 0 is excessive: (0.65 - 0.3) / 0.7 = 0.5; R_SW([0.5, 0]) = 0.5
    assert float(L.excessive_loss(Y, rho=0.3, gamma=1.0)) == pytest.approx(0.5, rel=1e-6)
    # gamma sharpens: E_p[y^2] = (0.445, 0.05125), both now below nu
    assert float(L.inactive_loss(Y, tau=0.9, gamma=2.0)) == pytest.approx(((0.45 - 0.445) + (0.45 - 0.05125)) / 2 / 0.45, rel=1e-6)
    assert float(L.max_margin_loss(torch.tensor([1.0, 3.0]))) == pytest.approx(2.0, rel=1e-6)


def test_inactive_loss_with_a_floor_per_detector():
    # E_p[y] = (0.65, 0.225); tau per detector (1.6, 0.9), I = 2 -> nu = (0.8, 0.45): each below its own floor
    tau = torch.tensor([1.6, 0.9], dtype=torch.float64)
    assert float(L.inactive_loss(Y, tau=tau, gamma=1.0)) == pytest.approx((0.15 / 0.8 + 0.225 / 0.45) / 2, rel=1e-6)
    # floors at the detectors' own rates or below: nothing to push
    assert float(L.inactive_loss(Y, tau=torch.tensor([1.3, 0.45], dtype=torch.float64), gamma=1.0)) == 0.0
    # a number and the same number per detector agree
    assert float(L.inactive_loss(Y, tau=torch.full((2,), 0.9, dtype=torch.float64), gamma=2.0)) == pytest.approx(
        float(L.inactive_loss(Y, tau=0.9, gamma=2.0)), rel=1e-12)


def test_a_zero_floor_adds_no_inactive_loss_and_no_nan():
    y = torch.tensor([[0.5, 0.0], [0.8, 0.0]], dtype=torch.float64, requires_grad=True)
    loss = L.inactive_loss(y, tau=torch.tensor([1.6, 0.0], dtype=torch.float64), gamma=1.1)
    grad, = torch.autograd.grad(loss, y)
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and float(grad[:, 1].abs().max()) == 0.0
    assert float(loss) == pytest.approx(0.5 * (0.8 - (0.5 ** 1.1 + 0.8 ** 1.1) / 2) / 0.8, rel=1e-6)


def test_sparsity_bound_reads_the_claimed_patches():
    """A patch no detector fires on has the largest entropy of q = y / |y|_1 (1 bit here) and leads the paper's
    smooth maximum; weighted by how much it is claimed, it no longer does and gets almost no gradient."""
    y = torch.tensor([[0.95, 0.05], [1e-4, 1e-4]], dtype=torch.float64, requires_grad=True)
    h_claimed = -(0.95 * math.log2(0.95) + 0.05 * math.log2(0.05))
    assert float(L.sparsity_bound_loss(y)) == pytest.approx((h_claimed ** 5 + 1) / (h_claimed ** 4 + 1), rel=1e-6)
    assert float(L.sparsity_bound_loss(y)) > 0.8
    assert float(L.sparsity_bound_loss(y, claimed=True)) == pytest.approx(h_claimed, rel=1e-3)
    grad, = torch.autograd.grad(L.sparsity_bound_loss(y, claimed=True), y)
    assert float(grad[1].abs().max()) < 1e-3 * float(grad[0].abs().max())
    # a patch claimed at least once counts fully: the two forms agree on such batches
    y2 = torch.tensor([[0.95, 0.05], [0.6, 0.5]], dtype=torch.float64)
    assert float(L.sparsity_bound_loss(y2, claimed=True)) == pytest.approx(float(L.sparsity_bound_loss(y2)), rel=1e-12)


def test_fso():
    wbar = torch.eye(2, dtype=torch.float64)
    S = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    # off-diagonal cosines: w0.s1/|s1| = 1/sqrt2, w1.s0 = 0 -> sqrt(mean(0.5, 0)) = 0.5
    assert float(L.fso_loss(wbar, S)) == pytest.approx(0.5, rel=1e-5)
    assert float(L.fso_loss(wbar, torch.eye(2, dtype=torch.float64))) == pytest.approx(0.0, abs=1e-5)


def test_prediction_entropy():
    assert float(L.prediction_entropy(torch.zeros(3, 4))) == pytest.approx(2.0, rel=1e-6)
    assert float(L.prediction_entropy(torch.tensor([[100.0, 0.0]]))) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("constrained", [False, True])
def test_ura_shift_lands_on_hyperplanes(constrained):
    g = torch.Generator().manual_seed(0)
    D, I = 7, 3
    W = torch.randn(I, D, generator=g, dtype=torch.float64)
    b = torch.randn(I, generator=g, dtype=torch.float64)
    x = torch.randn(50, D, generator=g, dtype=torch.float64)
    S = torch.randn(I, D, generator=g, dtype=torch.float64) if constrained else None
    dx = L.ura_shift(x, W, b, S)
    xs = x - dx  # kappa = 1
    assert torch.allclose(xs @ W.T, b.expand(50, I), atol=1e-9)
    if constrained:  # the shift stays in the span of the signal vectors
        coef = torch.linalg.lstsq(S.T, dx.T).solution
        assert torch.allclose(S.T @ coef, dx.T, atol=1e-9)
    else:  # minimum norm: dx lies in the row space of W
        coef = torch.linalg.lstsq(W.T, dx.T).solution
        assert torch.allclose(W.T @ coef, dx.T, atol=1e-9)
    # kappa = 0.5 moves half way: Wᵀx' − b = (1 − κ)(Wᵀx − b)
    xh = x - 0.5 * dx
    assert torch.allclose(xh @ W.T - b, 0.5 * (x @ W.T - b), atol=1e-9)


def test_ura_loss_is_maximal_entropy_on_the_uncertain_region():
    # a head that reads exactly the detectors' decision values: on the hyperplanes (W x = b = 0)
    # all logits are equal, so the prediction entropy is log2(K) and the loss is -log2(K)
    D, I = 4, 3
    W = torch.eye(D)[:I]
    head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(D, I, bias=False))
    head[1].weight.data = W.clone()
    maps = torch.randn(5, D, 1, 1, generator=torch.Generator().manual_seed(1))
    loss = L.ura_loss(maps, head, W, torch.zeros(I), kappa=(1.0, 1.0))
    assert float(loss.detach()) == pytest.approx(-math.log2(I), rel=1e-5)
