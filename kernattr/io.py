"""Save and load kernattr results: surrogates, attributions, intervals, workflow results.

:func:`save` writes one ``.npz`` file (numpy's zip of ``.npy`` arrays, read back with
``allow_pickle=False``): every array of the object bit-exact with its dtype, and one JSON
header entry that describes the tree (containers, result types by name, static fields such as
:class:`~kernattr.KernelSurrogate`'s ``spec``, Python scalars) and carries the format name and
version. :func:`load` rebuilds the object from the header; it never unpickles and never runs
code from the file: a result type is looked up by name among the types registered here, so a
file can only produce those types, arrays, typed keys and plain containers.

A new result type becomes saveable by adding it to ``_KNOWN_TYPES`` below (or, for a user's own
NamedTuple or frozen dataclass, by :func:`register_type`).
"""

from __future__ import annotations

import dataclasses
import io as _stdio
import json
import os
import tempfile
import typing
import zipfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._metrics import BootstrapInterval, EstimatorError, LDSInterval, LDSResult, PairedLDSInterval
from .data._games import SyntheticGame
from .data._loaders import SubsetData
from .data._subsets import PairMasks
from .labels._estimation import SubsetEstimates
from .labels._features import GradientFeatures
from .readouts._uncertainty import AttributionIntervals
from .surrogates._cg import CGResult
from .surrogates._krr import KernelSurrogate, LinearSurrogate, MultiFidelitySurrogate
from .surrogates._nystrom import NystromSurrogate
from .surrogates._quadratic import QuadraticSurrogate
from .workflow import Attributions, WorkflowConfig, WorkflowResult, WorkflowTimings

__all__ = ["FORMAT_VERSION", "FormatError", "load", "register_type", "save"]

FORMAT = "kernattr"
FORMAT_VERSION = 1
_HEADER = "__kernattr_header__"
_ZIP_MAGIC = b"PK\x03\x04"


class FormatError(ValueError):
    """A file that :func:`load` cannot read: not a kernattr file, truncated, or too new."""


# One place: every type a file may contain, by name. NamedTuples and frozen dataclasses only.
_KNOWN_TYPES: tuple = (
    AttributionIntervals,
    Attributions,
    BootstrapInterval,
    CGResult,
    EstimatorError,
    GradientFeatures,
    KernelSurrogate,
    typing.get_type_hints(KernelSurrogate)["spec"],  # KernelSpec, the static kernel description
    LDSInterval,
    LDSResult,
    LinearSurrogate,
    MultiFidelitySurrogate,
    NystromSurrogate,
    PairMasks,
    PairedLDSInterval,
    QuadraticSurrogate,
    SubsetData,
    SubsetEstimates,
    SyntheticGame,
    WorkflowConfig,
    WorkflowResult,
    WorkflowTimings,
)
_REGISTRY: dict[str, type] = {}


def _is_namedtuple_type(cls: Any) -> bool:
    return isinstance(cls, type) and issubclass(cls, tuple) and hasattr(cls, "_fields")


def register_type(cls: type) -> type:
    """Make a NamedTuple or frozen dataclass type saveable by :func:`save` (returns ``cls``).

    Files name the type by its class name, so names must be unique; registering the same class
    twice is a no-op. Usable as a class decorator.

    Args:
      cls: a ``typing.NamedTuple`` class or a frozen ``dataclasses.dataclass``.

    Returns:
      ``cls``.

    Raises:
      TypeError: ``cls`` is neither, or another class of the same name is registered.

    >>> import typing, kernattr.io
    >>> @kernattr.io.register_type
    ... class MyScores(typing.NamedTuple):
    ...     value: object
    >>> kernattr.io.register_type(MyScores) is MyScores
    True
    """
    frozen_dc = dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen
    if not (_is_namedtuple_type(cls) or (isinstance(cls, type) and frozen_dc)):
        raise TypeError(f"`cls` must be a NamedTuple or frozen dataclass type, got {cls!r}.")
    name = cls.__name__
    if _REGISTRY.get(name, cls) is not cls:
        raise TypeError(f"another type named {name!r} is already registered for kernattr files.")
    _REGISTRY[name] = cls
    return cls


