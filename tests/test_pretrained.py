"""Pretrained weights (lplgrad_jax.pretrained): torchvision and timm state dicts loaded strictly
into the project's models, checked against golden outputs of hand-written PyTorch modules
with the same tensor names (experiments/pretrained_fixtures.py, which also checked those
modules against torchvision's and timm's own), and against the real libraries' names and
shapes (tests/data/pretrained/manifest.json)."""

import json
import os
import shutil
import sys
import zipfile

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import REPO_ROOT
from conftest import built
from conftest import forward
from conftest import tiny_config
from flax import nnx
from PIL import Image

from lplgrad_jax import campaign
from lplgrad_jax import config_checks
from lplgrad_jax import data
from lplgrad_jax import linear_probe
from lplgrad_jax import models
from lplgrad_jax import predict
from lplgrad_jax import pretrained
from lplgrad_jax import query
from lplgrad_jax.configs import default
from lplgrad_jax.errors import ConfigError
from lplgrad_jax.pretrained import timm_vit
from lplgrad_jax.pretrained import torchvision_resnet
from lplgrad_jax.pretrained.state_dict import load_entries

FIXTURES = os.path.join(REPO_ROOT, "tests", "data", "pretrained")
RESNET18 = os.path.join(FIXTURES, "resnet18_w4.safetensors")
RESNET50 = os.path.join(FIXTURES, "resnet50_w2.npz")
VIT = os.path.join(FIXTURES, "vit_d24.safetensors")
NUM_CLASSES = 10  # the fixtures' heads


@pytest.fixture(scope="module")
def expected():
  with np.load(os.path.join(FIXTURES, "expected.npz")) as f:
    return dict(f)


def _resnet_config(name="resnet18", width=4, weights=RESNET18):
  config = default.get_config().model
  config.name, config.width, config.stem, config.pretrained = name, width, "imagenet", weights
  return config


def _tiny_vit(image_size=32):
  vit = built(
    models.ViT,
    NUM_CLASSES,
    width=24,
    depth=2,
    heads=2,
    patch=8,
    mlp_ratio=4.0,
    exact_gelu=True,
    image_size=image_size,
  )
  return models.Backbone(vit, image_size)


def _eval_outputs(classifier, images):
  model = nnx.clone(classifier)
  model.eval()
  return forward(model, jnp.asarray(images))


def _relative_error(actual, reference):
  actual, reference = np.asarray(actual, np.float64), np.asarray(reference, np.float64)
  return np.linalg.norm(actual - reference) / np.linalg.norm(reference)


def _assert_golden(outputs, expected, name):
  logits, stages = outputs
  assert _relative_error(logits, expected[f"{name}/logits"]) < 1e-5
  assert len(stages) == sum(k.startswith(f"{name}/stage") for k in expected)
  for i, stage in enumerate(stages):
    assert _relative_error(stage, expected[f"{name}/stage{i}"]) < 1e-5, f"stage {i}"


@pytest.mark.parametrize(
  "name, width, weights",
  [("resnet18", 4, RESNET18), ("resnet50", 2, RESNET50)],
  ids=["resnet18_safetensors", "resnet50_npz"],
)
def test_torchvision_resnets_compute_what_pytorch_computes(name, width, weights, expected):
  learner = models.create_learner(
    _resnet_config(name, width, weights), NUM_CLASSES, use_aux=True, key=jax.random.key(0)
  )
  fixture = os.path.basename(weights).split(".")[0]
  _assert_golden(_eval_outputs(learner.classifier, expected["images"]), expected, fixture)


def test_timm_vit_computes_what_pytorch_computes(expected):
  vit = _tiny_vit()
  loaded = pretrained.load_pretrained(vit, VIT)
  assert loaded.tensors == 4 + 12 * 2 + 4 and loaded.head_kept == ""
  _assert_golden(_eval_outputs(vit, expected["images"]), expected, "vit_d24")


@pytest.mark.parametrize("image_size, grid", [(48, 6), (16, 2)])
def test_vit_positions_are_resampled_as_timm_does(image_size, grid, expected):
  vit = _tiny_vit(image_size)
  pretrained.load_pretrained(vit, VIT)
  np.testing.assert_allclose(
    vit.net.positions[...], expected[f"vit_d24/pos_embed_grid{grid}"], rtol=0, atol=1e-6
  )
  logits, _ = _eval_outputs(vit, np.zeros((1, image_size, image_size, 3), np.float32))
  assert logits.shape == (1, NUM_CLASSES) and np.all(np.isfinite(logits))


