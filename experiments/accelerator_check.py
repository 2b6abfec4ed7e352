"""One prepared accelerator check: everything this project claims about speed, in one command.

  python experiments/accelerator_check.py [--out=experiments/results] [--budget_s=420]
  python experiments/accelerator_check.py --smoke [--out=DIR]   # tiny sizes on the CPU

Writes `accelerator_<device kind>.md` and `.json` (strict JSON) in --out:
  header    device kind and count, driver (nvidia-smi), JAX/jaxlib/Flax versions, XLA flags
  query     the fwd+bwd floor, the "fast" and "vmap" scorers, fp32 and bf16, per chunk size:
            images/s, seconds for R = 25,000 (measured end to end for "fast"), ratio to the
            floor, compile seconds, peak device memory
  train     the joint step (fp32, bf16; batch 128 and a larger one), host vs scan epoch
            loop over a real epoch of a labeled set, compile seconds
  torch     the PyTorch reference on the same device (the authors' per-image loop,
            torch.func vmap(grad), eager and torch.compile'd train steps), if torch is there
  campaign  a short real campaign (`lplgrad_jax.campaign.run`) with per-phase seconds, and
            the bf16 error of query scores on its trained model
  targets   the issue's targets marked met / not met; the whole CIFAR-10 high-budget
            campaign extrapolated from the measured rates; recommendations derived from them
Measurements run in priority order under a time budget (--budget_s, counted from the
start of the process): what no longer fits is skipped and listed, never cut short.
The real mode refuses to run on a machine whose JAX sees only CPUs, unless --force.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

_START = time.perf_counter()
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
sys.path.insert(0, os.path.join(REPO_ROOT, "experiments"))

SUBSET = 25_000  # the paper's R for CIFAR
CARRIED_DATA = os.path.join(REPO_ROOT, ".wheels", "data", "cifar10_subset.npz")


@dataclasses.dataclass
class Sizes:
  """What one mode measures. The real mode fills an H100-class GPU; the smoke mode only
  walks every code path on a CPU in seconds."""

  width: int = 64
  chunks: tuple = (256, 1024, 4096)
  main_chunk: int = 1024  # the chunk of the core (first) measurements
  vmap_chunks: tuple = (256, 1024)
  batches: tuple = (128, 1024)
  dtypes: tuple = ("float32", "bfloat16")
  loops: tuple = ("host", "scan")
  subset: int = SUBSET
  # The labeled set of the timed epochs: the campaign's last (rounds x query), so that the
  # train step, the host epoch and the campaign share one compilation (same buffer sizes).
  epoch_images: int = 3000
  torch_images: int = 128  # the PyTorch query's batch
  repeats: int = 3
  campaign_rounds: int = 3
  campaign_epochs: int = 3
  campaign_query: int = 1000
  campaign_subset: int = 2500
  torch_compile: bool = True
  full_dtypes: bool = True  # False: only the fast scorer in every dtype, the rest in the first


# Each compile costs seconds on a CPU: the smoke sizes let the epoch and the campaign reuse
# the train step's compilation (one steps_per_epoch, the same pool) and the campaign's query
# and bf16 check reuse the fast scorer's.
SMOKE = Sizes(
  width=4,
  chunks=(16,),
  main_chunk=16,
  vmap_chunks=(16,),
  batches=(16,),
  loops=("host",),
  subset=48,
  epoch_images=16,
  torch_images=4,
  repeats=1,
  campaign_rounds=2,
  campaign_epochs=1,
  campaign_query=8,
  campaign_subset=16,
  torch_compile=False,
  full_dtypes=False,
)


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU")
  parser.add_argument("--force", action="store_true", help="measure even without an accelerator")
  parser.add_argument(
    "--out",
    default=None,
    help="output folder (default experiments/results; --smoke: a temp folder)",
  )
  parser.add_argument(
    "--budget_s",
    type=float,
    default=None,
    help="seconds from start after which optional parts are skipped (default 420; --smoke 600)",
  )
  parser.add_argument(
    "--grace_s",
    type=float,
    default=45.0,
    help="after budget_s + grace_s a watchdog writes the report and exits 3",
  )
  parser.add_argument("--data", default=None, help="the CIFAR-10 subset .npz (real mode)")
  parser.add_argument("--width", type=int, default=None, help="ResNet-18 width (default 64)")
  parser.add_argument("--chunks", default=None, help="query chunk sizes, e.g. 256,1024,4096")
  parser.add_argument("--batches", default=None, help="training batches, e.g. 128,1024")
  parser.add_argument("--subset", type=int, default=None, help="R, the images a query scores")
  parser.add_argument("--epoch_images", type=int, default=None, help="labeled set of an epoch")
  parser.add_argument("--repeats", type=int, default=None, help="timed calls per measurement")
  parser.add_argument("--campaign_epochs", type=int, default=None, help="epochs per round")
  parser.add_argument(
    "--campaign_query",
    type=int,
    default=None,
    help="the campaign's initial and per-round labeled images",
  )
  parser.add_argument("--no_torch_compile", action="store_true", help="skip torch.compile")
  return parser.parse_args(argv)


def _positive(value, name):
  from lplgrad_jax.errors import ConfigError

  if value is not None and (value != value or value <= 0):
    raise ConfigError(f"--{name}={value}: expected a positive number")
  return value


def _int_list(text, name):
  from lplgrad_jax.errors import ConfigError

  try:
    values = tuple(int(v) for v in text.split(","))
  except ValueError:
    values = ()
  if not values or min(values) < 1:
    raise ConfigError(f"--{name}={text!r}: expected positive integers separated by commas")
  return values


def resolve_sizes(args) -> Sizes:
  """The mode's sizes with the command line's overrides (ConfigError on bad values)."""
  sizes = dataclasses.replace(SMOKE if args.smoke else Sizes())
  for name in ("width", "subset", "epoch_images", "repeats", "campaign_epochs", "campaign_query"):
    if getattr(args, name) is not None:
      setattr(sizes, name, int(_positive(getattr(args, name), name)))
  if args.epoch_images is None and args.campaign_query is not None:
    sizes.epoch_images = sizes.campaign_query * sizes.campaign_rounds  # keep the shared compile
  if args.chunks is not None:
    sizes.chunks = _int_list(args.chunks, "chunks")
    sizes.vmap_chunks = tuple(c for c in sizes.vmap_chunks if c in sizes.chunks) or sizes.chunks[:1]
    sizes.main_chunk = sizes.main_chunk if sizes.main_chunk in sizes.chunks else sizes.chunks[0]
  if args.batches is not None:
    sizes.batches = _int_list(args.batches, "batches")
  if args.no_torch_compile:
    sizes.torch_compile = False
  _positive(args.budget_s, "budget_s")
  _positive(args.grace_s, "grace_s")
  return sizes


class Clock:
  """The time budget, counted from the start of the process, and what it left out."""

  def __init__(self, budget_s: float):
    self.deadline = _START + budget_s
    self.skipped, self.failed = [], []
    self.slowest_first = 0.0  # the longest first call (compile included) so far

  def left(self) -> float:
    return self.deadline - time.perf_counter()

  def allow(self, name: str, need_s: float | None = None) -> bool:
    """Whether `name`, expected to take `need_s` (default: 1.5x the slowest first call so
    far), still fits; records it as skipped when not."""
    need = 1.5 * self.slowest_first if need_s is None else need_s
    if self.left() >= need:
      return True
    self.skipped.append(
      {
        "name": name,
        "reason": f"time budget: {max(self.left(), 0):.0f} s left, about {need:.0f} s needed",
      }
    )
    print(
      f"[{time.perf_counter() - _START:6.1f} s] {name} skipped: {self.skipped[-1]['reason']}",
      flush=True,
    )
    return False

  def fail(self, name: str, error: BaseException) -> None:
    text = " ".join(f"{type(error).__name__}: {error}".split())
    self.failed.append({"name": name, "error": text[:400]})
    print(f"[{time.perf_counter() - _START:6.1f} s] {name} FAILED: {text[:200]}", flush=True)


def device_peak_bytes():
  """The largest peak of bytes in use over the local devices, or None where not reported."""
  import jax

  peaks = []
  for device in jax.local_devices():
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats or "peak_bytes_in_use" not in stats:
      return None
    peaks.append(int(stats["peak_bytes_in_use"]))
  return max(peaks)


def measure(
  clock: Clock,
  name: str,
  build,
  images: int,
  repeats: int,
  sync,
  memory=None,
  need_s: float | None = None,
) -> dict | None:
  """Builds a thunk with `build()` and times it (`bench.time_call`); None if skipped or failed.

  `memory()` reads the peak device bytes. JAX has no reset of its peak, so the entry says
  whether this measurement raised it (`peak_raised`): if not, its own peak is at most that.
  """
  import bench

  if not clock.allow(name, need_s):
    return None
  memory = memory or device_peak_bytes
  before = memory()
  try:
    first, seconds = bench.time_call(build(), repeats, sync)
  except Exception as e:  # noqa: BLE001 - out of memory, a failed compile: recorded, not fatal
    clock.fail(name, e)
    return None
  clock.slowest_first = max(clock.slowest_first, first)
  entry = bench.rate_entry(images, seconds, first)
  entry.update(images=images, seconds=seconds, first_call_s=first)
  after = memory()
  if after is not None:
    entry.update(peak_bytes=after, peak_raised=before is None or after > before)
  print(
    f"[{time.perf_counter() - _START:6.1f} s] {name}: {entry['images_per_s']:,.0f} img/s, "
    f"first call {first:.1f} s",
    flush=True,
  )
  return entry


def nvidia_smi():
  """(driver version, GPU names) from nvidia-smi, or (None, None) where it is absent."""
  try:
    out = subprocess.run(
      ["nvidia-smi", "--query-gpu=driver_version,name,memory.total", "--format=csv,noheader"],
      capture_output=True,
      text=True,
      timeout=20,
    )
  except (OSError, subprocess.SubprocessError):
    return None, None
  rows = [[c.strip() for c in line.split(",")] for line in out.stdout.splitlines() if line.strip()]
  if out.returncode or not rows:
    return None, None
  return rows[0][0], [f"{r[1]} ({r[2]})" for r in rows if len(r) >= 3]


def header(mode: str, sizes: Sizes, budget_s: float, startup_s: float) -> dict:
  import flax
  import jax
  import jaxlib
  import numpy as np

  driver, gpus = nvidia_smi()
  devices = jax.devices()
  versions = {
    "python": platform.python_version(),
    "jax": jax.__version__,
    "jaxlib": jaxlib.__version__,
    "flax": flax.__version__,
    "numpy": np.__version__,
  }
  for name in ("optax", "orbax.checkpoint", "torch"):
    try:
      versions[name] = __import__(name, fromlist=["_"]).__version__
    except Exception:  # noqa: BLE001 - absent or broken: reported as absent
      versions[name] = None
  from lplgrad_jax.configs import default

  defaults = default.get_config()
  return {
    "mode": mode,
    "platform": devices[0].platform,
    "device_kind": devices[0].device_kind,
    "defaults": {
      "query.chunk_size": defaults.query.chunk_size,
      "train.epoch_loop": defaults.train.epoch_loop,
      "train.compute_dtype": defaults.train.compute_dtype,
      "query.compute_dtype": defaults.query.compute_dtype,
    },
    "device_count": len(devices),
    "process_count": jax.process_count(),
    "driver": driver,
    "nvidia_smi_gpus": gpus,
    "versions": versions,
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "env": {
      k: v
      for k, v in sorted(os.environ.items())
      if k.startswith(("XLA_PYTHON_CLIENT", "JAX_", "TF_GPU", "CUDA_VISIBLE"))
    },
    "jax_default_matmul_precision": str(getattr(jax.config, "jax_default_matmul_precision", None)),
    "budget_s": budget_s,
    "startup_s": startup_s,
    "sizes": dataclasses.asdict(sizes),
  }


def slug(head: dict) -> str:
  kind = "".join(c if c.isalnum() else "_" for c in head["device_kind"].lower()).strip("_")
  kind = "_".join(p for p in kind.split("_") if p) or head["platform"]
  return kind + (f"_x{head['device_count']}" if head["device_count"] > 1 else "")


def load_pool(args, smoke: bool, clock):
  """(config, dataset, whether to run the campaign): the CIFAR-10 subset, or tiny digits
  (smoke). Without the subset (and no --data), random images stand in and the campaign is
  skipped."""
  import numpy as np

  from lplgrad_jax import data
  from lplgrad_jax.errors import ConfigError

  if smoke:
    from lplgrad_jax.configs import digits

    config = digits.get_config()
    config.data.image_size = 8
    return config, data.load_dataset(config.data), True
  from lplgrad_jax.configs import cifar10_subset

  config = cifar10_subset.get_config()
  if args.data and not os.path.isfile(args.data):
    raise ConfigError(f"--data={args.data} does not exist: expected the CIFAR-10 subset .npz")
  found = [p for p in (args.data, config.data.root, CARRIED_DATA) if p and os.path.isfile(p)]
  if found:
    config.data.root = found[0]
    return config, data.load_dataset(config.data), True
  clock.skipped.append(
    {
      "name": "campaign",
      "reason": f"no CIFAR-10 subset at "
      f"{config.data.root} nor {CARRIED_DATA} (make wheels copies it): random "
      "images stand in for the measurements",
    }
  )
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (5085, 32, 32, 3), dtype=np.uint8)
  y = rng.integers(0, 10, 5085).astype(np.int32)
  return config, data.Dataset("random", x, y, x[:1000], y[:1000], config.data.class_names), False


def query_section(clock, sizes, model, images, mean, std, mesh, priority):
  """Rows of the query table, measured in `priority` order (0: core, 1: the rest)."""
  import bench
  import jax
  import numpy as np

  sync = jax.block_until_ready
  rows = []
  subset = np.resize(images, (sizes.subset,) + images.shape[1:])  # real images, repeated
  for dtype in sizes.dtypes:
    for chunk in sizes.chunks:
      if (chunk == sizes.main_chunk) != (priority == 0):
        continue
      batch = np.resize(images, (chunk,) + images.shape[1:])
      floor = (
        None
        if dtype not in _dtypes(sizes)
        else measure(
          clock,
          f"query floor {dtype} chunk {chunk}",
          lambda: bench.make_floor(model, batch, mean, std, dtype, mesh),
          chunk,
          sizes.repeats,
          sync,
        )
      )
      fast = measure(
        clock,
        f"query fast {dtype} chunk {chunk}",
        lambda: bench.make_query(
          model, subset, mean, std, method="fast", chunk_size=chunk, dtype=dtype, mesh=mesh
        ),
        sizes.subset,
        max(1, sizes.repeats - 1),
        sync,
      )
      rows += [
        _query_row("floor", dtype, chunk, floor, sizes.subset, measured_r=False),
        _query_row("fast", dtype, chunk, fast, sizes.subset, measured_r=True),
      ]
  for dtype in _dtypes(sizes):
    for chunk in sizes.vmap_chunks:
      core = dtype == sizes.dtypes[0] and chunk == sizes.vmap_chunks[0]
      if core != (priority == 0):
        continue
      if not _vmap_fits(clock, model, chunk, f"query vmap {dtype} chunk {chunk}"):
        continue
      timed = np.resize(images, (2 * chunk,) + images.shape[1:])
      vmap = measure(
        clock,
        f"query vmap {dtype} chunk {chunk}",
        lambda: bench.make_query(
          model, timed, mean, std, method="vmap", chunk_size=chunk, dtype=dtype, mesh=mesh
        ),
        len(timed),
        1,
        sync,
      )
      rows.append(_query_row("vmap", dtype, chunk, vmap, sizes.subset, measured_r=False))
  return [r for r in rows if r is not None]


def _query_row(kind, dtype, chunk, entry, subset, measured_r):
  if entry is None:
    return None
  seconds_for_r = entry["seconds"] if measured_r else subset / entry["images_per_s"]
  return {
    "kind": kind,
    "dtype": dtype,
    "chunk": chunk,
    "seconds_for_R": seconds_for_r,
    "R": subset,
    "R_measured": measured_r,
    **entry,
  }


def _vmap_fits(clock, model, chunk, name) -> bool:
  """vmap(grad) holds one gradient per image: skip chunks whose gradients would not fit."""
  import jax
  from flax import nnx

  params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  need = 4 * params * chunk / jax.device_count()
  stats = jax.devices()[0].memory_stats() or {}
  limit = stats.get("bytes_limit")
  if limit and need > 0.6 * limit:
    clock.skipped.append(
      {
        "name": name,
        "reason": f"per-image gradients need {need / 2**30:.0f} "
        f"GiB per device of {limit / 2**30:.0f}",
      }
    )
    return False
  return True


def step_section(clock, sizes, learner, train_config, pool, mean, std, mesh, priority):
  """Rows of training steps: batch 128 (the paper's) first (priority 0), larger ones later."""
  import bench
  import jax

  steps = []
  for dtype in _dtypes(sizes):
    for batch in sizes.batches:
      if (batch == sizes.batches[0]) != (priority == 0):
        continue
      config = _train_config(train_config, batch, dtype, "host")
      labeled = sizes.epoch_images if batch == sizes.batches[0] else batch
      entry = measure(
        clock,
        f"train step {dtype} batch {batch}",
        lambda: bench.make_train_step(learner, config, pool, mean, std, mesh, labeled),
        batch,
        sizes.repeats,
        jax.block_until_ready,
      )
      if entry is not None:
        steps.append({"dtype": dtype, "batch": batch, **entry})
  return steps


def epoch_section(clock, sizes, learner, train_config, pool, mean, std, mesh, priority):
  """Rows of whole epochs, host vs scan loop: the last dtype (bf16, the candidate
  accelerator default) first (priority 0), the others later."""
  import bench
  import jax

  epochs, loop_dtypes = [], _dtypes(sizes)[::-1]
  for dtype in loop_dtypes:
    if (dtype == loop_dtypes[0]) != (priority == 0):
      continue
    for loop in sizes.loops:
      config = _train_config(train_config, sizes.batches[0], dtype, loop)
      entry = measure(
        clock,
        f"train epoch {loop} {dtype}",
        lambda: bench.make_epoch(learner, config, pool, sizes.epoch_images, mean, std, mesh),
        sizes.epoch_images,
        max(1, sizes.repeats - 1),
        jax.block_until_ready,
      )
      if entry is not None:
        epochs.append(
          {
            "loop": loop,
            "dtype": dtype,
            "batch": sizes.batches[0],
            "num_labeled": sizes.epoch_images,
            "steps": -(-sizes.epoch_images // sizes.batches[0]),
            **entry,
          }
        )
  return epochs


def _dtypes(sizes):
  return sizes.dtypes if sizes.full_dtypes else sizes.dtypes[:1]


def _train_config(train_config, batch, dtype, loop):
  config = train_config.copy_and_resolve_references()
  config.batch_size, config.compute_dtype, config.epoch_loop = batch, dtype, loop
  return config


def torch_section(clock, sizes, images, labels, mean, std, priority):
  """The PyTorch reference on the device torch sees; skipped with a note without torch."""
  try:
    import torch
  except ImportError:
    return {"available": False, "note": "torch is not installed: PyTorch reference skipped"}
  import bench
  import torch_reference as ref

  device = "cuda" if torch.cuda.is_available() else "cpu"
  sync = bench.torch_sync(device)
  memory = (lambda: int(torch.cuda.max_memory_allocated())) if device == "cuda" else (lambda: None)
  torch.manual_seed(0)
  n = sizes.torch_images
  x, y = bench.torch_inputs(
    images[: sizes.batches[0]], labels[: sizes.batches[0]], mean, std, device
  )
  model = ref.ResNet18(10, sizes.width).to(device)
  loss_net = ref.LossNet([sizes.width * 2**i for i in range(4)]).to(device)
  rows = []

  def row(name, dtype, images_count, build, repeats, need_s=None):
    if device == "cuda":
      torch.cuda.reset_peak_memory_stats()
    entry = measure(
      clock,
      f"torch {name} {dtype}",
      build,
      images_count,
      repeats,
      sync,
      memory=memory,
      need_s=need_s,
    )
    if entry is not None:
      entry.pop("peak_raised", None)  # torch's peak is reset before each measurement
      rows.append({"name": name, "dtype": dtype, **entry})

  if priority == 0:
    model.eval()  # the query: BatchNorm in inference mode
    row(
      "forward_backward",
      "float32",
      len(x),
      lambda: lambda: ref.forward_backward(model, x),
      sizes.repeats,
    )
    row("per_sample_loop", "float32", n, lambda: lambda: ref.per_sample_loop(model, x[:n]), 1)
    row("func_vmap", "float32", len(x), lambda: lambda: ref.func_vmap(model, x), 1)
    model.train()
    step = ref.make_trainer(model, loss_net)
    row("train_eager", "float32", len(x), lambda: lambda: step(x, y), sizes.repeats)
    row(
      "train_eager", "bfloat16", len(x), lambda: _autocast(torch, device, step, x, y), sizes.repeats
    )
  elif sizes.torch_compile:
    model.train()
    compiled = ref.make_trainer(torch.compile(model), torch.compile(loss_net))
    for dtype in ("float32", "bfloat16"):
      build = (
        (lambda: lambda: compiled(x, y))
        if dtype == "float32"
        else (lambda: _autocast(torch, device, compiled, x, y))
      )
      row("train_compiled", dtype, len(x), build, sizes.repeats, need_s=120)
  return {
    "available": True,
    "version": torch.__version__,
    "device": device,
    "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
    "matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
    "rows": rows,
  }


def _autocast(torch, device, step, x, y):
  def run():
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
      step(x, y)

  return run


class PhaseProbes:
  """Times a campaign's phases by wrapping the library functions that carry them out.

  Each probe replaces a function wherever a loaded `lplgrad_jax` module holds it (by
  identity, so `from x import f` is found too), or a method of a class; it blocks on the
  result so that asynchronous device work is counted where it is issued. A call inside
  another probed call counts for the outer phase only. A probe whose function no longer
  exists (the library was refactored) is listed in `missing`.
  """

  PROBES = (
    ("data", "lplgrad_jax.data", "load_dataset"),
    ("placement", "lplgrad_jax.sharding", "replicate"),
    ("placement", "lplgrad_jax.sharding", "shard_rows"),
    ("train", "lplgrad_jax.train", "train_epoch"),
    ("eval", "lplgrad_jax.query", "model_outputs"),
    ("query", "lplgrad_jax.query", "entropy_grad_norms"),
    ("checkpoint", "lplgrad_jax.checkpoint", "Checkpointer.save"),
    ("checkpoint", "lplgrad_jax.checkpoint", "Checkpointer.restore"),
    ("checkpoint", "lplgrad_jax.checkpoint", "Checkpointer.close"),
    ("results", "lplgrad_jax.reporting", "write_results"),
    ("results", "lplgrad_jax.reporting", "plot_accuracy"),
  )

  def __init__(self):
    self.seconds, self.calls, self.missing = {}, {}, []
    self._undo, self._depth = [], 0

  def __enter__(self):
    import importlib

    for phase, module_name, attr in self.PROBES:
      module = importlib.import_module(module_name)
      owner_name, _, name = attr.rpartition(".")
      owner = getattr(module, owner_name) if owner_name else None
      original = getattr(owner if owner is not None else module, name, None)
      if original is None:
        self.missing.append(f"{module_name}.{attr}")
        continue
      wrapped = self._wrap(phase, original)
      targets = (
        [owner]
        if owner is not None
        else [
          m
          for n, m in list(sys.modules.items())
          if n.startswith("lplgrad_jax") and m is not None and getattr(m, name, None) is original
        ]
      )
      for target in targets:
        self._undo.append((target, name, original))
        setattr(target, name, wrapped)
    return self

  def __exit__(self, *exc):
    for target, name, original in reversed(self._undo):
      setattr(target, name, original)

  def _wrap(self, phase, fn):
    import functools

    import jax

    @functools.wraps(fn)
    def timed(*args, **kwargs):
      self._depth += 1
      start = time.perf_counter()
      try:
        out = fn(*args, **kwargs)
        for leaf in jax.tree.leaves(out):
          if isinstance(leaf, jax.Array):
            leaf.block_until_ready()
        return out
      finally:
        self._depth -= 1
        if self._depth == 0:
          self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start
          self.calls[phase] = self.calls.get(phase, 0) + 1

    return timed


def campaign_section(clock, sizes, config, dataset, startup_s):
  """A short real campaign end to end, its phases, and bf16-vs-fp32 scores on its model."""
  import bf16_error

  from lplgrad_jax import campaign
  from lplgrad_jax import predict

  config = config.copy_and_resolve_references()
  config.model.width = sizes.width
  config.train.epochs = sizes.campaign_epochs
  config.train.lr_milestones = ()
  config.train.batch_size = sizes.batches[0]
  config.train.detach_features_epoch = sizes.campaign_epochs
  config.al.initial_size = config.al.query_size = sizes.campaign_query
  config.al.subset_size = max(sizes.campaign_subset, sizes.campaign_query)
  config.al.num_rounds = sizes.campaign_rounds
  config.query.chunk_size = sizes.main_chunk
  config.log.progress = False
  config.log.tensorboard = _importable("tensorboardX")
  workdir = tempfile.mkdtemp(prefix="accelerator_campaign_")
  try:
    with PhaseProbes() as probes:
      start = time.perf_counter()
      results = campaign.run(config, workdir)
      wall = time.perf_counter() - start
    phases = _phases(results["rounds"], probes.seconds, wall)
    phases = {"process start-up (imports, backend)": startup_s, **phases}
    report = {
      "config": {
        "data": config.data.name,
        "width": config.model.width,
        "epochs_per_round": config.train.epochs,
        "rounds": config.al.num_rounds,
        "initial": config.al.initial_size,
        "query": config.al.query_size,
        "subset_R": config.al.subset_size,
        "chunk": config.query.chunk_size,
        "batch": config.train.batch_size,
        "epoch_loop": config.train.epoch_loop,
        "compute_dtype": config.train.compute_dtype,
        "tensorboard": config.log.tensorboard,
      },
      "num_test": len(dataset.y_test),
      "wall_s": wall,
      "phases_s": phases,
      "phase_calls": {
        "data load": probes.calls.get("data"),
        "data placement": probes.calls.get("placement"),
        "eval": probes.calls.get("eval"),
        "checkpoint": probes.calls.get("checkpoint"),
        "results.json and plot": probes.calls.get("results"),
      },
      "probes_missing": probes.missing,
      "rounds": [
        {
          k: r[k]
          for k in ("round", "num_labeled", "test_accuracy", "train_seconds", "query_seconds")
        }
        for r in results["rounds"]
      ],
    }
    if clock.allow("campaign bf16 error", need_s=2 * clock.slowest_first / 3):
      model = predict.load_model(workdir)
      pool = dataset.x_train[: config.al.subset_size]
      report["bf16_error"] = bf16_error.score_error(model, pool, config.query, config.al.query_size)
    return report
  finally:
    shutil.rmtree(workdir, ignore_errors=True)


def _phases(rounds, probed, wall):
  """Seconds per phase: train and query from the round records (results.json), the others
  from the probes, the rest of the wall clock as "other". The campaign checkpoints only at
  round ends (its epochs < checkpoint.every_epochs), so no checkpoint is inside a round's
  train seconds."""
  phases = {
    "data load": probed.get("data", 0.0),
    "data placement": probed.get("placement", 0.0),
    "train (round records)": sum(r["train_seconds"] for r in rounds),
    "eval": probed.get("eval", 0.0),
    "query (round records)": sum(r["query_seconds"] for r in rounds),
    "checkpoint": probed.get("checkpoint", 0.0),
    "results.json and plot": probed.get("results", 0.0),
  }
  phases["other (set-up, model creation, logging)"] = max(wall - sum(phases.values()), 0.0)
  return phases


def _importable(name: str) -> bool:
  try:
    __import__(name)
    return True
  except ImportError:
    return False


def run_check(args, sizes: Sizes, report: dict, clock: Clock) -> dict:
  """Fills `report` section by section, in priority order (a watchdog may write it early).

  The order is what the targets and the advice need first: the core query and step, the
  PyTorch reference, the campaign (its train step and query reuse compiles made before it),
  the epoch loops; then the chunk and batch sweeps and torch.compile.
  """
  import jax
  import numpy as np

  from lplgrad_jax import models
  from lplgrad_jax import sharding

  startup_s = report["header"]["startup_s"]
  config, dataset, campaign_ok = load_pool(args, args.smoke, clock)
  config.model.width = sizes.width
  mean, std = dataset.channel_stats()
  need = max(sizes.epoch_images, max(sizes.batches))
  # The campaign's own pool when it is large enough: its train step then reuses this compile.
  images = (
    dataset.x_train
    if len(dataset.x_train) >= need
    else np.resize(dataset.x_train, (need,) + dataset.x_train.shape[1:])
  )
  labels = np.resize(dataset.y_train, len(images)).astype(np.int32)
  learner = models.create_learner(
    config.model, dataset.num_classes, use_aux=True, key=jax.random.key(0)
  )
  mesh = sharding.data_mesh()
  pool = sharding.replicate((images, labels), mesh)
  train_report, torch_report = report["train"], report["torch"]
  for priority in (0, 1):  # 0: what the targets and the advice need; 1: the sweeps
    report["query"]["rows"] += query_section(
      clock, sizes, learner.classifier, images, mean, std, mesh, priority
    )
    train_report["steps"] += step_section(
      clock, sizes, learner, config.train, pool, mean, std, mesh, priority
    )
    if priority == 0 or torch_report["available"]:
      part = _guarded(
        clock, "torch", lambda: torch_section(clock, sizes, images, labels, mean, std, priority)
      )
      if part is not None:
        torch_report.update(part, rows=torch_report["rows"] + part.pop("rows", []))
    if priority == 0 and campaign_ok and clock.allow("campaign", need_s=2 * clock.slowest_first):
      report["campaign"] = _guarded(
        clock, "campaign", lambda: campaign_section(clock, sizes, config, dataset, startup_s)
      )
    train_report["epochs"] += epoch_section(
      clock, sizes, learner, config.train, pool, mean, std, mesh, priority
    )
  if jax.device_count() > 1:
    report["single_device"] = _single_device(
      clock, sizes, learner, config, images, labels, mean, std
    )
  return report


def empty_report(head: dict, clock: Clock) -> dict:
  return {
    "schema": 1,
    "header": head,
    "query": {"rows": []},
    "train": {"steps": [], "epochs": []},
    "torch": {"available": None, "rows": []},
    "campaign": None,
    "skipped": clock.skipped,
    "failed": clock.failed,
  }


def finish(report: dict, out: str) -> list[str]:
  import accelerator_report

  report["tensorflow_modules_loaded"] = sorted(
    n
    for n, m in list(sys.modules.items())
    if m is not None and n.split(".")[0] in ("tensorflow", "tensorflow_datasets")
  )
  report["wall_s"] = time.perf_counter() - _START
  paths = accelerator_report.write(report, out, slug(report["header"]))
  print(accelerator_report.summary(report), flush=True)
  print("wrote " + " and ".join(paths), flush=True)
  return paths


def start_watchdog(report: dict, out: str, hard_s: float):
  """At `hard_s` from the start, writes what has been measured and ends the process (exit
  3): a compile that runs long must not cost the whole lease's results."""
  import threading

  import accelerator_report  # noqa: F401 - imported here: an import on the timer's thread
  # races the main thread's imports (module locks) at the moment the budget is short

  def expire():
    report["failed"].append(
      {
        "name": "hard time limit",
        "error": f"still running at {hard_s:.0f} s: the report holds what was measured by then",
      }
    )
    try:
      finish(json.loads(json.dumps(report, default=str)), out)
    except BaseException as e:  # noqa: BLE001 - the process ends here either way
      print(
        f"error: the watchdog could not write the report: {type(e).__name__}: {e}",
        file=sys.stderr,
        flush=True,
      )
    finally:
      os._exit(3)

  timer = threading.Timer(max(hard_s - (time.perf_counter() - _START), 0.0), expire)
  timer.daemon = True
  timer.start()
  return timer


def _guarded(clock, name, fn):
  try:
    return fn()
  except Exception as e:  # noqa: BLE001 - one broken section must not cost the others
    clock.fail(name, e)
    return None


def _single_device(clock, sizes, learner, config, images, labels, mean, std):
  """With several devices: the core query and step on one of them (the scaling's base)."""
  import bench
  import jax

  from lplgrad_jax import sharding

  mesh = sharding.data_mesh(jax.devices()[:1])
  dtype, chunk, batch = sizes.dtypes[-1], sizes.main_chunk, sizes.batches[0]
  subset = images[: chunk * 4]
  query = measure(
    clock,
    f"one device: query fast {dtype} chunk {chunk}",
    lambda: bench.make_query(
      learner.classifier, subset, mean, std, method="fast", chunk_size=chunk, dtype=dtype, mesh=mesh
    ),
    len(subset),
    sizes.repeats,
    jax.block_until_ready,
  )
  pool = sharding.replicate((images, labels), mesh)
  step = measure(
    clock,
    f"one device: train step {dtype} batch {batch}",
    lambda: bench.make_train_step(
      learner, _train_config(config.train, batch, dtype, "host"), pool, mean, std, mesh
    ),
    batch,
    sizes.repeats,
    jax.block_until_ready,
  )
  return {"dtype": dtype, "query_chunk": chunk, "query": query, "batch": batch, "train_step": step}


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  from lplgrad_jax import errors
  from lplgrad_jax.errors import ConfigError

  try:
    sizes = resolve_sizes(args)
    if args.smoke:  # code paths, not speed: XLA:CPU's optimisations off halve its compiles
      os.environ.setdefault("JAX_PLATFORMS", "cpu")
      os.environ["XLA_FLAGS"] = " ".join(
        filter(
          None,
          (
            os.environ.get("XLA_FLAGS"),
            "--xla_backend_optimization_level=0",
            "--xla_llvm_disable_expensive_passes=true",
          ),
        )
      )
    import jax

    backend = jax.default_backend()
    startup_s = time.perf_counter() - _START
    if not args.smoke and backend == "cpu" and not args.force:
      raise ConfigError(
        "no accelerator: JAX sees only CPU devices; run this on a GPU/TPU "
        "machine, or pass --smoke (tiny CPU check) or --force (measure anyway)"
      )
    mode = "smoke" if args.smoke else ("accelerator" if backend != "cpu" else "forced-cpu")
    budget_s = args.budget_s or (600.0 if args.smoke else 420.0)
    out = args.out or (
      tempfile.mkdtemp(prefix="accelerator_smoke_")
      if args.smoke
      else os.path.join(REPO_ROOT, "experiments", "results")
    )
    os.makedirs(out, exist_ok=True)
    clock = Clock(budget_s)
    report = empty_report(header(mode, sizes, budget_s, startup_s), clock)
    watchdog = start_watchdog(report, out, budget_s + args.grace_s)
    run_check(args, sizes, report, clock)
  except ConfigError as e:
    errors.exit_with(e)
  watchdog.cancel()
  finish(report, out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
