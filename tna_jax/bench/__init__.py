"""Benchmarks that print ratios measured in one run: this library vs a baseline on the same
work, on the same machine, in the same process.

Each figure is a function `figure(quick: bool) -> dict` registered in FIGURES by name as
'module:function'; the dict holds at least `value` (the ratio), `target` (a string such as
'>= 5' or '<= 1.03', or None) and whatever absolute numbers explain it.
"""

FIGURES: dict[str, str] = {
    # name: "tna_jax.bench.<module>:<function>"
    "fed_round_speedup": "tna_jax.bench.fed_round:fed_round_speedup",
    "matching_speedup": "tna_jax.bench.matching_speed:matching_speedup",
    "mask_overhead_ratio": "tna_jax.bench.core_figures:mask_overhead_ratio",
    "lmc_curve_speedup": "tna_jax.bench.core_figures:lmc_curve_speedup",
    "replicas_speedup": "tna_jax.bench.core_figures:replicas_speedup",
    "torch_speed_ratio": "tna_jax.bench.core_figures:torch_speed_ratio",
    "train_efficiency": "tna_jax.bench.efficiency:train_efficiency",
    "peak_fraction": "tna_jax.bench.efficiency:peak_fraction",
}
