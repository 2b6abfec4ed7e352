"""CIFAR-100 (TFDS): B=2500 R=25000 A=20000; low budget 1000/15000/8000.

The same schedule as CIFAR-10.
"""

from lplgrad_jax.configs import default


def get_config(budget: str = "high"):
  config = default.get_config()
  config.data.name = "cifar100"
  # Learning Loss's code (main.py, beside its CIFAR-10 constants); the LPLgrad code has none.
  config.data.mean = (0.5071, 0.4867, 0.4408)
  config.data.std = (0.2675, 0.2565, 0.2761)
  return default.set_budget(config, budget, high=(2500, 25000, 20000), low=(1000, 15000, 8000))
