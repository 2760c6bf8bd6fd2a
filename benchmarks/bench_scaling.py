"""How the cost of each registered check grows with the model, the number of prompts and the number of layers.

    .venv/bin/python benchmarks/bench_scaling.py                                   # every check, both models, report
    .venv/bin/python benchmarks/bench_scaling.py --checks perplexity,superweights   # some checks (default model)
    .venv/bin/python benchmarks/bench_scaling.py --models gemma3-270m --base-only    # the model axis only
    .venv/bin/python benchmarks/bench_scaling.py --report                           # table + chart from saved points
    .venv/bin/python benchmarks/bench_scaling.py --quick                            # smoke: fewer points, one run
    .venv/bin/python benchmarks/bench_scaling.py --audit-work full --audit-files audits/arithmetic.yaml
                                                  # the full audit's entries: seconds and counted forward work
    .venv/bin/python benchmarks/bench_scaling.py --project                          # docs/scale.md's tables

**What is timed.** One check run alone, as the registry runs it (``spec.run(AuditContext(model=loaded), params)``),
in a fresh context each time: the artifacts it shares with other entries in an audit session (the super-weight
detection, the head screen, the CNA scoring set) are built inside it, as they are for the first entry that needs
them. Each point is the minimum of ``--repeats`` runs (a run that took more than ``--repeat-below`` seconds is not
repeated). The load average is recorded before and after each point: the machine is shared.

**Axes.** Each check has a cheap *base* point (about its audit's quick profile) and up to two axes, each varying one
parameter with the others at the base:

- *prompts*: the check's prompt, window or document count (``x`` = that count, or the length of the prompt list);
- *layers*: its layer fraction or range (``x`` = the number of layers it covers on the model, from
  :func:`lmaudit.checks.core.stats.layer_range` or the check's own rounding);
- *model*: the base point on every ``--models`` entry (``x`` = forward FLOPs per token of a 257-token window,
  ``2·N_lin + 2·d·V + 2·n_layers·seq·d_attn``, :class:`bench_flops.ModelShape`).

The exponent ``b`` of ``seconds ≈ a·x^b`` is the least-squares slope of ``log seconds`` on ``log x`` over the points
of an axis (two points: the slope between them). ``b ≈ 1``: linear; ``b < 1``: a fixed cost (the few-shot prefix,
the detection, the weight quantization) dominates; ``b > 1``: superlinear.

Points are saved to ``benchmarks/out/scaling/<model>/<check>.json`` (so that a run can be split into short runs);
the report goes to ``benchmarks/out/scaling.md`` and the chart to ``docs/scaling.svg``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from lmaudit.checks.core.errors import PremiseMissing  # noqa: E402
from lmaudit.checks.core.loading import LoadedModel, load_model  # noqa: E402
from lmaudit.checks.core.stats import layer_range  # noqa: E402
from lmaudit.checks.superweights.invariance import INVARIANCE_PROMPTS  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_flops import ModelShape, load_average  # noqa: E402

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
POINTS = OUT / "scaling"
CHART = HERE.parent / "docs" / "scaling.svg"
MODELS = ("smollm2-135m-instruct", "gemma3-270m")
SEQ = 257  # the window the model axis' FLOPs per token are counted for (256 tokens + BOS)


# ------------------------------------------------------------------------------------------------ plans


def _count(value: Any, n_layers: int) -> float:
    """``x`` of a count parameter: the count, or the length of a list of prompts."""
    return float(len(value)) if isinstance(value, list | tuple) else float(value)


def _layers_from(value: Any, n_layers: int) -> float:
    """``x`` of a layer fraction (``start`` of the last layers) or range (``(start, stop)``): the layers covered."""
    start, stop = value if isinstance(value, list | tuple) else (value, 1.0)
    return float(len(layer_range(n_layers, start, stop)))


def _layers_rounded(value: Any, n_layers: int) -> float:
    """``x`` of ``bias_editing``'s ``layer_fraction``: ``max(1, round(f·n_layers))`` layers scored neuron by neuron."""
    return float(min(n_layers, max(1, round(value * n_layers))))


@dataclass(frozen=True)
class Axis:
    param: str
    values: tuple[Any, ...]  # the base's value among them
    size: Callable[[Any, int], float]  # (value, n_layers) -> x


@dataclass(frozen=True)
class Plan:
    """A check's base point (overrides of its defaults) and the axes varied around it."""

    check: str
    base: dict[str, Any] = field(default_factory=dict)
    prompts: Axis | None = None
    layers: Axis | None = None
    note: str = ""  # what the prompts axis counts, for the table


_INVARIANCE_PROMPTS = list(INVARIANCE_PROMPTS)  # the check's own prompts, whose first tokens all differ

