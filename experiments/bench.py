"""Throughput of the query scorers and of training, on whatever device JAX finds.

  python experiments/bench.py [--width=64] [--batch=128] [--image_size=32] [--out=bench.json]

Prints and writes JSON: images/s of the entropy-gradient-norm query ("fast"
and "vmap"), of a plain batched forward+backward of the same model and batch
(the floor the fast method is measured against), of a training step (main
model + loss head, augmentation included), and each one's compile time.
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
_OUT = flags.DEFINE_string("out", None, "Write the JSON report here too.")


def _time(fn, repeats):
  """(compile + first call seconds, mean seconds of the next `repeats` calls)."""
  import jax
  start = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(repeats):
    jax.block_until_ready(fn())
  return first, (time.perf_counter() - start) / repeats


def main(_):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from configs import default
  from lplgrad_jax import models, query, sharding, train

  n, size = _BATCH.value, _SIZE.value
  config = default.get_config()
  config.model.width = _WIDTH.value
  config.train.batch_size = n
  learner = models.create_learner(config.model, 10, use_aux=True, key=jax.random.key(0))
  images = np.asarray(jax.random.randint(jax.random.key(1), (n, size, size, 3), 0, 256), np.uint8)
  labels = np.asarray(jax.random.randint(jax.random.key(2), (n,), 0, 10), np.int32)
  mean, std = np.full(3, 0.5, np.float32), np.full(3, 0.25, np.float32)
  report = {"device": str(jax.devices()[0].device_kind), "num_devices": jax.device_count(),
            "width": _WIDTH.value, "batch": n, "image_size": size}

  model = learner.classifier
  graphdef, params, rest = nnx.split(nnx.view(model, use_running_average=True), nnx.Param, ...)
  x = train.normalize(jnp.asarray(images), mean, std)
  floor = jax.jit(jax.grad(lambda p: jnp.sum(query.entropy(nnx.merge(graphdef, p, rest)(x)[0]))))
  compile_s, seconds = _time(lambda: floor(params), _REPEATS.value)
  report["forward_backward"] = {"images_per_s": n / seconds, "compile_s": compile_s}
  for method in query.METHODS:
    run = lambda: query.entropy_grad_norms(model, images, method=method, chunk_size=n,
                                           normalization=(mean, std))
    compile_s, seconds = _time(run, _REPEATS.value)
    report[f"query_{method}"] = {"images_per_s": n / seconds, "compile_s": compile_s,
                                 "vs_forward_backward": (n / seconds)
                                 / report["forward_backward"]["images_per_s"]}

  mesh = sharding.data_mesh()
  cfg = train.StepConfig.from_config(config.train, n, use_aux=True, mesh=mesh)
  train_graphdef, state = train.create_train_state(learner, cfg)
  holder = {"state": sharding.replicate(state, mesh)}
  pool = sharding.replicate((images, labels), mesh)
  order = sharding.replicate(np.arange(n, dtype=np.int32), mesh)

  def step():
    holder["state"], metrics = train.train_batch(
        train_graphdef, cfg, holder["state"], *pool, order, 0, n, jax.random.key(3), 0.1,
        False, mean, std)
    return metrics

  compile_s, seconds = _time(step, _REPEATS.value)
  report["train_step"] = {"images_per_s": n / seconds, "compile_s": compile_s}
  print(json.dumps(report, indent=1))
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(report, f, indent=1)


if __name__ == "__main__":
  app.run(main)
