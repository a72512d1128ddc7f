"""The config-key reference, generated from the configs themselves.

`python -m tna_jax.config_docs` writes docs/config_keys.md: for every experiment, each key's
meaning and allowed values (from the registries, so they cannot drift) and its default in
every config file of that experiment. A test checks that every key of every config is
documented here, that nothing documented is stale and that the file is current.
"""

import collections
import importlib.util
import pathlib
import sys

from tna_jax import data, experiments, lmc, masks, models, optim, transformers

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIG_DIR = ROOT / "configs"
DOCS_PATH = ROOT / "docs" / "config_keys.md"


def _one_of(names) -> str:
  return " \\| ".join(names)


KEYS: dict[str, tuple[str, str]] = {
    # key: (meaning, allowed values)
    "experiment": ("which experiment runs this config", ", ".join(experiments.EXPERIMENTS)),
    "dataset": ("dataset name ('glue' for cold with a text model)", _one_of(data.DATASET_NAMES + ("glue",))),
    "data_dir": ("directory of the IDX files (fashion_mnist) or the prepared TFDS data_dir; '' = default", "path"),
    "num_train": ("use only the first n training examples; 0 = all", "int >= 0"),
    "num_test": ("use only the first n test examples; 0 = all", "int >= 0"),
    "model.name": ("architecture", _one_of(models.MODEL_NAMES + transformers.MODEL_NAMES)),
    "model.depth": ("hidden layers of the MLP", "int >= 0"),
    "model.width": ("units per hidden layer of the MLP", "int >= 1"),
    "model.width_multiplier": ("channel multiplier of ResNet20 (16/32/64 x) and VGG", "float > 0"),
    "model.norm": ("normalization of ResNet20", _one_of(models.NORMS)),
    "init_seed": ("seed of the one initialization every model starts from", "int"),
    "data_seed": ("model i sees data order data_seed + i", "int"),
    "num_models": ("models per variant trained together; the LMC pair is models 0 and 1", "int >= 2"),
    "variants": ("comma-separated variants to train", "vanilla, tna, pruning"),
    "mask.fixed_fraction": ("fraction of entries held at their initial values (the paper's mask ratio)",
                            "0 <= x < 1"),
    "mask.granularity": ("fix single weights or whole output units", _one_of(masks.GRANULARITIES)),
    "mask.include": ("regex on parameter paths (e.g. 'fc1/kernel'); only matches are eligible; '' = all", "regex"),
    "mask.exclude": ("regex on parameter paths never fixed", "regex"),
    "mask.seed": ("seed of the mask, shared by every model", "int"),
    "pruning_fraction": ("fraction zeroed at init and kept zero by the pruning variant", "0 <= x < 1"),
    "optimizer.name": ("optimizer; weight decay is L2 for sgd/adam, decoupled for adamw",
                       _one_of(optim.OPTIMIZERS)),
    "optimizer.learning_rate": ("peak learning rate", "float > 0"),
    "optimizer.momentum": ("SGD momentum; 0 = none", "0 <= x < 1"),
    "optimizer.nesterov": ("Nesterov momentum", "bool"),
    "optimizer.weight_decay": ("weight decay", "float >= 0"),
    "optimizer.schedule": ("learning-rate schedule over the whole run", _one_of(optim.SCHEDULES)),
    "optimizer.warmup_steps": ("linear warmup steps", "int >= 0"),
    "optimizer.grad_clip": ("global-norm gradient clipping; 0 = off", "float >= 0"),
    "num_epochs": ("training epochs", "int >= 1"),
    "batch_size": ("training batch size (the last incomplete batch of an epoch is dropped)", "int >= 1"),
    "eval_batch_size": ("evaluation batch size", "int >= 1"),
    "augment.flip": ("random horizontal flips (the paper used none)", "bool"),
    "augment.crop_padding": ("random crops after zero padding by this many pixels; 0 = off", "int >= 0"),
    "lmc.num_alphas": ("points of the interpolation grid from 0 to 1, endpoints included", "int >= 2"),
    "lmc.alpha_chunk": ("alphas evaluated at once; 0 = all on GPU/TPU, one at a time on CPU (lower it when "
                        "memory is tight)", "int >= 0"),
    "lmc.bn_modes": ("BatchNorm models: interpolate running statistics (raw) and/or re-estimate them per alpha "
                     "(reset)", "comma-separated subset of " + ", ".join(lmc.BN_MODES)),
    "lmc.reset_batches": ("training batches used to re-estimate BatchNorm statistics", "int >= 1"),
    "overwrite": ("replace an earlier run in the workdir: the new run is built beside it and swapped in when "
                  "complete; the old one is kept as WORKDIR.previous-TIME", "bool"),
    "checkpoint.every": ("epochs (rounds) between checkpoints of each resumable phase; the last is always saved",
                         "int >= 1"),
    "checkpoint.every_minutes": ("also checkpoint when this many minutes passed since the last save; 0 = off",
                                 "float >= 0"),
    "checkpoint.keep": ("checkpoints kept per phase", "int >= 1"),
    "align": ("post-hoc alignment of model 1 onto model 0 before measuring curves again",
              "none \\| weight \\| activation"),
    "repair": ("also measure every curve with REPAIR (channel statistics rescaled at each alpha)", "bool"),
    "matching.solver": ("linear-assignment solver; auto = scipy on CPU, optax's Hungarian elsewhere",
                        "auto \\| hungarian \\| scipy"),
    "matching.max_iterations": ("weight matching: at most this many coordinate-descent sweeps", "int >= 1"),
    "matching.seed": ("weight matching: order in which each sweep visits the permutations", "int"),
    "matching.batches": ("activation matching: training batches whose activations are correlated", "int >= 1"),
    # soup / cold (fine-tuning from one base)
    "model.patch_size": ("ViT patch size", "int >= 1"),
    "model.num_heads": ("attention heads", "int >= 1, divides model.width"),
    "model.mlp_dim": ("hidden units of each transformer MLP block", "int >= 1"),
    "model.pool": ("ViT/text pooling: class token or mean", "tok \\| gap"),
    "model.vocab_size": ("text transformer: byte vocabulary", "int >= 1"),
    "model.lora_rank": ("LoRA adapters on every encoder Dense layer; 0 = none", "int >= 0"),
    "model.lora_alpha": ("LoRA scale alpha / rank", "float > 0"),
    "base.source": ("where the base model comes from", "init \\| pretrain \\| orbax \\| big_vision_npz"),
    "base.path": ("checkpoint directory (orbax) or .npz file (big_vision_npz)", "path"),
    "base.reinit": ("regex of parameter paths that keep their fresh initialization", "regex"),
    "pretrain.start": ("pretraining uses training examples [start, start + num_train)", "int >= 0"),
    "pretrain.num_train": ("number of pretraining examples", "int >= 1"),
    "pretrain.classes": ("pretraining relabeling: '/'-separated groups of '+'-joined classes; '' = all", "groups"),
    "pretrain.num_epochs": ("pretraining epochs", "int >= 1"),
    "pretrain.batch_size": ("pretraining batch size", "int >= 1"),
    "pretrain.data_seed": ("pretraining data order", "int"),
    "finetune.trainable": ("regex of parameters that train ('' = all; 'lora\\|head' = LoRA fine-tuning)", "regex"),
    "split.start": ("fine-tuning data: training examples [start, start + num_train)", "int >= 0"),
    "split.num_train": ("fine-tuning examples", "int >= 1"),
    "split.num_heldout": ("the next examples after the fine-tuning ones: the held-out split ranking models and "
                          "greedy soups", "int >= 1"),
    "soup.num_models": ("fine-tuned models (soup ingredients)", "int >= 2"),
    "soup.lr_factors": ("comma-separated learning-rate factors; each model draws one", "floats > 0"),
    "soup.epochs": ("comma-separated epoch counts; each model draws one", "ints >= 1"),
    "soup.augment": ("comma-separated augmentations; each model draws one", "none, flip, crop, flip+crop"),
    "soup.crop_padding": ("padding of the crop augmentation", "int >= 1"),
    "soup.hparam_seed": ("seed of the models' hyperparameter draws", "int"),
    "cold.tasks": ("contributors' tasks, ','-separated: relabelings (images) or GLUE task names", "tasks"),
    "cold.unseen_tasks": ("tasks fine-tuned from every round's base but never fused", "tasks"),
    "cold.rounds": ("fusion rounds (round 0 = fine-tuning from the original base)", "int >= 1"),
    "cold.epochs_per_round": ("each contributor's fine-tuning epochs per round", "int >= 1"),
    "cold.examples_per_task": ("each task's own training examples", "int >= 1"),
    "cold.start": ("image tasks draw from training examples starting here", "int >= 0"),
    "cold.max_len": ("GLUE: bytes per example", "int >= 1"),
    # fed
    "partition.kind": ("client split: iid, Dirichlet label skew per class, or k-class shards",
                       "iid \\| dirichlet \\| shards"),
    "partition.num_clients": ("clients", "int >= 1"),
    "partition.alpha": ("Dirichlet concentration; smaller = more skewed", "float > 0"),
    "partition.classes_per_client": ("shards: classes each client holds", "int >= 1"),
    "partition.min_client_size": ("dirichlet redraws until every client has this many examples", "int >= 1"),
    "partition.seed": ("seed of the partition", "int"),
    "algorithms": ("comma-separated algorithms compared on one partition and init; '+prox' adds the proximal "
                   "term, '+m' server momentum", "fedavg, fedprox, fedpfn, fedpnu, fedavgm"),
    "prox_mu": ("FedProx proximal weight", "float >= 0"),
    "mask.redraw": ("FedPFN/FedPNU: one mask for the run, or a new one every round", "fixed \\| per_round"),
    "server.learning_rate": ("server step on the weighted mean client update", "float > 0"),
    "server.momentum": ("server momentum of fedavgm and '+m' algorithms", "0 <= x < 1"),
    "num_rounds": ("communication rounds", "int >= 1"),
    "client_fraction": ("fraction of clients sampled per round (without replacement)", "0 < x <= 1"),
    "local_epochs": ("local epochs per round (FedPNU: first half with the mask, the rest with its reverse)",
                     "int >= 1"),
    "lr_decay_per_round": ("local learning rate multiplied by this every round", "0 < x <= 1"),
    "client_batch": ("clients trained side by side in one program; 0 = automatic", "int >= 0"),
    "sample_seed": ("seed of the sampled clients of each round", "int"),
    "eval_every": ("lmc: epochs between test evaluations during training; fed: rounds between test evaluations "
                   "of the global model; the last is always evaluated", "int >= 1"),
    "client_eval": ("also evaluate on the test set reweighted to each client's label mix", "bool"),
    "final_rounds": ("reported accuracy = mean over the last this many evaluations", "int >= 1"),
}


