"""Naive vs super-outlier-aware perplexity of one quantization scheme (Yu et al. 2024, §4, Tables 3-4, Figure 7).

For a scheme of :mod:`lmaudit.checks.quantization.schemes`, on each corpus, with the pinned perplexity definition
(:mod:`lmaudit.checks.core.perplexity`; the full-precision figure is :func:`~lmaudit.checks.core.perplexity.perplexity`
itself)::

    recovery          = (PPL_naive − PPL_aware)    / (PPL_naive − PPL_fp)   aware = the paper's method
    hold_out_recovery = (PPL_naive − PPL_hold_out) / (PPL_naive − PPL_fp)   super outliers held out, no clipping
    ppl_ratio         = PPL_aware / PPL_fp

For W8A8 the paper's method *is* the hold-out (it does not clip), so ``hold_out_recovery == recovery``. For the
weight-only scheme the paper's method also clips the other outliers at a threshold z; z is chosen by
:func:`~lmaudit.checks.quantization.schemes.search_clip_z` on *calibration* windows: ``calibration_windows``
windows spread over the second half of the calibration corpus (:func:`calibration_windows`). No evaluated window
is among them: the calibration corpus's own evaluation windows are its first ``n_windows`` (in its first half),
and the other corpora are other texts.

Evaluation windows: the first ``n_windows`` windows of ``seq_len`` tokens of each corpus, the ones
``perplexity()`` scores. Nothing here knows the harness: arguments are a :class:`LoadedModel`, corpora and the
:class:`SuperOutliers` to hold out; :mod:`lmaudit.checks.quantization.checks` turns an audit context into them
and caches each corpus's row, so every check of a session that asks for the same scheme on the same corpus
shares one evaluation.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from lmaudit.checks.core.corpora import Corpus
from lmaudit.checks.core.loading import LoadedModel
from lmaudit.checks.core.perplexity import (
    CorpusTooShortError,
    PerplexityResult,
    corpus_tokens,
    corpus_windows,
    perplexity,
)
from lmaudit.checks.quantization.schemes import (
    DEFAULT_Z_CANDIDATES,
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

__all__ = [
    "CorpusRow",
    "EvalSettings",
    "RowCost",
    "SchemeEvaluation",
    "TimedPerplexity",
    "calibration_windows",
    "choose_clip",
    "evaluate_corpus",
    "evaluate_scheme",
    "fp_perplexity",
    "worst",
]


@dataclass(frozen=True)
class EvalSettings:
    """How much text an evaluation reads (every field enters the cache keys of the checks)."""

    seq_len: int = 256
    n_windows: int = 4  # per corpus: 4 × 256 tokens
    calibration_windows: int = 2  # z search: one window made the choice a coin toss between slices
    batch_size: int = 1  # one window per forward: a quarter of the logits' peak memory, the same NLL
    z_candidates: tuple[float, ...] = DEFAULT_Z_CANDIDATES


@dataclass(frozen=True)
class TimedPerplexity:
    """The full-precision perplexity of one corpus and how long it took."""

    result: PerplexityResult
    seconds: float


@dataclass(frozen=True)
class RowCost:
    """What one corpus's evaluation cost: seconds (quantizing + scoring) and peak memory per variant."""

    fp_seconds: float
    naive_seconds: float
    aware_seconds: float
    hold_out_seconds: float  # 0 when the hold-out variant is the aware one
    naive_memory: MemoryUse
    aware_memory: MemoryUse


@dataclass(frozen=True)
class CorpusRow:
    """One row of the paper-style table: a scheme on a corpus (the derived figures are fields, so the JSON
    results carry them)."""

    scheme: str
    corpus: str
    ppl_fp: float
    ppl_naive: float
    ppl_aware: float  # the paper's method (hold-out + clipping at z for weight-only schemes)
    ppl_hold_out: float  # super outliers held out, no clipping (= ppl_aware when the scheme does not clip)
    recovery: float  # (naive − aware) / (naive − fp); NaN when the naive scheme does no damage here
    hold_out_recovery: float  # (naive − hold_out) / (naive − fp)
    ppl_ratio: float  # aware / fp
    naive_ppl_ratio: float  # naive / fp
    cost: RowCost

    @classmethod
    def of(cls, scheme: str, corpus: str, fp: float, naive: float, aware: float, hold_out: float,
           cost: RowCost) -> CorpusRow:
        return cls(scheme, corpus, fp, naive, aware, hold_out, recovery(fp, naive, aware),
                   recovery(fp, naive, hold_out), aware / fp, naive / fp, cost)

    @property
    def damaged(self) -> bool:
        """The naive scheme loses something here (else there is nothing to recover and recovery is NaN)."""
        return self.ppl_naive > self.ppl_fp

    @property
    def recovery_pct(self) -> float:
        return 100.0 * self.recovery


