"""The embedded default: scikit-learn's real 8x8 digits upsampled to 16x16, a narrow ResNet-18.

Runs a whole LPLgrad campaign in a few minutes on a 2-core CPU (`make demo`).
"""

from lplgrad_jax.configs import default


def get_config():
  config = default.get_config()
  config.data.source = "digits"
  config.data.name = "digits"
  config.data.image_size = 16
  config.data.normalization = "pool"
  config.model.width = 16
  config.train.epochs = 30
  config.train.batch_size = 64
  config.train.learning_rate = 0.05
  config.train.lr_milestones = (24,)
  config.train.detach_features_epoch = 18
  config.train.augment = "crop"  # digits are not mirror-symmetric
  config.train.crop_padding = 2
  config.al.initial_size = 50
  config.al.query_size = 50
  config.al.subset_size = 500
  config.al.num_rounds = 6
  config.query.chunk_size = 50
  return config
