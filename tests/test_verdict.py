"""A verdict that can be trusted: every way a run can end, reproduced, with the verdict and exit status it gets.

- an interrupted run (a real SIGINT to a real pytest process) is INTERRUPTED, exits non-zero and lists the audits
  that did not run; a killed run (SIGKILL) leaves a partial JSON with the audits that finished, marked incomplete;
- a run that checks nothing is EMPTY, a run whose model does not load is ERROR, both non-zero;
- the JSON and the HTML are written independently: either one failing leaves the other, which says so;
- a check that produced a NaN is an error row naming the layer (the non-finite guard wraps every check).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmaudit.reports.json_results import ResultsFileError, load_results
from lmaudit.reports.records import VERDICTS, AuditRecord, RunInfo, verdict
from tests.test_plugin import FAKE_CONFTEST, run_audits, write_audit
from tests.test_plugin import isolated_result_cache as isolated_result_cache  # noqa: F401  (autouse)
from tests.test_plugin import tiny_dir as tiny_dir  # noqa: F401  (the module-scoped tiny model fixture)

WAIT_CONFTEST = FAKE_CONFTEST + '''

import time
from pathlib import Path

from lmaudit.checks.core.errors import NonFiniteOutputError


class WaitParams(CheckParams):
    marker: str = "started.flag"
    seconds: float = 120.0


def fake_wait(context, params) -> FakeResult:
    """Announces that it runs (a marker file), then waits long enough to be interrupted."""
    Path(params.marker).write_text("running")
    time.sleep(params.seconds)
    return FakeResult(1.0, "waited", 0, [])


class NanParams(CheckParams):
    layer: int = 1


def fake_nan(context, params) -> FakeResult:
    """Raises what the non-finite guard raises when a layer's output is NaN."""
    raise NonFiniteOutputError(f"non-finite output (nan) first in decoder layer {params.layer} (model.layers.{params.layer})")


if "fake_wait" not in CHECKS:
    register_check("fake_wait", params=WaitParams, area="model")(fake_wait)
    register_check("fake_nan", params=NanParams, area="model")(fake_nan)
