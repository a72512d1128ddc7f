"""Every config key, declared once: its type, bounds or choices, meaning and where it applies.

The declarations drive everything that needs to know a key:
  - `validate(config)`: every experiment's check of its config before any data is read or
    file written (types, bounds, choices, undeclared keys, and the few cross-key `RULES`);
  - docs/config_keys.md (`tna_jax.config.docs`): meanings and allowed values;
  - `main --dry_run` (`applicable`): only the keys that apply to the chosen experiment and model.
Defaults are not here: each family's live in its base file, configs/default_<family>.py.
Choices come from the registries of the library (models, masks, optimizers, ...), so a new
model or optimizer is allowed here the moment it is registered.
"""

import dataclasses
import re
from typing import Any, Callable

import ml_collections

from tna_jax import experiments
from tna_jax.alignment import interpolation, matching, permutations
from tna_jax.config import grid
from tna_jax.core import asymmetric, data, mask_schedule, masks, models, optim, sharding, text_data, transformer_models
from tna_jax.errors import ConfigError, check_choice
from tna_jax.federated import algorithms, partition
from tna_jax.fusion import bases, merging, tasks
from tna_jax.runs import workdir

ALL = tuple(experiments.EXPERIMENTS)
LMC, FED = ("lmc", "sweep"), ("fed",)  # a sweep is a grid of lmc runs: it has every lmc key
FINETUNE = ("soup", "cold")  # models fine-tuned from one base
TRAINED_FROM_SCRATCH = ("lmc", "sweep", "fed")
ALIGNED = ("lmc", "sweep", "soup")  # post-hoc matching of trained models (`align`, `matching.*`)

LMC_VARIANTS = masks.TRAINING_VARIANTS  # vanilla, tna, pruning, wasym, sigma_asym
FINETUNE_VARIANTS = masks.STARTING_VARIANTS
SOUP_AUGMENTATIONS = ("none", "flip", "crop", "flip+crop")
ALIGN_CHOICES = ("none",) + matching.METHODS
CHECKPOINT_SOURCES = ("orbax", "big_vision_npz", "hf")  # base.source values read from base.path
LMC_BASE_SOURCES = ("init", "hf")  # lmc trains from the seeded initialization or fine-tunes a HF checkpoint
WITH_SELECT = ("lmc", "sweep", "soup", "cold")  # experiments with mask.select (fed draws its masks at random)


@dataclasses.dataclass(frozen=True)
class Key:
  """One config key.

  Attributes:
    path: the dotted key ('mask.fixed_fraction').
    kind: the Python type of its value (an int is accepted where a float is declared).
    meaning: what it does, for the docs.
    experiments: the experiments whose configs have it.
    low, high: bounds, inclusive unless `low_open` / `high_open`.
    choices: the allowed values.
    item: for a comma-separated list (a str), the type of each item; bounds and choices then
      apply to each item, and a list of choices may not repeat one.
    check_item: for a list, a function that raises ConfigError for a bad item.
    may_be_empty: a list that may name nothing.
    form: for free text, what it holds ('regex' is compiled to check it), for the docs.
    models: the `model.name`s that read it (None: it does not depend on the model).
    applies: whether it changes what a config does, given the other keys (None: always).
    condition: `applies` in words, for the docs (by experiment where it differs).
    optional: configs may leave it out.
  """

  path: str
  kind: type
  meaning: str
  experiments: tuple[str, ...] = ALL
  low: float | None = None
  high: float | None = None
  low_open: bool = False
  high_open: bool = False
  choices: tuple[Any, ...] | None = None
  item: type | None = None
  check_item: Callable[[str], Any] | None = None
  may_be_empty: bool = False
  form: str = ""
  models: tuple[str, ...] | None = None
  applies: Callable[[Any], bool] | None = None
  condition: str | dict[str, str] = ""
  optional: bool = False


# ----------------------------------------------------------------------------- where keys apply


def _model_knob(knob: str, meaning: str, kind: type, **bounds) -> Key:
  """`model.<knob>`, applying to the models whose registry entry reads it."""
  readers = tuple(name for name, knobs in models.KNOBS.items() if knob in knobs)
  experiments_with_it = tuple(e for e, names in _MODELS_OF.items() if set(readers) & set(names))
  # Optional: a model knob missing from a config keeps the model class's default.
  return Key(f"model.{knob}", kind, meaning, experiments=experiments_with_it, models=readers, optional=True, **bounds)


def _batchnorm(config) -> bool:
  return "norm" in models.KNOBS.get(config.model.name, ()) and config.model.norm == "batchnorm"


def _variant(*names: str) -> Callable[[Any], bool]:
  return lambda config: bool(set(names) & set(values(config, "variants")))


def _fed_algorithm(attribute: str) -> Callable[[Any], bool]:
  return lambda config: any(getattr(algorithms.parse(n), attribute) for n in values(config, "algorithms"))


def _server_optimizer(*names: str) -> Callable[[Any], bool]:
  return lambda config: any(algorithms.parse(n).server_optimizer in names for n in values(config, "algorithms"))


_adaptive_server = _server_optimizer("adam", "yogi")
_ADAPTIVE = "an algorithm is fedadam or fedyogi"
_FED_MASK_USED = "an algorithm is fedpfn or fedpnu"
_MASK_FRACTION_USED = {"lmc": "variants has tna", "sweep": "variants has tna", "soup": "variants has tna",
                       "cold": "variants has tna", "fed": "an algorithm is fedpfn or fedpnu without its own '@ratio'"}
