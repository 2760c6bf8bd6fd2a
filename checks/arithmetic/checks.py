"""Registered arithmetic checks (Yu & Ananiadou 2024): baseline accuracy, the head sweep (screen, then confirm),
and the CNA checks (intervention, pruning, comparisons). The only module of the area that imports the harness:
it turns the context into plain arguments for :mod:`~lmaudit.checks.arithmetic.head_sweep` and
:mod:`~lmaudit.checks.arithmetic.cna`.

Problems come from :func:`lmaudit.checks.core.arithmetic_problems.draw_prompts`, one seed stream per role
(:func:`lmaudit.checks.core.stats.derived_seed`): ``"evaluate"`` for what judges (the screen, the intervention
and pruning problems), ``"confirm"`` for the head sweep's fresh prompts and ``"rank"`` for the problems that rank
neurons; every later stream excludes the problems of the earlier ones, so no problem both selects and judges.
Sizes are per operation, digit count and template; profiles change them in the audit file, never here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field, model_validator

from lmaudit.checks.arithmetic.cna import (
    CnaComparison,
    HeadAblationComparison,
    InterventionCheck,
    ProblemAccuracy,
    PruningResult,
    average,
    compare_head_ablated,
    compare_models,
    compare_scores,
    intervention_check,
    normalizer_agreement,
    prune_to_top,
    score_states,
    scoring_problems,
)
from lmaudit.checks.arithmetic.head_sweep import (
    DEFAULT_ALPHA,
    DEFAULT_THRESHOLD_POINTS,
    HeadScreen,
    HeadSweepAudit,
    screen_heads,
    sweep_heads,
)
from lmaudit.checks.core.accuracy import ArithmeticAccuracy, arithmetic_accuracy
from lmaudit.checks.core.arithmetic_problems import ArithmeticProblem, draw_prompts, problem_key
from lmaudit.checks.core.errors import PremiseMissing
from lmaudit.checks.core.finetune import LoraRecipe
from lmaudit.checks.core.neuron_scores import NeuronScores
from lmaudit.checks.core.stats import derived_seed, layer_range
from lmaudit.checks.harness.registry import CheckParams, register_check

if TYPE_CHECKING:
    from lmaudit.checks.harness.context import AuditContext


class ProblemParams(CheckParams):
    """The evaluated problems. Difficulty is a parameter: operand ``digits`` and ``few_shot`` examples."""

    ops: str = "+-*/"
    digits: list[int] = [1]
    templates: list[Literal["symbolic", "words", "phrase", "qa"]] = ["symbolic", "words"]
    n_per_op: int = Field(32, ge=1)  # per operation, digit count and template
    few_shot: int = Field(4, ge=0)  # solved examples before each prompt, shared per operation and template

    def draw(self, seed: int, *, n_per_op: int | None = None, exclude: frozenset = frozenset(),
             ops: str | None = None, templates: list[str] | None = None) -> list[ArithmeticProblem]:
        return draw_prompts(ops=ops or self.ops, digits=self.digits, templates=templates or self.templates,
                            n_per_op=n_per_op or self.n_per_op, few_shot=self.few_shot, seed=seed, exclude=exclude)

    def evaluated(self, context: AuditContext) -> list[ArithmeticProblem]:
        return self.draw(derived_seed(context.seed, "evaluate"))


def _keys(problems: list[ArithmeticProblem]) -> frozenset:
    return frozenset(problem_key(p) for p in problems)


@register_check("arithmetic_accuracy", params=ProblemParams, area="arithmetic")
def check_accuracy(context: AuditContext, params: ProblemParams) -> ArithmeticAccuracy:
    """Greedy exact-match accuracy per operation and digit count."""
    return arithmetic_accuracy(context.model.model, context.model.tokenizer, params.evaluated(context))


# ------------------------------------------------------------------------------------------ head sweep


class HeadSweepParams(ProblemParams):
    """Screen every head of the layer range on ``n_per_op`` prompts, confirm the candidates on ``confirm_per_op``
    fresh ones."""

    templates: list[Literal["symbolic", "words", "phrase", "qa"]] = ["symbolic"]
    # The screen only nominates candidates (the confirmation judges them), but with 8 prompts per operation one
    # broken answer is 12.5 points and most heads reach the threshold (measured: 190 of 270 on the default model);
    # 16 nominate on more than one answer. Its cost is mostly the few-shot prefix re-run per head anyway.
    n_per_op: int = Field(16, ge=1)
    # The confirmation's power is the number of fresh prompts the model answers (measured on the default model:
    # 4 of 32 fresh symbolic "*" prompts), so it asks the same operands in both forms.
    confirm_per_op: int = Field(32, ge=1)
    confirm_templates: list[Literal["symbolic", "words", "phrase", "qa"]] = ["symbolic", "words"]
    threshold_points: float = DEFAULT_THRESHOLD_POINTS  # screen: candidate when some operation drops this much
    max_candidates: int = Field(8, ge=1)  # each costs a test: Bonferroni over candidates × operations
    alpha: float = Field(DEFAULT_ALPHA, gt=0, lt=1)  # family-wise, Bonferroni over candidates × operations
    layer_fraction: tuple[float, float] = (0.0, 1.0)  # the swept layers, as fractions of the depth
    min_correct: int = Field(4, ge=1)  # screening problems the model must answer for a drop to be measurable
    max_rows: int = Field(1024, ge=1)  # replica × problem rows per pass (memory, not results)

    def layers(self, context: AuditContext) -> list[int]:
        return layer_range(context.model.adapter.n_layers, *self.layer_fraction)


_SCREEN_FIELDS = {"ops", "digits", "templates", "n_per_op", "few_shot", "threshold_points", "layer_fraction",
                  "min_correct"}


def _screen(context: AuditContext, params: HeadSweepParams) -> tuple[list[ArithmeticProblem], HeadScreen]:
    """The screen's problems and result, shared by the sweep and the head-ablation comparison."""
    problems = params.evaluated(context)
    key = ("arithmetic_head_screen", context.seed, params.model_dump_json(include=_SCREEN_FIELDS))
    screen = context.artifact(HeadScreen, key, lambda: screen_heads(
        context.model, problems, layers=params.layers(context), threshold_points=params.threshold_points,
        max_rows=params.max_rows, min_correct=params.min_correct))
    return problems, screen


