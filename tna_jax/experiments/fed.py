"""The `fed` experiment: FedAvg, FedProx, FedPFN, FedPNU, FedAdam (and variants) under non-IID splits.

Every algorithm starts from the same initialization and trains on the same partition, the
same sampled clients and the same client data orders, one compiled program per round
(`federated.algorithms.make_round`, shared by all algorithms with the same server optimizer). The global model is tested
after every `eval_every` rounds: on the test set, and on the test set reweighted to each
client's label mix (its local accuracy).

Writes to the workdir: config.json, label_distribution.png, metrics.jsonl and tensorboard/
(per round, one TensorBoard run per algorithm), checkpoints/<algorithm>/<round> (orbax,
every `checkpoint.every` rounds, with the history so far), and at the end results.json and
accuracy.png. Each algorithm is a resumable phase of the run (`tna_jax.runs.runtime`): an
interrupted run started again with the same command resumes each algorithm from its last
checkpoint and ends with the same parameters and results as an uninterrupted run.
"""

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from tna_jax.config import schema
from tna_jax.core import data, evaluate, execution, mask_schedule, masks, models, optim, sharding, train
from tna_jax.errors import DivergedError
from tna_jax.federated import algorithms, client, partition
from tna_jax.runs import reporting, runtime

# Keys that may change between a run and its resumption: they change no round of any algorithm.
RESUMABLE_CHANGES = ("algorithms", "final_rounds", "eval_batch_size")

TABLE_COLUMNS = (
    ("algorithm", "label", "s"),
    ("final acc %", "final_accuracy", ".2f"),
    ("best acc %", "best_accuracy", ".2f"),
    ("last round %", "last_accuracy", ".2f"),
    ("local acc %", "local_accuracy", ".2f"),
    ("worst client %", "worst_client_accuracy", ".2f"),
    ("rounds", "rounds", "d"),
    ("s/round", "seconds_per_round", ".2f"),
)


def validate(config) -> None:
  """Checks every value the run depends on before any data is read or file written."""
  schema.validate(config)


