"""Every notebook in colabs/ runs top to bottom (small settings: TNA_COLAB_QUICK=1)."""

import os
import pathlib

import nbformat
from nbclient import NotebookClient
import pytest

COLABS = sorted((pathlib.Path(__file__).resolve().parent.parent / "colabs").glob("*.ipynb"))


def test_there_are_colabs():
  assert {p.name for p in COLABS} >= {"quickstart.ipynb", "lmc_explorer.ipynb", "federated.ipynb"}


@pytest.mark.parametrize("path", COLABS, ids=lambda p: p.stem)
def test_colab_runs_top_to_bottom(path, tmp_path, monkeypatch):
  monkeypatch.setenv("TNA_COLAB_QUICK", "1")
  monkeypatch.setenv("TNA_COLAB_WORKDIR", str(tmp_path))
  monkeypatch.setenv("MPLBACKEND", "Agg")
  notebook = nbformat.read(path, as_version=4)
  NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
  errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
  assert not errors
