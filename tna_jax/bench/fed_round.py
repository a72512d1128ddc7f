"""The federated figure: a round as one compiled program vs the per-client loop of simulators."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tna_jax.bench import timing
from tna_jax.core import data, execution, masks, models, optim, train
from tna_jax.federated import algorithms, client, partition

NUM_CLIENTS = 20
SGD = dict(name="sgd", learning_rate=0.05, momentum=0.9, weight_decay=5e-4)


def fed_round_speedup(quick: bool) -> dict:
  """One FedAvg round as existing simulators run it / `algorithms.make_round`, same work.

  20 clients of a Dirichlet(0.5) split of Fashion-MNIST, the paper's CNN, batch 32, one
  local epoch. The baseline trains the clients one after another, each by a Python loop
  over a jitted train step (the way simulators built on a per-client trainer do it), then
  averages on the device; it takes exactly the batches the compiled round takes and must
  end at the same global model. The compiled round runs in the library's default mode for
  the device (all clients vmapped on GPU/TPU, one after another inside the program on CPU);
  the all-vmapped round is timed too.
  """
  num_train, batch, repeats = (1000, 32, 1) if quick else (4000, 32, 3)
  dataset = data.load_dataset("fashion_mnist", num_train=num_train, num_test=1)
  parts = partition.partition(dataset.train_labels, "dirichlet", NUM_CLIENTS, seed=0, alpha=0.5, min_client_size=10)
  clients = client.pack(parts)
  model = models.get_model(ml_collections.ConfigDict(dict(name="cnn")), dataset.num_classes)
  variables = models.init_variables(model, jax.random.key(0), dataset.image_shape)
  tx = optim.make_optimizer(ml_collections.ConfigDict(SGD), client.num_steps(clients.max_size, batch))
  state = algorithms.init(algorithms.parse("fedavg"), variables, masks.MaskSpec(), local_epochs=1)
  images, labels = jnp.asarray(dataset.train_images), jnp.asarray(dataset.train_labels)
  spec = algorithms.RoundSpec(batch_size=batch, local_epochs=1, clients_per_round=NUM_CLIENTS,
                              client_batch=execution.policy().client_batch)
  compiled = algorithms.make_round(model, tx, clients, spec, mean=dataset.mean, std=dataset.std)
  vmapped = algorithms.make_round(model, tx, clients, algorithms.RoundSpec(
      batch_size=batch, local_epochs=1, clients_per_round=NUM_CLIENTS, client_batch=0), mean=dataset.mean,
                                  std=dataset.std)
  loop = per_client_loop(model, tx, clients, batch, dataset)

  seconds = {name: timing.seconds_per_call(fn, repeats=repeats) for name, fn in (
      ("loop", lambda: loop(state, images, labels)), ("compiled", lambda: compiled(state, images, labels)[0].params),
      ("vmapped", lambda: vmapped(state, images, labels)[0].params))}
  difference = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
      jax.tree.leaves(loop(state, images, labels)), jax.tree.leaves(compiled(state, images, labels)[0].params)))
  steps = int(sum(client.num_steps(len(p), batch) for p in parts))
  device = jax.devices()[0]
  return {"value": seconds["loop"] / seconds["compiled"], "target": ">= 1",
          "device": f"{device.platform}: {device.device_kind} ({jax.device_count()} devices)",
          "clients": NUM_CLIENTS, "train_examples": num_train, "batch_size": batch, "client_steps": steps,
          "padded_steps": NUM_CLIENTS * client.num_steps(clients.max_size, batch), "loop_s": seconds["loop"],
          "compiled_s": seconds["compiled"], "compiled_client_batch": spec.client_batch or NUM_CLIENTS,
          "vmapped_s": seconds["vmapped"], "vmapped_speedup": seconds["loop"] / seconds["vmapped"],
          "max_param_difference": difference,
          "summary": f"{NUM_CLIENTS} clients, {steps} steps: loop {seconds['loop']:.2f}s, compiled round "
                     f"{seconds['compiled']:.2f}s, all vmapped {seconds['vmapped']:.2f}s"}


def per_client_loop(model, tx, clients: client.ClientData, batch_size: int, dataset: data.Dataset):
  """`round(state, images, labels) -> params`: clients one by one, a jitted step per batch."""
  mean, std = dataset.mean, dataset.std

  @jax.jit
  def step(state, images, labels, batch):
    return train.train_step(model, tx, state, data.normalize(images[batch], mean, std), labels[batch])[0]

  epoch_positions = jax.jit(client.epoch_positions, static_argnums=(2, 3))
  average = jax.jit(lambda weights, trees: jax.tree.map(lambda *x: jnp.tensordot(weights, jnp.stack(x), axes=1),
                                                        *trees))
  indices, sizes = np.asarray(clients.indices), np.asarray(clients.sizes)

  def run(server: algorithms.ServerState, images, labels):
    params = []
    for c, size in enumerate(sizes):
      state = train.init_train_state(tx, {"params": server.params}, masks.no_mask(server.params))
      key = jax.random.fold_in(algorithms.client_key(0, 0, c), 0)
      positions = np.asarray(epoch_positions(key, size, clients.max_size, batch_size))
      for batch in positions[:client.num_steps(int(size), batch_size)]:
        state = step(state, images, labels, jnp.asarray(indices[c][batch]))
      params.append(state.params)
    return average(jnp.asarray(sizes / sizes.sum(), jnp.float32), params)

  return run