_MASK_USED = {**_MASK_FRACTION_USED, "lmc": "variants has tna or pruning", "sweep": "variants has tna or pruning"}


def _mask_used(config) -> bool:
  """Whether some model trains with the mask (lmc's pruning variant draws its mask with these keys too)."""
  return _fed_algorithm("masked")(config) if config.experiment == "fed" else _variant("tna", "pruning")(config)


def _mask_fraction_used(config) -> bool:
  return _fed_algorithm("uses_config_ratio")(config) if config.experiment == "fed" else _variant("tna")(config)


def _schedulable(config) -> bool:
  """Whether some model's mask follows `mask.schedule`: TNA-PFN's (lmc, sweep), a masked fed algorithm's."""
  return _fed_algorithm("masked")(config) if config.experiment == "fed" else _variant("tna")(config)


def _schedule_used(config) -> bool:
  return _schedulable(config) and config.mask.schedule != "constant"


def _is(path: str, *values) -> Callable[[Any], bool]:
  return lambda config: grid.get_value(config, path) in values


def _is_not(path: str, *values) -> Callable[[Any], bool]:
  return lambda config: grid.get_value(config, path) not in values


def _merge_operators(config) -> set[str]:
  """The merging operators a soup (`soup.methods`) or ColD (`cold.merge`) config uses."""
  if config.experiment == "cold":
    return {config.cold.merge}
  return {merging.soup_operator(m)[1] for m in values(config, "soup.methods")}


def _merging(hyperparameter: str, *operators: str) -> dict[str, Any]:
  """`applies` and `condition` of a `merging.*` key: some chosen operator reads `hyperparameter`."""
  uses = lambda config: any(hyperparameter in merging.HYPERPARAMETERS[op] for op in _merge_operators(config))
  where = " or ".join(operators)
  return dict(experiments=FINETUNE, applies=uses,
              condition={"soup": f"soup.methods uses {where} (alone or as greedy:<operator>)",
                         "cold": f"cold.merge is {where}"})


# ----------------------------------------------------------------------------- the keys

_FINETUNE_MODELS = models.MODEL_NAMES + transformer_models.MODEL_NAMES
_MODELS_OF = {"lmc": models.MODEL_NAMES, "sweep": models.MODEL_NAMES, "fed": models.MODEL_NAMES,
              "soup": _FINETUNE_MODELS, "cold": _FINETUNE_MODELS}
_MASK = dict(applies=_mask_used, condition=_MASK_USED)
_PRETRAIN = dict(experiments=FINETUNE, applies=_is("base.source", "pretrain"), condition="base.source = pretrain")

_OPTIMIZER = (
    Key("optimizer.name", str, "optimizer; weight decay is L2 for sgd/adam, decoupled for adamw",
        choices=optim.OPTIMIZERS),
    Key("optimizer.learning_rate", float, "peak learning rate", low=0, low_open=True),
    Key("optimizer.momentum", float, "SGD momentum; 0 = none", low=0, high=1, high_open=True),
    Key("optimizer.nesterov", bool, "Nesterov momentum"),
    Key("optimizer.weight_decay", float, "weight decay", low=0),
    Key("optimizer.schedule", str, "learning-rate schedule over the whole run", choices=optim.SCHEDULES),
    Key("optimizer.warmup_steps", int, "linear warmup steps", low=0),
    Key("optimizer.grad_clip", float, "global-norm gradient clipping; 0 = off", low=0),
)

