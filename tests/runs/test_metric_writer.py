"""Metrics reach both the JSON lines file and TensorBoard event files, once per (phase, step)."""

import os

import numpy as np
import pytest
from tensorboardX.event_file_writer import event_pb2  # the event protobuf, bundled with tensorboardX

from tna_jax.runs import metric_writer


def _events(workdir, phase):
  """{tag: [(step, value)]} and the purge steps (SessionLog START) over a phase's event files."""
  directory = os.path.join(workdir, "tensorboard", phase)
  values, purges = {}, []
  for name in sorted(os.listdir(directory)):
    with open(os.path.join(directory, name), "rb") as f:
      raw = f.read()
    pos = 0
    while pos < len(raw):  # TFRecord framing: length (8), crc (4), payload, crc (4)
      length = int.from_bytes(raw[pos:pos + 8], "little")
      event = event_pb2.Event.FromString(raw[pos + 12:pos + 12 + length])
      pos += 16 + length
      if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
        purges.append(event.step)
      for value in event.summary.value:
        values.setdefault(value.tag, []).append((event.step, value.simple_value))
  return values, purges


def test_writer_records_scalars_and_per_model_vectors_per_phase(tmp_path):
  writer = metric_writer.MetricWriter(str(tmp_path))
  writer.write("train", 1, {"loss": 0.5, "test_accuracy": np.array([0.8, 0.9])}, names=["a", "b"])
  writer.write("train", 2, {"loss": 0.25, "test_accuracy": np.array([0.85, 0.95])}, names=["a", "b"])
  writer.write("other", 1, {"test_accuracy": [0.7, 0.6, 0.5]}, names=["c", "d", "e"])  # another group of models
  writer.close()
  records = metric_writer.read_jsonl(writer.path)
  assert [(r["phase"], r["step"]) for r in records] == [("train", 1), ("train", 2), ("other", 1)]
  assert records[1]["test_accuracy"] == [0.85, 0.95]
  assert records[1]["models"] == ["a", "b"] and records[2]["models"] == ["c", "d", "e"]
  events, _ = _events(str(tmp_path), "train")
  assert events["loss"] == [(1, 0.5), (2, 0.25)]
  assert np.allclose([v for _, v in events["test_accuracy/b"]], [0.9, 0.95])
  other, _ = _events(str(tmp_path), "other")
  assert np.allclose([v for _, v in other["test_accuracy/e"]], [0.5])


def test_a_step_is_written_once_and_rewind_drops_what_a_resumed_phase_redoes(tmp_path):
  writer = metric_writer.MetricWriter(str(tmp_path))
  for step in (1, 2, 3):
    writer.write("fedavg", step, {"x": float(step)})
  writer.write("fedprox", 1, {"x": 10.0})
  with pytest.raises(ValueError, match="already written"):
    writer.write("fedavg", 2, {"x": 2.0})
  writer.close()

  resumed = metric_writer.MetricWriter(str(tmp_path))  # a new process: the file is kept
  resumed.rewind("fedavg", 1)  # its checkpoint is at step 1: steps 2 and 3 are redone
  kept = metric_writer.read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert [(r["phase"], r["step"]) for r in kept] == [("fedavg", 1), ("fedprox", 1)]
  resumed.write("fedavg", 2, {"x": 2.0})
  resumed.close()
  steps = [(r["phase"], r["step"]) for r in metric_writer.read_jsonl(str(tmp_path / "metrics.jsonl"))]
  assert len(steps) == len(set(steps)) == 3
  # TensorBoard is told to purge the redone steps from the earlier event file.
  events, purges = _events(str(tmp_path), "fedavg")
  assert purges == [2] and events["x"][-1] == (2, 2.0)


def test_non_finite_values_are_written_as_null(tmp_path):
  writer = metric_writer.MetricWriter(str(tmp_path), tensorboard=False)
  writer.write("train", 1, {"loss": float("nan"), "acc": [1.0, float("inf")]})
  text = (tmp_path / "metrics.jsonl").read_text()
  assert "NaN" not in text and "Infinity" not in text
  assert metric_writer.read_jsonl(str(tmp_path / "metrics.jsonl"))[0]["acc"] == [1.0, None]


def test_lmc_curves_table_and_hparams_reach_tensorboard(tmp_path):
  writer = metric_writer.MetricWriter(str(tmp_path))
  curves = {"vanilla": {"loss": [0.5, 0.9, 0.6], "accuracy": [0.9, 0.7, 0.88]}}
  writer.write_curves("lmc", [0.0, 0.5, 1.0], curves, table="    a table",
                      hparams={"mask": {"fixed_fraction": 0.4, "include": ""}, "variants": "vanilla,tna", "x": [1]},
                      results={"loss_barrier/vanilla/raw": 0.35})
  writer.close()
  events, _ = _events(str(tmp_path), "lmc")
  assert events["lmc_loss/vanilla"] == [(0, 0.5), (50, np.float32(0.9)), (100, np.float32(0.6))]
  assert [step for step, _ in events["lmc_accuracy/vanilla"]] == [0, 50, 100]
  assert events["loss_barrier/vanilla/raw"] == [(0, np.float32(0.35))] and "summary/text_summary" in events
  assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(events)
  assert not (tmp_path / "metrics.jsonl").exists()  # TensorBoard only: results.json holds the curves
