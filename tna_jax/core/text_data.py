"""GLUE classification tasks as byte sequences, in the in-memory `data.Dataset` form.

Text is encoded as UTF-8 bytes (no tokenizer, no vocabulary file: ByT5-style), truncated
or zero-padded to `max_len`, and stored as uint8 [N, max_len] in the `images` fields with
mean 0 and std 1/255: `data.normalize` then turns the ids into the same numbers as floats,
which `transformers.TextTransformer` rounds back to ids. So text tasks train and evaluate
through `train.fit` and `evaluate` exactly as images do.

GLUE comes from a prepared TFDS directory, read without TensorFlow like the image
datasets; nothing is downloaded. Test labels of GLUE are hidden, so the validation split
serves as the test split.
"""

import numpy as np

from tna_jax.core import data
from tna_jax.errors import DataNotFoundError, check_choice

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


def load_glue(task: str, data_dir: str, max_len: int) -> data.Dataset:
  """GLUE `task` from TFDS (`glue/<task>`) prepared in `data_dir` ('' = TFDS's default).

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
    splits.append(encode([tuple(ex[f] for f in features) for ex in examples], max_len))
    splits.append(np.array([ex["label"] for ex in examples], np.int32))
  return data.Dataset(name=f"glue_{task}", train_images=splits[0], train_labels=splits[1], test_images=splits[2],
                      test_labels=splits[3], num_classes=builder.info.features["label"].num_classes,
                      mean=TOKEN_MEAN, std=TOKEN_STD)
