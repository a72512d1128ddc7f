"""A mask ratio that falls during training: fixed entries released in one seeded order.

TNA-PFN holds `mask.fixed_fraction` of the entries at their initial values for the whole
run. A schedule starts there and lowers the fixed fraction to `mask.final_fraction` by
`mask.schedule_end` (a fraction of training): the models start highly aligned and the
anchors are let go as training goes on. Entries are only ever released, never fixed again,
so `final_fraction <= fixed_fraction` (the config refuses the opposite).

Release order. Every leaf gets one random ranking of its entries (of its output units for
`granularity = neuron`), drawn from the mask seed and the leaf's path (`tree_utils.path_key`,
the key of the leaf's mask draw), so every model that shares the mask seed releases the same
entries at the same step, in any process. An entry's place in the ranking is stored as its
`position` (rank + 1/2) / n in (0, 1); the fixed set at fixed fraction f is {position < f},
round(f * n) entries of the leaf (ties rounded down), so the masks over steps are nested.
A scheduled run's initial mask is the top of the ranking at `fixed_fraction` (an exact
fraction per leaf), not the Bernoulli draw of `masks.fixed_mask`; `constant`, the default,
keeps that Bernoulli draw and the code path of a run without a schedule, bit for bit.

Time. `lmc` and `sweep` schedule over optimizer updates (update t of T uses the fraction at
t, so the first uses `fixed_fraction`); `fed` schedules over rounds (round r of R; every
client of a round holds the same mask, FedPNU's first half the mask and its second half its
reverse, as without a schedule). The schedule ends at E = round(schedule_end * T) (at least
1): linear and cosine reach `final_fraction` at t = E; `step` holds `fixed_fraction` for
t < E and `final_fraction` from t = E on.

An entry released at step s trains from its initial value on: `masks.freeze` (last in the
optimizer chain) gave it an update of exactly 0 until then. It also starts with fresh
optimizer state: `freeze` zeroes only the final update, so the momentum of a fixed entry
would keep summing a gradient that never shrinks (the entry does not move), and at release
the entry would jump by lr x g / (1 - momentum) at once; `zero_fixed_state` zeroes every
params-like optimizer state (SGD momentum, Adam moments) of the entries the step's mask holds,
so a released entry's first SGD update is lr x g. (Measured with configs/sweep_schedule_fmnist.py,
3 seeds: +0.3 pp accuracy on average over its 8 schedules against keeping the state, -0.3 to
+1.0 pp per schedule; README, "Mask ratio schedules".) Adam's bias correction counts the run's
steps, not the entry's, so a late-released entry's first Adam steps are larger than a fresh
Adam's; prefer SGD with schedules. Entries that stay fixed move by 0 either way, so constant
models train bit-identically. In `fed`
every client starts each round with a fresh optimizer and the server's state of a fixed entry
stays 0 (its pseudo-gradient is 0), so released entries start fresh there too; FedPNU's
alternation within a round keeps the optimizer state, as without a schedule.

The mask stays an argument of the update: `Release` lives in the train state (the server
state in `fed`) and each step narrows the state's mask by it, inside the compiled scan, so
vanilla, TNA-PFN and scheduled models train in one program (`never_released` gives a model
without a schedule the same structure).
"""

import dataclasses
import math
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import optax

from tna_jax.core import asymmetric, masks, tree_utils
from tna_jax.errors import ConfigError, check_choice

PyTree = Any
SCHEDULES = ("constant", "linear", "cosine", "step")
NEVER = -1.0  # the position of an entry a schedule never releases (it stays as fixed as its mask says)


def fraction_at(schedule: jax.Array, start: jax.Array, final: jax.Array, end: jax.Array, step: jax.Array) -> jax.Array:
  """The fixed fraction at `step` (jittable; `schedule` is an index into SCHEDULES).

  Exactly `start` at step 0 and exactly `final` from step `end` on (linear, cosine, step);
  non-increasing in between, so a mask narrowed by it step after step only loses entries.
  """
  start, final = jnp.float32(start), jnp.float32(final)
  progress = jnp.minimum(step, end).astype(jnp.float32) / jnp.maximum(end, 1).astype(jnp.float32)
  drop = start - final
  fractions = jnp.stack([start, start - drop * progress, start - drop * (1 - jnp.cos(jnp.pi * progress)) / 2, start])
  return jnp.where((schedule > 0) & (step >= end), final, fractions[schedule])


