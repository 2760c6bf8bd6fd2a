"""Recovery audits for super-outlier-aware quantization (Yu et al. 2024, §4 and its Tables 3-4 / Figure 7).

For every scheme of :mod:`lmaudit.checks.quantization.schemes` the audit measures, on each corpus (``pydoc`` always,
``wikitext2`` when ``../shared/data`` or ``$LMAUDIT_DATA`` has it) and with the pinned perplexity definition
(:mod:`lmaudit.checks.core.perplexity`; the full-precision figure comes from :func:`lmaudit.checks.core.perplexity.perplexity` itself)::

    recovery  = (PPL_naive − PPL_aware) / (PPL_naive − PPL_fp)
    ppl_ratio = PPL_aware / PPL_fp

Audit files put a minimum on ``recovery`` and a maximum on ``ppl_ratio`` per scheme (both are the worst value
over the corpora).

The aware weight-only scheme combines two things: holding the super weights out, and clipping the other
outliers at a threshold z chosen on a calibration slice. To gate the super-outlier mechanism on its own, every
evaluation also reports the *hold-out only* variant (z = inf, no clipping): ``ppl_hold_out`` and
``hold_out_recovery = (PPL_naive − PPL_hold_out) / (PPL_naive − PPL_fp)``. It costs one extra evaluation only
when the search chose a finite z; for W8A8 (no clipping) and for z = inf it is the aware figure itself. The super weights come from :func:`lmaudit.checks.superweights.detect.detect_super_weights`, computed once
per session through ``context.memo`` (shared with the super-weight audits); every scheme is evaluated once per
session and shared between the checks below, so the table, the per-scheme gates and the sweep cost one run.

Evaluation windows: the first ``n_windows`` windows of ``seq_len`` tokens of each corpus (the same windows
``perplexity()`` scores). Calibration slice for the clipping threshold z of the aware weight-only scheme: the
``calibration_windows`` windows (default 2 × 256 tokens) that follow the evaluation windows in the session's
corpus, i.e. tokens ``[n_windows·seq_len, (n_windows + calibration_windows)·seq_len)`` of it. They are disjoint
from every evaluation window: the session corpus's own evaluation windows end where they begin, and the other
corpora are other texts. One window (the former default) made the choice noisy: on smollm2-135m-instruct it
picked z = 8 for W4 128², which helped pydoc and made wikitext2 worse than naive; two windows cost
3 candidates × 1 extra window per weight-only scheme.

Block-size sweep (:class:`BlockSizeSweep`, the paper's Figure 7 finding that perplexity grows with B): its
metrics include the Spearman rank correlation between B and the aware (and naive) perplexity, the naive
perplexity ratio at the smallest block, and how much the aware perplexity grows from the smallest to the
largest block, so an audit can gate the *trend*, not only single points.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch

from lmaudit.checks.core.corpora import Corpus
from lmaudit.checks.core.errors import CorpusNotFoundError
from lmaudit.checks.core.outliers import SuperWeightSites
from lmaudit.checks.core.perplexity import corpus_windows, perplexity
from lmaudit.checks.core.results import CheckResult, metric_group
from lmaudit.checks.harness.context import AuditContext
from lmaudit.checks.harness.registry import CheckParams, register_check
from lmaudit.checks.quantization.schemes import (
    DEFAULT_Z_CANDIDATES,
    ActivationGranularity,
    ClipSearch,
    MemoryUse,
    QuantScheme,
    SuperOutliers,
    W8A8Scheme,
    WeightOnlyScheme,
    evaluate_quantized,
    recovery,
    search_clip_z,
)

SchemeName = Literal["w4-block", "w8a8-per-token", "w8a8-per-tensor"]
TABLE_CORPORA = ("pydoc", "wikitext2")


class QuantEvalParams(CheckParams):
    """What every quantization check shares (the memo key: equal settings are evaluated once)."""

    seq_len: int = 256
    n_windows: int = 4  # 4 × 256 tokens per corpus: the whole quantization audit runs in about 1-2 min
    calibration_windows: int = 2  # z search: 2 × 256 tokens right after the evaluation windows (disjoint)
    batch_size: int = 1  # one window per forward: 50 MB of logits instead of 200 MB (peak memory), same NLL
    z_candidates: tuple[float, ...] = DEFAULT_Z_CANDIDATES
    corpora: tuple[str, ...] = TABLE_CORPORA  # corpora that are not available are left out (and listed)


class RecoveryParams(QuantEvalParams):
    scheme: SchemeName = "w4-block"
    bits: int = 4  # weight bits of w4-block
    block_size: int = 128**2  # B of w4-block: contiguous elements of the flattened weight


class TableParams(QuantEvalParams):
    block_size: int = 128**2  # the w4-block row of the table
    bits: int = 4


class SweepParams(QuantEvalParams):
    bits: tuple[int, ...] = (4,)
    # 32 = the granularity of GGUF Q4_* (a model dequantized from one is reproduced exactly), up to the paper's
    # 128²; beyond it this small model is destroyed anyway (PPL > 10^4 at 256² on smollm2-135m-instruct)
    block_sizes: tuple[int, ...] = (32, 256, 64**2, 128**2)
    corpora: tuple[str, ...] = ("pydoc",)
    quick_block_sizes: tuple[int, ...] = (32, 64**2, 128**2)


# ------------------------------------------------------------------------------------------------ results


@dataclass(frozen=True)
class CorpusRow:
    """One row of the paper-style table: a scheme on a corpus."""

    scheme: str
    corpus: str
    ppl_fp: float
    ppl_naive: float
    ppl_aware: float
    recovery: float  # (naive − aware) / (naive − fp); NaN when naive does no damage
    recovery_pct: float
    ppl_ratio: float  # aware / fp
    naive_ppl_ratio: float  # naive / fp
    ppl_hold_out: float  # super outliers held out, no clipping (= ppl_aware when the scheme does not clip)
    hold_out_recovery: float  # (naive − hold_out) / (naive − fp)


@dataclass(frozen=True)
class SchemeEvaluation:
    """A scheme evaluated naive and aware on every available corpus, with its cost."""

    scheme: str
    bits: int
    block_size: int | None
    activations: str | None
    super_weights: tuple[tuple[int, int, int], ...]
    activation_tokens: tuple[int, ...]
    clip: ClipSearch | None
    rows: tuple[CorpusRow, ...]
    naive_memory: MemoryUse
    aware_memory: MemoryUse
    naive_seconds: float  # quantization + evaluation of every corpus
    aware_seconds: float
    fp_seconds: float  # full-precision evaluation of every corpus
    n_windows: int
    seq_len: int

    @property
    def min_recovery(self) -> float:
        values = [r.recovery for r in self.rows]
        return min(values) if values and not any(math.isnan(v) for v in values) else math.nan

    @property
    def max_ppl_ratio(self) -> float:
        return max(r.ppl_ratio for r in self.rows)

    @property
    def min_hold_out_recovery(self) -> float:
        values = [r.hold_out_recovery for r in self.rows]
        return min(values) if values and not any(math.isnan(v) for v in values) else math.nan


@dataclass(frozen=True)
class QuantizationRecovery(CheckResult):
    """One scheme's recovery gate."""

    evaluation: SchemeEvaluation
    missing_corpora: tuple[str, ...]

    @metric_group(*("recovery", "hold_out_recovery", "ppl_ratio", "naive_ppl_ratio", "min_naive_ppl_ratio", "clip_z",
             "peak_memory_ratio", "corpora", "n_super_weights"))
    def _metrics(self) -> dict[str, object]:
        e = self.evaluation
        return {
            "recovery": e.min_recovery,
            "hold_out_recovery": e.min_hold_out_recovery,
            "ppl_ratio": e.max_ppl_ratio,
            "naive_ppl_ratio": max(r.naive_ppl_ratio for r in e.rows),
            "min_naive_ppl_ratio": min(r.naive_ppl_ratio for r in e.rows),
            "clip_z": e.clip.z if e.clip else None,
            "peak_memory_ratio": max(e.naive_memory.peak_ratio, e.aware_memory.peak_ratio),
            "corpora": [r.corpus for r in e.rows],
            "n_super_weights": len(e.super_weights),
        }


