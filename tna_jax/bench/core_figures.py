"""The core figures: what TNA-PFN's mask costs, what the one-call LMC curve and the vmapped
replicas save, and how this library's ResNet20 training step compares with PyTorch's.

Every figure times this library and its baseline on the same work in the same process,
alternating the two over several rounds so that a slow spell of a shared machine hits both,
and reports the ratio of the medians with the absolute numbers behind it.
"""

import dataclasses
import functools
import importlib.util
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from tna_jax.alignment import interpolation
from tna_jax.bench import timing
from tna_jax.core import data, evaluate, execution, masks, models, optim, sharding, train

SGD = dict(name="sgd", learning_rate=0.05, momentum=0.9, weight_decay=5e-4)
MLP = dict(name="mlp", depth=4, width=512)  # the quickstart config's model
LMC_MLP = dict(name="mlp", depth=2, width=200)  # the lmc experiment's default model
CNN = dict(name="cnn")
RESNET20 = dict(name="resnet20", norm="batchnorm", width_multiplier=1)
CIFAR_SHAPE = (32, 32, 3)


def device() -> str:
  """The device the figures ran on, e.g. 'cpu: cpu (1 device)'."""
  d = jax.devices()[0]
  return f"{d.platform}: {d.device_kind} ({jax.device_count()} device{'s' * (jax.device_count() > 1)})"


