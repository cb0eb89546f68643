"""SeQ-GAN on ImageNet 256px (Gu et al. 2023), the whole paper as one pipeline.

  python -m vqjax.main --config=configs/seqgan_imagenet.py --workdir=DIR

Stages (each in DIR/<stage>, finished ones skipped on a rerun):
  phase1       tokenizer phase 1 (Sec. 3.4): VQGAN f16, K=1024, d=256, codebook entropy
               regulariser gamma=0.01, semantic-enhanced perceptual loss alpha=1 (Eq. 3:
               relu5_3 and `logit`), Adam lr 1e-4, 500k steps
  phase2       tokenizer phase 2: encoder, quant conv and codebook frozen, the enhanced
               decoder (regional + dilated attention at every level, Sec. 3.3.1) copied from
               phase 1 where paths match, alpha=0 (L_low), lr 5e-5, 200k steps, D continued
  tokens_train, tokens_val   --mode=tokenize of phase 2 (train and validation splits)
  nar          MaskGIT (12 decoding steps), class-conditional, base size, 300 epochs
  nar_samples, nar_eval      samples and their FID/KID (IS with the Inception logits file)
  ar           GPT (256 steps), class-conditional, base size, 300 epochs
  ar_samples, ar_eval
  visualize    the teacher-forced visualisation (Sec. 3.2): grid and top-1 accuracy

Variants (comma-separated words): `phase1`, `phase2`, `nar`, `ar` give one stage's
recipe (`nar_L`, `ar_L`: the large transformers, 24 x 1024, 16 heads); `smoke` shrinks
anything to minutes on the embedded set (`smoke` alone: the whole pipeline);
`table6_<row>` sets phase 1's perceptual layers to a row of the paper's Table 6
(low, A, B, C, D, sem, E; see vqjax/losses/semantic_perceptual.py), e.g.
`configs/seqgan_imagenet.py:phase1,table6_D`. The same as command-line overrides:
`--config.loss.terms.perceptual.sem_layers="('relu4_3','relu5_3','logit')"`.

`logit` needs torchvision's `vgg16-397923af.pth` (no package ships it): give its path
in VQJAX_VGG16_CLASSIFIER (read by the loss term when its classifier_path is ''); without it
phase 1 stops before training and says so. The smoke variants use relu5_3 alone.

Settings the paper leaves to its supplement are VQGAN's (batch 256, Adam b1=0.5,
b2=0.9, hinge GAN from step 250,001, L1 weight 1). The perceptual term's weight (0.01)
is ours: on blurred 128px crops of the embedded set, L_low is 38.8 where LPIPS is 0.37,
so 0.01 puts L_low (alpha = 0) at VQGAN's LPIPS scale; alpha = 1 is then smaller, as
Eq. 3 with fixed L_low and L_sem makes it (relu5_3 alone: 1.7 there).
"""

from vqjax import config_lib, registry
from vqjax.losses.terms import terms_config
from vqjax.train.pipeline import pipeline_config, stage

FILE = "configs/seqgan_imagenet.py"
LOW = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")
# Table 6 rows: (alpha, sem_layers); alpha 0 uses L_low (LOW).
TABLE6 = {
    "low": (0.0, ("relu5_3", "logit")),
    "A": (1.0, LOW + ("logit",)),
    "B": (1.0, LOW[1:] + ("logit",)),
    "C": (1.0, LOW[2:] + ("logit",)),
    "D": (1.0, LOW[3:] + ("logit",)),
    "sem": (1.0, ("relu5_3", "logit")),
    "E": (1.0, ("logit",)),
}
SIZES = {"base": dict(width=768, depth=24, heads=12, mlp_dim=3072),
         "L": dict(width=1024, depth=24, heads=16, mlp_dim=4096)}
STAGE_WORDS = ("phase1", "phase2", "nar", "ar", "nar_L", "ar_L")


def perceptual(alpha: float, sem_layers=("relu5_3", "logit")):
  """The `perceptual` entry of loss.terms: Eq. 3 with the given semantic ratio."""
  return dict(name="semantic_perceptual", weight=0.01, alpha=alpha, low_layers=LOW,
              sem_layers=sem_layers)


def set_data(c, dataset: dict) -> None:
  """Point a tokenizer config at a data set: {'source': 'tfds', 'name': ...} or a folder."""
  for key, value in dataset.items():
    c.data[key] = value


def phase1(dataset: dict, smoke: bool):
  """Tokenizer phase 1: semantic compression (alpha = 1), plain VQGAN decoder."""
  c = config_lib.tokenizer_config()
  set_data(c, dataset)
  c.model.quantizer = config_lib.quantizer_config("vq", codebook_size=1024, embed_dim=256,
                                                  entropy_weight=0.01)
  c.loss.terms = terms_config(l1={"weight": 1.0}, perceptual=perceptual(1.0))
  c.optim.lr = 1e-4
  c.optim.disc_lr = 1e-4
  c.train.steps = 500_000
  if smoke:
    config_lib.smoke_overrides(c)
    c.loss.terms.perceptual.sem_layers = ("relu5_3",)  # no classifier file needed
  return c


