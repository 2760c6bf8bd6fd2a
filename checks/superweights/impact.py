"""What the super weights do (Yu et al., "The Super Weight in Large Language Models"): Table 1, stopwords, scaling.

All evaluations run the *same* corpus windows (:func:`lmaudit.checks.core.perplexity.corpus_windows`) and the same zero-shot
task documents under each condition; every condition is an intervention from :mod:`lmaudit.checks.core.interventions`
(the model is never changed):

=====================  ===========================================================================================
condition              intervention
=====================  ===========================================================================================
``original``           none
``prune_sw``           ``W_down[ℓ][row, col] = 0`` for every detected super weight
``prune_others``       the ``n_others`` (default 7000, as the paper) largest-magnitude weights of the decoder's Linear
                       layers other than the super weights set to 0 (the super weights stay)
``prune_sw_restore``   ``prune_sw`` and the super activation ``y[token, row]`` of each super-weight layer set back to
                       the value detection measured (the paper's "Prune SW, +SA")
=====================  ===========================================================================================

Perplexity uses :data:`lmaudit.checks.core.perplexity.PERPLEXITY_DEFINITION`. Layer skip: an intervention whose earliest
layer is L leaves the residual stream entering layer L unchanged, so the windows are run once cleanly, the
hidden states entering each needed L are kept, and every intervened evaluation starts at L
(:func:`lmaudit.checks.core.layer_skip.start_at_layer`); ``benchmarks/bench_superweights.py`` measures the saving.
Zero-shot accuracy goes through lm-eval (:func:`lmaudit.checks.core.lm_eval_bridge.run_lm_eval_tasks`, BOS added as in
:func:`lmaudit.checks.core.logprobs.encode_prompts`) on task configs built here (:func:`zero_shot_tasks`):
the harness's arithmetic task and, when ``../shared/data`` holds them, ARC-Easy, ARC-Challenge, PIQA and
LAMBADA (each skipped cleanly when absent; names are reported in ``tasks_skipped``).

Stopwords (paper §3.3): ``p̄(w) = (1/N) Σ_i p(w | prompt_i)`` over N corpus prompts, with and without the super
weights; reported are the top tokens' ratios ``p̄_pruned(w) / p̄_original(w)`` and the stopword mass
``Σ_{w ∈ stopwords} p̄(w)`` before and after, where a token is a stopword when its text, stripped and lowercased,
is in :data:`STOPWORDS`.

Scaling (paper §3.4): ``W_down[ℓ][row, col] ← s · W_down[ℓ][row, col]`` for ``s`` in ``scales``; perplexity and
accuracy per factor, and the best factor of each.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lmaudit.checks.core.adapter import ArchitectureAdapter
from lmaudit.checks.core.arithmetic_problems import generate_problems, lm_eval_task_dict, write_jsonl
from lmaudit.checks.core.corpora import shared_data_dir
from lmaudit.checks.core.errors import LmAuditError
from lmaudit.checks.core.interventions import edit_down_proj_weights, edit_weight, replace_activation
from lmaudit.checks.core.layer_skip import start_at_layer
from lmaudit.checks.core.loading import LoadedModel, cache_root
from lmaudit.checks.core.logprobs import bos_prefix, model_forward
from lmaudit.checks.core.perplexity import corpus_tokens, corpus_windows, perplexity_from_nll, window_nll
from lmaudit.checks.core.results import CheckResult, metric_group
from lmaudit.checks.harness.context import AuditContext
from lmaudit.checks.harness.registry import register_check
from lmaudit.checks.superweights.detect import (
    Coordinate,
    SuperWeightDetection,
    SuperWeightParams,
    cached_detection,
)
from lmaudit.reports.atomic import write_text_atomic

_STOPWORD_TEXT = """
a about above after again against all am an and any are as at be because been before being below between both
but by can could did do does doing down during each few for from further had has have having he her here hers
herself him himself his how i if in into is it its itself just me more most my myself no nor not now of off on
once only or other our ours ourselves out over own same she should so some such than that the their theirs them
themselves then there these they this those through to too under until up very was we were what when where which
while who whom why will with would you your yours yourself yourselves
"""
STOPWORDS: frozenset[str] = frozenset(_STOPWORD_TEXT.split())  # English function words (NLTK's core list)
DEFAULT_SCALES = (0.0, 0.2, 0.5, 0.8, 1.0, 1.5, 2.0, 3.0)
CONDITIONS = ("original", "prune_sw", "prune_others", "prune_sw_restore")

Intervention = Callable[[], contextlib.AbstractContextManager[Any]]


# ------------------------------------------------------------------------------------------------ interventions


def largest_other_weights(adapter: ArchitectureAdapter, n: int,
                          exclude: Sequence[Coordinate]) -> dict[nn.Module, tuple[Tensor, Tensor]]:
    """The ``n`` largest-|w| weights of all decoder Linear layers except the ``exclude``d down-projection
    elements: ``{module: (rows, cols)}`` in the ``[out, in]`` view."""
    excluded = {(adapter.down_proj(layer), row, col) for layer, row, col in exclude}
    modules = list(adapter.decoder_linears().values())
    candidates = []  # (values, module index, flat index), n per module plus the excluded ones
    for index, module in enumerate(modules):
        w = adapter.weight(module).detach().abs().flatten()  # (out*in,)
        k = min(w.numel(), n + len(exclude))
        values, flat = torch.topk(w, k)
        candidates.append((values, torch.full_like(flat, index), flat))
    values = torch.cat([c[0] for c in candidates])
    owner = torch.cat([c[1] for c in candidates])
    flat = torch.cat([c[2] for c in candidates])
    chosen: dict[nn.Module, list[tuple[int, int]]] = {}
    for i in torch.argsort(values, descending=True).tolist():
        module = modules[int(owner[i])]
        row, col = divmod(int(flat[i]), adapter.weight(module).shape[1])
        if (module, row, col) in excluded:
            continue
        chosen.setdefault(module, []).append((row, col))
        if sum(len(v) for v in chosen.values()) == n:
            break
    return {m: (torch.tensor([r for r, _ in rc]), torch.tensor([c for _, c in rc])) for m, rc in chosen.items()}


@contextlib.contextmanager
def zero_weights(indices: dict[nn.Module, tuple[Tensor, Tensor]]) -> Iterator[None]:
    """Set the given ``(rows, cols)`` of each module's ``[out, in]`` weight to 0 (a stack of :func:`edit_weight`)."""
    with contextlib.ExitStack() as stack:
        for module, (rows, cols) in indices.items():
            stack.enter_context(edit_weight(module, (rows, cols), value=0.0))
        yield


