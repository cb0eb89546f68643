"""An unpickler that admits NumPy arrays and plain containers, nothing else.

Pickle can call any importable function while loading; weight files from a
package are data, so this reader resolves only the three globals a pickled
ndarray needs and refuses every other one before it is imported.
"""

from __future__ import annotations

import io
import pickle

import numpy as np

from vqjax.errors import UserError

# NumPy 1.x wrote `numpy.core.*`; NumPy 2 renamed the module `numpy._core`.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class UnsafePickleError(UserError, pickle.UnpicklingError):
  """A pickle asked for a global that a weight file has no reason to need."""


class NumpyOnlyUnpickler(pickle.Unpickler):

  def find_class(self, module: str, name: str):
    try:
      return _ALLOWED[(module, name)]
    except KeyError:
      raise UnsafePickleError(
          f"refusing to load {module}.{name}: this weight file may only contain NumPy "
          "arrays and plain containers. It is corrupt or not the file vqjax expects; "
          "reinstall the package that ships it.") from None


def load_numpy_pickle(path: str):
  """Load a pickle of dicts/lists/tuples of NumPy arrays, executing nothing."""
  with open(path, "rb") as f:
    return NumpyOnlyUnpickler(io.BytesIO(f.read())).load()
