"""File sizes and the longest functions of the ``kernattr`` package, as Markdown tables.

``python tools/code_size.py [ROOT ...] [--top 10] [--over 80]``: for each source tree ``ROOT``
(default: this checkout) the lines per module and the ``--top`` longest functions, counted two
ways: ``lines`` from ``def`` to the last line, and ``code``, the lines that are neither the
docstring, blank nor comments. ``--over N`` lists every function with more than ``N`` code
lines. Nested functions count inside the function that holds them.
"""

from __future__ import annotations

import argparse
import ast
import io
import os
import sys
import tokenize


def _code_lines(source: str, node: ast.AST) -> int:
    """Lines of ``node`` that hold code: not blank, not only a comment, not the docstring."""
    lines = source.splitlines()[node.lineno - 1 : node.end_lineno]
    skip = set()
    body = getattr(node, "body", [])
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None),
                                                             ast.Constant) \
            and isinstance(body[0].value.value, str):
        skip.update(range(body[0].lineno, body[0].end_lineno + 1))
    count = 0
    for i, text in enumerate(lines, start=node.lineno):
        s = text.strip()
        if i in skip or not s or s.startswith("#"):
            continue
        count += 1
    return count


def functions(root: str):
    """``(module path, qualified name, lines, code lines)`` of every top-level function and method."""
    pkg = os.path.join(root, "kernattr")
    for base, dirs, files in os.walk(pkg):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for f in sorted(files):
            if not f.endswith(".py"):
                continue
            path = os.path.join(base, f)
            with open(path, encoding="utf-8") as fh:
                source = fh.read()
            tree = ast.parse(source)
            rel = os.path.relpath(path, root)
            for node in tree.body:
                items = [(node, node.name)] if isinstance(node, (ast.FunctionDef,
                                                                 ast.AsyncFunctionDef)) else []
                if isinstance(node, ast.ClassDef):
                    items = [(n, f"{node.name}.{n.name}") for n in node.body
                             if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
                for fn, name in items:
                    start = min([fn.lineno] + [d.lineno for d in fn.decorator_list])
                    yield rel, name, fn.end_lineno - start + 1, _code_lines(source, fn)


def file_sizes(root: str):
    """``(module path, lines)`` of every module."""
    pkg = os.path.join(root, "kernattr")
    for base, dirs, files in os.walk(pkg):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for f in sorted(files):
            if f.endswith(".py"):
                path = os.path.join(base, f)
                with open(path, encoding="utf-8") as fh:
                    yield os.path.relpath(path, root), sum(1 for _ in fh)


def report(root: str, top: int, over: int | None) -> str:
    out = io.StringIO()
    sizes = sorted(file_sizes(root), key=lambda x: -x[1])
    total = sum(n for _, n in sizes)
    out.write(f"### {root}\n\n{len(sizes)} modules, {total} lines; largest:\n\n")
    out.write("| module | lines |\n|---|---:|\n")
    for path, n in sizes[:15]:
        out.write(f"| `{path}` | {n} |\n")
    fns = sorted(functions(root), key=lambda x: -x[3])
    out.write(f"\n{top} longest functions (code lines: no docstring, blank or comment lines):\n\n")
    out.write("| function | module | lines | code |\n|---|---|---:|---:|\n")
    for path, name, lines, code in fns[:top]:
        out.write(f"| `{name}` | `{path}` | {lines} | {code} |\n")
    if over is not None:
        long = [f for f in fns if f[3] > over]
        out.write(f"\n{len(long)} function(s) with more than {over} code lines: "
                  + ", ".join(f"`{n}` ({c})" for _, n, _, c in long) + "\n")
    return out.getvalue()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("roots", nargs="*", default=[os.path.join(os.path.dirname(__file__), "..")])
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--over", type=int, default=None)
    args = p.parse_args(argv)
    for root in args.roots:
        sys.stdout.write(report(os.path.normpath(root), args.top, args.over) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
