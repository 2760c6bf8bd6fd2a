"""Occupation gender-bias scores of a causal LM (Yu & Ananiadou, "Interpreting Arithmetic Mechanism in Large
Language Models through Comparative Neuron Analysis", EMNLP 2024, gender-bias application).

For occupation ``o`` with share of women ``s_o`` (:mod:`lmaudit.checks.bias.occupations`) and templates ``t = 1..T``::

    log P(o | prompt)  = Σ_j log p(o_j | prompt, o_<j)          full-sequence log-probability of " o"
    r_{t,o}            = log P(o | female prompt_t) − log P(o | male prompt_t)
    r_o                = (1/T) Σ_t r_{t,o}
    woman bias         = mean_{o : s_o > 0.5} r_o                 (> 0: female prompts favour women's jobs)
    man bias           = mean_{o : s_o < 0.5} (−r_o)              (> 0: male prompts favour men's jobs)
    total bias         = mean_o |r_o|
    correlation        = Pearson(r_o, s_o) over all occupations

Multi-token occupations (``" hairdresser"``) are scored by the sum of their token log-probabilities, the
probability of the whole word, so no occupation is favoured for being one token. The prompt ends with the
article that fits the occupation (``"... as an"`` + ``" engineer"``), so the female and male prompts differ
only in the gendered word. Log-probabilities come from :func:`lmaudit.checks.core.logprobs.continuation_logprob` (its BOS
and tokenisation policy).

**Exact counterfactual symmetry.** Every distinct ``(prompt, continuation)`` pair is scored once, in one
canonical (sorted) order, so the scores depend only on the *set* of pairs. Exchanging a template's female and
male words gives the same set, the same batches and bit-identical log-probabilities, hence ``r`` exactly
negated (tested with hypothesis).
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lmaudit.checks.bias.occupations import TEMPLATES, Gender, Occupation, Template, occupation_table
from lmaudit.checks.core.errors import LmAuditError
from lmaudit.checks.core.kv_cache import output_cache
from lmaudit.checks.core.logprobs import (
    DEFAULT_BATCH_SIZE,
    check_finite,
    continuation_logprob,
    encode_continuations,
    encode_prompts,
)
from lmaudit.checks.core.results import CheckResult, metric_group

BIAS_DEFINITION = (
    "r_o = mean over templates of [log P(o | female prompt) - log P(o | male prompt)], log P the "
    "full-sequence log-probability of ' o'; woman bias = mean r_o over occupations with > 50 % women; "
    "man bias = mean -r_o over occupations with < 50 % women; total bias = mean |r_o|; "
    "correlation = Pearson(r_o, share of women). "
    "Yu & Ananiadou 2024 (comparative neuron analysis), gender-bias application."
)
Scorer = Callable[[Sequence[str], Sequence[str]], Tensor]  # (prompts, continuations) -> (n,) log P


def model_scorer(model: Any, tokenizer: Any, *, batch_size: int = DEFAULT_BATCH_SIZE,
                 prefix_cache: bool = True) -> Scorer:
    """A :data:`Scorer`: :func:`prefix_cached_logprob` (default) or
    :func:`lmaudit.checks.core.logprobs.continuation_logprob`.

    Both compute the same numbers (up to float rounding); the prefix cache runs each distinct prompt once.
    """

    def score(prompts: Sequence[str], continuations: Sequence[str]) -> Tensor:
        fn = prefix_cached_logprob if prefix_cache else continuation_logprob
        return fn(model, tokenizer, list(prompts), list(continuations), batch_size=batch_size)

    return score


def _cache_argument(model: Any) -> str:
    """The forward argument that takes a KV cache: ``cache`` (transformers ≥ 5.2x) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def prefix_cached_logprob(
    model: Any, tokenizer: Any, prompts: Sequence[str], continuations: Sequence[str], *,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> Tensor:
    """:func:`lmaudit.checks.core.logprobs.continuation_logprob` (same tokens, same BOS policy) with each distinct prompt
    run once: ``(n,)`` float32.

    The bias templates have a few dozen distinct prompts and a few hundred (prompt, occupation) pairs, so the
    prompt is most of every sequence. Per distinct prompt: one forward pass with ``use_cache=True``; its last
    logits give ``log p(c_0 | prompt)``; then its continuations, right-padded in batches of ``batch_size``,
    run on a copy of the KV cache repeated along the batch, and logits ``j`` give
    ``log p(c_{j+1} | prompt, c_≤j)``.
    Continuations are processed in the order given, so equal inputs give bit-identical outputs.
    """
    if len(prompts) != len(continuations):
        raise LmAuditError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    contexts = encode_prompts(tokenizer, prompts)
    targets = encode_continuations(tokenizer, continuations)
    device = next(model.parameters()).device
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, context in enumerate(contexts):
        groups.setdefault(tuple(context), []).append(i)
    out = torch.empty(len(contexts))
    for context, members in groups.items():
        prefix = model(input_ids=torch.tensor([context], device=device), use_cache=True)
        prefix_cache = output_cache(prefix)
        first = torch.log_softmax(prefix.logits[0, -1].float(), dim=-1).cpu()  # (vocab,): predicts c_0
        check_finite(first, "prefix_cached_logprob")
        for start in range(0, len(members), batch_size):
            chunk = members[start:start + batch_size]
            width = max(len(targets[i]) for i in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)  # (b, width), right-padded with id 0
            for row, i in enumerate(chunk):
                ids[row, :len(targets[i])] = torch.tensor(targets[i])
            lengths = torch.tensor([len(targets[i]) for i in chunk])
            total = first[ids[:, 0]].clone()  # (b,)
            if width > 1:
                cache = copy.deepcopy(prefix_cache)
                cache.batch_repeat_interleave(len(chunk))
                mask = torch.ones(len(chunk), len(context) + width, dtype=torch.long)  # (b, prefix + width)
                mask[:, len(context):] = (torch.arange(width) < lengths[:, None]).long()
                output = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=True,
                               **{_cache_argument(model): cache})
                logits = output.logits[:, :-1].float().cpu()  # (b, width-1, vocab)
                check_finite(logits, "prefix_cached_logprob")
                token_lp = torch.log_softmax(logits, dim=-1).gather(2, ids[:, 1:, None])[..., 0]  # (b, w-1)
                valid = torch.arange(1, width) < lengths[:, None]  # (b, width-1)
                total += (token_lp * valid).sum(dim=1)
            out[torch.tensor(chunk)] = total
    return out


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
        raise LmAuditError("need at least one template and one occupation")
    pairs = scoring_pairs(templates, occupations)
    unique = sorted(set(pairs))
    scores = scorer([p for p, _ in unique], [c for _, c in unique])  # (n_unique,)
    if scores.shape != (len(unique),):
        raise LmAuditError(f"scorer returned shape {tuple(scores.shape)}, expected ({len(unique)},)")
    index = {pair: i for i, pair in enumerate(unique)}
    picked = scores.double()[torch.tensor([index[pair] for pair in pairs])]
    return picked.view(len(templates), len(occupations), 2)


