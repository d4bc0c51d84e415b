"""The IoU used to find the watermark detector, on maps whose overlap is known."""
import pytest
import torch

from unveil.evaluate.shortcut import watermark_iou


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
