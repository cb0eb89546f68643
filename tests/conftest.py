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