def positions(params: PyTree, spec: masks.MaskSpec) -> PyTree:
  """Each entry's place in the release order, (rank + 1/2) / n in (0, 1), float32 like `params`.

  One random permutation per leaf (per module and output unit for `granularity = neuron`,
  shared by the module's leaves as `masks.fixed_mask` shares its draw), keyed by the mask seed
  and the path; leaves that `spec.include` / `spec.exclude` make ineligible get 1 (never fixed).
  """
  eligible = masks.eligible(params, spec.include, spec.exclude)
  root = jax.random.key(spec.seed)

  def leaf_positions(path: str, leaf: jax.Array, is_eligible: bool) -> jax.Array:
    if not is_eligible:
      return jnp.ones(leaf.shape, jnp.float32)
    if spec.granularity == "neuron" and leaf.ndim >= 1:
      units = leaf.shape[-1]
      rank = jax.random.permutation(tree_utils.path_key(root, path.rsplit("/", 1)[0]), units)
      return jnp.broadcast_to((rank + 0.5).astype(jnp.float32) / units, leaf.shape)
    rank = jax.random.permutation(tree_utils.path_key(root, path), leaf.size).reshape(leaf.shape)
    return (rank + 0.5).astype(jnp.float32) / leaf.size

  return tree_utils.map_with_path_str(leaf_positions, params, eligible)


class Release(flax.struct.PyTreeNode):
  """One model's schedule, as data: which entries leave its mask at which step.

  Every field is an array, so models with different schedules, ratios or none (`never_released`)
  train in one compiled program, stacked on the model axis.
  """

  position: PyTree  # float32 like the params: the entry's place in the release order; NEVER = not released
  schedule: jax.Array  # int32: index into SCHEDULES
  start: jax.Array  # float32: the fixed fraction at step 0
  final: jax.Array  # float32: the fixed fraction from step `end` on
  end: jax.Array  # int32: the step (fed: round) at which the schedule reaches `final`
  step: jax.Array  # int32: steps (fed: rounds) done

  def fraction(self) -> jax.Array:
    """The fixed fraction of the current step."""
    return fraction_at(self.schedule, self.start, self.final, self.end, self.step)

  def narrow(self, fixed: PyTree) -> PyTree:
    """The mask of the current step: `fixed` (the previous step's) less the entries released by now."""
    fraction = self.fraction()
    return jax.tree.map(lambda m, u: m & (u < fraction), fixed, self.position)

  def advance(self) -> "Release":
    """The schedule one step on."""
    return self.replace(step=self.step + 1)


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A config's mask schedule (`mask.schedule`, `mask.final_fraction`, `mask.schedule_end`)."""

  kind: str = "constant"
  final_fraction: float = 0.0
  end: float = 1.0  # fraction of training at which the schedule reaches final_fraction

  def __post_init__(self):
    check_choice("mask.schedule", self.kind, SCHEDULES)
    if not 0.0 <= self.final_fraction < 1.0:
      raise ConfigError(f"mask.final_fraction={self.final_fraction!r} is out of range; allowed: "
                        "0 <= mask.final_fraction < 1.")
    if not 0.0 < self.end <= 1.0:
      raise ConfigError(f"mask.schedule_end={self.end!r} is out of range; allowed: 0 < mask.schedule_end <= 1.")

  @classmethod
  def from_config(cls, mask_config) -> "Schedule":
    """The schedule of a config's `mask` section (a ConfigDict or mapping; absent keys: constant)."""
    return cls(kind=mask_config.get("schedule", "constant"), final_fraction=mask_config.get("final_fraction", 0.0),
               end=mask_config.get("schedule_end", 1.0))

  @property
  def scheduled(self) -> bool:
    return self.kind != "constant"

  def check(self, start: float, whose: str = "") -> None:
    """Raises ConfigError unless the schedule only releases entries from a mask of ratio `start`
    (`whose`: the fed algorithm with its own ratio; '' = mask.fixed_fraction)."""
    if self.scheduled and self.final_fraction > start:
      ratio = f"{whose}'s mask ratio {start:g}" if whose else f"mask.fixed_fraction={start:g}"
      raise ConfigError(f"mask.final_fraction={self.final_fraction:g} is above {ratio}: a mask schedule only "
                        f"releases fixed entries, it never fixes more; use mask.final_fraction <= {start:g}.")

  def end_step(self, total_steps: int) -> int:
    """E = round(end * total_steps), at least 1: where linear and cosine reach the final fraction
    and where `step` drops to it."""
    return max(1, int(math.floor(self.end * total_steps + 0.5)))

  def key(self) -> dict[str, Any]:
    """What decides the schedule's releases ({} for constant): part of a trained model's identity."""
    return {"schedule": self.kind, "final_fraction": self.final_fraction, "schedule_end": self.end} if self.scheduled \
        else {}

  def describe(self) -> str:
    """The schedule in a label's words: ', linear to 0 % by 50 % of training'; '' for constant."""
    if not self.scheduled:
      return ""
    return f", {self.kind} to {100 * self.final_fraction:.0f} % by {100 * self.end:.0f} % of training"

  def start(self, params: PyTree, spec: masks.MaskSpec, total_steps: int) -> tuple[PyTree, Release]:
    """(initial mask, release) of a model masked by `spec` under this schedule over `total_steps`:
    the top `spec.fixed_fraction` of the ranking, released down to `final_fraction`."""
    self.check(spec.fixed_fraction)
    position = positions(params, spec)
    fixed = jax.tree.map(lambda u: u < jnp.float32(spec.fixed_fraction), position)
    release = Release(position=position, schedule=jnp.int32(SCHEDULES.index(self.kind)),
                      start=jnp.float32(spec.fixed_fraction), final=jnp.float32(self.final_fraction),
                      end=jnp.int32(self.end_step(total_steps)), step=jnp.int32(0))
    return fixed, release


