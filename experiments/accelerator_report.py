"""The accelerator check's report: the machine, the targets, the extrapolation, the advice.

`header(...)` describes the machine the check runs on; `judge(report)` adds `targets` (the
issue's, met / not met / not measured), `extrapolation` (the whole CIFAR-10 high-budget
campaign from the measured rates) and `recommendations` (the epoch loop, bf16 and the query
chunk, as the measurements decide them); `finish(report, out, wall_s)` writes
`accelerator_<device kind>.json` (strict JSON) and `.md` and prints a summary.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import subprocess
import sys

from lplgrad_jax import reporting

SUBSET = 25_000
DTYPES = ("float32", "bfloat16")
# The paper's CIFAR-10 high budget: B = 1,000 initial and per round, A = 10,000, 200 epochs
# (a checkpoint every 10), R = 25,000 scored per round, 10,000 test images.
CIFAR10_HIGH = {"rounds": 10, "initial": 1000, "query": 1000, "epochs": 200, "batch": 128}
CIFAR10_HIGH.update({"subset": SUBSET, "test": 10_000, "checkpoint_every": 10})
# name, description, unit, threshold: seconds are met at or below it, the others at or above.
TARGETS = (
  ("query_R25k", "R = 25,000 images scored", "s", 0.5),
  ("train_bf16", "joint train step, bf16", "img/s", 30_000),
  ("train_vs_torch", "JAX train step / PyTorch eager step", "x", 1.5),
  ("fast_vs_vmap", "fast scorer / JAX vmap(grad)", "x", 5.0),
  ("campaign_cifar10_high", "CIFAR-10 high budget, 10 rounds x 200 epochs", "s", 300.0),
)
# What docs/devices.md says bf16 query scores cost (digits demo model, experiments/bf16_error.py).
DOCUMENTED_BF16 = {"relative_error_median": 0.025, "relative_error_p99": 0.15}


def nvidia_smi():
  """(driver version, GPU names) from nvidia-smi, or (None, None) where it is absent."""
  query = ["--query-gpu=driver_version,name,memory.total", "--format=csv,noheader"]
  try:
    out = subprocess.run(["nvidia-smi", *query], capture_output=True, text=True, timeout=20)
  except (OSError, subprocess.SubprocessError):
    return None, None
  rows = [[c.strip() for c in line.split(",")] for line in out.stdout.splitlines() if line.strip()]
  if out.returncode or not rows:
    return None, None
  return rows[0][0], [f"{r[1]} ({r[2]})" for r in rows if len(r) >= 3]


def header(mode: str, sizes, budget_s: float, startup_s: float) -> dict:
  """The devices, driver, versions, XLA flags and environment, the defaults the advice
  compares with, and what the check was asked to measure."""
  import jax

  from lplgrad_jax.configs import default

  driver, gpus = nvidia_smi()
  devices = jax.devices()
  versions = {"python": platform.python_version()}
  for name in ("jax", "jaxlib", "flax", "numpy", "optax", "orbax.checkpoint", "torch"):
    try:
      versions[name] = __import__(name, fromlist=["_"]).__version__
    except Exception:  # noqa: BLE001 - absent or broken: reported as absent
      versions[name] = None
  defaults = default.get_config()
  keys = ("query.chunk_size", "train.epoch_loop", "train.compute_dtype", "query.compute_dtype")
  prefixes = ("XLA_PYTHON_CLIENT", "JAX_", "TF_GPU", "CUDA_VISIBLE")
  return {
    "mode": mode,
    "platform": devices[0].platform,
    "device_kind": devices[0].device_kind,
    "defaults": {k: defaults[k.split(".")[0]][k.split(".")[1]] for k in keys},
    "device_count": len(devices),
    "process_count": jax.process_count(),
    "driver": driver,
    "nvidia_smi_gpus": gpus,
    "versions": versions,
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(prefixes)},
    "jax_default_matmul_precision": str(getattr(jax.config, "jax_default_matmul_precision", None)),
    "budget_s": budget_s,
    "startup_s": startup_s,
    "sizes": dataclasses.asdict(sizes),
  }


def new_report(head: dict, skipped: list, failed: list) -> dict:
  """The sections the check fills in priority order (a watchdog may write them early)."""
  return {
    "schema": 2,
    "header": head,
    "data": None,
    "query": {"rows": []},
    "train": {"steps": [], "epochs": []},
    "torch": {"available": None, "rows": []},
    "campaign": None,
    "skipped": skipped,
    "failed": failed,
  }


def _best(rows, key="images_per_s", **match):
  rows = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
  return max(rows, key=lambda r: r[key]) if rows else None


def _target(name, description, unit, threshold, value, basis):
  met = None if value is None else (value <= threshold if unit == "s" else value >= threshold)
  fields = (name, description, value, unit, threshold, met, basis)
  return dict(zip(("name", "description", "value", "unit", "threshold", "met", "basis"), fields))


def _measured(report, extrapolations):
  """{target name: (value, basis)} of the targets measured."""
  query, batch = report["query"]["rows"], report["header"]["sizes"]["batches"][0]
  step = _best(report["train"]["steps"], dtype="bfloat16", batch=batch)
  eager = [_best(report["torch"].get("rows", []), name="train_eager", dtype=d) for d in DTYPES]
  eager, out = eager[1] or eager[0], {}
  if fast := min((r for r in query if r["kind"] == "fast"), key=_seconds_per_image, default=None):
    how = f"extrapolated from R = {fast['R']:,}" if fast["R"] != SUBSET else "measured"
    basis = f"fast scorer, {fast['dtype']}, chunk {fast['chunk']}: {how} end to end"
    out["query_R25k"] = SUBSET * _seconds_per_image(fast), basis
  if step:
    out["train_bf16"] = step["images_per_s"], f"batch {batch}"
  if step and eager:
    basis = f"JAX bf16 batch {batch} / PyTorch eager {eager['dtype']}"
    basis += " (autocast)" if eager["dtype"] == "bfloat16" else ""
    out["train_vs_torch"] = step["images_per_s"] / eager["images_per_s"], basis
  for dtype in DTYPES[::-1]:  # float32's if measured
    fast, vmap = (_best(query, kind=k, dtype=dtype) for k in ("fast", "vmap"))
    if fast and vmap:
      basis = f"{dtype}, each at its best chunk ({fast['chunk']}, {vmap['chunk']})"
      out["fast_vs_vmap"] = fast["images_per_s"] / vmap["images_per_s"], basis
  if extrapolations:
    best = min(extrapolations, key=lambda e: e["total_s"])
    out["campaign_cifar10_high"] = best["total_s"], best["basis"]
  return out


def _seconds_per_image(row):
  return row["seconds_for_R"] / row["R"]


def extrapolate(report, dtype):
  """Seconds of the whole CIFAR-10 high-budget campaign in `dtype`, from measured rates."""
  c = CIFAR10_HIGH
  epoch = _best(report["train"]["epochs"], dtype=dtype, batch=c["batch"]) or _best(
    report["train"]["epochs"], dtype=dtype
  )
  step = _best(report["train"]["steps"], dtype=dtype, batch=c["batch"])
  fast = [r for r in report["query"]["rows"] if r["kind"] == "fast" and r["dtype"] == dtype]
  if not (epoch or step) or not fast:
    return None
  source = epoch or step
  if epoch:
    step_s, basis = epoch["seconds"] / epoch["steps"], f"{epoch['loop']} epoch loop"
  else:
    step_s, basis = step["batch"] / step["images_per_s"], "single step (no epoch measured)"
  if source["batch"] != c["batch"]:
    step_s *= c["batch"] / source["batch"]
    basis += f", scaled from batch {source['batch']}"
  labeled = [c["initial"] + r * c["query"] for r in range(c["rounds"])]
  best_fast = min(fast, key=_seconds_per_image)
  query_s = c["subset"] * _seconds_per_image(best_fast)
  parts = {
    "train": sum(c["epochs"] * math.ceil(n / c["batch"]) * step_s for n in labeled),
    "query": (c["rounds"] - 1) * query_s,
  }
  camp = report.get("campaign") or {}
  evaluation, save = camp.get("eval"), camp.get("checkpoint_save")
  if evaluation:  # once per round, over the test split's 10,000 images
    parts["eval"] = c["rounds"] * evaluation["seconds"] * c["test"] / evaluation["images"]
  if save:  # every checkpoint_every epochs and at each round's two commits
    saves = c["rounds"] * (c["epochs"] // c["checkpoint_every"] + 1)
    parts["checkpoint (upper bound: each save waited for)"] = saves * save["seconds"]
  data = report.get("data") or {}
  parts["once: start-up, data, placement, compiles"] = (
    report["header"]["startup_s"]
    + data.get("load_s", 0.0)
    + data.get("placement_s", 0.0)
    + sum(r.get("compile_s", 0.0) for r in (source, best_fast, evaluation) if r)
  )
  return {
    "dtype": dtype,
    "total_s": sum(parts.values()),
    "parts_s": parts,
    "basis": f"extrapolated, {dtype}: train from the {basis} ({step_s * 1e3:.2f} ms/step), "
    f"query from the best fast scorer ({query_s:.3f} s per R); not a measured campaign",
  }


def recommendations(report) -> list[str]:
  out = []
  platform_ = report["header"]["platform"]
  defaults = report["header"].get("defaults", {})
  epochs, query = report["train"]["epochs"], report["query"]["rows"]
  for dtype in ("bfloat16", "float32"):
    host, scan = _best(epochs, loop="host", dtype=dtype), _best(epochs, loop="scan", dtype=dtype)
    if host and scan:
      ratio = scan["images_per_s"] / host["images_per_s"]
      pick = "scan" if ratio > 1.05 else "host"
      close = " (within 5%: keep the host loop, which stops mid-epoch)"
      out.append(
        f"epoch loop ({dtype}, {platform_}): scan runs at {ratio:.2f}x the host loop -> "
        f"train.epoch_loop default on {platform_}: '{pick}' (now "
        f"'{defaults.get('train.epoch_loop', '?')}')" + (close if 0.95 <= ratio <= 1.05 else "")
      )
  out += _bf16_advice(report)
  for dtype in ("float32", "bfloat16"):
    best = _best(query, kind="fast", dtype=dtype)
    if best:
      floor = _best(query, kind="floor", dtype=dtype, chunk=best["chunk"])
      ratio = floor and best["images_per_s"] / floor["images_per_s"]
      gap = f"; {ratio:.2f}x the fwd+bwd floor" if floor else ""
      out.append(
        f"query chunk ({dtype}): fastest at chunk {best['chunk']} "
        f"({best['images_per_s']:,.0f} img/s{gap}) -> query.chunk_size={best['chunk']} "
        f"on {platform_} (now {defaults.get('query.chunk_size', '?')})"
      )
  return out


def _bf16_advice(report):
  steps, query = report["train"]["steps"], report["query"]["rows"]
  batch = report["header"]["sizes"]["batches"][0]
  fp32 = _best(steps, dtype="float32", batch=batch)
  bf16 = _best(steps, dtype="bfloat16", batch=batch)
  qf, qb = _best(query, kind="fast", dtype="float32"), _best(query, kind="fast", dtype="bfloat16")
  if not (fp32 and bf16 and qf and qb):
    return ["bf16: not enough measurements to decide"]
  train_x = bf16["images_per_s"] / fp32["images_per_s"]
  query_x = qb["images_per_s"] / qf["images_per_s"]
  error = (report.get("campaign") or {}).get("bf16_error")
  text = f"bf16: train step {train_x:.2f}x fp32, query {query_x:.2f}x fp32"
  if not error:
    return [text + "; bf16 score error on the campaign model not measured: no decision"]
  doc = DOCUMENTED_BF16
  text += (
    f"; scores on the trained campaign model: median relative error "
    f"{error['relative_error_median']:.2%} (documented {doc['relative_error_median']:.1%}), "
    f"p99 {error['relative_error_p99']:.1%} (documented {doc['relative_error_p99']:.0%}), "
    f"Spearman {error['spearman']:.5f}, top-{error['top_k']} overlap {error['top_k_overlap']:.1%}"
  )
  as_documented = (
    error["spearman"] >= 0.999
    and error["top_k_overlap"] >= 0.98
    and error["relative_error_median"] <= 2 * doc["relative_error_median"]
  )
  verdict = (
    "keep fp32: the bf16 error exceeds what docs/devices.md documents"
    if not as_documented
    else "make bf16 the accelerator default"
    if max(train_x, query_x) >= 1.2
    else "keep fp32: bf16 is not >= 1.2x faster"
  )
  return [
    f"{text} -> {verdict} (rule: Spearman >= 0.999, top-k overlap >= 98%, median error "
    "<= 2x documented, and >= 1.2x faster in training or query)"
  ]


def judge(report) -> dict:
  """Adds each query row's ratio to its floor, the targets, extrapolation and advice."""
  query = report["query"]["rows"]
  for row in query:
    floor = _best(query, kind="floor", dtype=row["dtype"], chunk=row["chunk"])
    row["vs_floor"] = row["images_per_s"] / floor["images_per_s"] if floor else None
  extrapolations = [e for e in (extrapolate(report, d) for d in DTYPES[::-1]) if e]
  measured = _measured(report, extrapolations)
  targets = [_target(*t, *measured.get(t[0], (None, "not measured"))) for t in TARGETS]
  report.update(targets=targets, extrapolation=extrapolations)
  report["recommendations"] = recommendations(report)
  return report


