"""Johnson–Lindenstrauss projections of parameter-space vectors, generated on the fly.

A :class:`Projector` describes a ``D x d`` random matrix ``P`` (``D`` = number of selected
parameters, ``d`` = projected dimension) *without storing it*. ``P`` is cut into blocks: the
parameters are visited leaf by leaf (in ``jax.tree_util`` flattening order), each selected leaf is
flattened row-major and cut into consecutive blocks of ``block_size`` rows (the last one
zero-padded), and block ``b`` of leaf ``l`` (``l`` counts all leaves) is regenerated whenever
needed from ``fold_in(fold_in(key, l), b)``. The dense matrix therefore never exists in memory
(a dense kind holds one ``[block_size, d]`` block at a time), and the projection of a vector does
not depend on how examples are chunked, ordered or spread over devices. The keys of all blocks
are derived in one vectorised call, so compile time does not grow with the number of leaves.

Kinds (all scaled so that ``E[P Pᵀ] = I``, i.e. ``E[<Pᵀu, Pᵀv>] = <u, v>``):

* ``"rademacher"``: i.i.d. ``±1/√d`` entries. Signs are unpacked from 32-bit random words (one
  threefry word gives 32 entries), which makes regeneration cheap.
* ``"gaussian"``: i.i.d. ``N(0, 1/d)`` entries.
* ``"sjlt"``: sparse Johnson–Lindenstrauss transform (Kane–Nelson block construction, a
  count-sketch when ``nonzeros=1``). The ``d`` output coordinates are split into ``s = nonzeros``
  groups of ``w = d / s`` consecutive coordinates; every input coordinate has **exactly ``s``
  nonzeros, one in each group**, at a uniformly random position of the group, with an
  independent random sign and magnitude ``1/√s``. Applying it costs ``s`` scatter-adds per
  parameter instead of ``2d`` flops, with the same inner-product variance as a dense Rademacher
  matrix (``Var ‖Pᵀu‖² = (2/d)(‖u‖⁴ − Σ u_i⁴)`` for every ``s``). Its hash (``s`` bucket indices and
  signs per parameter, ``O(s D)`` memory, the size of one gradient) is generated once per call
  and reused for every chunk of examples.
* ``"identity"``: ``P = I`` (``d = D``), no projection; for small models and exactness tests.

A *parameter filter* selects the leaves that are projected (and, in :mod:`kernattr.labels._gradients`,
differentiated); the other leaves are held fixed and do not count in ``D``.

Names: ``__all__`` is the public API (re-exported by :mod:`kernattr`). :func:`columns`,
:func:`make_plan`, :func:`apply_flat` and :func:`check_tree` are the package-internal interface
that :mod:`kernattr.labels._gradients` builds on (so they carry no underscore: no underscored name is
imported across files); every other helper here is private to this module and underscored.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from .._checks import check_key

__all__ = ["Projector", "make_projector", "project", "projector_matrix"]

ProjectorKind = Literal["rademacher", "gaussian", "sjlt", "identity"]
KINDS = ("rademacher", "gaussian", "sjlt", "identity")
_DEFAULT_BLOCK = {"rademacher": 1024, "gaussian": 1024, "sjlt": 4096, "identity": 4096}


@dataclasses.dataclass(frozen=True)
class Projector:
    """A random ``D x d`` projection, regenerated block by block from a key (a pytree).

    Build it with :func:`make_projector`; apply it with :func:`project` or through
    :func:`kernattr.projected_gradients`. Only ``key`` is array data; everything else is static
    configuration, so a projector can be passed through ``jax.jit`` as an ordinary argument.

    Attributes:
      key: typed PRNG key (data).
      kind: ``"rademacher"``, ``"gaussian"``, ``"sjlt"`` or ``"identity"``.
      dim: projected dimension ``d`` (``D`` for ``"identity"``).
      block_size: maximal number of parameter rows generated at once.
      nonzeros: nonzeros per parameter for ``"sjlt"`` (``1`` otherwise).
      treedef: tree structure of the parameters the projector was built for.
      leaf_shapes: shape of every parameter leaf (selected or not).
      leaf_paths: ``jax.tree_util.keystr`` of every leaf (for error messages).
      selected: whether each leaf is projected/differentiated.
    """

    key: jax.Array
    kind: str
    dim: int
    block_size: int
    nonzeros: int
    treedef: Any
    leaf_shapes: tuple
    leaf_paths: tuple
    selected: tuple

    @property
    def num_params(self) -> int:
        """``D``: number of selected (projected) parameters."""
        return int(sum(_size(s) for s, sel in zip(self.leaf_shapes, self.selected) if sel))

    @property
    def selected_indices(self) -> tuple:
        """Indices (in flattening order) of the selected leaves."""
        return tuple(i for i, sel in enumerate(self.selected) if sel)


jax.tree_util.register_dataclass(
    Projector,
    data_fields=["key"],
    meta_fields=[
        "kind",
        "dim",
        "block_size",
        "nonzeros",
        "treedef",
        "leaf_shapes",
        "leaf_paths",
        "selected",
    ],
)


def _size(shape) -> int:
    return int(np.prod(shape, dtype=np.int64))


def _resolve_filter(filter, params, paths, leaves) -> tuple:
    """Static tuple of booleans, one per leaf."""
    if filter is None:
        return tuple(bool(jnp.issubdtype(jnp.result_type(x), jnp.inexact)) for x in leaves)
    if callable(filter) and not isinstance(filter, (bool, np.bool_)):
        sel = []
        for path, leaf in zip(paths, leaves):
            v = filter(path, leaf)
            if not isinstance(v, (bool, np.bool_)):
                raise TypeError(
                    "`filter` callable must return a Python bool for each (path, leaf), got "
                    f"{type(v).__name__} at {jax.tree_util.keystr(path)}."
                )
            sel.append(bool(v))
        return tuple(sel)
    try:
        flags = jax.tree_util.tree_structure(params).flatten_up_to(filter)
    except (ValueError, TypeError) as e:
        raise ValueError(
            "`filter` must be None, a callable (path, leaf) -> bool, or a pytree of Python bools "
            f"with the same structure as `params` ({e})."
        ) from None
    out = []
    for f in flags:
        if not isinstance(f, (bool, np.bool_)):
            raise TypeError(f"`filter` pytree leaves must be Python bools, got {type(f).__name__}.")
        out.append(bool(f))
    return tuple(out)


def make_projector(
    key: jax.Array,
    params: Any,
    *,
    dim: int | None,
    kind: ProjectorKind = "rademacher",
    filter: Any = None,
    block_size: int | None = None,
    nonzeros: int = 1,
) -> Projector:
    """A random projection ``P`` (``D x d``) for gradients of ``params``, never materialised.

    Args:
      key: typed PRNG key (``jax.random.key(seed)``).
      params: parameter pytree (arrays or ``jax.ShapeDtypeStruct``); only shapes are read.
      dim: projected dimension ``d`` (``None`` or ``D`` for ``kind="identity"``).
      kind: ``"rademacher"`` (default), ``"gaussian"``, ``"sjlt"`` or ``"identity"``; see the
        module docstring for the distributions and their costs.
      filter: which leaves are projected (and differentiated by
        :func:`kernattr.projected_gradients`): ``None`` selects every floating leaf; a pytree of
        Python bools with the structure of ``params``; or a callable ``(path, leaf) -> bool``
        receiving the ``jax.tree_util`` key path, e.g.
        ``lambda path, x: "head" in jax.tree_util.keystr(path)`` for the last layer only.
      block_size: rows of ``P`` generated at once (memory ``block_size * d`` for dense kinds);
        part of the random stream, so changing it changes ``P``. Default 1024 for dense kinds,
        4096 for ``"sjlt"``.
      nonzeros: ``s``, nonzeros per parameter for ``"sjlt"``; ``d`` must be divisible by ``s``.

    Returns:
      A :class:`Projector`.

    >>> import jax, jax.numpy as jnp, kernattr as ka
    >>> params = {"w": jnp.zeros((3, 4)), "b": jnp.zeros(4)}
    >>> proj = ka.make_projector(jax.random.key(0), params, dim=8)
    >>> proj.num_params, proj.dim
    (16, 8)
    """
    check_key(key)
    if kind not in KINDS:
        raise ValueError(f"`kind` must be one of {KINDS}, got {kind!r}.")
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    if not paths_leaves:
        raise ValueError("`params` has no leaves.")
    paths = [p for p, _ in paths_leaves]
    leaves = [x for _, x in paths_leaves]
    for p, x in zip(paths, leaves):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(
                f"`params` leaf {jax.tree_util.keystr(p)} is a {type(x).__name__}; every leaf must "
                "be an array (or jax.ShapeDtypeStruct)."
            )
    selected = _resolve_filter(filter, params, paths, leaves)
    for p, x, sel in zip(paths, leaves, selected):
        if sel and not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(
                f"`params` leaf {jax.tree_util.keystr(p)} has dtype {x.dtype} and cannot be "
                "differentiated; exclude it with `filter`."
            )
    shapes = tuple(tuple(int(s) for s in x.shape) for x in leaves)
    D = sum(_size(s) for s, sel in zip(shapes, selected) if sel)
    if D == 0:
        raise ValueError("`filter` selects no parameters (D = 0); select at least one leaf.")
    if kind == "identity":
        if dim is not None and dim != D:
            raise ValueError(f"`dim` must be None or D={D} for kind='identity', got {dim}.")
        dim = D
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim <= 0:
        raise ValueError(f"`dim` must be a positive int, got {dim!r}.")
    dim = int(dim)
    if kind == "sjlt":
        if not isinstance(nonzeros, (int, np.integer)) or not 1 <= nonzeros <= dim:
            raise ValueError(f"`nonzeros` must be an int in [1, dim={dim}], got {nonzeros!r}.")
        if dim % nonzeros:
            raise ValueError(f"`dim` ({dim}) must be divisible by `nonzeros` ({nonzeros}).")
    else:
        nonzeros = 1
    if block_size is None:
        block_size = _DEFAULT_BLOCK[kind]
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size <= 0:
        raise ValueError(f"`block_size` must be a positive int, got {block_size!r}.")
    return Projector(
        key=key,
        kind=kind,
        dim=dim,
        block_size=int(block_size),
        nonzeros=int(nonzeros),
        treedef=treedef,
        leaf_shapes=shapes,
        leaf_paths=tuple(jax.tree_util.keystr(p) for p in paths),
        selected=selected,
    )


# ---------------------------------------------------------------------------------------------
# Block generation. Everything below is the single source of truth for P: project(),
# projector_matrix() and both routes of projected_gradients() call it.
#
# Layout: the selected leaves, flattened and each zero-padded to a multiple of ``block_size``
# rows, are laid end to end (``D_pad`` rows in ``NB`` blocks). Block ``j`` belongs to leaf
# ``block_leaf[j]`` (its index among ALL leaves) as its ``block_idx[j]``-th block, and is
# generated from ``fold_in(fold_in(key, block_leaf[j]), block_idx[j])``. The keys of all blocks
# are derived in one vectorised call, so the compiled program holds one random-number generator
# whatever the number of leaves. Padding rows are generated but always meet zeros.


def _layout(proj: Projector):
    """(block rows B, blocks per selected leaf, block_leaf [NB], block_idx [NB]) (static)."""
    B = proj.block_size
    nbs = [-(-_size(proj.leaf_shapes[i]) // B) for i in proj.selected_indices]
    block_leaf = np.repeat(np.asarray(proj.selected_indices, np.int32), nbs)
    block_idx = np.concatenate([np.arange(n, dtype=np.int32) for n in nbs])
    return B, nbs, block_leaf, block_idx


def _block_keys(proj: Projector) -> jax.Array:
    """``[NB]`` keys, one per block."""
    _, _, block_leaf, block_idx = _layout(proj)
    return jax.vmap(lambda l, b: jax.random.fold_in(jax.random.fold_in(proj.key, l), b))(
        jnp.asarray(block_leaf), jnp.asarray(block_idx)
    )


def _rademacher_block(key, rows: int, d: int, dtype) -> jax.Array:
    words = -(-d // 32)
    bits = jax.random.bits(key, (rows, words), jnp.uint32)
    shifts = jnp.arange(32, dtype=jnp.uint32)
    b = (bits[:, :, None] >> shifts[None, None, :]) & jnp.uint32(1)
    b = b.reshape(rows, words * 32)[:, :d]
    scale = 1.0 / math.sqrt(d)
    return jnp.where(b == 1, jnp.asarray(scale, dtype), jnp.asarray(-scale, dtype))


def _sjlt_hash(proj: Projector, key) -> tuple[jax.Array, jax.Array]:
    """Bucket indices ``[s, B]`` (int32, in ``0..d-1``) and sign bits ``[s, B]`` of a block.

    One 32-bit random word per (group, row): bit 0 is the sign, the other 31 bits modulo ``w``
    the bucket (uniform up to a relative bias below ``w / 2**31``).
    """
    s = proj.nonzeros
    w = proj.dim // s
    word = jax.random.bits(key, (s, proj.block_size), jnp.uint32)
    idx = ((word >> jnp.uint32(1)) % jnp.uint32(w)).astype(jnp.int32)
    idx = idx + (jnp.arange(s, dtype=jnp.int32) * w)[:, None]
    return idx, word & jnp.uint32(1)


def _sign_values(signs: jax.Array, s: int, dtype) -> jax.Array:
    scale = 1.0 / math.sqrt(s)
    return jnp.where(signs == 1, jnp.asarray(scale, dtype), jnp.asarray(-scale, dtype))


def _dense_block(proj: Projector, key, dtype, col0=0, cols: int | None = None) -> jax.Array:
    """One block as a dense ``[B, cols]`` matrix: columns ``col0 .. col0+cols-1`` of P
    (all ``d`` by default; ``col0`` may be traced). Not for ``"identity"``."""
    B, d = proj.block_size, proj.dim
    cols = d if cols is None else cols
    if proj.kind == "sjlt":
        idx, signs = _sjlt_hash(proj, key)
        val = _sign_values(signs, proj.nonzeros, dtype)  # [s, B]
        want = col0 + jnp.arange(cols, dtype=jnp.int32)
        onehot = idx[:, :, None] == want[None, None, :]  # [s, B, cols]
        return jnp.sum(jnp.where(onehot, val[:, :, None], jnp.zeros((), dtype)), axis=0)
    if proj.kind == "rademacher":
        full = _rademacher_block(key, B, d, dtype)
    else:
        full = jax.random.normal(key, (B, d), dtype) * jnp.asarray(1.0 / math.sqrt(d), dtype)
    if cols == d:
        return full
    return jax.lax.dynamic_slice_in_dim(full, col0, cols, axis=1)


def columns(proj: Projector, col0, cols: int, dtype) -> list:
    """Columns ``col0 .. col0+cols-1`` of P split by selected leaf: ``[D_l, cols]`` each.

    Memory ``D * cols`` (used by the jvp route with small ``cols`` and by
    :func:`projector_matrix`).
    """
    sizes = [_size(proj.leaf_shapes[i]) for i in proj.selected_indices]
    if proj.kind == "identity":
        want = col0 + jnp.arange(cols, dtype=jnp.int32)
        rows = jnp.arange(sum(sizes), dtype=jnp.int32)
        full = (rows[:, None] == want[None, :]).astype(dtype)
        return jnp.split(full, np.cumsum(sizes)[:-1].tolist(), axis=0)
    B, nbs, _, _ = _layout(proj)
    blocks = jax.lax.map(lambda k: _dense_block(proj, k, dtype, col0, cols), _block_keys(proj))
    blocks = blocks.reshape(-1, cols)
    out, start = [], 0
    for size, nb in zip(sizes, nbs):
        out.append(blocks[start : start + size])
        start += nb * B
    return out


# ---------------------------------------------------------------------------------------------
# Application to flat gradients.


def make_plan(proj: Projector, dtype):
    """What is precomputed once per call: the sjlt hash ``(idx [s, D_pad], vals [s, D_pad])``;
    ``None`` for the other kinds (dense blocks are regenerated inside the block loop)."""
    if proj.kind != "sjlt":
        return None
    idx, signs = jax.vmap(lambda k: _sjlt_hash(proj, k))(_block_keys(proj))  # [NB, s, B]
    s = proj.nonzeros
    idx = jnp.moveaxis(idx, 1, 0).reshape(s, -1)
    vals = _sign_values(jnp.moveaxis(signs, 1, 0).reshape(s, -1), s, dtype)
    return idx, vals


# A chunk's gradients are concatenated (each leaf zero-padded to whole blocks) before ``Pᵀ`` is
# applied. For large models this copy is as big as the gradients themselves, so the selected
# leaves are cut into consecutive groups of at most ``_GROUP_ROWS`` padded rows (a larger leaf
# forms a group of its own), and each group is concatenated and projected in turn: the copy then
# holds one group, not all ``D`` rows. The groups are visited in block order and accumulate into
# one result, so dense kinds and sjlt with one nonzero add the same terms in the same order as
# with a single group. Each group adds one block loop to the compiled program; models below
# ``_GROUP_ROWS`` parameters have one group.
_GROUP_ROWS = 1 << 24


def _groups(nbs: list, B: int) -> list:
    """``[(lo, hi), ...]``: consecutive runs of selected leaves, each of at most ``_GROUP_ROWS``
    padded rows unless it is a single leaf."""
    groups, lo, rows = [], 0, 0
    for i, nb in enumerate(nbs):
        if i > lo and rows + nb * B > _GROUP_ROWS:
            groups.append((lo, i))
            lo, rows = i, 0
        rows += nb * B
    groups.append((lo, len(nbs)))
    return groups


def _concat_padded(flat_leaves, nbs, B: int, dtype) -> jax.Array:
    """Leaves ``[N, D_l]`` -> ``[N, sum(nbs) * B]`` (each zero-padded to whole blocks)."""
    parts = []
    for g, nb in zip(flat_leaves, nbs):
        g = g.astype(dtype)
        pad = nb * B - g.shape[1]
        parts.append(jnp.pad(g, ((0, 0), (0, pad))) if pad else g)
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)


def _dense_apply(proj: Projector, g, keys, out, dtype) -> jax.Array:
    """``out + g @ [blocks of keys]`` for padded rows ``g`` ``[N, len(keys) * B]``, block by
    block in order; ``out=None`` starts from the first block's product."""
    B = proj.block_size
    first = 0
    if out is None:
        # the first block initialises the carry (so it has the type of g, e.g. varying in shard_map)
        out, first = g[:, :B] @ _dense_block(proj, keys[0], dtype), 1
    if keys.shape[0] == first:
        return out

    def body(acc, jk):
        j, k = jk
        gb = jax.lax.dynamic_slice_in_dim(g, j * B, B, axis=1)
        return acc + gb @ _dense_block(proj, k, dtype), None

    out, _ = jax.lax.scan(body, out, (jnp.arange(first, keys.shape[0]), keys[first:]))
    return out


