"""Hugging Face checkpoints in and out: `from_hf` reads a transformers model directory into
the Flax models of `core.hf_models`, `to_hf` writes one back that transformers loads.

A checkpoint is a directory (local, or a gs:// URL through `runs.files`) holding
`config.json`, whose `model_type` picks the architecture, and `model.safetensors` (or its
shards, `model.safetensors.index.json`), read with `safetensors.numpy` (bfloat16, which
numpy lacks, by the format's own layout): PyTorch is never imported. Each architecture has one table of its modules (`_Tensor`: the Flax module, the
transformers module, how its weights are laid out), read in both directions, so loading
and writing cannot drift apart:

- BERT / RoBERTa -> `BertForSequenceClassification` / `RobertaForSequenceClassification`;
- GPT-2 -> `GPT2LMHeadModel`, or `GPT2ForSequenceClassification` when `num_labels` is asked
  for or the checkpoint's `architectures` names it;
- ViT -> `ViTForImageClassification`.

Base checkpoints (`BertModel`, `RobertaForMaskedLM`, `ViTModel`, ...) load too: their body
is found with or without the task model's prefix ('roberta.'), tensors the model does not
use (a masked-LM head, a ViT pooler) are logged and skipped, and a missing classification
head (or BERT pooler) is initialized from `seed`, as is a head whose number of labels
differs from the requested `num_labels`. Every re-initialized parameter is logged by name
and listed in `HFInfo.reinitialized`.

`transformer_models.LoRADense` adapters (`lora_rank` > 0) are new parameters: `lora_b` starts at
zero, so the adapted model computes what the checkpoint does. `to_hf` merges them into the
base kernels (W + (alpha / rank) A B), since transformers' classes have no place for them.
"""

import dataclasses
import functools
import json
import math
from collections.abc import Callable
from typing import Any, NamedTuple

from absl import logging
import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from tna_jax.core import hf_models
from tna_jax.errors import ConfigError, DataNotFoundError
from tna_jax.runs import files

PyTree = Any
CONFIG, WEIGHTS, WEIGHTS_INDEX = "config.json", "model.safetensors", "model.safetensors.index.json"
# Copied from `like` by to_hf when present, so the written directory is a whole model.
COMPANION_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "vocab.txt",
                   "merges.txt", "added_tokens.json", "preprocessor_config.json", "generation_config.json")
# Parameters that may be absent from a checkpoint and are then initialized: the heads, and
# BERT's pooler (base checkpoints saved without one).
OPTIONAL_MODULES = ("head", "pooler")
# Flax leaf -> the name of its tensor in the checkpoint's module.
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


@dataclasses.dataclass(frozen=True)
class HFInfo:
  """What `from_hf` read, and what it had to make up.

  Attributes:
    model_type: config.json's model_type ('bert', 'roberta', 'gpt2', 'vit').
    config: config.json as a dict.
    path: the checkpoint directory.
    pad_token_id: the id that padded positions get (config's pad_token_id, or 0 if none).
    num_labels: classes of the head (0: GPT-2's language model, logits over the vocabulary).
    reinitialized: param paths initialized from `seed` rather than read (heads, LoRA).
    architecture: the transformers class the Flax model computes (and `to_hf` writes).
    unused: checkpoint tensors the model does not use.
    tokenizer: the checkpoint's tokenizer.json, or None when it has none.
  """

  model_type: str
  config: dict
  path: str
  pad_token_id: int
  num_labels: int
  reinitialized: list[str]
  architecture: str
  unused: list[str]
  tokenizer: str | None


