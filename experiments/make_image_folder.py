"""Writes an image folder (train/<class>/*.png, test/<class>/*.png) from an npz data set.

  python experiments/make_image_folder.py ../shared/data/cifar10_subset.npz /tmp/cifar_folder

The first 300 training and 100 test images of each class (the CIFAR-10 subset has 972 test
images in all): the folder experiments/results/own_data_recipe measured the recipes on.
"""

import os
import sys

import numpy as np
from PIL import Image

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PER_CLASS = {"train": 300, "test": 100}


def main(source: str, out: str) -> None:
  data = np.load(source)
  for split, count in PER_CLASS.items():
    images, labels = data[f"x_{split}"], data[f"y_{split}"]
    for label, name in enumerate(CLASSES):
      os.makedirs(os.path.join(out, split, name), exist_ok=True)
      for i in np.flatnonzero(labels == label)[:count]:
        Image.fromarray(images[i]).save(os.path.join(out, split, name, f"{i:05d}.png"))


if __name__ == "__main__":
  if len(sys.argv) != 3:
    sys.exit("error: expected two arguments: SOURCE.npz OUT_DIR")
  main(*sys.argv[1:])
