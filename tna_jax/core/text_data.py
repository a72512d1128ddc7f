"""Text classification datasets (GLUE, a user's own files), in the in-memory `data.Dataset` form.

Without a tokenizer, text is encoded as UTF-8 bytes (no vocabulary file: ByT5-style),
truncated or zero-padded to `max_len`, and stored as uint8 [N, max_len] in the `images`
fields with mean 0 and std 1/255: `data.normalize` then turns the ids into the same numbers
as floats, which `transformers.TextTransformer` rounds back to ids. With a pretrained
checkpoint's tokenizer (`tokenization.Tokenizer`), the ids are int32 with -1 at padding,
in the same fields with the same statistics. So text tasks train and evaluate through
`train.fit` and `evaluate` exactly as images do, tokenized once, at loading.

GLUE comes from a prepared TFDS directory, read without TensorFlow like the image
datasets; nothing is downloaded. Test labels of GLUE are hidden, so the validation split
serves as the test split. `text_files` is a directory of train/test JSONL or CSV files.
"""

import csv
import io
import json

import numpy as np

from tna_jax.core import data, tokenization
from tna_jax.errors import DataNotFoundError, check_choice
from tna_jax.runs import files

TEXT_DATASETS = ("glue", "text_files")  # `dataset` values that are text

# task -> (text features joined with SEP, the split used as test)
GLUE_TASKS = {
    "cola": (("sentence",), "validation"),
    "sst2": (("sentence",), "validation"),
    "mrpc": (("sentence1", "sentence2"), "validation"),
    "qqp": (("question1", "question2"), "validation"),
    "mnli": (("premise", "hypothesis"), "validation_matched"),
    "qnli": (("question", "sentence"), "validation"),
    "rte": (("sentence1", "sentence2"), "validation"),
    "wnli": (("sentence1", "sentence2"), "validation"),
}
SEP = 0x1E  # ASCII record separator between the texts of a pair
TOKEN_MEAN, TOKEN_STD = (0.0,), (1.0 / 255.0,)  # makes data.normalize return the byte ids


def encode(texts: list[tuple[str | bytes, ...]], max_len: int) -> np.ndarray:
  """uint8 [N, max_len]: each example's texts as UTF-8, joined by SEP, cut or zero-padded.

  NUL bytes inside a text become spaces, since 0 is padding.
  """
  out = np.zeros((len(texts), max_len), np.uint8)
  for i, parts in enumerate(texts):
    encoded = bytes([SEP]).join(p if isinstance(p, bytes) else str(p).encode("utf-8") for p in parts)
    row = np.frombuffer(encoded.replace(b"\0", b" ")[:max_len], np.uint8)
    out[i, :len(row)] = row
  return out


def encode_with(tokenizer: tokenization.Tokenizer | None, texts: list[tuple[str, ...]], max_len: int) -> np.ndarray:
  """The examples' ids: the checkpoint's tokens (int32, -1 padding) with a tokenizer, else bytes."""
  return encode(texts, max_len) if tokenizer is None else tokenizer.encode(texts, max_len)


def load_glue(task: str, data_dir: str, max_len: int, tokenizer: tokenization.Tokenizer | None = None) -> data.Dataset:
  """GLUE `task` from TFDS (`glue/<task>`) prepared in `data_dir` ('' = TFDS's default),
  as bytes or, given a tokenizer, as its tokens (a pair joined by its post-processor).

  Raises:
    ConfigError: unknown task.
    DataNotFoundError: not prepared here, or stored in a format that needs TensorFlow;
      the message says how to prepare it.
  """
  check_choice("cold.tasks (glue)", task, tuple(GLUE_TASKS))
  # Imported here: TFDS takes seconds to import, which runs on other data should not pay.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  name = f"glue/{task}"
  prepare = (
      f"Prepare it on a machine with internet and TensorFlow, in array_record format: `tfds build {name} "
      "--data_dir=DIR --file_format=array_record`; copy DIR here and pass --config.data_dir=DIR.")
  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
  except (tfds.core.registered.DatasetNotFoundError, FileNotFoundError) as e:
    raise DataNotFoundError(f"GLUE task {task} ({name}) is not prepared in {data_dir or 'the TFDS default dir'} "
                            f"({type(e).__name__}). {prepare}") from None
  if not builder.is_prepared():
    raise DataNotFoundError(f"GLUE task {task} ({name}) is not prepared in {builder.data_dir}. {prepare}")
  features, test_split = GLUE_TASKS[task]
  try:
    sources = builder.as_data_source(split=["train", test_split])
  except NotImplementedError as e:
    raise DataNotFoundError(f"GLUE task {task} in {builder.data_dir} is stored as "
                            f"{builder.info.file_format.value}, which needs TensorFlow to read. {prepare}") from e
  splits = []
  for source in sources:
    examples = source.__getitems__(range(len(source)))
    texts = [tuple(_text(ex[f]) for f in features) for ex in examples]
    splits.append(encode_with(tokenizer, texts, max_len))
    splits.append(np.array([ex["label"] for ex in examples], np.int32))
  return data.Dataset(name=f"glue_{task}", train_images=splits[0], train_labels=splits[1], test_images=splits[2],
                      test_labels=splits[3], num_classes=builder.info.features["label"].num_classes,
                      mean=TOKEN_MEAN, std=TOKEN_STD)


