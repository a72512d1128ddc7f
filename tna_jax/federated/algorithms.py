"""FedAvg, FedProx, FedPFN, FedPNU, FedAvgM, FedAdam and FedYogi as pure (init, round) functions
over a server state.

The clients of these algorithms differ only in data, not in program: the mask they hold
fixed (all False for FedAvg/FedProx), the local epoch from which they use its reverse
(FedPNU) and the proximal weight mu (FedProx), typed in `ClientHyper`. The server treats
minus the weighted mean client update as a gradient (the pseudo-gradient) and steps with
an optax optimizer (Reddi et al. 2021, "Adaptive Federated Optimization"): SGD with
learning rate 1 is FedAvg, SGD with momentum FedAvgM, Adam FedAdam, Yogi FedYogi, one line
each in `SERVER_OPTIMIZERS`. Its hyperparameters are data too (`ServerHyper`), so one
compiled round serves every algorithm of a comparison with the same server optimizer, and
a state restored from a checkpoint carries everything needed to continue it exactly. A
round is a pure function of the state: which clients take part, each client's data order
and a redrawn mask all derive from seeds and `state.round`.

Names: fedavg, fedprox, fedpfn, fedpnu, fedavgm, fedadam, fedyogi, with modifiers '+prox'
(add the proximal term) and '+m' (server momentum, SGD servers only), e.g. 'fedpfn+prox',
'fedpnu+prox+m', 'fedadam+prox'. A masked algorithm may carry its own mask ratio after '@'
('fedpnu@0.3', 'fedpfn+prox@0.7'), so one run compares a ratio series; without it, the
config's mask.fixed_fraction applies.
"""

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from tna_jax.core import execution, mask_schedule, masks
from tna_jax.errors import ConfigError, check_choice
from tna_jax.federated import client

PyTree = Any
BASES = ("fedavg", "fedprox", "fedpfn", "fedpnu", "fedavgm", "fedadam", "fedyogi")
MODIFIERS = ("prox", "m")
PAPER_NAMES = {"fedavg": "FedAvg", "fedprox": "FedProx", "fedpfn": "FedPFN", "fedpnu": "FedPNU", "fedavgm": "FedAvgM",
               "fedadam": "FedAdam", "fedyogi": "FedYogi"}
REDRAW_WORDS = {"never": "never redrawn", "every_round": "redrawn every round"}  # masks.REDRAWS in tables and plots


@dataclasses.dataclass(frozen=True)
class Algorithm:
  """What an algorithm name means: proximal term, mask use, server optimizer and momentum."""

  name: str
  prox: bool = False
  mask: str = "none"  # none | pfn (mask every local epoch) | pnu (mask, then its reverse)
  server_optimizer: str = "sgd"  # a key of SERVER_OPTIMIZERS
  server_momentum: bool = False  # sgd only
  fixed_fraction: float | None = None  # its own mask ratio ('fedpnu@0.3'); None = the config's mask.fixed_fraction

  @property
  def masked(self) -> bool:
    return self.mask != "none"

  @property
  def uses_config_ratio(self) -> bool:
    """Whether its mask is drawn at the config's mask.fixed_fraction (masked, no '@ratio')."""
    return self.masked and self.fixed_fraction is None

  def mask_spec(self, spec: masks.MaskSpec) -> masks.MaskSpec:
    """The run's mask spec at this algorithm's own ratio, where its name gives one."""
    return spec if self.fixed_fraction is None else dataclasses.replace(spec, fixed_fraction=self.fixed_fraction)

  def label(self, spec: masks.MaskSpec, schedule: mask_schedule.Schedule = mask_schedule.Schedule()) -> str:
    """How tables and plots name it, with the mask it ran under: 'FedAvg', 'FedPFN+prox (mask
    ratio 0.4, never redrawn)', 'FedPNU (mask ratio 0.3, redrawn every round)', 'FedPFN (mask
    ratio 0.6, linear to 0 % by 100 % of training, never redrawn)'."""
    base, *modifiers = self.name.partition("@")[0].split("+")
    label = "+".join([PAPER_NAMES[base], *modifiers])
    if not self.masked:
      return label
    return (f"{label} (mask ratio {self.mask_spec(spec).fixed_fraction:g}{schedule.describe()}, "
            f"{REDRAW_WORDS[spec.redraw]})")


