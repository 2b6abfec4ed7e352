"""Throughput of the query scorers and of training, on whatever device JAX finds.

  python experiments/bench.py [--width=64] [--batch=128] [--dtypes=float32,bfloat16]
      [--epoch_steps=20] [--torch] [--out=bench.json]

Prints and writes JSON, images/s and compile seconds of:
  forward_backward       a plain batched forward+backward of the same model and
                         batch (the floor the fast query is measured against)
  query_<method>_<dtype> the entropy-gradient-norm query ("fast", "vmap"), with
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

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_WIDTH = flags.DEFINE_integer("width", 64, "ResNet-18 width (64 = the paper's).")
_BATCH = flags.DEFINE_integer("batch", 128, "Images per call.")
_SIZE = flags.DEFINE_integer("image_size", 32, "Image side (CIFAR: 32).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per measurement.")
_DTYPES = flags.DEFINE_list("dtypes", ["float32"], "Compute dtypes of query and training.")
_METHODS = flags.DEFINE_list("methods", ["fast", "vmap"], "Query methods to time.")
_EPOCH_STEPS = flags.DEFINE_integer("epoch_steps", 0, "Steps per timed epoch (0: skip).")
_LOOPS = flags.DEFINE_list("loops", ["host", "scan"], "Epoch loops to time.")
_TORCH = flags.DEFINE_bool("torch", False, "Also time the PyTorch reference.")
_OUT = flags.DEFINE_string("out", None, "Write the JSON report here too.")
SUBSET = 25_000  # the paper's R for CIFAR


def _time(fn, repeats, sync):
  """(first call seconds, compile included; mean seconds of the next `repeats` calls)."""
  start = time.perf_counter()
  sync(fn())
  first = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(repeats):
    sync(fn())
  return first, (time.perf_counter() - start) / repeats


def _entry(images, seconds, first):
  return {"images_per_s": images / seconds, "compile_s": max(first - seconds, 0.0)}


def _jax_report(report, n, images, labels, mean, std):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from configs import default
  from lplgrad_jax import models, query, sharding, train

  sync = jax.block_until_ready
  config = default.get_config()
  config.model.width = _WIDTH.value
  config.train.batch_size = n
  learner = models.create_learner(config.model, 10, use_aux=True, key=jax.random.key(0))
  model = learner.classifier
  graphdef, params, rest = nnx.split(nnx.view(model, use_running_average=True), nnx.Param, ...)
  x = train.normalize(jnp.asarray(images), mean, std)
  floor = jax.jit(jax.grad(lambda p: jnp.sum(query.entropy(nnx.merge(graphdef, p, rest)(x)[0]))))
  first, seconds = _time(lambda: floor(params), _REPEATS.value, sync)
  report["forward_backward"] = _entry(n, seconds, first)
  for dtype in _DTYPES.value:
    for method in _METHODS.value:
      run = lambda: query.entropy_grad_norms(model, images, method=method, chunk_size=n,
                                             normalization=(mean, std), compute_dtype=dtype)
      first, seconds = _time(run, _REPEATS.value, sync)
      report[f"query_{method}_{dtype}"] = entry = _entry(n, seconds, first)
      entry["vs_forward_backward"] = entry["images_per_s"] / report["forward_backward"]["images_per_s"]
      entry[f"seconds_for_{SUBSET}"] = SUBSET / entry["images_per_s"]

  mesh = sharding.data_mesh()
  pool = train.Pool(*sharding.replicate((images, labels, mean, std), mesh))
  for dtype in _DTYPES.value:
    config.train.compute_dtype = dtype
    cfg = train.StepConfig.from_config(config.train, n, use_aux=True, mesh=mesh)
    train_graphdef, state = train.create_train_state(nnx.clone(learner), cfg)
    holder = {"state": sharding.replicate(jax.tree.map(jnp.copy, state), mesh)}
    order = sharding.replicate(np.arange(n, dtype=np.int32), mesh)
    plan = train.EpochPlan(order, n, jax.random.key(3), 0.1, False)  # unshuffled: one batch

    def step():
      holder["state"], metrics = train.batch_step(train_graphdef, cfg)(holder["state"], pool,
                                                                      plan, 0)
      return metrics

    first, seconds = _time(step, _REPEATS.value, sync)
    report[f"train_step_{dtype}"] = _entry(n, seconds, first)

  if _EPOCH_STEPS.value:
    steps = _EPOCH_STEPS.value
    config.train.compute_dtype = _DTYPES.value[0]
    epoch_pool = train.Pool(*sharding.replicate(
        (np.tile(images, (steps, 1, 1, 1)), np.tile(labels, steps), mean, std), mesh))
    ids = sharding.replicate(np.arange(steps * n, dtype=np.int32), mesh)
    for loop in _LOOPS.value:
      config.train.epoch_loop = loop
      cfg = train.StepConfig.from_config(config.train, steps * n, use_aux=True, mesh=mesh)
      train_graphdef, state = train.create_train_state(nnx.clone(learner), cfg)
      holder = {"state": sharding.replicate(jax.tree.map(jnp.copy, state), mesh)}
      plan = train.plan_epoch(cfg, ids, steps * n, jax.random.key(4), 0.1, False)

      def epoch():
        holder["state"], totals, _ = train.train_epoch(train_graphdef, cfg, holder["state"],
                                                       epoch_pool, plan)
        return totals

      first, seconds = _time(epoch, max(1, _REPEATS.value - 1), sync)
      report[f"train_epoch_{loop}"] = _entry(steps * n, seconds, first)
      report[f"train_epoch_{loop}"]["steps"] = steps


def _torch_report(report, n, images, labels, mean, std):
  import torch
  import torch_reference as ref

  device = "cuda" if torch.cuda.is_available() else "cpu"
  sync = (lambda _: torch.cuda.synchronize()) if device == "cuda" else (lambda _: None)
  torch.manual_seed(0)
  x = torch.as_tensor(((images / 255.0 - mean) / std).transpose(0, 3, 1, 2).copy(),
                      dtype=torch.float32, device=device)
  y = torch.as_tensor(labels, dtype=torch.long, device=device)
  model = ref.ResNet18(10, _WIDTH.value).to(device)
  report["torch_version"] = torch.__version__
  model.eval()  # the query: BatchNorm in inference mode
  first, seconds = _time(lambda: ref.forward_backward(model, x), _REPEATS.value, sync)
  report["torch_forward_backward"] = _entry(n, seconds, first)
  for name, fn in (("per_sample_loop", ref.per_sample_loop), ("func_vmap", ref.func_vmap)):
    first, seconds = _time(lambda: fn(model, x), 1, sync)
    report[f"torch_query_{name}"] = entry = _entry(n, seconds, first)
    entry[f"seconds_for_{SUBSET}"] = SUBSET / entry["images_per_s"]
  model.train()
  loss_net = ref.LossNet([_WIDTH.value * 2**i for i in range(4)]).to(device)
  train_step = ref.make_trainer(model, loss_net)
  first, seconds = _time(lambda: train_step(x, y), _REPEATS.value, sync)
  report["torch_train_step"] = _entry(n, seconds, first)
  fast = report[f"query_fast_{_DTYPES.value[0]}"]["images_per_s"]
  report["ratios"] = {
      "jax_fast_vs_torch_per_sample_loop": fast / report["torch_query_per_sample_loop"]["images_per_s"],
      "jax_fast_vs_torch_func_vmap": fast / report["torch_query_func_vmap"]["images_per_s"],
      "jax_train_vs_torch_eager": report[f"train_step_{_DTYPES.value[0]}"]["images_per_s"]
                                  / report["torch_train_step"]["images_per_s"]}


def main(_):
  import jax
  import numpy as np

  n, size = _BATCH.value, _SIZE.value
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, n).astype(np.int32)
  mean, std = np.full(3, 0.5, np.float32), np.full(3, 0.25, np.float32)
  report = {"device": str(jax.devices()[0].device_kind), "num_devices": jax.device_count(),
            "jax_version": jax.__version__, "width": _WIDTH.value, "batch": n,
            "image_size": size}
  _jax_report(report, n, images, labels, mean, std)
  if _TORCH.value:
    _torch_report(report, n, images, labels, mean, std)
  print(json.dumps(report, indent=1))
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(report, f, indent=1, allow_nan=False)


if __name__ == "__main__":
  app.run(main)