def _text(value: str | bytes) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


# ----------------------------------------------------------------------------- text_files

TEXT_FILE_FORMATS = ("jsonl", "csv")


def load_text_files(data_dir: str, max_len: int, tokenizer: tokenization.Tokenizer | None = None) -> data.Dataset:
  """The dataset `text_files`: `data_dir` holds train.jsonl and test.jsonl (or train.csv and
  test.csv), one example per line (CSV: per row, after a header) with a `text` field, or
  `text_a` and `text_b` for pairs, and an integer `label`. The classes are 0 .. the largest
  training label; every test label must be one of them.

  Raises:
    DataNotFoundError: a file is missing, empty or not JSON, or an example lacks a field or
      has a label that is not an integer in range; ONE line naming the file and line number.
  """
  splits = {}
  for split in ("train", "test"):
    candidates = [files.path(data_dir or ".") / f"{split}.{fmt}" for fmt in TEXT_FILE_FORMATS]
    found = [p for p in candidates if p.is_file()]
    if not found:
      raise DataNotFoundError(f"dataset text_files: {data_dir or '.'} has no {split}.jsonl or {split}.csv; pass "
                              "--config.data_dir=DIR where DIR holds train.jsonl and test.jsonl (or .csv) with "
                              "'text' (or 'text_a' and 'text_b') and 'label' fields.")
    splits[split] = _read_examples(found[0])
  num_classes = 1 + max(label for _, label, _ in splits["train"])
  for split in ("train", "test"):
    for _, label, where in splits[split]:
      if not 0 <= label < num_classes:
        raise DataNotFoundError(f"{where}: label {label} is out of range; labels are 0 .. {num_classes - 1} (the "
                                "largest training label), and every test label must be one of them.")
  arrays = {split: (encode_with(tokenizer, [texts for texts, _, _ in rows], max_len),
                    np.array([label for _, label, _ in rows], np.int32)) for split, rows in splits.items()}
  return data.Dataset(name="text_files", train_images=arrays["train"][0], train_labels=arrays["train"][1],
                      test_images=arrays["test"][0], test_labels=arrays["test"][1], num_classes=num_classes,
                      mean=TOKEN_MEAN, std=TOKEN_STD)


def _read_examples(path) -> list[tuple[tuple[str, ...], int, str]]:
  """(texts, label, 'FILE:LINE') of every example of a .jsonl or .csv file."""
  text = path.read_text()
  if path.suffix == ".csv":
    reader = csv.DictReader(io.StringIO(text))
    rows = [(f"{path}:{reader.line_num}", row) for row in reader]
  else:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataNotFoundError(f"{path}:{number}: not valid JSON ({e.msg}, column {e.colno}).") from None
      if not isinstance(row, dict):
        raise DataNotFoundError(f"{path}:{number}: a line must be a JSON object with 'text' and 'label' fields.")
      rows.append((f"{path}:{number}", row))
  if not rows:
    raise DataNotFoundError(f"{path}: the file has no examples.")
  return [_example(where, row) for where, row in rows]


def _example(where: str, row: dict) -> tuple[tuple[str, ...], int, str]:
  """One example's texts and label, checked."""
  fields = ("text",) if "text" in row else ("text_a", "text_b")
  missing = [f for f in fields + ("label",) if row.get(f) is None]
  if missing:
    raise DataNotFoundError(f"{where}: the example has no {' or '.join(repr(f) for f in missing)} field (each needs "
                            "'text', or 'text_a' and 'text_b', and 'label').")
  label = row["label"]
  if isinstance(label, str) and label.strip().lstrip("-").isdigit():
    label = int(label)  # CSV fields are text
  if not isinstance(label, int) or isinstance(label, bool):
    raise DataNotFoundError(f"{where}: label {row['label']!r} is not an integer class index.")
  return tuple(str(row[f]) for f in fields), label, where