def apply_flat(proj: Projector, plan, flat_leaves, dtype) -> jax.Array:
    """``Pᵀ`` applied to the selected leaves, each flattened to ``[N, D_l]``: ``[N, d]``."""
    N, d = flat_leaves[0].shape[0], proj.dim
    if proj.kind == "identity":
        parts = [g.astype(dtype) for g in flat_leaves]
        return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)
    B, nbs, _, _ = _layout(proj)
    keys = None if proj.kind == "sjlt" else _block_keys(proj)
    out = jnp.zeros((N, d), dtype) if proj.kind == "sjlt" else None
    b0 = 0  # first block of the group
    for lo, hi in _groups(nbs, B):
        g = _concat_padded(flat_leaves[lo:hi], nbs[lo:hi], B, dtype)  # [N, rows of the group]
        b1 = b0 + sum(nbs[lo:hi])
        if proj.kind == "sjlt":
            idx, vals = plan
            for j in range(proj.nonzeros):
                out = out.at[:, idx[j, b0 * B : b1 * B]].add(
                    g * vals[j, b0 * B : b1 * B].astype(dtype)[None, :], mode="promise_in_bounds"
                )
        else:
            out = _dense_apply(proj, g, keys[b0:b1], out, dtype)
        b0 = b1
    return out


