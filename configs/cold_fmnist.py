"""ColD fusion of a small ViT over Fashion-MNIST label tasks, vanilla vs TNA-PFN (offline).

Four contributors (classes 0-4; classes 5-9; tops/bottoms/shoes/bag; the four kinds of
tops) and one unseen task (all 10 classes), 2000 training examples each; the base is
pretrained here on 10000 examples of classes 0-4; 4 rounds of 2 epochs.

python -m tna_jax.main --config=configs/cold_fmnist.py --workdir=workdirs/cold_fmnist
"""

from tna_jax.config import loader


def get_config(arg=None):
  config = loader.defaults("cold")
  return loader.apply_preset(config, arg)
