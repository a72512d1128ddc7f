"""Hugging Face checkpoints in and out (`tna_jax.fusion.hf`), against transformers itself.

transformers builds tiny randomly initialized models from configs (2 layers, width 32) and
saves them offline; the Flax models must give PyTorch's logits on padded batches, write
checkpoints that transformers loads back to the same logits (LoRA merged), and have the
permutation symmetries their specs claim.
"""

import copy
import functools
import json
import logging

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

import tna_jax as tj
from tna_jax.alignment import interpolation, matching, permutations
from tna_jax.core import data, hf_models, tree_utils
from tna_jax.errors import ConfigError, DataNotFoundError
from tna_jax.fusion import hf

VOCAB, LENGTH, PAD = 100, 7, {"roberta": 1, "bert": 0, "gpt2": 0}
PERM_SEED = 0  # moves every unit group of the four models (checked in the test)
# Weights ~ N(0, 0.3) rather than transformers' 0.02, so attention is far from uniform,
# activations far from linear and logits of order 1: parity then means something.
INIT = 0.3
_COMMON = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=37,
               initializer_range=INIT)


def _transformers_models() -> dict:
  torch.manual_seed(0)
  return {
      "roberta": transformers.RobertaForSequenceClassification(
          transformers.RobertaConfig(vocab_size=VOCAB, max_position_embeddings=20, num_labels=3, **_COMMON)),
      "bert": transformers.BertForSequenceClassification(
          transformers.BertConfig(vocab_size=VOCAB, max_position_embeddings=20, num_labels=3, **_COMMON)),
      "gpt2": transformers.GPT2LMHeadModel(
          transformers.GPT2Config(vocab_size=VOCAB, n_positions=20, n_embd=32, n_layer=2, n_head=4, pad_token_id=0,
                                  bos_token_id=0, eos_token_id=0, initializer_range=INIT)),
      "vit": transformers.ViTForImageClassification(
          transformers.ViTConfig(image_size=16, patch_size=4, num_labels=3, **_COMMON)),
  }


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
  """name -> (directory, the transformers model in eval mode), saved once."""
  root = tmp_path_factory.mktemp("hf")
  out = {}
  for name, model in _transformers_models().items():
    model.eval()
    model.save_pretrained(root / name)
    out[name] = (str(root / name), model)
  return out


def _batch(name: str) -> dict:
  """Inputs for `name`: three sequences of lengths 7, 5 and 3 (padded with the checkpoint's
  pad id, and the mask; GPT-2 on the left, or its causal mask would hide the padding from
  every real token), or two 16 x 16 RGB images, NCHW."""
  rng = np.random.default_rng(0)
  if name == "vit":
    return {"pixel_values": rng.normal(size=(2, 3, 16, 16)).astype(np.float32)}
  lengths = np.array([[7], [5], [3]])
  position = np.arange(LENGTH)[None]
  mask = (position >= LENGTH - lengths if name == "gpt2" else position < lengths).astype(np.int64)
  ids = np.where(mask == 1, rng.integers(3, VOCAB, (3, LENGTH)), PAD[name])
  return {"input_ids": ids, "attention_mask": mask}


def _torch_logits(model, batch: dict) -> np.ndarray:
  with torch.no_grad():
    return model(**{k: torch.tensor(v) for k, v in batch.items()}).logits.numpy()


@functools.lru_cache(maxsize=None)
def _load(path: str, **kwargs):
  """tj.from_hf, once per checkpoint and arguments (tests only read what it returns)."""
  return tj.from_hf(path, **kwargs)


@functools.partial(jax.jit, static_argnums=0, static_argnames="train")
def _apply(model, variables, *inputs, train=False):
  return model.apply(variables, *inputs, train=train)


def _flax_logits(model, variables, batch: dict) -> np.ndarray:
  """Compiled once per model and input signature (models from one checkpoint are equal)."""
  return np.asarray(_apply(model, variables, *(jnp.asarray(v) for v in batch.values())))


def _real(name: str, logits: np.ndarray, batch: dict) -> np.ndarray:
  """GPT-2's language-model logits at real tokens only (padded positions mean nothing)."""
  return logits[batch["attention_mask"] == 1] if name == "gpt2" else logits


