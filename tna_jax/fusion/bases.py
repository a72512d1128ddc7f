"""Where a fine-tuning run's base model comes from, and how it lands on the model.

Model soups and ColD fusion both start every fine-tuned model from ONE base: a pretrained
body plus a freshly initialized head that all models share (TNA-PFN needs the identical
start, and soups of different heads fail). The body comes from one of BASE_SOURCES:

  init            the model's seeded initialization (no pretraining);
  pretrain        this library's `pretrain` step: `train.fit` on another labelling or
                  another part of the data (e.g. other classes), saved as an orbax
                  checkpoint the next run can start from;
  orbax           such a checkpoint (variables or params, as `checkpoints.save` writes);
  big_vision_npz  a ViT checkpoint in big_vision's .npz layout (`tna_jax.fusion.big_vision_npz`);
  hf              a Hugging Face checkpoint directory: the model itself (its architecture from
                  config.json), its weights and its tokenizer (`tna_jax.fusion.pretrained`).

`graft` puts the loaded body onto the model's fresh variables by parameter path, keeping
the initialization only where `reinit` says (the head by default), and names every path
that is missing or has another shape instead of failing later inside `apply`.
"""

import re
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tna_jax.core import data, masks, models, optim, train, tree_utils
from tna_jax.errors import ConfigError, DataNotFoundError, check_choice
from tna_jax.fusion import big_vision_npz, tasks
from tna_jax.runs import checkpoints, files, runtime

PyTree = Any
BASE_SOURCES = ("init", "pretrain", "orbax", "big_vision_npz", "hf")


def load_source(config: ml_collections.ConfigDict) -> PyTree | None:
  """The base's body from `config.base.path` (source orbax or big_vision_npz), read and
  verified before the run takes its workdir, so a missing or corrupt file is an input
  error that leaves nothing behind; None for the sources made here (init, pretrain) and for
  hf, whose model and variables come together from `pretrained.load_model`."""
  source = config.base.source
  check_choice("base.source", source, BASE_SOURCES)
  if source == "orbax":
    return load_orbax(config.base.path)
  if source == "big_vision_npz":
    return {"params": big_vision_npz.load(config.base.path)}
  return None


def load_base(config: ml_collections.ConfigDict, model, dataset: data.Dataset, body: PyTree | None = None,
              run: runtime.Run | None = None) -> dict:
  """The variables every fine-tuned model starts from: the body (`load_source`'s, or
  pretrained here), everything matching `config.base.reinit` (the head) from seed
  `config.init_seed`.

  `dataset` is what `pretrain` trains on (see `pretrain`); pretraining is a resumable
  phase of `run`, and the pretrained variables are saved as its checkpoint
  `checkpoints/pretrained`, so later runs can use source='orbax'. For source='hf', `body`
  is the checkpoint's variables, head included, as `pretrained.load_model` made them.
  """
  source = config.base.source
  check_choice("base.source", source, BASE_SOURCES)
  if source == "hf":
    if body is None:
      raise ValueError("base.source='hf': pass the variables of `pretrained.load_model` as `body`")
    return body
  variables = models.init_variables(model, jax.random.key(config.init_seed), dataset.image_shape)
  if source == "init":
    return variables
  if source == "pretrain":
    if run is None:
      raise ValueError("base.source='pretrain' trains inside a run: pass `run`")
    body = pretrain(config, dataset, run)
    run.save("pretrained", body)
  elif body is None:
    body = load_source(config)
  params = graft(variables["params"], body.get("params", body), config.base.reinit)
  return {**variables, "params": params}


