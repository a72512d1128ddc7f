"""Local training of every sampled client of a round as ONE compiled program.

Clients hold different amounts of data, but a compiled program over many of them needs
equal shapes. So every client's example indices are padded to the largest client's size,
and every client runs the largest client's number of steps per epoch, the surplus masked
out: a step past a client's own count leaves its state untouched (`lax.cond`, which skips
the work outright where clients run one after another and becomes a select under vmap).
Batches are always full: a client's last batch of an epoch is completed by wrapping around
to the start of that epoch's permutation, so BatchNorm never sees padding and
`train.train_step` serves unchanged.

`map_clients` runs clients side by side (vmap) in groups of `client_batch`, the groups one
after another inside the same program (lax.scan). On a `sharding.make_mesh` mesh each
group's clients are spread over the 'models' axis and each client's batch over 'data';
only the weighted sum of the clients' results leaves the program.
"""

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tna_jax.core import data, execution, sharding, train

PyTree = Any


class ClientData(NamedTuple):
  """Which training examples each client holds, padded to equal length."""

  indices: jax.Array  # int32 [clients, max_size]: indices into the training set, padded with 0
  sizes: jax.Array  # int32 [clients]: how many entries of each row are real

  @property
  def max_size(self) -> int:
    return self.indices.shape[1]


def pack(parts: Sequence[np.ndarray]) -> ClientData:
  """ClientData for a partition (one index array per client)."""
  max_size = max(len(p) for p in parts)
  indices = np.zeros((len(parts), max_size), np.int32)
  for row, part in zip(indices, parts):
    row[:len(part)] = part
  return ClientData(jnp.asarray(indices), jnp.asarray([len(p) for p in parts], jnp.int32))


def num_steps(size, batch_size: int):
  """Steps of one local epoch over `size` examples: ceil(size / batch_size), 0 for none."""
  return -(-size // batch_size)


def epoch_positions(key: jax.Array, size: jax.Array, max_size: int, batch_size: int) -> jax.Array:
  """int32 [num_steps(max_size), batch_size]: positions into a client's index row, per step.

  A random permutation of the client's `size` real positions, cut into batches; the last
  batch wraps around to the permutation's start. Rows past num_steps(size) are never
  trained on. The permutation is drawn exactly as `train.make_epoch_fn` draws its own, so
  a client holding the whole training set sees the same batches as centralized training.
  """
  order_key, _ = jax.random.split(key)
  permutation = jax.random.permutation(order_key, max_size)
  order = permutation[jnp.argsort(permutation >= size, stable=True)]  # real positions first, order kept
  steps = num_steps(max_size, batch_size)
  return order[jnp.arange(steps * batch_size) % jnp.maximum(size, 1)].reshape(steps, batch_size)


def proximal(anchor: PyTree, mu: jax.Array) -> optax.GradientTransformationExtraArgs:
  """FedProx: adds the gradient mu * (params - anchor) of (mu / 2) ||params - anchor||^2.

  Put it FIRST, so momentum, weight decay, the learning rate and the TNA-PFN freeze act on
  gradient and proximal term together, as in the authors' masked step. With mu = 0 it adds
  exactly zero, so FedProx(mu=0) and FedAvg give identical bits.
  """

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    return jax.tree.map(lambda g, p, a: g + mu * (p - a), updates, params, anchor), state

  return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update_fn)


def local_optimizer(tx: optax.GradientTransformationExtraArgs, anchor: PyTree, mu: jax.Array,
                    lr_scale: jax.Array) -> optax.GradientTransformationExtraArgs:
  """A client's optimizer for one round: the proximal term, `tx`, then the round's learning
  rate factor (a scaled zero is still zero, so entries `tx` froze stay frozen)."""
  return optax.chain(proximal(anchor, mu), tx, optax.scale(lr_scale))


