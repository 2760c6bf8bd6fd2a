"""Comparative Neuron Analysis (Yu & Ananiadou 2024): compare neuron scores between two conditions, check that
the top neurons matter (against the paper's random-neuron control), and prune to the top neurons.

- :func:`compare_scores` puts two :class:`~checks.neuron_scores.NeuronScores` side by side, neuron by neuron:
  ``importance`` and ``coefficient`` under A and under B and ``Δ = B − A``. The conditions are built by
  :func:`compare_head_ablated` (original vs heads ablated, :func:`checks.interventions.ablate_heads`),
  :func:`compare_models` (e.g. base vs the LoRA fine-tune of :func:`checks.finetune.lora_finetune`, or any two
  models sharing a tokenizer) and :func:`compare_prompts`.
- :func:`intervention_check`: mean importance over prompts (target = first answer token) ranks the neurons of
  ``layers``; zeroing the top ``k`` should drop accuracy far more than zeroing ``k`` random neurons of the same
  layers (seeded draws; mean over ``n_random`` draws). Both accuracies are reported.
- :func:`prune_to_top`: keep only the top-``N`` neurons of each chosen layer, zero the rest, report accuracy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from checks.adapter import adapter_for
from checks.arithmetic_data import ArithmeticProblem
from checks.arithmetic_eval import arithmetic_accuracy
from checks.interventions import ablate_heads, zero_neurons
from checks.neuron_scores import (
    DEFAULT_CHUNK,
    NeuronScores,
    batched_neuron_scores,
    neuron_scores,
    top_neurons,
)


@dataclass(frozen=True)
class NeuronDelta:
    """One neuron under conditions A and B; ``Δ = B − A``."""

    layer: int
    neuron: int
    importance_a: float
    importance_b: float
    coefficient_a: float
    coefficient_b: float

    @property
    def importance_delta(self) -> float:
        return self.importance_b - self.importance_a

    @property
    def coefficient_delta(self) -> float:
        return self.coefficient_b - self.coefficient_a


@dataclass(frozen=True)
class CnaComparison:
    """The union of each condition's top-``k`` neurons, sorted by ``|Δ importance|``, largest first."""

    label_a: str
    label_b: str
    prompt_a: str
    prompt_b: str
    target_a: str
    target_b: str
    k: int
    top_a: tuple[tuple[int, int], ...]
    top_b: tuple[tuple[int, int], ...]
    rows: tuple[NeuronDelta, ...]

    @property
    def overlap(self) -> float:
        """``|top_a ∩ top_b| / k``: 1 when both conditions rely on the same neurons."""
        return len(set(self.top_a) & set(self.top_b)) / max(1, self.k)

    def metrics(self) -> dict[str, Any]:
        return {
            "top_overlap": self.overlap,
            "max_abs_importance_delta": max((abs(r.importance_delta) for r in self.rows), default=0.0),
            "top_neuron_a": f"L{self.top_a[0][0]}.N{self.top_a[0][1]}" if self.top_a else "",
            "top_neuron_b": f"L{self.top_b[0][0]}.N{self.top_b[0][1]}" if self.top_b else "",
        }


def compare_scores(a: NeuronScores, b: NeuronScores, *, k: int = 20,
                   labels: tuple[str, str] = ("A", "B")) -> CnaComparison:
    """Neuron-by-neuron comparison of two score tables of the same shape."""
    if a.importance.shape != b.importance.shape:
        raise ValueError(f"score shapes differ: {tuple(a.importance.shape)} vs {tuple(b.importance.shape)}")
    top_a = tuple((layer, n) for layer, n, _ in top_neurons(a, k))
    top_b = tuple((layer, n) for layer, n, _ in top_neurons(b, k))
    rows = [NeuronDelta(layer, n, float(a.importance[layer, n]), float(b.importance[layer, n]),
                        float(a.coefficient[layer, n]), float(b.coefficient[layer, n]))
            for layer, n in dict.fromkeys(top_a + top_b)]
    rows.sort(key=lambda r: -abs(r.importance_delta))
    return CnaComparison(labels[0], labels[1], a.prompt, b.prompt, a.target, b.target, k, top_a, top_b,
                         tuple(rows))