@pytest.mark.parametrize("name", ["roberta", "bert", "gpt2", "vit"])
def test_from_hf_gives_the_logits_of_transformers_on_padded_batches(checkpoints, name):
  path, reference = checkpoints[name]
  model, variables, info = _load(path)
  assert (info.model_type, info.reinitialized, info.unused) == (name, [], [])
  assert info.architecture == type(reference).__name__
  assert variables["params"]["head" if name != "gpt2" else "final_norm"]  # the library's head convention
  batch = _batch(name)
  expected = _real(name, _torch_logits(reference, batch), batch)
  np.testing.assert_allclose(_real(name, _flax_logits(model, variables, batch), batch), expected, rtol=0, atol=1e-4)
  if name != "vit":  # the padding matters: attending to it moves the short sequences' logits
    unmasked = _flax_logits(model, variables, {**batch, "attention_mask": np.ones_like(batch["attention_mask"])})
    assert np.abs(_real(name, unmasked, batch) - expected).max() > 1e-3


def test_float_ids_with_negative_padding_are_the_masked_batch(checkpoints):
  """train.fit feeds data.normalize of stored int32 ids (mean 0, std 1/255) without a mask:
  -1 marks padding, which becomes pad_token_id and is masked out."""
  path, reference = checkpoints["roberta"]
  model, variables, info = _load(path)
  batch = _batch("roberta")
  stored = np.where(batch["attention_mask"] == 1, batch["input_ids"], -1).astype(np.int32)
  expected = _torch_logits(reference, batch)
  floats = data.normalize(stored, (0.0,), (1 / 255,))
  assert floats.dtype == jnp.float32
  np.testing.assert_allclose(_apply(model, variables, floats, train=True), expected, atol=1e-4)
  np.testing.assert_allclose(_apply(model, variables, jnp.asarray(stored)), expected, atol=1e-4)
  assert info.pad_token_id == 1


def _reload(directory: str, architecture: str):
  reloaded, loading = getattr(transformers, architecture).from_pretrained(directory, output_loading_info=True)
  assert not any(loading.values()), loading  # no missing, unexpected or mismatched keys
  return reloaded.eval()


@pytest.mark.parametrize("name", ["roberta", "bert", "gpt2", "vit"])
def test_to_hf_writes_a_checkpoint_transformers_loads_to_the_same_logits(checkpoints, tmp_path, name):
  path, reference = checkpoints[name]
  model, variables, info = _load(path)
  tj.to_hf(model, variables, str(tmp_path), like=path)
  batch = _batch(name)
  reloaded = _reload(str(tmp_path), info.architecture)
  np.testing.assert_allclose(_real(name, _torch_logits(reloaded, batch), batch),
                             _real(name, _torch_logits(reference, batch), batch), rtol=0, atol=1e-5)
  assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [info.architecture]


def test_a_head_of_another_size_is_reinitialized_logged_and_exported(checkpoints, tmp_path, caplog):
  path, _ = checkpoints["roberta"]
  with caplog.at_level(logging.WARNING):
    model, variables, info = tj.from_hf(path, num_labels=5, seed=3)
  head = ["head/out_proj/bias", "head/out_proj/kernel"]
  assert sorted(info.reinitialized) == head and info.num_labels == 5
  assert all(any(p in r.getMessage() for r in caplog.records) for p in head)
  kernel = variables["params"]["head"]["out_proj"]["kernel"]
  assert kernel.shape == (32, 5) and 0.5 * INIT < float(jnp.std(kernel)) < 1.5 * INIT  # as transformers inits
  again = _load(path, num_labels=5, seed=3)[1]
  chex.assert_trees_all_equal(again, variables)  # the seed decides the new head
  _, base, _ = _load(path)
  chex.assert_trees_all_equal(base["params"]["head"]["dense"], variables["params"]["head"]["dense"])  # still read
  tj.to_hf(model, variables, str(tmp_path), like=path)
  config = json.loads((tmp_path / "config.json").read_text())
  assert len(config["id2label"]) == 5
  batch = _batch("roberta")
  np.testing.assert_allclose(_torch_logits(_reload(str(tmp_path), info.architecture), batch),
                             _flax_logits(model, variables, batch), atol=1e-4)


