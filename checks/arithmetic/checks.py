"""Registered arithmetic checks (Yu & Ananiadou 2024): baseline accuracy, head sweep, CNA intervention, pruning
and comparison (the CNA checks share one session cache of per-prompt neuron scores and clean states).

Every check draws its problems with :func:`lmaudit.checks.core.arithmetic_problems.generate_problems` from typed parameters
(default: 1-digit ``+ - * /``, symbolic and words templates, 4 shared few-shot examples — where the 135M default model has
non-trivial accuracy). The quick profile uses a quarter of the prompts. Results are plain data for the report.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import model_validator

from lmaudit.checks.arithmetic.cna import (
    CnaComparison,
    InterventionCheck,
    ProblemAccuracy,
    PruningResult,
    answer_prompts,
    average,
    compare_head_ablated,
    compare_models,
    compare_scores,
    intervention_check,
    prune_to_top,
)
from lmaudit.checks.arithmetic.head_sweep import (
    DEFAULT_THRESHOLD_POINTS,
    HeadSweepResult,
    TopHead,
    head_sweep,
)
from lmaudit.checks.core.accuracy import ArithmeticAccuracy, arithmetic_accuracy
from lmaudit.checks.core.arithmetic_problems import ArithmeticProblem, generate_problems
from lmaudit.checks.core.neuron_scores import NeuronScores, batched_neuron_scores
from lmaudit.checks.core.results import CheckResult, metric_group
from lmaudit.checks.harness.registry import CheckParams, register_check

if TYPE_CHECKING:
    from lmaudit.checks.harness.context import AuditContext


class ProblemParams(CheckParams):
    ops: str = "+-*/"
    # The 135M default model scores 0% on 2-digit problems (measured), and 1-digit "-" has only 55 problems: so
    # 64 prompts per operation come from 1-digit problems in two templates.
    digits: list[int] = [1]
    templates: list[str] = ["symbolic", "words"]
    n_per_op: int = 8  # per operation, digit count and template (64 prompts: the full sweep stays minutes)
    few_shot: int = 4  # a 135M model needs examples: zero-shot accuracy is ~5%
    seed: int | None = None  # default: the session seed

    def problems(self, context: AuditContext) -> list[ArithmeticProblem]:
        return self.draw(max(4, self.n_per_op // 4) if context.quick else self.n_per_op,
                         context.seed if self.seed is None else self.seed)

    def draw(self, n_per_op: int, seed: int) -> list[ArithmeticProblem]:
        return arithmetic_prompts(ops=self.ops, digits=self.digits, templates=self.templates, n_per_op=n_per_op,
                                  few_shot=self.few_shot, seed=seed)


def arithmetic_prompts(*, ops: str, digits: list[int], templates: list[str], n_per_op: int, few_shot: int,
                       seed: int) -> list[ArithmeticProblem]:
    """Problems for every (digits, template), each group sharing its few-shot prefix per operation."""
    return [p for d in digits for template in templates for p in generate_problems(
        ops=ops, digits=d, n_per_op=n_per_op, template=template, few_shot=few_shot, seed=seed, shared_shots=True)]


@register_check("arithmetic_accuracy", params=ProblemParams, area="arithmetic")
def check_accuracy(context: AuditContext, params: ProblemParams) -> ArithmeticAccuracy:
    """Greedy exact-match accuracy per operation and digit count."""
    loaded = context.model
    return arithmetic_accuracy(loaded.model, loaded.tokenizer, params.problems(context))


class HeadSweepParams(ProblemParams):
    threshold_points: float = DEFAULT_THRESHOLD_POINTS
    layers: list[int] | None = None
    pinned_critical: list[str] | None = None  # e.g. ["L14.H3"]; metric critical_matches_pinned


@dataclass(frozen=True)
class HeadSweepAudit(CheckResult):
    """The sweep plus the comparison with a pinned critical set."""

    sweep: HeadSweepResult
    pinned_critical: tuple[str, ...] | None
    top_heads: tuple[TopHead, ...] = ()

    @metric_group(*("n_critical", "critical_heads", "n_significant_critical", "significant_critical_heads",
                         "max_drop_points", "baseline_accuracy", "seconds", "critical_matches_pinned"))
    def _metrics(self) -> dict[str, Any]:
        out = self.sweep.metrics()
        out["critical_matches_pinned"] = (None if self.pinned_critical is None
                                          else sorted(self.pinned_critical) == sorted(out["critical_heads"]))
        return out


def _sweep(context: AuditContext, params: HeadSweepParams) -> HeadSweepResult:
    loaded = context.model
    key = ("arithmetic_head_sweep", params.model_dump_json(exclude={"pinned_critical"}), context.quick)
    return context.artifact(HeadSweepResult, key, lambda: head_sweep(loaded.model, loaded.tokenizer, params.problems(context),
                                                layers=params.layers, threshold_points=params.threshold_points))


@register_check("arithmetic_head_sweep", params=HeadSweepParams, area="arithmetic")
def check_head_sweep(context: AuditContext, params: HeadSweepParams) -> HeadSweepAudit:
    """Ablate every attention head; accuracy drop per operation and the critical heads (drop ≥ threshold)."""
    pinned = None if params.pinned_critical is None else tuple(params.pinned_critical)
    sweep = _sweep(context, params)
    return HeadSweepAudit(sweep, pinned, sweep.top_head_rows(10))


class InterventionParams(ProblemParams):
    # 32 problems per operation and template (256 prompts; quick: 64): one problem is 0.39 accuracy points, so
    # a gate of a few points is many problems, not one or two (64 prompts made one problem 1.6 points).
    n_per_op: int = 32
    # Top-k zeroed. Measured on the default model (256 prompts, 5 random draws): k=10 drops 2.3 points (random
    # 0.2), k=20 7.4 (random 0.2), k=50 9.0, k=100 11.3; k=10 is too close to noise for a gate.
    k: int = 20
    layers: list[int] = [24, 25, 26, 27, 28, 29]  # CNA's answer neurons sit in the last layers (the paper's finding)
    n_score: int = 4  # prompts per operation and template whose mean importance ranks the neurons (32 prompts)
    n_random: int = 5  # random-neuron control draws (each one pass over layers >= min(layers))


_EVAL_FIELDS = {"ops", "digits", "templates", "n_per_op", "few_shot", "seed"}


def _score_problems(context: AuditContext, params: InterventionParams | CompareParams) -> list[ArithmeticProblem]:
    """The problems whose mean CNA importance ranks the neurons: drawn with seed ``1000 + session seed``."""
    return params.draw(params.n_score, 1000 + context.seed)


def _cna_prompt_scores(context: AuditContext, problems: list[ArithmeticProblem],
                       layers: list[int]) -> list[NeuronScores]:
    """Per-problem CNA scores of the audited model, cached for the session by (layers, prompt, answer): the
    intervention, pruning and comparison checks share them, and a check scores (in one batch) only the problems
    not seen yet. E.g. the symbolic-vs-words comparison splits the intervention's scoring set: no new pass."""
    loaded = context.model
    cache: dict = context.artifact(dict, ("cna_prompt_scores", tuple(sorted(set(layers)))), dict)
    keys = list(zip(*answer_prompts(problems), strict=True))
    missing = list(dict.fromkeys(key for key in keys if key not in cache))
    if missing:
        prompts, targets = zip(*missing, strict=True)
        cache.update(zip(missing, batched_neuron_scores(loaded.model, loaded.tokenizer, list(prompts), list(targets),
                                                        layers=layers, adapter=loaded.adapter), strict=True))
    return [cache[key] for key in keys]


