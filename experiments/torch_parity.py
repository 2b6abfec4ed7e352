"""Golden parity fixture: the authors' PyTorch recipe on the weights of a lplgrad_jax learner.

Builds a PyTorch mirror of the authors' code (github sgchr273/LPLgrad: models/resnet.py,
models/lossnet.py, main.py, config.py) at a small width: their CIFAR ResNet-18 (with its
unused `linear1`, `avg_pool2d(out4, 4)`), LossNet (fixed-size average pools), LossPredLoss,
two SGD optimizers (backbone and module; lr, momentum 0.9, weight decay 5e-4) with one
MultiStepLR each of which only the backbone's is stepped, detach when `epoch > EPOCHL`, and
the per-image query loop (`model.eval()`, batch 1, Categorical entropy, sum of per-tensor
gradient norms). It copies the weights of a fixed-seed lplgrad_jax learner (the project's
defaults) into the mirror and writes tests/data/torch_parity.npz: the inputs, the starting
weights, the PyTorch side's train-mode outputs on the first batch (logits, stage features,
predicted losses, joint loss), all parameters and BatchNorm statistics after one SGD step in
each of epochs 0, 1, 2 (EPOCHL = 0: the first step trains through the loss head, the other
two are detached; MILESTONES = [2]: the third is past the main model's decay while the
module keeps its rate), and per-image query scores in both reductions (layer_sum, the
authors'; frobenius, the paper's). No augmentation: both sides see the same batches.

tests/test_torch_parity.py checks lplgrad_jax against the fixture without PyTorch.
Regenerate it (only when the recipe is meant to change) with PyTorch installed:

  pip install torch  # or: pip install -e '.[torch]'
  python experiments/torch_parity.py [--out=tests/data/torch_parity.npz]

Arrays are stored in lplgrad_jax's layouts (NHWC, conv kernels HWIO, dense kernels
(in, out)) under the learner's state paths, e.g. "init/classifier/stem_conv/kernel".
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from lplgrad_jax import models  # noqa: E402
from lplgrad_jax.configs import default  # noqa: E402

FIXTURE = os.path.join(REPO_ROOT, "tests", "data", "torch_parity.npz")
NUM_CLASSES = 10
BATCH = 8
STEP_EPOCHS = (0, 1, 2)  # one SGD step (one batch) in each of these epochs
QUERY_IMAGES = 8
SEED = 0


def parity_config():
  """The project's defaults at width 4 on 32x32 CIFAR-10-normalised images; detach after
  epoch 0 and the main model's decay at epoch 2 so that three steps cross both."""
  config = default.get_config()
  config.model.width = 4
  config.model.loss_head_width = 16
  config.train.batch_size = BATCH
  config.train.lr_milestones = (2,)
  config.train.detach_features_epoch = 0
  config.train.augment = "none"
  return config


def _path(prefix: str, keys) -> str:
  path = f"{prefix}/{jax.tree_util.keystr(keys, simple=True, separator='/')}"
  return path.removesuffix("/value")  # an nnx Variable's own node


