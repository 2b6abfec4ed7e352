"""Run by test_sharding.py in a process with 4 CPU devices (XLA_FLAGS set before JAX starts)."""

import json
import os
import sys

import jax
import numpy as np
from conftest import built
from conftest import forward
from conftest import tiny_config

from lplgrad_jax import campaign
from lplgrad_jax import models
from lplgrad_jax import query
from lplgrad_jax import sharding
from lplgrad_jax import train


def query_scores():
  model = built(models.ResNet18, 10, width=4)
  forward(model, jax.random.normal(jax.random.key(5), (32, 16, 16, 3)))
  images = np.asarray(jax.random.normal(jax.random.key(7), (10, 16, 16, 3)), np.float32)
  one = sharding.data_mesh(jax.devices()[:1])
  return {
    method: [
      query.entropy_grad_norms(model, images, method=method, chunk_size=8).tolist(),
      query.entropy_grad_norms(model, images, method=method, chunk_size=8, mesh=one).tolist(),
    ]
    for method in query.METHODS
  }


def train_params():
  """Parameters after 3 data-parallel steps on 4 devices and on 1, from the same start."""
  config = tiny_config()
  pool = np.asarray(jax.random.randint(jax.random.key(1), (64, 16, 16, 3), 0, 256), np.uint8)
  labels = np.asarray(jax.random.randint(jax.random.key(2), (64,), 0, 10), np.int32)
  out = []
  for mesh in (sharding.data_mesh(), sharding.data_mesh(jax.devices()[:1])):
    learner = models.create_learner(config.model, 10, use_aux=True, key=jax.random.key(0))
    cfg = train.StepConfig.from_config(config.train, 64, use_aux=True, mesh=mesh)
    graphdef, state = train.create_train_state(learner, cfg)
    state = sharding.replicate(state, mesh)
    ids = sharding.replicate(np.arange(64, dtype=np.int32), mesh)
    device_pool = train.Pool(
      *sharding.replicate((pool, labels, np.zeros(3, np.float32), np.ones(3, np.float32)), mesh)
    )
    plan = train.plan_epoch(cfg, ids, 48, jax.random.key(3), 0.1, False)
    state, _, _ = train.train_epoch(graphdef, cfg, state, device_pool, plan)
    out.append([np.asarray(x).ravel().tolist() for x in jax.tree.leaves(state)])
  return out


def gather_rows():
  """Rows gathered from a pool split by rows over the 4 devices, against numpy indexing."""
  mesh = sharding.data_mesh()
  pool = np.arange(10 * 3, dtype=np.uint8).reshape(10, 3)  # 10 rows: padded to 12
  ids = np.array([9, 0, 4, 4, 7, 2], np.int32)
  gathered = jax.jit(sharding.gather_rows, static_argnames="mesh")(
    sharding.shard_rows(pool, 10, mesh), ids, mesh
  )
  return np.asarray(gathered).tolist(), pool[ids].tolist()


def campaigns(workdir):
  """The same 2-round campaign with the pool replicated ("False"), split by rows ("True"),
  streamed (the labeled images alone on the devices, "stream"), and both ("split_stream")."""
  outcome = {}
  for name, data_config in (
    ("False", {}),
    ("True", {"data.shard_pool": True}),
    ("stream", {"data.stream": True}),
    ("split_stream", {"data.stream": True, "data.shard_pool": True}),
  ):
    config = tiny_config(**{"al.num_rounds": 2, **data_config})
    results = campaign.run(config, os.path.join(workdir, name))
    outcome[name] = {
      "num_devices": results["num_devices"],
      "rounds": [
        (r["labeled_ids"], r["queried_ids"], r["test_accuracy"]) for r in results["rounds"]
      ],
    }
  return outcome


if __name__ == "__main__":
  assert jax.device_count() == 4, jax.devices()
  print(
    json.dumps(
      {
        "query": query_scores(),
        "train": train_params(),
        "gather": gather_rows(),
        "campaigns": campaigns(sys.argv[1]),
      }
    )
  )
