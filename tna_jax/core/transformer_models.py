"""Transformers for the foundation-model experiments: a ViT and a text encoder, with LoRA.

Parameter names follow big_vision's ViT (`embedding`, `pos_embedding`, `cls`,
`Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1,
MlpBlock_0/Dense_{0,1}}`, `Transformer/encoder_norm`, `head`), so a big_vision checkpoint
maps onto these modules by name (`big_vision_npz.load`) and the classifier is
`head` as in every model of `tna_jax.core.models`.

Every Dense layer of the encoder (attention query/key/value/out and the MLP) can carry a
LoRA adapter: `lora_a` [fan_in, rank] and `lora_b` [rank, fan_out] (zero at init, so the
adapter starts as the identity change), added as `(alpha / rank) * x @ lora_a @ lora_b`.
Because the adapters are ordinary parameters whose paths contain 'lora', LoRA fine-tuning
and TNA-PFN on the adapters alone are both plain masks:
`masks.frozen_except(params, 'lora|head')` freezes the pretrained weights, and
`masks.fixed_mask(params, f, include='lora')` draws the anchors among the adapter entries only.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from tna_jax.errors import ConfigError, check_choice

PyTree = Any
POOLS = ("tok", "gap")  # class token (big_vision 'tok') or mean over tokens ('gap')
PAD_ID = 0  # byte 0 pads token sequences; attention and mean pooling ignore it


class LoRADense(nn.Module):
  """Dense over the last `in_dims` input axes onto `features`, with an optional LoRA adapter.

  Covers flax's Dense (in_dims=1, features=(n,)) and the DenseGeneral projections of
  multi-head attention (query: features=(heads, head_dim); out: in_dims=2), with the same
  parameter shapes, so pretrained kernels load unchanged. Kernels are initialized as the
  flattened [fan_in, fan_out] matrix (xavier uniform, as big_vision), whatever their shape.
  """
  features: tuple[int, ...]
  in_dims: int = 1
  lora_rank: int = 0
  lora_alpha: float = 1.0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_shape = x.shape[x.ndim - self.in_dims:]
    fan_in, fan_out = math.prod(in_shape), math.prod(self.features)
    xavier = nn.initializers.xavier_uniform()
    kernel = self.param("kernel", lambda key, shape: xavier(key, (fan_in, fan_out)).reshape(shape),
                        in_shape + tuple(self.features))
    bias = self.param("bias", nn.initializers.zeros, tuple(self.features))
    y = jnp.tensordot(x, kernel, axes=self.in_dims) + bias
    if self.lora_rank:
      lora_a = self.param("lora_a", nn.initializers.lecun_normal(), (fan_in, self.lora_rank))
      lora_b = self.param("lora_b", nn.initializers.zeros, (self.lora_rank, fan_out))
      flat = x.reshape(x.shape[:x.ndim - self.in_dims] + (fan_in,))
      y = y + ((flat @ lora_a) @ lora_b).reshape(y.shape) * (self.lora_alpha / self.lora_rank)
    return y


class Attention(nn.Module):
  """Multi-head self-attention with flax's parameter layout (query/key/value/out)."""
  num_heads: int
  lora_rank: int = 0
  lora_alpha: float = 1.0

  @nn.compact
  def __call__(self, x: jax.Array, keep: jax.Array | None) -> jax.Array:
    width = x.shape[-1]
    if width % self.num_heads:
      raise ConfigError(f"model.width={width} is not divisible by model.num_heads={self.num_heads}.")
    lora = dict(lora_rank=self.lora_rank, lora_alpha=self.lora_alpha)
    heads = (self.num_heads, width // self.num_heads)
    q, k, v = (LoRADense(heads, name=name, **lora)(x) for name in ("query", "key", "value"))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(heads[1]).astype(x.dtype)
    allowed = None if keep is None else keep[:, None, None, :]  # [B, L]: keys that are real tokens
    return LoRADense((width,), in_dims=2, name="out", **lora)(attend(logits, v, allowed))


def attend(logits: jax.Array, v: jax.Array, allowed: jax.Array | None) -> jax.Array:
  """Softmax attention of logits [B, H, Lq, Lk] over values [B, Lk, H, D] -> [B, Lq, H, D]; keys
  where `allowed` (broadcast to the logits) is False get no weight. Shared by this module's
  encoder and the Hugging Face models (`hf_models`), which differ only in how they scale and
  mask the logits."""
  if allowed is not None:
    logits = jnp.where(allowed, logits, jnp.finfo(logits.dtype).min)
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)


class EncoderBlock(nn.Module):
  """Pre-norm block: x + attention(LN(x)), then x + MLP(LN(x)) (gelu), as big_vision."""
  num_heads: int
  mlp_dim: int
  lora_rank: int = 0
  lora_alpha: float = 1.0

  @nn.compact
  def __call__(self, x: jax.Array, keep: jax.Array | None) -> jax.Array:
    lora = dict(lora_rank=self.lora_rank, lora_alpha=self.lora_alpha)
    y = nn.LayerNorm(name="LayerNorm_0")(x)
    x = x + Attention(self.num_heads, name="MultiHeadDotProductAttention_0", **lora)(y, keep)
    y = nn.LayerNorm(name="LayerNorm_1")(x)
    return x + MlpBlock(self.mlp_dim, name="MlpBlock_0", **lora)(y)


