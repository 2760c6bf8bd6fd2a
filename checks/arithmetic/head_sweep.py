"""Head sensitivity sweep (Yu & Ananiadou 2024, §3): ablate every attention head, one at a time, and measure
greedy exact-match accuracy per operation.

Ablating head ``h`` of layer ``L`` zeroes its contribution ``W_O[:, h·d:(h+1)·d] · z_h`` at every position (its
slice of the output projection's input; :func:`lmaudit.checks.core.interventions.scale_heads_per_row`). Then::

    drop(L, h, op) = accuracy_clean(op) − accuracy_{−(L,h)}(op)          (in points: × 100)
    critical heads = {(L, h) : max_op drop(L, h, op) ≥ threshold_points}

Fast sweep (:func:`head_sweep`), exact given the same inputs:

1. Prompts are grouped by (operation, digits, template, few-shot examples); the longest token prefix shared by a group (a few-shot prefix made with
   ``generate_problems(..., shared_shots=True)``) is run once, and its keys/values are cached.
2. One clean pass over each group's suffixes (prompt tail + answer, teacher forced as in
   :mod:`lmaudit.checks.core.accuracy`) gives the baseline and caches ``hidden_states[L]``, the residual entering
   layer ``L``.
3. For each layer ``L``: one pass over the prefix with ``n_heads`` rows (row ``h`` ablates head ``h``), starting
   at layer ``L`` (:func:`lmaudit.checks.core.layer_skip.start_at_layer`), gives each ablation's prefix keys/values for layers
   ``≥ L`` (those below ``L`` are the clean ones). Then one pass (or a few, ``max_rows``) over
   ``rows = head × prompt`` starting at layer ``L`` from the cached ``hidden_states[L]`` evaluates all heads of
   ``L`` at once. Logits are computed only at the checked positions.

4. Bounded (the default of :func:`head_sweep`): the baseline-correct problems run first for every head. A
   baseline-wrong problem can only raise the ablated accuracy, so ``breaks(L, h, op) / n(op)`` bounds the drop
   from above; heads whose bound is below the threshold on every operation cannot be critical and skip the
   baseline-wrong problems. The critical set is exact; ``exact[L][h]`` says which heads ran every problem.

So layers below ``L`` never run again, the shared prefix runs once per layer instead of once per prompt and
head, and the model is never copied.

Is a drop more than noise? Per head and operation, the ablation *breaks* ``b`` baseline-correct problems and
*fixes* ``c`` baseline-wrong ones (``drop = (b − c) / n``). Under "the head does not matter" a flip is as likely
either way, so the one-sided exact sign (McNemar) test gives ``p = P(Binomial(b + c, ½) ≥ b)``. A critical head
is *significant* when ``p`` of its largest-drop operation is below ``alpha / (number of heads swept)``
(Bonferroni over the sweep). :func:`naive_head_sweep` is the reference the paper's code implements
(deep-copy the model per head, zero the ``W_O`` columns, evaluate the full prompts); it exists for the tests
and the benchmark only.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from lmaudit.checks.core.accuracy import (
    EncodedAnswer,
    digit_start_mask,
    encode_problems,
    judge,
    pad_token_id,
    predicted_tokens,
    teacher_forced_batch,
    teacher_forced_correct,
)
from lmaudit.checks.core.adapter import ArchitectureAdapter, adapter_for
from lmaudit.checks.core.arithmetic_problems import ArithmeticProblem
from lmaudit.checks.core.interventions import scale_heads_per_row
from lmaudit.checks.core.kv_cache import cache_argument, cache_from, layer_keys_values
from lmaudit.checks.core.layer_skip import start_at_layer

# Rows (head × prompt) per ablation pass: 9 heads × 64 prompts × ~10 suffix tokens stays near 100 MB of
# activations per layer on the default model.
DEFAULT_MAX_ROWS = 1024
DEFAULT_THRESHOLD_POINTS = 10.0  # the paper's "drop of at least 10 points" for a critical head
DEFAULT_ALPHA = 0.05  # family-wise error rate of the significance test, Bonferroni over the heads swept


@dataclass(frozen=True)
class TopHead:
    """One head of the top-heads table: its largest drop, on which operation, the flips behind it, and the sign
    test (module docstring)."""

    name: str  # "L14.H3"
    op: str
    drop_points: float
    breaks: int
    fixes: int
    p_value: float
    exact: bool  # False: a bounded-sweep upper bound (the head is proven below the threshold)
    critical: bool
    significant: bool


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
    # exact[L][h]: head (L, h) ran every problem. False only in the bounded sweep, for heads proven below the
    # threshold: their accuracy is a lower bound (drop an upper bound).
    exact: list[list[bool]] = field(default_factory=list)
    # breaks / fixes [L][h][j]: baseline-correct problems of ops[j] the ablation breaks / baseline-wrong ones it
    # fixes (fixes are 0 where the bounded sweep did not run the baseline-wrong problems).
    breaks: list[list[list[int]]] = field(default_factory=list)
    fixes: list[list[list[int]]] = field(default_factory=list)
    alpha: float = DEFAULT_ALPHA

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

    def p_value(self, layer: int, head: int) -> float:
        """One-sided exact sign test of the head's largest-drop operation (module docstring)."""
        drops = self.drop[layer][head]
        j = max(range(len(drops)), key=lambda i: drops[i])
        return sign_test_p(self.breaks[layer][head][j], self.fixes[layer][head][j])

    @property
    def significant(self) -> tuple[tuple[int, int], ...]:
        """Critical heads whose drop is significant at ``alpha`` (Bonferroni over the heads swept)."""
        n_swept = len(self.layers) * len(self.accuracy[0]) if self.accuracy else 1
        return tuple(h for h in self.critical if self.p_value(*h) < self.alpha / n_swept)

    def top_head_rows(self, k: int = 10) -> tuple[TopHead, ...]:
        significant, critical = set(self.significant), set(self.critical)
        rows = []
        for layer, head, drop in self.top_heads(k):
            j = max(range(len(self.ops)), key=lambda i: self.drop[layer][head][i])
            rows.append(TopHead(
                name=f"L{layer}.H{head}", op=self.ops[j], drop_points=100 * drop, breaks=self.breaks[layer][head][j],
                fixes=self.fixes[layer][head][j], p_value=self.p_value(layer, head),
                exact=bool(self.exact[layer][head]) if self.exact else True, critical=(layer, head) in critical,
                significant=(layer, head) in significant))
        return tuple(rows)

    def metrics(self) -> dict[str, Any]:
        drops = [d for layer in self.layers for head in self.drop[layer] for d in head]
        significant = self.significant
        out: dict[str, Any] = {
            "n_critical": len(self.critical),
            "n_significant_critical": len(significant),
            "significant_critical_heads": [f"L{layer}.H{head}" for layer, head in sorted(significant)],
            "critical_heads": [f"L{layer}.H{head}" for layer, head in sorted(self.critical)],
            "max_drop_points": 100 * max(drops, default=0.0),
            "baseline_accuracy": sum(b * n for b, n in zip(self.baseline, self.n_per_op, strict=True))
            / max(1, sum(self.n_per_op)),
            "seconds": self.seconds,
        }
        return out


