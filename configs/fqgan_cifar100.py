"""FQ-BigGAN on CIFAR-100 at 32x32 (Zhao et al. 2020, Table 1), dictionary K = 2^6.

  python -m vqjax.main --config=configs/fqgan_cifar100.py --workdir=DIR

configs/fqgan_cifar10.py on TFDS `cifar100` (100 classes) with K = 2^6 entries per FQ
dictionary, as the paper's CIFAR-100 setting. `smoke` as configs/biggan_cifar10.py.
"""

import os

from vqjax import config_lib

here = os.path.dirname(os.path.abspath(__file__))
biggan = config_lib.recipe_module(os.path.join(here, "biggan_cifar10.py"))
fqgan = config_lib.recipe_module(os.path.join(here, "fqgan_cifar10.py"))


def get_config(arg=None):
  return biggan.recipe(arg, "configs/fqgan_cifar100.py", "cifar100", 100, fqgan.FQ_LAYERS,
                       fq_log2_size=6)