def zero_fixed_state(tx: optax.GradientTransformation, opt_state: optax.OptState, fixed: PyTree) -> optax.OptState:
  """`opt_state` with the params-like state (momentum, Adam moments) of every `fixed` entry zeroed,
  so an entry starts with fresh state when the schedule releases it; counts and schedules untouched."""
  return optax.tree_utils.tree_map_params(tx, lambda s, m: jnp.where(m, jnp.zeros_like(s), s), opt_state, fixed,
                                          transform_non_params=lambda x: x)


def never_released(params: PyTree) -> Release:
  """The release of a model without a schedule: no entry ever leaves its mask (same structure
  as a scheduled model's, so both train in one program)."""
  return Release(position=jax.tree.map(lambda p: jnp.full(p.shape, NEVER, jnp.float32), params),
                 schedule=jnp.int32(0), start=jnp.float32(0.0), final=jnp.float32(0.0), end=jnp.int32(1),
                 step=jnp.int32(0))


def training_start(variant: str, variables: dict, spec: masks.MaskSpec, pruning_fraction: float, schedule: Schedule,
                   total_steps: int, wasym: asymmetric.WAsymSpec | None = None) -> tuple[dict, PyTree, Release | None]:
  """`masks.training_start` with the schedule: (variables, fixed mask, release or None).

  Only TNA-PFN follows the schedule (pruning keeps its pruned entries at zero and fixed); a
  constant schedule returns the Bernoulli mask of today's runs and no release.
  """
  variables, fixed = masks.training_start(variant, variables, spec, pruning_fraction, wasym)
  if variant != "tna" or not schedule.scheduled or spec.fixed_fraction == 0.0:
    return variables, fixed, None
  fixed, release = schedule.start(variables["params"], spec, total_steps)
  return variables, fixed, release


def with_releases(starts: Sequence[tuple[dict, PyTree, Release | None]]) -> list[tuple[dict, PyTree, Release | None]]:
  """`starts` ready to train side by side: when one of them has a release, the others get
  `never_released` (one program, one state structure); otherwise unchanged (no release at all,
  the state of a run without a schedule)."""
  if all(release is None for _, _, release in starts):
    return list(starts)
  return [(variables, fixed, never_released(variables["params"]) if release is None else release)
          for variables, fixed, release in starts]
