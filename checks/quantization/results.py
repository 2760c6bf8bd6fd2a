"""What the quantization checks report: one result class per check, each metric declared once on its class.

Every recovery is the worst (lowest) over the corpora on which the naive scheme does damage (PPL_naive > PPL_fp);
a corpus where it does none has nothing to recover (its recovery is NaN and shown as n/a). Each result also
carries the :class:`~lmaudit.checks.quantization.grid.WeightGrid` finding: whether the model was already
quantized, which makes some of its figures uninformative (the grid's own block size reproduces the weights).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lmaudit.checks.core.results import CheckResult, metric
from lmaudit.checks.core.stats import spearman
from lmaudit.checks.quantization.evaluate import CorpusRow, SchemeEvaluation, worst
from lmaudit.checks.quantization.grid import WeightGrid

__all__ = ["BlockSizeSweep", "QuantizationRecovery", "QuantizationTable", "SweepPoint"]

RECOVERY_DEFINITION = (
    "recovery = (PPL_naive − PPL_aware) / (PPL_naive − PPL_fp), aware = the paper's method (super outliers held "
    "out, plus clipping at z for weight-only RTN); hold-out recovery: the same without clipping; ratio = "
    "PPL_aware / PPL_fp"
)


@dataclass(frozen=True)
class QuantizationRecovery(CheckResult):
    """One scheme: how much of the naive scheme's perplexity loss the super-outlier-aware one recovers."""

    evaluation: SchemeEvaluation
    missing_corpora: tuple[str, ...]
    grid: WeightGrid
    definition: str = RECOVERY_DEFINITION

    @metric
    def recovery(self) -> float:
        """The paper's method (hold-out, plus clipping for weight-only schemes): worst damaged corpus."""
        return self.evaluation.min_recovery

    @metric
    def hold_out_recovery(self) -> float:
        """Super outliers held out, no clipping (= recovery for W8A8): worst damaged corpus."""
        return self.evaluation.min_hold_out_recovery

    @metric
    def ppl_ratio(self) -> float:
        """PPL_aware / PPL_fp, worst corpus."""
        return self.evaluation.max_ppl_ratio

    @metric
    def naive_ppl_ratio(self) -> float:
        """PPL_naive / PPL_fp, worst corpus: how much the naive scheme loses."""
        return self.evaluation.max_naive_ppl_ratio

    @metric
    def clip_z(self) -> float | None:
        """The clipping threshold chosen on the calibration windows (inf: none); None for W8A8."""
        return self.evaluation.clip.z if self.evaluation.clip is not None else None

    @metric
    def clip_margin(self) -> float | None:
        """How clearly the calibration windows chose z: runner-up minus chosen mean NLL (nats/token)."""
        return self.evaluation.clip.margin if self.evaluation.clip is not None else None

    @metric
    def peak_memory_ratio(self) -> float:
        return max(self.evaluation.naive_memory.peak_ratio, self.evaluation.aware_memory.peak_ratio)

    @metric
    def corpora(self) -> list[str]:
        return [r.corpus for r in self.evaluation.rows]

    @metric
    def n_super_weights(self) -> int:
        return len(self.evaluation.super_weights)

    @metric
    def weights_on_grid(self) -> bool:
        """The model's weights already lie on a low-bit grid (it was quantized before: see ``grid``)."""
        return self.grid.on_grid


@dataclass(frozen=True)
class QuantizationTable(CheckResult):
    """The paper-style table: full precision, naive, aware and hold-out-only perplexity per scheme and corpus."""

    schemes: tuple[SchemeEvaluation, ...]
    missing_corpora: tuple[str, ...]
    super_weights: tuple[tuple[int, int, int], ...]
    grid: WeightGrid
    definition: str = RECOVERY_DEFINITION

    @property
    def rows(self) -> tuple[CorpusRow, ...]:
        return tuple(row for e in self.schemes for row in e.rows)

    @metric
    def n_rows(self) -> int:
        return len(self.rows)

    @metric
    def min_recovery(self) -> float:
        return worst([e.min_recovery for e in self.schemes])

    @metric
    def min_hold_out_recovery(self) -> float:
        return worst([e.min_hold_out_recovery for e in self.schemes])

    @metric
    def max_ppl_ratio(self) -> float:
        return worst([e.max_ppl_ratio for e in self.schemes], max)

    @metric
    def corpora(self) -> list[str]:
        return sorted({r.corpus for r in self.rows})

    @metric
    def weights_on_grid(self) -> bool:
        return self.grid.on_grid


