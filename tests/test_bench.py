"""Smoke tests of the core benchmark figures: each runs in --quick mode and returns a
finite ratio with the absolute numbers behind it (no timing is asserted)."""

import importlib.util
import json
import math
import os
import subprocess
import sys


from tna_jax.bench import FIGURES, core_figures, efficiency

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE_FIGURES = ("mask_overhead_ratio", "lmc_curve_speedup", "replicas_speedup", "torch_speed_ratio")


def test_core_figures_are_registered():
  for name in CORE_FIGURES:
    assert FIGURES[name] == f"tna_jax.bench.core_figures:{name}"


def _check(result, *absolute_keys):
  assert math.isfinite(result["value"]) and result["value"] > 0
  assert result["target"] and result["summary"] and result["device"].startswith("cpu")
  for key in absolute_keys:
    assert math.isfinite(result[key]) and result[key] > 0, key


def test_mask_overhead_ratio_quick():
  result = core_figures.mask_overhead_ratio(quick=True)
  _check(result)
  assert result["value"] == max(m["ratio"] for m in result["models"].values())
  for m in result["models"].values():
    assert m["tna_step_ms"] > 0 and m["vanilla_images_per_s"] > 0


def test_lmc_curve_speedup_quick():
  _check(core_figures.lmc_curve_speedup(quick=True), "loop_s", "one_call_s", "one_call_vmapped_s")


def test_replicas_speedup_quick():
  result = core_figures.replicas_speedup(quick=True)
  _check(result)
  assert set(result["models"]) == {"mlp", "cnn"}
  assert result["value"] == min(m["speedup"] for m in result["models"].values())
  assert result["sequential_default"]  # CPU: the models run one after another inside the call
  for m in result["models"].values():
    assert m["vmapped_speedup"] > 0 and m["mapped_speedup"] > 0 and m["together_images_per_s"] > 0


def test_torch_speed_ratio_quick():
  result = core_figures.torch_speed_ratio(quick=True)
  if importlib.util.find_spec("torch") is None:  # an optional extra: the figure says so
    assert result["value"] is None and "not installed" in result["summary"]
  else:
    _check(result, "jax_images_per_s", "torch_images_per_s")


def test_efficiency_figures_quick():
  # Both share one measurement (efficiency.measure is cached per mode).
  for name in ("train_efficiency", "peak_fraction"):
    assert FIGURES[name] == f"tna_jax.bench.efficiency:{name}"
  train = efficiency.train_efficiency(quick=True)
  _check(train, "library_model_epoch_s", "baseline_model_epoch_s", "library_evaluate_call_s", "training_only_ratio")
  peak = efficiency.peak_fraction(quick=True)
  _check(peak, "train_flops", "achieved_flops_per_s", "peak_flops_per_s")
  assert peak["value"] < 2  # a fraction of the machine's matmul peak, give or take timing noise


def test_alternate_times_every_function_in_turns():
  calls = []
  seconds = core_figures.alternate({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3)
  assert calls == ["a", "b"] * 4  # one warm-up each, then A B A B A B
  assert set(seconds) == {"a", "b"} and all(s >= 0 for s in seconds.values())


def test_cli_writes_json_and_prints_the_table(tmp_path):
  out = tmp_path / "bench.json"
  result = subprocess.run([sys.executable, "-m", "tna_jax.bench", "--quick", "--only", "lmc_curve_speedup",
                           "--json", str(out)], capture_output=True, text=True, cwd=REPO, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "lmc_curve_speedup" in result.stdout and ">= 5" in result.stdout
  written = json.loads(out.read_text())
  assert written["quick"] and written["machine"]["platform"] == "cpu"
  assert math.isfinite(written["figures"]["lmc_curve_speedup"]["value"])
