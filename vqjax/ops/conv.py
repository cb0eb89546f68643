"""Convolution formulations that XLA runs fast, each equal to `lax.conv_general_dilated`.

`conv_general_dilated` has the signature of `lax.conv_general_dilated` and is
what `flax.linen.Conv(conv_general_dilated=...)` calls. For a 2-D NHWC/HWIO
convolution whose output map is tiny (at most `PATCH_MAX_POSITIONS` positions
per image, e.g. VGG's conv5 on the 2x2 map of a 32px image) it computes the
same sum as one matrix product over the input's patches:

    y[b, i, j, o] = sum_{u, v, c} x_pad[b, s*i + u, s*j + v, c] * w[u, v, c, o]
                  = (patches(x) @ w.reshape(kh*kw*C, O))[b, i, j, o]

Its gradients are then matrix products as well. On CPU, XLA's direct
convolution of a 2x2 map of 512 channels runs at about 3 GFLOP/s forward and
takes about 100 ms for the gradients, against under 2 ms for the patch
product (benchmarks/mfu.py measures the whole steps). Everything else
(larger maps, dilation, grouped convolutions, other layouts) goes to
`lax.conv_general_dilated` unchanged, where the patches would cost more
memory traffic than they save.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

# Output positions per image up to which the patch product is used (4x4 maps and smaller).
PATCH_MAX_POSITIONS = 16
_NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1),
                                 out_spec=(0, 3, 1, 2))


def patches(x: jax.Array, kernel_hw: Sequence[int], strides: Sequence[int],
            padding: Sequence[tuple[int, int]]) -> jax.Array:
  """[B, H, W, C] -> [B, H', W', kh*kw*C]: the (u, v, c)-ordered window under each output."""
  (kh, kw), (sh, sw) = kernel_hw, strides
  x = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  oh = (x.shape[1] - kh) // sh + 1
  ow = (x.shape[2] - kw) // sw + 1
  cols = [x[:, u:u + sh * (oh - 1) + 1:sh, v:v + sw * (ow - 1) + 1:sw, :]
          for u in range(kh) for v in range(kw)]
  return jnp.concatenate(cols, axis=-1)


def patch_conv(x: jax.Array, w: jax.Array, strides: Sequence[int],
               padding: Sequence[tuple[int, int]], precision=None,
               preferred_element_type=None) -> jax.Array:
  """NHWC x, HWIO w: the convolution as one matrix product over `patches`."""
  kh, kw, c, o = w.shape
  p = patches(x, (kh, kw), strides, padding)
  return jnp.einsum("bhwk,ko->bhwo", p, w.reshape(kh * kw * c, o), precision=precision,
                    preferred_element_type=preferred_element_type)


def _is_nhwc(dimension_numbers, ndim: int) -> bool:
  if ndim != 4:
    return False
  if dimension_numbers is None:
    return False  # lax's default is NCHW
  dn = lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), dimension_numbers)
  return dn == _NHWC


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None):
  """`lax.conv_general_dilated`, computed as a patch product for tiny NHWC outputs."""
  plain = lambda: lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
      feature_group_count, batch_group_count, precision, preferred_element_type)
  undilated = all(d == 1 for d in (lhs_dilation or (1, 1))) and all(
      d == 1 for d in (rhs_dilation or (1, 1)))
  if not (undilated and feature_group_count == 1 and batch_group_count == 1
          and _is_nhwc(dimension_numbers, lhs.ndim)):
    return plain()
  kernel_hw = rhs.shape[:2]
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], kernel_hw, window_strides, padding)
  out_h = (lhs.shape[1] + sum(padding[0]) - kernel_hw[0]) // window_strides[0] + 1
  out_w = (lhs.shape[2] + sum(padding[1]) - kernel_hw[1]) // window_strides[1] + 1
  if out_h * out_w > PATCH_MAX_POSITIONS:
    return plain()
  return patch_conv(lhs, rhs, window_strides, padding, precision, preferred_element_type)
