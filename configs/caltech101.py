"""Caltech-101 (TFDS): B=500 R=2000 A=3500; low 200/1000/1400; 50 epochs, lr 0.01 (x0.1 at 40).

Batch 80.

TFDS's train split holds only 3,060 images (30 per class), fewer than A, so
the pool is train + the first half of TFDS's test split and evaluation uses
the second half. Images are resized to 224x224 for the ImageNet stem.
"""

from lplgrad_jax.configs import default


def get_config(budget: str = "high"):
  config = default.get_config()
  config.data.name = "caltech101"
  # The authors' and Learning Loss's code hold constants for CIFAR-10 alone.
  config.data.normalization = "pool"
  config.data.train_split = "train+test[:50%]"
  config.data.test_split = "test[50%:]"
  config.data.image_size = 224
  config.model.stem = "imagenet"
  config.train.epochs = 50
  config.train.batch_size = 80
  config.train.eval_batch_size = 200
  config.train.learning_rate = 0.01
  config.train.lr_milestones = (40,)
  config.train.detach_features_epoch = 30
  config.train.crop_padding = 16
  config.query.chunk_size = 16
  return default.set_budget(config, budget, high=(500, 2000, 3500), low=(200, 1000, 1400))
