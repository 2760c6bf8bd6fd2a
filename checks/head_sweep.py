"""Head sensitivity sweep (Yu & Ananiadou 2024, §3): ablate every attention head, one at a time, and measure
greedy exact-match accuracy per operation.

Ablating head ``h`` of layer ``L`` zeroes its contribution ``W_O[:, h·d:(h+1)·d] · z_h`` at every position (its
slice of the output projection's input; :func:`checks.interventions.scale_heads_per_row`). Then::

    drop(L, h, op) = accuracy_clean(op) − accuracy_{−(L,h)}(op)          (in points: × 100)
    critical heads = {(L, h) : max_op drop(L, h, op) ≥ threshold_points}

Fast sweep (:func:`head_sweep`), exact given the same inputs:

1. Prompts are grouped by (operation, digits, template, few-shot examples); the longest token prefix shared by a group (a few-shot prefix made with
   ``generate_problems(..., shared_shots=True)``) is run once, and its keys/values are cached.
2. One clean pass over each group's suffixes (prompt tail + answer, teacher forced as in
   :mod:`checks.arithmetic_eval`) gives the baseline and caches ``hidden_states[L]``, the residual entering
   layer ``L``.
3. For each layer ``L``: one pass over the prefix with ``n_heads`` rows (row ``h`` ablates head ``h``), starting
   at layer ``L`` (:func:`checks.layer_skip.start_at_layer`), gives each ablation's prefix keys/values for layers
   ``≥ L`` (those below ``L`` are the clean ones). Then one pass (or a few, ``max_rows``) over
   ``rows = head × prompt`` starting at layer ``L`` from the cached ``hidden_states[L]`` evaluates all heads of
   ``L`` at once. Logits are computed only at the checked positions.

So layers below ``L`` never run again, the shared prefix runs once per layer instead of once per prompt and
head, and the model is never copied. :func:`naive_head_sweep` is the reference the paper's code implements
(deep-copy the model per head, zero the ``W_O`` columns, evaluate the full prompts); it exists for the tests
and the benchmark only.
"""

from __future__ import annotations

import copy
import inspect
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from checks.adapter import ArchitectureAdapter, adapter_for
from checks.arithmetic_data import ArithmeticProblem
from checks.arithmetic_eval import (
    EncodedAnswer,
    _pad_id,
    digit_start_mask,
    encode_problems,
    judge,
    predicted_tokens,
    teacher_forced_batch,
    teacher_forced_correct,
)
from checks.interventions import scale_heads_per_row
from checks.layer_skip import start_at_layer

# Rows (head × prompt) per ablation pass: 9 heads × 64 prompts × ~10 suffix tokens stays near 100 MB of
# activations per layer on the default model.
DEFAULT_MAX_ROWS = 1024
DEFAULT_THRESHOLD_POINTS = 10.0  # the paper's "drop of at least 10 points" for a critical head


@dataclass(frozen=True)
class HeadSweepResult:
    """Accuracy per (layer, head, operation) with one head ablated, against the clean baseline.

    ``accuracy[L][h][j]`` and ``drop[L][h][j]`` are fractions (``drop = baseline − accuracy``) for operation
    ``ops[j]``; layers not swept hold NaN. ``critical`` are the heads whose largest drop over operations is at
    least ``threshold_points / 100``, sorted by that drop, largest first.
    """

    ops: tuple[str, ...]
    n_per_op: tuple[int, ...]
    baseline: tuple[float, ...]
    accuracy: list[list[list[float]]]  # (n_layers, n_heads, n_ops)
    threshold_points: float
    layers: tuple[int, ...]
    method: str  # "fast" or "naive (deep copy per head)"
    seconds: float
    critical: tuple[tuple[int, int], ...] = field(default=())

    @property
    def drop(self) -> list[list[list[float]]]:
        return [[[b - a for a, b in zip(head, self.baseline, strict=True)] for head in layer]
                for layer in self.accuracy]

    def max_drop(self, layer: int, head: int) -> float:
        return max(self.drop[layer][head])

    def top_heads(self, k: int = 10) -> list[tuple[int, int, float]]:
        """``(layer, head, max drop over ops)`` of the ``k`` most damaging heads, largest drop first."""
        rows = [(layer, head, self.max_drop(layer, head)) for layer in self.layers
                for head in range(len(self.accuracy[layer]))]
        return sorted(rows, key=lambda row: -row[2])[:k]

    def metrics(self) -> dict[str, Any]:
        drops = [d for layer in self.layers for head in self.drop[layer] for d in head]
        out: dict[str, Any] = {
            "n_critical": len(self.critical),
            "critical_heads": [f"L{layer}.H{head}" for layer, head in sorted(self.critical)],
            "max_drop_points": 100 * max(drops, default=0.0),
            "baseline_accuracy": sum(b * n for b, n in zip(self.baseline, self.n_per_op, strict=True))
            / max(1, sum(self.n_per_op)),
            "seconds": self.seconds,
        }
        return out