for _cls in _KNOWN_TYPES:
    register_type(_cls)


# ------------------------------------------------------------------------------------- encode
def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _store(arrays: dict, value: np.ndarray) -> dict:
    name = f"a{len(arrays)}"
    node = {"key": name, "dtype": value.dtype.name, "shape": list(value.shape)}
    if not value.dtype.isbuiltin == 1:  # bfloat16 & co. (ml_dtypes): store the raw bits
        value = value.view(np.dtype(f"u{value.dtype.itemsize}"))
    arrays[name] = value
    return node


def _encode(obj: Any, arrays: dict, where: str) -> dict:
    if obj is None or isinstance(obj, (bool, str)):
        return {"type": "py", "value": obj}
    if isinstance(obj, int) and not isinstance(obj, bool):
        return {"type": "int", "value": str(obj)}
    if isinstance(obj, float):
        return {"type": "float", "value": obj.hex()}
    if _is_key(obj):
        data = np.asarray(jax.random.key_data(obj))
        node = _store(arrays, data)
        return {"type": "key", "impl": str(jax.random.key_impl(obj)), **node}
    if isinstance(obj, jax.Array):
        return {"type": "jax", **_store(arrays, np.asarray(obj))}
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind == "O":
            raise TypeError(f"{where}: object arrays cannot be saved (no pickle); convert it.")
        return {"type": "numpy", **_store(arrays, obj)}
    if isinstance(obj, np.generic):
        return {"type": "npscalar", **_store(arrays, np.asarray(obj))}
    cls = type(obj)
    if _REGISTRY.get(cls.__name__) is cls:
        if _is_namedtuple_type(cls):
            names, values = cls._fields, tuple(obj)
        else:
            names = [f.name for f in dataclasses.fields(obj)]
            values = [getattr(obj, n) for n in names]
        fields = {n: _encode(v, arrays, f"{where}.{n}") for n, v in zip(names, values)}
        return {"type": "object", "name": cls.__name__, "fields": fields}
    if isinstance(obj, (tuple, list)) and (cls is tuple or cls is list):
        items = [_encode(v, arrays, f"{where}[{i}]") for i, v in enumerate(obj)]
        return {"type": cls.__name__, "items": items}
    if isinstance(obj, dict) and cls is dict:
        bad = [k for k in obj if not isinstance(k, str)]
        if bad:
            raise TypeError(f"{where}: dict keys must be strings to be saved, got {bad[0]!r}.")
        return {"type": "dict", "items": [[k, _encode(v, arrays, f"{where}[{k!r}]")]
                                          for k, v in obj.items()]}
    raise TypeError(
        f"{where} is a {cls.__module__}.{cls.__qualname__}, which kernattr files cannot hold. "
        "Saveable: kernattr's result types, arrays, typed keys, None/bool/int/float/str and "
        "tuples/lists/dicts of them; register your own NamedTuple with "
        "kernattr.io.register_type."
    )


