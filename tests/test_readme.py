"""Every Python block of README.md runs verbatim, in order, in one process.

The guides' code blocks under ``docs/`` are executed by the documentation build instead (myst-nb
``{code-cell}`` pages and the notebooks, with ``nb_execution_raise_on_error``), which CI runs with
``-W``; ``test_guides_blocks_are_executed`` checks that no guide hides a plain ``python`` block
that neither runs.
"""

from __future__ import annotations

import os
import re

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

# Plain ``python`` blocks in the docs that are shown but not run by the build, and why.
NOT_EXECUTED = {
    "howto/ground_truth.md": "a template: apply_fn, params0 and the data are the reader's",
    "howto/devices.md": "needs jax.distributed across several hosts",
}


def _blocks(text: str, lang: str = "python") -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, re.S | re.M)


def test_readme_python_blocks_run_in_order(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                # the README saves a file
    text = open(os.path.join(ROOT, "README.md")).read()
    blocks = _blocks(text)
    assert len(blocks) >= 3
    namespace: dict = {"__name__": "__readme__"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
    out = capsys.readouterr().out
    assert "held-out LDS kernel" in out
    # The quickstart's numbers are what it says they are.
    ka = namespace["ka"]
    assert namespace["shapley"].value.shape == (namespace["K"], 8)
    assert namespace["nxt"].shape == (10, 12)
    assert float(ka.lds(ka.predict(namespace["ker"], namespace["test"]), namespace["y_test"])) > 0.8
    restored = ka.load(tmp_path / "attributions.npz")
    assert bool((restored.shapley.value == namespace["shapley"].value).all())


def test_guides_blocks_are_executed():
    docs = os.path.join(ROOT, "docs")
    for dirpath, _, files in os.walk(docs):
        if "_build" in dirpath or "_generated" in dirpath:
            continue
        for name in files:
            if not name.endswith(".md"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, name), docs)
            text = open(os.path.join(dirpath, name)).read()
            plain = _blocks(text)
            if plain and rel not in NOT_EXECUTED:
                raise AssertionError(f"docs/{rel} has a plain python block that the build does not "
                                     "run: make it a {code-cell} or list it in NOT_EXECUTED")
            if "{code-cell}" in text:
                assert text.startswith("---\nfile_format: mystnb"), f"docs/{rel} is not executed"
