"""Registered arithmetic checks (Yu & Ananiadou 2024): baseline accuracy, head sweep, CNA intervention, pruning.

Every check draws its problems with :func:`checks.arithmetic_data.generate_problems` from typed parameters
(default: 1-digit ``+ - * /``, symbolic and words templates, 4 shared few-shot examples — where the 135M default model has
non-trivial accuracy). The quick profile uses a quarter of the prompts. Results are plain data for the report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from checks.arithmetic_data import ArithmeticProblem, generate_problems
from checks.arithmetic_eval import ArithmeticAccuracy, arithmetic_accuracy
from checks.cna import InterventionCheck, PruningResult, intervention_check, prune_to_top
from checks.head_sweep import DEFAULT_THRESHOLD_POINTS, HeadSweepResult, head_sweep
from checks.registry import CheckParams, register_check

if TYPE_CHECKING:
    from checks.context import AuditContext


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


@register_check("arithmetic_accuracy", params=ProblemParams, area="arithmetic",
                metrics=("accuracy", "accuracy_add", "accuracy_sub", "accuracy_mul", "accuracy_div",
                         "min_op_accuracy"))
def check_accuracy(context: AuditContext, params: ProblemParams) -> ArithmeticAccuracy:
    """Greedy exact-match accuracy per operation and digit count."""
    loaded = context.model
    return arithmetic_accuracy(loaded.model, loaded.tokenizer, params.problems(context))


class HeadSweepParams(ProblemParams):
    threshold_points: float = DEFAULT_THRESHOLD_POINTS
    layers: list[int] | None = None
    pinned_critical: list[str] | None = None  # e.g. ["L14.H3"]; metric critical_matches_pinned


@dataclass(frozen=True)
class HeadSweepAudit:
    """The sweep plus the comparison with a pinned critical set."""

    sweep: HeadSweepResult
    pinned_critical: tuple[str, ...] | None

    def metrics(self) -> dict[str, Any]:
        out = self.sweep.metrics()
        if self.pinned_critical is not None:
            out["critical_matches_pinned"] = sorted(self.pinned_critical) == sorted(out["critical_heads"])
        return out


def _sweep(context: AuditContext, params: HeadSweepParams) -> HeadSweepResult:
    loaded = context.model
    key = ("arithmetic_head_sweep", params.model_dump_json(exclude={"pinned_critical"}), context.quick)
    return context.memo(key, lambda: head_sweep(loaded.model, loaded.tokenizer, params.problems(context),
                                                layers=params.layers, threshold_points=params.threshold_points))


@register_check("arithmetic_head_sweep", params=HeadSweepParams, area="arithmetic",
                metrics=("n_critical", "critical_heads", "max_drop_points", "baseline_accuracy", "seconds",
                         "critical_matches_pinned"))
def check_head_sweep(context: AuditContext, params: HeadSweepParams) -> HeadSweepAudit:
    """Ablate every attention head; accuracy drop per operation and the critical heads (drop ≥ threshold)."""
    pinned = None if params.pinned_critical is None else tuple(params.pinned_critical)
    return HeadSweepAudit(_sweep(context, params), pinned)


class InterventionParams(ProblemParams):
    k: int = 10
    layers: list[int] = [24, 25, 26, 27, 28, 29]  # CNA's answer neurons sit in the last layers (the paper's finding)
    n_score: int = 4  # prompts per operation whose mean importance ranks the neurons (each costs a CNA pass)
    n_random: int = 3


@register_check("arithmetic_cna_intervention", params=InterventionParams, area="arithmetic",
                metrics=("baseline_accuracy", "top_zeroed_accuracy", "random_zeroed_accuracy", "top_drop_points",
                         "random_drop_points", "drop_gap_points"))
def check_cna_intervention(context: AuditContext, params: InterventionParams) -> InterventionCheck:
    """Zeroing the top-k CNA neurons vs k random neurons of the same layers (the paper's control)."""
    loaded = context.model
    problems = params.problems(context)
    score = params.draw(params.n_score, 1000 + context.seed)
    return intervention_check(loaded.model, loaded.tokenizer, problems, k=params.k, layers=params.layers,
                              score_problems=score, n_random=params.n_random, seed=context.seed)


class PruningParams(InterventionParams):
    keep: int = 256


@register_check("arithmetic_cna_pruning", params=PruningParams, area="arithmetic",
                metrics=("baseline_accuracy", "pruned_accuracy", "random_pruned_accuracy", "pruned_drop_points",
                         "kept_fraction"))
def check_cna_pruning(context: AuditContext, params: PruningParams) -> PruningResult:
    """Keep only the top-N CNA neurons of the chosen layers, zero the rest, and measure accuracy."""
    loaded = context.model
    score = params.draw(params.n_score, 1000 + context.seed)
    return prune_to_top(loaded.model, loaded.tokenizer, params.problems(context), keep=params.keep,
                        layers=params.layers, score_problems=score, seed=context.seed)
