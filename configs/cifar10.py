"""CIFAR-10 (TFDS): B=1000 R=25000 A=10000; low budget 500/5000/5000.

200 epochs, lr 0.1, decay at 160.
"""

from lplgrad_jax.configs import default


def get_config(budget: str = "high"):
  config = default.get_config()
  config.data.name = "cifar10"
  return default.set_budget(config, budget, high=(1000, 25000, 10000), low=(500, 5000, 5000))
