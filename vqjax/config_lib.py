"""The building blocks of recipe files: trainer defaults and the variant shrinkers.

Recipe files under `configs/` start from `tokenizer_config()` or
`transformer_config(objective)` and change fields; `smoke_overrides`,
`demo_overrides` and `transformer_smoke_overrides` shrink them. A part's
fields come from its registry, and each check lives beside what it checks:
a part's own `check_config`, the trainers' `validate_*_config`
(vqjax/train/tokenizer.py, vqjax/train/transformer.py), the mesh's in
vqjax/core/partitioning.py, the FID fields' in vqjax/eval/settings.py.
Reading a recipe file is vqjax/core/config_files.py.
"""

from __future__ import annotations

import ml_collections

from vqjax import registry
from vqjax.core.config_files import load_config_file, recipe_module
from vqjax.core.partitioning import DEFAULT_LOGICAL_RULES
from vqjax.data.sources import EMBEDDED_IMAGES
from vqjax.errors import ConfigError
from vqjax.eval.settings import add_fid_settings
from vqjax.losses.terms import terms_config

__all__ = ["ConfigError", "load_config_file", "recipe_module"]  # re-exported for recipes


def tokenizer_config() -> ml_collections.ConfigDict:
  """The VQGAN baseline at SPEC section 1 sizes (256px, f16, K=1024, d=256)."""
  c = ml_collections.ConfigDict()
  c.trainer = "tokenizer"
  c.seed = 0
  # 'float32' | 'bfloat16': the compute dtype of convs, attention and MLPs. Parameters,
  # optimiser states, quantiser distances and codebook updates, softmaxes, norm statistics
  # and every loss stay float32.
  c.precision = "float32"

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1: all devices not used by `model`
  c.mesh.model = 1
  # How parameters (and their optimiser states) are placed, by their logical axis names:
  # 'replicate': on every device; 'channels': the axes `rules` map to `model` (output
  # channels) are split over it; 'fsdp': 'channels' plus each parameter's largest
  # other axis that `data` divides split over `data` (vqjax.core.partitioning).
  c.mesh.param_sharding = "replicate"
  c.mesh.rules = DEFAULT_LOGICAL_RULES  # logical axis -> mesh axis (None = replicated)

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
  # Semantic label maps (vqjax.data.label_maps); batches gain 'label_map' [B, H, W] int32.
  c.data.semantic_classes = 0  # number of semantic ids (maps hold 0..n-1); 0 = no label maps
  # '' | 'paired' (image folder + label_folder, same file stem) | 'tfds' (the feature
  # label_map_key) | 'colour_clusters' (nearest of a fixed palette of semantic_classes colours)
  c.data.label_maps = ""
  c.data.label_folder = ""  # 'paired': the maps of data.folder's images
  c.data.val_label_folder = ""  # 'paired': the maps of data.val_folder's ('' = label_folder)
  c.data.label_map_key = "annotation"  # 'tfds': the feature holding the map
  # -1: a map is single-channel, palette or colour with equal channels; k >= 0: channel k of a
  # colour map holds the ids (0 for TFDS scene_parse150: R = category, G = instance)
  c.data.label_map_channel = -1
  # Grain worker processes that decode and augment training images (0 = in this process),
  # and the batches each worker prepares ahead.
  c.data.workers = 0
  c.data.prefetch = 2

  # The tokenizer: three registered parts (vqjax.registry), each with its own fields.
  c.model = ml_collections.ConfigDict()
  c.model.z_channels = 256  # encoder output / decoder input width around the 1x1 convs
  # 'none' | 'block': recompute every ResBlock and attention block in the backward pass
  # (nn.remat) instead of keeping its activations.
  c.model.remat = "none"
  arch = dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,),
              norm_groups=32)
  c.model.encoder = registry.ENCODERS.config("vqgan", **arch)
  c.model.quantizer = quantizer_config("vq", codebook_size=1024, embed_dim=256)
  c.model.decoder = registry.DECODERS.config("vqgan", **arch)

  c.disc = registry.DISCRIMINATORS.config("patchgan", ndf=64, num_layers=3)

  c.loss = ml_collections.ConfigDict()
  # label -> {"name", "weight", fields}: see vqjax/losses/terms.py.
  c.loss.terms = terms_config(l1={"weight": 1.0}, lpips={"weight": 1.0})
  c.loss.codebook_weight = 1.0
  c.loss.gan = registry.GAN_LOSSES.config("hinge")
  c.loss.disc_weight = 0.8
  c.loss.disc_start = 250_001
  c.loss.adaptive_weight_max = 1e4
  c.loss.r1_weight = 0.0  # gamma / 2 of R1 on real images (0 = off)
  c.loss.lecam_weight = 0.0  # LeCam regulariser weight (0 = off)
  c.loss.lecam_decay = 0.99  # EMA decay of its anchors

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "adam"  # 'adam' | 'adamw'
  c.optim.lr = 1e-4
  c.optim.disc_lr = 1e-4
  c.optim.b1 = 0.5
  c.optim.b2 = 0.9
  c.optim.weight_decay = 0.0  # adamw only
  c.optim.schedule = "constant"  # 'constant' | 'warmup_cosine' (to 0 at train.steps)
  c.optim.warmup_steps = 0
  # Regular expressions (re.fullmatch) over parameter paths such as
  # 'encoder/conv_in/kernel' or 'quantizer/.*': matched parameters get no update,
  # and matched quantiser statistics (an EMA codebook) are not updated either.
  c.optim.frozen = ()

  # Before step 0 of a new run, copy parameters from another run's checkpoint.
  c.init_from = ml_collections.ConfigDict()
  c.init_from.workdir = ""  # '' = off
  c.init_from.step = -1  # -1 = its latest checkpoint
  # re.fullmatch over state paths such as 'params/decoder/.*' or 'vq_stats/.*'; a matched
  # leaf that the source lacks keeps its initial value (a new layer).
  c.init_from.patterns = (".*",)

  c.train = ml_collections.ConfigDict()
  c.train.steps = 500_000
  # > 0: train.steps = ceil(epochs x train-split size / batch_size), set when training starts.
  c.train.epochs = 0.0
  c.train.batch_size = 256
  # Micro-batches per update: each process's batch is split into grad_accum parts whose
  # gradients (and codebook statistics) are summed before one update.
  c.train.grad_accum = 1
  c.train.log_every = 100
  c.train.image_every = 5000
  c.train.checkpoint_every = 5000
  c.train.keep_checkpoints = 3
  c.train.max_consecutive_nonfinite = 10
  # Stop when loss/total stays above divergence_factor x its running median (last 200 finite
  # steps) for divergence_steps steps in a row (0 = off); see vqjax/train/loop.py.
  c.train.divergence_factor = 10.0
  c.train.divergence_steps = 20

  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 25_000
  c.eval.batch_size = 64
  c.eval.max_examples = 10_000  # 0 = the whole split
  c.eval.at_start = False  # also evaluate the untrained model at step 0
  c.eval.checkpoint_step = -1  # --mode=eval: -1 = latest
  # --mode=eval: also write codebook_usage_<step>.png and codebook_pca_<step>.png into the
  # workdir, next to its eval_<step>.json (which records their paths)
  c.eval.codebook_plots = False
  # Inception metrics (rFID/KID against the val split's cached statistics).
  c.eval.fid = True
  add_fid_settings(c.eval)

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

  The fields are exactly the module's, so a recipe cannot set one that the
  chosen quantiser ignores.
  """
  return registry.QUANTIZERS.config(name, **overrides)


def set_autoencoder(model: ml_collections.ConfigDict, **fields) -> None:
  """Set architecture fields (ch, ch_mult, ...) on both the encoder and the decoder."""
  for part in (model.encoder, model.decoder):
    for key, value in fields.items():
      part[key] = value


def demo_overrides(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The demo's sizes: a 64px tokenizer on the embedded set, minutes on 2 CPU cores."""
  c.data.source = "embedded"
  c.data.image_size = 64
  c.data.resize_shorter = 160
  c.data.crops_per_image = 256
  c.data.eval_crops_per_image = 16
  c.data.eval_random_crop = True  # fixed-seed crops: 16 distinct views of each val image
  set_autoencoder(c.model, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(),
                  norm_groups=16)
  c.model.z_channels = 64
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
  set_autoencoder(c.model, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                  norm_groups=8)
  c.model.z_channels = 16
  c.model.quantizer.codebook_size = 32
  c.model.quantizer.embed_dim = 8
  c.disc.ndf = 8
  c.disc.num_layers = 2
  # GAN from the first step: one compiled program per smoke run (the step before
  # disc_start is another; tests that need both set disc_start themselves).
  c.loss.disc_start = 0
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


