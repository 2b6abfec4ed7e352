"""One prepared accelerator check: everything this project claims about speed, in one command.

  python experiments/accelerator_check.py [--out=experiments/results] [--budget_s=420]
  python experiments/accelerator_check.py --smoke [--out=DIR]   # tiny sizes on the CPU

Writes `accelerator_<device kind>.md` and `.json` (strict JSON) in --out (accelerator_report.py):
the machine; the query's floor, "fast" and "vmap" per dtype and chunk; the train step and the
host vs scan epoch; the PyTorch reference; a short real campaign (`lplgrad_jax.campaign.run`)
with its own per-round seconds, eval and a checkpoint save on its model and its bf16 score
error; the targets, the CIFAR-10 campaign extrapolated, the advice. What it times is
measure.py's, as bench.py's is. Measurements run in priority order under a time budget
(--budget_s, from the process's start): what no longer fits is skipped and listed, never cut
short; a watchdog writes the report if one overstays. Without an accelerator it refuses to
run, unless --force.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time

_START = time.perf_counter()
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
sys.path.insert(0, os.path.join(REPO_ROOT, "experiments"))
import accelerator_report  # noqa: E402 - the report: header, targets, extrapolation, files
import measure  # noqa: E402 - what is timed, shared with bench.py

from lplgrad_jax import errors  # noqa: E402 - no JAX yet: main() sets the smoke mode's flags
from lplgrad_jax.errors import ConfigError  # noqa: E402

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
  torch_images: int = 128  # the PyTorch per-image loop's images
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
  add = parser.add_argument
  add("--smoke", action="store_true", help="tiny sizes on the CPU")
  add("--force", action="store_true", help="measure even without an accelerator")
  add("--out", help="output folder (default experiments/results; --smoke: a temp folder)")
  add("--budget_s", type=float, help="seconds from start, then optional parts are skipped")
  add("--grace_s", type=float, default=45.0, help="then a watchdog writes the report, exits 3")
  add("--data", help="the CIFAR-10 subset .npz (real mode)")
  add("--width", type=int, help="ResNet-18 width (default 64)")
  add("--chunks", help="query chunk sizes, e.g. 256,1024,4096")
  add("--batches", help="training batches, e.g. 128,1024")
  add("--subset", type=int, help="R, the images a query scores")
  add("--epoch_images", type=int, help="labeled set of an epoch")
  add("--repeats", type=int, help="timed calls per measurement")
  add("--campaign_epochs", type=int, help="epochs per round")
  add("--campaign_query", type=int, help="the campaign's initial and per-round labeled images")
  add("--no_torch_compile", action="store_true", help="skip torch.compile")
  return parser.parse_args(argv)


def _int_list(text, name):
  values = [int(v) if v.strip().isdigit() else 0 for v in text.split(",")]
  if min(values) < 1:
    raise ConfigError(f"--{name}={text!r}: expected positive integers separated by commas")
  return tuple(values)


def resolve_sizes(args) -> Sizes:
  """The mode's sizes with the command line's overrides (ConfigError on bad values)."""
  sizes = dataclasses.replace(SMOKE if args.smoke else Sizes())
  numbers = ("width", "subset", "epoch_images", "repeats", "campaign_epochs", "campaign_query")
  for name in (*numbers, "budget_s", "grace_s"):
    value = getattr(args, name)
    if value is not None and not value > 0:  # NaN too
      raise ConfigError(f"--{name}={value}: expected a positive number")
    if value is not None and name in numbers:
      setattr(sizes, name, int(value))
  if args.epoch_images is None and args.campaign_query is not None:
    sizes.epoch_images = sizes.campaign_query * sizes.campaign_rounds  # keep the shared compile
  if args.chunks is not None:
    sizes.chunks = _int_list(args.chunks, "chunks")
    sizes.vmap_chunks = tuple(c for c in sizes.vmap_chunks if c in sizes.chunks) or sizes.chunks[:1]
    sizes.main_chunk = sizes.main_chunk if sizes.main_chunk in sizes.chunks else sizes.chunks[0]
  if args.batches is not None:
    sizes.batches = _int_list(args.batches, "batches")
  sizes.torch_compile = sizes.torch_compile and not args.no_torch_compile
  return sizes


class Clock:
  """The time budget, counted from the start of the process: what is measured under it, what
  it skipped, what failed."""

  def __init__(self, budget_s: float):
    self.deadline, self.skipped, self.failed = _START + budget_s, [], []
    self.slowest_first = 0.0  # the longest first call (compile included) so far

  def say(self, text):
    print(f"[{time.perf_counter() - _START:6.1f} s] {text}", flush=True)

  def allow(self, name: str, need_s: float | None = None) -> bool:
    """Whether `name`, expected to take `need_s` (default: 1.5x the slowest first call so
    far), still fits; records it as skipped when not."""
    need = 1.5 * self.slowest_first if need_s is None else need_s
    left = self.deadline - time.perf_counter()
    if left >= need:
      return True
    reason = f"time budget: {max(left, 0):.0f} s left, about {need:.0f} s needed"
    self.skipped.append({"name": name, "reason": reason})
    self.say(f"{name} skipped: {reason}")
    return False

  def guarded(self, name, fn, *args):
    """`fn(*args)`, or None when it raises, recorded as failed: one broken part (out of
    memory, a compile error) must not cost the others."""
    try:
      return fn(*args)
    except Exception as e:  # noqa: BLE001 - recorded, not fatal
      text = " ".join(f"{type(e).__name__}: {e}".split())
      self.failed.append({"name": name, "error": text[:400]})
      self.say(f"{name} FAILED: {text[:200]}")
      return None

  def timed(self, name, build, images, repeats, sync=None, memory=None, need_s=None):
    """`measure.timed_entry` of the thunk `build()` returns; None if skipped or failed."""
    if not self.allow(name, need_s):
      return None
    timed = lambda: measure.timed_entry(build(), images, repeats, sync, memory)
    if (entry := self.guarded(name, timed)) is not None:
      first, seconds = entry["first_call_s"], entry["seconds"]
      self.slowest_first = max(self.slowest_first, first)
      rate = f"{entry['images_per_s']:,.0f} img/s, {seconds:.3f} s a call, first {first:.1f} s"
      self.say(f"{name}: {rate}")
    return entry


def load_pool(args, clock):
  """(config, dataset, whether to run the campaign): the CIFAR-10 subset, or tiny digits
  (smoke). Without the subset (and no --data), random images stand in and the campaign is
  skipped."""
  import numpy as np

  from lplgrad_jax import data
  from lplgrad_jax.configs import cifar10_subset
  from lplgrad_jax.configs import digits

  config = digits.get_config() if args.smoke else cifar10_subset.get_config()
  if args.smoke:
    config.data.image_size = 8
    return config, data.load_dataset(config.data), True
  if args.data and not os.path.isfile(args.data):
    raise ConfigError(f"--data={args.data} does not exist: expected the CIFAR-10 subset .npz")
  found = [p for p in (args.data, config.data.root, CARRIED_DATA) if p and os.path.isfile(p)]
  if found:
    config.data.root = found[0]
    return config, data.load_dataset(config.data), True
  reason = f"no CIFAR-10 subset at {config.data.root} nor {CARRIED_DATA} (make wheels copies it)"
  clock.skipped.append({"name": "campaign", "reason": reason + ": random images stand in"})
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (5085, 32, 32, 3), dtype=np.uint8)
  y = rng.integers(0, 10, 5085).astype(np.int32)
  return config, data.Dataset("random", x, y, x[:1000], y[:1000], config.data.class_names), False


def _dtypes(sizes):  # of all but the "fast" scorer
  return sizes.dtypes if sizes.full_dtypes else sizes.dtypes[:1]


class Check:
  """The measurements over one pool and learner, section by section, each at priority 0 (what
  the targets and the advice need) or 1 (the sweeps: other chunks, batches, torch.compile)."""

  def __init__(self, clock, sizes, config, dataset):
    import jax
    import numpy as np

    from lplgrad_jax import models
    from lplgrad_jax import sharding

    self.clock, self.sizes, self.config, self.dataset = clock, sizes, config, dataset
    self.timed = clock.timed
    config.model.width = sizes.width
    self.mean, self.std = dataset.channel_stats()
    need = max(sizes.epoch_images, max(sizes.batches))
    # The campaign's own pool when it is large enough: its train step reuses this compile.
    x = dataset.x_train
    self.images = x if len(x) >= need else np.resize(x, (need, *x.shape[1:]))
    self.labels = np.resize(dataset.y_train, len(self.images)).astype(np.int32)
    key = jax.random.key(0)
    self.learner = models.create_learner(config.model, dataset.num_classes, use_aux=True, key=key)
    self.mesh, start = sharding.data_mesh(), time.perf_counter()
    self.pool = jax.block_until_ready(sharding.replicate((self.images, self.labels), self.mesh))
    self.placement_s = time.perf_counter() - start

  def query(self, priority, sizes=None, mesh=None, prefix=""):
    """The floor and "fast" per dtype and chunk, "vmap" per dtype and vmap chunk: the main
    chunk (vmap: the first dtype and chunk) at priority 0. vmap(grad) holds a gradient per
    image: chunks whose gradients would not fit are skipped."""
    import jax
    import numpy as np
    from flax import nnx

    s, mesh, model, rows = sizes or self.sizes, mesh or self.mesh, self.learner.classifier, []
    resized = lambda n: np.resize(self.images, (n, *self.images.shape[1:]))  # real images
    params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit") or float("inf")

    def row(kind, dtype, chunk, x, count, repeats):
      at = (model, x, self.mean, self.std)
      build = lambda: (
        measure.make_floor(*at, dtype, mesh)
        if kind == "floor"
        else measure.make_query(*at, method=kind, chunk_size=chunk, dtype=dtype, mesh=mesh)
      )
      entry = self.timed(f"{prefix}query {kind} {dtype} chunk {chunk}", build, count, repeats)
      if entry is not None:
        measured = kind == "fast"  # end to end over R, as a campaign scores it
        seconds = entry["seconds"] if measured else s.subset / entry["images_per_s"]
        fields = {"kind": kind, "dtype": dtype, "chunk": chunk, "seconds_for_R": seconds}
        rows.append({**fields, "R": s.subset, "R_measured": measured, **entry})

    subset = resized(s.subset)
    for dtype in s.dtypes:
      for chunk in [c for c in s.chunks if (c == s.main_chunk) == (priority == 0)]:
        if dtype in _dtypes(s):
          row("floor", dtype, chunk, resized(chunk), chunk, s.repeats)
        row("fast", dtype, chunk, subset, s.subset, max(1, s.repeats - 1))
    for dtype in _dtypes(s):
      for chunk in s.vmap_chunks:
        if (dtype == s.dtypes[0] and chunk == s.vmap_chunks[0]) != (priority == 0):
          continue
        gib, limit_gib = 4 * params * chunk / jax.device_count() / 2**30, limit / 2**30
        if gib > 0.6 * limit_gib:
          reason = f"per-image gradients need {gib:.0f} GiB per device of {limit_gib:.0f}"
          self.clock.skipped.append({"name": f"query vmap {dtype} chunk {chunk}", "reason": reason})
        else:
          row("vmap", dtype, chunk, resized(2 * chunk), 2 * chunk, 1)
    return rows

  def _train_config(self, batch, dtype, loop):
    config = self.config.train.copy_and_resolve_references()
    config.batch_size, config.compute_dtype, config.epoch_loop = batch, dtype, loop
    return config

  def steps(self, priority, sizes=None, mesh=None, prefix=""):
    """Training steps: the first batch (the paper's 128) at priority 0, larger ones at 1."""
    from lplgrad_jax import sharding

    s, mesh, rows = sizes or self.sizes, mesh or self.mesh, []
    pool = self.pool if mesh is self.mesh else sharding.replicate(self.pool, mesh)
    for dtype in _dtypes(s):
      for batch in [b for b in s.batches if (b == s.batches[0]) == (priority == 0)]:
        config = self._train_config(batch, dtype, "host")
        labeled = s.epoch_images if batch == s.batches[0] else batch  # a shared compile
        at = (self.learner, config, pool, self.mean, self.std, mesh, labeled)
        build = lambda: measure.make_train_step(*at)
        entry = self.timed(f"{prefix}train step {dtype} batch {batch}", build, batch, s.repeats)
        rows += [{"dtype": dtype, "batch": batch, **entry}] if entry else []
    return rows

  def epochs(self, priority):
    """Whole epochs, host vs scan loop: the last dtype (bf16, the candidate accelerator
    default) at priority 0, the others at 1."""
    s, dtypes, rows = self.sizes, _dtypes(self.sizes)[::-1], []
    batch, n, repeats = s.batches[0], s.epoch_images, max(1, s.repeats - 1)
    for dtype in [d for d in dtypes if (d == dtypes[0]) == (priority == 0)]:
      for loop in s.loops:
        config = self._train_config(batch, dtype, loop)
        at = (self.learner, config, self.pool, n, self.mean, self.std, self.mesh)
        build = lambda: measure.make_epoch(*at)
        entry = self.timed(f"train epoch {loop} {dtype}", build, n, repeats)
        fields = {"loop": loop, "dtype": dtype, "batch": batch, "num_labeled": n}
        rows += [{**fields, "steps": -(-n // batch), **entry}] if entry else []
    return rows

  def torch(self, priority):
    """The PyTorch reference (measure.TorchReference) on the device torch sees: the floor,
    the authors' per-image loop, torch.func vmap(grad), the eager step (priority 0); the
    torch.compile'd step (1). A note instead without torch."""
    if importlib.util.find_spec("torch") is None:
      return {"available": False, "note": "torch is not installed: PyTorch reference skipped"}
    s, n, rows = self.sizes, self.sizes.batches[0], []
    if priority and not s.torch_compile:
      return None
    ref = measure.TorchReference(s.width, self.images[:n], self.labels[:n], self.mean, self.std)
    need_s = 120 if priority else None  # torch.compile
    cases = ref.cases(s.repeats, s.torch_images, s.dtypes, compiled=bool(priority))
    for name, dtype, count, build, repeats in cases:
      label = f"torch {name} {dtype}"
      entry = self.timed(label, build, count, repeats, ref.sync, ref.peak_bytes, need_s)
      if entry is not None:
        entry.pop("peak_raised", None)  # torch's peak is reset as each thunk is built
        rows.append({"name": name, "dtype": dtype, **entry})
    return {"available": True, **ref.describe(), "rows": rows}

  def campaign(self, startup_s):
    """A short real campaign (`campaign.run`): its phases from its own round records (train
    and query seconds, results.json) and its wall clock; on its trained model, eval and a
    checkpoint save timed (what the extrapolation scales) and the bf16 score error."""
    from lplgrad_jax import campaign
    from lplgrad_jax import predict
    from lplgrad_jax import query

    s, dataset, config = self.sizes, self.dataset, self.config.copy_and_resolve_references()
    config.train.epochs = config.train.detach_features_epoch = s.campaign_epochs
    config.train.lr_milestones, config.train.batch_size = (), s.batches[0]
    config.al.initial_size = config.al.query_size = s.campaign_query
    config.al.subset_size = max(s.campaign_subset, s.campaign_query)
    config.al.num_rounds, config.query.chunk_size = s.campaign_rounds, s.main_chunk
    config.log.progress = False
    config.log.tensorboard = importlib.util.find_spec("tensorboardX") is not None
    workdir = tempfile.mkdtemp(prefix="accelerator_campaign_")
    try:
      start = time.perf_counter()
      rounds = campaign.run(config, workdir)["rounds"]
      wall = time.perf_counter() - start
      train_s, query_s = (sum(r[k] for r in rounds) for k in ("train_seconds", "query_seconds"))
      keys = ("round", "num_labeled", "test_accuracy", "train_seconds", "query_seconds")
      phases = {
        "process start-up (imports, backend)": startup_s,
        "train (round records)": train_s,
        "query (round records)": query_s,
        "the rest: set-up, eval, checkpoints, results, logging": max(wall - train_s - query_s, 0),
      }
      report = {"config": config.to_dict(), "num_test": len(dataset.y_test), "wall_s": wall}
      report.update(phases_s=phases, rounds=[{k: r[k] for k in keys} for r in rounds])
      model = predict.load_model(workdir)
      batch = config.train.eval_batch_size
      evaluate = lambda: query.evaluate(model.learner, dataset, model.normalization, batch)
      report["eval"] = self.timed("eval", lambda: evaluate, len(dataset.y_test), s.repeats)
      save = measure.make_checkpoint_save(model.learner, config.train, f"{workdir}/timed")
      try:
        report["checkpoint_save"] = self.timed("checkpoint save", lambda: save, 1, s.repeats)
      finally:
        save.close()
      if self.clock.allow("campaign bf16 error", need_s=2 * self.clock.slowest_first / 3):
        pool, k = dataset.x_train[: config.al.subset_size], config.al.query_size
        report["bf16_error"] = measure.score_error(model, pool, config.query, k)
      return report
    finally:
      shutil.rmtree(workdir, ignore_errors=True)


def run_check(args, sizes: Sizes, report: dict, clock: Clock) -> dict:
  """Fills `report` section by section, in priority order (a watchdog may write it early).

  The order is what the targets and the advice need first: the core query and step, the
  PyTorch reference, the campaign (its train step and query reuse compiles made before it),
  the epoch loops; then the chunk and batch sweeps and torch.compile.
  """
  import jax

  from lplgrad_jax import sharding

  start = time.perf_counter()
  config, dataset, campaign_ok = load_pool(args, clock)
  report["data"] = {"name": dataset.name, "load_s": time.perf_counter() - start}
  check = Check(clock, sizes, config, dataset)
  report["data"]["placement_s"] = check.placement_s
  torch = report["torch"]
  for priority in (0, 1):
    report["query"]["rows"] += check.query(priority)
    report["train"]["steps"] += check.steps(priority)
    if priority == 0 or torch["available"]:
      part = clock.guarded("torch", check.torch, priority)
      if part is not None:
        torch.update(part, rows=torch["rows"] + part.pop("rows", []))
    if priority == 0 and campaign_ok and clock.allow("campaign", need_s=2 * clock.slowest_first):
      startup_s = report["header"]["startup_s"]
      report["campaign"] = clock.guarded("campaign", check.campaign, startup_s)
    report["train"]["epochs"] += check.epochs(priority)
  if jax.device_count() > 1:  # the core query and step on one device: the scaling's base
    one, chunk, name = sharding.data_mesh(jax.devices()[:1]), sizes.main_chunk, "one device: "
    core = dataclasses.replace(sizes, dtypes=sizes.dtypes[-1:], chunks=(chunk,), vmap_chunks=())
    core.subset, core.batches = 4 * chunk, sizes.batches[:1]
    report["single_device"] = {
      "query": check.query(0, core, one, name),
      "steps": check.steps(0, core, one, name),
    }
  return report


def start_watchdog(report: dict, out: str, hard_s: float):
  """At `hard_s` from the start, writes what has been measured and ends the process (exit
  3): a compile that runs long must not cost the whole lease's results."""
  import threading

  def expire():
    error = f"still running at {hard_s:.0f} s: the report holds what was measured by then"
    report["failed"].append({"name": "hard time limit", "error": error})
    try:
      copy = json.loads(json.dumps(report, default=str))
      accelerator_report.finish(copy, out, time.perf_counter() - _START)
    except BaseException as e:  # noqa: BLE001 - the process ends here either way
      message = f"error: the watchdog could not write the report: {type(e).__name__}: {e}"
      print(message, file=sys.stderr, flush=True)
    finally:
      os._exit(3)

  timer = threading.Timer(max(hard_s - (time.perf_counter() - _START), 0.0), expire)
  timer.daemon = True
  timer.start()
  return timer


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    sizes = resolve_sizes(args)
    if args.smoke:  # code paths, not speed: XLA:CPU's optimisations off halve its compiles
      os.environ.setdefault("JAX_PLATFORMS", "cpu")
      quick = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
      os.environ["XLA_FLAGS"] = " ".join(filter(None, (os.environ.get("XLA_FLAGS"), quick)))
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
    out = os.path.join(REPO_ROOT, "experiments", "results")
    out = args.out or (tempfile.mkdtemp(prefix="accelerator_smoke_") if args.smoke else out)
    os.makedirs(out, exist_ok=True)
    clock = Clock(budget_s)
    head = accelerator_report.header(mode, sizes, budget_s, startup_s)
    report = accelerator_report.new_report(head, clock.skipped, clock.failed)
    watchdog = start_watchdog(report, out, budget_s + args.grace_s)
    run_check(args, sizes, report, clock)
  except ConfigError as e:
    errors.exit_with(e)
  watchdog.cancel()
  accelerator_report.finish(report, out, time.perf_counter() - _START)
  return 0


if __name__ == "__main__":
  sys.exit(main())