def _cna_scores(context: AuditContext, params: InterventionParams | CompareParams) -> NeuronScores:
    """Mean CNA scores of the audited model over the scoring problems (shared between checks)."""
    return average(_cna_prompt_scores(context, _score_problems(context, params), params.layers))


def _cna_accuracy(context: AuditContext, params: InterventionParams) -> ProblemAccuracy:
    """The evaluated problems with their clean states below ``min(layers)`` (shared between checks)."""
    loaded = context.model
    start = min(params.layers)
    key = ("cna_accuracy", params.model_dump_json(include=_EVAL_FIELDS), context.quick, context.seed, start)
    return context.artifact(ProblemAccuracy, key,
                            lambda: ProblemAccuracy(loaded.model, loaded.tokenizer, params.problems(context), start))


@register_check("arithmetic_cna_intervention", params=InterventionParams, area="arithmetic")
def check_cna_intervention(context: AuditContext, params: InterventionParams) -> InterventionCheck:
    """Zeroing the top-k CNA neurons vs k random neurons of the same layers (the paper's control)."""
    loaded = context.model
    return intervention_check(loaded.model, loaded.tokenizer, params.problems(context), k=params.k,
                              layers=params.layers, score_problems=_score_problems(context, params),
                              n_random=params.n_random, seed=context.seed,
                              importance=_cna_scores(context, params).importance,
                              accuracy=_cna_accuracy(context, params))


