"""Tests of tna_jax.core.data: IDX reading, dataset loading and its errors, normalize, augment."""

import gzip
import io
import json
import os
import socket
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tna_jax.core import data
from tna_jax.errors import ConfigError, DataNotFoundError


def write_idx(path, array, gz=False):
  """Writes `array` as an IDX file: 0000, type code, ndim, big-endian dims, big-endian data."""
  codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D}
  header = bytes([0, 0, codes[array.dtype], array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
  raw = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
  with open(path, "wb") as f:
    f.write(gzip.compress(raw) if gz else raw)


def write_fake_fashion_mnist(directory, num_train=12, num_test=5, gz=True):
  rng = np.random.default_rng(0)
  arrays = {
      "train-images-idx3-ubyte": rng.integers(0, 256, (num_train, 28, 28), dtype=np.uint8),
      "train-labels-idx1-ubyte": rng.integers(0, 10, num_train, dtype=np.uint8),
      "t10k-images-idx3-ubyte": rng.integers(0, 256, (num_test, 28, 28), dtype=np.uint8),
      "t10k-labels-idx1-ubyte": rng.integers(0, 10, num_test, dtype=np.uint8),
  }
  for stem, array in arrays.items():
    write_idx(os.path.join(directory, stem + (".gz" if gz else "")), array, gz=gz)
  return arrays


@pytest.fixture
def no_network(monkeypatch):
  """Fails the test on any attempt to open a network connection."""

  def refuse(*args, **kwargs):
    raise AssertionError("network access attempted")

  monkeypatch.setattr(socket.socket, "connect", refuse)
  monkeypatch.setattr(socket, "create_connection", refuse)


# read_idx


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
        np.array([3, 1, 4, 1, 5], np.uint8),
        np.array([[-7, 70000], [1, 2]], np.int32),
        np.array([0.5, -1.25], np.float32),
    ],
)
def test_read_idx_round_trip(tmp_path, array, gz):
  path = tmp_path / ("x.idx.gz" if gz else "x.idx")
  write_idx(path, array, gz=gz)
  out = data.read_idx(str(path))
  assert out.shape == array.shape
  assert out.dtype == array.dtype  # native byte order, not the file's big-endian
  np.testing.assert_array_equal(out, array)


@pytest.mark.parametrize(
    "mutate, problem",
    [
        (lambda raw: b"\x01\x02" + raw[2:], "magic"),
        (lambda raw: raw[:2] + b"\x42" + raw[3:], "type code"),
        (lambda raw: raw[:-1], "bytes but header"),
        (lambda raw: raw[:6], "header"),
    ],
)
def test_read_idx_rejects_corrupt_files(tmp_path, mutate, problem):
  path = tmp_path / "bad.idx"
  write_idx(path, np.zeros((2, 3, 3), np.uint8))
  path.write_bytes(mutate(path.read_bytes()))
  with pytest.raises(DataNotFoundError, match=problem) as info:
    data.read_idx(str(path))
  assert str(path) in str(info.value)


def test_read_idx_rejects_damaged_gzip(tmp_path):
  path = tmp_path / "bad.idx.gz"
  write_idx(path, np.zeros((50, 28, 28), np.uint8), gz=True)
  path.write_bytes(path.read_bytes()[:-30])
  with pytest.raises(DataNotFoundError, match="gzip"):
    data.read_idx(str(path))


# Fashion-MNIST