def test_a_head_for_other_classes_keeps_its_random_initialisation():
  key = jax.random.key(3)
  loaded = models.create_learner(_resnet_config(), 7, use_aux=True, key=key)
  scratch = models.create_learner(_resnet_config(weights=""), 7, use_aux=True, key=key)
  weights = pretrained.read_state_dict(RESNET18)
  np.testing.assert_array_equal(
    loaded.classifier.stem_conv.kernel[...], weights["conv1.weight"].transpose(2, 3, 1, 0)
  )
  np.testing.assert_array_equal(
    loaded.classifier.stages[3][1].bn2.var[...], weights["layer4.1.bn2.running_var"]
  )
  for part in ("head", "loss_head"):
    mine = nnx.state(loaded.classifier.head if part == "head" else loaded.loss_head)
    theirs = nnx.state(scratch.classifier.head if part == "head" else scratch.loss_head)
    jax.tree.map(np.testing.assert_array_equal, mine, theirs)


def _altered(tmp_path, change):
  arrays = dict(pretrained.read_state_dict(RESNET18))
  change(arrays)
  path = str(tmp_path / f"altered_{len(os.listdir(tmp_path))}.npz")
  np.savez(path, **arrays)
  return path


@pytest.mark.parametrize(
  "change, message",
  [
    (lambda a: a.pop("layer2.0.downsample.1.running_var"), "missing 1: layer2.0.downsample.1"),
    (lambda a: a.update(extra=np.zeros(1)), "unexpected 1: extra"),
    (
      lambda a: a.update({"layer1.0.conv1.weight": np.zeros((4, 4, 1, 1), np.float32)}),
      r"mis-shaped 1: layer1.0.conv1.weight \(4, 4, 1, 1\) \(expected \(4, 4, 3, 3\)\)",
    ),
    (lambda a: a.pop("fc.bias"), "missing 1: fc.bias"),
    (
      lambda a: a.update({"fc.weight": np.zeros((10, 3), np.float32)}),
      r"mis-shaped 1: fc.weight \(10, 3\) \(expected \(10, 32\)\)",
    ),
  ],
  ids=["missing", "unexpected", "misshaped", "half_a_head", "head_of_other_features"],
)
def test_a_file_that_does_not_fit_is_one_error_naming_each_tensor(change, message, tmp_path):
  path = _altered(tmp_path, change)
  config = _resnet_config(weights=path)
  with pytest.raises(ConfigError, match=message) as error:
    models.create_learner(config, NUM_CLASSES, use_aux=False, key=jax.random.key(0))
  assert "model.stem='imagenet'" in str(error.value)  # what to try


def test_the_cifar_stem_is_refused_with_the_tensor_and_a_hint():
  config = _resnet_config()
  config.stem = "cifar"
  with pytest.raises(ConfigError, match=r"mis-shaped 1: conv1.weight \(4, 3, 7, 7\).*'imagenet'"):
    models.create_learner(config, NUM_CLASSES, use_aux=False, key=jax.random.key(0))


def test_models_without_a_naming_are_refused():
  config = default.get_config().model
  config.name, config.width, config.pretrained = "wide_resnet28", 1, RESNET18
  with pytest.raises(ConfigError, match="no pretrained naming for WideResNet"):
    models.create_learner(config, NUM_CLASSES, use_aux=False, key=jax.random.key(0))


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_half_precision_files_are_upcast(dtype, tmp_path):
  from safetensors.numpy import save_file

  arrays = pretrained.read_state_dict(RESNET18)
  half = {n: a.astype(dtype) if a.dtype == np.float32 else a for n, a in arrays.items()}
  path = str(tmp_path / "half.safetensors")
  save_file(half, path)
  learner = models.create_learner(
    _resnet_config(weights=path), NUM_CLASSES, use_aux=False, key=jax.random.key(0)
  )
  kernel = learner.classifier.stages[1][0].conv2.kernel[...]
  assert kernel.dtype == jnp.float32
  np.testing.assert_array_equal(
    kernel, half["layer2.0.conv2.weight"].astype(np.float32).transpose(2, 3, 1, 0)
  )


def test_pytorch_files_need_pytorch_only_when_read(tmp_path, monkeypatch):
  path = tmp_path / "weights.pth"
  path.write_bytes(b"not read")
  monkeypatch.setitem(sys.modules, "torch", None)  # as where PyTorch is not installed
  with pytest.raises(ConfigError, match=r"needs PyTorch \(pip install torch\).*\.safetensors"):
    pretrained.read_state_dict(str(path))


def test_pytorch_files_load_through_pytorch(tmp_path):
  torch = pytest.importorskip("torch", reason="reading .pth files needs the optional PyTorch")
  arrays = pretrained.read_state_dict(RESNET18)
  path = str(tmp_path / "weights.pth")
  torch.save({"state_dict": {n: torch.from_numpy(a) for n, a in arrays.items()}}, path)
  read = pretrained.read_state_dict(path)
  assert read.keys() == arrays.keys()
  for name in arrays:
    np.testing.assert_array_equal(read[name], arrays[name])