def run(config, workdir: str) -> dict[str, Any]:
  """Runs every algorithm of `config.algorithms` and writes the comparison to `workdir`."""
  validate(config)
  with runtime.Run(config, workdir, resumable=RESUMABLE_CHANGES) as run:
    dataset = data.load_dataset(config.dataset, config.data_dir, config.num_train or None, config.num_test or None)
    parts = partition.partition(dataset.train_labels, config.partition.kind, config.partition.num_clients,
                                seed=config.partition.seed, alpha=config.partition.alpha,
                                classes_per_client=config.partition.classes_per_client,
                                min_client_size=config.partition.min_client_size)
    train.check_batch_size(config.batch_size, max(len(p) for p in parts), "examples of the largest client")
    counts = partition.label_counts(dataset.train_labels, parts, dataset.num_classes)
    split = partition.summary(counts)
    model = models.get_model(config.model, dataset.num_classes)
    variables = models.init_variables(model, jax.random.key(config.init_seed), dataset.image_shape, config.model.init)
    clients = client.pack(parts)
    spec = round_spec(config, len(parts), execution.policy())
    mesh = sharding.make_mesh(spec.client_batch or spec.clients_per_round, config.batch_size)
    tx = optim.make_optimizer(config.optimizer, config.local_epochs * client.num_steps(clients.max_size,
                                                                                        config.batch_size))
    compared = [algorithms.parse(name) for name in schema.values(config, "algorithms")]
    round_fns = {algorithm_spec: algorithms.make_round(model, tx, clients, algorithm_spec, mean=dataset.mean,
                                                       std=dataset.std, mesh=mesh)
                 for algorithm_spec in {spec.for_algorithm(algorithm) for algorithm in compared}}
    train_set = tuple(sharding.shard_rows(a, mesh) for a in (dataset.train_images, dataset.train_labels))
    evaluate_fn = make_evaluate(model, dataset, counts, config)
    schedule = mask_schedule.Schedule.from_config(config.mask)

    run.start()
    partition.plot_label_distribution(run.path("label_distribution.png"), counts,
                                      f"{config.partition.kind} split of {config.dataset} over {len(parts)} clients")
    print(f"Partition {config.partition.kind}: {len(parts)} clients, sizes {split['size_min']}..{split['size_max']} "
          f"(mean {split['size_mean']:.0f}), {split['classes_per_client_mean']:.1f} classes per client on average.")
    summaries, histories = [], {}
    for algorithm in compared:
      state = algorithms.init(algorithm, variables, spec.mask, local_epochs=config.local_epochs,
                              prox_mu=config.prox_mu, server=algorithms.ServerHyper(**config.server),
                              schedule=schedule, num_rounds=config.num_rounds)
      phase = run.phase(algorithm.name, total=config.num_rounds, unit="round")
      try:
        with run.timed(algorithm.name):
          histories[algorithm.name] = train_algorithm(phase, state, round_fns[spec.for_algorithm(algorithm)],
                                                      train_set, evaluate_fn, config)
      except DivergedError as e:  # one algorithm's divergence need not cost the others' rounds
        others = [a.name for a in compared if a is not algorithm]
        raise DivergedError(f"{e} The algorithms before it are checkpointed: to compare the others without it, run "
                            f"the same command with --config.algorithms={','.join(others)}") from None
      summaries.append(summarize(algorithm, spec.mask, histories[algorithm.name], config.final_rounds, schedule))

    results = {"config": config.to_dict(), "partition": split, "summary": summaries, "history": histories}
    title = f"{config.model.name} on {config.dataset}, {config.partition.kind} split, {len(parts)} clients"
    reporting.plot_rounds(run.path("accuracy.png"),
                          {row["label"]: round_curves(histories[row["algorithm"]]) for row in summaries}, title)
    run.finish(results, f"\nGlobal test accuracy ({config.num_rounds} rounds; final = mean of the last "
               f"{config.final_rounds} evaluations; local = test set reweighted to each client's labels, mean and "
               "worst client):\n" + reporting.format_table(summaries, TABLE_COLUMNS))
  return results


def planned_models(config) -> int:
  """Clients trained side by side in a round, for `main --dry_run`."""
  spec = round_spec(config, config.partition.num_clients, execution.policy())
  return spec.client_batch or spec.clients_per_round


def round_spec(config, num_clients: int, policy: execution.ExecutionPolicy) -> algorithms.RoundSpec:
  """The RoundSpec of a config; client_batch 0 means the policy's choice: all clients at once
  on GPU/TPU, one at a time on CPU (XLA:CPU runs vmapped convolutions as slow grouped ones).
  The policy is the default backend's, not a mesh's: the mesh is sized from this spec."""
  return algorithms.RoundSpec(
      batch_size=config.batch_size, local_epochs=config.local_epochs,
      clients_per_round=max(1, round(config.client_fraction * num_clients)), data_seed=config.data_seed,
      sample_seed=config.sample_seed, lr_decay=config.lr_decay_per_round,
      client_batch=config.client_batch or policy.client_batch, mask=masks.MaskSpec.from_config(config.mask))