def phase2(dataset: dict, smoke: bool, phase1_dir: str):
  """Tokenizer phase 2: frozen encoder and codebook, enhanced decoder, alpha = 0."""
  c = phase1(dataset, smoke)
  arch = {k: c.model.decoder[k] for k in c.model.decoder if k != "name"}
  c.model.decoder = registry.DECODERS.config("seqgan", **arch, enhance="attention",
                                             window_size=8, grid_size=8)
  c.model.quantizer.entropy_weight = 0.0  # nothing it could move is trainable
  c.loss.terms.perceptual.alpha = 0.0
  c.optim.frozen = ("encoder/.*", "quant_conv/.*", "quantizer/.*")
  c.init_from.workdir = phase1_dir  # every matching path; the new attention blocks start fresh
  c.loss.disc_start = 0  # the discriminator continues from phase 1
  c.optim.lr = 5e-5
  c.optim.disc_lr = 5e-5
  c.train.steps = 200_000
  if smoke:
    c.train.steps = 4
  return c


def transformer(objective: str, size: str, smoke: bool, num_classes: int = 1000):
  """MaskGIT ('maskgit', 12 steps) or GPT ('gpt', 256 steps) over phase 2's tokens."""
  c = config_lib.transformer_config(objective)
  for key, value in SIZES[size].items():
    c.model[key] = value
  c.model.num_classes = num_classes
  c.model.cond_dropout = 0.1 if num_classes else 0.0
  c.optim.lr = 1e-4
  c.train.epochs = 300.0
  c.train.batch_size = 256
  c.sample.steps = 12
  if smoke:
    config_lib.transformer_smoke_overrides(c)
    c.train.epochs = 0.0
    c.model.num_classes = 12 if num_classes else 0  # the embedded set's images are its classes
  return c


def stage_config(word: str, dataset: dict, smoke: bool, phase1_dir: str, num_classes: int):
  if word == "phase1":
    return phase1(dataset, smoke)
  if word == "phase2":
    return phase2(dataset, smoke, phase1_dir)
  objective, _, size = word.partition("_")
  return transformer({"nar": "maskgit", "ar": "gpt"}[objective], size or "base", smoke,
                     num_classes)


def pipeline(file: str, smoke: bool, prefix: str = ""):
  """phase 1 -> phase 2 -> tokens -> NAR and AR (train, samples, FID) -> visualisation.

  Each stage runs the recipe `file` with the variant `<prefix><stage word>[,smoke]`
  (`prefix` e.g. 'church,' for a recipe whose variants start with a data set).
  """
  suffix = ",smoke" if smoke else ""
  spec = lambda word: f"{file}:{prefix}{word}{suffix}"
  tokenizer = spec("phase2")
  on_tokens = {"tokens.dir": "{phase2}/tokens_train",
               "tokens.val_dir": "{phase2}/tokens_validation",
               "tokenizer.config": tokenizer, "tokenizer.workdir": "{phase2}"}
  stages = [
      stage("phase1", spec("phase1")),
      stage("phase2", tokenizer, overrides={"init_from.workdir": "{phase1}"}),
      stage("tokens_train", tokenizer, mode="tokenize", workdir="{phase2}"),
      stage("tokens_val", tokenizer, mode="tokenize", workdir="{phase2}",
            overrides={"tokenize.split": "validation"}),
  ]
  for name in ("nar", "ar"):
    stages += [stage(name, spec(name), overrides=on_tokens),
               stage(f"{name}_samples", spec(name), mode="sample", workdir=f"{{{name}}}",
                     overrides=on_tokens),
               stage(f"{name}_eval", spec(name), mode="eval", workdir=f"{{{name}}}",
                     overrides=on_tokens)]
  stages.append(stage("visualize", spec("ar"), mode="visualize", workdir="{ar}",
                      overrides=on_tokens))
  return pipeline_config(*stages)


def parse_variant(arg, file: str, extra=()):
  """'phase1,smoke,table6_D' -> (stage word or None, smoke, Table 6 row or None)."""
  words = [w for w in (arg or "").split(",") if w]
  known = STAGE_WORDS + ("smoke",) + tuple(f"table6_{r}" for r in TABLE6) + tuple(extra)
  unknown = [w for w in words if w not in known]
  stages = [w for w in words if w in STAGE_WORDS]
  rows = [w[len("table6_"):] for w in words if w.startswith("table6_")]
  if unknown or len(stages) > 1 or len(rows) > 1 or (rows and stages != ["phase1"]):
    raise ValueError(f"unknown variant {arg!r} for {file}: use comma-separated words, at most "
                     f"one of {STAGE_WORDS}, optionally 'smoke', and with phase1 one of "
                     f"{[f'table6_{r}' for r in TABLE6]}")
  return (stages[0] if stages else None), "smoke" in words, (rows[0] if rows else None)


def on_phase2(c, tokenizer_spec: str, run: str) -> None:
  """Point a stand-alone transformer recipe at the phase-2 run in `run`/phase2 (where the
  pipeline run with --workdir=`run` leaves it) and its token stores."""
  c.tokenizer.config = tokenizer_spec
  c.tokenizer.workdir = f"{run}/phase2"
  c.tokens.dir = f"{run}/phase2/tokens_train"
  c.tokens.val_dir = f"{run}/phase2/tokens_validation"


def apply_table6(c, row: str) -> None:
  alpha, sem_layers = TABLE6[row]
  c.loss.terms.perceptual.alpha = alpha
  c.loss.terms.perceptual.sem_layers = sem_layers


def get_config(arg=None):
  word, smoke, row = parse_variant(arg, FILE)
  if word is None:
    return pipeline(FILE, smoke)
  imagenet = {"source": "tfds", "name": "imagenet2012", "image_size": 256}
  c = stage_config(word, imagenet, smoke, "runs/seqgan_imagenet/phase1", 1000)
  if row:
    apply_table6(c, row)
  if word not in ("phase1", "phase2"):
    on_phase2(c, f"{FILE}:phase2{',smoke' if smoke else ''}", "runs/seqgan_imagenet")
  c.lock()
  return c
