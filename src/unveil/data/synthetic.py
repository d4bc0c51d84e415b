"""Synthetic activations with planted encoding directions (method.md §6) and a general generator.

A patch of concept c: ``x = S α + Dist β + offset`` with ``α_c ~ U(on)``, the other α ~ U(off),
β ~ U(beta). Each image is ``1 × P`` patches; a class is a tuple of concepts (one per patch, placed
in random order). The ground truth (S, Dist, α, per-patch concept) comes with the data.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from .._errors import ValidationError
from .._validation import check_positive_int

# the paper's directions (method.md §6), normalised after transcription
_PAPER_S = np.array([
    [.5396, .4415, -.1283, -.0093, .5900, -.3718, .1051, .0003, .0063, -.0009, -.0004, .0024, .0036, -.0007, .0002, -.0001],
    [.5914, .5833, -.1745, -.4899, -.1930, -.0051, .0467, -.0103, .0037, .0004, -.0002, -.0001, .0001, 0, 0, 0],
    [.8122, .2983, .4681, .1700, -.0005, .0229, -.0524, .0056, -.0021, .0010, .0002, -.0006, -.0013, .0002, 0, 0],
])
_PAPER_DIST = np.array([
    [.7693, -.0396, -.6216, .1416, -.0123, -.0070, .0022, .0014, -.0004, .0001, 0, 0, 0, 0, 0, 0],
    [.7527, -.6147, .1661, -.1293, .1065, -.0042, .0003, .0007, -.0001, .0001, 0, 0, 0, 0, 0, 0],
])
PAPER_CLASSES = ((0, 1), (0, 2), (1, 2))


@dataclass
class SyntheticData:
    """Maps and their ground truth.

    Attributes
    ----------
    X : (N, D, 1, P) float32 tensor of feature maps.
    y : (N,) int64 class labels.
    concept : (N, P) int64, the concept each patch belongs to.
    alpha : (N, I, 1, P) latent factors; beta : (N, F, 1, P) distractor factors.
    S : (I, D) unit encoding directions; Dist : (F, D) unit distractor directions.
    classes : the class rules (tuple of concepts per class).
    """

    X: torch.Tensor
    y: torch.Tensor
    concept: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor
    S: torch.Tensor
    Dist: torch.Tensor
    classes: Tuple[Tuple[int, ...], ...]
    noise: float = 0.0
    info: dict = field(default_factory=dict)

    @property
    def n_concepts(self) -> int:
        return self.S.shape[0]

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def ideal_filters(self) -> torch.Tensor:
        """(I, D): the first I rows of pinv([S | Dist]) — filters that read each α exactly."""
        M = torch.cat([self.S, self.Dist], 0).T.double()
        return torch.linalg.pinv(M)[: self.n_concepts].float()

    def patch_concepts(self) -> torch.Tensor:
        """(N·P,) the concept of each patch, in the order of ``X.permute(0,2,3,1).reshape(-1, D)``."""
        return self.concept.reshape(-1)

    def true_signal_values(self) -> torch.Tensor:
        """(N, I, 1, P) latent factors centred on their data mean."""
        return self.alpha - self.alpha.mean(dim=(0, 2, 3), keepdim=True)


def paper_directions() -> Tuple[torch.Tensor, torch.Tensor]:
    """The paper's (S, Dist), each row normalised to unit length."""
    S = _PAPER_S / np.linalg.norm(_PAPER_S, axis=1, keepdims=True)
    Dist = _PAPER_DIST / np.linalg.norm(_PAPER_DIST, axis=1, keepdims=True)
    return torch.tensor(S, dtype=torch.float32), torch.tensor(Dist, dtype=torch.float32)


