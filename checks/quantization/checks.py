"""Registers the super-outlier-aware quantization checks (Yu et al. 2024, §4): the area's only harness module.

Each check turns the audit context into what the science takes (:mod:`lmaudit.checks.quantization.evaluate`):
the :class:`~lmaudit.checks.core.loading.LoadedModel`, the corpora, and the super outliers, which come from the
super-weight area through ``context.require(SuperWeightSites)`` without importing it. When that area confirmed
no super weight, there is nothing to hold out: the checks raise :class:`PremiseMissing` and the entries are
skipped with the reason.

Everything a check measures is a typed session artifact, so the table, the per-scheme gates and the block-size
sweep share the work: the full-precision perplexity per corpus (:class:`TimedPerplexity`), the clipping search
per scheme (:class:`ClipSearch`), one :class:`CorpusRow` per scheme and corpus, and the weight-grid finding
(:class:`WeightGrid`).
"""

from __future__ import annotations

from typing import Literal

from lmaudit.checks.core.corpora import Corpus
from lmaudit.checks.core.errors import CorpusNotFoundError, PremiseMissing
from lmaudit.checks.core.outliers import SuperWeightSites
from lmaudit.checks.harness.context import AuditContext
from lmaudit.checks.harness.registry import CheckParams, register_check
from lmaudit.checks.quantization.evaluate import (
    CorpusRow,
    EvalSettings,
    SchemeEvaluation,
    TimedPerplexity,
    calibration_windows,
    choose_clip,
    evaluate_corpus,
    fp_perplexity,
)
from lmaudit.checks.quantization.grid import WeightGrid, detect_weight_grid
from lmaudit.checks.quantization.results import (
    BlockSizeSweep,
    QuantizationRecovery,
    QuantizationTable,
    SweepPoint,
)
from lmaudit.checks.quantization.schemes import (
    DEFAULT_Z_CANDIDATES,
    ActivationGranularity,
    ClipSearch,
    QuantScheme,
    SuperOutliers,
    W8A8Scheme,
    WeightOnlyScheme,
)

SchemeName = Literal["w4-block", "w8a8-per-token", "w8a8-per-tensor"]
TABLE_SCHEMES: tuple[SchemeName, ...] = ("w8a8-per-token", "w8a8-per-tensor", "w4-block")
TABLE_CORPORA = ("pydoc", "wikitext2")


class QuantEvalParams(CheckParams):
    """What every quantization check shares; equal settings share their evaluations within a session."""

    seq_len: int = 256
    n_windows: int = 4  # per corpus
    calibration_windows: int = 2  # z search: spread over the session corpus's second half
    batch_size: int = 1  # one window per forward: a quarter of the logits' peak memory, the same NLL
    z_candidates: tuple[float, ...] = DEFAULT_Z_CANDIDATES
    corpora: tuple[str, ...] = TABLE_CORPORA  # corpora that are not available are left out (and listed)

    def settings(self) -> EvalSettings:
        return EvalSettings(self.seq_len, self.n_windows, self.calibration_windows, self.batch_size,
                            tuple(self.z_candidates))


class RecoveryParams(QuantEvalParams):
    scheme: SchemeName = "w4-block"
    bits: int = 4  # weight bits of w4-block
    block_size: int = 128**2  # B of w4-block: contiguous elements of the flattened [out, in] weight (the paper's)


class TableParams(QuantEvalParams):
    bits: int = 4  # the w4-block row of the table
    block_size: int = 128**2


class SweepParams(QuantEvalParams):
    bits: tuple[int, ...] = (4,)
    block_sizes: tuple[int, ...] = (32, 256, 64**2, 128**2)  # 32: GGUF's block; up to the paper's 128²
    corpora: tuple[str, ...] = ("pydoc",)


def build_scheme(name: SchemeName, *, bits: int = 4, block_size: int = 128**2) -> QuantScheme:
    if name == "w4-block":
        return WeightOnlyScheme(bits=bits, block_size=block_size)
    if name == "w8a8-per-token":
        return W8A8Scheme(ActivationGranularity.PER_TOKEN)
    if name == "w8a8-per-tensor":
        return W8A8Scheme(ActivationGranularity.PER_TENSOR)
    raise ValueError(f"unknown scheme {name!r}: use w4-block, w8a8-per-token or w8a8-per-tensor")


# ------------------------------------------------------------------------------------------------ context → science


def super_outliers(context: AuditContext) -> SuperOutliers:
    """The session's confirmed super weights (possibly none), provided by the super-weight area."""
    return SuperOutliers.from_sites(context.require(SuperWeightSites))


def required_outliers(context: AuditContext) -> SuperOutliers:
    """The super outliers, or :class:`PremiseMissing` when the super-weight area confirmed none."""
    sites = context.require(SuperWeightSites)
    if not sites:
        how = f" ({sites.description})" if sites.description else ""
        raise PremiseMissing(f"no super weight was confirmed on this model{how}, so there is nothing to hold out "
                             "of quantization: naive and super-outlier-aware RTN are the same scheme")
    return SuperOutliers.from_sites(sites)


