"""The regime atlas (``kernattr reproduce atlas``): where a kernel surrogate helps, and where not.

A full factorial over fine-tuning strength x mask density x grouping x number of masks x task
family is far too expensive on a few CPU cores, so the atlas is a one-factor-at-a-time sweep
around a centre configuration: each cell changes ONE factor of the centre and keeps the rest.
Every cell is a full :func:`kernattr.experiments.pipeline.run_pipeline` (real training for the
ground truth, cached), and reports, with 95% bootstrap intervals over held-out masks:

* kernel on real labels vs datamodels (paired difference);
* kernel on estimated labels vs influence functions and vs linear on estimated labels;
* the estimator's relative error vs "nothing changes";
* the noise ceiling (LDS between two retrainings of the same masks with different seeds).

Writes ``atlas.json`` (every cell's results), ``atlas.md`` (the table) and ``atlas.png``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import NamedTuple, Optional

import numpy as np

from .pipeline import LAST_LAYER, PipelineConfig, demo_config, run_pipeline


# Estimator variants (solver, linearization point) compared on the centre's ground truth.
VARIANTS = (("fast", "W0"), ("anchored", "W0"), ("exact", "W0"), ("fast", "full"),
            ("exact", "full"))


class Cell(NamedTuple):
    """One atlas cell: ``factor`` (what changed), ``value`` (its label) and the overrides of the
    centre configuration."""

    factor: str
    value: str
    overrides: dict


def centre_config(quick: bool = False, **overrides) -> PipelineConfig:
    """The centre of the sweep (the demo's regime); ``quick``: tiny sizes for a smoke run."""
    cfg = demo_config()
    if quick:
        cfg = dataclasses.replace(cfg, p=11, num_tasks=12, num_targets=16, d_model=16, d_mlp=32,
                                  pretrain_steps=100, num_train_masks=40, num_heldout_masks=40,
                                  num_real_few=16, proj_dim=256)
        if cfg.regime == "finetune":
            cfg = dataclasses.replace(cfg, finetune_steps=min(cfg.finetune_steps, 30))
        else:
            cfg = dataclasses.replace(cfg, scratch_steps=min(cfg.scratch_steps, 120))
    return dataclasses.replace(cfg, **overrides)


def atlas_cells(centre: PipelineConfig, quick: bool = False) -> list[Cell]:
    """The one-factor-at-a-time cells around ``centre`` (the centre itself first).

    >>> cells = atlas_cells(PipelineConfig(num_tasks=24, family="redundancy"))
    >>> cells[0].factor, len(cells) > 8
    ('centre', True)
    """
    K = centre.num_tasks
    m = centre.num_train_masks
    cells = [Cell("centre", "centre", {})]
    if centre.regime == "finetune":
        strengths = ((10.0, 40),) if quick else ((10.0, 40), (1.0, 40), (1.0, 150), (0.1, 150))
        for prox, steps in strengths:
            if (prox, steps) != (centre.prox, centre.finetune_steps):
                cells.append(Cell("strength", f"prox={prox:g},steps={steps}",
                                  {"prox": prox, "finetune_steps": steps}))
    cells.append(Cell("regime", "scratch" if centre.regime == "finetune" else "finetune",
                      {"regime": "scratch" if centre.regime == "finetune" else "finetune"}))
    for q in (0.5, 0.7, 0.9):
        if (q,) != tuple(centre.densities):
            cells.append(Cell("density", f"{q:g}", {"densities": (q,)}))
    fams = ("redundancy", "antagonism") if quick else ("additive", "redundancy", "antagonism", "xor")
    for fam in fams:
        if fam != centre.family:
            cells.append(Cell("family", fam, {"family": fam, "num_tasks": K + K % 2}))
    if centre.family is not None:
        cells.append(Cell("family", "quadratic (blocks)", {"family": None}))
    if centre.regime == "finetune" and centre.finetune_params == "all":
        last = {**LAST_LAYER, "prox": 1e-3, "finetune_steps": 300} if quick else LAST_LAYER
        cells.append(Cell("fine-tuned layers", f"last layer only (prox {last['prox']:g}, "
                          f"{last['finetune_steps']} steps, exact GLM)", last))
    groups = 48 if quick else 200
    cells.append(Cell("grouping", f"{groups} sample groups",
                      {"family": None, "grouping": "samples", "num_tasks": groups}))
    for num in ((20,) if quick else (50, 200, 400)):
        if num != m:
            cells.append(Cell("num_masks", str(num), {"num_train_masks": num}))
    return cells


def _summary(res: dict) -> dict:
    M, P, E = res["methods"], res["paired"], res["estimator"]
    nc = res.get("noise_ceiling") or {}
    row = {name: {"lds": M[name]["lds"], "ci": M[name]["lds_ci"]} for name in M}
    return {"lds": row, "paired": P,
            "estimator": {k: E[k] for k in ("relative_error", "no_change_relative_error",
                                            "spearman", "ratio_to_no_change")},
            "noise_ceiling": nc.get("lds"), "noise_ceiling_ci": nc.get("lds_ci"),
            "interactions": res.get("interactions"),
            "seconds": res["timings"].get("total"), "cache_hit": res["ground_truth"]["cache_hit"]}


def run_atlas(centre: PipelineConfig, *, out: str, quick: bool = False,
              cache_dir: Optional[str] = None, progress: bool = True,
              num_resamples: int = 1000, cells: Optional[list] = None,
              variants=VARIANTS) -> dict:
    """Run every cell (each a cached pipeline run); write ``atlas.json``, ``atlas.md``, ``atlas.png``.

    Returns ``{"centre": config dict, "cells": [{"factor", "value", "overrides", ...summary}],
    "estimator_variants": [...] (:func:`estimator_variants` on the centre), "seconds"}``.
    """
    from tqdm.auto import tqdm

    os.makedirs(out, exist_ok=True)
    cells = atlas_cells(centre, quick=quick) if cells is None else cells
    t0 = time.perf_counter()
    rows = []
    for cell in tqdm(cells, desc="atlas", unit="cell", disable=not progress):
        cfg = dataclasses.replace(centre, **cell.overrides)
        res = run_pipeline(cfg, out=None, cache_dir=cache_dir, progress=False, plots=False,
                           num_resamples=num_resamples)
        rows.append({"factor": cell.factor, "value": cell.value,
                     "overrides": {k: list(v) if isinstance(v, tuple) else v
                                   for k, v in cell.overrides.items()},
                     **_summary(res)})
        with open(os.path.join(out, "atlas.json"), "w") as fh:  # partial results survive
            json.dump({"centre": centre.to_dict(), "cells": rows, "quick": quick}, fh, indent=2)
    variants = estimator_variants(centre, cache_dir=cache_dir, num_resamples=num_resamples,
                                  variants=variants)
    atlas = {"centre": centre.to_dict(), "cells": rows, "quick": quick,
             "estimator_variants": variants, "seconds": time.perf_counter() - t0}
    with open(os.path.join(out, "atlas.json"), "w") as fh:
        json.dump(atlas, fh, indent=2)
    with open(os.path.join(out, "atlas.md"), "w") as fh:
        fh.write(atlas_table(atlas) + "\n\n" + variants_table(variants) + "\n")
    write_atlas_figure(atlas, os.path.join(out, "atlas.png"))
    return atlas


def _fmt(p) -> str:
    mean, lo, hi = p
    star = "**" if lo > 0 else ("(-)" if hi < 0 else "")
    return f"{star}{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]{star if star == '**' else ''}"


def atlas_table(atlas: dict) -> str:
    """Markdown table: one row per cell (bold: paired interval above 0; (-): below 0).

    >>> row = {"factor": "centre", "value": "centre", "noise_ceiling": 0.9,
    ...        "lds": {n: {"lds": 0.5, "ci": [0.4, 0.6]} for n in ("kernel_real", "datamodels",
    ...                "kernel", "influence", "linear")},
    ...        "paired": {k: [0.1, 0.05, 0.15] for k in ("kernel_real-datamodels",
    ...                   "kernel-influence", "kernel-linear")},
    ...        "estimator": {"relative_error": 0.01, "no_change_relative_error": 0.03,
    ...                      "spearman": 0.9, "ratio_to_no_change": 0.33}}
    >>> "| **+0.100 [+0.050, +0.150]** |" in atlas_table({"cells": [row]})
    True
    """
    head = ("| factor | value | kernel_real LDS | datamodels LDS | kernel_real − datamodels | "
            "kernel (est.) LDS | influence LDS | kernel − influence | kernel − linear (est.) | "
            "estimator error / no change | Spearman | noise ceiling |")
    lines = [head, "|" + "---|" * 12]
    for r in atlas["cells"]:
        L, P, E = r["lds"], r["paired"], r["estimator"]
        nc = r.get("noise_ceiling")
        lines.append(
            f"| {r['factor']} | {r['value']} | {L['kernel_real']['lds']:.3f} | "
            f"{L['datamodels']['lds']:.3f} | {_fmt(P['kernel_real-datamodels'])} | "
            f"{L['kernel']['lds']:.3f} | {L['influence']['lds']:.3f} | "
            f"{_fmt(P['kernel-influence'])} | {_fmt(P['kernel-linear'])} | "
            f"{E['relative_error']:.4f} / {E['no_change_relative_error']:.4f} | "
            f"{E['spearman']:.2f} | {'—' if nc is None else f'{nc:.3f}'} |")
    return "\n".join(lines)


def variants_table(rows: list[dict]) -> str:
    """Markdown table of :func:`estimator_variants`.

    >>> print(variants_table([{"solver": "fast", "linearize_at": "W0", "error": "boom"}]))
    | solver | linearized at | relative error | / no change | Spearman | kernel (est.) LDS | kernel − influence |
    |---|---|---|---|---|---|---|
    | fast | W0 | failed: boom | | | | |
    """
    lines = ["| solver | linearized at | relative error | / no change | Spearman | "
             "kernel (est.) LDS | kernel − influence |", "|" + "---|" * 7]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['solver']} | {r['linearize_at']} | failed: {r['error']} | | | | |")
            continue
        lines.append(f"| {r['solver']} | {r['linearize_at']} | {r['relative_error']:.4f} | "
                     f"{r['ratio_to_no_change']:.2f} | {r['spearman']:.3f} | "
                     f"{r['kernel_lds']:.3f} | {_fmt(r['kernel-influence'])} |")
    return "\n".join(lines)