KEYS: tuple[Key, ...] = (
    Key("experiment", str, "which experiment runs this config", choices=ALL),
    Key("dataset", str, "dataset name", experiments=("sweep", "fed"), choices=data.DATASET_NAMES),
    Key("dataset", str, "dataset name (text_files: with base.source = hf, or model.name = text_transformer in soup)",
        experiments=("lmc", "soup"), choices=data.DATASET_NAMES + ("text_files",)),
    Key("dataset", str, "dataset name (glue, text_files: with model.name = text_transformer or base.source = hf)",
        experiments=("cold",), choices=data.DATASET_NAMES + text_data.TEXT_DATASETS),
    Key("data_dir", str, "directory of the IDX files (fashion_mnist), the prepared TFDS data_dir, or (text_files) "
        "of train.jsonl and test.jsonl (or .csv); '' = default", form="path"),
    Key("max_len", int, "text: tokens (bytes without a checkpoint) per example, special tokens included",
        experiments=("lmc", "sweep", "soup"), low=1, applies=_is("dataset", *text_data.TEXT_DATASETS),
        condition="dataset = text_files"),
    Key("num_train", int, "use only the first n training examples; 0 = all", experiments=TRAINED_FROM_SCRATCH,
        low=0),
    Key("num_test", int, "use only the first n test examples; 0 = all", low=0),
    Key("model.name", str, "architecture", experiments=("sweep", "fed"), choices=models.MODEL_NAMES),
    Key("model.name", str, "architecture (with base.source = hf, the checkpoint's)", experiments=("lmc",),
        choices=models.MODEL_NAMES, applies=_is_not("base.source", "hf"), condition="base.source != hf"),
    Key("model.init", str, "distribution of the Dense/Conv weights at initialization: flax (LeCun normal, zero "
        "bias), torch (PyTorch's Linear/Conv defaults, as the paper's authors trained), he (He normal, zero bias); "
        "it sets how large the vanilla barrier is", experiments=TRAINED_FROM_SCRATCH, choices=models.INIT_SCHEMES),
    Key("model.name", str, "architecture (with base.source = hf, the checkpoint's)", experiments=FINETUNE,
        choices=_FINETUNE_MODELS, applies=_is_not("base.source", "hf"), condition="base.source != hf"),
    _model_knob("depth", "hidden layers (mlp) or encoder blocks (transformers)", int, low=0),
    _model_knob("width", "units per hidden layer (mlp) or token width (transformers)", int, low=1),
    _model_knob("width_multiplier", "channel multiplier (ResNet20: 16/32/64 x this; cnn: 32/64/64 and fc 64 x this)",
                float, low=0, low_open=True),
    _model_knob("norm", "normalization layers", str, choices=models.NORMS),
    _model_knob("patch_size", "ViT patch size", int, low=1),
    _model_knob("num_heads", "attention heads (divides model.width)", int, low=1),
    _model_knob("mlp_dim", "hidden units of each transformer MLP block", int, low=1),
    _model_knob("pool", "pooling: class token or mean over tokens", str, choices=transformer_models.POOLS),
    _model_knob("vocab_size", "byte vocabulary", int, low=1),
    _model_knob("lora_rank", "LoRA adapters on every encoder Dense layer (hf: attention and MLP projections); "
                "0 = none", int, low=0),
    dataclasses.replace(_model_knob("lora_alpha", "LoRA scale alpha / rank", float, low=0, low_open=True),
                        applies=lambda config: config.model.lora_rank > 0, condition="model.lora_rank > 0"),
    Key("init_seed", int, "seed of the one initialization every model starts from"),
    Key("data_seed", int, "model i sees data order data_seed + i (fed: client orders from data_seed, round, "
        "client)"),
    Key("distributed", str, "join the other processes of a multi-host run (jax.distributed); --distributed "
        "overrides it", choices=sharding.DISTRIBUTED_MODES, optional=True),
    Key("batch_size", int, "training batch size (the last incomplete batch of an epoch is dropped)", low=1),
    Key("eval_batch_size", int, "evaluation batch size", low=1),
    *_OPTIMIZER,
    Key("checkpoint.every", int, "epochs (rounds) between checkpoints of each resumable phase; the last is always "
        "saved", low=1),
    Key("checkpoint.every_minutes", float, "also checkpoint when this many minutes passed since the last save; "
        "0 = off", low=0),
    Key("checkpoint.keep", int, "checkpoints kept per phase", low=1),
    Key("mask.fixed_fraction", float, "fraction of entries held at their initial values (the paper's mask ratio)",
        low=0, high=1, high_open=True, applies=_mask_fraction_used, condition=_MASK_FRACTION_USED),
    Key("mask.granularity", str, "fix single weights or whole output units", choices=masks.GRANULARITIES, **_MASK),
    Key("mask.include", str, "regex on parameter paths (e.g. 'fc1/kernel'; 'lora' = the LoRA adapters); only matches "
        "are eligible; '' = all; or a layer preset: all, first (the input layer), middle (the hidden layers), last "
        "(the classifier)", form="regex", **_MASK),
    Key("mask.exclude", str, "regex on parameter paths never fixed", form="regex", **_MASK),
    Key("mask.seed", int, "seed of the mask, shared by every model", **_MASK),
    Key("mask.select", str, "which eligible entries are fixed: random (each with probability fixed_fraction), or "
        "exactly the fixed_fraction of each leaf with the smallest / largest |w| of the base (needs a base: soup, "
        "cold with base.source != init, lmc with base.source = hf; ties broken by mask.seed)", experiments=WITH_SELECT,
        choices=masks.SELECTIONS, **_MASK),
    Key("mask.schedule", str, "the fixed fraction over training (fed: over rounds): constant, or from "
        "mask.fixed_fraction down to mask.final_fraction in one seeded release order (linear, cosine, or all at once "
        "at mask.schedule_end: step); lmc's pruning stays constant", experiments=TRAINED_FROM_SCRATCH,
        choices=mask_schedule.SCHEDULES, applies=_schedulable,
        condition={"lmc": "variants has tna", "sweep": "variants has tna", "fed": "an algorithm is fedpfn or fedpnu"}),
    Key("mask.final_fraction", float, "fixed fraction the schedule ends at; at most the starting fraction (entries "
        "are only released, never fixed again)", experiments=TRAINED_FROM_SCRATCH, low=0, high=1, high_open=True,
        applies=_schedule_used, condition="mask.schedule != constant"),
    Key("mask.schedule_end", float, "fraction of training (fed: of the rounds) at which the schedule reaches "
        "mask.final_fraction (step: where it drops)", experiments=TRAINED_FROM_SCRATCH, low=0, high=1, low_open=True,
        applies=_schedule_used, condition="mask.schedule != constant"),
    Key("overwrite", bool, "replace an earlier run in the workdir: the new run is built beside it and swapped in "
        "when complete; the old one is kept as WORKDIR.previous-TIME"),
    # lmc
    Key("num_models", int, "models per variant trained together; the LMC pair is models 0 and 1; all K give "
        "a barrier matrix and their weight average (k_models)", experiments=LMC, low=2),
    Key("variants", str, "comma-separated variants to train", experiments=LMC, item=str, choices=LMC_VARIANTS),
    Key("pruning_fraction", float, "fraction zeroed at init and kept zero by the pruning variant", experiments=LMC,
        low=0, high=1, high_open=True, applies=_variant("pruning"), condition="variants has pruning"),
    Key("wasym.fixed_per_unit", int, "W-Asymmetric: fan-in entries of every Dense/Conv unit held at fixed random "
        "values (at most half the unit's fan-in; each unit's set differs); 0 = vanilla", experiments=LMC, low=0,
        applies=_variant("wasym"), condition="variants has wasym"),
    Key("wasym.scale", float, "W-Asymmetric: the fixed values are scale * N(0, 1)", experiments=LMC, low=0,
        low_open=True, applies=_variant("wasym"), condition="variants has wasym"),
    Key("wasym.seed", int, "W-Asymmetric: seed of the fixed sets and values, shared by every model",
        experiments=LMC, applies=_variant("wasym"), condition="variants has wasym"),
    Key("sigma_asym.scale", float, "σ-Asymmetric: each hidden layer's fixed FiGLU matrix F is scale * N(0, 1)",
        experiments=LMC, low=0, low_open=True, applies=_variant("sigma_asym"), condition="variants has sigma_asym"),
    Key("num_epochs", int, "training epochs", experiments=LMC, low=1),
    Key("augment.flip", bool, "random horizontal flips (the paper used none)", experiments=LMC),
    Key("augment.crop_padding", int, "random crops after zero padding by this many pixels; 0 = off",
        experiments=LMC, low=0),
    Key("lmc.num_alphas", int, "points of the interpolation grid from 0 to 1, endpoints included", experiments=LMC,
        low=2),
    Key("lmc.alpha_chunk", int, "alphas evaluated at once; 0 = all on GPU/TPU, one at a time on CPU (lower it when "
        "memory is tight)", experiments=LMC, low=0),
    Key("lmc.bn_modes", str, "interpolate running statistics (raw) and/or re-estimate them per alpha (reset)",
        experiments=LMC, item=str, choices=interpolation.BN_MODES, applies=_batchnorm, condition="BatchNorm models"),
    Key("lmc.reset_batches", int, "training batches used to re-estimate BatchNorm statistics (and by REPAIR)",
        experiments=LMC, low=1, applies=lambda config: _batchnorm(config) or config.repair,
        condition="BatchNorm models or repair = True"),
    Key("align", str, "post-hoc alignment of model 1 onto model 0 before measuring curves again", experiments=LMC,
        choices=ALIGN_CHOICES),
    Key("align", str, "post-hoc alignment: every fine-tuned model permuted onto model 0 of its variant, then souped "
        "again (variants <variant>+<align>)", experiments=("soup",), choices=ALIGN_CHOICES),
    Key("repair", bool, "also measure every curve with REPAIR (channel statistics rescaled at each alpha)",
        experiments=LMC),
    Key("matching.solver", str, "linear-assignment solver; auto = scipy on CPU, optax's Hungarian elsewhere",
        experiments=ALIGNED, choices=matching.SOLVERS, applies=lambda config: config.align != "none",
        condition="align != none"),
    Key("matching.max_iterations", int, "weight matching: at most this many coordinate-descent sweeps",
        experiments=ALIGNED, low=1, applies=_is("align", "weight"), condition="align = weight"),
    Key("matching.seed", int, "weight matching: order in which each sweep visits the permutations", experiments=ALIGNED,
        applies=_is("align", "weight"), condition="align = weight"),
    Key("matching.batches", int, "activation matching: training batches whose activations are correlated",
        experiments=ALIGNED, low=1, applies=_is("align", "activation"), condition="align = activation"),
    # soup and cold: fine-tuning from one base
    Key("base.source", str, "where the base model comes from (hf: a Hugging Face checkpoint, model and tokenizer)",
        experiments=FINETUNE, choices=bases.BASE_SOURCES),
    Key("base.source", str, "init: train every model from the seeded initialization; hf: fine-tune every model from "
        "a Hugging Face checkpoint (the LMC of pretrained models)", experiments=("lmc",), choices=LMC_BASE_SOURCES),
    Key("base.source", str, "sweeps train from the seeded initialization", experiments=("sweep",), choices=("init",)),
    Key("base.path", str, "checkpoint directory (orbax, hf: config.json, model.safetensors, tokenizer.json; gs:// "
        "works) or .npz file (big_vision_npz)", experiments=FINETUNE, form="path",
        applies=_is("base.source", *CHECKPOINT_SOURCES), condition="base.source = orbax, big_vision_npz or hf"),
    Key("base.path", str, "Hugging Face checkpoint directory (config.json, model.safetensors, tokenizer.json; gs:// "
        "works)", experiments=LMC, form="path", applies=_is("base.source", "hf"), condition="base.source = hf"),
    Key("base.reinit", str, "regex of parameter paths that keep their fresh initialization (hf: the head is "
        "re-initialized when the task's classes differ from the checkpoint's)", experiments=FINETUNE, form="regex",
        applies=_is_not("base.source", "hf"), condition="base.source != hf"),
    Key("pretrain.start", int, "pretraining uses training examples [start, start + num_train)", low=0, **_PRETRAIN),
    Key("pretrain.num_train", int, "number of pretraining examples", low=1, **_PRETRAIN),
    Key("pretrain.classes", str, "pretraining relabeling: '/'-separated groups of '+'-joined classes; '' = all",
        form="groups", **_PRETRAIN),
    Key("pretrain.num_epochs", int, "pretraining epochs", low=1, **_PRETRAIN),
    Key("pretrain.batch_size", int, "pretraining batch size", low=1, **_PRETRAIN),
    Key("pretrain.data_seed", int, "pretraining data order", **_PRETRAIN),
    *(dataclasses.replace(key, path=f"pretrain.{key.path}", meaning=f"pretraining: {key.meaning}", **_PRETRAIN)
      for key in _OPTIMIZER),
    Key("variants", str, "comma-separated variants to fine-tune: without and with one shared TNA-PFN mask",
        experiments=FINETUNE, item=str, choices=FINETUNE_VARIANTS),
    Key("finetune.trainable", str, "regex of parameters that train ('' = all; 'lora|head' = LoRA fine-tuning)",
        experiments=FINETUNE, form="regex"),
    Key("split.start", int, "fine-tuning data: training examples [start, start + num_train)", experiments=("soup",),
        low=0),
    Key("split.num_train", int, "fine-tuning examples", experiments=("soup",), low=1),
    Key("split.num_heldout", int, "the next examples after the fine-tuning ones: the held-out split ranking models "
        "and greedy soups", experiments=("soup",), low=1),
    Key("soup.num_models", int, "fine-tuned models (soup ingredients)", experiments=("soup",), low=2),
    Key("soup.lr_factors", str, "comma-separated learning-rate factors; each model draws one", experiments=("soup",),
        item=float, low=0, low_open=True),
    Key("soup.epochs", str, "comma-separated epoch counts; each model draws one", experiments=("soup",), item=int,
        low=1),
    Key("soup.augment", str, "comma-separated augmentations; each model draws one", experiments=("soup",), item=str,
        choices=SOUP_AUGMENTATIONS),
    Key("soup.crop_padding", int, "padding of the crop augmentation", experiments=("soup",), low=1),
    Key("soup.hparam_seed", int, "seed of the models' hyperparameter draws", experiments=("soup",)),
    Key("soup.methods", str, "soups made and reported: an operator of tna_jax.fusion.merging over all models, "
        "'greedy' (Wortsman et al.'s greedy soup, by averaging) or 'greedy:<operator>' (the greedy soup with that "
        "operator)", experiments=("soup",), item=str, choices=merging.SOUP_METHODS),
    Key("cold.merge", str, "how contributors are fused into the next base: uniform (their mean) or another "
        "operator of tna_jax.fusion.merging on their task vectors against the round's base", experiments=("cold",),
        choices=merging.NAMES),
    Key("merging.lambda", float, "scale of the merged task vector: base + lambda * merged (mergekit's lambda)",
        **_merging("lam", "task_arithmetic", "ties", "dare")),
    Key("merging.normalize", bool, "divide the models' weights by their sum (task arithmetic: the mean task vector; "
        "TIES: the disjoint mean); false = Ilharco et al.'s plain sum", **_merging("normalize", "task_arithmetic",
                                                                                  "ties", "dare")),
    Key("merging.density", float, "TIES: fraction of each task vector's (trainable) entries kept per leaf, by "
        "magnitude", low=0, low_open=True, high=1, **_merging("density", "ties")),
    Key("merging.drop_rate", float, "DARE: probability that a task-vector entry is dropped (survivors x 1/(1-p))",
        low=0, high=1, high_open=True, **_merging("drop_rate", "dare")),
    Key("merging.dare_combine", str, "DARE: how the dropped task vectors are combined (ties = sign election and "
        "disjoint mean, no trim: mergekit's dare_ties)", choices=merging.DARE_COMBINES,
        **_merging("combine", "dare")),
    Key("merging.seed", int, "DARE: seed of the drop (per leaf by path; ColD folds in the round)",
        **_merging("seed", "dare")),
    Key("cold.tasks", str, "contributors' tasks, ','-separated: relabelings ('0+2/1/3', images) or GLUE task names",
        experiments=("cold",), item=str, form="relabelings or GLUE task names"),
    Key("cold.unseen_tasks", str, "tasks fine-tuned from every round's base but never fused", experiments=("cold",),
        item=str, may_be_empty=True, form="relabelings or GLUE task names"),
    Key("cold.rounds", int, "fusion rounds (round 0 = fine-tuning from the original base)", experiments=("cold",),
        low=0),
    Key("cold.epochs_per_round", int, "each contributor's fine-tuning epochs per round", experiments=("cold",), low=1),
    Key("cold.examples_per_task", int, "each task's own training examples (at least batch_size)",
        experiments=("cold",), low=1),
    Key("cold.start", int, "image tasks draw from training examples starting here", experiments=("cold",), low=0,
        applies=lambda config: config.dataset != "glue", condition="dataset != glue"),
    Key("cold.max_len", int, "text: tokens (bytes without a checkpoint) per example, special tokens included",
        experiments=("cold",), low=1, applies=_is("dataset", *text_data.TEXT_DATASETS),
        condition="dataset = glue or text_files"),
    # fed
    Key("partition.kind", str, "client split: iid, Dirichlet label skew per class, or k-class shards",
        experiments=FED, choices=partition.KINDS),
    Key("partition.num_clients", int, "clients", experiments=FED, low=1),
    Key("partition.alpha", float, "Dirichlet concentration; smaller = more skewed", experiments=FED, low=0,
        low_open=True, applies=_is("partition.kind", "dirichlet"), condition="partition.kind = dirichlet"),
    Key("partition.classes_per_client", int, "shards: classes each client holds", experiments=FED, low=1,
        applies=_is("partition.kind", "shards"), condition="partition.kind = shards"),
    Key("partition.min_client_size", int, "dirichlet redraws until every client has this many examples; other "
        "kinds refuse smaller clients", experiments=FED, low=1),
    Key("partition.seed", int, "seed of the partition", experiments=FED),
    Key("algorithms", str, "comma-separated algorithms compared on one partition and init; '+prox' adds the "
        "proximal term, '+m' server momentum, '@ratio' a masked algorithm's own mask ratio (fedpnu@0.3)",
        experiments=FED, item=str, check_item=algorithms.parse,
        form=f"{', '.join(algorithms.BASES)} with +{', +'.join(algorithms.MODIFIERS)}; fedpfn, fedpnu with @ratio, "
        "0 < ratio < 1"),
    Key("prox_mu", float, "FedProx proximal weight", experiments=FED, low=0, applies=_fed_algorithm("prox"),
        condition="an algorithm has the proximal term"),
    Key("mask.redraw", str, "never: one mask for the whole run; every_round: the server draws a new one each round",
        choices=masks.REDRAWS, experiments=FED, applies=_mask_used, condition=_FED_MASK_USED),
    Key("server.learning_rate", float, "SGD servers (all but fedadam, fedyogi): step on the weighted mean client "
        "update", experiments=FED, low=0, low_open=True, applies=_server_optimizer("sgd"),
        condition="an algorithm has an SGD server"),
    Key("server.momentum", float, "server momentum of fedavgm and '+m' algorithms", experiments=FED, low=0, high=1,
        high_open=True, applies=_fed_algorithm("server_momentum"), condition="an algorithm has server momentum"),
    Key("server.adaptive_learning_rate", float, "server learning rate of fedadam and fedyogi", experiments=FED,
        low=0, low_open=True, applies=_adaptive_server, condition=_ADAPTIVE),
    Key("server.b1", float, "fedadam, fedyogi: decay of the server's first moment", experiments=FED, low=0, high=1,
        high_open=True, applies=_adaptive_server, condition=_ADAPTIVE),
    Key("server.b2", float, "fedadam, fedyogi: decay of the server's second moment", experiments=FED, low=0, high=1,
        high_open=True, applies=_adaptive_server, condition=_ADAPTIVE),
    Key("server.eps", float, "fedadam, fedyogi: adaptivity tau added to the root of the second moment",
        experiments=FED, low=0, low_open=True, applies=_adaptive_server, condition=_ADAPTIVE),
    Key("num_rounds", int, "communication rounds", experiments=FED, low=1),
    Key("client_fraction", float, "fraction of clients sampled per round (without replacement)", experiments=FED,
        low=0, high=1, low_open=True),
    Key("local_epochs", int, "local epochs per round (FedPNU: first half with the mask, the rest with its reverse)",
        experiments=FED, low=1),
    Key("lr_decay_per_round", float, "local learning rate multiplied by this every round", experiments=FED, low=0,
        low_open=True),
    Key("client_batch", int, "clients trained side by side in one program; 0 = all on GPU/TPU, one at a time on CPU",
        experiments=FED, low=0),
    Key("sample_seed", int, "seed of the sampled clients of each round", experiments=FED),
    Key("eval_every", int, "rounds between test evaluations of the global model (the last is always evaluated)",
        experiments=FED, low=1),
    Key("eval_every", int, "epochs between test evaluations during training (the last is always evaluated; the "
        "LMC curves never depend on it)", experiments=LMC, low=1),
    # sweep
    Key("sweep.grid", str, "axes separated by ';', each KEY=V1,V2,... (KEY1+KEY2=... gives both keys each value, as "
        "the ratio of TNA-PFN and pruning); the points are every combination of the axes' values",
        experiments=("sweep",), form="grid"),
    Key("sweep.seeds", int, "replicates of every point: replicate r adds r to init_seed, mask.seed and wasym.seed and "
        "r * num_models to data_seed", experiments=("sweep",), low=1),
    Key("client_eval", bool, "also evaluate on the test set reweighted to each client's label mix", experiments=FED),
    Key("final_rounds", int, "reported accuracy = mean over the last this many evaluations", experiments=FED, low=1),
)


