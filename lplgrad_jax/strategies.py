"""Query strategies, chosen by `config.strategy` from a registry.

A strategy maps a `QueryContext` (the trained learner, the random subset R of
the unlabeled pool, the budget B') to the ids it selects. Scoring strategies
share `_top_scores`; each is a small function over the scorers in `query`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import numpy as np
from flax import nnx

from lplgrad_jax import query
from lplgrad_jax.data import Dataset
from lplgrad_jax.errors import ConfigError


@dataclasses.dataclass
class QueryContext:
  learner: nnx.Module          # ActiveLearner: .classifier and optional .loss_head
  dataset: Dataset
  subset_ids: np.ndarray       # the random subset R of the unlabeled pool
  query_size: int              # B'
  key: jax.Array               # randomness for this round's query
  normalization: tuple[np.ndarray, np.ndarray]
  query_config: object         # config.query
  progress: bool = False


@dataclasses.dataclass
class Selection:
  ids: np.ndarray                    # selected ids, best first
  scores: np.ndarray | None = None   # the scores of the whole subset, if any


Strategy = Callable[[QueryContext], Selection]
STRATEGIES: dict[str, Strategy] = {}


def register(name: str):
  def decorator(fn: Strategy) -> Strategy:
    STRATEGIES[name] = fn
    return fn
  return decorator


def get_strategy(name: str) -> Strategy:
  if name not in STRATEGIES:
    raise ConfigError(f"unknown strategy {name!r}: expected one of {', '.join(sorted(STRATEGIES))}")
  return STRATEGIES[name]


def _top_scores(ctx: QueryContext, scores: np.ndarray) -> Selection:
  """The B' highest-scoring ids of the subset; ties keep subset order."""
  order = np.argsort(-scores, kind="stable")[:ctx.query_size]
  return Selection(ctx.subset_ids[order], scores)


@register("random")
def random_query(ctx: QueryContext) -> Selection:
  picked = jax.random.choice(ctx.key, len(ctx.subset_ids), (ctx.query_size,), replace=False)
  return Selection(ctx.subset_ids[np.asarray(picked)])


@register("lplgrad")
def lplgrad_query(ctx: QueryContext) -> Selection:
  scores = query.entropy_grad_norms(
      ctx.learner.classifier, ctx.dataset.x_train[ctx.subset_ids],
      reduction=ctx.query_config.reduction, chunk_size=ctx.query_config.chunk_size,
      normalization=ctx.normalization, progress=ctx.progress)
  return _top_scores(ctx, scores)
