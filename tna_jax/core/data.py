"""Small image-classification datasets, held whole in memory, plus jittable preprocessing.

The datasets used here (Fashion-MNIST, MNIST, CIFAR-10/100) fit in memory as uint8, so a
dataset is loaded once into numpy arrays and moved to the device once; the training loop
shuffles, batches, normalizes and augments inside compiled code with `normalize` and
`augment`. Nothing here downloads: a missing dataset raises DataNotFoundError that says
how to provide it, because training machines (TPU VMs, CI) often have no internet.

Fashion-MNIST comes from the IDX files of the Debian package `dataset-fashion-mnist`; the
others come from a prepared TFDS directory, read without TensorFlow.
"""

import dataclasses
import gzip
import os

import jax
import jax.numpy as jnp
import numpy as np

from tna_jax.errors import ConfigError, DataNotFoundError, check_choice

# Any supervised TFDS image-classification dataset works: add its TFDS name here.
TFDS_DATASET_NAMES = ("mnist", "cifar10", "cifar100")
DATASET_NAMES = ("fashion_mnist",) + TFDS_DATASET_NAMES

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
# Set to 1, Fashion-MNIST missing from FASHION_MNIST_DIR is downloaded through TFDS instead: an
# explicit opt-in for places without the Debian package (the colabs offer it); never in tests.
DOWNLOAD_ENV = "TNA_DOWNLOAD_DATA"
_FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_FASHION_MNIST_CLASSES = 10

