"""TNA-PFN against training-time symmetry breaking (Lim et al., NeurIPS 2024): vanilla, TNA-PFN,
pruning at init, W-Asymmetric and σ-Asymmetric (FiGLU) MLPs 4 x 200 on 30,000 Fashion-MNIST images,
barrier against mask ratio 0.2, 0.4, 0.6, 3 seeds. W-Asymmetric and σ-Asymmetric do not depend on
the mask ratio (each is trained once per seed, a flat line like vanilla's).

Sized for a 2-core CPU: 54 distinct models in 2 compiled programs (the FiGLU MLP is its own).
The library's MLP has no normalization layer, unlike the authors' networks, so two settings differ
from theirs, the same for every variant: gradients are clipped to global norm 1 (σ-Asymmetric's
gates diverge under plain SGD at lr 0.05-0.1 without it), and W-Asymmetric's constants are
0.1 * N(0, 1) (at their scale 1 the activations of a norm-free MLP grow layer by layer).

python -m tna_jax.main --config=configs/sweep_asym_fmnist.py --workdir=workdirs/sweep_asym
"""

from tna_jax.config import loader


def get_config(arg=None):
  config = loader.defaults("sweep")
  config.num_train = 30_000
  config.num_epochs = 6
  config.model.depth = 4
  config.optimizer.grad_clip = 1.0
  config.variants = "vanilla,tna,pruning,wasym,sigma_asym"
  config.wasym.scale = 0.1
  config.sweep.grid = "mask.fixed_fraction+pruning_fraction=0.2,0.4,0.6"
  config.checkpoint.every = 3
  return loader.apply_preset(config, arg)
