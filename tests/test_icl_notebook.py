"""The demonstration-selection notebook (a toy in-context learner) executes top to bottom."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

NB = os.path.join(os.path.dirname(__file__), "..", "notebooks", "icl_selection.ipynb")


# The documentation build (CI runs it with warnings as errors) executes every notebook too.
@pytest.mark.slow
def test_icl_notebook_executes():
    nb = nbformat.read(NB, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": os.path.dirname(NB)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.get("outputs", []))
    assert "held-out LDS kernel" in text and "real loss" in text
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
