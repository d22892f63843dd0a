"""ka.save / ka.load: bit-exact round trips of every result type, and one clear error per bad file."""

import json
import os
import typing
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernattr as ka
import kernattr.io as kio

K, M = 5, 24


def _game_data():
    masks = ka.sample_subsets(jax.random.key(0), num_tasks=K, num_subsets=M, p=0.5)
    game = ka.synthetic_game(jax.random.key(1), num_tasks=K, num_targets=2, noise=0.0)
    return masks, game.evaluate(masks), game


@pytest.fixture(scope="module")
def results():
    """One object of every public result type (float32), built through jit."""
    masks, y, game = _game_data()
    kw = dict(gamma=0.4, ridge=0.1, mix=0.5)
    kern = jax.jit(lambda m, y: ka.fit_kernel(m, y, **kw))(masks, y)
    r = jax.random.normal(jax.random.key(8), (4, 2))
    lds_iv = ka.LDSInterval(r[0, 0], r[0, 1], r[1, 0], r[1, 1], r[:, 0], jnp.int32(2))
    out = {
        "linear": jax.jit(ka.fit_linear)(masks, y),
        "kernel": kern,
        "nystrom": jax.jit(lambda k, m, y: ka.fit_kernel(m, y, num_landmarks=8, key=k, **kw))(
            jax.random.key(2), masks, y),
        "quadratic": jax.jit(lambda m, y: ka.fit_quadratic(m, y))(masks, y),
        "walsh": jax.jit(lambda m, y: ka.fit_kernel(m, y, solver="walsh", **kw))(masks, y),
        "multifidelity": jax.jit(lambda m, y: ka.fit_multifidelity(m, y + 0.1, m[:8], y[:8], **kw))(
            masks, y),
        "cg": jax.jit(lambda k, m, y: ka.solve_kernel_cg(k, m, y, gamma=0.4, ridge=0.1,
                                                         num_landmarks=8))(
            jax.random.key(3), masks, y),
        "intervals": jax.jit(lambda s: ka.attribution_intervals(s, kind="shapley"))(kern),
        # metric results: built directly (their computation is tested elsewhere)
        "lds": ka.LDSResult(r[0, 0], r[0], jnp.int32(2)),
        "lds_interval": lds_iv,
        "paired": ka.PairedLDSInterval(r[0, 0], r[0, 1], r[1, 0], r[1, 1], r[:, 0], lds_iv, lds_iv),
        "bootstrap": ka.BootstrapInterval(r[0], r[1], r[2], r[3], r),
        "estimator_error": ka.EstimatorError(r[0, 0], None, r[:, 0], r[0, 1], r[1, 0], r[1, 1],
                                             None, jnp.float32(jnp.nan), r[2], None),
        "pair_masks": ka.pair_masks(K),
        "subset_data": ka.SubsetData(masks, y),
        "game": game,
        "features": ka.GradientFeatures(jnp.ones((3, 2)), jnp.zeros(3), jnp.arange(3)),
        "nested": {"a": (kern, None, 3, 2.5, "x"), "b": [jax.random.key(7), np.float32(1.5)]},
    }
    return out


def _assert_same(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb  # same types, same static fields (e.g. KernelSpec), same None positions
    assert type(a) is type(b)
    for x, y in zip(la, lb):
        assert type(x) is type(y) or (isinstance(x, jax.Array) and isinstance(y, jax.Array))
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            assert jax.random.key_impl(x) == jax.random.key_impl(y)
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        if hasattr(x, "dtype"):
            x, y = np.asarray(x), np.asarray(y)
            assert x.dtype == y.dtype and x.shape == y.shape
            # bit-exact, NaNs included
            assert x.tobytes() == y.tobytes()
        else:
            assert x == y or (x != x and y != y)


def test_every_public_result_type_is_registered():
    named = [n for n in ka.__all__ if isinstance(getattr(ka, n), type)
             and issubclass(getattr(ka, n), tuple) and hasattr(getattr(ka, n), "_fields")]
    assert named, "no NamedTuples found in kernattr.__all__"
    missing = [n for n in named if kio._REGISTRY.get(n) is not getattr(ka, n)]
    assert not missing, f"add {missing} to kernattr.io._KNOWN_TYPES"
    assert "KernelSpec" in kio._REGISTRY and "WorkflowConfig" in kio._REGISTRY


def test_round_trip_float32(results, tmp_path):
    for name, obj in results.items():
        path = tmp_path / f"{name}.npz"
        ka.save(path, obj)
        back = ka.load(path)
        _assert_same(obj, back)
    # the loaded surrogates work: same predictions
    back = ka.load(tmp_path / "nystrom.npz")
    masks, _, _ = _game_data()
    np.testing.assert_array_equal(ka.predict(back, masks), ka.predict(results["nystrom"], masks))


def _to64(tree):
    def cast(x):
        if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.floating):
            return x.astype(jnp.float64)
        return x
    return jax.tree.map(cast, tree)


