"""Tests for the ``kernattr`` command line (in-process ``main([...])``)."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernattr as ka
from kernattr.cli import build_parser, main

GRID = ["--gamma", "0.1,0.4", "--ridge", "0.01,1"]


def _game_data(seed=0, k=6, t=3, m=60, m_test=20):
    key = jax.random.key(seed)
    kg, k1, k2, n1, n2 = jax.random.split(key, 5)
    game = ka.synthetic_game(kg, num_tasks=k, num_targets=t, num_pairs=3)
    tr = ka.sample_subsets(k1, num_tasks=k, num_subsets=m, p=0.5)
    te = ka.sample_subsets(k2, num_tasks=k, num_subsets=m_test, p=0.5)
    return (np.asarray(tr), np.asarray(game.evaluate(tr, n1)),
            np.asarray(te), np.asarray(game.evaluate(te, n2)))


def _write_json(path, tr, ytr, te=None, yte=None):
    d = {"train_w": tr.astype(int).tolist(), "train_subset_scores": ytr.tolist()}
    if te is not None:
        d.update(test_w=te.astype(int).tolist(), test_subset_scores=yte.tolist())
    path.write_text(json.dumps(d))
    return path


def _fit_on_game(tmp_path, *flags):
    """Write :func:`_game_data` as JSON and run ``kernattr fit --json`` on it with ``flags``;
    returns the data file and the report."""
    tr, ytr, te, yte = _game_data()
    f = _write_json(tmp_path / "d.json", tr, ytr, te, yte)
    out = tmp_path / "r.json"
    assert main(["fit", "--data", str(f), "--json", str(out), *flags]) == 0
    return f, json.loads(out.read_text())


def test_fit_json_matches_library(tmp_path, capsys):
    f, rep = _fit_on_game(tmp_path, "--top", "3", *GRID)
    text = capsys.readouterr().out
    assert "held-out LDS" in text and "top tasks by Shapley" in text

    # Same figures from the library directly (files store 6 decimals: reload them).
    data = ka.load_subsets(f)

    @jax.jit
    def oracle(tr, ytr, te, yte):
        lin = ka.fit_linear(tr, ytr)
        ker = ka.fit_kernel(tr, ytr, gamma=np.array([0.1, 0.4]), ridge=np.array([0.01, 1.0]))
        quad = ka.fit_quadratic(tr, ytr)
        figs = {}
        for name, sur in (("linear", lin), ("kernel", ker), ("quadratic", quad)):
            pred = ka.predict(sur, te)
            figs[name] = (ka.lds(pred, yte), ka.normalized_error(pred, yte))
        return ker, figs, ka.loo_scores(ker), ka.shapley_values(ker)

    ker, figs, loo_kt, shap_kt = oracle(*data)
    for name in ("linear", "kernel", "quadratic"):
        res, ne = figs[name]
        np.testing.assert_allclose(rep[name]["lds"], float(res.mean), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(rep[name]["lds_per_target"], res.per_target, atol=1e-4)
        np.testing.assert_allclose(rep[name]["normalized_error"], float(jnp.mean(ne)), rtol=1e-3)
        assert f"{rep[name]['lds']:.4f}" in text
    assert rep["kernel"]["gamma"] == pytest.approx(np.asarray(ker.gamma).tolist(), rel=1e-6)
    assert rep["kernel"]["ridge"] == pytest.approx(np.asarray(ker.ridge).tolist(), rel=1e-6)
    loo = np.asarray(loo_kt).mean(1)
    shap = np.asarray(shap_kt).mean(1)
    np.testing.assert_allclose(rep["task_scores"]["loo"], loo, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(rep["task_scores"]["shapley"], shap, rtol=1e-3, atol=1e-5)
    assert [r["task"] for r in rep["top_tasks"]["shapley"]] == list(np.argsort(-shap)[:3])
    assert rep["data"] == {"num_tasks": 6, "num_targets": 3, "num_train": 60, "num_test": 20,
                           "dtype": "float32"}
    assert rep["split"] == "file"
    assert rep["lds_ratio_kernel_over_linear"] == pytest.approx(
        rep["kernel"]["lds"] / rep["linear"]["lds"])


def test_fit_lower_is_better_and_split(tmp_path):
    tr, ytr, _, _ = _game_data(seed=1, m=80)
    np.save(tmp_path / "masks.npy", tr.astype(bool))
    np.save(tmp_path / "scores.npy", ytr)
    out = tmp_path / "r.json"
    main(["fit", "--data", str(tmp_path), "--test-fraction", "0.25", "--seed", "3",
          "--lower-is-better", "--top", "6", "--json", str(out), *GRID])
    rep = json.loads(out.read_text())
    assert rep["data"]["num_train"] == 60 and rep["data"]["num_test"] == 20
    assert rep["split"].startswith("random 25% split (seed 3)")
    loo = np.array(rep["task_scores"]["loo"])
    assert [r["task"] for r in rep["top_tasks"]["loo"]] == list(np.argsort(loo, kind="stable"))
    # Deterministic split: same seed, same figures.
    out2 = tmp_path / "r2.json"
    main(["fit", "--data", str(tmp_path), "--test-fraction", "0.25", "--seed", "3",
          "--json", str(out2), *GRID])
    assert json.loads(out2.read_text())["linear"] == rep["linear"]


def test_fit_grouped_sample_masks(tmp_path):
    tr, ytr, te, yte = _game_data(seed=2)
    gid = np.repeat(np.arange(6), 3)  # 3 examples per task
    np.savez(tmp_path / "d.npz", masks=tr[:, gid].astype(bool), scores=ytr,
             test_masks=te[:, gid].astype(bool), test_scores=yte)
    np.save(tmp_path / "gid.npy", gid)
    out_g, out_t = tmp_path / "g.json", tmp_path / "t.json"
    main(["fit", "--data", str(tmp_path / "d.npz"), "--groups", str(tmp_path / "gid.npy"),
          "--json", str(out_g), *GRID])
    _write_json(tmp_path / "t_in.json", tr, ytr, te, yte)
    main(["fit", "--data", str(tmp_path / "t_in.json"), "--json", str(out_t), *GRID])
    g, t = json.loads(out_g.read_text()), json.loads(out_t.read_text())
    assert g["data"]["num_tasks"] == 6
    np.testing.assert_allclose(g["kernel"]["lds"], t["kernel"]["lds"], atol=1e-3)


def test_fit_builtin_default(tmp_path, capsys):
    out = tmp_path / "r.json"
    # Small grids keep the test quick; the full default grid is what `kernattr fit` runs.
    assert main(["fit", "--json", str(out), "--gamma", "0.005,0.05", "--ridge", "1e-3,1"]) == 0
    rep = json.loads(out.read_text())
    assert rep["data"]["num_tasks"] == 20 and rep["data"]["num_targets"] == 8
    assert rep["data"]["num_train"] == 500 and rep["data"]["num_test"] == 200
    assert rep["kernel"]["lds"] > 1.25 * rep["linear"]["lds"]
    assert "built-in example" in capsys.readouterr().out


def test_cli_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--test-fraction", "1.5"])
    assert "--test-fraction" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["fit", "--top", "0"])
    with pytest.raises(SystemExit):
        main(["fit", "--gamma", "a,b"])
    with pytest.raises(SystemExit):
        main(["nonsense"])
    with pytest.raises(SystemExit):
        main([])
    with pytest.raises(SystemExit, match="cannot load --data .*does not exist"):
        main(["fit", "--data", str(tmp_path / "missing.json")])
    (tmp_path / "bad.json").write_text(json.dumps({"train_w": [[1, 0]]}))
    with pytest.raises(SystemExit, match="missing key `train_subset_scores`"):
        main(["fit", "--data", str(tmp_path / "bad.json")])
    tiny = _write_json(tmp_path / "tiny.json", np.eye(3), np.arange(3.0))
    with pytest.raises(SystemExit, match="too few"):
        main(["fit", "--data", str(tiny)])


def test_parser_structure_and_light_import():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert "fit" in sub.choices
    code = ("import sys, kernattr.cli as c; c.build_parser(); "
            "sys.exit(int('flax' in sys.modules or 'optax' in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_fit_walsh_solver_matches_library(tmp_path):
    f, rep = _fit_on_game(tmp_path, "--solver", "walsh", *GRID)
    data = ka.load_subsets(f)

    @jax.jit
    def library(x, y, x_test, y_test):
        wk = ka.fit_kernel(x, y, gamma=np.array([0.1, 0.4]), ridge=np.array([0.01, 1.0]),
                           solver="walsh")
        return wk, ka.lds(ka.predict(wk, x_test), y_test).mean, ka.shapley_values(wk)

    wk, lds, shap = library(data.train_masks, data.train_labels, data.test_masks, data.test_labels)
    np.testing.assert_allclose(rep["kernel"]["lds"], float(lds), rtol=1e-4, atol=1e-5)
    assert rep["kernel"]["solver"] == "walsh" and rep["kernel"]["gamma_grid"] == pytest.approx([0.1, 0.4])
    assert rep["kernel"]["gamma"] == pytest.approx(np.asarray(wk.gamma).tolist(), rel=1e-6)
    shap = np.asarray(shap).mean(1)
    np.testing.assert_allclose(rep["task_scores"]["shapley"], shap, rtol=1e-3, atol=1e-5)
    with pytest.raises(SystemExit, match="walsh"):
        main(["fit", "--data", str(f), "--solver", "walsh", "--per-target"])


def test_fit_ard_matches_library(tmp_path, capsys, monkeypatch):
    f, rep = _fit_on_game(tmp_path, "--ard-steps", "10", *GRID)
    text = capsys.readouterr().out
    data = ka.load_subsets(f)
    ard = jax.jit(lambda x, y: ka.fit_quadratic(x, y, ard_steps=10))(data.train_masks, data.train_labels)
    res = ka.lds(ka.predict(ard, data.test_masks), data.test_labels)
    q = rep["quadratic_ard"]
    np.testing.assert_allclose(q["lds"], float(res.mean), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(q["cv_error"], float(jnp.mean(ard.ard_cv_error)), rtol=1e-4)
    np.testing.assert_allclose(q["grid_cv_error"], rep["quadratic"]["cv_error"], rtol=1e-6)
    assert q["ard_steps"] == 10 and f"{q['lds']:.4f}" in text and "quadratic+ARD" in text
    # without the flag: no ARD row
    assert _fit_on_game(tmp_path, *GRID)[1]["quadratic_ard"] is None
    assert "quadratic+ARD" not in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["fit", "--data", str(f), "--ard-steps", "-1"])
    with pytest.raises(SystemExit):
        main(["fit", "--data", str(f), "--ard-steps", "2.5"])
    # too many tasks for the d x d EM step (limit lowered so that K = 6, m = 60 > 21 features hit it)
    from kernattr import cli_fit as fit_module

    monkeypatch.setattr(fit_module, "ARD_MAX_TASKS", 4)
    with pytest.raises(ValueError, match="at most 4 tasks"):
        fit_module.fit_report(data, gamma=[0.1], ridge=[1.0], ard_steps=5)
    with pytest.raises(ValueError, match="ard_steps"):
        fit_module.fit_report(data, gamma=[0.1], ridge=[1.0], ard_steps=True)
