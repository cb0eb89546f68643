import os
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Many tests build the same small models: a persistent compilation cache (shared by the
# xdist workers and the subprocess tests, which inherit the environment) compiles each once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"vqjax-tests-jax-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def load_config(spec: str):
  """`configs/x.py:variant` (relative to the repository) -> the ConfigDict the recipe returns."""
  from vqjax.core.config_files import load_config_file

  return load_config_file(os.path.join(ROOT, spec))


@pytest.fixture
def smoke_config():
  config = load_config("configs/demo.py:smoke")
  return config


def folder_config(config, folder):
  """`config` reading 32px images from an image folder (train and val), small batches."""
  with config.unlocked():
    config.data.source = "folder"
    config.data.folder = str(folder)
    config.data.val_folder = str(folder)
    config.data.image_size = 32
    config.data.resize_shorter = 32
    config.train.batch_size = 2
    config.eval.batch_size = 4
    config.eval.max_examples = 0
  return config


def in_repository(function, *args):
  """Call `function` from the repository root (recipes name recipes by relative paths)."""
  cwd = os.getcwd()
  os.chdir(ROOT)
  try:
    return function(*args)
  finally:
    os.chdir(cwd)


def run_notebook(name: str, monkeypatch, workdir: str | None = None) -> str:
  """Execute colabs/`name` top to bottom (nbclient, from the repository root) with
  VQJAX_WORKDIR=`workdir` (unset: the notebook trains its own smoke run, under this test's
  TMPDIR when the caller set one); assert no cell failed; returns the cells' printed text."""
  nbformat = pytest.importorskip("nbformat", reason="pip install -e '.[dev]'")
  nbclient = pytest.importorskip("nbclient", reason="pip install -e '.[dev]'")
  pytest.importorskip("ipykernel", reason="pip install -e '.[dev]'")
  if workdir is None:
    monkeypatch.delenv("VQJAX_WORKDIR", raising=False)
  else:
    monkeypatch.setenv("VQJAX_WORKDIR", workdir)
  monkeypatch.setenv("MPLBACKEND", "Agg")
  notebook = nbformat.read(os.path.join(ROOT, "colabs", name), as_version=4)
  # kernel_name 'python3' is ipykernel's own spec, which runs this interpreter (the venv's).
  client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": ROOT}})
  client.execute()
  outputs = [out for cell in notebook.cells for out in cell.get("outputs", [])]
  assert not [out for out in outputs if out.get("output_type") == "error"]
  return "".join(out.get("text", "") for out in outputs)
