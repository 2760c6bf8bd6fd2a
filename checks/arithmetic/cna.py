"""Comparative Neuron Analysis (Yu & Ananiadou 2024): compare neuron scores between two conditions, check that
the top neurons matter (against the paper's random-neuron control), and prune to the top neurons.

- :func:`compare_scores` puts two :class:`~lmaudit.checks.core.neuron_scores.NeuronScores` side by side, neuron by neuron:
  ``importance`` and ``coefficient`` under A and under B and ``Δ = B − A``, with each neuron's logit lens when
  asked. The conditions are built by :func:`compare_head_ablated` (original vs heads ablated,
  :func:`lmaudit.checks.core.interventions.ablate_heads`), :func:`compare_models` (e.g. base vs the LoRA fine-tune of
  :func:`lmaudit.checks.core.finetune.lora_finetune`, or any two models sharing a tokenizer) and :func:`compare_prompts`.
  Each takes one prompt or a list of prompts; with a list, the per-prompt scores are averaged (what CNA ranks).
- :func:`intervention_check`: mean importance over prompts (target = first answer token) ranks the neurons of
  ``layers``; zeroing the top ``k`` should drop accuracy far more than zeroing ``k`` random neurons of the same
  layers (seeded draws; mean over ``n_random`` draws). Both accuracies are reported.
- :func:`prune_to_top`: keep only the top-``N`` neurons of each chosen layer, zero the rest, against keeping
  ``N`` random neurons of each layer (the same control).

Accuracy under these interventions comes from :class:`StartLayerEvaluator`: every intervention here touches
only layers ``≥ min(layers)``, so the clean states below that layer and the clean few-shot prefix cache below
it are computed once and reused (exact given the same inputs, see the class).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lmaudit.checks.arithmetic.head_sweep import common_prefix_length
from lmaudit.checks.core.accuracy import (
    ArithmeticAccuracy,
    EncodedAnswer,
    arithmetic_accuracy,
    digit_start_mask,
    encode_problems,
    pad_token_id,
    summarize,
    teacher_forced_batch,
    teacher_forcing_is_exact,
)
from lmaudit.checks.core.adapter import ArchitectureAdapter, adapter_for
from lmaudit.checks.core.arithmetic_problems import ArithmeticProblem
from lmaudit.checks.core.hooks import capture
from lmaudit.checks.core.interventions import ablate_heads, zero_neurons
from lmaudit.checks.core.kv_cache import cache_argument, cache_from, layer_keys_values
from lmaudit.checks.core.layer_skip import start_at_layer
from lmaudit.checks.core.neuron_scores import (
    DEFAULT_CHUNK,
    NeuronScores,
    batched_neuron_scores,
    last_position_states,
    logit_lens,
    mean_scores,
    scores_from_states,
    target_token_id,
    top_neurons,
)
from lmaudit.checks.core.results import CheckResult, metric_group

Neuron = tuple[int, int]  # (layer, neuron)


@dataclass(frozen=True)
class NeuronDelta:
    """One neuron under conditions A and B; ``Δ = B − A``. ``promotes``/``suppresses``: its logit lens (the
    tokens ``m_A·fc2_k`` of model A raises and lowers most), empty when not asked for."""

    layer: int
    neuron: int
    importance_a: float
    importance_b: float
    coefficient_a: float
    coefficient_b: float
    promotes: tuple[str, ...] = ()
    suppresses: tuple[str, ...] = ()

    @property
    def importance_delta(self) -> float:
        return self.importance_b - self.importance_a

    @property
    def coefficient_delta(self) -> float:
        return self.coefficient_b - self.coefficient_a


@dataclass(frozen=True)
class CnaComparison(CheckResult):
    """The union of each condition's top-``k`` neurons, sorted by ``|Δ importance|``, largest first.

    Summaries over A's top ``k`` (the neurons A relies on)::

        importance_retention = Σ_{top_a} importance_B / Σ_{top_a} importance_A
        coefficient_gain     = Σ_{top_a} sign(m_A)·m_B / Σ_{top_a} |m_A|      (> 1: B activates them more)
    """

    label_a: str
    label_b: str
    prompt_a: str
    prompt_b: str
    target_a: str
    target_b: str
    k: int
    top_a: tuple[Neuron, ...]
    top_b: tuple[Neuron, ...]
    rows: tuple[NeuronDelta, ...]
    n_prompts: int = 1  # prompts averaged per condition
    condition: str = ""  # what differs between A and B (e.g. "finetune")

    @property
    def overlap(self) -> float:
        """``|top_a ∩ top_b| / k``: 1 when both conditions rely on the same neurons."""
        return len(set(self.top_a) & set(self.top_b)) / max(1, self.k)

    def _top_a_rows(self) -> list[NeuronDelta]:
        by_neuron = {(r.layer, r.neuron): r for r in self.rows}
        return [by_neuron[n] for n in self.top_a]

    @property
    def importance_retention(self) -> float:
        rows = self._top_a_rows()
        total = sum(r.importance_a for r in rows)
        return sum(r.importance_b for r in rows) / total if total else float("nan")

    @property
    def coefficient_gain(self) -> float:
        rows = self._top_a_rows()
        total = sum(abs(r.coefficient_a) for r in rows)
        signed = sum(r.coefficient_b * (1.0 if r.coefficient_a >= 0 else -1.0) for r in rows)
        return signed / total if total else float("nan")

    @metric_group(*("top_overlap", "importance_retention", "coefficient_gain", "max_abs_importance_delta",
                         "top_neuron_a", "top_neuron_b"))
    def _metrics(self) -> dict[str, Any]:
        return {
            "top_overlap": self.overlap,
            "importance_retention": self.importance_retention,
            "coefficient_gain": self.coefficient_gain,
            "max_abs_importance_delta": max((abs(r.importance_delta) for r in self.rows), default=0.0),
            "top_neuron_a": f"L{self.top_a[0][0]}.N{self.top_a[0][1]}" if self.top_a else "",
            "top_neuron_b": f"L{self.top_b[0][0]}.N{self.top_b[0][1]}" if self.top_b else "",
        }


def compare_scores(a: NeuronScores, b: NeuronScores, *, k: int = 20, labels: tuple[str, str] = ("A", "B"),
                   lens: tuple[ArchitectureAdapter, Any] | None = None, lens_k: int = 5, n_prompts: int = 1,
                   condition: str = "") -> CnaComparison:
    """Neuron-by-neuron comparison of two score tables of the same shape.

    ``lens = (adapter, tokenizer)`` of model A adds each row's logit lens (:func:`~lmaudit.checks.core.neuron_scores.logit_lens`
    of ``m_A·fc2_k``, ``lens_k`` tokens each way)."""
    if a.importance.shape != b.importance.shape:
        raise ValueError(f"score shapes differ: {tuple(a.importance.shape)} vs {tuple(b.importance.shape)}")
    top_a = tuple((layer, n) for layer, n, _ in top_neurons(a, k))
    top_b = tuple((layer, n) for layer, n, _ in top_neurons(b, k))
    rows = []
    for layer, n in dict.fromkeys(top_a + top_b):
        promotes: tuple[str, ...] = ()
        suppresses: tuple[str, ...] = ()
        if lens is not None:
            up, down = logit_lens(lens[0], lens[1], layer, n, coefficient=float(a.coefficient[layer, n]), k=lens_k)
            promotes, suppresses = tuple(t for t, _ in up), tuple(t for t, _ in down)
        rows.append(NeuronDelta(layer, n, float(a.importance[layer, n]), float(b.importance[layer, n]),
                                float(a.coefficient[layer, n]), float(b.coefficient[layer, n]), promotes, suppresses))
    rows.sort(key=lambda r: -abs(r.importance_delta))
    return CnaComparison(labels[0], labels[1], a.prompt, b.prompt, a.target, b.target, k, top_a, top_b,
                         tuple(rows), n_prompts, condition)


def _as_list(value: str | Sequence[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def average(scores: Sequence[NeuronScores]) -> NeuronScores:
    """One prompt's scores as they are; several prompts' element-wise mean, described by their count."""
    if len(scores) == 1:
        return scores[0]
    example = scores[0].prompt.splitlines()[-1] if scores[0].prompt else ""
    return mean_scores(scores, prompt=f"mean over {len(scores)} prompts, e.g. {example!r}",
                       target="each prompt's answer")


def prompt_set_scores(model: Any, tokenizer: Any, prompts: str | Sequence[str], targets: str | Sequence[str], *,
                      layers: Sequence[int] | None = None, chunk: int = DEFAULT_CHUNK,
                      adapter: ArchitectureAdapter | None = None) -> NeuronScores:
    """One prompt's scores, or the mean over several prompts (one batched pass)."""
    prompts, targets = _as_list(prompts), _as_list(targets)
    scores = batched_neuron_scores(model, tokenizer, prompts, targets, layers=layers, chunk=chunk, adapter=adapter)
    return average(scores)


