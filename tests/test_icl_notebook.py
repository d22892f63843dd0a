"""The ICL walk-through notebook executes top to bottom (tiny sizes)."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

NB = os.path.join(os.path.dirname(__file__), "..", "notebooks", "icl_selection.ipynb")


@pytest.mark.slow  # ~105 s; its run_icl call is test_icl.py::test_run_icl_tiny and `kernattr reproduce icl`
def test_icl_notebook_executes():
    nb = nbformat.read(NB, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": os.path.dirname(NB)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.get("outputs", []))
    assert "estimator Spearman" in text and "LDS" in text and "selection" in text
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
