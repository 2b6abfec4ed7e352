"""Your own images: an image folder (or an npz file), 32x32, with the recipe that learned best.

CDD's config at its low budget (the image-folder loader, pool normalisation, 50 epochs; 200
labels to start, 200 per round, R = 1000, 5 rounds: set al.* to yours), with two changes to the
authors' recipe, which the paper configs keep: on a few hundred images of one's own data these
learned at least as well, measured over seeds (experiments/results/own_data_recipe/README.md):
He-normal initialisation, and the ranking loss never reaching the main model (the loss head
learns on detached features from the first epoch).
Point data.root at a folder with train/<class>/* and test/<class>/*:
  --config.data.root=/path/to/photos      (or --config.data.source=npz --config.data.root=F.npz)
"""

from lplgrad_jax.configs import cdd


def get_config():
  config = cdd.get_config("low")
  config.data.name = "own_data"
  config.model.init = "he"
  config.train.detach_features_epoch = 0
  config.train.detach_rule = "from"
  return config
