"""Shared config pieces and start-up validation.

Recipe files under `configs/` build on `tokenizer_config()` and change fields;
`validate_tokenizer_config` runs before any compilation so that a wrong
setting gives one clear message.
"""

from __future__ import annotations

import ml_collections


def _fid_settings(e: ml_collections.ConfigDict) -> None:
  """The FID/KID fields both kinds of recipe share (see vqjax/eval/evaluator.py)."""
  e.fid_method = "sqrtm"  # 'sqrtm' (SciPy, float64) | 'eigh' (same value, ~6x faster)
  e.kid_subsets = 100
  e.kid_subset_size = 1000
  e.precision_recall = False  # k-NN (k=3) manifold precision/recall
  e.max_features = 50_000  # raw features kept per set for KID and precision/recall
  e.stats_cache_dir = ""  # '' = $VQJAX_CACHE_DIR or ~/.cache/vqjax/fid_stats


def _validate_fid(e: ml_collections.ConfigDict) -> None:
  if e.fid_method not in ("sqrtm", "eigh"):
    raise ConfigError(f"eval.fid_method must be 'sqrtm' or 'eigh', not {e.fid_method!r}.")


def tokenizer_config() -> ml_collections.ConfigDict:
  """The VQGAN baseline at SPEC section 1 sizes (256px, f16, K=1024, d=256)."""
  c = ml_collections.ConfigDict()
  c.trainer = "tokenizer"
  c.seed = 0

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1: all devices not used by `model`
  c.mesh.model = 1
  # 'replicate': every parameter on every device; 'channels': shard the last
  # (output-channel) axis of kernels over `model` where it divides.
  c.mesh.param_sharding = "replicate"

  c.data = ml_collections.ConfigDict()
  c.data.source = "tfds"  # 'tfds' | 'folder' | 'embedded'
  c.data.name = "imagenet2012"
  c.data.data_dir = ""  # '' = TFDS default ($TFDS_DATA_DIR or ~/tensorflow_datasets)
  c.data.folder = ""
  c.data.val_folder = ""
  c.data.val_fraction = 0.05
  c.data.train_split = "train"
  c.data.val_split = "validation"
  c.data.image_size = 256
  c.data.resize_shorter = 256
  c.data.random_flip = True
  c.data.eval_random_crop = False  # True: crops drawn with a fixed seed (same every pass)
  c.data.crops_per_image = 256  # embedded set only
  c.data.eval_crops_per_image = 16  # embedded set only

  c.model = ml_collections.ConfigDict()
  c.model.ch = 128
  c.model.ch_mult = (1, 1, 2, 2, 4)
  c.model.num_res_blocks = 2
  c.model.attn_resolutions = (16,)
  c.model.z_channels = 256
  c.model.norm_groups = 32
  c.model.quantizer = quantizer_config("vq", codebook_size=1024, embed_dim=256)

  c.disc = ml_collections.ConfigDict()
  c.disc.ndf = 64
  c.disc.num_layers = 3

  c.loss = ml_collections.ConfigDict()
  c.loss.l1_weight = 1.0
  c.loss.perceptual_weight = 1.0
  c.loss.codebook_weight = 1.0
  c.loss.disc_weight = 0.8
  c.loss.disc_start = 250_001
  c.loss.adaptive_weight_max = 1e4

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-4
  c.optim.disc_lr = 1e-4
  c.optim.b1 = 0.5
  c.optim.b2 = 0.9

  c.train = ml_collections.ConfigDict()
  c.train.steps = 500_000
  c.train.batch_size = 256
  c.train.log_every = 100
  c.train.image_every = 5000
  c.train.checkpoint_every = 5000
  c.train.keep_checkpoints = 3
  c.train.max_consecutive_nonfinite = 10

  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 25_000
  c.eval.batch_size = 64
  c.eval.max_examples = 10_000  # 0 = the whole split
  c.eval.at_start = False  # also evaluate the untrained model at step 0
  c.eval.checkpoint_step = -1  # --mode=eval: -1 = latest
  # Inception metrics (rFID/KID against the val split's cached statistics).
  c.eval.fid = True
  _fid_settings(c.eval)

  # --mode=tokenize: indices of a split for the transformer trainers.
  c.tokenize = ml_collections.ConfigDict()
  c.tokenize.split = "train"
  c.tokenize.output_dir = ""  # '' = <workdir>/tokens_<split>
  c.tokenize.batch_size = 64
  c.tokenize.max_examples = 0  # 0 = the whole split
  c.tokenize.shard_size = 10_000
  return c


