"""Flax versions of the Hugging Face models that pretrained fusion starts from: BERT and
RoBERTa sequence classifiers, GPT-2 (language model or sequence classifier) and the ViT
image classifier.

They compute what `transformers` computes for the same weights and inputs (float32, no
dropout: train=True changes nothing), so a checkpoint loaded by `tna_jax.fusion.hf` gives
the logits PyTorch gives. The parameter trees are the library's own, not PyTorch's names
(`fusion.hf` maps between them), shaped so the rest of tna_jax works on them unchanged:

- every model has `embeddings`, blocks `layer_{i}` (0-based) with `attention/{query, key,
  value, output}`, `attention_norm`, `mlp/{intermediate, output}` and `mlp_norm`, and the
  classifier at the top-level key `head` (BERT's `pooler` sits outside it: it was
  pretrained, the head is not), so `bases.graft`'s '^head/' and `finetune.trainable`
  'lora|head' mean what they mean for the library's own models;
- the projections are `transformer_models.LoRADense` (query/key/value kernels
  [width, heads, head_dim], the attention output [heads, head_dim, width]), so LoRA
  adapters (`lora_a`, `lora_b`, `lora_rank`, `lora_alpha`) sit on the attention and MLP
  projections exactly as in the library's own transformers, and the permutation specs
  (`alignment.permutations`) see heads and head dimensions as separate axes.

Block order: BERT and RoBERTa are post-LayerNorm (x = LN(x + f(x)); `attention_norm` is
HF's attention.output.LayerNorm, `mlp_norm` its output.LayerNorm); GPT-2 and ViT are
pre-LayerNorm (x = x + f(LN(x)); `attention_norm` is ln_1 / layernorm_before).

Text inputs (`token_inputs`): integer ids with an attention mask, as `transformers` takes
them; or, without a mask, ids where negative values mark padding, as integers or as the
floats `data.normalize` makes of stored int32 ids (mean 0, std 1/255), rounded back. That
is how `train.fit` and `evaluate` call models (`model.apply(variables, x, train=...)`), so
tokenized datasets go through them unchanged.
"""

import functools
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from tna_jax.core.transformer_models import LoRADense, attend
from tna_jax.errors import ConfigError, check_choice

# HF `hidden_act` / `activation_function` -> the function (transformers.activations).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": functools.partial(nn.gelu, approximate=False),  # erf, as torch.nn.functional.gelu
    "gelu_new": functools.partial(nn.gelu, approximate=True),  # tanh approximation (GPT-2)
    "gelu_pytorch_tanh": functools.partial(nn.gelu, approximate=True),
    "gelu_fast": functools.partial(nn.gelu, approximate=True),
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
    "tanh": jnp.tanh,
}


def token_inputs(input_ids: jax.Array, attention_mask: jax.Array | None,
                 pad_token_id: int) -> tuple[jax.Array, jax.Array]:
  """(int32 ids [B, L], bool mask [B, L] of real tokens) from what a text model is given.

  Without `attention_mask`, negative ids mark padding: they become `pad_token_id` and are
  masked out. Float ids (from `data.normalize`) are rounded first.
  """
  ids = jnp.round(input_ids) if jnp.issubdtype(input_ids.dtype, jnp.floating) else input_ids
  ids = ids.astype(jnp.int32).reshape(ids.shape[0], -1)
  if attention_mask is None:
    keep = ids >= 0
    return jnp.where(keep, ids, pad_token_id), keep
  return ids, attention_mask.reshape(ids.shape).astype(bool)


def _normal(stddev: float):
  return nn.initializers.normal(stddev)


def _check_length(length: int, limit: int, what: str) -> None:
  if length > limit:
    raise ConfigError(f"sequences of {length} tokens are longer than the checkpoint's {what} ({limit}); "
                      "truncate them.")


