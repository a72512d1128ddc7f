"""Model soups of small ViTs on Fashion-MNIST, vanilla vs one shared TNA-PFN mask (offline).

The base is pretrained here on classes 0-4 (training examples 0..9999); 8 models are then
fine-tuned on all 10 classes (examples 10000..13999, held-out 14000..15999) with drawn
learning rates (x0.3, x1, x3), epochs (2 or 4) and augmentation, and souped.

python -m tna_jax.main --config=configs/soup_vit_fmnist.py --workdir=workdirs/soup_vit_fmnist
"""

from tna_jax.config import loader


def get_config(arg=None):
  config = loader.defaults("soup")
  return loader.apply_preset(config, arg)