@dataclass(frozen=True)
class QuantizationTable(CheckResult):
    """The paper-style table: full precision, naive, aware and recovery %, per scheme and corpus."""

    rows: tuple[CorpusRow, ...]
    schemes: tuple[SchemeEvaluation, ...]
    missing_corpora: tuple[str, ...]
    super_weights: tuple[tuple[int, int, int], ...]
    definition: str = "recovery = (PPL_naive − PPL_aware) / (PPL_naive − PPL_fp); ratio = PPL_aware / PPL_fp"

    @metric_group(*("n_rows", "min_recovery", "min_hold_out_recovery", "max_ppl_ratio", "corpora"))
    def _metrics(self) -> dict[str, object]:
        finite = [r.recovery for r in self.rows if not math.isnan(r.recovery)]
        hold = [r.hold_out_recovery for r in self.rows]
        return {
            "n_rows": len(self.rows),
            "min_recovery": min(finite) if finite else math.nan,
            "min_hold_out_recovery": min(hold) if hold and not any(math.isnan(v) for v in hold) else math.nan,
            "max_ppl_ratio": max(r.ppl_ratio for r in self.rows),
            "corpora": sorted({r.corpus for r in self.rows}),
        }


@dataclass(frozen=True)
class SweepPoint:
    bits: int
    block_size: int
    corpus: str
    ppl_fp: float
    ppl_naive: float
    ppl_aware: float
    recovery: float
    clip_z: float
    ppl_hold_out: float  # super weights held out, no clipping


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation ρ of two equally long sequences: Pearson correlation of their ranks (ties get
    their average rank). NaN with fewer than 3 pairs, a non-finite value, or a constant sequence."""
    if len(x) != len(y):
        raise ValueError(f"spearman: {len(x)} x values but {len(y)} y values")
    if len(x) < 3 or not all(math.isfinite(v) for v in (*x, *y)):
        return math.nan

    def ranks(values: Sequence[float]) -> list[float]:
        order = sorted(range(len(values)), key=lambda i: values[i])
        out = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2 + 1
            i = j + 1
        return out

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


@dataclass(frozen=True)
class BlockSizeSweep(CheckResult):
    """Weight-only RTN perplexity against block size B (and bits), naive vs aware (the paper's Figure 7).

    Metrics, each the worst over the (bits, corpus) series of the sweep:

    * ``aware_spearman`` / ``naive_spearman``: Spearman ρ between B and the aware / naive perplexity (1 = the
      perplexity grows strictly with the block size, the paper's finding; NaN below 3 block sizes);
    * ``smallest_block_ppl_ratio``: PPL_naive / PPL_fp at the smallest block (the most that a fine grid costs);
    * ``aware_growth``: PPL_aware(largest B) / PPL_aware(smallest B) (minimum over the series);
    * ``min_recovery``, ``max_ppl_ratio`` (PPL_aware / PPL_fp), ``aware_better_everywhere``, ``n_points``.
    """

    points: tuple[SweepPoint, ...]
    super_weights: tuple[tuple[int, int, int], ...]

    def series(self) -> dict[tuple[int, str], list[SweepPoint]]:
        """``{(bits, corpus): points sorted by block size}``."""
        out: dict[tuple[int, str], list[SweepPoint]] = {}
        for p in self.points:
            out.setdefault((p.bits, p.corpus), []).append(p)
        return {k: sorted(v, key=lambda p: p.block_size) for k, v in out.items()}

    @metric_group(*("aware_spearman", "naive_spearman", "smallest_block_ppl_ratio", "aware_growth", "min_recovery",
             "max_ppl_ratio", "aware_better_everywhere", "n_points"))
    def _metrics(self) -> dict[str, object]:
        finite = [p.recovery for p in self.points if not math.isnan(p.recovery)]
        series = list(self.series().values())

        def worst(values: list[float], pick: Callable[[list[float]], float]) -> float:
            return math.nan if not values or any(math.isnan(v) for v in values) else pick(values)

        def rho(s: list[SweepPoint], ppl: str) -> float:
            return spearman([float(p.block_size) for p in s], [getattr(p, ppl) for p in s])

        return {
            "aware_spearman": worst([rho(s, "ppl_aware") for s in series], min),
            "naive_spearman": worst([rho(s, "ppl_naive") for s in series], min),
            "smallest_block_ppl_ratio": worst([s[0].ppl_naive / s[0].ppl_fp for s in series], max),
            "aware_growth": worst([s[-1].ppl_aware / s[0].ppl_aware for s in series], min),
            "min_recovery": min(finite) if finite else math.nan,
            "max_ppl_ratio": max(p.ppl_aware / p.ppl_fp for p in self.points),
            "aware_better_everywhere": all(p.ppl_aware <= p.ppl_naive for p in self.points),
            "n_points": len(self.points),
        }


# ------------------------------------------------------------------------------------------------ shared work


def build_scheme(name: SchemeName, *, bits: int = 4, block_size: int = 128**2) -> QuantScheme:
    if name == "w4-block":
        return WeightOnlyScheme(bits=bits, block_size=block_size)
    if name == "w8a8-per-token":
        return W8A8Scheme(ActivationGranularity.PER_TOKEN)
    if name == "w8a8-per-tensor":
        return W8A8Scheme(ActivationGranularity.PER_TENSOR)
    raise ValueError(f"unknown scheme {name!r}: use w4-block, w8a8-per-token or w8a8-per-tensor")


def super_outliers(context: AuditContext) -> SuperOutliers:
    """The session's confirmed super weights, provided by the super-weight area (without importing it)."""
    sites = context.require(SuperWeightSites)
    token = {(a.layer, a.channel): a.token for a in sites.activations}
    return SuperOutliers(tuple(sites.coordinates), tuple(token.get((layer, row), 0) for layer, row, _ in sites.coordinates))


def available_corpora(context: AuditContext, specs: tuple[str, ...]) -> tuple[dict[str, Corpus], tuple[str, ...]]:
    """``({corpus name: Corpus}, missing specs)``: names or text-file paths; absent ones are listed, not fatal."""
    found: dict[str, Corpus] = {}
    missing = []
    for spec in specs:
        try:
            corpus = context.corpus(spec)
        except CorpusNotFoundError:
            missing.append(spec)
        else:
            found[corpus.name] = corpus
    return found, tuple(missing)


def _windows(context: AuditContext, params: QuantEvalParams, corpus: Corpus) -> torch.Tensor:
    tok = context.model.tokenizer
    return context.artifact(torch.Tensor, ("quant-windows", corpus.name, corpus.source, params.seq_len,
                                           params.n_windows),
                            lambda: corpus_windows(tok, corpus, params.seq_len, params.n_windows))


def _calibration(context: AuditContext, params: QuantEvalParams) -> torch.Tensor:
    corpus = context.corpus()
    n = params.n_windows + params.calibration_windows
    key = ("quant-calibration", corpus.name, corpus.source, params.seq_len, params.n_windows, n)
    return context.artifact(torch.Tensor, key, lambda: corpus_windows(context.model.tokenizer, corpus, params.seq_len, n)[
        params.n_windows:])


def _fp_perplexity(context: AuditContext, params: QuantEvalParams, corpus: Corpus) -> tuple[float, float]:
    """(PPL, seconds) of the full-precision model: lmaudit.checks.core.perplexity.perplexity, the pinned definition."""
    import time

    def run() -> tuple[float, float]:
        started = time.perf_counter()
        result = perplexity(context.model.model, context.model.tokenizer, corpus, seq_len=params.seq_len,
                            n_windows=params.n_windows, batch_size=params.batch_size)
        return result.perplexity, time.perf_counter() - started

    return context.artifact(tuple, ("quant-fp", corpus.name, corpus.source, params.seq_len, params.n_windows), run)


def evaluate_scheme(context: AuditContext, params: QuantEvalParams, scheme: QuantScheme) -> SchemeEvaluation:
    """Naive and aware perplexity of ``scheme`` on every available corpus of ``params.corpora``.

    Memoized per session: an evaluation with the same settings on a superset of the corpora is reused (its rows
    filtered), so e.g. the block sweep on ``pydoc`` reuses the table's ``pydoc`` + ``wikitext2`` evaluation.
    """
    corpora, _ = available_corpora(context, params.corpora)
    settings = (scheme, params.seq_len, params.n_windows, params.calibration_windows, params.batch_size,
                params.z_candidates)
    store: dict[tuple[object, ...], list[SchemeEvaluation]] = context.artifact(dict, "quant-evals", dict)
    for done in store.get(settings, []):
        have = [r.corpus for r in done.rows]
        if set(corpora) <= set(have):
            rows = tuple(r for r in done.rows if r.corpus in corpora)
            return done if rows == done.rows else replace(done, rows=rows)
    evaluation = _evaluate(context, params, scheme, corpora)
    store.setdefault(settings, []).append(evaluation)
    return evaluation


def _evaluate(
    context: AuditContext, params: QuantEvalParams, scheme: QuantScheme, corpora: dict[str, Corpus]
) -> SchemeEvaluation:
    adapter = context.model.adapter
    outliers = super_outliers(context)
    windows = {name: _windows(context, params, corpus) for name, corpus in corpora.items()}
    fp = {name: _fp_perplexity(context, params, corpus) for name, corpus in corpora.items()}
    clip = None
    if isinstance(scheme, WeightOnlyScheme):
        clip = search_clip_z(adapter, scheme, outliers, _calibration(context, params),
                             candidates=params.z_candidates, batch_size=params.batch_size)
    naive = evaluate_quantized(adapter, scheme, windows, batch_size=params.batch_size)
    aware = evaluate_quantized(adapter, scheme, windows, outliers=outliers, clip_z=clip.z if clip else None,
                               batch_size=params.batch_size)
    hold = aware
    if clip is not None and math.isfinite(clip.z):  # the super weights held out without clipping
        hold = evaluate_quantized(adapter, scheme, windows, outliers=outliers, batch_size=params.batch_size)
    label = scheme.label
    rows = tuple(_row(label, name, fp[name][0], naive.perplexity[name], aware.perplexity[name],
                      hold.perplexity[name]) for name in windows)
    is_w = isinstance(scheme, WeightOnlyScheme)
    return SchemeEvaluation(
        scheme=label,
        bits=scheme.bits if is_w else scheme.weight_bits,  # type: ignore[union-attr]
        block_size=scheme.block_size if is_w else None,  # type: ignore[union-attr]
        activations=None if is_w else scheme.activations.value,  # type: ignore[union-attr]
        super_weights=outliers.weights,
        activation_tokens=outliers.tokens,
        clip=clip,
        rows=rows,
        naive_memory=naive.memory,
        aware_memory=aware.memory,
        naive_seconds=naive.quantize_s + sum(naive.eval_s.values()),
        aware_seconds=aware.quantize_s + sum(aware.eval_s.values()),
        fp_seconds=sum(seconds for _, seconds in fp.values()),
        n_windows=params.n_windows,
        seq_len=params.seq_len,
    )


def _row(scheme: str, corpus: str, fp: float, naive: float, aware: float, hold: float) -> CorpusRow:
    r = recovery(fp, naive, aware)
    return CorpusRow(scheme, corpus, fp, naive, aware, r, 100.0 * r, aware / fp, naive / fp, hold,
                     recovery(fp, naive, hold))


# ------------------------------------------------------------------------------------------------ checks


@register_check(
    "quantization_recovery",
    params=RecoveryParams,
    area="quantization")
def quantization_recovery(context: AuditContext, params: RecoveryParams) -> QuantizationRecovery:
    """Perplexity recovered by holding the super outliers out of round-to-nearest quantization (Yu et al. §4)."""
    scheme = build_scheme(params.scheme, bits=params.bits, block_size=params.block_size)
    _, missing = available_corpora(context, params.corpora)
    return QuantizationRecovery(evaluate_scheme(context, params, scheme), missing)


@register_check(
    "quantization_table",
    params=TableParams,
    area="quantization")
def quantization_table(context: AuditContext, params: TableParams) -> QuantizationTable:
    """Paper-style table: FP, naive and aware perplexity and recovery %, per scheme (W8A8, W4 block) and corpus."""
    names: tuple[SchemeName, ...] = ("w8a8-per-token", "w8a8-per-tensor", "w4-block")
    evaluations = tuple(
        evaluate_scheme(context, params, build_scheme(n, bits=params.bits, block_size=params.block_size))
        for n in names
    )
    _, missing = available_corpora(context, params.corpora)
    rows = tuple(row for e in evaluations for row in e.rows)
    return QuantizationTable(rows, evaluations, missing, evaluations[0].super_weights)


@register_check(
    "quantization_block_sweep",
    params=SweepParams,
    area="quantization")
def quantization_block_sweep(context: AuditContext, params: SweepParams) -> BlockSizeSweep:
    """Weight-only RTN perplexity against block size and bits, naive vs super-outlier-aware (Yu et al. Fig. 7)."""
    blocks = params.quick_block_sizes if context.quick else params.block_sizes
    points = []
    for bits in params.bits:
        for block in blocks:
            e = evaluate_scheme(context, params, WeightOnlyScheme(bits=bits, block_size=block))
            points.extend(SweepPoint(bits, block, r.corpus, r.ppl_fp, r.ppl_naive, r.ppl_aware, r.recovery,
                                     e.clip.z if e.clip else math.inf, r.ppl_hold_out) for r in e.rows)
    return BlockSizeSweep(tuple(points), super_outliers(context).weights)
