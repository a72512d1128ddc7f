"""Where a fine-tuning run's base model comes from, and how it lands on the model.

Model soups and ColD fusion both start every fine-tuned model from ONE base: a pretrained
body plus a freshly initialized head that all models share (TNA-PFN needs the identical
start, and soups of different heads fail). The body comes from one of BASE_SOURCES:

  init            the model's seeded initialization (no pretraining);
  pretrain        this library's `pretrain` step: `train.fit` on another labelling or
                  another part of the data (e.g. other classes), saved as an orbax
                  checkpoint the next run can start from;
  orbax           such a checkpoint (variables or params, as `checkpoints.save` writes);
  big_vision_npz  a ViT checkpoint in big_vision's .npz layout, converted here.

`graft` puts the loaded body onto the model's fresh variables by parameter path, keeping
the initialization only where `reinit` says (the head by default), and names every path
that is missing or has another shape instead of failing later inside `apply`.
"""

import dataclasses
import io
import re
import zipfile
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tna_jax import checkpoints, data, files, masks, models, optim, runtime, train, tree_utils
from tna_jax.errors import ConfigError, DataNotFoundError, check_choice

PyTree = Any
BASE_SOURCES = ("init", "pretrain", "orbax", "big_vision_npz")


# ----------------------------------------------------------------------------- tasks


def parse_groups(spec: str, num_classes: int) -> tuple[tuple[int, ...], ...]:
  """'0+2/1/3' -> ((0, 2), (1,), (3,)): each '/'-separated group becomes one new class.

  '' means every class as itself. A class may appear in at most one group.
  """
  if not spec.strip():
    return tuple((c,) for c in range(num_classes))
  groups, seen = [], set()
  for group in spec.strip().split("/"):
    try:
      classes = tuple(int(c) for c in group.split("+"))
    except ValueError:
      raise ConfigError(f"task {spec!r}: group {group!r} is not '+'-separated class numbers; "
                        "write a task as '/'-separated groups like '0+2/1/3'.") from None
    bad = [c for c in classes if not 0 <= c < num_classes or c in seen]
    if bad:
      raise ConfigError(f"task {spec!r}: class {bad[0]} is out of range 0..{num_classes - 1} or repeated.")
    seen.update(classes)
    groups.append(classes)
  if len(groups) < 2:
    raise ConfigError(f"task {spec!r} has {len(groups)} group; a classification task needs at least 2.")
  return tuple(groups)


def relabel(dataset: data.Dataset, groups: tuple[tuple[int, ...], ...], name: str | None = None) -> data.Dataset:
  """The task whose class i is the union of `groups[i]`; examples of other classes are dropped.

  Pretraining on other classes and ColD's tasks (label groupings, class subsets) are both
  relabelings. mean and std stay those of the source, so every task normalizes alike.
  """
  lookup = np.full(dataset.num_classes, -1, np.int32)
  for new, classes in enumerate(groups):
    lookup[list(classes)] = new

  def split(images, labels):
    new_labels = lookup[labels]
    keep = new_labels >= 0
    return images[keep], new_labels[keep]

  train_images, train_labels = split(dataset.train_images, dataset.train_labels)
  test_images, test_labels = split(dataset.test_images, dataset.test_labels)
  return dataclasses.replace(dataset, name=name or dataset.name, train_images=train_images,
                             train_labels=train_labels, test_images=test_images, test_labels=test_labels,
                             num_classes=len(groups))


def train_range(dataset: data.Dataset, start: int, count: int, what: str) -> data.Dataset:
  """Only training examples [start, start + count); disjoint ranges keep pretraining,
  fine-tuning, held-out and each contributor's data apart."""
  available = len(dataset.train_labels)
  if count < 1 or start + count > available:
    raise ConfigError(f"{what}: training examples [{start}, {start + count}) do not fit the {available} of "
                      f"{dataset.name}; lower the counts.")
  return dataclasses.replace(dataset, train_images=dataset.train_images[start:start + count],
                             train_labels=dataset.train_labels[start:start + count])


# ----------------------------------------------------------------------------- sources


def load_source(config: ml_collections.ConfigDict) -> PyTree | None:
  """The base's body from `config.base.path` (source orbax or big_vision_npz), read and
  verified before the run takes its workdir, so a missing or corrupt file is an input
  error that leaves nothing behind; None for the sources made here (init, pretrain)."""
  source = config.base.source
  check_choice("base.source", source, BASE_SOURCES)
  if source == "orbax":
    return load_orbax(config.base.path)
  if source == "big_vision_npz":
    return {"params": load_big_vision_npz(config.base.path)}
  return None