class _Tensor(NamedTuple):
  """One module of an architecture's table: the Flax module `flax` is the transformers
  module `hf` (or, for kind 'param', the leaf `flax` is the tensor `hf`).

  Kinds: 'linear' (nn.Linear, weight [out, in]), 'conv1d' (GPT-2's Conv1D, weight
  [in, out]), 'conv2d' (weight [out, in, kh, kw]), 'norm', 'embed', 'param'. A kernel's
  first `in_dims` axes are its input (2 for an attention output [heads, head_dim, width]).
  `part` = (i, n): the Flax module is the i-th of n equal slices of the tensors' output
  axis (GPT-2's fused query/key/value `c_attn`). `head`: named without the model prefix.
  """

  flax: str
  hf: str
  kind: str
  in_dims: int = 1
  part: tuple[int, int] = (0, 1)
  head: bool = False

  def hf_name(self, leaf: str | None, prefix: str) -> str:
    name = self.hf if self.kind == "param" else f"{self.hf}.{_LEAF_NAMES[leaf]}"
    return name if self.head else prefix + name

  def out_axis(self, leaf: str | None) -> int:
    """The axis of the checkpoint's tensor that `part` slices."""
    return 0 if (self.kind == "linear" and leaf == "kernel") else -1

  def to_flax(self, leaf: str | None, value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    i, n = self.part
    if n > 1:
      value = np.split(value, n, axis=self.out_axis(leaf))[i]
    if leaf == "kernel" and self.kind == "linear":
      value = value.T
    elif leaf == "kernel" and self.kind == "conv2d":
      value = value.transpose(2, 3, 1, 0)
    return value.reshape(shape)

  def to_hf(self, leaf: str | None, value: np.ndarray) -> np.ndarray:
    """The slice of the checkpoint tensor this module holds (parts are concatenated on
    `out_axis` by the caller)."""
    if leaf == "kernel" and self.kind == "conv2d":
      return value.transpose(3, 2, 0, 1)
    if leaf == "kernel":
      value = value.reshape(math.prod(value.shape[:self.in_dims]), -1)
      return value.T if self.kind == "linear" else value
    return value.reshape(-1) if leaf == "bias" else value


def _layers(num_layers: int, flax_prefix: str, hf_prefix: str, names: dict[str, tuple]) -> list[_Tensor]:
  """The table rows of every block: `names` maps a module of `hf_models.Block` to the rest
  of its row (transformers module under `hf_prefix`{i}., kind, ...)."""
  return [_Tensor(f"{flax_prefix}{i}/{module}", f"{hf_prefix}{i}.{hf}", *rest)
          for i in range(num_layers) for module, (hf, *rest) in names.items()]


_BERT_LAYER = {"attention/query": ("attention.self.query", "linear"), "attention/key": ("attention.self.key", "linear"),
               "attention/value": ("attention.self.value", "linear"),
               "attention/output": ("attention.output.dense", "linear", 2),
               "attention_norm": ("attention.output.LayerNorm", "norm"),
               "mlp/intermediate": ("intermediate.dense", "linear"), "mlp/output": ("output.dense", "linear"),
               "mlp_norm": ("output.LayerNorm", "norm")}
_GPT2_LAYER = {"attention/query": ("attn.c_attn", "conv1d", 1, (0, 3)),
               "attention/key": ("attn.c_attn", "conv1d", 1, (1, 3)),
               "attention/value": ("attn.c_attn", "conv1d", 1, (2, 3)),
               "attention/output": ("attn.c_proj", "conv1d", 2), "attention_norm": ("ln_1", "norm"),
               "mlp/intermediate": ("mlp.c_fc", "conv1d"), "mlp/output": ("mlp.c_proj", "conv1d"),
               "mlp_norm": ("ln_2", "norm")}
_VIT_LAYER = {**_BERT_LAYER, "attention/query": ("attention.attention.query", "linear"),
              "attention/key": ("attention.attention.key", "linear"),
              "attention/value": ("attention.attention.value", "linear"),
              "attention_norm": ("layernorm_before", "norm"), "mlp_norm": ("layernorm_after", "norm")}


def _bert_table(model: hf_models.BertClassifier) -> list[_Tensor]:
  rows = [_Tensor("embeddings/word", "embeddings.word_embeddings", "embed"),
          _Tensor("embeddings/position", "embeddings.position_embeddings", "embed"),
          _Tensor("embeddings/token_type", "embeddings.token_type_embeddings", "embed"),
          _Tensor("embeddings/norm", "embeddings.LayerNorm", "norm")]
  rows += _layers(model.num_layers, "layer_", "encoder.layer.", _BERT_LAYER)
  if isinstance(model, hf_models.RobertaClassifier):
    return rows + [_Tensor("head/dense", "classifier.dense", "linear", head=True),
                   _Tensor("head/out_proj", "classifier.out_proj", "linear", head=True)]
  return rows + [_Tensor("pooler", "pooler.dense", "linear"), _Tensor("head", "classifier", "linear", head=True)]


def _gpt2_table(model: hf_models.GPT2) -> list[_Tensor]:
  rows = [_Tensor("embeddings/word", "wte", "embed"), _Tensor("embeddings/position", "wpe", "embed")]
  rows += _layers(model.num_layers, "layer_", "h.", _GPT2_LAYER) + [_Tensor("final_norm", "ln_f", "norm")]
  return rows + ([_Tensor("head", "score", "linear", head=True)] if model.num_labels else [])


def _vit_table(model: hf_models.ViT) -> list[_Tensor]:
  rows = [_Tensor("embeddings/patch", "embeddings.patch_embeddings.projection", "conv2d"),
          _Tensor("embeddings/cls_token", "embeddings.cls_token", "param"),
          _Tensor("embeddings/position_embeddings", "embeddings.position_embeddings", "param")]
  rows += _layers(model.num_layers, "layer_", "encoder.layer.", _VIT_LAYER)
  return rows + [_Tensor("final_norm", "layernorm", "norm"), _Tensor("head", "classifier", "linear", head=True)]


def _config_num_labels(config: dict) -> int:
  """The number of labels a transformers config means (id2label wins, default 2)."""
  return len(config["id2label"]) if config.get("id2label") else int(config.get("num_labels", 2))


def _bert_kwargs(config: dict) -> dict:
  embedding = config.get("position_embedding_type", "absolute")
  if embedding != "absolute":
    raise ConfigError(f"position_embedding_type={embedding!r} is not supported; allowed: absolute.")
  return dict(num_layers=config["num_hidden_layers"], hidden_size=config["hidden_size"],
              num_heads=config["num_attention_heads"], intermediate_size=config["intermediate_size"],
              hidden_act=config["hidden_act"], layer_norm_eps=config["layer_norm_eps"],
              initializer_range=config["initializer_range"], vocab_size=config["vocab_size"],
              max_positions=config["max_position_embeddings"], type_vocab_size=config["type_vocab_size"],
              pad_token_id=config["pad_token_id"])


def _gpt2_kwargs(config: dict) -> dict:
  if not config.get("scale_attn_weights", True):
    raise ConfigError("scale_attn_weights=False is not supported; allowed: True.")
  return dict(num_layers=config["n_layer"], hidden_size=config["n_embd"], num_heads=config["n_head"],
              intermediate_size=config.get("n_inner") or 4 * config["n_embd"],
              hidden_act=config["activation_function"], layer_norm_eps=config["layer_norm_epsilon"],
              initializer_range=config["initializer_range"], vocab_size=config["vocab_size"],
              max_positions=config["n_positions"], pad_token_id=config.get("pad_token_id") or 0,
              scale_attn_by_inverse_layer_idx=bool(config.get("scale_attn_by_inverse_layer_idx", False)))


def _vit_kwargs(config: dict) -> dict:
  if not config.get("qkv_bias", True):
    raise ConfigError("qkv_bias=False is not supported; allowed: True.")
  return dict(num_layers=config["num_hidden_layers"], hidden_size=config["hidden_size"],
              num_heads=config["num_attention_heads"], intermediate_size=config["intermediate_size"],
              hidden_act=config["hidden_act"], layer_norm_eps=config["layer_norm_eps"],
              initializer_range=config["initializer_range"], image_size=config["image_size"],
              patch_size=config["patch_size"], num_channels=config["num_channels"])


class _Arch(NamedTuple):
  """How one model_type is built, named in files, and exported."""

  module: type[nn.Module]
  prefix: str  # of the body's tensors in transformers' task models
  defaults: dict  # transformers' config defaults, for config.json files that omit them
  kwargs: Callable[[dict], dict]  # config.json -> the module's attributes
  table: Callable[[nn.Module], list[_Tensor]]
  classifier: str  # the transformers class of the classification model
  language_model: str | None = None  # of num_labels=0, where there is one


_ENCODER_DEFAULTS = dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072,
                         hidden_act="gelu", layer_norm_eps=1e-12, initializer_range=0.02)
