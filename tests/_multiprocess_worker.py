"""One process of the multi-process test (tests/test_multiprocess.py); not collected by pytest.

Usage: python _multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR

Each process owns 2 CPU devices; ``jax.distributed.initialize`` joins them (coordinator on
127.0.0.1:PORT, gloo collectives over loopback) into one 4-device ``data`` mesh. Examples are
sharded on ``data`` across the processes, subset masks too; a Nyström, a pairwise
(``fit_quadratic``, also with ``ard_steps``) and a ``fit_kernel(solver="walsh")`` surrogate are fitted and a kernel system solved by CG on masks sharded the
same way. Every process gathers the global
results and writes them to OUT_DIR/process_<id>.npz for the parent test to compare with the
single-process computation of :func:`problem`.
"""

import os
import sys

N, K, M, DIM = 16, 4, 8, 8
M_SURR, K_SURR = 64, 6  # masks / tasks of the surrogate part (Nyström fit and CG solve)


def problem():
    """Deterministic model, data, projector and masks (the same in every process)."""
    import jax
    import jax.numpy as jnp

    import kernattr as ka

    k = jax.random.split(jax.random.key(0), 6)
    params = {
        "w1": jax.random.normal(k[0], (3, 6)),
        "b1": 0.1 * jax.random.normal(k[1], (6,)),
        "w2": jax.random.normal(k[2], (6,)) / 3,
    }

    def apply_fn(p, x):
        return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]

    X = jax.random.normal(k[3], (N, 3))
    y = jnp.sin(X[:, 0])
    task_ids = jnp.arange(N) % K
    Xt = jax.random.normal(k[4], (4, 3))
    yt = jnp.cos(Xt[:, 0])
    proj = ka.make_projector(jax.random.key(7), params, dim=DIM, kind="sjlt", nonzeros=2)
    masks = ka.sample_subsets(k[5], num_tasks=K, num_subsets=M, p=0.5)
    return apply_fn, params, X, y, task_ids, Xt, yt, proj, masks


def compute(apply_fn, params, X, y, task_ids, Xt, yt, proj, masks, mesh=None):
    """Projected gradients, train/target features and estimated subset labels (jitted).

    With ``mesh``: features are computed with examples sharded on ``data``, then replicated
    (the estimator shards the masks, not the examples).
    """
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    import kernattr as ka

    @jax.jit
    def run(params, X, y, task_ids, Xt, yt, proj, masks):
        train = ka.gradient_features(apply_fn, params, X, y, proj, task_ids=task_ids, chunk_size=2)
        target = ka.gradient_features(apply_fn, params, Xt, yt, proj)
        grads, outputs = train.grads, train.outputs  # sharded on `data` with a mesh
        if mesh is not None:
            rep = NamedSharding(mesh, PartitionSpec())
            train = jax.tree_util.tree_map(lambda a: jax.sharding.reshard(a, rep), train)
        labels = ka.estimate_subset_labels(train, target, masks, loss="squared", ridge=1e-2)
        return grads, outputs, labels

    return run(params, X, y, task_ids, Xt, yt, proj, masks)


def surrogate_problem():
    """Masks and labels for the surrogate part (the same in every process)."""
    import jax

    import kernattr as ka

    k = jax.random.split(jax.random.key(3), 2)
    masks = ka.sample_subsets(k[0], num_tasks=K_SURR, num_subsets=M_SURR, p=0.5)
    y = masks[:, :2] @ jax.numpy.array([[1.0, -1.0], [0.5, 2.0]]) + masks[:, 2:3] * masks[:, 3:4]
    return masks, y + 0.1 * jax.random.normal(k[1], y.shape)