def make_evaluate(model, dataset: data.Dataset, counts: np.ndarray, config):
  """`evaluate(params, batch_stats) -> {'loss', 'accuracy'}`, each [1 + clients] when
  config.client_eval (row 0 the plain test set, row 1 + c client c's label mix), else [1].

  One compiled call: the weight rows are vmapped and the forward pass, which does not
  depend on them, runs once.
  """
  batches = evaluate.make_batches(dataset.test_images, dataset.test_labels, config.eval_batch_size)
  rows = [np.ones(len(dataset.test_labels), np.float32)]
  if config.client_eval:
    rows += list(partition.local_test_weights(dataset.test_labels, counts))
  padded = batches.weights.size - len(dataset.test_labels)
  weights = jnp.asarray(np.stack([np.pad(r, (0, padded)) for r in rows]).reshape((len(rows),) + batches.weights.shape))
  apply_fn = evaluate.inference_fn(model)

  @jax.jit
  def evaluate_all(params, batch_stats, batches, weights):
    variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
    return jax.vmap(lambda w: evaluate.evaluate(apply_fn, variables, batches._replace(weights=w), dataset.mean,
                                                dataset.std))(weights)

  return lambda params, batch_stats: evaluate_all(params, batch_stats, batches, weights)


def train_algorithm(phase: runtime.Phase, state: algorithms.ServerState, round_fn, train_set, evaluate_fn,
                    config) -> list[dict]:
  """Runs one algorithm to config.num_rounds as the resumable `phase`; returns its history."""
  state, _ = phase.restore(state)
  state = jax.tree.map(jnp.asarray, state)
  bar = tqdm(range(phase.done, config.num_rounds), desc=phase.name, unit="round", initial=phase.done,
             total=config.num_rounds, dynamic_ncols=True, disable=not sharding.is_writer())
  for r in bar:
    began = time.perf_counter()
    state, client_metrics = round_fn(state, *train_set)
    record = {"round": r + 1, "clients": client_metrics["clients"],
              **{f"train_{k}": float(np.mean(v)) for k, v in sharding.fetch(client_metrics).items() if k != "clients"}}
    if (r + 1) % config.eval_every == 0 or r + 1 == config.num_rounds:
      tested = sharding.fetch(evaluate_fn(state.params, state.batch_stats))
      record.update(test_loss=float(tested["loss"][0]), test_accuracy=float(tested["accuracy"][0]))
      if config.client_eval:
        record["client_accuracy"] = tested["accuracy"][1:].tolist()
      bar.set_postfix(test_acc=f"{record['test_accuracy']:.4f}")
    record["seconds"] = time.perf_counter() - began
    phase.record(record, state)
  return phase.history


def summarize(algorithm: algorithms.Algorithm, mask_spec: masks.MaskSpec, history: list[dict], final_rounds: int,
              schedule: mask_schedule.Schedule = mask_schedule.Schedule()) -> dict[str, Any]:
  """One table row: accuracy over the last `final_rounds` evaluations (the paper's measure),
  and for masked algorithms the mask they ran under (ratio, redraw, schedule)."""
  tested = [h for h in history if "test_accuracy" in h]
  last = tested[-final_rounds:]
  row = {"algorithm": algorithm.name, "label": algorithm.label(mask_spec, schedule), "rounds": history[-1]["round"],
         "final_accuracy": 100 * float(np.mean([h["test_accuracy"] for h in last])),
         "best_accuracy": 100 * max(h["test_accuracy"] for h in tested),
         "last_accuracy": 100 * tested[-1]["test_accuracy"],
         "seconds_per_round": float(np.median([h["seconds"] for h in history]))}
  if "client_accuracy" in last[-1]:
    local = 100 * np.mean([h["client_accuracy"] for h in last], axis=0)
    row.update(local_accuracy=float(local.mean()), worst_client_accuracy=float(local.min()))
  if algorithm.masked:
    row.update(mask_ratio=algorithm.mask_spec(mask_spec).fixed_fraction, mask_redraw=mask_spec.redraw,
               **{f"mask_{key}": value for key, value in schedule.key().items()})
  return row


def round_curves(history: list[dict]) -> dict[str, list[float]]:
  """The evaluated rounds of an algorithm's `history`: round, test accuracy (%) and test loss."""
  tested = [h for h in history if "test_accuracy" in h]
  return {"round": [h["round"] for h in tested], "test_accuracy": [100 * h["test_accuracy"] for h in tested],
          "test_loss": [h["test_loss"] for h in tested]}
