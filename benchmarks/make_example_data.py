"""Regenerate the built-in example ``kernattr/data/example_game.json`` (deterministic).

Usage: python benchmarks/make_example_data.py [--check]

The file holds a synthetic task game with XOR-like and antagonistic task pairs
(``kernattr.data._games.example_data(seed=0)``: K=20 tasks, T=8 targets, 500 training and 200 held-out
Bernoulli(1/2) masks, noise 0.1) in the JSON layout of ``kernattr.load_subsets(format="json")``.
``--check`` regenerates in memory and exits non-zero if the committed file differs.
"""

import argparse
import json
import os
import sys

import jax

jax.config.update("jax_enable_x64", False)

from kernattr.data._games import example_data  # noqa: E402

PATH = os.path.join(os.path.dirname(__file__), "..", "kernattr", "data", "example_game.json")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    text = json.dumps(example_data(seed=0), separators=(",", ":"))
    if args.check:
        with open(PATH, encoding="utf-8") as f:
            same = f.read() == text
        print("example_game.json up to date" if same else "example_game.json differs")
        return 0 if same else 1
    with open(PATH, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {os.path.normpath(PATH)} ({len(text) / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
