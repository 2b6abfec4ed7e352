"""Every random stream of a campaign, derived from its seed along a path of `fold_in`s.

A stream depends on (seed, purpose, round, ...) alone, never on the draws made before it:
a campaign resumed from any checkpoint draws what the uninterrupted one drew.
"""

from __future__ import annotations

import jax
import numpy as np

# Purposes folded into the seed, so each stream is independent of the others.
INITIAL_SET, MODEL_INIT, TRAIN, QUERY = range(4)


def derive_key(seed: int, *path: int) -> jax.Array:
  key = jax.random.key(seed)
  for p in path:
    key = jax.random.fold_in(key, p)
  return key


def initial_labeled_set(seed: int, pool_size: int, size: int) -> np.ndarray:
  """The first round's labeled ids (sorted), when the data set's labels are revealed."""
  perm = jax.random.permutation(derive_key(seed, INITIAL_SET), pool_size)
  return np.sort(np.asarray(perm[:size]))


def model_init_key(seed: int, round_index: int) -> jax.Array:
  """The initial weights: round 0's, or a later round's where each round starts anew."""
  return derive_key(seed, MODEL_INIT, round_index)


def epoch_key(seed: int, round_index: int, epoch: int) -> jax.Array:
  """One epoch's order and augmentation."""
  return derive_key(seed, TRAIN, round_index, epoch)


def random_subset(seed: int, round_index: int, unlabeled: np.ndarray, size: int) -> np.ndarray:
  """The random subset R of the unlabeled pool scored in one round."""
  perm = jax.random.permutation(derive_key(seed, QUERY, round_index, 0), len(unlabeled))
  return unlabeled[np.asarray(perm[:size])]


def strategy_key(seed: int, round_index: int) -> jax.Array:
  """What a strategy draws in one round's query (k-means++, random picks)."""
  return derive_key(seed, QUERY, round_index, 1)