def sign_test_p(breaks: int, fixes: int) -> float:
    """``P(Binomial(breaks + fixes, ½) ≥ breaks)``: one-sided exact sign (McNemar) test of paired flips."""
    n = breaks + fixes
    return sum(math.comb(n, k) for k in range(breaks, n + 1)) / 2 ** n if n else 1.0


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


@dataclass
class _Part:
    """Prompts of one group with one baseline outcome, evaluated together."""

    index: torch.Tensor  # (m,) positions in the problem list
    local: torch.Tensor  # (m,) positions in the group
    batch: Any  # TeacherForcedBatch of the suffixes, width = their common length
    baseline_correct: bool

    def __len__(self) -> int:
        return len(self.index)


@dataclass
class _Group:
    """Prompts that share one few-shot prefix: the prefix cache, the clean suffix states and the parts."""

    index: torch.Tensor  # (n,) positions in the problem list
    prefix: torch.Tensor  # (1, P) shared prefix ids (P may be 0)
    prefix_hidden: tuple[torch.Tensor, ...]  # hidden_states[L] of the prefix, (1, P, hidden) each
    prefix_kv: list[tuple[torch.Tensor, torch.Tensor]]  # clean prefix keys/values per layer, batch 1
    suffix_hidden: tuple[torch.Tensor, ...]  # hidden_states[L] of the padded suffixes, (n, S, hidden) each
    baseline: torch.Tensor  # (n,) bool
    parts: list[_Part]

    @property
    def prefix_len(self) -> int:
        return self.prefix.shape[1]


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
        prefix_hidden, prefix_kv = tuple(out.hidden_states), layer_keys_values(out)
    pad_id = pad_token_id(tokenizer)
    batch = teacher_forced_batch(group, pad_id=pad_id, offset=prefix_len, stop_check=stop_check)
    predicted, hidden = _clean_suffix_pass(model, batch, prefix_kv, prefix_len)
    baseline = judge(predicted, batch, digit_start)
    # Parts: one per baseline outcome, so the bounded sweep can run the baseline-correct prompts first. (Splitting
    # further by suffix length saves padding but costs more, smaller passes: measured slower.)
    keys = [bool(ok) for ok in baseline]
    parts = []
    for ok in sorted(set(keys), reverse=True):
        local = torch.tensor([i for i, key in enumerate(keys) if key == ok])
        part_batch = teacher_forced_batch([group[i] for i in local], pad_id=pad_id, offset=prefix_len,
                                          stop_check=stop_check)
        parts.append(_Part(index[local], local, part_batch, ok))
    return _Group(index, prefix, prefix_hidden, prefix_kv, hidden, baseline, parts)


