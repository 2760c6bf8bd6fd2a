"""Data-free super-weight detection (Yu et al., "The Super Weight in Large Language Models", section 3.2).

A super weight is one scalar ``W_down[row, col]`` of an early MLP down projection that, multiplied by a huge
input activation ``x[t, col]``, writes a *super activation* ``y[t, row]`` into the residual stream; zeroing it
destroys the model. Detection, one forward pass per round:

1. Hook every layer's down projection (one forward hook sees its input ``x`` = the neuron activations,
   ``[tokens, intermediate]``, and its output ``y``, ``[tokens, hidden]``) and record per layer ℓ
   ``in_max[ℓ] = max_t,k |x[t, k]|`` and ``out_max[ℓ] = max_t,c |y[t, c]|`` with their token and channel.
2. Layer ℓ is a *spike layer* when both maxima stand far above the typical layer (robust to the spikes
   themselves, since the median ignores a few outliers)::

       in_max[ℓ] ≥ spike_factor · median_ℓ' in_max[ℓ']   and   out_max[ℓ] ≥ spike_factor · median_ℓ' out_max[ℓ']

3. At the earliest spike layer within the first ``max_depth`` fraction of the layers:
   ``row`` = the output channel of ``out_max``, ``t`` = its token, ``col`` = ``argmax_k |x[t, k]|`` over the
   columns not already held out in that row. The super weight is ``W_down[row, col]``.
4. Zero every super weight found so far (inside :func:`lmaudit.checks.core.interventions.edit_down_proj_weights`; the model
   is never changed) and repeat until no spike layer remains or ``max_rounds`` super weights were found.

``max_depth``: the paper's directory (its Table 2) lists super weights only in early layers; the last layers of
many models carry massive activations of their own that prepare the output and that the paper does not count
(SmolLM2-135M has one in layer 28, in the same channel). The default keeps the first half of the layers.

Prompts follow the BOS policy of :func:`lmaudit.checks.core.logprobs.encode_prompts`. Several prompts are detected together
(:func:`detect_super_weights_many`): each round is one right-padded batched forward pass per group of prompts
that hold out the same super weights (normally one group), and padded positions are masked out of the maxima.

Invariance (same module, as it only re-runs detection): :func:`prompt_invariance` on many prompts, and
:func:`finetune_invariance` against a fine-tuned model (``--compare-model``, else an offline LoRA fine-tune,
:func:`lmaudit.checks.core.finetune.lora_finetune`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lmaudit.checks.core.adapter import ArchitectureAdapter
from lmaudit.checks.core.errors import LmAuditError
from lmaudit.checks.core.hooks import hooks
from lmaudit.checks.core.interventions import edit_down_proj_weights
from lmaudit.checks.core.logprobs import encode_prompts
from lmaudit.checks.core.outliers import SuperActivation, SuperWeightSites
from lmaudit.checks.core.results import CheckResult, metric_group
from lmaudit.checks.harness.context import AuditContext, provide
from lmaudit.checks.harness.registry import CheckParams, register_check

DEFAULT_PROMPT = "Apple Inc. is a worldwide tech company."  # the paper's detection prompt
DEFAULT_SPIKE_FACTOR = 50.0  # super activations are 100-1000x the median layer's maximum; ordinary layers < 10x
DEFAULT_MAX_ROUNDS = 8
DEFAULT_MAX_DEPTH = 0.5

Coordinate = tuple[int, int, int]  # (layer, row, col) of W_down as [hidden, intermediate]


@dataclass(frozen=True)
class LayerMaxima:
    """max |input| and max |output| of one layer's down projection, with where they occur."""

    layer: int
    input_max: float
    input_token: int
    input_channel: int
    output_max: float
    output_token: int
    output_channel: int


@dataclass(frozen=True)
class DetectionRound:
    """The evidence of one round: every layer's maxima, the medians, and which layers counted as spikes."""

    index: int
    held_out: tuple[Coordinate, ...]  # super weights zeroed during this round
    maxima: tuple[LayerMaxima, ...]
    input_median: float
    output_median: float
    spike_layers: tuple[int, ...]


@dataclass(frozen=True)
class SuperWeight:
    """``W_down[row, col]`` of ``layer`` and the super activation ``y[token, row]`` it writes."""

    layer: int
    row: int  # output channel = the hidden channel of the super activation
    col: int  # input channel = the intermediate neuron that carries the huge input
    weight: float
    activation: float  # y[token, row] (signed) in the round that found it
    input_activation: float  # x[token, col] (signed)
    token: int  # position in the encoded prompt (BOS included)
    prompt: str

    @property
    def coordinates(self) -> Coordinate:
        return (self.layer, self.row, self.col)

    def label(self) -> str:
        return f"L{self.layer}[{self.row}, {self.col}]"


