"""Reg-VQ on ADE20K (Zhang et al. 2023): semantic image synthesis with a conditional GPT.

  VQJAX_ADE20K_DIR=/data/ADEChallengeData2016 python -m vqjax.main \
      --config=configs/regvq_ade20k.py --workdir=DIR

ADE20K is the scene-parsing benchmark's ADEChallengeData2016 folder, read as paired
folders: images/training/<stem>.jpg with annotations/training/<stem>.png (20,210) and
images/validation with annotations/validation (2,000, held out); an annotation is a
single-channel PNG of 151 ids (0 = other, 1..150 the classes). An image without its map
is skipped and counted.

The variant word `tfds` reads TFDS `scene_parse150` instead. That builder does NOT hold
the 150-class semantic maps: its 'annotation' is the instance-segmentation task's PNG
(annotations_instance), whose red channel is the category among the 100 "thing"
classes (0 for stuff such as wall or sky) and whose green channel is the instance.
With `tfds` the condition ids are that red channel (101 ids; data.label_map_channel=0),
so its results are not comparable with the paper's.

Stages (each in DIR/<stage>, finished ones skipped on a rerun):
  tokenizer       VQGAN's encoder and decoder (f16: 16x16 tokens at 256px), the Reg-VQ
                  quantiser (logits head, K = 1024, d = 256; prior KL to uniform, Eq. 1;
                  stochastic mask 0.4 with Gumbel sampling, backward Gumbel-softmax at
                  tau = 0.9, Algorithm 1), L1 + LPIPS + the probabilistic contrastive loss
                  (Eq. 3, VGG19 features at the end of each block, 256 locations per layer
                  in the stochastic region, tau = 0.07), VQGAN's PatchGAN, AdamW (0.9, 0.95)
                  lr 1.5e-4, batch 40, 100 epochs (supplement)
  tokens_train, tokens_val   --mode=tokenize: image tokens and, beside them, each label
                  map's ids downsampled to the 16x16 token grid (the condition tokens)
  ar              GPT with the 256 condition ids prefixed to the 256 image tokens
                  (512 positions), 24 layers, 16 heads, width 1024, AdamW (0.9, 0.95)
                  lr 1.5e-4, batch 40, 50 epochs (supplement); no condition dropout
  ar_samples      --mode=sample: one sample per validation map, [map | real | sample] grid
  ar_eval         --mode=eval: FID[G] of samples for the validation maps against the
                  validation images (Table 1)
  reconstruction  --mode=eval of the tokenizer: FID[R], PSNR[R] (Table 1), codebook usage and
                  perplexity, and the usage histogram and PCA of the codebook (Fig. 1, 7)

Variants (comma-separated words): `tokenizer` and `ar` give one stage's recipe, `tfds`
the data source above; one of
Table 2's rows changes the tokenizer (alone: the whole pipeline with that tokenizer):
  baseline   VQGAN's quantiser (nearest code, codebook and commitment losses), L1 + LPIPS
  prior      + PriorReg: the Reg-VQ quantiser with mask_ratio 0 (every token argmax P)
  mask       + MaskReg: mask_ratio 0.4
  cl         + CL: the vanilla contrastive loss (Eq. 2)
  pcl        + PCL: the probabilistic contrastive loss (Eq. 3); the default, Reg-VQ itself
`smoke` shrinks any of them (alone: the whole pipeline on the embedded set in minutes, FID
of a few samples included). The smoke data is the embedded set at 32px, whose label maps are
DERIVED FROM THE IMAGES by a fixed colour clustering (each pixel gets the id of its nearest
colour in a fixed palette of 8; `data.label_maps='colour_clusters'`): they exercise every
path of the pipeline, they are not semantic annotations.

The paper gives no weight for the contrastive loss: it is 0.2 here, i.e. weight 1 on its
mean over the five layers (the terms sum over layers), as PatchNCE weights its loss. The
prior KL has weight 1 (the paper gives none either). AdamW's weight decay, not given, is
0.01 (PyTorch's default).
"""

import os

from vqjax import config_lib
from vqjax.losses.terms import terms_config
from vqjax.train.pipeline import pipeline_config, stage