def check_tree(proj: Projector, tree: Any, name: str) -> list:
    """Leaves of ``tree`` after checking its structure against the projector."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    if treedef != proj.treedef:
        raise ValueError(
            f"`{name}` has tree structure {treedef} but the projector was built for "
            f"{proj.treedef}; build the projector from the same parameters."
        )
    return leaves


def project(projector: Projector, tree: Any) -> jax.Array:
    """Apply ``Pᵀ`` to a parameter-shaped pytree (e.g. one gradient): ``[..., D]`` -> ``[..., d]``.

    Args:
      projector: a :class:`Projector`.
      tree: pytree with the structure of the projector's ``params``; each selected leaf has the
        leaf's shape, optionally preceded by common batch dimensions ``[...]``. Unselected leaves
        are ignored.

    Returns:
      ``[..., d]``: ``Pᵀ vec(tree)`` in the dtype of the selected leaves.

    >>> import jax, jax.numpy as jnp, kernattr as ka
    >>> params = {"w": jnp.ones((3, 4))}
    >>> proj = ka.make_projector(jax.random.key(0), params, dim=8, kind="sjlt")
    >>> ka.project(proj, params).shape
    (8,)
    """
    leaves = check_tree(projector, tree, "tree")
    batch = None
    flat = []
    for i in projector.selected_indices:
        x = jnp.asarray(leaves[i])
        shape = projector.leaf_shapes[i]
        k = x.ndim - len(shape)
        if k < 0 or tuple(x.shape[k:]) != shape:
            raise ValueError(
                f"`tree` leaf {projector.leaf_paths[i]} has shape {x.shape}; expected "
                f"[..., {', '.join(map(str, shape))}]."
            )
        if batch is None:
            batch = tuple(x.shape[:k])
        elif tuple(x.shape[:k]) != batch:
            raise ValueError(
                f"`tree` leaves have different batch dimensions: {batch} and {x.shape[:k]} "
                f"(at {projector.leaf_paths[i]})."
            )
        flat.append(x)
    dtype = jnp.result_type(*flat)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.result_type(float)
    N = _size(batch)
    flat = [x.reshape(N, -1) for x in flat]
    out = apply_flat(projector, make_plan(projector, dtype), flat, dtype)
    return out.reshape(*batch, projector.dim)


def projector_matrix(projector: Projector, *, dtype: Any = None) -> jax.Array:
    """The explicit matrix ``P`` ``[D, d]`` (a testing aid: memory ``D * d``, small ``D`` only).

    Rows follow the flattening order of the selected leaves (row-major within a leaf), so
    ``project(projector, tree) == concat(vec(selected leaves)) @ projector_matrix(projector)``.

    Args:
      projector: a :class:`Projector`.
      dtype: float dtype of the result (default: the default float dtype).

    Returns:
      ``[D, d]`` array.

    >>> import jax, jax.numpy as jnp, kernattr as ka
    >>> proj = ka.make_projector(jax.random.key(0), {"w": jnp.ones(5)}, dim=3)
    >>> ka.projector_matrix(proj).shape
    (5, 3)
    """
    dtype = jnp.result_type(float) if dtype is None else jnp.dtype(dtype)
    return jnp.concatenate(
        columns(projector, 0, projector.dim, dtype), axis=0
    )

