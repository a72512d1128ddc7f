"""tna_jax: training-time neuron alignment (TNA-PFN), linear mode connectivity and fusion.

`import tna_jax as tj` gives the verbs of a study in one namespace:

    ds = tj.load_dataset("fashion_mnist")                     # data and models
    model = tj.get_model({"name": "mlp", "depth": 2, "width": 256}, ds.num_classes)
    init = tj.init_variables(model, jax.random.key(0), ds.image_shape)
    mask = tj.fixed_mask(init["params"], 0.4, seed=0)          # TNA-PFN: True = held at init
    tx = tj.make_optimizer({"name": "sgd", "learning_rate": 0.1}, total_steps=...)  # ends in tj.freeze()
    states, history = tj.fit(model, tx, tj.stack([tj.init_train_state(tx, init, mask)] * 2), [1, 2], ds, ...)
    curve = tj.lmc_curve(model, a, b, alphas, batches, ds.mean, ds.std)   # or score_fn=your_scoring
    tj.barriers(alphas, curve["loss"], curve["accuracy"])

plus alignment (`align`, `weight_matching`, `register_permutation_spec`, `repair`), soups
(`uniform_soup`, `greedy_soup`), merging operators (`task_arithmetic`, `ties_merge`,
`dare_merge`, `merge` by name, `Merger` for greedy soups and ColD), Hugging Face checkpoints
(`from_hf`, `to_hf`), the federated algorithms (`tj.federated`) and `load_run(workdir)` for a
finished run. Each name is the library function itself (see its docstring); the submodules
stay importable for everything else.

Names resolve on first use (PEP 562), so `python -m tna_jax.main --help` and the CLI's
error paths don't pay for importing JAX models, matching and TensorBoard up front.
"""

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> (module, attribute in it)
_EXPORTS: dict[str, tuple[str, str]] = {
    # data and models
    "load_dataset": ("tna_jax.core.data", "load_dataset"),
    "make_batches": ("tna_jax.core.evaluate", "make_batches"),
    "get_model": ("tna_jax.core.models", "get_model"),
    "init_variables": ("tna_jax.core.models", "init_variables"),
    # masks and the freeze transform
    "fixed_mask": ("tna_jax.core.masks", "fixed_mask"),
    "no_mask": ("tna_jax.core.masks", "no_mask"),
    "prune": ("tna_jax.core.masks", "prune"),
    "freeze": ("tna_jax.core.masks", "freeze"),
    "MaskSpec": ("tna_jax.core.masks", "MaskSpec"),
    "MaskSchedule": ("tna_jax.core.mask_schedule", "Schedule"),  # a mask ratio that falls during training
    "training_start": ("tna_jax.core.masks", "training_start"),
    # symmetry-breaking baselines (Lim et al. 2024)
    "wasym_start": ("tna_jax.core.asymmetric", "wasym_start"),
    "figlu_mask": ("tna_jax.core.asymmetric", "figlu_mask"),
    # the optimizer and training K stacked models
    "make_optimizer": ("tna_jax.core.optim", "make_optimizer"),
    "init_train_state": ("tna_jax.core.train", "init_train_state"),
    "stack": ("tna_jax.core.train", "stack"),
    "unstack": ("tna_jax.core.train", "unstack"),
    "fit": ("tna_jax.core.train", "fit"),
    "evaluate": ("tna_jax.core.evaluate", "evaluate"),
    # linear mode connectivity
    "interpolate": ("tna_jax.alignment.interpolation", "interpolate"),
    "lmc_curve": ("tna_jax.alignment.interpolation", "lmc_curve"),
    "barriers": ("tna_jax.alignment.interpolation", "barriers"),
    "pairwise_barriers": ("tna_jax.alignment.interpolation", "pairwise_barriers"),
    # post-hoc alignment
    "align": ("tna_jax.alignment.matching", "align"),
    "weight_matching": ("tna_jax.alignment.matching", "weight_matching"),
    "activation_matching": ("tna_jax.alignment.matching", "activation_matching"),
    "permutation_spec": ("tna_jax.alignment.permutations", "spec_for"),
    "register_permutation_spec": ("tna_jax.alignment.permutations", "register"),
    "permutations_chain": ("tna_jax.alignment.permutations", "chain"),
    "repair": ("tna_jax.alignment.repair", "repair"),
    # fusion
    "uniform_soup": ("tna_jax.fusion.model_soups", "uniform_soup"),
    "greedy_soup": ("tna_jax.fusion.model_soups", "greedy_soup"),
    "task_arithmetic": ("tna_jax.fusion.merging", "task_arithmetic"),
    "ties_merge": ("tna_jax.fusion.merging", "ties"),
    "dare_merge": ("tna_jax.fusion.merging", "dare"),
    "merge": ("tna_jax.fusion.merging", "merge"),
    "Merger": ("tna_jax.fusion.merging", "Merger"),
    # Hugging Face checkpoints in and out
    "from_hf": ("tna_jax.fusion.hf", "from_hf"),
    "to_hf": ("tna_jax.fusion.hf", "to_hf"),
    # finished runs
    "load_run": ("tna_jax.runs.saved_runs", "load_run"),
}
_SUBPACKAGES = ("federated",)

__all__ = sorted(_EXPORTS) + list(_SUBPACKAGES)


def __getattr__(name: str) -> Any:
  if name in _EXPORTS:
    module, attribute = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attribute)
  elif name in _SUBPACKAGES:
    value = importlib.import_module(f"{__name__}.{name}")
  else:
    raise AttributeError(f"module 'tna_jax' has no attribute {name!r}")
  globals()[name] = value  # resolved once
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(__all__))
