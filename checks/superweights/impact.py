"""Table 1 of Yu et al. 2024 (§3.1): what pruning the super weights does, against pruning as many of the largest
other weights, and how much restoring the super activation gives back.

Every condition (:mod:`lmaudit.checks.superweights.conditions`) scores the *same* perplexity windows
(:func:`lmaudit.checks.core.perplexity.corpus_windows`) and the *same* zero-shot documents
(:mod:`lmaudit.checks.core.zero_shot`, BOS policy included):

==================== =============================================================================================
``original``         no edit
``prune_sw``         every confirmed super weight set to 0
``prune_others``     the ``others_share · n_parameters`` largest-magnitude other weights of the decoder's Linear
                     layers set to 0 (the paper's 7000 of Llama-7B's 6.74e9 parameters: share ≈ 1.04e-6)
``prune_sw_restore`` ``prune_sw`` with the super activation restored where it sits in each sequence ("+SA")
==================== =============================================================================================

The claims it measures::

    perplexity_ratio_sw_over_others = PPL(prune_sw) / PPL(prune_others)          pruning SW hurts far more
    restore_recovery = (ln PPL(prune_sw) − ln PPL(restore)) / (ln PPL(prune_sw) − ln PPL(original))
                                                                                 the share of the log-perplexity
                                                                                 damage that +SA gives back
    accuracy_drop_p_value = P(Binom(n, ½) ≥ broken), n = broken + fixed         one-sided exact sign test over
                                                                                 the documents (broken: right in
                                                                                 original, wrong in prune_sw)

``restore_recovery`` is NaN when pruning did not raise the perplexity (there is no damage to recover).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmaudit.checks.core.corpora import Corpus
from lmaudit.checks.core.interventions import prune_and_restore, zero_weights
from lmaudit.checks.core.layer_skip import clean_hidden_states
from lmaudit.checks.core.loading import LoadedModel
from lmaudit.checks.core.outliers import Coordinate
from lmaudit.checks.core.perplexity import corpus_windows
from lmaudit.checks.core.results import CheckResult, metric, metric_group
from lmaudit.checks.core.stats import sign_test_p
from lmaudit.checks.core.zero_shot import ScoreBook, ZeroShotScores, ZeroShotTask
from lmaudit.checks.superweights.conditions import (
    PAPER_OTHERS_SHARE,
    PRUNED,
    UNEDITED,
    Condition,
    WindowCache,
    largest_other_weights,
    layer_of,
    others_count,
    prune,
)
from lmaudit.checks.superweights.detect import SuperWeightDetection, encode

CONDITIONS = ("original", "prune_sw", "prune_others", "prune_sw_restore")


@dataclass(frozen=True)
class ConditionResult:
    name: str
    perplexity: float
    accuracy: dict[str, float]  # task -> lm-eval acc (empty when accuracy was not scored under this condition)
    mean_accuracy: float  # over the tasks run (NaN when none)
    outcomes: tuple[int, ...]  # every document's 0/1, tasks in name order (paired across conditions)
    start_layer: int  # the layer the perplexity re-evaluation started at (0 = a full forward)


@dataclass(frozen=True)
class ResidualProfile:
    """max_{t,c} |h_ℓ[t, c]| of the residual stream entering each layer on the detection prompt."""

    original: list[float]
    pruned: list[float]


def _paired(before: Sequence[int], after: Sequence[int]) -> tuple[int, int]:
    """``(broken, fixed)``: documents right before and wrong after, and the reverse (0, 0 without documents)."""
    broken = sum(1 for b, a in zip(before, after, strict=True) if b and not a)
    fixed = sum(1 for b, a in zip(before, after, strict=True) if a and not b)
    return broken, fixed


@dataclass(frozen=True)
class SuperWeightImpact(CheckResult):
    """The paper's Table 1 on this model, with the residual-stream maxima with and without the super weights."""

    coordinates: tuple[Coordinate, ...]
    conditions: tuple[ConditionResult, ...]
    n_others: int
    others_share: float
    tasks: tuple[str, ...]
    tasks_skipped: tuple[str, ...]
    residual: ResidualProfile
    n_windows: int
    seq_len: int
    corpus: str

    def condition(self, name: str) -> ConditionResult:
        return next(c for c in self.conditions if c.name == name)

    @metric_group(*(f"perplexity_{c}" for c in CONDITIONS))
    def _perplexities(self) -> dict[str, float]:
        return {f"perplexity_{c.name}": c.perplexity for c in self.conditions}

    @metric_group(*(f"accuracy_{c}" for c in CONDITIONS))
    def _accuracies(self) -> dict[str, float]:
        return {f"accuracy_{c.name}": c.mean_accuracy for c in self.conditions}

    @metric
    def n_super_weights(self) -> int:
        return len(self.coordinates)

    @metric
    def perplexity_ratio_prune_sw(self) -> float:
        """PPL(prune_sw) / PPL(original)."""
        return self.condition("prune_sw").perplexity / self.condition("original").perplexity

    @metric
    def perplexity_ratio_prune_others(self) -> float:
        """PPL(prune_others) / PPL(original)."""
        return self.condition("prune_others").perplexity / self.condition("original").perplexity

    @metric
    def perplexity_ratio_sw_over_others(self) -> float:
        """PPL(prune_sw) / PPL(prune_others): pruning the super weights against pruning as many large others."""
        return self.condition("prune_sw").perplexity / self.condition("prune_others").perplexity

    @metric
    def restore_recovery(self) -> float:
        """Share of the log-perplexity damage of prune_sw that restoring the super activation gives back."""
        sw, restore, original = (math.log(self.condition(c).perplexity)
                                 for c in ("prune_sw", "prune_sw_restore", "original"))
        return (sw - restore) / (sw - original) if sw > original else float("nan")

    @metric
    def accuracy_drop_prune_sw(self) -> float:
        """Mean accuracy of original minus prune_sw (points of accuracy, 0-1)."""
        return self.condition("original").mean_accuracy - self.condition("prune_sw").mean_accuracy

    @metric
    def n_correct_original(self) -> int:
        """Documents the unedited model gets right: a drop can only show on these."""
        return sum(self.condition("original").outcomes)

    @metric
    def n_broken_prune_sw(self) -> int:
        """Documents right in original and wrong with the super weights pruned."""
        return _paired(self.condition("original").outcomes, self.condition("prune_sw").outcomes)[0]

    @metric
    def n_fixed_prune_sw(self) -> int:
        return _paired(self.condition("original").outcomes, self.condition("prune_sw").outcomes)[1]

    @metric
    def accuracy_drop_p_value(self) -> float:
        """One-sided exact sign test that pruning breaks more documents than it fixes (1 with no document)."""
        return sign_test_p(self.n_broken_prune_sw, self.n_fixed_prune_sw)