@dataclass(frozen=True)
class SuperWeightDetection:
    """All super weights found on one prompt, in the order found, with every round's evidence."""

    prompt: str
    n_tokens: int
    super_weights: tuple[SuperWeight, ...]
    rounds: tuple[DetectionRound, ...]
    spike_factor: float
    max_depth: float

    @property
    def coordinates(self) -> list[Coordinate]:
        return [sw.coordinates for sw in self.super_weights]

    @property
    def channels(self) -> list[int]:
        """Hidden channels of the super activations (sorted, unique)."""
        return sorted({sw.row for sw in self.super_weights})

    def labels(self) -> str:
        return ", ".join(sw.label() for sw in self.super_weights) or "none"


# ------------------------------------------------------------------------------------------------ detection


def _check_detection_args(spike_factor: float, max_rounds: int, max_depth: float) -> None:
    if not spike_factor > 1:
        raise LmAuditError(f"spike_factor must be > 1, got {spike_factor}")
    if isinstance(max_rounds, bool) or not isinstance(max_rounds, int) or max_rounds < 1:
        raise LmAuditError(f"max_rounds must be an int >= 1, got {max_rounds!r}")
    if not 0 < max_depth <= 1:
        raise LmAuditError(f"max_depth must be in (0, 1], got {max_depth}")


