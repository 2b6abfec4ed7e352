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

_WORKDIR = flags.DEFINE_string("workdir", None, "A campaign's workdir.", required=True)
_CONFIG = config_flags.DEFINE_config_file("config", "configs/digits.py", "Its config file.")
_IMAGES = flags.DEFINE_integer("images", 2000, "Pool images to score.")


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
  """Scores `pool` with the checkpoint's classifier in float32 and in bfloat16; compares them."""
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