def write_atlas_figure(atlas: dict, path: str) -> str:
    """One panel per comparison: the paired LDS difference of every cell with its 95% interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = atlas["cells"]
    labels = [f"{r['factor']}: {r['value']}" for r in rows]
    comps = ("kernel_real-datamodels", "kernel-influence", "kernel-linear")
    fig, axes = plt.subplots(1, len(comps), figsize=(4.2 * len(comps), 0.32 * len(rows) + 1.4),
                             sharey=True)
    y = np.arange(len(rows))[::-1]
    for ax, comp in zip(axes, comps):
        vals = np.array([r["paired"][comp] for r in rows])
        colors = ["tab:green" if lo > 0 else ("tab:red" if hi < 0 else "tab:gray")
                  for _, lo, hi in vals]
        ax.errorbar(vals[:, 0], y, xerr=[vals[:, 0] - vals[:, 1], vals[:, 2] - vals[:, 0]],
                    fmt="none", ecolor=colors, elinewidth=1.5)
        ax.scatter(vals[:, 0], y, c=colors, s=14, zorder=3)
        ax.axvline(0, color="k", lw=0.7)
        ax.set_title(f"LDS {comp.replace('-', ' − ')}", fontsize=9)
    axes[0].set_yticks(y)
    axes[0].set_yticklabels(labels, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def estimator_variants(cfg: PipelineConfig, *, cache_dir: Optional[str] = None,
                       variants=None,
                       num_resamples: int = 1000) -> list[dict]:
    """The estimator where linearization fails: each ``(solver, linearize_at)`` variant on the
    same real labels (one cached ground truth), with its relative error, ratio to "nothing
    changes", Spearman and the LDS of a kernel on its estimated labels (with the paired
    difference against influence functions computed at the same linearization point).
    """
    from .pipeline import (estimate_stage, evaluate_stage, features_stage, ground_truth_stage,
                           masks_stage, methods_stage, prepare_stage)

    variants = VARIANTS if variants is None else variants
    cfg = dataclasses.replace(cfg, noise_ceiling=False)
    prep = prepare_stage(cfg)
    masks = masks_stage(cfg, prep)
    gt = ground_truth_stage(cfg, prep, masks, cache_dir=cache_dir)
    rows, feats_at = [], {}
    for solver, point in variants:
        c = dataclasses.replace(cfg, solver=solver, linearize_at=point)
        if point not in feats_at:
            feats_at[point] = features_stage(c, prep)
        t = time.perf_counter()
        try:
            est = estimate_stage(c, feats_at[point], masks)
        except Exception as exc:  # a solver that fails is a result too
            rows.append({"solver": solver, "linearize_at": point, "error": str(exc)[:200]})
            continue
        sec = time.perf_counter() - t
        meth = methods_stage(c, masks, gt, est, feats_at[point])
        ev = evaluate_stage(c, masks, gt, est, meth, prep, num_resamples=num_resamples)
        E = ev["estimator"]
        rows.append({"solver": solver, "linearize_at": point, "seconds": sec,
                     **{k: E[k] for k in ("relative_error", "no_change_relative_error",
                                          "ratio_to_no_change", "spearman", "change_captured")},
                     "kernel_lds": ev["methods"]["kernel"]["lds"],
                     "influence_lds": ev["methods"]["influence"]["lds"],
                     "kernel-influence": ev["paired"]["kernel-influence"],
                     "kernel-linear": ev["paired"]["kernel-linear"]})
    return rows