def compare_head_ablated(model: Any, tokenizer: Any, prompt: str | Sequence[str], target: str | Sequence[str],
                         heads: Mapping[int, Sequence[int]], *, k: int = 20, layers: Sequence[int] | None = None,
                         chunk: int = DEFAULT_CHUNK, lens: bool = False,
                         original: NeuronScores | None = None) -> CnaComparison:
    """Original vs the same model with ``heads`` ({layer: [heads]}) ablated, same prompts and targets.

    ``original``: the clean scores when already computed (same prompts and layers). Otherwise both conditions
    are scored with one pass over each layer's ``U`` (:meth:`~lmaudit.checks.core.neuron_scores.LastStates.concat`)."""
    adapter = adapter_for(model)
    prompts, targets = _as_list(prompt), _as_list(target)
    ids = [target_token_id(tokenizer, p, t) for p, t in zip(prompts, targets, strict=True)]
    with ablate_heads(adapter, heads):
        ablated_states = last_position_states(model, tokenizer, prompts, layers=layers, adapter=adapter)
    n = len(prompts)
    if original is None:
        clean_states = last_position_states(model, tokenizer, prompts, layers=layers, adapter=adapter)
        both = scores_from_states(adapter, clean_states.concat(ablated_states), prompts * 2, targets * 2, ids * 2,
                                  chunk=chunk)
        clean, ablated = both[:n], both[n:]
    else:
        clean, ablated = [], scores_from_states(adapter, ablated_states, prompts, targets, ids, chunk=chunk)
    a, b = original or average(clean), average(ablated)
    name = ", ".join(f"L{layer}.H{h}" for layer, hs in sorted(heads.items()) for h in hs)
    return compare_scores(a, b, k=k, labels=("original", f"ablated {name}"),
                          lens=(adapter, tokenizer) if lens else None, n_prompts=n, condition="head_ablated")


