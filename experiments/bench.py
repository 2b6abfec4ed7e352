"""Throughput of the query scorers and of training, on whatever device JAX finds.

  python experiments/bench.py [--model=resnet18] [--width=64] [--batch=128]
      [--dtypes=float32,bfloat16] [--epoch_steps=20] [--notrain] [--torch] [--out=bench.json]

Prints and writes JSON, images/s and compile seconds of:
  forward_backward       a plain batched forward+backward of the same model and
                         batch (the floor the fast query is measured against)
  query_<method>_<dtype> the entropy-gradient-norm query ("fast", "vmap") over
                         --query_chunks chunks of --batch images per call, with
                         the seconds a subset of R=25,000 images would take
  train_step_<dtype>     one training step (main model + loss head, augmentation)
  train_epoch_<loop>     an epoch of --epoch_steps steps, host loop vs device loop
  torch_*                (--torch) the same ResNet-18 in PyTorch on the same
                         device and inputs: forward+backward, the authors'
                         per-sample backward loop, torch.func vmap(grad), an
                         eager training step; and JAX / PyTorch ratios
"""

import json
import os
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lplgrad_jax  # noqa: E402, F401 - its XLA:CPU setting, before JAX starts (xla_flags.py)

_MODEL = flags.DEFINE_string(
  "model",
  "resnet18",
  "config.model.name: resnet18, resnet34, resnet50, wide_resnet28, vit or module:pkg.mod:factory.",
)
_WIDTH = flags.DEFINE_integer(
  "width", 64, "model.width (ResNet-18: 64 = the paper's; WRN: k; ViT: embedding size)."
)
_DEPTH = flags.DEFINE_integer("depth", 6, "ViT blocks.")
_HEADS = flags.DEFINE_integer("heads", 4, "ViT attention heads.")
_TRAIN = flags.DEFINE_bool("train", True, "Also time a training step.")
_BATCH = flags.DEFINE_integer("batch", 128, "Images per call.")
_SIZE = flags.DEFINE_integer("image_size", 32, "Image side (CIFAR: 32).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per measurement.")
_DTYPES = flags.DEFINE_list("dtypes", ["float32"], "Compute dtypes of query and training.")
_METHODS = flags.DEFINE_list("methods", ["fast", "vmap"], "Query methods to time.")
_QUERY_CHUNKS = flags.DEFINE_integer(
  "query_chunks", 8, "Chunks of --batch images per timed query call (its set-up is per call)."
)
_EPOCH_STEPS = flags.DEFINE_integer("epoch_steps", 0, "Steps per timed epoch (0: skip).")
_LOOPS = flags.DEFINE_list("loops", ["host", "scan"], "Epoch loops to time.")
_TORCH = flags.DEFINE_bool("torch", False, "Also time the PyTorch reference.")
_OUT = flags.DEFINE_string("out", None, "Write the JSON report here too.")
_BN_VARIANCE = flags.DEFINE_enum(
  "bn_variance",
  "two_pass",
  ["two_pass", "fast"],
  "BatchNorm's batch variance: the project's mean((x - mean)^2), or Flax's E[x^2] - E[x]^2 "
  "(the earlier default, less accurate: docs/cpu_numerics.md), to time one against the other.",
)
SUBSET = 25_000  # the paper's R for CIFAR


def time_call(fn, repeats, sync):
  """(first call seconds, compile included; mean seconds of the next `repeats` calls)."""
  start = time.perf_counter()
  sync(fn())
  first = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(repeats):
    sync(fn())
  return first, (time.perf_counter() - start) / repeats


def rate_entry(images, seconds, first):
  return {"images_per_s": images / seconds, "compile_s": max(first - seconds, 0.0)}