def declared(experiment: str) -> dict[str, Key]:
  """The keys of `experiment`'s configs, by path."""
  return {key.path: key for key in KEYS if experiment in key.experiments}


# ----------------------------------------------------------------------------- allowed values


def _bounds(key: Key, name: str) -> str:
  """`key`'s bounds on `name`: 'name >= 1', '0 <= name < 1', ...; '' when it has none."""
  if key.low is not None and key.high is None:
    return f"{name} {'>' if key.low_open else '>='} {key.low:g}"
  low = "" if key.low is None else f"{key.low:g} {'<' if key.low_open else '<='} "
  high = "" if key.high is None else f" {'<' if key.high_open else '<='} {key.high:g}"
  return f"{low}{name}{high}" if low or high else ""


def allowed(key: Key) -> str:
  """What values `key` takes, in words ('int >= 1', '0 <= x < 1', 'sgd | adam | adamw', ...)."""
  if key.item is not None:
    if key.choices is not None:
      return f"comma-separated, each at most once: {', '.join(map(str, key.choices))}"
    each = f", each {_bounds(key, 'x')}" if _bounds(key, "x") else ""
    return f"comma-separated: {key.form}" if key.form else f"comma-separated {key.item.__name__}s{each}"
  if key.choices is not None:
    return " | ".join(map(str, key.choices))
  if key.high is not None:
    return _bounds(key, "x")
  return _bounds(key, key.kind.__name__) or key.form or key.kind.__name__