def compare_head_ablated(model: Any, tokenizer: Any, prompt: str, target: str, heads: Mapping[int, Sequence[int]],
                         *, k: int = 20, layers: Sequence[int] | None = None,
                         chunk: int = DEFAULT_CHUNK) -> CnaComparison:
    """Original vs the same model with ``heads`` ({layer: [heads]}) ablated, same prompt and target."""
    adapter = adapter_for(model)
    original = neuron_scores(model, tokenizer, prompt, target, layers=layers, chunk=chunk, adapter=adapter)
    with ablate_heads(adapter, heads):
        ablated = neuron_scores(model, tokenizer, prompt, target, layers=layers, chunk=chunk, adapter=adapter)
    name = ", ".join(f"L{layer}.H{h}" for layer, hs in sorted(heads.items()) for h in hs)
    return compare_scores(original, ablated, k=k, labels=("original", f"ablated {name}"))


def compare_models(model_a: Any, model_b: Any, tokenizer: Any, prompt: str, target: str, *, k: int = 20,
                   layers: Sequence[int] | None = None, labels: tuple[str, str] = ("base", "fine-tuned"),
                   chunk: int = DEFAULT_CHUNK) -> CnaComparison:
    """Two models of the same architecture (e.g. base vs LoRA fine-tune) on one prompt and target."""
    a = neuron_scores(model_a, tokenizer, prompt, target, layers=layers, chunk=chunk)
    b = neuron_scores(model_b, tokenizer, prompt, target, layers=layers, chunk=chunk)
    return compare_scores(a, b, k=k, labels=labels)


def compare_prompts(model: Any, tokenizer: Any, prompt_a: str, target_a: str, prompt_b: str, target_b: str, *,
                    k: int = 20, layers: Sequence[int] | None = None, chunk: int = DEFAULT_CHUNK) -> CnaComparison:
    a, b = batched_neuron_scores(model, tokenizer, [prompt_a, prompt_b], [target_a, target_b], layers=layers,
                                 chunk=chunk)
    return compare_scores(a, b, k=k, labels=(prompt_a.splitlines()[-1], prompt_b.splitlines()[-1]))


# ------------------------------------------------------------------------- intervention and pruning