def make_floor(model, images, mean, std, dtype="float32", mesh=None):
  """A thunk: one jitted batched forward+backward of sum(entropy) over `images` (uint8),
  BatchNorm in inference mode, the batch split over `mesh`: the query's floor."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from lplgrad_jax import models
  from lplgrad_jax import query
  from lplgrad_jax import sharding
  from lplgrad_jax import train

  mesh = mesh if mesh is not None else sharding.data_mesh()
  view = query.pergrad.inference_view(model)
  graphdef, params, rest = nnx.split(models.with_compute_dtype(view, dtype), nnx.Param, ...)
  params, rest, mean, std = sharding.replicate((params, rest, mean, std), mesh)
  x = sharding.split_batch(images, mesh)

  @jax.jit
  def grads(params, rest, x, mean, std):
    loss = lambda p: jnp.sum(
      query.output_entropy(nnx.merge(graphdef, p, rest)(train.normalize(x, mean, std)))
    )
    return jax.grad(loss)(params)

  return lambda: grads(params, rest, x, mean, std)


def make_query(model, images, mean, std, *, method, chunk_size, dtype="float32", mesh=None):
  """A thunk: `query.entropy_grad_norms` of `images` (uint8, host) as a campaign calls it."""
  from lplgrad_jax import query

  return lambda: query.entropy_grad_norms(
    model,
    images,
    method=method,
    chunk_size=chunk_size,
    normalization=(mean, std),
    compute_dtype=dtype,
    mesh=mesh,
  )


def _state_holder(learner, train_config, max_labeled, mesh):
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from lplgrad_jax import sharding
  from lplgrad_jax import train

  cfg = train.StepConfig.from_config(train_config, max_labeled, use_aux=True, mesh=mesh)
  graphdef, state = train.create_train_state(nnx.clone(learner), cfg)
  return cfg, graphdef, {"state": sharding.replicate(jax.tree.map(jnp.copy, state), mesh)}


def make_train_step(learner, train_config, pool, mean, std, mesh=None, max_labeled=None):
  """A thunk: one jitted training step (main model + loss head, augmentation) on the
  first `train_config.batch_size` images of `pool` (device arrays), state carried over.
  `max_labeled` (default: one batch) sizes the epoch's id buffer as `make_epoch`'s does:
  with the same value the host epoch loop reuses this step's compilation."""
  import jax
  import numpy as np

  from lplgrad_jax import sharding
  from lplgrad_jax import train

  mesh = mesh if mesh is not None else sharding.data_mesh()
  n = train_config.batch_size
  cfg, graphdef, holder = _state_holder(learner, train_config, max_labeled or n, mesh)
  order = np.zeros(cfg.steps_per_epoch * n, np.int32)
  order[:n] = np.arange(n)
  order = sharding.replicate(order, mesh)
  step = train.batch_step(graphdef, cfg)
  device_pool = train.Pool(*pool, *sharding.replicate((mean, std), mesh))
  plan = train.EpochPlan(order, n, jax.random.key(3), 0.1, False)  # unshuffled: one batch

  def run():
    holder["state"], metrics = step(holder["state"], device_pool, plan, 0)
    return metrics

  return run


def make_epoch(learner, train_config, pool, num_labeled, mean, std, mesh=None):
  """A thunk: one epoch (`train.train_epoch`, `train_config.epoch_loop`) over the first
  `num_labeled` images of `pool` (device arrays), state carried over."""
  import jax
  import numpy as np

  from lplgrad_jax import sharding
  from lplgrad_jax import train

  mesh = mesh if mesh is not None else sharding.data_mesh()
  cfg, graphdef, holder = _state_holder(learner, train_config, num_labeled, mesh)
  ids = np.zeros(cfg.steps_per_epoch * cfg.batch_size, np.int32)
  ids[:num_labeled] = np.arange(num_labeled)
  ids = sharding.replicate(ids, mesh)
  device_pool = train.Pool(*pool, *sharding.replicate((mean, std), mesh))
  plan = train.plan_epoch(cfg, ids, num_labeled, jax.random.key(4), 0.1, False)

  def run():
    holder["state"], totals, _ = train.train_epoch(
      graphdef, cfg, holder["state"], device_pool, plan
    )
    return totals

  return run


def _jax_report(report, n, images, labels, mean, std):
  import jax
  import numpy as np

  from lplgrad_jax import models
  from lplgrad_jax import sharding
  from lplgrad_jax.configs import default

  sync = jax.block_until_ready
  config = default.get_config()
  config.model.name, config.model.width = _MODEL.value, _WIDTH.value
  config.model.depth, config.model.heads = _DEPTH.value, _HEADS.value
  config.train.batch_size = n
  learner = models.create_learner(
    config.model, 10, use_aux=True, key=jax.random.key(0), image_size=images.shape[1]
  )
  model = learner.classifier
  first, seconds = time_call(make_floor(model, images, mean, std), _REPEATS.value, sync)
  report["forward_backward"] = rate_entry(n, seconds, first)
  for dtype in _DTYPES.value:
    for method in _METHODS.value:
      # Several chunks per call, as a query of R images runs: the per-call set-up (the
      # model split for inference and placed on the devices) is paid once per query.
      chunks = np.tile(images, (_QUERY_CHUNKS.value, 1, 1, 1))
      run = make_query(model, chunks, mean, std, method=method, chunk_size=n, dtype=dtype)
      first, seconds = time_call(run, _REPEATS.value, sync)
      report[f"query_{method}_{dtype}"] = entry = rate_entry(len(chunks), seconds, first)
      entry["vs_forward_backward"] = (
        entry["images_per_s"] / report["forward_backward"]["images_per_s"]
      )
      entry[f"seconds_for_{SUBSET}"] = SUBSET / entry["images_per_s"]

  mesh = sharding.data_mesh()
  pool = sharding.replicate((images, labels), mesh)
  for dtype in _DTYPES.value if _TRAIN.value else ():
    config.train.compute_dtype = dtype
    first, seconds = time_call(
      make_train_step(learner, config.train, pool, mean, std, mesh), _REPEATS.value, sync
    )
    report[f"train_step_{dtype}"] = rate_entry(n, seconds, first)

  if _EPOCH_STEPS.value:
    steps = _EPOCH_STEPS.value
    config.train.compute_dtype = _DTYPES.value[0]
    epoch_pool = sharding.replicate(
      (np.tile(images, (steps, 1, 1, 1)), np.tile(labels, steps)), mesh
    )
    for loop in _LOOPS.value:
      config.train.epoch_loop = loop
      epoch = make_epoch(learner, config.train, epoch_pool, steps * n, mean, std, mesh)
      first, seconds = time_call(epoch, max(1, _REPEATS.value - 1), sync)
      report[f"train_epoch_{loop}"] = rate_entry(steps * n, seconds, first)
      report[f"train_epoch_{loop}"]["steps"] = steps


