"""Judges and renders what `accelerator_check.py` measured: targets, extrapolation, advice.

`judge(report)` adds `targets` (the issue's, met / not met / not measured), `extrapolation`
(the whole CIFAR-10 high-budget campaign from the measured rates) and `recommendations`
(the epoch loop, bf16 and the query chunk, as the measurements decide them);
`write(report, out, slug)` writes `accelerator_<slug>.json` (strict JSON) and `.md`.
"""

from __future__ import annotations

import json
import math
import os

from lplgrad_jax import reporting

SUBSET = 25_000
# The paper's CIFAR-10 high budget: B = 1,000 initial and per round, A = 10,000, 200 epochs.
CIFAR10_HIGH = {
  "rounds": 10,
  "initial": 1000,
  "query": 1000,
  "epochs": 200,
  "batch": 128,
  "subset": SUBSET,
  "test": 10_000,
  "checkpoint_every": 10,
}
# What docs/devices.md says bf16 query scores cost (digits demo model, experiments/bf16_error.py).
DOCUMENTED_BF16 = {
  "relative_error_median": 0.025,
  "relative_error_p99": 0.15,
  "spearman": 0.99992,
  "top_k_overlap": 1.0,
}


def _best(rows, key="images_per_s", **match):
  rows = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
  return max(rows, key=lambda r: r[key]) if rows else None


def _target(name, description, value, unit, threshold, higher_is_better, basis):
  met = None if value is None else (value >= threshold if higher_is_better else value <= threshold)
  return {
    "name": name,
    "description": description,
    "value": value,
    "unit": unit,
    "threshold": threshold,
    "met": met,
    "basis": basis,
  }


def _query_target(query):
  fast = [r for r in query if r["kind"] == "fast"]
  if not fast:
    return _target("query_R25k", "R = 25,000 images scored", None, "s", 0.5, False, "not measured")
  best = min(fast, key=lambda r: r["seconds_for_R"] * SUBSET / r["R"])
  value = best["seconds_for_R"] * SUBSET / best["R"]
  how = (
    "measured end to end"
    if best["R"] == SUBSET
    else f"extrapolated from R = {best['R']:,} measured end to end"
  )
  return _target(
    "query_R25k",
    "R = 25,000 images scored",
    value,
    "s",
    0.5,
    False,
    f"fast scorer, {best['dtype']}, chunk {best['chunk']}: {how}",
  )


def _train_targets(steps, torch_rows, batch):
  step = _best(steps, dtype="bfloat16", batch=batch)
  rate = step["images_per_s"] if step else None
  out = [
    _target(
      "train_bf16",
      "joint train step, bf16",
      rate,
      "img/s",
      30_000,
      True,
      f"batch {batch}" if step else "not measured",
    )
  ]
  eager = _best(torch_rows, name="train_eager", dtype="bfloat16") or _best(
    torch_rows, name="train_eager", dtype="float32"
  )
  ratio = rate / eager["images_per_s"] if (step and eager) else None
  basis = (
    (
      f"JAX bf16 batch {batch} / PyTorch eager {eager['dtype']}"
      + (" (autocast)" if eager["dtype"] == "bfloat16" else "")
    )
    if eager
    else "not measured"
  )
  out.append(
    _target("train_vs_torch", "JAX train step / PyTorch eager step", ratio, "x", 1.5, True, basis)
  )
  return out


def _vmap_target(query):
  for dtype in ("float32", "bfloat16"):
    fast, vmap = _best(query, kind="fast", dtype=dtype), _best(query, kind="vmap", dtype=dtype)
    if fast and vmap:
      return _target(
        "fast_vs_vmap",
        "fast scorer / JAX vmap(grad)",
        fast["images_per_s"] / vmap["images_per_s"],
        "x",
        5.0,
        True,
        f"{dtype}, each at its best chunk ({fast['chunk']}, {vmap['chunk']})",
      )
  return _target(
    "fast_vs_vmap", "fast scorer / JAX vmap(grad)", None, "x", 5.0, True, "not measured"
  )


