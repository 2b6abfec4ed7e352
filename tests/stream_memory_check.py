"""Run by test_npy_route.py in a subprocess: one round and one query of a campaign on the npy
pool `root`, streamed or in memory, or on the .npz file `root` (read into memory), under an
RLIMIT_DATA of `limit_mb` (0: none), the peak anonymous memory (RssAnon: not the page cache of
the memory-mapped files) polled throughout.
Prints one JSON line: {"completed", "error", "peak_rss_anon_mb"}.

  python tests/stream_memory_check.py ROOT WORKDIR stream|memory|npz LIMIT_MB
"""

import json
import resource
import sys
import threading
import time

root, workdir, mode, limit_mb = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
if limit_mb:
  resource.setrlimit(resource.RLIMIT_DATA, (limit_mb << 20, limit_mb << 20))
peak_kb = {"RssAnon": 0, "VmData": 0}


def poll_rss_anon():
  while True:
    with open("/proc/self/status") as f:
      for line in f:
        key = line.split(":")[0]
        if key in peak_kb:
          peak_kb[key] = max(peak_kb[key], int(line.split()[1]))
    time.sleep(0.01)


threading.Thread(target=poll_rss_anon, daemon=True).start()
try:
  from conftest import tiny_config

  from lplgrad_jax import campaign

  config = tiny_config(
    **{
      "data.source": "npz" if mode == "npz" else "npy",
      "data.root": root,
      "data.stream": mode == "stream",
      "data.image_size": 32,
      "data.normalization": "pool",  # meta.json's statistics: no pass over the images
      "al.num_rounds": 2,
      "train.epochs": 1,
      "train.eval_batch_size": 64,
    }
  )
  campaign.run(config, workdir)
  completed, error = True, ""
except BaseException as e:  # noqa: BLE001 - the in-memory run is expected to fail
  completed, error = False, f"{type(e).__name__}: {str(e)[:300]}"
time.sleep(0.05)
print(
  json.dumps(
    {
      "completed": completed,
      "error": error,
      "peak_rss_anon_mb": peak_kb["RssAnon"] / 1024,
      "peak_vm_data_mb": peak_kb["VmData"] / 1024,
    }
  )
)