def critical_heads(accuracy: torch.Tensor, baseline: torch.Tensor, threshold_points: float,
                   layers: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """Heads whose largest drop over operations is ``≥ threshold_points / 100``, largest drop first."""
    drop = (baseline[None, None, :] - accuracy).amax(dim=-1)  # (n_layers, n_heads)
    found = [(int(layer), int(head)) for layer in layers for head in range(drop.shape[1])
             if drop[layer, head] >= threshold_points / 100 - 1e-12]
    return tuple(sorted(found, key=lambda lh: -float(drop[lh])))


# ----------------------------------------------------------------------------------- fast sweep core


def common_prefix_length(encoded: Sequence[EncodedAnswer]) -> int:
    """Tokens shared by every sequence, leaving each at least one prompt token (the first checked position)."""
    limit = min(len(e.prompt_ids) for e in encoded) - 1
    first = encoded[0].sequence
    length = 0
    while length < limit and all(e.sequence[length] == first[length] for e in encoded):
        length += 1
    return length


def _kv(output: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer keys/values of a model output's cache (``.cache`` in transformers ≥ 5.x, else
    ``.past_key_values``)."""
    cache = getattr(output, "cache", None)
    if cache is None:
        cache = output.past_key_values
    return [(layer.keys, layer.values) for layer in cache.layers]


def _cache_kwarg(model: Any) -> str:
    """The forward argument that takes a KV cache: ``cache`` (new transformers) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache(model: Any, kv: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    return DynamicCache(ddp_cache_data=[(k.contiguous(), v.contiguous()) for k, v in kv], config=model.config)


@dataclass
class _Group:
    """One operation's prompts with their shared-prefix cache and clean suffix states."""

    index: torch.Tensor  # (n,) positions in the problem list
    prefix: torch.Tensor  # (1, P) shared prefix ids (P may be 0)
    prefix_hidden: tuple[torch.Tensor, ...]  # hidden_states[L] of the prefix, (1, P, hidden) each
    prefix_kv: list[tuple[torch.Tensor, torch.Tensor]]  # clean prefix keys/values per layer, batch 1
    batch: Any  # TeacherForcedBatch of the suffixes
    suffix_hidden: tuple[torch.Tensor, ...]  # hidden_states[L] of the suffixes, (n, S, hidden) each
    baseline: torch.Tensor  # (n,) bool


def _suffix_pass(model: Any, group_batch: Any, prefix_kv: list, prefix_len: int, rows_repeat: int = 1,
                 kv_override: list | None = None, **kwargs: Any) -> Any:
    """Forward of the (tiled) suffix batch on top of a prefix cache; returns predicted tokens."""
    n = len(group_batch)
    mask = group_batch.attention_mask.repeat(rows_repeat, 1)
    batch = type(group_batch)(group_batch.input_ids.repeat(rows_repeat, 1), mask,
                              group_batch.positions.repeat(rows_repeat, 1), group_batch.expected.repeat(rows_repeat, 1))
    if prefix_len:
        kv = kv_override or [(k.expand(n * rows_repeat, *k.shape[1:]), v.expand(n * rows_repeat, *v.shape[1:]))
                             for k, v in prefix_kv]
        kwargs[_cache_kwarg(model)] = _cache(model, kv)
        kwargs["use_cache"] = True
        kwargs["attention_mask"] = torch.cat([torch.ones(mask.shape[0], prefix_len, dtype=mask.dtype), mask], 1)
    return predicted_tokens(model, batch, **kwargs), batch


def _prepare_group(model: Any, tokenizer: Any, encoded: Sequence[EncodedAnswer], index: torch.Tensor,
                   digit_start: torch.Tensor, *, use_prefix: bool, stop_check: bool) -> _Group:
    group = [encoded[i] for i in index]
    prefix_len = common_prefix_length(group) if use_prefix else 0
    prefix = torch.tensor([group[0].sequence[:prefix_len]], dtype=torch.long)
    prefix_hidden: tuple[torch.Tensor, ...] = ()
    prefix_kv: list = []
    if prefix_len:
        with torch.no_grad():
            out = model(input_ids=prefix, use_cache=True, output_hidden_states=True)
        prefix_hidden, prefix_kv = tuple(out.hidden_states), _kv(out)
    batch = teacher_forced_batch(group, pad_id=_pad_id(tokenizer), offset=prefix_len, stop_check=stop_check)
    predicted, hidden = _clean_suffix_pass(model, batch, prefix_kv, prefix_len)
    return _Group(index, prefix, prefix_hidden, prefix_kv, batch, hidden, judge(predicted, batch, digit_start))


def _clean_suffix_pass(model: Any, batch: Any, prefix_kv: list,
                       prefix_len: int) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The clean suffix pass: ``(predicted (n, slots), hidden_states)``."""
    kwargs: dict[str, Any] = {"attention_mask": batch.attention_mask, "output_hidden_states": True,
                              "use_cache": bool(prefix_len)}
    if prefix_len:
        n = len(batch)
        kwargs[_cache_kwarg(model)] = _cache(model, [(k.expand(n, *k.shape[1:]), v.expand(n, *v.shape[1:]))
                                                   for k, v in prefix_kv])
        kwargs["attention_mask"] = torch.cat([torch.ones(n, prefix_len, dtype=torch.long), batch.attention_mask], 1)
    with torch.no_grad():
        out = model(input_ids=batch.input_ids, **kwargs)
    rows = torch.arange(len(batch))[:, None]
    return out.logits[rows, batch.positions].argmax(-1), tuple(out.hidden_states)


def _chunks(items: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield list(items[start:start + size])


def _progress(iterable: Any, enabled: bool, total: int) -> Any:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, leave=False, desc="head sweep")


@torch.no_grad()
def sweep_correct(
    model: Any, tokenizer: Any, encoded: Sequence[EncodedAnswer], groups: Sequence[int], *,
    layers: Sequence[int] | None = None, max_rows: int = DEFAULT_MAX_ROWS, use_prefix: bool = True,
    stop_check: bool = True, adapter: ArchitectureAdapter | None = None, progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(baseline (n,), correct (n_layers, n_heads, n))`` bool: per problem, clean and with each head ablated.

    ``groups[i]`` labels problem ``i`` (e.g. its operation); each group's shared token prefix is cached once.
    Layers not in ``layers`` are left False.
    """
    adapter = adapter or adapter_for(model)
    n_layers, n_heads = adapter.n_layers, adapter.heads.n_heads
    layers = list(range(n_layers)) if layers is None else sorted(set(layers))
    digit_start = digit_start_mask(tokenizer)
    labels = torch.as_tensor(list(groups))
    baseline = torch.zeros(len(encoded), dtype=torch.bool)
    correct = torch.zeros((n_layers, n_heads, len(encoded)), dtype=torch.bool)
    prepared = []
    for label in torch.unique(labels):
        group = _prepare_group(model, tokenizer, encoded, torch.nonzero(labels == label).flatten(), digit_start,
                               use_prefix=use_prefix, stop_check=stop_check)
        baseline[group.index] = group.baseline
        prepared.append(group)
    per_pass = max(1, max_rows // max(len(g.index) for g in prepared))
    for layer in _progress(layers, progress, len(layers)):
        for group in prepared:
            _sweep_layer(model, adapter, group, layer, per_pass, digit_start, correct)
    return baseline, correct


def _sweep_layer(model: Any, adapter: ArchitectureAdapter, group: _Group, layer: int, per_pass: int,
                 digit_start: torch.Tensor, correct: torch.Tensor) -> None:
    n_heads, n = adapter.heads.n_heads, len(group.index)
    prefix_len = group.prefix.shape[1]
    ablated_kv: list = []
    if prefix_len:
        scales = 1.0 - torch.eye(n_heads)  # row h ablates head h
        hidden = group.prefix_hidden[layer].expand(n_heads, -1, -1).contiguous()
        with start_at_layer(adapter, layer, hidden), scale_heads_per_row(adapter, layer, scales):
            out = model(input_ids=group.prefix.expand(n_heads, -1), use_cache=True, logits_to_keep=1)
        ablated_kv = _kv(out)
    for heads in _chunks(range(n_heads), per_pass):
        rows = len(heads) * n  # head-major: row j·n + i is prompt i with head heads[j] ablated
        scales = torch.ones(rows, n_heads)
        for j, head in enumerate(heads):
            scales[j * n:(j + 1) * n, head] = 0.0
        kv = None
        if prefix_len:
            pick = torch.tensor(heads)
            kv = [(k.expand(rows, *k.shape[1:]), v.expand(rows, *v.shape[1:]))
                  for k, v in group.prefix_kv[:layer]]
            kv += [(k[pick].repeat_interleave(n, 0), v[pick].repeat_interleave(n, 0))
                   for k, v in ablated_kv[layer:]]
        hidden = group.suffix_hidden[layer].repeat(len(heads), 1, 1)
        with start_at_layer(adapter, layer, hidden), scale_heads_per_row(adapter, layer, scales):
            predicted, batch = _suffix_pass(model, group.batch, group.prefix_kv, prefix_len,
                                            rows_repeat=len(heads), kv_override=kv)
        ok = judge(predicted, batch, digit_start).view(len(heads), n)
        for j, head in enumerate(heads):
            correct[layer, head, group.index] = ok[j]


# ------------------------------------------------------------------------------------ public sweeps


def _result(problems: Sequence[ArithmeticProblem], baseline: torch.Tensor, correct: torch.Tensor,
            layers: Sequence[int], threshold_points: float, method: str, seconds: float) -> HeadSweepResult:
    ops = tuple(dict.fromkeys(p.op.symbol for p in problems))
    op_of = torch.tensor([ops.index(p.op.symbol) for p in problems])
    n_layers, n_heads, _ = correct.shape
    n_per_op = torch.bincount(op_of, minlength=len(ops))  # (n_ops,)
    onehot = torch.nn.functional.one_hot(op_of, len(ops)).float()  # (n, n_ops)
    base = (baseline.float() @ onehot) / n_per_op  # (n_ops,)
    acc = (correct.float() @ onehot) / n_per_op  # (n_layers, n_heads, n_ops)
    swept = torch.zeros(n_layers, dtype=torch.bool)
    swept[list(layers)] = True
    acc[~swept] = float("nan")
    return HeadSweepResult(
        ops=ops, n_per_op=tuple(int(c) for c in n_per_op), baseline=tuple(float(b) for b in base),
        accuracy=acc.tolist(), threshold_points=threshold_points, layers=tuple(layers), method=method,
        seconds=seconds, critical=critical_heads(acc, base, threshold_points, layers),
    )


def head_sweep(
    model: Any, tokenizer: Any, problems: Sequence[ArithmeticProblem], *, layers: Sequence[int] | None = None,
    threshold_points: float = DEFAULT_THRESHOLD_POINTS, max_rows: int = DEFAULT_MAX_ROWS, use_prefix: bool = True,
    adapter: ArchitectureAdapter | None = None, progress: bool = False,
) -> HeadSweepResult:
    """The fast sweep over every head of ``layers`` (default all); see the module docstring."""
    if not problems:
        raise ValueError("head_sweep needs at least one problem")
    adapter = adapter or adapter_for(model)
    layers = list(range(adapter.n_layers)) if layers is None else sorted(set(layers))
    start = time.perf_counter()
    encoded = encode_problems(tokenizer, problems)
    keys = [(p.op.symbol, p.digits, p.template, p.shots) for p in problems]  # prompts of one key share their few-shot prefix
    index = {key: i for i, key in enumerate(dict.fromkeys(keys))}
    groups = [index[key] for key in keys]
    baseline, correct = sweep_correct(model, tokenizer, encoded, groups, layers=layers, max_rows=max_rows,
                                      use_prefix=use_prefix, adapter=adapter, progress=progress)
    return _result(problems, baseline, correct, layers, threshold_points, "fast", time.perf_counter() - start)


@torch.no_grad()
def naive_correct(
    model: Any, tokenizer: Any, encoded: Sequence[EncodedAnswer], heads: Sequence[tuple[int, int]], *,
    batch_size: int = 32, stop_check: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """REFERENCE ONLY (tests, benchmark): deep-copy the model per head, zero that head's ``W_O`` columns,
    evaluate the full prompts. Returns ``(baseline (n,), correct (len(heads), n))``."""
    baseline = teacher_forced_correct(model, tokenizer, encoded, batch_size=batch_size, stop_check=stop_check)
    rows = []
    for layer, head in heads:
        copied = copy.deepcopy(model)
        copied_adapter = adapter_for(copied)
        copied_adapter.weight(copied_adapter.attn_out(layer))[:, copied_adapter.heads.columns(head)] = 0.0
        rows.append(teacher_forced_correct(copied, tokenizer, encoded, batch_size=batch_size,
                                           stop_check=stop_check))
        del copied
    return baseline, torch.stack(rows) if rows else torch.zeros((0, len(encoded)), dtype=torch.bool)


def naive_head_sweep(
    model: Any, tokenizer: Any, problems: Sequence[ArithmeticProblem], *, layers: Sequence[int] | None = None,
    threshold_points: float = DEFAULT_THRESHOLD_POINTS, batch_size: int = 32,
) -> HeadSweepResult:
    """REFERENCE ONLY: the deep-copy-per-head sweep of the paper's code, for tests and the benchmark."""
    adapter = adapter_for(model)
    layers = list(range(adapter.n_layers)) if layers is None else sorted(set(layers))
    start = time.perf_counter()
    encoded = encode_problems(tokenizer, problems)
    heads = [(layer, head) for layer in layers for head in range(adapter.heads.n_heads)]
    baseline, rows = naive_correct(model, tokenizer, encoded, heads, batch_size=batch_size)
    correct = torch.zeros((adapter.n_layers, adapter.heads.n_heads, len(problems)), dtype=torch.bool)
    for (layer, head), row in zip(heads, rows, strict=True):
        correct[layer, head] = row
    return _result(problems, baseline, correct, layers, threshold_points, "naive (deep copy per head)",
                   time.perf_counter() - start)