def random_directions(n: int, dim: int, correlation: float = 0.5, rng=None) -> np.ndarray:
    """``n`` unit vectors in R^dim with mixed signs, pairwise cosines around ``correlation``.

    Each is ``sqrt(c)·u + sqrt(1−c)·g`` for one shared random unit ``u`` and i.i.d. Gaussian
    ``g`` (normalised), so directions are correlated but linearly independent.
    """
    rng = np.random.default_rng(rng)
    u = rng.standard_normal(dim)
    u /= np.linalg.norm(u)
    g = rng.standard_normal((n, dim))
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    v = np.sqrt(correlation) * u + np.sqrt(1 - correlation) * g
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def make_synthetic(S=None, Dist=None, classes: Sequence[Sequence[int]] = PAPER_CLASSES,
                   n_per_class: int = 1000, alpha_on=(2.5, 5.0), alpha_off=(0.0, 2.5),
                   beta=(0.0, 5.0), offset: float = 10.0, noise: float = 0.0,
                   free_patches: int = 0, free_concepts=None, random_state=0) -> SyntheticData:
    """Generate maps ``(N, D, 1, P)`` from encoding directions ``S`` (I×D) and distractors ``Dist`` (F×D).

    Defaults reproduce the paper's recipe (method.md §6). ``noise`` adds isotropic Gaussian noise of
    that standard deviation to every component (real activations have noise everywhere).
    ``free_patches`` adds that many patches per image whose concept is drawn uniformly from
    ``free_concepts`` (default: the concepts no class rule names, else all), independently of the
    class: concepts that are present in the layer but that the class, and so a trained head, does
    not depend on. ``P = len(rule) + free_patches``; patch order is shuffled per image.
    """
    if S is None and Dist is None:
        S, Dist = paper_directions()
    if S is None or Dist is None:
        raise ValidationError("pass both S and Dist, or neither (the paper's directions).")
    S = torch.as_tensor(np.asarray(S), dtype=torch.float32)
    Dist = torch.as_tensor(np.asarray(Dist), dtype=torch.float32)
    if S.dim() != 2 or Dist.dim() != 2 or S.shape[1] != Dist.shape[1]:
        raise ValidationError(f"S must be (I, D) and Dist (F, D) with the same D; got {tuple(S.shape)} and "
                              f"{tuple(Dist.shape)}.")
    n_per_class = check_positive_int(n_per_class, "n_per_class")
    classes = tuple(tuple(int(c) for c in rule) for rule in classes)
    n_concepts = S.shape[0]
    if not classes or any(not rule for rule in classes):
        raise ValidationError("classes must be a non-empty list of non-empty concept tuples.")
    P_rule = len(classes[0])
    if any(len(rule) != P_rule for rule in classes):
        raise ValidationError("every class rule must name the same number of patches (one concept per patch).")
    if any(c < 0 or c >= n_concepts for rule in classes for c in rule):
        raise ValidationError(f"class rules must use concepts 0..{n_concepts - 1}; got {classes}.")
    free_patches = check_positive_int(free_patches, "free_patches", minimum=0)
    if free_concepts is None:
        used = {c for rule in classes for c in rule}
        free_concepts = [c for c in range(n_concepts) if c not in used] or list(range(n_concepts))
    free_concepts = np.array([int(c) for c in free_concepts], dtype=np.int64)
    if free_concepts.size == 0 or free_concepts.min() < 0 or free_concepts.max() >= n_concepts:
        raise ValidationError(f"free_concepts must be a non-empty list of concepts in 0..{n_concepts - 1}; "
                              f"got {free_concepts.tolist()}.")
    P = P_rule + free_patches
    rng = np.random.default_rng(random_state)
    K, F = len(classes), Dist.shape[0]
    N = K * n_per_class
    y = np.repeat(np.arange(K), n_per_class)
    concept = np.empty((N, P), dtype=np.int64)
    for n in range(N):
        extra = rng.choice(free_concepts, size=free_patches) if free_patches else np.empty(0, np.int64)
        concept[n] = rng.permutation(np.concatenate([np.array(classes[y[n]]), extra]))
    alpha = rng.uniform(*alpha_off, size=(N, P, n_concepts))
    on = rng.uniform(*alpha_on, size=(N, P))
    np.put_along_axis(alpha, concept[..., None], on[..., None], axis=2)
    b = rng.uniform(*beta, size=(N, P, F))
    X = alpha @ S.numpy().astype(np.float64) + b @ Dist.numpy().astype(np.float64) + offset
    if noise > 0:
        X = X + rng.normal(0.0, noise, size=X.shape)
    perm = rng.permutation(N)
    X, y, concept, alpha, b = X[perm], y[perm], concept[perm], alpha[perm], b[perm]
    to_map = lambda a: torch.tensor(a, dtype=torch.float32).permute(0, 2, 1)[:, :, None, :].contiguous()  # noqa: E731
    return SyntheticData(X=to_map(X), y=torch.tensor(y), concept=torch.tensor(concept), alpha=to_map(alpha),
                         beta=to_map(b), S=S, Dist=Dist, classes=classes, noise=float(noise),
                         info={"n_per_class": n_per_class, "alpha_on": list(alpha_on),
                               "free_patches": free_patches, "free_concepts": free_concepts.tolist(),
                               "alpha_off": list(alpha_off), "beta": list(beta), "offset": offset,
                               "random_state": random_state if isinstance(random_state, int) else None})


