"""Token transformers (SPEC section 6): MaskGIT (bidirectional) and GPT (causal, KV cache).

Every parameter carries logical axis names (`embed`, `mlp`, `heads`, `kv`,
`vocab`; `None` for position tables), so a rule list such as
`(("mlp", "model"), ("heads", "model"), ("vocab", "model"))` shards them over
the mesh's `model` axis (`vqjax.core.partitioning.param_shardings`).

The KV cache is explicit state: `GPT.init_cache` makes it and every call
that takes it returns the updated one, so decoding is a pure function of
(params, cache, tokens, index) that `lax.scan` can carry.

`dtype` is the compute dtype (the trainer's `config.precision`): the dense
layers, attention and the activations between them run in it, while the
parameters stay float32, LayerNorm statistics and the attention softmax are
float32 and the logits come out float32 for the loss. `remat='block'`
(`model.remat`) recomputes every `Block` in the backward pass (`nn.remat`);
the parameter tree is the same either way.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vqjax.nn.layers import remat_block
from vqjax.ops import random as random_ops

_NEG = -1e9


def _p(init, axes):
  return nn.with_logical_partitioning(init, axes)


_dense_init = nn.initializers.xavier_uniform()


class Dropout(nn.Module):
  """`nn.Dropout` (same `dropout` rng stream and `deterministic` flag) drawing its mask
  from half as many random words (`vqjax.ops.random.dropout`; the rate is rounded to a
  multiple of 1/65536 and the kept values scaled by that rounded probability)."""
  rate: float
  deterministic: bool | None = None

  @nn.compact
  def __call__(self, x, deterministic: bool | None = None):
    deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
    if deterministic or self.rate == 0.0:
      return x
    return random_ops.dropout(self.make_rng("dropout"), x, self.rate)
_embed_init = nn.initializers.normal(0.02)


class MLP(nn.Module):
  width: int
  mlp_dim: int
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=_p(_dense_init, ("embed", "mlp")),
                 bias_init=_p(nn.initializers.zeros, ("mlp",)), name="fc1")(x)
    h = Dropout(self.dropout, deterministic=not train)(nn.gelu(h))
    return nn.Dense(self.width, dtype=self.dtype, kernel_init=_p(_dense_init, ("mlp", "embed")),
                    bias_init=_p(nn.initializers.zeros, ("embed",)), name="fc2")(h)


class Attention(nn.Module):
  """Multi-head self-attention; `causal` masks future keys; an optional KV cache.

  With `cache=(k, v)` of shape [B, L, heads, head_dim], the T new tokens sit
  at positions index..index+T-1: their keys/values are written there and
  they attend to positions <= their own (all earlier cache entries).
  """
  heads: int
  head_dim: int
  causal: bool = False
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, cache=None, index=0, train: bool = False):
    width = x.shape[-1]

    def proj(name):
      return nn.DenseGeneral((self.heads, self.head_dim), dtype=self.dtype, name=name,
                             kernel_init=_p(_dense_init, ("embed", "heads", "kv")),
                             bias_init=_p(nn.initializers.zeros, ("heads", "kv")))(x)

    q, k, v = proj("query"), proj("key"), proj("value")
    t = x.shape[1]
    if cache is not None:
      k_cache, v_cache = cache
      k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, index, 0, 0))
      v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, index, 0, 0))
      cache = (k, v)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / np.sqrt(self.head_dim)
    if self.causal or cache is not None:
      q_pos = index + jnp.arange(t)
      allowed = jnp.arange(k.shape[1])[None, :] <= q_pos[:, None]
      logits = jnp.where(allowed[None, None], logits, _NEG)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    weights = Dropout(self.dropout, deterministic=not train)(weights)
    y = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    y = nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype, name="out",
                        kernel_init=_p(_dense_init, ("heads", "kv", "embed")),
                        bias_init=_p(nn.initializers.zeros, ("embed",)))(y)
    return y, cache


def _layer_norm(name, dtype=jnp.float32):
  """LayerNorm with output in `dtype` (its mean and variance are float32 in Flax)."""
  return nn.LayerNorm(name=name, dtype=dtype, scale_init=_p(nn.initializers.ones, ("embed",)),
                      bias_init=_p(nn.initializers.zeros, ("embed",)))


class Block(nn.Module):
  """Pre-norm: x + attn(LN(x)), then x + mlp(LN(x))."""
  heads: int
  mlp_dim: int
  causal: bool = False
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, cache=None, index=0, train: bool = False):
    width = x.shape[-1]
    y, cache = Attention(self.heads, width // self.heads, self.causal, self.dropout, self.dtype,
                         name="attn")(_layer_norm("ln1", self.dtype)(x), cache, index, train)
    x = x + Dropout(self.dropout, deterministic=not train)(y)
    y = MLP(width, self.mlp_dim, self.dropout, self.dtype,
            name="mlp")(_layer_norm("ln2", self.dtype)(x), train)
    return x + Dropout(self.dropout, deterministic=not train)(y), cache


class Trunk(nn.Module):
  depth: int
  heads: int
  mlp_dim: int
  causal: bool = False
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32
  remat: str = "none"  # 'block': every Block under nn.remat

  @nn.compact
  def __call__(self, x, caches=None, index=0, train: bool = False):
    block = remat_block(Block, self.remat, static_argnums=(4,))  # (self, x, cache, index, train)
    new_caches = []
    for i in range(self.depth):
      x, c = block(self.heads, self.mlp_dim, self.causal, self.dropout, self.dtype,
                   name=f"block_{i}")(x, None if caches is None else caches[i], index, train)
      new_caches.append(c)
    return _layer_norm("ln_f", self.dtype)(x), (None if caches is None else new_caches)


class MaskGITTransformer(nn.Module):
  """Bidirectional transformer over [B, N] tokens (or [B, N, c] multichannel, MoVQ 3.2).

  Input vocabulary: codes 0..K-1, the mask token K, and with `num_conditions`
  V > 0 the condition ids K+1+v for v in 0..V (v = V is "no condition", used
  for classifier-free guidance). A prefix of `cond_len` condition ids is
  prepended (MaskGIT's class token, Chang et al. 2022, is cond_len = 1); the
  output head is tied to the code embeddings and returns [B, N, K] logits,
  or [B, N, c, K] for multichannel tokens, whose c index embeddings are
  concatenated and projected into one input vector per position.
  """
  codebook_size: int
  seq_len: int
  channels: int = 1
  num_conditions: int = 0
  cond_len: int = 1
  width: int = 768
  depth: int = 24
  heads: int = 12
  mlp_dim: int = 3072
  dropout: float = 0.1
  dtype: jnp.dtype = jnp.float32
  remat: str = "none"

  @property
  def mask_id(self) -> int:
    return self.codebook_size

  @property
  def prefix_len(self) -> int:
    return self.cond_len if self.num_conditions else 0

  @property
  def vocab_size(self) -> int:
    return self.codebook_size + 1 + (self.num_conditions + 1 if self.num_conditions else 0)

  def prefix_ids(self, cond):
    """[B] labels or [B, cond_len] condition ids (None: "no condition") -> [B, P] input ids."""
    if cond is None:
      return None
    cond = cond[:, None] if cond.ndim == 1 else cond
    if cond.shape[1] != self.cond_len:
      raise ValueError(f"condition prefix of length {cond.shape[1]}, the model takes "
                       f"cond_len={self.cond_len}")
    return self.codebook_size + 1 + cond

  @nn.compact
  def __call__(self, tokens, cond=None, train: bool = False):
    """[B, N(, c)] tokens (masked entries = `mask_id`) and their condition -> logits."""
    k, w, p = self.codebook_size, self.width, self.prefix_len
    table = self.param("token_embedding", _p(_embed_init, ("vocab", "embed")),
                       (self.vocab_size, w))
    if self.channels > 1:
      b, n, c = tokens.shape
      x = jnp.take(table, tokens, axis=0).reshape(b, n, c * w)
      x = nn.Dense(w, dtype=self.dtype, kernel_init=_p(_dense_init, (None, "embed")),
                   bias_init=_p(nn.initializers.zeros, ("embed",)), name="combine")(x)
    else:
      x = jnp.take(table, tokens, axis=0)
    if p:
      if cond is None:
        cond = jnp.full((tokens.shape[0], p), self.num_conditions, jnp.int32)
      x = jnp.concatenate([jnp.take(table, self.prefix_ids(cond), axis=0), x], axis=1)
    pos = self.param("pos_embedding", _p(_embed_init, (None, "embed")), (p + self.seq_len, w))
    x = Dropout(self.dropout, deterministic=not train)(_layer_norm("ln_in", self.dtype)(x + pos))
    x, _ = Trunk(self.depth, self.heads, self.mlp_dim, False, self.dropout, self.dtype,
                 self.remat, name="trunk")(x, train=train)
    x = x[:, p:]
    h = nn.Dense(w * self.channels, dtype=self.dtype, name="head",
                 kernel_init=_p(_dense_init, ("embed", "mlp")),
                 bias_init=_p(nn.initializers.zeros, ("mlp",)))(x)
    h = _layer_norm("head_ln", self.dtype)(nn.gelu(h.reshape(h.shape[:2] + (self.channels, w))))
    bias = self.param("head_bias", _p(nn.initializers.zeros, ("vocab",)), (k,))
    logits = jnp.einsum("bncw,kw->bnck", h, table[:k].astype(h.dtype)).astype(jnp.float32)
    logits = logits + bias
    return logits if self.channels > 1 else logits[:, :, 0]


class GPT(nn.Module):
  """Causal pre-norm transformer over a condition prefix followed by code tokens.

  Input ids: codes 0..K-1, condition ids K + c for c in 0..num_conditions
  (the last one, `num_conditions`, is "no condition" for classifier-free
  guidance). The prefix has `cond_len` ids (1 for a class label, or a
  sequence such as semantic-map ids). Output: logits over the K codes.
  `__call__` is teacher forcing over a whole sequence; `decode` runs ids at
  positions index.. with the KV cache.
  """
  codebook_size: int
  seq_len: int
  num_conditions: int = 1000
  cond_len: int = 1
  width: int = 1024
  depth: int = 24
  heads: int = 16
  mlp_dim: int = 4096
  dropout: float = 0.1
  dtype: jnp.dtype = jnp.float32
  remat: str = "none"

  @property
  def max_len(self) -> int:
    return self.cond_len + self.seq_len

  def setup(self):
    self.embedding = self.param("token_embedding", _p(_embed_init, ("vocab", "embed")),
                                (self.codebook_size + self.num_conditions + 1, self.width))
    self.pos_embedding = self.param("pos_embedding", _p(_embed_init, (None, "embed")),
                                    (self.max_len, self.width))
    self.trunk = Trunk(self.depth, self.heads, self.mlp_dim, True, self.dropout, self.dtype,
                       self.remat)
    self.head = nn.Dense(self.codebook_size, use_bias=False, dtype=self.dtype,
                         kernel_init=_p(_dense_init, ("embed", "vocab")))
    self.drop = Dropout(self.dropout)

  def prefix_ids(self, cond):
    """[B] labels or [B, cond_len] condition ids -> [B, cond_len] input ids."""
    cond = cond[:, None] if cond.ndim == 1 else cond
    return self.codebook_size + cond

  def decode(self, ids, cache=None, index=0, train: bool = False):
    """Logits for ids at positions index..index+T-1 (and the updated cache)."""
    t = ids.shape[1]
    pos = jax.lax.dynamic_slice_in_dim(self.pos_embedding, index, t, axis=0)
    x = self.drop(jnp.take(self.embedding, ids, axis=0) + pos, deterministic=not train)
    x, cache = self.trunk(x.astype(self.dtype), cache, index, train)
    return self.head(x).astype(jnp.float32), cache

  def __call__(self, tokens, cond, train: bool = False):
    """Teacher forcing: [B, N] codes and their condition -> [B, N, K] next-token logits."""
    ids = jnp.concatenate([self.prefix_ids(cond), tokens[:, :-1]], axis=1)
    logits, _ = self.decode(ids, train=train)
    return logits[:, self.cond_len - 1:]

  def init_cache(self, batch: int, dtype=None):
    """Zero keys and values of every block [B, max_len, heads, head_dim], in `dtype`
    (default the compute dtype)."""
    dtype = self.dtype if dtype is None else dtype
    shape = (batch, self.max_len, self.heads, self.width // self.heads)
    return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(self.depth)]

