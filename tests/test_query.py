import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import built
from conftest import forward
from flax import nnx

from lplgrad_jax import query
from lplgrad_jax.errors import ConfigError
from lplgrad_jax.models import ResNet18


def _trained_like(model):
  """Moves BatchNorm statistics and weights off their initial values, as training does."""
  forward(model, jax.random.normal(jax.random.key(5), (32, 16, 16, 3)) * 2.0 + 0.5)
  return model


@pytest.fixture(scope="module")
def model():
  return _trained_like(built(ResNet18, 10, width=4))


@pytest.fixture(scope="module")
def images():
  return np.asarray(jax.random.normal(jax.random.key(7), (7, 16, 16, 3)), np.float32)


def _reference_scores(model, images):
  """A plain loop of jax.grad, one image at a time, norms in float64 numpy."""
  inference = nnx.view(model, use_running_average=True)
  graphdef, params, rest = nnx.split(inference, nnx.Param, ...)

  def image_entropy(p, image):
    logits, _ = nnx.merge(graphdef, p, rest)(image[None])
    return query.entropy(logits)[0]

  image_grads = jax.jit(jax.grad(image_entropy))
  layer_sum, frobenius = [], []
  for image in images:
    grads = [np.asarray(g, np.float64) for g in jax.tree.leaves(image_grads(params, image))]
    layer_sum.append(sum(np.linalg.norm(g) for g in grads))
    frobenius.append(np.sqrt(sum(np.sum(g * g) for g in grads)))
  return np.array(layer_sum), np.array(frobenius)


def test_entropy():
  np.testing.assert_allclose(query.entropy(jnp.zeros((1, 4))), [np.log(4)], rtol=1e-6)
  assert float(query.entropy(jnp.array([[100.0, 0.0, 0.0]]))[0]) < 1e-6


@pytest.mark.parametrize("method", query.METHODS)
def test_scores_match_per_sample_grad_loop(method, model, images):
  layer_sum, frobenius = _reference_scores(model, images)
  # chunk_size 3 with 7 images: the last chunk is padded.
  got_sum = query.entropy_grad_norms(
    model, images, reduction="layer_sum", chunk_size=3, method=method
  )
  got_frob = query.entropy_grad_norms(
    model, images, reduction="frobenius", chunk_size=3, method=method
  )
  np.testing.assert_allclose(got_sum, layer_sum, rtol=1e-5)
  np.testing.assert_allclose(got_frob, frobenius, rtol=1e-5)
  assert np.all(got_frob < got_sum)  # triangle inequality over the 62 tensors


@pytest.fixture(scope="module")
def imagenet_model():
  model = built(ResNet18, 6, width=4, stem="imagenet", seed=3)
  forward(model, jax.random.normal(jax.random.key(4), (16, 32, 32, 3)) * 1.5 - 0.2)
  return model


@pytest.mark.parametrize("reduction", query.REDUCTIONS)
def test_fast_equals_vmap_for_the_imagenet_stem(reduction, imagenet_model):
  # 7x7/stride-2 stem and max-pool; a 32x32 input leaves 1x1 maps in the last stage, where
  # the Gram form is used (and the direct form in the first layers).
  model = imagenet_model
  images = np.asarray(jax.random.normal(jax.random.key(9), (5, 32, 32, 3)), np.float32)
  fast = query.entropy_grad_norms(model, images, reduction=reduction, method="fast", chunk_size=5)
  vmap = query.entropy_grad_norms(model, images, reduction=reduction, method="vmap", chunk_size=5)
  np.testing.assert_allclose(fast, vmap, rtol=1e-5)


# Chunks of 3 below, as in test_scores_match_per_sample_grad_loop: the float32 calls reuse
# its compiled scorer.


def test_scores_do_not_depend_on_the_batch(model, images):
  together = query.entropy_grad_norms(model, images, chunk_size=3)
  alone = np.concatenate(
    [query.entropy_grad_norms(model, images[i : i + 1], chunk_size=1) for i in range(len(images))]
  )
  np.testing.assert_allclose(together, alone, rtol=1e-5)


def test_uint8_images_are_normalised_inside(model):
  raw = np.asarray(jax.random.randint(jax.random.key(3), (4, 16, 16, 3), 0, 256), np.uint8)
  mean, std = np.array([0.5, 0.4, 0.3], np.float32), np.array([0.2, 0.25, 0.3], np.float32)
  normalised = ((raw / 255.0 - mean) / std).astype(np.float32)
  np.testing.assert_allclose(
    query.entropy_grad_norms(model, raw, normalization=(mean, std), chunk_size=3),
    query.entropy_grad_norms(model, normalised, chunk_size=3),
    rtol=1e-5,
  )


def test_query_leaves_the_model_unchanged(model, images):
  before = jax.tree.map(np.asarray, nnx.state(model))
  training = model.stem_bn.use_running_average
  query.entropy_grad_norms(model, images, chunk_size=3)
  assert model.stem_bn.use_running_average == training
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(nnx.state(model))):
    np.testing.assert_array_equal(a, b)


def test_unknown_reduction_and_method(model, images):
  with pytest.raises(ConfigError, match="reduction 'l1'"):
    query.entropy_grad_norms(model, images, reduction="l1")
  with pytest.raises(ConfigError, match="method 'loop'"):
    query.entropy_grad_norms(model, images, method="loop")


def test_bfloat16_scores_track_float32(model, images):
  # bf16 activations with fp32 sums: the fast and vmap methods see the same bf16 model and
  # agree closely; both stay within a few percent of fp32 (at width 4, with few channels
  # to average rounding over; docs/devices.md gives the error measured at width 64).
  fp32 = query.entropy_grad_norms(model, images, chunk_size=3)
  fast, vmap = (
    query.entropy_grad_norms(model, images, chunk_size=3, method=method, compute_dtype="bfloat16")
    for method in query.METHODS
  )
  assert fast.dtype == np.float32
  np.testing.assert_allclose(fast, vmap, rtol=1e-2)
  np.testing.assert_allclose(fast, fp32, rtol=0.1)
  assert not np.allclose(fast, fp32, rtol=1e-6)  # it really computed in bf16
  with pytest.raises(ConfigError, match="unknown compute dtype 'float16'"):
    query.entropy_grad_norms(model, images, compute_dtype="float16")
