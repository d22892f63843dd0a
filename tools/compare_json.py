"""Compare two results files (JSON) number by number: ``python tools/compare_json.py A B``.

Used to check that a refactor leaves the figures unchanged: every number in ``A`` must equal
the one at the same place in ``B`` within ``--rtol`` / ``--atol``; strings, booleans and the
structure must match exactly. Keys named in ``--ignore`` (timings, paths) are skipped anywhere.
Exit status 0 when equal, 1 with one line per difference otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import sys


def differences(a, b, *, rtol: float, atol: float, ignore: frozenset, path: str = "$"):
    """Yield ``(path, a, b)`` for every place where ``a`` and ``b`` differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k in ignore:
                continue
            if k not in a or k not in b:
                yield f"{path}.{k}", a.get(k, "<missing>"), b.get(k, "<missing>")
            else:
                yield from differences(a[k], b[k], rtol=rtol, atol=atol, ignore=ignore,
                                       path=f"{path}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            yield f"{path}[len]", len(a), len(b)
        for i, (x, y) in enumerate(zip(a, b)):
            yield from differences(x, y, rtol=rtol, atol=atol, ignore=ignore, path=f"{path}[{i}]")
    elif isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        if isinstance(b, bool):
            yield path, a, b
        elif math.isnan(a) or math.isnan(b):
            if not (math.isnan(a) and math.isnan(b)):
                yield path, a, b
        elif not math.isclose(a, b, rel_tol=rtol, abs_tol=atol):
            yield path, a, b
    elif a != b:
        yield path, a, b


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--rtol", type=float, default=1e-5)
    p.add_argument("--atol", type=float, default=1e-6)
    p.add_argument("--ignore", default="seconds,time,timings,wall_s,path,out,cache_dir",
                   help="comma-separated keys skipped wherever they appear")
    args = p.parse_args(argv)
    with open(args.a, encoding="utf-8") as f:
        a = json.load(f)
    with open(args.b, encoding="utf-8") as f:
        b = json.load(f)
    diffs = list(differences(a, b, rtol=args.rtol, atol=args.atol,
                             ignore=frozenset(filter(None, args.ignore.split(",")))))
    for where, x, y in diffs:
        print(f"{where}: {x!r} != {y!r}")
    print(f"{len(diffs)} difference(s) (rtol={args.rtol}, atol={args.atol})")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
