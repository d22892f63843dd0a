"""Packaging signals: version from metadata, `kernattr --version`, license, citation, py.typed."""

import pathlib
import subprocess
import sys

import kernattr as ka

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_version_flag(capsys):
    from kernattr.cli import main

    try:
        main(["--version"])
    except SystemExit as e:
        assert e.code == 0
    assert capsys.readouterr().out.strip() == f"kernattr {ka.__version__}"


def test_version_from_metadata():
    from importlib import metadata

    try:
        expected = metadata.version("kernattr")
    except metadata.PackageNotFoundError:
        expected = "0+unknown"
    assert ka.__version__ == expected


def test_license_citation_changelog_typed():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text  # the full text, not a stub
    assert 'license = "Apache-2.0"' in (ROOT / "pyproject.toml").read_text()
    cff = (ROOT / "CITATION.cff").read_text()
    for needle in ("cff-version: 1.2.0", "Efficient Estimation of Kernel Surrogate Models for "
                   "Task Attribution", "2602.03783", "ICLR 2026", "type: software"):
        assert needle in cff
    assert "## [Unreleased]" in (ROOT / "CHANGELOG.md").read_text()
    assert (ROOT / "kernattr" / "py.typed").exists()
    assert '"py.typed"' in (ROOT / "pyproject.toml").read_text()


def test_help_texts_give_ranges_not_single_figures():
    out = subprocess.run([sys.executable, "-m", "kernattr.cli", "--help"], capture_output=True,
                         text=True, cwd=ROOT, check=True).stdout
    assert "demo" in out and "2-10 minutes on 2 CPU cores" in out


def test_your_model_notebook_uses_public_api_only():
    import json

    nb = json.loads((ROOT / "notebooks" / "your_model.ipynb").read_text())
    code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    assert "ka.workflow(" in code and "ka.run_workflow(" in code
    for private in ("kernattr._", "kernattr.experiments", "from kernattr import _"):
        assert private not in code