def load_base(config: ml_collections.ConfigDict, model, dataset: data.Dataset, body: PyTree | None = None,
              run: runtime.Run | None = None) -> dict:
  """The variables every fine-tuned model starts from: the body (`load_source`'s, or
  pretrained here), everything matching `config.base.reinit` (the head) from seed
  `config.init_seed`.

  `dataset` is what `pretrain` trains on (see `pretrain`); pretraining is a resumable
  phase of `run`, and the pretrained variables are saved as its checkpoint
  `checkpoints/pretrained`, so later runs can use source='orbax'.
  """
  source = config.base.source
  check_choice("base.source", source, BASE_SOURCES)
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
  task = relabel(train_range(dataset, cfg.start, cfg.num_train, "pretrain"),
                 parse_groups(cfg.classes, dataset.num_classes), name=f"{dataset.name}[pretrain]")
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


# ----------------------------------------------------------------------------- big_vision .npz


def load_big_vision_npz(path: str) -> dict:
  """The params of a big_vision ViT checkpoint (.npz), in `transformers.ViT`'s layout.

  Reads what big_vision writes and publishes: keys are '/'-joined parameter paths, maybe
  under 'params/' or 'opt/target/'; bfloat16 arrays stored as raw 2-byte voids; blocks
  either one per layer (`encoderblock_{i}`) or stacked by `scan` (`encoderblock` with a
  leading depth axis); and the older vit_jax names (pre-linen module numbering such as
  `MultiHeadDotProductAttention_1`, position embeddings inside `Transformer` or
  `posembed_input`, and the class token's position embedding folded into `cls`).
  """
  if not path or not files.path(path).is_file():
    raise DataNotFoundError(f"base.path={path!r} is not a file; pass a big_vision ViT .npz checkpoint.")
  import flax.traverse_util  # pylint: disable=g-import-not-at-top
  from flax.training import checkpoints as flax_checkpoints  # pylint: disable=g-import-not-at-top
  try:
    with np.load(io.BytesIO(files.path(path).read_bytes()), allow_pickle=False) as npz:
      flat = {tuple(key.split("/")): _recover_dtype(npz[key]) for key in npz.files}
  except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
    raise DataNotFoundError(f"base.path={path!r} is not a readable .npz file ({type(e).__name__}: {e}); pass an "
                            "intact big_vision ViT checkpoint.") from None
  tree = flax.traverse_util.unflatten_dict(flat)
  if "params" in tree:
    tree = tree["params"]
  elif "opt" in tree:
    tree = tree["opt"]["target"]
  tree = flax_checkpoints.convert_pre_linen(tree)
  return _fix_vit_layout(dict(tree))


def save_big_vision_npz(path: str, params: PyTree) -> None:
  """Writes params as big_vision does: one array per '/'-joined path, in one .npz."""
  flat = {tree_utils.path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(params)}
  buffer = io.BytesIO()
  np.savez(buffer, **flat)
  files.write_bytes(path, buffer.getvalue())


def _recover_dtype(array: np.ndarray) -> np.ndarray:
  """bfloat16 saved by numpy as 2-byte voids, back to numbers (float32)."""
  if array.dtype.kind == "V" and array.dtype.itemsize == 2:
    return array.view(jnp.bfloat16).astype(np.float32)
  return array


def _fix_vit_layout(params: dict) -> dict:
  """Old position-embedding places, the folded class token, and scanned blocks."""
  encoder = params.get("Transformer", {})
  if "posembed_input" in encoder:
    params["pos_embedding"] = encoder.pop("posembed_input")["pos_embedding"]
  if "pos_embedding" in encoder:
    params["pos_embedding"] = encoder.pop("pos_embedding")
  if "pos_embedding" in params and "cls" in params:
    pe = params["pos_embedding"]
    side = int(np.sqrt(pe.shape[1] - 1))
    if side * side + 1 == pe.shape[1]:  # Old layout: cls was concatenated before adding posemb.
      params["cls"] = params["cls"] + pe[:, :1]
      params["pos_embedding"] = pe[:, 1:]
  if "encoderblock" in encoder:  # big_vision's scan=True: one block with a leading depth axis.
    stacked = encoder.pop("encoderblock")
    depth = jax.tree.leaves(stacked)[0].shape[0]
    for i in range(depth):
      encoder[f"encoderblock_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return params
