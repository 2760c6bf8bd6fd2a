"""Find the FFN neurons behind the occupation gender bias with comparative neuron analysis (CNA), zero them, and
judge the edit on prompts it never saw, against zeroing as many random neurons, with its side effects.

Yu & Ananiadou ("Interpreting Arithmetic Mechanism in Large Language Models through Comparative Neuron
Analysis", EMNLP 2024, gender-bias application) compare neuron importances between a female and a male prompt
and edit the neurons behind the gap. Here:

0. **Premise.** The model must carry the bias the paper edits: on the full bias scores
   (:mod:`lmaudit.checks.bias.scores`), ``Pearson(r_o, share of women) > 0`` with one-sided permutation
   ``p ≤ premise_alpha``. Otherwise there is nothing to remove and :class:`PremiseMissing` says so.
1. **Held-out split** (seeded, ``derived_seed(seed, "rank")``). The templates are split into *ranking* and
   *evaluation* templates; within the mostly-women and the mostly-men occupations separately, the occupations
   are split into *ranking* and *evaluation* occupations. Nothing that chooses neurons sees an evaluation
   template or occupation.
2. **Ranking pairs.** ``r_o`` averaged over the ranking templates only; per side, the ``top_fraction`` most
   stereotyped ranking occupations (largest ``σ_o·r_o``, ``σ_o = +1`` mostly women, ``−1`` mostly men).
   Prompts: every ranking template × chosen occupation × gender; ``w`` = the first token of ``" o"``.
3. **Layer screen** (one forward pass). The FFN of layer ℓ changes ``log p(w)`` by
   ``e_ℓ(p) = log p(w | h_{ℓ+1}) − log p(w | h_{ℓ+1} − f_ℓ)`` at the prompt's last position, ``f_ℓ`` what the
   layer's MLP branch writes into the residual stream (:meth:`~lmaudit.checks.core.adapter.ArchitectureAdapter.
   ffn_write_module`: the down projection, or the post-FFN norm of sandwich-norm models),
   ``p(·|x) = softmax(adapter.logits(x))``. ``D_ℓ = mean_{t,o} σ_o · (e_ℓ(female_{t,o}) − e_ℓ(male_{t,o}))``;
   the ``layer_fraction`` of the layers with the largest ``D_ℓ`` are scored neuron by neuron.
4. **Neuron ranking** (CNA, :func:`lmaudit.checks.core.neuron_scores.batched_neuron_scores`)::

       importance_k(p) = log p(w | r + m_k·fc2_k) − log p(w | r)
       s_k            = mean_{t,o} σ_o · (importance_k(female_{t,o}) − importance_k(male_{t,o}))

   ``s_k > 0``: neuron ``k`` pushes the stereotyped occupation more after the stereotyped gender. The top
   ``k = neuron_fraction · (scored layers × intermediate size)`` by ``s_k`` are zeroed with
   :func:`lmaudit.checks.core.interventions.zero_neurons` (``m_k = 0`` at every position).
5. **Judgement on the evaluation split.** ``B`` = total bias (mean ``|r_o|``) over evaluation templates ×
   evaluation occupations; ``reduction = 100·(B − B')/B``. The control zeroes ``k`` random neurons of the same
   layers (:func:`lmaudit.checks.core.stats.random_neurons`, seeds ``derived_seed(seed, "control") + i``,
   ``n_control_draws`` draws); their reductions have a :class:`~lmaudit.checks.core.stats.Spread` and the upper
   bound ``mean + z·std``. The claim holds when the edit's reduction exceeds that bound
   (``reduction_beyond_control_pct > 0``).
6. **Side effects** of the CNA edit, as release gates: perplexity on the session corpus
   (:mod:`lmaudit.checks.core.perplexity`, the same windows before and after; the edited pass starts at the
   lowest edited layer from the clean run's hidden state, :func:`lmaudit.checks.core.layer_skip.start_at_layer`,
   which is exact) and arithmetic exact-match accuracy (:func:`lmaudit.checks.core.accuracy.arithmetic_accuracy`,
   one-digit additions), each as a relative change in %.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from lmaudit.checks.bias.occupations import TEMPLATES, Gender, Occupation, Template, occupation_table
from lmaudit.checks.bias.scores import (
    BiasScores,
    BiasStatistics,
    bias_statistics,
    held_out_bias,
    reduction_pct,
)
from lmaudit.checks.core.accuracy import arithmetic_accuracy
from lmaudit.checks.core.arithmetic_problems import ArithmeticProblem, generate_problems
from lmaudit.checks.core.corpora import Corpus
from lmaudit.checks.core.errors import LmAuditError, PremiseMissing
from lmaudit.checks.core.hooks import capture
from lmaudit.checks.core.interventions import zero_neurons
from lmaudit.checks.core.layer_skip import start_at_layer
from lmaudit.checks.core.loading import LoadedModel
from lmaudit.checks.core.logprobs import DEFAULT_BATCH_SIZE
from lmaudit.checks.core.neuron_scores import batched_neuron_scores, pad_right, target_token_id
from lmaudit.checks.core.perplexity import corpus_windows, perplexity_from_nll, window_nll
from lmaudit.checks.core.results import CheckResult, metric, metric_field
from lmaudit.checks.core.stats import Neuron, Spread, derived_seed, random_neurons

__all__ = [
    "BiasEditResult", "DataSplit", "NeuronRanking", "RankingPair", "SideEffects", "edit_bias",
    "ffn_layer_effects", "neuron_spec", "rank_bias_neurons", "ranking_occupations", "split_data",
]


class BiasEditError(LmAuditError, ValueError):
    """Invalid edit parameters (fractions outside (0, 1], too few templates or occupations to split)."""


# ------------------------------------------------------------------------------------------- split


@dataclass(frozen=True)
class DataSplit:
    """Which templates (their readable text) and occupations choose the neurons, and which judge them."""

    rank_templates: tuple[str, ...]
    eval_templates: tuple[str, ...]
    rank_occupations: tuple[str, ...]
    eval_occupations: tuple[str, ...]


def _take(n_items: int, fraction: float, generator: torch.Generator) -> tuple[list[int], list[int]]:
    """Seeded split of ``range(n_items)`` into ``round(fraction·n)`` (at least 1, leaving at least 1) and the rest,
    each in the original order."""
    n_first = min(n_items - 1, max(1, round(fraction * n_items)))
    order = torch.randperm(n_items, generator=generator).tolist()
    return sorted(order[:n_first]), sorted(order[n_first:])


def split_data(templates: Sequence[Template], occupations: Sequence[Occupation], *, rank_template_fraction: float,
               rank_occupation_fraction: float, seed: int) -> tuple[list[Template], list[Template],
                                                                    list[Occupation], list[Occupation]]:
    """Step 1 of the module docstring: ``(rank templates, eval templates, rank occupations, eval occupations)``.

    Occupations are split within each side (more, fewer than half women), so both halves hold both sides;
    occupations with exactly half women have no side and are only evaluated.
    """
    for name, value in (("rank_template_fraction", rank_template_fraction),
                        ("rank_occupation_fraction", rank_occupation_fraction)):
        if not 0 < value < 1:
            raise BiasEditError(f"{name} must be in (0, 1), got {value}")
    if len(templates) < 2:
        raise BiasEditError(f"a held-out split needs at least 2 templates, got {len(templates)}")
    generator = torch.Generator().manual_seed(derived_seed(seed, "rank"))
    rank_t, eval_t = _take(len(templates), rank_template_fraction, generator)
    rank_o: list[Occupation] = []
    eval_o: list[Occupation] = [o for o in occupations if o.share_women == 0.5]
    for side in ([o for o in occupations if o.female_dominated], [o for o in occupations if o.male_dominated]):
        if len(side) < 2:
            raise BiasEditError("a held-out split needs at least 2 occupations with more and 2 with fewer than "
                                f"half women; got {len(side)} on one side")
        first, rest = _take(len(side), rank_occupation_fraction, generator)
        rank_o += [side[i] for i in first]
        eval_o += [side[i] for i in rest]
    return [templates[i] for i in rank_t], [templates[i] for i in eval_t], rank_o, eval_o


# ------------------------------------------------------------------------------------------- ranking


@dataclass(frozen=True)
class RankingPair:
    """One ranking pair: template, occupation and its sign ``σ_o``."""

    template: str
    occupation: str
    sign: int


@dataclass(frozen=True)
class NeuronRanking:
    """The layer screen and the top neurons by ``s_k`` (module docstring), as plain data."""

    pairs: tuple[RankingPair, ...]
    layer_effect: tuple[float, ...]  # D_ℓ for every layer
    layers: tuple[int, ...]  # the layers scored neuron by neuron
    neurons: tuple[Neuron, ...]  # best first
    scores: tuple[float, ...]  # s_k of those neurons


def ranking_occupations(r: torch.Tensor, occupations: Sequence[Occupation], top_fraction: float
                        ) -> list[tuple[Occupation, int]]:
    """Step 2: per side, the ``top_fraction`` (at least one) of ``occupations`` with the largest ``σ_o·r_o``;
    ``r`` ``(O,)`` is measured on the ranking templates only."""
    if not 0 < top_fraction <= 1:
        raise BiasEditError(f"top_fraction must be in (0, 1], got {top_fraction}")
    chosen: list[tuple[Occupation, int]] = []
    for sign in (1, -1):
        side = [i for i, o in enumerate(occupations) if (o.female_dominated if sign > 0 else o.male_dominated)]
        side.sort(key=lambda i: -sign * float(r[i]))
        chosen += [(occupations[i], sign) for i in side[:max(1, round(top_fraction * len(side)))]]
    return chosen


def _prompts(templates: Sequence[Template], chosen: Sequence[tuple[Occupation, int]]
             ) -> tuple[list[str], list[str], list[RankingPair]]:
    """Prompts and targets ordered ``[pair0 female, pair0 male, pair1 female, ...]``."""
    prompts, targets, pairs = [], [], []
    for template in templates:
        for occupation, sign in chosen:
            for gender in (Gender.FEMALE, Gender.MALE):
                prompts.append(template.prompt(gender, occupation.article))
                targets.append(occupation.continuation)
            pairs.append(RankingPair(template.text, occupation.name, sign))
    return prompts, targets, pairs


def signed_gap(values: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """``mean_pairs σ · (values[female] − values[male])`` for values ``(2·pairs, ...)``."""
    gap = values[0::2] - values[1::2]  # (pairs, ...)
    return (signs.view(-1, *([1] * (gap.dim() - 1))).to(gap.dtype) * gap).mean(dim=0)


@torch.no_grad()
def ffn_layer_effects(model: LoadedModel, prompts: Sequence[str], targets: Sequence[str]) -> torch.Tensor:
    """``e_ℓ(p)`` of step 3 for every prompt and layer: ``(n_prompts, n_layers)``.

    Tokenised as :mod:`lmaudit.checks.core.neuron_scores` does (``pad_right``, ``target_token_id``), one forward
    pass; ``f_ℓ`` is the output of the adapter's ``ffn_write_module`` (what the MLP branch adds).
    """
    adapter, tokenizer = model.adapter, model.tokenizer
    target_ids = torch.tensor([target_token_id(tokenizer, p, t) for p, t in zip(prompts, targets, strict=True)])
    input_ids, mask, last = pad_right(tokenizer, prompts)
    layers = {f"layer{i}": adapter.layer_list[i] for i in range(adapter.n_layers)}
    writes = {f"ffn{i}": adapter.ffn_write_module(i) for i in range(adapter.n_layers)}
    with capture(layers, what="output") as layer_cap, capture(writes, what="output") as write_cap:
        model.model(input_ids=input_ids.to(adapter.device), attention_mask=mask.to(adapter.device),
                    use_cache=False)
    rows = torch.arange(len(prompts))
    out = torch.empty(len(prompts), adapter.n_layers)
    for i in range(adapter.n_layers):
        h_next = layer_cap.output(f"layer{i}")[rows, last]  # (n, hidden)
        written = write_cap.output(f"ffn{i}")[rows, last]  # (n, hidden)
        with_ffn = torch.log_softmax(adapter.logits(h_next).float(), dim=-1)  # (n, vocab)
        without = torch.log_softmax(adapter.logits(h_next - written).float(), dim=-1)
        out[:, i] = (with_ffn - without).cpu()[rows, target_ids]
    return out


def rank_bias_neurons(model: LoadedModel, templates: Sequence[Template], chosen: Sequence[tuple[Occupation, int]],
                      *, neuron_fraction: float, layer_fraction: float, layers: Sequence[int] | None = None
                      ) -> NeuronRanking:
    """Steps 3 and 4 of the module docstring on the ranking prompts: the top ``k`` neurons by ``s_k``."""
    adapter = model.adapter
    if not 0 < neuron_fraction <= 1 or not 0 < layer_fraction <= 1:
        raise BiasEditError(f"neuron_fraction and layer_fraction must be in (0, 1], got {neuron_fraction}, "
                            f"{layer_fraction}")
    prompts, targets, pairs = _prompts(templates, chosen)
    signs = torch.tensor([pair.sign for pair in pairs])
    effect = signed_gap(ffn_layer_effects(model, prompts, targets), signs)  # (n_layers,)
    if layers is None:
        n_scored = min(adapter.n_layers, max(1, round(layer_fraction * adapter.n_layers)))
        layers = [int(i) for i in torch.topk(effect, n_scored).indices]
    layers = sorted(set(int(i) for i in layers))
    cna = batched_neuron_scores(model.model, model.tokenizer, prompts, targets, layers=layers, adapter=adapter)
    importance = torch.stack([s.importance[layers] for s in cna])  # (2·pairs, len(layers), intermediate)
    s = signed_gap(importance.double(), signs)  # (len(layers), intermediate)
    k = min(s.numel(), max(1, round(neuron_fraction * s.numel())))
    top = torch.topk(s.flatten(), k)
    width = s.shape[1]
    neurons = tuple((layers[int(i) // width], int(i) % width) for i in top.indices)
    return NeuronRanking(pairs=tuple(pairs), layer_effect=tuple(float(v) for v in effect), layers=tuple(layers),
                         neurons=neurons, scores=tuple(float(v) for v in top.values))


def neuron_spec(neurons: Sequence[Neuron]) -> dict[int, list[int]]:
    """``{layer: [neuron, ...]}`` for :func:`~lmaudit.checks.core.interventions.zero_neurons`."""
    spec: dict[int, list[int]] = {}
    for layer, index in neurons:
        spec.setdefault(layer, []).append(index)
    return spec


# ------------------------------------------------------------------------------------------- side effects


def relative_change_pct(before: float, after: float) -> float:
    """``100 · (after − before) / before``; 0 when both are 0, ±inf when only ``before`` is."""
    if before == 0:
        return 0.0 if after == 0 else math.copysign(math.inf, after)
    return 100.0 * (after - before) / before


@dataclass(frozen=True)
class SideEffects:
    """Perplexity and arithmetic accuracy before and after the CNA edit (step 6)."""

    corpus: str
    seq_len: int
    n_windows: int
    start_layer: int  # the edited pass reuses the clean hidden state entering this layer
    perplexity_before: float
    perplexity_after: float
    n_arithmetic: int
    arithmetic_before: float
    arithmetic_after: float

    @property
    def perplexity_change_pct(self) -> float:
        return relative_change_pct(self.perplexity_before, self.perplexity_after)

    @property
    def arithmetic_change_pct(self) -> float:
        """Relative change of arithmetic accuracy, in % (−50: half of the correct answers lost)."""
        return relative_change_pct(self.arithmetic_before, self.arithmetic_after)


class PerplexityProbe:
    """Perplexity on fixed windows, before and under an edit of layers ``≥ start_layer``.

    The clean pass records the hidden state entering ``start_layer`` for every batch of
    :func:`~lmaudit.checks.core.perplexity.window_nll`; an edited pass starts there (the layers below are
    unchanged by the edit, so this is exact and saves their cost).
    """

    def __init__(self, model: LoadedModel, corpus: Corpus, *, seq_len: int, n_windows: int, start_layer: int,
                 batch_size: int = 4) -> None:
        self.model, self.start_layer, self.batch_size = model, start_layer, batch_size
        self.windows = corpus_windows(model.tokenizer, corpus, seq_len, n_windows)  # (n_windows, seq_len [+1])
        entry = {"entry": model.adapter.layer_list[start_layer]}
        with capture(entry, what="input") as captured:
            nll = window_nll(model.model, self.windows, batch_size=batch_size)
        self.before = perplexity_from_nll(nll, self.windows)[0]
        self._hidden = list(captured.inputs["entry"])  # one (b, t, hidden) per window_nll batch, in order

    def measure(self) -> float:
        """Perplexity of the model as it is now (call it inside the edit)."""
        hidden = iter(self._hidden)

        def forward(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
            with start_at_layer(self.model.adapter, self.start_layer, next(hidden)):
                return self.model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

        nll = window_nll(self.model.model, self.windows, batch_size=self.batch_size, forward=forward)
        return perplexity_from_nll(nll, self.windows)[0]


def arithmetic_problems(n: int, *, seed: int) -> list[ArithmeticProblem]:
    """``n`` one-digit additions, symbolic template, 3-shot (``"2+3=5\\n...\\n4+1="``); none when ``n`` is 0."""
    if not n:
        return []
    return generate_problems(ops="+", digits=1, n_per_op=n, template="symbolic", few_shot=3, seed=seed)


# ------------------------------------------------------------------------------------------- result


@dataclass(frozen=True)
class BiasEditResult(CheckResult):
    """The CNA edit judged on held-out prompts against random draws, with its side effects (module docstring)."""

    split: DataSplit
    ranking: NeuronRanking
    baseline: BiasStatistics  # evaluation split, unedited
    edited: BiasStatistics  # evaluation split, CNA neurons zeroed
    in_sample_baseline: BiasStatistics  # ranking split (what chose the neurons), unedited
    in_sample_edited: BiasStatistics  # ranking split, CNA neurons zeroed
    control_reductions: tuple[float, ...]  # reduction % of each random draw, in seed order
    control_seeds: tuple[int, ...]
    control: Spread  # of control_reductions
    confidence_z: float  # the control's upper bound is mean + z·std
    side_effects: SideEffects
    premise_correlation: float  # Pearson(r, share of women) on the full scores, and its p-value
    premise_p: float
    k: int = metric_field()

    @metric
    def bias_reduction_pct(self) -> float:
        """Reduction of the total bias on the evaluation split by the CNA edit, in %."""
        return reduction_pct(self.baseline.total_bias, self.edited.total_bias)

    @metric
    def in_sample_reduction_pct(self) -> float:
        """The same reduction on the ranking split: beside the held-out one, how much of the edit's effect does
        not generalise beyond the prompts that chose it."""
        return reduction_pct(self.in_sample_baseline.total_bias, self.in_sample_edited.total_bias)

    @metric
    def control_reduction_mean_pct(self) -> float:
        return self.control.mean

    @metric
    def control_reduction_upper_pct(self) -> float:
        """``mean + z·std`` of the random draws' reductions: what a random edit reaches at most, at ~95 %."""
        return self.control.upper(self.confidence_z)

    @metric
    def reduction_beyond_control_pct(self) -> float:
        """The edit's reduction minus the control's upper bound: > 0 when CNA beats random neurons."""
        return self.bias_reduction_pct - self.control_reduction_upper_pct

    @metric
    def perplexity_change_pct(self) -> float:
        return self.side_effects.perplexity_change_pct

    @metric
    def arithmetic_change_pct(self) -> float:
        return self.side_effects.arithmetic_change_pct

    @metric
    def baseline_total_bias(self) -> float:
        return self.baseline.total_bias

    @metric
    def n_control_draws(self) -> int:
        return self.control.n