def torch_inputs(images, labels, mean, std, device):
  """(x, y) for the PyTorch reference: normalised NCHW float32 and int64 on `device`."""
  import torch

  x = torch.as_tensor(
    ((images / 255.0 - mean) / std).transpose(0, 3, 1, 2).copy(), dtype=torch.float32, device=device
  )
  return x, torch.as_tensor(labels, dtype=torch.long, device=device)


def torch_sync(device):
  import torch

  return (lambda _: torch.cuda.synchronize()) if device == "cuda" else (lambda _: None)


def _torch_report(report, n, images, labels, mean, std):
  import torch
  import torch_reference as ref

  device = "cuda" if torch.cuda.is_available() else "cpu"
  sync = torch_sync(device)
  torch.manual_seed(0)
  x, y = torch_inputs(images, labels, mean, std, device)
  model = ref.ResNet18(10, _WIDTH.value).to(device)
  report["torch_version"] = torch.__version__
  model.eval()  # the query: BatchNorm in inference mode
  first, seconds = time_call(lambda: ref.forward_backward(model, x), _REPEATS.value, sync)
  report["torch_forward_backward"] = rate_entry(n, seconds, first)
  for name, fn in (("per_sample_loop", ref.per_sample_loop), ("func_vmap", ref.func_vmap)):
    first, seconds = time_call(lambda: fn(model, x), 1, sync)
    report[f"torch_query_{name}"] = entry = rate_entry(n, seconds, first)
    entry[f"seconds_for_{SUBSET}"] = SUBSET / entry["images_per_s"]
  model.train()
  loss_net = ref.LossNet([_WIDTH.value * 2**i for i in range(4)]).to(device)
  train_step = ref.make_trainer(model, loss_net)
  first, seconds = time_call(lambda: train_step(x, y), _REPEATS.value, sync)
  report["torch_train_step"] = rate_entry(n, seconds, first)
  fast = report[f"query_fast_{_DTYPES.value[0]}"]["images_per_s"]
  report["ratios"] = {
    "jax_fast_vs_torch_per_sample_loop": fast
    / report["torch_query_per_sample_loop"]["images_per_s"],
    "jax_fast_vs_torch_func_vmap": fast / report["torch_query_func_vmap"]["images_per_s"],
    "jax_train_vs_torch_eager": report[f"train_step_{_DTYPES.value[0]}"]["images_per_s"]
    / report["torch_train_step"]["images_per_s"],
  }


def main(_):
  import jax
  import numpy as np

  n, size = _BATCH.value, _SIZE.value
  if _BN_VARIANCE.value == "fast":
    from flax import nnx

    from lplgrad_jax import models

    def flax_default_variance(self, features, *, unbiased_running_var, **kwargs):
      nnx.BatchNorm.__init__(self, features, **kwargs)  # use_fast_variance=True
      self.unbiased_running_var = unbiased_running_var

    models.BatchNorm.__init__ = flax_default_variance
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, n).astype(np.int32)
  mean, std = np.full(3, 0.5, np.float32), np.full(3, 0.25, np.float32)
  report = {
    "device": str(jax.devices()[0].device_kind),
    "num_devices": jax.device_count(),
    "jax_version": jax.__version__,
    "model": _MODEL.value,
    "width": _WIDTH.value,
    "batch": n,
    "image_size": size,
    "bn_variance": _BN_VARIANCE.value,
  }
  _jax_report(report, n, images, labels, mean, std)
  if _TORCH.value:
    _torch_report(report, n, images, labels, mean, std)
  print(json.dumps(report, indent=1))
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(report, f, indent=1, allow_nan=False)


if __name__ == "__main__":
  app.run(main)
