"""Precision: what loading the model at bfloat16 or float16 does to the audits' metrics, and to their wall time.

One process loads the model at each dtype in turn and runs a fixed set of registered checks through the catalog
(``spec.run(AuditContext(model=loaded), params)``), with the parameters of the **quick profile** of the audit
file entry named in :data:`ENTRIES` (read from ``audits/*.yaml``, never typed here). For each metric it reports
the value at every dtype, the absolute and relative difference from float32, and for each check the wall time
ratio against float32; the gate's verdict at each dtype is shown beside its threshold.

It then measures what a pin made at a given dtype has to tolerate when re-run at the *same* dtype on the same
weights with other kernels: every check runs again with the eager attention instead of torch's SDPA (another
floating-point reduction order, as another machine, device or library version gives; a different CPU thread count
gave bit-identical results at every dtype on this machine, so it is no proxy). The largest relative change per
kind of metric (:func:`lmaudit.checks.harness.pin.rule_for`) is reported beside the tolerance that
:mod:`lmaudit.checks.harness.pin` gives at that dtype. The derivation of that tolerance is in
``benchmarks/RESULTS.md``, section "Precision".

    .venv/bin/python benchmarks/bench_precision.py [--dtypes float32 bfloat16 float16] [--quick]

``--quick`` skips the rerun. Writes ``benchmarks/out/precision.md`` and ``precision.json`` (``--render``
rebuilds the first from the second).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmaudit.checks.catalog import load_checks
from lmaudit.checks.core.loading import DEFAULT_MODEL, DTYPES, LoadedModel, load_model
from lmaudit.checks.harness.audit_file import ParsedAudit, parse_audit_file
from lmaudit.checks.harness.context import AuditContext
from lmaudit.checks.harness.pin import pin_threshold, rule_for
from lmaudit.checks.harness.thresholds import compare

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out"
PROFILE = "quick"
REFERENCE = "float32"
RERUN = "eager"  # the attention kernel of the rerun (transformers' own loop, vs torch's fused SDPA)

# (audit file, entry): cheap entries of the quick profile covering every kind of pinned metric (log-likelihood,
# share, p-value, other float, discrete coordinates). The order matters: the detection runs (and is timed) in the
# first super-weight entry, and the later ones reuse it from the context, as in an audit session.
ENTRIES: tuple[tuple[str, str], ...] = (
    ("model.yaml", "perplexity_beats_unigram_baseline"),
    ("superweights.yaml", "superweights_directory"),
    ("superweights.yaml", "superweight_pruning_hurts_far_more_than_others"),
    ("quantization.yaml", "w8a8_per_tensor_super_activation_handling_recovers_loss"),
    ("arithmetic.yaml", "arithmetic_baseline_accuracy"),
    ("arithmetic.yaml", "arithmetic_cna_top_neurons_matter"),
)


@dataclass
class EntryRun:
    """One entry's metrics at one dtype (and attention kernel), with its wall time, or the error it raised."""

    entry: str
    seconds: float
    metrics: dict[str, Any] = field(default_factory=dict)
    gates: dict[str, bool] = field(default_factory=dict)  # metric -> passed its quick-profile threshold
    extra: dict[str, Any] = field(default_factory=dict)
    error: str = ""


def parsed_entries() -> list[ParsedAudit]:
    load_checks()
    by_key = {(p.path.name, p.entry.name): p for f in {f for f, _ in ENTRIES}
              for p in parse_audit_file(ROOT / "audits" / f)}
    return [by_key[key] for key in ENTRIES]


def plain(value: Any) -> Any:
    """JSON-ready: tuples as lists, non-finite floats as text (as the report's JSON does)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def super_weight_values(result: Any) -> dict[str, Any]:
    """The detection's weight values and super activations (evidence, not declared metrics)."""
    detection = getattr(result, "detection", None)
    if detection is None:
        return {}
    return {"weights": {sw.label(): sw.weight for sw in detection.super_weights},
            "activations": {sw.label(): sw.activation for sw in detection.super_weights}}