_BERT_DEFAULTS = dict(_ENCODER_DEFAULTS, vocab_size=30522, max_position_embeddings=512, type_vocab_size=2,
                      pad_token_id=0)
_ARCHS = {
    "bert": _Arch(hf_models.BertClassifier, "bert.", _BERT_DEFAULTS, _bert_kwargs, _bert_table,
                  "BertForSequenceClassification"),
    "roberta": _Arch(hf_models.RobertaClassifier, "roberta.", dict(_BERT_DEFAULTS, pad_token_id=1), _bert_kwargs,
                     _bert_table, "RobertaForSequenceClassification"),
    "gpt2": _Arch(hf_models.GPT2, "transformer.",
                  dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                       activation_function="gelu_new", layer_norm_epsilon=1e-5, initializer_range=0.02),
                  _gpt2_kwargs, _gpt2_table, "GPT2ForSequenceClassification", "GPT2LMHeadModel"),
    "vit": _Arch(hf_models.ViT, "vit.",
                 dict(_ENCODER_DEFAULTS, image_size=224, patch_size=16, num_channels=3), _vit_kwargs, _vit_table,
                 "ViTForImageClassification"),
}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(_ARCHS)


def _arch_of(config: dict, path: str) -> _Arch:
  model_type = config.get("model_type")
  if model_type not in _ARCHS:
    raise ConfigError(f"{path}/{CONFIG} has model_type={model_type!r}, which is not supported; supported: "
                      f"{', '.join(SUPPORTED_MODEL_TYPES)}.")
  return _ARCHS[model_type]