def test_gpt2_as_a_sequence_classifier_pools_the_last_real_token(checkpoints, tmp_path):
  path, _ = checkpoints["gpt2"]
  model, variables, info = _load(path, num_labels=2)
  assert info.architecture == "GPT2ForSequenceClassification" and info.reinitialized == ["head/kernel"]
  tj.to_hf(model, variables, str(tmp_path), like=path)
  batch = _batch("gpt2")
  np.testing.assert_allclose(_torch_logits(_reload(str(tmp_path), info.architecture), batch),
                             _flax_logits(model, variables, batch), atol=1e-4)


def _nonzero_adapters(variables: dict, seed: int = 0) -> dict:
  """LoRA adapters set to random values, so they change the logits."""
  rng = np.random.default_rng(seed)

  def draw(path, x):
    return jnp.asarray(0.3 * rng.standard_normal(x.shape), jnp.float32) if "lora" in path else x

  return {"params": tree_utils.map_with_path_str(draw, variables["params"])}


@pytest.mark.parametrize("name", ["roberta", "gpt2"])
def test_lora_adapters_start_as_the_checkpoint_and_are_merged_on_export(checkpoints, tmp_path, name):
  path, reference = checkpoints[name]
  model, variables, info = _load(path, lora_rank=2)
  lora = [p for p in info.reinitialized if "lora" in p]
  assert len(lora) == len(info.reinitialized) == 2 * 2 * 6  # a, b x 2 layers x (q, k, v, output, 2 MLP)
  assert "layer_1/attention/query/lora_b" in lora and "layer_0/mlp/output/lora_a" in lora
  batch = _batch(name)
  np.testing.assert_allclose(_real(name, _flax_logits(model, variables, batch), batch),
                             _real(name, _torch_logits(reference, batch), batch), atol=1e-4)  # lora_b = 0
  adapted = _nonzero_adapters(variables)
  expected = _flax_logits(model, adapted, batch)
  assert np.abs(_real(name, expected - _torch_logits(reference, batch), batch)).max() > 1e-2
  tj.to_hf(model, adapted, str(tmp_path), like=path)
  np.testing.assert_allclose(_real(name, _torch_logits(_reload(str(tmp_path), info.architecture), batch), batch),
                             _real(name, expected, batch), atol=1e-4)


def test_a_base_model_checkpoint_loads_its_body_and_initializes_the_head(checkpoints, tmp_path):
  """BertModel saves without the 'bert.' prefix and without a classifier."""
  path, reference = checkpoints["bert"]
  reference.bert.save_pretrained(tmp_path)
  _, variables, info = tj.from_hf(str(tmp_path), num_labels=3)
  assert sorted(info.reinitialized) == ["head/bias", "head/kernel"]
  _, full, _ = _load(path)
  chex.assert_trees_all_equal({k: v for k, v in variables["params"].items() if k != "head"},
                              {k: v for k, v in full["params"].items() if k != "head"})


def test_a_sharded_checkpoint_loads_like_one_file(checkpoints, tmp_path):
  """Large checkpoints come as model-0000x-of-0000n.safetensors shards and an index."""
  path, _ = checkpoints["vit"]
  tensors = safetensors.numpy.load_file(f"{path}/model.safetensors")
  names = sorted(tensors)
  weight_map = {}
  for i, shard in enumerate((names[::2], names[1::2])):
    safetensors.numpy.save_file({n: tensors[n] for n in shard}, tmp_path / f"model-{i}.safetensors")
    weight_map.update({n: f"model-{i}.safetensors" for n in shard})
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  (tmp_path / "config.json").write_text(open(f"{path}/config.json").read())
  _, variables, info = tj.from_hf(str(tmp_path))
  assert info.reinitialized == info.unused == []
  chex.assert_trees_all_equal(variables, _load(path)[1])