@pytest.mark.parametrize(
  "name, content, message",
  [
    ("missing.safetensors", None, "no such file"),
    ("weights.h5", b"", r"unknown file type '.h5': expected one of .safetensors, .npz"),
    ("garbage.safetensors", b"\x00" * 16, "not a readable safetensors file"),
    ("garbage.npz", b"not a zip", "not a readable .npz file"),
    ("other_zip.npz", "notes.txt", "tensor 'notes.txt' holds bytes: expected numbers"),
    ("raw_bfloat16.npz", "bfloat16", "tensor 'w' holds \\|V2: expected numbers"),
  ],
)
def test_unreadable_files_are_one_clear_error(name, content, message, tmp_path):
  path = tmp_path / name
  if content == "notes.txt":  # a zip archive, but not of arrays
    with zipfile.ZipFile(path, "w") as archive:
      archive.writestr("notes.txt", "not an array")
  elif content == "bfloat16":  # np.savez keeps bfloat16 as raw two-byte records
    np.savez(path, w=np.ones(3, ml_dtypes.bfloat16))
  elif content is not None:
    path.write_bytes(content)
  with pytest.raises(ConfigError, match=rf"model.pretrained='.*{name}': {message}"):
    pretrained.read_state_dict(str(path))


def test_the_weights_normalisation_is_the_default_one():
  model = _resnet_config()
  imagenet = pretrained.normalization(model)
  assert imagenet == (pretrained.IMAGENET_MEAN, pretrained.IMAGENET_STD)
  model.name = "vit_s16"  # timm's default (augreg) weights: 0.5 and 0.5
  assert pretrained.normalization(model) == (pretrained.INCEPTION_MEAN, pretrained.INCEPTION_STD)
  model.pretrained = ""
  assert pretrained.normalization(model) is None
  dataset = data.Dataset("d", *(np.zeros((2, 8, 8, 3), np.uint8), np.zeros(2, np.int32)) * 2, ())
  config = default.get_config().data
  assert config.normalization == "auto"
  for choice, weights, want in [
    ("auto", imagenet, imagenet),
    ("auto", None, (config.mean, config.std)),
    ("fixed", imagenet, (config.mean, config.std)),
  ]:
    config.normalization = choice
    mean, std = data.input_normalization(config, dataset, weights)
    np.testing.assert_allclose(mean, want[0], rtol=1e-6)
    np.testing.assert_allclose(std, want[1], rtol=1e-6)


MANIFEST = os.path.join(FIXTURES, "manifest.json")
REAL_MODELS = {  # manifest entry: (model.name, image size)
  "torchvision.resnet18": ("resnet18", 64),
  "torchvision.resnet50": ("resnet50", 64),
  "timm.vit_small_patch16_224": ("vit_s16", 224),
}


@pytest.mark.parametrize("real", sorted(REAL_MODELS))
def test_the_real_names_and_shapes_load_strictly(real):
  with open(MANIFEST) as f:
    shapes = json.load(f)[real]
  name, image_size = REAL_MODELS[real]
  config = _resnet_config(name, 64, weights="")
  learner = models.create_learner(
    config, 1000, use_aux=False, key=jax.random.key(0), image_size=image_size
  )
  net = learner.classifier
  naming = timm_vit if name.startswith("vit") else torchvision_resnet
  entries = naming.entries(net.net if name.startswith("vit") else net)
  rng = np.random.default_rng(0)
  arrays = {n: rng.standard_normal(s, np.float32) for n, s in shapes.items()}
  loaded = load_entries(entries, arrays, real)
  assert loaded.tensors == len(entries) and loaded.head_kept == ""
  assert set(shapes) - set(entries) <= {n for n in shapes if n.endswith("num_batches_tracked")}


@pytest.fixture(scope="module")
def resnet18_learner():
  return models.create_learner(_resnet_config(), 3, use_aux=True, key=jax.random.key(1))


@pytest.mark.parametrize("model", ["resnet18", "vit"])
def test_linear_mode_features_give_the_full_models_outputs(model, resnet18_learner, expected):
  if model == "vit":
    learner = models.ActiveLearner(_tiny_vit(), None)
    pretrained.load_pretrained(learner.classifier, VIT)
    width = 24 * 2 + 24  # two pooled blocks, the class token after the final LayerNorm
  else:
    learner, width = resnet18_learner, (4 + 8 + 16 + 32) + 32  # four pooled stages, the pool
  images = (np.abs(expected["images"]) * 60).astype(np.uint8)
  normalization = pretrained.IMAGENET_MEAN, pretrained.IMAGENET_STD
  features = linear_probe.frozen_features(learner.classifier, images, normalization, 2)
  assert features.shape == (2, width) and features.dtype == np.float32
  probe = linear_probe.probe_of(learner)
  logits, stages = _eval_outputs(probe.classifier, features)
  mean, std = (np.asarray(a, np.float32) for a in normalization)
  full_logits, full_stages = _eval_outputs(
    learner.classifier, (images / np.float32(255) - mean) / std
  )
  np.testing.assert_allclose(logits, full_logits, rtol=1e-5, atol=1e-5)
  for pooled, stage in zip(stages, full_stages, strict=True):
    np.testing.assert_allclose(pooled, models.pool_feature(stage), rtol=1e-5, atol=1e-5)
  # A labeling folder without test/ has no test images: no features, the same width.
  empty = linear_probe.frozen_features(learner.classifier, images[:0], normalization, 2)
  assert empty.shape == (0, width)


