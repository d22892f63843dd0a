"""Reference for ``ka.select_masks`` (imported by the tests; not collected by pytest): greedy
picks from covariances recomputed by really refitting after each pick."""

import numpy as np


def greedy_refit_picks(cov_after, masks, pool, num, criterion, noise):
    """The ``num`` masks of ``pool`` that greedy selection picks when, before each pick, the
    pool's posterior covariance is ``cov_after(training masks)`` (a refit) and the observation
    noise is ``noise`` (same units). ``criterion``: ``"variance"`` or ``"integrated"``."""
    cur, taken, ref = np.asarray(masks), [], []
    for _ in range(num):
        cov = cov_after(cur)
        diag = np.diag(cov).copy()
        score = diag if criterion == "variance" else (cov**2).sum(0) / (diag + noise)
        score[taken] = -np.inf
        j = int(np.argmax(score))
        taken.append(j)
        ref.append(pool[j])
        cur = np.concatenate([cur, pool[j : j + 1]])
    return np.stack(ref)