def _sweep(context: AuditContext, params: HeadSweepParams) -> HeadSweepAudit:
    problems, screen = _screen(context, params)
    key = ("arithmetic_head_sweep", context.seed, params.model_dump_json())

    def build() -> HeadSweepAudit:
        fresh = params.draw(derived_seed(context.seed, "confirm"), n_per_op=params.confirm_per_op,
                            exclude=_keys(problems), templates=list(params.confirm_templates))
        return sweep_heads(context.model, problems, fresh, layers=params.layers(context),
                           threshold_points=params.threshold_points, max_candidates=params.max_candidates,
                           alpha=params.alpha, min_correct=params.min_correct, max_rows=params.max_rows,
                           screen=screen)

    return context.artifact(HeadSweepAudit, key, build)


@register_check("arithmetic_head_sweep", params=HeadSweepParams, area="arithmetic")
def check_head_sweep(context: AuditContext, params: HeadSweepParams) -> HeadSweepAudit:
    """Ablate every attention head; confirm the heads whose ablation drops accuracy on fresh prompts."""
    return _sweep(context, params)


# ------------------------------------------------------------------------------------------------- CNA


class CnaParams(ProblemParams):
    """The evaluated problems (``n_per_op``...), the CNA layers and the held-out scoring set."""

    n_per_op: int = Field(16, ge=1)  # 128 evaluated problems by default: one problem is 0.78 accuracy points

    layer_fraction: float = Field(0.8, ge=0, lt=1)  # CNA scores the layers from this fraction of the depth on
    n_score: int = Field(8, ge=1)  # correctly answered scoring prompts kept per operation and template
    score_pool: int = Field(24, ge=1)  # scoring candidates drawn per operation and template
    min_score: int = Field(16, ge=1)  # fewer correct scoring prompts than this: the premise is missing
    normalizer: Literal["fixed", "per_neuron"] = "fixed"  # the paper's fixed final-norm scale, or re-applied

    def layers(self, context: AuditContext) -> list[int]:
        return layer_range(context.model.adapter.n_layers, self.layer_fraction)


_EVAL_FIELDS = {"ops", "digits", "templates", "n_per_op", "few_shot"}
_SCORING_FIELDS = _EVAL_FIELDS | {"layer_fraction", "n_score", "score_pool", "min_score"}


@dataclass(frozen=True)
class ScoringSet:
    """The held-out problems that rank neurons and their per-prompt scores under both normalisers."""

    problems: tuple[ArithmeticProblem, ...]
    scores: dict[str, list[NeuronScores]]  # normaliser -> one per problem

    def mean(self, normalizer: str, keep: list[bool] | None = None) -> NeuronScores:
        chosen = [s for s, k in zip(self.scores[normalizer], keep or [True] * len(self.problems), strict=True) if k]
        if not chosen:
            raise PremiseMissing("no correctly answered scoring prompt in this condition")
        return average(chosen)