def make_hard_synthetic(dim: int = 64, n_concepts: int = 8, n_distractors: int = 6, n_classes: int = 8,
                        patches: int = 4, correlation: float = 0.5, noise: float = 0.05,
                        n_per_class: int = 500, n_used: Optional[int] = None, free_patches: int = 0,
                        random_state=0) -> SyntheticData:
    """A harder setting: more dimensions, concepts, distractors and classes; correlated, mixed-sign
    directions; noise in every component. Class rules are random concept tuples (distinct classes).

    ``n_used`` (default all): the class rules draw only from concepts ``0..n_used-1``; with
    ``free_patches`` > 0 each image also holds that many patches of the other concepts, drawn
    independently of the class (planted concepts the head does not use; see :func:`make_synthetic`).
    """
    rng = np.random.default_rng(random_state)
    n_used = n_concepts if n_used is None else check_positive_int(n_used, "n_used")
    if n_used > n_concepts or n_used < patches:
        raise ValidationError(f"n_used must lie in {patches}..{n_concepts} (patches..n_concepts); got {n_used}.")
    dirs = random_directions(n_concepts + n_distractors, dim, correlation, rng)
    rules = set()
    # every used concept appears in some class; classes are distinct multisets
    while len(rules) < n_classes:
        rule = tuple(sorted(rng.choice(n_used, size=patches, replace=False).tolist()))
        rules.add(rule)
    rules = sorted(rules)
    used = {c for r in rules for c in r}
    if len(used) < n_used:  # force coverage
        missing = sorted(set(range(n_used)) - used)
        for k, c in enumerate(missing):
            r = list(rules[k % len(rules)])
            r[-1] = c
            rules[k % len(rules)] = tuple(sorted(set(r) | {c})) if len(set(r)) == patches else tuple(r)
    free = list(range(n_used, n_concepts)) or None
    return make_synthetic(dirs[:n_concepts], dirs[n_concepts:], classes=rules, n_per_class=n_per_class,
                          noise=noise, free_patches=free_patches, free_concepts=free, random_state=rng)


class PoolLinearHead(nn.Module):
    """f⁺ of the synthetic benchmark: global average pool → linear."""

    def __init__(self, n_features: int, n_classes: int):
        super().__init__()
        self.fc = nn.Linear(n_features, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))


def train_head(data: SyntheticData, epochs: int = 2000, lr: float = 5e-3, batch_size: int = 1024,
               random_state=0) -> Tuple[PoolLinearHead, float]:
    """Train the pool → linear head with cross-entropy (Adam, the paper's recipe); return it frozen, in
    eval mode, and its training accuracy.

    The head is trained on the raw pooled activations, exactly the input f⁺ sees. Standardising each
    component first (and folding the scaling back) is *not* the same head: in the paper's recipe
    components 8–16 carry almost no variance, standardisation blows them up and the head ends up
    reading them with weights of order 10³ (method.md §6) — a head no real network has, whose
    gradient then dominates the URA term. On raw features the weights stay in the span of the data.

    The features are centred while training and the mean folded into the bias afterwards
    (``W(x − m) + b = Wx + (b − Wm)``: the same linear head, a shift of its bias), and the weights
    are learnt in the basis of the components that vary. Uncentred, the common offset of every
    component makes the problem ill-conditioned: with 32 concepts in D = 512 and 20 epochs the head
    stayed at chance (0.031) and centred it reached 0.82; on the hard setting (300 epochs) 0.52
    against 0.75.
    """
    g = torch.Generator().manual_seed(int(random_state) if isinstance(random_state, int) else 0)
    head = PoolLinearHead(data.X.shape[1], data.n_classes)
    with torch.no_grad():
        head.fc.weight.copy_(torch.randn(head.fc.weight.shape, generator=g) * 0.01)
        head.fc.bias.zero_()
    feats = data.X.mean(dim=(2, 3)).double()
    centre = feats.mean(0)
    feats = feats - centre
    # the weights are learnt in the basis of the components that vary (eigenvalues above 1e-9 of the largest):
    # Adam scales each coordinate's step to about lr, so in a component that never varies a vanishing
    # gradient would still move the weight, and the head would read directions the data never take
    ev, U = torch.linalg.eigh(feats.T @ feats / feats.shape[0])
    U = U[:, ev > 1e-9 * ev.max().clamp_min(1e-300)].float()
    feats = feats.float() @ U
    fc = nn.Linear(U.shape[1], data.n_classes)
    with torch.no_grad():
        fc.weight.copy_(head.fc.weight @ U)  # the seeded start, in that basis
        fc.bias.zero_()
    N = feats.shape[0]
    opt = torch.optim.Adam(fc.parameters(), lr=lr)
    for _ in range(epochs):
        perm = torch.randperm(N, generator=g)
        for i in range(0, N, batch_size):
            idx = perm[i:i + batch_size]
            loss = nn.functional.cross_entropy(fc(feats[idx]), data.y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        head.fc.weight.copy_(fc.weight @ U.T)
        head.fc.bias.copy_(fc.bias - head.fc.weight @ centre.float())
        acc = float((head(data.X).argmax(1) == data.y).float().mean())
    head.eval().requires_grad_(False)
    return head, acc