# ------------------------------------------------------------------------------------------- the edit


def check_premise(scores: BiasScores, alpha: float) -> None:
    """Step 0: raise :class:`PremiseMissing` unless ``scores`` show the bias (positive correlation, ``p ≤ alpha``)."""
    if not (scores.correlation > 0 and scores.correlation_p <= alpha):
        raise PremiseMissing(
            f"no occupational gender bias to edit: Pearson(r, share of women) = {scores.correlation:+.3f} over "
            f"{len(scores.occupations)} occupations x {len(scores.templates)} templates, one-sided permutation "
            f"p = {scores.correlation_p:.3g} (the edit needs a positive correlation with p <= {alpha})")


def edit_bias(
    model: LoadedModel, corpus: Corpus, scores: BiasScores, *, templates: Sequence[Template] = TEMPLATES,
    occupations: Sequence[Occupation] | None = None, premise_alpha: float = 0.05,
    rank_template_fraction: float = 0.5, rank_occupation_fraction: float = 0.5, top_fraction: float = 0.5,
    layer_fraction: float = 0.1, layers: Sequence[int] | None = None, neuron_fraction: float = 0.005,
    n_control_draws: int = 20, confidence_z: float = 1.645, seq_len: int = 256, n_windows: int = 4,
    window_batch_size: int = 4, n_arithmetic: int = 40, seed: int = 0, batch_size: int = DEFAULT_BATCH_SIZE,
) -> BiasEditResult:
    """Steps 0–6 of the module docstring. ``scores``: the unedited model's bias scores on ``templates`` ×
    ``occupations`` (the premise, and ``r`` on the ranking templates, come from them without new passes)."""
    check_premise(scores, premise_alpha)
    if n_control_draws < 2:
        raise BiasEditError(f"n_control_draws must be >= 2 for a spread, got {n_control_draws}")
    if not 0 < neuron_fraction <= 0.5:
        raise BiasEditError(f"neuron_fraction must be in (0, 0.5] (the control draws k other neurons of the same "
                            f"layers), got {neuron_fraction}")
    occupations = tuple(occupations) if occupations is not None else occupation_table()
    rank_t, eval_t, rank_o, eval_o = split_data(templates, occupations, seed=seed,
                                                rank_template_fraction=rank_template_fraction,
                                                rank_occupation_fraction=rank_occupation_fraction)
    r_rank = scores.r_on([t.text for t in rank_t], [o.name for o in rank_o])  # ranking templates only
    chosen = ranking_occupations(r_rank, rank_o, top_fraction)
    ranking = rank_bias_neurons(model, rank_t, chosen, neuron_fraction=neuron_fraction,
                                layer_fraction=layer_fraction, layers=layers)
    width = model.adapter.intermediate_size

    def measure(context: AbstractContextManager[Any]) -> BiasStatistics:
        with context:
            return held_out_bias(model, eval_t, eval_o, batch_size=batch_size)

    def zeroed(neurons: Sequence[Neuron]) -> AbstractContextManager[Any]:
        return zero_neurons(model.adapter, neuron_spec(neurons))

    baseline = measure(nullcontext())
    edited = measure(zeroed(ranking.neurons))
    with zeroed(ranking.neurons):
        in_sample_edited = held_out_bias(model, rank_t, rank_o, batch_size=batch_size)
    seeds = tuple(derived_seed(seed, "control") + i for i in range(n_control_draws))
    reductions = tuple(
        reduction_pct(baseline.total_bias, measure(zeroed(random_neurons(
            ranking.layers, width, len(ranking.neurons), seed=draw, exclude=ranking.neurons))).total_bias)
        for draw in seeds)
    side_effects = measure_side_effects(model, corpus, ranking.neurons, seq_len=seq_len, n_windows=n_windows,
                                        window_batch_size=window_batch_size, n_arithmetic=n_arithmetic, seed=seed)
    return BiasEditResult(
        split=DataSplit(tuple(t.text for t in rank_t), tuple(t.text for t in eval_t),
                        tuple(o.name for o in rank_o), tuple(o.name for o in eval_o)),
        ranking=ranking, baseline=baseline, edited=edited,
        in_sample_baseline=bias_statistics(r_rank, [o.share_women for o in rank_o]),
        in_sample_edited=in_sample_edited, control_reductions=reductions, control_seeds=seeds,
        control=Spread.of(reductions), confidence_z=confidence_z, side_effects=side_effects,
        premise_correlation=scores.correlation, premise_p=scores.correlation_p, k=len(ranking.neurons),
    )


def measure_side_effects(model: LoadedModel, corpus: Corpus, neurons: Sequence[Neuron], *, seq_len: int,
                         n_windows: int, n_arithmetic: int, seed: int, window_batch_size: int = 4) -> SideEffects:
    """Step 6: perplexity and arithmetic accuracy before and with ``neurons`` zeroed."""
    start = min(layer for layer, _ in neurons)
    probe = PerplexityProbe(model, corpus, seq_len=seq_len, n_windows=n_windows, start_layer=start,
                            batch_size=window_batch_size)
    problems = arithmetic_problems(n_arithmetic, seed=derived_seed(seed, "evaluate"))

    def accuracy() -> float:
        return arithmetic_accuracy(model.model, model.tokenizer, problems).accuracy if problems else math.nan

    before = accuracy()
    with zero_neurons(model.adapter, neuron_spec(neurons)):
        ppl_after, after = probe.measure(), accuracy()
    return SideEffects(corpus=corpus.name, seq_len=seq_len, n_windows=n_windows, start_layer=start,
                       perplexity_before=probe.before, perplexity_after=ppl_after, n_arithmetic=len(problems),
                       arithmetic_before=before, arithmetic_after=after)
