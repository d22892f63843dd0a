"""Per-example projected gradients of GPT-2-shaped transformers (up to 124M parameters).

Model: a GPT-2-shaped decoder written in Flax NNX (token + learned position embeddings, pre-norm
blocks with causal multi-head attention and a 4x GELU MLP, final layer norm, unembedding tied to
the token embedding; random initialisation), turned into ``apply_fn(params, tokens)`` with
``kernattr.adapters.from_nnx``. Per example the output is the mean next-token log-likelihood of
the sequence. Sizes (``--sizes``): ``small`` 4 layers x 256 (~16M parameters), ``medium`` 6 x 512
(~45M), ``gpt2`` 12 x 768 (GPT-2 small, ~124M); vocabulary 50,257 throughout.

Contender: ``kernattr.projected_gradients(method="vjp", chunk_size=...)`` with each projector
kind of ``kernattr.make_projector`` (``rademacher``, ``gaussian``, ``sjlt``).
Anchor (same run, same parameters, same data): PyTorch ``torch.func.vmap(grad(loss))`` per chunk,
the per-example gradients projected leaf by leaf (no concatenated copy; ``--anchor-flatten``
concatenates them to ``[chunk, D]`` first, as code that vectorises gradients does) with the
SAME kind of projection, applied block by block of rows regenerated per chunk from a seeded
generator (dense kinds: Rademacher from packed random bits, Gaussian from ``randn``; sjlt: one
hashed bucket and sign per parameter, precomputed once, ``index_add_``).

Every run is its own subprocess, pinned to one core with one thread (clean peak RSS
``ru_maxrss``, no shared pools). Reported per run: examples/s (after a warm-up, compile apart for
JAX), peak RSS of the whole process, its resident memory just before any gradient work (the
floor: runtime, model and parameters), XLA's temporary buffers of the gradient program (JAX
side), and JL accuracy on ``--sample`` examples: the mean
normalised error of the projected inner products ``|K̂_ij - K_ij| / sqrt(K_ii K_jj)`` against
the exact Gram matrix of the full per-example gradients (computed after the timing).

Usage:
  nice -n 15 python benchmarks/bench_gpt2.py                       # 3 sizes x 3 kinds x 2 sides
  python benchmarks/bench_gpt2.py --sizes gpt2 --kinds sjlt --n 8 --chunk 4
  python benchmarks/bench_gpt2.py --smoke                          # tiny model, CI
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

SIZES = {  # name: (layers, d_model, heads)
    "tiny": (1, 32, 2),
    "small": (4, 256, 4),
    "medium": (6, 512, 8),
    "gpt2": (12, 768, 12),
}
KINDS = ("rademacher", "gaussian", "sjlt")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
    """Resident memory now (Linux ``/proc/self/statm``; NaN elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return float("nan")


def make_tokens(vocab: int, n: int, seq: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(n, seq)).astype(np.int32)


def entry_error(G_proj: np.ndarray, K: np.ndarray) -> float:
    """Mean over i <= j of ``|K̂_ij - K_ij| / sqrt(K_ii K_jj)`` (the JL distortion of each inner
    product; about ``sqrt((1 + rho_ij^2) / d)`` for these projections)."""
    Kp = G_proj.astype(np.float64) @ G_proj.astype(np.float64).T
    dg = np.sqrt(np.diag(K))
    iu = np.triu_indices(K.shape[0])
    return float((np.abs(Kp - K) / np.outer(dg, dg))[iu].mean())


# ----------------------------------------------------------------------------- JAX worker


def build_nnx(cfg: dict):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    L, V = cfg["seq"], cfg["vocab"]
    layers, dm, H = SIZES[cfg["size"]]

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.ln1 = nnx.LayerNorm(dm, rngs=rngs)
            self.c_attn = nnx.Linear(dm, 3 * dm, rngs=rngs)
            self.c_proj = nnx.Linear(dm, dm, rngs=rngs)
            self.ln2 = nnx.LayerNorm(dm, rngs=rngs)
            self.c_fc = nnx.Linear(dm, 4 * dm, rngs=rngs)
            self.c_out = nnx.Linear(4 * dm, dm, rngs=rngs)

        def __call__(self, x, mask):
            B = x.shape[0]
            q, k, v = jnp.split(self.c_attn(self.ln1(x)), 3, axis=-1)
            q, k, v = (t.reshape(B, L, H, dm // H) for t in (q, k, v))
            s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(dm // H)
            s = jnp.where(mask, s, -1e30)
            a = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v).reshape(B, L, dm)
            x = x + self.c_proj(a)
            return x + self.c_out(jax.nn.gelu(self.c_fc(self.ln2(x)), approximate=True))

    class GPT(nnx.Module):
        def __init__(self, rngs):
            self.wte = nnx.Embed(V, dm, rngs=rngs)
            self.wpe = nnx.Param(0.01 * jax.random.normal(rngs.params(), (L, dm)))
            self.blocks = nnx.List([Block(rngs) for _ in range(layers)])
            self.ln_f = nnx.LayerNorm(dm, rngs=rngs)

        def __call__(self, tokens):  # [B, L] -> [B] mean next-token log-likelihood
            x = self.wte(tokens) + self.wpe[...][None]
            mask = nnx.make_causal_mask(tokens)
            for b in self.blocks:
                x = b(x, mask)
            logits = self.wte.attend(self.ln_f(x))[:, :-1]  # tied unembedding
            logp = jax.nn.log_softmax(logits, -1)
            return jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0].mean(-1)

    return GPT(nnx.Rngs(0))


def param_names(params) -> list:
    import jax

    return [jax.tree_util.keystr(p).removesuffix(".value")
            for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def jax_worker(cfg: dict, kind: str, out: str) -> None:
    import jax
    import jax.numpy as jnp

    import kernattr as ka
    from kernattr.adapters import from_nnx

    apply_fn, params = from_nnx(build_nnx(cfg))
    leaves = jax.tree.leaves(params)
    D = sum(x.size for x in leaves)
    if cfg.get("save_params"):
        np.savez(cfg["save_params"], **{n: np.asarray(x) for n, x in
                                        zip(param_names(params), leaves)})
    tok = jnp.asarray(make_tokens(cfg["vocab"], cfg["n"], cfg["seq"]))
    proj = ka.make_projector(jax.random.key(0), params, dim=cfg["d"], kind=kind)
    floor = current_rss_mb()  # runtime, model, parameters and tokens: before any gradient work
    fn = jax.jit(lambda p, x, pr: ka.projected_gradients(apply_fn, p, x, pr,
                                                         chunk_size=cfg["chunk"]))
    t0 = time.perf_counter()
    compiled = fn.lower(params, tok, proj).compile()
    compile_s = time.perf_counter() - t0
    temp_mb = compiled.memory_analysis().temp_size_in_bytes / 2**20
    t0 = time.perf_counter()
    G = jax.block_until_ready(compiled(params, tok, proj))
    run_s = time.perf_counter() - t0
    rss = peak_rss_mb()
    # exact per-example gradients of the first S examples, one at a time, for the Gram matrix
    S = cfg["sample"]
    grad1 = jax.jit(jax.grad(apply_fn))
    flat = np.zeros((S, D), np.float32)
    for i in range(S):
        g = grad1(params, tok[i])
        flat[i] = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(g)])
        del g
    K = flat.astype(np.float64) @ flat.T.astype(np.float64)
    # the exact projection of the exact gradients (same projector): kernattr's chunked result
    # must equal it up to float32 rounding
    exact_proj = np.asarray(jax.jit(ka.project)(proj, jax.tree.unflatten(
        jax.tree.structure(params), [jnp.asarray(x) for x in _split(flat, leaves)])))
    dev = float(np.max(np.abs(np.asarray(G[:S]) - exact_proj)) / np.max(np.abs(exact_proj)))
    json.dump(dict(side=f"jax-{kind}", examples_per_s=cfg["n"] / run_s, run_s=run_s,
                   compile_s=compile_s, peak_rss_mb=rss, floor_rss_mb=floor,
                   xla_temp_mb=temp_mb, jl_entry_err=entry_error(
                       np.asarray(G[:S]), K), exact_gram=K.tolist(),
                   rel_dev_vs_exact_projection=dev, finite=bool(np.isfinite(np.asarray(G)).all()),
                   num_params=int(D), backend=jax.default_backend(),
                   device_kind=jax.devices()[0].device_kind), open(out, "w"))


def _split(flat: np.ndarray, leaves) -> list:
    out, start = [], 0
    for x in leaves:
        out.append(flat[:, start:start + x.size].reshape((flat.shape[0],) + tuple(x.shape)))
        start += x.size
    return out


# ----------------------------------------------------------------------------- torch worker


def torch_worker(cfg: dict, kind: str, out: str) -> None:
    import torch
    import torch.nn.functional as F
    from torch.func import grad, vmap

    torch.set_num_threads(1)
    L = cfg["seq"]
    layers, dm, H = SIZES[cfg["size"]]
    d, R = cfg["d"], cfg["rows"]
    with np.load(cfg["load_params"]) as z:
        names = list(z.files)
        params = {k: torch.from_numpy(np.array(z[k])) for k in names}

    causal = torch.tril(torch.ones(L, L, dtype=torch.bool))

    def loss(p, tok):  # one example [L] -> mean next-token log-likelihood
        def ln(x, pre):
            return F.layer_norm(x, (dm,), p[f"{pre}['scale']"], p[f"{pre}['bias']"], eps=1e-6)

        def lin(x, pre):
            return x @ p[f"{pre}['kernel']"] + p[f"{pre}['bias']"]

        wte = p["['wte']['embedding']"]
        x = wte[tok] + p["['wpe']"]
        for i in range(layers):
            pre = f"['blocks'][{i}]"
            q, k, v = lin(ln(x, pre + "['ln1']"), pre + "['c_attn']").split(dm, -1)
            q, k, v = (t.reshape(L, H, dm // H).transpose(0, 1) for t in (q, k, v))
            s = q @ k.transpose(1, 2) / math.sqrt(dm // H)
            s = torch.where(causal[None], s, torch.tensor(-1e30))
            a = (torch.softmax(s, -1) @ v).transpose(0, 1).reshape(L, dm)
            x = x + lin(a, pre + "['c_proj']")
            h = F.gelu(lin(ln(x, pre + "['ln2']"), pre + "['c_fc']"), approximate="tanh")
            x = x + lin(h, pre + "['c_out']")
        logits = ln(x, "['ln_f']") @ wte.T
        logp = torch.log_softmax(logits[:-1], -1)
        return logp.gather(1, tok[1:, None])[:, 0].mean()

    per_example = vmap(grad(loss), in_dims=(None, 0))
    D = sum(v.numel() for v in params.values())
    floor = current_rss_mb()  # runtime and parameters: before any gradient work

    def grads(tok):
        """The chunk's per-example gradients: one ``[c, D_l]`` view per leaf, or with
        ``--anchor-flatten`` one ``[c, D]`` tensor concatenated from them (a copy)."""
        g = per_example(params, tok)
        parts = [g[k].reshape(tok.shape[0], -1) for k in names]
        return [torch.cat(parts, 1)] if cfg.get("anchor_flatten") else parts

    if kind == "sjlt":  # one bucket and sign per parameter, precomputed once
        gen = torch.Generator().manual_seed(12345)
        bucket = torch.randint(0, d, (D,), generator=gen, dtype=torch.int32)
        sign = torch.randint(0, 2, (D,), generator=gen, dtype=torch.float32).mul_(2).sub_(1)

    def project(parts):
        """``Pᵀ`` of the gradients, block by block of at most R rows within each part."""
        out = torch.zeros(parts[0].shape[0], d)
        b, off = 0, 0  # block counter (seeds), row offset (sjlt hash)
        for G in parts:
            for r0 in range(0, G.shape[1], R):
                rows = min(R, G.shape[1] - r0)
                Gb = G[:, r0:r0 + rows]
                if kind == "sjlt":
                    out.index_add_(1, bucket[off + r0:off + r0 + rows], Gb * sign[off + r0:off + r0 + rows])
                    continue
                gen = torch.Generator().manual_seed(1000003 + b)
                b += 1
                if kind == "rademacher":  # packed random bits, 32 signs per word
                    words = torch.randint(-2**31, 2**31 - 1, (rows, -(-d // 32)), generator=gen,
                                          dtype=torch.int64)
                    bits = (words[:, :, None] >> torch.arange(32)) & 1
                    M = bits.reshape(rows, -1)[:, :d].to(torch.float32).mul_(2.0).sub_(1.0)
                else:
                    M = torch.randn(rows, d, generator=gen)
                out.addmm_(Gb, M, alpha=1.0 / math.sqrt(d))
            off += G.shape[1]
        return out

    tok = torch.from_numpy(make_tokens(cfg["vocab"], cfg["n"], cfg["seq"])).long()
    c = cfg["chunk"]

    def run(n):
        return torch.cat([project(grads(tok[i:i + c])) for i in range(0, n, c)])

    with torch.no_grad():
        run(min(c, cfg["n"]))  # warm-up (one chunk)
        t0 = time.perf_counter()
        G = run(cfg["n"])
        run_s = time.perf_counter() - t0
    rss = peak_rss_mb()
    S = cfg["sample"]
    K = np.asarray(json.load(open(cfg["exact_gram"]))) if cfg.get("exact_gram") else None
    gram_dev = None
    if K is not None:  # same model in both frameworks: torch's exact Gram against JAX's
        with torch.no_grad():
            flat = torch.cat([torch.cat(grads(tok[i:i + 1]), 1) for i in range(S)]).double()
        Kt = (flat @ flat.T).numpy()
        gram_dev = float(np.linalg.norm(Kt - K) / np.linalg.norm(K))
        del flat
    json.dump(dict(side=f"torch-{kind}", examples_per_s=cfg["n"] / run_s, run_s=run_s,
                   compile_s=0.0, peak_rss_mb=rss, floor_rss_mb=floor,
                   jl_entry_err=entry_error(G[:S].numpy(), K) if K is not None else None,
                   exact_gram_rel_dev_vs_jax=gram_dev,
                   finite=bool(torch.isfinite(G).all()), num_params=int(D),
                   version=torch.__version__), open(out, "w"))


# ----------------------------------------------------------------------------- driver


def run_worker(args_list: list, cfg: dict) -> dict:
    from _workers import one_thread_xla_flags

    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"),
               OMP_NUM_THREADS="1",
               XLA_FLAGS=one_thread_xla_flags())
    cmd = [sys.executable, os.path.abspath(__file__), *args_list, "--out", out,
           "--cfg", json.dumps(cfg)]
    if os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
        cmd = ["taskset", "-c", "0", *cmd]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"worker {args_list} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    res = json.load(open(out))
    os.unlink(out)
    return res


def _version(package: str) -> str | None:
    """The installed version of ``package``, or None (without importing it)."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model (CI)")
    ap.add_argument("--sizes", default="small,medium,gpt2")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--n", type=int, default=8, help="examples timed per run")
    ap.add_argument("--chunk", type=int, default=4, help="examples per chunk (both sides)")
    ap.add_argument("--d", type=int, default=256, help="projected dimension")
    ap.add_argument("--sample", type=int, default=4, help="examples for the JL accuracy")
    ap.add_argument("--rows", type=int, default=65536, help="torch projection block rows")
    ap.add_argument("--anchor-flatten", action="store_true",
                    help="the anchor concatenates each chunk's gradients into one [chunk, D] "
                         "tensor before projecting (default: it projects leaf by leaf)")
    ap.add_argument("--torch-sizes", default="small,medium,gpt2,tiny",
                    help="sizes at which the torch.func anchor runs too")
    ap.add_argument("--json", default=None, help="also write all runs here")
    ap.add_argument("--worker", choices=["jax", "torch"])
    ap.add_argument("--kind", default="sjlt")
    ap.add_argument("--out")
    ap.add_argument("--cfg")
    a = ap.parse_args(argv)
    if a.worker:
        cfg = json.loads(a.cfg)
        (jax_worker if a.worker == "jax" else torch_worker)(cfg, a.kind, a.out)
        return 0
    if a.smoke:
        a.sizes, a.seq, a.n, a.chunk, a.d, a.sample, a.rows = "tiny", 16, 4, 2, 32, 4, 4096
    try:
        import torch  # noqa: F401

        have_torch = True
    except ImportError:
        have_torch = False
        print("NOTE: torch is not installed; the torch.func anchor is skipped (benchmark-only "
              "extra: pip install -e '.[bench]').")
    from _records import record

    print(f"bench_gpt2: seq {a.seq}, n={a.n} examples per run, chunk {a.chunk}, d={a.d}, "
          f"float32, JL sample {a.sample}; each run one process pinned to one core, one thread; "
          f"machine shared (load {os.getloadavg()[0]:.1f}): ratios within this run are what count",
          flush=True)
    rows, ok = [], True
    # The conditions of the run, kept with each row of --json: the timings depend on them.
    conditions = dict(command=" ".join(["bench_gpt2.py", *(argv if argv is not None else sys.argv[1:])]),
                      cpus=os.cpu_count(), load_1m_start=os.getloadavg()[0],
                      xla_flags=os.environ.get("XLA_FLAGS", ""), python=platform.python_version(),
                      torch=_version("torch"), jax=_version("jax"))
    tmp = tempfile.mkdtemp(prefix="bench_gpt2_")
    for size in a.sizes.split(","):
        layers, dm, H = SIZES[size]
        base = dict(size=size, seq=a.seq, vocab=50257 if size != "tiny" else 500, n=a.n,
                    chunk=a.chunk, d=a.d, sample=a.sample, rows=a.rows,
                    anchor_flatten=a.anchor_flatten)
        pfile, gfile = os.path.join(tmp, f"{size}.npz"), os.path.join(tmp, f"{size}_gram.json")
        for i, kind in enumerate(a.kinds.split(",")):
            cfg = dict(base, save_params=pfile if i == 0 else None)
            rj = run_worker(["--worker", "jax", "--kind", kind], cfg)
            if i == 0:
                json.dump(rj["exact_gram"], open(gfile, "w"))
            rj.pop("exact_gram")
            print(f"  {size} {kind} JAX: {rj['examples_per_s']:.3f} ex/s, peak "
                  f"{rj['peak_rss_mb']:.0f} MB, compile {rj['compile_s']:.1f} s", flush=True)
            rt = None
            if have_torch and size in a.torch_sizes.split(","):
                rt = run_worker(["--worker", "torch", "--kind", kind],
                                dict(base, load_params=pfile, exact_gram=gfile))
            D = rj["num_params"]
            row = dict(size=size, layers=layers, d_model=dm, D=D, kind=kind, jax=rj, torch=rt,
                       run=dict(conditions, load_1m_after=os.getloadavg()[0],
                                finished=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())))
            rows.append(row)
            ok &= rj["finite"] and rj["rel_dev_vs_exact_projection"] < 1e-3
            ok &= rt is None or (rt["finite"] and rt["num_params"] == D
                                 and rt["exact_gram_rel_dev_vs_jax"] < 1e-3)
            if a.json:  # after every run, so that a long run keeps what it measured
                json.dump(rows, open(a.json, "w"), indent=1)
            speed = rj["examples_per_s"] / rt["examples_per_s"] if rt else float("nan")
            mem = rt["peak_rss_mb"] / rj["peak_rss_mb"] if rt else float("nan")
            print(f"{size:>6} D={D / 1e6:6.1f}M {kind:<10} JAX {rj['examples_per_s']:7.3f} ex/s "
                  f"(compile {rj['compile_s']:5.1f} s) peak {rj['peak_rss_mb']:7.0f} MB "
                  f"JL {rj['jl_entry_err']:.4f} | torch "
                  + (f"{rt['examples_per_s']:7.3f} ex/s peak {rt['peak_rss_mb']:7.0f} MB JL "
                     f"{rt['jl_entry_err']:.4f}" if rt else "-")
                  + f" | speed x{speed:.2f} memory /{mem:.2f}; JAX vs exact projection "
                  f"{rj['rel_dev_vs_exact_projection']:.1e}"
                  + (f"; exact Gram torch vs JAX {rt['exact_gram_rel_dev_vs_jax']:.1e}" if rt
                     else ""), flush=True)
            sizes = dict(D=D, layers=layers, d_model=dm, vocab=base["vocab"], seq=a.seq, n=a.n,
                         chunk=a.chunk, d=a.d)
            anchor = ("torch.func vmap(grad) + the same projection kind, blockwise"
                      + (" after concatenating the leaves" if a.anchor_flatten else ", leaf by leaf")
                      + ", 1 thread")
            record(f"per-example projected gradients, {kind}, {size}", figure=rj["examples_per_s"],
                   unit="examples/s", anchor=rt["examples_per_s"] if rt else None,
                   anchor_name=anchor, higher_is_better=True, sizes=sizes,
                   note=f"JL entry error {rj['jl_entry_err']:.4f}"
                        + (f" vs torch {rt['jl_entry_err']:.4f}" if rt else ""))
            record(f"peak RSS, {kind}, {size}", figure=rj["peak_rss_mb"], unit="MB",
                   anchor=rt["peak_rss_mb"] if rt else None, anchor_name=anchor,
                   higher_is_better=False, sizes=sizes, target=5.0)
    print(f"JL scale sqrt(2/d) = {math.sqrt(2 / a.d):.4f} (mean normalised entry error expected "
          "near it for every kind)")
    if a.json:
        json.dump(rows, open(a.json, "w"), indent=1)
    print("OK" if ok else "FAILED: non-finite results or kernattr differs from the exact projection")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
