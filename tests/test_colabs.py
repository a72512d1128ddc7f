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


def run_first_cell(monkeypatch, cwd, debian_files: bool):
  """Executes the shared first cell with tna_jax 'not installed'; returns the commands it ran."""
  import importlib.util, shutil, subprocess  # pylint: disable=g-import-not-at-top,g-multiple-import
  find_spec, exists, commands = importlib.util.find_spec, os.path.exists, []
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tna_jax" else find_spec(name, *a))
  monkeypatch.setattr(subprocess, "run", lambda command, **kwargs: commands.append(command))
  monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
  monkeypatch.setattr(os.path, "exists", lambda p: debian_files if "fashion-mnist" in str(p) else exists(p))
  monkeypatch.chdir(cwd)
  exec(nbformat.read(COLABS[0], as_version=4).cells[1].source, {})  # pylint: disable=exec-used
  return commands


def test_every_colab_starts_with_the_same_setup_cell():
  assert len({nbformat.read(p, as_version=4).cells[1].source for p in COLABS}) == 1


def test_setup_cell_installs_the_enclosing_checkout_and_updates_apt_without_edits(monkeypatch):
  commands = run_first_cell(monkeypatch, COLABS[0].parent, debian_files=False)
  assert commands[0][-1] == str(COLABS[0].parent.parent)  # pip install <the checkout>
  assert "apt-get update" in commands[1] and commands[1].index("update") < commands[1].index("install")


def test_setup_cell_outside_a_checkout_names_the_one_value_to_set(monkeypatch, tmp_path):
  with pytest.raises(SystemExit, match="set TNA_JAX_SOURCE"):
    run_first_cell(monkeypatch, tmp_path, debian_files=True)