class SelfAttention(nn.Module):
  """Multi-head self-attention: query/key/value [width, heads, head_dim] and the output
  projection [heads, head_dim, width], each a LoRADense; keys outside `keep` (and, when
  causal, later positions) get the lowest logit, as transformers' additive mask does."""
  num_heads: int
  scale: float  # logits are q.k * scale
  causal: bool = False
  lora_rank: int = 0
  lora_alpha: float = 16.0

  @nn.compact
  def __call__(self, x: jax.Array, keep: jax.Array) -> jax.Array:
    width = x.shape[-1]
    lora = dict(lora_rank=self.lora_rank, lora_alpha=self.lora_alpha)
    heads = (self.num_heads, width // self.num_heads)
    q, k, v = (LoRADense(heads, name=name, **lora)(x) for name in ("query", "key", "value"))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * self.scale
    allowed = keep[:, None, None, :]
    if self.causal:
      length = x.shape[1]
      allowed = allowed & jnp.tril(jnp.ones((length, length), bool))
    return LoRADense((width,), in_dims=2, name="output", **lora)(attend(logits, v, allowed))


class Mlp(nn.Module):
  """intermediate (intermediate_size) -> activation -> output (back to the width)."""
  intermediate_size: int
  hidden_act: str
  lora_rank: int = 0
  lora_alpha: float = 16.0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    lora = dict(lora_rank=self.lora_rank, lora_alpha=self.lora_alpha)
    y = ACTIVATIONS[self.hidden_act](LoRADense((self.intermediate_size,), name="intermediate", **lora)(x))
    return LoRADense((x.shape[-1],), name="output", **lora)(y)


class Block(nn.Module):
  """One transformer layer, post-LN (BERT, RoBERTa) or pre-LN (GPT-2, ViT)."""
  num_heads: int
  intermediate_size: int
  hidden_act: str
  layer_norm_eps: float
  pre_norm: bool
  scale: float
  causal: bool = False
  lora_rank: int = 0
  lora_alpha: float = 16.0

  @nn.compact
  def __call__(self, x: jax.Array, keep: jax.Array) -> jax.Array:
    lora = dict(lora_rank=self.lora_rank, lora_alpha=self.lora_alpha)
    attention = SelfAttention(self.num_heads, self.scale, self.causal, name="attention", **lora)
    mlp = Mlp(self.intermediate_size, self.hidden_act, name="mlp", **lora)
    norms = [_layer_norm(self.layer_norm_eps, name) for name in ("attention_norm", "mlp_norm")]
    if self.pre_norm:
      x = x + attention(norms[0](x), keep)
      return x + mlp(norms[1](x))
    x = norms[0](x + attention(x, keep))
    return norms[1](x + mlp(x))


def _layer_norm(eps: float, name: str) -> nn.LayerNorm:
  # Two-pass variance, as torch: GPT-2's residual stream has entries in the hundreds.
  return nn.LayerNorm(epsilon=eps, use_fast_variance=False, name=name)


class _Transformer(nn.Module):
  """The hyperparameters every architecture reads from its config.json, and its blocks."""
  num_layers: int
  hidden_size: int
  num_heads: int
  intermediate_size: int
  hidden_act: str
  layer_norm_eps: float
  num_labels: int  # 0: no classification head (GPT-2's language model)
  initializer_range: float = 0.02
  lora_rank: int = 0
  lora_alpha: float = 16.0

  def __post_init__(self):
    check_choice("hidden_act", self.hidden_act, tuple(ACTIVATIONS))
    if self.hidden_size % self.num_heads:
      raise ConfigError(f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_heads}.")
    if self.lora_rank < 0:
      raise ConfigError(f"lora_rank={self.lora_rank!r} must be >= 0 (0 = no adapters).")
    super().__post_init__()

  def blocks(self, x: jax.Array, keep: jax.Array, pre_norm: bool, causal: bool = False,
             scale_by_layer: bool = False) -> jax.Array:
    """The `num_layers` blocks; logits scaled by 1/sqrt(head_dim) (and 1/(i + 1) when
    `scale_by_layer`, GPT-2's scale_attn_by_inverse_layer_idx)."""
    head_dim = self.hidden_size // self.num_heads
    for i in range(self.num_layers):
      scale = 1 / math.sqrt(head_dim) / ((i + 1) if scale_by_layer else 1)
      x = Block(self.num_heads, self.intermediate_size, self.hidden_act, self.layer_norm_eps, pre_norm, scale, causal,
                self.lora_rank, self.lora_alpha, name=f"layer_{i}")(x, keep)
    return x

  def dense(self, features: int, name: str, use_bias: bool = True) -> nn.Dense:
    """A pooler or head Dense, initialized as transformers initializes Linear layers."""
    return nn.Dense(features, use_bias=use_bias, kernel_init=_normal(self.initializer_range), name=name)


class BertEmbeddings(nn.Module):
  """word + position + token type embeddings, then LayerNorm (`norm`)."""
  vocab_size: int
  hidden_size: int
  max_positions: int
  type_vocab_size: int
  layer_norm_eps: float
  initializer_range: float

  @nn.compact
  def __call__(self, ids: jax.Array, positions: jax.Array, token_types: jax.Array) -> jax.Array:
    init = _normal(self.initializer_range)
    x = (nn.Embed(self.vocab_size, self.hidden_size, embedding_init=init, name="word")(ids)
         + nn.Embed(self.max_positions, self.hidden_size, embedding_init=init, name="position")(positions)
         + nn.Embed(self.type_vocab_size, self.hidden_size, embedding_init=init, name="token_type")(token_types))
    return _layer_norm(self.layer_norm_eps, "norm")(x)


class BertClassifier(_Transformer):
  """`BertForSequenceClassification`: post-LN encoder, `pooler` (tanh Dense on the [CLS]
  token's output), then `head`. Positions are 0..L-1."""
  vocab_size: int = 30522
  max_positions: int = 512
  type_vocab_size: int = 2
  pad_token_id: int = 0

  def positions(self, ids: jax.Array) -> jax.Array:
    _check_length(ids.shape[1], self.max_positions, "max_position_embeddings")
    return jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, train: bool = False, *,
               token_type_ids: jax.Array | None = None) -> jax.Array:
    """Logits [B, num_labels]; `token_type_ids` default to zeros, as in transformers."""
    del train  # No dropout: nothing behaves differently in training.
    ids, keep = token_inputs(input_ids, attention_mask, self.pad_token_id)
    types = jnp.zeros_like(ids) if token_type_ids is None else token_type_ids.reshape(ids.shape).astype(jnp.int32)
    x = BertEmbeddings(self.vocab_size, self.hidden_size, self.max_positions, self.type_vocab_size,
                       self.layer_norm_eps, self.initializer_range, name="embeddings")(ids, self.positions(ids), types)
    x = self.blocks(x, keep, pre_norm=False)
    return self.classify(x[:, 0])

  def classify(self, first: jax.Array) -> jax.Array:
    pooled = jnp.tanh(self.dense(self.hidden_size, "pooler")(first))
    return self.dense(self.num_labels, "head")(pooled)


