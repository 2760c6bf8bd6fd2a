"""Every gate can fail: each threshold of the audit suite has a counter-example test that names it.

Static (no model, no test run): the gates are read from ``audits/*.yaml`` through the strict parser (every
profile's ``expect``) and from the Python audits ``audits/test_*.py`` by an AST scan of their ``audit_expect``
calls; the counter-examples are the tests of ``tests/*.py`` marked ``@pytest.mark.counterexample("entry.metric",
...)``. The scan lives in :mod:`tests.gate_scan`, which ``benchmarks/gates.py`` also prints as a table.
Whether each counter-example really makes its gates fail is what the counter-example itself asserts
(``pytest -m counterexample``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.gate_scan import Coverage, audit_gates, counterexamples, coverage, first_sentence, suggest


@pytest.fixture(scope="module")
def suite() -> Coverage:
    return coverage()


def test_every_gate_has_a_counterexample(suite: Coverage) -> None:
    missing = [f"  {g.name}  ({g.source}, {' / '.join(f'{p} {t}' for p, t in g.thresholds.items())})"
               for g in suite.uncovered]
    assert not missing, ("gates without a counter-example (add a test marked "
                         "@pytest.mark.counterexample(\"entry.metric\") that makes each fail):\n" + "\n".join(missing))


def test_every_named_gate_exists(suite: Coverage) -> None:
    stale = [f"  {test.node_id} names {name!r}, which is no gate{suggest(name, suite.gates)}"
             for test, name in suite.stale]
    assert not stale, "counter-examples name gates that the audit suite does not declare:\n" + "\n".join(stale)


def test_every_counterexample_names_a_gate(suite: Coverage) -> None:
    unnamed = [f"  {test.node_id} (line {test.line})" for test in suite.unnamed]
    unreadable = [f"  {test.node_id}: {', '.join(test.invalid)}" for test in suite.counterexamples if test.invalid]
    assert not unnamed, "counterexample markers that name no gate:\n" + "\n".join(unnamed)
    assert not unreadable, "marker arguments that are not string literals (the scan reads the source):\n" + \
        "\n".join(unreadable)


def test_every_counterexample_says_what_it_does(suite: Coverage) -> None:
    """The gate table (benchmarks/gates.py) shows each counter-example's first docstring sentence."""
    undocumented = [f"  {test.node_id}" for test in suite.undocumented]
    assert not undocumented, "counter-examples without a docstring:\n" + "\n".join(undocumented)


def test_the_scan_sees_every_audit_file_and_both_kinds_of_gate(suite: Coverage) -> None:
    """A scan that found nothing would pass the tests above vacuously."""
    audits = Path(__file__).resolve().parents[1] / "audits"
    with_thresholds = {f"audits/{p.name}" for p in [*audits.glob("*.yaml"), *audits.glob("test_*.py")]
                       if "expect:" in p.read_text() or "audit_expect(" in p.read_text()}
    assert {gate.source for gate in suite.gates} == with_thresholds
    assert "test_harness_selfcheck::test_layer_skip_is_exact.max_abs_logit_difference" in {g.name for g in suite.gates}


# ------------------------------------------------------------------------------------------------ the scan itself

AUDIT = '''\
import pytest

LOOSE = {"max": 0.5}


@pytest.mark.audit_area("bias")
def test_a(audit_expect):
    """The first gate is a release bound. Second sentence."""
    audit_expect("recorded_only", 1.0)
    audit_expect("bounded", 0.1, **LOOSE)
    audit_expect("exact", 3, equals=3, baseline={"direction": "no_change"})
'''

TESTS = '''\
import pytest

pytestmark = pytest.mark.usefixtures("one_thread")
BOTH = pytest.mark.counterexample("test_audit::test_a.bounded", "test_audit::test_a.exact")


@pytest.mark.counterexample("test_audit::test_a.bounded")
def test_direct():
    """Direct."""


@BOTH
@pytest.mark.parametrize("x", [1])
def test_through_a_name(x):
    """Through a name."""


@pytest.mark.counterexample
def test_bare():
    pass


class TestGroup:
    @pytest.mark.counterexample("test_audit::test_a.nope", GATE)
    def test_method(self):
        """In a class."""


def test_unmarked():
    """Not a counter-example."""
'''


def test_the_scan_reads_python_audits_and_every_form_of_marker(tmp_path: Path) -> None:
    (tmp_path / "audits").mkdir()
    (tmp_path / "tests").mkdir()
    (tmp_path / "audits" / "test_audit.py").write_text(AUDIT)
    (tmp_path / "tests" / "test_examples.py").write_text(TESTS)
    gates = audit_gates(tmp_path / "audits")
    assert [(g.name, g.thresholds, g.area, g.claim) for g in gates] == [
        ("test_audit::test_a.bounded", {"*": "≤ 0.5"}, "bias", "The first gate is a release bound."),
        ("test_audit::test_a.exact", {"*": "== 3"}, "bias", "The first gate is a release bound."),
    ]
    found = {c.function: c for c in counterexamples(tmp_path / "tests")}
    assert set(found) == {"test_direct", "test_through_a_name", "test_bare", "TestGroup::test_method"}
    assert found["test_through_a_name"].gates == ("test_audit::test_a.bounded", "test_audit::test_a.exact")
    assert found["TestGroup::test_method"].invalid == ("GATE",)
    result = coverage(tmp_path / "audits", tmp_path / "tests")
    assert result.uncovered == []
    assert [(t.function, name) for t, name in result.stale] == [("TestGroup::test_method", "test_audit::test_a.nope")]
    assert [t.function for t in result.unnamed] == ["test_bare"]
    assert [t.function for t in result.undocumented] == ["test_bare"]


def test_a_gate_without_counterexample_is_reported(tmp_path: Path) -> None:
    (tmp_path / "audits").mkdir()
    (tmp_path / "tests").mkdir()
    (tmp_path / "audits" / "test_audit.py").write_text(AUDIT)
    result = coverage(tmp_path / "audits", tmp_path / "tests")
    assert [g.name for g in result.uncovered] == ["test_audit::test_a.bounded", "test_audit::test_a.exact"]


def test_first_sentence() -> None:
    assert first_sentence("Scaled 1.5 times (§3.4. See Fig. 6): fails, e.g. Here.\n  Then more.") == \
        "Scaled 1.5 times (§3.4. See Fig. 6): fails, e.g. Here."
    assert first_sentence("One line\nwrapped. Two.\n\nOther paragraph.") == "One line wrapped."
    assert first_sentence("Ends here. (A remark.)") == "Ends here."