def run_entries(loaded: LoadedModel, entries: list[ParsedAudit]) -> list[EntryRun]:
    """Every entry on a fresh context (no artifact carried over from another dtype or kernel)."""
    context = AuditContext(model=loaded, profile=PROFILE)
    runs = []
    for parsed in entries:
        resolved = parsed.resolve(PROFILE)
        assert resolved is not None, f"{parsed.entry.name} is not in the {PROFILE} profile"
        context.begin_check()
        started = time.perf_counter()
        try:
            result = parsed.spec.run(context, resolved.params)
        except Exception as exc:  # a finding to report (NaN guard, premise missing), not a crash of the bench
            runs.append(EntryRun(parsed.entry.name, time.perf_counter() - started,
                                 error=f"{type(exc).__name__}: {exc}"))
            continue
        seconds = time.perf_counter() - started
        metrics = {name: plain(value) for name, value in result.metrics().items()}
        gates = {name: compare(name, metrics.get(name), threshold).passed for name, threshold in resolved.expect.items()}
        runs.append(EntryRun(parsed.entry.name, seconds, metrics, gates, super_weight_values(result)))
    return runs


def kind_of(name: str, value: Any) -> str:
    """The pin's kind of a measured value: non-floats are pinned exactly (``equals``), floats by name."""
    if not isinstance(value, float) and not (isinstance(value, str) and value in ("nan", "inf", "-inf")):
        return "discrete"
    return rule_for(name).kind


@contextmanager
def attention_kernel(loaded: LoadedModel, kernel: str) -> Iterator[None]:
    """Run the model with another attention implementation inside the block (a kernel choice, not an edit of
    the weights: the content hash is unchanged), then restore the one it was loaded with."""
    before = loaded.model.config._attn_implementation
    if before == kernel:
        raise SystemExit(f"the model already runs the {kernel} attention: the rerun would measure nothing")
    loaded.model.set_attn_implementation(kernel)
    try:
        yield
    finally:
        loaded.model.set_attn_implementation(before)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - started


# ------------------------------------------------------------------------------------------------ comparison


