"""CDD disaster photos (image folder, 6 classes, 32x32): B=500 R=1000 A=2500; low 200/1000/1000.

50 epochs, lr 0.01, decay at 40. Point data.root at a folder with
train/<class>/* and test/<class>/*:  --config.data.root=/path/to/cdd
"""

from lplgrad_jax.configs import default


def get_config(budget: str = "high"):
  config = default.get_config()
  config.data.source = "image_folder"
  config.data.name = "cdd"
  config.data.root = ""
  config.data.normalization = "pool"
  config.data.image_size = 32
  config.train.epochs = 50
  config.train.learning_rate = 0.01
  config.train.lr_milestones = (40,)
  config.train.detach_features_epoch = 30
  return default.set_budget(config, budget, high=(500, 1000, 2500), low=(200, 1000, 1000))
