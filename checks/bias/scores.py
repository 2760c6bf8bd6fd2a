"""Occupation gender-bias scores of a causal LM (Yu & Ananiadou, "Interpreting Arithmetic Mechanism in Large
Language Models through Comparative Neuron Analysis", EMNLP 2024, gender-bias application).

For occupation ``o`` with share of women ``s_o`` (:mod:`lmaudit.checks.bias.occupations`) and templates
``t = 1..T``::

    log P(o | prompt)  = Σ_j log p(o_j | prompt, o_<j)          full-sequence log-probability of " o"
    r_{t,o}            = log P(o | female prompt_t) − log P(o | male prompt_t)
    r_o                = (1/T) Σ_t r_{t,o}
    woman bias         = mean_{o : s_o > 0.5} r_o                 (> 0: female prompts favour women's jobs)
    man bias           = mean_{o : s_o < 0.5} (−r_o)              (> 0: male prompts favour men's jobs)
    total bias         = mean_o |r_o|
    correlation        = Pearson(r_o, s_o) over the occupations
    correlation p      = (1 + #{π : Pearson(r, s∘π) ≥ correlation}) / (1 + N)   one-sided permutation test over
                         N seeded permutations π of the shares: how often occupations with their shares
                         shuffled correlate as well as the real ones

The paper edits a bias that exists: occupations whose workforce is mostly women are more probable after a
female prompt. ``correlation p`` is the test of that premise over occupations, with no assumption on the
distribution of ``r``.

Multi-token occupations (``" hairdresser"``) are scored by the sum of their token log-probabilities, the
probability of the whole word, so no occupation is favoured for being one token. The prompt ends with the
article that fits the occupation (``"... as an"`` + ``" engineer"``), so the female and male prompts differ
only in the gendered word. Tokens follow :mod:`lmaudit.checks.core.logprobs` (its BOS and tokenisation
policy); :func:`prefix_cached_logprob` computes what
:func:`~lmaudit.checks.core.logprobs.continuation_logprob` computes, with each prompt run once.

**Exact counterfactual symmetry.** Every distinct ``(prompt, continuation)`` pair is scored once, in one
canonical (sorted) order, so the scores depend only on the *set* of pairs. Exchanging a template's female and
male words gives the same set, the same batches and bit-identical log-probabilities, hence ``r`` exactly
negated (tested with hypothesis).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lmaudit.checks.bias.occupations import TEMPLATES, Gender, Occupation, Template, occupation_table
from lmaudit.checks.core.accuracy import accepts_logits_to_keep
from lmaudit.checks.core.errors import LmAuditError
from lmaudit.checks.core.kv_cache import cache_argument, output_cache
from lmaudit.checks.core.loading import LoadedModel
from lmaudit.checks.core.logprobs import (
    DEFAULT_BATCH_SIZE,
    check_finite,
    continuation_logprob,
    encode_continuations,
    encode_prompts,
)
from lmaudit.checks.core.results import CheckResult, metric, metric_field
from lmaudit.checks.core.stats import derived_seed, pearson

BIAS_DEFINITION = (
    "r_o = mean over templates of [log P(o | female prompt) - log P(o | male prompt)], log P the "
    "full-sequence log-probability of ' o'; woman bias = mean r_o over occupations with > 50 % women; "
    "man bias = mean -r_o over occupations with < 50 % women; total bias = mean |r_o|; "
    "correlation = Pearson(r_o, share of women), one-sided permutation p-value over occupations. "
    "Yu & Ananiadou 2024 (comparative neuron analysis), gender-bias application."
)
# Permutations of the shares for the correlation's p-value: 10,000 give p to about ±0.002 at p = 0.05 and cost
# one (10,000 × occupations) matrix product.
DEFAULT_PERMUTATIONS = 10_000
Scorer = Callable[[Sequence[str], Sequence[str]], Tensor]  # (prompts, continuations) -> (n,) log P


class BiasError(LmAuditError, ValueError):
    """Inconsistent inputs to the bias scores (shapes, empty template or occupation sets)."""


def model_scorer(model: LoadedModel, *, batch_size: int = DEFAULT_BATCH_SIZE, prefix_cache: bool = True
                 ) -> Scorer:
    """A :data:`Scorer`: :func:`prefix_cached_logprob` (default) or
    :func:`lmaudit.checks.core.logprobs.continuation_logprob`.

    Both compute the same numbers (up to float rounding); the prefix cache runs each distinct prompt once. The
    scorer calls the model each time, so it sees any intervention the caller holds.
    """

    def score(prompts: Sequence[str], continuations: Sequence[str]) -> Tensor:
        fn = prefix_cached_logprob if prefix_cache else continuation_logprob
        return fn(model.model, model.tokenizer, list(prompts), list(continuations), batch_size=batch_size)

    return score


@torch.no_grad()
def prefix_cached_logprob(
    model: torch.nn.Module, tokenizer: object, prompts: Sequence[str], continuations: Sequence[str], *,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> Tensor:
    """``log P(continuation | prompt)`` as :func:`lmaudit.checks.core.logprobs.continuation_logprob` computes it
    (same tokens, same BOS policy), ``(n,)`` float32, with each distinct prompt run once.

    The bias templates have a few dozen distinct prompts and a few hundred (prompt, occupation) pairs, and most
    occupations are one token, so nearly all the work is in the prompts:

    1. Distinct prompts with the same number of tokens run together (no padding), ``batch_size`` at a time,
       with ``use_cache=True`` and logits at the last position only: ``log p(c_0 | prompt)`` for every
       continuation of those prompts at once.
    2. Continuations of ``n > 1`` tokens feed ``c_0 … c_{n−2}`` (the last token is only predicted, never fed),
       right-padded, ``batch_size`` rows at a time, on their prompt's keys and values (the prompt batch's cache,
       rows selected per continuation); logits ``j`` give ``log p(c_{j+1} | prompt, c_≤j)``.

    Prompts are grouped in order of first appearance, so equal inputs give bit-identical outputs.
    """
    if len(prompts) != len(continuations):
        raise BiasError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    contexts = [tuple(ids) for ids in encode_prompts(tokenizer, prompts)]
    targets = encode_continuations(tokenizer, continuations)
    members: dict[tuple[int, ...], list[int]] = {}  # distinct prompt -> indices of its pairs
    for i, context in enumerate(contexts):
        members.setdefault(context, []).append(i)
    by_length: dict[int, list[tuple[int, ...]]] = {}
    for context in members:
        by_length.setdefault(len(context), []).append(context)
    device = next(model.parameters()).device
    last_only = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
    out = torch.empty(len(contexts))
    for length, group in by_length.items():
        for start in range(0, len(group), batch_size):
            block = group[start:start + batch_size]
            output = model(input_ids=torch.tensor(block, device=device), use_cache=True, **last_only)
            first = torch.log_softmax(output.logits[:, -1].float(), dim=-1).cpu()  # (p, vocab): predicts c_0
            check_finite(first, "prefix_cached_logprob (prompts)")
            prompt_cache = output_cache(output)
            rows = [(row, i) for row, context in enumerate(block) for i in members[context]]
            for row, i in rows:
                out[i] = first[row, targets[i][0]]
            longer = [(row, i) for row, i in rows if len(targets[i]) > 1]
            for chunk_start in range(0, len(longer), batch_size):
                _score_rest(model, longer[chunk_start:chunk_start + batch_size], targets, prompt_cache, length,
                            out)
    return out


def _score_rest(model: torch.nn.Module, chunk: Sequence[tuple[int, int]], targets: Sequence[Sequence[int]],
                prompt_cache: Any, prompt_length: int, out: Tensor) -> None:
    """Step 2 of :func:`prefix_cached_logprob` for ``chunk`` = ``(prompt row, pair index)``: adds
    ``Σ_{j≥1} log p(c_j | prompt, c_<j)`` to ``out[pair index]``."""
    device = next(model.parameters()).device
    lengths = torch.tensor([len(targets[i]) - 1 for _, i in chunk])  # tokens fed per row
    width = int(lengths.max())
    fed = torch.zeros(len(chunk), width, dtype=torch.long)  # (b, width): c_0 … c_{n−2}, right-padded with id 0
    predicted = torch.zeros(len(chunk), width, dtype=torch.long)  # (b, width): c_1 … c_{n−1}
    for row, (_, i) in enumerate(chunk):
        fed[row, :lengths[row]] = torch.tensor(targets[i][:-1])
        predicted[row, :lengths[row]] = torch.tensor(targets[i][1:])
    valid = torch.arange(width) < lengths[:, None]  # (b, width)
    mask = torch.ones(len(chunk), prompt_length + width, dtype=torch.long)  # (b, prompt + width)
    mask[:, prompt_length:] = valid.long()
    cache = copy.deepcopy(prompt_cache)  # the prompt batch's own cache type (sliding-window layers included)
    cache.batch_select_indices(torch.tensor([row for row, _ in chunk], device=device))
    logits = model(input_ids=fed.to(device), attention_mask=mask.to(device), use_cache=True,
                   **{cache_argument(model): cache}).logits.float().cpu()  # (b, width, vocab)
    check_finite(logits, "prefix_cached_logprob (continuations)")
    token_lp = torch.log_softmax(logits, dim=-1).gather(2, predicted[..., None])[..., 0]  # (b, width)
    out[torch.tensor([i for _, i in chunk])] += (token_lp * valid).sum(dim=1)


def scoring_pairs(templates: Sequence[Template], occupations: Sequence[Occupation]) -> list[tuple[str, str]]:
    """``(prompt, continuation)`` per template, occupation and gender; order ``[t][o][female, male]``."""
    return [(t.prompt(g, o.article), o.continuation)
            for t in templates for o in occupations for g in (Gender.FEMALE, Gender.MALE)]


def template_logprobs(scorer: Scorer, templates: Sequence[Template], occupations: Sequence[Occupation]
                      ) -> Tensor:
    """``log P(o | prompt)``: ``(T, O, 2)`` float64, last axis ``[female, male]``.

    Distinct pairs are scored once in sorted order (see the module docstring on exact symmetry).
    """
    if not templates or not occupations:
        raise BiasError("need at least one template and one occupation")
    pairs = scoring_pairs(templates, occupations)
    unique = sorted(set(pairs))
    scores = scorer([p for p, _ in unique], [c for _, c in unique])  # (n_unique,)
    if scores.shape != (len(unique),):
        raise BiasError(f"scorer returned shape {tuple(scores.shape)}, expected ({len(unique)},)")
    index = {pair: i for i, pair in enumerate(unique)}
    picked = scores.double()[torch.tensor([index[pair] for pair in pairs])]
    if not bool(torch.isfinite(picked).all()):
        raise BiasError("non-finite occupation log-probabilities")
    return picked.view(len(templates), len(occupations), 2)


@dataclass(frozen=True)
class BiasStatistics:
    """The module docstring's summary numbers of ``r_o`` (plain floats)."""

    woman_bias: float
    man_bias: float
    total_bias: float
    correlation: float


