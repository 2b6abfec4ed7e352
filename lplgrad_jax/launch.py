"""What the command line adds around a campaign: configs by name, the default workdir, the
compilation cache, the first line of a run and the advice to install an accelerator build of JAX.

Shipped configs live in `lplgrad_jax/configs/` (at the repository root: `configs/`, the same
files), so `--config=cifar100` works from any directory once the package is installed.
"""

from __future__ import annotations

import json
import os
import shutil

import jax

from lplgrad_jax import xla_flags
from lplgrad_jax.errors import ConfigError

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.realpath(__file__)), "configs")
_NOT_CONFIGS = ("__init__", "default")
# Training FLOPs of a width-64 ResNet-18 on one 32x32 image (forward and backward, ~3x the
# forward's 0.56 GFLOP); other widths and sizes scale with their squares.
_FLOPS_PER_IMAGE = 3 * 0.56e9
# Above this estimate (about an hour of a CPU's work) a campaign is sized for a GPU or TPU.
ACCELERATOR_FLOPS = 1e14


def shipped_configs() -> list[str]:
  """Names of the config files shipped with the package (`cifar100`, `digits`, ...)."""
  return sorted(
    f[:-3] for f in os.listdir(CONFIGS_DIR) if f.endswith(".py") and f[:-3] not in _NOT_CONFIGS
  )


def resolve_config(value: str) -> tuple[str, str]:
  """(what config_flags loads, the config's name) for a --config value.

  `value` is a file path or the name of a shipped config, either optionally
  followed by `:<argument>` (the budget: `cifar10:low`). The name is the file's
  stem plus `_<argument>`: it names the default workdir.
  """
  path, sep, argument = value.partition(":")
  stem = os.path.splitext(os.path.basename(path))[0]
  name = f"{stem}_{argument}" if argument else stem
  expected = f"expected a config file or one of {', '.join(shipped_configs())}"
  if os.path.isfile(path):
    return value, name  # config_flags reports a broken file
  if os.sep in path or "/" in path or path.endswith(".py"):
    raise ConfigError(f"--config={value}: no such file {path!r}: {expected}")
  if path not in shipped_configs():
    raise ConfigError(
      f"--config={value}: {path!r} is neither a config file nor a shipped config: {expected}"
    )
  return os.path.join(CONFIGS_DIR, f"{path}.py") + sep + argument, name


def rewrite_config_argv(argv: list[str]) -> tuple[list[str], str | None]:
  """`argv` with its --config value resolved (see resolve_config), and the config's name."""
  argv, name = list(argv), None
  for i, arg in enumerate(argv):
    flag, eq, value = arg.partition("=")
    if flag not in ("--config", "-config"):
      continue
    if not eq and i + 1 < len(argv):  # `--config cifar100`
      argv[i + 1], name = resolve_config(argv[i + 1])
    elif eq:
      value, name = resolve_config(value)
      argv[i] = f"{flag}={value}"
  return argv, name


def default_workdir(config_name: str, config) -> str:
  """`runs/<config name>/<strategy>/seed<seed>`, relative to the current directory.

  Stable: the same command (config, budget, strategy, seed) maps to the same
  folder, so rerunning it resumes its campaign.
  """
  return os.path.join("runs", config_name, str(config.strategy), f"seed{config.seed}")


COMPILATION_CACHE = ".jax_cache"
# Programs that compile faster than this are not worth a file (the cache's default is 1 s,
# which leaves out the evaluation and query programs of a small model).
_CACHE_MIN_COMPILE_SECONDS = 0.1
# The least recently used programs are deleted beyond this size (a campaign caches ~20 MB).
COMPILATION_CACHE_BYTES = 4 << 30


def enable_compilation_cache(workdir: str, backend: str) -> str | None:
  """Turns on JAX's persistent compilation cache in `.jax_cache` beside `workdir`, so a rerun,
  a resume or the next seed loads its compiled programs instead of compiling them.

  A cache directory the user chose (JAX_COMPILATION_CACHE_DIR) is kept. Returns the
  directory in use, or None where none can be created (the run compiles as without one) or
  where `backend` is the CPU of a jaxlib that rejects its own cached CPU programs.
  """
  directory = jax.config.jax_compilation_cache_dir
  if not directory:
    if backend == "cpu" and not cpu_cache_loads():
      return None
    directory = os.path.join(os.path.dirname(os.path.abspath(workdir)), COMPILATION_CACHE)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
      jax.config.update("jax_persistent_cache_min_compile_time_secs", _CACHE_MIN_COMPILE_SECONDS)
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError:
    return None
  if "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ:
    # A bounded cache reads and writes each entry under a file lock (the `filelock`
    # package); an unbounded one writes in place, and a campaign started beside another
    # (the next seed, a second host) could read half an entry and warn on stderr.
    jax.config.update("jax_compilation_cache_max_size", COMPILATION_CACHE_BYTES)
  jax.config.update("jax_compilation_cache_dir", directory)
  return directory


