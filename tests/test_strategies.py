import jax
import numpy as np
import pytest
from conftest import tiny_config

from lplgrad_jax import campaign
from lplgrad_jax import query
from lplgrad_jax import strategies
from lplgrad_jax.errors import ConfigError


class HandMadeContext(strategies.QueryContext):
  """A context whose 'model' outputs are written by the test."""

  def __init__(self, outputs, query_size, subset_ids=None):
    n = len(next(iter(outputs.values())))
    super().__init__(
      learner=None,
      dataset=None,
      subset_ids=np.arange(100, 100 + n) if subset_ids is None else subset_ids,
      query_size=query_size,
      key=jax.random.key(0),
      normalization=None,
      query_config=None,
    )
    self._outputs = outputs

  def outputs(self, ids):
    return {k: v[ids - 100] for k, v in self._outputs.items()}


def _logits(rows):
  return np.log(np.asarray(rows, np.float32))


def test_entropy_picks_the_uniform_predictions():
  logits = _logits(
    [
      [0.9, 0.05, 0.05],
      [1 / 3, 1 / 3, 1 / 3],
      [0.98, 0.01, 0.01],
      [0.4, 0.3, 0.3],
      [0.5, 0.5, 1e-6],
    ]
  )
  picked = strategies.get_strategy("entropy").select(HandMadeContext({"logits": logits}, 2))
  np.testing.assert_array_equal(picked.ids, [101, 103])


def test_margin_and_least_confidence():
  logits = _logits([[0.5, 0.49, 0.01], [0.4, 0.3, 0.3], [0.9, 0.05, 0.05]])
  ctx = HandMadeContext({"logits": logits}, 1)
  assert strategies.get_strategy("margin").select(ctx).ids.tolist() == [100]  # margin 0.01
  assert strategies.get_strategy("least_confidence").select(ctx).ids.tolist() == [101]  # max 0.4


def test_learning_loss_picks_the_largest_predicted_losses():
  ctx = HandMadeContext({"predicted_loss": np.array([0.1, 3.0, -2.0, 2.5, 0.7])}, 2)
  assert strategies.get_strategy("learning_loss").select(ctx).ids.tolist() == [101, 103]


def _greedy_reference(candidates, centers, k):
  min_d = np.min(((candidates[:, None] - centers[None]) ** 2).sum(-1), axis=1)
  picks = []
  for _ in range(k):
    j = int(np.argmax(min_d))
    picks.append(j)
    min_d = np.minimum(min_d, ((candidates - candidates[j]) ** 2).sum(-1))
  return picks


def test_k_center_greedy_matches_reference_and_radius_never_grows():
  rng = np.random.default_rng(0)
  candidates = rng.normal(size=(60, 5)).astype(np.float32)
  centers = rng.normal(size=(10, 5)).astype(np.float32)
  picks, radii = query.k_center_greedy(candidates, centers, 8, center_chunk=4)
  assert np.asarray(picks).tolist() == _greedy_reference(candidates, centers, 8)
  assert np.all(np.diff(np.asarray(radii)) <= 1e-6)
  # The first pick is the candidate farthest from every center.
  far = np.argmax(np.min(((candidates[:, None] - centers[None]) ** 2).sum(-1), 1))
  assert int(picks[0]) == far


def test_coreset_strategy_skips_points_near_the_labeled_set():
  embedding = np.array([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.01, 5.0], [-4.0, 0.0]], np.float32)
  ctx = HandMadeContext({"embedding": embedding}, 2, subset_ids=np.array([101, 102, 103]))
  ctx.labeled_ids = np.array([100, 104])  # (0, 0) and (-4, 0) are labeled
  # Farthest first: (5.01, 5); then (0.1, 0), 0.1 from a labeled point, beats (5, 5), 0.01
  # from the first pick.
  assert strategies.get_strategy("coreset").select(ctx).ids.tolist() == [103, 101]


def test_kmeans_plus_plus_picks_one_point_per_cluster():
  rng = np.random.default_rng(1)
  scale = np.tile(np.array([[1.0, -1.0]], np.float32), (30, 1))
  features = np.repeat(np.array([[10.0, 0.0], [0.0, 10.0], [-10.0, -10.0]], np.float32), 10, 0)
  features += rng.normal(scale=1e-3, size=features.shape).astype(np.float32)
  for seed in range(5):
    picks = np.asarray(query.kmeans_plus_plus(jax.random.key(seed), scale, features, 3))
    assert len(set(picks.tolist())) == 3
    assert sorted(p // 10 for p in picks) == [0, 1, 2]
  picks = np.asarray(query.kmeans_plus_plus(jax.random.key(0), scale, features, 30))
  assert sorted(picks.tolist()) == list(range(30))  # distinct even past the clusters
  norms = (scale**2).sum(1) * (features**2).sum(1)
  assert int(picks[0]) == int(np.argmax(norms))


def test_badge_distance_identity_matches_explicit_embeddings():
  rng = np.random.default_rng(2)
  scale = rng.normal(size=(6, 3)).astype(np.float32)
  features = rng.normal(size=(6, 4)).astype(np.float32)
  explicit = np.einsum("nc,nd->ncd", scale, features).reshape(6, -1)
  # With k=2 the second pick is D^2-sampled from distances to the first: compare those.
  first = int(np.argmax((explicit**2).sum(1)))
  expected = ((explicit - explicit[first]) ** 2).sum(1)
  norms = (scale**2).sum(1) * (features**2).sum(1)
  implicit = norms + norms[first] - 2 * (scale @ scale[first]) * (features @ features[first])
  np.testing.assert_allclose(implicit, expected, rtol=1e-4, atol=1e-4)
  assert int(query.kmeans_plus_plus(jax.random.key(0), scale, features, 1)[0]) == first


def test_aux_module_defaults_follow_the_strategy():
  assert strategies.uses_aux(tiny_config(strategy="lplgrad"))
  assert strategies.uses_aux(tiny_config(strategy="learning_loss"))
  assert not strategies.uses_aux(tiny_config(strategy="ent_gradnorm"))
  assert not strategies.uses_aux(tiny_config(strategy="entropy"))
  assert not strategies.uses_aux(tiny_config(strategy="lplgrad", **{"train.use_aux": False}))
  with pytest.raises(ConfigError, match="expected train.use_aux=True"):
    strategies.uses_aux(tiny_config(strategy="learning_loss", **{"train.use_aux": False}))


@pytest.mark.parametrize("name", sorted(strategies.STRATEGIES))
def test_every_strategy_selects_fresh_distinct_ids(name, tmp_path):
  results = campaign.run(tiny_config(strategy=name, **{"al.num_rounds": 2}), str(tmp_path))
  first, second = results["rounds"]
  queried = first["queried_ids"]
  assert len(queried) == len(set(queried)) == 10
  assert not set(queried) & set(first["labeled_ids"])
  assert set(second["labeled_ids"]) == set(first["labeled_ids"]) | set(queried)
