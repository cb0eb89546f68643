"""Quantiser state after a step with the batch split over 8 fake devices equals 1 device."""

import subprocess
import sys

from tests.conftest import ROOT

SCRIPT = r"""
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
sys.path.insert(0, os.getcwd())
import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from vqjax.registry import QUANTIZERS

assert jax.device_count() == 8
mesh = Mesh(np.array(jax.devices()).reshape(8, 1), ("data", "model"))
z = jax.random.normal(jax.random.PRNGKey(0), (16, 4, 4, 8))
cases = [
    ("vq", dict(learning="ema", kmeans_init=True, restart_after=1)),
    ("vq", dict(learning="loss", kmeans_init=True, restart_after=1, entropy_weight=0.01)),
    ("multichannel", dict(learning="ema", channels=2, restart_after=1)),
    ("fq", dict(decay=0.9)),
    ("regvq", dict()),
]
for name, kw in cases:
  module = QUANTIZERS.get(name)(codebook_size=32, embed_dim=8, **kw)
  variables = nn.unbox(module.init(jax.random.PRNGKey(1), z))  # plain arrays

  def step(variables, z):
    out, mutated = module.apply(variables, z, train=True, mutable=["vq_stats"],
                                rngs={"quantizer": jax.random.PRNGKey(2)})
    return out.indices, out.losses, mutated

  ref_idx, ref_losses, ref_stats = jax.jit(step)(variables, z)
  rep = NamedSharding(mesh, P())
  z_sharded = jax.device_put(z, NamedSharding(mesh, P("data")))
  shards = z_sharded.addressable_shards
  assert len(shards) == 8 and shards[0].data.shape[0] == 2
  idx, losses, stats = jax.jit(step, in_shardings=(rep, NamedSharding(mesh, P("data"))),
                               out_shardings=(NamedSharding(mesh, P("data")), rep, rep))(
                                   jax.device_put(variables, rep), z_sharded)
  np.testing.assert_array_equal(np.asarray(idx), np.asarray(ref_idx))
  for k in ref_losses:
    np.testing.assert_allclose(losses[k], ref_losses[k], rtol=1e-5)
  for path, leaf in jax.tree_util.tree_leaves_with_path(stats):
    copies = [np.asarray(s.data) for s in leaf.addressable_shards]
    assert len(copies) == 8
    assert all(np.array_equal(copies[0], c) for c in copies), f"{name} {path} differs"
  for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(ref_stats), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
  if name == "vq":
    assert int(stats["vq_stats"]["initialized"]) == 1
  print(name, kw, "ok", sorted(stats.get("vq_stats", {})))
print("ALL OK")
"""


def test_quantiser_state_is_the_same_on_every_device_and_matches_one_device():
  proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "ALL OK" in proc.stdout
