"""Which gates the audit suite declares, and which counter-example tests name them: a static scan, no model.

A *gate* is one threshold on one metric of one audit: ``(entry, metric)`` for every metric in the ``expect`` of
any profile of an ``audits/*.yaml`` entry (read through the strict parser, so a gate is exactly what a run
compares), and for every ``audit_expect("metric", value, <threshold keywords>)`` call in a Python audit
``audits/test_*.py`` (found by an AST scan, so a new Python gate needs no list to be kept by hand). A gate is
named ``entry.metric``; a Python audit's entry is ``<module>::<function>``, e.g.
``test_harness_selfcheck::test_layer_skip_is_exact.max_abs_logit_difference``.

A *counter-example* is a test in ``tests/*.py`` marked ``@pytest.mark.counterexample("entry.metric", ...)``,
naming every gate it shows failing. The marker is read from the source (a decorator, a module-level name bound to
such a marker and used as a decorator, or a module-level ``pytestmark``), so only string literals count.

``tests/test_gates.py`` asserts that the two sides match; ``benchmarks/gates.py`` prints them as a table.
"""

from __future__ import annotations

import ast
import contextlib
import difflib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
AUDITS = ROOT / "audits"
TESTS = ROOT / "tests"
MARKER = "counterexample"
THRESHOLD_KEYS = ("min", "max", "equals", "approx", "rel", "abs")  # audit_expect's threshold keywords


@dataclass(frozen=True)
class Gate:
    """One threshold of the audit suite. ``thresholds`` maps each profile that runs it to the threshold's text
    (a Python audit runs in every profile: key ``"*"``)."""

    area: str
    entry: str
    metric: str
    thresholds: dict[str, str]
    claim: str
    source: str  # the audit file, relative to the repository

    @property
    def name(self) -> str:
        return f"{self.entry}.{self.metric}"


@dataclass(frozen=True)
class Counterexample:
    """One test marked ``counterexample``; ``gates`` are its marker's arguments, ``invalid`` the arguments that
    are not string literals (the scan cannot read them, so they name nothing)."""

    file: str  # relative to the repository
    function: str  # ``Class::method`` inside a test class
    line: int
    gates: tuple[str, ...]
    doc: str
    invalid: tuple[str, ...] = ()

    @property
    def node_id(self) -> str:
        return f"{self.file}::{self.function}"


@dataclass(frozen=True)
class Coverage:
    """The scan's verdict: what ``tests/test_gates.py`` asserts is empty."""

    gates: list[Gate]
    counterexamples: list[Counterexample]
    uncovered: list[Gate] = field(default_factory=list)  # gates no counter-example names
    stale: list[tuple[Counterexample, str]] = field(default_factory=list)  # names that are no gate
    unnamed: list[Counterexample] = field(default_factory=list)  # markers that name no gate
    undocumented: list[Counterexample] = field(default_factory=list)  # no docstring to say what they do

    def tests_of(self, gate: Gate) -> list[Counterexample]:
        return [c for c in self.counterexamples if gate.name in c.gates]


# ------------------------------------------------------------------------------------------------ the gates


def yaml_gates(audits_dir: Path = AUDITS) -> list[Gate]:
    """Every (entry, metric) in the ``expect`` of any profile of ``audits_dir/*.yaml``, after the profile's
    overrides (:meth:`ParsedAudit.resolve`), in file and entry order."""
    from lmaudit.checks.catalog import load_checks
    from lmaudit.checks.harness.audit_file import parse_audit_file

    load_checks()  # the registry the audit files name their checks in
    gates: list[Gate] = []
    for path in sorted(audits_dir.glob("*.yaml")):
        for audit in parse_audit_file(path):
            by_metric: dict[str, dict[str, str]] = {}
            for profile in audit.profiles:
                for metric, threshold in audit.resolve(profile).expect.items():
                    by_metric.setdefault(metric, {})[profile] = threshold.describe()
            gates += [Gate(audit.spec.area, audit.entry.name, metric, thresholds, audit.entry.claim,
                           _relative(path)) for metric, thresholds in by_metric.items()]
    return gates