def transformer_config(objective: str, **objective_fields) -> ml_collections.ConfigDict:
  """A token transformer recipe at base sizes, for a registered objective ('maskgit', 'gpt').

  `config.model.objective` holds the objective's name and fields (vqjax/objectives/);
  the optimiser defaults are those of its paper's recipe.
  """
  objective_config = registry.OBJECTIVES.config(objective, **objective_fields)
  optim = registry.OBJECTIVES.get(objective).optim_defaults
  c = ml_collections.ConfigDict()
  c.trainer = "transformer"
  c.seed = 0
  c.precision = "float32"  # 'float32' | 'bfloat16' (as in tokenizer_config)
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.model = 1
  # 'channels': each logical axis on the mesh axis `rules` maps it to; 'replicate', 'fsdp'
  # as in tokenizer_config (vqjax.core.partitioning.param_shardings).
  c.mesh.param_sharding = "channels"
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
  c.model.objective = objective_config
  c.model.width = 768
  c.model.depth = 24
  c.model.heads = 12
  c.model.mlp_dim = 3072
  c.model.dropout = 0.1
  c.model.remat = "none"  # 'none' | 'block': every transformer block under nn.remat
  # The condition prefix: a class label (length 1) over num_classes ids, 0 = unconditional.
  c.model.num_classes = 1000
  # 'class' | 'semantic_map': the token store's condition maps (semantic ids on a grid,
  # Reg-VQ's semantic image synthesis) are the prefix; num_classes = the number of ids.
  c.model.condition = "class"
  c.model.cond_dropout = 0.1  # fraction of examples whose prefix is "no condition" (guidance)

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = optim["lr"]
  c.optim.warmup_steps = 5000
  c.optim.weight_decay = optim["weight_decay"]
  c.optim.b1 = 0.9
  c.optim.b2 = optim["b2"]
  c.optim.grad_clip = 1.0

  c.train = ml_collections.ConfigDict()
  c.train.steps = 300_000
  # > 0: train.steps = ceil(epochs x token-store rows / batch_size), set when training starts.
  c.train.epochs = 0.0
  c.train.batch_size = 256
  c.train.grad_accum = 1  # micro-batches per update (as in tokenizer_config)
  c.train.log_every = 100
  c.train.checkpoint_every = 5000
  c.train.keep_checkpoints = 3
  c.train.max_consecutive_nonfinite = 10
  # Stop when loss/total stays above divergence_factor x its running median (last 200 finite
  # steps) for divergence_steps steps in a row (0 = off); see vqjax/train/loop.py.
  c.train.divergence_factor = 10.0
  c.train.divergence_steps = 20

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
  add_fid_settings(c.eval)
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
  c.tokenizer.workdir = "runs/demo/tokenizer"
  c.sample.num_images = 8
  c.sample.batch_size = 8
  c.eval.every_steps = 2
  c.eval.batch_size = 8
  c.eval.max_examples = 16
  c.eval.grid_images = 4
  c.eval.num_samples = 8
  c.eval.reference_examples = 16
  return c


