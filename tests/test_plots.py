"""kernattr.plots draws what it is given: checked on the artists' data (Agg backend)."""

import matplotlib

matplotlib.use("Agg")

import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import kernattr as ka  # noqa: E402
import kernattr.plots as kp  # noqa: E402


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def _intervals():
    value = jnp.array([[0.5, 1.0], [-1.0, 0.0], [2.0, 3.0]])
    std = jnp.array([[0.1, 0.1], [0.2, 0.2], [0.3, 0.3]])
    return ka.AttributionIntervals(value, std, value - 2 * std, value + 2 * std)


def test_scores_sorted_with_intervals():
    ax = kp.plot_scores(_intervals(), names=["a", "b", "c"])
    widths = [p.get_width() for p in ax.patches]
    ys = [p.get_y() + p.get_height() / 2 for p in ax.patches]
    np.testing.assert_allclose(widths, [-1.0, 0.5, 2.0])  # bottom to top: ascending
    np.testing.assert_allclose(ys, [0, 1, 2])
    assert [t.get_text() for t in ax.get_yticklabels()] == ["b", "a", "c"]
    segs = ax.collections[0].get_segments()  # error bars: lower..upper of each bar
    lows = sorted((s[0][0], s[1][0]) for s in segs)
    np.testing.assert_allclose(lows, [(-1.4, -0.6), (0.3, 0.7), (1.4, 2.6)], rtol=1e-6)
    ax2 = kp.plot_scores(_intervals(), target=1, sort=False)
    np.testing.assert_allclose([p.get_width() for p in ax2.patches], [3.0, 0.0, 1.0])


def test_scores_bad_input():
    with pytest.raises(ValueError, match="target"):
        kp.plot_scores(_intervals(), target=5)
    with pytest.raises(ValueError, match="names"):
        kp.plot_scores(_intervals(), names=["a"])
    with pytest.raises(ValueError, match="axes"):
        kp.plot_scores(np.ones((2, 2, 2)))
    with pytest.raises(TypeError, match="Axes"):
        kp.plot_scores(np.ones(3), ax="ax")


def test_interactions_heatmap_centred():
    m = np.zeros((3, 3, 2))
    m[0, 1, 0] = m[1, 0, 0] = -0.5
    m[1, 2, 0] = m[2, 1, 0] = 2.0
    ax = kp.plot_interactions(m, names=["a", "b", "c"])
    im = ax.images[0]
    np.testing.assert_array_equal(im.get_array(), m[:, :, 0])
    assert im.get_clim() == (-2.0, 2.0)
    assert im.get_cmap().name == "RdBu_r"
    # zero maps to the middle of the diverging map
    assert im.norm(0.0) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="symmetric"):
        kp.plot_interactions(np.triu(np.ones((3, 3))))
    with pytest.raises(ValueError, match="square"):
        kp.plot_interactions(np.ones((3, 2)))


def test_predictions_points_and_title():
    pred = np.array([[1.0, 2.0], [2.0, 1.0], [3.0, 0.5]])
    actual = pred + 0.1
    lds = ka.LDSInterval(jnp.float32(0.8), jnp.float32(0.6), jnp.float32(0.9), jnp.float32(0.1),
                         jnp.zeros(3), jnp.int32(2))
    ax = kp.plot_predictions(pred, actual, target=1, lds=lds, title="held-out")
    np.testing.assert_allclose(ax.collections[0].get_offsets(), np.stack([actual[:, 1], pred[:, 1]], 1))
    assert ax.get_title() == "held-out; LDS 0.800 [0.600, 0.900]"
    ax = kp.plot_predictions(pred, actual, target=None)
    assert len(ax.collections) == 2
    with pytest.raises(ValueError, match="same shape"):
        kp.plot_predictions(pred, actual[:2])


def test_plot_workflow_panels():
    class R:  # the fields plot_workflow reads, as a WorkflowResult has them
        shapley = _intervals()
        interactions = jnp.zeros((3, 3, 2))
        heldout_masks = None
    fig = kp.plot_workflow(R())
    assert len(fig.axes) == 3  # scores, heatmap, its colour bar


def test_missing_matplotlib_is_a_clear_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)  # import fails as if absent
    with pytest.raises(ImportError, match=r"kernattr\[plots\]"):
        kp.plot_scores(np.ones(3))