# ----------------------------------------------------------------------------- validation


def validate(config) -> None:
  """Checks every key of `config` against its declaration, then the cross-key `RULES`.

  Raises ConfigError naming the first bad key, its value and what is allowed, before any
  data is read or file written.
  """
  check_choice("experiment", config.experiment, ALL)
  keys = declared(config.experiment)
  for path, value in workdir.flat(config).items():
    if path not in keys:
      raise ConfigError(f"config key {path!r} is not a key of the {config.experiment} experiment; its keys are in "
                        "docs/config_keys.md.")
    check_value(keys[path], value)
  for experiments_of_rule, rule in RULES:
    if config.experiment in experiments_of_rule:
      rule(config)


def check_value(key: Key, value: Any) -> None:
  """Raises ConfigError unless `value` is allowed for `key`."""
  if not _is_a(value, key.kind):
    raise ConfigError(f"{key.path}={value!r} is a {type(value).__name__}; allowed: {allowed(key)}.")
  if key.item is None:
    _check_one(key, value)
    return
  for item in items(key, value):
    _check_one(key, item)
    if key.check_item is not None:
      key.check_item(item)


def values(config, path: str) -> list[Any]:
  """The items of the comma-separated list key `path` of `config` (e.g. 'variants'), as its
  declaration casts them: the one parser of list keys, for validation and runs alike."""
  return items(declared(config.experiment)[path], grid.get_value(config, path))


