"""The installed package carries its configs: a wheel built from the checkout, installed into
a fresh virtualenv, runs a packaged config by name from an empty directory."""

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
# The test environment has this checkout installed in editable mode, whose import hook
# (a meta path finder) would shadow the wheel: it is dropped before tna_jax is imported.
LAUNCH = ("import runpy, sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in str(f)]; "
          "import tna_jax; print('tna_jax from', tna_jax.__file__, flush=True); sys.argv[0] = 'tna_jax.main'; "
          "runpy.run_module('tna_jax.main', run_name='__main__', alter_sys=True)")


def test_a_wheel_runs_a_packaged_config_by_name_from_an_empty_directory(tmp_path):
  wheels, venv, empty = tmp_path / "wheels", tmp_path / "venv", tmp_path / "empty"
  empty.mkdir()
  subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                  str(ROOT)], check=True, capture_output=True)
  # --system-site-packages: the dependencies (jax, flax, ...) come from this environment, offline.
  subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
  python = str(venv / "bin" / "python")
  subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", *map(str, wheels.glob("*.whl"))],
                 check=True, capture_output=True)
  result = subprocess.run([python, "-c", LAUNCH, "--config=fmnist_mlp:quick", "--workdir=run",
                           "--config.num_train=512", "--config.num_test=200", "--config.model.width=32",
                           "--config.variants=vanilla,tna"], cwd=empty, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"tna_jax from {venv}" in result.stdout  # the wheel, not the checkout
  results = json.loads((empty / "run" / "results.json").read_text())
  assert [row["variant"] for row in results["summary"]] == ["vanilla", "tna"] and results["config"]["model"]["width"] == 32
