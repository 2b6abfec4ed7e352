"""Your photos, a pretrained backbone: an image folder at 224 px on torchvision's ResNet-18,
fine-tuned from its ImageNet weights (docs/pretrained.md).

  --config.data.root=/path/to/photos                  (train/<class>/*, test/<class>/*)
  --config.model.pretrained=/path/to/resnet18.safetensors  (or .npz; .pth with PyTorch)

own_data's budgets (200 labels to start, 200 per round, R = 1000, 5 rounds: set al.* to
yours). Images are normalised with ImageNet's statistics, as the weights were trained; each
round starts afresh from the pretrained weights (train.reinit_each_round unset) with a newly
drawn head for your classes; the backbone fine-tunes at a tenth of the head's rate. A starting point
from common fine-tuning practice, not tuned on a benchmark.
"""

from lplgrad_jax.configs import own_data


def get_config():
  config = own_data.get_config()
  config.data.name = "pretrained_folder"
  config.data.image_size = 224  # images are resized once, when the folder is read
  config.data.normalization = "auto"
  config.model.name = "resnet18"
  config.model.stem = "imagenet"
  config.model.width = 64
  config.model.pretrained = "resnet18.safetensors"  # a path of yours: see the docstring
  config.train.epochs = 30
  config.train.batch_size = 32
  config.train.learning_rate = 0.01
  config.train.backbone_learning_rate = 0.001
  config.train.lr_milestones = (24,)
  config.train.crop_padding = 28  # an eighth of the image, as 4 px of CIFAR's 32
  config.query.chunk_size = 32
  return config