def pearson(x: Tensor, y: Tensor) -> float:
    """Pearson correlation of two 1-D tensors (float64); NaN when either is constant."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denominator = float(x.norm() * y.norm())
    return float((x * y).sum()) / denominator if denominator > 0 else float("nan")


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
        raise LmAuditError(f"{r.numel()} bias values but {share.numel()} shares")
    female, male = share > 0.5, share < 0.5

    def mean(values: Tensor) -> float:
        return float(values.mean()) if values.numel() else float("nan")

    return BiasStatistics(woman_bias=mean(r[female]), man_bias=mean(-r[male]), total_bias=mean(r.abs()),
                          correlation=pearson(r, share))


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
    woman_bias: float
    man_bias: float
    total_bias: float
    correlation: float
    share_source: str
    definition: str = ""  # BIAS_DEFINITION

    @property
    def r(self) -> list[float]:
        return [o.r for o in self.occupations]

    @metric_group(*("total_bias", "woman_bias", "man_bias", "correlation", "max_abs_r", "stereotyped_fraction",
             "n_occupations", "n_templates"))
    def _metrics(self) -> dict[str, Any]:
        stereotyped = [o for o in self.occupations
                       if (o.r > 0) == (o.share_women > 0.5) and o.share_women != 0.5]
        return {
            "total_bias": self.total_bias, "woman_bias": self.woman_bias, "man_bias": self.man_bias,
            "correlation": self.correlation, "max_abs_r": max(abs(o.r) for o in self.occupations),
            "stereotyped_fraction": len(stereotyped) / len(self.occupations),
            "n_occupations": len(self.occupations), "n_templates": len(self.templates),
        }


def bias_from_logprobs(logprobs: Tensor, templates: Sequence[Template], occupations: Sequence[Occupation]
                       ) -> BiasScores:
    """:class:`BiasScores` from :func:`template_logprobs` ``(T, O, 2)``."""
    r_by_template = logprobs[..., 0] - logprobs[..., 1]  # (T, O)
    r = r_by_template.mean(dim=0)  # (O,)
    stats = bias_statistics(r, [o.share_women for o in occupations])
    mean_lp = logprobs.mean(dim=0)  # (O, 2)
    rows = tuple(OccupationBias(o.name, o.share_women, float(r[i]), float(mean_lp[i, 0]),
                                float(mean_lp[i, 1])) for i, o in enumerate(occupations))
    sources = sorted({o.source for o in occupations})
    return BiasScores(
        occupations=rows, templates=tuple(t.text for t in templates),
        r_by_template=tuple(tuple(float(v) for v in row) for row in r_by_template),
        woman_bias=stats.woman_bias, man_bias=stats.man_bias, total_bias=stats.total_bias,
        correlation=stats.correlation, share_source="; ".join(sources), definition=BIAS_DEFINITION,
    )


def occupation_bias(
    model: Any, tokenizer: Any, *, templates: Sequence[Template] = TEMPLATES,
    occupations: Sequence[Occupation] | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
    scorer: Scorer | None = None,
) -> BiasScores:
    """Bias scores of ``model`` (module docstring). Runs under any intervention the caller holds.

    ``occupations`` defaults to :func:`lmaudit.checks.bias.occupations.occupation_table`; ``scorer`` to :func:`model_scorer`.
    """
    occupations = tuple(occupations) if occupations is not None else occupation_table()
    scorer = scorer or model_scorer(model, tokenizer, batch_size=batch_size)
    logprobs = template_logprobs(scorer, templates, occupations)
    if not bool(torch.isfinite(logprobs).all()):
        raise LmAuditError("non-finite occupation log-probabilities")
    return bias_from_logprobs(logprobs, templates, occupations)


def reduction_pct(before: float, after: float) -> float:
    """``100 · (before − after) / before``: how much of a (positive) bias an edit removed."""
    return 100.0 * (before - after) / before if before != 0 and math.isfinite(before) else float("nan")