@contextlib.contextmanager
def prune_and_restore(adapter: ArchitectureAdapter, detection: SuperWeightDetection) -> Iterator[None]:
    """Prune every super weight and put each super activation ``y[token, row]`` back to its detected value."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(edit_down_proj_weights(adapter, detection.coordinates, value=0.0))
        restored = set()
        for sw in detection.super_weights:  # the first one found per (layer, row) carries the full activation
            if (sw.layer, sw.row) not in restored:
                restored.add((sw.layer, sw.row))
                stack.enter_context(replace_activation(adapter, sw.layer, sw.token, sw.row, sw.activation))
        yield


# ------------------------------------------------------------------------------------------------ zero-shot tasks


@dataclass(frozen=True)
class ZeroShotTask:
    """An lm-eval task config over a local file, and the metric read as its accuracy."""

    name: str
    config: dict[str, Any]
    metric: str  # key in lm-eval's results, e.g. "acc,none"


def _shared_file(*parts: str) -> Path | None:
    root = shared_data_dir()
    path = root.joinpath(*parts) if root else None
    return path if path is not None and path.is_file() else None


def _json_task(name: str, path: Path, **fields: Any) -> dict[str, Any]:
    return {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(path)}},
            "test_split": "test", "num_fewshot": 0, "metadata": {"version": 1.0}, **fields}


_MC = {"output_type": "multiple_choice", "target_delimiter": " ",
       "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}


def _arithmetic(seed: int) -> ZeroShotTask | None:
    path = cache_root() / "tasks" / f"arithmetic-add-sub-1digit-seed{seed}.jsonl"
    if not path.is_file():
        write_jsonl(generate_problems(ops="+-", digits=1, n_per_op=50, template="symbolic", seed=seed), path)
    config = lm_eval_task_dict(path, name="lmaudit_arithmetic", output_type="loglikelihood")
    return ZeroShotTask("arithmetic", config, "acc,none")


def _arc(split: str) -> Callable[[int], ZeroShotTask | None]:
    def build(seed: int) -> ZeroShotTask | None:
        path = _shared_file(f"arc-{split}", f"arc_{split}.jsonl")
        if path is None:
            return None
        config = _json_task(f"lmaudit_arc_{split}", path, doc_to_text="{{query}}\nAnswer:", doc_to_target="gold",
                            doc_to_choice="choices", **_MC)
        return ZeroShotTask(f"arc_{split}", config, "acc,none")

    return build


def _piqa(seed: int) -> ZeroShotTask | None:
    docs, labels = _shared_file("piqa", "valid.jsonl"), _shared_file("piqa", "valid-labels.lst")
    if docs is None or labels is None:
        return None
    merged = cache_root() / "tasks" / "piqa-valid-labelled.jsonl"
    if not merged.is_file():  # the labels live in a separate file; join them once (atomically)
        rows = [dict(json.loads(line), label=int(label)) for line, label in
                zip(docs.read_text().splitlines(), labels.read_text().split(), strict=True)]
        write_text_atomic(merged, "".join(json.dumps(r) + "\n" for r in rows))
    config = _json_task("lmaudit_piqa", merged, doc_to_text="Question: {{goal}}\nAnswer:", doc_to_target="label",
                        doc_to_choice="{{[sol1, sol2]}}", **_MC)
    return ZeroShotTask("piqa", config, "acc,none")


def _lambada(seed: int) -> ZeroShotTask | None:
    path = _shared_file("lambada", "lambada_test.jsonl")
    if path is None:
        return None
    config = _json_task("lmaudit_lambada", path, output_type="loglikelihood",
                        doc_to_text="{{text.split(' ')[:-1]|join(' ')}}", doc_to_target="{{' '+text.split(' ')[-1]}}",
                        target_delimiter="",
                        metric_list=[{"metric": "acc", "aggregation": "mean", "higher_is_better": True}])
    return ZeroShotTask("lambada", config, "acc,none")


TASK_BUILDERS: dict[str, Callable[[int], ZeroShotTask | None]] = {
    "arithmetic": _arithmetic, "arc_easy": _arc("easy"), "arc_challenge": _arc("challenge"), "piqa": _piqa,
    "lambada": _lambada,
}


def zero_shot_tasks(names: Sequence[str], *, seed: int = 0) -> tuple[list[ZeroShotTask], list[str]]:
    """``(available tasks, skipped names)``: the shared-data tasks are skipped when their files are absent."""
    unknown = [n for n in names if n not in TASK_BUILDERS]
    if unknown:
        raise LmAuditError(f"unknown zero-shot task(s) {unknown}; choose from {', '.join(TASK_BUILDERS)}")
    built = {name: TASK_BUILDERS[name](seed) for name in names}
    return [t for t in built.values() if t is not None], [n for n, t in built.items() if t is None]


def task_accuracies(loaded: LoadedModel, tasks: Sequence[ZeroShotTask], *, limit: int) -> dict[str, float]:
    """lm-eval accuracy of the model as it is now (inside any intervention) on each task, ``limit`` docs each."""
    if not tasks:
        return {}
    from lmaudit.checks.core.lm_eval_bridge import run_lm_eval_tasks

    out = run_lm_eval_tasks(loaded.model, loaded.tokenizer, [t.config for t in tasks], limit=limit,
                            hflm_kwargs={"add_bos_token": bool(bos_prefix(loaded.tokenizer))})
    return {t.name: float(out["results"][t.config["task"]][t.metric]) for t in tasks}


# ------------------------------------------------------------------------------------------------ layer skip


class WindowCache:
    """One clean run of the perplexity windows, keeping the hidden state entering each requested layer.

    :meth:`nll` re-scores the windows under whatever intervention is active, starting at ``start_layer``.
    """

    def __init__(self, loaded: LoadedModel, windows: Tensor, layers: Sequence[int], *, batch_size: int = 4,
                 layer_skip: bool = True) -> None:
        self.model, self.adapter, self.windows, self.batch_size = loaded.model, loaded.adapter, windows, batch_size
        self.layer_skip = layer_skip
        self.hidden: dict[int, list[Tensor]] = {layer: [] for layer in set(layers) if layer > 0 and layer_skip}
        logits_nll = []
        with torch.no_grad():
            for start in range(0, len(windows), batch_size):
                batch = windows[start : start + batch_size]
                out = self.model(input_ids=batch, output_hidden_states=bool(self.hidden), use_cache=False)
                for layer, kept in self.hidden.items():
                    kept.append(out.hidden_states[layer])  # (b, t, hidden)
                logits = out.logits[:, :-1].float()
                logits_nll.append(torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none")
                    .view(batch.shape[0], -1).double().sum(1))
        self.clean_nll = torch.cat(logits_nll)  # (n_windows,)

    def nll(self, start_layer: int) -> Tensor:
        """Summed NLL per window under the active interventions, all at layers ≥ ``start_layer``."""
        if start_layer <= 0 or not self.layer_skip:
            return window_nll(self.model, self.windows, batch_size=self.batch_size)
        batches = iter(self.hidden[start_layer])
        plain = model_forward(self.model)

        def forward(input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
            with start_at_layer(self.adapter, start_layer, next(batches)):
                return plain(input_ids, attention_mask)

        return window_nll(self.model, self.windows, batch_size=self.batch_size, forward=forward)

    def perplexity(self, nll: Tensor) -> float:
        return perplexity_from_nll(nll, self.windows)[0]


# ------------------------------------------------------------------------------------------------ Table 1


@dataclass(frozen=True)
class ConditionResult:
    name: str
    perplexity: float
    accuracy: dict[str, float]  # task -> accuracy (acc, or exact match for the arithmetic task)
    mean_accuracy: float  # over the tasks run (NaN when none)
    start_layer: int  # the layer the re-evaluation started at (0 = full forward)
    seconds: float


@dataclass(frozen=True)
class ResidualProfile:
    """max_t,c |h_L[t, c]| of the residual stream entering each layer on the detection prompt."""

    original: list[float]
    pruned: list[float]


@dataclass(frozen=True)
class SuperWeightImpact(CheckResult):
    """The paper's Table 1 on this model, and the residual-stream maxima with and without the super weights."""

    coordinates: list[Coordinate]
    conditions: tuple[ConditionResult, ...]
    n_others: int
    tasks: list[str]
    tasks_skipped: list[str]
    residual: ResidualProfile
    n_windows: int
    seq_len: int
    corpus: str

    def condition(self, name: str) -> ConditionResult:
        return next(c for c in self.conditions if c.name == name)

    @metric_group(*tuple(f"perplexity_{c}" for c in CONDITIONS) + tuple(f"accuracy_{c}" for c in CONDITIONS) + (
        "perplexity_ratio_prune_sw", "perplexity_ratio_prune_sw_restore", "perplexity_change_prune_others",
        "perplexity_ratio_sw_over_others",
        "accuracy_drop_prune_sw", "n_super_weights"))
    def _metrics(self) -> dict[str, object]:
        ppl = {c.name: c.perplexity for c in self.conditions}
        acc = {c.name: c.mean_accuracy for c in self.conditions}
        base = ppl["original"]
        return {
            **{f"perplexity_{name}": value for name, value in ppl.items()},
            **{f"accuracy_{name}": value for name, value in acc.items()},
            "perplexity_ratio_prune_sw": ppl["prune_sw"] / base,
            "perplexity_ratio_prune_sw_restore": ppl["prune_sw_restore"] / base,
            "perplexity_change_prune_others": abs(ppl["prune_others"] / base - 1),
            "perplexity_ratio_sw_over_others": ppl["prune_sw"] / ppl["prune_others"],
            "accuracy_drop_prune_sw": acc["original"] - acc["prune_sw"],
            "n_super_weights": len(self.coordinates),
        }


