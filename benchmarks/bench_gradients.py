"""Projected per-example gradients of a small transformer: kernattr (JAX) vs PyTorch torch.func.

Anchor (same run): PyTorch ``torch.func.vmap(grad(loss))`` per-example gradients flattened to
``[chunk, D]``, then a dense Rademacher projection applied block by block of ``rows`` parameter
rows, each ``[rows, d]`` block regenerated from a seeded ``torch.Generator`` per chunk (the
blockwise CPU projector approach of dattri / TRAK's BasicProjector; memory bounded by a block).

Contenders: ``kernattr.projected_gradients(method="vjp")`` with ``kind="sjlt"`` (sparse JL) and,
for reference, ``kind="rademacher"`` (dense, regenerated per chunk).

Each side runs in its own subprocess (clean peak RSS, no shared thread pools), on the same
deterministic model (numpy init, identical architecture in both frameworks) and data. Threads:
torch is pinned to 1 thread (``torch.set_num_threads(1)`` + CPU affinity to one core); JAX runs
pinned to one core (affinity + ``intra_op_parallelism_threads=1``) and, separately, with its
default threads on all cores. Reported per run: examples/s, compile time (JAX, apart), peak RSS
(``ru_maxrss``, whole process, measured before the accuracy check), and JL accuracy: relative
Frobenius error of the projected Gram matrix against the exact Gram matrix of full per-example
gradients on a sample. The exact Grams of both frameworks are compared too (identical models).

Usage:
  python benchmarks/bench_gradients.py            # ~2.2M params, n=128, d=256
  python benchmarks/bench_gradients.py --smoke    # tiny, < 30 s; torch part skipped if absent
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

# ----------------------------------------------------------------------------- shared config


def config(smoke: bool) -> dict:
    if smoke:
        return dict(vocab=50, dm=16, layers=1, heads=2, seq=4, n=16, d=32, chunk=8, torch_chunk=8,
                    rows=256, sample=8, reps=1, jl_keys=0)
    return dict(vocab=1000, dm=192, layers=4, heads=4, seq=8, n=128, d=256, chunk=16,
                torch_chunk=32, rows=8192, sample=32, reps=2, jl_keys=8)


def init_params(cfg: dict) -> dict:
    """Numpy parameters (float32), the same for both frameworks."""
    rng = np.random.default_rng(0)
    dm, V, L = cfg["dm"], cfg["vocab"], cfg["seq"]

    def w(*shape, scale=None):
        scale = 1.0 / math.sqrt(shape[0]) if scale is None else scale
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    p = {"tok": w(V, dm, scale=0.5), "pos": w(L, dm, scale=0.1), "lnf_g": np.ones(dm, np.float32),
         "lnf_b": np.zeros(dm, np.float32), "unembed": w(dm, V)}
    for i in range(cfg["layers"]):
        p.update({
            f"l{i}_ln1_g": np.ones(dm, np.float32), f"l{i}_ln1_b": np.zeros(dm, np.float32),
            f"l{i}_wqkv": w(dm, 3 * dm), f"l{i}_bqkv": w(3 * dm, scale=0.02),
            f"l{i}_wo": w(dm, dm), f"l{i}_bo": w(dm, scale=0.02),
            f"l{i}_ln2_g": np.ones(dm, np.float32), f"l{i}_ln2_b": np.zeros(dm, np.float32),
            f"l{i}_w1": w(dm, 4 * dm), f"l{i}_b1": w(4 * dm, scale=0.02),
            f"l{i}_w2": w(4 * dm, dm), f"l{i}_b2": w(dm, scale=0.02),
        })  # fmt: skip
    return p


def make_data(cfg: dict, n: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    tok = rng.integers(0, cfg["vocab"], size=(n, cfg["seq"])).astype(np.int32)
    tgt = rng.integers(0, cfg["vocab"], size=(n,)).astype(np.int32)
    return tok, tgt


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def gram_errors(G_proj: np.ndarray, G_exact: np.ndarray) -> tuple[float, float]:
    """(relative Frobenius error of the Gram matrix, mean normalised entry error).

    The normalised entry error ``|K̂_ij − K_ij| / sqrt(K_ii K_jj)`` (i ≤ j) is the JL distortion
    of each inner product; its scale is ``sqrt((1 + ρ_ij²) / d)`` for a dense Gaussian/Rademacher
    or sjlt projection. The Frobenius error of a near-orthogonal sample grows like
    ``sqrt(S / d)`` with the sample size ``S``.
    """
    K = G_exact.astype(np.float64) @ G_exact.astype(np.float64).T
    Kp = G_proj.astype(np.float64) @ G_proj.astype(np.float64).T
    dg = np.sqrt(np.diag(K))
    iu = np.triu_indices(K.shape[0])
    entry = (np.abs(Kp - K) / np.outer(dg, dg))[iu]
    return float(np.linalg.norm(Kp - K) / np.linalg.norm(K)), float(entry.mean())


# ----------------------------------------------------------------------------- JAX worker


def jax_worker(cfg: dict, kind: str, out: str, jl_avg: bool) -> None:
    import jax
    import jax.numpy as jnp

    import kernattr as ka
    from _timing import time_compiled

    H, L = cfg["heads"], cfg["seq"]

    def ln(x, g, b):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / jnp.sqrt(var + 1e-5) * g + b

    def apply_fn(p, ex):
        """One example (tokens [L], target) -> log-probability of the target after the last token."""
        x = p["tok"][ex["tok"]] + p["pos"]
        dm = x.shape[-1]
        hd = dm // H
        causal = jnp.tril(jnp.ones((L, L), bool))
        for i in range(cfg["layers"]):
            h = ln(x, p[f"l{i}_ln1_g"], p[f"l{i}_ln1_b"])
            qkv = h @ p[f"l{i}_wqkv"] + p[f"l{i}_bqkv"]
            q, k, v = (qkv[:, j * dm : (j + 1) * dm].reshape(L, H, hd).transpose(1, 0, 2) for j in range(3))
            s = q @ k.transpose(0, 2, 1) / math.sqrt(hd)
            s = jnp.where(causal[None], s, -1e30)
            a = jax.nn.softmax(s, axis=-1) @ v
            x = x + a.transpose(1, 0, 2).reshape(L, dm) @ p[f"l{i}_wo"] + p[f"l{i}_bo"]
            h = ln(x, p[f"l{i}_ln2_g"], p[f"l{i}_ln2_b"])
            h = jax.nn.gelu(h @ p[f"l{i}_w1"] + p[f"l{i}_b1"], approximate=True)
            x = x + h @ p[f"l{i}_w2"] + p[f"l{i}_b2"]
        logits = ln(x[-1], p["lnf_g"], p["lnf_b"]) @ p["unembed"]
        return jax.nn.log_softmax(logits)[ex["tgt"]]

    params = {k: jnp.asarray(v) for k, v in init_params(cfg).items()}
    tok, tgt = make_data(cfg, cfg["n"])
    inputs = {"tok": jnp.asarray(tok), "tgt": jnp.asarray(tgt)}
    proj = ka.make_projector(jax.random.key(0), params, dim=cfg["d"], kind=kind)
    fn = jax.jit(lambda p, x, pr: ka.projected_gradients(apply_fn, p, x, pr, chunk_size=cfg["chunk"]))
    rss_setup = peak_rss_mb()
    compile_s, best_s, G = time_compiled(fn, params, inputs, proj, repeats=cfg["reps"])
    rss = peak_rss_mb()
    ok = bool(np.all(np.isfinite(np.asarray(G))))
    # JL accuracy on a sample: exact per-example gradients (flattened) vs projected
    S = cfg["sample"]
    sample = jax.tree_util.tree_map(lambda a: a[:S], inputs)
    exact = jax.jit(jax.vmap(jax.grad(apply_fn), (None, 0)))(params, sample)
    flat = np.concatenate([np.asarray(l).reshape(S, -1) for l in jax.tree_util.tree_leaves(exact)], 1)
    fro, entry = gram_errors(np.asarray(G[:S]), flat)
    # the same accuracy averaged over several projection keys, for this kind and for a dense
    # Rademacher matrix (the anchor's distribution), on the same exact gradients
    avg = {}
    for k2 in sorted({kind, "rademacher"}) if (cfg["jl_keys"] and jl_avg) else []:
        errs = []
        for seed in range(cfg["jl_keys"]):
            pr = ka.make_projector(jax.random.key(100 + seed), params, dim=cfg["d"], kind=k2)
            errs.append(gram_errors(np.asarray(jax.jit(ka.project)(pr, exact)), flat))
        avg[k2] = np.mean(errs, axis=0).tolist()
    json.dump(dict(
        side=f"jax-{kind}", examples_per_s=cfg["n"] / best_s, compile_s=compile_s,
        peak_rss_mb=rss, setup_rss_mb=rss_setup, jl_rel_err=fro, jl_entry_err=entry, jl_avg=avg,
        exact_gram=(flat.astype(np.float64) @ flat.T.astype(np.float64)).tolist(), finite=ok,
        num_params=int(flat.shape[1]), devices=jax.device_count(), platform=jax.devices()[0].platform,
    ), open(out, "w"))  # fmt: skip


# ----------------------------------------------------------------------------- torch worker


def torch_worker(cfg: dict, out: str) -> None:
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call, grad, vmap  # noqa: F401

    torch.set_num_threads(1)
    H, L, d, R = cfg["heads"], cfg["seq"], cfg["d"], cfg["rows"]
    params = {k: torch.from_numpy(v) for k, v in init_params(cfg).items()}
    names = list(params)

    def ln(x, g, b):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5) * g + b

    causal = torch.tril(torch.ones(L, L, dtype=torch.bool))

    def apply_fn(p, tok, tgt):
        x = p["tok"][tok] + p["pos"]
        dm = x.shape[-1]
        hd = dm // H
        for i in range(cfg["layers"]):
            h = ln(x, p[f"l{i}_ln1_g"], p[f"l{i}_ln1_b"])
            qkv = h @ p[f"l{i}_wqkv"] + p[f"l{i}_bqkv"]
            q, k, v = (qkv[:, j * dm : (j + 1) * dm].reshape(L, H, hd).transpose(0, 1) for j in range(3))
            s = q @ k.transpose(1, 2) / math.sqrt(hd)
            s = torch.where(causal[None], s, torch.tensor(-1e30))
            a = torch.softmax(s, dim=-1) @ v
            x = x + a.transpose(0, 1).reshape(L, dm) @ p[f"l{i}_wo"] + p[f"l{i}_bo"]
            h = ln(x, p[f"l{i}_ln2_g"], p[f"l{i}_ln2_b"])
            h = F.gelu(h @ p[f"l{i}_w1"] + p[f"l{i}_b1"], approximate="tanh")
            x = x + h @ p[f"l{i}_w2"] + p[f"l{i}_b2"]
        logits = ln(x[-1], p["lnf_g"], p["lnf_b"]) @ p["unembed"]
        return torch.log_softmax(logits, -1).gather(0, tgt.reshape(1))[0]

    per_example = vmap(grad(apply_fn), in_dims=(None, 0, 0))
    D = sum(v.numel() for v in params.values())

    def flat_grads(tok, tgt):
        g = per_example(params, tok, tgt)
        return torch.cat([g[k].reshape(tok.shape[0], -1) for k in names], 1)

    def project(G):
        """Dense Rademacher ±1/√d, [R, d] blocks regenerated from (seed, block) per chunk."""
        out = torch.zeros(G.shape[0], d)
        for b, r0 in enumerate(range(0, D, R)):
            rows = min(R, D - r0)
            gen = torch.Generator().manual_seed(1000003 + b)
            M = torch.randint(0, 2, (rows, d), generator=gen, dtype=torch.float32)
            M.mul_(2.0 / math.sqrt(d)).sub_(1.0 / math.sqrt(d))
            out.addmm_(G[:, r0 : r0 + rows], M)
        return out

    tok, tgt = (torch.from_numpy(a).long() for a in make_data(cfg, cfg["n"]))
    c = cfg["torch_chunk"]

    def run():
        return torch.cat([project(flat_grads(tok[i : i + c], tgt[i : i + c])) for i in range(0, cfg["n"], c)])

    rss_setup = peak_rss_mb()
    with torch.no_grad():
        run()  # warm-up
        times = []
        for _ in range(cfg["reps"]):
            t0 = time.perf_counter()
            G = run()
            times.append(time.perf_counter() - t0)
    rss = peak_rss_mb()
    S = cfg["sample"]
    flat = flat_grads(tok[:S], tgt[:S]).numpy()
    json.dump(dict(
        side="torch-dense", examples_per_s=cfg["n"] / min(times), compile_s=0.0, peak_rss_mb=rss,
        setup_rss_mb=rss_setup, jl_rel_err=gram_errors(G[:S].numpy(), flat)[0],
        jl_entry_err=gram_errors(G[:S].numpy(), flat)[1],
        exact_gram=(flat.astype(np.float64) @ flat.T.astype(np.float64)).tolist(),
        finite=bool(torch.isfinite(G).all()), num_params=int(D), threads=torch.get_num_threads(),
        version=torch.__version__,
    ), open(out, "w"))  # fmt: skip


# ----------------------------------------------------------------------------- driver


def run_worker(args_list, env_extra, single_core):
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    env = dict(os.environ)
    env.update(env_extra)
    cmd = [sys.executable, os.path.abspath(__file__), *args_list, "--out", out]
    if single_core:
        cmd = ["taskset", "-c", "0", *cmd]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"worker {args_list} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    res = json.load(open(out))
    os.unlink(out)
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--worker", choices=["jax", "torch"])
    ap.add_argument("--kind", default="sjlt")
    ap.add_argument("--out")
    ap.add_argument("--jl-avg", action="store_true", help="(worker) average JL accuracy over keys")
    args = ap.parse_args()
    cfg = config(args.smoke)
    if args.worker == "jax":
        jax_worker(cfg, args.kind, args.out, args.jl_avg)
        return 0
    if args.worker == "torch":
        torch_worker(cfg, args.out)
        return 0

    smoke = ["--smoke"] if args.smoke else []
    from _workers import one_thread_xla_flags

    one_thread = {"XLA_FLAGS": one_thread_xla_flags(), "JAX_PLATFORMS": "cpu", "OMP_NUM_THREADS": "1"}
    all_threads = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}  # the caller's
    print(f"bench_gradients: transformer vocab={cfg['vocab']} d_model={cfg['dm']} layers={cfg['layers']} "
          f"seq={cfg['seq']}, n={cfg['n']} examples, d={cfg['d']}, float32, CPU ({os.cpu_count()} cores, "
          "shared with other jobs: ratios within this run are what count)")  # fmt: skip
    results = []
    results.append(("JAX sjlt, 1 core", run_worker(["--worker", "jax", "--kind", "sjlt", "--jl-avg", *smoke], one_thread, True)))
    if not args.smoke:  # CI smoke: one JAX run only (time limit)
        results.append(("JAX rademacher, 1 core", run_worker(["--worker", "jax", "--kind", "rademacher"], one_thread, True)))
        results.append(("JAX sjlt, all cores", run_worker(["--worker", "jax", "--kind", "sjlt"], all_threads, False)))
    try:
        import torch  # noqa: F401

        have_torch = True
    except ImportError:
        have_torch = False
        print("NOTE: torch is not installed; the PyTorch anchor is skipped (benchmark-only dependency: "
              "pip install torch==2.13.0).")  # fmt: skip
    if have_torch:
        results.append(("torch dense (anchor), 1 thread", run_worker(["--worker", "torch", *smoke], one_thread, True)))
    D = results[0][1]["num_params"]
    print(f"D = {D:,} parameters; JAX chunk {cfg['chunk']}, torch chunk {cfg['torch_chunk']}, "
          f"torch projection blocks of {cfg['rows']} rows; JL sample {cfg['sample']} examples\n")
    anchor = results[-1][1] if have_torch else None
    print(f"{'run':34s} {'ex/s':>9s} {'ratio':>7s} {'compile s':>9s} {'peak RSS MB':>11s} "
          f"{'setup RSS':>9s} {'Gram fro err':>12s} {'entry err':>9s}")  # fmt: skip
    ok = True
    bound = 1.5 * math.sqrt(2 / cfg["d"])
    for name, r in results:
        ratio = r["examples_per_s"] / anchor["examples_per_s"] if anchor else float("nan")
        print(f"{name:34s} {r['examples_per_s']:9.1f} {ratio:7.2f} {r['compile_s']:9.2f} "
              f"{r['peak_rss_mb']:11.0f} {r['setup_rss_mb']:9.0f} {r['jl_rel_err']:12.4f} "
              f"{r['jl_entry_err']:9.4f}")  # fmt: skip
        ok &= r["finite"] and r["jl_entry_err"] < bound
        ok &= r["num_params"] == D
    print(f"(one projection draw each; entry err = mean |K̂_ij-K_ij|/sqrt(K_ii K_jj), bound for OK "
          f"{bound:.3f}; peak RSS = whole process incl. imports and compilation)")  # fmt: skip
    avg = results[0][1]["jl_avg"]
    if avg:
        print(f"JL accuracy averaged over {cfg['jl_keys']} keys on the same exact gradients (Gram fro err, "
              f"entry err): sjlt {avg['sjlt'][0]:.4f} {avg['sjlt'][1]:.4f} | dense rademacher "
              f"{avg['rademacher'][0]:.4f} {avg['rademacher'][1]:.4f}")  # fmt: skip
    if have_torch:
        Kt = np.asarray(anchor["exact_gram"])
        Kj = np.asarray(results[0][1]["exact_gram"])
        diff = float(np.linalg.norm(Kt - Kj) / np.linalg.norm(Kt))
        print(f"\nidentical models: exact Gram torch vs JAX relative difference {diff:.2e}")
        ok &= diff < 1e-3
        best = results[0][1]
        print(f"JAX sjlt 1 core vs torch 1 thread: throughput x{best['examples_per_s'] / anchor['examples_per_s']:.2f}, "
              f"peak RSS {best['peak_rss_mb']:.0f} vs {anchor['peak_rss_mb']:.0f} MB, "
              f"JL error {best['jl_rel_err']:.4f} vs {anchor['jl_rel_err']:.4f}")  # fmt: skip
    from _records import record

    sizes = dict(D=D, n=cfg["n"], d=cfg["d"], seq=cfg["seq"], layers=cfg["layers"],
                 d_model=cfg["dm"], vocab=cfg["vocab"])
    for name, r in results:
        if anchor is not None and r is anchor:
            continue
        record(f"per-example projected gradients, {name}", figure=r["examples_per_s"],
               unit="examples/s", anchor=anchor["examples_per_s"] if anchor else None,
               anchor_name="torch.func vmap(grad) + blockwise dense projection, 1 thread",
               higher_is_better=True, sizes=sizes,
               note=f"peak RSS {r['peak_rss_mb']:.0f} MB"
                    + (f" vs torch {anchor['peak_rss_mb']:.0f} MB" if anchor else
                       " (torch not installed: no anchor)"))
    print("OK" if ok else "FAILED: non-finite results, JL error above bound or models differ")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
