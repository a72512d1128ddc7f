"""Classification tasks made from one dataset: class groupings and disjoint training ranges.

Pretraining on other classes, ColD's contributor and unseen tasks, and the fine-tuning and
held-out splits of a soup are all cut from one dataset: `relabel` makes the task whose
classes are groups of the source's classes, `train_range` keeps a stretch of training
examples so that the parts never share an example.
"""

import dataclasses

import numpy as np

from tna_jax.core import data
from tna_jax.errors import ConfigError


def parse_groups(spec: str, num_classes: int) -> tuple[tuple[int, ...], ...]:
  """'0+2/1/3' -> ((0, 2), (1,), (3,)): each '/'-separated group becomes one new class.

  '' means every class as itself. A class may appear in at most one group.
  """
  if not spec.strip():
    return tuple((c,) for c in range(num_classes))
  groups, seen = [], set()
  for group in spec.strip().split("/"):
    try:
      classes = tuple(int(c) for c in group.split("+"))
    except ValueError:
      raise ConfigError(f"task {spec!r}: group {group!r} is not '+'-separated class numbers; "
                        "write a task as '/'-separated groups like '0+2/1/3'.") from None
    bad = [c for c in classes if not 0 <= c < num_classes or c in seen]
    if bad:
      raise ConfigError(f"task {spec!r}: class {bad[0]} is out of range 0..{num_classes - 1} or repeated.")
    seen.update(classes)
    groups.append(classes)
  if len(groups) < 2:
    raise ConfigError(f"task {spec!r} has {len(groups)} group; a classification task needs at least 2.")
  return tuple(groups)


def relabel(dataset: data.Dataset, groups: tuple[tuple[int, ...], ...], name: str | None = None) -> data.Dataset:
  """The task whose class i is the union of `groups[i]`; examples of other classes are dropped.

  Pretraining on other classes and ColD's tasks (label groupings, class subsets) are both
  relabelings. mean and std stay those of the source, so every task normalizes alike.
  """
  lookup = np.full(dataset.num_classes, -1, np.int32)
  for new, classes in enumerate(groups):
    lookup[list(classes)] = new

  def split(images, labels):
    new_labels = lookup[labels]
    keep = new_labels >= 0
    return images[keep], new_labels[keep]

  train_images, train_labels = split(dataset.train_images, dataset.train_labels)
  test_images, test_labels = split(dataset.test_images, dataset.test_labels)
  return dataclasses.replace(dataset, name=name or dataset.name, train_images=train_images,
                             train_labels=train_labels, test_images=test_images, test_labels=test_labels,
                             num_classes=len(groups))


def train_range(dataset: data.Dataset, start: int, count: int, what: str) -> data.Dataset:
  """Only training examples [start, start + count); disjoint ranges keep pretraining,
  fine-tuning, held-out and each contributor's data apart."""
  available = len(dataset.train_labels)
  if count < 1 or start + count > available:
    raise ConfigError(f"{what}: training examples [{start}, {start + count}) do not fit the {available} of "
                      f"{dataset.name}; lower the counts.")
  return dataclasses.replace(dataset, train_images=dataset.train_images[start:start + count],
                             train_labels=dataset.train_labels[start:start + count])
