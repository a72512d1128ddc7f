"""Runs that start from a Hugging Face checkpoint (`base.source = hf`, `base.path = DIR`).

The checkpoint gives a run three things, all read before the run takes its workdir (a bad
checkpoint is an input error that leaves nothing behind):
  - its tokenizer (DIR/tokenizer.json): text datasets are tokenized with it, once, at loading
    (`tokenization`), instead of as bytes;
  - its model and variables (`hf.from_hf`): the architecture of config.json, with as many
    labels as the task has classes (a head of another size is re-initialized and named here)
    and the LoRA adapters of `model.lora_rank`;
  - where the results go back: fused models (soups, ColD's final bases) are written with
    `hf.to_hf` to WORKDIR/hf/<name>/, a directory `transformers` loads with `from_pretrained`.

Other sources keep their own paths (`bases.load_source`, `models.get_model`), so the
experiments call `load_dataset` and `load_model` whatever the source.
"""

from absl import logging
import flax.linen as nn

from tna_jax.core import data, models, text_data, tokenization
from tna_jax.errors import ConfigError, DataNotFoundError
from tna_jax.fusion import bases
from tna_jax.runs import files, runtime

VISION_MODEL_TYPES = ("vit",)  # checkpoints that read images; every other supported model_type reads token ids
EXPORT_DIR = "hf"  # WORKDIR/hf/<name>: the fused models as Hugging Face checkpoints


def from_hf(config) -> bool:
  """Whether the run starts from a Hugging Face checkpoint."""
  return config.get("base", {}).get("source") == "hf"


def model_label(config) -> str:
  """The model as tables and figures name it: `model.name`, or the checkpoint ('hf:roberta-base')."""
  return f"hf:{files.path(config.base.path).name}" if from_hf(config) else config.model.name


def max_len(config) -> int:
  """Tokens per text example: cold.max_len in cold configs, max_len elsewhere."""
  return config.cold.max_len if config.experiment == "cold" else config.max_len


def tokenizer(config) -> tokenization.Tokenizer | None:
  """The checkpoint's tokenizer when the run starts from one and its data are text; None
  otherwise (text is then encoded as bytes)."""
  if not from_hf(config) or config.dataset not in text_data.TEXT_DATASETS:
    return None
  from tna_jax.fusion import hf  # pylint: disable=g-import-not-at-top

  if not files.path(config.base.path).joinpath(hf.CONFIG).exists():  # not a checkpoint: say so, not "no tokenizer"
    raise DataNotFoundError(f"base.path={config.base.path!r} is not a Hugging Face checkpoint: it has no {hf.CONFIG} "
                            f"(a checkpoint directory holds {hf.CONFIG}, {hf.WEIGHTS} and, for text, "
                            f"{tokenization.TOKENIZER_FILE}).")
  return tokenization.Tokenizer.of_checkpoint(config.base.path)


def load_dataset(config, num_train: int | None = None, num_test: int | None = None) -> data.Dataset:
  """The run's dataset: `text_files` (tokenized by the checkpoint's tokenizer, if any) or an
  image dataset of `data.load_dataset`; optionally only the first examples of each split."""
  if config.dataset != "text_files":
    return data.load_dataset(config.dataset, config.data_dir, num_train, num_test)
  dataset = text_data.load_text_files(config.data_dir, max_len(config), tokenizer(config))
  return dataset if num_train is None and num_test is None else dataset.subset(num_train, num_test)


def load_model(config, num_classes: int, input_shape: tuple[int, ...]) -> tuple[nn.Module, dict | None]:
  """(model, body) of the run: for base.source='hf', the checkpoint's model with
  `num_classes` labels and its variables; otherwise `config.model`'s model and
  `bases.load_source`'s body (None for sources made in the run).

  `input_shape` is the data's example shape (no batch axis): [max_len] for text, [H, W, C]
  for images; a checkpoint that reads the other kind is a ConfigError.
  """
  if not from_hf(config):
    body = bases.load_source(config) if config.experiment != "lmc" else None
    return models.get_model(config.model, num_classes), body
  from tna_jax.fusion import hf  # pylint: disable=g-import-not-at-top  (safetensors: only runs from checkpoints)

  model, variables, info = hf.from_hf(config.base.path, num_labels=num_classes,
                                      lora_rank=config.model.get("lora_rank", 0),
                                      lora_alpha=config.model.get("lora_alpha", 16.0), seed=config.init_seed)
  images = len(input_shape) == 3
  if images != (info.model_type in VISION_MODEL_TYPES):
    raise ConfigError(f"base.path={config.base.path!r} is a {info.model_type} checkpoint, which reads "
                      f"{'images' if info.model_type in VISION_MODEL_TYPES else 'token ids'}, but "
                      f"dataset={config.dataset!r} is {'images' if images else 'text'}.")
  if images:
    model = model.clone(channels_last=True)  # train.fit's images are NHWC
  else:
    _check_positions(config, info, input_shape[0])
  adapters = [p for p in info.reinitialized if "lora" in p]
  reinitialized = ", ".join([p for p in info.reinitialized if "lora" not in p] +
                            ([f"{len(adapters)} LoRA adapter matrices"] if adapters else [])) or "nothing"
  logging.info("Base: %s checkpoint %s with %d labels; re-initialized: %s", info.model_type, info.path, num_classes,
               reinitialized)
  print(f"base: the {info.model_type} checkpoint {info.path} with {num_classes} labels; freshly initialized: "
        f"{reinitialized}")
  return model, variables


def _check_positions(config, info, length: int) -> None:
  """Text longer than the checkpoint's position table would index past it (JAX clamps the
  gather silently), so it is refused here."""
  positions = info.config.get("max_position_embeddings", info.config.get("n_positions"))
  if positions is None:
    return
  if info.model_type == "roberta":  # positions start at padding_idx + 1
    positions -= (info.pad_token_id or 0) + 1
  if length > positions:
    key = "cold.max_len" if config.experiment == "cold" else "max_len"
    raise ConfigError(f"{key}={length} is longer than the {info.model_type} checkpoint's {positions} positions; "
                      f"lower {key}.")


def export(run: runtime.Run, config, model: nn.Module, fused: dict[str, dict]) -> None:
  """Writes each fused model (name -> variables) as a Hugging Face checkpoint
  WORKDIR/hf/<name>/ (config.json, model.safetensors and the base's tokenizer files), when
  the run started from one; nothing otherwise."""
  if not from_hf(config):
    return
  from tna_jax.fusion import hf  # pylint: disable=g-import-not-at-top

  for name, variables in fused.items():
    hf.to_hf(model, variables, str(run.path(EXPORT_DIR, name)), like=config.base.path)
  print(f"wrote {', '.join(fused)} as Hugging Face checkpoints in {run.path(EXPORT_DIR)}")
