"""Pinning: one run's measured values written as a regression suite for that model (``--audit-pin PATH``).

For every entry of the run that measured something, the pin holds a *regression entry*: the same check with the
parameters the run resolved for its profile, and every metric it reported pinned with a tolerance chosen by the
metric's kind (:data:`RULES`):

=================  ==================================================  ==============================================
kind               metrics (by name)                                   threshold
=================  ==================================================  ==============================================
discrete           ints, bools, strings, lists, mappings (coordinates,  ``equals``: a count or a coordinate that moves
                   counts, sets of heads, booleans)                     is a change
timing             ``*seconds*``, ``*duration*``, ``*_time*``, ...      not pinned: wall time is not a property of the
                                                                        weights
memory             ``*memory*``, ``peak_*``, ``*_bytes``, ...           not pinned: allocator state differs between
                                                                        processes (measured: a peak-memory ratio moved
                                                                        8 % between two runs on the same weights)
log-likelihood     perplexity, nll, loss, log-prob, entropy, kl         ``approx``, rel 1e-3
share              accuracy, rate, fraction, share, recovery,           ``approx``, rel 1e-2 or abs 1e-3 (whichever is
                   probability, correlation                             larger)
p-value            ``p_value``, ``*_p``, ``pvalue``                     ``approx``, rel 0.05
percentage         ``*_pct``, ``*percent*``                             ``approx``, rel 1e-2 or abs 0.01 points
other float        ratios, magnitudes, norms                            ``approx``, rel 1e-2
=================  ==================================================  ==============================================

Why these numbers: on the same weights, device and library versions a check is deterministic up to the order of
floating-point reductions (thread count, BLAS build), which moves a float32 mean over thousands of tokens by about
1e-6 relative, so 1e-3 on a log-likelihood is three orders of magnitude of headroom, yet any fine-tune or
re-quantization moves perplexity by more. Shares in [0, 1] come from counts: abs 1e-3 is below one item in a
thousand, so a single flipped prompt fails the pin. p-values of tail events change by orders of magnitude with one
count, so 5 % relative only catches real moves. A percentage near zero (a mean change over random controls) is
all noise: measured 0.0046 vs 0.0047 % between one and two CPU threads on the same weights, so 0.01 points of
slack, far below the effects these audits look for.

**Low precision** (:func:`low_precision_factor`). A pin made at bfloat16 or float16 multiplies the continuous
tolerances by a factor measured with ``benchmarks/bench_precision.py`` (smollm2-135m-instruct, the quick profile's
perplexity, super-weight detection and impact, W8A8 recovery and CNA checks; ``benchmarks/RESULTS.md``, section "Precision").
What such a pin must absorb is another rounding of the same computation at the same dtype (another machine, BLAS or
attention kernel). Two measurements bound it: (a) the same dtype rerun with the eager attention instead of SDPA, a
direct sample; (b) the deviation from float32, whose own rounding error is negligible (rerun change ≤ 1.5e-6): two
low-precision runs each within d of float32 are within 2d of each other, the worst case. On smooth metrics:

=====================  ==========================  ==========================  ===============================
kind                   bfloat16: (a) / (b)         float16: (a) / (b)          low-precision tolerance
=====================  ==========================  ==========================  ===============================
log-likelihood         2.3e-2 / 5.2e-2             4.3e-3 / 2.4e-3             bf16 rel 0.1 (×100) ≈ 2·(b) =
                       (perplexity ratios of the   (perplexity with the super  0.104, 4.3× (a); the headline
                       pruned model; headline      weights pruned)             perplexity moved 4.4e-3 / 5.8e-3.
                       perplexity 4.4e-3/5.8e-3)                               fp16 rel 0.01 (×10): 2.1× 2·(b),
                                                                               2.3× (a)
share (continuous)     5.6e-3 / 1.1e-2             2.2e-4 / 2.1e-4             rel 0.1 (×10): 4.5× 2·(b)
other float            4.4e-3 / 5.8e-3 (super-     2.7e-4 / 9.0e-4             rel 0.1 (×10): 8.6× 2·(b)
                       activation: 0 / 3.2e-3)
p-value                0 / 0                       0 / 0                       rel 0.5 (×10), kept
=====================  ==========================  ==========================  ===============================

Ten times for bfloat16 log-likelihoods (the earlier guess) is below what one kernel change already moves them
(2.3e-2). Changing the thread count changed nothing at any dtype (bit-identical). Super-weight coordinates were the
same at every dtype. Not covered by any factor, and so failing a low-precision pin whenever kernels differ: counts of
greedy answers (bfloat16 flipped 3 of 64 arithmetic answers against float32, net +1, and 2-3 of 128 under the
other kernel; they are pinned ``equals``) and what is built on them (CNA control means in points moved by more
than themselves), and W8A8 round-to-nearest recovery, whose rounding pattern changes with any perturbation
(0.275 → 0.111 at float32 under the other kernel; 0.20-0.26 at the low precisions).

Entries of the hand-written suite that missed their thresholds on the model become **deviations**: a strict
xfail with the claim and the measured values side by side, applied to those entries whenever the pin is in the
run (:mod:`lmaudit.checks.plugin.pins`).

This module works on plain data (the JSON form of the report's records and run info), so it needs neither
pytest nor torch.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import yaml

GENERATED_BY = "generated by --audit-pin"
LOW_PRECISION = ("bfloat16", "float16")
LOW_PRECISION_FACTOR = 10.0  # continuous tolerances at bfloat16 and float16 (measured: module docstring)
LOW_PRECISION_KIND_FACTOR: dict[tuple[str, str], float] = {
    ("bfloat16", "log-likelihood"): 100.0,  # rel 0.1 ≥ 2 × 5.2e-2, the worst deviation from float32 measured
}


@dataclass(frozen=True)
class ToleranceRule:
    """How metrics of one kind are pinned: matched by name, ``None`` tolerances mean "not pinned"."""

    kind: str
    pattern: str  # a regular expression searched in the metric name
    rel: float | None
    abs: float | None = None


RULES: tuple[ToleranceRule, ...] = (
    ToleranceRule("timing", r"seconds|duration|_time\b|time_|elapsed|wall|_s$", None),
    ToleranceRule("memory", r"memory|peak_|rss|_bytes$|_mb$|_gb$", None),
    ToleranceRule("p-value", r"p_value|pvalue|(^|_)p$", 0.05),
    ToleranceRule("log-likelihood", r"perplexity|ppl|nll|loss|log_?prob|logp|entropy|(^|_)kl", 1e-3),
    ToleranceRule("percentage", r"_pct$|percent", 1e-2, 1e-2),
    ToleranceRule("share", r"accuracy|(^|_)acc|rate|fraction|share|recovery|prob|correlation|spearman|pearson|rho",
                  1e-2, 1e-3),
)
DEFAULT_FLOAT = ToleranceRule("other float", r"", 1e-2)


def rule_for(metric: str) -> ToleranceRule:
    return next((rule for rule in RULES if re.search(rule.pattern, metric)), DEFAULT_FLOAT)


def _is_float(value: Any) -> bool:
    return isinstance(value, float)


def low_precision_factor(dtype: str, kind: str) -> float:
    """How many times the float32 tolerance of ``kind`` a value measured at ``dtype`` gets (1 at float32)."""
    if dtype not in LOW_PRECISION:
        return 1.0
    return LOW_PRECISION_KIND_FACTOR.get((dtype, kind), LOW_PRECISION_FACTOR)


def pin_threshold(metric: str, value: Any, dtype: str) -> dict[str, Any] | None:
    """The pinned threshold for one measured value (plain data), or ``None`` when it is not pinned."""
    if value is None:
        return None
    rule = rule_for(metric)
    if rule.rel is None:
        return None
    if not _is_float(value):  # ints, bools, strings, lists, mappings, "nan"/"inf" from JSON: exactly
        return {"equals": value}
    if not math.isfinite(value):
        return {"equals": str(value)}
    factor = low_precision_factor(dtype, rule.kind)
    threshold: dict[str, Any] = {"approx": value, "rel": rule.rel * factor}
    if rule.abs is not None:
        threshold["abs"] = rule.abs * factor
    return threshold


def entry_name(key: str) -> str:
    """A pin entry's name from the key of the audit it pins: ``superweights.yaml::found`` -> ``superweights.found``."""
    file, _, name = key.partition("::")
    stem = re.sub(r"\.ya?ml$", "", file).replace("/", ".")
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{stem}.{name}")