def _build(config: dict, path: str, num_labels: int | None, lora_rank: int, lora_alpha: float) -> nn.Module:
  """The Flax model of a config.json; num_labels None: the checkpoint's own task."""
  arch = _arch_of(config, path)
  config = {**arch.defaults, **config}
  if num_labels is None:
    architectures = config.get("architectures") or []
    is_lm = arch.language_model is not None and arch.classifier not in architectures
    num_labels = 0 if is_lm else _config_num_labels(config)
  elif num_labels < (0 if arch.language_model else 1):
    raise ConfigError(f"num_labels={num_labels} must be >= 1 for model_type={config['model_type']!r}.")
  return arch.module(**arch.kwargs(config), num_labels=num_labels, lora_rank=lora_rank, lora_alpha=lora_alpha)


def _arch_of_model(model: nn.Module) -> _Arch:
  for arch in _ARCHS.values():
    if type(model) is arch.module:  # pylint: disable=unidiomatic-typecheck
      return arch
  raise ConfigError(f"to_hf writes {', '.join(a.module.__name__ for a in _ARCHS.values())} models (from from_hf); "
                    f"got {type(model).__name__}.")


def _transformers_class(model: nn.Module) -> str:
  arch = _arch_of_model(model)
  return arch.classifier if model.num_labels else arch.language_model


def _read_config(path: str) -> dict:
  directory = files.path(path)
  if not directory.joinpath(CONFIG).exists():
    raise DataNotFoundError(f"{path!r} is not a Hugging Face checkpoint: it has no {CONFIG} (a checkpoint directory "
                            f"holds {CONFIG} and {WEIGHTS}, as save_pretrained writes them).")
  try:
    config = json.loads(directory.joinpath(CONFIG).read_text())
  except json.JSONDecodeError as e:
    raise DataNotFoundError(f"{path}/{CONFIG} is not valid JSON ({e}).") from None
  if not isinstance(config, dict):
    raise DataNotFoundError(f"{path}/{CONFIG} is not a JSON object.")
  return config


