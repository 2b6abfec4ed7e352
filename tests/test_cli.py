"""The command line, as a user runs it: a real subprocess from the repo root."""

import json
import os

import pytest
from conftest import REPO_ROOT
from conftest import cli_env
from conftest import run_cli


@pytest.mark.numerics
def test_cli_campaign_on_digits_learns(tmp_path):
  workdir = tmp_path / "demo"
  proc = run_cli(
    "--config=configs/digits.py",
    f"--workdir={workdir}",
    "--config.model.width=8",
    "--config.train.epochs=20",
    "--config.train.lr_milestones=(16,)",
    "--config.train.detach_features_epoch=12",
    "--config.al.num_rounds=3",
    "--config.al.subset_size=150",
    "--config.log.progress=False",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((workdir / "results.json").read_text())
  accuracies = [r["test_accuracy"] for r in results["rounds"]]
  assert [r["num_labeled"] for r in results["rounds"]] == [50, 100, 150]
  # Seeds 0-7 of this setting (2-core AMD EPYC, 2026-12-05): final accuracy 0.82-0.91, mean 0.87;
  # at 10 epochs (1 step an epoch in round 1) it was 0.27-0.72: a bound there was a coin toss.
  assert accuracies[-1] > max(0.6, accuracies[0])  # 10 classes: chance is 0.1
  assert "round 3/3" in proc.stdout and "test acc" in proc.stdout  # progress and summary table
  assert (workdir / "accuracy.png").exists()
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir / "tensorboard"))


@pytest.mark.parametrize(
  "args, message",
  [
    (["--config=configs/digits.py", "--config.strategy=bald"], "unknown strategy 'bald'"),
    (["--config=configs/digits.py", "--config.data.source=csv"], "unknown data source 'csv'"),
    (["--config=configs/digits.py", "--config.al.initial_size=99999"], "exceeds the pool"),
    (["--config=configs/digits.py", "--config.al.subset_size=10"], "is smaller than al.query_size"),
    (["--config=configs/cdd.py", "--config.data.root=/nonexistent/cdd"], "is not a directory"),
    (
      [
        "--config=configs/cifar10.py",
        "--config.data.data_dir=/nonexistent/tfds",
        "--config.data.download=False",
      ],
      "does not exist",
    ),
    (["--config=configs/cifar10.py:medium"], "unknown budget 'medium'"),
    (["--config=cifar10:medium"], "--config=cifar10:medium: ValueError: unknown budget 'medium'"),
    (["--config=configs/digits.py", "--config.nonsense=1"], "unknown configuration key 'nonsense'"),
  ],
)
def test_cli_bad_input_is_one_line_and_exit_2(args, message, tmp_path):
  proc = run_cli(*args, f"--workdir={tmp_path / 'w'}", timeout=120)
  assert proc.returncode == 2
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr


# --- The command as a new user types it: shipped configs by name, the default workdir ---

TINY_DIGITS = [
  "--config.model.width=4",
  "--config.model.loss_head_width=8",
  "--config.train.epochs=2",
  "--config.train.batch_size=16",
  "--config.train.lr_milestones=(1,)",
  "--config.train.detach_features_epoch=1",
  "--config.al.initial_size=20",
  "--config.al.query_size=10",
  "--config.al.subset_size=40",
  "--config.al.num_rounds=3",
  "--config.query.chunk_size=20",
  "--config.log.progress=False",
]


def _run_elsewhere(cwd, *args, timeout=600, without_tensorflow=False):
  """The CLI started from `cwd` (not the repository), as after `pip install`.

  `without_tensorflow`: as if TensorFlow and TFDS were not installed (their
  imports fail), which sources other than TFDS must not notice.
  """
  path = [REPO_ROOT]
  if without_tensorflow:
    path.insert(0, os.path.join(cwd, "no_tensorflow"))
    for package in ("tensorflow", "tensorflow_datasets"):
      os.makedirs(os.path.join(path[0], package))
      with open(os.path.join(path[0], package, "__init__.py"), "w") as f:
        f.write(f"raise ImportError('{package} is not installed (test)')\n")
  return run_cli(*args, env=cli_env(PYTHONPATH=os.pathsep.join(path)), cwd=cwd, timeout=timeout)