def test_a_bfloat16_checkpoint_loads_as_float32(checkpoints, tmp_path):
  """safetensors.numpy cannot read bfloat16 (numpy has no such type); from_hf reads it exactly."""
  path, reference = checkpoints["vit"]
  rounded = copy.deepcopy(reference).to(torch.bfloat16)  # .to() is in place: the fixture's model stays float32
  rounded.save_pretrained(tmp_path)
  _, variables, _ = tj.from_hf(str(tmp_path))
  expected = {k: v.float().numpy() for k, v in rounded.state_dict().items()}
  assert variables["params"]["head"]["kernel"].dtype == jnp.float32
  np.testing.assert_array_equal(variables["params"]["head"]["kernel"], expected["classifier.weight"].T)
  patch = variables["params"]["embeddings"]["patch"]["kernel"]
  np.testing.assert_array_equal(patch, expected["vit.embeddings.patch_embeddings.projection.weight"].transpose(2, 3, 1, 0))
  assert not np.array_equal(patch, _load(path)[1]["params"]["embeddings"]["patch"]["kernel"])  # rounded to bfloat16


def test_the_vit_takes_nhwc_and_grayscale_images(checkpoints):
  path, reference = checkpoints["vit"]
  model, variables, _ = _load(path)
  pixels = _batch("vit")["pixel_values"][:, :1]  # one channel
  expected = _torch_logits(reference, {"pixel_values": np.repeat(pixels, 3, axis=1)})
  nhwc = model.clone(channels_last=True)
  np.testing.assert_allclose(_apply(nhwc, variables, jnp.asarray(pixels.transpose(0, 2, 3, 1)), train=True),
                             expected, atol=1e-4)


def _permuted(name: str, checkpoints, lora: bool = False):
  path, _ = checkpoints[name]
  model, variables, _ = _load(path, lora_rank=2 if lora else 0)
  if lora:
    variables = _nonzero_adapters(variables)
  spec = permutations.spec_for(model, variables)
  perms = permutations.random_permutations(spec, jax.random.key(PERM_SEED))
  moved = jax.jit(permutations.permute_variables, static_argnums=0)(spec, variables, perms)  # one compile
  return model, spec, variables, perms, moved


@pytest.mark.parametrize("name,lora", [("roberta", True), ("gpt2", False), ("bert", False), ("vit", False)])
def test_random_permutations_keep_the_logits(checkpoints, name, lora):
  """Residual stream, heads, head dims, MLP units (and pooler / head units) all at once."""
  model, _, variables, perms, moved = _permuted(name, checkpoints, lora)
  assert all(not np.array_equal(p, np.arange(len(p))) for p in perms.values())
  batch = _batch(name)
  out = _flax_logits(model, variables, batch)
  np.testing.assert_allclose(_flax_logits(model, moved, batch), out, rtol=0, atol=1e-5 * np.abs(out).max())
  assert np.abs(_flax_logits(model, {"params": {**moved["params"], "embeddings": variables["params"]["embeddings"]}},
                             batch) - out).max() > 1e-2  # unless every leaf is permuted consistently


@pytest.mark.parametrize("name", ["roberta", "gpt2"])
def test_weight_matching_undoes_a_random_permutation(checkpoints, name):
  model, spec, variables, perms, moved = _permuted(name, checkpoints)
  aligned, result = matching.align("weight", model, variables, moved, seed=1)
  for p in spec.names:
    np.testing.assert_array_equal(result.perms[p], jnp.argsort(perms[p]), err_msg=p)
  chex.assert_trees_all_close(aligned, variables, rtol=1e-6)


