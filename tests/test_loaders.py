"""Tests for kernattr.data._loaders: load_subsets (three formats) and group_masks."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernattr as ka
from kernattr.data._loaders import SubsetData


@pytest.fixture
def arrays():
    rng = np.random.default_rng(0)
    masks = rng.random((12, 7)) < 0.5
    scores = rng.normal(size=(12, 3))
    test_masks = rng.random((5, 7)) < 0.5
    test_scores = rng.normal(size=(5, 3))
    return masks, scores, test_masks, test_scores


def _check(data, masks, scores, test_masks=None, test_scores=None):
    assert isinstance(data, SubsetData)
    assert data.train_masks.dtype == jnp.float32
    np.testing.assert_array_equal(data.train_masks, masks.astype(float))
    np.testing.assert_allclose(data.train_labels, scores.reshape(len(scores), -1), rtol=1e-6)
    if test_masks is None:
        assert data.test_masks is None and data.test_labels is None
    else:
        np.testing.assert_array_equal(data.test_masks, test_masks.astype(float))
        np.testing.assert_allclose(data.test_labels, test_scores, rtol=1e-6)


# ------------------------------------------------------------------ datamodels (.npy / .npz)
def test_datamodels_directory(tmp_path, arrays):
    masks, scores, tm, ts = arrays
    np.save(tmp_path / "masks.npy", masks)
    np.save(tmp_path / "margins.npy", scores)
    _check(ka.load_subsets(tmp_path), masks, scores)
    np.save(tmp_path / "test_masks.npy", tm)
    np.save(tmp_path / "test_margins.npy", ts)
    _check(ka.load_subsets(str(tmp_path), format="datamodels"), masks, scores, tm, ts)


def test_datamodels_npz_and_single_npy(tmp_path, arrays):
    masks, scores, tm, ts = arrays
    np.savez(tmp_path / "d.npz", masks=masks, scores=scores, test_masks=tm, test_scores=ts)
    _check(ka.load_subsets(tmp_path / "d.npz"), masks, scores, tm, ts)
    np.save(tmp_path / "m.npy", masks.astype(np.uint8))
    np.save(tmp_path / "s.npy", scores[:, 0])  # 1-D scores -> T = 1
    data = ka.load_subsets(tmp_path / "m.npy", scores=tmp_path / "s.npy")
    _check(data, masks, scores[:, :1])
    assert data.train_labels.shape == (12, 1)


def test_datamodels_errors(tmp_path, arrays):
    masks, scores, _, _ = arrays
    np.save(tmp_path / "m.npy", masks)
    with pytest.raises(ValueError, match="needs `scores=`"):
        ka.load_subsets(tmp_path / "m.npy")
    np.save(tmp_path / "s.npy", scores[:5])
    with pytest.raises(ValueError, match="`scores` has 5 rows but the masks have 12"):
        ka.load_subsets(tmp_path / "m.npy", scores=tmp_path / "s.npy")
    bad = masks.astype(float) * 2
    np.save(tmp_path / "b.npy", bad)
    np.save(tmp_path / "s.npy", scores)
    with pytest.raises(ValueError, match="only 0/1"):
        ka.load_subsets(tmp_path / "b.npy", scores=tmp_path / "s.npy")
    nan_scores = scores.copy()
    nan_scores[0, 0] = np.nan
    np.save(tmp_path / "n.npy", nan_scores)
    with pytest.raises(ValueError, match="non-finite"):
        ka.load_subsets(tmp_path / "m.npy", scores=tmp_path / "n.npy")
    np.savez(tmp_path / "x.npz", scores=scores)
    with pytest.raises(ValueError, match="no `masks` array"):
        ka.load_subsets(tmp_path / "x.npz")
    np.savez(tmp_path / "y.npz", masks=masks)
    with pytest.raises(ValueError, match="no `scores`/`margins`"):
        ka.load_subsets(tmp_path / "y.npz")
    np.savez(tmp_path / "z.npz", masks=masks, scores=scores, test_masks=masks)
    with pytest.raises(ValueError, match="no matching test scores"):
        ka.load_subsets(tmp_path / "z.npz")
    np.save(tmp_path / "r.npy", masks[0])
    with pytest.raises(ValueError, match=r"must be 2-D \[m, K\]"):
        ka.load_subsets(tmp_path / "r.npy", scores=tmp_path / "s.npy")
    with pytest.raises(FileNotFoundError, match="`path`"):
        ka.load_subsets(tmp_path / "missing.npy")
    with pytest.raises(FileNotFoundError, match="`scores`"):
        ka.load_subsets(tmp_path / "m.npy", scores=tmp_path / "missing.npy")


# ------------------------------------------------------------------ JSON with train_w
def test_json_format_roundtrip(tmp_path, arrays):
    masks, scores, tm, ts = arrays
    f = tmp_path / "d.json"
    f.write_text(json.dumps({
        "train_w": masks.astype(int).tolist(), "train_subset_scores": scores.tolist(),
        "test_w": tm.astype(int).tolist(), "test_subset_scores": ts.tolist(),
    }))
    _check(ka.load_subsets(f), masks, scores, tm, ts)
    f.write_text(json.dumps({"train_w": masks.tolist(), "train_subset_scores": scores[:, 0].tolist()}))
    _check(ka.load_subsets(f, format="json"), masks, scores[:, :1])


@pytest.mark.parametrize(
    "content, match",
    [
        ({"train_w": [[1, 0]]}, "missing key `train_subset_scores`"),
        ({"train_w": [[1, 0], [0]], "train_subset_scores": [1, 2]}, "rectangular"),
        ({"train_w": [[1, 0], [0, 1]], "train_subset_scores": [1]}, "1 rows but the masks have 2"),
        ({"train_w": [[1, 0], [0, 1]], "train_subset_scores": [1, 2], "test_w": [[1, 1]]},
         "must be given together"),
        ({"train_w": [[1, 0], [0, 1]], "train_subset_scores": [1, 2],
          "test_w": [[1, 1, 1]], "test_subset_scores": [3]}, "`test_w` has 3 columns"),
        ({"train_w": [[1, 0.5], [0, 1]], "train_subset_scores": [1, 2]}, "only 0/1"),
        ({"train_w": [[1, 0], [0, 1]], "train_subset_scores": ["a", 2]}, "array of numbers"),
        ([1, 2, 3], "subsets|scores"),
    ],
)
def test_json_format_errors(tmp_path, content, match):
    f = tmp_path / "d.json"
    f.write_text(json.dumps(content))
    fmt = "json" if isinstance(content, dict) else None
    with pytest.raises(ValueError, match=match):
        ka.load_subsets(f, format=fmt)


def test_invalid_json_and_unknown_layout(tmp_path):
    f = tmp_path / "d.json"
    f.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ka.load_subsets(f)
    f.write_text(json.dumps({"foo": 1}))
    with pytest.raises(ValueError, match="cannot tell the layout"):
        ka.load_subsets(f)
    g = tmp_path / "d.txt"
    g.write_text("x")
    with pytest.raises(ValueError, match="pass `format=`"):
        ka.load_subsets(g)
    with pytest.raises(ValueError, match="`format` must be one of"):
        ka.load_subsets(f, format="csv")


# ------------------------------------------------------------------ example ids per subset
def test_ids_format_object_and_list(tmp_path, arrays):
    masks, scores, tm, ts = arrays
    ids = [np.flatnonzero(r).tolist() for r in masks]
    tids = [np.flatnonzero(r).tolist() for r in tm]
    f = tmp_path / "ids.json"
    f.write_text(json.dumps({"subsets": ids, "scores": scores.tolist(), "num_examples": 7,
                             "test_subsets": tids, "test_scores": ts.tolist()}))
    _check(ka.load_subsets(f), masks, scores, tm, ts)
    # Plain list + separate scores file; N inferred as 1 + max id.
    g = tmp_path / "list.json"
    g.write_text(json.dumps([[0, 2], [1], [], [4, 0]]))
    np.save(tmp_path / "sc.npy", np.arange(4.0))
    data = ka.load_subsets(g, scores=tmp_path / "sc.npy")
    expected = np.array([[1, 0, 1, 0, 0], [0, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 0, 0, 0, 1]])
    np.testing.assert_array_equal(data.train_masks, expected)
    np.testing.assert_array_equal(data.train_labels[:, 0], np.arange(4.0))
    h = tmp_path / "sc.json"
    h.write_text(json.dumps([0.0, 1.0, 2.0, 3.0]))
    data2 = ka.load_subsets(g, format="ids", scores=h)
    np.testing.assert_array_equal(data2.train_masks, expected)


@pytest.mark.parametrize(
    "content, match",
    [
        ({"subsets": [[0, 9]], "scores": [1.0], "num_examples": 5}, r"ids outside 0\.\.4"),
        ({"subsets": [[0, "a"]], "scores": [1.0]}, r"`subsets\[0\]` must be a list of integer"),
        ({"subsets": [], "scores": []}, "non-empty list"),
        ({"subsets": [[0]]}, "missing `scores`"),
        ({"subsets": [[0]], "scores": [1.0], "num_examples": 0}, "`num_examples`"),
        ({"subsets": [[0]], "scores": [1.0], "test_subsets": [[0]]}, "given together"),
    ],
)
def test_ids_format_errors(tmp_path, content, match):
    f = tmp_path / "ids.json"
    f.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=match):
        ka.load_subsets(f, format="ids")


def test_ids_list_needs_scores(tmp_path):
    f = tmp_path / "ids.json"
    f.write_text(json.dumps([[0], [1]]))
    with pytest.raises(ValueError, match="needs `scores=`"):
        ka.load_subsets(f)


# ------------------------------------------------------------------ grouping
def _group_oracle(masks, gid, k, rule):
    out = np.zeros((masks.shape[0], k))
    for g in range(k):
        cols = masks[:, gid == g]
        if rule == "any":
            out[:, g] = cols.any(1)
        elif rule in ("all", "exact"):
            out[:, g] = cols.all(1)
        else:
            out[:, g] = cols.mean(1)
    return out


@pytest.mark.parametrize("rule", ["any", "all", "fraction"])
def test_group_masks_rules(rule):
    rng = np.random.default_rng(1)
    gid = np.array([0, 0, 1, 2, 2, 2, 1, 3])
    masks = (rng.random((30, 8)) < 0.6).astype(float)
    got = ka.group_masks(masks, gid, rule=rule)
    np.testing.assert_allclose(got, _group_oracle(masks.astype(bool), gid, 4, rule), rtol=1e-6)
    jitted = jax.jit(lambda m, g: ka.group_masks(m, g, num_groups=4, rule=rule))(masks, gid)
    np.testing.assert_allclose(jitted, got)


def test_group_masks_exact_default():
    gid = np.array([1, 0, 1, 2, 0])
    task = np.array([[1, 0, 1], [0, 1, 1], [0, 0, 0]], float)
    sample = task[:, gid]
    np.testing.assert_array_equal(ka.group_masks(sample, gid), task)
    partial = sample.copy()
    partial[0, 1] = 0  # half of group 0 (examples 1 and 4) in subset 0
    with pytest.raises(ValueError, match='part of a group in 1 .*rule="any"'):
        ka.group_masks(partial, gid)
    with pytest.raises(Exception, match="part of a group"):
        jax.block_until_ready(jax.jit(lambda m: ka.group_masks(m, gid, num_groups=3))(partial))
    np.testing.assert_array_equal(ka.group_masks(partial, gid, rule="any"), task)


def test_group_masks_vmap_and_no_retrace():
    gid = jnp.array([0, 1, 1, 2])
    batch = (np.random.default_rng(2).random((3, 6, 4)) < 0.5).astype(np.float32)
    out = jax.vmap(lambda m: ka.group_masks(m, gid, num_groups=3, rule="any"))(batch)
    for i in range(3):
        np.testing.assert_array_equal(out[i], _group_oracle(batch[i] > 0, np.asarray(gid), 3, "any"))
    traces = []

    def f(m):
        traces.append(1)
        return ka.group_masks(m, gid, num_groups=3, rule="all")

    jf = jax.jit(f)
    jf(batch[0])
    jf(batch[1])
    assert len(traces) == 1


def test_group_masks_bad_input():
    m = np.ones((2, 4))
    with pytest.raises(ValueError, match="`group_ids` has 3 entries"):
        ka.group_masks(m, [0, 1, 1])
    with pytest.raises(TypeError, match="`group_ids` must have an integer dtype"):
        ka.group_masks(m, [0.0, 1.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="`group_ids` must have shape"):
        ka.group_masks(m, [[0, 1, 1, 0]])
    with pytest.raises(ValueError, match="outside 0..1"):
        ka.group_masks(m, [0, 1, 2, 0], num_groups=2)
    with pytest.raises(ValueError, match="without any example"):
        ka.group_masks(m, [0, 2, 2, 0])
    with pytest.raises(ValueError, match="`rule`"):
        ka.group_masks(m, [0, 1, 1, 0], rule="most")
    with pytest.raises(ValueError, match="`sample_masks` must contain only 0 and 1"):
        ka.group_masks(m * 0.5, [0, 1, 1, 0])
    with pytest.raises(ValueError, match="`sample_masks` must have shape"):
        ka.group_masks(np.ones(4), [0, 1, 1, 0])
    with pytest.raises(ValueError, match="Pass `num_groups=`"):
        jax.jit(lambda g: ka.group_masks(m, g))(jnp.array([0, 1, 1, 0]))


def test_load_with_group_ids(tmp_path):
    gid = np.array([0, 0, 1, 1, 1, 2])
    task = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 1], [0, 0, 1]])
    np.save(tmp_path / "masks.npy", task[:, gid].astype(bool))
    np.save(tmp_path / "scores.npy", np.arange(4.0))
    np.save(tmp_path / "gid.npy", gid)
    data = ka.load_subsets(tmp_path, group_ids=tmp_path / "gid.npy")
    np.testing.assert_array_equal(data.train_masks, task)
    data2 = ka.load_subsets(tmp_path, group_ids=gid, rule="any")
    np.testing.assert_array_equal(data2.train_masks, task)


def test_builtin_example_is_reproducible():
    from kernattr.data._games import example_data

    path = os.path.join(os.path.dirname(ka.__file__), "data", "example_game.json")
    data = ka.load_subsets(path)
    assert data.train_masks.shape == (500, 20) and data.test_masks.shape == (200, 20)
    assert data.train_labels.shape == (500, 8) and data.test_labels.shape == (200, 8)
    fresh = example_data(seed=0)
    np.testing.assert_array_equal(data.train_masks, np.array(fresh["train_w"]))
    np.testing.assert_allclose(data.test_labels, np.array(fresh["test_subset_scores"]), atol=2e-6)
