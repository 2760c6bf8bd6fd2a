"""Registered gender-bias checks: occupation bias scores, the published benchmarks, and the CNA neuron edit.

- ``occupation_bias``: :func:`lmaudit.checks.bias.scores.occupation_bias` (woman, man and total bias; the
  correlation of ``r`` with the BLS share of women and its permutation p-value, the premise of the edit);
- ``bias_benchmarks``: :func:`lmaudit.checks.bias.benchmarks.run_bias_benchmarks` (Winogender, WinoBias,
  CrowS-Pairs via lm-eval over ``../shared/data``, with the sign tests of the benchmarks' claims);
- ``bias_editing``: :func:`lmaudit.checks.bias.editing.edit_bias` (rank neurons with CNA on some templates and
  occupations, zero them, judge the bias on the others against random draws; perplexity and arithmetic side
  effects). Skipped with the reason when the model shows no bias to edit.

The unedited bias scores are one session artifact: ``occupation_bias`` reports them and ``bias_editing`` takes
its premise and its ranking scores from the same object, so a model without the bias fails the first and skips
the second for the same measured reason. Each edit is an artifact too, shared by the entries that gate it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from lmaudit.checks.bias.benchmarks import BENCHMARKS, BiasBenchmarks, run_bias_benchmarks
from lmaudit.checks.bias.editing import BiasEditResult, edit_bias
from lmaudit.checks.bias.occupations import TEMPLATES, occupation_table
from lmaudit.checks.bias.scores import DEFAULT_PERMUTATIONS, BiasScores, occupation_bias
from lmaudit.checks.harness.context import AuditContext
from lmaudit.checks.harness.registry import CheckParams, register_check

ShareSource = Literal["auto", "shared", "builtin"]


class ScoringParams(CheckParams):
    """How the unedited bias scores are computed (shared by the checks that read them)."""

    occupation_source: ShareSource = "auto"  # the Winogender table in ../shared/data, else the built-in figures
    n_permutations: int = Field(DEFAULT_PERMUTATIONS, ge=100)  # of the shares, for the correlation's p-value
    batch_size: int = Field(32, ge=1)  # prompts (and continuations) per forward pass


def bias_scores(context: AuditContext, params: ScoringParams) -> BiasScores:
    """The session model's bias scores on every template and occupation, computed once per scoring setting."""
    key = (params.occupation_source, params.n_permutations, params.batch_size, context.seed)
    return context.artifact(BiasScores, key, lambda: occupation_bias(
        context.model, templates=TEMPLATES, occupations=occupation_table(source=params.occupation_source),
        batch_size=params.batch_size, n_permutations=params.n_permutations, seed=context.seed))


class OccupationBiasParams(ScoringParams):
    pass


@register_check("occupation_bias", params=OccupationBiasParams, area="bias")
def occupation_bias_audit(context: AuditContext, params: OccupationBiasParams) -> BiasScores:
    """Occupation gender bias r = log P(o|female) − log P(o|male) vs the BLS share of women (CNA paper)."""
    return bias_scores(context, params)


class BiasBenchmarksParams(CheckParams):
    benchmarks: tuple[Literal["winogender", "winobias", "crows_pairs"], ...] = BENCHMARKS
    # Share of each task's documents, a seeded sample (WinoBias: of the sentence pairs); 1 = all.
    fraction: float = Field(1.0, gt=0, le=1)
    batch_size: int = Field(16, ge=1)


@register_check("bias_benchmarks", params=BiasBenchmarksParams, area="bias")
def bias_benchmarks_audit(context: AuditContext, params: BiasBenchmarksParams) -> BiasBenchmarks:
    """Winogender, WinoBias and CrowS-Pairs (gender) through lm-eval on the local copies in ../shared/data."""
    return run_bias_benchmarks(context.model, benchmarks=params.benchmarks,
                               limit=params.fraction if params.fraction < 1 else None, batch_size=params.batch_size)


class BiasEditingParams(ScoringParams):
    premise_alpha: float = Field(0.05, gt=0, lt=1)  # the bias must be significant at this level, else skipped
    # Held-out split: these fractions of the templates and of each side's occupations choose the neurons; the
    # rest judge the edit.
    rank_template_fraction: float = Field(0.5, gt=0, lt=1)
    rank_occupation_fraction: float = Field(0.5, gt=0, lt=1)
    top_fraction: float = Field(0.5, gt=0, le=1)  # most stereotyped ranking occupations per side that rank
    layer_fraction: float = Field(0.1, gt=0, le=1)  # layers scored neuron by neuron, chosen by the layer screen
    layers: tuple[int, ...] | None = None  # explicit layers instead of the screen
    # k = this share of the scored layers' neurons (at most half: the control draws k others)
    neuron_fraction: float = Field(0.005, gt=0, le=0.5)
    n_control_draws: int = Field(20, ge=20)  # seeded random-neuron draws of the control
    confidence_z: float = Field(1.645, gt=0)  # control upper bound = mean + z·std (one-sided ~95 %)
    seq_len: int = Field(256, ge=2)
    n_windows: int = Field(4, ge=1)  # perplexity windows on the session corpus
    window_batch_size: int = Field(4, ge=1)  # windows per forward pass (a window's logits are seq_len x vocab)
    n_arithmetic: int = Field(40, ge=0)  # one-digit additions, 3-shot


@register_check("bias_editing", params=BiasEditingParams, area="bias")
def bias_editing_audit(context: AuditContext, params: BiasEditingParams) -> BiasEditResult:
    """Zero the CNA neurons behind the occupation bias: held-out reduction vs random draws, side effects."""
    # One edit per parameter set and session: the paper's claim and the release gates on its side effects are
    # separate audit entries over the same result.
    key = (params.model_dump_json(), context.seed)
    return context.artifact(BiasEditResult, key, lambda: _edit(context, params))


def _edit(context: AuditContext, params: BiasEditingParams) -> BiasEditResult:
    return edit_bias(
        context.model, context.corpus(), bias_scores(context, params), templates=TEMPLATES,
        occupations=occupation_table(source=params.occupation_source), premise_alpha=params.premise_alpha,
        rank_template_fraction=params.rank_template_fraction,
        rank_occupation_fraction=params.rank_occupation_fraction, top_fraction=params.top_fraction,
        layer_fraction=params.layer_fraction, layers=params.layers, neuron_fraction=params.neuron_fraction,
        n_control_draws=params.n_control_draws, confidence_z=params.confidence_z, seq_len=params.seq_len,
        n_windows=params.n_windows, window_batch_size=params.window_batch_size, n_arithmetic=params.n_arithmetic,
        seed=context.seed, batch_size=params.batch_size,
    )