def _scoring(context: AuditContext, params: CnaParams) -> ScoringSet:
    key = ("arithmetic_cna_scoring", context.seed, params.model_dump_json(include=_SCORING_FIELDS))

    def build() -> ScoringSet:
        judged = _keys(params.evaluated(context))
        candidates = params.draw(derived_seed(context.seed, "rank"), n_per_op=params.score_pool, exclude=judged)
        problems = scoring_problems(context.model, candidates, per_cell=params.n_score, min_prompts=params.min_score)
        return ScoringSet(tuple(problems), score_states(context.model, problems, params.layers(context),
                                                        normalizers=("fixed", "per_neuron")))

    return context.artifact(ScoringSet, key, build)


def _accuracy(context: AuditContext, params: CnaParams) -> ProblemAccuracy:
    start = min(params.layers(context))
    key = ("arithmetic_cna_accuracy", context.seed, params.model_dump_json(include=_EVAL_FIELDS), start)
    return context.artifact(ProblemAccuracy, key,
                            lambda: ProblemAccuracy(context.model, params.evaluated(context), start))


class InterventionParams(CnaParams):
    k: int = Field(20, ge=1)  # top neurons zeroed
    n_random: int = Field(20, ge=20)  # random-neuron control draws (its spread needs many)


@register_check("arithmetic_cna_intervention", params=InterventionParams, area="arithmetic")
def check_cna_intervention(context: AuditContext, params: InterventionParams) -> InterventionCheck:
    """Zeroing the top-k CNA neurons vs k random neurons of the same layers (the paper's control)."""
    scoring = _scoring(context, params)
    layers = params.layers(context)
    agreement = normalizer_agreement(scoring.mean("fixed"), scoring.mean("per_neuron"), layers, params.k)
    return intervention_check(context.model, _accuracy(context, params), scoring.mean(params.normalizer).importance,
                              k=params.k, layers=layers, n_random=params.n_random,
                              seed=derived_seed(context.seed, "control"), n_scoring_prompts=len(scoring.problems),
                              normalizer=params.normalizer, agreement=agreement)


class PruningParams(CnaParams):
    keep_fraction: float = Field(0.1, gt=0, lt=1)  # of each CNA layer's neurons kept
    n_random: int = Field(20, ge=20)
    rank_by: Literal["importance", "abs_importance"] = "importance"


@register_check("arithmetic_cna_pruning", params=PruningParams, area="arithmetic")
def check_cna_pruning(context: AuditContext, params: PruningParams) -> PruningResult:
    """Keep only the top CNA neurons of each CNA layer (zero the rest) vs keeping as many random ones."""
    scoring = _scoring(context, params)
    keep = max(1, round(params.keep_fraction * context.model.adapter.intermediate_size))
    return prune_to_top(context.model, _accuracy(context, params), scoring.mean(params.normalizer).importance,
                        keep=keep, layers=params.layers(context), n_random=params.n_random,
                        seed=derived_seed(context.seed, "control"), rank_by=params.rank_by)


class CompareParams(CnaParams):
    """``condition``: what B changes. ``finetune``: the model after fine-tuning (``--compare-model``, else the
    seeded LoRA fine-tune shared with the super-weight audit, ``finetune_steps``/``finetune_seed``);
    ``prompts``: another slice of the scoring set (``ops_b``/``templates_b`` against ``ops_a``/``templates_a``).
    The head ablation is its own check, ``arithmetic_cna_head_ablation``."""

    condition: Literal["finetune", "prompts"]
    k: int = Field(20, ge=1)
    ops_a: str | None = None
    templates_a: list[str] | None = None
    ops_b: str | None = None
    templates_b: list[str] | None = None
    finetune_steps: int = 30  # the recipe of superweights_finetune_invariance, so its cached fine-tune is reused
    finetune_seed: int = 0

    @model_validator(mode="after")
    def _condition_needs(self) -> CompareParams:
        if self.condition == "prompts" and self.ops_b is None and self.templates_b is None:
            raise ValueError("condition prompts needs ops_b and/or templates_b (what B's prompts change)")
        return self


def _side(problems: tuple[ArithmeticProblem, ...], ops: str | None, templates: list[str] | None) -> list[bool]:
    return [(ops is None or p.op.symbol in ops) and (templates is None or p.template.value in templates)
            for p in problems]


