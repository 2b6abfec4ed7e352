"""How far bfloat16 query scores are from float32 ones, on a trained model.

  python experiments/bf16_error.py --workdir=workdirs/demo [--config=configs/digits.py] \
      [--images=2000]

Scores the first --images pool images of the campaign in --workdir (its
newest checkpoint) with `entropy_grad_norms` in float32 and in bfloat16 and
prints the relative error of the scores, their Spearman rank correlation, and
how many of the top-k picks (k = the campaign's query size) agree.
"""

import json
import os
import sys

from absl import app
from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from measure import score_error  # noqa: E402 - shared with accelerator_check.py

_WORKDIR = flags.DEFINE_string("workdir", None, "A campaign's workdir.", required=True)
_CONFIG = config_flags.DEFINE_config_file("config", "configs/digits.py", "Its config file.")
_IMAGES = flags.DEFINE_integer("images", 2000, "Pool images to score.")


def main(_):
  absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs its restores at INFO
  from lplgrad_jax import data
  from lplgrad_jax import predict

  model = predict.load_model(_WORKDIR.value)
  config = _CONFIG.value
  pool = data.load_dataset(config.data).x_train[: _IMAGES.value]
  report = {"width": config.model.width, "rounds_trained": model.rounds_trained}
  report.update(score_error(model, pool, config.query, config.al.query_size))
  print(json.dumps(report, indent=1))


if __name__ == "__main__":
  app.run(main)