def pretrain(config: ml_collections.ConfigDict, dataset: data.Dataset, run: runtime.Run) -> dict:
  """This library's pretraining step: one model trained with `train.fit` from seed
  `config.init_seed` on the relabeling `config.pretrain.classes` of training examples
  [pretrain.start, pretrain.start + pretrain.num_train) of `dataset`, as the resumable
  phase 'pretrain' of `run`.

  The model is `config.model` with as many classes as the pretraining task; only its
  body carries over (the head is re-initialized by `graft`).
  """
  cfg = config.pretrain
  task = tasks.relabel(tasks.train_range(dataset, cfg.start, cfg.num_train, "pretrain"),
                       tasks.parse_groups(cfg.classes, dataset.num_classes), name=f"{dataset.name}[pretrain]")
  model = models.get_model(config.model, task.num_classes)
  variables = models.init_variables(model, jax.random.key(config.init_seed), task.image_shape)
  steps = len(task.train_labels) // cfg.batch_size
  if steps < 1:
    raise ConfigError(f"pretrain: {len(task.train_labels)} examples of classes {cfg.classes!r} are fewer than "
                      f"pretrain.batch_size={cfg.batch_size}.")
  tx = optim.make_optimizer(cfg.optimizer, steps * cfg.num_epochs)
  state = train.stack([train.init_train_state(tx, variables, masks.no_mask(variables["params"]))])
  logging.info("Pretraining on %d examples, %d classes, %d epochs", len(task.train_labels), task.num_classes,
               cfg.num_epochs)
  phase = run.phase("pretrain", total=cfg.num_epochs, unit="epoch", names=["pretrained"])
  state, history = phase.restore(state)
  state, history = train.fit(model, tx, state, [cfg.data_seed], task, num_epochs=cfg.num_epochs,
                             batch_size=cfg.batch_size, eval_batch_size=config.eval_batch_size,
                             on_epoch=phase.record, history=history)
  print(f"pretrained on {len(task.train_labels)} examples of {task.num_classes} classes: test accuracy "
        f"{100 * history[-1]['test_accuracy'][0]:.2f}% on those classes")
  return train.unstack(state.variables, 0)


def load_orbax(path: str) -> PyTree:
  """A checkpoint written by `checkpoints.save` (variables or bare params), as numpy and
  verified against its checksums."""
  if not path or not files.path(path).is_dir():
    raise DataNotFoundError(f"base.path={path!r} is not an orbax checkpoint directory; pass the directory a run "
                            "wrote, e.g. WORKDIR/checkpoints/pretrained.")
  try:
    return checkpoints.restore(path)
  except checkpoints.CheckpointError as e:
    raise DataNotFoundError(f"base.path={path!r}: {e}") from None


def graft(init_params: PyTree, source_params: PyTree, reinit: str = "^head/") -> PyTree:
  """`init_params` with every leaf taken from `source_params` at the same path, except
  leaves whose path matches the regex `reinit`, which keep their initialization.

  A learned `pos_embedding` of another grid size is resampled (bilinear) to this model's
  grid, as big_vision does for fine-tuning at another resolution.

  Raises:
    ConfigError: naming every path that is missing from the source or has another shape.
  """
  try:
    reinit_re = re.compile(reinit) if reinit else None
  except re.error as e:
    raise ConfigError(f"base.reinit={reinit!r} is not a valid regular expression: {e}.") from None
  flat_source = {tree_utils.path_str(p): v for p, v in jax.tree_util.tree_leaves_with_path(source_params)}
  problems = []

  def take(path: str, init: jax.Array) -> jax.Array:
    if reinit_re is not None and reinit_re.search(path):
      return init
    if path not in flat_source:
      problems.append(f"{path} is missing")
      return init
    value = np.asarray(flat_source[path])
    if path.endswith("pos_embedding") and value.shape != init.shape and value.ndim == 3:
      value = resample_posemb(value, init.shape[1])
    if value.shape != init.shape:
      problems.append(f"{path} has shape {value.shape}, the model needs {init.shape}")
      return init
    return jnp.asarray(value, init.dtype)

  params = tree_utils.map_with_path_str(take, init_params)
  if problems:
    raise ConfigError("the base checkpoint does not fit config.model: " + "; ".join(problems[:8]) +
                      (f"; and {len(problems) - 8} more" if len(problems) > 8 else "") +
                      ". Match the model knobs to the checkpoint, or add the paths to base.reinit (a regex) to "
                      "keep their fresh initialization.")
  return params


def resample_posemb(posemb: np.ndarray, num_tokens: int) -> np.ndarray:
  """[1, g*g, D] position embeddings bilinearly resized to [1, num_tokens, D] (square grids)."""
  old, new = round(np.sqrt(posemb.shape[1])), round(np.sqrt(num_tokens))
  if old * old != posemb.shape[1] or new * new != num_tokens:
    return posemb  # Not two square grids: left for graft to report.
  grid = jax.image.resize(jnp.asarray(posemb, jnp.float32).reshape(old, old, -1), (new, new, posemb.shape[-1]),
                          "bilinear")
  return np.asarray(grid).reshape(1, num_tokens, -1)