def extrapolate(report, dtype):
  """Seconds of the whole CIFAR-10 high-budget campaign in `dtype`, from measured rates."""
  c = CIFAR10_HIGH
  steps = report["train"]["steps"]
  epoch = _best(report["train"]["epochs"], dtype=dtype, batch=c["batch"]) or _best(
    report["train"]["epochs"], dtype=dtype
  )
  step = _best(steps, dtype=dtype, batch=c["batch"])
  fast = [r for r in report["query"]["rows"] if r["kind"] == "fast" and r["dtype"] == dtype]
  if not (epoch or step) or not fast:
    return None
  if epoch:
    step_s, basis = epoch["seconds"] / epoch["steps"], f"{epoch['loop']} epoch loop"
  else:
    step_s, basis = c["batch"] / step["images_per_s"], "single step (no epoch measured)"
  if (epoch or step)["batch"] != c["batch"]:
    step_s *= c["batch"] / (epoch or step)["batch"]
    basis += f", scaled from batch {(epoch or step)['batch']}"
  labeled = [c["initial"] + r * c["query"] for r in range(c["rounds"])]
  parts = {"train": sum(c["epochs"] * math.ceil(n / c["batch"]) * step_s for n in labeled)}
  query_s = min(r["seconds_for_R"] * c["subset"] / r["R"] for r in fast)
  parts["query"] = (c["rounds"] - 1) * query_s
  camp = report.get("campaign") or {}
  phases, calls = camp.get("phases_s", {}), camp.get("phase_calls", {})
  if phases.get("eval"):
    rounds = camp["config"]["rounds"]
    parts["eval (upper bound: includes a compile)"] = (
      phases["eval"] * c["rounds"] / rounds * (c["test"] / max(camp.get("num_test", c["test"]), 1))
    )
  if phases.get("checkpoint"):
    saves = c["rounds"] * (c["epochs"] // c["checkpoint_every"] + 1)
    parts["checkpoint"] = phases["checkpoint"] / max(calls.get("checkpoint") or 1, 1) * saves
  compile_s = sum(
    r.get("compile_s", 0.0)
    for r in (epoch or step, min(fast, key=lambda r: r["seconds_for_R"] / r["R"]))
  )
  parts["once: start-up, data, placement, compiles"] = (
    report["header"]["startup_s"]
    + phases.get("data load", 0.0)
    + phases.get("data placement", 0.0)
    + compile_s
  )
  total = sum(parts.values())
  return {
    "dtype": dtype,
    "total_s": total,
    "parts_s": parts,
    "basis": f"extrapolated, {dtype}: train from the {basis} ({step_s * 1e3:.2f} ms/step), "
    f"query "
    f"from the best fast scorer ({query_s:.3f} s per R); not a measured campaign",
  }


def recommendations(report) -> list[str]:
  out = []
  platform = report["header"]["platform"]
  defaults = report["header"].get("defaults", {})
  epochs = report["train"]["epochs"]
  for dtype in ("bfloat16", "float32"):
    host, scan = _best(epochs, loop="host", dtype=dtype), _best(epochs, loop="scan", dtype=dtype)
    if host and scan:
      ratio = scan["images_per_s"] / host["images_per_s"]
      pick = "scan" if ratio > 1.05 else "host"
      out.append(
        f"epoch loop ({dtype}, {platform}): scan runs at {ratio:.2f}x the host loop -> "
        f"train.epoch_loop default on {platform}: '{pick}' (now "
        f"'{defaults.get('train.epoch_loop', '?')}')"
        + (
          " (within 5%: keep the host loop, which stops mid-epoch)" if 0.95 <= ratio <= 1.05 else ""
        )
      )
  out += _bf16_advice(report)
  for dtype in ("float32", "bfloat16"):
    fast = [r for r in report["query"]["rows"] if r["kind"] == "fast" and r["dtype"] == dtype]
    if fast:
      best = max(fast, key=lambda r: r["images_per_s"])
      floor = _best(report["query"]["rows"], kind="floor", dtype=dtype, chunk=best["chunk"])
      gap = (
        f"; {best['images_per_s'] / floor['images_per_s']:.2f}x the fwd+bwd floor" if floor else ""
      )
      out.append(
        f"query chunk ({dtype}): fastest at chunk {best['chunk']} "
        f"({best['images_per_s']:,.0f} img/s{gap}) -> query.chunk_size={best['chunk']} "
        f"on {platform} (now {defaults.get('query.chunk_size', '?')})"
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
  documented = DOCUMENTED_BF16
  text += (
    f"; scores on the trained campaign model: median relative error "
    f"{error['relative_error_median']:.2%} (documented "
    f"{documented['relative_error_median']:.1%}), p99 {error['relative_error_p99']:.1%} "
    f"(documented {documented['relative_error_p99']:.0%}), Spearman "
    f"{error['spearman']:.5f}, top-{error['top_k']} overlap {error['top_k_overlap']:.1%}"
  )
  as_documented = (
    error["spearman"] >= 0.999
    and error["top_k_overlap"] >= 0.98
    and error["relative_error_median"] <= 2 * documented["relative_error_median"]
  )
  faster = max(train_x, query_x) >= 1.2
  verdict = (
    "make bf16 the accelerator default"
    if as_documented and faster
    else "keep fp32: bf16 is not >= 1.2x faster"
    if as_documented
    else "keep fp32: the bf16 error exceeds what docs/devices.md documents"
  )
  return [
    f"{text} -> {verdict} (rule: Spearman >= 0.999, top-k overlap >= 98%, median error "
    "<= 2x documented, and >= 1.2x faster in training or query)"
  ]


def judge(report) -> dict:
  query, steps = report["query"]["rows"], report["train"]["steps"]
  for row in query:
    floor = _best(query, kind="floor", dtype=row["dtype"], chunk=row["chunk"])
    row["vs_floor"] = row["images_per_s"] / floor["images_per_s"] if floor else None
  batch = report["header"]["sizes"]["batches"][0]
  targets = [
    _query_target(query),
    *_train_targets(steps, report["torch"].get("rows", []), batch),
    _vmap_target(query),
  ]
  extrapolations = [e for e in (extrapolate(report, d) for d in ("bfloat16", "float32")) if e]
  best = min(extrapolations, key=lambda e: e["total_s"]) if extrapolations else None
  targets.append(
    _target(
      "campaign_cifar10_high",
      "CIFAR-10 high budget, 10 rounds x 200 epochs",
      best["total_s"] if best else None,
      "s",
      300.0,
      False,
      best["basis"] if best else "not measured",
    )
  )
  report.update(
    targets=targets, extrapolation=extrapolations, recommendations=recommendations(report)
  )
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


def write(report, out: str, slug: str) -> list[str]:
  judge(report)
  report = _clean(report)
  base = os.path.join(out, f"accelerator_{slug}")
  reporting.write_atomic(base + ".json", lambda f: json.dump(report, f, indent=1, allow_nan=False))
  reporting.write_atomic(base + ".md", lambda f: f.write(markdown(report)))
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


def _header_md(h):
  v = h["versions"]
  return [
    f"# Accelerator check: {h['device_kind']} x {h['device_count']} ({h['mode']})",
    "",
    f"- device: {h['device_kind']}, {h['device_count']} device(s), platform "
    f"{h['platform']}, {h['process_count']} process(es); driver {h['driver'] or 'n/a'}"
    + (f"; nvidia-smi: {', '.join(h['nvidia_smi_gpus'])}" if h["nvidia_smi_gpus"] else ""),
    "- versions: " + ", ".join(f"{k} {val or 'absent'}" for k, val in v.items()),
    f"- XLA_FLAGS: `{h['xla_flags'] or '(unset)'}`; env: "
    + (", ".join(f"{k}={val}" for k, val in h["env"].items()) or "(none)")
    + f"; jax_default_matmul_precision: {h['jax_default_matmul_precision']}",
    f"- sizes: width {h['sizes']['width']}, chunks {h['sizes']['chunks']}, batches "
    f"{h['sizes']['batches']}, R = {h['sizes']['subset']:,}, epoch of "
    f"{h['sizes']['epoch_images']:,} labeled images; budget {h['budget_s']:.0f} s; "
    f"process start-up {h['startup_s']:.1f} s",
    "",
  ]


def _targets_md(report):
  rows = [
    [
      t["description"],
      f"{_num(t['value'], 3)} {t['unit']}",
      f"{'<=' if t['unit'] == 's' else '>='} {t['threshold']:,} {t['unit']}",
      {True: "**met**", False: "**not met**", None: "not measured"}[t["met"]],
      t["basis"],
    ]
    for t in report["targets"]
  ]
  return ["## Targets", ""] + _table(["target", "value", "threshold", "status", "basis"], rows)


def _query_md(rows):
  body = [
    [
      r["kind"],
      r["dtype"],
      r["chunk"],
      _num(r["images_per_s"]),
      f"{_num(r['seconds_for_R'], 3)}" + ("" if r["R_measured"] else " (rate)"),
      _num(r.get("vs_floor"), 2),
      _num(r["compile_s"]),
      _memory(r),
    ]
    for r in rows
  ]
  return [
    "## Query (entropy-gradient norms)",
    "",
    "Seconds for R: measured end to end over R real images (host arrays, as a campaign "
    "calls it) for `fast`; from the rate for the floor (one device-resident batch) and "
    "`vmap` (two chunks). vs floor: images/s over the floor's at the same dtype and "
    "chunk. Peak memory: JAX's high-water mark after the measurement (`<=`: this one did "
    "not raise it).",
    "",
  ] + _table(
    ["scorer", "dtype", "chunk", "img/s", "s for R", "vs floor", "compile s", "peak memory"], body
  )


def _train_md(train):
  steps = [
    [s["dtype"], s["batch"], _num(s["images_per_s"]), _num(s["compile_s"]), _memory(s)]
    for s in train["steps"]
  ]
  epochs = [
    [
      e["loop"],
      e["dtype"],
      e["batch"],
      e["num_labeled"],
      e["steps"],
      _num(e["images_per_s"]),
      _num(e["seconds"], 3),
      _num(e["compile_s"]),
    ]
    for e in train["epochs"]
  ]
  return (
    ["## Training", "", "Joint step (ResNet-18 + loss head, augmentation, SGD):", ""]
    + _table(["dtype", "batch", "img/s", "compile s", "peak memory"], steps)
    + ["Epoch over a labeled set (`train.train_epoch`):", ""]
    + _table(
      ["loop", "dtype", "batch", "labeled", "steps", "img/s", "s/epoch", "compile s"], epochs
    )
  )


def _torch_md(torch):
  if not torch.get("available"):
    return ["## PyTorch reference", "", torch.get("note") or "not measured", ""]
  rows = [
    [r["name"], r["dtype"], r["images"], _num(r["images_per_s"]), _num(r["compile_s"]), _memory(r)]
    for r in torch["rows"]
  ]
  return [
    "## PyTorch reference",
    "",
    f"torch {torch['version']} on {torch['device']} (cudnn tf32 "
    f"{torch['cudnn_allow_tf32']}, matmul tf32 {torch['matmul_allow_tf32']}); same model "
    "and inputs; bf16 = autocast.",
    "",
  ] + _table(["computation", "dtype", "images", "img/s", "compile s", "peak memory"], rows)


def _campaign_md(camp):
  if not camp:
    return ["## Short campaign", "", "not run (see skipped / failed)", ""]
  c = camp["config"]
  lines = [
    "## Short campaign (`lplgrad_jax.campaign.run`)",
    "",
    f"{c['data']}, width {c['width']}, {c['rounds']} rounds of {c['epochs_per_round']} "
    f"epochs, {c['initial']} + {c['query']} per round, R = {c['subset_R']}, chunk "
    f"{c['chunk']}, batch {c['batch']}, {c['compute_dtype']}, {c['epoch_loop']} loop; "
    f"wall {camp['wall_s']:.1f} s (+ start-up).",
    "",
  ]
  lines += _table(
    ["phase", "seconds", "calls"],
    [[k, _num(v, 2), camp["phase_calls"].get(k) or ""] for k, v in camp["phases_s"].items()],
  )
  lines += _table(
    ["round", "labeled", "test accuracy", "train s", "query s"],
    [
      [
        r["round"] + 1,
        r["num_labeled"],
        _num(r["test_accuracy"], 4),
        _num(r["train_seconds"], 2),
        _num(r["query_seconds"], 2),
      ]
      for r in camp["rounds"]
    ],
  )
  if camp.get("probes_missing"):
    lines += [
      "Phase probes not found (library refactored): " + ", ".join(camp["probes_missing"]),
      "",
    ]
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


def markdown(report) -> str:
  lines = _header_md(report["header"]) + _targets_md(report)
  for e in report["extrapolation"]:
    lines += [
      f"Whole CIFAR-10 high-budget campaign, {e['dtype']}: {e['total_s']:.0f} s = "
      + " + ".join(f"{k} {v:.1f}" for k, v in e["parts_s"].items())
      + f" ({e['basis']}).",
      "",
    ]
  lines += ["## Recommendations (derived from these measurements)", ""]
  lines += [f"- {r}" for r in report["recommendations"]] + [""]
  lines += _query_md(report["query"]["rows"]) + _train_md(report["train"])
  lines += _torch_md(report["torch"]) + _campaign_md(report.get("campaign"))
  if report.get("single_device"):
    s = report["single_device"]
    lines += [
      "## One device of several",
      "",
      f"query fast {s['dtype']} chunk {s['query_chunk']}: "
      f"{_num((s['query'] or {}).get('images_per_s'))} img/s; train step batch "
      f"{s['batch']}: {_num((s['train_step'] or {}).get('images_per_s'))} img/s",
      "",
    ]
  lines += ["## Skipped and failed", ""]
  lines += [f"- skipped {s['name']}: {s['reason']}" for s in report["skipped"]]
  lines += [f"- FAILED {f['name']}: {f['error']}" for f in report["failed"]]
  if not report["skipped"] and not report["failed"]:
    lines.append("- nothing")
  loaded = ", ".join(report["tensorflow_modules_loaded"]) or "none"
  lines += ["", f"TensorFlow modules loaded: {loaded}. Whole check: {report['wall_s']:.0f} s.", ""]
  return "\n".join(lines)


def summary(report) -> str:
  """A few lines for the terminal (the end of a remote command's output)."""
  lines = [
    f"accelerator check ({report['header']['mode']}): {report['header']['device_kind']} "
    f"x {report['header']['device_count']}, {report['wall_s']:.0f} s"
  ]
  for t in report["targets"]:
    status = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
    lines.append(
      f"  {t['description']}: {_num(t['value'], 3)} {t['unit']} "
      f"(target {t['threshold']:,}): {status}"
    )
  lines += [f"  -> {r}" for r in report["recommendations"]]
  lines.append(f"  skipped {len(report['skipped'])}, failed {len(report['failed'])}")
  return "\n".join(lines)