def doc_for(key: str) -> tuple[str, str] | None:
  """(meaning, allowed) of a key; `pretrain.optimizer.X` is documented by `optimizer.X`."""
  if key.startswith("pretrain.optimizer."):
    meaning, allowed = KEYS.get(key.removeprefix("pretrain."), (None, None))
    return (f"pretraining: {meaning}", allowed) if meaning else None
  return KEYS.get(key)


def flatten(config, prefix: str = "") -> dict[str, object]:
  """{'mask.seed': 0, ...} for a ConfigDict."""
  out = {}
  for key, value in config.items():
    if hasattr(value, "items"):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def load_configs() -> dict[str, object]:
  """Every config file's default config, by file stem."""
  configs = {}
  for path in sorted(CONFIG_DIR.glob("*.py")):
    spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    configs[path.stem] = module.get_config()
  return configs


def render() -> str:
  """The markdown reference."""
  by_experiment = collections.defaultdict(dict)
  for name, config in load_configs().items():
    by_experiment[config.experiment][name] = flatten(config)
  lines = ["# Config keys", "",
           "Generated by `python -m tna_jax.config_docs` from `configs/` and `tna_jax/config_docs.py`; "
           "a test fails when it is out of date. Override any key with `--config.KEY=VALUE`; "
           "`--config=configs/NAME.py:quick` shrinks a config to a smoke test.", ""]
  for experiment in sorted(by_experiment):
    files = by_experiment[experiment]
    keys = sorted({k for flat in files.values() for k in flat}, key=lambda k: (k.count("."), k))
    lines += [f"## `{experiment}`", "", "| key | meaning | allowed | " + " | ".join(f"`{f}`" for f in files) + " |",
              "|---" * (3 + len(files)) + "|"]
    for key in keys:
      meaning, allowed = doc_for(key) or ("UNDOCUMENTED", "?")
      defaults = " | ".join(f"`{flat[key]!r}`" if key in flat else "" for flat in files.values())
      lines.append(f"| `{key}` | {meaning} | {allowed} | {defaults} |")
    lines.append("")
  return "\n".join(lines)


def undocumented_and_stale() -> tuple[set[str], set[str]]:
  """Keys of some config missing from KEYS, and KEYS entries no config has."""
  used = {k for config in load_configs().values() for k in flatten(config)}
  return {k for k in used if doc_for(k) is None}, set(KEYS) - used


if __name__ == "__main__":
  DOCS_PATH.parent.mkdir(exist_ok=True)
  DOCS_PATH.write_text(render())
  print(f"wrote {DOCS_PATH}", file=sys.stderr)
