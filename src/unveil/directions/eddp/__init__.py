"""`EDDP`: learn encoding–decoding direction pairs from a layer's activations (method.md §2–§5).

How a fit runs (the defaults, and why)
--------------------------------------
The paper optimises its losses for 800 + 2000 + 2000 epochs from a random start. We reach the same
quality in seconds by starting close to the answer and keeping the paper's losses for the refinement:

1. **Statistics** (one streamed pass): the data mean μ, covariance Σ, and a random sample of patches.
2. **Clustering initialisation**: k-means with ``n_concepts`` clusters on *soft-whitened* patches
   ``Λ^{-1/2}`` with ``Λ = eig(Σ) + ε·mean(eig)``. Whitening stops the high-variance distractors from
   dominating the clusters (isotropic scaling fails there); the ε floor stops noise-free or pure-noise
   components from being blown up (per-component standardisation fails there; method.md §6).
3. **Max-margin detectors**: each cluster is separated from the rest by a linear classifier (logistic
   loss, weak L2) in the whitened space. Separating clusters by their *sharpest boundary* — not by
   their means (LDA), which would leak the other concepts into every filter — is what makes the
   filters read one concept and be blind to the others and to the distractors. A detector most of
   whose positives other detectors claim too is given to a cluster of the patches no detector
   claims, when that cluster's detector scores higher on held-out patches (a rare concept the
   partition missed; :func:`~unveil.directions.eddp.initialisation.replace_redundant`). Then the
   discriminant passes re-estimate the detectors from every patch
   (:mod:`~unveil.directions.eddp.discriminant`).
4. **Signal vectors** by the positive-only pattern estimator (method.md §3), a patch that ``k`` detectors
   call positive counting ``1/k`` in each (``shared_positives="split"``, the default).
5. **EDDP refinement** with the paper's losses: step (b) (L_s, L_sb, L_ma, L_mm, L_ic, L_eac, L_uur)
   then step (d) (adds signal vectors, L_cur and L_fso; the signal vectors are free parameters, or with
   ``init="random"`` the positive-only pattern of the current filters, ``refine_signals``), with the
   paper's weights, Adam and ReduceLROnPlateau, for a few hundred steps with early stopping, on
   mini-batches of max(2048, 256 × n_concepts) patches (smaller batches leave a rare concept a
   handful of positives, and the batch estimates of L_ic, L_eac and L_sb then walk its filter away).
   Step (a) (the UIBE/CBE form: an orthogonal filter basis on *soft-standardised* features
   ``(x − μ)/sqrt(var_k + ε·mean var)``, random unit filters to start) runs only with
   ``init="random"``, where it replaces the clustering start. In the constrained form
   (``mode="constrained"``) the augmented Lagrangian aims 0.5% inside each bound, so that the bounds
   hold at the end. The ε floor matters: on the paper's recipe, step (a) reached matched IoU
   0.82–0.87 with it, 0.12–0.77 with plain per-component standardisation and 0.23–0.30 on
   isotropically scaled features (seed 0, 600 steps, no head).
   The max-margin detectors have nearly hard boundaries (gains of order 10² per σ), so the y-based
   losses see little gradient and the refinement moves them little; ``init_gain`` tempers them.
   On the synthetic recipes the paper's losses, once they do see gradient, move the detectors
   *away* from the planted truth (their minimum at the gains they prefer is not the truth); the
   numbers are in ``benchmarks/results/eddp_ablation.md``.
6. The final signal vectors are re-estimated as in 4 for the final filters (step (c), where the refinement's
   signal vectors start, keeps the paper's estimator), and normalised to unit length (so that signal
   values come out in the units of the latent factors).

Concepts at several granularities (``levels``)
----------------------------------------------
Within one fit the detectors compete for the patches (L_s, L_ma): with many detectors a large
concept (sky, road, a glyph seen at several offsets) is cut into fragments, each precise but
covering a small part of the concept. Real layers hold concepts at several scales at once (a region
and its parts), so ``levels=[4, 8, 16, 36]`` (or ``"auto"``) builds a hierarchy:

1. the finest level (the last size) is fitted as above;
2. its concepts are merged bottom-up by Ward's criterion on their centroids (mean activation of
   the patches each concept holds most strongly, in the layer's own space — centroids average the
   distractors out, and whitening, which makes equally frequent clusters equidistant, would erase
   which concepts are close);
3. each coarser level starts from that tree cut at its size: every patch is labelled with the
   group of its finest concept and the max-margin detectors are fitted to these groups; then the
   level is refined with the paper's losses like any fit (competition only within the level).

The pairs are concatenated, coarsest first (``pairs_.meta["levels"]``, ``["level_of_concept"]``,
``["parent_groups"]``). Detectors of different levels overlap, as a region and its parts do.

Steps (b) and (d) compute their losses in an isotropically rescaled space ``(x − μ)/σ`` (a
similarity transform, so directions are unchanged), step (a) in the soft-standardised one; the
saved pairs act on the original activations.

Without a head, the URA terms are dropped and the fit relies on the detector losses alone: the
directions are then found from the activations' own structure, not from what the network above the
layer reads out of them.
"""
from .estimator import EDDP
from .refinement import PAPER_CONSTRAINTS, PAPER_WEIGHTS

__all__ = ["EDDP", "PAPER_WEIGHTS", "PAPER_CONSTRAINTS"]
