"""Head sensitivity (Yu & Ananiadou 2024, §3): ablate attention heads one at a time and measure greedy
exact-match accuracy per operation; screen every head, then confirm the candidates on fresh prompts.

Ablating head ``h`` of layer ``L`` zeroes its contribution ``W_O[:, h·d:(h+1)·d] · z_h`` at every position (its
slice of the output projection's input; :func:`lmaudit.checks.core.interventions.scale_heads_per_row`). Then::

    drop(L, h, op) = accuracy_clean(op) − accuracy_{−(L,h)}(op)          (in points: × 100)

**Screen** (:func:`screen_heads`) on the audit's prompts, every head of ``layers``: heads whose largest drop over
operations is at least ``threshold_points`` are *candidates*; at most ``max_candidates`` go on, the strongest
screen evidence first (smallest sign-test p-value of an operation, then largest drop: on a small screen many
heads reach the threshold with one or two broken answers).
It runs on :class:`~lmaudit.checks.core.prefix_cache.PrefixCachedEvaluator`: for each layer, the heads of that
layer are replicas of one batch (replica ``h`` ablates head ``h``), re-running layers ``≥ L`` only. Bounded
(default): the baseline-correct problems run first; a baseline-wrong problem can only raise the ablated
accuracy, so ``breaks(L, h, op) / n(op)`` bounds the drop from above, and heads whose bound is below the
threshold on every operation skip the baseline-wrong problems. The candidate set is exact; ``exact[L][h]``
says which heads ran every problem.

**Confirm** (:func:`confirm_heads`) each candidate on *fresh* prompts (another seed stream, no problem shared with
the screen): per operation the ablation breaks ``b`` baseline-correct problems and fixes ``c`` baseline-wrong
ones. Under "the head does not matter" a flip is as likely either way, so the one-sided exact sign test gives
``p = P(Binomial(b + c, ½) ≥ b)`` (:func:`lmaudit.checks.core.stats.sign_test_p`). A candidate is *significant*
when some operation has ``p < alpha / (n_candidates · n_ops)`` (Bonferroni over the tests the confirmation
makes; the screen chose the candidates on other prompts, so it spends no test). The paper's claim, "a few heads
are critical for arithmetic and most are not", becomes: at least one head is significant, and the significant
heads are a small fraction of all heads.

:func:`naive_correct` is the reference the paper's code implements (deep-copy the model per head, zero the
``W_O`` columns, evaluate the full prompts); it exists for the tests and the benchmark only.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lmaudit.checks.core.accuracy import EncodedAnswer, encode_problems, teacher_forced_correct
from lmaudit.checks.core.adapter import adapter_for
from lmaudit.checks.core.arithmetic_problems import ArithmeticProblem
from lmaudit.checks.core.errors import PremiseMissing
from lmaudit.checks.core.interventions import scale_heads_per_row
from lmaudit.checks.core.loading import LoadedModel
from lmaudit.checks.core.prefix_cache import DEFAULT_MAX_ROWS, PrefixCachedEvaluator
from lmaudit.checks.core.results import CheckResult, metric, metric_field
from lmaudit.checks.core.stats import bonferroni, sign_test_p

DEFAULT_THRESHOLD_POINTS = 10.0  # the paper's "drop of at least 10 points" for a critical head
DEFAULT_ALPHA = 0.05  # family-wise error rate of the confirmation (Bonferroni over candidates × operations)

Head = tuple[int, int]  # (layer, head)


def head_name(head: Head) -> str:
    return f"L{head[0]}.H{head[1]}"


def _op_index(problems: Sequence[ArithmeticProblem]) -> tuple[tuple[str, ...], torch.Tensor]:
    ops = tuple(dict.fromkeys(p.op.symbol for p in problems))
    return ops, torch.tensor([ops.index(p.op.symbol) for p in problems])


def _per_op(flags: torch.Tensor, op_of: torch.Tensor, n_ops: int) -> torch.Tensor:
    """Counts of ``flags`` (``(..., n)`` bool) per operation: ``(..., n_ops)``."""
    onehot = torch.nn.functional.one_hot(op_of, n_ops).float()  # (n, n_ops)
    return flags.float() @ onehot


# ----------------------------------------------------------------------------------------------- screen


@dataclass(frozen=True)
class HeadScreen:
    """Accuracy per (layer, head, operation) with one head ablated, against the clean baseline.

    ``accuracy[L][h][j]`` is a fraction for operation ``ops[j]``; layers not swept hold NaN. ``breaks``/``fixes``
    ``[L][h][j]``: baseline-correct problems of ``ops[j]`` the ablation breaks / baseline-wrong ones it fixes
    (0 where the bounded screen did not run the baseline-wrong problems). ``critical``: heads whose largest drop
    is at least ``threshold_points``, largest first.
    """

    ops: tuple[str, ...]
    n_per_op: tuple[int, ...]
    baseline: tuple[float, ...]
    accuracy: list[list[list[float]]]  # (n_layers, n_heads, n_ops)
    threshold_points: float
    layers: tuple[int, ...]
    method: str  # "bounded" or "exact" (every head on every problem)
    seconds: float
    critical: tuple[Head, ...] = ()
    exact: list[list[bool]] = field(default_factory=list)  # head ran every problem (else its drop is a bound)
    breaks: list[list[list[int]]] = field(default_factory=list)
    fixes: list[list[list[int]]] = field(default_factory=list)

    @property
    def n_heads(self) -> int:
        """Heads swept."""
        return len(self.layers) * (len(self.accuracy[0]) if self.accuracy else 0)

    @property
    def drop(self) -> list[list[list[float]]]:
        return [[[b - a for a, b in zip(head, self.baseline, strict=True)] for head in layer]
                for layer in self.accuracy]

    def max_drop(self, layer: int, head: int) -> float:
        return max(self.drop[layer][head])

    def p_value(self, layer: int, head: int) -> float:
        """The smallest one-sided sign-test p-value over operations of the screen's breaks vs fixes (a bound for
        heads that did not run every problem, whose fixes are unknown: they are never candidates)."""
        return min(sign_test_p(b, f) for b, f in zip(self.breaks[layer][head], self.fixes[layer][head], strict=True))

    def candidates(self, limit: int) -> list[Head]:
        """Up to ``limit`` critical heads, the strongest screen evidence first (module docstring)."""
        return sorted(self.critical, key=lambda h: (self.p_value(*h), -self.max_drop(*h)))[:limit]

    def top_heads(self, k: int = 10) -> list[tuple[int, int, float]]:
        """``(layer, head, max drop over ops)`` of the ``k`` most damaging heads, largest drop first."""
        rows = [(layer, head, self.max_drop(layer, head)) for layer in self.layers
                for head in range(len(self.accuracy[layer]))]
        return sorted(rows, key=lambda row: -row[2])[:k]

    @property
    def baseline_accuracy(self) -> float:
        total = sum(self.n_per_op)
        return sum(b * n for b, n in zip(self.baseline, self.n_per_op, strict=True)) / total if total else 0.0


def screen_heads(
    loaded: LoadedModel, problems: Sequence[ArithmeticProblem], *, layers: Sequence[int] | None = None,
    threshold_points: float = DEFAULT_THRESHOLD_POINTS, bounded: bool = True, max_rows: int = DEFAULT_MAX_ROWS,
    progress: bool = False, min_correct: int = 0,
) -> HeadScreen:
    """Every head of ``layers`` (default all) ablated in turn on ``problems`` (module docstring). Raises
    :class:`PremiseMissing`, before any head is ablated, when the model answers fewer than ``min_correct``."""
    if not problems:
        raise ValueError("screen_heads needs at least one problem")
    adapter = loaded.adapter
    n_layers, n_heads = adapter.n_layers, adapter.heads.n_heads
    layers = list(range(n_layers)) if layers is None else sorted(set(int(layer) for layer in layers))
    started = time.perf_counter()
    ops, op_of = _op_index(problems)
    evaluator = PrefixCachedEvaluator.for_problems(loaded, problems, layers=layers, max_rows=max_rows)
    baseline = evaluator.baseline
    if int(baseline.sum()) < min_correct:
        raise PremiseMissing(f"the model answers {int(baseline.sum())} of {len(problems)} screening problems; "
                             f"ablating a head needs at least {min_correct} correct answers to measure a drop")
    correct = torch.zeros((n_layers, n_heads, len(problems)), dtype=torch.bool)
    evaluated = torch.zeros_like(correct)
    right, wrong = torch.nonzero(baseline).flatten(), torch.nonzero(~baseline).flatten()
    n_op = torch.bincount(op_of, minlength=len(ops)).clamp(min=1).float()
    ablate = 1.0 - torch.eye(n_heads)  # row h ablates head h
    for layer in _progress(layers, progress):
        def run(heads: list[int], subset: torch.Tensor, layer: int = layer) -> None:
            if not heads or not len(subset):
                return
            chosen = torch.tensor(heads)
            ok = evaluator.correct_replicas(
                layer, len(heads), lambda rows: scale_heads_per_row(adapter, layer, ablate[chosen[rows]]), subset)
            correct[layer, chosen[:, None], subset[None, :]] = ok
            evaluated[layer, chosen[:, None], subset[None, :]] = True

        everyone = list(range(n_heads))
        if not bounded:
            run(everyone, torch.arange(len(problems)))
            continue
        run(everyone, right)
        broken = (baseline & ~correct[layer]).float()  # (n_heads, n): baseline-correct problems broken
        bound = (broken @ torch.nn.functional.one_hot(op_of, len(ops)).float()) / n_op  # (n_heads, n_ops)
        run([h for h in everyone if float(bound[h].max()) >= threshold_points / 100 - 1e-12], wrong)
    return _screen_result(problems, baseline, correct, evaluated, layers, threshold_points,
                          "bounded" if bounded else "exact", time.perf_counter() - started)


def _progress(layers: list[int], enabled: bool) -> Any:
    if not enabled:
        return layers
    from tqdm.auto import tqdm

    return tqdm(layers, leave=False, desc="head screen")


def _screen_result(problems: Sequence[ArithmeticProblem], baseline: torch.Tensor, correct: torch.Tensor,
                   evaluated: torch.Tensor, layers: Sequence[int], threshold_points: float, method: str,
                   seconds: float) -> HeadScreen:
    ops, op_of = _op_index(problems)
    n_layers = correct.shape[0]
    n_per_op = torch.bincount(op_of, minlength=len(ops))  # (n_ops,)
    base = _per_op(baseline, op_of, len(ops)) / n_per_op  # (n_ops,)
    acc = _per_op(correct, op_of, len(ops)) / n_per_op  # (n_layers, n_heads, n_ops)
    swept = torch.zeros(n_layers, dtype=torch.bool)
    swept[list(layers)] = True
    acc[~swept] = float("nan")
    drop = (base[None, None, :] - acc).amax(dim=-1)  # (n_layers, n_heads)
    critical = sorted(((int(layer), int(head)) for layer in layers for head in range(drop.shape[1])
                       if drop[layer, head] >= threshold_points / 100 - 1e-12), key=lambda lh: -float(drop[lh]))
    return HeadScreen(
        ops=ops, n_per_op=tuple(int(c) for c in n_per_op), baseline=tuple(float(b) for b in base),
        accuracy=acc.tolist(), threshold_points=threshold_points, layers=tuple(layers), method=method,
        seconds=seconds, critical=tuple(critical),
        exact=(evaluated.all(dim=-1) & swept[:, None]).tolist(),
        breaks=_per_op(baseline & ~correct, op_of, len(ops)).int().tolist(),
        fixes=_per_op(~baseline & correct, op_of, len(ops)).int().tolist(),
    )


# ---------------------------------------------------------------------------------------------- confirm


@dataclass(frozen=True)
class ConfirmedHead:
    """One candidate re-tested on fresh prompts: its operation with the smallest sign-test p-value."""

    name: str  # "L14.H3"
    screen_drop_points: float  # largest drop over operations in the screen
    op: str
    drop_points: float  # on the fresh prompts, for ``op``
    breaks: int
    fixes: int
    p_value: float
    significant: bool


def confirm_heads(loaded: LoadedModel, problems: Sequence[ArithmeticProblem], candidates: Sequence[Head], *,
                  screen_drops: Sequence[float] | None = None, alpha: float = DEFAULT_ALPHA,
                  max_rows: int = DEFAULT_MAX_ROWS) -> tuple[tuple[float, ...], tuple[ConfirmedHead, ...]]:
    """``(baseline accuracy per operation, one row per candidate)`` on ``problems`` (fresh prompts).

    Significant: ``p < alpha / (len(candidates) · n_ops)`` on some operation (module docstring)."""
    ops, op_of = _op_index(problems)
    if not candidates:
        return (), ()
    adapter = loaded.adapter
    evaluator = PrefixCachedEvaluator.for_problems(loaded, problems, layers=sorted({c[0] for c in candidates}),
                                                   max_rows=max_rows)
    baseline = evaluator.baseline
    n_per_op = torch.bincount(op_of, minlength=len(ops)).clamp(min=1).float()
    level = bonferroni(alpha, len(candidates) * len(ops))
    ablate = 1.0 - torch.eye(adapter.heads.n_heads)
    correct: dict[Head, torch.Tensor] = {}
    for layer in sorted({c[0] for c in candidates}):
        heads = torch.tensor([h for lay, h in candidates if lay == layer])
        ok = evaluator.correct_replicas(layer, len(heads),
                                        lambda rows, heads=heads, layer=layer: scale_heads_per_row(
                                            adapter, layer, ablate[heads[rows]]))
        correct.update({(layer, int(h)): row for h, row in zip(heads, ok, strict=True)})
    rows = []
    for i, head in enumerate(candidates):
        breaks = _per_op(baseline & ~correct[head], op_of, len(ops))  # (n_ops,)
        fixes = _per_op(~baseline & correct[head], op_of, len(ops))
        p = [sign_test_p(int(b), int(f)) for b, f in zip(breaks, fixes, strict=True)]
        j = min(range(len(ops)), key=lambda k: (p[k], -float(breaks[k] - fixes[k])))
        rows.append(ConfirmedHead(
            name=head_name(head), screen_drop_points=float(screen_drops[i]) if screen_drops is not None else 0.0,
            op=ops[j], drop_points=100 * float((breaks[j] - fixes[j]) / n_per_op[j]), breaks=int(breaks[j]),
            fixes=int(fixes[j]), p_value=p[j], significant=p[j] < level))
    return tuple(float(b) for b in _per_op(baseline, op_of, len(ops)) / n_per_op), tuple(rows)


# ---------------------------------------------------------------------------------------------- audit


@dataclass(frozen=True)
class HeadSweepAudit(CheckResult):
    """The screen, the confirmation of its candidates on fresh prompts, and the claim's two counts::

        n_significant        = candidates significant on the fresh prompts (Bonferroni over candidates × ops)
        significant_fraction = n_significant / heads swept
    """

    screen: HeadScreen
    confirmed: tuple[ConfirmedHead, ...]
    confirm_baseline: tuple[float, ...]  # per operation, on the fresh prompts
    n_confirm_prompts: int
    alpha: float
    confirm_seconds: float
    n_heads: int = metric_field()

    @metric
    def n_significant(self) -> int:
        """Candidates whose ablation significantly breaks some operation on fresh prompts."""
        return sum(row.significant for row in self.confirmed)

    @metric
    def significant_fraction(self) -> float:
        """``n_significant / n_heads``: the paper's "a few heads" is a small fraction."""
        return self.n_significant / self.n_heads if self.n_heads else float("nan")

    @metric
    def significant_heads(self) -> list[str]:
        return [row.name for row in self.confirmed if row.significant]

    @metric
    def n_candidates(self) -> int:
        return len(self.confirmed)

    @metric
    def n_screen_critical(self) -> int:
        """Heads whose screen drop reached the threshold (before the cap on candidates)."""
        return len(self.screen.critical)

    @metric
    def max_screen_drop_points(self) -> float:
        drops = [d for layer in self.screen.layers for head in self.screen.drop[layer] for d in head]
        return 100 * max(drops, default=0.0)

    @metric
    def max_confirmed_drop_points(self) -> float:
        return max((row.drop_points for row in self.confirmed), default=0.0)

    @metric
    def baseline_accuracy(self) -> float:
        """Clean accuracy on the screening prompts."""
        return self.screen.baseline_accuracy

    @metric
    def seconds(self) -> float:
        return self.screen.seconds + self.confirm_seconds


