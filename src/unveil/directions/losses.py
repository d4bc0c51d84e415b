"""The EDDP losses (method.md §2–§4) as plain differentiable torch functions.

Conventions: ``y`` is (P, I) detector activations in (0, 1); logs are base 2; ``E_p`` is the mean
over the patches of the batch.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

_EPS = 1e-12


def self_weighted(values: torch.Tensor, power: float = 4.0) -> torch.Tensor:
    """Smooth maximum R_SW({L_k}) = Σ L_k^{ν'+1} / Σ L_k^{ν'} (ν' = ``power``); 0 when all L_k are 0."""
    v = values.clamp_min(0)
    num = (v ** (power + 1)).sum()
    den = (v ** power).sum()
    return num / (den + _EPS)


def _q(y: torch.Tensor) -> torch.Tensor:
    return y / (y.sum(dim=1, keepdim=True) + _EPS)


def patch_entropy(y: torch.Tensor) -> torch.Tensor:
    """Per-patch entropy (bits) of q_p = y_p / ‖y_p‖₁, shape (P,)."""
    q = _q(y)
    return -(q * torch.log2(q + _EPS)).sum(dim=1)


def sparsity_loss(y: torch.Tensor) -> torch.Tensor:
    """L_s = E_p[−Σ_i q_{p,i} log q_{p,i}]: few detectors per patch."""
    return patch_entropy(y).mean()


def max_activation_loss(y: torch.Tensor) -> torch.Tensor:
    """L_ma = E_p[−Σ_i q_{p,i} log y_{p,i}]: detectors that fire go to 1."""
    return -(_q(y) * torch.log2(y + _EPS)).sum(dim=1).mean()


def max_margin_loss(magnitudes: torch.Tensor) -> torch.Tensor:
    """L_mm = mean_i g_i (= mean 1/M_i): wide margins."""
    return magnitudes.mean()


def inactive_loss(y: torch.Tensor, tau, gamma: float = 1.0) -> torch.Tensor:
    """L_ic = mean_i ReLU(ν − E_p[y^γ]) / ν, ν = τ / I: no dead detector.

    ``tau`` is a number, or a tensor (I,) for a floor per detector (ν_i = τ_i / I); a detector whose
    floor is 0 adds nothing (nor any gradient)."""
    nu = tau / y.shape[1]
    denom = nu.clamp_min(torch.finfo(nu.dtype).tiny) if torch.is_tensor(nu) else nu
    return (torch.relu(nu - (y ** gamma).mean(dim=0)) / denom).mean()


def excessive_loss(y: torch.Tensor, rho: float, gamma: float = 1.0) -> torch.Tensor:
    """L_eac = R_SW_i(ReLU(E_p[y^γ] − ρ) / (1 − ρ)): no detector swallows everything."""
    return self_weighted(torch.relu((y ** gamma).mean(dim=0) - rho) / (1 - rho))


def sparsity_bound_loss(y: torch.Tensor, claimed: bool = False) -> torch.Tensor:
    """L_sb = R_SW over patches of the per-patch sparsity entropy: the worst patch stays sparse.

    ``claimed``: each patch's entropy is weighted by how much the detectors claim it,
    ``min(1, Σ_i y_pi)`` (a constant for the gradient). The entropy of ``q = y / ‖y‖₁`` reads the
    relative sizes of the activations, so a patch no detector fires on (all ``y`` near 0) can have
    the largest entropy of the batch, though nothing is active there; unweighted, such patches
    lead the smooth maximum and their gradient makes some detector claim them."""
    h = patch_entropy(y)
    if claimed:
        h = h * y.detach().sum(dim=1).clamp(max=1.0)
    return self_weighted(h)


def fso_loss(directions: torch.Tensor, signals: torch.Tensor) -> torch.Tensor:
    """L_fso = sqrt(mean_{i≠j} (w̄_iᵀ ŝ_j / ‖ŝ_j‖)²) for unit filters ``directions`` (I, D) and signals (I, D)."""
    n = directions.shape[0]
    if n < 2:
        return directions.new_zeros(())
    s = signals / (signals.norm(dim=1, keepdim=True) + _EPS)
    c = directions @ s.T
    off = ~torch.eye(n, dtype=torch.bool, device=c.device)
    return torch.sqrt((c[off] ** 2).mean() + _EPS)


def ura_shift(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, S: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The shift dx_p that moves each patch onto the intersection of the detectors' hyperplanes.

    ``x`` (P, D) patches, ``W`` (I, D) decoders with magnitude (rows g_i w̄_i), ``b`` (I,).
    Unconstrained (``S`` None): dx = (Wᵀ)⁺ (Wᵀx − b) written row-wise as (Wx − b) W⁺ᵀ... i.e. the
    minimum-norm shift. Constrained (``S`` (I, D) signal vectors): dx = Ŝ (WᵀŜ)⁺ (Wᵀx − b), a shift
    inside the span of the signal vectors. Returns (P, D).
    """
    r = x @ W.T - b  # (P, I) residual to the hyperplanes
    if S is None:
        # (Wᵀ)⁺ in column convention is D×I; with rows W (I×D) it is pinv(W) (D×I)
        return r @ torch.linalg.pinv(W).T
    M = W @ S.T  # (I, I): entry (i, j) = w_iᵀ ŝ_j  -> WᵀŜ in column convention
    return r @ torch.linalg.pinv(M).T @ S


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean entropy (bits) of softmax(logits)."""
    logp = torch.log_softmax(logits, dim=1)
    return -(logp.exp() * logp).sum(dim=1).mean() / torch.log(torch.tensor(2.0, device=logits.device))


def ura_loss(maps: torch.Tensor, head: torch.nn.Module, W: torch.Tensor, b: torch.Tensor,
             S: Optional[torch.Tensor] = None, kappa: Tuple[float, float] = (0.5, 0.9),
             generator: Optional[torch.Generator] = None, to_model_space=None) -> torch.Tensor:
    """L_uur (``S`` None) or L_cur: −E[H(softmax(f⁺(X')))] with X' = X − κ dX, κ ~ U[κ₀, κ₁].

    ``maps`` (N, D, H, W) in the space where ``W``/``b`` act; ``to_model_space`` maps shifted maps
    back to the head's input space (identity if None).
    """
    N, D, H, Wd = maps.shape
    x = maps.permute(0, 2, 3, 1).reshape(-1, D)
    dx = ura_shift(x, W, b, S)
    lo, hi = kappa
    k = lo + (hi - lo) * torch.rand((), generator=generator, device="cpu").to(maps.device)
    xs = (x - k * dx).reshape(N, H, Wd, D).permute(0, 3, 1, 2)
    if to_model_space is not None:
        xs = to_model_space(xs)
    return -prediction_entropy(head(xs))
