"""Query strategies, chosen by `config.strategy` from a registry.

A strategy maps a `QueryContext` (the trained learner, the random subset R of
the unlabeled pool, the budget B') to the ids it selects. Uncertainty and
loss-prediction strategies are one score function each over the shared
`query.model_outputs`; the gradient and diversity strategies call their
scorer or selector in `query`.

Each strategy also says whether its campaign trains the loss-prediction
module by default (`config.train.use_aux=None`): LPLgrad and Learning Loss
do, the others train the main model alone (Ent-GradNorm is LPLgrad's query
without it). An explicit `config.train.use_aux` overrides that, except that
Learning Loss cannot query without its module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import numpy as np
from flax import nnx

from lplgrad_jax import query
from lplgrad_jax import sharding
from lplgrad_jax.chunks import SplitRows
from lplgrad_jax.data import Dataset
from lplgrad_jax.data.rows import Rows
from lplgrad_jax.data.rows import lazy_rows
from lplgrad_jax.errors import ConfigError
from lplgrad_jax.errors import check_choice


@dataclasses.dataclass
class QueryContext:
  learner: nnx.Module  # ActiveLearner: .classifier and optional .loss_head
  dataset: Dataset
  subset_ids: np.ndarray  # the random subset R of the unlabeled pool
  query_size: int  # B'
  key: jax.Array  # randomness for this round's query
  normalization: tuple[np.ndarray, np.ndarray]
  query_config: object  # config.query
  labeled_ids: np.ndarray | None = None  # the labeled set (Coreset's initial centers)
  progress: bool = False
  pool_split: bool = False  # each process holds its rows of the pool alone (data.shard_pool)
  mesh: object = None  # the devices the pool is split over

  def images(self, ids: np.ndarray) -> np.ndarray | Rows | SplitRows:
    """uint8 pool images by id: from host memory (from disk as they are used, for a
    memory-mapped pool), or, where each process holds only its part of the pool
    (data.shard_pool), each process's own ones for its own devices."""
    if self.pool_split:
      x, mesh = self.dataset, self.mesh
      return SplitRows(x.x_train, x.first_row, ids, mesh, sharding.pool_blocks(mesh, x.num_train))
    return lazy_rows(self.dataset.x_train, ids)

  def outputs(self, ids: np.ndarray) -> dict[str, np.ndarray]:
    return query.model_outputs(
      self.learner, self.images(ids), self.normalization, self.query_config.chunk_size
    )


@dataclasses.dataclass
class Selection:
  ids: np.ndarray  # selected ids, best first
  scores: np.ndarray | None = None  # the scores of the whole subset, if any


@dataclasses.dataclass(frozen=True)
class Strategy:
  select: Callable[[QueryContext], Selection]
  trains_aux: bool = False  # default of config.train.use_aux
  needs_aux: bool = False  # the query reads the loss head


STRATEGIES: dict[str, Strategy] = {}


def register(name: str, *, trains_aux: bool = False, needs_aux: bool = False):
  if name in STRATEGIES:
    raise ValueError(f"strategy {name!r} is already registered")

  def decorator(fn):
    STRATEGIES[name] = Strategy(fn, trains_aux=trains_aux or needs_aux, needs_aux=needs_aux)
    return fn

  return decorator


def get_strategy(name: str) -> Strategy:
  return STRATEGIES[check_choice(name, sorted(STRATEGIES), "strategy")]


def uses_aux(config) -> bool:
  """Whether the campaign of `config` trains the loss-prediction module."""
  strategy = get_strategy(config.strategy)
  use_aux = config.train.use_aux
  if use_aux is None:
    return strategy.trains_aux
  if strategy.needs_aux and not use_aux:
    raise ConfigError(
      f"strategy {config.strategy!r} queries with the loss-prediction module: "
      "expected train.use_aux=True (or unset)"
    )
  return bool(use_aux)


def top_scores(ctx: QueryContext, scores: np.ndarray) -> Selection:
  """The B' highest-scoring ids of the subset; ties keep subset order."""
  order = np.argsort(-scores, kind="stable")[: ctx.query_size]
  return Selection(ctx.subset_ids[order], scores)


def _register_output_score(name: str, score_fn, *, needs_aux: bool = False):
  """A strategy that labels the top scores of one function of the model outputs."""
  register(name, needs_aux=needs_aux)(
    lambda ctx: top_scores(ctx, np.asarray(score_fn(ctx.outputs(ctx.subset_ids))))
  )


_register_output_score("entropy", lambda out: query.entropy(out["logits"]))
_register_output_score("margin", lambda out: -query.margin(out["logits"]))
_register_output_score("least_confidence", lambda out: 1.0 - query.max_probability(out["logits"]))
_register_output_score("learning_loss", lambda out: out["predicted_loss"], needs_aux=True)


@register("random")
def random_query(ctx: QueryContext) -> Selection:
  picked = jax.random.choice(ctx.key, len(ctx.subset_ids), (ctx.query_size,), replace=False)
  return Selection(ctx.subset_ids[np.asarray(picked)])


def _entropy_grad_norm_query(ctx: QueryContext) -> Selection:
  scores = query.entropy_grad_norms(
    ctx.learner.classifier,
    ctx.images(ctx.subset_ids),
    reduction=ctx.query_config.reduction,
    method=ctx.query_config.method,
    chunk_size=ctx.query_config.chunk_size,
    compute_dtype=ctx.query_config.compute_dtype,
    normalization=ctx.normalization,
    progress=ctx.progress,
  )
  return top_scores(ctx, scores)


# The same query; they differ in training (with / without the loss-prediction module).
register("lplgrad", trains_aux=True)(_entropy_grad_norm_query)
register("ent_gradnorm")(_entropy_grad_norm_query)


@register("coreset")
def coreset_query(ctx: QueryContext) -> Selection:
  """k-center greedy on penultimate features, the labeled set as initial centers."""
  candidates = ctx.outputs(ctx.subset_ids)["embedding"]
  centers = ctx.outputs(ctx.labeled_ids)["embedding"]
  picks, _ = query.k_center_greedy(candidates, centers, ctx.query_size)
  return Selection(ctx.subset_ids[np.asarray(picks)])


@register("badge")
def badge_query(ctx: QueryContext) -> Selection:
  """k-means++ seeding on last-layer gradient embeddings (Ash et al., 2020)."""
  out = ctx.outputs(ctx.subset_ids)
  probs = jax.nn.softmax(out["logits"], axis=-1)
  scale = probs - jax.nn.one_hot(np.argmax(out["logits"], -1), probs.shape[-1])
  picks = query.kmeans_plus_plus(ctx.key, scale, out["embedding"], ctx.query_size)
  return Selection(ctx.subset_ids[np.asarray(picks)])