@pytest.mark.parametrize("reduction", ["layer_sum", "frobenius"])
def test_linear_mode_scores_have_the_closed_form(reduction, resnet18_learner):
  probe = linear_probe.probe_of(resnet18_learner).classifier
  features = np.random.default_rng(0).standard_normal((6, 92), np.float32)
  closed = linear_probe.closed_form_scores(probe, jnp.asarray(features), reduction)
  for method in ("fast", "vmap"):
    scores = query.entropy_grad_norms(
      probe, features, reduction=reduction, method=method, chunk_size=6
    )
    np.testing.assert_allclose(scores, closed, rtol=2e-5)


def test_linear_mode_needs_pretrained_weights():
  config = tiny_config(**{"model.train_mode": "linear"})
  with pytest.raises(ConfigError, match="model.train_mode='linear' freezes the backbone"):
    config_checks.validate_config(config)


def _image_folder(root, classes=("ant", "bee", "cow"), per_class=(12, 4)):
  rng = np.random.default_rng(0)
  for split, count in zip(("train", "test"), per_class):
    for c, name in enumerate(classes):
      os.makedirs(root / split / name)
      for i in range(count):
        pixels = rng.integers(0, 256, (40, 40, 3), np.uint8) // 2 + 60 * c
        Image.fromarray(pixels.astype(np.uint8)).save(root / split / name / f"{i}.png")


@pytest.mark.parametrize("train_mode", ["finetune", "linear"])
def test_an_al_campaign_on_an_image_folder_starts_from_pretrained_weights(
  train_mode, tmp_path, monkeypatch, capsys
):
  _image_folder(tmp_path / "photos")
  config = tiny_config(
    **{
      "data.source": "image_folder",
      "data.root": str(tmp_path / "photos"),
      "data.image_size": 32,
      "data.normalization": "auto",
      "model.name": "resnet18",
      "model.stem": "imagenet",
      "model.pretrained": RESNET18,
      "model.train_mode": train_mode,
      "al.initial_size": 9,
      "al.query_size": 6,
      "al.subset_size": 20,
      "al.num_rounds": 2,
      "train.epochs": 1,
    }
  )
  weights = str(tmp_path / "resnet18.safetensors")
  shutil.copy(RESNET18, weights)
  config.model.pretrained = weights
  loads = []
  real_load = pretrained.load_pretrained
  monkeypatch.setattr(pretrained, "load_pretrained", lambda *a: loads.append(a) or real_load(*a))
  workdir = str(tmp_path / "w")
  results = campaign.run(config, workdir)
  said = capsys.readouterr().out
  assert f"pretrained weights: {weights} (torchvision names); its 10-class head is drawn " in said
  assert ("the backbone frozen (linear mode)" in said) == (train_mode == "linear")
  assert len(loads) == 2  # round 0, and round 1 afresh (train.reinit_each_round unset)
  assert [r["num_labeled"] for r in results["rounds"]] == [9, 15]
  assert all(np.isfinite(r["test_accuracy"]) for r in results["rounds"])
  normalization = results["data"]["normalization"]
  np.testing.assert_allclose(normalization["mean"], pretrained.IMAGENET_MEAN, rtol=1e-6)
  np.testing.assert_allclose(normalization["std"], pretrained.IMAGENET_STD, rtol=1e-6)
  if train_mode == "linear":  # resumes: the features again, the probe from its checkpoint
    config.al.num_rounds = 3
    results = campaign.run(config, workdir)
    assert [r["num_labeled"] for r in results["rounds"]] == [9, 15, 21]
  else:  # the checkpoint holds every weight: the predictor needs no weights file
    os.remove(weights)
  # The predictor classifies images with the trained weights (linear mode: the pretrained
  # backbone under the trained head) as the campaign evaluated them.
  model = predict.load_model(workdir)
  dataset = data.load_dataset(config.data)
  logits = query.model_outputs(model.learner, dataset.x_test, model.normalization, 8)["logits"]
  accuracy = float(np.mean(np.argmax(logits, -1) == dataset.y_test))
  assert accuracy == pytest.approx(results["rounds"][-1]["test_accuracy"])