def quantizer_config(name: str, **overrides) -> ml_collections.ConfigDict:
  """`config.model.quantizer` for quantiser `name`: its fields, module defaults, overrides.

  The fields are exactly the module's (see `vqjax.nn.quantizers.QUANTIZERS`),
  so a recipe cannot set one that the chosen quantiser ignores.
  """
  from vqjax.nn.quantizers import quantizer_fields

  fields = quantizer_fields(name)
  unknown = sorted(set(overrides) - set(fields))
  if unknown:
    raise ConfigError(f"quantizer {name!r} has no field(s) {unknown}; it has {sorted(fields)}")
  c = ml_collections.ConfigDict({"name": name, **fields, **overrides})
  return c


def demo_overrides(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The demo's sizes: a 64px tokenizer on the embedded set, minutes on 2 CPU cores."""
  c.data.source = "embedded"
  c.data.image_size = 64
  c.data.resize_shorter = 160
  c.data.crops_per_image = 256
  c.data.eval_crops_per_image = 16
  c.data.eval_random_crop = True  # fixed-seed crops: 16 distinct views of each val image
  c.model.ch = 32
  c.model.ch_mult = (1, 2, 2)
  c.model.num_res_blocks = 1
  c.model.attn_resolutions = ()
  c.model.z_channels = 64
  c.model.norm_groups = 16
  c.model.quantizer.codebook_size = 256
  c.model.quantizer.embed_dim = 32
  c.disc.ndf = 32
  c.disc.num_layers = 2
  c.loss.disc_start = 200
  c.optim.lr = 4e-4
  c.optim.disc_lr = 4e-4
  c.train.steps = 300
  c.train.batch_size = 4
  c.train.log_every = 25
  c.train.image_every = 100
  c.train.checkpoint_every = 100
  c.eval.every_steps = 150
  c.eval.at_start = True
  c.eval.batch_size = 16
  c.eval.max_examples = 32
  return c


def smoke_overrides(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrink a tokenizer config to a few CPU steps on the embedded data set."""
  c.data.source = "embedded"
  c.data.image_size = 32
  c.data.resize_shorter = 64
  c.data.crops_per_image = 8
  c.data.eval_crops_per_image = 2
  c.data.eval_random_crop = True
  c.model.ch = 16
  c.model.ch_mult = (1, 2)
  c.model.num_res_blocks = 1
  c.model.attn_resolutions = ()
  c.model.z_channels = 16
  c.model.norm_groups = 8
  c.model.quantizer.codebook_size = 32
  c.model.quantizer.embed_dim = 8
  c.disc.ndf = 8
  c.disc.num_layers = 2
  c.loss.disc_start = 2
  c.train.steps = 4
  c.train.batch_size = 8
  c.train.log_every = 2
  c.train.image_every = 4
  c.train.checkpoint_every = 2
  c.eval.every_steps = 4
  c.eval.batch_size = 8
  c.eval.max_examples = 8
  c.eval.fid = False  # Inception at 299px costs more than the smoke run itself
  c.tokenize.batch_size = 8
  c.tokenize.max_examples = 20
  c.tokenize.shard_size = 8
  return c


class ConfigError(ValueError):
  """A config value the code cannot run with; the message says what to change."""


def validate_tokenizer_config(c: ml_collections.ConfigDict, num_devices: int,
                              process_count: int = 1) -> None:
  """Check what would otherwise fail deep inside compilation."""
  m = c.model
  factor = 2 ** (len(m.ch_mult) - 1)
  if c.data.image_size % factor:
    raise ConfigError(
        f"data.image_size={c.data.image_size} is not divisible by the encoder's downsampling "
        f"factor {factor} (model.ch_mult={tuple(m.ch_mult)}): use a multiple of {factor}, "
        f"e.g. {max(factor, c.data.image_size // factor * factor)}.")
  widths = [m.ch * k for k in m.ch_mult] + [m.ch]
  bad = [w for w in widths if w % m.norm_groups]
  if bad:
    raise ConfigError(f"model.norm_groups={m.norm_groups} does not divide channel width {bad[0]}"
                      f" (model.ch={m.ch}, ch_mult={tuple(m.ch_mult)}).")
  validate_quantizer_config(m.quantizer)
  data_size = mesh_data_size(c, num_devices)
  for name, batch in (("train.batch_size", c.train.batch_size),
                      ("eval.batch_size", c.eval.batch_size),
                      ("tokenize.batch_size", c.tokenize.batch_size)):
    if batch % data_size or batch % process_count:
      raise ConfigError(
          f"{name}={batch} cannot be split over the mesh's data axis of size {data_size} "
          f"and {process_count} process(es): use a multiple of {data_size * process_count}.")
  _validate_fid(c.eval)
  if c.mesh.param_sharding not in ("replicate", "channels"):
    raise ConfigError(f"mesh.param_sharding must be 'replicate' or 'channels', "
                      f"not {c.mesh.param_sharding!r}.")


def validate_quantizer_config(q: ml_collections.ConfigDict) -> None:
  """`config.model.quantizer`: a known name, only its fields, values in range."""
  from vqjax.nn.quantizers import QUANTIZERS, check_quantizer_fields

  if q.name not in QUANTIZERS:
    raise ConfigError(f"model.quantizer.name={q.name!r} is not a quantiser; choose one of "
                      f"{sorted(QUANTIZERS)}.")
  try:
    check_quantizer_fields(q)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if q.embed_dim <= 0 or q.codebook_size <= 1:
    raise ConfigError("model.quantizer.embed_dim must be > 0 and codebook_size > 1.")
  checks = [
      ("learning", lambda v: v in ("loss", "ema"), "'loss' or 'ema'"),
      ("channels", lambda v: v >= 1 and q.embed_dim % v == 0,
       f"a divisor of embed_dim={q.embed_dim}"),
      ("restart_after", lambda v: v >= 0, ">= 0 (0 turns restarts off)"),
      ("kmeans_iters", lambda v: v >= 1, ">= 1"),
      ("entropy_weight", lambda v: v >= 0, ">= 0"),
      ("mask_ratio", lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
      ("temperature", lambda v: v > 0, "> 0"),
      ("decay", lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
      ("ema_decay", lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
  ]
  for field, ok, wanted in checks:
    if field in q and not ok(q[field]):
      raise ConfigError(f"model.quantizer.{field}={q[field]!r} must be {wanted}.")


def mesh_data_size(c: ml_collections.ConfigDict, num_devices: int) -> int:
  """Size of the `data` mesh axis; raises if (data, model) does not fit the devices."""
  model = c.mesh.model
  if model < 1 or num_devices % model:
    raise ConfigError(f"mesh.model={model} does not divide the {num_devices} devices.")
  data = c.mesh.data if c.mesh.data > 0 else num_devices // model
  if data * model != num_devices:
    raise ConfigError(f"mesh (data={data}, model={model}) needs {data * model} devices, "
                      f"but {num_devices} are visible: set mesh.data=-1 or fix the sizes.")
  return data


DEFAULT_LOGICAL_RULES = (("embed", None), ("mlp", "model"), ("heads", "model"), ("kv", None),
                         ("vocab", "model"))


def transformer_config(kind: str) -> ml_collections.ConfigDict:
  """A token transformer recipe (SPEC 6): kind 'maskgit' or 'gpt', base sizes."""
  if kind not in ("maskgit", "gpt"):
    raise ConfigError(f"transformer kind must be 'maskgit' or 'gpt', not {kind!r}")
  c = ml_collections.ConfigDict()
  c.trainer = "transformer"
  c.seed = 0
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.model = 1
  c.mesh.rules = DEFAULT_LOGICAL_RULES  # logical axis -> mesh axis (None = replicated)

  c.tokens = ml_collections.ConfigDict()
  c.tokens.dir = ""  # a store written by --mode=tokenize (required)
  c.tokens.val_dir = ""  # optional held-out store (tokenize.split=val): validation loss

  # The tokenizer that decodes samples (--mode=sample): its recipe and run directory.
  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.config = ""  # e.g. "configs/demo.py"
  c.tokenizer.workdir = ""

  c.sample = ml_collections.ConfigDict()
  c.sample.num_images = 16
  c.sample.batch_size = 16
  c.sample.steps = 12  # MaskGIT decoding steps
  c.sample.choice_temperature = 4.5  # MaskGIT
  c.sample.temperature = 1.0
  c.sample.top_k = 0  # GPT; 0 = off
  c.sample.top_p = 1.0  # GPT; 1 = off
  c.sample.guidance_scale = 0.0  # classifier-free guidance; 0 = off

  c.model = ml_collections.ConfigDict()
  c.model.kind = kind
  c.model.width = 768
  c.model.depth = 24
  c.model.heads = 12
  c.model.mlp_dim = 3072
  c.model.dropout = 0.1
  c.model.num_classes = 1000  # 0 = unconditional
  c.model.cond_dropout = 0.1  # fraction of labels replaced by "no class" (for guidance)

  c.loss = ml_collections.ConfigDict()
  c.loss.label_smoothing = 0.1 if kind == "maskgit" else 0.0

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-4 if kind == "maskgit" else 4.5e-4
  c.optim.warmup_steps = 5000
  c.optim.weight_decay = 0.045 if kind == "maskgit" else 0.01
  c.optim.b1 = 0.9
  c.optim.b2 = 0.96 if kind == "maskgit" else 0.95
  c.optim.grad_clip = 1.0

  c.train = ml_collections.ConfigDict()
  c.train.steps = 300_000
  c.train.batch_size = 256
  c.train.log_every = 100
  c.train.checkpoint_every = 5000
  c.train.keep_checkpoints = 3
  c.train.max_consecutive_nonfinite = 10

  # During training, every `every_steps` (and at the last step): loss and accuracy on
  # tokens.val_dir, and a grid of `grid_images` samples decoded by config.tokenizer.
  # --mode=eval: FID/KID of `num_samples` samples against the tokenizer data set's
  # val-split Inception statistics (shared cache with the tokenizer's rFID).
  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 10_000  # 0 = only at the last step
  c.eval.batch_size = 64
  c.eval.max_examples = 10_000  # validation token maps per evaluation; 0 = all
  c.eval.grid_images = 16  # 0 = no sample grids during training
  c.eval.num_samples = 50_000  # --mode=eval
  c.eval.reference_examples = 0  # val images in the reference statistics; 0 = the whole split
  _fid_settings(c.eval)
  return c


def transformer_smoke_overrides(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A few CPU steps of a tiny transformer."""
  c.model.width = 32
  c.model.depth = 2
  c.model.heads = 4
  c.model.mlp_dim = 64
  c.optim.warmup_steps = 2
  c.train.steps = 4
  c.train.batch_size = 4
  c.train.log_every = 2
  c.train.checkpoint_every = 2
  c.tokenizer.config = "configs/demo.py"
  c.tokenizer.workdir = "runs/demo"
  c.sample.num_images = 8
  c.sample.batch_size = 8
  c.eval.every_steps = 2
  c.eval.batch_size = 8
  c.eval.max_examples = 16
  c.eval.grid_images = 4
  c.eval.num_samples = 8
  c.eval.reference_examples = 16
  return c


def validate_transformer_config(c: ml_collections.ConfigDict, num_devices: int,
                                process_count: int = 1) -> None:
  m = c.model
  if m.kind not in ("maskgit", "gpt"):
    raise ConfigError(f"model.kind must be 'maskgit' or 'gpt', not {m.kind!r}.")
  if m.width % m.heads:
    raise ConfigError(f"model.heads={m.heads} does not divide model.width={m.width}.")
  if not c.tokens.dir:
    raise ConfigError("tokens.dir is empty: extract tokens with a tokenizer config and "
                      "--mode=tokenize, then pass --config.tokens.dir=<that folder>.")
  data_size = mesh_data_size(c, num_devices)
  for name, value in (("train.batch_size", c.train.batch_size),
                      ("eval.batch_size", c.eval.batch_size),
                      ("sample.batch_size", c.sample.batch_size)):
    if value % (data_size * process_count):
      raise ConfigError(f"{name}={value} cannot be split over the mesh's data axis of size "
                        f"{data_size} and {process_count} process(es).")
  _validate_fid(c.eval)


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """`path/to/recipe.py[:variant]` -> its locked config, as --config would build it."""
  import importlib.util
  import os

  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path!r} not found (relative paths start at the current "
                      "directory; run from the repository root or give an absolute path)")
  module_spec = importlib.util.spec_from_file_location(
      "vqjax_cfg_" + os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)