@dataclass(frozen=True)
class SweepPoint:
    """One block size of the sweep on one corpus."""

    bits: int
    block_size: int
    corpus: str
    ppl_fp: float
    ppl_naive: float
    ppl_aware: float  # the paper's method: hold-out + clipping at clip_z
    ppl_hold_out: float  # super weights held out, no clipping
    recovery: float  # (naive − aware) / (naive − fp); NaN when naive RTN does no damage at this block size
    clip_z: float
    on_model_grid: bool  # B is the block of the grid the weights already lie on: naive RTN reproduces them

    @classmethod
    def of(cls, row: CorpusRow, evaluation: SchemeEvaluation, grid: WeightGrid) -> SweepPoint:
        block = int(evaluation.block_size or 0)
        return cls(evaluation.bits, block, row.corpus, row.ppl_fp, row.ppl_naive, row.ppl_aware, row.ppl_hold_out,
                   row.recovery, evaluation.clip.z if evaluation.clip is not None else math.inf,
                   grid.on_grid and block == grid.block_size and evaluation.bits >= grid.bits)


def _growth_recovery(series: list[SweepPoint], aware: str) -> float:
    """1 − ln(PPL_aware(B_max) / PPL_aware(B_min)) / ln(PPL_naive(B_max) / PPL_naive(B_min)); NaN when the naive
    perplexity does not grow from the smallest to the largest block (then there is no growth to avoid)."""
    first, last = series[0], series[-1]
    naive = math.log(last.ppl_naive / first.ppl_naive)
    if not naive > 0:
        return math.nan
    return 1.0 - math.log(getattr(last, aware) / getattr(first, aware)) / naive


@dataclass(frozen=True)
class BlockSizeSweep(CheckResult):
    """Weight-only RTN perplexity against block size B, naive vs aware (the paper's Figure 7).

    Each metric is the worst over the (bits, corpus) series of the sweep:

    * ``naive_spearman`` / ``aware_spearman``: Spearman ρ between B and the naive / aware perplexity (1: it grows
      strictly with B, the paper's finding for naive RTN; NaN below 3 block sizes or when it is constant);
    * ``growth_recovery``: ``1 − ln(PPL_aware(B_max)/PPL_aware(B_min)) / ln(PPL_naive(B_max)/PPL_naive(B_min))``,
      the share of naive RTN's log-perplexity growth from the smallest to the largest block that the paper's
      method avoids (1: flat, 0: grows as naive does, < 0: grows faster); ``hold_out_growth_recovery`` the same
      for the hold-out without clipping;
    * ``min_recovery``: the lowest recovery over the points where naive RTN does damage.
    """

    points: tuple[SweepPoint, ...]
    super_weights: tuple[tuple[int, int, int], ...]
    grid: WeightGrid

    def series(self) -> dict[tuple[int, str], list[SweepPoint]]:
        """``{(bits, corpus): points sorted by block size}``."""
        out: dict[tuple[int, str], list[SweepPoint]] = {}
        for p in self.points:
            out.setdefault((p.bits, p.corpus), []).append(p)
        return {k: sorted(v, key=lambda p: p.block_size) for k, v in out.items()}

    def _rho(self, ppl: str) -> float:
        values = [spearman([float(p.block_size) for p in s], [getattr(p, ppl) for p in s])
                  for s in self.series().values()]
        return math.nan if not values or any(math.isnan(v) for v in values) else min(values)

    def _growth(self, aware: str) -> float:
        values = [_growth_recovery(s, aware) for s in self.series().values()]
        return math.nan if not values or any(math.isnan(v) for v in values) else min(values)

    @metric
    def naive_spearman(self) -> float:
        return self._rho("ppl_naive")

    @metric
    def aware_spearman(self) -> float:
        return self._rho("ppl_aware")

    @metric
    def growth_recovery(self) -> float:
        return self._growth("ppl_aware")

    @metric
    def hold_out_growth_recovery(self) -> float:
        return self._growth("ppl_hold_out")

    @metric
    def min_recovery(self) -> float:
        return worst([p.recovery for p in self.points])

    @metric
    def n_points(self) -> int:
        return len(self.points)

    @metric
    def weights_on_grid(self) -> bool:
        return self.grid.on_grid