def save(path: str | os.PathLike, obj: Any) -> None:
    """Write a kernattr result (any surrogate, interval, workflow result, ...) to ``path``.

    The file is an ``.npz`` archive (the name is used as given) holding every array of ``obj``
    bit-exact with its dtype and a JSON header describing the tree and the format version; it
    contains no pickle. It is written to a temporary file first and moved into place, so an
    interrupted save never leaves a half-written file under ``path``. Read it with :func:`load`.

    Args:
      path: file path (``str`` or ``os.PathLike``).
      obj: a registered result type (every public NamedTuple of ``kernattr``, including nested
        ones and static fields such as ``KernelSpec``), an array (numpy or jax, typed PRNG keys
        included), ``None``/``bool``/``int``/``float``/``str``, or tuples, lists and dicts (string
        keys) of these.

    Raises:
      TypeError: ``obj`` contains something else (the message names where), e.g. a function or
        an unregistered class.

    >>> import os, tempfile, jax, kernattr as ka
    >>> masks = ka.sample_subsets(jax.random.key(0), num_tasks=4, num_subsets=16, p=0.5)
    >>> s = jax.jit(ka.fit_linear)(masks, masks[:, 0] - masks[:, 1])
    >>> path = os.path.join(tempfile.mkdtemp(), "surrogate.npz")
    >>> ka.save(path, s)
    >>> bool((ka.load(path).coef == s.coef).all())
    True
    """
    arrays: dict = {}
    tree = _encode(obj, arrays, "obj")
    header = {"format": FORMAT, "version": FORMAT_VERSION, "tree": tree}
    blob = np.frombuffer(json.dumps(header, allow_nan=False).encode("utf-8"), dtype=np.uint8)
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".kernattr-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **{_HEADER: blob}, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# ------------------------------------------------------------------------------------- decode
def _read(path: str) -> tuple[dict, dict]:
    """Header and arrays of ``path``; one FormatError per kind of bad file."""
    with open(path, "rb") as f:
        raw = f.read()
    if not raw.startswith(_ZIP_MAGIC):
        raise FormatError(f"{path} is not a kernattr file (not an .npz archive written by "
                          "kernattr.save).")
    try:
        with np.load(_stdio.BytesIO(raw), allow_pickle=False) as z:
            names = list(z.files)
            if _HEADER not in names:
                raise FormatError(f"{path} is an .npz archive but not a kernattr file (no "
                                  "kernattr header); load it with numpy.load.")
            blob = z[_HEADER]
            arrays = {n: z[n] for n in names if n != _HEADER}
    except FormatError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as e:
        raise FormatError(f"{path} is truncated or corrupt and cannot be read ({e}); save it "
                          "again.") from None
    try:
        header = json.loads(blob.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise FormatError(f"{path} is truncated or corrupt: its kernattr header is not valid "
                          "JSON; save it again.") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise FormatError(f"{path} is not a kernattr file (its header names no kernattr format).")
    version = header.get("version")
    if not isinstance(version, int) or version < 1:
        raise FormatError(f"{path} is corrupt: format version {version!r} is not a positive int.")
    if version > FORMAT_VERSION:
        raise FormatError(
            f"{path} was written in kernattr file format version {version}; this kernattr reads "
            f"versions up to {FORMAT_VERSION}. Upgrade kernattr to load it."
        )
    return header, arrays


def _array(node: dict, arrays: dict, path: str) -> np.ndarray:
    name = node.get("key")
    if name not in arrays:
        raise FormatError(f"{path} is truncated or corrupt: array {name!r} is missing.")
    value = arrays[name]
    dtype = jnp.dtype(node["dtype"])
    if value.dtype != dtype:
        value = value.view(dtype)
    if list(value.shape) != list(node["shape"]):
        raise FormatError(f"{path} is corrupt: array {name!r} has shape {value.shape}, header "
                          f"says {tuple(node['shape'])}.")
    return value


def _to_jax(value: np.ndarray, as_numpy: bool, where: str) -> Any:
    if as_numpy:
        return value
    if value.dtype.itemsize == 8 and not jax.config.jax_enable_x64 and value.dtype.kind in "iufc":
        raise ValueError(
            f"{where} is a {value.dtype} jax array, which this process cannot hold with "
            "64-bit mode off: call jax.config.update('jax_enable_x64', True) before loading, or "
            "pass as_numpy=True to get numpy arrays."
        )
    if value.dtype.kind == "c" and value.dtype.itemsize == 16 and not jax.config.jax_enable_x64:
        raise ValueError(f"{where} is complex128; enable x64 or pass as_numpy=True.")
    return jnp.asarray(value)


def _decode(node: Any, arrays: dict, path: str, as_numpy: bool, where: str) -> Any:
    if not isinstance(node, dict) or "type" not in node:
        raise FormatError(f"{path} is corrupt: bad header entry at {where}.")
    kind = node["type"]
    if kind == "py":
        return node["value"]
    if kind == "int":
        return int(node["value"])
    if kind == "float":
        return float.fromhex(node["value"])
    if kind == "jax":
        return _to_jax(_array(node, arrays, path), as_numpy, where)
    if kind == "numpy":
        return _array(node, arrays, path)
    if kind == "npscalar":
        return _array(node, arrays, path)[()]
    if kind == "key":
        data = _array(node, arrays, path)
        return data if as_numpy else jax.random.wrap_key_data(data, impl=node["impl"])
    if kind in ("tuple", "list"):
        items = [_decode(v, arrays, path, as_numpy, f"{where}[{i}]")
                 for i, v in enumerate(node["items"])]
        return tuple(items) if kind == "tuple" else items
    if kind == "dict":
        return {k: _decode(v, arrays, path, as_numpy, f"{where}[{k!r}]") for k, v in node["items"]}
    if kind == "object":
        return _object(node, arrays, path, as_numpy, where)
    raise FormatError(f"{path}: unknown entry type {kind!r} at {where}; it was written by a "
                      "different kernattr, or is corrupt.")


def _object(node: dict, arrays: dict, path: str, as_numpy: bool, where: str) -> Any:
    name = node.get("name")
    cls = _REGISTRY.get(name)
    if cls is None:
        raise FormatError(f"{path} holds a {name!r} at {where}, which this kernattr does not "
                          "know (written by a newer kernattr, or a type registered with "
                          "kernattr.io.register_type in another program; register it first).")
    fields = {k: _decode(v, arrays, path, as_numpy, f"{where}.{k}")
              for k, v in node["fields"].items()}
    if _is_namedtuple_type(cls):
        expected, defaults = set(cls._fields), set(cls._field_defaults)
    else:
        fs = dataclasses.fields(cls)
        expected = {f.name for f in fs}
        defaults = {f.name for f in fs if f.default is not dataclasses.MISSING
                    or f.default_factory is not dataclasses.MISSING}
    unknown, missing = set(fields) - expected, expected - set(fields) - defaults
    if unknown or missing:
        raise FormatError(
            f"{path}: the {name} at {where} has fields {sorted(fields)}, this kernattr's {name} "
            f"has {sorted(expected)}; the file comes from a different kernattr version."
        )
    return cls(**fields)


def load(path: str | os.PathLike, *, as_numpy: bool = False) -> Any:
    """Read an object written by :func:`save`; arrays bit-exact, dtypes and types as saved.

    Loading runs no code from the file: result types are looked up by name among the registered
    types (:func:`register_type`), arrays are read with ``allow_pickle=False``.

    Args:
      path: file written by :func:`save`.
      as_numpy: return numpy arrays (and raw key data) instead of jax arrays (e.g. to read a
        float64 result without enabling x64).

    Returns:
      The saved object: jax arrays come back as jax arrays, numpy arrays as numpy arrays,
      typed keys as typed keys.

    Raises:
      FormatError: (a ``ValueError``) the file is not a kernattr file, is truncated or corrupt,
        or was written by a newer format version; one message each.
      ValueError: a saved 64-bit jax array while ``jax_enable_x64`` is off (never downcast
        silently); enable x64 or pass ``as_numpy=True``.
      FileNotFoundError: no file at ``path``.

    >>> import os, tempfile, jax.numpy as jnp, kernattr as ka
    >>> path = os.path.join(tempfile.mkdtemp(), "lin.npz")
    >>> ka.save(path, ka.LinearSurrogate(coef=jnp.ones((3, 1)), intercept=jnp.zeros(1)))
    >>> ka.load(path).coef.shape
    (3, 1)
    """
    path = os.fspath(path)
    header, arrays = _read(path)
    return _decode(header.get("tree"), arrays, path, as_numpy, "obj")


