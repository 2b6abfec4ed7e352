"""The shared real CIFAR-10 subset (5,085 train / 1,017 test images, npz): sweeps, benchmarks.

Initial 500, query 500, 6 rounds (500 -> 3,000 labeled), subset R = 2,500.
Point data.root elsewhere if the file is not at ../shared/data/ beside the repo.
"""

import os

from lplgrad_jax.configs import default

_SHARED = os.path.join(
  os.path.dirname(os.path.dirname(os.path.realpath(__file__))),
  "..",
  "shared",
  "data",
  "cifar10_subset.npz",
)


def get_config(budget: str = "high"):
  if budget != "high":  # one budget row for this subset (the sweep passes "high")
    raise ValueError(
      f"configs/cifar10_subset.py has one budget row: expected no ':{budget}' suffix"
    )
  config = default.get_config()
  config.data.source = "npz"
  config.data.name = "cifar10_subset"
  config.data.root = os.path.normpath(_SHARED)
  config.data.class_names = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
  )
  config.al.initial_size = 500
  config.al.query_size = 500
  config.al.subset_size = 2500
  config.al.num_rounds = 6
  return config