def residual_profile(model: LoadedModel, detection: SuperWeightDetection) -> ResidualProfile:
    ids = torch.tensor(encode(model.tokenizer, [detection.prompt], bos=detection.bos), device=model.adapter.device)
    n = model.adapter.n_layers

    def maxima() -> list[float]:
        _, hidden = clean_hidden_states(model.model, ids)
        return [float(h.abs().max()) for h in hidden[:n]]

    original = maxima()
    with prune(model.adapter, detection.coordinates):
        pruned = maxima()
    return ResidualProfile(original, pruned)


def conditions_for(model: LoadedModel, coordinates: Sequence[Coordinate],
                   n_others: int) -> dict[str, tuple[str, int, Condition]]:
    """``{name: (edit label, earliest edited layer, condition)}`` for the four conditions of Table 1."""
    adapter = model.adapter
    others = largest_other_weights(adapter, n_others, coordinates)
    sw_start = min(layer for layer, _, _ in coordinates)
    return {
        "original": (UNEDITED, 0, contextlib.nullcontext),
        "prune_sw": (PRUNED, sw_start, lambda: prune(adapter, coordinates)),
        "prune_others": (f"prune_others={n_others}", min(layer_of(adapter, m) for m in others),
                         lambda: zero_weights(others)),
        "prune_sw_restore": ("prune_sw_restore", sw_start, lambda: prune_and_restore(adapter, coordinates)),
    }


def superweight_impact(model: LoadedModel, detection: SuperWeightDetection, corpus: Corpus, *,
                       tasks: Sequence[ZeroShotTask] = (), tasks_skipped: Sequence[str] = (),
                       accuracy_conditions: Sequence[str] = CONDITIONS, others_share: float = PAPER_OTHERS_SHARE,
                       seq_len: int = 128, n_windows: int = 8, limit: int = 30, layer_skip: bool = True,
                       windows: WindowCache | None = None, book: ScoreBook | None = None) -> SuperWeightImpact:
    """Table 1: perplexity under each condition, and zero-shot accuracy under ``accuracy_conditions`` (lm-eval
    re-runs every choice's context, so each condition scored costs far more than its perplexity; the accuracy
    claim compares ``original`` with ``prune_sw``, which must be among them).

    ``windows`` (the perplexity windows of ``corpus``, ``seq_len``, ``n_windows``) and ``book`` (the zero-shot
    scores of ``tasks`` on ``limit`` documents) may be shared with other checks: an edit measured there already is
    not measured again. Raises :class:`~lmaudit.checks.core.errors.PremiseMissing` when the detection confirmed
    no super weight."""
    unknown = set(accuracy_conditions) - set(CONDITIONS)
    if unknown or (tasks and not {"original", "prune_sw"} <= set(accuracy_conditions)):
        raise ValueError(f"accuracy_conditions must be among {CONDITIONS} and hold original and prune_sw, got "
                         f"{list(accuracy_conditions)}")
    coordinates = tuple(sw.coordinates for sw in detection.require())
    n_others = others_count(model.adapter, others_share)
    conditions = conditions_for(model, coordinates, n_others)
    if windows is None:
        windows = WindowCache(model, corpus_windows(model.tokenizer, corpus, seq_len, n_windows),
                              [start for _, start, _ in conditions.values()], layer_skip=layer_skip)
    book = book if book is not None else ScoreBook(model, tasks, limit=limit)
    results = []
    for name, (label, start, condition) in conditions.items():
        scores = (book.scores(label, condition) if name in accuracy_conditions else ZeroShotScores({}, {}))
        results.append(ConditionResult(name, windows.perplexity_under(label, start, condition), scores.accuracy,
                                       scores.mean, scores.outcomes(), start))
    return SuperWeightImpact(coordinates, tuple(results), n_others, others_share, tuple(t.name for t in book.tasks),
                             tuple(tasks_skipped), residual_profile(model, detection), n_windows, seq_len, corpus.name)