def compare_models(model_a: Any, model_b: Any, tokenizer: Any, prompt: str | Sequence[str],
                   target: str | Sequence[str], *, k: int = 20, layers: Sequence[int] | None = None,
                   labels: tuple[str, str] = ("base", "fine-tuned"), chunk: int = DEFAULT_CHUNK, lens: bool = False,
                   scores_a: NeuronScores | None = None, condition: str = "models") -> CnaComparison:
    """Two models of the same architecture (e.g. base vs LoRA fine-tune) on the same prompts and targets.

    ``scores_a``: model A's scores when already computed (same prompts and layers)."""
    a = scores_a or prompt_set_scores(model_a, tokenizer, prompt, target, layers=layers, chunk=chunk)
    b = prompt_set_scores(model_b, tokenizer, prompt, target, layers=layers, chunk=chunk)
    return compare_scores(a, b, k=k, labels=labels, lens=(adapter_for(model_a), tokenizer) if lens else None,
                          n_prompts=len(_as_list(prompt)), condition=condition)


def compare_prompts(model: Any, tokenizer: Any, prompt_a: str | Sequence[str], target_a: str | Sequence[str],
                    prompt_b: str | Sequence[str], target_b: str | Sequence[str], *, k: int = 20,
                    layers: Sequence[int] | None = None, chunk: int = DEFAULT_CHUNK, lens: bool = False,
                    labels: tuple[str, str] | None = None) -> CnaComparison:
    """One model on two prompts (or two prompt sets, averaged), scored in one batch."""
    prompts_a, targets_a = _as_list(prompt_a), _as_list(target_a)
    prompts_b, targets_b = _as_list(prompt_b), _as_list(target_b)
    scores = batched_neuron_scores(model, tokenizer, prompts_a + prompts_b, targets_a + targets_b, layers=layers,
                                   chunk=chunk)
    if labels is None:
        labels = (prompts_a[0].splitlines()[-1], prompts_b[0].splitlines()[-1])
    return compare_scores(average(scores[:len(prompts_a)]), average(scores[len(prompts_a):]), k=k, labels=labels,
                          lens=(adapter_for(model), tokenizer) if lens else None,
                          n_prompts=min(len(prompts_a), len(prompts_b)), condition="prompts")