def _right_pad(seqs: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids (b, t), attention_mask (b, t))``, right-padded with id 0 (never attended)."""
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids.to(device), mask.to(device)


@dataclass
class _LayerStats:
    """Per batch row, for one layer: the maxima (as tensors) and x at the token of max |y|."""

    in_max: torch.Tensor  # (b,)
    in_flat: torch.Tensor  # (b,) index into (t, intermediate)
    out_max: torch.Tensor  # (b,)
    out_flat: torch.Tensor  # (b,) index into (t, hidden)
    out_value: torch.Tensor  # (b,) signed y at the max
    x_at_out_token: torch.Tensor  # (b, intermediate) signed


@torch.no_grad()
def down_proj_stats(adapter: ArchitectureAdapter, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor) -> list[_LayerStats]:
    """One forward pass; per layer the down projection's input/output maxima over real (unpadded) tokens."""
    stats: list[_LayerStats | None] = [None] * adapter.n_layers
    keep = attention_mask.bool()[..., None]  # (b, t, 1)

    def record(layer: int) -> Any:
        def fn(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            x = args[0].float()  # (b, t, intermediate)
            y = (output if isinstance(output, torch.Tensor) else output[0]).float()  # (b, t, hidden)
            x_abs = (x.abs() * keep).flatten(1)  # (b, t*intermediate)
            y_abs = (y.abs() * keep).flatten(1)  # (b, t*hidden)
            in_max, in_flat = x_abs.max(dim=1)
            out_max, out_flat = y_abs.max(dim=1)
            out_token = out_flat // y.shape[2]
            rows = torch.arange(x.shape[0], device=x.device)
            stats[layer] = _LayerStats(in_max, in_flat, out_max, out_flat, y.flatten(1)[rows, out_flat],
                                       x[rows, out_token])

        return fn

    with hooks(forward=[(adapter.down_proj(i), record(i)) for i in range(adapter.n_layers)]):
        adapter.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return [s for s in stats if s is not None]


def _maxima(stats: list[_LayerStats], row: int, intermediate: int, hidden: int) -> tuple[LayerMaxima, ...]:
    out = []
    for layer, s in enumerate(stats):
        in_token, in_channel = divmod(int(s.in_flat[row]), intermediate)
        out_token, out_channel = divmod(int(s.out_flat[row]), hidden)
        out.append(LayerMaxima(layer, float(s.in_max[row]), in_token, in_channel, float(s.out_max[row]),
                               out_token, out_channel))
    return tuple(out)


def spike_layers(maxima: Sequence[LayerMaxima], spike_factor: float) -> tuple[tuple[int, ...], float, float]:
    """``(spike layers, input median, output median)``: both maxima ≥ ``spike_factor`` × the median layer."""
    input_median = statistics.median(m.input_max for m in maxima)
    output_median = statistics.median(m.output_max for m in maxima)
    spikes = tuple(m.layer for m in maxima
                   if m.input_max >= spike_factor * input_median and m.output_max >= spike_factor * output_median)
    return spikes, float(input_median), float(output_median)


@dataclass
class _PromptState:
    prompt: str
    ids: list[int]
    found: list[SuperWeight]
    rounds: list[DetectionRound]
    done: bool = False


@torch.no_grad()
def detect_super_weights_many(
    adapter: ArchitectureAdapter,
    tokenizer: object,
    prompts: Sequence[str],
    *,
    spike_factor: float = DEFAULT_SPIKE_FACTOR,
    max_rounds: int = DEFAULT_MAX_ROUNDS,
    max_depth: float = DEFAULT_MAX_DEPTH,
) -> list[SuperWeightDetection]:
    """Detect on every prompt independently (see the module docstring); one batched pass per round and group.

    Returns one :class:`SuperWeightDetection` per prompt, in order. Arguments are checked before the model runs.
    """
    _check_detection_args(spike_factor, max_rounds, max_depth)
    if isinstance(prompts, str) or not prompts:
        raise LmAuditError("pass a non-empty list of prompts")
    states = [_PromptState(p, ids, [], []) for p, ids in zip(prompts, encode_prompts(tokenizer, prompts), strict=True)]
    last_layer = max(0, round(max_depth * adapter.n_layers) - 1)
    hidden, intermediate = adapter.hidden_size, adapter.intermediate_size
    for index in range(max_rounds + 1):
        groups: dict[tuple[Coordinate, ...], list[_PromptState]] = {}
        for state in states:
            if not state.done:
                groups.setdefault(tuple(sw.coordinates for sw in state.found), []).append(state)
        if not groups:
            break
        for held_out, members in groups.items():
            with edit_down_proj_weights(adapter, held_out, value=0.0):
                ids, mask = _right_pad([s.ids for s in members], adapter.device)
                stats = down_proj_stats(adapter, ids, mask)
            for row, state in enumerate(members):
                maxima = _maxima(stats, row, intermediate, hidden)
                spikes, in_median, out_median = spike_layers(maxima, spike_factor)
                state.rounds.append(DetectionRound(index, held_out, maxima, in_median, out_median, spikes))
                early = [layer for layer in spikes if layer <= last_layer]
                new = (_super_weight_at(adapter, stats[early[0]], row, maxima[early[0]], state)
                       if early and index < max_rounds else None)
                if new is None:
                    state.done = True
                else:
                    state.found.append(new)
    return [SuperWeightDetection(s.prompt, len(s.ids), tuple(s.found), tuple(s.rounds), spike_factor, max_depth)
            for s in states]


def detect_super_weights(
    adapter: ArchitectureAdapter,
    tokenizer: object,
    prompt: str = DEFAULT_PROMPT,
    *,
    spike_factor: float = DEFAULT_SPIKE_FACTOR,
    max_rounds: int = DEFAULT_MAX_ROUNDS,
    max_depth: float = DEFAULT_MAX_DEPTH,
) -> SuperWeightDetection:
    """Find the super weights of ``adapter.model`` from one prompt (see the module docstring)."""
    return detect_super_weights_many(adapter, tokenizer, [prompt], spike_factor=spike_factor,
                                     max_rounds=max_rounds, max_depth=max_depth)[0]


def _super_weight_at(adapter: ArchitectureAdapter, stats: _LayerStats, row: int, spike: LayerMaxima,
                     state: _PromptState) -> SuperWeight | None:
    """row = channel of max |y|; col = the channel of max |x[t]| not yet held out in that row."""
    x_t = stats.x_at_out_token[row].abs().clone()  # (intermediate,)
    for sw in state.found:
        if sw.layer == spike.layer and sw.row == spike.output_channel:
            x_t[sw.col] = -1.0
    col = int(x_t.argmax())
    if x_t[col] < 0:
        return None
    return SuperWeight(
        layer=spike.layer,
        row=spike.output_channel,
        col=col,
        weight=float(adapter.down_proj_weight(spike.layer)[spike.output_channel, col].detach()),
        activation=float(stats.out_value[row]),
        input_activation=float(stats.x_at_out_token[row, col]),
        token=spike.output_token,
        prompt=state.prompt,
    )


# ------------------------------------------------------------------------------------------------ audit checks


class SuperWeightParams(CheckParams):
    prompt: str = DEFAULT_PROMPT
    spike_factor: float = DEFAULT_SPIKE_FACTOR
    max_rounds: int = DEFAULT_MAX_ROUNDS
    max_depth: float = DEFAULT_MAX_DEPTH  # fraction of the layers searched (late massive activations excluded)


@dataclass(frozen=True)
class SuperWeightDirectory(CheckResult):
    """The detection on the audit's prompt, as reported, and how long it took after load."""

    detection: SuperWeightDetection
    seconds: float

    @metric_group(*("n_super_weights", "coordinates", "channels", "first_layer", "max_activation", "seconds"))
    def _metrics(self) -> dict[str, object]:
        sws = self.detection.super_weights
        return {
            "n_super_weights": len(sws),
            "coordinates": [list(sw.coordinates) for sw in sws],
            "channels": self.detection.channels,
            "first_layer": sws[0].layer if sws else -1,
            "max_activation": max((abs(sw.activation) for sw in sws), default=0.0),
            "seconds": self.seconds,
        }


def timed_detection(adapter: ArchitectureAdapter, tokenizer: object, params: SuperWeightParams) -> SuperWeightDirectory:
    started = time.perf_counter()
    detection = detect_super_weights(adapter, tokenizer, params.prompt, spike_factor=params.spike_factor,
                                     max_rounds=params.max_rounds, max_depth=params.max_depth)
    return SuperWeightDirectory(detection, time.perf_counter() - started)


def cached_detection(context: AuditContext, params: SuperWeightParams) -> SuperWeightDetection:
    """Detection shared by every super-weight check of a session with the same parameters."""
    model = context.model
    key = ("superweights", params.prompt, params.spike_factor, params.max_rounds, params.max_depth)
    return context.artifact(SuperWeightDirectory, key,
                            lambda: timed_detection(model.adapter, model.tokenizer, params)).detection


@register_check(
    "superweights",
    params=SuperWeightParams,
    area="superweights")
def superweights_audit(context: AuditContext, params: SuperWeightParams) -> SuperWeightDirectory:
    """Super-weight directory found data-free from one prompt (Yu et al. 2024, §3.2)."""
    model = context.model
    key = ("superweights", params.prompt, params.spike_factor, params.max_rounds, params.max_depth)
    return context.artifact(SuperWeightDirectory, key, lambda: timed_detection(model.adapter, model.tokenizer, params))


@provide(SuperWeightSites)
def super_weight_sites(context: AuditContext) -> SuperWeightSites:
    """The session's super weights with the default detection settings, for other areas (quantization)."""
    detection = cached_detection(context, SuperWeightParams())
    activations = tuple(dict.fromkeys(SuperActivation(sw.layer, sw.token, sw.row, sw.activation)
                                      for sw in detection.super_weights if True))
    first = {}
    for act in activations:
        first.setdefault((act.layer, act.channel), act)
    return SuperWeightSites(tuple(detection.coordinates), tuple(first.values()),
                            f"data-free detection on {detection.prompt!r}")


# Built-in prompt set for the audit (the tests draw many more from tests/strategies_prompts.py).
INVARIANCE_PROMPTS: tuple[str, ...] = (
    "Apple Inc. is a worldwide tech company.",
    "The quick brown fox jumps over the lazy dog while the farmer watches from the old wooden fence.",
    "12+35=47 and 9*8=72, so 47+72=119.",
    "def add(a, b):\n    return a + b\n",
    "Le chat est assis sur le tapis et regarde la pluie tomber.",
    "Der Himmel ist heute blau und die Sonne scheint.",
    "東京は日本の首都です。",
    "?!... ;;; --- !!!",
    "Hello",
    " ".join(["The history of the city goes back many centuries."] * 6),
)


@dataclass(frozen=True)
class PromptInvariance(CheckResult):
    """Detection on many prompts against the audit prompt's coordinates and super-activation channels."""

    reference: SuperWeightDetection
    detections: tuple[SuperWeightDetection, ...]
    seconds: float

    @property
    def moved(self) -> list[str]:
        """One line per prompt whose coordinates or channels differ from the reference."""
        ref = self.reference
        return [f"expected {ref.labels()}, found {d.labels()} on prompt {d.prompt[:60]!r}"
                for d in self.detections if d.coordinates != ref.coordinates or d.channels != ref.channels]

    @metric_group(*("n_prompts", "n_moved", "fraction_same", "coordinates", "channels"))
    def _metrics(self) -> dict[str, object]:
        return {
            "n_prompts": len(self.detections),
            "n_moved": len(self.moved),
            "fraction_same": 1 - len(self.moved) / max(1, len(self.detections)),
            "coordinates": [list(c) for c in self.reference.coordinates],
            "channels": self.reference.channels,
        }


class PromptInvarianceParams(SuperWeightParams):
    prompts: list[str] | None = None  # default: INVARIANCE_PROMPTS (plain, digits, code, non-English, ...)


def prompt_invariance(adapter: ArchitectureAdapter, tokenizer: object, prompts: Sequence[str],
                      reference: SuperWeightDetection) -> PromptInvariance:
    """Detect on every prompt (batched) and compare each with ``reference``."""
    started = time.perf_counter()
    detections = detect_super_weights_many(adapter, tokenizer, prompts, spike_factor=reference.spike_factor,
                                           max_rounds=len(reference.rounds) + 1, max_depth=reference.max_depth)
    return PromptInvariance(reference, tuple(detections), time.perf_counter() - started)


@register_check(
    "superweights_prompt_invariance",
    params=PromptInvarianceParams,
    area="superweights")
def prompt_invariance_audit(context: AuditContext, params: PromptInvarianceParams) -> PromptInvariance:
    """The same super weights and super-activation channels on every prompt (Yu et al. 2024, §3.2)."""
    model = context.model
    reference = cached_detection(context, params)
    prompts = params.prompts if params.prompts is not None else list(INVARIANCE_PROMPTS)
    return prompt_invariance(model.adapter, model.tokenizer, prompts, reference)


@dataclass(frozen=True)
class WeightChange:
    """A super weight's value in the base and the fine-tuned model."""

    layer: int
    row: int
    col: int
    base: float
    tuned: float


@dataclass(frozen=True)
class FinetuneInvariance(CheckResult):
    """Detection on a fine-tuned model against the base model's."""

    base: SuperWeightDetection
    tuned: SuperWeightDetection
    tuned_model: str  # spec of the compared model
    source: str  # "compare-model" or "lora"
    changes: tuple[WeightChange, ...]

    @metric_group(*("same_coordinates", "same_channels", "base_coordinates", "tuned_coordinates",
             "max_relative_weight_change"))
    def _metrics(self) -> dict[str, object]:
        same = self.base.coordinates == self.tuned.coordinates
        rel = [abs(c.tuned - c.base) / max(abs(c.base), 1e-12) for c in self.changes]
        return {
            "same_coordinates": same,
            "same_channels": self.base.channels == self.tuned.channels,
            "base_coordinates": [list(c) for c in self.base.coordinates],
            "tuned_coordinates": [list(c) for c in self.tuned.coordinates],
            "max_relative_weight_change": max(rel, default=0.0),
        }


def finetune_invariance(base_adapter: ArchitectureAdapter, base: SuperWeightDetection, tuned_adapter: ArchitectureAdapter,
                        tuned_tokenizer: object, *, tuned_model: str, source: str) -> FinetuneInvariance:
    """Detect on the tuned model with the base detection's prompt and settings; report weight values."""
    tuned = detect_super_weights(tuned_adapter, tuned_tokenizer, base.prompt, spike_factor=base.spike_factor,
                                 max_rounds=len(base.rounds) + 1, max_depth=base.max_depth)
    changes = tuple(
        WeightChange(layer, row, col, float(base_adapter.down_proj_weight(layer)[row, col].detach()),
                     float(tuned_adapter.down_proj_weight(layer)[row, col].detach()))
        for layer, row, col in dict.fromkeys(base.coordinates + tuned.coordinates)
    )
    return FinetuneInvariance(base, tuned, tuned_model, source, changes)


class FinetuneInvarianceParams(SuperWeightParams):
    steps: int = 30  # LoRA steps when no --compare-model is given (see lmaudit.checks.core.finetune for the recipe)
    seed: int = 0


@register_check(
    "superweights_finetune_invariance",
    params=FinetuneInvarianceParams,
    area="superweights")
def finetune_invariance_audit(context: AuditContext, params: FinetuneInvarianceParams) -> FinetuneInvariance:
    """The super weights stay put after fine-tuning (--compare-model, else an offline seeded LoRA fine-tune)."""
    model = context.model
    base = cached_detection(context, params)
    tuned = context.compare_model()
    source = "compare-model"
    if tuned is None:
        from lmaudit.checks.core.finetune import LoraRecipe

        tuned = context.finetuned(LoraRecipe(steps=params.steps, seed=params.seed))
        source = "lora"
    return finetune_invariance(model.adapter, base, tuned.adapter, tuned.tokenizer, tuned_model=tuned.spec,
                               source=source)
