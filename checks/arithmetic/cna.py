"""Comparative Neuron Analysis on arithmetic (Yu & Ananiadou 2024): which FFN neurons produce the answer, whether
they matter (against random-neuron controls), and how they change between two conditions.

**Scoring set** (:func:`scoring_problems`). Neurons are ranked on problems that never judge them: drawn from the
``"rank"`` seed stream with every evaluated problem excluded (:func:`lmaudit.checks.core.arithmetic_problems.
draw_prompts`), and only those the model answers correctly are kept, so the target is the model's *predicted*
first answer token (the paper's setting). Too few correct ones raise :class:`PremiseMissing`. The ranking is the
mean importance over that set (:mod:`lmaudit.checks.core.neuron_scores`, ``"fixed"`` normaliser by default).

**Interventions** (:func:`intervention_check`, :func:`prune_to_top`), on the evaluated problems through
:class:`~lmaudit.checks.core.prefix_cache.PrefixCachedEvaluator` from ``min(layers)``: zero the top ``k``
neurons, or keep only the top ``keep`` of each layer, against ``n_random`` (≥ 20) seeded random draws of the same
size from the same layers (``"control"`` stream), evaluated as replicas of one batch. A control is summarised by
its :class:`~lmaudit.checks.core.stats.Spread`, and the top neurons are judged against it by

    control_p = (1 + #{draws at least as extreme}) / (1 + n_random)       (empirical one-sided p-value)

and by the margin over the control's 95 % bound (``mean ± 1.645·std``).

**Comparisons** (:func:`compare_scores`): two score tables (conditions A, B: base vs fine-tune, clean vs heads
ablated, two prompt forms) ranked neuron by neuron over *all* neurons of the scored layers by
``Δ = importance_B − importance_A``; summaries over A's top ``k``::

    importance_retention = Σ_{top_a} importance_B / Σ_{top_a} importance_A
    coefficient_gain     = Σ_{top_a} sign(m_A)·m_B / Σ_{top_a} |m_A|          (> 1: B activates them more)
    amplified_p          = sign test of #{top_a: sign(m_A)·m_B > |m_A|} against the others

:func:`compare_head_ablated` makes the head-ablation comparison specific: the retention under the critical
heads is judged against ``n_controls`` draws of as many *control* heads (heads whose ablation dropped no
operation's accuracy in the screen).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from lmaudit.checks.core.accuracy import (
    ArithmeticAccuracy,
    arithmetic_accuracy,
    correct_answers,
    summarize,
    teacher_forcing_is_exact,
)
from lmaudit.checks.core.adapter import ArchitectureAdapter
from lmaudit.checks.core.arithmetic_problems import ArithmeticProblem
from lmaudit.checks.core.errors import PremiseMissing
from lmaudit.checks.core.interventions import ablate_heads, transform_inputs, zero_neurons
from lmaudit.checks.core.loading import LoadedModel
from lmaudit.checks.core.neuron_scores import (
    LastStates,
    NeuronScores,
    Normalizer,
    last_position_states,
    logit_lens,
    mean_scores,
    scores_from_states,
    subset_importance,
    target_token_id,
    top_neurons,
)
from lmaudit.checks.core.prefix_cache import PrefixCachedEvaluator
from lmaudit.checks.core.results import CheckResult, metric, metric_field, metric_group
from lmaudit.checks.core.stats import Spread, random_neurons, sign_test_p, spearman

Neuron = tuple[int, int]  # (layer, neuron)
N_ROWS = 40  # comparison rows kept for the report (the largest |Δ| of all neurons)


def neuron_name(neuron: Neuron) -> str:
    return f"L{neuron[0]}.N{neuron[1]}"


TIE = 1e-6  # relative: values this close count as a tie (float noise of two scoring paths, not an effect)


def empirical_p(value: float, controls: Sequence[float]) -> float:
    """``(1 + #{c ≥ value}) / (1 + n)``: how extreme ``value`` is among control draws (larger = more extreme);
    a control within :data:`TIE` (relative) of ``value`` counts as at least as extreme."""
    return (1 + sum(c >= value - TIE * max(1.0, abs(value)) for c in controls)) / (1 + len(controls))


# --------------------------------------------------------------------------------------- scoring set


def answer_prompts(problems: Sequence[ArithmeticProblem]) -> tuple[list[str], list[str]]:
    """CNA prompts and targets: ``prompt + answer_prefix`` (the template's space, if any) and the answer, whose
    first token (a digit) is the target."""
    return [p.prompt + p.template.answer_prefix for p in problems], [p.answer for p in problems]


def scoring_problems(loaded: LoadedModel, candidates: Sequence[ArithmeticProblem], *, per_cell: int,
                     min_prompts: int) -> list[ArithmeticProblem]:
    """The first ``per_cell`` candidates of each (operation, template) that the model answers correctly (greedy
    exact match): on those the predicted first answer token is the gold one. Raises :class:`PremiseMissing`
    when fewer than ``min_prompts`` are correct overall."""
    if teacher_forcing_is_exact(loaded.tokenizer):  # shared few-shot prefixes run once
        correct = PrefixCachedEvaluator.for_problems(loaded, candidates, layers=[]).baseline
    else:
        correct, _ = correct_answers(loaded.model, loaded.tokenizer, candidates)
    kept: list[ArithmeticProblem] = []
    count: dict[tuple[str, str], int] = {}
    for problem, ok in zip(candidates, correct, strict=True):
        cell = (problem.op.symbol, problem.template.value)
        if ok and count.get(cell, 0) < per_cell:
            kept.append(problem)
            count[cell] = count.get(cell, 0) + 1
    if len(kept) < min_prompts:
        raise PremiseMissing(f"CNA ranks neurons on problems the model answers correctly: {int(correct.sum())} of "
                             f"{len(candidates)} scoring candidates are correct, {len(kept)} usable, "
                             f"{min_prompts} needed")
    return kept


def score_states(loaded: LoadedModel, problems: Sequence[ArithmeticProblem], layers: Sequence[int], *,
                 normalizers: Sequence[Normalizer] = ("fixed",)) -> dict[str, list[NeuronScores]]:
    """Per-prompt CNA scores of ``problems`` (one forward pass, one pass over ``U`` for all normalisers)."""
    prompts, targets = answer_prompts(problems)
    ids = [target_token_id(loaded.tokenizer, p, t) for p, t in zip(prompts, targets, strict=True)]
    states = last_position_states(loaded.model, loaded.tokenizer, prompts, layers=layers, adapter=loaded.adapter)
    return scores_from_states(loaded.adapter, states, prompts, targets, ids, normalizers=normalizers)


def average(scores: Sequence[NeuronScores]) -> NeuronScores:
    """One prompt's scores as they are; several prompts' element-wise mean, described by their count."""
    if len(scores) == 1:
        return scores[0]
    example = scores[0].prompt.splitlines()[-1] if scores[0].prompt else ""
    return mean_scores(scores, prompt=f"mean over {len(scores)} prompts, e.g. {example!r}",
                       target="each prompt's answer")


@dataclass(frozen=True)
class NormalizerAgreement:
    """How the paper's fixed final-norm scale and the per-neuron re-normalisation rank the same neurons."""

    spearman: float  # over every neuron of the scored layers (mean importance)
    top_overlap: float  # |top_k(fixed) ∩ top_k(per_neuron)| / k
    k: int


def normalizer_agreement(fixed: NeuronScores, per_neuron: NeuronScores, layers: Sequence[int],
                         k: int) -> NormalizerAgreement:
    a = fixed.importance[list(layers)].flatten()
    b = per_neuron.importance[list(layers)].flatten()
    top_a = {(la, n) for la, n, _ in top_neurons(fixed, k)}
    top_b = {(la, n) for la, n, _ in top_neurons(per_neuron, k)}
    return NormalizerAgreement(spearman(a.tolist(), b.tolist()), len(top_a & top_b) / max(1, k), k)


# -------------------------------------------------------------------------------- accuracy under masks


class ProblemAccuracy:
    """Accuracy of fixed problems, clean and with neuron sets of layers ``≥ start`` zeroed, through
    :class:`PrefixCachedEvaluator` when teacher forcing is exact for the tokenizer (else greedy generation)."""

    def __init__(self, loaded: LoadedModel, problems: Sequence[ArithmeticProblem], start: int) -> None:
        self.loaded, self.problems, self.start = loaded, list(problems), start
        self._evaluator = (PrefixCachedEvaluator.for_problems(loaded, self.problems, layers=[start])
                           if teacher_forcing_is_exact(loaded.tokenizer) else None)
        self.baseline = (summarize(self.problems, self._evaluator.baseline) if self._evaluator is not None
                         else arithmetic_accuracy(loaded.model, loaded.tokenizer, self.problems))

    def zeroed_many(self, specs: Sequence[Mapping[int, Sequence[int]]]) -> list[ArithmeticAccuracy]:
        """Accuracy with each neuron set (``{layer: [k]}``, every layer ``≥ start``) zeroed, the sets evaluated
        as replicas of one batch."""
        for spec in specs:
            if spec and min(spec) < self.start:
                raise ValueError(f"neurons of layer {min(spec)} lie below the evaluator's start layer {self.start}")
        if self._evaluator is None:
            out = []
            for spec in specs:
                with zero_neurons(self.loaded.adapter, spec):
                    out.append(arithmetic_accuracy(self.loaded.model, self.loaded.tokenizer, self.problems))
            return out
        adapter = self.loaded.adapter
        layers = sorted({layer for spec in specs for layer in spec})
        keep = {layer: torch.ones(len(specs), adapter.intermediate_size) for layer in layers}
        for r, spec in enumerate(specs):
            for layer, neurons in spec.items():
                keep[layer][r, list(neurons)] = 0.0

        @contextmanager
        def masked(rows: torch.Tensor) -> Any:
            with ExitStack() as stack:
                for layer in layers:
                    rows_mask = keep[layer][rows]  # (batch, intermediate)
                    stack.enter_context(transform_inputs([adapter.down_proj(layer)],
                                                         lambda x, mk=rows_mask: x * mk.to(x)[:, None, :]))
                yield

        correct = self._evaluator.correct_replicas(self.start, len(specs), masked)
        return [summarize(self.problems, row) for row in correct]

    def zeroed(self, spec: Mapping[int, Sequence[int]]) -> ArithmeticAccuracy:
        return self.zeroed_many([spec])[0]


def _spec(neurons: Sequence[Neuron]) -> dict[int, list[int]]:
    spec: dict[int, list[int]] = {}
    for layer, n in neurons:
        spec.setdefault(int(layer), []).append(int(n))
    return spec


# ---------------------------------------------------------------------------------------- intervention


@dataclass(frozen=True)
class InterventionCheck(CheckResult):
    """Accuracy with the top-``k`` CNA neurons zeroed against ``k`` random neurons of the same layers zeroed
    (one accuracy per seeded draw); drops in points (module docstring)."""

    k: int
    layers: tuple[int, ...]
    top: tuple[tuple[int, int, float], ...]  # (layer, neuron, mean importance)
    baseline: float
    top_zeroed: float
    random_zeroed: tuple[float, ...]
    normalizer: str
    agreement: NormalizerAgreement | None
    n_scoring_prompts: int = metric_field()
    n_prompts: int = metric_field()

    @property
    def control(self) -> Spread:
        """The random draws' drops, in points."""
        return Spread.of([100 * (self.baseline - a) for a in self.random_zeroed])

    @metric
    def baseline_accuracy(self) -> float:
        return self.baseline

    @metric
    def top_zeroed_accuracy(self) -> float:
        return self.top_zeroed

    @metric
    def top_drop_points(self) -> float:
        return 100 * (self.baseline - self.top_zeroed)

    @metric_group(*Spread.metric_names("control_drop_{}_points"))
    def _control_drops(self) -> dict[str, float]:
        return self.control.metrics("control_drop_{}_points")

    @metric
    def control_drop_upper_points(self) -> float:
        """The control's one-sided 95 % bound on a draw's drop, ``mean + 1.645·std``."""
        return self.control.upper()

    @metric
    def top_drop_over_control_upper_points(self) -> float:
        return self.top_drop_points - self.control.upper()

    @metric
    def control_p(self) -> float:
        """Empirical p-value of the top-k drop among the random draws' drops."""
        return empirical_p(self.top_drop_points, [100 * (self.baseline - a) for a in self.random_zeroed])

    @metric
    def n_random(self) -> int:
        return len(self.random_zeroed)

    @metric
    def normalizer_spearman(self) -> float:
        """Spearman's ρ of the fixed and per-neuron normalisers' importances (NaN when not computed)."""
        return self.agreement.spearman if self.agreement else float("nan")

    @metric
    def normalizer_top_overlap(self) -> float:
        return self.agreement.top_overlap if self.agreement else float("nan")


def _masked(importance: torch.Tensor, layers: Sequence[int]) -> torch.Tensor:
    masked = torch.full_like(importance, float("nan"))
    masked[list(layers)] = importance[list(layers)]
    return masked


def intervention_check(loaded: LoadedModel, accuracy: ProblemAccuracy, importance: torch.Tensor, *, k: int,
                       layers: Sequence[int], n_random: int, seed: int, n_scoring_prompts: int,
                       normalizer: str = "fixed", agreement: NormalizerAgreement | None = None) -> InterventionCheck:
    """Zero the top-``k`` neurons of ``layers`` by ``importance`` (``(n_layers, intermediate)``, mean over the
    scoring set) vs ``n_random`` draws of ``k`` random other neurons of the same layers (draw ``i`` seeded
    ``seed + i``); ``accuracy`` evaluates the held-out problems from ``min(layers)``."""
    if n_random < 1:
        raise ValueError(f"n_random must be >= 1, got {n_random}")
    layers = sorted(set(layers))
    top = top_neurons(_masked(importance, layers), k)
    chosen = [(layer, n) for layer, n, _ in top]
    draws = [random_neurons(layers, loaded.adapter.intermediate_size, k, seed=seed + i, exclude=chosen)
             for i in range(n_random)]
    results = accuracy.zeroed_many([_spec(chosen)] + [_spec(d) for d in draws])
    return InterventionCheck(k, tuple(layers), tuple(top), accuracy.baseline.accuracy, results[0].accuracy,
                             tuple(r.accuracy for r in results[1:]), normalizer, agreement,
                             n_scoring_prompts=n_scoring_prompts, n_prompts=len(accuracy.problems))


# --------------------------------------------------------------------------------------------- pruning


@dataclass(frozen=True)
class PruningResult(CheckResult):
    """Accuracy when each of ``layers`` keeps only its top-``keep`` CNA neurons (the rest zeroed), against
    keeping ``keep`` random neurons of each layer (one accuracy per seeded draw)."""

    keep: int
    width: int  # neurons per layer
    layers: tuple[int, ...]
    baseline: float
    pruned: float
    random_draws: tuple[float, ...]
    rank_by: str  # "importance" (signed, the paper's ranking) or "abs_importance"
    n_prompts: int = metric_field()

    @property
    def control(self) -> Spread:
        return Spread.of(self.random_draws)

    @metric
    def baseline_accuracy(self) -> float:
        return self.baseline

    @metric
    def pruned_accuracy(self) -> float:
        return self.pruned

    @metric
    def pruned_retention(self) -> float:
        """``pruned / baseline``: the share of the accuracy the kept neurons carry."""
        return self.pruned / self.baseline if self.baseline else float("nan")

    @metric_group(*Spread.metric_names("control_{}_accuracy"))
    def _control_accuracies(self) -> dict[str, float]:
        return self.control.metrics("control_{}_accuracy")

    @metric
    def pruned_over_control_upper_points(self) -> float:
        """``100·(pruned − (mean + 1.645·std) of the random draws)``."""
        return 100 * (self.pruned - self.control.upper())

    @metric
    def control_p(self) -> float:
        """Empirical p-value of the pruned accuracy among the random draws' accuracies."""
        return empirical_p(self.pruned, self.random_draws)

    @metric
    def kept_fraction(self) -> float:
        return self.keep / self.width


def prune_to_top(loaded: LoadedModel, accuracy: ProblemAccuracy, importance: torch.Tensor, *, keep: int,
                 layers: Sequence[int], n_random: int, seed: int, rank_by: str = "importance") -> PruningResult:
    """Keep the top-``keep`` neurons of each layer by mean importance (``rank_by="abs_importance"``: by its
    magnitude, so the neurons that most lower the answer's probability are kept too); zero every other neuron of
    that layer. The control keeps ``keep`` random neurons of each layer (draw ``i`` seeded ``seed + i``)."""
    if rank_by not in ("importance", "abs_importance"):
        raise ValueError(f"rank_by must be 'importance' or 'abs_importance', got {rank_by!r}")
    width = loaded.adapter.intermediate_size
    layers = sorted(set(layers))
    if not 0 <= keep <= width:
        raise ValueError(f"keep must be in 0..{width}, got {keep}")
    if n_random < 1:
        raise ValueError(f"n_random must be >= 1, got {n_random}")

    def zero_all_but(kept: Mapping[int, Sequence[int]]) -> dict[int, list[int]]:
        return {layer: sorted(set(range(width)) - set(int(n) for n in kept[layer])) for layer in layers}

    ranking = importance.abs() if rank_by == "abs_importance" else importance
    best = {layer: torch.topk(torch.nan_to_num(ranking[layer], nan=float("-inf")), keep).indices.tolist()
            for layer in layers}
    draws = [{layer: [n for _, n in random_neurons([layer], width, keep, seed=seed + i)] for layer in layers}
             for i in range(n_random)]
    results = accuracy.zeroed_many([zero_all_but(best)] + [zero_all_but(d) for d in draws])
    return PruningResult(keep, width, tuple(layers), accuracy.baseline.accuracy, results[0].accuracy,
                         tuple(r.accuracy for r in results[1:]), rank_by, n_prompts=len(accuracy.problems))


# ----------------------------------------------------------------------------------------- comparisons


@dataclass(frozen=True)
class NeuronDelta:
    """One neuron under conditions A and B; ``Δ = B − A``. ``promotes``/``suppresses``: its logit lens (the
    tokens ``m_A·v̂_k`` of model A raises and lowers most), empty when not asked for."""

    layer: int
    neuron: int
    importance_a: float
    importance_b: float
    coefficient_a: float
    coefficient_b: float
    promotes: tuple[str, ...] = ()
    suppresses: tuple[str, ...] = ()

    @property
    def importance_delta(self) -> float:
        return self.importance_b - self.importance_a

    @property
    def coefficient_delta(self) -> float:
        return self.coefficient_b - self.coefficient_a


@dataclass(frozen=True)
class CnaComparison(CheckResult):
    """Every neuron of the scored layers ranked by ``|Δ importance|`` (``rows``: the first :data:`N_ROWS`), and
    the summaries over A's top ``k`` (module docstring)."""

    label_a: str
    label_b: str
    prompt_a: str
    prompt_b: str
    k: int
    top_a: tuple[Neuron, ...]
    top_b: tuple[Neuron, ...]
    rows: tuple[NeuronDelta, ...]
    n_neurons: int  # neurons ranked
    condition: str  # what differs between A and B (e.g. "finetune")
    importance_retention: float = metric_field()
    coefficient_gain: float = metric_field()
    amplified: int = metric_field()  # A's top-k neurons that B activates more (sign(m_A)·m_B > |m_A|)
    max_abs_importance_delta: float = metric_field()
    importance_spearman: float = metric_field()  # A vs B over every neuron
    n_prompts: int = metric_field()

    @metric
    def top_overlap(self) -> float:
        """``|top_a ∩ top_b| / k``: 1 when both conditions rely on the same neurons."""
        return len(set(self.top_a) & set(self.top_b)) / max(1, self.k)

    @metric
    def amplified_p(self) -> float:
        """One-sided sign test: more of A's top-k neurons are amplified by B than not."""
        return sign_test_p(self.amplified, len(self.top_a) - self.amplified)

    @metric
    def top_neuron_a(self) -> str:
        return neuron_name(self.top_a[0]) if self.top_a else ""

    @metric
    def top_neuron_b(self) -> str:
        return neuron_name(self.top_b[0]) if self.top_b else ""


def compare_scores(a: NeuronScores, b: NeuronScores, *, k: int = 20, labels: tuple[str, str] = ("A", "B"),
                   lens: tuple[ArchitectureAdapter, Any] | None = None, lens_k: int = 5, n_prompts: int = 1,
                   condition: str = "") -> CnaComparison:
    """Neuron-by-neuron comparison of two score tables of the same shape, over every scored neuron. The top
    ``k`` of a condition are its ``k`` largest *positive* importances (fewer when fewer are positive).

    ``lens = (adapter, tokenizer)`` of model A adds each row's logit lens
    (:func:`~lmaudit.checks.core.neuron_scores.logit_lens` of ``m_A·v̂_k``, ``lens_k`` tokens each way)."""
    if a.importance.shape != b.importance.shape:
        raise ValueError(f"score shapes differ: {tuple(a.importance.shape)} vs {tuple(b.importance.shape)}")
    # A top neuron raises the answer's probability: ties at zero (silent neurons) are not "top".
    top_a = tuple((layer, n) for layer, n, v in top_neurons(a, k) if v > 0)
    top_b = tuple((layer, n) for layer, n, v in top_neurons(b, k) if v > 0)
    scored = ~torch.isnan(a.importance) & ~torch.isnan(b.importance)  # (n_layers, intermediate)
    delta = torch.where(scored, b.importance - a.importance, torch.zeros_like(a.importance))
    order = torch.argsort(delta.abs().flatten(), descending=True)[:N_ROWS]
    width = delta.shape[1]
    rows = []
    for flat in order.tolist():
        layer, n = flat // width, flat % width
        if not bool(scored[layer, n]):
            continue
        promotes: tuple[str, ...] = ()
        suppresses: tuple[str, ...] = ()
        if lens is not None:
            up, down = logit_lens(lens[0], lens[1], layer, n, coefficient=float(a.coefficient[layer, n]), k=lens_k)
            promotes, suppresses = tuple(t for t, _ in up), tuple(t for t, _ in down)
        rows.append(NeuronDelta(layer, n, float(a.importance[layer, n]), float(b.importance[layer, n]),
                                float(a.coefficient[layer, n]), float(b.coefficient[layer, n]), promotes, suppresses))
    la = torch.tensor([layer for layer, _ in top_a], dtype=torch.long)
    na = torch.tensor([n for _, n in top_a], dtype=torch.long)
    imp_a, imp_b = a.importance[la, na].double(), b.importance[la, na].double()
    coef_a, coef_b = a.coefficient[la, na].double(), b.coefficient[la, na].double()
    sign = torch.where(coef_a >= 0, 1.0, -1.0).double()
    total = float(imp_a.sum())
    magnitude = float(coef_a.abs().sum())
    return CnaComparison(
        labels[0], labels[1], a.prompt, b.prompt, k, top_a, top_b, tuple(rows), int(scored.sum()), condition,
        importance_retention=float(imp_b.sum()) / total if total else float("nan"),
        coefficient_gain=float((sign * coef_b).sum()) / magnitude if magnitude else float("nan"),
        amplified=int((sign * coef_b > coef_a.abs()).sum()),
        max_abs_importance_delta=float(delta.abs().max()) if scored.any() else 0.0,
        importance_spearman=spearman(a.importance[scored].tolist(), b.importance[scored].tolist()),
        n_prompts=n_prompts)


def compare_models(loaded_a: LoadedModel, loaded_b: LoadedModel, problems: Sequence[ArithmeticProblem], *,
                   layers: Sequence[int], k: int = 20, labels: tuple[str, str] = ("base", "fine-tuned"),
                   lens: bool = True, scores_a: NeuronScores | None = None,
                   normalizer: Normalizer = "fixed") -> CnaComparison:
    """Two models of one architecture (e.g. base vs its fine-tune) on the same problems and targets (A's).
    ``scores_a``: A's mean scores when already computed (same problems and layers)."""
    a = scores_a or average(score_states(loaded_a, problems, layers, normalizers=(normalizer,))[normalizer])
    b = average(score_states(loaded_b, problems, layers, normalizers=(normalizer,))[normalizer])
    return compare_scores(a, b, k=k, labels=labels, lens=(loaded_a.adapter, loaded_a.tokenizer) if lens else None,
                          n_prompts=len(problems), condition="finetune")


@dataclass(frozen=True)
class HeadAblationComparison(CheckResult):
    """Clean vs the critical heads ablated (``comparison``), and the specificity control: the retention of A's
    top-``k`` importance when as many control heads (no accuracy drop in the screen) are ablated instead."""

    comparison: CnaComparison
    heads: tuple[str, ...]
    control_heads: tuple[tuple[str, ...], ...]  # one tuple per draw
    control_retention: tuple[float, ...]

    @metric
    def importance_retention(self) -> float:
        return self.comparison.importance_retention

    @metric_group(*Spread.metric_names("control_retention_{}"))
    def _control_retentions(self) -> dict[str, float]:
        return Spread.of(self.control_retention).metrics("control_retention_{}")

    @metric
    def control_retention_lower(self) -> float:
        """The controls' one-sided 95 % bound, ``mean − 1.645·std``."""
        return Spread.of(self.control_retention).lower()

    @metric
    def retention_margin(self) -> float:
        """``control_retention_lower − importance_retention`` (> 0: the critical heads weaken the answer neurons
        beyond the control's bound)."""
        return self.control_retention_lower - self.importance_retention

    @metric
    def control_p(self) -> float:
        """Empirical p-value: the share of control draws whose retention is at most the critical heads'."""
        return empirical_p(-self.importance_retention, [-r for r in self.control_retention])

    @metric
    def n_controls(self) -> int:
        return len(self.control_retention)

    @metric
    def max_abs_importance_delta(self) -> float:
        return self.comparison.max_abs_importance_delta


def _retention(loaded: LoadedModel, states: LastStates, target_ids: Sequence[int], base: NeuronScores,
               top: Sequence[Neuron], normalizer: Normalizer) -> float:
    """``Σ_top importance under states / Σ_top base importance`` (mean over prompts), scoring only ``top``."""
    spec = _spec(top)
    sub = subset_importance(loaded.adapter, states, target_ids, spec, normalizer=normalizer)
    after = sum(float(sub[layer].mean(0).sum()) for layer in spec)
    before = sum(float(base.importance[layer, n]) for layer, n in top)
    return after / before if before else float("nan")


def compare_head_ablated(loaded: LoadedModel, problems: Sequence[ArithmeticProblem], heads: Mapping[int, Sequence[int]],
                         control_heads: Sequence[Mapping[int, Sequence[int]]], *, layers: Sequence[int], k: int,
                         base: NeuronScores, normalizer: Normalizer = "fixed") -> HeadAblationComparison:
    """Clean (``base``: the mean scores of ``problems``) vs ``heads`` ({layer: [heads]}) ablated, every neuron
    scored; then the retention of A's top ``k`` under each set of ``control_heads``."""
    prompts, targets = answer_prompts(problems)
    ids = [target_token_id(loaded.tokenizer, p, t) for p, t in zip(prompts, targets, strict=True)]
    with ablate_heads(loaded.adapter, heads):
        states = last_position_states(loaded.model, loaded.tokenizer, prompts, layers=layers, adapter=loaded.adapter)
    ablated = average(scores_from_states(loaded.adapter, states, prompts, targets, ids,
                                         normalizers=(normalizer,))[normalizer])
    name = ", ".join(f"L{layer}.H{h}" for layer, hs in sorted(heads.items()) for h in hs)
    comparison = compare_scores(base, ablated, k=k, labels=("clean", f"ablated {name}"),
                                lens=(loaded.adapter, loaded.tokenizer), n_prompts=len(problems),
                                condition="head_ablated")
    top = list(comparison.top_a)
    retention = []
    for control in control_heads:
        with ablate_heads(loaded.adapter, control):
            states = last_position_states(loaded.model, loaded.tokenizer, prompts, layers=layers,
                                          adapter=loaded.adapter)
        retention.append(_retention(loaded, states, ids, base, top, normalizer))
    return HeadAblationComparison(
        comparison, tuple(name.split(", ")),
        tuple(tuple(f"L{layer}.H{h}" for layer, hs in sorted(c.items()) for h in hs) for c in control_heads),
        tuple(retention))