# ----------------------------------------------------------------------- accuracy under an intervention


@dataclass(frozen=True)
class _PrefixGroup:
    """Problems sharing one token prefix: its clean cache and the clean states entering the start layer."""

    index: torch.Tensor  # (n,) positions in the problem list
    prefix: torch.Tensor  # (1, P) shared prefix ids (P may be 0)
    prefix_hidden: torch.Tensor | None  # (1, P, hidden) entering the start layer
    prefix_kv: list[tuple[torch.Tensor, torch.Tensor]]  # clean keys/values per layer, batch 1
    batch: Any  # TeacherForcedBatch of the suffixes (after the prefix)
    suffix_hidden: torch.Tensor | None  # (n, S, hidden) entering the start layer (None when it is 0)


class StartLayerEvaluator:
    """Greedy exact-match correctness of fixed problems (teacher forced, :mod:`lmaudit.checks.core.accuracy`), clean
    and under any intervention confined to layers ``≥ start``.

    Construction runs the clean model once: problems are grouped (``groups``, default: by the prompt text
    before its last line, i.e. the shared few-shot examples); each group's common token prefix runs once with
    a KV cache, then its suffixes (rest of the prompt + answer) run on that cache. The hidden states entering
    layer ``start`` of both are kept (:attr:`baseline` is the clean correctness).

    :meth:`correct`, called inside an intervention's ``with`` block, re-runs only layers ``≥ start``
    (:func:`lmaudit.checks.core.layer_skip.start_at_layer`): the group prefix from its clean hidden state, then the suffixes
    on the clean cache below ``start`` and the intervened prefix cache from ``start`` on. Layers below ``start``
    are unaffected by such an intervention, so this is the full evaluation with fewer operations. With a prefix
    of ``P`` tokens and suffixes of ``S``, an intervened evaluation costs ``(n_layers − start)/n_layers`` of
    ``P + n·S`` tokens instead of ``n·(P + S)``.

    Judging (:func:`lmaudit.checks.core.accuracy.judge`'s rule) unembeds only what decides it: slot ``j`` of a problem
    (answer token ``j``, then the stop check) is computed only while slots ``< j`` were right, as
    ``argmax adapter.logits(h)`` of the final residual ``h`` at that position. On the default model the
    unembedding of every checked position cost more than the six re-run layers.
    """

    def __init__(self, model: Any, tokenizer: Any, encoded: Sequence[EncodedAnswer], start: int, *,
                 groups: Sequence[Any] | None = None, adapter: ArchitectureAdapter | None = None,
                 stop_check: bool = True) -> None:
        self.model, self.adapter = model, adapter or adapter_for(model)
        if not 0 <= start < self.adapter.n_layers:
            raise IndexError(f"start layer {start} out of range 0..{self.adapter.n_layers - 1}")
        self.start, self.n = start, len(encoded)
        self._digit_start = digit_start_mask(tokenizer)
        # The judge unembeds only what it needs, so the model computes no logits (an empty logits_to_keep).
        self._no_logits = ({"logits_to_keep": torch.zeros(0, dtype=torch.long)}
                           if "logits_to_keep" in inspect.signature(model.forward).parameters else {})
        labels = list(groups) if groups is not None else [0] * len(encoded)
        if len(labels) != len(encoded):
            raise ValueError(f"{len(encoded)} problems but {len(labels)} group labels")
        pad = pad_token_id(tokenizer)
        self._groups: list[_PrefixGroup] = []
        finals = []
        for label in dict.fromkeys(labels):
            index = torch.tensor([i for i, g in enumerate(labels) if g == label])
            group, final = self._prepare([encoded[i] for i in index], index, pad, stop_check)
            self._groups.append(group)
            finals.append(final)
        self.baseline = self._judge(finals)  # (n,) clean correctness

    @classmethod
    def for_problems(cls, model: Any, tokenizer: Any, problems: Sequence[ArithmeticProblem], start: int, *,
                     adapter: ArchitectureAdapter | None = None) -> StartLayerEvaluator:
        """Grouped by the prompt text before its last line (the few-shot examples)."""
        return cls(model, tokenizer, encode_problems(tokenizer, problems), start, adapter=adapter,
                   groups=[p.prompt.rpartition("\n")[0] for p in problems])

    @torch.no_grad()
    def _prepare(self, encoded: list[EncodedAnswer], index: torch.Tensor, pad: int,
                 stop_check: bool) -> tuple[_PrefixGroup, torch.Tensor]:
        """The clean passes of one group: ``(group, final residuals at its checked slots)``."""
        prefix_len = common_prefix_length(encoded)
        prefix = torch.tensor([encoded[0].sequence[:prefix_len]], dtype=torch.long)
        prefix_hidden, prefix_kv = None, []
        if prefix_len:
            out = self.model(input_ids=prefix.to(self.adapter.device), use_cache=True, output_hidden_states=True,
                             **self._no_logits)
            prefix_hidden, prefix_kv = out.hidden_states[self.start], layer_keys_values(out)
        batch = teacher_forced_batch(encoded, pad_id=pad, offset=prefix_len, stop_check=stop_check)
        below = {"below": self.adapter.layer_list[self.start - 1]} if self.start else {}
        with capture(below, what="output") as cap:  # the output of layer start − 1 enters layer start
            final = self._suffix_final(prefix, batch, prefix_kv, 0)
        group = _PrefixGroup(index, prefix, prefix_hidden, prefix_kv, batch, cap.output("below") if self.start else None)
        return group, final

    def _suffix_final(self, prefix: torch.Tensor, batch: Any, kv: list, skipped: int) -> torch.Tensor:
        """Run the suffixes of ``batch`` after the cached ``prefix`` (``kv``; none without a prefix): the final
        residual (the final norm's input) at each checked slot, ``(n, slots, hidden)``. The ``skipped`` lowest
        layers never read their cache (:func:`start_at_layer`): they stay at batch 1 there (the cache copies each
        tensor once)."""
        n = len(batch)
        kwargs: dict[str, Any] = {"attention_mask": batch.attention_mask, "use_cache": False, **self._no_logits}
        if kv:
            kwargs[cache_argument(self.model)] = cache_from(self.model, list(kv[:skipped]) + [
                (k.expand(n, *k.shape[1:]), v.expand(n, *v.shape[1:])) for k, v in kv[skipped:]])
            kwargs["use_cache"] = True
            kwargs["attention_mask"] = torch.cat([torch.ones(n, prefix.shape[1], dtype=torch.long),
                                                  batch.attention_mask], 1)
        device = self.adapter.device
        kwargs["attention_mask"] = kwargs["attention_mask"].to(device)
        with capture({"final": self.adapter.final_norm}, what="input") as cap:
            self.model(input_ids=batch.input_ids.to(device), **kwargs)
        rows = torch.arange(n)[:, None].to(device)
        return cap.input("final")[rows, batch.positions.to(device)]  # (n, slots, hidden)

    def _judge(self, finals: Sequence[torch.Tensor]) -> torch.Tensor:
        """``(n,)`` bool from each group's final residuals at its checked slots, slot by slot over all groups at
        once (one unembedding per slot), only for problems whose earlier slots were right."""
        slots = max(f.shape[1] for f in finals)
        index = torch.cat([g.index for g in self._groups])
        expected = torch.cat([torch.nn.functional.pad(g.batch.expected, (0, slots - g.batch.expected.shape[1]),
                                                      value=g.batch.PAD) for g in self._groups])  # (n, slots)
        ok = torch.ones(len(index), dtype=torch.bool)
        pad, stop = self._groups[0].batch.PAD, self._groups[0].batch.STOP
        for slot in range(slots):
            rows = torch.nonzero(ok & (expected[:, slot] != pad)).flatten()
            if not len(rows):
                break
            h = torch.cat([f[:, slot] if slot < f.shape[1] else f[:, -1] for f in finals])[rows]  # (m, hidden)
            predicted = self.adapter.logits(h).argmax(-1).cpu()  # (m,)
            want = expected[rows, slot]
            ok[rows] = torch.where(want == stop, ~self._digit_start[predicted], predicted == want)
        out = torch.zeros(self.n, dtype=torch.bool)
        out[index] = ok
        return out

    @torch.no_grad()
    def _rerun(self, group: _PrefixGroup) -> torch.Tensor:
        """One group's final residuals at its slots, running only layers ``≥ start`` (prefix, then suffixes)."""
        kv = group.prefix_kv
        if kv:
            with start_at_layer(self.adapter, self.start, group.prefix_hidden):
                out = self.model(input_ids=group.prefix.to(self.adapter.device), use_cache=True, **self._no_logits)
            kv = list(group.prefix_kv[:self.start]) + layer_keys_values(out)[self.start:]
        with start_at_layer(self.adapter, self.start, group.suffix_hidden):
            return self._suffix_final(group.prefix, group.batch, kv, self.start)

    @torch.no_grad()
    def correct(self) -> torch.Tensor:
        """``(n,)`` bool under whatever intervention is active (which must touch only layers ``≥ start``)."""
        return self._judge([self._rerun(group) for group in self._groups])