def conditions_for(adapter: ArchitectureAdapter, detection: SuperWeightDetection,
                   n_others: int) -> dict[str, tuple[int, Intervention]]:
    """``{name: (earliest intervened layer, intervention factory)}`` for the four conditions of Table 1."""
    coords = detection.coordinates
    others = largest_other_weights(adapter, n_others, coords)
    layer_of = {id(adapter.down_proj(i)): i for i in range(adapter.n_layers)}
    others_start = 0 if any(id(m) not in layer_of for m in others) else min(layer_of[id(m)] for m in others)
    sw_start = min((c[0] for c in coords), default=0)
    return {
        "original": (0, contextlib.nullcontext),
        "prune_sw": (sw_start, lambda: edit_down_proj_weights(adapter, coords, value=0.0)),
        "prune_others": (others_start, lambda: zero_weights(others)),
        "prune_sw_restore": (sw_start, lambda: prune_and_restore(adapter, detection)),
    }


def residual_profile(loaded: LoadedModel, detection: SuperWeightDetection) -> ResidualProfile:
    from lmaudit.checks.core.layer_skip import clean_hidden_states
    from lmaudit.checks.core.logprobs import encode_prompts

    ids = torch.tensor(encode_prompts(loaded.tokenizer, [detection.prompt]))
    n = loaded.adapter.n_layers

    def maxima() -> list[float]:
        _, hidden = clean_hidden_states(loaded.model, ids)
        return [float(h.abs().max()) for h in hidden[:n]]

    original = maxima()
    with edit_down_proj_weights(loaded.adapter, detection.coordinates, value=0.0):
        pruned = maxima()
    return ResidualProfile(original, pruned)