'''

THREE_AUDITS = """
audits:
  - {name: first_passes, check: fake_value, expect: {value: {max: 2}}}
  - {name: second_waits, check: fake_wait}
  - {name: third_never_starts, check: fake_value}
"""


@pytest.fixture
def sandbox(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(WAIT_CONFTEST)
    (pytester.path / "audits").mkdir()
    return pytester


def default_sigint() -> None:
    """In the child: SIGINT back to its default. A shell without job control starts background commands with
    SIGINT ignored, the child inherits that, and Python then never raises KeyboardInterrupt (CI in the background)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_and_signal(sandbox: pytest.Pytester, tiny: Path, sig: signal.Signals) -> tuple[int, str]:
    """Run pytest in a real subprocess, send ``sig`` once the second audit is running; (exit code, output)."""
    write_audit(sandbox, THREE_AUDITS, name="x.yaml")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "pytest", "audits/x.yaml", "--model", str(tiny), "--audit-json", "i.json",
         "--audit-report", "r.html", "-p", "no:cacheprovider"],
        cwd=sandbox.path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=default_sigint)
    marker = sandbox.path / "started.flag"
    deadline = time.monotonic() + 180
    while not marker.exists():
        assert process.poll() is None, process.communicate()[0]
        assert time.monotonic() < deadline, "the second audit never started"
        time.sleep(0.1)
    time.sleep(0.3)  # inside the check's sleep
    process.send_signal(sig)
    output, _ = process.communicate(timeout=120)
    return process.returncode, output


def test_sigint_during_a_run_is_interrupted_nonzero_and_lists_what_did_not_run(
    sandbox: pytest.Pytester, tiny_dir: Path  # noqa: F811
) -> None:
    code, output = _start_and_signal(sandbox, tiny_dir, signal.SIGINT)
    assert code == pytest.ExitCode.INTERRUPTED, output
    data = json.loads((sandbox.path / "i.json").read_text())
    assert data["verdict"] == "INTERRUPTED" and data["complete"] is True and data["run"]["interrupted"] is True
    assert [(a["name"], a["status"]) for a in data["audits"]] == [("first_passes", "passed")]
    assert [(a["key"], a["reason"]) for a in data["not_run"]] == [
        ("x.yaml::second_waits", "interrupted while running"), ("x.yaml::third_never_starts", "did not start")]
    html = (sandbox.path / "r.html").read_text()
    assert 'id="verdict">INTERRUPTED<' in html and "2 of 3 selected audits did not run" in html
    assert "lmaudit: INTERRUPTED — 1 claim checked" in output
    assert "did not run (interrupted while running): x.yaml::second_waits" in output, output


def test_sigkill_leaves_a_partial_json_with_the_finished_audits_marked_incomplete(
    sandbox: pytest.Pytester, tiny_dir: Path  # noqa: F811
) -> None:
    code, _ = _start_and_signal(sandbox, tiny_dir, signal.SIGKILL)
    assert code == -signal.SIGKILL
    data = json.loads((sandbox.path / "i.json").read_text())
    assert data["verdict"] == "INCOMPLETE" and data["complete"] is False
    assert [(a["name"], a["status"]) for a in data["audits"]] == [("first_passes", "passed")]
    assert [a["name"] for a in data["not_run"]] == ["second_waits", "third_never_starts"]
    assert not (sandbox.path / "r.html").exists()
    assert not list(sandbox.path.glob(".*.tmp"))
    with pytest.raises(ResultsFileError, match="partial results file"):
        load_results(sandbox.path / "i.json")  # never a baseline


def test_a_run_where_every_audit_skips_is_empty_and_exits_nonzero(sandbox: pytest.Pytester, tiny_dir: Path) -> None:  # noqa: F811
    write_audit(sandbox, "audits:\n  - {name: a, check: fake_value, profiles: [full]}\n")
    result, data = run_audits(sandbox, tiny_dir, "--audit-profile", "quick")
    result.assert_outcomes(skipped=1)
    assert result.ret == pytest.ExitCode.NO_TESTS_COLLECTED
    assert data["verdict"] == "EMPTY" and data["claims_checked"] == 0
    assert any(line.startswith("lmaudit: EMPTY — 0 claims checked") for line in result.outlines)
    html = (sandbox.path / "audit-report.html").read_text()
    assert '<span class="claims" id="claims-checked">0 claims checked</span>' in html


def test_a_run_that_selects_nothing_is_empty_when_a_report_was_asked_for(
    sandbox: pytest.Pytester, tiny_dir: Path  # noqa: F811
) -> None:
    write_audit(sandbox, "audits:\n  - {name: a, check: fake_value}\n")
    result, data = run_audits(sandbox, tiny_dir, "-k", "nothing_matches")
    assert result.ret == pytest.ExitCode.NO_TESTS_COLLECTED and data["verdict"] == "EMPTY"


def test_a_model_that_does_not_load_is_error(sandbox: pytest.Pytester, tmp_path: Path) -> None:
    write_audit(sandbox, "audits:\n  - {name: a, check: fake_value}\n  - {name: b, check: fake_value}\n")
    result, data = run_audits(sandbox, tmp_path / "typo-model")
    assert result.ret != 0
    assert data["verdict"] == "ERROR" and data["claims_checked"] == 0
    assert data["run"]["model"]["loaded"] is False and "typo-model" in data["run"]["model"]["load_error"]
    html = (sandbox.path / "audit-report.html").read_text()
    assert 'id="verdict">ERROR<' in html and 'id="load-error"' in html


def test_html_that_cannot_be_written_still_leaves_the_json_and_fails_the_run(
    sandbox: pytest.Pytester, tiny_dir: Path  # noqa: F811
) -> None:
    write_audit(sandbox, "audits:\n  - {name: a, check: fake_value}\n")
    (sandbox.path / "blocked.html").mkdir()  # a directory where the report file should go
    result, data = run_audits(sandbox, tiny_dir, "--audit-report", "blocked.html")
    result.assert_outcomes(passed=1)
    assert result.ret == pytest.ExitCode.INTERNAL_ERROR
    assert data["verdict"] == "ERROR" and data["audits"][0]["status"] == "passed"
    assert any("blocked.html" in error for error in data["run"]["write_errors"])
    assert any(line.startswith("lmaudit: NOT written: blocked.html") for line in result.outlines)


def test_json_that_cannot_be_written_still_leaves_the_html(sandbox: pytest.Pytester, tiny_dir: Path) -> None:  # noqa: F811
    write_audit(sandbox, "audits:\n  - {name: a, check: fake_value}\n")
    (sandbox.path / "results.json").mkdir()
    result, _ = run_audits(sandbox, tiny_dir, "--audit-report", "r.html")
    assert result.ret == pytest.ExitCode.INTERNAL_ERROR
    html = (sandbox.path / "r.html").read_text()
    assert 'id="verdict">ERROR<' in html and "Not written: results.json" in html


def test_a_nonfinite_output_is_an_error_row_naming_the_layer_inside_the_guard(
    sandbox: pytest.Pytester, tiny_dir: Path, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    import contextlib

    import lmaudit.checks.core.hooks as hooks

    guarded: list[str] = []

    @contextlib.contextmanager
    def fake_guard(adapter):  # stands in for core.hooks.nonfinite_guard: it must wrap every check run
        guarded.append(type(adapter).__name__)
        yield

    monkeypatch.setattr(hooks, "nonfinite_guard", fake_guard, raising=False)
    write_audit(sandbox, "audits:\n  - {name: nan, check: fake_nan, params: {layer: 1}}\n"
                         "  - {name: fine, check: fake_value}\n")
    result, data = run_audits(sandbox, tiny_dir)
    nan, fine = data["audits"]
    assert nan["status"] == "error" and "decoder layer 1 (model.layers.1)" in nan["message"]
    assert fine["status"] == "passed" and len(guarded) == 2
    assert data["verdict"] == "FAIL" and result.ret == pytest.ExitCode.TESTS_FAILED


def test_collect_only_writes_no_report(sandbox: pytest.Pytester, tiny_dir: Path) -> None:  # noqa: F811
    write_audit(sandbox, "audits:\n  - {name: a, check: fake_value}\n")
    result, data = run_audits(sandbox, tiny_dir, "--collect-only")
    assert result.ret == 0 and data == {}


# ------------------------------------------------------------------------------------------- the rule


def _record(status: str) -> AuditRecord:
    return AuditRecord(nodeid=f"a.yaml::{status}", name=status, source="a.yaml", status=status)


@pytest.mark.parametrize(("statuses", "run", "expected"), [
    (["passed", "skipped"], RunInfo(), "PASS"),
    (["passed", "xfailed"], RunInfo(), "PASS"),
    (["passed", "failed"], RunInfo(), "FAIL"),
    (["passed", "error"], RunInfo(), "FAIL"),
    (["skipped", "skipped"], RunInfo(), "EMPTY"),
    ([], RunInfo(), "EMPTY"),
    (["passed"], RunInfo(interrupted=True), "INTERRUPTED"),
    (["failed"], RunInfo(interrupted=True), "INTERRUPTED"),
    (["passed"], RunInfo(not_run=[{"key": "a.yaml::b"}]), "INTERRUPTED"),
    (["failed"], RunInfo(not_run=[{"key": "a.yaml::b"}]), "FAIL"),  # pytest -x: stopped after a failure
    (["error"], RunInfo(model={"spec": "x", "loaded": False, "load_error": "no such file"}), "ERROR"),
    (["passed"], RunInfo(collection_errors=["b.yaml: duplicate key"]), "ERROR"),
    (["passed"], RunInfo(write_errors=["r.html: disk full"]), "ERROR"),
    (["passed"], RunInfo(complete=False), "INCOMPLETE"),
])
def test_verdict_rule(statuses: list[str], run: RunInfo, expected: str) -> None:
    assert verdict([_record(s) for s in statuses], run) == expected
    assert expected in VERDICTS