@pytest.mark.parametrize("gz", [False, True])
def test_load_fake_fashion_mnist(tmp_path, gz):
  arrays = write_fake_fashion_mnist(tmp_path, gz=gz)
  ds = data.load_dataset("fashion_mnist", data_dir=str(tmp_path))
  assert ds.name == "fashion_mnist"
  assert ds.train_images.shape == (12, 28, 28, 1) and ds.train_images.dtype == np.uint8
  assert ds.test_images.shape == (5, 28, 28, 1) and ds.test_images.dtype == np.uint8
  assert ds.train_labels.shape == (12,) and ds.train_labels.dtype == np.int32
  assert ds.test_labels.shape == (5,) and ds.test_labels.dtype == np.int32
  assert ds.image_shape == (28, 28, 1)
  assert ds.num_classes == 10
  np.testing.assert_array_equal(ds.train_images[..., 0], arrays["train-images-idx3-ubyte"])
  np.testing.assert_array_equal(ds.test_labels, arrays["t10k-labels-idx1-ubyte"])
  train = arrays["train-images-idx3-ubyte"] / 255.0
  np.testing.assert_allclose(ds.mean, [train.mean()], rtol=1e-9)
  np.testing.assert_allclose(ds.std, [train.std()], rtol=1e-9)


def test_subset_keeps_first_examples_and_full_statistics(tmp_path):
  write_fake_fashion_mnist(tmp_path)
  full = data.load_dataset("fashion_mnist", data_dir=str(tmp_path))
  small = data.load_dataset("fashion_mnist", data_dir=str(tmp_path), num_train=4, num_test=None)
  assert small.train_images.shape[0] == small.train_labels.shape[0] == 4
  assert small.test_images.shape[0] == 5
  np.testing.assert_array_equal(small.train_images, full.train_images[:4])
  np.testing.assert_array_equal(small.train_labels, full.train_labels[:4])
  assert (small.mean, small.std) == (full.mean, full.std)
  with pytest.raises(ConfigError, match="num_test=6"):
    full.subset(None, 6)
  with pytest.raises(ConfigError, match="num_train=0"):
    full.subset(0, None)


def test_missing_fashion_mnist_directory_says_how_to_install(tmp_path):
  missing = tmp_path / "nowhere"
  with pytest.raises(DataNotFoundError) as info:
    data.load_dataset("fashion_mnist", data_dir=str(missing))
  message = str(info.value)
  assert "apt-get install -y dataset-fashion-mnist" in message
  assert str(missing) in message
  assert "--config.data_dir" in message


def test_missing_fashion_mnist_file_is_named(tmp_path):
  write_fake_fashion_mnist(tmp_path)
  os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
  with pytest.raises(DataNotFoundError) as info:
    data.load_dataset("fashion_mnist", data_dir=str(tmp_path))
  message = str(info.value)
  assert "has no t10k-labels-idx1-ubyte[.gz]." in message
  assert str(tmp_path) in message
  assert "apt-get install -y dataset-fashion-mnist" in message


def test_unknown_dataset_is_a_config_error():
  with pytest.raises(ConfigError) as info:
    data.load_dataset("imagenet")
  for name in data.DATASET_NAMES:
    assert name in str(info.value)
  assert "imagenet" in str(info.value)


def test_importing_data_does_not_import_tfds():
  code = "import sys, tna_jax.core.data; sys.exit('tensorflow_datasets' in sys.modules)"
  subprocess.run([sys.executable, "-c", code], check=True)


@pytest.fixture(scope="module")
def fashion_mnist():
  """The real Fashion-MNIST from the Debian package (CI installs it; never skipped)."""
  return data.load_dataset("fashion_mnist")


def test_real_fashion_mnist(fashion_mnist):
  ds = fashion_mnist
  assert ds.train_images.shape == (60000, 28, 28, 1) and ds.train_images.dtype == np.uint8
  assert ds.test_images.shape == (10000, 28, 28, 1) and ds.test_images.dtype == np.uint8
  assert ds.train_labels.shape == (60000,) and ds.test_labels.shape == (10000,)
  assert ds.num_classes == 10
  np.testing.assert_array_equal(np.bincount(ds.train_labels), np.full(10, 6000))
  np.testing.assert_array_equal(np.bincount(ds.test_labels), np.full(10, 1000))
  # The widely published Fashion-MNIST statistics.
  np.testing.assert_allclose(ds.mean, [0.2860], atol=1e-4)
  np.testing.assert_allclose(ds.std, [0.3530], atol=1e-4)