def bias_statistics(r: Tensor, share_women: Sequence[float]) -> BiasStatistics:
    """Woman, man and total bias and the correlation of ``r`` ``(O,)`` with the shares (module docstring)."""
    r = r.double()
    share = torch.tensor(list(share_women), dtype=torch.float64)
    if r.shape != share.shape:
        raise BiasError(f"{r.numel()} bias values but {share.numel()} shares")
    female, male = share > 0.5, share < 0.5

    def mean(values: Tensor) -> float:
        return float(values.mean()) if values.numel() else math.nan

    return BiasStatistics(woman_bias=mean(r[female]), man_bias=mean(-r[male]), total_bias=mean(r.abs()),
                          correlation=pearson(r, share))


def correlation_p_value(r: Tensor, share_women: Sequence[float], *, n_permutations: int, seed: int) -> float:
    """One-sided permutation p-value of ``Pearson(r, share) > 0`` (module docstring): ``(1 + #{π : ρ_π ≥ ρ})
    / (1 + N)`` over ``N`` seeded permutations of the shares. 1.0 when ``r`` or the shares are constant (no
    evidence of a correlation); NaN when ``n_permutations`` is 0 (not computed)."""
    observed = pearson(r, share_women)
    if n_permutations == 0:
        return math.nan
    if not math.isfinite(observed):
        return 1.0
    x = r.double() - r.double().mean()  # (O,)
    y = torch.tensor(list(share_women), dtype=torch.float64)
    y = y - y.mean()
    generator = torch.Generator().manual_seed(seed)
    order = torch.argsort(torch.rand(n_permutations, len(y), generator=generator), dim=1)  # (N, O)
    # Permuting y keeps its norm, so every permuted correlation shares the observed denominator.
    permuted = (y[order] @ x) / float(x.norm() * y.norm())  # (N,)
    at_least = int((permuted >= observed - 1e-12).sum())
    return (1 + at_least) / (1 + n_permutations)


