"""Text as a pretrained checkpoint's tokens: its `tokenizer.json`, read with `tokenizers`.

A Hugging Face checkpoint ships its tokenizer as one `tokenizer.json` (vocabulary, merges,
normalizer, pre-tokenizer and the post-processor that adds the special tokens). Encoding
with that file is what `transformers`' fast tokenizers do: the post-processor joins a pair
the way the model was pretrained (BERT `[CLS] a [SEP] b [SEP]`, RoBERTa `<s> a </s></s> b
</s>`), truncation cuts the longest text of a pair first, and special tokens count toward
`max_len`. PyTorch and `transformers` are never needed.

Encoded text is int32 [N, max_len] with -1 at padding positions: the form the Hugging Face
models of tna_jax read (a negative id is padding, masked out of attention), stored in a
`data.Dataset`'s image fields with mean 0 and std 1/255 (`text_data.TOKEN_MEAN`, `TOKEN_STD`)
so that `data.normalize` returns the ids as floats and `train.fit` runs unchanged. The text
is tokenized once, when the dataset is loaded.
"""

import numpy as np

from tna_jax.errors import DataNotFoundError
from tna_jax.runs import files

PAD = -1  # the id of padding positions: no vocabulary has negative ids
TOKENIZER_FILE = "tokenizer.json"


class Tokenizer:
  """A checkpoint's tokenizer, encoding examples (one text or a pair) to padded id rows."""

  def __init__(self, tokenizer, source: str):
    self._tokenizer = tokenizer
    self.source = source  # where it was read from, for messages

  @classmethod
  def from_file(cls, path: str) -> "Tokenizer":
    """The tokenizer of a `tokenizer.json` (local or gs://, through epath).

    Raises:
      DataNotFoundError: the file is missing or not a tokenizer.json.
    """
    import tokenizers  # pylint: disable=g-import-not-at-top  (only text runs from checkpoints need it)

    source = files.path(path)
    if not source.is_file():
      raise DataNotFoundError(f"{path} does not exist: text from a Hugging Face checkpoint needs its {TOKENIZER_FILE} "
                              "(a checkpoint with only vocab/merges files: `AutoTokenizer.from_pretrained(DIR)"
                              ".save_pretrained(DIR)` writes it).")
    try:
      tokenizer = tokenizers.Tokenizer.from_str(source.read_text())
    except Exception as e:  # pylint: disable=broad-except  (tokenizers raises a bare Exception on bad JSON)
      raise DataNotFoundError(f"{path} is not a tokenizer.json that `tokenizers` reads: "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}.") from None
    return cls(tokenizer, str(path))

  @classmethod
  def of_checkpoint(cls, directory: str) -> "Tokenizer":
    """The tokenizer.json of a Hugging Face checkpoint directory."""
    return cls.from_file(str(files.path(directory) / TOKENIZER_FILE))

  def encode(self, examples: list[tuple[str, ...]], max_len: int) -> np.ndarray:
    """int32 [N, max_len]: each example (a text or a pair of texts) as its ids with the special
    tokens of the checkpoint's post-processor, truncated to `max_len` (longest text first),
    then padded with PAD.

    The same ids and attention masks (ids != PAD) as `PreTrainedTokenizerFast(tokenizer_file=...)
    (a, b, truncation=True, max_length=max_len, padding='max_length')`.
    """
    tokenizer = self._tokenizer
    tokenizer.no_padding()  # a tokenizer.json may carry padding settings; padding is PAD here
    tokenizer.enable_truncation(max_length=max_len, strategy="longest_first")
    encoded = tokenizer.encode_batch([tuple(parts) if len(parts) > 1 else parts[0] for parts in examples])
    ids = np.full((len(examples), max_len), PAD, np.int32)
    for row, encoding in zip(ids, encoded):
      row[:len(encoding.ids)] = encoding.ids
    return ids