# Bases sit near each audit's quick profile (audits/*.yaml) so that a point takes seconds, not minutes; the axes
# go up to about the full profile. Checks left out: quantization_table / quantization_block_sweep (quantization_recovery
# once per scheme / block size), superweights_finetune_invariance and arithmetic_cna_compare (a one-time LoRA
# fine-tune, then a detection or a CNA pass), arithmetic_cna_pruning and arithmetic_cna_head_ablation (the CNA
# scoring set and the evaluation of arithmetic_cna_intervention, with another set of 20 controls).
PLANS: tuple[Plan, ...] = (
    Plan("architecture"),
    Plan("perplexity", {"n_windows": 4}, prompts=Axis("n_windows", (2, 4, 8), _count), note="256-token windows"),
    Plan("superweights"),
    Plan("superweights_prompt_invariance", {"prompts": _INVARIANCE_PROMPTS[:6]},
         prompts=Axis("prompts", (_INVARIANCE_PROMPTS[:3], _INVARIANCE_PROMPTS[:6], _INVARIANCE_PROMPTS), _count),
         note="prompts"),
    Plan("superweight_impact", {"n_windows": 4}, prompts=Axis("n_windows", (2, 4, 8), _count),
         note="128-token windows"),
    Plan("superweight_stopwords", {"n_prompts": 32}, prompts=Axis("n_prompts", (16, 32, 64), _count),
         note="prompts"),
    Plan("superweight_scaling", {"n_windows": 2}, prompts=Axis("n_windows", (2, 4), _count),
         note="128-token windows × 8 scales"),
    Plan("quantization_recovery", {"scheme": "w8a8-per-token", "n_windows": 2, "corpora": ["pydoc"]},
         prompts=Axis("n_windows", (2, 4), _count), note="256-token windows × 3 z"),
    Plan("arithmetic_accuracy", {"n_per_op": 8}, prompts=Axis("n_per_op", (4, 8, 16), _count),
         note="problems per operation × 2 templates"),
    Plan("arithmetic_head_sweep", {"n_per_op": 8, "confirm_per_op": 8, "layer_fraction": (0.8, 1.0)},
         prompts=Axis("n_per_op", (4, 8, 16), _count),
         layers=Axis("layer_fraction", ((0.9, 1.0), (0.8, 1.0), (0.6, 1.0)), _layers_from),
         note="screening problems per operation"),
    Plan("arithmetic_cna_intervention", {"n_per_op": 8, "n_score": 4, "score_pool": 12, "min_score": 8},
         prompts=Axis("n_per_op", (8, 16), _count),
         layers=Axis("layer_fraction", (0.9, 0.8, 0.6), _layers_from),
         note="evaluated problems per operation × 2 templates"),
    Plan("occupation_bias"),
    Plan("bias_benchmarks", {"benchmarks": ["winobias"], "fraction": 0.25},
         prompts=Axis("fraction", (0.125, 0.25), _count), note="share of WinoBias"),
    Plan("bias_editing", {"top_fraction": 0.25, "layer_fraction": 0.07, "n_windows": 2, "n_arithmetic": 20},
         prompts=Axis("top_fraction", (0.25, 0.5), _count),
         layers=Axis("layer_fraction", (0.07, 0.14), _layers_rounded),
         note="share of ranking occupations"),
)
PLAN = {plan.check: plan for plan in PLANS}


# ------------------------------------------------------------------------------------------------ measuring


@dataclass
class Point:
    check: str
    model: str
    axes: list[str]  # "base" (the model axis), "prompts", "layers"
    overrides: dict[str, Any]
    x: dict[str, float]  # axis -> x
    seconds: float | None  # min over runs; None if it raised before the end
    runs: list[float]
    status: str  # "ok", "premise missing: ...", "error: ..."
    load_before: str
    load_after: str


def _points_of(plan: Plan, *, base_only: bool, quick: bool) -> list[tuple[list[str], dict[str, Any]]]:
    """(axes, overrides) of each distinct point: the base, then each axis value that differs from it."""
    points: list[tuple[list[str], dict[str, Any]]] = [(["base"], dict(plan.base))]
    if base_only:
        return points
    for name in ("prompts", "layers"):
        axis: Axis | None = getattr(plan, name)
        if axis is None:
            continue
        points[0][0].append(name)
        values = axis.values[:2] if quick else axis.values
        from lmaudit.checks.catalog import load_checks

        default = load_checks()[plan.check].params.model_fields[axis.param].default
        base_value = plan.base.get(axis.param, default)
        for value in values:
            if value != base_value and list(value if isinstance(value, tuple) else [value]) != list(
                    base_value if isinstance(base_value, tuple) else [base_value]):
                points.append(([name], {**plan.base, axis.param: value}))
    return points


def run_point(loaded: LoadedModel, plan: Plan, axes: list[str], overrides: dict[str, Any], *, repeats: int,
              repeat_below: float) -> Point:
    from lmaudit.checks.catalog import load_checks
    from lmaudit.checks.harness.context import AuditContext

    spec = load_checks()[plan.check]
    params = spec.params(**overrides)
    n_layers = loaded.adapter.n_layers
    x = {}
    for name in axes:
        axis = getattr(plan, name) if name != "base" else None
        if axis is not None:
            x[name] = axis.size(getattr(params, axis.param), n_layers)  # the default when the base leaves it
    before, runs, status = load_average(), [], "ok"
    for _ in range(repeats):
        started = time.perf_counter()
        try:
            spec.run(AuditContext(model=loaded), params)
        except PremiseMissing as exc:
            status = f"premise missing: {exc}"
        except Exception as exc:  # noqa: BLE001  (a benchmark records what failed and goes on)
            status = f"error: {type(exc).__name__}: {exc}"
        runs.append(time.perf_counter() - started)
        if status.startswith("error") or runs[-1] > repeat_below:
            break
    return Point(plan.check, loaded.spec, axes, overrides, x, None if status.startswith("error") else min(runs), runs,
                 status, before, load_average())