def superweight_impact(loaded: LoadedModel, detection: SuperWeightDetection, corpus: Any, *, n_others: int = 7000,
                       seq_len: int = 128, n_windows: int = 4, tasks: Sequence[str] = ("arithmetic",),
                       limit: int = 100, layer_skip: bool = True, seed: int = 0) -> SuperWeightImpact:
    """Table 1: perplexity and zero-shot accuracy under each condition (see the module docstring)."""
    if not detection.super_weights:
        raise_no_super_weights(loaded)
    conditions = conditions_for(loaded.adapter, detection, n_others)
    windows = corpus_windows(loaded.tokenizer, corpus, seq_len, n_windows)
    cache = WindowCache(loaded, windows, [start for name, (start, _) in conditions.items() if name != "original"],
                        layer_skip=layer_skip)
    available, skipped = zero_shot_tasks(tasks, seed=seed)
    results = []
    for name, (start, intervention) in conditions.items():
        started = time.perf_counter()
        with intervention():
            nll = cache.clean_nll if name == "original" else cache.nll(start)
            accuracy = task_accuracies(loaded, available, limit=limit)
        results.append(ConditionResult(name, cache.perplexity(nll), accuracy, _mean(accuracy),
                                       0 if name == "original" else start, time.perf_counter() - started))
    return SuperWeightImpact(detection.coordinates, tuple(results), n_others, [t.name for t in available], skipped,
                             residual_profile(loaded, detection), n_windows, seq_len, corpus.name)