class ProblemAccuracy:
    """Accuracy of fixed arithmetic problems, clean and with neurons of layers ``≥ start`` zeroed: through
    :class:`StartLayerEvaluator` when teacher forcing is exact for the tokenizer, else full greedy evaluation."""

    def __init__(self, model: Any, tokenizer: Any, problems: Sequence[ArithmeticProblem], start: int) -> None:
        self.model, self.tokenizer, self.problems = model, tokenizer, list(problems)
        self.adapter = adapter_for(model)
        self.start = start
        self._evaluator = (StartLayerEvaluator.for_problems(model, tokenizer, self.problems, start)
                           if teacher_forcing_is_exact(tokenizer) else None)
        self.baseline = self._summary(None)

    def _summary(self, neurons: Mapping[int, Sequence[int]] | None) -> ArithmeticAccuracy:
        if self._evaluator is None:
            if neurons is None:
                return arithmetic_accuracy(self.model, self.tokenizer, self.problems)
            with zero_neurons(self.adapter, neurons):
                return arithmetic_accuracy(self.model, self.tokenizer, self.problems)
        if neurons is None:
            return summarize(self.problems, self._evaluator.baseline)
        with zero_neurons(self.adapter, neurons):
            return summarize(self.problems, self._evaluator.correct())

    def zeroed(self, neurons: Mapping[int, Sequence[int]]) -> ArithmeticAccuracy:
        """Accuracy with ``neurons`` ({layer: [k]}, every layer ``≥ start``) zeroed."""
        if neurons and min(neurons) < self.start:
            raise ValueError(f"neurons of layer {min(neurons)} lie below the evaluator's start layer {self.start}")
        return self._summary(neurons)