def items(key: Key, value: str) -> list[Any]:
  """The items of a comma-separated list key, each cast to `key.item`."""
  names = [s.strip() for s in value.split(",") if s.strip()]
  if not names and not key.may_be_empty:
    raise ConfigError(f"{key.path}={value!r} names nothing; allowed: {allowed(key)}.")
  try:
    values = [key.item(s) for s in names]
  except ValueError:
    raise ConfigError(f"{key.path}={value!r}: every item must be a {key.item.__name__}.") from None
  if key.item is str:
    repeated = [v for i, v in enumerate(values) if v in values[:i]]
    if repeated:
      raise ConfigError(f"{key.path}={value!r} names {repeated[0]!r} twice; allowed: {allowed(key)}.")
  return values


def _is_a(value: Any, kind: type) -> bool:
  if kind is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if kind is int:
    return isinstance(value, int) and not isinstance(value, bool)
  return isinstance(value, kind)


def _check_one(key: Key, value: Any) -> None:
  if key.choices is not None:
    check_choice(key.path, value, key.choices)
  if key.form == "regex":
    try:
      re.compile(value)
    except re.error as e:
      raise ConfigError(f"{key.path}={value!r} is not a regular expression ({e}); allowed: a Python regex.") from None
  too_low = key.low is not None and (value <= key.low if key.low_open else value < key.low)
  too_high = key.high is not None and (value >= key.high if key.high_open else value > key.high)
  if too_low or too_high:
    if key.high is None:
      raise ConfigError(f"{key.path}={value!r} must be {_bounds(key, '').strip()}.")
    raise ConfigError(f"{key.path}={value!r} is out of range; allowed: {_bounds(key, key.path)}.")


