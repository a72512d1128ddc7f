"""FedAvg, FedProx, FedPFN and FedPNU as pure (init, round) functions over a server state.

The four algorithms differ only in data, not in program: the mask clients hold fixed (all
False for FedAvg/FedProx), the local epoch from which clients use its reverse (FedPNU),
the proximal weight mu (FedProx) and the server's momentum (FedAvgM). All of it lives in
`ServerState`, so one compiled round serves every algorithm of a comparison, and a state
restored from a checkpoint carries everything needed to continue it exactly. A round is a
pure function of the state: which clients take part, each client's data order and a
redrawn mask all derive from seeds and `state.round`.

Names: fedavg, fedprox, fedpfn, fedpnu, fedavgm, with modifiers '+prox' (add the proximal
term) and '+m' (server momentum), e.g. 'fedpfn+prox', 'fedpnu+prox+m'.
"""

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from tna_jax import execution, masks
from tna_jax.errors import ConfigError, check_choice
from tna_jax.federated import client

PyTree = Any
BASES = ("fedavg", "fedprox", "fedpfn", "fedpnu", "fedavgm")
MODIFIERS = ("prox", "m")


@dataclasses.dataclass(frozen=True)
class Algorithm:
  """What an algorithm name means: proximal term, mask use, server momentum."""

  name: str
  prox: bool = False
  mask: str = "none"  # none | pfn (mask every local epoch) | pnu (mask, then its reverse)
  server_momentum: bool = False

  @property
  def masked(self) -> bool:
    return self.mask != "none"


def parse(name: str) -> Algorithm:
  """Algorithm for 'base[+modifier...]', e.g. 'fedpnu+prox'; ConfigError for anything else."""
  base, *modifiers = name.strip().split("+")
  check_choice("algorithm", base, BASES)
  for modifier in modifiers:
    check_choice(f"modifier of algorithm {name!r}", modifier, MODIFIERS)
  if len(set(modifiers)) != len(modifiers):
    raise ConfigError(f"algorithm {name!r} repeats a modifier.")
  return Algorithm(name=name.strip(), prox=base == "fedprox" or "prox" in modifiers,
                   mask={"fedpfn": "pfn", "fedpnu": "pnu"}.get(base, "none"),
                   server_momentum=base == "fedavgm" or "m" in modifiers)


class ServerState(flax.struct.PyTreeNode):
  """The global model and everything a round needs to continue the run exactly."""

  params: PyTree
  batch_stats: PyTree  # {} for models without BatchNorm; the clients' sample-weighted mean
  momentum: PyTree  # FedAvgM's server velocity (stays 0 without server momentum)
  mask: PyTree  # entries clients hold fixed this round (all False for unmasked algorithms)
  hyper: dict  # per-algorithm scalars: mu, reverse_epoch, masked, server_learning_rate, server_momentum
  round: jax.Array  # int32: rounds done


def init(algorithm: Algorithm, variables: dict, mask_spec: masks.MaskSpec, *, local_epochs: int, prox_mu: float = 0.01,
         server_learning_rate: float = 1.0, server_momentum: float = 0.9) -> ServerState:
  """The state before round 1: the shared initialization and the algorithm's settings.

  FedPNU clients switch to the reversed mask after int(local_epochs / 2) epochs; with one
  local epoch that is from the start, as the rule says. prox_mu and server_momentum only
  apply to algorithms that use them.
  """
  params = variables["params"]
  mask = mask_spec.draw(params, mask_spec.seed) if algorithm.masked else masks.no_mask(params)
  hyper = {
      "mu": jnp.float32(prox_mu if algorithm.prox else 0.0),
      "reverse_epoch": jnp.int32(local_epochs // 2 if algorithm.mask == "pnu" else local_epochs),
      "masked": jnp.bool_(algorithm.masked),
      "server_learning_rate": jnp.float32(server_learning_rate),
      "server_momentum": jnp.float32(server_momentum if algorithm.server_momentum else 0.0),
  }
  return ServerState(params=params, batch_stats=variables.get("batch_stats", {}),
                     momentum=jax.tree.map(jnp.zeros_like, params), mask=mask, hyper=hyper,
                     round=jnp.zeros((), jnp.int32))


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


def clients_of_round(spec: RoundSpec, num_clients: int, round_index: jax.Array) -> jax.Array:
  """int32 [clients_per_round] sorted ids of the clients of round `round_index` (jittable)."""
  if spec.clients_per_round == num_clients:
    return jnp.arange(num_clients, dtype=jnp.int32)
  key = jax.random.fold_in(jax.random.key(spec.sample_seed), round_index)
  return jnp.sort(jax.random.choice(key, num_clients, (spec.clients_per_round,), replace=False)).astype(jnp.int32)


def client_key(data_seed: int, round_index, client_id) -> jax.Array:
  """The key of one client's local training in one round (epoch e uses fold_in(key, e))."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(data_seed), round_index), client_id)


def make_round(model, tx: optax.GradientTransformationExtraArgs, clients: client.ClientData, spec: RoundSpec, *,
               mean, std, mesh: jax.sharding.Mesh | None = None,
               policy: execution.ExecutionPolicy | None = None) -> Callable:
  """`round(state, images, labels) -> (state, metrics)`: one compiled federated round.

  The round samples its clients, redraws the mask if the spec says so (masked algorithms
  only), trains every sampled client in one program (client.map_clients), and moves the
  global model by the sample-size weighted mean of the client updates: params +=
  server_learning_rate * v with v = server_momentum * v + mean update (FedAvg: lr 1, no
  momentum, i.e. params = weighted mean of client params). Frozen entries move by exactly
  0 on every client, so their mean update is exactly 0 too. BatchNorm statistics are
  the weighted mean of the clients'.

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
    if spec.mask.redraw == "per_round":
      seed = jax.random.bits(jax.random.fold_in(jax.random.key(spec.mask.seed), state.round), (), jnp.uint32)
      mask = jax.tree.map(lambda m: m & state.hyper["masked"], spec.mask.draw(state.params, seed))
    hyper = {**state.hyper, "lr_scale": jnp.float32(spec.lr_decay) ** state.round}
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
    momentum = jax.tree.map(lambda v, u: state.hyper["server_momentum"] * v + u, state.momentum, mean_update)
    params = jax.tree.map(lambda p, v: p + state.hyper["server_learning_rate"] * v, state.params, momentum)
    state = state.replace(params=params, batch_stats=batch_stats, momentum=momentum, mask=mask,
                          round=state.round + 1)
    return state, {"clients": ids, **metrics}

  return lambda state, images, labels: round_fn(state, clients, images, labels)