def flatten(tree, prefix: str) -> dict[str, np.ndarray]:
  """{prefix/state path: array} of a pytree (an nnx.State)."""
  return {_path(prefix, p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten(tree, prefix: str, arrays) -> object:
  """`tree` with its leaves replaced by (device copies of) arrays[prefix/path]. Copies: an
  nnx Variable holding a NumPy array would update it in place (BatchNorm statistics)."""
  return jax.tree_util.tree_map_with_path(lambda p, _: jnp.array(arrays[_path(prefix, p)]), tree)


def make_inputs(seed: int = SEED):
  """Random uint8 images (a batch per step, then the query images) and labels."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (len(STEP_EPOCHS) * BATCH + QUERY_IMAGES, 32, 32, 3), np.uint8)
  labels = rng.integers(0, NUM_CLASSES, len(STEP_EPOCHS) * BATCH).astype(np.int32)
  return (
    images[:-QUERY_IMAGES].reshape(len(STEP_EPOCHS), BATCH, 32, 32, 3),
    labels.reshape(len(STEP_EPOCHS), BATCH),
    images[-QUERY_IMAGES:],
  )


def jax_learner(config):
  """The fixed-seed learner, and its state split into params and BatchNorm statistics."""
  learner = models.create_learner(config.model, NUM_CLASSES, use_aux=True, key=jax.random.key(SEED))
  from flax import nnx

  _, params, stats = nnx.split(learner, nnx.Param, nnx.BatchStat)
  return learner, params, stats


def update_error(actual: dict, reference: dict, init: dict) -> float:
  """||actual - reference|| / ||reference - init|| over every "after/" array: the error of
  the whole update, relative to its size. One array's error can be a large fraction of a
  tiny, cancelling update (a BatchNorm bias next to another BatchNorm) in any float32
  implementation, PyTorch's included; the whole update's error cannot."""
  keys = [k for k in reference if k.startswith("after/")]
  diff = sum(np.sum(np.square(np.asarray(actual[k], np.float64) - reference[k])) for k in keys)
  size = sum(
    np.sum(np.square(reference[k] - init["init/" + k[6:]].astype(np.float64))) for k in keys
  )
  return float(np.sqrt(diff / size))


def _relative_error(actual, expected) -> float:
  """max |actual - expected| / max |expected|."""
  expected = np.asarray(expected, np.float64)
  return float(
    np.max(np.abs(np.asarray(actual, np.float64) - expected)) / max(np.max(np.abs(expected)), 1e-30)
  )


# --- the PyTorch side (imports torch) ---------------------------------------------------


def _torch_models(width: int, hidden: int):
  import torch
  import torch.nn.functional as F
  from torch import nn
  from torch_reference import BasicBlock  # the authors' block, as the benchmark runs it

  class ResNet(nn.Module):
    """Their ResNet-18 at `width`: returns (out, out_cons, out5, [out1..out4])."""

    def __init__(self):
      super().__init__()
      self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(width)
      cin, layers = width, []
      for i in range(4):
        cout = width * 2**i
        layers.append(
          nn.Sequential(BasicBlock(cin, cout, 1 if i == 0 else 2), BasicBlock(cout, cout, 1))
        )
        cin = cout
      self.layer1, self.layer2, self.layer3, self.layer4 = layers
      self.linear = nn.Linear(cin, NUM_CLASSES)
      self.linear1 = nn.Linear(cin, NUM_CLASSES)  # unused in their forward's loss

    def forward(self, x):
      out = F.relu(self.bn1(self.conv1(x)))
      out1 = self.layer1(out)
      out2 = self.layer2(out1)
      out3 = self.layer3(out2)
      out4 = self.layer4(out3)
      out5 = F.avg_pool2d(out4, 4).view(out4.size(0), -1)
      return self.linear(out5), self.linear1(out5), out5, [out1, out2, out3, out4]

  class LossNet(nn.Module):
    def __init__(self, feature_sizes=(32, 16, 8, 4)):
      super().__init__()
      self.gaps = nn.ModuleList([nn.AvgPool2d(s) for s in feature_sizes])
      self.fcs = nn.ModuleList([nn.Linear(width * 2**i, hidden) for i in range(4)])
      self.linear = nn.Linear(4 * hidden, 1)

    def forward(self, features):
      outs = [
        F.relu(fc(gap(f).view(f.size(0), -1))) for gap, fc, f in zip(self.gaps, self.fcs, features)
      ]
      return self.linear(torch.cat(outs, 1))

  return ResNet(), LossNet()


def _torch_names(width: int) -> dict[str, str]:
  """lplgrad_jax state path (without its prefix) -> the mirror's parameter/buffer name."""
  names = {}

  def conv_bn(jax_conv, jax_bn, torch_conv, torch_bn):
    names[f"classifier/{jax_conv}/kernel"] = f"backbone.{torch_conv}.weight"
    for j, t in (
      ("scale", "weight"),
      ("bias", "bias"),
      ("mean", "running_mean"),
      ("var", "running_var"),
    ):
      names[f"classifier/{jax_bn}/{j}"] = f"backbone.{torch_bn}.{t}"

  conv_bn("stem_conv", "stem_bn", "conv1", "bn1")
  for i in range(4):
    for j in range(2):
      jb, tb = f"stages/{i}/{j}", f"layer{i + 1}.{j}"
      conv_bn(f"{jb}/conv1", f"{jb}/bn1", f"{tb}.conv1", f"{tb}.bn1")
      conv_bn(f"{jb}/conv2", f"{jb}/bn2", f"{tb}.conv2", f"{tb}.bn2")
      if i > 0 and j == 0:
        conv_bn(f"{jb}/shortcut_conv", f"{jb}/shortcut_bn", f"{tb}.shortcut.0", f"{tb}.shortcut.1")
  for j, t in (("kernel", "weight"), ("bias", "bias")):
    names[f"classifier/head/{j}"] = f"backbone.linear.{t}"
    names[f"loss_head/out/{j}"] = f"module.linear.{t}"
    for i in range(4):
      names[f"loss_head/stage_dense/{i}/{j}"] = f"module.fcs.{i}.{t}"
  return names


def _to_torch_layout(a: np.ndarray) -> np.ndarray:
  return a.transpose(3, 2, 0, 1) if a.ndim == 4 else a.T if a.ndim == 2 else a


def _to_jax_layout(a: np.ndarray) -> np.ndarray:
  return a.transpose(2, 3, 1, 0) if a.ndim == 4 else a.T if a.ndim == 2 else a


def loss_pred_loss(predicted, target, margin):
  """Their LossPredLoss (reduction 'mean'): ties count as -1."""
  import torch

  assert len(predicted) % 2 == 0, "the batch size is not even."
  predicted = (predicted - predicted.flip(0))[: len(predicted) // 2]
  target = (target - target.flip(0))[: len(target) // 2].detach()
  one = 2 * torch.sign(torch.clamp(target, min=0)) - 1
  return torch.sum(torch.clamp(margin - one * predicted, min=0)) / predicted.size(0)


def torch_side(
  config, arrays: dict, images, labels, query_images, dtype: str, variant: str = "plain"
) -> dict:
  """Runs the authors' recipe from the weights in `arrays` ("init/..."); returns new arrays.

  `dtype` "float64": the network computes in float64 on the same float32 inputs and
  weights (the reference the fixture stores: PyTorch's own float32 rounding removed);
  "float32": as the authors ran it. `variant` (FLOAT32_VARIANTS: "+"-joined parts) changes
  only the rounding of float32 operations: "channels_last" runs NHWC kernels, "one_thread"
  sums on one thread, "reciprocal" normalises pixels by multiplying by 1/255 (as XLA does),
  "ulpN" moves a random half of the normalised inputs by one ulp (seed N): the rounding
  any two implementations may differ by.
  """
  import torch

  threads = torch.get_num_threads()
  torch.set_num_threads(1 if "one_thread" in variant.split("+") else threads)
  try:
    return _torch_side(config, arrays, images, labels, query_images, dtype, variant)
  finally:
    torch.set_num_threads(threads)


# Equally valid float32 runs of the same recipe: their spread from the float64 reference is
# how far float32 arithmetic honestly drifts on each array (the fixture's "drift/..." arrays).
FLOAT32_VARIANTS = (
  "plain",
  "channels_last",
  "one_thread",
  "reciprocal",
  "channels_last+reciprocal",
  *(f"ulp{seed}" for seed in range(4)),
  *(f"channels_last+ulp{seed}" for seed in range(4, 6)),
)


def _torch_side(config, arrays, images, labels, query_images, dtype, variant):
  import torch
  import torch.nn.functional as F
  from torch.distributions import Categorical

  torch.manual_seed(0)
  tc = config.train
  backbone, module = _torch_models(config.model.width, config.model.loss_head_width)
  backbone, module = backbone.to(getattr(torch, dtype)), module.to(getattr(torch, dtype))
  parts = variant.split("+")
  layout = torch.channels_last if "channels_last" in parts else torch.contiguous_format
  ulp_seeds = [int(p[3:]) for p in parts if p.startswith("ulp")]
  flips = np.random.default_rng(ulp_seeds[0] if ulp_seeds else 0)
  backbone = backbone.to(memory_format=layout)
  names = _torch_names(config.model.width)
  state = {
    **{f"backbone.{k}": v for k, v in backbone.state_dict().items()},
    **{f"module.{k}": v for k, v in module.state_dict().items()},
  }
  with torch.no_grad():
    for path, name in names.items():
      state[name].copy_(torch.from_numpy(np.array(_to_torch_layout(arrays[f"init/{path}"]))))
  mean, std = (torch.tensor(config.data[k]).view(1, 3, 1, 1) for k in ("mean", "std"))

  def normalise(x):  # ToTensor + Normalize, in float32 as torchvision's
    x = torch.from_numpy(x).permute(0, 3, 1, 2).float()
    x = x * torch.tensor(1 / 255) if "reciprocal" in parts else x.div(255)
    x = (x - mean) / std
    if ulp_seeds:
      direction = torch.from_numpy(
        flips.choice([-np.inf, 0.0, np.inf], x.shape, p=[0.25, 0.5, 0.25])
      )
      x = torch.where(direction == 0, x, torch.nextafter(x, direction.float()))
    return x.to(getattr(torch, dtype)).contiguous(memory_format=layout)

  optim_backbone = torch.optim.SGD(
    backbone.parameters(), lr=tc.learning_rate, momentum=tc.momentum, weight_decay=tc.weight_decay
  )
  optim_module = torch.optim.SGD(
    module.parameters(), lr=tc.learning_rate, momentum=tc.momentum, weight_decay=tc.weight_decay
  )
  sched_backbone = torch.optim.lr_scheduler.MultiStepLR(
    optim_backbone, milestones=list(tc.lr_milestones)
  )
  torch.optim.lr_scheduler.MultiStepLR(optim_module, milestones=list(tc.lr_milestones))
  out = {}
  for epoch in range(len(images)):  # train_LPL: one batch per epoch here (STEP_EPOCHS)
    backbone.train()
    module.train()
    step = epoch
    optim_backbone.zero_grad()
    optim_module.zero_grad()
    scores, _, _, features = backbone(normalise(images[step]))
    target_loss = F.cross_entropy(scores, torch.from_numpy(labels[step]).long(), reduction="none")
    if epoch > tc.detach_features_epoch:
      features = [f.detach() for f in features]
    pred_loss = module(features)
    pred_loss = pred_loss.view(pred_loss.size(0))
    backbone_loss = torch.sum(target_loss) / target_loss.size(0)
    module_loss = loss_pred_loss(pred_loss, target_loss, tc.margin)
    loss = backbone_loss + tc.aux_weight * module_loss
    if step == 0:
      out.update(
        {
          "forward/logits": scores,
          "forward/predicted": pred_loss,
          "forward/joint_loss": loss,
          "forward/main_loss": backbone_loss,
          "forward/aux_loss": module_loss,
        }
      )
      out.update({f"forward/features/{i}": f.permute(0, 2, 3, 1) for i, f in enumerate(features)})
    loss.backward()
    optim_backbone.step()
    optim_module.step()
    sched_backbone.step()  # their train_LPL never steps the module's scheduler
  state = {
    **{f"backbone.{k}": v for k, v in backbone.state_dict().items()},
    **{f"module.{k}": v for k, v in module.state_dict().items()},
  }
  out.update(
    {
      f"after/{path}": torch.from_numpy(_to_jax_layout(state[name].numpy()))
      for path, name in names.items()
    }
  )
  if len(query_images):
    out.update(_torch_query(backbone, normalise(query_images), Categorical))
  # Each in its own precision: the float64 reference is checked at float64 precision.
  return {k: v.detach().numpy() for k, v in out.items()}


def _torch_query(backbone, inputs, categorical) -> dict:
  """Their get_uncertainty / compute_gradnorm, one image at a time in eval mode."""
  import torch
  import torch.nn.functional as F

  backbone.eval()
  layer_sum, frobenius, logits = [], [], []
  for image in inputs:
    scores = backbone(image[None])[0]
    loss = categorical(probs=F.softmax(scores, dim=1)).entropy()
    backbone.zero_grad()
    loss.backward(retain_graph=True)
    norms = torch.stack([p.grad.norm() for p in backbone.parameters() if p.grad is not None])
    layer_sum.append(norms.sum())
    frobenius.append(norms.square().sum().sqrt())
    logits.append(scores[0])
  return {
    "query/logits": torch.stack(logits),
    "query/layer_sum": torch.stack(layer_sum),
    "query/frobenius": torch.stack(frobenius),
  }


def float32_drift(config, arrays, inputs, reference) -> dict[str, np.float64]:
  """{"drift/" + key: the largest relative error of PyTorch's float32 variants on key}."""
  drift = {}
  for variant in FLOAT32_VARIANTS:
    run = torch_side(config, arrays, *inputs, "float32", variant)
    errors = {k: _relative_error(run[k], v) for k, v in reference.items()}
    errors["update"] = update_error(run, reference, arrays)
    for k, e in errors.items():
      drift[f"drift/{k}"] = np.float64(max(drift.get(f"drift/{k}", 0.0), e))
    for kind in ("forward", "after", "query", "update"):
      worst = max(e for k, e in errors.items() if k.startswith(kind))
      print(f"{kind}: PyTorch float32 ({variant}) vs float64, largest relative error {worst:.2g}")
  return drift


FULL_WIDTH = 64


def full_width_config():
  """The paper's width: one joint step on the fixture's first batch."""
  config = parity_config()
  config.model.width = FULL_WIDTH
  config.model.loss_head_width = 128
  return config


def full_width_drift() -> dict[str, np.float64]:
  """{"drift/w64/update": how far PyTorch's float32 variants' one full-width step is from
  float64}: the bound the full-width test scales (its float64 side is lplgrad_jax's own,
  which the width-4 fixture ties to PyTorch's float64)."""
  config = full_width_config()
  images, labels, _ = make_inputs()
  _, params, stats = jax_learner(config)
  arrays = {**flatten(params, "init"), **flatten(stats, "init")}
  inputs = (images[:1], labels[:1], images[:0, 0])
  reference = torch_side(config, arrays, *inputs, "float64")
  worst = 0.0
  for variant in FLOAT32_VARIANTS:
    error = update_error(torch_side(config, arrays, *inputs, "float32", variant), reference, arrays)
    print(f"width {FULL_WIDTH}, one step: PyTorch float32 ({variant}) update error {error:.2g}")
    worst = max(worst, error)
  return {"drift/w64/update": np.float64(worst)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=FIXTURE)
  args = parser.parse_args()
  config = parity_config()
  images, labels, query_images = make_inputs()
  _, params, stats = jax_learner(config)
  arrays = {**flatten(params, "init"), **flatten(stats, "init")}
  reference = torch_side(config, arrays, images, labels, query_images, "float64")
  drift = float32_drift(config, arrays, (images, labels, query_images), reference)
  arrays.update(reference)
  arrays.update(drift)
  arrays.update(full_width_drift())
  arrays.update(
    {
      "images": images,
      "labels": labels,
      "query_images": query_images,
      "step_epochs": np.asarray(STEP_EPOCHS),
    }
  )
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  np.savez_compressed(args.out, **arrays)
  import torch

  print(
    f"wrote {args.out}: {len(arrays)} arrays, {os.path.getsize(args.out) / 1e3:.0f} kB "
    f"(torch {torch.__version__})"
  )


if __name__ == "__main__":
  main()
