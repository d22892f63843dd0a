"""PNG plots of a pipeline run (matplotlib, Agg backend)."""

from __future__ import annotations

import os

import numpy as np


def save_figure(fig, out: str, name: str, dpi: int = 110) -> str:
    """Lays out ``fig``, writes it to ``out/name`` as PNG, closes it and returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = os.path.join(out, name)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def write_lds_plot(out, methods: dict, noise_ceiling) -> str:
    """``lds.png``: each method's held-out LDS with its 95% bootstrap interval, and the noise
    ceiling (LDS of a retraining with another seed) as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(methods)
    lds = np.array([methods[n]["lds"] for n in names])
    ci = np.array([methods[n]["lds_ci"] for n in names])
    fig, ax = plt.subplots(figsize=(max(5.0, 0.75 * len(names)), 3.4))
    x = np.arange(len(names))
    ax.bar(x, lds, color="tab:blue", alpha=0.75)
    ax.errorbar(x, lds, yerr=[lds - ci[:, 0], ci[:, 1] - lds], fmt="none", ecolor="k", capsize=3)
    if noise_ceiling:
        other_w0 = noise_ceiling.get("kind") == "w0"
        ax.axhline(noise_ceiling["lds"], color="tab:red", ls="--", lw=1,
                   label="retrained from another W0" if other_w0 else "noise ceiling")
        ax.legend(fontsize=7)
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("held-out LDS (95% CI)")
    return save_figure(fig, out, "lds.png", dpi=100)


def write_plots(out, *, masks, F_ho, preds, loos, loo_real, interactions, task, grid) -> dict:
    """Writes three PNGs into ``out`` and returns ``{name: path}``.

    ``heldout.png``: predicted vs actual mean target loss on held-out masks for the surrogates;
    ``task_scores.png``: per-task leave-one-out effects (mean over targets), real vs methods;
    ``interactions.png``: the kernel surrogate's pairwise interaction matrix (mean over targets).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {}
    names = [n for n in ("kernel", "linear", "kernel_real", "datamodels") if n in preds]
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.6), squeeze=False)
    actual = F_ho.mean(axis=1)
    for ax, name in zip(axes[0], names):
        pred = preds[name].mean(axis=1)
        ax.scatter(actual, pred, s=10, alpha=0.7)
        lo, hi = min(actual.min(), pred.min()), max(actual.max(), pred.max())
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_title(name)
        ax.set_xlabel("real mean target loss (held-out mask)")
    axes[0][0].set_ylabel("surrogate prediction")
    fig.suptitle(f"{task}: held-out masks")
    paths["heldout"] = save_figure(fig, out, "heldout.png")

    K = loo_real.shape[0]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * K), 3.6))
    keys = ["real"] + [n for n in ("kernel", "linear", "kernel_real", "influence") if n in loos]
    width = 0.8 / len(keys)
    for i, name in enumerate(keys):
        v = loo_real.mean(axis=1) if name == "real" else loos[name].mean(axis=1)
        v = v / (np.abs(v).max() + 1e-12)
        ax.bar(np.arange(K) + (i - len(keys) / 2) * width, v, width, label=name)
    ax.set_xlabel("task (grid block)")
    ax.set_ylabel("LOO effect F(all) − F(all − k)\n(mean over targets, scaled)")
    ax.legend(fontsize=7, ncol=len(keys))
    paths["task_scores"] = save_figure(fig, out, "task_scores.png")

    mat = interactions.mean(axis=-1)
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    lim = np.abs(mat).max() + 1e-12
    im = ax.imshow(mat, cmap="RdBu_r", vmin=-lim, vmax=lim)
    fig.colorbar(im, ax=ax)
    ax.set_title(f"kernel surrogate interactions ({grid[0]}x{grid[1]} blocks)")
    ax.set_xlabel("task")
    ax.set_ylabel("task")
    paths["interactions"] = save_figure(fig, out, "interactions.png")
    return paths