def gan_config(generator: str = "biggan32", discriminator: str = "biggan32",
               num_classes: int = 10) -> ml_collections.ConfigDict:
  """A class-conditional GAN recipe (no encoder; `trainer='gan'`, vqjax/train/gan.py) with
  BigGAN-PyTorch's CIFAR settings: hinge loss, Adam (0, 0.999) at 2e-4 for G and D, 4 D
  steps per G step, batch 64, an EMA copy of G (decay 0.9999 from step 1000)."""
  base = tokenizer_config()
  c = ml_collections.ConfigDict()
  c.trainer = "gan"
  c.seed = 0
  c.precision = "float32"  # 'float32' | 'bfloat16' (as in tokenizer_config)
  c.mesh = base.mesh
  c.data = base.data
  c.data.source = "tfds"
  c.data.name = "cifar10"
  c.data.val_split = "test"
  c.data.image_size = 32
  c.data.resize_shorter = 32
  c.data.random_flip = False  # BigGAN-PyTorch trains CIFAR without augmentation

  c.model = ml_collections.ConfigDict()
  c.model.num_classes = num_classes  # 0 = unconditional; G and D get the same number
  c.model.remat = "none"  # 'none' | 'block': every G and D residual block under nn.remat
  c.model.generator = registry.GENERATORS.config(generator, num_classes=num_classes)
  c.disc = registry.DISCRIMINATORS.config(discriminator, num_classes=num_classes)

  c.loss = ml_collections.ConfigDict()
  c.loss.gan = registry.GAN_LOSSES.config("hinge")

  c.optim = ml_collections.ConfigDict()
  c.optim.g_lr = 2e-4
  c.optim.d_lr = 2e-4
  c.optim.b1 = 0.0
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8

  c.ema = ml_collections.ConfigDict()
  c.ema.decay = 0.9999
  c.ema.start = 1000  # G steps before which the EMA copy equals G

  c.train = ml_collections.ConfigDict()
  c.train.steps = 100_000  # generator steps
  # > 0: train.steps = ceil(epochs x train-split size / (batch_size x n_critic)), as
  # BigGAN-PyTorch counts an epoch (each G step reads n_critic real batches).
  c.train.epochs = 0.0
  c.train.batch_size = 64
  c.train.n_critic = 4  # discriminator steps (each on its own real batch) per G step
  c.train.grad_accum = 1  # micro-batches per G and per D update (as in tokenizer_config)
  c.train.log_every = 100
  c.train.image_every = 2000
  c.train.checkpoint_every = 2000
  c.train.keep_checkpoints = 3
  c.train.max_consecutive_nonfinite = 10
  c.train.divergence_factor = 0.0  # off: hinge losses cross zero
  c.train.divergence_steps = 20

  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 5000  # 0 = only at the last step
  c.eval.at_start = False
  c.eval.checkpoint_step = -1  # --mode=eval: -1 = latest
  c.eval.batch_size = 500  # generator batch for the samples
  c.eval.num_samples = 50_000  # EMA-G samples scored (FID, IS)
  c.eval.reference_split = "train"  # the paper scores against the training split
  c.eval.reference_examples = 0  # 0 = the whole split
  c.eval.max_examples = 0  # the reference pass's examples (set from reference_examples)
  c.eval.fid = True
  add_fid_settings(c.eval)

  c.sample = ml_collections.ConfigDict()
  c.sample.num_images = 10_000  # --mode=sample, saved in samples_<step>.npz
  c.sample.batch_size = 500
  c.sample.grid_classes = 10  # rows of the class-by-sample grid
  c.sample.grid_per_class = 10  # columns
  # 'batch': BatchNorm in G uses each generated batch's statistics, as BigGAN-PyTorch samples
  # by default (G_eval_mode off); 'running': G's running averages.
  c.sample.bn_stats = "batch"
  return c


def gan_smoke_overrides(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A few CPU steps on the embedded set at 32px, the classes being the source images."""
  c.data.source = "embedded"
  c.data.val_split = "validation"
  c.data.resize_shorter = 64
  c.data.crops_per_image = 16
  c.data.eval_crops_per_image = 8
  c.data.eval_random_crop = True
  c.data.random_flip = True
  classes = len(EMBEDDED_IMAGES)  # its labels: one class per scikit-image sample image
  c.model.num_classes = classes
  c.model.generator.num_classes = c.disc.num_classes = classes
  c.model.generator.ch = c.disc.ch = 8
  c.ema.start = 2
  c.train.steps = 4
  c.train.batch_size = 8
  c.train.n_critic = 2
  c.train.log_every = 2
  c.train.image_every = 4
  c.train.checkpoint_every = 2
  c.eval.every_steps = 4
  c.eval.batch_size = 40
  c.eval.num_samples = 200
  c.eval.reference_examples = 0
  c.sample.num_images = 24
  c.sample.batch_size = 24
  c.sample.grid_classes = 4
  c.sample.grid_per_class = 6
  return c

