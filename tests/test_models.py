import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import built
from conftest import forward
from flax import nnx

from lplgrad_jax.errors import ConfigError
from lplgrad_jax.models import Layers
from lplgrad_jax.models import LossPredictionModule
from lplgrad_jax.models import ResNet18


@pytest.fixture(scope="module")
def model():
  return built(ResNet18, 7, width=4)


def test_cifar_stem_shapes(model):
  logits, features = forward(model, jnp.ones((3, 32, 32, 3)))
  assert logits.shape == (3, 7)
  assert [f.shape for f in features] == [
    (3, 32, 32, 4),
    (3, 16, 16, 8),
    (3, 8, 8, 16),
    (3, 4, 4, 32),
  ]


def test_imagenet_stem_shapes():
  model = built(ResNet18, 5, width=4, stem="imagenet")
  logits, features = forward(model, jnp.ones((2, 64, 64, 3)))
  assert logits.shape == (2, 5)
  assert [f.shape[1:3] for f in features] == [(16, 16), (8, 8), (4, 4), (2, 2)]


def test_parameter_tensors_match_pytorch_resnet18(model):
  # torchvision/kuangliu ResNet-18: 20 conv kernels, 20 BatchNorms (scale+bias), fc kernel+bias.
  params = nnx.state(model, nnx.Param)
  assert len(jax.tree.leaves(params)) == 62
  width = 64
  full = nnx.eval_shape(lambda: ResNet18(10, width=width, rngs=nnx.Rngs(0)))
  count = sum(x.size for x in jax.tree.leaves(nnx.state(full, nnx.Param)))
  assert count == 11_173_962  # the PyTorch CIFAR ResNet-18's parameter count


def test_eval_switches_batchnorm_to_inference():
  model = built(ResNet18, 3, width=4)
  x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
  stats_before = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
  forward(model, x)  # training mode updates the running statistics
  assert not np.allclose(
    jax.tree.leaves(stats_before)[0], jax.tree.leaves(nnx.state(model, nnx.BatchStat))[0]
  )
  model.eval()
  stats = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
  single, _ = forward(model, x[:1])
  batch, _ = forward(model, x)
  np.testing.assert_allclose(single[0], batch[0], rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(nnx.state(model, nnx.BatchStat))):
    np.testing.assert_array_equal(a, b)


def test_masked_batchnorm_ignores_padding():
  model = built(ResNet18, 3, width=4)
  x = jax.random.normal(jax.random.key(2), (5, 16, 16, 3))
  padded = jnp.concatenate([x, 100.0 * jnp.ones((3, 16, 16, 3))])
  mask = jnp.array([1.0] * 5 + [0.0] * 3)
  reference, _ = forward(built(ResNet18, 3, width=4), x)
  masked, _ = forward(model, padded, mask)
  np.testing.assert_allclose(masked[:5], reference, rtol=1e-4, atol=1e-5)


def test_loss_head_outputs_one_scalar_per_example(model):
  head = LossPredictionModule(model.stage_channels, hidden=16, rngs=nnx.Rngs(1))
  _, features = forward(model, jnp.ones((6, 32, 32, 3)))
  assert head(features).shape == (6,)
  assert [d.out_features for d in head.stage_dense] == [16] * 4
  assert head.out.in_features == 64


def test_unknown_stem_is_a_config_error():
  with pytest.raises(ConfigError, match="stem"):
    ResNet18(3, width=4, stem="vit", rngs=nnx.Rngs(0))


def test_pytorch_and_he_initialisation():
  # PyTorch's default (the authors' code): kaiming_uniform(a=sqrt(5)) weights and uniform
  # biases, both within +-1/sqrt(fan_in); BatchNorm scale 1, bias 0.
  def weights(init):
    model = built(ResNet18, 10, width=16, layers=Layers(init))
    return model, np.asarray(model.stages[2][0].conv1.kernel[...]), model.head

  model, kernel, head = weights("pytorch")
  bound = 1 / np.sqrt(3 * 3 * 32)  # fan_in of a 3x3 conv from 32 channels
  assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.95 * bound
  assert np.std(kernel) == pytest.approx(bound / np.sqrt(3), rel=0.05)  # uniform's std
  for leaf in (head.kernel[...], head.bias[...]):
    assert np.abs(leaf).max() <= 1 / np.sqrt(128) and np.std(leaf) > 0.5 / np.sqrt(3 * 128)
  np.testing.assert_array_equal(model.stem_bn.scale[...], 1.0)
  _, kernel, head = weights("he")  # He-normal fan_out: std sqrt(2 / (9 * 64))
  assert np.std(kernel) == pytest.approx(np.sqrt(2 / (9 * 64)), rel=0.05)
  np.testing.assert_array_equal(head.bias[...], 0.0)
  with pytest.raises(ConfigError, match="unknown model.init 'xavier'"):
    Layers("xavier")
  with pytest.raises(ConfigError, match="unknown model.bn_running_var 'none'"):
    Layers(bn_running_var="none")


@pytest.mark.parametrize("rule", ["unbiased", "biased"])
def test_batchnorm_running_variance(rule):
  # PyTorch updates the running variance with the unbiased batch variance (n/(n-1), n the
  # unmasked values per channel); the batch itself is normalised with the biased one.
  bn = Layers(bn_running_var=rule).batch_norm(3, nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(3), (6, 2, 2, 3)) * jnp.array([1.0, 2.0, 0.5]) + 1.0
  padded = jnp.concatenate([x, 50.0 * jnp.ones((2, 2, 2, 3))])
  y = bn(padded, mask=jnp.array([1] * 6 + [0] * 2).reshape(-1, 1, 1, 1).astype(bool))
  values = np.asarray(x, np.float64).reshape(-1, 3)
  var = values.var(0, ddof=1 if rule == "unbiased" else 0)
  np.testing.assert_allclose(bn.var[...], 0.9 * 1.0 + 0.1 * var, rtol=1e-5)
  np.testing.assert_allclose(bn.mean[...], 0.1 * values.mean(0), rtol=1e-5, atol=1e-7)
  normalised = (values - values.mean(0)) / np.sqrt(values.var(0) + 1e-5)
  np.testing.assert_allclose(np.asarray(y[:6]).reshape(-1, 3), normalised, rtol=1e-4, atol=1e-5)