def parse(name: str) -> Algorithm:
  """Algorithm for 'base[+modifier...][@ratio]', e.g. 'fedpnu+prox' or 'fedpnu@0.3'; ConfigError for
  anything else."""
  head, at, ratio = name.strip().partition("@")
  base, *modifiers = head.split("+")
  check_choice("algorithm", base, BASES)
  for modifier in modifiers:
    check_choice(f"modifier of algorithm {name!r}", modifier, MODIFIERS)
  if len(set(modifiers)) != len(modifiers):
    raise ConfigError(f"algorithm {name!r} repeats a modifier.")
  server_optimizer = {"fedadam": "adam", "fedyogi": "yogi"}.get(base, "sgd")
  if "m" in modifiers and server_optimizer != "sgd":
    raise ConfigError(f"algorithm {name!r}: the modifier '+m' adds momentum to SGD servers only; {base}'s server "
                      "momentum is server.b1.")
  mask = {"fedpfn": "pfn", "fedpnu": "pnu"}.get(base, "none")
  return Algorithm(name=name.strip(), prox=base == "fedprox" or "prox" in modifiers, mask=mask,
                   server_optimizer=server_optimizer, server_momentum=base == "fedavgm" or "m" in modifiers,
                   fixed_fraction=_ratio(name, ratio, masked=mask != "none") if at else None)


def _ratio(name: str, ratio: str, *, masked: bool) -> float:
  """The mask ratio after '@' in algorithm `name`: a number in (0, 1), for fedpfn and fedpnu only."""
  if not masked:
    raise ConfigError(f"algorithm {name!r}: only fedpfn and fedpnu hold a mask, so only they take a mask ratio "
                      "after '@' (e.g. 'fedpnu@0.3').")
  try:
    value = float(ratio)
  except ValueError:
    value = float("nan")
  if not 0.0 < value < 1.0:
    raise ConfigError(f"algorithm {name!r}: the mask ratio after '@' must be a number with 0 < ratio < 1 "
                      "(e.g. 'fedpnu@0.3').")
  return value


class ClientHyper(flax.struct.PyTreeNode):
  """What the clients of an algorithm do differently, as data (one compiled round serves them all)."""

  mu: jax.Array  # float32: FedProx's proximal weight; 0 = no proximal term
  reverse_epoch: jax.Array  # int32: from this local epoch on, clients hold the mask's reverse (FedPNU)
  masked: jax.Array  # bool: whether a mask redrawn by the round applies
  lr_scale: jax.Array  # float32: the clients' learning-rate factor, lr_decay ** round; set by each round


class ServerHyper(flax.struct.PyTreeNode):
  """The server optimizer's hyperparameters (config.server): floats here, float32 arrays in a
  `ServerState`, so a new value needs no new compilation. Each optimizer reads its own."""

  learning_rate: jax.typing.ArrayLike = 1.0  # sgd (FedAvg: 1, i.e. params = weighted mean of client params)
  momentum: jax.typing.ArrayLike = 0.9  # sgd with server momentum (FedAvgM, '+m'); `init` sets 0 for the others
  adaptive_learning_rate: jax.typing.ArrayLike = 1e-2  # adam, yogi (Reddi et al. tune it in 1e-2..1e-1)
  b1: jax.typing.ArrayLike = 0.9  # adam, yogi: decay of the first moment
  b2: jax.typing.ArrayLike = 0.99  # adam, yogi: decay of the second moment (Reddi et al.: 0.99)
  eps: jax.typing.ArrayLike = 1e-3  # adam, yogi: adaptivity tau added to the root of the second moment


# The server step on the pseudo-gradient, per optimizer. optax's adam and yogi correct the
# moments' bias, which Reddi et al.'s pseudocode does not.
SERVER_OPTIMIZERS: dict[str, Callable[[ServerHyper], optax.GradientTransformation]] = {
    "sgd": lambda h: optax.sgd(h.learning_rate, momentum=h.momentum),  # FedAvg (momentum 0), FedAvgM
    "adam": lambda h: optax.adam(h.adaptive_learning_rate, b1=h.b1, b2=h.b2, eps=h.eps),  # FedAdam
    "yogi": lambda h: optax.yogi(h.adaptive_learning_rate, b1=h.b1, b2=h.b2, eps=h.eps),  # FedYogi
}