def _clean(value):
  """Non-finite floats become None: the JSON stays strict."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, dict):
    return {k: _clean(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_clean(v) for v in value]
  return value


def slug(head: dict) -> str:
  kind = "".join(c if c.isalnum() else "_" for c in head["device_kind"].lower()).strip("_")
  kind = "_".join(p for p in kind.split("_") if p) or head["platform"]
  return kind + (f"_x{head['device_count']}" if head["device_count"] > 1 else "")


def finish(report: dict, out: str, wall_s: float) -> list[str]:
  """Judges `report`, writes its .json and .md into `out`, prints the summary."""
  report["tensorflow_modules_loaded"] = sorted(
    n
    for n, m in list(sys.modules.items())
    if m is not None and n.split(".")[0] in ("tensorflow", "tensorflow_datasets")
  )
  report["wall_s"] = wall_s
  report = _clean(judge(report))
  base = os.path.join(out, f"accelerator_{slug(report['header'])}")
  reporting.write_atomic(base + ".json", lambda f: json.dump(report, f, indent=1, allow_nan=False))
  reporting.write_atomic(base + ".md", lambda f: f.write(markdown(report)))
  print(summary(report), flush=True)
  print(f"wrote {base}.md and {base}.json", flush=True)
  return [base + ".md", base + ".json"]


def _num(value, digits=1):
  if value is None:
    return "-"
  if isinstance(value, float) and abs(value) >= 1000:
    return f"{value:,.0f}"
  return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _memory(row):
  if row.get("peak_bytes") is None:
    return "n/a"
  gib = f"{row['peak_bytes'] / 2**30:.2f} GiB"
  return gib if row.get("peak_raised", True) else f"<= {gib}"


def _table(head, rows):
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows] + [""]


def _header_md(h, data):
  sizes, gpus = h["sizes"], h["nvidia_smi_gpus"]
  env = ", ".join(f"{k}={v}" for k, v in h["env"].items()) or "(none)"
  lines = [
    f"# Accelerator check: {h['device_kind']} x {h['device_count']} ({h['mode']})",
    "",
    f"- device: {h['device_kind']}, {h['device_count']} device(s), platform {h['platform']}, "
    f"{h['process_count']} process(es); driver {h['driver'] or 'n/a'}"
    + (f"; nvidia-smi: {', '.join(gpus)}" if gpus else ""),
    "- versions: " + ", ".join(f"{k} {v or 'absent'}" for k, v in h["versions"].items()),
    f"- XLA_FLAGS: `{h['xla_flags'] or '(unset)'}`; env: {env}; "
    f"jax_default_matmul_precision: {h['jax_default_matmul_precision']}",
    f"- sizes: width {sizes['width']}, chunks {sizes['chunks']}, batches {sizes['batches']}, "
    f"R = {sizes['subset']:,}, epoch of {sizes['epoch_images']:,} labeled images; budget "
    f"{h['budget_s']:.0f} s; process start-up {h['startup_s']:.1f} s",
  ]
  if data and "placement_s" in data:
    lines.append(
      f"- data: {data['name']}, loaded in {data['load_s']:.2f} s, placed on the devices in "
      f"{data['placement_s']:.2f} s"
    )
  return lines + [""]


def _targets_md(report):
  status = {True: "**met**", False: "**not met**", None: "not measured"}
  rows = [
    [
      t["description"],
      f"{_num(t['value'], 3)} {t['unit']}",
      f"{'<=' if t['unit'] == 's' else '>='} {t['threshold']:,} {t['unit']}",
      status[t["met"]],
      t["basis"],
    ]
    for t in report["targets"]
  ]
  lines = ["## Targets", ""] + _table(["target", "value", "threshold", "status", "basis"], rows)
  for e in report["extrapolation"]:
    parts = " + ".join(f"{k} {v:.1f}" for k, v in e["parts_s"].items())
    lines += [
      f"Whole CIFAR-10 high-budget campaign, {e['dtype']}: {e['total_s']:.0f} s = {parts} "
      f"({e['basis']}).",
      "",
    ]
  lines += ["## Recommendations (derived from these measurements)", ""]
  return lines + [f"- {r}" for r in report["recommendations"]] + [""]


def _query_md(rows):
  def seconds(r):
    return _num(r["seconds_for_R"], 3) + ("" if r["R_measured"] else " (rate)")

  body = [
    [r["kind"], r["dtype"], r["chunk"], _num(r["images_per_s"]), seconds(r)]
    + [_num(r.get("vs_floor"), 2), _num(r["compile_s"]), _memory(r)]
    for r in rows
  ]
  head = ["scorer", "dtype", "chunk", "img/s", "s for R", "vs floor", "compile s", "peak memory"]
  return [
    "## Query (entropy-gradient norms)",
    "",
    "Seconds for R: measured end to end over R real images (host arrays, as a campaign "
    "calls it) for `fast`; from the rate for the floor (one device-resident batch) and "
    "`vmap` (two chunks). vs floor: images/s over the floor's at the same dtype and "
    "chunk. Peak memory: JAX's high-water mark after the measurement (`<=`: this one did "
    "not raise it).",
    "",
  ] + _table(head, body)


def _train_md(train):
  steps = [
    [s["dtype"], s["batch"], _num(s["images_per_s"]), _num(s["compile_s"]), _memory(s)]
    for s in train["steps"]
  ]
  epochs = [
    [e["loop"], e["dtype"], e["batch"], e["num_labeled"], e["steps"], _num(e["images_per_s"])]
    + [_num(e["seconds"], 3), _num(e["compile_s"])]
    for e in train["epochs"]
  ]
  epoch_head = ["loop", "dtype", "batch", "labeled", "steps", "img/s", "s/epoch", "compile s"]
  return (
    ["## Training", "", "Joint step (ResNet-18 + loss head, augmentation, SGD):", ""]
    + _table(["dtype", "batch", "img/s", "compile s", "peak memory"], steps)
    + ["Epoch over a labeled set (`train.train_epoch`):", ""]
    + _table(epoch_head, epochs)
  )


def _torch_md(torch):
  lines = ["## PyTorch reference", ""]
  if not torch.get("available"):
    return lines + [torch.get("note") or "not measured", ""]
  rows = [
    [r["name"], r["dtype"], r["images"], _num(r["images_per_s"]), _num(r["compile_s"]), _memory(r)]
    for r in torch["rows"]
  ]
  head = ["computation", "dtype", "images", "img/s", "compile s", "peak memory"]
  return (
    lines
    + [
      f"torch {torch['version']} on {torch['device']} (cudnn tf32 {torch['cudnn_allow_tf32']}, "
      f"matmul tf32 {torch['matmul_allow_tf32']}); same model and inputs; bf16 = autocast.",
      "",
    ]
    + _table(head, rows)
  )


def _campaign_md(camp):
  if not camp:
    return ["## Short campaign", "", "not run (see skipped / failed)", ""]
  c = camp["config"]
  train, al = c["train"], c["al"]
  lines = [
    "## Short campaign (`lplgrad_jax.campaign.run`)",
    "",
    f"{c['data']['name']}, width {c['model']['width']}, {al['num_rounds']} rounds of "
    f"{train['epochs']} epochs, {al['initial_size']} + {al['query_size']} per round, R = "
    f"{al['subset_size']}, chunk {c['query']['chunk_size']}, batch {train['batch_size']}, "
    f"{train['compute_dtype']}, {train['epoch_loop']} loop; wall {camp['wall_s']:.1f} s (+ "
    "start-up). Train and query seconds are the campaign's own round records (results.json); "
    "the rest is its wall clock less those.",
    "",
  ]
  lines += _table(["phase", "seconds"], [[k, _num(v, 2)] for k, v in camp["phases_s"].items()])
  rounds = [
    [r["round"] + 1, r["num_labeled"], _num(r["test_accuracy"], 4)]
    + [_num(r["train_seconds"], 2), _num(r["query_seconds"], 2)]
    for r in camp["rounds"]
  ]
  lines += _table(["round", "labeled", "test accuracy", "train s", "query s"], rounds)
  timed = [
    f"{what}: {r['seconds']:.3f} s a call ({_num(r['compile_s'])} s compile)"
    for what, r in (
      (f"eval of {camp['num_test']} test images", camp.get("eval")),
      ("a checkpoint save, until written", camp.get("checkpoint_save")),
    )
    if r
  ]
  if timed:
    lines += ["On the trained model: " + "; ".join(timed) + ".", ""]
  if camp.get("bf16_error"):
    e = camp["bf16_error"]
    lines += [
      f"bf16 vs fp32 query scores on the trained model ({e['images']} pool images): "
      f"median relative error {e['relative_error_median']:.2%}, p99 "
      f"{e['relative_error_p99']:.2%}, max {e['relative_error_max']:.2%}, Spearman "
      f"{e['spearman']:.5f}, top-{e['top_k']} overlap {e['top_k_overlap']:.1%}.",
      "",
    ]
  return lines


def _single_device_md(single):
  if not single:
    return []
  rates = [
    f"query {r['kind']} {r['dtype']} chunk {r['chunk']}: {_num(r['images_per_s'])} img/s"
    for r in single["query"]
  ] + [
    f"train step {s['dtype']} batch {s['batch']}: {_num(s['images_per_s'])} img/s"
    for s in single["steps"]
  ]
  return ["## One device of several", "", "; ".join(rates) or "not measured", ""]


def markdown(report) -> str:
  lines = _header_md(report["header"], report.get("data")) + _targets_md(report)
  lines += _query_md(report["query"]["rows"]) + _train_md(report["train"])
  lines += _torch_md(report["torch"]) + _campaign_md(report.get("campaign"))
  lines += _single_device_md(report.get("single_device")) + ["## Skipped and failed", ""]
  lines += [f"- skipped {s['name']}: {s['reason']}" for s in report["skipped"]]
  lines += [f"- FAILED {f['name']}: {f['error']}" for f in report["failed"]]
  if not report["skipped"] and not report["failed"]:
    lines.append("- nothing")
  loaded = ", ".join(report["tensorflow_modules_loaded"]) or "none"
  lines += ["", f"TensorFlow modules loaded: {loaded}. Whole check: {report['wall_s']:.0f} s.", ""]
  return "\n".join(lines)


def summary(report) -> str:
  """A few lines for the terminal (the end of a remote command's output)."""
  h = report["header"]
  lines = [f"accelerator check ({h['mode']}): {h['device_kind']} x {h['device_count']}, "]
  lines[0] += f"{report['wall_s']:.0f} s"
  status = {True: "met", False: "NOT met", None: "not measured"}
  for t in report["targets"]:
    lines.append(
      f"  {t['description']}: {_num(t['value'], 3)} {t['unit']} "
      f"(target {t['threshold']:,}): {status[t['met']]}"
    )
  lines += [f"  -> {r}" for r in report["recommendations"]]
  lines.append(f"  skipped {len(report['skipped'])}, failed {len(report['failed'])}")
  return "\n".join(lines)
