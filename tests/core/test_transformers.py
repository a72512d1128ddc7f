"""ViT and text encoder, LoRA adapters and their masks (base sources: test_bases.py)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tna_jax.core import data, masks, models, optim, text_data, train, transformer_models
from tna_jax.core.tree_utils import path_str
from tna_jax.errors import ConfigError, DataNotFoundError
from tna_jax.fusion import bases

IMAGE_SHAPE = (8, 8, 1)


def _vit(**knobs):
  config = {**dict(name="vit", patch_size=4, depth=1, width=16, num_heads=2, mlp_dim=32), **knobs}
  return models.get_model(ml_collections.ConfigDict(config), 5)


def _shapes(model, shape=IMAGE_SHAPE):
  return jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0), shape))["params"]


def _random_params(model, shape=IMAGE_SHAPE, seed=0):
  """Random values of the model's parameter shapes, without compiling anything."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(np.float32), _shapes(model, shape))


def _init(model, shape=IMAGE_SHAPE, seed=0):
  # Compiled: eager initialization would compile every small op of the model one by one.
  return jax.jit(lambda key: models.init_variables(model, key, shape))(jax.random.key(seed))


def _paths(params):
  return {path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)}


def _images(n=6, seed=1):
  return jax.random.normal(jax.random.key(seed), (n,) + IMAGE_SHAPE)


@pytest.mark.parametrize("pool", ["tok", "gap"])
def test_vit_has_big_vision_names_and_pools(pool):
  model = _vit(pool=pool, depth=2)
  params = _shapes(model)
  paths = _paths(params)
  assert {"embedding/kernel", "pos_embedding", "head/kernel", "Transformer/encoder_norm/scale",
          "Transformer/encoderblock_1/MultiHeadDotProductAttention_0/query/kernel",
          "Transformer/encoderblock_1/MlpBlock_0/Dense_1/kernel"} <= paths
  assert ("cls" in paths) == (pool == "tok")
  assert params["pos_embedding"].shape == (1, 4, 16)  # 8x8 image, 4x4 patches
  assert params["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_0"]["out"]["kernel"].shape == (2, 8, 16)
  assert jax.eval_shape(lambda p, x: model.apply({"params": p}, x, train=True), params, _images()).shape == (6, 5)


def test_attention_matches_flax_multi_head_attention_with_the_same_params():
  # The layout big_vision checkpoints use: loading them is only correct if the math agrees.
  x = jax.random.normal(jax.random.key(0), (3, 7, 16))
  ours = transformer_models.Attention(num_heads=4)
  params = ours.init(jax.random.key(1), x, None)
  reference = nn.MultiHeadDotProductAttention(num_heads=4)
  np.testing.assert_allclose(ours.apply(params, x, None), reference.apply(params, x, x), rtol=1e-5, atol=1e-5)