def surrogate_compute(masks, y):
    """Nyström fit (LOO over a small grid; its predictions at the masks) and a CG solve (jitted).

    Sharded masks: kernel blocks are computed on the devices holding the masks.
    """
    import jax
    import jax.numpy as jnp

    import kernattr as ka

    @jax.jit
    def run(masks, y):
        ny = ka.fit_nystrom(
            jax.random.key(5), masks, y, num_landmarks=16, kernel="linear+rbf", gamma=jnp.array([0.1, 0.4]), mix=0.5,
            ridge=jnp.array([0.01, 0.1]), block_size=4,
        )
        cg = ka.solve_kernel_cg(jax.random.key(6), masks, y, gamma=0.3, ridge=0.05, num_landmarks=8, block_size=4)
        quad = ka.fit_quadratic(masks, y, ratio=jnp.array([0.0, 0.1, 1.0]), ridge=jnp.array([0.01, 1.0]),
                                block_size=4)
        walsh = ka.fit_kernel(masks, y, gamma=jnp.array([0.1, 0.4]), ridge=jnp.array([0.01, 1.0]), solver="walsh")
        ard = ka.fit_quadratic(masks, y, ratio=jnp.array([0.1, 1.0]), ridge=jnp.array([0.01, 1.0]), block_size=4,
                               ard_steps=10)
        # 16 masks < 21 features: the dual form (features replicated across the processes)
        ard16 = ka.fit_quadratic(masks[:16], y[:16], ratio=jnp.array([0.1, 1.0]), ridge=jnp.array([0.01, 1.0]),
                                 block_size=4, ard_steps=10)
        return ny.surrogate.dual_coef, ny.cv_error, cg.solution, (quad.pairwise, quad.cv_error, quad.noise_var,
                                                                  walsh.pairwise, walsh.cv_error,
                                                                  ard.pairwise, ard.noise_var, ard16.pairwise)

    return run(masks, y)


def main():
    pid, nproc, port, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    os.environ["JAX_PLATFORMS"] = "cpu"
    # the device count comes from jax_num_cpu_devices below; the test's other XLA flags stay
    os.environ["XLA_FLAGS"] = " ".join(
        f for f in os.environ.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count"))
    import jax

    jax.config.update("jax_num_cpu_devices", 2)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_numpy_rank_promotion", "raise")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=nproc,
        process_id=pid,
        initialization_timeout=60,
    )
    import numpy as np
    from jax.experimental import multihost_utils

    import kernattr as ka

    assert jax.process_count() == nproc and jax.local_device_count() == 2, (
        jax.process_count(),
        jax.local_device_count(),
    )
    apply_fn, params, X, y, task_ids, Xt, yt, proj, masks = problem()
    mesh = ka.data_mesh()  # all devices of all processes
    X, y, task_ids, masks = ka.shard_examples((X, y, task_ids, masks), mesh)
    grads, outputs, labels = compute(apply_fn, params, X, y, task_ids, Xt, yt, proj, masks, mesh)
    specs = [str(a.sharding.spec) for a in (grads, outputs, labels)]
    local_rows = [s.data.shape[0] for s in grads.addressable_shards]
    grads, outputs, labels = multihost_utils.process_allgather((grads, outputs, labels), tiled=True)
    smasks, sy = ka.shard_examples(surrogate_problem(), mesh)
    ny_coef, ny_cv, cg_sol, quad = surrogate_compute(smasks, sy)
    quad_replicated = all(a.sharding.is_fully_replicated for a in quad)
    quad = [np.asarray(a.addressable_data(0)) for a in quad]
    cg_spec = str(cg_sol.sharding.spec)
    replicated = ny_coef.sharding.is_fully_replicated and ny_cv.sharding.is_fully_replicated
    ny_coef, ny_cv = np.asarray(ny_coef.addressable_data(0)), np.asarray(ny_cv.addressable_data(0))
    cg_sol = multihost_utils.process_allgather(cg_sol, tiled=True)
    np.savez(
        os.path.join(out_dir, f"process_{pid}.npz"),
        grads=np.asarray(grads),
        outputs=np.asarray(outputs),
        labels=np.asarray(labels),
        specs=np.asarray(specs),
        local_rows=np.asarray(local_rows),
        num_devices=np.asarray(jax.device_count()),
        ny_coef=ny_coef,
        ny_cv=ny_cv,
        ny_replicated=np.asarray(replicated),
        cg_sol=np.asarray(cg_sol),
        cg_spec=np.asarray(cg_spec),
        quad_pairwise=quad[0],
        quad_cv=quad[1],
        quad_noise=quad[2],
        walsh_pairwise=quad[3],
        walsh_cv=quad[4],
        ard_pairwise=quad[5],
        ard_noise=quad[6],
        ard16_pairwise=quad[7],
        quad_replicated=np.asarray(quad_replicated),
    )
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
