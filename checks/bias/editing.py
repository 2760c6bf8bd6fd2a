"""Find the FFN neurons that drive the occupation gender bias with comparative neuron analysis, zero them, and
measure what else the edit changes, against zeroing as many random neurons.

Yu & Ananiadou ("Interpreting Arithmetic Mechanism in Large Language Models through Comparative Neuron
Analysis", EMNLP 2024) compare neuron importances between a female and a male prompt and zero the neurons
behind the gap; they report the bias, not the side effects. Here, for ranking pairs ``(t, o)`` (the most
stereotyped occupations of :mod:`lmaudit.checks.bias.scores` on the first templates), ``σ_o = +1`` for a female-dominated and
``−1`` for a male-dominated occupation, and ``w`` the first token of ``" o"``:

1. **Layer screen** (cheap, one forward pass). The FFN of layer ℓ changes ``log p(w)`` by
   ``e_ℓ(p) = log p(w | h_{ℓ+1}) − log p(w | h_{ℓ+1} − y_ℓ)`` at the prompt's last position (``y_ℓ`` = the
   down projection's output, ``p(·|x) = softmax(adapter.logits(x))``, as in :mod:`lmaudit.checks.core.neuron_scores`).
   ``D_ℓ = mean_{t,o} σ_o · (e_ℓ(female_{t,o}) − e_ℓ(male_{t,o}))``; the ``n_layers`` layers with the largest
   ``D_ℓ`` are scored neuron by neuron (or the caller's ``layers``).
2. **Neuron ranking** (CNA, :func:`lmaudit.checks.core.neuron_scores.batched_neuron_scores`)::

       importance_k(p) = log p(w | r + m_k·fc2_k) − log p(w | r)
       s_k            = mean_{t,o} σ_o · (importance_k(female_{t,o}) − importance_k(male_{t,o}))

   ``s_k > 0``: neuron ``k`` pushes the stereotyped occupation more after the stereotyped gender. The top
   ``k`` by ``s_k`` are zeroed with :func:`lmaudit.checks.core.interventions.zero_neurons` (``m_k = 0`` at every position).
3. **Effects**, each measured on the unedited model, with the CNA edit and with ``k`` random neurons drawn
   (seeded) from the same layers:

   - bias: :func:`lmaudit.checks.bias.scores.occupation_bias` on the full template set; reduction ``100·(B − B')/B``;
   - perplexity on the session corpus (:mod:`lmaudit.checks.core.perplexity`, the same windows each time), change in %;
   - arithmetic exact-match accuracy (:func:`lmaudit.checks.core.accuracy.arithmetic_accuracy`), change in points;
   - super weights (:func:`lmaudit.checks.superweights.detect.detect_super_weights`): *intact* = no zeroed neuron is a super
     weight's input channel and every super weight's value is unchanged; *found* = detection on the edited
     model returns the same coordinates as on the unedited one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from lmaudit.checks.bias.occupations import TEMPLATES, Gender, Occupation, Template, occupation_table
from lmaudit.checks.bias.scores import BiasScores, occupation_bias, reduction_pct
from lmaudit.checks.core.accuracy import arithmetic_accuracy
from lmaudit.checks.core.adapter import ArchitectureAdapter
from lmaudit.checks.core.arithmetic_problems import ArithmeticProblem, generate_problems
from lmaudit.checks.core.corpora import Corpus
from lmaudit.checks.core.errors import LmAuditError
from lmaudit.checks.core.hooks import capture
from lmaudit.checks.core.interventions import zero_neurons
from lmaudit.checks.core.neuron_scores import batched_neuron_scores, pad_right, target_token_id
from lmaudit.checks.core.perplexity import corpus_windows, perplexity_from_nll, window_nll
from lmaudit.checks.core.results import CheckResult, metric_group
from lmaudit.checks.superweights.detect import detect_super_weights

Neuron = tuple[int, int]  # (layer, neuron index = input channel of that layer's down projection)


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


def ranking_occupations(scores: BiasScores, occupations: Sequence[Occupation], n_per_side: int
                        ) -> list[tuple[Occupation, int]]:
    """The ``n_per_side`` most stereotyped female- and male-dominated occupations (largest ``σ_o·r_o``)."""
    by_name = {o.name: o for o in occupations}
    rows = [row for row in scores.occupations if row.share_women != 0.5]
    female = sorted((row for row in rows if row.share_women > 0.5), key=lambda row: -row.r)[:n_per_side]
    male = sorted((row for row in rows if row.share_women < 0.5), key=lambda row: row.r)[:n_per_side]
    return [(by_name[row.occupation], 1) for row in female] + [(by_name[row.occupation], -1) for row in male]


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


def _signed_gap(values: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """``mean_pairs σ · (values[female] − values[male])`` for values ``(2·pairs, ...)``."""
    gap = values[0::2] - values[1::2]  # (pairs, ...)
    return (signs.view(-1, *([1] * (gap.dim() - 1))).to(gap.dtype) * gap).mean(dim=0)


@torch.no_grad()
def ffn_layer_effects(model: Any, tokenizer: Any, adapter: ArchitectureAdapter, prompts: Sequence[str],
                      targets: Sequence[str]) -> torch.Tensor:
    """``e_ℓ(p)`` of the module docstring for every prompt and layer: ``(n_prompts, n_layers)``.

    Tokenised as :mod:`lmaudit.checks.core.neuron_scores` does (``pad_right``, ``target_token_id``), one forward pass.
    """
    target_ids = torch.tensor([target_token_id(tokenizer, p, t)
                               for p, t in zip(prompts, targets, strict=True)])
    input_ids, mask, last = pad_right(tokenizer, prompts)
    layers = {f"layer{i}": adapter.layer_list[i] for i in range(adapter.n_layers)}
    downs = {f"down{i}": adapter.down_proj(i) for i in range(adapter.n_layers)}
    with capture(layers, what="output") as layer_cap, capture(downs, what="output") as down_cap:
        model(input_ids=input_ids.to(adapter.device), attention_mask=mask.to(adapter.device), use_cache=False)
    rows = torch.arange(len(prompts))
    out = torch.empty(len(prompts), adapter.n_layers)
    for i in range(adapter.n_layers):
        h_next = layer_cap.output(f"layer{i}")[rows, last]  # (n, hidden)
        y = down_cap.output(f"down{i}")[rows, last]  # (n, hidden)
        with_ffn = torch.log_softmax(adapter.logits(h_next).float(), dim=-1)  # (n, vocab)
        without = torch.log_softmax(adapter.logits(h_next - y).float(), dim=-1)
        out[:, i] = (with_ffn - without).cpu()[rows, target_ids]
    return out


def rank_bias_neurons(
    model: Any, tokenizer: Any, adapter: ArchitectureAdapter, scores: BiasScores, *, k: int,
    occupations: Sequence[Occupation], templates: Sequence[Template], n_per_side: int = 4, n_layers: int = 3,
    layers: Sequence[int] | None = None,
) -> NeuronRanking:
    """Steps 1 and 2 of the module docstring: the top ``k`` neurons by ``s_k``."""
    chosen = ranking_occupations(scores, occupations, n_per_side)
    prompts, targets, pairs = _prompts(templates, chosen)
    signs = torch.tensor([pair.sign for pair in pairs])
    effect = _signed_gap(ffn_layer_effects(model, tokenizer, adapter, prompts, targets), signs)  # (n_layers,)
    if layers is None:
        layers = sorted(int(i) for i in torch.topk(effect, min(n_layers, adapter.n_layers)).indices)
    layers = sorted(set(int(i) for i in layers))
    cna = batched_neuron_scores(model, tokenizer, prompts, targets, layers=layers, adapter=adapter)
    importance = torch.stack([s.importance[layers] for s in cna])  # (2·pairs, len(layers), intermediate)
    s = _signed_gap(importance.double(), signs)  # (len(layers), intermediate)
    top = torch.topk(s.flatten(), min(k, s.numel()))
    width = s.shape[1]
    neurons = tuple((layers[int(i) // width], int(i) % width) for i in top.indices)
    return NeuronRanking(pairs=tuple(pairs), layer_effect=tuple(float(v) for v in effect),
                         layers=tuple(layers), neurons=neurons, scores=tuple(float(v) for v in top.values))


def random_neurons(adapter: ArchitectureAdapter, layers: Sequence[int], k: int, *, seed: int,
                   exclude: Sequence[Neuron] = ()) -> tuple[Neuron, ...]:
    """``k`` distinct neurons drawn uniformly (seeded) from ``layers``, none of them in ``exclude``."""
    width = adapter.intermediate_size
    excluded = {layers.index(layer) * width + n for layer, n in exclude if layer in layers}
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(layers) * width, generator=generator).tolist()
    picked = [i for i in order if i not in excluded][:k]
    return tuple((layers[i // width], i % width) for i in picked)


def neuron_spec(neurons: Sequence[Neuron]) -> dict[int, list[int]]:
    spec: dict[int, list[int]] = {}
    for layer, index in neurons:
        spec.setdefault(layer, []).append(index)
    return spec


# ------------------------------------------------------------------------------------------- effects


@dataclass(frozen=True)
class Measurement:
    """Everything measured on one version of the model (unedited, CNA edit or random control)."""

    total_bias: float
    woman_bias: float
    man_bias: float
    correlation: float
    perplexity: float
    arithmetic_accuracy: float
    super_weights: tuple[tuple[int, int, int], ...]  # detected (layer, row, col)


@dataclass(frozen=True)
class EditEffect:
    """One edit (``"cna"`` or ``"random"``): its neurons, measurement and changes from the unedited model."""

    kind: str
    neurons: tuple[Neuron, ...]
    measured: Measurement
    bias_reduction_pct: float
    woman_bias_reduction_pct: float
    man_bias_reduction_pct: float
    perplexity_change_pct: float
    arithmetic_change: float  # accuracy points (edited − unedited), in [−1, 1]
    superweights_intact: bool
    superweights_found: bool


@dataclass(frozen=True)
class BiasEditResult(CheckResult):
    """The CNA edit and its random control (module docstring), with the ranking evidence."""

    k: int
    ranking: NeuronRanking
    baseline: Measurement
    edit: EditEffect
    control: EditEffect
    corpus: str
    n_windows: int
    n_arithmetic: int

    @metric_group(*("k", "baseline_total_bias", "baseline_perplexity", "baseline_arithmetic_accuracy",
             "n_super_weights",
             "total_bias", "bias_reduction_pct", "perplexity_change_pct", "arithmetic_change",
             "superweights_intact", "superweights_found", "control_total_bias", "control_bias_reduction_pct",
             "control_perplexity_change_pct", "control_arithmetic_change", "control_superweights_intact",
             "control_superweights_found", "reduction_over_control_pct"))
    def _metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {"k": self.k, "baseline_total_bias": self.baseline.total_bias,
                               "baseline_perplexity": self.baseline.perplexity,
                               "baseline_arithmetic_accuracy": self.baseline.arithmetic_accuracy,
                               "n_super_weights": len(self.baseline.super_weights)}
        for prefix, effect in (("", self.edit), ("control_", self.control)):
            out.update({
                f"{prefix}total_bias": effect.measured.total_bias,
                f"{prefix}bias_reduction_pct": effect.bias_reduction_pct,
                f"{prefix}perplexity_change_pct": effect.perplexity_change_pct,
                f"{prefix}arithmetic_change": effect.arithmetic_change,
                f"{prefix}superweights_intact": effect.superweights_intact,
                f"{prefix}superweights_found": effect.superweights_found,
            })
        out["reduction_over_control_pct"] = self.edit.bias_reduction_pct - self.control.bias_reduction_pct
        return out


Measure = Callable[..., Measurement]  # (context, scores=None) -> Measurement


def measurer(model: Any, tokenizer: Any, adapter: ArchitectureAdapter, *, templates: Sequence[Template],
             occupations: Sequence[Occupation], corpus: Corpus, seq_len: int, n_windows: int,
             problems: Sequence[ArithmeticProblem], batch_size: int = 32) -> Measure:
    """``measure(context, scores=None)``: bias, perplexity, arithmetic and super weights inside ``context``
    (``scores``: bias scores already computed in that state, e.g. the unedited baseline)."""
    windows = corpus_windows(tokenizer, corpus, seq_len, n_windows)

    def measure(context: AbstractContextManager[Any], scores: BiasScores | None = None) -> Measurement:
        with context:
            bias = scores or occupation_bias(model, tokenizer, templates=templates, occupations=occupations,
                                             batch_size=batch_size)
            ppl, _, _ = perplexity_from_nll(window_nll(model, windows), windows)
            accuracy = arithmetic_accuracy(model, tokenizer, problems).accuracy if problems else float("nan")
            detection = detect_super_weights(adapter, tokenizer)
        return Measurement(bias.total_bias, bias.woman_bias, bias.man_bias, bias.correlation, ppl, accuracy,
                           tuple(tuple(c) for c in detection.coordinates))

    return measure


def _effect(kind: str, neurons: tuple[Neuron, ...], measured: Measurement, base: Measurement,
            adapter: ArchitectureAdapter, weights_before: list[float]) -> EditEffect:
    zeroed = set(neurons)
    weights_after = [float(adapter.down_proj_weight(layer)[row, col])
                     for layer, row, col in base.super_weights]
    spared = all((layer, col) not in zeroed for layer, _, col in base.super_weights)
    intact = spared and weights_after == weights_before
    return EditEffect(
        kind=kind, neurons=neurons, measured=measured,
        bias_reduction_pct=reduction_pct(base.total_bias, measured.total_bias),
        woman_bias_reduction_pct=reduction_pct(base.woman_bias, measured.woman_bias),
        man_bias_reduction_pct=reduction_pct(base.man_bias, measured.man_bias),
        perplexity_change_pct=100.0 * (measured.perplexity / base.perplexity - 1.0),
        arithmetic_change=measured.arithmetic_accuracy - base.arithmetic_accuracy,
        superweights_intact=intact, superweights_found=measured.super_weights == base.super_weights,
    )


def default_problems(n: int, *, seed: int = 0) -> list[ArithmeticProblem]:
    """``n`` one-digit additions, symbolic template, 3-shot (``"2+3=5\\n...\\n4+1="``)."""
    if not n:
        return []
    return generate_problems(ops="+", digits=1, n_per_op=n, template="symbolic", few_shot=3, seed=seed)


def edit_bias(
    model: Any, tokenizer: Any, adapter: ArchitectureAdapter, corpus: Corpus, *, k: int = 20,
    templates: Sequence[Template] = TEMPLATES, rank_templates: int = 1, n_per_side: int = 4,
    n_layers: int = 3,
    layers: Sequence[int] | None = None, seq_len: int = 256, n_windows: int = 4, n_arithmetic: int = 40,
    seed: int = 0, baseline_scores: BiasScores | None = None, occupations: Sequence[Occupation] | None = None,
    batch_size: int = 32,
) -> BiasEditResult:
    """Rank, zero the top ``k`` neurons and ``k`` random ones, and measure both (module docstring)."""
    if k < 1:
        raise LmAuditError(f"k must be >= 1, got {k}")
    if not 1 <= rank_templates <= len(templates):
        raise LmAuditError(f"rank_templates must be in 1..{len(templates)}, got {rank_templates}")
    occupations = tuple(occupations) if occupations is not None else occupation_table()
    scores = baseline_scores or occupation_bias(model, tokenizer, templates=templates,
                                                occupations=occupations, batch_size=batch_size)
    ranking = rank_bias_neurons(model, tokenizer, adapter, scores, k=k, occupations=occupations,
                                templates=templates[:rank_templates], n_per_side=n_per_side,
                                n_layers=n_layers, layers=layers)
    control = random_neurons(adapter, list(ranking.layers), len(ranking.neurons), seed=seed,
                             exclude=ranking.neurons)
    measure = measurer(model, tokenizer, adapter, templates=templates, occupations=occupations, corpus=corpus,
                       seq_len=seq_len, n_windows=n_windows,
                       problems=default_problems(n_arithmetic, seed=seed), batch_size=batch_size)
    base = measure(nullcontext(), scores)
    weights = [float(adapter.down_proj_weight(layer)[row, col]) for layer, row, col in base.super_weights]
    effects = [_effect(kind, neurons, measure(zero_neurons(adapter, neuron_spec(neurons))), base, adapter,
                       weights) for kind, neurons in (("cna", ranking.neurons), ("random", control))]
    return BiasEditResult(k=k, ranking=ranking, baseline=base, edit=effects[0], control=effects[1],
                          corpus=corpus.name, n_windows=n_windows, n_arithmetic=n_arithmetic)