FILE = "configs/regvq_ade20k.py"
STAGE_WORDS = ("tokenizer", "ar")
ROWS = ("baseline", "prior", "mask", "cl", "pcl")  # Table 2
TRANSFORMER = dict(width=1024, depth=24, heads=16, mlp_dim=4096)
CONTRASTIVE_WEIGHT = 0.2
SMOKE_DATA = {"source": "embedded", "label_maps": "colour_clusters", "semantic_classes": 8}
ADE20K_TFDS = {"source": "tfds", "name": "scene_parse150", "train_split": "train",
               "val_split": "test", "label_maps": "tfds", "label_map_key": "annotation",
               "label_map_channel": 0, "semantic_classes": 101, "image_size": 256,
               "resize_shorter": 256}


def ade20k() -> dict:
  """ADEChallengeData2016 under $VQJAX_ADE20K_DIR (default data/ADEChallengeData2016)."""
  root = os.environ.get("VQJAX_ADE20K_DIR", "data/ADEChallengeData2016")
  return {"source": "folder", "folder": f"{root}/images/training",
          "val_folder": f"{root}/images/validation", "label_maps": "paired",
          "label_folder": f"{root}/annotations/training",
          "val_label_folder": f"{root}/annotations/validation", "semantic_classes": 151,
          "image_size": 256, "resize_shorter": 256}


def set_data(c, dataset: dict) -> None:
  for key, value in dataset.items():
    c.data[key] = value


def apply_row(c, row: str) -> None:
  """Table 2's row `row` on a Reg-VQ tokenizer config (see the module docstring)."""
  if row == "baseline":
    c.model.quantizer = config_lib.quantizer_config(
        "vq", codebook_size=c.model.quantizer.codebook_size,
        embed_dim=c.model.quantizer.embed_dim)
  if row == "prior":
    c.model.quantizer.mask_ratio = 0.0
  c.loss.terms.cl.weight = CONTRASTIVE_WEIGHT if row == "cl" else 0.0
  c.loss.terms.pcl.weight = CONTRASTIVE_WEIGHT if row == "pcl" else 0.0


def tokenizer(dataset: dict, smoke: bool, epochs: float, row: str = "pcl"):
  """The Reg-VQ tokenizer (Sec. 3, supplement) with Table 2's row `row`."""
  c = config_lib.tokenizer_config()
  if not smoke:  # the smoke variant reads the embedded set (SMOKE_DATA)
    set_data(c, dataset)
  c.model.quantizer = config_lib.quantizer_config(
      "regvq", codebook_size=1024, embed_dim=256, mask_ratio=0.4, temperature=0.9,
      prior_weight=1.0)
  # Both contrastive terms are listed so that each row is a weight override; a term of
  # weight 0 is not computed.
  c.loss.terms = terms_config(l1={"weight": 1.0}, lpips={"weight": 1.0},
                              cl={"weight": 0.0}, pcl={"weight": CONTRASTIVE_WEIGHT})
  c.optim.name = "adamw"
  c.optim.b1, c.optim.b2 = 0.9, 0.95
  c.optim.lr = c.optim.disc_lr = 1.5e-4
  c.optim.weight_decay = 0.01
  c.train.batch_size = 40
  c.train.epochs = epochs
  if smoke:
    config_lib.smoke_overrides(c)
    set_data(c, SMOKE_DATA)
    c.train.epochs = 0.0
    c.eval.codebook_plots = True
  apply_row(c, row)
  return c


def transformer(num_classes: int, smoke: bool, epochs: float):
  """The conditional GPT of semantic image synthesis (supplement): semantic ids as prefix."""
  c = config_lib.transformer_config("gpt")
  for key, value in TRANSFORMER.items():
    c.model[key] = value
  c.model.condition = "semantic_map"
  c.model.num_classes = num_classes
  c.model.cond_dropout = 0.0
  c.model.dropout = 0.0
  c.optim.lr = 1.5e-4
  c.optim.b1, c.optim.b2 = 0.9, 0.95
  c.optim.weight_decay = 0.01
  c.train.batch_size = 40
  c.train.epochs = epochs
  c.sample.guidance_scale = 0.0
  c.sample.top_k = 100  # Taming's sampling default for its conditional transformers
  c.sample.batch_size = 8
  c.eval.batch_size = 40
  c.eval.num_samples = 2000  # the ADE20K test split: one sample per map
  if smoke:
    config_lib.transformer_smoke_overrides(c)
    c.train.epochs = 0.0
    c.sample.top_k = 0
  return c