class RobertaHead(nn.Module):
  """RoBERTa's classification head: dense -> tanh -> out_proj, on the <s> token."""
  hidden_size: int
  num_labels: int
  initializer_range: float

  @nn.compact
  def __call__(self, first: jax.Array) -> jax.Array:
    init = _normal(self.initializer_range)
    x = jnp.tanh(nn.Dense(self.hidden_size, kernel_init=init, name="dense")(first))
    return nn.Dense(self.num_labels, kernel_init=init, name="out_proj")(x)


class RobertaClassifier(BertClassifier):
  """`RobertaForSequenceClassification`: BERT's encoder with positions counted from
  pad_token_id + 1 over real tokens only (padding keeps position pad_token_id, as
  transformers' create_position_ids_from_input_ids), no pooler, and `RobertaHead`."""
  pad_token_id: int = 1

  def positions(self, ids: jax.Array) -> jax.Array:
    _check_length(ids.shape[1] + self.pad_token_id + 1, self.max_positions, "max_position_embeddings")
    real = (ids != self.pad_token_id).astype(jnp.int32)
    return jnp.cumsum(real, axis=1) * real + self.pad_token_id

  def classify(self, first: jax.Array) -> jax.Array:
    return RobertaHead(self.hidden_size, self.num_labels, self.initializer_range, name="head")(first)


class GPT2Embeddings(nn.Module):
  """Token (`word`, also the tied language-model head) plus position embeddings."""
  vocab_size: int
  hidden_size: int
  max_positions: int
  initializer_range: float

  def setup(self):
    init = _normal(self.initializer_range)
    self.word = nn.Embed(self.vocab_size, self.hidden_size, embedding_init=init)
    self.position = nn.Embed(self.max_positions, self.hidden_size, embedding_init=nn.initializers.normal(0.01))

  def __call__(self, ids: jax.Array) -> jax.Array:
    return self.word(ids) + self.position(jnp.arange(ids.shape[1])[None])

  def attend(self, x: jax.Array) -> jax.Array:
    """Vocabulary logits through the tied token embedding (GPT-2's lm_head)."""
    return self.word.attend(x)


