"""The measuring that bench.py, bf16_error.py and accelerator_check.py share (no flags here).

`time_call` times a thunk (first call, compile included, then the mean of `repeats`);
`timed_entry` adds the rate, compile seconds and peak device memory. The `make_*` functions
build the thunks: the query's floor (a batched forward+backward), the query as a campaign
calls it, a training step, an epoch, a checkpoint save. `TorchReference` builds the PyTorch
reference's (torch_reference.py) on the same images; `score_error` compares bf16 query scores
with fp32 ones. `kernel_gradient` and `kernel_rule` give one convolution's batch weight gradient
and pergrad's per-example factored one, which query_profile.py, norm_forms.py and train_gap.py
time; `write_result` writes a result's JSON and markdown.
"""

import time


def time_call(fn, repeats, sync):
  """(first call seconds, compile included; mean seconds of the next `repeats` calls)."""
  start = time.perf_counter()
  sync(fn())
  first = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(repeats):
    sync(fn())
  return first, (time.perf_counter() - start) / repeats


def interleaved_median_ms(calls: dict, rounds: int) -> dict:
  """{name: median milliseconds} of `calls` ({name: (fn, args)}): each called once first (compile,
  warm-up), then once per round in turn, so that on a machine whose speed drifts between minutes
  every program meets the same minutes. Results are waited for (`jax.block_until_ready`; values
  that are not JAX arrays pass through)."""
  import jax
  import numpy as np

  times = {name: [] for name in calls}
  for fn, args in calls.values():
    jax.block_until_ready(fn(*args))
  for _ in range(rounds):
    for name, (fn, args) in calls.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - start)
  return {name: 1e3 * float(np.median(t)) for name, t in times.items()}