def sweep_heads(
    loaded: LoadedModel, problems: Sequence[ArithmeticProblem], confirm_problems: Sequence[ArithmeticProblem], *,
    layers: Sequence[int] | None = None, threshold_points: float = DEFAULT_THRESHOLD_POINTS,
    max_candidates: int = 10, alpha: float = DEFAULT_ALPHA, min_correct: int = 1,
    max_rows: int = DEFAULT_MAX_ROWS, screen: HeadScreen | None = None,
) -> HeadSweepAudit:
    """Screen every head on ``problems``, confirm up to ``max_candidates`` on ``confirm_problems`` (which must
    share no problem with ``problems``). Raises :class:`PremiseMissing` when the model answers fewer than
    ``min_correct`` screening problems (no drop can be measured). ``screen``: an earlier screen of the same
    problems and layers, reused (it checked the premise)."""
    screen = screen or screen_heads(loaded, problems, layers=layers, threshold_points=threshold_points,
                                    max_rows=max_rows, min_correct=min_correct)
    candidates = screen.candidates(max_candidates)
    drops = [100 * screen.max_drop(*head) for head in candidates]
    started = time.perf_counter()
    baseline, rows = confirm_heads(loaded, confirm_problems, candidates, screen_drops=drops, alpha=alpha,
                                   max_rows=max_rows)
    return HeadSweepAudit(screen=screen, confirmed=rows, confirm_baseline=baseline,
                          n_confirm_prompts=len(confirm_problems), alpha=alpha,
                          confirm_seconds=time.perf_counter() - started, n_heads=screen.n_heads)


