"""Every notebook under colabs/ runs top to bottom (each trains its own smoke run when
VQJAX_WORKDIR is not set; those in ON_SHARED_RUNS run in their own test on a shared one)."""

import glob
import os

import pytest

from tests.conftest import ROOT

# Notebooks that read a trained pipeline run have their own test beside the run they share.
ON_SHARED_RUNS = {"seqgan_visualization.ipynb": "tests/test_seqgan.py",
                  "fqgan_dictionary.ipynb": "tests/test_gan.py",
                  "movq_tokens.ipynb": "tests/test_movq.py"}
NOTEBOOKS = sorted(path for path in glob.glob(os.path.join(ROOT, "colabs", "*.ipynb"))
                   if os.path.basename(path) not in ON_SHARED_RUNS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, tmp_path, monkeypatch):
  nbformat = pytest.importorskip("nbformat", reason="pip install -e '.[dev]'")
  nbclient = pytest.importorskip("nbclient", reason="pip install -e '.[dev]'")
  pytest.importorskip("ipykernel", reason="pip install -e '.[dev]'")
  monkeypatch.delenv("VQJAX_WORKDIR", raising=False)
  monkeypatch.setenv("TMPDIR", str(tmp_path))  # the smoke run's directory goes here
  monkeypatch.setenv("MPLBACKEND", "Agg")
  notebook = nbformat.read(path, as_version=4)
  # kernel_name 'python3' is ipykernel's own spec, which runs this interpreter (the venv's).
  client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": ROOT}})
  client.execute()
  errors = [out for cell in notebook.cells for out in cell.get("outputs", [])
            if out.get("output_type") == "error"]
  assert not errors