def python_audit_gates(audits_dir: Path = AUDITS) -> list[Gate]:
    """Every ``audit_expect("metric", value, **threshold)`` call with threshold keywords in a test function of
    ``audits_dir/test_*.py`` (a call without them only records the metric). A ``**NAME`` argument is read from
    the module's literal assignment ``NAME = {...}``."""
    from lmaudit.checks.harness.thresholds import Threshold

    gates: list[Gate] = []
    for path in sorted(audits_dir.glob("test_*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        constants = _literal_constants(tree)
        module_area = _audit_area(_module_marks(tree))
        for function in (n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")):
            area = _audit_area(function.decorator_list) or module_area or "other"
            claim = first_sentence(ast.get_docstring(function) or ast.get_docstring(tree) or "")
            for call in _calls_to(function, "audit_expect"):
                metric, threshold = _expectation(call, constants)
                if metric is None or not threshold:
                    continue
                text = (Threshold(**threshold).describe() if isinstance(threshold, dict)
                        else threshold)  # an expression the scan cannot evaluate: shown as written
                gates.append(Gate(area, f"{path.stem}::{function.name}", metric, {"*": text}, claim,
                                  _relative(path)))
    return gates


def audit_gates(audits_dir: Path = AUDITS) -> list[Gate]:
    return yaml_gates(audits_dir) + python_audit_gates(audits_dir)


def _expectation(call: ast.Call, constants: dict[str, Any]) -> tuple[str | None, dict[str, Any] | str]:
    """The metric name and the threshold keywords of one ``audit_expect`` call."""
    metric = call.args[0].value if call.args and isinstance(call.args[0], ast.Constant) else None
    threshold: dict[str, Any] = {}
    for keyword in call.keywords:
        if keyword.arg is None:  # **NAME
            value = constants.get(keyword.value.id) if isinstance(keyword.value, ast.Name) else None
            if not isinstance(value, dict):
                return metric, f"**{ast.unparse(keyword.value)}"
            threshold.update({k: v for k, v in value.items() if k in THRESHOLD_KEYS})
        elif keyword.arg in THRESHOLD_KEYS:
            try:
                threshold[keyword.arg] = ast.literal_eval(keyword.value)
            except (ValueError, TypeError):
                return metric, f"{keyword.arg}={ast.unparse(keyword.value)}"
    return (metric if isinstance(metric, str) else None), threshold


def _literal_constants(tree: ast.Module) -> dict[str, Any]:
    constants: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            with contextlib.suppress(ValueError, TypeError):  # not a literal: a **NAME of it stays unread
                constants[node.targets[0].id] = ast.literal_eval(node.value)
    return constants


def _calls_to(node: ast.AST, name: str) -> Iterator[ast.Call]:
    for call in ast.walk(node):
        if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == name:
            yield call


def _audit_area(decorators: list[ast.expr]) -> str | None:
    for decorator in decorators:
        if (isinstance(decorator, ast.Call) and _dotted(decorator.func).endswith("mark.audit_area")
                and decorator.args and isinstance(decorator.args[0], ast.Constant)):
            return str(decorator.args[0].value)
    return None


# ------------------------------------------------------------------------------------------------ the markers


def counterexamples(tests_dir: Path = TESTS) -> list[Counterexample]:
    """Every test function of ``tests_dir/*.py`` that carries the ``counterexample`` marker, with the gates the
    marker names, in file and line order."""
    found: list[Counterexample] = []
    for path in sorted(tests_dir.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        aliases = {target.id: node.value for node in tree.body if isinstance(node, ast.Assign)
                   for target in node.targets if isinstance(target, ast.Name) and _is_marker(node.value)}
        module_marks = [m for m in _module_marks(tree) if _is_marker(m)]
        for qualname, function in _test_functions(tree):
            marks = module_marks + [aliases.get(d.id, d) if isinstance(d, ast.Name) else d
                                    for d in function.decorator_list]
            marks = [m for m in marks if _is_marker(m)]
            if not marks:
                continue
            arguments = [a for m in marks if isinstance(m, ast.Call) for a in m.args]
            gates = tuple(a.value for a in arguments if isinstance(a, ast.Constant) and isinstance(a.value, str))
            invalid = tuple(ast.unparse(a) for a in arguments
                            if not (isinstance(a, ast.Constant) and isinstance(a.value, str)))
            found.append(Counterexample(_relative(path), qualname, function.lineno, gates,
                                        ast.get_docstring(function) or "", invalid))
    return found


def _is_marker(node: ast.expr) -> bool:
    """``pytest.mark.counterexample`` or ``pytest.mark.counterexample(...)``."""
    return _dotted(node.func if isinstance(node, ast.Call) else node).endswith(f"mark.{MARKER}")


def _module_marks(tree: ast.Module) -> list[ast.expr]:
    """The elements of a module-level ``pytestmark = mark`` or ``pytestmark = [marks]``."""
    for node in tree.body:
        if (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "pytestmark"
                                                 for t in node.targets)):
            return list(node.value.elts) if isinstance(node.value, (ast.List, ast.Tuple)) else [node.value]
    return []


def _test_functions(tree: ast.Module) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    functions = (ast.FunctionDef, ast.AsyncFunctionDef)
    for node in tree.body:
        if isinstance(node, functions) and node.name.startswith("test"):
            yield node.name, node
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            for method in node.body:
                if isinstance(method, functions) and method.name.startswith("test"):
                    yield f"{node.name}::{method.name}", method


def _dotted(node: ast.expr) -> str:
    return ast.unparse(node)


# ------------------------------------------------------------------------------------------------ both sides


def coverage(audits_dir: Path = AUDITS, tests_dir: Path = TESTS) -> Coverage:
    """Match the gates of ``audits_dir`` with the counter-examples of ``tests_dir``."""
    gates, tests = audit_gates(audits_dir), counterexamples(tests_dir)
    named = {name for test in tests for name in test.gates}
    known = {gate.name for gate in gates}
    return Coverage(
        gates, tests,
        uncovered=[gate for gate in gates if gate.name not in named],
        stale=[(test, name) for test in tests for name in test.gates if name not in known],
        unnamed=[test for test in tests if not test.gates],
        undocumented=[test for test in tests if not test.doc.strip()],
    )


def suggest(name: str, gates: list[Gate]) -> str:
    """`` (did you mean: x?)`` for a gate name that does not exist, else empty."""
    close = difflib.get_close_matches(name, [g.name for g in gates], n=1, cutoff=0.6)
    return f" (did you mean: {close[0]}?)" if close else ""


def first_sentence(text: str) -> str:
    """The first sentence of a docstring's first paragraph, on one line: up to the first ``.``, ``!`` or ``?``
    followed by a capital or an opening parenthesis, outside parentheses, not ending an abbreviation ("e.g.")."""
    paragraph = " ".join(text.strip().split("\n\n")[0].split())
    depth = 0
    for i, char in enumerate(paragraph):
        depth += (char in "([") - (char in ")]")
        after = paragraph[i + 1:i + 3]
        if (char in ".!?" and depth == 0 and after[:1] == " " and (after[1:].isupper() or after[1:] == "(")
                and paragraph[:i].rsplit(" ", 1)[-1].lower() not in ABBREVIATIONS):
            return paragraph[:i + 1]
    return paragraph


ABBREVIATIONS = {"e.g", "i.e", "cf", "vs", "fig", "eq", "al", "sec", "resp"}


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)