def pipeline(file: str, smoke: bool, row: str = "", val_split: str = "validation",
             words: tuple = ()):
  """tokenizer -> tokens with condition maps -> conditional GPT -> samples, FID[G] ->
  the reconstruction table (FID[R], PSNR[R]) with the codebook plots."""
  suffix = "".join(f",{w}" for w in (row, *words) if w) + (",smoke" if smoke else "")
  tok = f"{file}:tokenizer{suffix}"
  on_tokens = {"tokens.dir": "{tokenizer}/tokens_train",
               "tokens.val_dir": "{tokenizer}/tokens_" + val_split,
               "tokenizer.config": tok, "tokenizer.workdir": "{tokenizer}"}
  ar = f"{file}:ar{suffix}"
  return pipeline_config(
      stage("tokenizer", tok),
      stage("tokens_train", tok, mode="tokenize", workdir="{tokenizer}"),
      stage("tokens_val", tok, mode="tokenize", workdir="{tokenizer}",
            overrides={"tokenize.split": val_split}),
      stage("ar", ar, overrides=on_tokens),
      stage("ar_samples", ar, mode="sample", workdir="{ar}", overrides=on_tokens),
      stage("ar_eval", ar, mode="eval", workdir="{ar}", overrides=on_tokens),
      stage("reconstruction", tok, mode="eval", workdir="{tokenizer}",
            overrides={"eval.fid": True, "eval.codebook_plots": True}),
  )


def parse_variant(arg, file: str, extra: tuple = ()):
  """'tokenizer,mask,smoke' -> (stage word or None, Table 2 row or '', smoke, the words of
  `extra` given)."""
  words = [w for w in (arg or "").split(",") if w]
  stages = [w for w in words if w in STAGE_WORDS]
  rows = [w for w in words if w in ROWS]
  unknown = [w for w in words if w not in STAGE_WORDS + ROWS + ("smoke",) + extra]
  if unknown or len(stages) > 1 or len(rows) > 1:
    raise ValueError(f"unknown variant {arg!r} for {file}: use comma-separated words, at most "
                     f"one of {STAGE_WORDS}, at most one Table 2 row of {ROWS}, optionally "
                     f"{('smoke',) + extra}")
  return ((stages[0] if stages else None), (rows[0] if rows else ""), "smoke" in words,
          tuple(w for w in words if w in extra))


def on_tokenizer(c, tokenizer_spec: str, run: str, val_split: str) -> None:
  """Point a stand-alone GPT recipe at the tokenizer of the pipeline run in `run`."""
  c.tokenizer.config = tokenizer_spec
  c.tokenizer.workdir = f"{run}/tokenizer"
  c.tokens.dir = f"{run}/tokenizer/tokens_train"
  c.tokens.val_dir = f"{run}/tokenizer/tokens_{val_split}"


def recipe(arg, file: str, datasets: dict, tokenizer_epochs: float, ar_epochs: float,
           run: str):
  """get_config of a Reg-VQ data set recipe (this one, configs/regvq_celebahq.py);
  `datasets` maps '' (the default) and any data-source variant word to a data dict."""
  extra = tuple(w for w in datasets if w)
  word, row, smoke, words = parse_variant(arg, file, extra)
  dataset = datasets[words[0] if words else ""]
  val_split = "validation" if smoke else dataset.get("val_split", "validation")
  if word is None:
    return pipeline(file, smoke, row, val_split, words)
  if word == "tokenizer":
    c = tokenizer(dataset, smoke, tokenizer_epochs, row or "pcl")
  else:
    classes = SMOKE_DATA["semantic_classes"] if smoke else dataset["semantic_classes"]
    c = transformer(classes, smoke, ar_epochs)
    suffix = "".join(f",{w}" for w in (row, *words) if w) + (",smoke" if smoke else "")
    on_tokenizer(c, f"{file}:tokenizer{suffix}", run, val_split)
  c.lock()
  return c


def get_config(arg=None):
  return recipe(arg, FILE, {"": ade20k(), "tfds": ADE20K_TFDS}, tokenizer_epochs=100.0,
                ar_epochs=50.0, run="runs/regvq_ade20k")