def alternate(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
  """Median seconds per call of each fn, timed in turns: A B A B ... after one warm-up each."""
  for fn in fns.values():
    jax.block_until_ready(fn())
  times = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      times[name].append(timing.seconds_per_call(fn, repeats=1, warmup=0))
  return {name: float(np.median(t)) for name, t in times.items()}


@functools.cache
def fashion_mnist() -> data.Dataset:
  return data.load_dataset("fashion_mnist")


def synthetic(num_train: int, shape: tuple[int, ...], num_classes: int = 10) -> data.Dataset:
  """Random uint8 images of `shape` (timing does not depend on the pixels)."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (num_train,) + shape, dtype=np.uint8)
  labels = rng.integers(0, num_classes, num_train).astype(np.int32)
  return data.Dataset(name="synthetic", train_images=images, train_labels=labels, test_images=images[:1],
                      test_labels=labels[:1], num_classes=num_classes, mean=(0.5,) * shape[-1],
                      std=(0.25,) * shape[-1])


class Trainer:
  """One model's training as `fit` runs it: K stacked copies, one epoch per call."""

  def __init__(self, model_cfg: dict, dataset: data.Dataset, batch_size: int, *, fixed_fraction: float = 0.0,
               tx: optax.GradientTransformation | None = None, sequential: bool | None = None):
    self.dataset, self.fixed_fraction = dataset, fixed_fraction
    self.model = models.get_model(ml_collections.ConfigDict(model_cfg), dataset.num_classes)
    self.tx = tx or optim.make_optimizer(ml_collections.ConfigDict(SGD), len(dataset.train_labels) // batch_size)
    self.mesh = sharding.make_mesh(devices=jax.devices()[:1])
    self.policy = execution.policy(self.mesh)
    if sequential is not None:  # a figure times both ways, whatever the device's own choice
      self.policy = dataclasses.replace(self.policy, sequential=sequential)
    self.images, self.labels = (sharding.shard_rows(a, self.mesh) for a in (dataset.train_images,
                                                                               dataset.train_labels))
    self.train_epochs = train.make_train_epochs(self.model, self.tx, self.mesh, batch_size=batch_size,
                                                mean=dataset.mean, std=dataset.std,
                                                num_examples=len(dataset.train_labels), policy=self.policy)

  def states(self, k: int) -> train.TrainState:
    """K copies of one initialization and mask, created in one compiled call."""

    def init():
      variables = models.init_variables(self.model, jax.random.key(0), self.dataset.image_shape)
      mask = masks.fixed_mask(variables["params"], self.fixed_fraction, seed=1)
      return train.stack([train.init_train_state(self.tx, variables, mask)] * k)

    return train.create_states(init, self.mesh)

  def epoch_fn(self, k: int) -> Callable[[], Any]:
    """A call that trains K models for one epoch (the states are donated, so kept here)."""
    box = {"states": self.states(k), "seeds": jnp.arange(k)}

    def run():
      box["states"], metrics = self.train_epochs(box["states"], box["seeds"], 0, self.images, self.labels)
      return metrics

    return run


def mask_overhead_ratio(quick: bool) -> dict:
  """Step time of TNA-PFN training / vanilla training (plain optax SGD, no mask anywhere).

  Same model, data, batch and hyperparameters; TNA-PFN holds 40 % of the entries fixed
  through `masks.freeze` at the end of the chain. The value is the worse of MLP and CNN.
  """
  batch, rounds = (16, 1) if quick else (128, 5)
  vanilla_tx = optax.chain(optax.add_decayed_weights(SGD["weight_decay"]),
                           optax.sgd(SGD["learning_rate"], momentum=SGD["momentum"]))
  out = {}
  for name, cfg, steps in (("mlp", MLP, 2 if quick else 100), ("cnn", CNN, 2 if quick else 20)):
    dataset = fashion_mnist().subset(batch * steps, 1)
    tna = Trainer(cfg, dataset, batch, fixed_fraction=0.4)
    vanilla = Trainer(cfg, dataset, batch, tx=vanilla_tx)
    seconds = alternate({"tna": tna.epoch_fn(1), "vanilla": vanilla.epoch_fn(1)}, rounds)
    out[name] = {"ratio": seconds["tna"] / seconds["vanilla"], "steps": steps,
                 "tna_step_ms": 1e3 * seconds["tna"] / steps, "vanilla_step_ms": 1e3 * seconds["vanilla"] / steps,
                 "vanilla_images_per_s": batch * steps / seconds["vanilla"]}
  worst = max(out, key=lambda n: out[n]["ratio"])
  return {"value": out[worst]["ratio"], "target": "<= 1.03", "device": device(), "batch_size": batch,
          "models": out,
          "summary": ", ".join(f"{n} {r['tna_step_ms']:.1f} vs {r['vanilla_step_ms']:.1f} ms/step"
                               for n, r in out.items())}


def lmc_curve_speedup(quick: bool) -> dict:
  """A per-alpha Python loop of jitted batch evaluations / `interpolation.lmc_curve` in one call.

  The loop is how LMC code usually measures a curve: for each alpha, interpolate, then
  evaluate batch by batch from host memory, reading each batch's sums back. Both evaluate
  the lmc experiment's MLP at 21 alphas on the full Fashion-MNIST test set, batches of 1000.
  The one call runs its default way for the device (alphas one after another on CPU, all
  vmapped elsewhere); the all-vmapped call is timed too.
  """
  num_alphas, num_test, batch, rounds = (5, 2000, 1000, 1) if quick else (21, 10000, 1000, 5)
  dataset = fashion_mnist().subset(1, num_test)
  model = models.get_model(ml_collections.ConfigDict(LMC_MLP), dataset.num_classes)
  va, vb = (models.init_variables(model, jax.random.key(s), dataset.image_shape) for s in (0, 1))
  alphas = jnp.linspace(0.0, 1.0, num_alphas)
  batches = evaluate.make_batches(dataset.test_images, dataset.test_labels, batch)
  apply_fn, mean, std = evaluate.inference_fn(model), dataset.mean, dataset.std
  interpolate = jax.jit(interpolation.interpolate)

  @jax.jit
  def batch_sums(variables, images, labels):
    logits = apply_fn(variables, data.normalize(images, mean, std))
    return (optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum(),
            (jnp.argmax(logits, -1) == labels).sum())

  host_batches = [(dataset.test_images[i:i + batch], dataset.test_labels[i:i + batch])
                  for i in range(0, num_test, batch)]

  def loop():
    curve = []
    for alpha in np.asarray(alphas):
      variables, loss, correct = interpolate(va, vb, alpha), 0.0, 0
      for images, labels in host_batches:
        batch_loss, batch_correct = batch_sums(variables, images, labels)
        loss, correct = loss + float(batch_loss), correct + int(batch_correct)
      curve.append((loss / num_test, correct / num_test))
    return np.asarray(curve)

  one_call = lambda chunk=0: interpolation.lmc_curve(model, va, vb, alphas, batches, mean, std, alpha_chunk=chunk)
  seconds = alternate({"loop": loop, "one_call": one_call, "one_call_vmapped": lambda: one_call(num_alphas)}, rounds)
  np.testing.assert_allclose(loop()[:, 1], jax.device_get(one_call())["accuracy"], atol=1e-6)
  return {"value": seconds["loop"] / seconds["one_call"], "target": ">= 5", "device": device(),
          "num_alphas": num_alphas, "num_test": num_test, "eval_batch_size": batch, "loop_s": seconds["loop"],
          "one_call_s": seconds["one_call"], "one_call_vmapped_s": seconds["one_call_vmapped"],
          "summary": f"{num_alphas} alphas x {num_test} images: loop {seconds['loop']:.3f}s, one call "
                     f"{seconds['one_call']:.3f}s (all alphas vmapped {seconds['one_call_vmapped']:.3f}s)"}


def replicas_speedup(quick: bool) -> dict:
  """Training K=4 models one after another / the same 4 trained together in one call.

  The baseline is the very same compiled epoch with K=1, called 4 times, the device's
  default way. Both ways of training together are timed (vmapped, and one after another
  inside the call); together is the default (`execution.ExecutionPolicy.sequential`: one after
  another on CPU, vmapped elsewhere). The value is the smaller of the MLP's and the CNN's
  speedups.
  """
  k, (batch, rounds) = 4, ((16, 1) if quick else (128, 3))
  default_way = "mapped" if execution.policy().sequential else "vmapped"
  out = {}
  for name, cfg, steps in (("mlp", MLP, 2 if quick else 40), ("cnn", CNN, 2 if quick else 10)):
    dataset = fashion_mnist().subset(batch * steps, 1)
    trainers = {way: Trainer(cfg, dataset, batch, fixed_fraction=0.4, sequential=way == "mapped")
                for way in ("vmapped", "mapped")}
    one = trainers[default_way].epoch_fn(1)
    seconds = alternate({"one_by_one": lambda: [one() for _ in range(k)],
                         **{way: trainer.epoch_fn(k) for way, trainer in trainers.items()}}, rounds)
    seconds["together"] = seconds[default_way]
    images = k * batch * steps
    out[name] = {"speedup": seconds["one_by_one"] / seconds["together"], "steps": steps,
                 **{f"{way}_speedup": seconds["one_by_one"] / seconds[way] for way in trainers},
                 **{f"{way}_images_per_s": images / seconds[way] for way in seconds}}
  worst = min(out, key=lambda n: out[n]["speedup"])
  return {"value": out[worst]["speedup"], "target": ">= 1.5", "device": device(), "k": k, "batch_size": batch,
          "sequential_default": execution.policy().sequential, "models": out,
          "summary": ", ".join(f"{n} x{r['speedup']:.2f} (vmapped x{r['vmapped_speedup']:.2f}, one after another "
                               f"in one call x{r['mapped_speedup']:.2f}; {r['together_images_per_s']:.0f} img/s)"
                               for n, r in out.items())}


def torch_speed_ratio(quick: bool) -> dict:
  """Images/s of this library's ResNet20 training / a plain PyTorch ResNet20 loop.

  Same shapes (CIFAR 32x32x3, batch 128), BatchNorm, SGD with momentum and weight decay.
  PyTorch runs with its default threads and with one thread, and the faster counts: its
  OpenMP threads collapse when other processes share the cores (7x slower here), which
  would flatter this library. PyTorch is an optional extra: without it there is no value.
  """
  if importlib.util.find_spec("torch") is None:
    return {"value": None, "target": ">= 1", "device": device(), "summary": "PyTorch not installed"}
  import torch  # pylint: disable=g-import-not-at-top

  batch, steps, rounds = (8, 1, 1) if quick else (128, 2, 3)
  trainer = Trainer(RESNET20, synthetic(batch * steps, CIFAR_SHAPE), batch, fixed_fraction=0.4)
  torch_loop, torch_info = _torch_resnet20_loop(batch, steps)
  default_threads = torch.get_num_threads()

  def with_threads(n):
    def run():
      torch.set_num_threads(n)
      torch_loop()
    return run

  try:
    seconds = alternate({"jax": trainer.epoch_fn(1), "torch": with_threads(default_threads),
                         "torch_1_thread": with_threads(1)}, rounds)
  finally:
    torch.set_num_threads(default_threads)
  ips = {name: batch * steps / s for name, s in seconds.items()}
  baseline = max(ips["torch"], ips["torch_1_thread"])
  return {"value": ips["jax"] / baseline, "target": ">= 1", "device": device(), "batch_size": batch, "steps": steps,
          "jax_images_per_s": ips["jax"], "torch_images_per_s": ips["torch"],
          "torch_1_thread_images_per_s": ips["torch_1_thread"], "xla_flags": os.environ.get("XLA_FLAGS", ""),
          **torch_info, "summary": f"ResNet20 {ips['jax']:.0f} vs PyTorch {ips['torch']:.0f} img/s "
                                   f"({ips['torch_1_thread']:.0f} on 1 thread)"}


def _torch_resnet20_loop(batch: int, steps: int) -> tuple[Callable[[], None], dict]:
  """A plain PyTorch ResNet20 (BN, the same layout as models.ResNet20) trained on `steps` batches."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  def conv_bn(cin, cout, kernel, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout))

  class Block(nn.Module):

    def __init__(self, cin, cout, stride):
      super().__init__()
      self.a, self.b = conv_bn(cin, cout, 3, stride), conv_bn(cout, cout, 3, 1)
      self.shortcut = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
      return F.relu(self.b(F.relu(self.a(x))) + self.shortcut(x))

  widths = [16] + [16 * 2**stage for stage in range(3) for _ in range(3)]
  net = nn.Sequential(conv_bn(3, 16, 3, 1), nn.ReLU(),
                      *[Block(widths[i], widths[i + 1], 2 if i in (3, 6) else 1) for i in range(9)],
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
  opt = torch.optim.SGD(net.parameters(), lr=SGD["learning_rate"], momentum=SGD["momentum"],
                        weight_decay=SGD["weight_decay"])
  generator = torch.Generator().manual_seed(0)
  batches = [(torch.randn(batch, 3, 32, 32, generator=generator), torch.randint(0, 10, (batch,), generator=generator))
             for _ in range(steps)]

  def run():
    for images, labels in batches:
      opt.zero_grad(set_to_none=True)
      F.cross_entropy(net(images), labels).backward()
      opt.step()

  return run, {"torch_version": torch.__version__, "torch_threads": torch.get_num_threads()}
