"""The PyTorch side of `bench.py --torch`: the authors' models and their ways of computing.

The CIFAR ResNet-18 (kuangliu's layout, as `lplgrad_jax.models.ResNet18`) and
Learning Loss's LossNet, with the three computations the JAX numbers are
compared against on the same machine:
  per_sample_loop   the authors' query: one backward per image (BatchNorm in
                    eval mode), the score the sum of per-tensor gradient norms
  func_vmap         torch.func.vmap(grad) over a batch: per-sample gradients
  train_step        one eager SGD step of main model + loss head (CE + margin
                    ranking loss), as in the authors' training loop
"""

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
  def __init__(self, cin, cout, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout)
    self.shortcut = nn.Sequential()
    if stride != 1 or cin != cout:
      self.shortcut = nn.Sequential(
        nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
      )

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNet18(nn.Module):
  """Returns (logits, [stage outputs]) like the JAX model."""

  def __init__(self, num_classes=10, width=64):
    super().__init__()
    self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    stages, cin = [], width
    for i in range(4):
      cout = width * 2**i
      stages.append(
        nn.Sequential(BasicBlock(cin, cout, 1 if i == 0 else 2), BasicBlock(cout, cout, 1))
      )
      cin = cout
    self.stages = nn.ModuleList(stages)
    self.linear = nn.Linear(cin, num_classes)

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    features = []
    for stage in self.stages:
      y = stage(y)
      features.append(y)
    return self.linear(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1)), features


class LossNet(nn.Module):
  def __init__(self, channels, hidden=128):
    super().__init__()
    self.fcs = nn.ModuleList([nn.Linear(c, hidden) for c in channels])
    self.out = nn.Linear(hidden * len(channels), 1)

  def forward(self, features):
    hidden = [
      F.relu(fc(torch.flatten(F.adaptive_avg_pool2d(f, 1), 1))) for fc, f in zip(self.fcs, features)
    ]
    return self.out(torch.cat(hidden, 1)).view(-1)


def entropy(logits):
  log_p = F.log_softmax(logits, dim=-1)
  return -(log_p.exp() * log_p).sum(-1)


def forward_backward(model, x):
  """The floor: one batched forward and backward of the summed entropy."""
  model.zero_grad(set_to_none=True)
  entropy(model(x)[0]).sum().backward()


def per_sample_loop(model, x):
  scores = []
  for image in x:
    model.zero_grad(set_to_none=True)
    entropy(model(image[None])[0]).sum().backward()
    scores.append(sum(p.grad.norm() for p in model.parameters() if p.grad is not None))
  return torch.stack(scores)


def func_vmap(model, x):
  from torch.func import functional_call
  from torch.func import grad
  from torch.func import vmap

  params = {k: v.detach() for k, v in model.named_parameters()}
  buffers = {k: v.detach() for k, v in model.named_buffers()}

  def image_entropy(p, image):
    return entropy(functional_call(model, (p, buffers), (image[None],))[0])[0]

  grads = vmap(grad(image_entropy), in_dims=(None, 0))(params, x)
  return sum(g.flatten(1).norm(dim=1) for g in grads.values())


def make_trainer(model, loss_net, lr=0.1):
  optimizer = torch.optim.SGD(
    list(model.parameters()) + list(loss_net.parameters()), lr=lr, momentum=0.9, weight_decay=5e-4
  )

  def train_step(x, y):
    optimizer.zero_grad(set_to_none=True)
    logits, features = model(x)
    per_example = F.cross_entropy(logits, y, reduction="none")
    predicted = loss_net(features)
    n = len(y) // 2
    sign = torch.where(per_example[:n] - per_example.flip(0)[:n] > 0, 1.0, -1.0).detach()
    aux = torch.clamp(1.0 - sign * (predicted[:n] - predicted.flip(0)[:n]), min=0).mean()
    (per_example.mean() + aux).backward()
    optimizer.step()

  return train_step
