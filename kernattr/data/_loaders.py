"""Loaders for subset / score ground truth that other attribution projects publish.

Three layouts are read by :func:`load_subsets` (``format=`` or inferred from the path):

* ``"datamodels"``: datamodels-style arrays. ``path`` is a directory or an ``.npz`` holding
  ``masks`` ``[m, N]`` (bool / 0-1; which examples each model was trained on) and ``scores`` or
  ``margins`` ``[m]`` / ``[m, T]``, optionally ``test_masks`` with ``test_scores`` /
  ``test_margins``; or ``path`` is the masks ``.npy`` file itself and ``scores=`` names the scores
  ``.npy``. In a directory, ``X`` is read from ``X.npy``.
* ``"json"``: a JSON object with ``train_w`` ``[m, K]`` (0/1), ``train_subset_scores`` ``[m]`` or
  ``[m, T]``, and optionally ``test_w`` / ``test_subset_scores``.
* ``"ids"``: the selected example ids per subset. Either a JSON object ``{"subsets": [[ids...],
  ...], "scores": [...], "num_examples": N, "test_subsets": ..., "test_scores": ...}`` (only
  ``subsets`` and ``scores`` are required), or a JSON list of id lists with the scores in a
  separate ``.npy`` / ``.json`` file given as ``scores=``. ``N`` defaults to ``1 + max id``.

Sample-level masks (one column per example) become task-level masks with :func:`group_masks`
(or ``group_ids=`` here).
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from .._checks import check_masks, check_rank, error_if, is_concrete

__all__ = ["FORMATS", "GROUP_RULES", "SubsetData", "group_masks", "load_subsets"]

FORMATS = ("datamodels", "json", "ids")
GROUP_RULES = ("exact", "any", "all", "fraction")


class SubsetData(NamedTuple):
    """Subset masks and measured scores (a pytree).

    Attributes:
      train_masks: ``[m, K]`` float 0/1 (``K`` tasks, or ``N`` examples before grouping).
      train_labels: ``[m, T]`` float scores (``T = 1`` for a 1-D score file).
      test_masks: ``[m', K]`` float 0/1, or ``None`` when the file has no held-out part.
      test_labels: ``[m', T]``, or ``None``.
    """

    train_masks: jax.Array
    train_labels: jax.Array
    test_masks: Optional[jax.Array] = None
    test_labels: Optional[jax.Array] = None


def group_masks(
    sample_masks: Any,
    group_ids: Any,
    *,
    num_groups: int | None = None,
    rule: str = "exact",
) -> jax.Array:
    """Turn sample-level masks into group-level (task-level) masks.

    Rules for group ``g`` in subset ``i`` (``c`` = number of selected examples of ``g``,
    ``n_g`` = size of ``g``):

    * ``"exact"`` (default): every group must be entirely in or entirely out of every subset
      (``c ∈ {0, n_g}``), which is what task-level sampling produces; a partially selected group
      raises ``ValueError`` (choose another rule then). Result ``1[c = n_g]``.
    * ``"any"``: ``1[c > 0]`` (the task is in as soon as one of its examples is).
    * ``"all"``: ``1[c = n_g]`` (the task is in only when all of its examples are).
    * ``"fraction"``: ``c / n_g`` in ``[0, 1]`` — *not* a 0/1 mask; for your own weighted models,
      surrogates reject it.

    Args:
      sample_masks: ``[m, N]`` 0/1 (or bool) masks over ``N`` examples.
      group_ids: ``[N]`` integer group (task) of each example, in ``0..num_groups-1``.
      num_groups: ``K``; default ``1 + max(group_ids)`` (needs concrete ``group_ids``; pass it
        under ``jit``). Every group must have at least one example.
      rule: ``"exact"``, ``"any"``, ``"all"`` or ``"fraction"``.

    Returns:
      ``[m, K]`` float masks (0/1, or fractions for ``"fraction"``).

    Example:
      >>> import kernattr as ka
      >>> ka.group_masks([[1, 1, 0], [0, 0, 1]], [0, 0, 1]).tolist()
      [[1.0, 0.0], [0.0, 1.0]]
    """
    if rule not in GROUP_RULES:
        raise ValueError(f"`rule` must be one of {GROUP_RULES}, got {rule!r}.")
    sample_masks = check_masks(sample_masks, "sample_masks")
    if isinstance(group_ids, (str, bytes)) or group_ids is None:
        raise TypeError(f"`group_ids` must be an integer array, got {group_ids!r}.")
    group_ids = jnp.asarray(group_ids)
    if not jnp.issubdtype(group_ids.dtype, jnp.integer):
        raise TypeError(f"`group_ids` must have an integer dtype, got {group_ids.dtype}.")
    check_rank(group_ids, 1, "group_ids", "[N] (one group id per example)")
    n = sample_masks.shape[1]
    if group_ids.shape[0] != n:
        raise ValueError(
            f"`group_ids` has {group_ids.shape[0]} entries but `sample_masks` has {n} example "
            "columns; give one group id per example."
        )
    if num_groups is None:
        if not is_concrete(group_ids):
            raise ValueError("Pass `num_groups=` when `group_ids` is traced (under jit/vmap).")
        num_groups = int(jnp.max(group_ids)) + 1
    if isinstance(num_groups, bool) or not isinstance(num_groups, (int, np.integer)):
        raise TypeError(f"`num_groups` must be a Python int, got {num_groups!r}.")
    if num_groups < 1:
        raise ValueError(f"`num_groups` must be >= 1, got {num_groups}.")
    num_groups = int(num_groups)
    error_if(
        group_ids,
        (group_ids < 0) | (group_ids >= num_groups),
        f"`group_ids` has {{count}} entries outside 0..{num_groups - 1} (num_groups={num_groups}).",
    )
    sizes = jax.ops.segment_sum(
        jnp.ones((n,), sample_masks.dtype), group_ids, num_segments=num_groups
    )
    error_if(
        sizes,
        sizes == 0,
        "`group_ids` leaves {count} group(s) without any example; every task needs one "
        "(renumber the groups or lower `num_groups`).",
    )
    counts = jax.ops.segment_sum(sample_masks.T, group_ids, num_segments=num_groups).T  # [m, K]
    full = counts == sizes[None, :]
    if rule == "exact":
        partial = (counts > 0) & ~full
        error_if(
            counts,
            partial,
            "`sample_masks` selects only part of a group in {count} (subset, group) cells; "
            'rule="exact" needs whole groups. Use rule="any", "all" or "fraction".',
        )
        return full.astype(sample_masks.dtype)
    if rule == "all":
        return full.astype(sample_masks.dtype)
    if rule == "any":
        return (counts > 0).astype(sample_masks.dtype)
    return counts / jnp.maximum(sizes, 1.0)[None, :]


# ----------------------------------------------------------------------------- file reading


def _fail(path: Any, what: str) -> ValueError:
    return ValueError(f"{os.fspath(path)}: {what}")


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise _fail(path, f"not valid JSON ({e}).") from e


def _read_array(path: str) -> np.ndarray:
    if path.endswith(".json"):
        return _to_numeric(_read_json(path), path, "scores")
    try:
        return np.load(path, allow_pickle=False)
    except Exception as e:  # numpy raises ValueError, OSError, EOFError, ... on a bad file
        raise _fail(path, f"cannot read as a .npy array ({type(e).__name__}: {e}).") from e


def _to_numeric(value: Any, path: Any, field: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=float)
    except (TypeError, ValueError) as e:
        raise _fail(path, f"`{field}` must be a rectangular array of numbers ({e}).") from e
    return arr


def _as_masks(arr: np.ndarray, path: Any, field: str) -> jax.Array:
    arr = np.asarray(arr)
    if arr.dtype == object:
        raise _fail(path, f"`{field}` must be a rectangular array.")
    if arr.ndim != 2:
        raise _fail(path, f"`{field}` must be 2-D [m, K], got shape {arr.shape}.")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise _fail(path, f"`{field}` is empty (shape {arr.shape}).")
    arr = arr.astype(float)
    bad = int(np.sum((arr != 0) & (arr != 1)))
    if bad:
        raise _fail(path, f"`{field}` must hold only 0/1 (or bool); {bad} entries are neither.")
    return jnp.asarray(arr, jnp.result_type(float))


def _as_labels(arr: np.ndarray, num_rows: int, path: Any, field: str) -> jax.Array:
    arr = np.asarray(arr)
    if arr.dtype == object:
        raise _fail(path, f"`{field}` must be a rectangular array of numbers.")
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise _fail(path, f"`{field}` must be [m] or [m, T], got shape {arr.shape}.")
    if arr.shape[0] != num_rows:
        raise _fail(
            path, f"`{field}` has {arr.shape[0]} rows but the masks have {num_rows}; one score "
            "row per subset is needed."
        )
    arr = arr.astype(float)
    if not np.all(np.isfinite(arr)):
        raise _fail(path, f"`{field}` has {int(np.sum(~np.isfinite(arr)))} non-finite values.")
    return jnp.asarray(arr, jnp.result_type(float))


def _pair(masks, scores, path, mfield, sfield):
    m = _as_masks(masks, path, mfield)
    return m, _as_labels(scores, m.shape[0], path, sfield)


def _check_test_part(path, train, test, fields) -> None:
    """The held-out part must have the training part's K (mask columns) and T (targets).

    ``fields``: names of (train masks, train scores, test masks, test scores) in the file.
    """
    tm, ts, vm, vs = fields
    if test[0].shape[1] != train[0].shape[1]:
        raise _fail(path, f"`{vm}` has {test[0].shape[1]} columns (tasks), `{tm}` "
                    f"{train[0].shape[1]}; the held-out masks must have the same K.")
    if test[1].shape[1] != train[1].shape[1]:
        raise _fail(path, f"`{vs}` has {test[1].shape[1]} targets, `{ts}` {train[1].shape[1]}; "
                    "the held-out scores must have the same T.")


def _first_key(store: dict, names: tuple[str, ...]) -> Optional[str]:
    for name in names:
        if name in store:
            return name
    return None


def _load_datamodels(path: str, scores: Optional[str]) -> SubsetData:
    if os.path.isdir(path):
        store = {
            f[: -len(".npy")]: os.path.join(path, f)
            for f in os.listdir(path)
            if f.endswith(".npy")
        }
        get = lambda k: _read_array(store[k])  # noqa: E731
    elif path.endswith(".npz"):
        try:
            npz = np.load(path, allow_pickle=False)
            store = {k: None for k in npz.files}
        except Exception as e:  # zipfile.BadZipFile, ValueError, OSError, EOFError, ...
            raise _fail(
                path, f"cannot read as a .npz archive ({type(e).__name__}: {e}); "
                'format="datamodels" expects a readable .npz of arrays.'
            ) from e

        def get(k):
            try:
                return npz[k]
            except Exception as e:  # a corrupt member
                raise _fail(path, f"cannot read array `{k}` of the .npz ({type(e).__name__}: {e}).") from e

    elif not path.endswith(".npy"):
        kind = "a .json file" if path.endswith(".json") else f"{os.path.basename(path)!r}"
        raise _fail(
            path, 'format="datamodels" expects a directory of .npy files, an .npz archive or a '
            f"masks .npy (with `scores=`); found {kind}"
            + (' (use format="json" or "ids" for JSON layouts).' if path.endswith(".json") else ".")
        )
    else:  # the masks .npy itself
        if scores is None:
            raise _fail(path, "a masks .npy needs `scores=` (the [m] or [m, T] scores .npy).")
        masks, sc = _pair(_read_array(path), _read_array(scores), path, "masks", "scores")
        return SubsetData(masks, sc)
    mk = _first_key(store, ("masks", "train_masks"))
    if mk is None:
        raise _fail(path, f"no `masks` array found (have {sorted(store)}).")
    if scores is not None:
        sc_arr = _read_array(scores)
    else:
        sk = _first_key(store, ("scores", "margins", "train_scores", "train_margins"))
        if sk is None:
            raise _fail(path, f"no `scores`/`margins` array found (have {sorted(store)}).")
        sc_arr = get(sk)
    train = _pair(get(mk), sc_arr, path, mk, "scores")
    tk = _first_key(store, ("test_masks", "val_masks"))
    if tk is None:
        return SubsetData(*train)
    tsk = _first_key(store, ("test_scores", "test_margins", "val_scores", "val_margins"))
    if tsk is None:
        raise _fail(path, f"`{tk}` is present but no matching test scores/margins.")
    test = _pair(get(tk), get(tsk), path, tk, tsk)
    _check_test_part(path, train, test, (mk, sk if scores is None else "scores", tk, tsk))
    return SubsetData(*train, *test)


def _load_json(path: str) -> SubsetData:
    data = _read_json(path)
    if not isinstance(data, dict):
        raise _fail(path, "expected a JSON object with `train_w` and `train_subset_scores`.")
    for k in ("train_w", "train_subset_scores"):
        if k not in data:
            raise _fail(path, f"missing key `{k}` (have {sorted(data)}).")
    train = _pair(
        _to_numeric(data["train_w"], path, "train_w"),
        _to_numeric(data["train_subset_scores"], path, "train_subset_scores"),
        path, "train_w", "train_subset_scores",
    )
    has_w, has_s = "test_w" in data, "test_subset_scores" in data
    if has_w != has_s:
        raise _fail(path, "`test_w` and `test_subset_scores` must be given together.")
    if not has_w:
        return SubsetData(*train)
    test = _pair(
        _to_numeric(data["test_w"], path, "test_w"),
        _to_numeric(data["test_subset_scores"], path, "test_subset_scores"),
        path, "test_w", "test_subset_scores",
    )
    _check_test_part(path, train, test,
                     ("train_w", "train_subset_scores", "test_w", "test_subset_scores"))
    return SubsetData(*train, *test)


def _check_ids(subsets: Any, path: Any, field: str) -> None:
    if not isinstance(subsets, list) or not subsets:
        raise _fail(path, f"`{field}` must be a non-empty list of id lists.")
    for i, ids in enumerate(subsets):
        if not isinstance(ids, list) or not all(
            isinstance(j, int) and not isinstance(j, bool) for j in ids
        ):
            raise _fail(path, f"`{field}[{i}]` must be a list of integer example ids.")


def _ids_to_masks(subsets: list, num_examples: int, path: Any, field: str) -> np.ndarray:
    masks = np.zeros((len(subsets), num_examples))
    for i, ids in enumerate(subsets):
        if ids and (min(ids) < 0 or max(ids) >= num_examples):
            raise _fail(
                path, f"`{field}[{i}]` has ids outside 0..{num_examples - 1} "
                f"(num_examples={num_examples})."
            )
        masks[i, ids] = 1.0
    return masks


def _max_id(subsets: list) -> int:
    return max((max(ids) for ids in subsets if ids), default=-1)


def _load_ids(path: str, scores: Optional[str]) -> SubsetData:
    data = _read_json(path)
    if isinstance(data, list):
        if scores is None:
            raise _fail(path, "a JSON list of id lists needs `scores=` (a .npy or .json file).")
        data = {"subsets": data}
    if not isinstance(data, dict) or "subsets" not in data:
        raise _fail(path, "expected a JSON object with `subsets` (lists of example ids).")
    if scores is not None:
        sc = _read_array(scores)
    elif "scores" in data:
        sc = _to_numeric(data["scores"], path, "scores")
    else:
        raise _fail(path, "missing `scores` (in the file or as `scores=`).")
    has_test = "test_subsets" in data
    if has_test != ("test_scores" in data):
        raise _fail(path, "`test_subsets` and `test_scores` must be given together.")
    _check_ids(data["subsets"], path, "subsets")
    if has_test:
        _check_ids(data["test_subsets"], path, "test_subsets")
    n = data.get("num_examples")
    if n is None:
        n = 1 + max(_max_id(data["subsets"]), _max_id(data.get("test_subsets", [])))
        if n < 1:
            raise _fail(path, "every subset is empty; give `num_examples`.")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise _fail(path, f"`num_examples` must be a positive int, got {n!r}.")
    train = _pair(_ids_to_masks(data["subsets"], n, path, "subsets"), sc, path, "subsets", "scores")
    if not has_test:
        return SubsetData(*train)
    test = _pair(
        _ids_to_masks(data["test_subsets"], n, path, "test_subsets"),
        _to_numeric(data["test_scores"], path, "test_scores"),
        path, "test_subsets", "test_scores",
    )
    _check_test_part(path, train, test, ("subsets", "scores", "test_subsets", "test_scores"))
    return SubsetData(*train, *test)


def _infer_format(path: str) -> str:
    if os.path.isdir(path) or path.endswith((".npz", ".npy")):
        return "datamodels"
    if path.endswith(".json"):
        data = _read_json(path)
        if isinstance(data, dict) and "train_w" in data:
            return "json"
        if isinstance(data, list) or (isinstance(data, dict) and "subsets" in data):
            return "ids"
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise _fail(
            path, f"cannot tell the layout (found {keys}); expected `train_w` (format='json') "
            "or `subsets` (format='ids')."
        )
    raise _fail(path, "cannot infer the format from the name; pass `format=` "
                f"(one of {FORMATS}).")


def load_subsets(
    path: str | os.PathLike,
    *,
    format: str | None = None,
    scores: str | os.PathLike | None = None,
    group_ids: Any = None,
    num_groups: int | None = None,
    rule: str = "exact",
) -> SubsetData:
    """Read subset masks and their measured scores from a file (see the module docstring).

    Args:
      path: file or directory.
      format: ``"datamodels"``, ``"json"`` or ``"ids"``; inferred from ``path`` when omitted
        (directory / ``.npz`` / ``.npy`` -> datamodels; ``.json`` with ``train_w`` -> json,
        with ``subsets`` or a top-level list -> ids).
      scores: separate scores file (``.npy``, or ``.json`` holding a list) when ``path`` holds
        only masks / ids; overrides scores found in ``path``.
      group_ids: optional ``[N]`` integer group of each example (array or a ``.npy`` path): the
        sample-level masks are then grouped into task-level masks with :func:`group_masks`.
      num_groups: ``K`` for the grouping (default ``1 + max(group_ids)``).
      rule: grouping rule, see :func:`group_masks`.

    Returns:
      :class:`SubsetData` with ``[m, K]`` masks and ``[m, T]`` labels (test fields ``None``
      when the file has no held-out subsets).

    Raises:
      FileNotFoundError: ``path`` or ``scores`` does not exist.
      ValueError: malformed content (the message names the file and the field).

    Example:
      >>> import json, os, tempfile, kernattr as ka
      >>> f = os.path.join(tempfile.mkdtemp(), "d.json")
      >>> json.dump({"train_w": [[1, 0], [0, 1]], "train_subset_scores": [0.5, 0.2]}, open(f, "w"))
      >>> ka.load_subsets(f).train_labels.shape
      (2, 1)
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"`path` {path!r} does not exist.")
    if scores is not None:
        scores = os.fspath(scores)
        if not os.path.exists(scores):
            raise FileNotFoundError(f"`scores` {scores!r} does not exist.")
    fmt = _infer_format(path) if format is None else format
    if fmt not in FORMATS:
        raise ValueError(f"`format` must be one of {FORMATS}, got {fmt!r}.")
    if fmt == "datamodels":
        data = _load_datamodels(path, scores)
    elif fmt == "json":
        if scores is not None:
            raise ValueError('`scores=` is not used with format="json" (scores are in the file).')
        data = _load_json(path)
    else:
        data = _load_ids(path, scores)
    if group_ids is None:
        return data
    if isinstance(group_ids, (str, os.PathLike)):
        group_ids = _read_array(os.fspath(group_ids))
    group_ids = np.asarray(group_ids)
    if group_ids.dtype.kind == "f" and np.all(group_ids == np.round(group_ids)):
        group_ids = group_ids.astype(np.int64)
    gid = jnp.asarray(group_ids)
    if num_groups is None and gid.ndim == 1 and gid.shape[0] > 0 and jnp.issubdtype(
        gid.dtype, jnp.integer
    ):
        num_groups = int(jnp.max(gid)) + 1
    tr = group_masks(data.train_masks, gid, num_groups=num_groups, rule=rule)
    te = None
    if data.test_masks is not None:
        te = group_masks(data.test_masks, gid, num_groups=num_groups, rule=rule)
    return SubsetData(tr, data.train_labels, te, data.test_labels)