class ServerState(flax.struct.PyTreeNode):
  """The global model and everything a round needs to continue the run exactly."""

  params: PyTree
  batch_stats: PyTree  # {} for models without BatchNorm; the clients' sample-weighted mean
  opt_state: optax.OptState  # the server optimizer's state (FedAvgM: its velocity; FedAdam: its moments)
  mask: PyTree  # entries clients hold fixed this round (all False for unmasked algorithms)
  hyper: ClientHyper
  server: ServerHyper
  round: jax.Array  # int32: rounds done
  optimizer: str = flax.struct.field(pytree_node=False, default="sgd")  # a key of SERVER_OPTIMIZERS
  release: mask_schedule.Release | None = None  # a mask schedule over rounds; None: the mask never narrows

  @property
  def server_tx(self) -> optax.GradientTransformation:
    """The server optimizer, built from the state's hyperparameters (traced inside a round)."""
    return SERVER_OPTIMIZERS[self.optimizer](self.server)


def init(algorithm: Algorithm, variables: dict, mask_spec: masks.MaskSpec, *, local_epochs: int, prox_mu: float = 0.01,
         server: ServerHyper = ServerHyper(), schedule: mask_schedule.Schedule = mask_schedule.Schedule(),
         num_rounds: int = 1) -> ServerState:
  """The state before round 1: the shared initialization and the algorithm's settings.

  FedPNU clients switch to the reversed mask after int(local_epochs / 2) epochs; with one
  local epoch that is from the start, as the rule says. The mask is drawn at the algorithm's
  own ratio where its name gives one ('fedpnu@0.3'). prox_mu and server.momentum only
  apply to algorithms that use them: the others get 0, so FedAvg's server is SGD without
  momentum in the same program as FedAvgM's. A mask `schedule` runs over the `num_rounds`
  rounds: a masked algorithm starts from the top of the release order at its ratio
  (`mask_schedule`), and every algorithm's state carries a release, so all share one program.
  """
  params = variables["params"]
  mask = algorithm.mask_spec(mask_spec).draw(params) if algorithm.masked else masks.no_mask(params)
  release = None
  if schedule.scheduled:
    mask, release = (schedule.start(params, algorithm.mask_spec(mask_spec), num_rounds) if algorithm.masked
                     else (mask, mask_schedule.never_released(params)))
  hyper = ClientHyper(mu=jnp.float32(prox_mu if algorithm.prox else 0.0),
                      reverse_epoch=jnp.int32(local_epochs // 2 if algorithm.mask == "pnu" else local_epochs),
                      masked=jnp.bool_(algorithm.masked), lr_scale=jnp.float32(1.0))
  server = jax.tree.map(jnp.float32, server.replace(momentum=server.momentum if algorithm.server_momentum else 0.0))
  return ServerState(params=params, batch_stats=variables.get("batch_stats", {}),
                     opt_state=SERVER_OPTIMIZERS[algorithm.server_optimizer](server).init(params), mask=mask,
                     hyper=hyper, server=server, round=jnp.zeros((), jnp.int32), optimizer=algorithm.server_optimizer,
                     release=release)


@dataclasses.dataclass(frozen=True)
class RoundSpec:
  """What every round of a run shares, whatever the algorithm."""

  batch_size: int
  local_epochs: int
  clients_per_round: int  # sampled uniformly without replacement each round
  data_seed: int = 0  # client c's data order in round r derives from (data_seed, r, c)
  sample_seed: int = 0  # the clients of round r derive from (sample_seed, r)
  lr_decay: float = 1.0  # the clients' learning rate is multiplied by lr_decay ** r in round r
  client_batch: int = 0  # clients vmapped at once (see client.map_clients); 0 = all
  mask: masks.MaskSpec = masks.MaskSpec()

  def for_algorithm(self, algorithm: Algorithm) -> "RoundSpec":
    """The spec of `algorithm`'s rounds: a mask redrawn every round is drawn at the algorithm's
    own ratio. A mask drawn once lives in the state instead, so algorithms that differ only in
    their ratio then keep sharing one spec, and one compiled round."""
    if self.mask.redraw != "every_round":
      return self
    return dataclasses.replace(self, mask=algorithm.mask_spec(self.mask))


def clients_of_round(spec: RoundSpec, num_clients: int, round_index: jax.Array) -> jax.Array:
  """int32 [clients_per_round] sorted ids of the clients of round `round_index` (jittable)."""
  if spec.clients_per_round == num_clients:
    return jnp.arange(num_clients, dtype=jnp.int32)
  key = jax.random.fold_in(jax.random.key(spec.sample_seed), round_index)
  return jnp.sort(jax.random.choice(key, num_clients, (spec.clients_per_round,), replace=False)).astype(jnp.int32)


def client_key(data_seed: int, round_index, client_id) -> jax.Array:
  """The key of one client's local training in one round (epoch e uses fold_in(key, e))."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(data_seed), round_index), client_id)


def server_step(state: ServerState, mean_update: PyTree) -> ServerState:
  """The global model after the state's server optimizer steps on the pseudo-gradient
  -mean_update (mean_update: the weighted mean of client params minus the global params)."""
  pseudo_gradient = jax.tree.map(jnp.negative, mean_update)
  updates, opt_state = state.server_tx.update(pseudo_gradient, state.opt_state, state.params)
  return state.replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state)


def make_round(model, tx: optax.GradientTransformationExtraArgs, clients: client.ClientData, spec: RoundSpec, *,
               mean, std, mesh: jax.sharding.Mesh | None = None,
               policy: execution.ExecutionPolicy | None = None) -> Callable:
  """`round(state, images, labels) -> (state, metrics)`: one compiled federated round.

  The round samples its clients, redraws the mask if the spec says so (masked algorithms
  only), trains every sampled client in one program (client.map_clients), and steps the
  global model with the state's server optimizer on the pseudo-gradient, minus the
  sample-size weighted mean of the client updates (FedAvg: SGD with learning rate 1, i.e.
  params = weighted mean of client params). Frozen entries move by exactly 0 on every
  client, so their pseudo-gradient is exactly 0 too, and so is their server step as long
  as the optimizer's state holds nothing for them (a fixed mask). BatchNorm statistics are
  the weighted mean of the clients'. States of different server optimizers compile
  separately.

  images, labels: the whole uint8 training set and its labels, on the device.
  metrics: per sampled client ('clients' ids, 'loss', 'accuracy' of local training).
  policy: the clients' convolution layout (default `execution.policy(mesh)`).
  """
  if spec.clients_per_round > clients.sizes.shape[0]:
    raise ConfigError(f"{spec.clients_per_round} clients per round but only {clients.sizes.shape[0]} clients.")
  local_update = client.make_local_update(model, tx, batch_size=spec.batch_size, local_epochs=spec.local_epochs,
                                          max_size=clients.max_size, mean=mean, std=std, mesh=mesh, policy=policy)

  @jax.jit
  def round_fn(state: ServerState, clients: client.ClientData, images: jax.Array, labels: jax.Array):
    ids = clients_of_round(spec, clients.sizes.shape[0], state.round)
    mask = state.mask
    if spec.mask.redraw == "every_round":
      seed = jax.random.bits(jax.random.fold_in(jax.random.key(spec.mask.seed), state.round), (), jnp.uint32)
      mask = jax.tree.map(lambda m: m & state.hyper.masked, spec.mask.draw(state.params, seed))
    release = state.release
    if release is not None:  # the schedule narrows last round's mask to this round's
      mask, release = release.narrow(mask), release.advance()
    hyper = state.hyper.replace(lr_scale=jnp.float32(spec.lr_decay) ** state.round)
    sizes = clients.sizes[ids]

    def train_client(one):
      client_id, size = one
      params, batch_stats, metrics = local_update(
          state.params, state.batch_stats, mask, hyper, clients.indices[client_id], size,
          client_key(spec.data_seed, state.round, client_id), images, labels)
      return (jax.tree.map(jnp.subtract, params, state.params), batch_stats), metrics

    weights = sizes.astype(jnp.float32) / jnp.sum(sizes)
    (mean_update, batch_stats), metrics = client.map_clients(train_client, (ids, sizes), weights,
                                                             client_batch=spec.client_batch, mesh=mesh)
    state = server_step(state, mean_update).replace(batch_stats=batch_stats, mask=mask, hyper=hyper,
                                                    round=state.round + 1, release=release)
    return state, {"clients": ids, **metrics}

  return lambda state, images, labels: round_fn(state, clients, images, labels)