def _warm_up(loaded: LoadedModel) -> None:
    """One short forward pass, so the first point does not pay the thread pool and allocator start-up."""
    ids = torch.ones(1, 16, dtype=torch.long, device=loaded.adapter.device)
    loaded.model(input_ids=ids)


def measure(model: str, checks: list[str], *, repeats: int, repeat_below: float, base_only: bool,
            quick: bool) -> None:
    torch.set_grad_enabled(False)
    loaded = load_model(model)
    _warm_up(loaded)
    shape = ModelShape.of(loaded)
    directory = POINTS / model.replace("/", "_")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "_shape.json").write_text(json.dumps({
        "parameters": shape.parameters, "linear": shape.linear, "unembedding": shape.unembedding,
        "n_layers": shape.n_layers, "flops_per_token": shape.flops_per_token(SEQ)}))
    for check in checks:
        plan = PLAN[check]
        points = []
        for axes, overrides in _points_of(plan, base_only=base_only, quick=quick):
            point = run_point(loaded, plan, axes, overrides, repeats=repeats, repeat_below=repeat_below)
            print(f"{model} {check} {_short(overrides)} -> {point.seconds and round(point.seconds, 2)} s "
                  f"{point.runs} {point.status[:80]} load {point.load_before}", flush=True)
            points.append(point.__dict__)
        (directory / f"{check}.json").write_text(json.dumps(points, indent=1, default=list))


def audit_work(model: str, profile: str, files: list[str]) -> None:
    """Every entry of ``audits/*.yaml`` in ``profile``, in one context (shared artifacts built once, an entry with
    the same check and parameters as an earlier one reused, as the audit session does): seconds and the forward
    work counted by :class:`bench_flops.WorkCounter`. The ground truth of ``docs/scale.md``'s per-check costs."""
    from bench_flops import counted

    from lmaudit.checks.catalog import load_checks
    from lmaudit.checks.harness.audit_file import parse_audit_file
    from lmaudit.checks.harness.context import AuditContext

    torch.set_grad_enabled(False)
    load_checks()
    loaded = load_model(model)
    _warm_up(loaded)
    shape = ModelShape.of(loaded)
    context = AuditContext(model=loaded, profile=profile, load=load_model)
    path = POINTS / f"audit_{profile}_{model.replace('/', '_')}.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    done = {row["name"] for row in rows}
    seen = {(row["check"], row["params"]) for row in rows}
    for file in files:
        for parsed in parse_audit_file(Path(file)):
            resolved = parsed.resolve(profile)
            if resolved is None or parsed.entry.name in done:
                continue
            key = (parsed.spec.name, resolved.params.model_dump_json())
            if key in seen:
                continue  # the session reuses the earlier entry's result
            seen.add(key)
            before, status = load_average(), "ok"
            started = time.perf_counter()
            with counted(loaded, shape) as work:
                try:
                    context.begin_check()
                    parsed.spec.run(context, resolved.params)
                except PremiseMissing as exc:
                    status = f"premise missing: {exc}"
                except Exception as exc:  # noqa: BLE001  (a benchmark records what failed and goes on)
                    status = f"error: {type(exc).__name__}: {exc}"
            seconds = time.perf_counter() - started
            rows.append({"name": parsed.entry.name, "check": parsed.spec.name, "params": key[1], "seconds": seconds,
                         "status": status, "load_before": before, "load_after": load_average(),
                         "token_equivalents": work.token_equivalents(shape.n_layers),
                         "unembedding_rows": work.unembedding_rows, "flops": work.flops,
                         "layer_flops": work.layer_flops, "attention_flops": work.attention_flops,
                         "unembedding_flops": work.unembedding_flops})
            print(f"{parsed.entry.name}: {seconds:.1f} s, {work.token_equivalents(shape.n_layers):,.0f} tokens, "
                  f"{work.flops / 1e9:,.0f} GFLOP, {status[:80]}", flush=True)
            path.write_text(json.dumps(rows, indent=1))


# ------------------------------------------------------------------------------------------------ report