# ------------------------------------------------------------------------- intervention and pruning


def answer_prompts(problems: Sequence[ArithmeticProblem]) -> tuple[list[str], list[str]]:
    """CNA prompts and targets of problems: ``prompt + answer_prefix`` (the template's space, if any) and the
    answer, whose first token (a digit) is the target."""
    return [p.prompt + p.template.answer_prefix for p in problems], [p.answer for p in problems]


def mean_importance(model: Any, tokenizer: Any, problems: Sequence[ArithmeticProblem], *,
                    layers: Sequence[int] | None = None, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """``(n_layers, intermediate)`` mean CNA importance over problems (prompts: :func:`answer_prompts`)."""
    prompts, targets = answer_prompts(problems)
    return prompt_set_scores(model, tokenizer, prompts, targets, layers=layers, chunk=chunk).importance


def _spec(neurons: Sequence[tuple[int, int]]) -> dict[int, list[int]]:
    spec: dict[int, list[int]] = {}
    for layer, n in neurons:
        spec.setdefault(int(layer), []).append(int(n))
    return spec


@dataclass(frozen=True)
class InterventionCheck(CheckResult):
    """Accuracy with the top-``k`` CNA neurons zeroed vs ``k`` random neurons of the same layers zeroed."""

    k: int
    layers: tuple[int, ...]
    top: tuple[tuple[int, int, float], ...]  # (layer, neuron, mean importance)
    baseline: float
    top_zeroed: float
    random_zeroed: tuple[float, ...]  # one accuracy per seeded random draw
    n_prompts_scored: int
    n_prompts: int = 0  # evaluated problems: one problem is 100 / n_prompts points

    @property
    def random_mean(self) -> float:
        return sum(self.random_zeroed) / len(self.random_zeroed)

    @metric_group(*("baseline_accuracy", "top_zeroed_accuracy", "random_zeroed_accuracy", "top_drop_points",
                         "random_drop_points", "drop_gap_points", "top_minus_worst_random_points", "n_prompts"))
    def _metrics(self) -> dict[str, Any]:
        top_drop, random_drop = self.baseline - self.top_zeroed, self.baseline - self.random_mean
        return {
            "baseline_accuracy": self.baseline,
            "top_zeroed_accuracy": self.top_zeroed,
            "random_zeroed_accuracy": self.random_mean,
            "top_drop_points": 100 * top_drop,
            "random_drop_points": 100 * random_drop,
            "drop_gap_points": 100 * (top_drop - random_drop),
            # > 0: zeroing the top k hurts more than every random draw did
            "top_minus_worst_random_points": 100 * (min(self.random_zeroed) - self.top_zeroed),
            "n_prompts": self.n_prompts,
        }


def _random_neurons(layers: Sequence[int], width: int, k: int, seed: int) -> list[Neuron]:
    """``k`` distinct neurons drawn uniformly from ``layers`` (``torch.Generator`` seeded with ``seed``)."""
    flat = torch.randperm(len(layers) * width, generator=torch.Generator().manual_seed(seed))[:k]
    return [(layers[int(i) // width], int(i) % width) for i in flat]


def intervention_check(
    model: Any, tokenizer: Any, problems: Sequence[ArithmeticProblem], *, k: int, layers: Sequence[int],
    score_problems: Sequence[ArithmeticProblem] | None = None, n_random: int = 3, seed: int = 0,
    chunk: int = DEFAULT_CHUNK, importance: torch.Tensor | None = None, accuracy: ProblemAccuracy | None = None,
) -> InterventionCheck:
    """Zero the top-``k`` neurons (by mean importance on ``score_problems``, default ``problems``) vs ``k``
    random neurons drawn uniformly from the same layers (draw ``i`` seeded with ``seed + i``).

    ``importance`` (``(n_layers, intermediate)``, mean over ``score_problems``) and ``accuracy`` (a
    :class:`ProblemAccuracy` of ``problems`` starting at or below ``min(layers)``) may be passed when already
    computed, e.g. shared with :func:`prune_to_top`."""
    if n_random < 1:
        raise ValueError(f"n_random must be >= 1, got {n_random}")
    adapter = adapter_for(model)
    layers = sorted(set(layers))
    scored = list(score_problems or problems)
    if importance is None:
        importance = mean_importance(model, tokenizer, scored, layers=layers, chunk=chunk)
    masked = torch.full_like(importance, float("nan"))
    masked[layers] = importance[layers]
    top = top_neurons(masked, k)
    accuracy = accuracy or ProblemAccuracy(model, tokenizer, problems, layers[0])
    top_zeroed = accuracy.zeroed(_spec([(layer, n) for layer, n, _ in top])).accuracy
    randoms = tuple(accuracy.zeroed(_spec(_random_neurons(layers, adapter.intermediate_size, k, seed + draw))).accuracy
                    for draw in range(n_random))
    return InterventionCheck(k, tuple(layers), tuple(top), accuracy.baseline.accuracy, top_zeroed, randoms,
                             len(scored), len(accuracy.problems))


@dataclass(frozen=True)
class PruningResult(CheckResult):
    """Accuracy when each of ``layers`` keeps only its top-``keep`` CNA neurons (the rest zeroed), against
    keeping ``keep`` random neurons of each layer (the paper's control; one accuracy per seeded draw)::

        pruned_minus_random_points = 100 · (pruned − mean(random_draws))
        pruned_retention           = pruned / baseline
    """

    keep: int
    layers: tuple[int, ...]
    baseline: float
    pruned: float
    random_pruned: float  # mean over the draws
    zeroed_per_layer: int
    random_draws: tuple[float, ...] = ()
    n_prompts: int = 0  # evaluated problems: one problem is 100 / n_prompts points
    rank_by: str = "importance"  # "importance" (signed, the paper's ranking) or "abs_importance"

    @metric_group(*("baseline_accuracy", "pruned_accuracy", "random_pruned_accuracy", "pruned_drop_points",
                         "pruned_minus_random_points", "pruned_minus_best_random_points", "pruned_retention",
                         "random_retention", "kept_fraction", "n_prompts"))
    def _metrics(self) -> dict[str, Any]:
        return {"baseline_accuracy": self.baseline, "pruned_accuracy": self.pruned,
                "random_pruned_accuracy": self.random_pruned,
                "pruned_drop_points": 100 * (self.baseline - self.pruned),
                "pruned_minus_random_points": 100 * (self.pruned - self.random_pruned),
                "pruned_minus_best_random_points": 100 * (self.pruned - max(self.random_draws, default=self.random_pruned)),
                "pruned_retention": self.pruned / self.baseline if self.baseline else float("nan"),
                "random_retention": self.random_pruned / self.baseline if self.baseline else float("nan"),
                "kept_fraction": self.keep / (self.keep + self.zeroed_per_layer),
                "n_prompts": self.n_prompts}


def prune_to_top(
    model: Any, tokenizer: Any, problems: Sequence[ArithmeticProblem], *, keep: int, layers: Sequence[int],
    score_problems: Sequence[ArithmeticProblem] | None = None, seed: int = 0, n_random: int = 1,
    chunk: int = DEFAULT_CHUNK, importance: torch.Tensor | None = None, accuracy: ProblemAccuracy | None = None,
    rank_by: str = "importance",
) -> PruningResult:
    """Keep the top-``keep`` neurons of each layer by mean importance (``rank_by="abs_importance"``: by its
    magnitude, so the neurons that most lower the answer's probability are kept too); zero every other neuron of
    that layer. The control keeps ``keep`` random neurons of each layer instead (draw ``i``: generator seeded
    ``seed + i``). ``importance`` and ``accuracy``: as in :func:`intervention_check`."""
    if rank_by not in ("importance", "abs_importance"):
        raise ValueError(f"rank_by must be 'importance' or 'abs_importance', got {rank_by!r}")
    adapter = adapter_for(model)
    layers = sorted(set(layers))
    width = adapter.intermediate_size
    if not 0 <= keep <= width:
        raise ValueError(f"keep must be in 0..{width}, got {keep}")
    if n_random < 1:
        raise ValueError(f"n_random must be >= 1, got {n_random}")
    if importance is None:
        importance = mean_importance(model, tokenizer, list(score_problems or problems), layers=layers, chunk=chunk)

    def zero_all_but(kept: Mapping[int, torch.Tensor]) -> dict[int, list[int]]:
        spec = {}
        for layer in layers:
            mask = torch.ones(width, dtype=torch.bool)
            mask[kept[layer]] = False
            spec[layer] = torch.nonzero(mask).flatten().tolist()
        return spec

    accuracy = accuracy or ProblemAccuracy(model, tokenizer, problems, layers[0])
    ranking = importance.abs() if rank_by == "abs_importance" else importance
    best = {layer: torch.topk(ranking[layer], keep).indices for layer in layers}
    pruned = accuracy.zeroed(zero_all_but(best)).accuracy
    draws = []
    for draw in range(n_random):
        generator = torch.Generator().manual_seed(seed + draw)
        rand = {layer: torch.randperm(width, generator=generator)[:keep] for layer in layers}
        draws.append(accuracy.zeroed(zero_all_but(rand)).accuracy)
    return PruningResult(keep, tuple(layers), accuracy.baseline.accuracy, pruned, sum(draws) / len(draws),
                         width - keep, tuple(draws), len(accuracy.problems), rank_by)
