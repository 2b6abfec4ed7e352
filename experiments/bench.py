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
  linear_*               (--linear) linear mode: the frozen backbone's features of the
                         batch, and the query on such features
  query_fast_streamed    (--streamed) the fast query of R read from a memory-mapped .npy
                         pool (stream mode), against the same R in memory
  torch_*                (--torch) the same ResNet-18 in PyTorch on the same
                         device and inputs: forward+backward, the authors'
                         per-sample backward loop, torch.func vmap(grad), an
                         eager training step; and JAX / PyTorch ratios
"""

import json
import os
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import measure  # noqa: E402 - the measuring, shared with accelerator_check.py

import lplgrad_jax  # noqa: E402, F401 - its XLA:CPU setting, before JAX starts (xla_flags.py)

_MODEL = flags.DEFINE_string(
  "model",
  "resnet18",
  "config.model.name: resnet18, resnet34, resnet50, wide_resnet28, vit or module:pkg.mod:factory.",
)
_WIDTH = flags.DEFINE_integer(
  "width", 64, "model.width (ResNet-18: 64 = the paper's; WRN: k; ViT: embedding size)."
)
_STEM = flags.DEFINE_enum(
  "stem", "cifar", ["cifar", "imagenet"], "ResNet stem (imagenet: 7x7/2 and max-pool, 224 px)."
)
_DEPTH = flags.DEFINE_integer("depth", 6, "ViT blocks.")
_HEADS = flags.DEFINE_integer("heads", 4, "ViT attention heads.")
_TRAIN = flags.DEFINE_bool("train", True, "Also time a training step.")
_STREAMED = flags.DEFINE_bool(
  "streamed", False, "Also time the fast query reading R from a memory-mapped .npy pool."
)
_LINEAR = flags.DEFINE_bool(
  "linear", False, "Also time linear mode: the frozen features and the query on them."
)
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


def _jax_report(report, n, images, labels, mean, std):
  import jax
  import numpy as np
  from flax import nnx

  from lplgrad_jax import models
  from lplgrad_jax import sharding
  from lplgrad_jax.configs import default

  sync = jax.block_until_ready
  config = default.get_config()
  config.model.name, config.model.width = _MODEL.value, _WIDTH.value
  config.model.depth, config.model.heads = _DEPTH.value, _HEADS.value
  config.model.stem = _STEM.value
  config.train.batch_size = n
  learner = models.create_learner(
    config.model, 10, use_aux=True, key=jax.random.key(0), image_size=images.shape[1]
  )
  if _BN_VARIANCE.value == "fast":  # Flax's E[x^2] - E[x]^2, in this learner's layers alone
    for _, layer in nnx.iter_graph(learner):
      if isinstance(layer, models.BatchNorm):
        layer.use_fast_variance = True
  model = learner.classifier
  floor = measure.make_floor(model, images, mean, std)
  first, seconds = measure.time_call(floor, _REPEATS.value, sync)
  report["forward_backward"] = measure.rate_entry(n, seconds, first)
  for dtype in _DTYPES.value:
    for method in _METHODS.value:
      # Several chunks per call, as a query of R images runs: the per-call set-up (the
      # model split for inference and placed on the devices) is paid once per query.
      chunks = np.tile(images, (_QUERY_CHUNKS.value, 1, 1, 1))
      run = measure.make_query(model, chunks, mean, std, method=method, chunk_size=n, dtype=dtype)
      first, seconds = measure.time_call(run, _REPEATS.value, sync)
      report[f"query_{method}_{dtype}"] = entry = measure.rate_entry(len(chunks), seconds, first)
      entry["vs_forward_backward"] = (
        entry["images_per_s"] / report["forward_backward"]["images_per_s"]
      )
      entry[f"seconds_for_{SUBSET}"] = SUBSET / entry["images_per_s"]

  if _LINEAR.value:
    _linear_report(report, learner, images, mean, std)
  if _STREAMED.value:
    _streamed_report(report, model, images, mean, std)

  mesh = sharding.data_mesh()
  pool = sharding.replicate((images, labels), mesh)
  for dtype in _DTYPES.value if _TRAIN.value else ():
    config.train.compute_dtype = dtype
    first, seconds = measure.time_call(
      measure.make_train_step(learner, config.train, pool, mean, std, mesh), _REPEATS.value, sync
    )
    report[f"train_step_{dtype}"] = measure.rate_entry(n, seconds, first)

  if _EPOCH_STEPS.value:
    steps = _EPOCH_STEPS.value
    config.train.compute_dtype = _DTYPES.value[0]
    epoch_pool = sharding.replicate(
      (np.tile(images, (steps, 1, 1, 1)), np.tile(labels, steps)), mesh
    )
    for loop in _LOOPS.value:
      config.train.epoch_loop = loop
      epoch = measure.make_epoch(learner, config.train, epoch_pool, steps * n, mean, std, mesh)
      first, seconds = measure.time_call(epoch, max(1, _REPEATS.value - 1), sync)
      report[f"train_epoch_{loop}"] = measure.rate_entry(steps * n, seconds, first)
      report[f"train_epoch_{loop}"]["steps"] = steps


def _linear_report(report, learner, images, mean, std):
  """Linear mode: the features (once per campaign) and the query on them (each round)."""
  import jax
  import numpy as np

  from lplgrad_jax import linear_probe

  n = len(images)
  extract = lambda: linear_probe.frozen_features(learner.classifier, images, (mean, std), n)
  first, seconds = measure.time_call(extract, _REPEATS.value, jax.block_until_ready)
  report["linear_features"] = measure.rate_entry(n, seconds, first)
  features = np.tile(extract(), (_QUERY_CHUNKS.value, 1))
  probe = linear_probe.probe_of(learner).classifier
  run = measure.make_query(probe, features, mean, std, method="fast", chunk_size=n)
  first, seconds = measure.time_call(run, _REPEATS.value, jax.block_until_ready)
  report["linear_query_fast"] = entry = measure.rate_entry(len(features), seconds, first)
  entry[f"seconds_for_{SUBSET}"] = SUBSET / entry["images_per_s"]


def _streamed_report(report, model, images, mean, std):
  """The fast query of the same R read from a memory-mapped pool (stream mode: `Rows`, chunks
  read ahead on a host thread), page cache warm, against R in memory, interleaved."""
  import tempfile

  import numpy as np

  from lplgrad_jax.data.rows import Rows

  chunks = np.tile(images, (_QUERY_CHUNKS.value, 1, 1, 1))
  ids = np.random.default_rng(0).permutation(len(chunks))  # R: scattered over the pool
  with tempfile.TemporaryDirectory() as folder:
    path = os.path.join(folder, "train_images.npy")
    np.save(path, chunks)
    pool = np.load(path, mmap_mode="r")
    np.asarray(pool).sum()  # the page cache warm, as the issue measures
    calls = {
      "in_memory": (
        measure.make_query(model, chunks[ids], mean, std, method="fast", chunk_size=len(images)),
        (),
      ),
      "streamed": (
        measure.make_query(
          model, Rows(pool, ids), mean, std, method="fast", chunk_size=len(images)
        ),
        (),
      ),
    }
    milliseconds = measure.interleaved_median_ms(calls, max(3, _REPEATS.value))
  rates = {name: 1000 * len(ids) / ms for name, ms in milliseconds.items()}
  report["query_fast_streamed"] = {
    "images_per_s": rates["streamed"],
    "in_memory_images_per_s": rates["in_memory"],
    "streamed_vs_in_memory": rates["streamed"] / rates["in_memory"],
  }


def _torch_report(report, images, labels, mean, std):
  ref = measure.TorchReference(_WIDTH.value, images, labels, mean, std)
  report["torch_version"] = ref.describe()["version"]
  names = {"forward_backward": "torch_forward_backward", "train_eager": "torch_train_step"}
  for name, _, count, build, repeats in ref.cases(_REPEATS.value):
    first, seconds = measure.time_call(build(), repeats, ref.sync)
    entry = measure.rate_entry(count, seconds, first)
    report[names.get(name, f"torch_query_{name}")] = entry
    if name in ("per_sample_loop", "func_vmap"):
      entry[f"seconds_for_{SUBSET}"] = SUBSET / entry["images_per_s"]
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
    "stem": _STEM.value,
    "bn_variance": _BN_VARIANCE.value,
  }
  _jax_report(report, n, images, labels, mean, std)
  if _TORCH.value:
    _torch_report(report, images, labels, mean, std)
  print(json.dumps(report, indent=1))
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(report, f, indent=1, allow_nan=False)


if __name__ == "__main__":
  app.run(main)
