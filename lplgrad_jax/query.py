"""Query scorers: per-image scores and selections computed from the current models.

`model_outputs` runs the learner in inference mode once over images and
returns what the uncertainty, loss-prediction and diversity strategies read:
logits, the pooled penultimate features and the predicted losses.
`k_center_greedy` (Coreset) and `kmeans_plus_plus` (BADGE) select on the
device with batched distance updates.

`entropy_grad_norms` is LPLgrad's score: the entropy H of softmax(main model)
is treated as a loss and each image is scored by the norm of dH/dw over all
main-model parameters, BatchNorm in inference mode (so each image's score
depends on that image alone). Two exact reductions over the parameter tensors
(one tensor per conv kernel, BatchNorm scale, BatchNorm bias, dense kernel,
dense bias, as in the PyTorch model):
  "layer_sum"  sum over tensors of each tensor's L2 norm (the authors' code)
  "frobenius"  the global L2 norm over all parameters (the paper's eq. 8)
and two exact methods: "fast" (`_fast_squared_norms`: per-layer norms from one
batched backward pass) and "vmap" (`_vmap_squared_norms`: the reference). The compiled
scorer returns each image's squared tensor norms; the reduction is host arithmetic
(`pergrad.reduce` in float64), so one compiled scorer serves both.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec

from lplgrad_jax import models
from lplgrad_jax import pergrad
from lplgrad_jax import sharding
from lplgrad_jax.chunks import SplitRows
from lplgrad_jax.chunks import array_like
from lplgrad_jax.chunks import map_chunks
from lplgrad_jax.data.rows import Rows
from lplgrad_jax.errors import check_choice
from lplgrad_jax.train import normalize

REDUCTIONS = ("layer_sum", "frobenius")
METHODS = ("fast", "vmap")


def entropy(logits: jax.Array) -> jax.Array:
  """Predictive entropy of softmax(logits) along the last axis."""
  log_p = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)


def margin(logits: jax.Array) -> jax.Array:
  """Top-1 minus top-2 probability (small = uncertain)."""
  top2 = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), 2)[0]
  return top2[..., 0] - top2[..., 1]


def max_probability(logits: jax.Array) -> jax.Array:
  return jnp.max(jax.nn.softmax(logits, axis=-1), axis=-1)


def _outputs_batch(graphdef, params, rest, images_uint8, mean, std):
  learner = nnx.merge(graphdef, params, rest)
  logits, features = learner.classifier(normalize(images_uint8, mean, std))
  embedding = models.pool_feature(features[-1])
  predicted_loss = (
    learner.loss_head(features) if learner.loss_head is not None else jnp.zeros(logits.shape[:1])
  )
  return logits, embedding, predicted_loss


_outputs_on_host_chunks = jax.jit(_outputs_batch, static_argnames="graphdef")


@functools.lru_cache(maxsize=16)
def _outputs_on_split_chunks(mesh):
  """`_outputs_batch` of a chunk split over `mesh`, its outputs on every device (and process)."""
  return jax.jit(
    _outputs_batch, static_argnames="graphdef", out_shardings=sharding.replicated(mesh)
  )


def model_outputs(
  learner: nnx.Module, images: np.ndarray | Rows | SplitRows, normalization, batch_size: int
) -> dict[str, np.ndarray]:
  """Inference-mode logits, penultimate `embedding` and `predicted_loss` of uint8 images.

  A host array (or `Rows`) goes to the devices whole, a chunk at a time; `SplitRows`, split
  over their mesh, each process reading its own rows."""
  graphdef, params, rest = _split_for_inference(learner)
  mean, std = (np.asarray(a, np.float32) for a in normalization)
  if isinstance(images, SplitRows):
    params, rest = sharding.replicate((params, rest), images.mesh)
    outputs_of = _outputs_on_split_chunks(images.mesh)
  else:
    outputs_of = _outputs_on_host_chunks
  outputs = map_chunks(
    lambda chunk: outputs_of(graphdef, params, rest, chunk, mean, std), images, batch_size
  )
  return dict(zip(("logits", "embedding", "predicted_loss"), outputs))


def evaluate(learner: nnx.Module, dataset, normalization, batch_size: int, mesh=None) -> dict:
  """Test accuracy and per-class accuracy (0 for a class without test images).

  Both are None without a test split (a human-labeled folder without test/). `mesh`: the
  test set is split over its devices, each process reading only its share (data.shard_pool).
  """
  if not len(dataset.y_test):
    return {"accuracy": None, "per_class_accuracy": None}
  images = dataset.x_test if mesh is None else SplitRows.of_whole(dataset.x_test, mesh)
  logits = model_outputs(learner, images, normalization, batch_size)["logits"]
  correct = np.argmax(logits, -1) == dataset.y_test
  per_class = [
    float(correct[dataset.y_test == c].mean()) if np.any(dataset.y_test == c) else 0.0
    for c in range(dataset.num_classes)
  ]
  return {"accuracy": float(correct.mean()), "per_class_accuracy": per_class}


def _squared_distances(x: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.maximum(jnp.sum(x * x, 1)[:, None] + jnp.sum(y * y, 1)[None, :] - 2 * x @ y.T, 0.0)


@functools.partial(jax.jit, static_argnames=("k", "center_chunk"))
def k_center_greedy(candidates: jax.Array, centers: jax.Array, k: int, center_chunk: int = 1024):
  """Sener & Savarese's greedy k-center: repeatedly take the candidate farthest from all centers.

  Returns (indices of the k picks in order, covering radius before each pick).
  Distances to the existing centers are reduced in chunks of `center_chunk`
  centers, so memory is O(candidates x center_chunk).
  """
  n = candidates.shape[0]
  pad = (-centers.shape[0]) % center_chunk
  padded = jnp.concatenate([centers, jnp.zeros((pad, centers.shape[1]), centers.dtype)])
  valid = jnp.arange(padded.shape[0]) < centers.shape[0]

  def reduce_chunk(min_d, chunk):
    block, block_valid = chunk
    d = jnp.where(block_valid[None, :], _squared_distances(candidates, block), jnp.inf)
    return jnp.minimum(min_d, jnp.min(d, axis=1)), None

  min_d, _ = jax.lax.scan(
    reduce_chunk,
    jnp.full((n,), jnp.inf),
    (padded.reshape(-1, center_chunk, centers.shape[1]), valid.reshape(-1, center_chunk)),
  )

  def pick(i, carry):
    min_d, picks, radii = carry
    j = jnp.argmax(min_d)
    radii = radii.at[i].set(jnp.sqrt(min_d[j]))
    d = _squared_distances(candidates, candidates[j][None])[:, 0]
    return jnp.minimum(min_d, d).at[j].set(-1.0), picks.at[i].set(j), radii

  _, picks, radii = jax.lax.fori_loop(
    0, k, pick, (min_d, jnp.zeros((k,), jnp.int32), jnp.zeros((k,)))
  )
  return picks, radii


@functools.partial(jax.jit, static_argnames=("k",))
def kmeans_plus_plus(key: jax.Array, scale: jax.Array, features: jax.Array, k: int):
  """k-means++ seeding on BADGE's gradient embeddings g_i = scale_i (outer) features_i.

  `scale` (N, C) is p - onehot(argmax p); the (N, C*D) embeddings are never
  built: ||g_i - g_j||^2 = |s_i|^2 |f_i|^2 + |s_j|^2 |f_j|^2 - 2 (s_i.s_j)(f_i.f_j).
  The first center is the largest embedding, as in BADGE; then D^2 sampling.
  """
  norms = jnp.sum(scale * scale, 1) * jnp.sum(features * features, 1)

  def distances_to(j):
    return jnp.maximum(norms + norms[j] - 2 * (scale @ scale[j]) * (features @ features[j]), 0.0)

  first = jnp.argmax(norms)

  def pick(i, carry):
    min_d, picks = carry
    weights = jnp.where(min_d > 0, min_d, 0.0)
    # All remaining points coincide with centers: fall back to uniform over the unpicked.
    weights = jnp.where(jnp.sum(weights) > 0, weights, (min_d >= 0).astype(weights.dtype))
    j = jax.random.choice(jax.random.fold_in(key, i), min_d.shape[0], p=weights / jnp.sum(weights))
    return jnp.minimum(min_d, distances_to(j)).at[j].set(-1.0), picks.at[i].set(j)

  min_d = distances_to(first).at[first].set(-1.0)
  _, picks = jax.lax.fori_loop(1, k, pick, (min_d, jnp.zeros((k,), jnp.int32).at[0].set(first)))
  return picks


def logits_of(outputs) -> jax.Array:
  """The logits of a model's output: the output itself or its first element."""
  return outputs[0] if isinstance(outputs, (tuple, list)) else outputs


