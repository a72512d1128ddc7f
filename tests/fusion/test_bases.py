"""Where a fine-tuning base comes from: big_vision .npz files, orbax checkpoints, and
`graft` putting them on a model (tiny models; nothing is trained)."""

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tna_jax.core import data, models
from tna_jax.core.tree_utils import path_str
from tna_jax.errors import ConfigError, DataNotFoundError
from tna_jax.fusion import bases, big_vision_npz
from tna_jax.runs import checkpoints

IMAGE_SHAPE = (8, 8, 1)


def _vit(**knobs):
  config = {**dict(name="vit", patch_size=4, depth=1, width=16, num_heads=2, mlp_dim=32), **knobs}
  return models.get_model(ml_collections.ConfigDict(config), 5)


def _mlp():
  return models.get_model(ml_collections.ConfigDict(dict(name="mlp", depth=1, width=8)), 5)


def _random_params(model, shape=IMAGE_SHAPE, seed=0):
  """Random values of the model's parameter shapes, without compiling anything."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0), shape))["params"]
  return jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(np.float32), shapes)


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def _toy_dataset():
  images = np.zeros((4,) + IMAGE_SHAPE, np.uint8)
  return data.Dataset("toy", images, np.zeros(4, np.int32), images, np.zeros(4, np.int32), 5, (0.0,), (1.0,))


def _orbax_config(path, reinit="^head/"):
  return ml_collections.ConfigDict(dict(init_seed=0, base=dict(source="orbax", path=str(path), reinit=reinit)))


# ----------------------------------------------------------------------------- big_vision .npz


def test_big_vision_npz_round_trips(tmp_path):
  model = _vit(depth=2)
  params = _random_params(model)
  path = str(tmp_path / "vit.npz")
  big_vision_npz.save(path, params)
  loaded = big_vision_npz.load(path)
  _assert_trees_equal(loaded, jax.device_get(params))
  grafted = bases.graft(_random_params(model, seed=5), loaded, reinit="")
  _assert_trees_equal(grafted, params)


def test_big_vision_scanned_old_and_bfloat16_layouts_convert(tmp_path):
  params = _random_params(_vit(depth=2))
  flat = {path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(params)}
  # big_vision scan=True: one 'encoderblock' with a leading depth axis, under 'params/'.
  scanned = {k: v for k, v in flat.items() if "encoderblock_" not in k}
  for k in [k for k in flat if "encoderblock_0/" in k]:
    scanned[k.replace("encoderblock_0", "encoderblock")] = np.stack([flat[k], flat[k.replace("_0/", "_1/", 1)]])
  np.savez(tmp_path / "scan.npz", **{f"params/{k}": v for k, v in scanned.items()})
  _assert_trees_equal(big_vision_npz.load(str(tmp_path / "scan.npz")), params)
  # vit_jax: pre-linen numbering, posemb in Transformer/posembed_input, cls posemb folded in.
  renames = {"MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1", "LayerNorm_1": "LayerNorm_2",
             "MlpBlock_0": "MlpBlock_3"}
  old = {}
  for k, v in flat.items():
    for new_name, old_name in renames.items():
      k = k.replace(f"/{new_name}/", f"/{old_name}/")
    old[k] = v
  cls_pos = np.full((1, 1, 16), 0.25, np.float32)
  old["Transformer/posembed_input/pos_embedding"] = np.concatenate([cls_pos, old.pop("pos_embedding")], axis=1)
  old["cls"] = old["cls"] - cls_pos
  np.savez(tmp_path / "old.npz", **old)
  loaded = big_vision_npz.load(str(tmp_path / "old.npz"))
  chex.assert_trees_all_close(loaded, params, rtol=1e-6, atol=1e-7)
  # bfloat16 stored as 2-byte voids.
  kernel = np.asarray(jnp.asarray(flat["head/kernel"], jnp.bfloat16))
  np.savez(tmp_path / "bf16.npz", **{"head/kernel": kernel.view("V2")})
  np.testing.assert_array_equal(big_vision_npz.load(str(tmp_path / "bf16.npz"))["head"]["kernel"],
                                kernel.astype(np.float32))


def test_a_missing_or_corrupt_npz_is_a_data_error(tmp_path):
  with pytest.raises(DataNotFoundError, match="is not a file"):
    big_vision_npz.load(str(tmp_path / "missing.npz"))
  (tmp_path / "broken.npz").write_bytes(b"not a zip archive")
  with pytest.raises(DataNotFoundError, match="not a readable .npz file"):
    big_vision_npz.load(str(tmp_path / "broken.npz"))


# ----------------------------------------------------------------------------- graft


def test_graft_keeps_the_reinit_paths_resamples_posemb_and_names_misfits():
  small, big = _vit(), _vit(width=32)
  source = _random_params(small, seed=1)
  target = _random_params(small, seed=2)
  grafted = bases.graft(target, source)  # default: the head keeps its initialization
  _assert_trees_equal(grafted["head"], target["head"])
  _assert_trees_equal(grafted["Transformer"], source["Transformer"])
  # A 16x16 image has a 4x4 patch grid: the 2x2 position embeddings are resized to it.
  bigger_grid = bases.graft(_random_params(small, shape=(16, 16, 1)), source)
  assert bigger_grid["pos_embedding"].shape == (1, 16, 16)
  np.testing.assert_allclose(bigger_grid["pos_embedding"].mean(), source["pos_embedding"].mean(), atol=1e-5)
  with pytest.raises(ConfigError, match=r"encoder_norm/bias has shape \(16,\), the model needs \(32,\).*and \d+ more"):
    bases.graft(_random_params(big), source)
  with pytest.raises(ConfigError, match="lora_a is missing.*base.reinit"):
    bases.graft(_random_params(_vit(lora_rank=2)), source)


def test_graft_reinit_regex_decides_leaf_by_leaf():
  source, target = _random_params(_vit(), seed=1), _random_params(_vit(), seed=2)
  reinit = "^head/|encoder_norm/scale$"
  grafted = bases.graft(target, source, reinit=reinit)
  for (path, value), src, tgt in zip(jax.tree_util.tree_leaves_with_path(grafted), jax.tree.leaves(source),
                                     jax.tree.leaves(target)):
    kept = path_str(path).startswith("head/") or path_str(path) == "Transformer/encoder_norm/scale"
    np.testing.assert_array_equal(value, tgt if kept else src, err_msg=path_str(path))
  _assert_trees_equal(bases.graft(target, source, reinit="."), target)  # every path matches: nothing taken
  with pytest.raises(ConfigError, match=r"base.reinit='\[' is not a valid regular expression"):
    bases.graft(target, source, reinit="[")


# ----------------------------------------------------------------------------- sources


def test_an_orbax_base_lands_on_the_model_with_a_fresh_head(tmp_path):
  model = _mlp()
  saved = {"params": _random_params(model, seed=4)}
  checkpoints.save(str(tmp_path / "ckpt"), saved)
  config = _orbax_config(tmp_path / "ckpt")
  body = bases.load_source(config)
  _assert_trees_equal(body["params"], saved["params"])
  assert bases.load_source(ml_collections.ConfigDict(dict(base=dict(source="init", path="")))) is None
  base = bases.load_base(config, model, _toy_dataset(), body)
  fresh = models.init_variables(model, jax.random.key(0), IMAGE_SHAPE)["params"]
  _assert_trees_equal(base["params"]["fc1"], saved["params"]["fc1"])
  _assert_trees_equal(base["params"]["head"], fresh["head"])
  _assert_trees_equal(bases.load_base(config, model, _toy_dataset()), base)  # reads the source itself
  config.base.path = str(tmp_path / "missing")
  with pytest.raises(DataNotFoundError, match="not an orbax checkpoint directory"):
    bases.load_base(config, model, _toy_dataset())


def test_an_init_base_is_the_seeded_initialization_and_pretrain_needs_a_run():
  model = _mlp()
  config = ml_collections.ConfigDict(dict(init_seed=3, base=dict(source="init", path="", reinit="^head/")))
  _assert_trees_equal(bases.load_base(config, model, _toy_dataset()),
                      models.init_variables(model, jax.random.key(3), IMAGE_SHAPE))
  config.base.source = "pretrain"
  with pytest.raises(ValueError, match="pass `run`"):
    bases.load_base(config, model, _toy_dataset())
  config.base.source = "hub"
  with pytest.raises(ConfigError, match="base.source='hub' is not supported"):
    bases.load_source(config)