def _clean_suffix_pass(model: Any, batch: Any, prefix_kv: list,
                       prefix_len: int) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The clean suffix pass: ``(predicted (n, slots), hidden_states)``."""
    kwargs: dict[str, Any] = {"attention_mask": batch.attention_mask, "output_hidden_states": True,
                              "use_cache": bool(prefix_len)}
    if prefix_len:
        n = len(batch)
        kwargs[cache_argument(model)] = cache_from(model, [(k.expand(n, *k.shape[1:]), v.expand(n, *v.shape[1:]))
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


class SweepOutcome(NamedTuple):
    """Per-problem correctness, clean and with each head ablated.

    ``evaluated[L, h, i]`` is False where the bounded sweep proved head ``(L, h)`` below the threshold without
    running problem ``i`` (a baseline-wrong problem): ``correct`` is False there, so the accuracy computed from
    ``correct`` is a lower bound (the drop an upper bound) for that head, and exact for every other head."""

    baseline: torch.Tensor  # (n,) bool
    correct: torch.Tensor  # (n_layers, n_heads, n) bool
    evaluated: torch.Tensor  # (n_layers, n_heads, n) bool


@torch.no_grad()
def sweep_correct(
    model: Any, tokenizer: Any, encoded: Sequence[EncodedAnswer], groups: Sequence[int], *,
    layers: Sequence[int] | None = None, max_rows: int = DEFAULT_MAX_ROWS, use_prefix: bool = True,
    stop_check: bool = True, adapter: ArchitectureAdapter | None = None, progress: bool = False,
    bound: tuple[Sequence[int], float] | None = None,
) -> SweepOutcome:
    """Correctness of every problem, clean and with each head of ``layers`` ablated (other layers stay False).

    ``groups[i]`` labels problem ``i``; problems of one label share a token prefix that is cached once.
    ``bound = (op_of, threshold)``: the bounded sweep. For each head, the baseline-correct problems run first;
    ``breaks(op) / n(op)`` (baseline-correct problems the ablation breaks, over the operation's problem count)
    bounds the drop from above, because a baseline-wrong problem can only raise the ablated accuracy. Heads
    whose bound is below ``threshold`` (a fraction) on every operation cannot be critical; only the others run
    the baseline-wrong problems. The critical set and the accuracies of the heads that ran everything are exact.
    """
    adapter = adapter or adapter_for(model)
    n_layers, n_heads = adapter.n_layers, adapter.heads.n_heads
    layers = list(range(n_layers)) if layers is None else sorted(set(layers))
    digit_start = digit_start_mask(tokenizer)
    labels = torch.as_tensor(list(groups))
    n = len(encoded)
    baseline = torch.zeros(n, dtype=torch.bool)
    correct = torch.zeros((n_layers, n_heads, n), dtype=torch.bool)
    evaluated = torch.zeros((n_layers, n_heads, n), dtype=torch.bool)
    prepared = []
    for label in torch.unique(labels):
        group = _prepare_group(model, tokenizer, encoded, torch.nonzero(labels == label).flatten(), digit_start,
                               use_prefix=use_prefix, stop_check=stop_check)
        baseline[group.index] = group.baseline
        prepared.append(group)
    everyone = list(range(n_heads))
    for layer in _progress(layers, progress, len(layers)):
        prefix_kv = [_ablated_prefix_kv(model, adapter, group, layer) for group in prepared]
        first = [(g, part) for g in range(len(prepared)) for part in prepared[g].parts
                 if bound is None or part.baseline_correct]
        for g, part in first:
            _evaluate_part(model, adapter, prepared[g], part, layer, everyone, prefix_kv[g], max_rows, digit_start,
                           correct, evaluated)
        if bound is None:
            continue
        op_of, threshold = torch.as_tensor(list(bound[0])), bound[1]
        broken = (baseline & ~correct[layer]).float()  # (n_heads, n): baseline-correct problems broken
        n_op = torch.bincount(op_of).clamp(min=1).float()
        per_op = torch.zeros(n_heads, len(n_op)).index_add_(1, op_of, broken) / n_op
        candidates = [h for h in everyone if float(per_op[h].max()) >= threshold - 1e-12]
        if candidates:
            for g in range(len(prepared)):
                for part in prepared[g].parts:
                    if not part.baseline_correct:
                        _evaluate_part(model, adapter, prepared[g], part, layer, candidates, prefix_kv[g],
                                       max_rows, digit_start, correct, evaluated)
    return SweepOutcome(baseline, correct, evaluated)


def _ablated_prefix_kv(model: Any, adapter: ArchitectureAdapter, group: _Group, layer: int) -> list:
    """Prefix keys/values of layers ``≥ layer`` with each head of ``layer`` ablated: row ``h`` ablates head
    ``h``. One pass from ``layer`` on; layers below keep the clean prefix cache."""
    if not group.prefix_len:
        return []
    n_heads = adapter.heads.n_heads
    scales = 1.0 - torch.eye(n_heads)  # row h ablates head h
    hidden = group.prefix_hidden[layer].expand(n_heads, -1, -1).contiguous()
    with start_at_layer(adapter, layer, hidden), scale_heads_per_row(adapter, layer, scales):
        out = model(input_ids=group.prefix.expand(n_heads, -1), use_cache=True, logits_to_keep=1)
    return layer_keys_values(out)


def _evaluate_part(model: Any, adapter: ArchitectureAdapter, group: _Group, part: _Part, layer: int,
                   heads: Sequence[int], ablated_kv: list, max_rows: int, digit_start: torch.Tensor,
                   correct: torch.Tensor, evaluated: torch.Tensor) -> None:
    """Evaluate ``part`` with each head of ``heads`` (of ``layer``) ablated, ``max_rows`` rows per pass."""
    m, n_heads = len(part), adapter.heads.n_heads
    width = part.batch.input_ids.shape[1]
    clean_hidden = group.suffix_hidden[layer][part.local, :width]
    for chunk in _chunks(heads, max(1, max_rows // m)):
        rows = len(chunk) * m  # head-major: row j·m + i is prompt i with head chunk[j] ablated
        scales = torch.ones(rows, n_heads)
        for j, head in enumerate(chunk):
            scales[j * m:(j + 1) * m, head] = 0.0
        batch = part.batch
        tiled = type(batch)(batch.input_ids.repeat(len(chunk), 1), batch.attention_mask.repeat(len(chunk), 1),
                            batch.positions.repeat(len(chunk), 1), batch.expected.repeat(len(chunk), 1))
        kwargs: dict[str, Any] = {}
        if group.prefix_len:
            pick = torch.tensor(chunk)
            # Layers below ``layer`` are skipped and never read their cache: keep them at batch 1 (no copies).
            kv = list(group.prefix_kv[:layer])
            kv += [(k[pick].repeat_interleave(m, 0), v[pick].repeat_interleave(m, 0)) for k, v in ablated_kv[layer:]]
            kwargs[cache_argument(model)] = cache_from(model, kv)
            kwargs["use_cache"] = True
            kwargs["attention_mask"] = torch.cat([torch.ones(rows, group.prefix_len, dtype=torch.long),
                                                  tiled.attention_mask], 1)
        hidden = clean_hidden.repeat(len(chunk), 1, 1)
        with start_at_layer(adapter, layer, hidden), scale_heads_per_row(adapter, layer, scales):
            predicted = predicted_tokens(model, tiled, **kwargs)
        ok = judge(predicted, tiled, digit_start).view(len(chunk), m)
        for j, head in enumerate(chunk):
            correct[layer, head, part.index] = ok[j]
            evaluated[layer, head, part.index] = True


# ------------------------------------------------------------------------------------ public sweeps


def sweep_result(problems: Sequence[ArithmeticProblem], outcome: SweepOutcome, layers: Sequence[int],
                 threshold_points: float, method: str, seconds: float) -> HeadSweepResult:
    """The :class:`HeadSweepResult` (accuracies, drops, breaks/fixes, critical set) of a :func:`sweep_correct`."""
    ops = tuple(dict.fromkeys(p.op.symbol for p in problems))
    op_of = torch.tensor([ops.index(p.op.symbol) for p in problems])
    n_layers, n_heads, _ = outcome.correct.shape
    n_per_op = torch.bincount(op_of, minlength=len(ops))  # (n_ops,)
    onehot = torch.nn.functional.one_hot(op_of, len(ops)).float()  # (n, n_ops)
    base = (outcome.baseline.float() @ onehot) / n_per_op  # (n_ops,)
    acc = (outcome.correct.float() @ onehot) / n_per_op  # (n_layers, n_heads, n_ops)
    swept = torch.zeros(n_layers, dtype=torch.bool)
    swept[list(layers)] = True
    acc[~swept] = float("nan")
    exact = outcome.evaluated.all(dim=-1) & swept[:, None]
    breaks = (outcome.baseline & ~outcome.correct).float() @ onehot  # (n_layers, n_heads, n_ops)
    fixes = (~outcome.baseline & outcome.correct).float() @ onehot
    return HeadSweepResult(
        ops=ops, n_per_op=tuple(int(c) for c in n_per_op), baseline=tuple(float(b) for b in base),
        accuracy=acc.tolist(), threshold_points=threshold_points, layers=tuple(layers), method=method,
        seconds=seconds, critical=critical_heads(acc, base, threshold_points, layers), exact=exact.tolist(),
        breaks=breaks.int().tolist(), fixes=fixes.int().tolist(),
    )


def head_sweep(
    model: Any, tokenizer: Any, problems: Sequence[ArithmeticProblem], *, layers: Sequence[int] | None = None,
    threshold_points: float = DEFAULT_THRESHOLD_POINTS, max_rows: int = DEFAULT_MAX_ROWS, use_prefix: bool = True,
    bounded: bool = True, adapter: ArchitectureAdapter | None = None, progress: bool = False,
) -> HeadSweepResult:
    """The fast sweep over every head of ``layers`` (default all); see the module docstring.

    ``bounded`` (default): heads proven below the threshold skip the baseline-wrong problems (see
    :func:`sweep_correct`); their ``accuracy`` is a lower bound and ``exact`` marks them False. The critical
    set is the same as with ``bounded=False``, which measures every head on every problem.
    """
    if not problems:
        raise ValueError("head_sweep needs at least one problem")
    adapter = adapter or adapter_for(model)
    layers = list(range(adapter.n_layers)) if layers is None else sorted(set(layers))
    start = time.perf_counter()
    encoded = encode_problems(tokenizer, problems)
    keys = [(p.op.symbol, p.digits, p.template, p.shots) for p in problems]  # one key shares one few-shot prefix
    index = {key: i for i, key in enumerate(dict.fromkeys(keys))}
    groups = [index[key] for key in keys]
    ops = list(dict.fromkeys(p.op.symbol for p in problems))
    bound = ([ops.index(p.op.symbol) for p in problems], threshold_points / 100) if bounded else None
    outcome = sweep_correct(model, tokenizer, encoded, groups, layers=layers, max_rows=max_rows,
                            use_prefix=use_prefix, adapter=adapter, progress=progress, bound=bound)
    method = "fast, bounded" if bounded else "fast"
    return sweep_result(problems, outcome, layers, threshold_points, method, time.perf_counter() - start)


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
    outcome = SweepOutcome(baseline, correct, torch.ones_like(correct))
    return sweep_result(problems, outcome, layers, threshold_points, "naive (deep copy per head)",
                   time.perf_counter() - start)
