"""Sphinx configuration of the kernattr documentation site.

Build (from the repository root): ``sphinx-build -W --keep-going -j auto -b html docs docs/_build/html``.
The build executes the tutorial notebooks (myst-nb) and writes the generated result tables
(``docs/results/_generated/``) before reading the sources.
"""

from __future__ import annotations

import os
import shutil
import sys

DOCS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(DOCS)
sys.path.insert(0, ROOT)          # document the checkout, not an installed copy
sys.path.insert(0, os.path.join(DOCS, "_scripts"))

# The notebook kernels the build starts import the checkout too, and compile with the tests'
# cheap XLA CPU settings (tools/cheap_compile.py): the pages run tiny programs once, so compile
# time is most of their run time.
os.environ["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
sys.path.insert(0, os.path.join(ROOT, "tools"))
from cheap_compile import with_cheap_compile  # noqa: E402

os.environ["XLA_FLAGS"] = with_cheap_compile(os.environ.get("XLA_FLAGS", ""))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import kernattr  # noqa: E402
import gen_results  # noqa: E402

project = "kernattr"
author = "the kernattr authors"
copyright = "the kernattr authors"
version = release = getattr(kernattr, "__version__", "")

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

# --- sources -------------------------------------------------------------------------------
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**.ipynb_checkpoints", "_scripts", "results/_generated",
                    "results/data", "_changelog.md"]
myst_enable_extensions = ["colon_fence", "dollarmath", "deflist"]
myst_heading_anchors = 3

# --- the tutorials: notebooks/*.ipynb, copied in and executed on every build ---------------
nb_execution_mode = os.environ.get("KERNATTR_DOCS_EXECUTE", "force")
nb_execution_timeout = 300
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_merge_streams = True
# stderr (progress bars, tqdm's notebook notice) is not part of the pages; errors still fail the build.
nb_output_stderr = "remove"


def _copy_notebooks() -> None:
    src = os.path.join(ROOT, "notebooks")
    dst = os.path.join(DOCS, "tutorials", "notebooks")
    shutil.rmtree(dst, ignore_errors=True)
    os.makedirs(dst)
    for name in sorted(os.listdir(src)):
        if name.endswith(".ipynb"):
            shutil.copy(os.path.join(src, name), os.path.join(dst, name))


def _copy_changelog() -> None:
    src = os.path.join(ROOT, "CHANGELOG.md")
    text = open(src).read() if os.path.exists(src) else "No release has been recorded yet.\n"
    # The changelog's own top heading is replaced by the page's.
    lines = text.splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    with open(os.path.join(DOCS, "_changelog.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


_copy_notebooks()
_copy_changelog()
gen_results.write_all(os.path.join(DOCS, "results"))

# --- API reference -------------------------------------------------------------------------
autosummary_generate = True
templates_path = ["_templates"]   # API pages titled by the short name (`fit_kernel`)
autosummary_imported_members = True
autodoc_default_options = {"members": False, "show-inheritance": False}
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_member_order = "bysource"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
add_module_names = False


# --- HTML ----------------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = "kernattr"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_theme_options = {
    "show_toc_level": 2,
    "repository_url": "",
    "use_repository_button": False,
    "navigation_with_keys": False,
}
suppress_warnings = ["mystnb.unknown_mime_type"]
if nb_execution_mode == "off":
    # Unexecuted pages carry no language metadata; only a quick check of the sources builds so.
    suppress_warnings += ["mystnb.lexer", "myst-nb.lexer"]