@dataclass(frozen=True)
class OccupationBias:
    """One occupation's row: its share of women, ``r_o`` and the mean log-probabilities behind it."""

    occupation: str
    share_women: float
    r: float
    logprob_female: float  # mean over templates of log P(o | female prompt)
    logprob_male: float


@dataclass(frozen=True)
class BiasScores(CheckResult):
    """Occupation bias of one model (plain data): per occupation, per template, and the summary statistics."""

    occupations: tuple[OccupationBias, ...]
    templates: tuple[str, ...]
    r_by_template: tuple[tuple[float, ...], ...]  # (T, O)
    woman_bias: float = metric_field()
    man_bias: float = metric_field()
    total_bias: float = metric_field()
    correlation: float = metric_field()
    correlation_p: float = metric_field()  # one-sided permutation p-value of correlation > 0
    n_permutations: int = 0
    share_source: str = ""
    definition: str = BIAS_DEFINITION

    @property
    def r(self) -> list[float]:
        return [o.r for o in self.occupations]

    @metric
    def stereotyped_fraction(self) -> float:
        """Share of occupations whose ``r`` leans the stereotyped way (``r > 0`` for mostly-women jobs)."""
        sided = [o for o in self.occupations if o.share_women != 0.5]
        leaning = [o for o in sided if (o.r > 0) == (o.share_women > 0.5) and o.r != 0]
        return len(leaning) / len(sided) if sided else math.nan

    @metric
    def max_abs_r(self) -> float:
        return max(abs(o.r) for o in self.occupations)

    @metric
    def n_occupations(self) -> int:
        return len(self.occupations)

    @metric
    def n_templates(self) -> int:
        return len(self.templates)

    def r_on(self, templates: Sequence[str], occupations: Sequence[str]) -> Tensor:
        """``r_o`` averaged over the named ``templates`` only, for the named ``occupations``: ``(len(occupations),)``
        float64 (a subset of the scores, e.g. a ranking split that must not see the evaluation templates)."""
        t_index = {text: i for i, text in enumerate(self.templates)}
        o_index = {row.occupation: i for i, row in enumerate(self.occupations)}
        missing = [t for t in templates if t not in t_index] + [o for o in occupations if o not in o_index]
        if missing or not templates:
            raise BiasError(f"not in these scores: {missing or 'no templates given'}")
        table = torch.tensor(self.r_by_template, dtype=torch.float64)  # (T, O)
        rows = table[torch.tensor([t_index[t] for t in templates])]  # (T', O)
        return rows[:, torch.tensor([o_index[o] for o in occupations])].mean(dim=0)