def kernel_gradient(x, kernel, g, stride: int = 1, padding="SAME"):
  """XLA's gradient of an NHWC convolution's HWIO `kernel`, from its input `x` and output
  gradient `g`, summed over the batch: what a plain backward pass forms per layer."""
  import jax

  conv = lambda k: jax.lax.conv_general_dilated(
    x, k, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  return jax.vjp(conv, kernel)[1](g)[0]


def kernel_rule(conv, x, g):
  """pergrad's layer rule for the nnx.Conv `conv` on one example (`x`, `g` without a batch
  axis): its kernel's factored per-example gradient (`ghost_norm.Outer`)."""
  from flax import nnx

  from lplgrad_jax.pergrad import layer_rules

  return layer_rules.closed_form(conv, nnx.Conv.__call__, (x[None],), {}, g[None])["kernel"]


def in_steps(fn, k: int):
  """(x, g) -> fn over the examples k at a time, as pergrad runs on the CPU."""
  from lplgrad_jax import pergrad

  return lambda x, g: pergrad.map_in_steps(lambda pair: fn(*pair), (x, g), k)


def write_result(out: str, result: dict, text: str) -> None:
  """`result` as strict JSON at `out`, `text` (its markdown) beside it."""
  import json
  import os

  with open(out, "w") as f:
    json.dump(result, f, indent=1, allow_nan=False)
  with open(os.path.splitext(out)[0] + ".md", "w") as f:
    f.write(text)


def median_ms(fn, *args, rounds: int) -> float:
  """The median milliseconds of `rounds` calls of `fn(*args)`, after one call."""
  return interleaved_median_ms({"": (fn, args)}, rounds)[""]


def rate_entry(images, seconds, first):
  return {"images_per_s": images / seconds, "compile_s": max(first - seconds, 0.0)}


def timed_entry(fn, images, repeats, sync=None, memory=None):
  """`fn` timed (`time_call`, `sync` default jax.block_until_ready) over `images` per call:
  `rate_entry` with the seconds and the first call's; then the peak device bytes (`memory`,
  default `device_peak_bytes`) and `peak_raised`, whether the measurement raised it (JAX has
  no reset of its peak: if not, this one's own peak is at most that)."""
  import jax

  memory, sync = memory or device_peak_bytes, sync or jax.block_until_ready
  before = memory()
  first, seconds = time_call(fn, repeats, sync)
  entry = rate_entry(images, seconds, first)
  entry.update(images=images, seconds=seconds, first_call_s=first)
  if (after := memory()) is not None:
    entry.update(peak_bytes=after, peak_raised=before is None or after > before)
  return entry


def device_peak_bytes():
  """The largest peak of bytes in use over JAX's local devices, or None where not reported."""
  import jax

  stats = [d.memory_stats() if hasattr(d, "memory_stats") else None for d in jax.local_devices()]
  if not all(s and "peak_bytes_in_use" in s for s in stats):
    return None
  return max(int(s["peak_bytes_in_use"]) for s in stats)


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


def make_checkpoint_save(learner, train_config, directory, mesh=None):
  """A thunk: `Checkpointer.save` of `learner`'s training state into `directory`, waited for
  until written (a campaign's saves are asynchronous: this is what one costs at most);
  `thunk.close()` closes the checkpointer."""
  from lplgrad_jax import sharding
  from lplgrad_jax.checkpoint import Checkpointer

  mesh = mesh if mesh is not None else sharding.data_mesh()
  _, _, holder = _state_holder(learner, train_config, train_config.batch_size, mesh)
  checkpointer = Checkpointer(directory, keep=2)

  def run():
    step = checkpointer.save(holder["state"], {"round": 0})
    checkpointer.manager.wait_until_finished()
    return step

  run.close = checkpointer.close
  return run


def torch_inputs(images, labels, mean, std, device):
  """(x, y) for the PyTorch reference: normalised NCHW float32 and int64 on `device`."""
  import torch

  x = torch.as_tensor(
    ((images / 255.0 - mean) / std).transpose(0, 3, 1, 2).copy(), dtype=torch.float32, device=device
  )
  return x, torch.as_tensor(labels, dtype=torch.long, device=device)


class TorchReference:
  """The PyTorch ResNet-18 and loss head (torch_reference.py) of `width` on the device torch
  sees, fed the same images: `cases()` to time with `sync`."""

  def __init__(self, width, images, labels, mean, std):
    import torch
    import torch_reference as ref

    self.torch, self.ref = torch, ref
    self.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = self.device == "cuda"
    self.sync = (lambda _: torch.cuda.synchronize()) if cuda else (lambda _: None)
    torch.manual_seed(0)
    self.x, self.y = torch_inputs(images, labels, mean, std, self.device)
    self.model = ref.ResNet18(10, width).to(self.device)
    self.loss_net = ref.LossNet([width * 2**i for i in range(4)]).to(self.device)

  def describe(self):
    return {
      "version": self.torch.__version__,
      "device": self.device,
      "cudnn_allow_tf32": bool(self.torch.backends.cudnn.allow_tf32),
      "matmul_allow_tf32": bool(self.torch.backends.cuda.matmul.allow_tf32),
    }

  def peak_bytes(self):
    """The device's peak allocated bytes since the newest thunk was built (None on a CPU)."""
    return int(self.torch.cuda.max_memory_allocated()) if self.device == "cuda" else None

  def cases(self, repeats, loop_images=None, dtypes=("float32",), compiled=False):
    """(name, dtype, images, thunk builder, repeats) of what the reference computes: the floor
    ("forward_backward", BatchNorm in inference mode), the authors' query ("per_sample_loop",
    over the first `loop_images`), "func_vmap", then "train_eager" in each of `dtypes` (bf16:
    autocast); with `compiled`, only the torch.compile'd steps ("train_compiled")."""
    n, few = len(self.x), loop_images or len(self.x)
    query = [
      ("forward_backward", "float32", n, lambda: self._query("forward_backward", n), repeats),
      ("per_sample_loop", "float32", few, lambda: self._query("per_sample_loop", few), 1),
      ("func_vmap", "float32", n, lambda: self._query("func_vmap", n), 1),
    ]
    train = [
      (
        "train_compiled" if compiled else "train_eager",
        dtype,
        n,
        lambda dtype=dtype: self._train_step(dtype, compiled),
        repeats,
      )
      for dtype in dtypes
    ]
    return train if compiled else query + train

  def _query(self, name, images):
    self._reset_peak()
    self.model.eval()
    fn, x = getattr(self.ref, name), self.x[:images]
    return lambda: fn(self.model, x)

  def _train_step(self, dtype, compiled):
    self._reset_peak()
    self.model.train()
    torch, compile_ = self.torch, self.torch.compile if compiled else (lambda m: m)
    step = self.ref.make_trainer(compile_(self.model), compile_(self.loss_net))
    if dtype == "float32":
      return lambda: step(self.x, self.y)

    def autocast():
      with torch.autocast(device_type=self.device, dtype=getattr(torch, dtype)):
        step(self.x, self.y)

    return autocast

  def _reset_peak(self):
    if self.device == "cuda":
      self.torch.cuda.reset_peak_memory_stats()


def compare_scores(fp32, bf16, k: int) -> dict:
  """How far bf16 scores are from fp32 ones: relative errors, Spearman, top-k agreement."""
  import numpy as np
  from scipy import stats

  fp32, bf16 = np.asarray(fp32, np.float64), np.asarray(bf16, np.float64)
  relative = np.abs(bf16 - fp32) / np.maximum(np.abs(fp32), np.finfo(np.float32).tiny)
  k = min(k, len(fp32))
  top = lambda s: set(np.argsort(-s, kind="stable")[:k].tolist())
  return {
    "relative_error_median": float(np.median(relative)),
    "relative_error_p99": float(np.quantile(relative, 0.99)),
    "relative_error_max": float(relative.max()),
    "spearman": float(stats.spearmanr(fp32, bf16).statistic),
    "top_k": k,
    "top_k_overlap": len(top(fp32) & top(bf16)) / k,
  }


def score_error(model, pool, query_config, k: int) -> dict:
  """Scores `pool` with a checkpoint's classifier (`predict.load_model`) in float32 and in
  bfloat16; compares them."""
  from lplgrad_jax import query

  scores = {
    dtype: query.entropy_grad_norms(
      model.learner.classifier,
      pool,
      reduction=query_config.reduction,
      chunk_size=query_config.chunk_size,
      normalization=model.normalization,
      compute_dtype=dtype,
    )
    for dtype in ("float32", "bfloat16")
  }
  return {"images": len(pool), **compare_scores(scores["float32"], scores["bfloat16"], k)}
