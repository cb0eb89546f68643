"""BigGAN on CIFAR-10 at 32x32: the baseline of FQ-GAN's Table 1 (Zhao et al. 2020).

  python -m vqjax.main --config=configs/biggan_cifar10.py --workdir=DIR

BigGAN-PyTorch's 32px architecture and CIFAR settings (the code base FQ-GAN builds on):
class-conditional G (ch 64, dim_z 128, conditional BatchNorm from class embeddings), projection
D (ch 64), spectral normalisation in G and D (one power iteration per training pass),
orthogonal init, hinge loss, Adam (0, 0.999) at 2e-4 for both, 4 D steps per G step (each on
its own real batch), batch 64, an EMA copy of G (decay 0.9999 from G step 1000), 500 epochs
of TFDS `cifar10` (train.steps = 500 x 50,000 / (64 x 4)). Samples and FID use the EMA G;
its BatchNorm uses each generated batch's own statistics, as BigGAN-PyTorch samples by
default (G_eval_mode off; `sample.bn_stats='running'` uses the running averages instead).
FID is against the training split (as the paper reports), 50,000 samples; the Inception
Score needs pytorch-fid's logits file (eval.inception_logits_path).

`smoke`: the embedded set at 32px (classes = source images, 12), tiny widths, a few steps,
then FID of 200 samples. Variant words of configs/fqgan_cifar10.py add FQ to D.
"""

from vqjax import config_lib


def recipe(arg, file: str, name: str, classes: int, fq_layers: tuple = (),
           fq_log2_size: int = 10):
  """get_config of a (FQ-)BigGAN CIFAR recipe."""
  if arg not in (None, "", "smoke"):
    raise ValueError(f"unknown variant {arg!r} for {file}; use '' or 'smoke'")
  c = config_lib.gan_config("biggan32", "biggan32", num_classes=classes)
  c.data.name = name
  c.train.epochs = 500.0
  if fq_layers:
    c.disc.fq_layers = tuple(fq_layers)
    c.disc.fq_log2_size = fq_log2_size
  if arg == "smoke":
    config_lib.gan_smoke_overrides(c)
    c.train.epochs = 0.0
  c.lock()
  return c


def get_config(arg=None):
  return recipe(arg, "configs/biggan_cifar10.py", "cifar10", 10)