def mean_importance(model: Any, tokenizer: Any, problems: Sequence[ArithmeticProblem], *,
                    layers: Sequence[int] | None = None, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """``(n_layers, intermediate)`` mean CNA importance over problems. The prompt is ``prompt + answer_prefix``
    (the template's space, if any) and the target the answer's first token, so the target is a digit."""
    scores = batched_neuron_scores(model, tokenizer, [p.prompt + p.template.answer_prefix for p in problems],
                                   [p.answer for p in problems], layers=layers, chunk=chunk)
    return torch.stack([s.importance for s in scores]).mean(dim=0)


def _spec(neurons: Sequence[tuple[int, int]]) -> dict[int, list[int]]:
    spec: dict[int, list[int]] = {}
    for layer, n in neurons:
        spec.setdefault(int(layer), []).append(int(n))
    return spec


@dataclass(frozen=True)
class InterventionCheck:
    """Accuracy with the top-``k`` CNA neurons zeroed vs ``k`` random neurons of the same layers zeroed."""

    k: int
    layers: tuple[int, ...]
    top: tuple[tuple[int, int, float], ...]  # (layer, neuron, mean importance)
    baseline: float
    top_zeroed: float
    random_zeroed: tuple[float, ...]  # one accuracy per seeded random draw
    n_prompts_scored: int

    @property
    def random_mean(self) -> float:
        return sum(self.random_zeroed) / len(self.random_zeroed)

    def metrics(self) -> dict[str, Any]:
        top_drop, random_drop = self.baseline - self.top_zeroed, self.baseline - self.random_mean
        return {
            "baseline_accuracy": self.baseline,
            "top_zeroed_accuracy": self.top_zeroed,
            "random_zeroed_accuracy": self.random_mean,
            "top_drop_points": 100 * top_drop,
            "random_drop_points": 100 * random_drop,
            "drop_gap_points": 100 * (top_drop - random_drop),
        }


def intervention_check(
    model: Any, tokenizer: Any, problems: Sequence[ArithmeticProblem], *, k: int, layers: Sequence[int],
    score_problems: Sequence[ArithmeticProblem] | None = None, n_random: int = 3, seed: int = 0,
    chunk: int = DEFAULT_CHUNK,
) -> InterventionCheck:
    """Zero the top-``k`` neurons (by mean importance on ``score_problems``, default ``problems``) vs ``k``
    random neurons drawn uniformly from the same layers (``torch.Generator`` seeded with ``seed + draw``)."""
    adapter = adapter_for(model)
    layers = sorted(set(layers))
    scored = list(score_problems or problems)
    importance = mean_importance(model, tokenizer, scored, layers=layers, chunk=chunk)
    top = top_neurons(importance, k)
    baseline = arithmetic_accuracy(model, tokenizer, problems).accuracy
    with zero_neurons(adapter, _spec([(layer, n) for layer, n, _ in top])):
        top_zeroed = arithmetic_accuracy(model, tokenizer, problems).accuracy
    randoms = []
    width = adapter.intermediate_size
    for draw in range(n_random):
        generator = torch.Generator().manual_seed(seed + draw)
        flat = torch.randperm(len(layers) * width, generator=generator)[:k]
        chosen = [(layers[int(i) // width], int(i) % width) for i in flat]
        with zero_neurons(adapter, _spec(chosen)):
            randoms.append(arithmetic_accuracy(model, tokenizer, problems).accuracy)
    return InterventionCheck(k, tuple(layers), tuple(top), baseline, top_zeroed, tuple(randoms), len(scored))


@dataclass(frozen=True)
class PruningResult:
    """Accuracy when each of ``layers`` keeps only its top-``keep`` CNA neurons (the rest zeroed)."""

    keep: int
    layers: tuple[int, ...]
    baseline: float
    pruned: float
    random_pruned: float  # the same number of random neurons kept per layer (seeded)
    zeroed_per_layer: int

    def metrics(self) -> dict[str, Any]:
        return {"baseline_accuracy": self.baseline, "pruned_accuracy": self.pruned,
                "random_pruned_accuracy": self.random_pruned,
                "pruned_drop_points": 100 * (self.baseline - self.pruned),
                "kept_fraction": self.keep / (self.keep + self.zeroed_per_layer)}


def prune_to_top(
    model: Any, tokenizer: Any, problems: Sequence[ArithmeticProblem], *, keep: int, layers: Sequence[int],
    score_problems: Sequence[ArithmeticProblem] | None = None, seed: int = 0, chunk: int = DEFAULT_CHUNK,
) -> PruningResult:
    """Keep the top-``keep`` neurons of each layer by mean importance; zero every other neuron of that layer."""
    adapter = adapter_for(model)
    layers = sorted(set(layers))
    importance = mean_importance(model, tokenizer, list(score_problems or problems), layers=layers, chunk=chunk)
    width = adapter.intermediate_size
    generator = torch.Generator().manual_seed(seed)

    def zero_all_but(kept: Mapping[int, torch.Tensor]) -> dict[int, list[int]]:
        spec = {}
        for layer in layers:
            mask = torch.ones(width, dtype=torch.bool)
            mask[kept[layer]] = False
            spec[layer] = torch.nonzero(mask).flatten().tolist()
        return spec

    best = {layer: torch.topk(importance[layer], keep).indices for layer in layers}
    rand = {layer: torch.randperm(width, generator=generator)[:keep] for layer in layers}
    baseline = arithmetic_accuracy(model, tokenizer, problems).accuracy
    with zero_neurons(adapter, zero_all_but(best)):
        pruned = arithmetic_accuracy(model, tokenizer, problems).accuracy
    with zero_neurons(adapter, zero_all_but(rand)):
        random_pruned = arithmetic_accuracy(model, tokenizer, problems).accuracy
    return PruningResult(keep, tuple(layers), baseline, pruned, random_pruned, width - keep)
