"""Text from a checkpoint's tokenizer.json (parity with transformers) and the text_files dataset."""

import json

import numpy as np
import pytest

from tna_jax.core import data, text_data, tokenization
from tna_jax.errors import DataNotFoundError
from tna_jax.fusion import tiny_hf

SENTENCES = ["the cat sat on the mat", "a dog ran in the park today", "the quick brown fox jumps over the lazy dog",
             "rain and wind", "guitar song"]


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
  path.write_text(tiny_hf.train_tokenizer(SENTENCES * 3, vocab_size=120).to_str())
  return path


def test_ids_and_attention_masks_equal_transformers_fast_tokenizer(tokenizer_file):
  transformers = pytest.importorskip("transformers")
  reference = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), pad_token="<pad>")
  ours = tokenization.Tokenizer.from_file(str(tokenizer_file))
  singles = [(s,) for s in SENTENCES]
  pairs = [(a, b) for a, b in zip(SENTENCES, SENTENCES[::-1])]
  for examples, max_len in ((singles, 9), (singles, 24), (pairs, 12), (pairs, 40)):  # truncated and padded
    ids = ours.encode(examples, max_len)
    expected = reference(*zip(*examples), truncation=True, max_length=max_len, padding="max_length")
    mask = np.asarray(expected["attention_mask"])
    np.testing.assert_array_equal(ids != tokenization.PAD, mask)
    np.testing.assert_array_equal(np.where(mask == 1, np.asarray(expected["input_ids"]), tokenization.PAD), ids)
    assert ids.dtype == np.int32 and ids.shape == (len(examples), max_len)
  # The pair template of RoBERTa: <s> a </s></s> b </s>.
  row = ours.encode([("cat", "dog")], 16)[0]
  assert row[0] == 0 and list(row[row != -1]).count(2) == 3


def test_normalize_gives_back_the_int32_ids_with_negative_padding(tokenizer_file):
  ids = tokenization.Tokenizer.from_file(str(tokenizer_file)).encode([(s,) for s in SENTENCES], 16)
  x = np.asarray(data.normalize(ids, text_data.TOKEN_MEAN, text_data.TOKEN_STD))
  np.testing.assert_array_equal(np.round(x).astype(np.int32), ids)


def _write(directory, name, lines):
  directory.mkdir(exist_ok=True)
  (directory / name).write_text("".join(line + "\n" for line in lines))


def test_text_files_loads_jsonl_and_csv_pairs(tmp_path, tokenizer_file):
  _write(tmp_path / "j", "train.jsonl", [json.dumps({"text": s, "label": i % 3}) for i, s in enumerate(SENTENCES)])
  _write(tmp_path / "j", "test.jsonl", ['{"text": "a cat", "label": 2}', "", '{"text": "a dog", "label": 0}'])
  dataset = text_data.load_text_files(str(tmp_path / "j"), 8)  # bytes without a tokenizer
  assert dataset.num_classes == 3 and dataset.image_shape == (8,) and dataset.train_images.dtype == np.uint8
  np.testing.assert_array_equal(dataset.test_labels, [2, 0])
  assert bytes(dataset.test_images[0][:5]) == b"a cat"
  _write(tmp_path / "c", "train.csv", ["text_a,text_b,label", "the cat,sat on the mat,1", '"a dog, ran",park,0'])
  _write(tmp_path / "c", "test.csv", ["label,text_a,text_b", "1,rain,wind"])
  tokenizer = tokenization.Tokenizer.from_file(str(tokenizer_file))
  pairs = text_data.load_text_files(str(tmp_path / "c"), 16, tokenizer)
  np.testing.assert_array_equal(pairs.train_images, tokenizer.encode([("the cat", "sat on the mat"),
                                                                       ("a dog, ran", "park")], 16))
  np.testing.assert_array_equal(pairs.train_labels, [1, 0])
  assert pairs.num_classes == 2 and pairs.mean == (0.0,) and pairs.train_images.dtype == np.int32


@pytest.mark.parametrize("train,test,match", [
    (['{"text": "a", "label": 0}', '{"text": "b"}'], None, r"train.jsonl:2: the example has no 'label' field"),
    (['{"text": "a", "label": 0}', '{"text": "b", "label": -1}'], None, r"train.jsonl:2: label -1 is out of range"),
    (['{"text": "a", "label": 1}'], ['{"text": "b", "label": 0}', '{"text": "c", "label": 2}'],
     r"test.jsonl:2: label 2 is out of range; labels are 0 \.\. 1"),
    (['{"text": "a", "label": "x"}'], None, r"train.jsonl:1: label 'x' is not an integer"),
    (['{"text": "a", "label": 1.5}'], None, r"train.jsonl:1: label 1.5 is not an integer"),
    (['{"text_a": "a", "label": 0}'], None, r"train.jsonl:1: the example has no 'text_b' field"),
    (['{"text": "a", "label": 0}', '{"text": "a", "label": 0'], None, r"train.jsonl:2: not valid JSON"),
    ([], None, r"train.jsonl: the file has no examples"),
])
def test_a_bad_file_is_one_line_naming_the_file_and_line(tmp_path, train, test, match):
  _write(tmp_path, "train.jsonl", train)
  _write(tmp_path, "test.jsonl", test or ['{"text": "z", "label": 0}'])
  with pytest.raises(DataNotFoundError, match=match) as error:
    text_data.load_text_files(str(tmp_path), 8)
  assert "\n" not in str(error.value)


def test_missing_files_and_tokenizer_are_clear_errors(tmp_path):
  with pytest.raises(DataNotFoundError, match="has no train.jsonl or train.csv"):
    text_data.load_text_files(str(tmp_path), 8)
  with pytest.raises(DataNotFoundError, match="tokenizer.json does not exist.*save_pretrained"):
    tokenization.Tokenizer.of_checkpoint(str(tmp_path))
  (tmp_path / "tokenizer.json").write_text("{not json")
  with pytest.raises(DataNotFoundError, match="is not a tokenizer.json"):
    tokenization.Tokenizer.of_checkpoint(str(tmp_path))
