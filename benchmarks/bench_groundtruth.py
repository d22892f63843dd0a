"""Benchmark: ground truth by vmap — fine-tuning one small model per mask, all masks at once.

Anchor (same run): a Python loop over masks, each mask trained by the same jitted single-mask
trainer (compiled once). Compared: all masks in one vmap (mask_chunk_size=None), chunks of
--chunk masks, and one mask at a time inside lax.map (mask_chunk_size=1). Both train the same MLP classifier with the same optimizer and steps,
full batch, so their parameters must agree; the script exits non-zero if they do not, or if the
vmapped result differs between mask chunk sizes.

    .venv/bin/python benchmarks/bench_groundtruth.py            # default sizes
    .venv/bin/python benchmarks/bench_groundtruth.py --smoke    # tiny, < 30 s (CI)
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
from _records import record
from _timing import best_time
import jax.numpy as jnp
import numpy as np
import optax

import kernattr.groundtruth as gt


def make_problem(p: int, num_tasks: int, hidden: int, seed: int = 0):
    """Modular addition (x + y) mod p with one-hot inputs; tasks are blocks of the x axis."""
    rng = np.random.default_rng(seed)
    xs, ys = np.meshgrid(np.arange(p), np.arange(p), indexing="ij")
    xs, ys = xs.ravel(), ys.ravel()
    labels = (xs + ys) % p
    inputs = np.concatenate([np.eye(p)[xs], np.eye(p)[ys]], axis=1).astype(np.float32)
    perm = rng.permutation(len(xs))
    train = perm[: len(perm) * 3 // 4]
    target = perm[len(perm) * 3 // 4 :]
    task_ids = (xs[train] * num_tasks) // p
    k1, k2 = jax.random.split(jax.random.key(seed))
    params0 = {
        "W1": jax.random.normal(k1, (2 * p, hidden)) / np.sqrt(2 * p),
        "W2": jax.random.normal(k2, (hidden, p)) / np.sqrt(hidden),
    }

    def apply_fn(params, x):
        return jax.nn.relu(x @ params["W1"]) @ params["W2"]

    return (
        apply_fn,
        params0,
        jnp.asarray(inputs[train]),
        jnp.asarray(labels[train]),
        jnp.asarray(task_ids),
        jnp.asarray(inputs[target]),
        jnp.asarray(labels[target]),
    )


def timed(fn, *args, repeats: int):
    """(output, best seconds) of ``fn(*args)`` after a warm-up (:func:`_timing.best_time`)."""
    _, best, out = best_time(fn, *args, repeats=repeats)
    return out, best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, < 30 s")
    ap.add_argument("--p", type=int, default=23)
    ap.add_argument("--tasks", type=int, default=16)
    ap.add_argument("--masks", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--chunk", type=int, default=4)
    ap.add_argument("--lr", type=float, default=0.5)
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    if args.smoke:
        args.p, args.tasks, args.masks, args.hidden, args.steps, args.chunk, args.repeats = 7, 4, 6, 8, 10, 4, 1
        args.pretrain_steps = 20

    apply_fn, init, x, y, t, xt, yt = make_problem(args.p, args.tasks, args.hidden)
    # W0: pretrained on all tasks (the all-ones mask), then fine-tuned per mask with SGD.
    pre = gt.finetune_on_masks(
        apply_fn, init, x, y, t, jnp.ones((1, args.tasks)), loss="softmax",
        optimizer=optax.adam(1e-2), num_steps=args.pretrain_steps,
    )
    params0 = jax.tree.map(lambda a: a[0], pre)
    masks = jax.random.bernoulli(jax.random.key(1), 0.7, (args.masks, args.tasks)).astype(jnp.float32)
    D = sum(leaf.size for leaf in jax.tree.leaves(params0))
    opt = optax.sgd(args.lr)
    common = dict(loss="softmax", optimizer=opt, num_steps=args.steps)
    print(
        f"sizes: n={x.shape[0]} train examples, T={xt.shape[0]} targets, D={D} params, "
        f"K={args.tasks}, m={args.masks} masks, {args.steps} full-batch SGD steps (lr {args.lr}) from a W0 pretrained {args.pretrain_steps} adam steps, dtype float32, "
        f"devices={jax.device_count()} ({jax.devices()[0].platform}). "
        "Machine shared with other engineers: absolute times are noisy, ratios are same-run."
    )

    # vmapped (all masks at once) and chunked.
    vm = jax.jit(lambda mk: gt.finetune_on_masks(apply_fn, params0, x, y, t, mk, **common))
    ch = jax.jit(
        lambda mk: gt.finetune_on_masks(apply_fn, params0, x, y, t, mk, mask_chunk_size=args.chunk, **common)
    )
    seq = jax.jit(
        lambda mk: gt.finetune_on_masks(apply_fn, params0, x, y, t, mk, mask_chunk_size=1, **common)
    )
    single = jax.jit(lambda mk: gt.finetune_on_masks(apply_fn, params0, x, y, t, mk, **common))

    t0 = time.perf_counter()
    vm.lower(masks).compile()
    c_vm = time.perf_counter() - t0
    t0 = time.perf_counter()
    ch.lower(masks).compile()
    c_ch = time.perf_counter() - t0
    t0 = time.perf_counter()
    single.lower(masks[:1]).compile()
    c_single = time.perf_counter() - t0

    W_vm, s_vm = timed(vm, masks, repeats=args.repeats)
    W_ch, s_ch = timed(ch, masks, repeats=args.repeats)
    W_seq, s_seq = timed(seq, masks, repeats=args.repeats)

    def loop(mk):
        outs = [single(mk[j : j + 1]) for j in range(mk.shape[0])]
        return jax.tree.map(lambda *a: jnp.concatenate(a), *outs)

    W_loop, s_loop = timed(loop, masks, repeats=args.repeats)

    F = gt.evaluate_targets(apply_fn, W_vm, xt, yt, loss="softmax")
    F0 = gt.evaluate_targets(apply_fn, jax.tree.map(lambda a: a[None], params0), xt, yt, loss="softmax")[0]
    F_loop = gt.evaluate_targets(apply_fn, W_loop, xt, yt, loss="softmax")
    diff_F = float(jnp.max(jnp.abs(F - F_loop)))
    diff_loop = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(W_vm), jax.tree.leaves(W_loop)))
    diff_chunk = max(
        float(jnp.max(jnp.abs(a - b)))
        for W_other in (W_ch, W_seq)
        for a, b in zip(jax.tree.leaves(W_vm), jax.tree.leaves(W_other))
    )
    scale = max(float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(W_vm))

    print(f"compile: vmapped {c_vm:.2f}s, chunked({args.chunk}) {c_ch:.2f}s, single-mask {c_single:.2f}s")
    print(f"anchor  python loop over masks (jitted single-mask trainer): {s_loop:.3f}s  "
          f"{args.masks / s_loop:.1f} masks/s")
    print(f"vmapped all masks at once:                  {s_vm:.3f}s  {args.masks / s_vm:.1f} masks/s  "
          f"RATIO vs anchor {s_loop / s_vm:.2f}x")
    print(f"vmapped in chunks of {args.chunk:<4d}:                   {s_ch:.3f}s  "
          f"{args.masks / s_ch:.1f} masks/s  RATIO vs anchor {s_loop / s_ch:.2f}x")
    print(f"lax.map one mask at a time (chunk 1):       {s_seq:.3f}s  "
          f"{args.masks / s_seq:.1f} masks/s  RATIO vs anchor {s_loop / s_seq:.2f}x")
    print(f"agreement: max |W_vmap - W_loop| = {diff_loop:.2e}, max |W_vmap - W_chunked/seq| = {diff_chunk:.2e} "
          f"(max |W| = {scale:.2f}); max |F_vmap - F_loop| = {diff_F:.2e}")
    print(f"target loss: at W0 {float(F0.mean()):.4f}, after fine-tuning (mean over masks) {float(F.mean()):.4f}")

    sizes = dict(n=int(x.shape[0]), T=int(xt.shape[0]), D=D, K=args.tasks, m=args.masks,
                 steps=args.steps)
    for label, s in (("vmapped", s_vm), (f"chunked({args.chunk})", s_ch), ("lax.map", s_seq)):
        record(f"fine-tune m masks, {label}", figure=s, unit="s", anchor=s_loop,
               anchor_name="python loop over masks (jitted single-mask trainer)",
               higher_is_better=False, sizes=sizes)
    ok = diff_loop <= 1e-3 * max(scale, 1.0) and diff_chunk <= 1e-3 * max(scale, 1.0)
    ok = ok and diff_F <= 1e-3 * max(float(jnp.max(jnp.abs(F))), 1.0)
    ok = ok and bool(jnp.all(jnp.isfinite(F)))
    if not ok:
        print("FAILED: vmapped / chunked / loop results disagree or are not finite", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
