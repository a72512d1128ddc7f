"""TNA-PFN against training-time symmetry breaking (Lim et al., NeurIPS 2024): vanilla, TNA-PFN,
pruning at init, W-Asymmetric and σ-Asymmetric (FiGLU) MLPs 4 x 200 on 30,000 Fashion-MNIST images,
barrier against mask ratio 0, 0.2, 0.4, 0.6, 3 seeds. W-Asymmetric and σ-Asymmetric do not depend on
the mask ratio (each is trained once per seed, a flat line like vanilla's).

Sized for a 2-core CPU: 54 distinct models in 2 compiled programs (the FiGLU MLP is its own).
The library's MLP has no normalization layer, unlike the authors' networks (LayerNorm before every
activation), so the two fixed scales are set for a norm-free MLP instead of theirs:
  - σ-Asymmetric's F is N(0, 1/width) (scale 1/sqrt(200) = 0.07), not their N(0, 1): with
    N(0, 1) the gates sigmoid(x F) saturate, the loss diverges at lr 0.1 and, with gradients
    clipped, the models stop at ~64 % accuracy;
  - W-Asymmetric's constants are 0.1 * N(0, 1), not 1 * N(0, 1): at scale 1 a fixed entry is
    ~sqrt(fan_in) times a LeCun weight and the activations grow layer by layer.

python -m tna_jax.main --config=configs/sweep_asym_fmnist.py --workdir=workdirs/sweep_asym
"""

from tna_jax.config import loader


def get_config(arg=None):
  config = loader.defaults("sweep")
  config.num_train = 30_000
  config.num_epochs = 6
  config.model.depth = 4
  config.variants = "vanilla,tna,pruning,wasym,sigma_asym"
  config.wasym.scale = 0.1
  config.sigma_asym.scale = 0.07
  config.sweep.grid = "mask.fixed_fraction+pruning_fraction=0,0.2,0.4,0.6"
  config.checkpoint.every = 3
  return loader.apply_preset(config, arg)
