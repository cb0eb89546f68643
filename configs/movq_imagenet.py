"""MoVQ on ImageNet 256px (Zheng et al. 2022), class-conditional, as one pipeline.

  python -m vqjax.main --config=configs/movq_imagenet.py --workdir=DIR

Stages (each in DIR/<stage>, finished ones skipped on a rerun):
  tokenizer       multichannel quantiser (c = 4 chunks of 64 over one shared codebook of
                  K = 1024, Sec. 3.1), f16 (16x16x4 tokens), the MoVQ decoder (spatially
                  conditional normalisation in the first 3 blocks, Fourier F^0; Eq. 4),
                  VQGAN's losses and settings, batch 48, 40 epochs (Sec. 4.1)
  tokens_train, tokens_val   --mode=tokenize (train and validation splits)
  mask            MaskGIT over the [16, 16, 4] tokens (the "mask" scenario, Sec. 3.2):
                  24 layers, 16 heads, width 1024, MLP 4096, 12 decoding steps, batch 64,
                  200 epochs (Sec. 4.1)
  mask_samples, mask_eval    samples and their FID/KID (IS with VQJAX_INCEPTION_LOGITS)
  reconstruction  --mode=eval of the tokenizer: PSNR, SSIM, LPIPS, rFID (Table 1)

Variants (comma-separated words): `tokenizer`, `mask`, `auto` give one stage's recipe
(`auto`: the "auto" scenario, a GPT over the h*w*c indices in raster order, position-major
and channel-minor: (0,0,c0), (0,0,c1), ..., (0,0,c3), (0,1,c0), ...; 1024 steps for
16x16x4, the same sizes); `smoke` shrinks any of them (alone: the whole pipeline on the
embedded set in minutes, FID of 8 samples included).

The paper's ablations are overrides of the `tokenizer` recipe (README, MoVQ):
quantizer.channels (1 = VQGAN's single-channel tokens), decoder.spatial_norm_blocks
(0 = VQGAN's decoder), decoder.f0 (conv, sinusoid, constant, fourier) and
quantizer.codebook_size (1024, 16384).
"""

from vqjax import config_lib, registry
from vqjax.train.pipeline import pipeline_config, stage

FILE = "configs/movq_imagenet.py"
STAGE_WORDS = ("tokenizer", "mask", "auto")
TRANSFORMER = dict(width=1024, depth=24, heads=16, mlp_dim=4096)


def tokenizer(dataset: dict, smoke: bool):
  """MoVQ's tokenizer: multichannel quantiser and the modulated decoder (Sec. 3.1)."""
  c = config_lib.tokenizer_config()
  for key, value in dataset.items():
    c.data[key] = value
  c.model.quantizer = config_lib.quantizer_config("multichannel", codebook_size=1024,
                                                  embed_dim=256, channels=4)
  arch = {k: c.model.decoder[k] for k in c.model.decoder if k != "name"}
  c.model.decoder = registry.DECODERS.config("movq", **arch, f0="fourier")  # 3 blocks
  c.train.batch_size = 48
  c.train.epochs = 40.0
  if smoke:
    config_lib.smoke_overrides(c)
    c.train.epochs = 0.0
  return c


def transformer(objective: str, smoke: bool, num_classes: int):
  """The "mask" (MaskGIT) or "auto" (GPT) scenario over the [h, w, 4] tokens (Sec. 4.1)."""
  c = config_lib.transformer_config(objective)
  for key, value in TRANSFORMER.items():
    c.model[key] = value
  c.model.num_classes = num_classes
  c.model.cond_dropout = 0.1 if num_classes else 0.0
  c.train.batch_size = 64
  c.train.epochs = 200.0
  c.sample.steps = 12
  if smoke:
    config_lib.transformer_smoke_overrides(c)
    c.train.epochs = 0.0
    c.model.num_classes = 12 if num_classes else 0  # the embedded set's images are its classes
  return c


def stage_config(word: str, dataset: dict, smoke: bool, num_classes: int):
  if word == "tokenizer":
    return tokenizer(dataset, smoke)
  return transformer({"mask": "maskgit", "auto": "gpt"}[word], smoke, num_classes)


def pipeline(file: str, smoke: bool):
  """tokenizer -> tokens -> MaskGIT (train, samples, FID) -> the reconstruction table."""
  spec = lambda word: f"{file}:{word}{',smoke' if smoke else ''}"
  on_tokens = {"tokens.dir": "{tokenizer}/tokens_train",
               "tokens.val_dir": "{tokenizer}/tokens_validation",
               "tokenizer.config": spec("tokenizer"), "tokenizer.workdir": "{tokenizer}"}
  return pipeline_config(
      stage("tokenizer", spec("tokenizer")),
      stage("tokens_train", spec("tokenizer"), mode="tokenize", workdir="{tokenizer}"),
      stage("tokens_val", spec("tokenizer"), mode="tokenize", workdir="{tokenizer}",
            overrides={"tokenize.split": "validation"}),
      stage("mask", spec("mask"), overrides=on_tokens),
      stage("mask_samples", spec("mask"), mode="sample", workdir="{mask}", overrides=on_tokens),
      stage("mask_eval", spec("mask"), mode="eval", workdir="{mask}", overrides=on_tokens),
      stage("reconstruction", spec("tokenizer"), mode="eval", workdir="{tokenizer}",
            overrides={"eval.fid": True}),  # rFID in the smoke variant too
  )


def parse_variant(arg, file: str):
  """'mask,smoke' -> (stage word or None, smoke)."""
  words = [w for w in (arg or "").split(",") if w]
  stages = [w for w in words if w in STAGE_WORDS]
  unknown = [w for w in words if w not in STAGE_WORDS + ("smoke",)]
  if unknown or len(stages) > 1:
    raise ValueError(f"unknown variant {arg!r} for {file}: use comma-separated words, at most "
                     f"one of {STAGE_WORDS}, optionally 'smoke'")
  return (stages[0] if stages else None), "smoke" in words


def on_tokenizer(c, tokenizer_spec: str, run: str) -> None:
  """Point a stand-alone transformer recipe at the tokenizer run `run`/tokenizer (where the
  pipeline run with --workdir=`run` leaves it) and its token stores."""
  c.tokenizer.config = tokenizer_spec
  c.tokenizer.workdir = f"{run}/tokenizer"
  c.tokens.dir = f"{run}/tokenizer/tokens_train"
  c.tokens.val_dir = f"{run}/tokenizer/tokens_validation"


def get_config(arg=None):
  word, smoke = parse_variant(arg, FILE)
  if word is None:
    return pipeline(FILE, smoke)
  imagenet = {"source": "tfds", "name": "imagenet2012", "image_size": 256}
  c = stage_config(word, imagenet, smoke, num_classes=1000)
  if word != "tokenizer":
    on_tokenizer(c, f"{FILE}:tokenizer{',smoke' if smoke else ''}", "runs/movq_imagenet")
  c.lock()
  return c