def output_entropy(outputs) -> jax.Array:
  return entropy(logits_of(outputs).astype(jnp.float32))


def _fast_squared_norms(graphdef, params, rest, images, mean, std):
  """(N, K) exact per-example squared tensor norms from one batched backward pass (`pergrad`)."""
  images = normalize(images, mean, std)
  return pergrad.squared_norms(graphdef, params, rest, images, output_entropy)


def _image_entropy(params, graphdef, rest, image):
  model = nnx.merge(graphdef, params, rest)
  return output_entropy(model(image[None]))[0]


def _vmap_squared_norms(graphdef, params, rest, images, mean, std):
  images = normalize(images, mean, std)
  grads = jax.vmap(jax.grad(_image_entropy), in_axes=(None, None, None, 0))(
    params, graphdef, rest, images
  )
  squared = [jnp.sum(jnp.square(g.reshape(g.shape[0], -1)), axis=1) for g in jax.tree.leaves(grads)]
  return jnp.stack(squared, axis=1)


_SCORERS = {"fast": _fast_squared_norms, "vmap": _vmap_squared_norms}


@functools.lru_cache(maxsize=16)
def _chunk_scorer(graphdef, method: str, mesh):
  """The compiled (N, K) squared tensor norms of one chunk, split evenly over the mesh's devices.

  Cached per model structure: the jitted function then takes arrays alone, so
  a chunk's dispatch does not hash the graphdef (milliseconds for a ResNet).
  """

  def score_shard(params, rest, images, mean, std):
    return _SCORERS[method](graphdef, params, rest, images, mean, std)

  replicated, split = PartitionSpec(), PartitionSpec(sharding.DATA_AXIS)
  # check_vma=False: differentiating w.r.t. the replicated parameters must give each
  # device its own examples' gradients; with VMA checks JAX would sum them over devices.
  # Scores leave replicated: every process (of a multi-host run) reads all of them.
  return jax.jit(
    jax.shard_map(
      score_shard,
      mesh=mesh,
      in_specs=(replicated, replicated, split, replicated, replicated),
      out_specs=split,
      check_vma=False,
    ),
    out_shardings=sharding.replicated(mesh),
  )