def _read_weights(path: str) -> dict[str, np.ndarray]:
  """Every tensor of the checkpoint (one file, or the shards an index names), as numpy."""
  directory = files.path(path)
  if directory.joinpath(WEIGHTS).exists():
    shards = [WEIGHTS]
  elif directory.joinpath(WEIGHTS_INDEX).exists():
    shards = sorted(set(json.loads(directory.joinpath(WEIGHTS_INDEX).read_text())["weight_map"].values()))
  else:
    legacy = " (it has pytorch_model.bin: save it again with save_pretrained, which writes safetensors)" if (
        directory.joinpath("pytorch_model.bin").exists()) else ""
    raise DataNotFoundError(f"Hugging Face checkpoint {path!r} has no {WEIGHTS}{legacy}.")
  tensors = {}
  for shard in shards:
    data = directory.joinpath(shard).read_bytes()
    try:
      tensors.update(safetensors.numpy.load(data))
    except KeyError:  # bfloat16, which numpy has no type for
      tensors.update(_load_with_bfloat16(data, f"{path}/{shard}"))
  return tensors


# safetensors dtypes -> numpy (little-endian); bfloat16 is read as its 16 bits.
_NUMPY_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
                 "I8": "i1", "U8": "u1", "BOOL": "?"}


def _load_with_bfloat16(data: bytes, name: str) -> dict[str, np.ndarray]:
  """A safetensors file with bfloat16 tensors, which safetensors.numpy refuses, read by the
  format's layout (an 8-byte header size, a JSON header of dtype, shape and byte offsets,
  then the data); bfloat16 becomes float32 exactly (its bits are float32's upper half)."""
  size = int.from_bytes(data[:8], "little")
  header = json.loads(data[8:8 + size])
  out = {}
  for tensor, meta in header.items():
    if tensor == "__metadata__":
      continue
    if meta["dtype"] not in _NUMPY_DTYPES:
      raise DataNotFoundError(f"{name}: tensor {tensor} has dtype {meta['dtype']}, which tna_jax cannot read; allowed: "
                              f"{', '.join(_NUMPY_DTYPES)}.")
    start, end = meta["data_offsets"]
    value = np.frombuffer(data, _NUMPY_DTYPES[meta["dtype"]], offset=8 + size + start,
                          count=(end - start) // np.dtype(_NUMPY_DTYPES[meta["dtype"]]).itemsize)
    if meta["dtype"] == "BF16":
      value = (value.astype(np.uint32) << 16).view(np.float32)
    out[tensor] = value.reshape(meta["shape"])
  return out


def _leaf_rows(model: nn.Module, flat: dict[str, Any]) -> dict[str, tuple[_Tensor, str | None]]:
  """Each param path of `flat` (LoRA adapters excluded) -> (its table row, its leaf name)."""
  rows = {row.flax: row for row in _arch_of_model(model).table(model)}
  out = {}
  for path in flat:
    module, leaf = path.rsplit("/", 1) if "/" in path else ("", path)
    if leaf in ("lora_a", "lora_b"):
      continue
    if path in rows and rows[path].kind == "param":
      out[path] = (rows[path], None)
    elif module in rows and rows[module].kind != "param":
      out[path] = (rows[module], leaf)
    else:
      raise ValueError(f"param {path} of {type(model).__name__} has no row in its checkpoint table (tna_jax.fusion.hf).")
  return out


def _dummy_input(model: nn.Module) -> jax.Array:
  if isinstance(model, hf_models.ViT):
    side = model.image_size
    return jnp.zeros((1, side, side, model.num_channels) if model.channels_last else (1, model.num_channels, side, side))
  return jnp.zeros((1, 2), jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _initialize(model: nn.Module, key: jax.Array, paths: tuple[str, ...]) -> dict[str, jax.Array]:
  """The params `paths` of `model.init(key, ...)`, compiled as one call that returns only
  them: XLA then drops the other leaves' random draws, which dominate the compile time
  (op by op, init would compile every op of the model once)."""
  flat = flax.traverse_util.flatten_dict(model.init(key, _dummy_input(model))["params"], sep="/")
  return {path: flat[path] for path in paths}


def from_hf(path: str, *, num_labels: int | None = None, lora_rank: int = 0, lora_alpha: float = 16.0,
            seed: int = 0) -> tuple[nn.Module, dict, HFInfo]:
  """A Hugging Face checkpoint directory as (Flax model, variables {'params': ...}, HFInfo).

  Args:
    path: a directory (or gs:// URL) with config.json and model.safetensors.
    num_labels: classes of the classification head; None keeps the checkpoint's (for
      GPT-2: its language model, unless config.json's architectures is
      GPT2ForSequenceClassification). A head of another size is initialized from `seed`.
    lora_rank: LoRA adapters of this rank on every attention and MLP projection (0: none).
    lora_alpha: the adapters' scale is lora_alpha / lora_rank.
    seed: initializes whatever the checkpoint does not hold (see HFInfo.reinitialized).

  Raises:
    DataNotFoundError: config.json or the weights are missing, or the weights lack (or
      have other shapes than config.json implies for) a tensor of the model's body.
    ConfigError: an unsupported model_type (or setting of it), or a bad num_labels.
  """
  config = _read_config(path)
  model = _build(config, path, num_labels, lora_rank, lora_alpha)
  tensors = _read_weights(path)
  arch = _arch_of_model(model)
  body_prefix = arch.prefix if any(name.startswith(arch.prefix) for name in tensors) else ""
  shapes = jax.eval_shape(model.init, jax.random.key(seed), _dummy_input(model))["params"]
  shapes = flax.traverse_util.flatten_dict(shapes, sep="/")
  params, used, reinitialized, missing = {}, set(), [], []
  rows = _leaf_rows(model, shapes)
  for leaf_path, shape in shapes.items():
    if leaf_path not in rows:  # a LoRA adapter
      reinitialized.append(leaf_path)
      continue
    row, leaf = rows[leaf_path]
    name = row.hf_name(leaf, body_prefix)
    stored = tensors.get(name)
    expected = list(np.shape(row.to_hf(leaf, np.empty(shape.shape, np.float32))))  # views: no copy
    expected[row.out_axis(leaf)] *= row.part[1]  # the whole fused tensor
    if stored is not None and stored.shape == tuple(expected):
      params[leaf_path] = jnp.asarray(row.to_flax(leaf, np.asarray(stored, np.float32), shape.shape))
      used.add(name)
    elif leaf_path.split("/")[0] in OPTIONAL_MODULES:
      reinitialized.append(leaf_path)
      why = "absent from the checkpoint" if stored is None else f"{name} has shape {stored.shape}"
      logging.warning("from_hf(%s): %s initialized from seed %d (%s; num_labels=%d).", path, leaf_path, seed, why,
                      model.num_labels)
    else:
      missing.append(f"{name} {'(absent)' if stored is None else f'has shape {stored.shape}'}")
  if missing:
    raise DataNotFoundError(f"Hugging Face checkpoint {path!r} does not match its {CONFIG}: {len(missing)} tensors of "
                            f"the model's body are wrong, e.g. {'; '.join(missing[:3])}.")
  if reinitialized:
    params.update(_initialize(model, jax.random.key(seed), tuple(reinitialized)))
  if model.lora_rank:
    logging.info("from_hf(%s): LoRA adapters of rank %d on %d projections, initialized from seed %d (lora_b = 0).",
                 path, model.lora_rank, sum(p.endswith("lora_a") for p in reinitialized), seed)
  unused = sorted(set(tensors) - used)
  if unused:
    logging.info("from_hf(%s): %d checkpoint tensors unused by %s, e.g. %s.", path, len(unused),
                 _transformers_class(model), ", ".join(unused[:3]))
  tokenizer = files.path(path).joinpath("tokenizer.json")
  info = HFInfo(model_type=config["model_type"], config=config, path=str(path),
                pad_token_id=getattr(model, "pad_token_id", 0), num_labels=model.num_labels,
                reinitialized=reinitialized, architecture=_transformers_class(model), unused=unused,
                tokenizer=str(tokenizer) if tokenizer.exists() else None)
  return model, {"params": flax.traverse_util.unflatten_dict(params, sep="/")}, info


def merge_lora(model: nn.Module, params: PyTree) -> dict[str, np.ndarray]:
  """Flat params ('layer_0/attention/query/kernel': array) with every LoRA adapter merged
  into its kernel, kernel + (alpha / rank) * (lora_a @ lora_b) reshaped to the kernel, and
  the adapters dropped: the plain model that computes what the adapted one does."""
  flat = {k: np.asarray(v, np.float32) for k, v in flax.traverse_util.flatten_dict(params, sep="/").items()}
  merged = {}
  for path, value in flat.items():
    module, leaf = path.rsplit("/", 1) if "/" in path else ("", path)
    if leaf in ("lora_a", "lora_b"):
      continue
    if leaf == "kernel" and f"{module}/lora_a" in flat:
      delta = flat[f"{module}/lora_a"] @ flat[f"{module}/lora_b"]
      value = value + (model.lora_alpha / model.lora_rank) * delta.reshape(value.shape)
    merged[path] = value
  return merged


def to_hf(model: nn.Module, variables: dict, path: str, like: str) -> None:
  """Writes `variables` of a `from_hf` model as a checkpoint transformers loads.

  `path` gets model.safetensors (PyTorch names and layouts of the transformers class in
  HFInfo.architecture, LoRA adapters merged into their kernels), config.json (`like`'s,
  with `architectures` and, if the head changed, num_labels / id2label / label2id
  updated) and `like`'s tokenizer and preprocessor files, if it has them.

  Args:
    model: the Flax model `from_hf` returned (LoRA or not, any num_labels).
    variables: its variables {'params': ...} (a soup, a fine-tuned or fused model).
    path: the output directory (local or gs://), created if needed.
    like: the checkpoint the model came from (for its config and tokenizer). A GPT-2
      classifier is written with like's pad_token_id: transformers needs one (GPT-2 has
      none) to find the last real token of a padded batch.

  Raises:
    ConfigError: `model` is not the architecture `like`'s config.json describes.
  """
  config = _read_config(like)
  expected = _build(config, like, model.num_labels, model.lora_rank, model.lora_alpha)
  fields = [f.name for f in dataclasses.fields(expected) if f.name not in ("parent", "name", "channels_last")]
  differ = [f"{f}={getattr(model, f)!r} (like: {getattr(expected, f)!r})" for f in fields
            if getattr(model, f) != getattr(expected, f)]
  if type(model) is not type(expected) or differ:  # pylint: disable=unidiomatic-typecheck
    raise ConfigError(f"to_hf: the model is not the {config.get('model_type')} of like={like!r}: "
                      f"{type(model).__name__} vs {type(expected).__name__}; {', '.join(differ) or 'same settings'}.")
  flat = merge_lora(model, variables["params"])
  parts: dict[str, list[tuple[int, np.ndarray]]] = {}
  axes = {}
  for leaf_path, (row, leaf) in _leaf_rows(model, flat).items():
    name = row.hf_name(leaf, _arch_of_model(model).prefix)
    parts.setdefault(name, []).append((row.part[0], row.to_hf(leaf, flat[leaf_path])))
    axes[name] = row.out_axis(leaf)
  tensors = {name: np.ascontiguousarray(np.concatenate([v for _, v in sorted(p, key=lambda x: x[0])], axis=axes[name]))
             for name, p in parts.items()}
  out = files.path(path)
  files.write_bytes(out / WEIGHTS, safetensors.numpy.save(tensors, metadata={"format": "pt"}))
  config = {**config, "architectures": [_transformers_class(model)]}
  if model.num_labels and model.num_labels != _config_num_labels(config):
    config.pop("num_labels", None)
    config["id2label"] = {str(i): f"LABEL_{i}" for i in range(model.num_labels)}
    config["label2id"] = {f"LABEL_{i}": i for i in range(model.num_labels)}
  files.write_json(out / CONFIG, config)
  for name in COMPANION_FILES:
    source = files.path(like).joinpath(name)
    if source.exists():
      files.write_bytes(out / name, source.read_bytes())
  logging.info("to_hf: wrote %s (%s, %d tensors%s) to %s.", WEIGHTS, _transformers_class(model), len(tensors),
               ", LoRA merged" if model.lora_rank else "", path)
