"""Recipe files: `path/to/recipe.py[:variant]` -> the config its `get_config` returns."""

from __future__ import annotations

import importlib.util
import os

import ml_collections

from vqjax.errors import ConfigError


def recipe_module(path: str):
  """The recipe file at `path` as a module (a recipe may build on another's functions)."""
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path!r} not found (relative paths start at the current "
                      "directory; run from the repository root or give an absolute path)")
  module_spec = importlib.util.spec_from_file_location(
      "vqjax_cfg_" + os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """`path/to/recipe.py[:variant]` -> its locked config, as --config would build it."""
  path, _, arg = spec.partition(":")
  config = recipe_module(path).get_config(arg or None)
  config.lock()
  return config
