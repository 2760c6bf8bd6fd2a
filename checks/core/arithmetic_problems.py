"""Seeded arithmetic prompts for the arithmetic-heads audit.

The audit follows Yu & Ananiadou, "Interpreting Arithmetic Mechanism in Large Language Models through
Comparative Neuron Analysis" (EMNLP 2024): a model is given a prompt such as ``"3+5="`` and we look at
which heads and neurons produce the answer. This module only makes the data: problems, prompts, answers,
subsets, JSONL files and an lm-eval task for them. Nothing here touches a model or the network.

Operations (:class:`Operation`) — symbol, word, noun (the noun is used by ``Template.PHRASE``)::

    ADD  "+"  "plus"        "sum"
    SUB  "-"  "minus"       "difference"
    MUL  "*"  "times"       "product"
    DIV  "/"  "divided by"  "quotient"

Operands (``digits`` = 1, 2 or 3). A d-digit number is one written with exactly d digits and no leading
zero, except that the 1-digit numbers include 0 (so 1-digit means 0..9, 2-digit 10..99, 3-digit
100..999). Every result is a non-negative integer:

* ``+`` and ``*``: ``a`` and ``b`` are both d-digit; every ordered pair is a problem
  (1-digit ``+``: 10 x 10 = 100 problems).
* ``-``: ``a`` and ``b`` are both d-digit and ``a >= b`` (``a == b`` is allowed, the answer is 0;
  1-digit: 55 problems).
* ``/``: the divisor ``b`` and the quotient ``q`` are both d-digit with ``b >= 1``; the dividend is
  ``a = b * q``. So the division is always exact and is the inverse of a d-digit x d-digit
  multiplication fact: ``a`` has between d and 2d digits (it can be shorter only when ``q`` is 0, which
  happens for 1-digit only: ``0/7=`` -> ``0``). 1-digit: 9 x 10 = 90 problems.

Templates (:class:`Template`), shown for 3 and 5 (the exact text, spaces included; ``|`` marks where the
prompt ends and the continuation begins)::

    SYMBOLIC "symbolic"  "3+5=|8"                      also "7-2=", "3*4=", "6/3="
    WORDS    "words"     "3 plus 5 is| 8"              "minus", "times", "divided by"
    PHRASE   "phrase"    "The sum of 3 and 5 is| 8"    "difference", "product", "quotient"
    QA       "qa"        "Q: What is 3 plus 5? A:| 8"  same words as WORDS

``answer`` is the decimal result (digits only, ``"8"``); ``continuation`` is the exact string a model
should emit next: the answer with no leading space after ``=`` (SYMBOLIC) and with one leading space after
a word or a colon (WORDS, PHRASE, QA). Prompts never end with a space.

Few-shot: with ``few_shot=k`` the prompt is k solved examples of the same operation, digit count, subset
and template (each line is a prompt immediately followed by its continuation, e.g. ``"2+3=5"`` or
``"2 plus 3 is 5"``), then the test prompt, all joined by ``"\\n"``. The examples are drawn with the same
seed from the problems of that (operation, digits, subset) space that are *not* test problems of the
call, so an example never repeats any test problem; the k examples of one prompt are distinct.

Subsets (:class:`Subset`), from :func:`carry_positions`:

* ``+``: the column positions (0 = units) whose digit sum, plus the incoming carry, is 10 or more, so a
  carry goes to the next position; a carry out of the top position (the answer gets one more digit)
  counts. ``5+7`` carries at (0,); ``95+15`` at (0, 1).
* ``-`` (``a >= b``): the positions where ``a``'s digit is smaller than ``b``'s digit plus the incoming
  borrow, so the position borrows from the next one. ``12-7`` borrows at (0,).
* ``*``: schoolbook column multiplication. Column k holds the single-digit products ``a_i * b_j`` with
  ``i + j = k`` plus the carry from column k-1; a carry is generated at column k when that total is 10
  or more *and* column k is not the top column ``(len(a) - 1) + (len(b) - 1)``. The top column's total
  is written out as it is, never carried into an empty column. So every single-digit fact (``7*8=56``)
  has no carry: it is one table fact. ``15*3`` carries at (0,) (15 -> 1 into the tens), ``12*3`` has none.
* ``/``: the carries of the multiplication the division inverts, ``b * (a // b)`` (column sums are
  symmetric, so the order does not matter). Every 1-digit division is an exact table fact, with none.

``Subset.MEMORIZE`` ("memorize") is the problems with no carry or borrow at all (for ``*`` and ``/``:
every output column is a single table fact or a carry-free sum of them; with 1-digit operands that is the
whole multiplication/division table). ``Subset.CHANGE_ONE`` ("change-one") is the problems with exactly
one carrying or borrowing position. Problems with two or more are in neither (``subset`` is ``None`` on
the problem). Consequences: 1-digit ``-`` never borrows (``a >= b``) and 1-digit ``*`` and ``/`` never
carry, so all their problems are memorize and asking for change-one ones is an error. Sizes
(all/memorize/change-one): 1-digit ``+`` 100/55/45, ``-`` 55/55/0, ``*`` 100/100/0, ``/`` 90/90/0;
2-digit ``+`` 8100/1980/3735, ``-`` 4095/2475/1620, ``*`` and ``/`` 8100/634/2777 (see
:func:`count_problems`).

Determinism: for one seed the problems of an operation depend only on (seed, operation, digits, subset,
n_per_op, few_shot) — not on the template or on the other operations requested — and are in a fixed
order; the test problems do not depend on ``few_shot``. The generator is numpy's ``PCG64`` seeded through
``SeedSequence``, so the same numpy gives the same problems on every machine.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from lmaudit.checks.core.errors import LmAuditError

__all__ = [
    "GENERATION_KWARGS",
    "MATCHES",
    "MAX_DIGITS",
    "ArithmeticDataError",
    "ArithmeticProblem",
    "Operation",
    "Subset",
    "Template",
    "carry_positions",
    "classify",
    "count_problems",
    "draw_prompts",
    "generate_problems",
    "lm_eval_task_dict",
    "make_problem",
    "operand_range",
    "parse_operations",
    "problem_key",
    "read_jsonl",
    "write_jsonl",
]

MAX_DIGITS = 3


class ArithmeticDataError(LmAuditError, ValueError):
    """Bad arguments to the arithmetic generator, or a request the problem space cannot satisfy."""


class Operation(Enum):
    """An arithmetic operation; the value is its ASCII symbol, so ``Operation("+") is Operation.ADD``."""

    ADD = ("+", "plus", "sum")
    SUB = ("-", "minus", "difference")
    MUL = ("*", "times", "product")
    DIV = ("/", "divided by", "quotient")

    symbol: str
    word: str
    noun: str

    def __new__(cls, symbol: str, word: str, noun: str) -> Operation:
        member = object.__new__(cls)
        member._value_ = symbol
        member.symbol = symbol
        member.word = word
        member.noun = noun
        return member

    def apply(self, a: int, b: int) -> int:
        """The exact result; raises :class:`ArithmeticDataError` where it would not be a non-negative integer."""
        _check_operands(a, b, self)
        if self is Operation.ADD:
            return a + b
        if self is Operation.SUB:
            return a - b
        if self is Operation.MUL:
            return a * b
        return a // b

    @classmethod
    def parse(cls, text: str) -> Operation:
        """One operation from a symbol (``+ - * /``, also ``× x ÷ − :``), a word (``plus``, ``divided by``)
        or a member name (``add``, ``SUB``, case-insensitive)."""
        key = text.strip()
        found = _OPERATION_ALIASES.get(key) or _OPERATION_ALIASES.get(key.lower())
        if found is None:
            raise ArithmeticDataError(
                f"unknown arithmetic operation {text!r}; use one of + - * / (or plus, minus, times, divided by)"
            )
        return found


_OPERATION_ALIASES: dict[str, Operation] = {}
for _op in Operation:
    _OPERATION_ALIASES.update({_op.symbol: _op, _op.word: _op, _op.name.lower(): _op})
_OPERATION_ALIASES.update(
    {"×": Operation.MUL, "x": Operation.MUL, "÷": Operation.DIV, ":": Operation.DIV, "−": Operation.SUB}
)
del _op
_OP_CODE = {op: code for code, op in enumerate(Operation)}


def parse_operations(spec: str | Operation | Iterable[str | Operation]) -> tuple[Operation, ...]:
    """Operations from a CLI value such as ``"+-*/"`` (one symbol per character; spaces are ignored) or
    ``"plus,divided by"`` (comma-separated tokens, any form :meth:`Operation.parse` accepts), or from an
    iterable of operations/strings. Keeps the given order; an empty or repeated operation is an error.

    On a command line write ``--ops=-+`` (with ``=``) when the value starts with ``-``.
    """
    if isinstance(spec, Operation):
        tokens: list[str | Operation] = [spec]
    elif isinstance(spec, str):
        tokens = list(spec.split(",")) if "," in spec else [c for c in spec if not c.isspace()]
        if "," in spec and any(not t.strip() for t in tokens):
            raise ArithmeticDataError(f"empty operation in {spec!r}")
    else:
        tokens = list(spec)
    ops = tuple(t if isinstance(t, Operation) else Operation.parse(t) for t in tokens)
    if not ops:
        raise ArithmeticDataError(f"no arithmetic operation in {spec!r}; use e.g. '+-*/'")
    repeated = sorted({op.symbol for op in ops if ops.count(op) > 1})
    if repeated:
        raise ArithmeticDataError(f"operation(s) {' '.join(repeated)} given more than once in {spec!r}")
    return ops


class Template(Enum):
    """How a problem is written. The value is the template's name (``Template("qa")``)."""

    SYMBOLIC = "symbolic"  # "3+5="                   -> "8"
    WORDS = "words"  # "3 plus 5 is"                  -> " 8"
    PHRASE = "phrase"  # "The sum of 3 and 5 is"      -> " 8"
    QA = "qa"  # "Q: What is 3 plus 5? A:"           -> " 8"

    @property
    def answer_prefix(self) -> str:
        """What goes between the prompt and the answer digits: ``""`` after ``=``, else one space."""
        return "" if self is Template.SYMBOLIC else " "

    def render(self, a: int, b: int, op: Operation) -> str:
        """The prompt text for ``a op b`` (no few-shot prefix, no trailing space)."""
        if self is Template.SYMBOLIC:
            return f"{a}{op.symbol}{b}="
        if self is Template.WORDS:
            return f"{a} {op.word} {b} is"
        if self is Template.PHRASE:
            return f"The {op.noun} of {a} and {b} is"
        return f"Q: What is {a} {op.word} {b}? A:"

    def solved(self, a: int, b: int, op: Operation) -> str:
        """A solved line (prompt immediately followed by its continuation), as used in few-shot prefixes."""
        return self.render(a, b, op) + self.answer_prefix + str(op.apply(a, b))

    @classmethod
    def parse(cls, text: str | Template) -> Template:
        """A template from its value (``"qa"``) or member name (``"QA"``)."""
        if isinstance(text, Template):
            return text
        key = text.strip().lower()
        for template in cls:
            if key in (template.value, template.name.lower()):
                return template
        raise ArithmeticDataError(
            f"unknown template {text!r}; choose one of {', '.join(t.value for t in cls)}"
        )