class MlpBlock(nn.Module):
  """Dense_0 (mlp_dim) -> gelu -> Dense_1 (back to the input width)."""
  mlp_dim: int
  lora_rank: int = 0
  lora_alpha: float = 1.0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    lora = dict(lora_rank=self.lora_rank, lora_alpha=self.lora_alpha)
    y = nn.gelu(LoRADense((self.mlp_dim,), name="Dense_0", **lora)(x))
    return LoRADense((x.shape[-1],), name="Dense_1", **lora)(y)


class Encoder(nn.Module):
  """`depth` blocks (`encoderblock_{i}`, 0-based as big_vision) and a final `encoder_norm`."""
  depth: int
  num_heads: int
  mlp_dim: int
  lora_rank: int = 0
  lora_alpha: float = 1.0

  @nn.compact
  def __call__(self, x: jax.Array, keep: jax.Array | None = None) -> jax.Array:
    for i in range(self.depth):
      x = EncoderBlock(self.num_heads, self.mlp_dim, self.lora_rank, self.lora_alpha, name=f"encoderblock_{i}")(x, keep)
    return nn.LayerNorm(name="encoder_norm")(x)


def _pool(x: jax.Array, pool: str, keep: jax.Array | None) -> jax.Array:
  """The class token's output, or the mean over (non-padding) tokens."""
  if pool == "tok":
    return x[:, 0]
  if keep is None:
    return jnp.mean(x, axis=1)
  weights = keep.astype(x.dtype)[..., None]
  return jnp.sum(x * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)


class _Classifier(nn.Module):
  """What the ViT and the text encoder share: from embedded tokens [B, L, width] on,
  position embedding, class token, encoder, pooling and the `head`."""
  num_classes: int
  depth: int = 6
  width: int = 192
  num_heads: int = 3
  mlp_dim: int = 0  # 0 = 4 * width
  pool: str = "tok"
  lora_rank: int = 0
  lora_alpha: float = 16.0

  def __post_init__(self):
    check_choice("model.pool", self.pool, POOLS)
    for knob in ("depth", "width", "num_heads") + (("patch_size",) if hasattr(self, "patch_size") else ()):
      if getattr(self, knob) < 1:
        raise ConfigError(f"model.{knob}={getattr(self, knob)!r} must be >= 1.")
    if self.lora_rank < 0:
      raise ConfigError(f"model.lora_rank={self.lora_rank!r} must be >= 0 (0 = no adapters).")
    super().__post_init__()

  def classify(self, x: jax.Array, keep: jax.Array | None) -> jax.Array:
    """Logits of embedded tokens `x`; `keep` [B, L] marks real tokens (None: all are).

    As in big_vision, the position embedding is added before the class token (`cls`,
    zero init) is prepended.
    """
    x = x + self.param("pos_embedding", nn.initializers.normal(1 / math.sqrt(self.width)), (1,) + x.shape[1:])
    if self.pool == "tok":
      cls = self.param("cls", nn.initializers.zeros, (1, 1, x.shape[-1]))
      x = jnp.concatenate([jnp.tile(cls, (x.shape[0], 1, 1)), x], axis=1)
      if keep is not None:
        keep = jnp.concatenate([jnp.ones((keep.shape[0], 1), bool), keep], axis=1)
    x = Encoder(self.depth, self.num_heads, self.mlp_dim or 4 * self.width, self.lora_rank, self.lora_alpha,
                name="Transformer")(x, keep)
    return nn.Dense(self.num_classes, name="head")(_pool(x, self.pool, keep))


class ViT(_Classifier):
  """Vision transformer: a patchify conv (`embedding`), then `_Classifier.classify`.

  Inputs are float NHWC images; a side not divisible by `patch_size` drops its remainder.
  """
  patch_size: int = 4

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    del train  # No dropout: nothing behaves differently in training.
    p = self.patch_size
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", name="embedding")(x)
    return self.classify(x.reshape((x.shape[0], -1, self.width)), None)


class TextTransformer(_Classifier):
  """Transformer text encoder with a classification head, over byte (or any integer) ids.

  Takes ids [B, L] as integers, or as the floats that `data.normalize` makes of uint8 ids
  stored with mean 0 and std 1/255 (`text_data`), which it rounds back: that lets text
  datasets go through `train.fit` and `evaluate` unchanged. PAD_ID tokens are masked out
  of attention and of mean pooling.
  """
  vocab_size: int = 256

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    del train  # No dropout: nothing behaves differently in training.
    ids = jnp.round(x).astype(jnp.int32) if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.int32)
    ids = ids.reshape(ids.shape[0], -1)
    return self.classify(nn.Embed(self.vocab_size, self.width, name="embedding")(ids), ids != PAD_ID)


_KNOBS = ("depth", "width", "num_heads", "mlp_dim", "pool", "lora_rank", "lora_alpha")
# name -> (class, config knobs it reads); missing knobs keep the class defaults.
_REGISTRY = {
    "vit": (ViT, ("patch_size",) + _KNOBS),
    "text_transformer": (TextTransformer, ("vocab_size",) + _KNOBS),
}
MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)
# The model.* config keys each model reads (config.schema: which keys apply to a model).
KNOBS: dict[str, tuple[str, ...]] = {name: knobs for name, (_, knobs) in _REGISTRY.items()}


def get_model(model_config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
  """The transformer named `model_config.name`; `models.get_model` delegates here."""
  name = model_config.get("name")
  check_choice("model.name", name, MODEL_NAMES)
  cls, knobs = _REGISTRY[name]
  kwargs = {k: model_config.get(k) for k in knobs if model_config.get(k) is not None}
  return cls(num_classes=num_classes, **kwargs)