def test_lora_starts_as_the_base_model_and_adds_a_low_rank_update():
  plain, lora = _vit(), _vit(lora_rank=2, lora_alpha=4.0)
  base = _random_params(plain)
  initialized = _init(lora)["params"]
  assert not np.any(initialized["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["lora_b"])
  with_lora = bases.graft(initialized, base, reinit="lora")
  x = _images()
  lora_apply = jax.jit(lambda p: lora.apply({"params": p}, x, train=False))
  plain_apply = jax.jit(lambda p: plain.apply({"params": p}, x, train=False))
  np.testing.assert_allclose(lora_apply(with_lora), plain_apply(base), rtol=1e-6, atol=1e-6)
  # A nonzero adapter equals merging (alpha / rank) * A @ B into the kernel.
  dense = with_lora["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]
  dense["lora_b"] = jax.random.normal(jax.random.key(3), dense["lora_b"].shape)
  merged = jax.tree.map(lambda p: p, base)
  merged_dense = merged["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]
  merged_dense["kernel"] = merged_dense["kernel"] + 2.0 * dense["lora_a"] @ dense["lora_b"]
  np.testing.assert_allclose(lora_apply(with_lora), plain_apply(merged), rtol=1e-4, atol=1e-5)
  assert not np.allclose(plain_apply(merged), plain_apply(base), atol=1e-3)


def test_lora_finetuning_with_a_mask_on_the_adapters_only():
  # 'gap': with 'tok', depth 1 and a frozen zero class token, its query is 0 and keys get no gradient.
  model = _vit(lora_rank=2, depth=1, pool="gap")
  variables = _init(model)
  params = variables["params"]
  frozen = masks.frozen_except(params, "lora|head")
  tna = masks.fixed_mask(params, 0.5, seed=0, include="lora")
  fixed = jax.tree.map(jnp.logical_or, frozen, tna)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (128,) + IMAGE_SHAPE, dtype=np.uint8)
  labels = (images.reshape(128, -1)[:, :5].argmax(1)).astype(np.int32)
  opt = ml_collections.ConfigDict(dict(name="adamw", learning_rate=1e-2, weight_decay=1e-2))
  tx = optim.make_optimizer(opt, 8)
  epoch = jax.jit(train.make_epoch_fn(model, tx, batch_size=32, mean=(0.5,), std=(0.3,)))
  state = train.init_train_state(tx, variables, fixed)
  for e in range(2):
    state, _ = epoch(state, jax.random.key(e), jnp.asarray(images), jnp.asarray(labels))
  after = state.params
  paths = [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  for path, p0, p1, f, t in zip(paths, *(jax.tree.leaves(tree) for tree in (params, after, fixed, tna))):
    p0, p1, f, t = (np.asarray(v) for v in (p0, p1, f, t))
    np.testing.assert_array_equal(p0[f].view(np.uint32), p1[f].view(np.uint32))
    if "lora" in path:
      assert 0.3 < t.mean() < 0.7, path  # the TNA mask lives on the adapters ...
      assert (p0[~f] != p1[~f]).mean() > 0.5, path  # ... whose other entries train
    else:
      assert not t.any(), path  # ... and nowhere else
      assert f.all() == (not path.startswith("head/")), path


def test_text_transformer_reads_normalized_byte_ids_and_ignores_padding():
  model = models.get_model(ml_collections.ConfigDict(dict(name="text_transformer", depth=1, width=16, num_heads=2,
                                                          pool="gap")), 3)
  apply = jax.jit(lambda params, x: model.apply({"params": params}, x, train=False))
  ids = np.zeros((256, 8), np.uint8)
  ids[:, 0] = np.arange(256)  # every byte value once; row 0 starts with padding
  ids[:, 1] = 65
  params = _random_params(model, (8,))
  as_floats = data.normalize(ids, text_data.TOKEN_MEAN, text_data.TOKEN_STD)
  assert not np.array_equal(as_floats, ids)  # not exact: the model rounds them back to ids
  out = apply(params, as_floats)
  np.testing.assert_allclose(out, apply(params, jnp.asarray(ids, jnp.float32)), rtol=1e-6)

  def moved(positions):  # position embeddings changed at `positions` (not by a constant: LayerNorm hides that)
    noise = jax.random.normal(jax.random.key(7), params["pos_embedding"].shape)
    return {**params, "pos_embedding": jnp.asarray(params["pos_embedding"]).at[:, positions].add(noise[:, positions])}

  # Padding (every position from 2 on) is masked out of attention and pooling.
  np.testing.assert_allclose(apply(moved(slice(2, None)), as_floats), out, rtol=1e-5, atol=1e-5)
  assert not np.allclose(apply(moved(slice(1, 2)), as_floats), out, atol=1e-3)  # position 1 is a real token


def test_encode_glue_texts_and_missing_glue_is_a_clear_error(tmp_path):
  encoded = text_data.encode([("ab", "c"), ("é\0",)], 4)
  np.testing.assert_array_equal(encoded, [[97, 98, text_data.SEP, 99], [0xC3, 0xA9, 32, 0]])
  with pytest.raises(DataNotFoundError, match=r"glue/sst2.*tfds build glue/sst2"):
    text_data.load_glue("sst2", str(tmp_path), 16)
  with pytest.raises(ConfigError, match="allowed: cola"):
    text_data.load_glue("stsb", str(tmp_path), 16)


def test_bad_knobs_are_config_errors():
  with pytest.raises(ConfigError, match="model.pool='cls'.*tok, gap"):
    _vit(pool="cls")
  with pytest.raises(ConfigError, match="not divisible"):
    _shapes(_vit(width=15, num_heads=2))
  with pytest.raises(ConfigError, match="matches no parameter"):
    masks.frozen_except(_shapes(_vit()), "lora")