def cpu_cache_loads(version: str | None = None) -> bool:
  """Whether this jaxlib's CPU backend loads the programs it cached. Up to 0.10.1, XLA:CPU
  marks AVX-512 programs with the tuning hints +prefer-no-gather/scatter and then refuses to
  load them as built for another CPU, with error lines on every start (jax-ml/jax#38445,
  openxla/xla#44565); 0.10.2 loads them cleanly on this project's AVX-512 CPU."""
  release = xla_flags.jaxlib_release(version)
  return release is not None and release >= (0, 10, 2)


def first_line(config, workdir: str, devices: str) -> str:
  """Data set, strategy, budgets, devices and workdir: the first line a run prints."""
  data, al = config.data, config.al
  name = data.name or os.path.basename(os.path.normpath(data.root or "")) or data.source
  if config.oracle == "human":
    budget = f"your labeled photos + {al.num_rounds - 1} queries of {al.query_size}"
  else:
    final = al.initial_size + (al.num_rounds - 1) * al.query_size
    budget = (
      f"{al.initial_size} -> {final} labeled in {al.num_rounds} rounds (+{al.query_size} a round)"
    )
  source = "" if name == data.source else f" ({data.source})"
  return (
    f"{name}{source}, strategy {config.strategy}, {budget}; {devices}; "
    f"workdir {workdir} ({_workdir_state(workdir)})"
  )


def _workdir_state(workdir: str) -> str:
  """`new`, or how far the campaign already in `workdir` got (from its results.json)."""
  try:
    with open(os.path.join(workdir, "results.json")) as f:
      results = json.load(f)
    rounds, total = len(results["rounds"]), results["config"]["al"]["num_rounds"]
  except (OSError, ValueError, KeyError, TypeError):
    return "new" if not os.path.isdir(os.path.join(workdir, "checkpoints")) else "resuming"
  if rounds >= total:
    return f"complete: {rounds} of {total} rounds done, nothing to train"
  return f"resuming after {rounds} of {total} rounds"


def training_flops(config) -> float:
  """A rough estimate of a campaign's training FLOPs (all rounds, all epochs)."""
  al, model = config.al, config.model
  images = sum(al.initial_size + r * al.query_size for r in range(al.num_rounds))
  pixels = (config.data.image_size / 32) ** 2 / (16 if model.stem == "imagenet" else 1)
  return config.train.epochs * images * _FLOPS_PER_IMAGE * (model.width / 64) ** 2 * pixels


def accelerator_warning(config, platform: str, environ=os.environ) -> str | None:
  """A one-line warning when a campaign made for accelerators would run on a CPU-only JAX.

  None on a GPU/TPU, when the user asked for the CPU (JAX_PLATFORMS=cpu) or
  when the campaign is small; otherwise names the extra that installs the
  JAX this machine needs.
  """
  if platform != "cpu" or environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
    return None
  if config.distributed.initialize:
    why = "config.distributed.initialize is set"
  elif (flops := training_flops(config)) > ACCELERATOR_FLOPS:
    why = (
      f"this campaign (~{flops / 1e15:.1f} PFLOP of training) is sized for a GPU or TPU "
      "(days on a CPU)"
    )
  else:
    return None
  extra = detect_accelerator_extra()
  fix = (
    f"this machine has {extra[1]}: install JAX for it with pip install -e '.[{extra[0]}]'"
    if extra
    else "on a GPU/TPU machine install JAX for it with pip install -e '.[cuda12]' "
    "('.[cuda13]' for NVIDIA driver >= 580, '.[tpu]' on a TPU VM)"
  )
  return f"warning: JAX sees only the CPU, but {why}: {fix}; see docs/install.md"


def detect_accelerator_extra() -> tuple[str, str] | None:
  """(extra, what was found) for an accelerator this machine has that JAX does not use."""
  if os.path.exists("/dev/accel0") or os.environ.get("TPU_ACCELERATOR_TYPE"):
    return "tpu", "a TPU"
  if not (os.path.exists("/dev/nvidia0") or shutil.which("nvidia-smi")):
    return None
  try:  # "NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.65.06 ..."
    with open("/proc/driver/nvidia/version") as f:
      driver = int(f.read().split("Kernel Module")[1].split()[0].split(".")[0])
  except (OSError, IndexError, ValueError):
    driver = 0
  return ("cuda13" if driver >= 580 else "cuda12"), "an NVIDIA GPU"