def weight_grid(context: AuditContext) -> WeightGrid:
    """Whether the model's weights already lie on a 4-bit grid per 32-element block (once per session)."""
    return context.artifact(WeightGrid, ("quant-grid",), lambda: detect_weight_grid(context.model.adapter))


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


def _clip(context: AuditContext, params: QuantEvalParams, scheme: QuantScheme,
          outliers: SuperOutliers) -> ClipSearch | None:
    """z of the aware weight-only scheme, on the calibration windows of the session corpus."""
    if isinstance(scheme, W8A8Scheme):
        return None
    corpus, settings, model = context.corpus(), params.settings(), context.model
    key = ("quant-clip", scheme, outliers, corpus.name, corpus.source, settings)
    return context.artifact(ClipSearch, key, lambda: choose_clip(  # type: ignore[arg-type,return-value]
        model, scheme, outliers, calibration_windows(model, corpus, settings), settings))


def _fp(context: AuditContext, settings: EvalSettings, corpus: Corpus) -> TimedPerplexity:
    key = ("quant-fp", corpus.name, corpus.source, settings.seq_len, settings.n_windows, settings.batch_size)
    return context.artifact(TimedPerplexity, key, lambda: fp_perplexity(context.model, corpus, settings))


def evaluate_scheme(context: AuditContext, params: QuantEvalParams, scheme: QuantScheme,
                    outliers: SuperOutliers | None = None) -> SchemeEvaluation:
    """``scheme`` on every available corpus of ``params.corpora``; each corpus's row is built once per session.
    ``outliers``: the session's super outliers by default."""
    outliers = super_outliers(context) if outliers is None else outliers
    settings = params.settings()
    corpora, _ = available_corpora(context, params.corpora)
    clip = _clip(context, params, scheme, outliers)
    rows = []
    for corpus in corpora.values():
        key = ("quant-row", scheme, outliers, clip, corpus.name, corpus.source, settings.seq_len,
               settings.n_windows, settings.batch_size)
        rows.append(context.artifact(CorpusRow, key, lambda corpus=corpus: evaluate_corpus(
            context.model, scheme, corpus, outliers, clip=clip, settings=settings,
            fp=_fp(context, settings, corpus))))
    return SchemeEvaluation.of(scheme, outliers, clip, rows, settings)


# ------------------------------------------------------------------------------------------------ checks


@register_check("quantization_recovery", params=RecoveryParams, area="quantization")
def quantization_recovery(context: AuditContext, params: RecoveryParams) -> QuantizationRecovery:
    """Perplexity recovered by holding the super outliers out of round-to-nearest quantization (Yu et al. §4)."""
    outliers = required_outliers(context)
    scheme = build_scheme(params.scheme, bits=params.bits, block_size=params.block_size)
    evaluation = evaluate_scheme(context, params, scheme, outliers)
    if not evaluation.damaged_rows:
        ppl = "; ".join(f"{r.corpus}: naive {r.ppl_naive:.4g} vs full precision {r.ppl_fp:.4g}"
                        for r in evaluation.rows)
        raise PremiseMissing(f"naive {scheme.label} does no damage on any corpus ({ppl}): there is no loss for "
                             "holding the super outliers out to recover")
    _, missing = available_corpora(context, params.corpora)
    return QuantizationRecovery(evaluation, missing, weight_grid(context))


@register_check("quantization_table", params=TableParams, area="quantization")
def quantization_table(context: AuditContext, params: TableParams) -> QuantizationTable:
    """Paper-style table: FP, naive, aware and hold-out-only perplexity per scheme (W8A8, W4 block) and corpus."""
    outliers = required_outliers(context)
    evaluations = tuple(
        evaluate_scheme(context, params, build_scheme(name, bits=params.bits, block_size=params.block_size),
                        outliers)
        for name in TABLE_SCHEMES)
    _, missing = available_corpora(context, params.corpora)
    return QuantizationTable(evaluations, missing, outliers.weights, weight_grid(context))


@register_check("quantization_block_sweep", params=SweepParams, area="quantization")
def quantization_block_sweep(context: AuditContext, params: SweepParams) -> BlockSizeSweep:
    """Weight-only RTN perplexity against block size, naive vs super-outlier-aware (Yu et al. 2024, Figure 7)."""
    outliers = required_outliers(context)
    grid = weight_grid(context)
    points = []
    for bits in params.bits:
        for block in params.block_sizes:
            e = evaluate_scheme(context, params, WeightOnlyScheme(bits=bits, block_size=block), outliers)
            points.extend(SweepPoint.of(row, e, grid) for row in e.rows)
    return BlockSizeSweep(tuple(points), outliers.weights, grid)