def raise_no_super_weights(loaded: LoadedModel) -> None:
    raise LmAuditError(f"{loaded.spec}: no super weight was detected, so there is nothing to prune or scale")


def _mean(values: dict[str, float]) -> float:
    return sum(values.values()) / len(values) if values else float("nan")


class ImpactParams(SuperWeightParams):
    n_others: int = 7000  # the paper's count of other largest-magnitude weights
    seq_len: int = 128
    n_windows: int = 8
    quick_n_windows: int = 4
    # LAMBADA is available too, but its long contexts cost minutes per condition on 2 cores: opt in with tasks=.
    tasks: list[str] = ["arithmetic", "arc_easy"]  # PIQA too with tasks=: +25 s per full run
    quick_tasks: list[str] = ["arithmetic"]
    limit: int = 30  # documents per task and condition: lm-eval is ~0.7 s per document here (50 docs: 148 s)
    quick_limit: int = 40
    layer_skip: bool = True


@register_check(
    "superweight_impact",
    params=ImpactParams,
    area="superweights")
def superweight_impact_audit(context: AuditContext, params: ImpactParams) -> SuperWeightImpact:
    """Prune the super weight(s), the top-N others, or prune and restore the super activation (Table 1)."""
    detection = cached_detection(context, params)
    return superweight_impact(
        context.model, detection, context.corpus(), n_others=params.n_others, seq_len=params.seq_len,
        n_windows=params.quick_n_windows if context.quick else params.n_windows,
        tasks=params.quick_tasks if context.quick else params.tasks,
        limit=params.quick_limit if context.quick else params.limit, layer_skip=params.layer_skip, seed=context.seed)


# ------------------------------------------------------------------------------------------------ stopwords


@dataclass(frozen=True)
class TokenShift:
    token: str
    original: float  # mean probability
    pruned: float
    ratio: float  # pruned / original