def fit(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of ``log y`` on ``log x`` (``y ≈ a·x^b``: ``b``); None with fewer than two distinct x."""
    pairs = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True)]
    if len({p[0] for p in pairs}) < 2:
        return None
    mx, my = sum(p[0] for p in pairs) / len(pairs), sum(p[1] for p in pairs) / len(pairs)
    return sum((px - mx) * (py - my) for px, py in pairs) / sum((px - mx) ** 2 for px, _ in pairs)


def _load() -> tuple[dict[str, dict], dict[str, list[dict]]]:
    shapes, points = {}, {}
    for directory in sorted(p for p in POINTS.iterdir() if p.is_dir()) if POINTS.exists() else []:
        shapes[directory.name] = json.loads((directory / "_shape.json").read_text())
        for path in sorted(directory.glob("[!_]*.json")):
            points.setdefault(path.stem, []).extend(json.loads(path.read_text()))
    return shapes, points


def _series(points: list[dict], model: str, axis: str) -> tuple[list[float], list[float]]:
    chosen = sorted((p["x"][axis], p["seconds"]) for p in points
                    if p["model"] == model and axis in p["axes"] and p["status"] == "ok")
    return [c[0] for c in chosen], [c[1] for c in chosen]


def _fmt_series(xs: list[float], ys: list[float]) -> str:
    return ", ".join(f"{x:g} → {y:.1f}" for x, y in zip(xs, ys, strict=True)) or "–"


def _fmt_b(b: float | None) -> str:
    return f"**{b:.2f}**" if b is not None else "–"


def report(default: str = MODELS[0]) -> str:
    shapes, points = _load()
    models = [m for m in MODELS if m in shapes] + [m for m in shapes if m not in MODELS]
    loads = [p[k] for ps in points.values() for p in ps for k in ("load_before", "load_after")]
    load_1min = sorted(float(v.split("/")[0]) for v in loads) if loads else [0.0]
    lines = [
        "## How the cost of each check grows (`benchmarks/bench_scaling.py`)",
        "",
        "Each check run alone through the registry in a fresh context (its shared artifacts, e.g. the super-weight "
        "detection or the CNA scoring set, built inside it), seconds = the minimum of up to 2 runs (one when a run "
        f"took over a minute), torch threads {torch.get_num_threads()}, {os.cpu_count()} cores. Load average "
        f"(1 min) at the points: {load_1min[0]:.1f}–{load_1min[-1]:.1f} (median {load_1min[len(load_1min) // 2]:.1f}); "
        "the lead's timed runs were kept apart by a lock. Exponent b of seconds ≈ a·x^b, least squares on log–log. "
        "Prompts and layers: on the default model, the other parameters at the base. Model: the base point on each "
        "model, x = forward FLOPs per token of a 257-token window ("
        + ", ".join(f"`{m}` {shapes[m]['flops_per_token'] / 1e6:.0f} MFLOP, {shapes[m]['parameters'] / 1e6:.0f} M "
                    f"parameters, {shapes[m]['n_layers']} layers" for m in models) + ").",
        "",
        "| check | base (overrides of the defaults) | prompts: x → s | b | layers: x → s | b | "
        + " | ".join(f"`{m}` s" for m in models) + " | b (model) |",
        "|---|---|---|---:|---|---:|" + "---:|" * len(models) + "---:|",
    ]
    fits: dict[str, dict[str, float | None]] = {}
    for plan in PLANS:
        ps = points.get(plan.check, [])
        if not ps:
            continue
        cells, fits[plan.check] = [], {}
        for axis in ("prompts", "layers"):
            xs, ys = _series(ps, default, axis)
            b = fit(xs, ys) if getattr(plan, axis) is not None else None
            fits[plan.check][axis] = b
            label = f"{getattr(plan, axis).param}: " if getattr(plan, axis) is not None and xs else ""
            steps = [later - earlier for earlier, later in zip(ys, ys[1:], strict=False)]
            monotonic = all(step >= 0 for step in steps) or all(step <= 0 for step in steps)
            cells += [label + _fmt_series(xs, ys) if getattr(plan, axis) else "–",
                      _fmt_b(b) + ("" if monotonic else " (not monotonic: no power law)")]
        base_s, model_x = [], []
        for m in models:
            base = [p for p in ps if p["model"] == m and "base" in p["axes"]]
            if base and base[0]["status"] == "ok":
                base_s.append(f"{base[0]['seconds']:.1f}")
                model_x.append((shapes[m]["flops_per_token"], base[0]["seconds"]))
            elif base:
                base_s.append("skip: premise missing" if base[0]["status"].startswith("premise")
                              else base[0]["status"][:60].replace("|", "/"))
            else:
                base_s.append("–")
        # A check that takes well under a tenth of a second (reading the config) has no cost to fit.
        timed = len(model_x) > 1 and min(y for _, y in model_x) > 0.1
        b_model = fit([x for x, _ in model_x], [y for _, y in model_x]) if timed else None
        fits[plan.check]["model"] = b_model
        base = _short(plan.base) or "defaults"
        lines.append(f"| `{plan.check}` | {base} | " + " | ".join(cells) + " | " + " | ".join(base_s)
                     + f" | {_fmt_b(b_model)} |")
    notes = [f"`{p.check}`: {p.note}" for p in PLANS if p.note and p.check in points]
    lines += ["", "What x counts on the prompts axis: " + "; ".join(notes) + ".", "",
              "Statuses other than ok: " + ("; ".join(
                  f"`{p['check']}` on `{p['model']}` {p['overrides'] and _short(p['overrides'])}: {p['status'][:160]}"
                  for ps in points.values() for p in ps if p["status"] != "ok") or "none") + ".", "",
              "![log-log: seconds against prompts, layers and model size](../docs/scaling.svg)"]
    chart(points, shapes, default, models)
    return "\n".join(lines + audit_table(default)) + "\n"


def audit_table(model: str) -> list[str]:
    """Per entry of the full audit (``--audit-work full``): seconds, forward work and its rate."""
    path = POINTS / f"audit_full_{model.replace('/', '_')}.json"
    flops_path = OUT / f"flops_{model.replace('/', '_')}.json"
    if not path.exists() or not flops_path.exists():
        return []
    flops = json.loads(flops_path.read_text())
    peak = flops["peaks"][str(flops["threads"])]
    rows = json.loads(path.read_text())
    lines = ["", f"### The full audit, entry by entry, on `{model}` (`bench_scaling.py --audit-work full`)", "",
             "One process per audit file (as `-n` workers run them), one context per file (shared artifacts "
             "built by the first entry that needs them; an entry with the same check and parameters as an earlier "
             "one is reused, as in the audit session). Forward work counted by `bench_flops.WorkCounter` "
             "(decoder-layer and unembedding matmuls, attention); CNA's per-neuron logit matmuls, weight "
             "quantization and lm-eval's bookkeeping are time without counted FLOPs, so the share of the peak is a "
             "floor.", "",
             "| entry | check | seconds | tokens through the stack | forward GFLOP | GFLOP/s | of peak | status | "
             "load (1/5/15) |", "|---|---|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        status = "ok" if r["status"] == "ok" else r["status"][:70].replace("|", "/")
        lines.append(f"| `{r['name']}` | `{r['check']}` | {r['seconds']:.1f} | {r['token_equivalents']:,.0f} | "
                     f"{r['flops'] / 1e9:,.0f} | {r['flops'] / r['seconds'] / 1e9:.0f} | "
                     f"{r['flops'] / r['seconds'] / peak:.0%} | {status} | {r['load_before']} |")
    total = sum(r["seconds"] for r in rows)
    lines.append(f"| **all** | | **{total:.0f}** | {sum(r['token_equivalents'] for r in rows):,.0f} | "
                 f"{sum(r['flops'] for r in rows) / 1e9:,.0f} | "
                 f"{sum(r['flops'] for r in rows) / total / 1e9:.0f} | "
                 f"{sum(r['flops'] for r in rows) / total / peak:.0%} | | |")
    return lines


def _short(value: Any) -> str:
    """A parameter value for a table cell: a list of prompts by its length."""
    if isinstance(value, dict):
        return ", ".join(f"{k}={_short(v)}" for k, v in value.items())
    if isinstance(value, list) and value and isinstance(value[0], str) and len(value) > 2:
        return f"[{len(value)} prompts]"
    return json.dumps(value, ensure_ascii=False).replace("|", "/")


def chart(points: dict[str, list[dict]], shapes: dict[str, dict], default: str, models: list[str]) -> None:
    """Three log-log panels (prompts, layers, model): seconds against x, one line per check, slope-1 guide."""
    import matplotlib

    matplotlib.use("svg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    matplotlib.rcParams["svg.hashsalt"] = "lmaudit"  # stable ids: the committed SVG changes only with the data
    fig, panels = plt.subplots(1, 3, figsize=(15, 5.2))
    titles = {"prompts": f"prompts / windows ({default})", "layers": f"layers covered ({default})",
              "model": "model: forward MFLOP per token"}
    for panel, axis in zip(panels, ("prompts", "layers", "model"), strict=True):
        for check, ps in points.items():
            if axis == "model":
                series = sorted((shapes[m]["flops_per_token"] / 1e6, p["seconds"]) for m in models for p in ps
                                if p["model"] == m and "base" in p["axes"] and p["status"] == "ok")
                xs, ys = [s[0] for s in series], [s[1] for s in series]
            else:
                xs, ys = _series(ps, default, axis)
            if len(xs) < 2:
                continue
            b = fit(xs, ys)
            # Relative to the smallest x: every line starts at (1, 1), so slopes compare with the guides.
            panel.plot([x / xs[0] for x in xs], [y / ys[0] for y in ys], marker="o",
                       label=f"{check} (b={b:.2f}; {ys[0]:.1f} s at x={xs[0]:g})")
        handles = panel.get_lines()
        if handles:
            x1 = max(max(h.get_xdata()) for h in handles)
            panel.plot([1, x1], [1, x1], color="grey", linestyle="--", label="slope 1 (linear)")
            panel.plot([1, x1], [1, 1], color="grey", linestyle=":", label="slope 0 (fixed cost)")
        panel.set_xscale("log")
        panel.set_yscale("log")
        for scale in (panel.xaxis, panel.yaxis):
            scale.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            scale.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        panel.set_title(titles[axis])
        panel.set_xlabel("x / smallest x")
        panel.set_ylabel("seconds / seconds at the smallest x")
        panel.grid(True, which="both", alpha=0.3)
        if handles:
            panel.legend(fontsize=7)
    fig.tight_layout()
    CHART.parent.mkdir(exist_ok=True)
    fig.savefig(CHART, metadata={"Date": None})
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ projection


@dataclass(frozen=True)
class Arch:
    """A decoder-only shape (Llama family: SwiGLU MLP, RMSNorm, untied unembedding unless said)."""

    name: str
    n_layers: int  # L
    hidden: int  # d
    intermediate: int  # I
    vocab: int  # V
    n_heads: int  # H
    n_kv_heads: int
    head_dim: int
    tied: bool = False

    @property
    def d_attn(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def layer_linear(self) -> int:
        """P: q, k, v, o and the three MLP matrices of one layer."""
        kv = self.n_kv_heads * self.head_dim
        return 2 * self.hidden * self.d_attn + 2 * self.hidden * kv + 3 * self.hidden * self.intermediate

    @property
    def linear(self) -> int:
        return self.n_layers * self.layer_linear

    @property
    def parameters(self) -> int:
        return self.linear + self.hidden * self.vocab * (1 if self.tied else 2)

    def flops_per_token(self, seq: int = SEQ) -> float:
        return 2 * self.linear + 2 * self.hidden * self.vocab + 2 * self.n_layers * seq * self.d_attn

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """K and V of every layer for one token."""
        return 2 * self.n_kv_heads * self.head_dim * self.n_layers * dtype_bytes


# Llama-2-7B (config.json of meta-llama/Llama-2-7b-hf) and Llama-3-70B (meta-llama/Meta-Llama-3-70B: GQA with 8
# KV heads and a 128k vocabulary, the larger unembedding that CNA's per-neuron logits pay for).
LLAMA2_7B = Arch("Llama-2-7B", 32, 4096, 11008, 32000, 32, 32, 128)
LLAMA3_70B = Arch("Llama-3-70B", 80, 8192, 28672, 128256, 64, 8, 128)
GPU = {"A100 80 GB": 312e12, "H100 80 GB SXM": 989e12}  # dense bf16 tensor-core peak, NVIDIA data sheets
GPU_MEMORY = 80e9
HEAD_SWEEP_ROWS = 1024  # arithmetic_head_sweep's max_rows default: replica × problem rows per suffix pass
PROMPT_TOKENS = 40  # a 4-shot one-digit arithmetic prompt, prefix and answer (about 30-60 tokens by template)


def _cna_layers(arch: Arch | ModelShape, check: str) -> int:
    if check == "bias_editing":
        return max(1, round(0.1 * arch.n_layers))  # its layer_fraction default
    return len(layer_range(arch.n_layers, 0.8))  # the CNA checks' layer_fraction default


def _rest_factor(check: str, big: Arch, small: ModelShape) -> float:
    """How the part of a check's time that is not the forward matmuls grows from the measured model to ``big``:
    CNA's per-neuron logits with ``I·V`` per scored layer; weight quantization and the super-weight searches
    (elementwise over every decoder weight) with ``N_lin``; the rest (norms, activations, log-softmax over the
    vocabulary) with the forward FLOPs per token."""
    if check.startswith("arithmetic_cna") or check == "bias_editing":
        return (big.intermediate * big.vocab * _cna_layers(big, check)) / (
            small.intermediate * small.vocab * _cna_layers(small, check))
    if check.startswith(("quantization", "superweight")):
        return big.linear / small.linear
    return big.flops_per_token() / small.flops_per_token(SEQ)


# Share of a check's time spent outside torch operators (Python: modules, hooks, batching, lm-eval's requests) on
# this CPU: 3 % (perplexity), 6 % (CNA), 12 % (head sweep) in bench_flops' profiles. It does not shrink on a GPU
# (kernel launches add to it), and it grows with the number of layer calls: the floor of a GPU entry's time.
OVERHEAD_SHARE = 0.10


def _heads_factor(check: str, big: Arch, small: ModelShape) -> float:
    """The head sweep runs once per head: ``H·L`` of them."""
    if check != "arithmetic_head_sweep":
        return 1.0
    return (big.n_heads * big.n_layers) / (small.n_heads * small.n_layers)


def overhead_seconds(row: dict, big: Arch, small: ModelShape) -> float:
    """The part of an entry's time that no faster device removes (:data:`OVERHEAD_SHARE`), scaled with the
    layer calls: ``L`` (and the number of heads for the head sweep)."""
    return OVERHEAD_SHARE * row["seconds"] * big.n_layers / small.n_layers * _heads_factor(row["check"], big, small)


def project_entry(row: dict, big: Arch, small: ModelShape, forward_rate: float) -> tuple[float, float]:
    """(forward FLOPs on ``big``, seconds this CPU would need for the whole entry on ``big``).

    Forward: the measured rows through the decoder layers (``token_equivalents × L``) and through the unembedding
    at ``big``'s per-row costs; the head sweep also runs once per head, ``H·L`` of them. The rest of the measured
    time (seconds − forward FLOPs / the perplexity pass' rate) scales by :func:`_rest_factor`."""
    heads = _heads_factor(row["check"], big, small)
    layer_rows = row["token_equivalents"] * big.n_layers * heads
    attention = row["attention_flops"] * heads * (big.n_layers * big.d_attn) / (small.n_layers * small.d_attn)
    forward = 2.0 * big.layer_linear * layer_rows + 2.0 * big.hidden * big.vocab * row["unembedding_rows"] * heads \
        + attention
    rest = max(0.0, row["seconds"] - row["flops"] / forward_rate) * _rest_factor(row["check"], big, small)
    return forward, forward / forward_rate + rest


def _gb(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:,.1f} GB" if n_bytes < 1e12 else f"{n_bytes / 1e12:,.2f} TB"


def _duration(seconds: float) -> str:
    if seconds < 1:
        return "< 1 s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} days"


def memory_rows(big: Arch) -> list[str]:
    """The memory table of ``docs/scale.md`` for one shape (module docstring of each check for the formulas)."""
    rows = []
    for dtype, nbytes in (("bfloat16", 2), ("float32", 4)):
        rows.append(f"| weights, {dtype} | {_gb(big.parameters * nbytes)} | {big.parameters / 1e9:.2f} B parameters "
                    f"({big.linear / 1e9:.2f} B in decoder matmuls) |")
    b = 2
    ppl = 4 * SEQ * (big.vocab * 4 + 2 * (big.hidden + 2 * big.intermediate) * b)
    rows.append(f"| perplexity, batch 4 × {SEQ} tokens | {_gb(ppl)} | fp32 logits 4·{SEQ}·V plus one layer's "
                "activations; no KV cache kept |")
    sweep = HEAD_SWEEP_ROWS * PROMPT_TOKENS * big.kv_bytes_per_token(b)
    rows.append(f"| head sweep, {HEAD_SWEEP_ROWS} rows × ~{PROMPT_TOKENS} tokens | {_gb(sweep)} | KV of the "
                "suffix pass after the expanded few-shot prefix (worst case: a head in layer 0); `max_rows` "
                "halves it |")
    block_rows = min(256, (1 << 24) // big.vocab)
    cna = 3 * block_rows * big.vocab * 4 + 64 * big.vocab * 4
    rows.append(f"| CNA per-neuron logits | {_gb(cna)} | blocks of {block_rows} neurons × V in fp32 (U, U², U³), "
                f"never the whole I × V = {_gb(big.intermediate * big.vocab * 4)} per layer |")
    rows.append(f"| quantization: originals kept for the exact restore | {_gb(big.linear * b)} | a copy of every "
                "decoder matmul weight while the quantized model is evaluated |")
    return rows


def project(audit_json: Path, flops_json: Path) -> str:
    """The per-check time and memory tables of ``docs/scale.md`` from a measured audit (``--audit-work full``)
    and ``bench_flops``' run (its perplexity pass' FLOP/s is the forward rate, its matmul peak the CPU peak)."""
    rows = [r for r in json.loads(audit_json.read_text()) if r["status"] == "ok"]
    flops = json.loads(flops_json.read_text())
    cpu_peak = flops["peaks"][str(flops["threads"])]
    ppl = next(p for p in flops["passes"] if p["name"] == "perplexity")
    forward_rate = ppl["flops"] / ppl["seconds"]
    small = ModelShape(**{k: tuple(v) if k == "layer_linear" else v for k, v in flops["shape"].items()})
    files = {}
    for file in sorted((HERE.parent / "audits").glob("*.yaml")):
        for line in file.read_text().splitlines():
            if line.strip().startswith("- name:"):
                files[line.split(":", 1)[1].strip()] = file.stem
    lines = [f"Generated by `benchmarks/bench_scaling.py --project` from `{audit_json.name}` (the full audit on "
             f"`{small.name}`, {sum(r['seconds'] for r in rows):.0f} s of checks on this CPU) and "
             f"`{flops_json.name}` (forward rate {forward_rate / 1e9:.0f} GFLOP/s = "
             f"{forward_rate / cpu_peak:.0%} of the {cpu_peak / 1e9:.0f} GFLOP/s fp32 matmul peak). GPU time = "
             "the CPU time the entry would take on the shape × CPU peak / GPU bf16 peak (each entry keeps the share "
             f"of the peak it reached here) + an overhead floor ({OVERHEAD_SHARE:.0%} of the entry's measured CPU "
             "time × the layer calls' growth: Python, hooks, kernel launches, which a faster device does not "
             "remove). Model loading is not included (141 GB of bfloat16 safetensors at ~2 GB/s from NVMe: about "
             "70 s for 70B, 7 s for 7B). Entries at 0 reuse what an earlier entry of their file computed (the "
             "quantization table's evaluations); the fine-tune entries' forwards run on the second model, which the "
             "counter does not see, so their time is scaled as 'rest'. The CPU column is what this machine would "
             "need if the weights fitted its 24 GB of RAM.", ""]
    for big in (LLAMA2_7B, LLAMA3_70B):
        lines += [f"### {big.name}: L = {big.n_layers}, d = {big.hidden}, I = {big.intermediate}, V = {big.vocab:,}, "
                  f"{big.n_heads} heads ({big.n_kv_heads} KV) × {big.head_dim}", "",
                  "| memory | size | what |", "|---|---:|---|", *memory_rows(big), "",
                  "| audit entry (full profile) | forward TFLOP | this 2-core CPU, fp32 (notional) | "
                  + " | ".join(f"1 × {g}" for g in GPU) + " |", "|---|---:|---:|" + "---:|" * len(GPU)]
        per_file: dict[str, float] = {}
        per_file_floor: dict[str, float] = {}
        gpu_total: dict[str, float] = {}
        total_cpu = 0.0
        for row in rows:
            forward, cpu = project_entry(row, big, small, forward_rate)
            total_cpu += cpu
            per_file[files.get(row["name"], "?")] = per_file.get(files.get(row["name"], "?"), 0.0) + cpu
            floor = overhead_seconds(row, big, small)
            gpu_total[big.name] = gpu_total.get(big.name, 0.0) + floor
            per_file_floor[files.get(row["name"], "?")] = per_file_floor.get(files.get(row["name"], "?"), 0.0) + floor
            lines.append(f"| `{row['name']}` | {forward / 1e12:,.0f} | {_duration(cpu)} | "
                         + " | ".join(_duration(cpu * cpu_peak / peak + floor) for peak in GPU.values()) + " |")
        fits = big.parameters * 2 + big.linear * 2 < GPU_MEMORY  # bf16 weights and the quantization copy
        lines.append(f"| **whole audit, one process** | | **{_duration(total_cpu)}** | "
                     + " | ".join(f"**{_duration(total_cpu * cpu_peak / peak + gpu_total[big.name])}**"
                                  for peak in GPU.values()) + " |")
        if fits:
            lines.append(f"| **8 GPUs: one worker per audit file (`-n {len(per_file)}`, a GPU each)** | | | "
                         + " | ".join("**" + _duration(max(sec * cpu_peak / peak + per_file_floor[name]
                                                           for name, sec in per_file.items())) + "**"
                                      for peak in GPU.values()) + " |")
        else:
            lines.append("| **8 GPUs: one process, `--device-map balanced`** (layers run one after another: no "
                         "faster than one GPU that could hold it) | | | "
                         + " | ".join(f"**{_duration(total_cpu * cpu_peak / peak + gpu_total[big.name])}**"
                                      for peak in GPU.values()) + " |")
            lines += ["", f"The GPU columns are per GPU-equivalent of compute: {_gb(big.parameters * 2)} of bfloat16 "
                      "weights do not fit one 80 GB GPU."]
        lines += ["", "Per audit file (one process, 1 × A100): " + ", ".join(
            f"{name} {_duration(sec * cpu_peak / GPU['A100 80 GB'] + per_file_floor[name])}"
            for name, sec in sorted(per_file.items())) + f"; of the whole audit's A100 time, "
            f"{gpu_total[big.name]:.0f} s is the overhead floor.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated; the first is the default model "
                        "whose prompts and layers axes are measured")
    parser.add_argument("--checks", default=",".join(PLAN), help="comma-separated registered check names")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--repeat-below", type=float, default=60.0, help="repeat a point only if a run was faster")
    parser.add_argument("--base-only", action="store_true", help="only the base points (the model axis)")
    parser.add_argument("--quick", action="store_true", help="two values per axis, one run, the default model")
    parser.add_argument("--report", action="store_true", help="only write the report from the saved points")
    parser.add_argument("--audit-work", metavar="PROFILE", choices=("quick", "full"),
                        help="instead: time and count the forward work of every audit entry of the profile")
    parser.add_argument("--audit-files", default=",".join(str(p) for p in sorted((HERE.parent / "audits")
                                                                                 .glob("*.yaml"))))
    parser.add_argument("--project", action="store_true", help="instead: docs/scale.md's tables for 7B and 70B "
                        "shapes from --audit-work full and bench_flops' JSON")
    args = parser.parse_args()
    if args.project:
        text = project(POINTS / "audit_full_smollm2-135m-instruct.json", OUT / "flops_smollm2-135m-instruct.json")
        (POINTS / "projection.md").write_text(text)  # not in OUT: run_all assembles OUT/*.md into RESULTS.md
        print(text)
        return
    if args.audit_work:
        audit_work(args.models.split(",")[0], args.audit_work, args.audit_files.split(","))
        return
    unknown = [c for c in args.checks.split(",") if c not in PLAN]
    if unknown:
        parser.error(f"no plan for {', '.join(unknown)}; planned checks: {', '.join(PLAN)}")
    if not args.report:
        models = args.models.split(",")[:1] if args.quick else args.models.split(",")
        for i, model in enumerate(models):
            measure(model, args.checks.split(","), repeats=1 if args.quick else args.repeats,
                    repeat_below=args.repeat_below, base_only=args.base_only or (i > 0), quick=args.quick)
    text = report()
    print(text)
    OUT.mkdir(exist_ok=True)
    (OUT / "scaling.md").write_text(text)


if __name__ == "__main__":
    sys.exit(main())