# ----------------------------------------------------------------------------- cross-key rules


def base_checkpoint_is_named(config) -> None:
  """A base read from a checkpoint needs its path."""
  if config.base.source in CHECKPOINT_SOURCES and not config.base.path:
    raise ConfigError(f"base.source={config.base.source!r} needs base.path (the checkpoint to start from).")


def dataset_fits_model(config) -> None:
  """Text (glue, text_files) needs the text transformer or a Hugging Face checkpoint (whose
  model_type is checked against the data when it is read), and a base not pretrained on images."""
  if config.base.source == "hf":
    return
  text = config.dataset in text_data.TEXT_DATASETS
  if text != (config.model.name == "text_transformer"):
    needs = (f"{config.dataset} needs model.name='text_transformer' or base.source='hf'" if text
             else "image datasets need an image model")
    raise ConfigError(f"model.name={config.model.name!r} does not fit dataset={config.dataset!r}: {needs}.")
  if text and config.base.source == "pretrain":
    raise ConfigError(f"base.source='pretrain' trains on an image dataset; for {config.dataset} use 'init', 'orbax' "
                      "or 'hf'.")


def mask_select_has_a_base(config) -> None:
  """The magnitude rules rank the base's weights: they need a base that is not the seeded init."""
  if config.mask.select != "random" and config.base.source == "init":
    where = "base.source='hf'" if config.experiment in LMC else "a base.source other than 'init'"
    raise ConfigError(f"mask.select={config.mask.select!r} ranks the pretrained base's weights by |w|, but "
                      f"base.source='init' has no pretrained base; use {where}, or mask.select='random'.")
  if config.mask.select != "random" and config.mask.granularity != "weight":
    raise ConfigError(f"mask.select={config.mask.select!r} ranks single entries by |w|; it needs "
                      f"mask.granularity='weight', not {config.mask.granularity!r}.")
  if config.mask.select != "random" and config.mask.get("schedule", "constant") != "constant":
    raise ConfigError(f"mask.select={config.mask.select!r} with mask.schedule={config.mask.schedule!r}: a schedule "
                      "releases entries in its own seeded random order; use mask.schedule='constant' with a magnitude "
                      "rule, or mask.select='random' with a schedule.")


