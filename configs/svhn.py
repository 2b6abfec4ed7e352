"""SVHN (TFDS svhn_cropped): B=1000 R=25000 A=10000; low 500/10000/5000.

50 epochs, lr 0.01, decay at 40.
"""

from lplgrad_jax.configs import default


def get_config(budget: str = "high"):
  config = default.get_config()
  config.data.name = "svhn_cropped"
  # The authors' and Learning Loss's code hold constants for CIFAR-10 alone.
  config.data.normalization = "pool"
  config.train.epochs = 50
  config.train.learning_rate = 0.01
  config.train.lr_milestones = (40,)
  config.train.detach_features_epoch = 30
  config.train.augment = "crop"  # digits are not mirror-symmetric
  return default.set_budget(config, budget, high=(1000, 25000, 10000), low=(500, 10000, 5000))
