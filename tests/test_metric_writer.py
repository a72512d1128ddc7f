"""Metrics reach both the JSON lines file and TensorBoard event files."""

import os

import numpy as np
from tensorboardX.event_file_writer import event_pb2  # the event protobuf, bundled with tensorboardX

from tna_jax import metric_writer


def _events(workdir):
  directory = os.path.join(workdir, "tensorboard")
  (name,) = os.listdir(directory)
  with open(os.path.join(directory, name), "rb") as f:
    raw = f.read()
  values, pos = {}, 0
  while pos < len(raw):  # TFRecord framing: length (8), crc (4), payload, crc (4)
    length = int.from_bytes(raw[pos:pos + 8], "little")
    event = event_pb2.Event.FromString(raw[pos + 12:pos + 12 + length])
    pos += 16 + length
    for value in event.summary.value:
      values.setdefault(value.tag, []).append((event.step, value.simple_value))
  return values


def test_writer_records_scalars_and_per_model_vectors(tmp_path):
  writer = metric_writer.MetricWriter(str(tmp_path), names=["a", "b"])
  writer.write(1, {"loss": 0.5, "test_accuracy": np.array([0.8, 0.9])})
  writer.write(2, {"loss": 0.25, "test_accuracy": np.array([0.85, 0.95])})
  writer.write(1, {"test_accuracy": [0.7, 0.6, 0.5]}, names=["c", "d", "e"])  # another group of models
  writer.close()
  records = metric_writer.read_jsonl(writer.path)
  assert [r["step"] for r in records] == [1, 2, 1] and records[1]["test_accuracy"] == [0.85, 0.95]
  assert records[1]["models"] == ["a", "b"] and records[2]["models"] == ["c", "d", "e"]
  events = _events(str(tmp_path))
  assert events["loss"] == [(1, 0.5), (2, 0.25)]
  assert np.allclose([v for _, v in events["test_accuracy/b"]], [0.9, 0.95])
  assert np.allclose([v for _, v in events["test_accuracy/e"]], [0.5])


def test_new_writer_starts_a_fresh_file_unless_resuming(tmp_path):
  metric_writer.MetricWriter(str(tmp_path), tensorboard=False).write(1, {"x": 1.0})
  metric_writer.MetricWriter(str(tmp_path), tensorboard=False, resume=True).write(2, {"x": 2.0})
  assert [r["step"] for r in metric_writer.read_jsonl(str(tmp_path / "metrics.jsonl"))] == [1, 2]
  metric_writer.MetricWriter(str(tmp_path), tensorboard=False).write(3, {"x": 3.0})
  assert [r["step"] for r in metric_writer.read_jsonl(str(tmp_path / "metrics.jsonl"))] == [3]