# ------------------------------------------------------------------------------------- reference only


@torch.no_grad()
def naive_correct(
    model: Any, tokenizer: Any, encoded: Sequence[EncodedAnswer], heads: Sequence[Head], *,
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


def naive_screen(loaded: LoadedModel, problems: Sequence[ArithmeticProblem], *, layers: Sequence[int] | None = None,
                 threshold_points: float = DEFAULT_THRESHOLD_POINTS, batch_size: int = 32) -> HeadScreen:
    """REFERENCE ONLY: the deep-copy-per-head screen of the paper's code, for tests and the benchmark."""
    adapter = loaded.adapter
    layers = list(range(adapter.n_layers)) if layers is None else sorted(set(layers))
    started = time.perf_counter()
    encoded = encode_problems(loaded.tokenizer, problems)
    heads = [(layer, head) for layer in layers for head in range(adapter.heads.n_heads)]
    baseline, rows = naive_correct(loaded.model, loaded.tokenizer, encoded, heads, batch_size=batch_size)
    correct = torch.zeros((adapter.n_layers, adapter.heads.n_heads, len(problems)), dtype=torch.bool)
    for (layer, head), row in zip(heads, rows, strict=True):
        correct[layer, head] = row
    return _screen_result(problems, baseline, correct, torch.ones_like(correct), layers, threshold_points,
                          "naive (deep copy per head)", time.perf_counter() - started)