class PruningParams(InterventionParams):
    keep: int = 128
    n_random: int = 3
    rank_by: Literal["importance", "abs_importance"] = "importance"


@register_check("arithmetic_cna_pruning", params=PruningParams, area="arithmetic")
def check_cna_pruning(context: AuditContext, params: PruningParams) -> PruningResult:
    """Keep only the top-N CNA neurons of each chosen layer (zero the rest) vs keeping N random ones."""
    loaded = context.model
    return prune_to_top(loaded.model, loaded.tokenizer, params.problems(context), keep=params.keep,
                        layers=params.layers, score_problems=_score_problems(context, params), seed=context.seed,
                        n_random=params.n_random, importance=_cna_scores(context, params).importance,
                        accuracy=_cna_accuracy(context, params), rank_by=params.rank_by)


class CompareParams(ProblemParams):
    """``condition``: what B changes. ``finetune``: the model after fine-tuning (``--compare-model``, else the
    super-weight audit's seeded LoRA fine-tune, :func:`lmaudit.checks.core.finetune.lora_finetune`, read from its cache);
    ``head_ablated``: ``heads`` ablated; ``prompts``: other operations (``ops_b``) and/or templates
    (``templates_b``) for the same operands (the problems depend only on the seed and the operation)."""

    condition: Literal["finetune", "head_ablated", "prompts"]
    k: int = 20  # top neurons compared per condition
    layers: list[int] = [24, 25, 26, 27, 28, 29]
    n_score: int = 4  # prompts per operation and template averaged per condition (the intervention's set)
    heads: list[str] = []  # head_ablated: e.g. ["L14.H1"]
    ops_b: str | None = None  # prompts: B's operations (default A's)
    templates_b: list[str] | None = None  # prompts: B's templates (default A's)
    finetune_steps: int = 30  # the LoRA recipe of superweights_finetune_invariance, so its cached fine-tune is reused
    finetune_seed: int = 0

    @model_validator(mode="after")
    def _condition_needs(self) -> CompareParams:
        if self.condition == "head_ablated":
            if not self.heads:
                raise ValueError("condition head_ablated needs heads, e.g. heads: [L14.H1]")
            parse_heads(self.heads)
        if self.condition == "prompts" and self.ops_b is None and self.templates_b is None:
            raise ValueError("condition prompts needs ops_b and/or templates_b (what B's prompts change)")
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


@register_check("arithmetic_cna_compare", params=CompareParams, area="arithmetic")
def check_cna_compare(context: AuditContext, params: CompareParams) -> CnaComparison:
    """Comparative neuron analysis: each neuron's mean importance and coefficient under two conditions."""
    loaded = context.model
    if params.condition == "prompts":  # same seed: the same operands in B's operations/templates where they overlap
        other = arithmetic_prompts(ops=params.ops_b or params.ops, digits=params.digits,
                                   templates=params.templates_b or params.templates, n_per_op=params.n_score,
                                   few_shot=params.few_shot, seed=1000 + context.seed)
        labels = (f"ops {params.ops}, {'/'.join(params.templates)}",
                  f"ops {params.ops_b or params.ops}, {'/'.join(params.templates_b or params.templates)}")
        a = _cna_prompt_scores(context, _score_problems(context, params), params.layers)
        b = _cna_prompt_scores(context, other, params.layers)
        return compare_scores(average(a), average(b), k=params.k, labels=labels,
                              lens=(loaded.adapter, loaded.tokenizer), n_prompts=min(len(a), len(b)),
                              condition="prompts")
    base = _cna_scores(context, params)
    prompts, targets = answer_prompts(_score_problems(context, params))
    if params.condition == "finetune":
        tuned = context.compare_model()
        if tuned is None:
            from lmaudit.checks.core.finetune import LoraRecipe

            tuned = context.finetuned(LoraRecipe(steps=params.finetune_steps, seed=params.finetune_seed))
        return compare_models(loaded.model, tuned.model, loaded.tokenizer, prompts, targets, k=params.k,
                              layers=params.layers, labels=("base", tuned.spec), lens=True, scores_a=base,
                              condition="finetune")
    heads = parse_heads(params.heads)
    for layer, layer_heads in heads.items():
        for head in layer_heads:
            loaded.adapter.layer(layer)
            if not 0 <= head < loaded.adapter.heads.n_heads:
                raise ValueError(f"head L{layer}.H{head}: the model has {loaded.adapter.heads.n_heads} heads")
    return compare_head_ablated(loaded.model, loaded.tokenizer, prompts, targets, heads, k=params.k,
                                layers=params.layers, lens=True, original=base)
