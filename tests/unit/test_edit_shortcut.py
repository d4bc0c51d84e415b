"""The IoU used to find the watermark detector, on maps whose overlap is known."""
import pytest
import torch

from unveil.experiments.shortcut import watermark_iou


def test_watermark_iou_known_overlap():
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[:, 4:, 4:] = True                      # 16 pixels per image
    maps = torch.zeros(2, 3, 2, 2)
    maps[:, 0, 1, 1] = 1.0                       # exactly the mask's cell
    maps[:, 1, 1, :] = 1.0                       # the mask plus the cell beside it: IoU 1/2
    # detector 2 silent: IoU 0
    # nearest-cell maps are made piecewise constant so bilinear upsampling + 0.5 cut keeps the cells
    up = torch.nn.functional.interpolate(maps, scale_factor=4, mode="nearest")
    iou = watermark_iou(up, masks)
    assert iou.tolist() == pytest.approx([1.0, 0.5, 0.0], abs=1e-6)
    iou_bilinear = watermark_iou(maps, masks)   # 2x2 -> 8x8 bilinear, cut at 0.5
    assert float(iou_bilinear[0]) == pytest.approx(15 / 16, abs=1e-6)  # the corner pixel (4, 4) falls below 0.5


def test_experiment_rejects_a_checkpoint_without_watermark():
    from unveil import ValidationError
    from unveil.experiments.shortcut import run_shortcut_experiment
    from unveil.models.worldnet import checkpoint_path
    with pytest.raises(ValidationError, match="was not trained with a watermark"):
        run_shortcut_experiment(checkpoint=checkpoint_path(shortcut=False), n_fit=7, n_val=7, n_test=7,
                                actmax=False)


def test_grid_reaches_well_past_the_default():
    from unveil.edit.correction import default_grid
    from unveil.experiments.shortcut import GRID_MULTIPLIERS
    import inspect
    default_top = max(inspect.signature(default_grid).parameters["multipliers"].default)
    assert GRID_MULTIPLIERS[0] == 0 and max(GRID_MULTIPLIERS) >= 4 * default_top
    assert list(GRID_MULTIPLIERS) == sorted(GRID_MULTIPLIERS)


def test_concept_iou_matches_watermark_iou_per_concept():
    from unveil.experiments.shortcut import concept_iou
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(5, 4, 3, 3, generator=g)
    masks = torch.rand(5, 3, 12, 12, generator=g) > 0.6
    iou = concept_iou(maps, masks, batch=2)
    assert iou.shape == (4, 3)
    for c in range(3):
        torch.testing.assert_close(iou[:, c], watermark_iou(maps, masks[:, c]), atol=1e-6, rtol=0)
    from unveil import ValidationError
    with pytest.raises(ValidationError, match=r"masks must have shape \(N, C, H, W\) with N = 5"):
        concept_iou(maps, masks[:3])


def test_experiment_rejects_an_unknown_detector_rule():
    from unveil import ValidationError
    from unveil.experiments.shortcut import run_shortcut_experiment
    with pytest.raises(ValidationError, match="detectors must be 'select', 'label' or 'best'"):
        run_shortcut_experiment(detectors="all", n_fit=7, n_val=7, n_test=7, actmax=False)