def test_round_trip_float64(results, tmp_path, x64):
    for name in ("linear", "kernel", "nystrom", "quadratic", "walsh", "multifidelity", "cg",
                 "intervals", "lds_interval"):
        obj = _to64(results[name])
        assert any(x.dtype == jnp.float64 for x in jax.tree.leaves(obj) if hasattr(x, "dtype"))
        ka.save(tmp_path / "a.npz", obj)
        _assert_same(obj, ka.load(tmp_path / "a.npz"))


def test_float64_without_x64_is_an_error_or_numpy(results, tmp_path):
    with jax.enable_x64(True):
        obj = _to64(results["linear"])
        ka.save(tmp_path / "a.npz", obj)
    with jax.enable_x64(False):
        with pytest.raises(ValueError, match="jax_enable_x64"):
            ka.load(tmp_path / "a.npz")
        back = ka.load(tmp_path / "a.npz", as_numpy=True)
    assert back.coef.dtype == np.float64 and isinstance(back.coef, np.ndarray)
    np.testing.assert_array_equal(back.coef, np.asarray(obj.coef))


def test_bfloat16_and_ints_kept(tmp_path):
    obj = {"b": jnp.arange(6, dtype=jnp.bfloat16) / 3, "i": jnp.arange(4, dtype=jnp.int32),
           "u": np.arange(3, dtype=np.uint8), "bool": jnp.array([True, False])}
    ka.save(tmp_path / "a.npz", obj)
    _assert_same(obj, ka.load(tmp_path / "a.npz"))


def test_foreign_file(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(kio.FormatError, match="not a kernattr file"):
        ka.load(tmp_path / "a.txt")
    np.savez(tmp_path / "b.npz", x=np.ones(3))
    with pytest.raises(kio.FormatError, match="not a kernattr file"):
        ka.load(tmp_path / "b.npz")


def test_truncated_file(results, tmp_path):
    ka.save(tmp_path / "a.npz", results["kernel"])
    raw = (tmp_path / "a.npz").read_bytes()
    for cut in (len(raw) // 2, len(raw) - 10, 40):
        (tmp_path / "t.npz").write_bytes(raw[:cut])
        with pytest.raises(kio.FormatError, match="truncated or corrupt"):
            ka.load(tmp_path / "t.npz")


def _rewrite_header(src, dst, change):
    with zipfile.ZipFile(src) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    name = kio._HEADER + ".npy"
    from io import BytesIO
    header = json.loads(np.load(BytesIO(entries[name])).tobytes())
    change(header)
    buf = BytesIO()
    np.save(buf, np.frombuffer(json.dumps(header).encode(), np.uint8))
    entries[name] = buf.getvalue()
    with zipfile.ZipFile(dst, "w") as z:
        for n, b in entries.items():
            z.writestr(n, b)


def test_newer_version(results, tmp_path):
    ka.save(tmp_path / "a.npz", results["linear"])
    _rewrite_header(tmp_path / "a.npz", tmp_path / "b.npz",
                    lambda h: h.update(version=kio.FORMAT_VERSION + 1))
    with pytest.raises(kio.FormatError, match="newer|Upgrade kernattr"):
        ka.load(tmp_path / "b.npz")
    # an unknown type name: refused by name, never imported or executed
    _rewrite_header(tmp_path / "a.npz", tmp_path / "c.npz",
                    lambda h: h["tree"].update(name="os.system"))
    with pytest.raises(kio.FormatError, match="does not know"):
        ka.load(tmp_path / "c.npz")


def test_unsaveable_objects(tmp_path):
    with pytest.raises(TypeError, match="cannot hold"):
        ka.save(tmp_path / "a.npz", {"f": lambda x: x})

    class Unknown(typing.NamedTuple):
        x: int

    with pytest.raises(TypeError, match="register_type"):
        ka.save(tmp_path / "a.npz", Unknown(1))
    with pytest.raises(TypeError, match="object arrays"):
        ka.save(tmp_path / "a.npz", np.array([{}], dtype=object))
    assert not os.path.exists(tmp_path / "a.npz")  # nothing half-written


def test_register_type(tmp_path):
    @kio.register_type
    class MyResult(typing.NamedTuple):
        scores: jax.Array
        note: str = "x"

    ka.save(tmp_path / "a.npz", MyResult(jnp.ones(2)))
    _assert_same(MyResult(jnp.ones(2)), ka.load(tmp_path / "a.npz"))
    with pytest.raises(TypeError, match="NamedTuple or frozen dataclass"):
        kio.register_type(dict)
