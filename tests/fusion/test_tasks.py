"""Tasks cut from one dataset: class groupings (`relabel`, `parse_groups`) and training ranges."""

import numpy as np
import pytest

from tna_jax.core import data
from tna_jax.errors import ConfigError
from tna_jax.fusion import tasks


def _toy(num_per_class=2):
  labels = np.arange(10, dtype=np.int32).repeat(num_per_class)
  images = labels.astype(np.uint8).reshape(-1, 1, 1, 1)
  return data.Dataset("toy", images, labels, images[::-1], labels[::-1], 10, (0.5,), (0.25,))


def test_relabel_and_parse_groups():
  task = tasks.relabel(_toy(), tasks.parse_groups("0+2/9", 10), name="zero-two-nine")
  assert task.num_classes == 2 and task.name == "zero-two-nine"
  assert task.train_labels.tolist() == [0, 0, 0, 0, 1, 1]
  assert task.train_images.ravel().tolist() == [0, 0, 2, 2, 9, 9]
  assert task.test_labels.tolist() == [1, 1, 0, 0, 0, 0] and task.test_images.ravel().tolist() == [9, 9, 2, 2, 0, 0]
  assert (task.mean, task.std) == ((0.5,), (0.25,))  # every task normalizes like its source
  assert tasks.parse_groups("", 3) == ((0,), (1,), (2,))
  assert tasks.parse_groups(" 1+0/2 ", 3) == ((1, 0), (2,))
  for bad, match in (("0+x/1", "not '\\+'-separated"), ("0/0", "class 0 is out of range"),
                     ("0/10", "class 10 is out of range"), ("3", "needs at least 2")):
    with pytest.raises(ConfigError, match=match):
      tasks.parse_groups(bad, 10)


def test_train_range_keeps_only_its_stretch_and_refuses_what_does_not_fit():
  part = tasks.train_range(_toy(), 4, 6, "split")
  assert part.train_labels.tolist() == [2, 2, 3, 3, 4, 4]
  assert part.test_labels.tolist() == _toy().test_labels.tolist()  # the test split is untouched
  with pytest.raises(ConfigError, match=r"split.num_heldout: training examples \[15, 25\) do not fit the 20"):
    tasks.train_range(_toy(), 15, 10, "split.num_heldout")
  with pytest.raises(ConfigError, match="do not fit"):
    tasks.train_range(_toy(), 0, 0, "pretrain")