@pytest.mark.parametrize("name", ["roberta", "gpt2"])
def test_aligned_permuted_copy_has_no_barrier(checkpoints, name):
  model, spec, variables, perms, moved = _permuted(name, checkpoints)
  batch = {k: jnp.asarray(v) for k, v in _batch(name).items()}
  labels = jnp.arange(3) % 2 if name == "roberta" else batch["input_ids"]

  def score(v):
    logits = model.apply(v, batch["input_ids"], batch["attention_mask"])
    if name == "gpt2":  # next-token loss at real positions
      logits, labels_, weights = logits[:, :-1], labels[:, 1:], batch["attention_mask"][:, 1:]
    else:
      labels_, weights = labels, jnp.ones(3)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels_[..., None], -1)[..., 0]
    accuracy = jnp.sum((jnp.argmax(logits, -1) == labels_) * weights) / jnp.sum(weights)
    return jnp.sum(nll * weights) / jnp.sum(weights), accuracy

  alphas = jnp.linspace(0.0, 1.0, 3)
  aligned = permutations.permute_variables(spec, moved, {p: jnp.argsort(q) for p, q in perms.items()})
  curve = jax.device_get(interpolation.lmc_curve(None, variables, aligned, alphas, score_fn=score))
  assert interpolation.barriers(alphas, curve["loss"], curve["accuracy"])["loss_barrier"] == pytest.approx(0, abs=1e-5)
  unaligned = jax.device_get(interpolation.lmc_curve(None, variables, moved, alphas, score_fn=score))
  assert abs(unaligned["loss"][1] - unaligned["loss"][0]) > 1e-4  # unaligned, the midpoint is another model


def test_hf_specs_cover_embeddings_norms_heads_and_pooler(checkpoints):
  for name in ("roberta", "bert", "gpt2", "vit"):
    model, variables, _ = _load(checkpoints[name][0])
    axes = permutations.spec_for(model, variables).leaf_axes()
    assert axes["layer_1/attention/query/kernel"] == ("residual", "layer_1/heads", "layer_1/qk")
    assert axes["layer_0/attention/output/kernel"] == ("layer_0/heads", "layer_0/vo", "residual")
    assert axes["layer_0/mlp_norm/scale"] == ("residual",)
    if name in ("roberta", "bert"):
      assert axes["embeddings/norm/bias"] == axes["embeddings/token_type/embedding"][1:] == ("residual",)
    if name == "bert":
      assert (axes["pooler/kernel"], axes["head/kernel"]) == (("residual", "pooler"), ("pooler", None))
    if name == "roberta":
      assert axes["head/out_proj/kernel"] == ("head/dense", None) and "pooler/kernel" not in axes
    if name == "gpt2":
      assert axes["embeddings/word/embedding"] == (None, "residual") and "head/kernel" not in axes
    if name == "vit":
      assert axes["embeddings/cls_token"] == axes["embeddings/position_embeddings"] == (None, None, "residual")


def test_a_directory_without_config_json_is_data_not_found(tmp_path):
  with pytest.raises(DataNotFoundError, match=rf"'{tmp_path}' is not a Hugging Face checkpoint: it has no config.json"):
    tj.from_hf(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
  with pytest.raises(DataNotFoundError, match="has no model.safetensors"):
    tj.from_hf(str(tmp_path))


def test_an_unsupported_model_type_names_the_supported_ones(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
  with pytest.raises(ConfigError, match="model_type='t5', which is not supported; supported: bert, roberta, gpt2, vit"):
    tj.from_hf(str(tmp_path))
  assert hf.SUPPORTED_MODEL_TYPES == ("bert", "roberta", "gpt2", "vit")


def test_weights_that_do_not_match_config_json_are_refused(checkpoints, tmp_path):
  path, _ = checkpoints["bert"]
  config = json.loads(open(f"{path}/config.json").read())
  (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 40}))
  (tmp_path / "model.safetensors").write_bytes(open(f"{path}/model.safetensors", "rb").read())
  with pytest.raises(DataNotFoundError, match=r"does not match its config.json: 6 tensors .*intermediate.dense.weight "
                                              r"has shape \(37, 32\)"):
    tj.from_hf(str(tmp_path))


def test_to_hf_refuses_a_model_of_another_checkpoint(checkpoints, tmp_path):
  model, variables, _ = _load(checkpoints["bert"][0])
  with pytest.raises(ConfigError, match="not the roberta of like=.*BertClassifier vs RobertaClassifier"):
    tj.to_hf(model, variables, str(tmp_path), like=checkpoints["roberta"][0])
  assert isinstance(model, hf_models.BertClassifier)
