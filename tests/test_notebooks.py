"""The notebooks run top to bottom on CPU (shrunk by their parameters) and are committed
without outputs."""

import glob
import os
import shutil

import nbformat

from conftest import NOTEBOOKS, execute_notebook, images_shown

NAMES = ("imagenet.ipynb", "quickstart.ipynb", "tts.ipynb")  # imagenet: test_imagenet_local


def test_committed_notebooks_have_no_outputs_and_open_in_colab():
  paths = sorted(glob.glob(os.path.join(NOTEBOOKS, "*.ipynb")))
  assert sorted(map(os.path.basename, paths)) == sorted(NAMES)
  for path in paths:
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    assert "colab-badge.svg" in notebook.cells[0].source, path
    for cell in notebook.cells:
      if cell.cell_type == "code":
        assert not cell.outputs and cell.execution_count is None, (
            f"{path} has committed outputs: clear them before committing")


def test_quickstart_runs_on_a_trained_workdir(trained_run, tmp_path):
  """Every cell after training, on the shared tiny run (training itself is the pipeline's
  code, tested in test_stages.py)."""
  workdir = str(tmp_path / "run")
  shutil.copytree(trained_run, workdir)
  notebook = execute_notebook("quickstart.ipynb", dict(
      WORKDIR=workdir, TRAIN=False, SAMPLES_PER_CLASS=2, STEPS_GRID=(2,), CFG_GRID=(1.0,)))
  # Reconstructions, samples, T and CFG grids, the reveal rows and GIF, inpainting.
  assert images_shown(notebook) >= 7
  assert os.path.getsize(os.path.join(workdir, "reveal.gif")) > 0
  text = "".join(out.get("text", "") for cell in notebook.cells for out in cell.get("outputs", []))
  assert "class agreement of the sample set" in text