def worst(values: Sequence[float], pick: Callable[[list[float]], float] = min) -> float:
    """``pick`` of the finite values; NaN when there is none (a gate then fails, it never passes on nothing)."""
    finite = [v for v in values if not math.isnan(v)]
    return pick(finite) if finite else math.nan


@dataclass(frozen=True)
class SchemeEvaluation:
    """A scheme evaluated naive, aware and hold-out-only on every corpus, with the clipping search."""

    scheme: str
    bits: int
    block_size: int | None
    activations: str | None
    super_weights: tuple[tuple[int, int, int], ...]
    activation_tokens: tuple[int, ...]
    clip: ClipSearch | None
    rows: tuple[CorpusRow, ...]
    n_windows: int
    seq_len: int

    @classmethod
    def of(cls, scheme: QuantScheme, outliers: SuperOutliers, clip: ClipSearch | None, rows: Sequence[CorpusRow],
           settings: EvalSettings) -> SchemeEvaluation:
        weight_only = isinstance(scheme, WeightOnlyScheme)
        return cls(
            scheme=scheme.label,
            bits=scheme.bits if weight_only else scheme.weight_bits,  # type: ignore[union-attr]
            block_size=scheme.block_size if weight_only else None,  # type: ignore[union-attr]
            activations=None if weight_only else scheme.activations.value,  # type: ignore[union-attr]
            super_weights=outliers.weights,
            activation_tokens=outliers.tokens,
            clip=clip,
            rows=tuple(rows),
            n_windows=settings.n_windows,
            seq_len=settings.seq_len,
        )

    @property
    def damaged_rows(self) -> tuple[CorpusRow, ...]:
        return tuple(r for r in self.rows if r.damaged)

    @property
    def min_recovery(self) -> float:
        """Worst recovery over the corpora where the naive scheme does damage."""
        return worst([r.recovery for r in self.damaged_rows])

    @property
    def min_hold_out_recovery(self) -> float:
        return worst([r.hold_out_recovery for r in self.damaged_rows])

    @property
    def max_ppl_ratio(self) -> float:
        return worst([r.ppl_ratio for r in self.rows], max)

    @property
    def max_naive_ppl_ratio(self) -> float:
        return worst([r.naive_ppl_ratio for r in self.rows], max)

    @property
    def naive_memory(self) -> MemoryUse:
        return max((r.cost.naive_memory for r in self.rows), key=lambda m: m.peak_ratio)

    @property
    def aware_memory(self) -> MemoryUse:
        return max((r.cost.aware_memory for r in self.rows), key=lambda m: m.peak_ratio)


# ------------------------------------------------------------------------------------------------ windows


def calibration_windows(model: LoadedModel, corpus: Corpus, settings: EvalSettings) -> torch.Tensor:
    """``(calibration_windows, seq_len [+1])``: windows spread evenly over the second half of ``corpus``.

    The evaluation windows are the corpus's first ``n_windows``; the second half is the calibration pool, so
    the two never share a window. The slice does not depend on ``n_windows``: windows right after the evaluation
    windows would move with it, and a quick profile (2 windows) and a full one (4) would calibrate on different
    text and may choose different z (measured on smollm2-135m-instruct, W4 128²: z = inf after 2 windows of
    pydoc, z = 8 after 4). Spread over the pool rather than taken from one place, the slice stands for the text
    as a whole, as the paper's calibration samples do."""
    available = len(corpus_tokens(model.tokenizer, corpus)) // settings.seq_len
    half = available // 2
    if settings.n_windows > half or settings.calibration_windows > available - half:
        raise CorpusTooShortError(
            f"corpus {corpus.name!r} ({corpus.source}) has {available} windows of {settings.seq_len} tokens: the "
            f"{settings.n_windows} evaluation windows must fit in its first half ({half}) and the "
            f"{settings.calibration_windows} calibration windows in its second ({available - half})")
    pool = available - half
    picks = [half + (2 * k + 1) * pool // (2 * settings.calibration_windows)
             for k in range(settings.calibration_windows)]  # the middle of each of calibration_windows equal parts
    return corpus_windows(model.tokenizer, corpus, settings.seq_len, available)[picks]


