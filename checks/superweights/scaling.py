"""Super-weight scaling (Yu et al. 2024, §3.4, Figure 6): ``W_down[ℓ][row, col] ← s · W_down[ℓ][row, col]`` for
every super weight and each factor ``s``, with perplexity and zero-shot accuracy at each.

The paper's claims, in their direction:

- scaling to 0 (pruning) is catastrophic: ``perplexity_ratio_at_0 = PPL(s=0) / PPL(s=1)``, orders of magnitude
  on the paper's models (Table 1);
- amplifying the super weights does not hurt and can improve accuracy ("scaling up the super weight ...
  improves zero-shot accuracy", Figure 6):
  ``best_amplified_accuracy_gain = max_{s>1} acc(s) − acc(1)`` (mean accuracy over the tasks run, the same
  documents at every factor), which is ≥ 0 when some amplification scores at least as well as the original.

Perplexity re-evaluations start at the super weights' layer (:class:`~.conditions.WindowCache`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

from lmaudit.checks.core.corpora import Corpus
from lmaudit.checks.core.loading import LoadedModel
from lmaudit.checks.core.outliers import Coordinate
from lmaudit.checks.core.perplexity import corpus_windows
from lmaudit.checks.core.results import CheckResult, metric
from lmaudit.checks.core.zero_shot import ScoreBook, ZeroShotTask
from lmaudit.checks.superweights.conditions import WindowCache, scale, scale_label
from lmaudit.checks.superweights.detect import SuperWeightDetection

PAPER_SCALES = (0.0, 0.2, 0.5, 0.8, 1.0, 1.5, 2.0, 3.0)  # the factors of the paper's sensitivity runs


@dataclass(frozen=True)
class ScalePoint:
    scale: float
    perplexity: float
    accuracy: dict[str, float]
    mean_accuracy: float  # NaN when no task ran


@dataclass(frozen=True)
class SuperWeightScaling(CheckResult):
    """Perplexity and accuracy with every super weight multiplied by each factor."""

    coordinates: tuple[Coordinate, ...]
    points: tuple[ScalePoint, ...]
    tasks: tuple[str, ...]
    tasks_skipped: tuple[str, ...]

    def _at(self, factor: float) -> ScalePoint | None:
        return next((p for p in self.points if p.scale == factor), None)

    @metric
    def perplexity_at_1(self) -> float:
        point = self._at(1.0)
        return point.perplexity if point else math.nan

    @metric
    def perplexity_ratio_at_0(self) -> float:
        """PPL(s=0) / PPL(s=1)."""
        zero = self._at(0.0)
        return zero.perplexity / self.perplexity_at_1 if zero else math.nan

    @metric
    def best_scale_perplexity(self) -> float:
        return min(self.points, key=lambda p: p.perplexity).scale

    @metric
    def best_amplified_perplexity_ratio(self) -> float:
        """min_{s>1} PPL(s) / PPL(s=1) (NaN without a factor above 1)."""
        amplified = [p.perplexity for p in self.points if p.scale > 1]
        return min(amplified) / self.perplexity_at_1 if amplified else math.nan

    @metric
    def accuracy_at_1(self) -> float:
        point = self._at(1.0)
        return point.mean_accuracy if point else math.nan

    @metric
    def best_amplified_accuracy_gain(self) -> float:
        """max_{s>1} acc(s) − acc(1), mean accuracy over the tasks (NaN without tasks or a factor above 1)."""
        amplified = [p.mean_accuracy for p in self.points if p.scale > 1]
        return max(amplified) - self.accuracy_at_1 if amplified else math.nan

    @metric
    def best_scale_accuracy(self) -> float:
        scored = [p for p in self.points if not math.isnan(p.mean_accuracy)]
        return max(scored, key=lambda p: p.mean_accuracy).scale if scored else math.nan


def superweight_scaling(model: LoadedModel, detection: SuperWeightDetection, corpus: Corpus, *,
                        scales: Sequence[float] = PAPER_SCALES, tasks: Sequence[ZeroShotTask] = (),
                        tasks_skipped: Sequence[str] = (), seq_len: int = 128, n_windows: int = 4, limit: int = 30,
                        windows: WindowCache | None = None, book: ScoreBook | None = None) -> SuperWeightScaling:
    """Perplexity and accuracy at each factor (module docstring); factor 1 must be among ``scales``.

    ``windows`` and ``book`` may be shared with other checks (as for :func:`.impact.superweight_impact`): scaling
    by 0 is pruning and by 1 no edit, so those are measured once. Raises
    :class:`~lmaudit.checks.core.errors.PremiseMissing` when the detection confirmed no super weight."""
    if 1.0 not in scales:
        raise ValueError(f"scales must include 1.0 (the original), got {list(scales)}")
    coordinates = tuple(sw.coordinates for sw in detection.require())
    layer = min(c[0] for c in coordinates)
    if windows is None:
        windows = WindowCache(model, corpus_windows(model.tokenizer, corpus, seq_len, n_windows), [layer])
    book = book if book is not None else ScoreBook(model, tasks, limit=limit)
    points = []
    for factor in scales:
        def edit(factor: float = factor) -> contextlib.AbstractContextManager[None]:
            return scale(model.adapter, coordinates, factor)

        label = scale_label(factor)
        scores = book.scores(label, edit)
        points.append(ScalePoint(factor, windows.perplexity_under(label, layer, edit), scores.accuracy, scores.mean))
    return SuperWeightScaling(coordinates, tuple(points), tuple(t.name for t in book.tasks), tuple(tasks_skipped))
