"""Splitting a training set over federated clients: IID, Dirichlet label skew, label shards.

A partition is a list of index arrays, one per client, into the training set; together they
cover every example exactly once. Each split is a pure function of the labels and a seed
(numpy's Generator, so the same seed gives the same split on any machine), so every
algorithm of a comparison, and a resumed run, sees the same clients.
"""

from typing import Sequence

import numpy as np

from tna_jax.errors import ConfigError, check_choice
from tna_jax.runs import reporting

KINDS = ("iid", "dirichlet", "shards")
# Fresh Dirichlet draws tried before giving up on the minimum client size.
MAX_DRAWS = 1000


def partition(labels: np.ndarray, kind: str, num_clients: int, *, seed: int, alpha: float = 0.5,
              classes_per_client: int = 2, min_client_size: int = 1) -> list[np.ndarray]:
  """Splits the examples with `labels` over `num_clients` clients.

  Args:
    labels: int [N] training labels.
    kind: 'iid' (a random equal split), 'dirichlet' (label skew, see `dirichlet`) or
      'shards' (pathological, see `shards`).
    num_clients: number of clients.
    seed: the partition seed.
    alpha: Dirichlet concentration (smaller = more skewed); 'dirichlet' only.
    classes_per_client: shards per client; 'shards' only.
    min_client_size: every client must get at least this many examples. 'dirichlet'
      redraws until it holds (as the authors' code does); the others raise.

  Returns:
    One sorted int64 index array per client.

  Raises:
    ConfigError: unknown kind, values out of range, or a client below `min_client_size`.
  """
  check_choice("partition.kind", kind, KINDS)
  labels = np.asarray(labels)
  if not 1 <= num_clients <= len(labels):
    raise ConfigError(f"partition.num_clients={num_clients} is out of range; allowed: 1 to the "
                      f"{len(labels)} training examples.")
  if min_client_size < 1 or min_client_size * num_clients > len(labels):
    raise ConfigError(f"partition.min_client_size={min_client_size} is out of range; allowed: 1 to "
                      f"{len(labels) // num_clients} ({len(labels)} examples over {num_clients} clients).")
  rng = np.random.default_rng(seed)
  if kind == "iid":
    parts = np.array_split(rng.permutation(len(labels)), num_clients)
  elif kind == "dirichlet":
    parts = dirichlet(labels, num_clients, alpha, rng, min_client_size)
  else:
    parts = shards(labels, num_clients, classes_per_client, rng)
  parts = [np.sort(p) for p in parts]
  smallest = int(np.argmin([len(p) for p in parts]))
  if len(parts[smallest]) < min_client_size:
    raise ConfigError(f"partition {kind!r} gives client {smallest} only {len(parts[smallest])} examples, below "
                      f"partition.min_client_size={min_client_size}; use fewer clients, more data or a smaller "
                      "minimum.")
  return parts


def dirichlet(labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator,
              min_client_size: int) -> list[np.ndarray]:
  """Label skew as in the authors' code (NIID-Bench style).

  For each class, the class's examples are shuffled and cut among clients in proportions
  drawn from Dir(alpha); a client already holding more than N / num_clients examples gets
  no share of later classes, which keeps sizes from running away. The whole draw repeats
  until every client has at least `min_client_size` examples.
  """
  if not alpha > 0:
    raise ConfigError(f"partition.alpha={alpha!r} must be > 0.")
  n = len(labels)
  by_class = [np.flatnonzero(labels == k) for k in np.unique(labels)]
  for _ in range(MAX_DRAWS):
    parts = [[] for _ in range(num_clients)]
    sizes = np.zeros(num_clients, np.int64)
    for members in by_class:
      members = rng.permutation(members)
      eligible = sizes < n / num_clients
      proportions = rng.dirichlet(np.full(num_clients, float(alpha))) * eligible
      if proportions.sum() == 0:  # every eligible draw underflowed (tiny alpha): share equally
        proportions = eligible.astype(np.float64)
      cuts = (np.cumsum(proportions / proportions.sum()) * len(members)).astype(np.int64)[:-1]
      for client, chunk in enumerate(np.split(members, cuts)):
        parts[client].append(chunk)
        sizes[client] += len(chunk)
    if sizes.min() >= min_client_size:
      return [np.concatenate(p) for p in parts]
  raise ConfigError(f"partition 'dirichlet' with alpha={alpha} left a client below partition.min_client_size="
                    f"{min_client_size} in {MAX_DRAWS} draws; raise alpha, lower the minimum or use "
                    "fewer clients.")


