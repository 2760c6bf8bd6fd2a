"""Greedy exact-match accuracy on arithmetic problems, batched, per operation and digit count.

A problem is correct when greedy decoding after ``prompt`` emits ``continuation`` (e.g. ``" 46"``) and then
does not continue the number (the next token does not start with a digit ``0-9``), i.e. the first integer of
the greedy output is the answer.

Teacher forcing (one forward pass per batch, no generation loop). Feed ``prompt ⧺ answer_tokens`` and check::

    correct = ∧_j argmax p(· | prompt, a_<j) = a_j   ∧   argmax p(· | prompt, a) does not start with a digit

By induction over ``j`` this is exactly what greedy decoding emits as long as the answer has one tokenisation
that greedy decoding can produce, which holds when every token containing a digit is a single digit
(:func:`teacher_forcing_is_exact`: SmolLM2, Llama 2, Mistral, Qwen2 split digits). Otherwise
:func:`correct_answers` falls back to real greedy generation, one problem at a time. ``answer_tokens`` are
``encode_continuations([continuation])`` after ``encode_prompts([prompt])``: the BOS and tokenisation policy of
:mod:`lmaudit.checks.core.logprobs` (whose ``answer_is_greedy`` is the same check without the stop slot; the sweep needs the
batch internals, so they live here).

Prompts are right-padded; a prompt's predictions only see its own tokens (causal attention plus the mask), so
padding never changes an answer. Logits are computed only at the positions that are checked.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lmaudit.checks.core.arithmetic_problems import ArithmeticProblem
from lmaudit.checks.core.logprobs import encode_continuations, encode_prompts
from lmaudit.checks.core.results import CheckResult, metric

DIGITS = "0123456789"
# Rows per forward pass of the plain evaluator: 32 prompts × ~40 tokens keeps activations well under 1 GB.
DEFAULT_BATCH_SIZE = 32


@dataclass(frozen=True)
class EncodedAnswer:
    """One problem as token ids: the model reads ``prompt_ids`` and must emit ``answer_ids``."""

    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]

    @property
    def sequence(self) -> tuple[int, ...]:
        """The teacher-forced input: prompt then the whole answer (its last token feeds the stop check)."""
        return self.prompt_ids + self.answer_ids


def encode_answer(tokenizer: Any, prompt: str, continuation: str) -> EncodedAnswer:
    """``encode_prompts([prompt])`` and ``encode_continuations([continuation])`` (:mod:`lmaudit.checks.core.logprobs`)."""
    return encode_problems_text(tokenizer, [prompt], [continuation])[0]


def encode_problems_text(tokenizer: Any, prompts: Sequence[str], continuations: Sequence[str]) -> list[EncodedAnswer]:
    return [EncodedAnswer(tuple(p), tuple(c)) for p, c in zip(encode_prompts(tokenizer, prompts),
                                                             encode_continuations(tokenizer, continuations),
                                                             strict=True)]


def encode_problems(tokenizer: Any, problems: Sequence[ArithmeticProblem]) -> list[EncodedAnswer]:
    return encode_problems_text(tokenizer, [p.prompt for p in problems], [p.continuation for p in problems])


_DIGIT_MASKS: dict[Any, torch.Tensor] = {}  # per tokenizer object (id) and question


def digit_start_mask(tokenizer: Any) -> torch.Tensor:
    """``(vocab,)`` bool: token ``t`` decodes to a string starting with ``0-9`` (it would extend a number)."""
    key = id(tokenizer)
    if key not in _DIGIT_MASKS:
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        _DIGIT_MASKS[key] = torch.tensor([bool(text) and text[0] in DIGITS for text in texts])
    return _DIGIT_MASKS[key]


def teacher_forcing_is_exact(tokenizer: Any) -> bool:
    """Every token that contains a digit is exactly one digit (no ``"12"``, no ``" 8"``), so an answer has one
    greedy-reachable tokenisation.

    Added (special) tokens are matched by the tokenizer only as their whole literal text, so one such as Gemma's
    ``<unused12>`` or ``<image_soft_token>`` can never spell part of a numeric answer: it is ignored unless its text
    is made of digits, signs and spaces alone. A greedy step that predicts it is simply wrong, as it is under
    teacher forcing."""
    key = ("exact", id(tokenizer), len(tokenizer))  # a tokenizer that gained tokens is asked again
    if key not in _DIGIT_MASKS:
        added = set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        exact = all(len(t) == 1 for i, t in enumerate(texts) if any(c in DIGITS for c in t)
                    and (i not in added or set(t) <= set(DIGITS + "-+ ")))
        _DIGIT_MASKS[key] = torch.tensor(exact)
    return bool(_DIGIT_MASKS[key])


@dataclass(frozen=True)
class TeacherForcedBatch:
    """Right-padded inputs and what to check. Slot ``j < len(answer)`` of row ``i`` checks that the argmax at
    ``positions[i, j]`` is ``expected[i, j]``; slot ``len(answer)`` is the stop check (``expected == STOP``);
    unused slots are ``PAD`` (their position repeats a valid one)."""

    input_ids: torch.Tensor  # (n, T)
    attention_mask: torch.Tensor  # (n, T)
    positions: torch.Tensor  # (n, slots)
    expected: torch.Tensor  # (n, slots)

    STOP = -1
    PAD = -2

    @property
    def keep(self) -> torch.Tensor:
        """Sorted unique positions whose logits are needed, ``(k,)``."""
        return torch.unique(self.positions)

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def teacher_forced_batch(
    encoded: Sequence[EncodedAnswer], *, pad_id: int, offset: int = 0, stop_check: bool = True
) -> TeacherForcedBatch:
    """Batch ``sequence[offset:]`` of each problem (``offset`` = tokens already in a shared prefix cache)."""
    seqs = [e.sequence[offset:] for e in encoded]
    width = max(len(s) for s in seqs)
    slots = max(len(e.answer_ids) for e in encoded) + int(stop_check)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    positions = torch.zeros((len(seqs), slots), dtype=torch.long)
    expected = torch.full((len(seqs), slots), TeacherForcedBatch.PAD, dtype=torch.long)
    for row, (e, seq) in enumerate(zip(encoded, seqs, strict=True)):
        if len(e.prompt_ids) - offset < 1:
            raise ValueError(f"offset {offset} leaves no prompt token in a sequence of {len(e.prompt_ids)}")
        input_ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
        first = len(e.prompt_ids) - 1 - offset
        n_answer = len(e.answer_ids)
        positions[row, :n_answer] = torch.arange(first, first + n_answer)
        expected[row, :n_answer] = torch.tensor(e.answer_ids)
        if stop_check:
            positions[row, n_answer] = first + n_answer
            expected[row, n_answer] = TeacherForcedBatch.STOP
        positions[row, n_answer + int(stop_check):] = positions[row, n_answer + int(stop_check) - 1]
    return TeacherForcedBatch(input_ids, mask, positions, expected)


def judge(predicted: torch.Tensor, batch: TeacherForcedBatch, digit_start: torch.Tensor) -> torch.Tensor:
    """``(n,)`` bool from ``predicted`` = argmax token at each slot ``(n, slots)``."""
    answer_ok = (predicted == batch.expected) | (batch.expected < 0)
    stops = batch.expected == TeacherForcedBatch.STOP
    stop_ok = ~(stops & digit_start.to(predicted.device)[predicted])
    return (answer_ok & stop_ok).all(dim=1)


def accepts_logits_to_keep(model: Any) -> bool:
    """Whether ``model.forward`` takes ``logits_to_keep`` (compute logits only at some positions, or none with an
    empty index tensor). The one probe every evaluator here uses."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def no_logits(model: Any) -> dict[str, Any]:
    """Forward keywords that skip the unembedding (for passes that only need hidden states or a KV cache)."""
    return {"logits_to_keep": torch.zeros(0, dtype=torch.long)} if accepts_logits_to_keep(model) else {}