def test_normalize_standardizes_real_data(fashion_mnist):
  ds = fashion_mnist
  x = jax.jit(data.normalize, static_argnums=(1, 2))(ds.train_images, ds.mean, ds.std)
  assert x.dtype == jnp.float32 and x.shape == ds.train_images.shape
  assert abs(float(x.mean())) < 1e-3
  assert abs(float(x.std()) - 1.0) < 1e-3


def test_normalize_per_channel():
  images = np.array([[[[0, 255, 51]]]], np.uint8)
  out = data.normalize(jnp.asarray(images), (0.0, 0.5, 0.2), (1.0, 0.5, 0.1))
  np.testing.assert_allclose(out[0, 0, 0], [0.0, 1.0, 0.0], atol=1e-6)


# TFDS datasets (read without TensorFlow)


def _png(image):
  import PIL.Image  # pylint: disable=g-import-not-at-top

  buffer = io.BytesIO()
  PIL.Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="png")
  return buffer.getvalue()


def prepare_fake_tfds(name, data_dir, num_train=6, num_test=3):
  """Prepares `name` in array_record under `data_dir` with random examples, offline.

  The real builder class is subclassed (same name, version and features) with only the
  example generation replaced, so tfds.builder(name, data_dir) finds it as prepared.
  Images are given as PNG bytes because encoding arrays would need TensorFlow.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  features = tfds.builder_cls(name)(data_dir=str(data_dir)).info.features
  rng = np.random.default_rng(0)

  def example():
    out = {}
    for key, feature in features.items():
      if isinstance(feature, tfds.features.Image):
        out[key] = rng.integers(0, 256, feature.shape, dtype=np.uint8)
      elif isinstance(feature, tfds.features.ClassLabel):
        out[key] = int(rng.integers(feature.num_classes))
      else:
        out[key] = "id"
    return out

  splits = {
      "train": [example() for _ in range(num_train)],
      "test": [example() for _ in range(num_test)],
  }

  def body(namespace):
    namespace["name"] = name
    namespace["_split_generators"] = lambda self, dl_manager: {
        split: self._generate_examples(split) for split in splits
    }
    namespace["_generate_examples"] = lambda self, split: (
        (i, {**ex, "image": _png(ex["image"])}) for i, ex in enumerate(splits[split])
    )

  fake_cls = types.new_class("Fake", (tfds.builder_cls(name),), {"skip_registration": True}, body)
  fake_cls(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  return features, splits


@pytest.mark.parametrize("name", data.TFDS_DATASET_NAMES)
def test_load_prepared_tfds_dataset(tmp_path, no_network, name):
  features, splits = prepare_fake_tfds(name, tmp_path)
  ds = data.load_dataset(name, data_dir=str(tmp_path), num_test=2)
  shape = features["image"].shape
  assert ds.name == name
  assert ds.train_images.shape == (6,) + shape and ds.train_images.dtype == np.uint8
  assert ds.test_images.shape == (2,) + shape and ds.test_images.dtype == np.uint8
  assert ds.train_labels.dtype == np.int32 and ds.test_labels.shape == (2,)
  assert ds.num_classes == features["label"].num_classes
  assert len(ds.mean) == len(ds.std) == shape[-1]
  # TFDS stores examples in its own (hashed) order, so compare as sets of (image, label).
  assert {(im.tobytes(), int(lb)) for im, lb in zip(ds.train_images, ds.train_labels)} == {
      (ex["image"].tobytes(), ex["label"]) for ex in splits["train"]
  }
  expected_mean = ds.train_images.reshape(-1, shape[-1]).mean(axis=0) / 255.0
  np.testing.assert_allclose(ds.mean, expected_mean, rtol=1e-9)


def test_unprepared_tfds_dataset_says_how_to_prepare(tmp_path, no_network):
  with pytest.raises(DataNotFoundError) as info:
    data.load_dataset("cifar10", data_dir=str(tmp_path))
  message = str(info.value)
  assert "cifar10" in message and "tfds build" in message and str(tmp_path) in message
  assert "--file_format=array_record" in message and "file_format='array_record'" in message
  assert "--config.data_dir" in message
  assert not os.listdir(tmp_path)  # nothing downloaded or created


def test_tfds_dataset_in_tfrecord_format_says_how_to_rebuild(tmp_path, no_network):
  prepare_fake_tfds("mnist", tmp_path)
  (info_path,) = tmp_path.glob("mnist/*/dataset_info.json")
  info = json.loads(info_path.read_text())
  info["fileFormat"] = "tfrecord"  # what a default `tfds build` writes
  info_path.write_text(json.dumps(info))
  with pytest.raises(DataNotFoundError, match="needs TensorFlow") as info:
    data.load_dataset("mnist", data_dir=str(tmp_path))
  assert "--file_format=array_record" in str(info.value)


# augment


def _batch(batch=64, size=6, channels=2):
  rng = np.random.default_rng(1)
  return jnp.asarray(rng.normal(size=(batch, size, size, channels)), jnp.float32)


def test_augment_off_is_identity():
  images = _batch()
  out = data.augment(jax.random.key(0), images, flip=False, crop_padding=0)
  np.testing.assert_array_equal(out, images)


def test_augment_flip_mirrors_some_examples_only():
  images = _batch()
  out = np.asarray(jax.jit(data.augment, static_argnums=(2, 3))(jax.random.key(0), images, True, 0))
  assert out.shape == images.shape
  same = np.all(out == images, axis=(1, 2, 3))
  mirrored = np.all(out == np.asarray(images)[:, :, ::-1], axis=(1, 2, 3))
  assert np.all(same | mirrored)
  assert same.any() and mirrored.any()  # drawn per example, not once per batch


def test_augment_crop_is_a_shift_of_the_padded_image():
  pad, images = 1, _batch(batch=256)
  out = np.asarray(data.augment(jax.random.key(3), images, flip=False, crop_padding=pad))
  assert out.shape == images.shape
  padded = np.pad(np.asarray(images), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  size = images.shape[1]
  offsets = []
  for i in range(len(out)):
    matches = [
        (dy, dx)
        for dy in range(2 * pad + 1)
        for dx in range(2 * pad + 1)
        if np.array_equal(out[i], padded[i, dy : dy + size, dx : dx + size])
    ]
    assert matches, f"example {i} is not a crop of its padded input"
    offsets.append(matches[0])
  # Per example, and every offset including both extremes is reachable.
  assert set(offsets) == {(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)}


def test_augment_same_key_same_result():
  images = _batch()
  first = data.augment(jax.random.key(7), images, flip=True, crop_padding=1)
  again = data.augment(jax.random.key(7), images, flip=True, crop_padding=1)
  other = data.augment(jax.random.key(8), images, flip=True, crop_padding=1)
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, other)


def test_augment_rejects_negative_padding():
  with pytest.raises(ConfigError, match="crop_padding"):
    data.augment(jax.random.key(0), _batch(), flip=False, crop_padding=-1)


def test_fashion_mnist_through_tfds_only_on_explicit_opt_in(tmp_path, no_network, monkeypatch):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(data, "FASHION_MNIST_DIR", str(tmp_path / "no_debian_package"))
  monkeypatch.delenv(data.DOWNLOAD_ENV, raising=False)
  with pytest.raises(DataNotFoundError, match="apt-get install"):
    data.load_dataset("fashion_mnist")
  downloads, real_builder = [], tfds.builder

  def builder(name, data_dir=None, **kwargs):  # stands in for the network: prepares fake examples
    if kwargs.get("file_format") == "array_record":
      downloads.append(name)
      prepare_fake_tfds(name, tmp_path / "tfds")
    return real_builder(name, data_dir=str(tmp_path / "tfds"), **kwargs)

  monkeypatch.setattr(tfds, "builder", builder)
  monkeypatch.setenv(data.DOWNLOAD_ENV, "1")
  ds = data.load_dataset("fashion_mnist")
  assert downloads == ["fashion_mnist"] and ds.train_images.shape == (6, 28, 28, 1) and ds.num_classes == 10