@dataclass(frozen=True)
class StopwordShift(CheckResult):
    """Mean next-token distribution over corpus prompts with and without the super weights."""

    n_prompts: int
    prompt_tokens: int
    stopword_mass_original: float
    stopword_mass_pruned: float
    top_tokens: tuple[TokenShift, ...]  # the top tokens of the pruned model's mean distribution
    n_stopword_tokens: int

    @metric_group(*("stopword_mass_original", "stopword_mass_pruned", "stopword_mass_ratio", "top_token_pruned"))
    def _metrics(self) -> dict[str, object]:
        return {
            "stopword_mass_original": self.stopword_mass_original,
            "stopword_mass_pruned": self.stopword_mass_pruned,
            "stopword_mass_ratio": self.stopword_mass_pruned / max(self.stopword_mass_original, 1e-12),
            "top_token_pruned": self.top_tokens[0].token if self.top_tokens else "",
        }


def stopword_token_ids(tokenizer: Any) -> Tensor:
    """Ids of the tokens whose decoded text, stripped and lowercased, is in :data:`STOPWORDS`."""
    texts = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    ids = [i for i, raw in enumerate(texts)
           if raw is not None and tokenizer.convert_tokens_to_string([raw]).strip().lower() in STOPWORDS]
    return torch.tensor(ids, dtype=torch.long)


def corpus_prompts(loaded: LoadedModel, corpus: Any, n_prompts: int, prompt_tokens: int) -> Tensor:
    """``(n_prompts, [BOS] + prompt_tokens)``: consecutive corpus chunks under the BOS policy."""
    tokens = corpus_tokens(loaded.tokenizer, corpus)[: n_prompts * prompt_tokens].view(n_prompts, prompt_tokens)
    prefix = bos_prefix(loaded.tokenizer)
    if prefix:
        tokens = torch.cat([torch.full((n_prompts, 1), prefix[0]), tokens], dim=1)
    return tokens


def mean_next_token_distribution(model: nn.Module, prompts: Tensor, *, batch_size: int = 32,
                                 forward: Callable[[Tensor, int], Tensor] | None = None) -> Tensor:
    """``p̄ = (1/N) Σ_i softmax(logits_i[last])``: ``(vocab,)`` float64."""
    total = None
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            logits = forward(batch, start) if forward else model(input_ids=batch, use_cache=False).logits
            probs = torch.softmax(logits[:, -1].double(), dim=-1).sum(0)
            total = probs if total is None else total + probs
    return total / len(prompts)