def tasks_fit_dataset(config) -> None:
  """Each ColD task is a GLUE task name (glue) or a relabeling of the image classes."""
  for path in ("cold.tasks", "cold.unseen_tasks"):
    for spec in items(declared("cold")[path], grid.get_value(config, path)):
      if config.dataset == "glue":
        check_choice("cold.tasks (glue)", spec, tuple(text_data.GLUE_TASKS))
      else:
        tasks.parse_groups(spec, 10_000)  # syntax only; class ranges are checked against the data


def tasks_fill_a_batch(config) -> None:
  """Each ColD task trains on at least one batch."""
  if config.cold.examples_per_task < config.batch_size:
    raise ConfigError(f"cold.examples_per_task={config.cold.examples_per_task} is smaller than "
                      f"batch_size={config.batch_size}.")


def grid_points_are_valid(config) -> None:
  """Every point of a sweep's grid is a valid config: its values pass their keys' checks, and
  the point passes the other rules (a swept model must still be alignable, ...)."""
  keys = declared(config.experiment)
  for overrides in grid.points(grid.parse(config.sweep.grid, keys)):
    for path, value in overrides.items():
      check_value(keys[path], value)
    point = grid.apply(config, overrides)
    for experiments_of_rule, rule in RULES:
      if config.experiment in experiments_of_rule and rule is not grid_points_are_valid:
        rule(point)


def schedule_only_releases(config) -> None:
  """A mask schedule lowers the fixed fraction from every scheduled mask's ratio (lmc: TNA-PFN's,
  fed: each masked algorithm's, '@ratio' included), keeps one release order (fed: no redraw),
  and a step schedule drops before training ends."""
  if not _schedule_used(config):
    return
  schedule = mask_schedule.Schedule.from_config(config.mask)
  if config.experiment != "fed":
    schedule.check(config.mask.fixed_fraction)
  else:
    for algorithm in map(algorithms.parse, values(config, "algorithms")):
      if algorithm.masked:
        schedule.check(algorithm.mask_spec(masks.MaskSpec.from_config(config.mask)).fixed_fraction,
                       "" if algorithm.uses_config_ratio else algorithm.name)
    if config.mask.redraw != "never":
      raise ConfigError(f"mask.schedule={schedule.kind!r} releases entries in one fixed order, which "
                        f"mask.redraw={config.mask.redraw!r} would redraw every round; use mask.redraw=never.")
  if schedule.kind == "step" and schedule.end == 1.0:
    raise ConfigError("mask.schedule='step' drops to mask.final_fraction at mask.schedule_end, and "
                      "mask.schedule_end=1 is the end of training, so nothing would be released; use a value < 1.")


def model_can_be_aligned(config) -> None:
  """Alignment and REPAIR (lmc only) need the model's permutation spec."""
  if config.align != "none" or config.get("repair", False):
    permutations.describe(models.get_model(config.model, num_classes=10))


def asymmetric_variants_fit(config) -> None:
  """sigma_asym needs an MLP, and has no unit permutation for alignment or REPAIR to use: FiGLU's
  fixed F reads every unit of its layer (tna_jax/alignment/permutations.py)."""
  asymmetric_variants = [v for v in values(config, "variants") if v in asymmetric.VARIANTS]
  if asymmetric_variants and grid.get_value(config, "base.source") != "init":
    raise ConfigError(f"variants {', '.join(asymmetric_variants)} build their fixed entries into the library's "
                      f"from-scratch models; base.source={config.base.source!r} is not supported with them (use "
                      "base.source='init').")
  if "sigma_asym" not in values(config, "variants"):
    return
  asymmetric.variant_model("sigma_asym", models.get_model(config.model, num_classes=10))
  if config.align != "none" or config.repair:
    raise ConfigError(f"variant 'sigma_asym' cannot be aligned (align={config.align!r}, repair={config.repair}): "
                      "FiGLU's fixed F mixes all units of a layer, so no permutation of units is a symmetry; "
                      "drop sigma_asym from variants or set align='none', repair=False.")


# (experiments, rule): checks that involve several keys, after every key passed on its own.
RULES: tuple[tuple[tuple[str, ...], Callable[[Any], None]], ...] = (
    (FINETUNE + ("lmc",), base_checkpoint_is_named),
    (("lmc", "soup", "cold"), dataset_fits_model),
    (WITH_SELECT, mask_select_has_a_base),
    (("cold",), tasks_fit_dataset),
    (("cold",), tasks_fill_a_batch),
    (ALIGNED, model_can_be_aligned),
    (TRAINED_FROM_SCRATCH, schedule_only_releases),
    (LMC, asymmetric_variants_fit),
    (("sweep",), grid_points_are_valid),
)


# ----------------------------------------------------------------------------- what applies


def applies(key: Key, config) -> bool:
  """Whether `key` changes what `config` does (its model reads it, its condition holds)."""
  if key.models is not None and config.model.name not in key.models:
    return False
  return key.applies is None or bool(key.applies(config))


def applicable(config) -> ml_collections.ConfigDict:
  """A copy of a validated `config` without the keys that do not apply to it (`main --dry_run`)."""
  keys = declared(config.experiment)
  shown: dict[str, Any] = {}
  for path, value in workdir.flat(config).items():
    if applies(keys[path], config):
      *parents, leaf = path.split(".")
      node = shown
      for parent in parents:
        node = node.setdefault(parent, {})
      node[leaf] = value
  return ml_collections.ConfigDict(shown)