def _split_for_inference(model: nnx.Module, compute_dtype: str = "float32"):
  """(graphdef, params, rest) of `model` with BatchNorm in inference mode."""
  view = pergrad.inference_view(model)
  return nnx.split(models.with_compute_dtype(view, compute_dtype), nnx.Param, ...)


def entropy_grad_norms(
  model: nnx.Module,
  images,
  *,
  reduction: str = "layer_sum",
  method: str = "fast",
  chunk_size: int = 64,
  normalization=None,
  progress: bool = False,
  mesh=None,
  compute_dtype: str = "float32",
) -> np.ndarray:
  """One score per image: ||d entropy(softmax(model(x))) / d params||.

  Args:
    model: the main model (`logits, features = model(x)`); it is not changed.
    images: (N, H, W, 3) float32 inputs, or uint8 with `normalization` (also as `Rows` of a
      memory-mapped pool, or `SplitRows` of a pool split over processes, scored on their mesh).
    reduction: "layer_sum" or "frobenius" (see module docstring).
    method: "fast" (per-layer norms from one batched backward pass, see
      `_fast_squared_norms`) or "vmap" (`jax.vmap(jax.grad)`: the reference). Both are exact.
    chunk_size: images per compiled call, over all devices (rounded up to a
      multiple of their number); bounds memory.
    normalization: (mean, std) per channel for uint8 images.
    progress: show a progress bar over chunks.
    mesh: devices to split each chunk over (default: all, `sharding.data_mesh()`).
    compute_dtype: "float32", or "bfloat16" for the model's convolutions and
      the per-layer products (float32 sums; see docs/devices.md for its measured error).
  """
  check_choice(reduction, REDUCTIONS, "gradient-norm reduction")
  check_choice(method, METHODS, "gradient-norm method")
  images = array_like(images)
  if images.dtype == np.uint8 and normalization is None:
    raise ValueError("uint8 images need normalization=(mean, std)")
  if not len(images):
    return np.zeros((0,), np.float32)
  mean, std = (
    (np.zeros(3, np.float32), np.ones(3, np.float32))
    if normalization is None
    else (np.asarray(normalization[0], np.float32), np.asarray(normalization[1], np.float32))
  )
  if isinstance(images, SplitRows):
    mesh = images.mesh
  elif mesh is None:
    mesh = sharding.data_mesh()
  graphdef, params, rest = _split_for_inference(model, compute_dtype)
  params, rest = sharding.replicate((params, rest), mesh)
  squared_norms = _chunk_scorer(graphdef, method, mesh)
  (squared,) = map_chunks(
    lambda chunk: (squared_norms(params, rest, chunk, mean, std),),
    images,
    chunk_size,
    mesh,
    "query" if progress else "",
  )
  # One compiled scorer for both reductions: they are host arithmetic, summed in float64.
  return pergrad.reduce(squared.astype(np.float64), reduction).astype(np.float32)
