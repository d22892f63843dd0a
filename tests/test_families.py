"""Task families with built-in interactions: construction, second differences, and the
interactions measured in real training at tiny size."""

import numpy as np
import pytest

import kernattr as ka
from kernattr.experiments import families as fm
from kernattr.experiments.modular import modular_labels


@pytest.mark.parametrize("family", fm.FAMILIES)
def test_family_construction(family):
    p, B = 11, 4
    fam = fm.make_family_data(family, p=p, num_blocks=B, num_targets=10, seed=2)
    d = fam.data
    K = int(d.task_ids.max()) + 1
    assert K == 2 * B and set(d.task_ids.tolist()) == set(range(K))
    assert fam.designed_pairs.shape == (len(fam.designed_block), 2)
    assert np.all(fam.designed_pairs[:, 0] != fam.designed_pairs[:, 1])
    x, y, lab = d.train_inputs[:, 0], d.train_inputs[:, 1], d.train_labels
    np.testing.assert_array_equal(d.train_inputs[:, 3], lab)
    # targets are never trained on and follow the base rule
    train_pairs = {(int(a), int(b)) for a, b in zip(x, y)}
    assert not train_pairs & {(int(a), int(b)) for a, b in d.target_inputs[:, :2]}
    rule = "xor" if family == "xor" else "quadratic"
    tx, ty = d.target_inputs[:, 0], d.target_inputs[:, 1]
    np.testing.assert_array_equal(d.target_labels, modular_labels(rule, p, tx, ty, seed=2)[0])
    if family in ("redundancy", "antagonism"):
        base, part = d.task_ids < B, d.task_ids >= B
        np.testing.assert_array_equal(d.train_inputs[base, :2], d.train_inputs[part, :2])
        np.testing.assert_array_equal(d.task_ids[part], d.task_ids[base] + B)
        shift = 0 if family == "redundancy" else (p - 1) // 2
        np.testing.assert_array_equal(lab[part], (lab[base] + shift) % p)
        np.testing.assert_array_equal(fam.designed_pairs, np.stack([np.arange(B), np.arange(B) + B], 1))
    if family == "additive":  # plain blocks; the designed pair: own block + one half a grid away
        np.testing.assert_array_equal(lab, modular_labels("quadratic", p, x, y)[0])
        np.testing.assert_array_equal(fam.designed_pairs[:, 0], fam.designed_block)
        np.testing.assert_array_equal(fam.designed_pairs[:, 1], (fam.designed_block + B) % K)
    if family == "xor":  # designed pair of block (i, j): a row-mate and a column-mate
        r, c = d.grid
        for (u, v), b in zip(fam.designed_pairs, fam.designed_block):
            assert u // c == b // c and u != b  # same row band
            assert v % c == b % c and v != b  # same column band


def test_family_bad_input():
    with pytest.raises(ValueError, match="`family`"):
        fm.make_family_data("synergy")


def test_second_differences_oracle():
    # F(s) = a.s + sum_{(i,j)} W_ij s_i s_j: the second difference of (i, j) is W_ij + W_ji
    rng = np.random.default_rng(0)
    K, T = 6, 3
    a, W = rng.normal(size=(K, T)), np.triu(rng.normal(size=(K, K, T)).transpose(2, 0, 1), 1)

    def F(s):
        return s @ a + np.einsum("mi,tij,mj->mt", s, W, s)

    pairs = fm.other_pairs(K, np.zeros((0, 2), int), 15)
    assert len(pairs) == 15 and len({tuple(q) for q in pairs}) == 15
    sd = fm.second_differences(F(np.ones((1, K)))[0], F(np.asarray(ka.leave_one_out_masks(K))),
                               F(fm.pair_drop_masks(K, pairs)), pairs)
    want = np.stack([W[:, i, j] + W[:, j, i] for i, j in pairs])
    np.testing.assert_allclose(sd, want, atol=1e-10)
    rep = fm.interaction_report(sd[:3], sd[3:], np.array([0, 1, 2]), np.array([0, 0, 1]))
    own = np.array([[1, 1, 0], [0, 0, 1], [0, 0, 0]], bool)
    np.testing.assert_allclose(rep["designed_mean_abs"], np.abs(sd[:3][own]).mean())
    assert rep["num_designed"] == 3 and rep["num_other"] == sd.size - 3


@pytest.mark.slow  # ~35 s; `kernattr reproduce suite` measures the same second differences
def test_redundancy_interaction_exists_in_real_training():
    """Retraining from scratch (real NNX transformer, optax) on full, leave-one-out and
    pair-drop masks: the designed (block, copy) pairs interact more than the other pairs."""
    from kernattr.experiments.pipeline import PipelineConfig, prepare_stage, real_labels

    cfg = PipelineConfig(family="redundancy", regime="scratch", p=11, num_tasks=8, num_targets=16,
                         d_model=16, d_mlp=32, pretrain_steps=1, scratch_steps=150)
    prep = prepare_stage(cfg)
    K, des = cfg.num_tasks, prep.designed.designed_pairs
    idx = np.concatenate([des, fm.other_pairs(K, des, len(des))])
    masks = np.concatenate([np.ones((1, K)), np.asarray(ka.leave_one_out_masks(K)),
                            fm.pair_drop_masks(K, idx)]).astype(np.float32)
    F, _ = real_labels(cfg, prep.data, prep.apply_fn, prep.params0, prep.init_fn, masks)
    sd = fm.second_differences(F[0], F[1:K + 1], F[K + 1:], idx)
    rep = fm.interaction_report(sd[:len(des)], sd[len(des):], prep.designed.designed_block,
                                prep.data.target_task_ids)
    # saturation: dropping both copies hurts more than the two single drops add up to
    assert rep["designed_mean"] > 0
    assert rep["designed_mean_abs"] > 2.0 * rep["other_mean_abs"]