class Subset(Enum):
    """Which problems by carrying (see the module docstring); the value is the CLI spelling."""

    MEMORIZE = "memorize"  # no carry/borrow at any position
    CHANGE_ONE = "change-one"  # exactly one position carries/borrows

    @classmethod
    def parse(cls, text: str | Subset) -> Subset:
        if isinstance(text, Subset):
            return text
        key = text.strip().lower().replace("_", "-")
        for subset in cls:
            if key in (subset.value, subset.name.lower().replace("_", "-")):
                return subset
        raise ArithmeticDataError(f"unknown subset {text!r}; choose one of {', '.join(s.value for s in cls)}")


# --------------------------------------------------------------------------------------------- carries


def _check_operands(a: int, b: int, op: Operation) -> None:
    for name, value in (("a", a), ("b", b)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise ArithmeticDataError(f"operand {name} must be an int, got {value!r}")
        if value < 0:
            raise ArithmeticDataError(f"operand {name} must be non-negative, got {value}")
    if op is Operation.SUB and a < b:
        raise ArithmeticDataError(f"{a} - {b}: subtraction needs a >= b so the result is non-negative")
    if op is Operation.DIV:
        if b < 1:
            raise ArithmeticDataError(f"{a} / {b}: the divisor must be at least 1")
        if a % b:
            raise ArithmeticDataError(f"{a} / {b} is not exact; divisions must have an integer result")


def _digits_of(n: int) -> list[int]:
    """Decimal digits, units first (``0`` -> ``[0]``)."""
    return [int(c) for c in reversed(str(n))]


def _multiplication_carries(a: int, b: int) -> tuple[int, ...]:
    da, db = _digits_of(a), _digits_of(b)
    top = (len(da) - 1) + (len(db) - 1)
    carries, carry = [], 0
    for k in range(top + 1):
        total = carry + sum(da[i] * db[k - i] for i in range(len(da)) if 0 <= k - i < len(db))
        if total >= 10 and k < top:
            carries.append(k)
        carry = total // 10
    return tuple(carries)


def carry_positions(a: int, b: int, op: Operation | str) -> tuple[int, ...]:
    """The digit positions (0 = units, ascending) that carry (``+``, ``*``) or borrow (``-``) in ``a op b``;
    for ``/`` those of the multiplication ``b * (a // b)`` it inverts. Exact rules in the module docstring.

    Raises :class:`ArithmeticDataError` for operands the generator would never produce (negative,
    ``a < b`` for ``-``, inexact or by-zero ``/``).
    """
    op = op if isinstance(op, Operation) else Operation.parse(op)
    _check_operands(a, b, op)
    a, b = int(a), int(b)
    if op is Operation.MUL:
        return _multiplication_carries(a, b)
    if op is Operation.DIV:
        return _multiplication_carries(b, a // b)
    da, db = _digits_of(a), _digits_of(b)
    width = max(len(da), len(db))
    da += [0] * (width - len(da))
    db += [0] * (width - len(db))
    positions, carry = [], 0
    for i in range(width):
        overflow = da[i] + db[i] + carry >= 10 if op is Operation.ADD else da[i] - db[i] - carry < 0
        carry = int(overflow)
        if carry:
            positions.append(i)
    return tuple(positions)


def classify(a: int, b: int, op: Operation | str) -> Subset | None:
    """``MEMORIZE`` with no carry, ``CHANGE_ONE`` with exactly one, ``None`` with two or more."""
    count = len(carry_positions(a, b, op))
    return Subset.MEMORIZE if count == 0 else Subset.CHANGE_ONE if count == 1 else None


# ------------------------------------------------------------------------------------------- problems


@dataclass(frozen=True)
class ArithmeticProblem:
    """One prompt. ``a op b`` is the test problem (for ``/``: ``a`` is the dividend, ``b`` the divisor).

    ``prompt`` is the full model input (few-shot lines, if any, then the test prompt); ``answer`` is the
    result's digits; ``continuation`` is what the model should emit next (``template.answer_prefix +
    answer``); ``digits`` is the operands' digit count (for ``/``: of the divisor and the quotient);
    ``subset`` is the problem's :func:`classify` class; ``shots`` are the few-shot problems as ``(a, b)``.
    Build one with :func:`make_problem`; the constructor checks that the fields agree.
    """

    a: int
    b: int
    op: Operation
    template: Template
    prompt: str
    answer: str
    continuation: str
    digits: int
    subset: Subset | None
    shots: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        expected = _problem_fields(self.a, self.b, self.op, self.template, self.shots)
        for field, value in expected.items():
            if getattr(self, field) != value or type(getattr(self, field)) is not type(value):
                raise ArithmeticDataError(
                    f"inconsistent ArithmeticProblem {self.a} {self.op} {self.b}: {field} is "
                    f"{getattr(self, field)!r}, expected {value!r}"
                )

    @property
    def result(self) -> int:
        return self.op.apply(self.a, self.b)

    @property
    def query(self) -> str:
        """The test prompt alone (the last line of ``prompt``)."""
        return self.template.render(self.a, self.b, self.op)

    @property
    def carry_positions(self) -> tuple[int, ...]:
        return carry_positions(self.a, self.b, self.op)

    def to_row(self) -> dict[str, Any]:
        """A JSON-ready dict; the lm-eval task reads ``prompt``, ``continuation`` and ``answer``."""
        return {
            "prompt": self.prompt,
            "continuation": self.continuation,
            "answer": self.answer,
            "a": self.a,
            "b": self.b,
            "op": self.op.symbol,
            "template": self.template.value,
            "digits": self.digits,
            "subset": None if self.subset is None else self.subset.value,
            "few_shot": len(self.shots),
            "shots": [list(shot) for shot in self.shots],
        }

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> ArithmeticProblem:
        """Inverse of :meth:`to_row`; checks every stored field against the recomputed problem."""
        return cls(
            a=int(row["a"]),
            b=int(row["b"]),
            op=Operation.parse(row["op"]),
            template=Template.parse(row["template"]),
            prompt=row["prompt"],
            answer=row["answer"],
            continuation=row["continuation"],
            digits=int(row["digits"]),
            subset=None if row.get("subset") is None else Subset.parse(row["subset"]),
            shots=tuple((int(x), int(y)) for x, y in row.get("shots") or ()),
        )


def _operand_digits(a: int, b: int, op: Operation) -> int:
    first, second = (b, a // b) if op is Operation.DIV else (a, b)
    return max(len(str(first)), len(str(second)))


def make_problem(
    a: int,
    b: int,
    op: Operation | str,
    template: Template | str,
    *,
    shots: Sequence[tuple[int, int]] = (),
) -> ArithmeticProblem:
    """The problem ``a op b`` in ``template``, with the solved ``shots`` (pairs ``(a, b)`` of the same
    operation) as few-shot lines before it. ``digits`` is the larger operand length (for ``/``: of ``b`` and
    the quotient) and ``subset`` is :func:`classify`. A shot equal to the test problem is an error."""
    return ArithmeticProblem(**_problem_fields(a, b, op, template, shots))


def _problem_fields(
    a: int, b: int, op: Operation | str, template: Template | str, shots: Iterable[tuple[int, int]]
) -> dict[str, Any]:
    op = op if isinstance(op, Operation) else Operation.parse(op)
    template = Template.parse(template)
    a, b = _as_int(a), _as_int(b)
    answer = str(op.apply(a, b))
    shots = tuple((_as_int(x), _as_int(y)) for x, y in shots)
    if (a, b) in shots:
        raise ArithmeticDataError(f"the few-shot examples contain the test problem {a} {op.symbol} {b}")
    lines = [template.solved(x, y, op) for x, y in shots]
    lines.append(template.render(a, b, op))
    return {
        "a": a,
        "b": b,
        "op": op,
        "template": template,
        "prompt": "\n".join(lines),
        "answer": answer,
        "continuation": template.answer_prefix + answer,
        "digits": _operand_digits(a, b, op),
        "subset": classify(a, b, op),
        "shots": shots,
    }


def _as_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ArithmeticDataError(f"operands must be ints, got {value!r}")
    return int(value)


# -------------------------------------------------------------------------------------------- spaces


def operand_range(digits: int) -> range:
    """The d-digit numbers: ``range(0, 10)`` for 1, ``range(10, 100)`` for 2, ``range(100, 1000)`` for 3."""
    if isinstance(digits, bool) or not isinstance(digits, int) or not 1 <= digits <= MAX_DIGITS:
        raise ArithmeticDataError(f"digits must be an int from 1 to {MAX_DIGITS}, got {digits!r}")
    return range(0 if digits == 1 else 10 ** (digits - 1), 10**digits)


@functools.lru_cache(maxsize=16)
def _space(op: Operation, digits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every problem of (op, digits) in a fixed order, as arrays ``(a, b, carry_count)``.

    The carry counts are a vectorised copy of :func:`carry_positions` (the tests check they agree).
    """
    values = np.arange(operand_range(digits).start, operand_range(digits).stop, dtype=np.int64)
    first = np.repeat(values, len(values))
    second = np.tile(values, len(values))
    if op is Operation.SUB:
        keep = first >= second
        first, second = first[keep], second[keep]
    if op is Operation.DIV:  # first = divisor b, second = quotient q
        keep = first >= 1
        first, second = first[keep], second[keep]
    da = [(first // 10**i) % 10 for i in range(digits)]
    db = [(second // 10**i) % 10 for i in range(digits)]
    count = np.zeros(len(first), dtype=np.int64)
    carry = np.zeros(len(first), dtype=np.int64)
    if op in (Operation.ADD, Operation.SUB):
        for i in range(digits):
            if op is Operation.ADD:
                carry = (da[i] + db[i] + carry >= 10).astype(np.int64)
            else:
                carry = (da[i] - db[i] - carry < 0).astype(np.int64)
            count += carry
        a, b = first, second
    else:
        # Every operand has exactly `digits` digits (0 is the 1-digit "0"), so the top column is fixed.
        top = 2 * (digits - 1)
        for k in range(top + 1):
            total = carry.copy()
            for i in range(digits):
                if 0 <= k - i < digits:
                    total += da[i] * db[k - i]
            if k < top:
                count += total >= 10
            carry = total // 10
        a, b = (first * second, first) if op is Operation.DIV else (first, second)
    a, b, count = a.astype(np.int32), b.astype(np.int32), count.astype(np.int8)
    for array in (a, b, count):
        array.flags.writeable = False
    return a, b, count


def _candidates(op: Operation, digits: int, subset: Subset | None) -> np.ndarray:
    count = _space(op, digits)[2]
    if subset is None:
        return np.arange(len(count))
    return np.flatnonzero(count == (0 if subset is Subset.MEMORIZE else 1))


def count_problems(op: Operation | str, digits: int, subset: Subset | str | None = None) -> int:
    """How many distinct problems exist for (op, digits, subset), e.g. 100 for 1-digit ``+``."""
    op = op if isinstance(op, Operation) else Operation.parse(op)
    subset = None if subset is None else Subset.parse(subset)
    operand_range(digits)
    return len(_candidates(op, digits, subset))


ProblemKey = tuple[str, int, int]  # (operation symbol, a, b): one problem, whatever its template and shots


def _seed_words(seed: int, op: Operation, digits: int, subset: Subset | None, stream: int) -> list[int]:
    subset_code = 0 if subset is None else 1 + list(Subset).index(subset)
    return [seed, _OP_CODE[op], digits, subset_code, stream]


def generate_problems(
    *,
    ops: str | Operation | Iterable[str | Operation],
    digits: int,
    n_per_op: int,
    template: Template | str,
    few_shot: int = 0,
    subset: Subset | str | None = None,
    seed: int = 0,
    shared_shots: bool = False,
    exclude: Collection[ProblemKey] = (),
) -> list[ArithmeticProblem]:
    """``n_per_op`` distinct problems for each operation of ``ops`` (in that order), drawn without
    replacement from the (op, digits, subset) space; see the module docstring for the spaces, templates,
    few-shot prefixes and subsets. Deterministic for a seed.

    ``shared_shots=True``: all test problems of one operation get the same ``few_shot`` examples (the first
    draw), so their prompts share one prefix — the head sweep then computes that prefix once per ablation.

    ``exclude``: problems (:func:`problem_key`: ``(op symbol, a, b)``) removed from the space before drawing,
    as test problems and as few-shot examples: a held-out set (e.g. the problems that rank neurons) is drawn
    with another seed *and* ``exclude`` = the problems that judge, so the two never share a problem. With an
    empty ``exclude`` the draw is the same as without the argument.

    Raises :class:`ArithmeticDataError` when the space has fewer than ``n_per_op`` problems, or fewer than
    ``n_per_op + few_shot`` when few-shot examples are asked for (they come from the problems left over).
    """
    operations = parse_operations(ops)
    template = Template.parse(template)
    subset = None if subset is None else Subset.parse(subset)
    operand_range(digits)
    for name, value, low in (("n_per_op", n_per_op, 1), ("few_shot", few_shot, 0), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ArithmeticDataError(f"{name} must be an int >= {low}, got {value!r}")

    problems: list[ArithmeticProblem] = []
    for op in operations:
        a_all, b_all, _ = _space(op, digits)
        candidates = _candidates(op, digits, subset)
        banned = {(a, b) for symbol, a, b in exclude if symbol == op.symbol}
        if banned:
            keep = [(int(a_all[i]), int(b_all[i])) not in banned for i in candidates]
            candidates = candidates[np.asarray(keep, dtype=bool)]
        label = f"{digits}-digit {op.symbol}" + (f" in subset {subset.value!r}" if subset else "")
        if n_per_op > len(candidates):
            raise ArithmeticDataError(
                f"asked for {n_per_op} distinct {label} problems but only {len(candidates)} exist"
                + (f" outside the {len(banned)} excluded" if banned else "")
            )
        if few_shot and len(candidates) - n_per_op < few_shot:
            raise ArithmeticDataError(
                f"{label}: {few_shot}-shot prompts need {few_shot} examples outside the {n_per_op} test "
                f"problems, but only {len(candidates) - n_per_op} of the {len(candidates)} problems are left"
            )
        order = np.random.default_rng(np.random.SeedSequence(_seed_words(seed, op, digits, subset, 0)))
        permuted = candidates[order.permutation(len(candidates))]
        tests, pool = permuted[:n_per_op], permuted[n_per_op:]
        shot_rng = np.random.default_rng(np.random.SeedSequence(_seed_words(seed, op, digits, subset, 1)))
        shots: tuple[tuple[int, int], ...] = ()
        for index in tests:
            if few_shot and (not shared_shots or not shots):
                chosen = pool[shot_rng.choice(len(pool), size=few_shot, replace=False)]
                shots = tuple((int(a_all[i]), int(b_all[i])) for i in chosen)
            problems.append(make_problem(int(a_all[index]), int(b_all[index]), op, template, shots=shots))
    return problems


def problem_key(problem: ArithmeticProblem) -> ProblemKey:
    """``(op symbol, a, b)``: what two prompts share when they ask the same problem (in any template)."""
    return problem.op.symbol, problem.a, problem.b


def draw_prompts(
    *,
    ops: str | Iterable[str | Operation],
    digits: Sequence[int],
    templates: Sequence[Template | str],
    n_per_op: int,
    few_shot: int,
    seed: int,
    exclude: Collection[ProblemKey] = (),
) -> list[ArithmeticProblem]:
    """The audit's prompt set: :func:`generate_problems` for every digit count and template, each group of one
    operation sharing its few-shot prefix (``shared_shots``). The operands depend on the seed and the
    operation, not on the template, so every template asks the same problems; ``exclude`` as in
    :func:`generate_problems`."""
    return [p for d in digits for template in templates for p in generate_problems(
        ops=ops, digits=d, n_per_op=n_per_op, template=template, few_shot=few_shot, seed=seed, shared_shots=True,
        exclude=exclude)]


# ------------------------------------------------------------------------------------- files, lm-eval


def write_jsonl(problems: Iterable[ArithmeticProblem], path: str | os.PathLike[str]) -> Path:
    """Write one :meth:`ArithmeticProblem.to_row` per line (UTF-8), atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(problem.to_row(), ensure_ascii=False) + "\n" for problem in problems]
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            handle.writelines(lines)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_jsonl(path: str | os.PathLike[str]) -> list[ArithmeticProblem]:
    """The problems :func:`write_jsonl` wrote (each row is checked against its recomputed problem)."""
    with Path(path).open(encoding="utf-8") as handle:
        return [ArithmeticProblem.from_row(json.loads(line)) for line in handle if line.strip()]


GENERATION_KWARGS: dict[str, Any] = {"until": ["\n"], "do_sample": False, "max_gen_toks": 8}
MATCHES = ("strict", "first_integer")


def lm_eval_task_dict(
    path: str | os.PathLike[str],
    *,
    name: str,
    output_type: str = "generate_until",
    match: str = "strict",
) -> dict[str, Any]:
    """An lm-eval (0.4.x) task config for a :func:`write_jsonl` file, to pass in ``simple_evaluate(tasks=[...])``.

    * ``output_type="generate_until"`` (default): greedy generation of at most 8 tokens, stopped at
      ``"\\n"``. With ``match="strict"`` the generation must equal ``continuation`` exactly (leading space
      included; metric ``exact_match``, filter ``none``). With ``match="first_integer"`` the first run of
      digits in the generation must equal ``answer`` (metric ``exact_match``, filter ``first_integer``).
    * ``output_type="loglikelihood"``: the log-probability of ``continuation`` given ``prompt``; metric
      ``acc`` is 1 when every continuation token is the greedy argmax (exact match under teacher forcing,
      without needing the model to stop) and ``perplexity`` is reported too. ``match`` must be "strict".

    Few-shot examples are already in ``prompt``: keep lm-eval's ``num_fewshot`` at 0.
    """
    if output_type not in ("generate_until", "loglikelihood"):
        raise ArithmeticDataError(
            f"output_type must be 'generate_until' or 'loglikelihood', got {output_type!r}"
        )
    if match not in MATCHES:
        raise ArithmeticDataError(f"match must be one of {', '.join(MATCHES)}, got {match!r}")
    if output_type == "loglikelihood" and match != "strict":
        raise ArithmeticDataError("a loglikelihood task scores the exact continuation: use match='strict'")
    task: dict[str, Any] = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(Path(path))}},
        "test_split": "test",
        "output_type": output_type,
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "answer" if match == "first_integer" else "continuation",
        "target_delimiter": "",
        "fewshot_delimiter": "\n",
        "num_fewshot": 0,
        "metadata": {"version": 1.0},
    }
    if output_type == "loglikelihood":
        task["metric_list"] = [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
        ]
        return task
    task["generation_kwargs"] = dict(GENERATION_KWARGS, until=list(GENERATION_KWARGS["until"]))
    task["metric_list"] = [
        {
            "metric": "exact_match",
            "aggregation": "mean",
            "higher_is_better": True,
            "ignore_case": False,
            "ignore_punctuation": False,
        }
    ]
    if match == "first_integer":
        task["filter_list"] = [
            {
                "name": "first_integer",
                "filter": [
                    {"function": "regex", "regex_pattern": r"(\d+)", "group_select": 0},
                    {"function": "take_first"},
                ],
            }
        ]
    return task
