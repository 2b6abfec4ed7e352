"""Writes a data set, from any source, as a folder the npy route reads memory-mapped.

  python -m lplgrad_jax.convert --config=configs/cdd.py --config.data.root=/data/cdd \\
      --out=/data/cdd_npy [--chunk_size=1024]

then run campaigns on it with `--config.data.source=npy --config.data.root=/data/cdd_npy`.
Image folders and TFDS data sets are read and written a chunk of images at a time, so the
data set may be larger than memory; the training images' per-channel statistics come from the
same pass (meta.json). The images are written at `data.image_size`. The folder appears only
when complete (it is written as <out>.partial first), and an existing one is never touched.
"""

from __future__ import annotations

from absl import app
from absl import flags
from ml_collections import config_flags
from tqdm.auto import tqdm

from lplgrad_jax import cli
from lplgrad_jax import data
from lplgrad_jax import errors
from lplgrad_jax.errors import ConfigError


def convert(data_config, out: str, chunk_size: int = 1024, progress: bool = True) -> dict:
  """Writes the data set `data_config` names into the new folder `out` (npy layout); returns
  what meta.json holds."""
  if chunk_size < 1:
    raise ConfigError(f"--chunk_size={chunk_size}: expected a positive integer")
  out = data.check_out(out)  # before a data set is read (or downloaded)
  name, class_names, splits = data.source_splits(data_config)

  def bar(total: int, split: str):
    return tqdm(
      total=total, desc=f"{name} {split}", unit="image", leave=False, disable=not progress
    )

  return data.write_npy(out, class_names, splits, chunk_size, bar)


def _define_flags() -> None:
  """Defined only when run as a program: importing this module for `convert()` must not clash
  with the flags of other programs (main's --config)."""
  flags.DEFINE_string("out", None, "The folder to write (new, or empty).")
  flags.DEFINE_integer("chunk_size", 1024, "Images read and written at a time.")
  config_flags.DEFINE_config_file(
    "config", None, "The config whose data.* names the data set (a file or a shipped name)."
  )
  flags.mark_flags_as_required(["config", "out"])


def main(argv):
  cli.start(argv)
  config, out = flags.FLAGS.config, flags.FLAGS.out
  try:
    meta = convert(config.data, out, flags.FLAGS.chunk_size)
  except ConfigError as e:
    errors.exit_with(e)
  except OSError as e:  # a folder that cannot be written, a full disk
    errors.exit_with(ConfigError(f"cannot write --out={out}: {e}"))
  print(
    f"wrote {out}: {meta['num_train']} training and {meta['num_test']} test images, "
    f"{len(meta['class_names'])} classes, {config.data.image_size} px; run with "
    f"--config.data.source=npy --config.data.root={out}"
  )


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=lambda argv: cli.parse_config_flags(argv)[0])