def shards(labels: np.ndarray, num_clients: int, classes_per_client: int,
           rng: np.random.Generator) -> list[np.ndarray]:
  """Pathological label skew: every client holds exactly `classes_per_client` classes.

  Each client in turn takes the classes held by the fewest clients so far (ties broken at
  random), so every class goes to as many clients as any other (within one) and the
  pairings are random. Each class's examples are split evenly among its holders.
  """
  classes = np.unique(labels)
  if not 1 <= classes_per_client <= len(classes) or num_clients * classes_per_client < len(classes):
    raise ConfigError(f"partition.classes_per_client={classes_per_client} is out of range; allowed: "
                      f"{-(-len(classes) // num_clients)} to {len(classes)} ({num_clients} clients must hold all "
                      f"{len(classes)} classes).")
  holders = [[] for _ in classes]
  for i in range(num_clients):
    fewest = np.lexsort((rng.random(len(classes)), [len(h) for h in holders]))[:classes_per_client]
    for c in fewest:
      holders[c].append(i)
  parts = [[] for _ in range(num_clients)]
  for c, owners in enumerate(holders):
    for i, chunk in zip(owners, np.array_split(rng.permutation(np.flatnonzero(labels == classes[c])), len(owners))):
      parts[i].append(chunk)
  return [np.concatenate(p) for p in parts]


def label_counts(labels: np.ndarray, parts: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
  """int [clients, classes]: how many examples of each class each client holds."""
  return np.stack([np.bincount(np.asarray(labels)[p], minlength=num_classes) for p in parts])


def summary(counts: np.ndarray) -> dict:
  """What a person checks about a split: client sizes and how many classes each really has."""
  sizes = counts.sum(1)
  present = (counts > 0).sum(1)
  dominant = counts.max(1) / np.maximum(sizes, 1)
  return {
      "num_clients": len(sizes),
      "sizes": sizes.tolist(),
      "size_min": int(sizes.min()),
      "size_mean": float(sizes.mean()),
      "size_max": int(sizes.max()),
      "classes_per_client_mean": float(present.mean()),
      "classes_per_client_min": int(present.min()),
      "dominant_class_share_mean": float(dominant.mean()),
      "label_counts": counts.tolist(),
  }


def plot_label_distribution(path, counts: np.ndarray, title: str) -> None:
  """A stacked bar per client, one colour per class, saved as PNG."""
  import matplotlib.ticker  # pylint: disable=g-import-not-at-top  (matplotlib loads only when plotting)
  plt = reporting.pyplot()
  num_clients, num_classes = counts.shape
  fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * num_clients + 2), 4))
  colors = plt.get_cmap("tab10" if num_classes <= 10 else "tab20")
  bottom = np.zeros(num_clients)
  for k in range(num_classes):
    ax.bar(np.arange(num_clients), counts[:, k], bottom=bottom, color=colors(k % colors.N), label=str(k))
    bottom += counts[:, k]
  ax.set(xlabel="client", ylabel="training examples", title=title)
  ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
  if num_classes <= 20:
    ax.legend(title="class", fontsize="small", ncol=2, bbox_to_anchor=(1.01, 1), loc="upper left")
  reporting.write_png(fig, path)


def local_test_weights(test_labels: np.ndarray, counts: np.ndarray) -> np.ndarray:
  """float [clients, M]: weights on the test examples that give each client's label mix.

  A weighted test accuracy with row c is sum_k p_c(k) * accuracy on class k, where p_c is
  client c's share of class k: the global test set reweighted to each client's own
  distribution (the local accuracy of personalized FL, without a per-client test split).
  """
  per_class = np.bincount(test_labels, minlength=counts.shape[1]).astype(np.float64)
  shares = counts / np.maximum(counts.sum(1, keepdims=True), 1)
  weights = shares / np.maximum(per_class, 1)
  return weights[:, test_labels].astype(np.float32)
