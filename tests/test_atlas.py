"""The regime atlas at tiny size: cells, table, figure, estimator variants (real training)."""

import json
import os

import numpy as np
import pytest

from kernattr.experiments import atlas as at
from kernattr.experiments.pipeline import PipelineConfig

TINY = dict(task="addition", p=7, num_tasks=4, num_targets=6, d_model=8, num_heads=2, d_mlp=16,
            pretrain_steps=30, finetune_steps=5, num_train_masks=12, num_heldout_masks=12,
            num_real_few=8, proj_dim=32, densities=(0.5, 0.8))


def test_cells_change_one_factor_each():
    centre = PipelineConfig(family="redundancy", num_tasks=24, prox=1.0, finetune_steps=100,
                            densities=(0.9,))
    cells = at.atlas_cells(centre)
    assert cells[0] == at.Cell("centre", "centre", {})
    factors = {c.factor for c in cells}
    assert {"strength", "regime", "density", "family", "grouping", "num_masks"} <= factors
    assert {c.value for c in cells if c.factor == "num_masks"} == {"50", "200", "400"}
    assert [c.overrides["densities"] for c in cells if c.factor == "density"] == [(0.5,), (0.7,)]
    assert len(at.atlas_cells(centre, quick=True)) < len(cells)
    for c in cells[1:]:  # every cell differs from the centre, and builds a valid config
        cfg = centre.__class__(**{**centre.__dict__, **c.overrides})
        assert cfg != centre


@pytest.mark.slow  # ~140 s on 2 cores; `kernattr reproduce atlas --quick` runs the same driver
def test_run_atlas_tiny(tmp_path):
    centre = PipelineConfig(**TINY)
    cells = [at.Cell("centre", "centre", {})]
    atlas = at.run_atlas(centre, out=str(tmp_path), cache_dir=str(tmp_path / "cache"),
                         progress=False, num_resamples=50, cells=cells,
                         variants=(("fast", "W0"), ("anchored", "full")))
    with open(tmp_path / "atlas.json") as fh:
        saved = json.load(fh)
    assert [c["value"] for c in saved["cells"]] == ["centre"]
    for c in saved["cells"]:
        for name in ("kernel_real", "datamodels", "kernel", "influence", "linear"):
            lo, hi = c["lds"][name]["ci"]
            assert lo - 1e-6 <= c["lds"][name]["lds"] <= hi + 1e-6
        mean, lo, hi = c["paired"]["kernel_real-datamodels"]
        np.testing.assert_allclose(mean, c["lds"]["kernel_real"]["lds"] - c["lds"]["datamodels"]["lds"],
                                   atol=1e-6)
        assert -1 <= c["noise_ceiling"] <= 1
    v = {(r["solver"], r["linearize_at"]): r for r in atlas["estimator_variants"]}
    assert set(v) == {("fast", "W0"), ("anchored", "full")}
    # the fast variant reproduces the centre cell's estimator (same ground truth, same solver)
    np.testing.assert_allclose(v["fast", "W0"]["relative_error"],
                               saved["cells"][0]["estimator"]["relative_error"], rtol=1e-5)
    table = open(tmp_path / "atlas.md").read()
    assert table.count("\n| centre |") == 1 and "| anchored | full |" in table
    assert os.path.getsize(tmp_path / "atlas.png") > 2000