def predicted_tokens(model: Any, batch: TeacherForcedBatch, **forward_kwargs: Any) -> torch.Tensor:
    """Argmax tokens ``(n, slots)`` at the batch's checked positions, computing logits only where needed.

    ``forward_kwargs`` go to ``model(...)`` (e.g. ``past_key_values``; ``attention_mask`` may be overridden
    there for a prefix cache)."""
    keep = batch.keep
    kwargs: dict[str, Any] = {"attention_mask": batch.attention_mask, "use_cache": False, **forward_kwargs}
    device = next(model.parameters()).device
    kwargs["attention_mask"] = kwargs["attention_mask"].to(device)
    if accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = keep.to(device)
        local = torch.searchsorted(keep, batch.positions)  # (n, slots) index into the kept positions
    else:
        local = batch.positions
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids.to(device), **kwargs).logits  # (n, k, vocab)
    rows = torch.arange(len(batch))[:, None]
    return logits[rows, local.to(logits.device)].argmax(dim=-1).cpu()  # (n, slots)


def pad_token_id(tokenizer: Any) -> int:
    """The id used to pad batches: the tokenizer's pad token, else its EOS token, else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def teacher_forced_correct(
    model: Any, tokenizer: Any, encoded: Sequence[EncodedAnswer], *, batch_size: int = DEFAULT_BATCH_SIZE,
    stop_check: bool = True,
) -> torch.Tensor:
    """``(n,)`` bool: greedy exact match by teacher forcing (see the module docstring), batched."""
    digit_start = digit_start_mask(tokenizer)
    out = []
    for start in range(0, len(encoded), batch_size):
        batch = teacher_forced_batch(encoded[start:start + batch_size], pad_id=pad_token_id(tokenizer),
                                     stop_check=stop_check)
        out.append(judge(predicted_tokens(model, batch), batch, digit_start))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


def generated_correct(model: Any, tokenizer: Any, problems: Sequence[ArithmeticProblem]) -> torch.Tensor:
    """``(n,)`` bool by real greedy generation, one problem at a time (the reference for any tokenizer)."""
    out = []
    device = next(model.parameters()).device
    for problem in problems:
        enc = encode_answer(tokenizer, problem.prompt, problem.continuation)
        ids = torch.tensor([enc.prompt_ids], device=device)
        with torch.no_grad():
            generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                       max_new_tokens=len(enc.answer_ids) + 2, pad_token_id=pad_token_id(tokenizer))
        text = tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True)
        rest = text[len(problem.continuation):]
        out.append(text.startswith(problem.continuation) and not (rest and rest[0] in DIGITS))
    return torch.tensor(out, dtype=torch.bool)


def correct_answers(
    model: Any, tokenizer: Any, problems: Sequence[ArithmeticProblem], *, batch_size: int = DEFAULT_BATCH_SIZE,
) -> tuple[torch.Tensor, str]:
    """``((n,) bool, method)``: teacher forcing where it is exact, else greedy generation."""
    if teacher_forcing_is_exact(tokenizer):
        return teacher_forced_correct(model, tokenizer, encode_problems(tokenizer, problems),
                                      batch_size=batch_size), "teacher_forced"
    return generated_correct(model, tokenizer, problems), "generate"


# ------------------------------------------------------------------------------------------- summaries


@dataclass(frozen=True)
class AccuracyCell:
    """Accuracy of one (operation, digits) cell."""

    op: str
    digits: int
    n: int
    correct: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else float("nan")


OP_NAMES = {"+": "add", "-": "sub", "*": "mul", "/": "div"}


@dataclass(frozen=True)
class ArithmeticAccuracy(CheckResult):
    """Greedy exact-match accuracy per (operation, digits) and overall; ``correct`` is per problem."""

    cells: tuple[AccuracyCell, ...]
    correct: tuple[bool, ...]
    method: str

    @property
    def n(self) -> int:
        return len(self.correct)

    @metric
    def accuracy(self) -> float:
        """Share of problems answered exactly (NaN without problems)."""
        return sum(self.correct) / self.n if self.n else float("nan")

    @metric
    def n_correct(self) -> int:
        return sum(self.correct)

    @metric
    def n_problems(self) -> int:
        return self.n

    def by_op(self) -> dict[str, float]:
        """Accuracy per operation symbol, pooled over digit counts."""
        totals: dict[str, list[int]] = {}
        for cell in self.cells:
            total = totals.setdefault(cell.op, [0, 0])
            total[0] += cell.correct
            total[1] += cell.n
        return {op: c / n for op, (c, n) in totals.items()}

    def _op(self, symbol: str) -> float:
        return self.by_op().get(symbol, float("nan"))

    @metric
    def accuracy_add(self) -> float:
        """Accuracy on ``+`` (NaN when no ``+`` problem was asked)."""
        return self._op("+")

    @metric
    def accuracy_sub(self) -> float:
        return self._op("-")

    @metric
    def accuracy_mul(self) -> float:
        return self._op("*")

    @metric
    def accuracy_div(self) -> float:
        return self._op("/")

    @metric
    def min_op_accuracy(self) -> float:
        """The weakest operation's accuracy."""
        return min(self.by_op().values(), default=float("nan"))


def summarize(problems: Sequence[ArithmeticProblem], correct: torch.Tensor | Sequence[bool],
              method: str = "teacher_forced") -> ArithmeticAccuracy:
    flags = [bool(c) for c in correct]
    if len(flags) != len(problems):
        raise ValueError(f"{len(problems)} problems but {len(flags)} correctness flags")
    cells: dict[tuple[str, int], list[int]] = {}
    for problem, ok in zip(problems, flags, strict=True):
        cell = cells.setdefault((problem.op.symbol, problem.digits), [0, 0])
        cell[0] += ok
        cell[1] += 1
    return ArithmeticAccuracy(
        cells=tuple(AccuracyCell(op, digits, n, c) for (op, digits), (c, n) in cells.items()),
        correct=tuple(flags), method=method,
    )


def arithmetic_accuracy(
    model: Any, tokenizer: Any, problems: Sequence[ArithmeticProblem], *, batch_size: int = DEFAULT_BATCH_SIZE,
) -> ArithmeticAccuracy:
    """Greedy exact-match accuracy of ``problems``, per operation and digit count."""
    correct, method = correct_answers(model, tokenizer, problems, batch_size=batch_size)
    return summarize(problems, correct, method)
