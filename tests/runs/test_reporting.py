"""Figures for a paper: readable legends with the ratio, the barrier marked, PNG and PDF."""

import ml_collections
import numpy as np
from PIL import Image

from tna_jax.alignment import interpolation
from tna_jax.experiments import lmc as lmc_experiment
from tna_jax.runs import reporting


def test_curve_labels_spell_out_the_variants_with_their_ratios():
  config = ml_collections.ConfigDict({"mask": {"fixed_fraction": 0.4}, "pruning_fraction": 0.25})
  labels = lmc_experiment.curve_labels(config, ["vanilla", "tna", "pruning (reset BN) +REPAIR"])
  assert labels == {"vanilla": "vanilla", "tna": "TNA-PFN (40 % fixed)",
                    "pruning (reset BN) +REPAIR": "pruning at init (25 %) (reset BN) +REPAIR"}


def test_plot_marks_each_barrier_and_writes_png_at_200_dpi_and_pdf(tmp_path, monkeypatch):
  alphas = np.linspace(0, 1, 5)
  curves = {"tna": {"loss": np.array([1.0, 1.5, 2.0, 1.4, 1.0]), "accuracy": np.array([0.9, 0.8, 0.6, 0.8, 0.9])}}
  drawn = {}

  def keep_axes(fig, axes, path, title):
    drawn["legends"] = [ax.get_legend_handles_labels()[1] for ax in axes]
    drawn["marks"] = [[tuple(seg[:, 1]) for c in ax.collections for seg in c.get_segments()] for ax in axes]
    save_figure(fig, axes, path, title)

  save_figure = reporting.save_figure
  monkeypatch.setattr(reporting, "save_figure", keep_axes)
  reporting.plot_curves(tmp_path / "curves.png", alphas, curves, "t", {"tna": "TNA-PFN (40 % fixed)"})
  found = interpolation.barriers(alphas, curves["tna"]["loss"], curves["tna"]["accuracy"])
  assert drawn["legends"] == [[f"TNA-PFN (40 % fixed) (barrier {found['loss_barrier']:.3g})"],
                              [f"TNA-PFN (40 % fixed) (barrier {found['accuracy_barrier_pp']:.3g} pp)"]]
  # The marks run from the endpoints' line to the curve at the barrier's alpha (0.5 here).
  assert drawn["marks"] == [[(1.0, 2.0)], [(60.0, 90.0)]]
  with Image.open(tmp_path / "curves.png") as png:
    assert round(png.info["dpi"][0]) == reporting.DPI
  assert (tmp_path / "curves.pdf").read_bytes()[:5] == b"%PDF-"


def test_a_sweep_figure_draws_the_same_models_once_named_without_the_settings_they_ignore(tmp_path, monkeypatch):
  # vanilla trains once for every TNA-PFN setting of the grid: one line, not one per setting.
  def row(schedule, ratio, variant, barrier):
    return {"mask.schedule": schedule, "mask.fixed_fraction": ratio, "variant": variant, "curve": "raw",
            "label": "vanilla" if variant == "vanilla" else f"TNA-PFN ({100 * ratio:.0f} % fixed)",
            **{m: barrier for m, _ in reporting.SWEEP_PANELS}, **{f"{m}_std": 0.0 for m, _ in reporting.SWEEP_PANELS}}

  summary = [row(s, r, "vanilla", 0.1) for s in ("constant", "linear") for r in (0.6, 0.9)]
  summary += [row("constant", 0.6, "tna", 0.01), row("linear", 0.6, "tna", 0.02),
              row("constant", 0.9, "tna", 0.0), row("linear", 0.9, "tna", 0.02)]
  legends = []
  monkeypatch.setattr(reporting, "save_figure",
                      lambda fig, axes, path, title: legends.append(axes[0].get_legend_handles_labels()[1]))
  reporting.plot_sweep(tmp_path / "sweep.png", summary, ["mask.schedule"], ["mask.fixed_fraction"], "t")
  assert legends == [["vanilla", "TNA-PFN, fixed_fraction 0.6", "TNA-PFN, fixed_fraction 0.9"]]