def stopword_shift(loaded: LoadedModel, detection: SuperWeightDetection, corpus: Any, *, n_prompts: int = 200,
                   prompt_tokens: int = 32, top_k: int = 20) -> StopwordShift:
    """Stopword mass and top-token ratios with and without the super weights (see the module docstring)."""
    if not detection.super_weights:
        raise_no_super_weights(loaded)
    prompts = corpus_prompts(loaded, corpus, n_prompts, prompt_tokens)
    batch_size = 32
    layer = min(c[0] for c in detection.coordinates)
    hidden: list[Tensor] = []

    def clean(batch: Tensor, start: int) -> Tensor:
        out = loaded.model(input_ids=batch, output_hidden_states=layer > 0, use_cache=False)
        if layer > 0:
            hidden.append(out.hidden_states[layer])
        return out.logits

    def skipped(batch: Tensor, start: int) -> Tensor:
        with start_at_layer(loaded.adapter, layer, hidden[start // batch_size]):
            return loaded.model(input_ids=batch, use_cache=False).logits

    original = mean_next_token_distribution(loaded.model, prompts, batch_size=batch_size, forward=clean)
    with edit_down_proj_weights(loaded.adapter, detection.coordinates, value=0.0):
        pruned = mean_next_token_distribution(loaded.model, prompts, batch_size=batch_size,
                                              forward=skipped if layer > 0 else None)
    stop = stopword_token_ids(loaded.tokenizer)
    top = torch.topk(pruned, top_k).indices.tolist()
    shifts = tuple(TokenShift(loaded.tokenizer.decode([i]), float(original[i]), float(pruned[i]),
                              float(pruned[i] / max(float(original[i]), 1e-30))) for i in top)
    return StopwordShift(n_prompts, prompt_tokens, float(original[stop].sum()), float(pruned[stop].sum()), shifts,
                         len(stop))


class StopwordParams(SuperWeightParams):
    n_prompts: int = 100  # 200 cost 41 s of the full run; the ratio (0.38 measured, gate 0.7) is far from noise
    quick_n_prompts: int = 64
    prompt_tokens: int = 32
    top_k: int = 20


@register_check(
    "superweight_stopwords",
    params=StopwordParams,
    area="superweights")
def stopword_audit(context: AuditContext, params: StopwordParams) -> StopwordShift:
    """Pruning the super weights moves next-token probability mass onto stopwords (Yu et al. 2024, §3.3)."""
    return stopword_shift(context.model, cached_detection(context, params), context.corpus(),
                          n_prompts=params.quick_n_prompts if context.quick else params.n_prompts,
                          prompt_tokens=params.prompt_tokens, top_k=params.top_k)


# ------------------------------------------------------------------------------------------------ scaling


@dataclass(frozen=True)
class ScalePoint:
    scale: float
    perplexity: float
    accuracy: dict[str, float]
    mean_accuracy: float


@dataclass(frozen=True)
class SuperWeightScaling(CheckResult):
    """Perplexity and accuracy with every super weight multiplied by each factor (paper §3.4, Figure 6)."""

    coordinates: list[Coordinate]
    points: tuple[ScalePoint, ...]
    tasks: list[str]
    tasks_skipped: list[str]

    @metric_group(*("best_scale_perplexity", "best_perplexity", "best_scale_accuracy", "perplexity_at_1",
             "perplexity_ratio_at_0", "best_perplexity_gain"))
    def _metrics(self) -> dict[str, object]:
        by_ppl = min(self.points, key=lambda p: p.perplexity)
        scored = [p for p in self.points if p.mean_accuracy == p.mean_accuracy]
        by_acc = max(scored, key=lambda p: p.mean_accuracy) if scored else None
        at = {p.scale: p.perplexity for p in self.points}
        return {
            "best_scale_perplexity": by_ppl.scale,
            "best_perplexity": by_ppl.perplexity,
            "best_scale_accuracy": by_acc.scale if by_acc else float("nan"),
            "perplexity_at_1": at.get(1.0, float("nan")),
            "perplexity_ratio_at_0": at.get(0.0, float("nan")) / at.get(1.0, float("nan")),
            "best_perplexity_gain": 1 - by_ppl.perplexity / at.get(1.0, float("nan")),
        }


def superweight_scaling(loaded: LoadedModel, detection: SuperWeightDetection, corpus: Any, *,
                        scales: Sequence[float] = DEFAULT_SCALES, seq_len: int = 128, n_windows: int = 4,
                        tasks: Sequence[str] = ("arithmetic",), limit: int = 100, seed: int = 0) -> SuperWeightScaling:
    if not detection.super_weights:
        raise_no_super_weights(loaded)
    layer = min(c[0] for c in detection.coordinates)
    windows = corpus_windows(loaded.tokenizer, corpus, seq_len, n_windows)
    cache = WindowCache(loaded, windows, [layer])
    available, skipped = zero_shot_tasks(tasks, seed=seed)
    points = []
    for scale in scales:
        with edit_down_proj_weights(loaded.adapter, detection.coordinates, scale=scale):
            nll = cache.clean_nll if scale == 1.0 else cache.nll(layer)
            accuracy = task_accuracies(loaded, available, limit=limit)
        points.append(ScalePoint(scale, cache.perplexity(nll), accuracy, _mean(accuracy)))
    return SuperWeightScaling(detection.coordinates, tuple(points), [t.name for t in available], skipped)


class ScalingParams(SuperWeightParams):
    scales: list[float] = list(DEFAULT_SCALES)
    seq_len: int = 128
    n_windows: int = 4
    tasks: list[str] = ["arithmetic"]  # one task per scale keeps the 8-point curve to about a minute
    quick_tasks: list[str] = []
    limit: int = 24  # documents per scale: the gates are on perplexity; the accuracy curve is shown


@register_check(
    "superweight_scaling",
    params=ScalingParams,
    area="superweights")
def scaling_audit(context: AuditContext, params: ScalingParams) -> SuperWeightScaling:
    """Perplexity and accuracy as the super weights are scaled by 0 … 3 (Yu et al. 2024, §3.4)."""
    return superweight_scaling(context.model, cached_detection(context, params), context.corpus(),
                               scales=params.scales, seq_len=params.seq_len, n_windows=params.n_windows,
                               tasks=params.quick_tasks if context.quick else params.tasks, limit=params.limit,
                               seed=context.seed)