def deviation_reason(record: dict[str, Any], model: str, weights: str) -> str:
    """The claim and the measured values side by side, for the strict xfail of a deviating entry."""
    missed = [c for c in record.get("comparisons", []) if not c.get("passed") and c.get("kind") == "threshold"]
    measured = "; ".join(f"{c['metric']} expected {c['expected']}, measured {_short(c['measured'])}" for c in missed)
    claim = record.get("claim") or record.get("description") or record.get("check") or ""
    return f"{model} (weights {weights[:12]}) deviates from the claim: {claim} — {measured}"


def _short(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else repr(value)


def pinnable(record: dict[str, Any]) -> str:
    """Why a record cannot be pinned ("" when it can): it must be a YAML check that measured metrics, and not an
    entry of a pin file itself."""
    if record.get("pin"):
        return "an entry of a pin file"
    if not record.get("check"):
        return "a Python audit (only registered checks can be pinned)"
    if record.get("status") not in ("passed", "failed", "xfailed", "xpassed") or not record.get("metrics"):
        return f"{record.get('status')}: {record.get('message', '')[:200]}".rstrip(": ")
    return ""


def build_pin(records: list[dict[str, Any]], run: dict[str, Any], *, date: str,
              previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """The pin document (plain data, ready for :func:`render_pin`) from a run's records and run info.

    ``previous``: the pin file this one replaces; when it was measured on the same weights, the profiles and
    deviations this run did not measure are kept, so one file holds both profiles (run ``quick``, then ``full``).
    """
    model, profile = run["model"], run["profile"]
    weights, dtype = model.get("content_hash", ""), model.get("dtype") or run.get("precision", {}).get("dtype", "")
    entries: dict[str, dict[str, Any]] = {}
    deviations: list[dict[str, Any]] = []
    not_pinned: list[str] = []
    sources: list[str] = []
    for record in records:
        if why := pinnable(record):
            if why != "an entry of a pin file" and not record.get("message", "").startswith("not in profile"):
                not_pinned.append(f"{record.get('key') or record['nodeid']}: {why}")
            continue
        key = record["key"]
        sources.append(key.partition("::")[0])
        expect = {metric: threshold for metric, value in record["metrics"].items()
                  if (threshold := pin_threshold(metric, value, dtype)) is not None}
        claim = record.get("claim") or record.get("description") or ""
        entries[entry_name(key)] = {
            "name": entry_name(key),
            "check": record["check"],
            "claim": f"regression pin of {key}, as measured on {model.get('spec', '?')}" + (f" ({claim})" if claim else ""),
            "profiles": {profile: {"params": record.get("params", {}), "expect": expect}},
        }
        missed = any(c.get("kind") == "threshold" and not c.get("passed") for c in record.get("comparisons", []))
        if missed and record.get("status") in ("failed", "xfailed"):
            deviations.append({"audit": key, "profile": profile,
                               "reason": deviation_reason(record, model.get("spec", "?"), weights), "strict": True})
    profiles = [profile]
    if previous is not None and previous.get("pinned", {}).get("weights") == weights:
        for old in previous.get("audits", []):
            kept = {p: o for p, o in (old.get("profiles") or {}).items() if p != profile}
            if kept and isinstance(kept, dict):
                entries.setdefault(old["name"], {**old, "profiles": {}})["profiles"].update(kept)
        deviations += [d for d in previous["pinned"].get("deviations", []) if d.get("profile") != profile]
        profiles += [p for p in previous["pinned"].get("profiles", []) if p != profile]
    environment = run.get("environment", {})
    header = {
        "model": model.get("spec", ""),
        "weights": weights,
        "dtype": dtype,
        "device": run.get("precision", {}).get("device") or "",
        "date": date,
        "generated_by": GENERATED_BY,
        "lmaudit": environment.get("lmaudit", ""),
        "torch": environment.get("torch", ""),
        "transformers": environment.get("transformers", ""),
        "source": sorted(set(sources)),
        "profiles": sorted(set(profiles)),
        "not_pinned": not_pinned,
        "deviations": deviations,
    }
    audits = [{**entry, "profiles": dict(sorted(entry["profiles"].items()))} for entry in entries.values()]
    return {"pinned": header, "audits": audits}


def render_pin(document: dict[str, Any]) -> str:
    """The pin as YAML, with a comment saying what it is and how to regenerate it."""
    header = document["pinned"]
    comment = (f"# Pinned regression suite for {header['model']} ({GENERATED_BY}, {header['date']}).\n"
               "# Every value below was measured, none typed: regenerate with\n"
               f"#   pytest audits/ --model {header['model']} --audit-pin <this file>\n"
               "# and run it with --audit-pins <this file> (or name the file on the command line).\n")
    return comment + yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=120)
