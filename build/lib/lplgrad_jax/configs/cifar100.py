"""CIFAR-100 (TFDS): B=2500 R=25000 A=20000; low budget 1000/15000/8000. Same schedule as CIFAR-10."""

from lplgrad_jax.configs import default


def get_config(budget: str = "high"):
  config = default.get_config()
  config.data.name = "cifar100"
  return default.set_budget(config, budget, high=(2500, 25000, 20000), low=(1000, 15000, 8000))
