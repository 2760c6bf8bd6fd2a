"""Registered gender-bias checks: occupation bias scores, the published benchmarks, and neuron editing.

- ``occupation_bias``: :func:`lmaudit.checks.bias.scores.occupation_bias` (woman, man and total bias, correlation with
  the BLS share of women);
- ``bias_benchmarks``: :func:`lmaudit.checks.bias.benchmarks.run_bias_benchmarks` (Winogender, WinoBias, CrowS-Pairs
  via lm-eval over ``../shared/data``; the quick profile caps each task at ``quick_limit`` documents);
- ``bias_editing``: :func:`lmaudit.checks.bias.editing.edit_bias` (zero the top-k CNA neurons and k random ones; bias
  reduction and side effects).

The baseline bias scores are shared between ``occupation_bias`` and ``bias_editing`` through
:meth:`~lmaudit.checks.harness.context.AuditContext.memo`.
"""

from __future__ import annotations

from typing import Literal

from lmaudit.checks.bias.benchmarks import BENCHMARKS, BiasBenchmarks, run_bias_benchmarks
from lmaudit.checks.bias.editing import BiasEditResult, edit_bias
from lmaudit.checks.bias.occupations import QUICK_TEMPLATES, TEMPLATES, occupation_table
from lmaudit.checks.bias.scores import BiasScores, occupation_bias
from lmaudit.checks.harness.context import AuditContext
from lmaudit.checks.harness.registry import CheckParams, register_check

TemplateSet = Literal["all", "quick"]


def _templates(name: TemplateSet) -> tuple:
    return TEMPLATES if name == "all" else QUICK_TEMPLATES


def cached_bias_scores(context: AuditContext, templates: TemplateSet, source: str, batch_size: int
                       ) -> BiasScores:
    """Bias scores of the session's model, computed once per (templates, share source, batch size)."""
    model = context.model
    return context.artifact(BiasScores, (templates, source, batch_size), lambda: occupation_bias(
        model.model, model.tokenizer, templates=_templates(templates),
        occupations=occupation_table(source=source), batch_size=batch_size))


class OccupationBiasParams(CheckParams):
    templates: TemplateSet = "all"  # 8 gendered frames ("quick": the first 4)
    occupation_source: Literal["auto", "shared", "builtin"] = "auto"  # Winogender table or built-in
    batch_size: int = 32


@register_check(
    "occupation_bias", params=OccupationBiasParams, area="bias")
def occupation_bias_audit(context: AuditContext, params: OccupationBiasParams) -> BiasScores:
    """Occupation gender bias r = log P(o|female) − log P(o|male) vs the BLS share of women (CNA paper)."""
    return cached_bias_scores(context, params.templates, params.occupation_source, params.batch_size)


class BiasBenchmarksParams(CheckParams):
    benchmarks: tuple[Literal["winogender", "winobias", "crows_pairs"], ...] = BENCHMARKS
    limit: int | None = 150  # documents per task in the full profile (None = all: 240/792/262 per task)
    quick_limit: int = 100  # quick profile: 100 docs x 7 tasks; 260 s measured on a busy 2-core machine
    batch_size: int = 16


@register_check("bias_benchmarks", params=BiasBenchmarksParams, area="bias")
def bias_benchmarks_audit(context: AuditContext, params: BiasBenchmarksParams) -> BiasBenchmarks:
    """Winogender, WinoBias and CrowS-Pairs (gender) through lm-eval on the local copies in ../shared/data."""
    model = context.model
    return run_bias_benchmarks(model.model, model.tokenizer, benchmarks=params.benchmarks,
                               limit=params.quick_limit if context.quick else params.limit,
                               batch_size=params.batch_size)


class BiasEditingParams(CheckParams):
    k: int = 20  # neurons zeroed (and as many random ones for the control)
    templates: TemplateSet = "all"  # the bias is measured on these
    rank_templates: int = 1  # CNA ranking on the first template(s) only: CNA costs ~2 s per prompt and layer
    n_per_side: int = 4  # ranking occupations: the most stereotyped 4 female- and 4 male-dominated ones
    quick_n_per_side: int = 2
    n_layers: int = 3  # layers scored neuron by neuron, chosen by the layer screen
    quick_n_layers: int = 2
    layers: tuple[int, ...] | None = None  # explicit layers instead of the screen
    seq_len: int = 256
    n_windows: int = 8  # perplexity windows (8 x 256 tokens)
    quick_n_windows: int = 2
    n_arithmetic: int = 40  # one-digit additions, 3-shot
    occupation_source: Literal["auto", "shared", "builtin"] = "auto"
    batch_size: int = 32


@register_check(
    "bias_editing", params=BiasEditingParams, area="bias")
def bias_editing_audit(context: AuditContext, params: BiasEditingParams) -> BiasEditResult:
    """Zero the k CNA neurons behind the occupation bias (and k random ones): bias change and side effects."""
    model = context.model
    quick = context.quick
    return edit_bias(
        model.model, model.tokenizer, model.adapter, context.corpus(), k=params.k,
        templates=_templates(params.templates), rank_templates=params.rank_templates,
        n_per_side=params.quick_n_per_side if quick else params.n_per_side,
        n_layers=params.quick_n_layers if quick else params.n_layers, layers=params.layers,
        seq_len=params.seq_len, n_windows=params.quick_n_windows if quick else params.n_windows,
        n_arithmetic=params.n_arithmetic, seed=context.seed,
        baseline_scores=cached_bias_scores(context, params.templates, params.occupation_source,
                                           params.batch_size),
        occupations=occupation_table(source=params.occupation_source), batch_size=params.batch_size,
    )
