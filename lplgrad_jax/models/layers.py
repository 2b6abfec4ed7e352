"""The layers every model is built from: PyTorch's initialisation and BatchNorm, as the authors'
code has them (kuangliu's CIFAR ResNet): convolutions without bias, explicit symmetric padding,
BatchNorm with PyTorch's momentum (0.1 <-> Flax 0.9) and epsilon."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from lplgrad_jax.errors import check_choice

# Activations and matmul inputs; parameters and BatchNorm statistics stay float32.
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def at_least_float32(x: jax.Array) -> jax.Array:
  """`x` in float32, or in float64 where it already is (the tests' float64 reference)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


_BN_MOMENTUM = 0.9
_BN_EPSILON = 1e-5
# model.init: "pytorch" (the authors' code: PyTorch's default for every conv and linear
# layer, kaiming_uniform(a=sqrt(5)), i.e. weights and biases uniform in +-1/sqrt(fan_in));
# "he": He-normal (fan_out) convolutions as torchvision, lecun_normal / zero-bias dense.
INITS = ("pytorch", "he")
# model.bn_running_var: "unbiased" (PyTorch: the running variance is updated with the batch
# variance times n/(n-1)); "biased" (Flax: the batch variance as normalised with).
BN_RUNNING_VARS = ("unbiased", "biased")
# bound sqrt(3 * scale / fan_in) = 1/sqrt(fan_in): PyTorch's kaiming_uniform(a=sqrt(5)).
_PYTORCH_KERNEL_INIT = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# He initialisation (fan_out) as in torchvision's ResNets.
_HE_CONV_INIT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def _pytorch_bias_init(fan_in: int):
  bound = 1.0 / fan_in**0.5
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


@dataclasses.dataclass(frozen=True)
class Layers:
  """Builds conv, dense and BatchNorm layers with one initialisation and running-variance rule."""

  init: str = "pytorch"
  bn_running_var: str = "unbiased"

  def __post_init__(self):
    check_choice(self.init, INITS, "model.init")
    check_choice(self.bn_running_var, BN_RUNNING_VARS, "model.bn_running_var")

  def conv(self, cin: int, cout: int, size: int, stride: int, rngs: nnx.Rngs) -> nnx.Conv:
    pad = (size - 1) // 2
    return nnx.Conv(
      cin,
      cout,
      kernel_size=(size, size),
      strides=(stride, stride),
      padding=((pad, pad), (pad, pad)),
      use_bias=False,
      kernel_init=_PYTORCH_KERNEL_INIT if self.init == "pytorch" else _HE_CONV_INIT,
      rngs=rngs,
    )

  def dense(self, cin: int, cout: int, rngs: nnx.Rngs) -> nnx.Linear:
    if self.init == "he":
      return nnx.Linear(cin, cout, rngs=rngs)
    return nnx.Linear(
      cin, cout, kernel_init=_PYTORCH_KERNEL_INIT, bias_init=_pytorch_bias_init(cin), rngs=rngs
    )

  def batch_norm(self, features: int, rngs: nnx.Rngs) -> BatchNorm:
    return BatchNorm(
      features,
      momentum=_BN_MOMENTUM,
      epsilon=_BN_EPSILON,
      unbiased_running_var=self.bn_running_var == "unbiased",
      rngs=rngs,
    )


class BatchNorm(nnx.BatchNorm):
  """Flax's BatchNorm (its parameters, statistics and inference) with PyTorch's training mode.

  Training mode computes the batch statistics once: the mean, then the variance as
  mean((x - mean)^2), as PyTorch does, not Flax's default E[x^2] - E[x]^2, which in
  float32 cancels wherever the mean is large against the spread (after every ReLU):
  about ten times the error, and an error that depends on how XLA:CPU sums on each
  machine (docs/cpu_numerics.md). The batch is normalised with the biased variance;
  with `unbiased_running_var` the running variance takes var * n / (n - 1), n the
  (unmasked) values per channel, as in PyTorch.
  """

  def __init__(self, features: int, *, unbiased_running_var: bool, **kwargs):
    super().__init__(features, use_fast_variance=False, **kwargs)
    self.unbiased_running_var = unbiased_running_var

  def __call__(self, x, use_running_average=None, *, mask=None):
    inference = self.use_running_average if use_running_average is None else use_running_average
    plain = self.axis_name is None and self.axis in (-1, x.ndim - 1)
    if inference or not plain or self.scale is None or self.bias is None:
      return super().__call__(x, use_running_average, mask=mask)
    x, scale, bias = self.promote_dtype((x, self.scale[...], self.bias[...]), dtype=self.dtype)
    values = at_least_float32(x)  # statistics in float32 also under a bfloat16 compute dtype
    axes = tuple(range(x.ndim - 1))
    where = None if mask is None else jnp.broadcast_to(mask, x.shape)
    mean = jnp.mean(values, axes, where=where)
    if self.use_fast_variance:  # Flax's default, kept for experiments/bench.py --bn_variance
      var = jnp.maximum(jnp.mean(jnp.square(values), axes, where=where) - jnp.square(mean), 0)
    else:
      var = jnp.mean(jnp.square(values - mean), axes, where=where)
    running_var = var
    if self.unbiased_running_var:
      n = x[..., 0].size if mask is None else jnp.sum(where[..., 0].astype(values.dtype))
      running_var = var * (n / jnp.maximum(n - 1, 1))
    m = self.momentum
    self.mean[...] = jax.lax.stop_gradient(m * self.mean[...] + (1 - m) * mean)
    self.var[...] = jax.lax.stop_gradient(m * self.var[...] + (1 - m) * running_var)
    y = (x - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
    return y.astype(self.dtype or jnp.result_type(x, scale, bias))


def projection(layers: Layers, cin: int, cout: int, stride: int, rngs: nnx.Rngs):
  """(1x1 conv, BatchNorm) of a residual shortcut where the shape changes, else (None, None)."""
  if stride == 1 and cin == cout:
    return None, None
  return layers.conv(cin, cout, 1, stride, rngs), layers.batch_norm(cout, rngs)