def deviation(value: Any, reference: Any) -> tuple[float | None, float | None]:
    """``(absolute, relative)`` difference of two numeric metric values; ``None`` for non-numbers."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not isinstance(reference, (int, float)):
        return None, None
    if not (math.isfinite(value) and math.isfinite(reference)):
        return None, None
    diff = value - reference
    return diff, (abs(diff) / abs(reference) if reference else (0.0 if diff == 0 else math.inf))


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list) and value and isinstance(value[0], list):
        return " ".join(f"L{c[0]}[{c[1]},{c[2]}]" if len(c) == 3 else str(c) for c in value)
    return str(value)


def metric_table(runs: dict[str, list[EntryRun]], reruns: dict[str, list[EntryRun]], dtypes: list[str]) -> list[str]:
    """One row per metric: its value at each dtype, Δ and rel Δ against float32, and (with reruns) the rel change
    at the same dtype with the other attention kernel."""
    low = [d for d in dtypes if d != REFERENCE]
    rerun_dtypes = [d for d in dtypes if d in reruns]
    head = ["entry", "metric", *dtypes, *[f"Δ {d}" for d in low], *[f"rel Δ {d}" for d in low],
            *[f"{RERUN} rel Δ {d}" for d in rerun_dtypes], "kind"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    gate = {True: " ✓", False: " ✗"}
    for index, ref in enumerate(runs[REFERENCE]):
        others = [runs[d][index] for d in low]
        if ref.error or any(o.error for o in others):
            errors = "; ".join(f"{d}: {r.error}" for d, r in zip(dtypes, [ref, *others], strict=True) if r.error)
            lines.append(f"| {ref.entry} | (error) | {errors} |")
            continue
        for name, value in ref.metrics.items():
            values = [value, *[o.metrics.get(name) for o in others]]
            if rule_for(name).rel is None or all(v in (None, "nan") for v in values):  # timings; nothing measured
                continue
            devs = [deviation(o.metrics.get(name), value) for o in others]
            cells = [fmt(v) + gate.get(r.gates.get(name), "") for v, r in zip(values, [ref, *others], strict=True)]
            absolute = [fmt(a) if a is not None else ("same" if o.metrics.get(name) == value else "differs")
                        for (a, _), o in zip(devs, others, strict=True)]
            relative = [f"{r:.2e}" if r is not None else "" for _, r in devs]
            again = []
            for d in rerun_dtypes:
                base, other = runs[d][index].metrics.get(name), reruns[d][index].metrics.get(name)
                _, rel = deviation(other, base)
                again.append(f"{rel:.1e}" if rel is not None else ("same" if other == base else "differs"))
            lines.append(f"| {ref.entry} | {name} | " + " | ".join([*cells, *absolute, *relative, *again])
                         + f" | {kind_of(name, value)} |")
    return lines


def time_table(runs: dict[str, list[EntryRun]], dtypes: list[str], loads: dict[str, float]) -> list[str]:
    lines = ["| entry | " + " | ".join(f"{d} (s)" for d in dtypes) + " | "
             + " | ".join(f"{d} / {REFERENCE}" for d in dtypes if d != REFERENCE) + " |",
             "|" + "---|" * (1 + 2 * len(dtypes) - 1)]
    rows = [("load", [loads[d] for d in dtypes])]
    rows += [(ref.entry, [runs[d][i].seconds for d in dtypes]) for i, ref in enumerate(runs[REFERENCE])]
    rows.append(("total of the checks", [sum(r.seconds for r in runs[d]) for d in dtypes]))
    for name, seconds in rows:
        ratios = [f"{s / seconds[0]:.2f}×" for s in seconds[1:]]
        lines.append(f"| {name} | " + " | ".join(f"{s:.1f}" for s in seconds) + " | " + " | ".join(ratios) + " |")
    return lines


def rerun_deviation(base: list[EntryRun], again: list[EntryRun]) -> dict[str, tuple[float, str]]:
    """Per kind of metric: the largest relative change between two runs at the same dtype, and where."""
    worst: dict[str, tuple[float, str]] = {}
    for first, second in zip(base, again, strict=True):
        if first.error or second.error:
            continue
        for name, value in first.metrics.items():
            kind = kind_of(name, value)
            if rule_for(name).rel is None:  # timing and memory: not pinned
                continue
            _, rel = deviation(second.metrics.get(name), value)
            if kind == "discrete":
                rel = 0.0 if second.metrics.get(name) == value else math.inf  # same or not
            if rel is not None and rel >= worst.get(kind, (-1.0, ""))[0]:
                worst[kind] = (rel, f"{first.entry}.{name}")
    return worst


def pin_tolerance(kind_example: str, value: float, dtype: str) -> str:
    threshold = pin_threshold(kind_example, value, dtype)
    if not threshold or "rel" not in threshold:
        return "equals" if threshold else "not pinned"
    return f"rel {threshold['rel']:g}" + (f" or abs {threshold['abs']:g}" if "abs" in threshold else "")


@dataclass
class Measurement:
    """Everything one benchmark run measured (saved as ``precision.json``; ``--render`` rebuilds the tables)."""

    model: str
    threads: int
    seconds: float
    load_seconds: dict[str, float]
    content_hash: dict[str, str]
    runs: dict[str, list[EntryRun]]
    reruns: dict[str, list[EntryRun]]  # the same checks with the other attention kernel

    def to_json(self) -> str:
        data = {**self.__dict__, "runs": {d: [r.__dict__ for r in rs] for d, rs in self.runs.items()},
                "reruns": {d: [r.__dict__ for r in rs] for d, rs in self.reruns.items()}}
        return json.dumps(data, indent=1, default=str)

    @classmethod
    def from_json(cls, text: str) -> Measurement:
        data = json.loads(text)
        for key in ("runs", "reruns"):
            data[key] = {d: [EntryRun(**r) for r in rs] for d, rs in data[key].items()}
        return cls(**data)


def measure(model: str, dtypes: list[str], *, rerun: bool) -> Measurement:
    entries = parsed_entries()
    threads = torch.get_num_threads()
    runs: dict[str, list[EntryRun]] = {}
    reruns: dict[str, list[EntryRun]] = {}
    loads: dict[str, float] = {}
    hashes: dict[str, str] = {}
    started = time.perf_counter()
    for dtype in dtypes:
        loaded, loads[dtype] = timed(lambda dtype=dtype: load_model(model, dtype=dtype))
        hashes[dtype] = loaded.content_hash
        runs[dtype] = run_entries(loaded, entries)
        print(f"{dtype}: {sum(r.seconds for r in runs[dtype]):.1f} s", flush=True)
        if rerun:
            with attention_kernel(loaded, RERUN):
                reruns[dtype] = run_entries(loaded, entries)
            print(f"{dtype} with {RERUN} attention: {sum(r.seconds for r in reruns[dtype]):.1f} s", flush=True)
        del loaded
    return Measurement(model, threads, time.perf_counter() - started, loads, hashes, runs, reruns)


def render(m: Measurement) -> list[str]:
    dtypes = list(m.runs)
    lines = [
        "## Precision (`benchmarks/bench_precision.py`)",
        "",
        f"Model `{m.model}`, checks run through the catalog with the **{PROFILE}** profile's parameters of "
        f"their audit entries, {m.threads} torch threads; whole benchmark {m.seconds:.0f} s. ✓/✗: the entry's gate "
        f"at that dtype (only on gated metrics). Δ = value − float32; rel Δ = |Δ| / |float32 value|; {RERUN} rel "
        "Δ: the same dtype rerun with the eager attention instead of SDPA (another reduction order).",
        "",
        *metric_table(m.runs, m.reruns, dtypes),
        "",
        "Super weights found (weight value, super activation = down-projection output at the super-activation "
        "token):",
        "",
    ]
    for dtype in dtypes:
        extra = next((r.extra for r in m.runs[dtype] if r.extra), {})
        found = ", ".join(f"{label} w = {w:.6g}, act = {extra['activations'][label]:.6g}"
                          for label, w in extra.get("weights", {}).items()) or "none"
        lines.append(f"- {dtype}: {found}")
    lines += ["", "Wall time per check (fresh context per dtype; the detection is timed in `superweights_directory`):",
              "", *time_table(m.runs, dtypes, m.load_seconds), ""]
    if m.reruns:
        lines += [
            f"Same dtype, other kernel: every check rerun with the {RERUN} attention instead of SDPA. Largest "
            "relative change per kind of pinned metric over every metric, the discontinuous ones included (built on "
            "greedy answers or on rounding; discrete: 0 = identical, inf = changed), beside the pin tolerance for "
            "that dtype:",
            "",
            "| kind | " + " | ".join(f"{d}: max rel change (where) | {d}: pin tol" for d in dtypes) + " |",
            "|---|" + "---|---|" * len(dtypes),
        ]
        worst = {d: rerun_deviation(m.runs[d], m.reruns[d]) for d in dtypes}
        examples = {"log-likelihood": "perplexity", "share": "accuracy", "p-value": "p_value",
                    "other float": "ratio", "percentage": "x_pct"}
        for kind in sorted({k for d in dtypes for k in worst[d]}):
            cells = []
            for d in dtypes:
                rel, where = worst[d].get(kind, (math.nan, ""))
                tol = pin_tolerance(examples[kind], 1.0, d) if kind in examples else "equals"
                cells += [f"{rel:.2e} ({where})", tol]
            lines.append(f"| {kind} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--quick", action="store_true", help="skip the rerun with the other attention kernel")
    parser.add_argument("--render", action="store_true", help="only rebuild precision.md from precision.json")
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    if args.render:
        measured = Measurement.from_json((OUT / "precision.json").read_text())
    else:
        torch.set_grad_enabled(False)
        dtypes = [REFERENCE, *[d for d in args.dtypes if d != REFERENCE]]
        measured = measure(args.model, dtypes, rerun=not args.quick)
        (OUT / "precision.json").write_text(measured.to_json())
    lines = render(measured)
    (OUT / "precision.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