class GPT2(_Transformer):
  """GPT-2: pre-LN causal blocks and a final `final_norm`.

  num_labels=0 is `GPT2LMHeadModel`: logits [B, L, vocab_size] from the tied token
  embedding. num_labels > 0 is `GPT2ForSequenceClassification`: `head` (no bias) on the
  output of each sequence's last real token (the rightmost one the mask keeps; transformers
  takes the rightmost token that is not pad_token_id, the same for padded batches).
  Positions are 0..L-1 whatever the mask, as in transformers.
  """
  vocab_size: int = 50257
  max_positions: int = 1024
  pad_token_id: int = 0
  scale_attn_by_inverse_layer_idx: bool = False

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, train: bool = False) -> jax.Array:
    del train  # No dropout: nothing behaves differently in training.
    ids, keep = token_inputs(input_ids, attention_mask, self.pad_token_id)
    _check_length(ids.shape[1], self.max_positions, "n_positions")
    embeddings = GPT2Embeddings(self.vocab_size, self.hidden_size, self.max_positions, self.initializer_range,
                                name="embeddings")
    x = self.blocks(embeddings(ids), keep, pre_norm=True, causal=True,
                    scale_by_layer=self.scale_attn_by_inverse_layer_idx)
    x = _layer_norm(self.layer_norm_eps, "final_norm")(x)
    if not self.num_labels:
      return embeddings.attend(x)
    last = jnp.max(jnp.where(keep, jnp.arange(ids.shape[1]), 0), axis=1)
    return self.dense(self.num_labels, "head", use_bias=False)(x[jnp.arange(x.shape[0]), last])


class ViTEmbeddings(nn.Module):
  """Patches (a strided conv, `patch`), the class token `cls_token` prepended, and
  `position_embeddings` [1, patches + 1, width] added."""
  hidden_size: int
  patch_size: int
  initializer_range: float

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    p = self.patch_size
    x = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding="VALID", name="patch")(x)
    x = x.reshape((x.shape[0], -1, self.hidden_size))
    init = nn.initializers.truncated_normal(self.initializer_range)
    cls = self.param("cls_token", init, (1, 1, self.hidden_size))
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.hidden_size)), x], axis=1)
    return x + self.param("position_embeddings", init, (1,) + x.shape[1:])


class ViT(_Transformer):
  """`ViTForImageClassification`: patch embedding, pre-LN blocks, `final_norm`, and `head`
  on the class token's output.

  Takes float pixels NCHW as transformers does (`channels_last=True`: NHWC, as
  `train.fit` feeds images). Images of another size are resized (bilinear) to
  `image_size`, as the checkpoint's image processor would, and one-channel images are
  repeated over the checkpoint's `num_channels` (grayscale as RGB); transformers itself
  refuses both.
  """
  image_size: int = 224
  patch_size: int = 16
  num_channels: int = 3
  channels_last: bool = False

  @nn.compact
  def __call__(self, pixel_values: jax.Array, train: bool = False) -> jax.Array:
    del train  # No dropout: nothing behaves differently in training.
    x = pixel_values if self.channels_last else jnp.moveaxis(pixel_values, 1, -1)
    if x.shape[-1] == 1 and self.num_channels > 1:
      x = jnp.repeat(x, self.num_channels, axis=-1)
    if x.shape[-1] != self.num_channels:
      raise ConfigError(f"images have {x.shape[-1]} channels but the checkpoint takes num_channels="
                        f"{self.num_channels}.")
    if x.shape[1:3] != (self.image_size, self.image_size):
      x = jax.image.resize(x, (x.shape[0], self.image_size, self.image_size, x.shape[-1]), "bilinear")
    x = ViTEmbeddings(self.hidden_size, self.patch_size, self.initializer_range, name="embeddings")(x)
    x = self.blocks(x, jnp.ones(x.shape[:2], bool), pre_norm=True)
    x = _layer_norm(self.layer_norm_eps, "final_norm")(x)
    return self.dense(self.num_labels, "head")(x[:, 0])
