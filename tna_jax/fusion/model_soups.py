"""Model soups: averages of models fine-tuned from one base.

Wortsman et al.'s soups average the weights of models fine-tuned from the same pretrained
base with different hyperparameters: the uniform soup averages all of them; the greedy
soup sorts them by held-out accuracy and adds a model to the running average only if the
held-out accuracy of the average improves. ColD fusion (`tna_jax.fusion.cold_fusion`) fuses its
contributors with the weighted uniform soup; under a TNA-PFN mask the fixed entries are
equal in every model and are taken from the base as they are (`masks.keep_fixed`).

Models arrive stacked along a leading axis (as `train.fit` trains them), and the greedy
soup is ONE compiled call: a scan over the sorted models, each step evaluating its
candidate average on the held-out batches. With a `merging.Merger` it is the greedy soup of
that merging operator (task arithmetic, TIES, DARE) instead of the average.

`per_model_run` lets models with different learning rates and training lengths train in
one compiled program: each model's multiplier and step budget live in its optimizer state.

`align_to_first` permutes every model of a stack onto the first (post-hoc matching,
`tna_jax.alignment.matching`), so the soups of matched models can be set beside the soups of
TNA-PFN models, which are aligned by training instead.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from tna_jax.alignment import matching
from tna_jax.core import evaluate, execution, sharding, stacking, train

PyTree = Any


def uniform_soup(stacked: PyTree, weights: jax.Array | None = None) -> PyTree:
  """The mean over the leading (model) axis of every leaf; with `weights` [K], the
  weighted mean (ColD averages the contributors only: weight 0 for the others)."""
  if weights is None:
    return jax.tree.map(lambda x: jnp.mean(x, axis=0), stacked)
  weights = jnp.asarray(weights, jnp.float32)
  return jax.tree.map(lambda x: jnp.tensordot(weights.astype(x.dtype), x, axes=1) / jnp.sum(weights).astype(x.dtype),
                      stacked)


def evaluate_stack(model, stacked_variables: PyTree, batches: evaluate.Batches, mean, std, *,
                   per_model_batches: bool = False, mesh: jax.sharding.Mesh | None = None) -> dict[str, jax.Array]:
  """Loss and accuracy [K] of each of the K stacked models, in one compiled call.

  With `per_model_batches`, `batches` are stacked too and model k is evaluated on its own
  (ColD: each contributor on its task's test split); otherwise all share them. With a
  `mesh`, the models stay on its 'models' axis (where `sharding.named(mesh, 'models')` put them).
  """
  return _evaluate_stack(model, tuple(mean), tuple(std), per_model_batches, mesh, stacked_variables, batches)


@jax.jit(static_argnums=(0, 1, 2, 3, 4))
def _evaluate_stack(model, mean, std, per_model_batches, mesh, stacked, batches):
  apply_fn = evaluate.inference_fn(model)
  return stacking.map_stacked(lambda v, b: evaluate.evaluate(apply_fn, v, b, mean, std),
                              sequential=execution.policy(mesh).sequential,
                              in_axes=(0, 0 if per_model_batches else None),
                              spmd_axis_name=sharding.MODELS if mesh is not None else None)(stacked, batches)


class GreedySoup(NamedTuple):
  """The greedy soup and how it was made (model indices are positions in the stack)."""

  variables: PyTree  # the soup
  heldout_accuracy: jax.Array  # the soup's held-out accuracy
  ingredients: jax.Array  # bool [K]: models in the soup
  order: jax.Array  # int [K]: models by decreasing held-out accuracy (ties: lower index first)
  individual_accuracy: jax.Array  # [K] held-out accuracy of each model
  candidate_accuracy: jax.Array  # [K] held-out accuracy of the candidate when order[i] was tried


def greedy_soup(model, stacked_variables: PyTree, batches: evaluate.Batches, mean, std, *, merger=None,
                base: dict | None = None, fixed: PyTree | None = None) -> GreedySoup:
  """Wortsman et al.'s greedy soup on the held-out `batches`, as one compiled call.

  Starts from the model with the best held-out accuracy; each next model (by decreasing
  held-out accuracy) enters only if the candidate average is strictly more accurate on the
  held-out split than the soup so far. So the soup is never worse on held-out data than
  the best single model, which is where it starts.

  With a `merger` (`merging.Merger`) other than uniform, the soup of a set of models is that
  operator over them instead of their average: task vectors against `base` (variables), the
  params merged by the operator under the mask `fixed` (optional), other collections averaged
  (`merging.merge_variables`). The set is a 0/1 weight vector over the K models, so every
  candidate is the same compiled program: the scan starts from the soup of the best model
  alone and tries soup(accepted + next). The operator's trim and drop do not depend on the
  set and are made once. A one-model TIES or DARE soup is the trimmed or dropped model, so
  this soup starts from (and can end at) less than the best single model's accuracy.
  Without a merger (or with uniform) it is the plain greedy soup, bit for bit as before.
  """
  if merger is None or merger.name == "uniform":
    return _greedy(model, tuple(mean), tuple(std), stacked_variables, batches)
  return _greedy_merged(model, tuple(mean), tuple(std), merger, stacked_variables, batches, base, fixed)


@jax.jit(static_argnums=(0, 1, 2))
def _greedy(model, mean, std, stacked, batches) -> GreedySoup:
  apply_fn = evaluate.inference_fn(model)

  def accuracy(variables):
    return evaluate.evaluate(apply_fn, variables, batches, mean, std)["accuracy"]

  individual = stacking.map_stacked(accuracy, sequential=execution.policy().sequential)(stacked)
  order = jnp.argsort(-individual, stable=True)
  total = train.unstack(stacked, order[0])

  def step(carry, k):
    total, count, best = carry
    candidate_total = jax.tree.map(jnp.add, total, train.unstack(stacked, k))
    candidate_accuracy = accuracy(jax.tree.map(lambda t: t / (count + 1), candidate_total))
    accept = candidate_accuracy > best
    total = jax.tree.map(lambda c, t: jnp.where(accept, c, t), candidate_total, total)
    return (total, count + accept, jnp.maximum(best, candidate_accuracy)), (accept, candidate_accuracy)

  (total, count, best), (accepted, tried) = jax.lax.scan(
      step, (total, jnp.ones((), jnp.float32), individual[order[0]]), order[1:])
  ingredients = jnp.zeros(individual.shape, bool).at[order].set(jnp.concatenate([jnp.ones(1, bool), accepted]))
  return GreedySoup(variables=jax.tree.map(lambda t: t / count, total), heldout_accuracy=best,
                    ingredients=ingredients, order=order, individual_accuracy=individual,
                    candidate_accuracy=jnp.concatenate([individual[order[:1]], tried]))


@jax.jit(static_argnums=(0, 1, 2, 3))
def _greedy_merged(model, mean, std, merger, stacked, batches, base, fixed) -> GreedySoup:
  apply_fn = evaluate.inference_fn(model)

  def accuracy(variables):
    return evaluate.evaluate(apply_fn, variables, batches, mean, std)["accuracy"]

  individual = stacking.map_stacked(accuracy, sequential=execution.policy().sequential)(stacked)
  order = jnp.argsort(-individual, stable=True)
  taus = merger.task_vectors(base["params"], stacked["params"], fixed)

  def soup(include):
    rest = {k: uniform_soup(v, include) for k, v in stacked.items() if k != "params"}
    return {"params": merger.combine_vectors(base["params"], taus, include, fixed), **rest}

  start = jnp.zeros(individual.shape, jnp.float32).at[order[0]].set(1)
  start_accuracy = accuracy(soup(start))

  def step(carry, k):
    include, best = carry
    candidate = include.at[k].set(1)
    candidate_accuracy = accuracy(soup(candidate))
    accept = candidate_accuracy > best
    return (jnp.where(accept, candidate, include), jnp.maximum(best, candidate_accuracy)), candidate_accuracy

  (include, best), tried = jax.lax.scan(step, (start, start_accuracy), order[1:])
  return GreedySoup(variables=soup(include), heldout_accuracy=best, ingredients=include > 0, order=order,
                    individual_accuracy=individual, candidate_accuracy=jnp.concatenate([start_accuracy[None], tried]))


def align_to_first(method: str, model, stacked_variables: PyTree, *, images: jax.Array | None = None, mean=None,
                   std=None, seed: int = 0, max_iterations: int = 100, solver: str = "auto",
                   policy: execution.ExecutionPolicy | None = None) -> tuple[PyTree, list[matching.MatchResult]]:
  """The K stacked models with each of models 1..K-1 permuted onto model 0, by `method`.

  One `matching.align` per model (weight or activation matching; the arguments after
  `stacked_variables` are its own), all against model 0, so the whole stack ends up in
  model 0's coordinates and can be averaged unit by unit. Every aligned model computes what
  it did before. LoRA models are matched unmerged: their adapters move with their base
  kernels (see `permutations`), so the soup still averages kernels and adapters apart.

  Frozen entries move too. The models share their base and one mask (TNA-PFN's, and what
  `finetune.trainable` freezes), so before alignment every model holds the base's value at
  every fixed entry; model k permuted by P_k holds them at P_k(fixed) instead. Unless every
  P_k is the identity, the soup of the aligned models averages, at an entry fixed in model
  0, the base's value with values other models trained there, and it is no longer
  bit-identical to the base on the mask.
  `masks.keep_fixed` must therefore NOT be applied to these soups with the original mask:
  it would overwrite averages with values only model 0 holds at those positions.

  Returns:
    (the aligned stack, model 0 unchanged; the K-1 MatchResults of models 1..K-1).
  """
  first = train.unstack(stacked_variables, 0)
  aligned, results = [first], []
  for k in range(1, jax.tree.leaves(stacked_variables)[0].shape[0]):
    variables, result = matching.align(method, model, first, train.unstack(stacked_variables, k), images=images,
                                       mean=mean, std=std, seed=seed, max_iterations=max_iterations, solver=solver,
                                       policy=policy)
    aligned.append(variables)
    results.append(result)
  return train.stack(aligned), results


class RunState(NamedTuple):
  """One model's learning-rate multiplier and step budget (scalars, one per model)."""

  count: jax.Array  # int32 updates so far
  lr_factor: jax.Array  # float32 multiplier of the whole update
  num_steps: jax.Array  # int32 updates this model makes; later updates are zero


def per_model_run() -> optax.GradientTransformationExtraArgs:
  """Scales each update by the model's `lr_factor` for its first `num_steps` updates, then by 0.

  Chain it AFTER `optim.make_optimizer(...)`: the freeze there has already made the update
  of every fixed entry exactly 0, and a multiple of 0 is 0, so the mask still holds. A
  scaled update equals a scaled learning rate for every optimizer of `optim` (the learning
  rate is the last factor of each), and a model past its budget is a model that stopped
  training: models with different learning rates and epochs share one compiled program.
  Set the values with `set_run`; the defaults (1, no limit) change nothing.
  """

  def init_fn(params):
    del params
    return RunState(jnp.zeros((), jnp.int32), jnp.ones((), jnp.float32), jnp.full((), jnp.iinfo(jnp.int32).max))

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    factor = jnp.where(state.count < state.num_steps, state.lr_factor, 0.0)
    updates = jax.tree.map(lambda u: u * factor.astype(u.dtype), updates)
    return updates, state._replace(count=optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def set_run(state: train.TrainState, lr_factor: float, num_steps: int) -> train.TrainState:
  """`state` (of `optax.chain(inner, per_model_run())`) with this model's factor and budget."""
  inner, run = state.opt_state
  run = run._replace(lr_factor=jnp.asarray(lr_factor, jnp.float32), num_steps=jnp.asarray(num_steps, jnp.int32))
  return state.replace(opt_state=(inner, run))
