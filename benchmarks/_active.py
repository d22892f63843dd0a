"""Shared by the active-selection benchmarks (``bench_active.py``, ``bench_active_modular.py``):
the retrains at which a learning curve reaches a target, their report, and the curve plot.

Imported as ``from _active import ...`` (the benchmarks run as scripts, so this folder is on
``sys.path``).
"""

from __future__ import annotations

import numpy as np


def reach_of(sizes, curve, target):
    """Retrains at which ``curve`` first reaches ``target`` (linear interpolation), or None.

    >>> reach_of([10, 20, 30], [0.1, 0.5, 0.9], 0.7)
    25.0
    """
    for i, n in enumerate(sizes):
        if curve[i] >= target:
            if i == 0:
                return float(n)
            frac = (target - curve[i - 1]) / max(curve[i] - curve[i - 1], 1e-12)
            return sizes[i - 1] + frac * (n - sizes[i - 1])
    return None


def print_mean_curves(sizes, rand, act, *, unit: str = "seed") -> None:
    """Print the retrain counts and the random and active LDS curves averaged over ``unit``s."""
    print("retrains:", list(sizes))
    print(f"random LDS (mean over {unit}s):", np.round(rand.mean(0), 4).tolist())
    print(f"active LDS (mean over {unit}s):", np.round(act.mean(0), 4).tolist())


def report_reach(sizes, rand, act, budget: int, *, unit: str = "seed",
                 names: tuple[str, str] = ("random", "active"), tag: str = "RATIO") -> None:
    """Print, per ``unit`` (a row of ``rand``/``act`` ``[S, len(sizes)]``), the retrains at which
    the second arm (``names[1]``) reaches that row's first-arm LDS at ``budget``, then the same
    for the mean curves and its ratio to ``budget`` (the ``tag`` line; target <= 0.7)."""
    base, arm = names
    reach_row = [reach_of(sizes, act[s], rand[s, -1]) for s in range(rand.shape[0])]
    print(f"per {unit}: retrains for {arm} to reach that {unit}'s {base} LDS at {budget}: "
          f"{[None if v is None else round(v) for v in reach_row]}")
    target = rand.mean(0)[-1]
    reach = reach_of(sizes, act.mean(0), target)
    if reach is None:
        print(f"{tag} {arm} never reached {base}'s LDS at {budget} ({target:.4f}) within {budget} "
              "retrains (target <= 0.7)")
    else:
        print(f"{tag} retrains for {arm} to reach {base}'s LDS at {budget} ({target:.4f}): "
              f"{reach:.0f} = {reach / budget:.2f} of {base}'s (target <= 0.70)")


def surrogate_fit(ka, name: str, ard_steps: int):
    """The jitted ``fit(masks, y)`` a benchmark's ``--surrogate`` names: ``kernel``
    (``ka.fit_kernel``), ``quadratic`` (``ka.fit_quadratic``) or ``ard``
    (``ka.fit_quadratic(..., ard_steps=ard_steps)``)."""
    import jax

    return jax.jit({"kernel": ka.fit_kernel, "quadratic": ka.fit_quadratic,
                    "ard": lambda x, y: ka.fit_quadratic(x, y, ard_steps=ard_steps)}[name])


def report_model_saving(sizes, grid, rand, budget: int, *, unit: str = "seed") -> None:
    """With ``--surrogate ard``: ``fit_quadratic``'s random-mask curve (``grid``) and the
    retrains random masks with ARD (``rand``) need for its LDS at ``budget`` (``MODEL-RATIO``)."""
    print(f"random masks, fit_quadratic without ARD (mean over {unit}s): {np.round(grid.mean(0), 4).tolist()}")
    report_reach(sizes, grid, rand, budget, unit=unit, names=("random without ARD", "random with ARD"),
                 tag="MODEL-RATIO")


def plot_curves(path: str, sizes, random_curve, active_curve, *, random_label: str,
                active_label: str, xlabel: str, title: str, ceiling=None, extra=(), vline=None) -> None:
    """Save the random and active LDS curves to ``path``, with an optional noise-ceiling line,
    ``extra`` ``(label, curve)`` pairs and a vertical line ``vline = (x, label)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.plot(sizes, random_curve, "o-", label=random_label)
    ax.plot(sizes, active_curve, "s-", label=active_label)
    for label, curve in extra:
        ax.plot(sizes, curve, "^--", label=label)
    if vline is not None:
        ax.axvline(vline[0], ls="--", c="k", lw=0.8, label=vline[1])
    if ceiling is not None:
        ax.axhline(ceiling, ls=":", c="gray", label="noise ceiling")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("held-out LDS")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")