def fp_perplexity(model: LoadedModel, corpus: Corpus, settings: EvalSettings) -> TimedPerplexity:
    """The full-precision perplexity of the evaluation windows (the pinned definition) and its seconds."""
    started = time.perf_counter()
    result = perplexity(model.model, model.tokenizer, corpus, seq_len=settings.seq_len,
                        n_windows=settings.n_windows, batch_size=settings.batch_size)
    return TimedPerplexity(result, time.perf_counter() - started)


# ------------------------------------------------------------------------------------------------ evaluation


def choose_clip(model: LoadedModel, scheme: QuantScheme, outliers: SuperOutliers, calibration: torch.Tensor,
                settings: EvalSettings) -> ClipSearch | None:
    """The clipping threshold z of the aware weight-only scheme, chosen on ``calibration`` windows; ``None`` for
    W8A8, which does not clip (the paper handles its activations by the super activation alone)."""
    if isinstance(scheme, W8A8Scheme):
        return None
    return search_clip_z(model.adapter, scheme, outliers, calibration, candidates=settings.z_candidates,
                         batch_size=settings.batch_size)


def evaluate_corpus(
    model: LoadedModel, scheme: QuantScheme, corpus: Corpus, outliers: SuperOutliers, *, clip: ClipSearch | None,
    settings: EvalSettings, fp: TimedPerplexity | None = None,
) -> CorpusRow:
    """Naive, aware (hold-out + clipping at ``clip.z``) and hold-out-only perplexity of ``scheme`` on the
    evaluation windows of ``corpus``. ``fp``: the full-precision figure when already measured."""
    fp = fp if fp is not None else fp_perplexity(model, corpus, settings)
    windows = {corpus.name: corpus_windows(model.tokenizer, corpus, settings.seq_len, settings.n_windows)}
    adapter, batch = model.adapter, settings.batch_size
    z = clip.z if clip is not None else None
    naive = evaluate_quantized(adapter, scheme, windows, batch_size=batch)
    aware = evaluate_quantized(adapter, scheme, windows, outliers=outliers, clip_z=z, batch_size=batch)
    hold = aware
    if z is not None and math.isfinite(z):  # the paper's method clipped: measure the hold-out on its own too
        hold = evaluate_quantized(adapter, scheme, windows, outliers=outliers, batch_size=batch)
    cost = RowCost(fp.seconds, naive.seconds, aware.seconds, hold.seconds if hold is not aware else 0.0,
                   naive.memory, aware.memory)
    name = corpus.name
    return CorpusRow.of(scheme.label, name, fp.result.perplexity, naive.perplexity[name], aware.perplexity[name],
                        hold.perplexity[name], cost)


def evaluate_scheme(
    model: LoadedModel, scheme: QuantScheme, corpora: Mapping[str, Corpus], outliers: SuperOutliers, *,
    calibration: Corpus, settings: EvalSettings = EvalSettings(),  # noqa: B008  (frozen: a safe default)
) -> SchemeEvaluation:
    """Every corpus of ``corpora`` under ``scheme``, with z chosen on ``calibration`` (uncached: for notebooks
    and scripts; the checks cache the same pieces per session)."""
    clip = choose_clip(model, scheme, outliers, calibration_windows(model, calibration, settings), settings)
    rows = [evaluate_corpus(model, scheme, corpus, outliers, clip=clip, settings=settings)
            for corpus in corpora.values()]
    return SchemeEvaluation.of(scheme, outliers, clip, rows, settings)
