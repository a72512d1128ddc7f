"""A tiny text task and RoBERTa checkpoint, made offline: what tests, configs/cold_text_files.py
and the README's offline measurement start from.

    python -m tna_jax.fusion.tiny_hf --out=/tmp/tiny_hf

writes /tmp/tiny_hf/data (train.jsonl, test.jsonl: the `text_files` dataset) and
/tmp/tiny_hf/roberta (config.json, model.safetensors, tokenizer.json: a Hugging Face
checkpoint). Nothing is downloaded and neither PyTorch nor `transformers` is needed: the
tokenizer is a byte-level BPE trained with `tokenizers` on the task's own training text,
and the weights are the seeded initialization of tna_jax's RoBERTa (`hf_models`), written
with `hf.to_hf`. The "pretrained" model is thus random, the task
small: a stand-in that exercises every step of a run from a checkpoint on a CPU, not a
claim about pretrained RoBERTa.

The task: sentences about one of four topics (sport, food, weather, music), label = the
topic, each sentence a few topic words among filler words and a word of another topic.
"""

import argparse
import json

import numpy as np

from tna_jax.runs import files

TOPICS = {
    "sport": "ball goal team match coach runner score league pitch referee",
    "food": "bread soup cheese apple dinner recipe oven spice salad noodle",
    "weather": "rain storm cloud sunny wind snow forecast thunder fog humid",
    "music": "guitar song drum melody concert piano chorus violin rhythm album",
}
FILLER = "the a of and to in is was it that on for with as very some today really".split()
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")  # RoBERTa's, at its ids 0..4


def make_examples(num: int, seed: int) -> list[dict]:
  """`num` labelled sentences: 3-5 words of the topic, 4-8 filler words, one word of another topic."""
  rng = np.random.default_rng(seed)
  names = list(TOPICS)
  examples = []
  for _ in range(num):
    label = int(rng.integers(len(names)))
    other = names[(label + 1 + int(rng.integers(len(names) - 1))) % len(names)]
    words = list(rng.choice(TOPICS[names[label]].split(), int(rng.integers(3, 6))))
    words += list(rng.choice(FILLER, int(rng.integers(4, 9)))) + [str(rng.choice(TOPICS[other].split()))]
    rng.shuffle(words)
    examples.append({"text": " ".join(words), "label": label})
  return examples


def write_text_files(directory: str, num_train: int = 4096, num_test: int = 512, seed: int = 0) -> None:
  """The task as the `text_files` dataset: train.jsonl and test.jsonl in `directory`."""
  for split, num, split_seed in (("train", num_train, seed), ("test", num_test, seed + 1)):
    lines = (json.dumps(e) for e in make_examples(num, split_seed))
    files.write_text(files.path(directory) / f"{split}.jsonl", "\n".join(lines) + "\n")


def train_tokenizer(texts: list[str], vocab_size: int = 200):
  """A byte-level BPE on `texts` with RoBERTa's special tokens and pair template (<s> a </s></s> b </s>)."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, pre_tokenizers, processors, trainers  # pylint: disable=g-import-not-at-top

  tokenizer = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  tokenizer.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS)))
  tokenizer.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
  return tokenizer


def roberta_config(vocab_size: int, *, width: int = 32, depth: int = 2, heads: int = 2, max_len: int = 64,
                   num_labels: int = 2) -> dict:
  """config.json of a RoBERTa encoder with a classification head (transformers' field names)."""
  return {
      "model_type": "roberta", "architectures": ["RobertaForSequenceClassification"], "vocab_size": vocab_size,
      "hidden_size": width, "num_hidden_layers": depth, "num_attention_heads": heads,
      "intermediate_size": 4 * width, "hidden_act": "gelu", "hidden_dropout_prob": 0.0,
      "attention_probs_dropout_prob": 0.0, "max_position_embeddings": max_len + 2, "type_vocab_size": 1,
      "initializer_range": 0.02, "layer_norm_eps": 1e-5, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
      "num_labels": num_labels, "id2label": {str(i): f"LABEL_{i}" for i in range(num_labels)},
      "label2id": {f"LABEL_{i}": i for i in range(num_labels)},
  }


def write_roberta(directory: str, texts: list[str], *, seed: int = 0, width: int = 32, depth: int = 2, heads: int = 2,
                  max_len: int = 64, num_labels: int = 2) -> None:
  """A RoBERTa checkpoint in `directory`: tokenizer.json trained on `texts`, config.json and
  model.safetensors of the seeded initialization of `hf_models.RobertaClassifier` with the
  same settings, written by `hf.to_hf`."""
  import jax  # pylint: disable=g-import-not-at-top
  from tna_jax.core import hf_models  # pylint: disable=g-import-not-at-top
  from tna_jax.fusion import hf  # pylint: disable=g-import-not-at-top

  tokenizer = train_tokenizer(texts)
  config = roberta_config(tokenizer.get_vocab_size(), width=width, depth=depth, heads=heads, max_len=max_len,
                          num_labels=num_labels)
  root = files.path(directory)
  root.mkdir(parents=True, exist_ok=True)
  files.write_text(root / "tokenizer.json", tokenizer.to_str())
  files.write_json(root / "config.json", config)
  model = hf_models.RobertaClassifier(
      num_layers=depth, hidden_size=width, num_heads=heads, intermediate_size=config["intermediate_size"],
      hidden_act=config["hidden_act"], layer_norm_eps=config["layer_norm_eps"],
      initializer_range=config["initializer_range"], vocab_size=config["vocab_size"],
      max_positions=config["max_position_embeddings"], type_vocab_size=config["type_vocab_size"],
      pad_token_id=config["pad_token_id"], num_labels=num_labels)
  variables = model.init(jax.random.key(seed), jax.numpy.zeros((1, 2), jax.numpy.int32))
  hf.to_hf(model, variables, str(root), like=str(root))


def write_all(out: str, num_train: int = 4096, num_test: int = 512, seed: int = 0) -> tuple[str, str]:
  """The dataset (OUT/data) and the checkpoint (OUT/roberta); returns their paths."""
  data_dir, checkpoint = str(files.path(out) / "data"), str(files.path(out) / "roberta")
  write_text_files(data_dir, num_train, num_test, seed)
  write_roberta(checkpoint, [e["text"] for e in make_examples(num_train, seed)], seed=seed)
  return data_dir, checkpoint


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="directory to write data/ and roberta/ into")
  args = parser.parse_args(argv)
  data_dir, checkpoint = write_all(args.out)
  print(f"wrote the text_files dataset {data_dir} and the RoBERTa checkpoint {checkpoint}")


if __name__ == "__main__":
  main()
