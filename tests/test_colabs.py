"""Every notebook under colabs/ runs top to bottom (each trains its own smoke run when
VQJAX_WORKDIR is not set; those in ON_SHARED_RUNS run in their own test on a shared one)."""

import glob
import os

import pytest

from tests.conftest import ROOT, run_notebook

# Notebooks that read a trained pipeline run have their own test beside the run they share.
ON_SHARED_RUNS = {"seqgan_visualization.ipynb": "tests/test_seqgan.py",
                  "fqgan_dictionary.ipynb": "tests/test_gan.py",
                  "movq_tokens.ipynb": "tests/test_movq.py"}
NOTEBOOKS = sorted(path for path in glob.glob(os.path.join(ROOT, "colabs", "*.ipynb"))
                   if os.path.basename(path) not in ON_SHARED_RUNS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, tmp_path, monkeypatch):
  monkeypatch.setenv("TMPDIR", str(tmp_path))  # the smoke run's directory goes here
  run_notebook(os.path.basename(path), monkeypatch)
