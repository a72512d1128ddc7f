"""python -m tna_jax.bench [--only a,b] [--quick] [--json OUT.json]

Runs the registered figures, prints a table of ratios and targets, writes them as JSON.
"""

import importlib
import platform

from absl import app, flags
import jax

from tna_jax.bench import FIGURES
from tna_jax.runs import reporting

_ONLY = flags.DEFINE_list("only", [], f"Figures to run (default all): {', '.join(FIGURES)}.")
_QUICK = flags.DEFINE_bool("quick", False, "Smaller work per figure (smoke test); ratios are less reliable.")
_JSON = flags.DEFINE_string("json", None, "Write the figures to this JSON file.")


def machine() -> dict:
  """Where the figures were measured."""
  device = jax.devices()[0]
  return {"platform": device.platform, "device": device.device_kind, "num_devices": jax.device_count(),
          "cpu": platform.processor() or platform.machine(), "jax": jax.__version__}


def main(argv) -> None:
  del argv
  unknown = [n for n in _ONLY.value if n not in FIGURES]
  if unknown:
    raise app.UsageError(f"unknown figure(s) {unknown}; allowed: {', '.join(FIGURES)}")
  results = {}
  for name in _ONLY.value or FIGURES:
    module, function = FIGURES[name].split(":")
    print(f"running {name} ...", flush=True)
    results[name] = getattr(importlib.import_module(module), function)(_QUICK.value)
  rows = [{"figure": n, "value": r["value"], "target": r.get("target") or "-",
           "notes": r.get("summary", "")} for n, r in results.items()]
  print(reporting.format_table(rows, (("figure", "figure", "s"), ("ratio", "value", ".2f"),
                                      ("target", "target", "s"), ("measured", "notes", "s"))))
  if _JSON.value:
    reporting.write_json(_JSON.value, {"machine": machine(), "quick": _QUICK.value, "figures": results})


if __name__ == "__main__":
  app.run(main)