# IDX type codes -> big-endian numpy dtypes (http://yann.lecun.com/exdb/mnist/).
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A whole dataset in host memory, with the train statistics `normalize` needs.

  Images stay uint8 (4x smaller than float32 on the device); mean and std are per channel
  in [0, 1] units, computed on the full train split.
  """

  name: str
  train_images: np.ndarray  # uint8 [N, H, W, C]
  train_labels: np.ndarray  # int32 [N]
  test_images: np.ndarray  # uint8 [M, H, W, C]
  test_labels: np.ndarray  # int32 [M]
  num_classes: int
  mean: tuple[float, ...]
  std: tuple[float, ...]

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.train_images.shape[1:])

  def subset(self, num_train: int | None, num_test: int | None) -> "Dataset":
    """The first examples of each split (None keeps a split whole), for quick runs and tests.

    mean and std stay those of the full train split, so a shrunken run normalizes exactly
    like the full one.
    """
    n_train = _checked_count("num_train", num_train, len(self.train_labels))
    n_test = _checked_count("num_test", num_test, len(self.test_labels))
    return dataclasses.replace(
        self,
        train_images=self.train_images[:n_train],
        train_labels=self.train_labels[:n_train],
        test_images=self.test_images[:n_test],
        test_labels=self.test_labels[:n_test],
    )


def _checked_count(name: str, count: int | None, available: int) -> int:
  """`count`, or all `available` for None; a count the split cannot supply is a ConfigError."""
  if count is None:
    return available
  if not 1 <= count <= available:
    raise ConfigError(f"{name}={count} is out of range; this split has {available} examples.")
  return count


def load_dataset(
    name: str, data_dir: str = "", num_train: int | None = None, num_test: int | None = None
) -> Dataset:
  """Loads dataset `name` whole into memory, optionally keeping only the first examples.

  Args:
    name: one of DATASET_NAMES.
    data_dir: for fashion_mnist, a directory with the four IDX files ('' means
      FASHION_MNIST_DIR); for the TFDS datasets, a TFDS data_dir where the dataset was
      prepared in array_record format ('' means TFDS's default, $TFDS_DATA_DIR or
      ~/tensorflow_datasets).
    num_train: keep only this many train examples (None: all).
    num_test: keep only this many test examples (None: all).

  Raises:
    ConfigError: unknown name or out-of-range counts.
    DataNotFoundError: the dataset is not on this machine, or not readable without
      TensorFlow; the message says how to provide it.
  """
  check_choice("dataset", name, DATASET_NAMES)
  if name == "fashion_mnist":
    try:
      dataset = _load_fashion_mnist(data_dir or FASHION_MNIST_DIR)
    except DataNotFoundError:
      if data_dir or os.environ.get(DOWNLOAD_ENV) != "1":
        raise
      dataset = _load_tfds(name, "", download=True)
  else:
    dataset = _load_tfds(name, data_dir)
  if num_train is None and num_test is None:
    return dataset
  return dataset.subset(num_train, num_test)


def read_idx(path: str) -> np.ndarray:
  """Reads an IDX file (gzip-compressed or not) into a native-endian numpy array.

  The header is checked against the file size, so a truncated or foreign file fails here
  with its path instead of later as garbage images.

  Raises:
    DataNotFoundError: the file is not a valid IDX file.
  """
  with open(path, "rb") as f:
    raw = f.read()
  if raw[:2] == _GZIP_MAGIC:
    try:
      raw = gzip.decompress(raw)
    except (OSError, EOFError) as e:
      raise _corrupt(path, f"gzip data is damaged ({e})") from e
  if len(raw) < 4 or raw[:2] != b"\0\0":
    raise _corrupt(path, f"bad magic number {raw[:4].hex()!r}, expected 0000TTDD")
  type_code, ndim = raw[2], raw[3]
  if type_code not in _IDX_DTYPES:
    raise _corrupt(path, f"unknown data type code 0x{type_code:02x}")
  if ndim == 0:
    raise _corrupt(path, "zero dimensions")
  header_size = 4 + 4 * ndim
  if len(raw) < header_size:
    raise _corrupt(path, f"file ends inside the header of {ndim} dimensions")
  shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
  dtype = _IDX_DTYPES[type_code]
  expected = header_size + int(np.prod(shape)) * dtype.itemsize
  if len(raw) != expected:
    raise _corrupt(path, f"{len(raw)} bytes but header shape {shape} of {dtype.name} needs {expected}")
  data = np.frombuffer(raw, dtype, offset=header_size).reshape(shape)
  return data.astype(dtype.newbyteorder("="))


def _corrupt(path: str, problem: str) -> DataNotFoundError:
  return DataNotFoundError(
      f"{path} is not a valid IDX file: {problem}. Replace it with an intact copy "
      "(for Fashion-MNIST: `apt-get install --reinstall -y dataset-fashion-mnist`)."
  )


def _load_fashion_mnist(data_dir: str) -> Dataset:
  """Fashion-MNIST from IDX files in `data_dir`, each either plain or .gz."""
  paths, missing = {}, []
  for key, stem in _FASHION_MNIST_FILES.items():
    candidates = (os.path.join(data_dir, stem), os.path.join(data_dir, stem + ".gz"))
    found = [path for path in candidates if os.path.isfile(path)]
    if found:
      paths[key] = found[0]
    else:
      missing.append(f"{stem}[.gz]")
  if missing:
    if os.path.isdir(data_dir):
      where = f"{data_dir} has no {', '.join(missing)}"
    else:
      where = f"{data_dir} does not exist"
    raise DataNotFoundError(
        f"Fashion-MNIST not found: {where}. Install it with "
        "`apt-get install -y dataset-fashion-mnist` (Debian; puts the files in "
        f"{FASHION_MNIST_DIR}) or pass --config.data_dir=DIR where DIR holds the four IDX files "
        f"{', '.join(_FASHION_MNIST_FILES.values())} (each may be .gz)."
    )
  arrays = {key: read_idx(path) for key, path in paths.items()}
  for split in ("train", "test"):
    images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
      raise DataNotFoundError(
          f"Fashion-MNIST files in {data_dir} do not match: {split} images {images.shape}, "
          f"labels {labels.shape}; expected [N, H, W] images and [N] labels."
      )
  return _make_dataset(
      "fashion_mnist",
      arrays["train_images"][..., None],
      arrays["train_labels"],
      arrays["test_images"][..., None],
      arrays["test_labels"],
      _FASHION_MNIST_CLASSES,
  )


def _load_tfds(name: str, data_dir: str, download: bool = False) -> Dataset:
  """A prepared TFDS dataset, read through its random-access data source without TensorFlow.

  With `download` (only the explicit DOWNLOAD_ENV opt-in for Fashion-MNIST), an unprepared
  dataset is downloaded and prepared first; that needs the network and TensorFlow (Colab
  has both)."""
  # Imported here: TFDS takes most of a second to import and logs through absl, which
  # Fashion-MNIST runs should not pay for.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  # None lets TFDS use its own default ($TFDS_DATA_DIR or ~/tensorflow_datasets). Only the
  # builder is made here; nothing calls download_and_prepare, so nothing is downloaded.
  builder = tfds.builder(name, data_dir=data_dir or None)
  if download and not builder.is_prepared():
    builder = tfds.builder(name, data_dir=data_dir or None, file_format="array_record")
    builder.download_and_prepare()
  rebuild = (
      "Prepare it on a machine with internet and TensorFlow (TFDS needs it to encode the "
      "images), in array_record format, which this machine reads without TensorFlow: "
      f"`tfds build {name} --data_dir=DIR --file_format=array_record` or "
      f"`python -c \"import tensorflow_datasets as tfds; tfds.builder('{name}', data_dir='DIR', "
      "file_format='array_record').download_and_prepare()\"`; copy DIR to this machine "
      "(e.g. `gsutil -m cp -r` for a TPU VM) and pass --config.data_dir=DIR."
  )
  if not builder.is_prepared():
    raise DataNotFoundError(f"TFDS dataset {name} is not prepared in {builder.data_dir}. {rebuild}")
  image_key, label_key = builder.info.supervised_keys
  try:
    sources = builder.as_data_source(split=["train", "test"])
  except NotImplementedError as e:
    raise DataNotFoundError(
        f"TFDS dataset {name} in {builder.data_dir} is stored as {builder.info.file_format.value}, "
        f"which needs TensorFlow to read. {rebuild}"
    ) from e
  splits = []
  for source in sources:
    examples = source.__getitems__(range(len(source)))
    splits.append(np.stack([ex[image_key] for ex in examples]))
    splits.append(np.array([ex[label_key] for ex in examples]))
  return _make_dataset(name, *splits, builder.info.features[label_key].num_classes)


def _make_dataset(
    name: str,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    num_classes: int,
) -> Dataset:
  """Fixes dtypes, checks the labels and computes the train statistics in one place for
  every source. A label outside [0, num_classes) would make the loss NaN without a word
  (the one-hot of an out-of-range class is all zeros), so it is an error here.

  Raises:
    DataNotFoundError: naming the split, the first bad label and its index.
  """
  for split, labels in (("train", train_labels), ("test", test_labels)):
    labels = np.asarray(labels)
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
      raise DataNotFoundError(f"dataset {name}: {split} label {labels[bad[0]]} at index {bad[0]} is outside "
                              f"[0, {num_classes}) ({len(bad)} such labels); the data files are damaged or "
                              "not this dataset's.")
  train_images = np.asarray(train_images, np.uint8)
  mean, std = _channel_stats(train_images)
  return Dataset(
      name=name,
      train_images=train_images,
      train_labels=np.asarray(train_labels, np.int32),
      test_images=np.asarray(test_images, np.uint8),
      test_labels=np.asarray(test_labels, np.int32),
      num_classes=int(num_classes),
      mean=mean,
      std=std,
  )


def _channel_stats(
    images: np.ndarray, chunk: int = 4096
) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean and std in [0, 1] units; chunked, so the whole set is never copied as floats."""
  channels = images.shape[-1]
  total, total_sq = np.zeros(channels), np.zeros(channels)
  for start in range(0, len(images), chunk):
    x = images[start : start + chunk].reshape(-1, channels).astype(np.float64)
    total += x.sum(axis=0)
    total_sq += np.square(x).sum(axis=0)
  count = images.size // channels
  mean = total / count
  std = np.sqrt(np.maximum(total_sq / count - np.square(mean), 0.0))
  return tuple(float(m) for m in mean / 255.0), tuple(float(s) for s in std / 255.0)


