"""FQ-BigGAN on CIFAR-10 at 32x32 (Zhao et al. 2020, Table 1: FID 6.30 -> 5.59).

  python -m vqjax.main --config=configs/fqgan_cifar10.py --workdir=DIR

configs/biggan_cifar10.py's BigGAN with feature quantisation in its discriminator (Sec. 3,
Eq. 5-9): after each D block listed in FQ_LAYERS the features are looked up in a dictionary
of K = 2^10 entries kept in D's statistics and updated by EMA (lambda = 0.9, Eq. 8); D's loss
adds alpha L_Q (alpha = 1, commitment 0.25) and the quantised features go on
(`disc.fq_propagate=True`, the paper; False only adds the loss, as the released code does).
`smoke` as configs/biggan_cifar10.py.
"""

import os

from vqjax import config_lib

# D blocks after which features are quantised (block indices of disc 'biggan32').
FQ_LAYERS = (0, 1, 2, 3)  # all four blocks, as FQ-GAN's launch_C10.sh ("multiple FQ layers
# generally outperform a single one", Sec. 5)
biggan = config_lib.recipe_module(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "biggan_cifar10.py"))


def get_config(arg=None):
  return biggan.recipe(arg, "configs/fqgan_cifar10.py", "cifar10", 10, FQ_LAYERS,
                       fq_log2_size=10)
