"""Runs from a Hugging Face checkpoint through main: ColD of a tiny RoBERTa with LoRA and a
TNA-PFN mask on the adapters, on a text_files dataset; the fused model back in transformers."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from tna_jax.config import loader, schema
from tna_jax.core import tokenization
from tna_jax.errors import ConfigError
from tna_jax.fusion import hf, tiny_hf
from tna_jax.runs import checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAX_LEN = 16
# Two contributor tasks of 64 examples, one round of one epoch: a few seconds of training.
COLD = ["--config.cold.tasks=0/1,2/3", "--config.cold.unseen_tasks=", "--config.cold.start=0",
        "--config.cold.examples_per_task=64", f"--config.cold.max_len={MAX_LEN}", "--config.batch_size=32",
        "--config.eval_batch_size=128", "--config.num_test=128", "--config.model.lora_rank=2",
        "--config.mask.fixed_fraction=0.5", "--config.variants=tna",  # vanilla runs the same code without the mask
        "--config.cold.merge=ties"]  # a merging operator from the command line (uniform is tested in-process)


def run_main(workdir, *flags, config="configs/cold_text_files.py:quick"):
  cmd = [sys.executable, "-m", "tna_jax.main", f"--config={config}", f"--workdir={workdir}", *flags]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """A tiny RoBERTa (2 layers, width 32) made by transformers, with a BPE tokenizer.json, and a text_files task."""
  transformers = pytest.importorskip("transformers")
  root = tmp_path_factory.mktemp("hf")
  data_dir, path = root / "data", root / "roberta"
  tiny_hf.write_text_files(str(data_dir), num_train=400, num_test=128)
  tokenizer = tiny_hf.train_tokenizer([e["text"] for e in tiny_hf.make_examples(400, 0)])
  config = transformers.RobertaConfig(**tiny_hf.roberta_config(tokenizer.get_vocab_size(), max_len=MAX_LEN))
  transformers.RobertaForSequenceClassification(config).save_pretrained(str(path))
  (path / "tokenizer.json").write_text(tokenizer.to_str())
  return str(data_dir), str(path)


@pytest.fixture(scope="module")
def cold_run(checkpoint, tmp_path_factory):
  data_dir, path = checkpoint
  workdir = tmp_path_factory.mktemp("cold") / "run"
  result = run_main(workdir, f"--config.data_dir={data_dir}", f"--config.base.path={path}", *COLD)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "fused by ties" in result.stdout
  return workdir, result


def test_cold_from_a_checkpoint_keeps_the_frozen_adapter_entries_and_exports_to_transformers(checkpoint, cold_run):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  data_dir, path = checkpoint
  workdir, result = cold_run
  assert "freshly initialized" in result.stdout and "24 LoRA adapter matrices" in result.stdout
  saved = json.loads((workdir / "results.json").read_text())
  assert set(saved["accuracy"]) == {"tna"}
  base = checkpoints.restore(workdir / "checkpoints" / "base")["params"]
  fused = checkpoints.restore(workdir / "checkpoints" / "tna_round1")["params"]
  mask = checkpoints.restore(workdir / "checkpoints" / "tna_mask")
  flat = lambda tree: {jax.tree_util.keystr(p, simple=True, separator="/"): np.asarray(v)
                       for p, v in jax.tree_util.tree_leaves_with_path(tree)}
  base, fused, mask = flat(base), flat(fused), flat(mask)
  adapters = [p for p in base if "lora" in p]
  assert len(adapters) == 24
  fixed_adapter_entries = moved = 0
  for p in base:
    if "lora" in p:  # TNA-PFN anchors among the adapters: bit-identical to the base's
      np.testing.assert_array_equal(fused[p][mask[p]].view(np.uint32), base[p][mask[p]].view(np.uint32))
      fixed_adapter_entries += int(mask[p].sum())
      moved += int(np.sum(fused[p][~mask[p]] != base[p][~mask[p]]))
    elif not p.startswith("head/"):  # the pretrained weights are frozen by finetune.trainable='lora|head'
      assert mask[p].all()
      np.testing.assert_array_equal(fused[p].view(np.uint32), base[p].view(np.uint32))
  assert 0.4 < fixed_adapter_entries / sum(base[p].size for p in adapters) < 0.6 and moved > 0
  # The fused base, written by to_hf, loads in transformers and computes what tna_jax computes.
  exported = workdir / "hf" / "tna_round1"
  reference = transformers.AutoModelForSequenceClassification.from_pretrained(str(exported)).eval()
  model, _, _ = hf.from_hf(path, num_labels=2, lora_rank=2, lora_alpha=8.0)
  ids = tokenization.Tokenizer.of_checkpoint(str(exported)).encode(
      [("ball goal team today",), ("rain and snow in the storm with some fog",), ("piano",)], MAX_LEN)
  ours = np.asarray(model.apply({"params": checkpoints.restore(workdir / "checkpoints" / "tna_round1")["params"]},
                                ids.astype(np.float32)))
  keep = ids != tokenization.PAD
  with torch.no_grad():
    theirs = reference(input_ids=torch.tensor(np.where(keep, ids, 1)),
                       attention_mask=torch.tensor(keep.astype(np.int64))).logits.numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-4)


@pytest.mark.parametrize("case,message", [
    ("no_config", "is not a Hugging Face checkpoint: it has no config.json"),  # before its missing tokenizer
    ("bad_jsonl", "train.jsonl:3: the example has no 'label' field"),
    ("t5", "has model_type='t5', which is not supported; supported: bert, roberta, gpt2, vit"),
])
def test_bad_checkpoint_or_data_is_one_line_exit_2_and_writes_nothing(checkpoint, tmp_path, case, message):
  data_dir, path = checkpoint
  if case in ("no_config", "t5"):
    path = str(tmp_path / case)
    os.makedirs(path)
    if case == "t5":  # a checkpoint of an architecture tna_jax does not have
      shutil.copy(os.path.join(checkpoint[1], "tokenizer.json"), path)
      (tmp_path / case / "config.json").write_text('{"model_type": "t5"}')
  else:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "train.jsonl").write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n{"text": "c"}\n')
    (data_dir / "test.jsonl").write_text('{"text": "a", "label": 0}\n')
  workdir = tmp_path / "run"
  result = run_main(workdir, f"--config.data_dir={data_dir}", f"--config.base.path={path}", *COLD)
  assert result.returncode == 2, result.stderr[-2000:]
  assert message in result.stderr and "Traceback" not in result.stderr
  assert len([line for line in result.stderr.splitlines() if line.lower().startswith("error")]) == 1
  assert not workdir.exists() or not any(workdir.iterdir())


@pytest.mark.parametrize("experiment", ["cold", "soup", "lmc"])
def test_magnitude_masks_without_a_pretrained_base_are_refused(experiment):
  config = loader.defaults(experiment)
  config.base.source = "init"
  config.mask.select = "magnitude_small"
  with pytest.raises(ConfigError, match="mask.select='magnitude_small' ranks the pretrained base's weights.*"
                     "base.source='init' has no pretrained base"):
    schema.validate(config)
  config.mask.select, config.mask.granularity = "magnitude_large", "neuron"
  config.base.update(source="hf", path="DIR")
  with pytest.raises(ConfigError, match="needs mask.granularity='weight'"):
    schema.validate(config)


def test_hf_sources_need_a_path_and_text_without_a_checkpoint_needs_the_text_transformer():
  config = loader.defaults("lmc")
  config.base.source = "hf"
  with pytest.raises(ConfigError, match="base.source='hf' needs base.path"):
    schema.validate(config)
  config.base.source, config.dataset = "init", "text_files"
  with pytest.raises(ConfigError, match="text_files needs model.name='text_transformer' or base.source='hf'"):
    schema.validate(config)
  sweep = loader.defaults("sweep")
  sweep.base.source = "hf"
  with pytest.raises(ConfigError, match="base.source='hf' is not supported; allowed: init"):
    schema.validate(sweep)

