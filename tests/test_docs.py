"""The documentation site's sources stay complete (no Sphinx build here; CI builds the site).

* every name in ``kernattr.__all__`` (and in the public subpackages' ``__all__``) has an entry in
  the API reference under ``docs/api/``;
* every results data file has a page, and the generated tables come from the experiment's
  ``results_markdown``;
* the README stays a user guide: at most 200 lines, with the two commands CI relies on.
"""

from __future__ import annotations

import json
import os
import re
import sys

import pytest

import kernattr

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
DOCS = os.path.join(ROOT, "docs")
API = os.path.join(DOCS, "api")


def _api_entries(filename: str) -> set[str]:
    """Names listed in the autosummary blocks of one API page (an .rst or .md source)."""
    text = open(os.path.join(API, filename)).read()
    names = set()
    for block in re.findall(r"\.\. autosummary::\n((?:[ \t]+.*\n|\n)+)", text):
        for line in block.splitlines():
            line = line.strip()
            if line and not line.startswith(":"):
                names.add(line.split(".")[-1])
    return names


def _documented(filename: str) -> set[str]:
    """Autosummary entries plus names mentioned in double backquotes or roles."""
    text = open(os.path.join(API, filename)).read()
    mentioned = set(re.findall(r"``(?:[\w.]+\.)?(\w+)``", text))
    mentioned |= set(re.findall(r"^\.\. auto(?:data|function|class):: (\w+)", text, re.M))
    return _api_entries(filename) | mentioned


def test_every_public_name_is_in_the_api_reference():
    missing = sorted(set(kernattr.__all__) - _api_entries("kernattr.rst"))
    assert not missing, f"names in kernattr.__all__ missing from docs/api/kernattr.rst: {missing}"


@pytest.mark.parametrize("module, page", [("kernattr.adapters", "adapters.rst"),
                                          ("kernattr.groundtruth", "groundtruth.rst"),
                                          ("kernattr.plots", "plots.rst"),
                                          ("kernattr.io", "io.rst")])
def test_every_subpackage_name_is_in_the_api_reference(module, page):
    mod = __import__(module, fromlist=["__all__"])
    missing = sorted(set(mod.__all__) - _documented(page))
    assert not missing, f"names in {module}.__all__ missing from docs/api/{page}: {missing}"


def test_api_reference_lists_only_existing_names():
    stale = sorted(n for n in _api_entries("kernattr.rst") if not hasattr(kernattr, n))
    assert not stale, f"docs/api/kernattr.rst lists names kernattr does not have: {stale}"


def test_the_check_would_catch_a_missing_name(tmp_path, monkeypatch):
    # The parser is what the tests above rely on: a page without a name must not list it.
    page = tmp_path / "kernattr.rst"
    page.write_text(".. autosummary::\n   :toctree: _autosummary\n\n   fit_kernel\n   lds\n")
    monkeypatch.setattr(sys.modules[__name__], "API", str(tmp_path))
    assert _api_entries("kernattr.rst") == {"fit_kernel", "lds"}
    assert "shapley_values" in set(kernattr.__all__) - _api_entries("kernattr.rst")


def test_every_results_data_file_renders_and_has_a_page():
    sys.path.insert(0, os.path.join(DOCS, "_scripts"))
    import gen_results

    data = os.path.join(DOCS, "results", "data")
    for name in sorted(f[:-5] for f in os.listdir(data) if f.endswith(".json")):
        with open(os.path.join(data, name + ".json")) as f:
            results = json.load(f)
        text = gen_results._renderer(name)(results)
        assert text.strip() and "|" in text, name
        page = os.path.join(DOCS, "results", name + ".md")
        assert os.path.exists(page), f"docs/results/data/{name}.json has no page {page}"
        assert f"_generated/{name}.md" in open(page).read(), f"{page} does not include its table"


def test_demo_table_matches_its_data():
    from kernattr.experiments.pipeline import results_markdown

    with open(os.path.join(DOCS, "results", "data", "demo.json")) as f:
        results = json.load(f)
    text = results_markdown(results)
    for name, m in results["methods"].items():
        assert f"| {name} | {m['lds']:.3f} |" in text
    mean, lo, hi = results["paired"]["kernel_real-datamodels"]
    assert f"| kernel_real − datamodels | {mean:+.3f} | [{lo:+.3f}, {hi:+.3f}] |" in text


def test_readme_is_a_short_user_guide():
    text = open(os.path.join(ROOT, "README.md")).read()
    assert len(text.splitlines()) <= 200
    # CI (.ci/run) runs exactly these commands.
    assert 'pip install -e ".[test]" && python -m pytest -q -n 2' in text
    assert 'pip install -e ".[demo]" && kernattr demo' in text
    assert "sphinx-build -W --keep-going -j auto -b html docs docs/_build/html" in text