def make_local_update(model, tx: optax.GradientTransformationExtraArgs, *, batch_size: int, local_epochs: int,
                      max_size: int, mean, std, mesh: jax.sharding.Mesh | None = None,
                      policy: execution.ExecutionPolicy | None = None) -> Callable:
  """`update(params, batch_stats, mask, hyper, indices, size, key, images, labels)` for ONE client.

  The client starts from the server's params and a fresh optimizer state (as clients of
  the reference implementations do each round) and trains `local_epochs` epochs on the
  `size` real entries of `indices`; epoch e uses `fold_in(key, e)` for its data order and
  holds fixed the entries of `mask`, or of its reverse from epoch hyper.reverse_epoch on
  (FedPNU). `hyper` is an `algorithms.ClientHyper`: it also holds mu (FedProx) and lr_scale
  (the round's learning rate factor). Returns (params, batch_stats, {'loss', 'accuracy'}
  averaged over the steps trained). vmap it over clients. With a `mesh`, every batch is
  split over its 'data' axis.
  `policy` (default `execution.policy(mesh)`) decides the convolution layout: on CPU,
  convolutions inside the loops below are only fast in the canonical one.
  """
  policy = policy or execution.policy(mesh)
  steps_per_epoch = num_steps(max_size, batch_size)
  skipped = {"loss": jnp.zeros((), jnp.float32), "accuracy": jnp.zeros((), jnp.float32)}

  def update(params, batch_stats, mask, hyper, indices, size, key, images, labels):
    client_tx = local_optimizer(tx, params, hyper.mu, hyper.lr_scale)
    state = train.TrainState(params=params, batch_stats=batch_stats, opt_state=client_tx.init(params), fixed=mask)
    train_step = policy.convolutions(
        lambda state, images, labels: train.train_step(model, client_tx, state, images, labels))
    steps = num_steps(size, batch_size)

    def epoch(state, e):
      state = state.replace(fixed=jax.tree.map(lambda m: m != (e >= hyper.reverse_epoch), mask))
      positions = epoch_positions(jax.random.fold_in(key, e), size, max_size, batch_size)

      def step(state, xs):
        batch, s = xs

        def train_batch(state):
          examples = indices[batch]
          batch_images, batch_labels = sharding.constrain((images[examples], labels[examples]), mesh, sharding.DATA)
          return train_step(state, data.normalize(batch_images, mean, std), batch_labels)

        return jax.lax.cond(s < steps, train_batch, lambda state: (state, skipped), state)

      state, metrics = jax.lax.scan(step, state, (positions, jnp.arange(steps_per_epoch)))
      return state, jax.tree.map(jnp.sum, metrics)

    state, metrics = jax.lax.scan(epoch, state, jnp.arange(local_epochs))
    count = jnp.maximum(steps * local_epochs, 1).astype(jnp.float32)
    return state.params, state.batch_stats, jax.tree.map(lambda m: jnp.sum(m) / count, metrics)

  return update


def map_clients(fn: Callable[[PyTree], tuple[PyTree, PyTree]], per_client: PyTree, weights: jax.Array, *,
                client_batch: int = 0, mesh: jax.sharding.Mesh | None = None) -> tuple[PyTree, PyTree]:
  """Runs `fn(client) -> (result, metrics)` for every client; returns the weighted sum.

  Args:
    fn: one client's work; `result` is what the server aggregates.
    per_client: integer arrays with a leading client axis [m] (ids, sizes); a padding
      client gets zeros, so `fn` must treat size 0 as "no work".
    weights: float [m] aggregation weights.
    client_batch: clients trained side by side (vmapped) at a time; 0 = all m at once,
      1 = one after another inside the program (no vmap, so masked steps cost nothing).
    mesh: a `sharding.make_mesh` mesh; each group of clients is spread over its 'models'
      axis (the group is rounded up to a multiple of that axis with padding clients).

  Returns:
    (sum_i weights[i] * result_i, metrics stacked over the m clients).
  """
  m = weights.shape[0]
  group = client_batch or m
  if mesh is not None:
    group = -(-group // mesh.shape[sharding.MODELS]) * mesh.shape[sharding.MODELS]
  groups = -(-m // group)
  pad = groups * group - m
  per_client, weights = jax.tree.map(
      lambda x: jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)]).reshape((groups, group) + x.shape[1:]),
      (per_client, weights))
  if group == 1:
    run = lambda clients: jax.tree.map(lambda y: y[None], fn(jax.tree.map(lambda x: x[0], clients)))
  else:
    run = jax.vmap(fn, spmd_axis_name=None if mesh is None else sharding.MODELS)

  def body(total, xs):
    clients, w = xs
    result, metrics = run(sharding.constrain(clients, mesh, sharding.MODELS))
    result = sharding.constrain(result, mesh, sharding.MODELS)
    return jax.tree.map(lambda t, r: t + jnp.tensordot(w, r, axes=1), total, result), metrics

  one = jax.tree.map(lambda x: x[0, 0], per_client)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, one)[0])
  total, metrics = jax.lax.scan(body, zeros, (per_client, weights))
  return total, jax.tree.map(lambda x: x.reshape((groups * group,) + x.shape[2:])[:m], metrics)
