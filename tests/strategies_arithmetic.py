"""Hypothesis strategies for :mod:`lmaudit.checks.core.arithmetic_problems`.

Every parameter takes either a hypothesis strategy or a plain value (``ops="+-"``, ``digits=2``,
``templates=Template.QA``, ``few_shot=2``), so the strategies compose::

    arithmetic_problems(ops=st.sampled_from([Operation.ADD, Operation.SUB]), digits=1, few_shot=st.integers(0, 3))
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from lmaudit.checks.core.arithmetic_problems import (
    MAX_DIGITS,
    ArithmeticProblem,
    Operation,
    Template,
    make_problem,
    operand_range,
    parse_operations,
)

__all__ = ["arithmetic_problems", "digit_counts", "operands", "operations", "templates"]


def operations(ops: Any = None) -> SearchStrategy[Operation]:
    """An operation: any of the four, or one of ``ops`` (a strategy, an :class:`Operation`, ``"+-*/"``...)."""
    if isinstance(ops, SearchStrategy):
        return ops
    return st.sampled_from(list(Operation) if ops is None else parse_operations(ops))


def digit_counts(digits: Any = None) -> SearchStrategy[int]:
    """An operand digit count: 1..MAX_DIGITS, or ``digits`` (a strategy or an int)."""
    if isinstance(digits, SearchStrategy):
        return digits
    return st.integers(1, MAX_DIGITS) if digits is None else st.just(digits)


def templates(template: Any = None) -> SearchStrategy[Template]:
    """A template: any, or ``template`` (a strategy, a :class:`Template` or its name)."""
    if isinstance(template, SearchStrategy):
        return template
    return st.sampled_from(list(Template)) if template is None else st.just(Template.parse(template))


@st.composite
def operands(draw: st.DrawFn, op: Operation | str, digits: int | None = None) -> tuple[int, int]:
    """``(a, b)`` valid for ``op`` as the generator makes them: with ``digits``, both d-digit (for ``/``: the
    divisor and the quotient, ``a = b * q``); with ``digits=None``, any sizes up to 10**6 (still
    ``a >= b`` for ``-`` and an exact division with ``b >= 1`` for ``/``)."""
    op = op if isinstance(op, Operation) else Operation.parse(op)
    low, high = (
        (0, 10**6) if digits is None else (operand_range(digits).start, operand_range(digits).stop - 1)
    )
    numbers = st.integers(low, high)
    if op is Operation.DIV:
        divisor = draw(st.integers(max(1, low), high))
        return divisor * draw(numbers), divisor
    a, b = draw(numbers), draw(numbers)
    if op is Operation.SUB and a < b:
        a, b = b, a
    return a, b


@st.composite
def arithmetic_problems(
    draw: st.DrawFn,
    *,
    ops: Any = None,
    digits: Any = None,
    template: Any = None,
    few_shot: Any = 0,
) -> ArithmeticProblem:
    """An :class:`ArithmeticProblem` made with :func:`make_problem`: d-digit operands for the drawn digit
    count, and ``few_shot`` distinct solved examples of the same operation and digit count, none equal to
    the test problem."""
    op = draw(operations(ops))
    d = draw(digit_counts(digits))
    chosen = draw(templates(template))
    k = draw(few_shot if isinstance(few_shot, SearchStrategy) else st.just(few_shot))
    a, b = draw(operands(op, d))
    shots = draw(
        st.lists(operands(op, d).filter(lambda pair: pair != (a, b)), min_size=k, max_size=k, unique=True)
    )
    return make_problem(a, b, op, chosen, shots=shots)