@register_check("arithmetic_cna_compare", params=CompareParams, area="arithmetic")
def check_cna_compare(context: AuditContext, params: CompareParams) -> CnaComparison:
    """Comparative neuron analysis: every neuron's mean importance and coefficient under two conditions."""
    loaded = context.model
    scoring = _scoring(context, params)
    if params.condition == "prompts":
        a_keep = _side(scoring.problems, params.ops_a, params.templates_a)
        b_keep = _side(scoring.problems, params.ops_b, params.templates_b)
        labels = (f"ops {params.ops_a or params.ops}, {'/'.join(params.templates_a or params.templates)}",
                  f"ops {params.ops_b or params.ops}, {'/'.join(params.templates_b or params.templates)}")
        return compare_scores(scoring.mean(params.normalizer, a_keep), scoring.mean(params.normalizer, b_keep),
                              k=params.k, labels=labels, lens=(loaded.adapter, loaded.tokenizer),
                              n_prompts=min(sum(a_keep), sum(b_keep)), condition="prompts")
    tuned = context.compare_model() or context.finetuned(LoraRecipe(steps=params.finetune_steps,
                                                                    seed=params.finetune_seed))
    return compare_models(loaded, tuned, list(scoring.problems), layers=params.layers(context), k=params.k,
                          labels=("base", tuned.spec), scores_a=scoring.mean(params.normalizer),
                          normalizer=params.normalizer)


class HeadAblationParams(CnaParams):
    """Ablate the critical heads (``heads``, default: the head sweep's significant heads with ``sweep``'s
    parameters) and compare the answer neurons' importance against ``n_controls`` draws of control heads."""

    k: int = Field(20, ge=1)
    heads: list[str] | None = None  # e.g. ["L14.H1"]; default: the sweep's significant heads
    sweep: HeadSweepParams = HeadSweepParams()
    n_controls: int = Field(20, ge=20)

    @model_validator(mode="after")
    def _heads_parse(self) -> HeadAblationParams:
        if self.heads is not None:
            parse_heads(self.heads)
        return self


def parse_heads(names: list[str]) -> dict[int, list[int]]:
    """``["L14.H1", "L5.H1"]`` -> ``{14: [1], 5: [1]}``."""
    heads: dict[int, list[int]] = {}
    for name in names:
        match = re.fullmatch(r"L(\d+)\.H(\d+)", name.strip())
        if match is None:
            raise ValueError(f"head {name!r} is not of the form L<layer>.H<head>, e.g. L14.H1")
        heads.setdefault(int(match[1]), []).append(int(match[2]))
    return heads


@register_check("arithmetic_cna_head_ablation", params=HeadAblationParams, area="arithmetic")
def check_cna_head_ablation(context: AuditContext, params: HeadAblationParams) -> HeadAblationComparison:
    """CNA of the clean model vs the critical heads ablated, against ablating control heads."""
    adapter = context.model.adapter
    _, screen = _screen(context, params.sweep)
    if params.heads is None:
        names = _sweep(context, params.sweep).significant_heads
        if not names:
            raise PremiseMissing("the head sweep found no significantly critical head to ablate")
    else:
        names = params.heads
    heads = parse_heads(names)
    for layer, layer_heads in heads.items():
        adapter.layer(layer)
        if not all(0 <= h < adapter.heads.n_heads for h in layer_heads):
            raise ValueError(f"heads {layer_heads} of layer {layer}: the model has {adapter.heads.n_heads} heads")
    chosen = {(layer, h) for layer, hs in heads.items() for h in hs}
    # Controls: heads whose ablation broke no baseline-correct screening answer, so no operation's accuracy
    # dropped. Exact also for heads the bounded screen did not run on the baseline-wrong answers (those can only
    # be fixed, never broken).
    quiet = [(layer, h) for layer in screen.layers for h in range(adapter.heads.n_heads)
             if (layer, h) not in chosen and not any(screen.breaks[layer][h])]
    if len(quiet) < len(chosen):
        raise PremiseMissing(f"{len(quiet)} heads without an accuracy drop in the screen; {len(chosen)} needed as "
                             "controls")
    generator = torch.Generator().manual_seed(derived_seed(context.seed, "control"))
    controls = []
    for _ in range(params.n_controls):
        picked = [quiet[i] for i in torch.randperm(len(quiet), generator=generator)[:len(chosen)].tolist()]
        spec: dict[int, list[int]] = {}
        for layer, h in picked:
            spec.setdefault(layer, []).append(h)
        controls.append(spec)
    scoring = _scoring(context, params)
    return compare_head_ablated(context.model, list(scoring.problems), heads, controls,
                                layers=params.layers(context), k=params.k, base=scoring.mean(params.normalizer),
                                normalizer=params.normalizer)