def test_default_workdir_from_any_directory_and_rerun_finishes_at_once(tmp_path):
  proc = _run_elsewhere(tmp_path, "--config=digits", *TINY_DIGITS, without_tensorflow=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stderr == ""  # no TensorFlow / absl / XLA start-up noise
  first = proc.stdout.splitlines()[0]
  assert first == (
    "digits, strategy lplgrad, 20 -> 40 labeled in 3 rounds (+10 a round); "
    "1 x cpu; workdir runs/digits/lplgrad/seed0 (new)"
  )
  results_file = tmp_path / "runs" / "digits" / "lplgrad" / "seed0" / "results.json"
  results = json.loads(results_file.read_text())
  assert [r["num_labeled"] for r in results["rounds"]] == [20, 30, 40]

  again = _run_elsewhere(tmp_path, "--config=digits", *TINY_DIGITS)
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stdout.splitlines()[0].endswith(
    "workdir runs/digits/lplgrad/seed0 (complete: 3 of 3 rounds done, nothing to train)"
  )
  assert "labeled, test accuracy" not in again.stdout  # no round trained again
  assert json.loads(results_file.read_text())["rounds"] == results["rounds"]


def test_config_names_resolve_to_shipped_files(tmp_path):
  from lplgrad_jax import launch
  from lplgrad_jax.errors import ConfigError

  assert {"cifar10", "cifar100", "svhn", "caltech101", "cdd", "digits"} <= set(
    launch.shipped_configs()
  )
  assert "default" not in launch.shipped_configs()
  path, name = launch.resolve_config("cifar10:low")
  assert name == "cifar10_low" and path.endswith(os.path.join("configs", "cifar10.py") + ":low")
  assert os.path.samefile(path[:-4], os.path.join(REPO_ROOT, "configs", "cifar10.py"))
  mine = tmp_path / "my_setup.py"
  mine.write_text("")
  assert launch.resolve_config(f"{mine}:3") == (f"{mine}:3", "my_setup_3")
  with pytest.raises(
    ConfigError,
    match=r"'cifar1000' is neither a config file nor a shipped "
    r"config: expected a config file or one of caltech101, "
    r"cdd, cifar10, cifar100, cifar10_subset, digits, own_data, pretrained_folder, svhn",
  ):
    launch.resolve_config("cifar1000")
  with pytest.raises(
    ConfigError,
    match=r"--config=configs/nope.py: no such file "
    r"'configs/nope.py': expected a config file or one of",
  ):
    launch.resolve_config("configs/nope.py")
  argv, name = launch.rewrite_config_argv(["prog", "--config", "svhn:low", "--config.seed=1"])
  assert argv[1:] == ["--config", launch.resolve_config("svhn:low")[0], "--config.seed=1"]
  assert name == "svhn_low"
  from lplgrad_jax.configs import cifar10

  config = cifar10.get_config("low")
  config.seed, config.strategy = 3, "entropy"
  assert launch.default_workdir("cifar10_low", config) == os.path.join(
    "runs", "cifar10_low", "entropy", "seed3"
  )
  # A wrong name is one error line, exit 2.
  proc = _run_elsewhere(tmp_path, "--config=cifar1000", timeout=120)
  assert proc.returncode == 2 and proc.stderr.startswith("error: --config=cifar1000: ")
  assert len(proc.stderr.splitlines()) == 1


def test_accelerator_warning():
  from lplgrad_jax import launch
  from lplgrad_jax.configs import cifar100
  from lplgrad_jax.configs import digits

  paper = cifar100.get_config()
  # 200 epochs over 2500 + 5000 + ... + 20000 images, 1.68 GFLOP each: 30.2 PFLOP.
  assert launch.training_flops(paper) == pytest.approx(200 * 90000 * 3 * 0.56e9)
  warning = launch.accelerator_warning(paper, "cpu", environ={})
  assert warning.startswith("warning: JAX sees only the CPU, but this campaign (~30.2 PFLOP")
  assert "pip install -e '.[cuda" in warning and "'.[tpu]'" in warning and "\n" not in warning
  assert launch.accelerator_warning(paper, "gpu", environ={}) is None
  assert launch.accelerator_warning(paper, "cpu", environ={"JAX_PLATFORMS": "cpu"}) is None
  demo = digits.get_config()
  assert launch.accelerator_warning(demo, "cpu", environ={}) is None
  demo.distributed.initialize = True
  assert "config.distributed.initialize is set" in launch.accelerator_warning(demo, "cpu", {})


def test_first_line_says_how_far_the_workdir_got(tmp_path):
  import jax

  from lplgrad_jax import distributed
  from lplgrad_jax import launch
  from lplgrad_jax.configs import cifar10

  config = cifar10.get_config("low")
  assert distributed.device_summary() == f"{jax.device_count()} x cpu"
  line = launch.first_line(config, str(tmp_path), "8 x NVIDIA H100 80GB HBM3 (gpu)")
  assert line == (
    f"cifar10 (tfds), strategy lplgrad, 500 -> 5000 labeled in 10 rounds (+500 a "
    f"round); 8 x NVIDIA H100 80GB HBM3 (gpu); workdir {tmp_path} (new)"
  )
  results = {"config": config.to_dict(), "rounds": [{"round": 0}, {"round": 1}]}
  (tmp_path / "results.json").write_text(json.dumps(results))
  assert launch.first_line(config, str(tmp_path), "").endswith("(resuming after 2 of 10 rounds)")
  results["rounds"] *= 5
  (tmp_path / "results.json").write_text(json.dumps(results))
  assert launch.first_line(config, str(tmp_path), "").endswith(
    "(complete: 10 of 10 rounds done, nothing to train)"
  )


def test_ctrl_c_outside_a_campaign_is_one_line_and_exit_130():
  # What main, predict and the sweep share for a Ctrl-C outside a campaign's own handling
  # (start-up, between a sweep's campaigns): no traceback.
  program = (
    "from lplgrad_jax import cli\n"
    "def main(argv):\n"
    "  cli.start(argv)\n"
    "  raise KeyboardInterrupt\n"
    "cli.run(main)\n"
  )
  proc = run_cli("-c", program, module=None, timeout=120)
  assert proc.returncode == 130, proc.stderr[-3000:]
  assert proc.stderr.splitlines() == ["interrupted: rerun the same command to resume"]


# --- config_args: the config and its overrides checked before absl reads them ---


def _check(*argv):
  from lplgrad_jax import config_args
  from lplgrad_jax.errors import ConfigError

  try:
    config_args.check(list(argv), list(argv))
  except ConfigError as e:
    return str(e)
  return None


DIGITS = os.path.join(REPO_ROOT, "configs", "digits.py")


def test_config_args_accept_every_form_of_a_known_key():
  assert _check(f"--config={DIGITS}", "--config.train.epochs=3", "--noconfig.log.progress") is None
  assert _check("--config", DIGITS, "-config.seed", "4", "--", "--config.not_a_flag=1") is None


@pytest.mark.parametrize(
  "override, message",
  [
    ("--config.Train.epochs=3", "unknown configuration key 'Train' (did you mean 'train'?)"),
    ("--config.train.epoch=3", "key 'train.epoch' (did you mean 'train.epochs'?)"),
    ("--noconfig.log.progres", "key 'log.progres' (did you mean 'log.progress'?)"),
    ("--config.seed.x=1", "unknown configuration key 'seed.x': see configs/default.py"),
    ("--config.zzz=1", "unknown configuration key 'zzz': see configs/default.py"),
  ],
)
def test_config_args_name_the_unknown_key_and_the_closest(override, message):
  assert message in _check(f"--config={DIGITS}", override)


def test_config_args_locate_a_broken_config_file(tmp_path):
  broken = tmp_path / "broken.py"
  broken.write_text("import math\n\ndef get_config():\n  return math.nope\n")
  assert _check(f"--config={broken}") == (
    f"config file {broken}, line 4: AttributeError: module 'math' has no attribute 'nope'"
  )
  broken.write_text("def get_config():\n  return {\n")
  assert _check(f"--config={broken}").startswith(f"config file {broken}, line 2: SyntaxError")
  assert _check(f"--config={DIGITS}:low") == (
    f"--config={DIGITS}:low: this config takes no ':budget' suffix: "
    "expected --config=<file>.py alone"
  )