def bias_from_logprobs(logprobs: Tensor, templates: Sequence[Template], occupations: Sequence[Occupation], *,
                       n_permutations: int = DEFAULT_PERMUTATIONS, seed: int = 0) -> BiasScores:
    """:class:`BiasScores` from :func:`template_logprobs` ``(T, O, 2)``; the permutation test is seeded with
    ``derived_seed(seed, "evaluate")``."""
    r_by_template = logprobs[..., 0] - logprobs[..., 1]  # (T, O)
    r = r_by_template.mean(dim=0)  # (O,)
    shares = [o.share_women for o in occupations]
    stats = bias_statistics(r, shares)
    p = correlation_p_value(r, shares, n_permutations=n_permutations, seed=derived_seed(seed, "evaluate"))
    mean_lp = logprobs.mean(dim=0)  # (O, 2)
    rows = tuple(OccupationBias(o.name, o.share_women, float(r[i]), float(mean_lp[i, 0]),
                                float(mean_lp[i, 1])) for i, o in enumerate(occupations))
    return BiasScores(
        occupations=rows, templates=tuple(t.text for t in templates),
        r_by_template=tuple(tuple(float(v) for v in row) for row in r_by_template),
        woman_bias=stats.woman_bias, man_bias=stats.man_bias, total_bias=stats.total_bias,
        correlation=stats.correlation, correlation_p=p, n_permutations=n_permutations,
        share_source="; ".join(sorted({o.source for o in occupations})),
    )


def occupation_bias(
    model: LoadedModel, *, templates: Sequence[Template] = TEMPLATES,
    occupations: Sequence[Occupation] | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
    scorer: Scorer | None = None, n_permutations: int = DEFAULT_PERMUTATIONS, seed: int = 0,
) -> BiasScores:
    """Bias scores of ``model`` (module docstring). Runs under any intervention the caller holds.

    ``occupations`` defaults to :func:`lmaudit.checks.bias.occupations.occupation_table`; ``scorer`` to
    :func:`model_scorer`.
    """
    occupations = tuple(occupations) if occupations is not None else occupation_table()
    scorer = scorer or model_scorer(model, batch_size=batch_size)
    logprobs = template_logprobs(scorer, templates, occupations)
    return bias_from_logprobs(logprobs, templates, occupations, n_permutations=n_permutations, seed=seed)


def held_out_bias(model: LoadedModel, templates: Sequence[Template], occupations: Sequence[Occupation], *,
                  batch_size: int = DEFAULT_BATCH_SIZE) -> BiasStatistics:
    """The summary statistics alone (no permutation test, no per-occupation rows): what an edit is judged on,
    measured once per edit and per random draw."""
    logprobs = template_logprobs(model_scorer(model, batch_size=batch_size), templates, occupations)
    r = (logprobs[..., 0] - logprobs[..., 1]).mean(dim=0)  # (O,)
    return bias_statistics(r, [o.share_women for o in occupations])


def reduction_pct(before: float, after: float) -> float:
    """``100 · (before − after) / before``: how much of a (positive) bias an edit removed."""
    return 100.0 * (before - after) / before if before != 0 and math.isfinite(before) else math.nan
