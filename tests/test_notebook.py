"""The walkthrough notebook executes top to bottom (tiny sizes)."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

NB = os.path.join(os.path.dirname(__file__), "..", "notebooks", "modular_attribution.ipynb")


# The documentation build (CI runs it with warnings as errors) executes every notebook too.
@pytest.mark.slow
def test_notebook_executes():
    nb = nbformat.read(NB, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": os.path.dirname(NB)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.get("outputs", []))
    assert "relative error" in text and "LDS" in text
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