def normalize(images_uint8: jax.Array, mean, std) -> jax.Array:
  """float32 (x / 255 - mean) / std with per-channel mean and std; runs inside jit."""
  x = jnp.asarray(images_uint8).astype(jnp.float32) / 255.0
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def augment(key: jax.Array, images: jax.Array, flip: bool, crop_padding: int) -> jax.Array:
  """Random horizontal flip and random crop after zero padding, drawn per example; jittable.

  Args:
    key: PRNG key; the same key gives the same augmentation.
    images: float batch [B, H, W, C].
    flip: mirror each example left-right with probability 1/2.
    crop_padding: pad each side of H and W by this many zeros, then crop back to H x W at
      a random offset (0 disables). Zero is the mean colour after `normalize`, black before.

  Returns:
    The augmented batch, same shape and dtype.
  """
  if crop_padding < 0:
    raise ConfigError(f"crop_padding={crop_padding} must be >= 0.")
  flip_key, crop_key = jax.random.split(key)
  batch, height, width, channels = images.shape
  if flip:
    mirrored = jax.random.bernoulli(flip_key, 0.5, (batch,))
    images = jnp.where(mirrored[:, None, None, None], images[:, :, ::-1, :], images)
  if crop_padding:
    pad = crop_padding
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offsets = jax.random.randint(crop_key, (batch, 2), 0, 2 * pad + 1)

    def crop(image, offset):
      return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, channels))

    images = jax.vmap(crop)(padded, offsets)
  return images
