"""The pytest plugin end to end (pytester, in-process): YAML and Python audits, statuses, collection errors,
profiles, the session-scoped model, baselines, the verdict line, the exit code and the written files.

The audits use a fake check registered by the sandbox's conftest (``FAKE_CONFTEST``), so these tests do not
depend on any real check; the model is a tiny random Llama written to disk once per module.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import lmaudit.reports.charts.common  # noqa: F401  (imported here once: in-process runs drop modules they import)
import lmaudit.reports.html  # noqa: F401
from lmaudit.checks.catalog import load_checks
from lmaudit.checks.harness.thresholds import BaselineTolerance, compare_to_baseline, metric_delta
from tests.checkpoints import save_tiny_llama

FAKE_CONFTEST = '''
from dataclasses import dataclass

from lmaudit.checks.core.results import CheckResult, metric_field
from lmaudit.checks.harness.registry import CHECKS, CheckParams, register_check
from lmaudit.reports.charts import chart_for
from lmaudit.reports.charts.common import bar_chart


class FakeParams(CheckParams):
    value: float = 1.0
    token: str = "tok"
    crash: bool = False


@dataclass(frozen=True)
class FakeResult(CheckResult):
    value: float = metric_field()
    token: str = metric_field()
    model_id: int = metric_field()
    rows: list = None


def fake_value(context, params) -> FakeResult:
    """A fake check: reports its parameters back, or crashes on request."""
    if params.crash:
        raise RuntimeError(f"fake check crashed on {params.token}")
    rows = [{"token": params.token, "prompt": "say " + params.token, "score": params.value}, {"token": "b", "score": 2.0}]
    return FakeResult(params.value, params.token, id(context.model), rows)


def fake_chart(result):
    return [("scores of " + result["token"], bar_chart([r["token"] for r in result["rows"]],
                                                        [r["score"] for r in result["rows"]]))]


if "fake_value" not in CHECKS:  # in-process runs share the registry: register once
    register_check("fake_value", params=FakeParams, area="superweights")(
        fake_value)
    chart_for("FakeResult")(fake_chart)
'''


load_checks()  # the real checks' modules too, for the same reason


@pytest.fixture(autouse=True)
def isolated_result_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Audits run by these tests keep their result cache in a temporary directory, never ~/.cache/lmaudit."""
    monkeypatch.setenv("LMAUDIT_CACHE", str(tmp_path_factory.mktemp("lmaudit-cache")))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture
def sandbox(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(FAKE_CONFTEST)
    (pytester.path / "audits").mkdir()
    return pytester


def run_audits(pytester: pytest.Pytester, model: Path, *extra: str) -> tuple[pytest.RunResult, dict]:
    result = pytester.runpytest_inprocess(
        "audits/", "--model", str(model), "--audit-json", "results.json", "-p", "no:cacheprovider", *extra
    )
    results_path = pytester.path / "results.json"
    data = json.loads(results_path.read_text()) if results_path.is_file() else {}
    return result, data


def write_audit(pytester: pytest.Pytester, text: str, name: str = "tiny.yaml") -> Path:
    path = pytester.path / "audits" / name
    path.write_text(text)
    return path


def report_html(pytester: pytest.Pytester) -> str:
    return (pytester.path / "audit-report.html").read_text()


def test_yaml_audit_passes_and_writes_report_json_and_verdict_line(sandbox: pytest.Pytester, tiny_dir: Path) -> None:
    write_audit(sandbox, """
audits:
  - name: value_is_small
    check: fake_value
    params: {value: 0.5}
    expect:
      value: {max: 1}
      token: {equals: tok}
""")
    result, data = run_audits(sandbox, tiny_dir, "--audit-report", "audit-report.html")
    result.assert_outcomes(passed=1)
    assert result.ret == 0
    assert data["schema"] == "lmaudit-results" and data["schema_version"] == 1 and data["verdict"] == "PASS"
    row = data["audits"][0]
    assert row["status"] == "passed" and row["check"] == "fake_value" and row["area"] == "superweights"
    assert [(c["metric"], c["expected"], c["measured"], c["passed"]) for c in row["comparisons"]] == [
        ("value", "≤ 1.0", 0.5, True), ("token", "== 'tok'", "tok", True)]
    assert row["result_type"] == "FakeResult" and row["result"]["rows"][0]["token"] == "tok"
    assert data["run"]["model"]["n_layers"] == 2 and len(data["run"]["model"]["content_hash"]) == 64
    assert set(data["run"]["environment"]) >= {"torch", "transformers", "lm-eval", "machine"}
    html = report_html(sandbox)
    summary = html[html.index('id="summary"'):html.index("Model card")]
    assert "value_is_small" in summary and "≤ 1.0" in summary and "0.5" in summary
    assert "<svg" in html and "scores of tok" in html
    lines = [line for line in result.outlines if line.startswith("lmaudit: ")]
    assert len(lines) == 1
    assert lines[0].startswith("lmaudit: PASS — 1 claim checked: 1 passed, 0 failed, 0 errors, 0 skipped; report: ")
    assert data["claims_checked"] == 1 and data["complete"] is True and data["not_run"] == []
    assert row["key"] == "tiny.yaml::value_is_small"
    assert str(sandbox.path / "audit-report.html") in lines[0]


def test_missed_threshold_fails_exit_code_1_report_and_junitxml_still_written(
    sandbox: pytest.Pytester, tiny_dir: Path
) -> None:
    write_audit(sandbox, """
audits:
  - name: too_big
    check: fake_value
    params: {value: 3.0}
    expect:
      value: {max: 2}
""")
    result, data = run_audits(sandbox, tiny_dir, "--junitxml", "junit.xml")
    result.assert_outcomes(failed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*too_big*missed its thresholds*", "*value: expected ≤ 2.0, measured 3"])
    assert data["verdict"] == "FAIL" and data["audits"][0]["status"] == "failed"
    assert "expected ≤ 2.0, measured 3" in data["audits"][0]["message"]
    assert "too_big" in report_html(sandbox)
    junit = (sandbox.path / "junit.xml").read_text()
    assert 'failures="1"' in junit and "too_big" in junit
    assert not list(sandbox.path.glob(".*.tmp")), "atomic writes leave no temporary file behind"
    assert any(line.startswith("lmaudit: FAIL — 1 claim checked: 0 passed, 1 failed") for line in result.outlines)


def test_crashing_check_gets_an_error_row_with_message_and_folded_traceback(
    sandbox: pytest.Pytester, tiny_dir: Path
) -> None:
    write_audit(sandbox, """
audits:
  - name: crashes
    check: fake_value
    params: {crash: true, token: boom}
    expect:
      value: {max: 1}
  - name: still_runs
    check: fake_value
""")
    result, data = run_audits(sandbox, tiny_dir)
    result.assert_outcomes(failed=1, passed=1)
    row = data["audits"][0]
    assert row["status"] == "error" and row["message"] == "RuntimeError: fake check crashed on boom"
    assert "Traceback" in row["traceback"] and "fake_value" in row["traceback"]
    html = report_html(sandbox)
    assert "<details><summary>traceback</summary>" in html and "fake check crashed on boom" in html
    assert data["counts"] == {"passed": 1, "failed": 0, "error": 1, "skipped": 0, "xfailed": 0, "xpassed": 0}


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("audits:\n  - {name: a, check: fake_valu}\n",
         r".*tiny\.yaml: audits\[0\] \(name 'a'\)\.check: Unknown check 'fake_valu'\. Did you mean: fake_value\? "
         r"Valid checks: .*fake_value.*"),
        ("audits:\n  - {name: a, check: fake_value, params: {valu: 1}}\n",
         r".*tiny\.yaml: .*params\.valu: unknown key 'valu' for check 'fake_value'\. Did you mean: value\? "
         r"Valid keys: value, token, crash"),
        ("audits:\n  - {name: a, check: fake_value, thresholds: {}}\n",
         r".*tiny\.yaml: audits\[0\] \(name 'a'\)\.thresholds: unknown key 'thresholds' in audit entry\..*"
         r"Valid keys: name, check, claim, description, params, expect, baseline, profiles, xfail"),
        ("audits:\n  - {name: a, check: fake_value, expect: {value: {maximum: 2}}}\n",
         r".*tiny\.yaml: .*expect\.value\.maximum: unknown key 'maximum' in threshold\. Did you mean: max\?.*"),
        ("audits:\n  - {name: a, check: fake_value, baseline: {value: {direction: down}}}\n",
         r".*tiny\.yaml: .*baseline\.value\.direction: .*'lower_is_better', 'higher_is_better' or 'no_change'.*"),
        ("audits:\n  - {name: a, check: fake_value, params: {value: many}}\n",
         r".*tiny\.yaml: .*params\.value: Input should be a valid number.*\(got 'many'\)"),
        ("audits:\n  - {name: a, check: fake_value, expect: {valu: {max: 2}}}\n",
         r".*tiny\.yaml: .*expect\.valu: check 'fake_value' has no metric 'valu'\. Did you mean: value\? "
         r"Valid metrics: value, token, model_id"),
        ("audits:\n  - {name: a, check: fake_value, expect: {value: {equals: 2, min: 1}}}\n",
         r".*tiny\.yaml: .*expect\.value: .*exactly one of.*"),
        ("audits:\n  - {name: a, check: fake_value, profiles: [fast]}\n",
         r".*tiny\.yaml: .*profiles\[0\]: Input should be 'quick' or 'full'.*"),
        ("audits: [\n", r".*tiny\.yaml: not valid YAML.*"),
    ],
)
def test_malformed_audit_file_fails_at_collection_naming_file_key_and_valid_names(
    sandbox: pytest.Pytester, tiny_dir: Path, text: str, pattern: str
) -> None:
    write_audit(sandbox, text)
    result, _ = run_audits(sandbox, tiny_dir, "--collect-only")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.re_match_lines([pattern])


def test_python_audit_uses_the_fixtures_area_marker_and_evidence(sandbox: pytest.Pytester, tiny_dir: Path) -> None:
    (sandbox.path / "audits" / "test_custom.py").write_text('''
import pytest


@pytest.mark.audit_area("bias")
def test_depth(audit_model, audit_context, audit_expect, audit_evidence):
    """Depth read through the adapter."""
    audit_expect("n_layers", audit_model.adapter.n_layers, equals=2)
    audit_expect("seed", audit_context.seed)
    audit_evidence({"note": "plain dicts work too"})


def test_plain_assert(audit_model):
    assert audit_model.adapter.n_layers == 3, "expected three layers"
''')
    result, data = run_audits(sandbox, tiny_dir)
    result.assert_outcomes(passed=1, failed=1)
    depth, plain = data["audits"]
    assert depth["area"] == "bias" and depth["description"] == "Depth read through the adapter."
    assert depth["metrics"] == {"n_layers": 2, "seed": 0} and len(depth["comparisons"]) == 1
    assert depth["result"] == {"note": "plain dicts work too"} and depth["result_type"] == "dict"
    assert plain["status"] == "failed" and plain["area"] == "other"
    assert "expected three layers" in plain["message"] and "assert" in plain["traceback"]


def test_profile_quick_skips_full_only_entries(sandbox: pytest.Pytester, tiny_dir: Path) -> None:
    write_audit(sandbox, """
audits:
  - name: full_only
    check: fake_value
    profiles: [full]
  - name: both
    check: fake_value
""")
    result, data = run_audits(sandbox, tiny_dir, "--audit-profile", "quick")
    result.assert_outcomes(skipped=1, passed=1)
    skipped = data["audits"][0]
    assert skipped["status"] == "skipped" and skipped["message"] == "not in profile 'quick' (runs in full)"
    assert data["verdict"] == "PASS" and data["run"]["profile"] == "quick"


def test_the_model_is_loaded_once_per_session(
    sandbox: pytest.Pytester, tiny_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lmaudit.checks.plugin.session as session_module

    loads: list[str] = []
    real = session_module.load_model

    def counting(spec: str, **kwargs):
        loads.append(spec)
        return real(spec, **kwargs)

    monkeypatch.setattr(session_module, "load_model", counting)
    write_audit(sandbox, "audits:\n  - {name: a, check: fake_value}\n  - {name: b, check: fake_value}\n")
    (sandbox.path / "audits" / "test_more.py").write_text(
        "def test_c(audit_model, audit_expect):\n    audit_expect('model_id', id(audit_model))\n")
    result, data = run_audits(sandbox, tiny_dir)
    result.assert_outcomes(passed=3)
    assert loads == [str(tiny_dir)]
    assert len({row["metrics"]["model_id"] for row in data["audits"]}) == 1


def test_unloadable_model_errors_every_item_and_still_reports(sandbox: pytest.Pytester, tmp_path: Path) -> None:
    write_audit(sandbox, "audits:\n  - {name: a, check: fake_value}\n  - {name: b, check: fake_value}\n")
    result, data = run_audits(sandbox, tmp_path / "missing-model", "--audit-report", "r.html")
    result.assert_outcomes(failed=2)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    assert [row["status"] for row in data["audits"]] == ["error", "error"]
    assert "missing-model" in data["audits"][1]["message"]
    assert data["run"]["model"]["loaded"] is False and "missing-model" in data["run"]["model"]["load_error"]
    assert data["verdict"] == "ERROR" and (sandbox.path / "r.html").exists()


BASELINE_AUDIT = """
audits:
  - name: guarded
    check: fake_value
    params: {{value: {value}}}
    baseline:
      value: {{direction: lower_is_better, rel: 0.1}}
"""


def test_baseline_deltas_tolerance_and_regression(sandbox: pytest.Pytester, tiny_dir: Path) -> None:
    write_audit(sandbox, BASELINE_AUDIT.format(value=1.0))
    result, data = run_audits(sandbox, tiny_dir)
    result.assert_outcomes(passed=1)
    assert data["audits"][0]["notes"] == ["baseline conditions not checked: no --audit-baseline given"]
    (sandbox.path / "results.json").rename(sandbox.path / "baseline.json")

    write_audit(sandbox, BASELINE_AUDIT.format(value=1.05))  # within 10 %: passes, delta shown
    result, data = run_audits(sandbox, tiny_dir, "--audit-baseline", "baseline.json")
    result.assert_outcomes(passed=1)
    delta = data["audits"][0]["baseline_deltas"][0]
    assert delta["metric"] == "value" and delta["baseline"] == 1.0 and delta["regression"] is False
    assert delta["delta"] == pytest.approx(0.05) and delta["rel_delta"] == pytest.approx(0.05)
    assert data["run"]["baseline"]["same_weights"] is True

    write_audit(sandbox, BASELINE_AUDIT.format(value=1.2))  # 20 % worse: a regression fails the audit
    result, data = run_audits(sandbox, tiny_dir, "--audit-baseline", "baseline.json", "--audit-report", "r.html")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*value: regressed vs baseline: expected ≤ 1.1 (baseline 1 + 0.1), measured 1.2*"])
    row = data["audits"][0]
    assert row["status"] == "failed" and row["baseline_deltas"][0]["regression"] is True
    html = (sandbox.path / "r.html").read_text()
    assert 'id="baseline-table"' in html and "(regression)" in html
    assert any("1 baseline regression" in line for line in result.outlines)

    write_audit(sandbox, BASELINE_AUDIT.format(value=1.0).replace("guarded", "renamed"))  # not in the baseline
    result, data = run_audits(sandbox, tiny_dir, "--audit-baseline", "baseline.json")
    result.assert_outcomes(failed=1)
    assert "expected a baseline value (audit not in baseline.json" in data["audits"][0]["message"]


def test_missing_baseline_file_is_a_usage_error(sandbox: pytest.Pytester, tiny_dir: Path) -> None:
    write_audit(sandbox, "audits:\n  - {name: a, check: fake_value}\n")
    result, _ = run_audits(sandbox, tiny_dir, "--audit-baseline", "nope.json")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--audit-baseline nope.json: no such file*--audit-json nope.json*"])


def test_a_session_without_audits_writes_nothing(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_plain="def test_ok():\n    assert True\n")
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert not (pytester.path / "audit-report.html").exists()
    assert not any(line.startswith("lmaudit:") for line in result.outlines)


# ------------------------------------------------------------------------------- baseline comparisons (unit)


@pytest.mark.parametrize(
    ("direction", "measured", "passed"),
    [("lower_is_better", 10.9, True), ("lower_is_better", 11.1, False), ("lower_is_better", 5.0, True),
     ("higher_is_better", 9.1, True), ("higher_is_better", 8.9, False), ("higher_is_better", 50.0, True),
     ("no_change", 10.9, True), ("no_change", 8.9, False), ("no_change", float("nan"), False)],
)
def test_compare_to_baseline_directions(direction: str, measured: float, passed: bool) -> None:
    tolerance = BaselineTolerance(direction=direction, rel=0.1)  # slack = 0.1 * 10 = 1
    comparison = compare_to_baseline("ppl", measured, 10.0, tolerance)
    assert comparison.passed is passed and comparison.kind == "baseline" and comparison.baseline == 10.0


def test_abs_tolerance_wins_when_larger_and_missing_values_never_pass() -> None:
    tolerance = BaselineTolerance(direction="lower_is_better", rel=0.01, abs=0.5)
    assert compare_to_baseline("x", 10.4, 10.0, tolerance).passed
    assert not compare_to_baseline("x", 1.0, None, tolerance, missing="audit not in b.json").passed
    assert compare_to_baseline("t", "a", "a", BaselineTolerance(direction="no_change")).passed
    assert not compare_to_baseline("t", "b", "a", BaselineTolerance(direction="no_change")).passed
    delta = metric_delta("x", 12.0, 10.0, None)
    assert (delta.delta, delta.rel_delta, delta.regression, delta.tolerance) == (2.0, 0.2, None, "")
    assert re.match(r"lower is better \(rel 0.01, abs 0.5\)", metric_delta("x", 12.0, 10.0, tolerance).tolerance)


# ------------------------------------------------------------------------------- options checked up front


def test_corpus_path_alone_is_the_session_corpus(sandbox: pytest.Pytester, tiny_dir: Path) -> None:
    (sandbox.path / "mine.txt").write_text("my own corpus text " * 50)
    write_audit(sandbox, "audits:\n  - {name: a, check: fake_value}\n")
    (sandbox.path / "audits" / "test_corpus.py").write_text(
        "def test_reads(audit_context, audit_expect):\n"
        "    audit_expect('corpus', audit_context.corpus().name)\n")
    result, data = run_audits(sandbox, tiny_dir, "--corpus-path", "mine.txt")
    result.assert_outcomes(passed=2)
    reads = next(row for row in data["audits"] if row["name"] == "test_reads")
    assert reads["metrics"] == {"corpus": "mine"}
    assert data["run"]["corpus"].startswith("mine: ") and reads["corpora"][0].startswith("mine: ")


@pytest.mark.parametrize(("args", "message"), [
    (["--corpus-path", "nowhere.txt"], "*--corpus-path nowhere.txt: no such file or directory*"),
    (["--corpus", "pydoc", "--corpus-path", "."], "*--corpus pydoc and --corpus-path . conflict*"),
    (["--corpus", "wikitxt2"], "*--corpus wikitxt2: neither a corpus name (pydoc, wikitext2) nor an existing*"),
    (["--device", "gpu"], "*--device gpu: expected auto, cpu, cuda, cuda:N or mps*"),
    (["--device-map", "nope.json"], "*--device-map nope.json: neither auto nor balanced nor * an existing JSON*"),
    (["--audit-pin", "pin.txt"], "*--audit-pin pin.txt: a pin is a YAML audit file*"),
    (["--audit-pins", "missing/"], "*--audit-pins missing: no such file or directory*"),
])
def test_options_that_cannot_work_are_usage_errors_before_anything_runs(
    sandbox: pytest.Pytester, tiny_dir: Path, args: list[str], message: str
) -> None:
    write_audit(sandbox, "audits:\n  - {name: a, check: fake_value}\n")
    result, data = run_audits(sandbox, tiny_dir, *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR and data == {}
    result.stderr.fnmatch_lines([message])


# ------------------------------------------------------------------------------- collection errors


@pytest.mark.parametrize(("text", "pattern"), [
    ("audits:\n  - name: a\n    check: fake_value\n    check: perplexity\n",
     r".*tiny\.yaml: line 4: duplicate key 'check' \(first at line 3\).*"),
    ("audits:\n  - {name: a, check: fake_value, expect: {value: {min: 2, max: 1}}}\n",
     r".*expect\.value: .*min \(2\.0\) is greater than max \(1\.0\): no value can pass.*"),
    ("audits:\n  - {name: a, check: fake_value}\n  - {name: a, check: fake_value}\n",
     r".*audits\[1\] \(name 'a'\)\.name: duplicate audit name 'a'.*"),
])
def test_duplicate_keys_and_impossible_thresholds_fail_collection_and_the_verdict_is_error(
    sandbox: pytest.Pytester, tiny_dir: Path, text: str, pattern: str
) -> None:
    write_audit(sandbox, text)
    result, data = run_audits(sandbox, tiny_dir)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.re_match_lines([pattern])
    assert data["verdict"] == "ERROR" and data["run"]["collection_errors"]


# ------------------------------------------------------------------------------- stable baseline keys


def test_baseline_matches_on_the_stable_key_when_the_rootdir_moves(sandbox: pytest.Pytester, tiny_dir: Path) -> None:
    write_audit(sandbox, BASELINE_AUDIT.format(value=1.0))
    result, data = run_audits(sandbox, tiny_dir)
    assert data["audits"][0]["key"] == "tiny.yaml::guarded"
    document = data
    # The same results as pytest would have written with another rootdir (node ids moved), and as an old file
    # that predates keys (node id only, under yet another prefix).
    document["audits"][0]["nodeid"] = "elsewhere/audits/tiny.yaml::guarded"
    (sandbox.path / "moved.json").write_text(json.dumps(document))
    del document["audits"][0]["key"]
    document["audits"][0]["nodeid"] = "../repo/audits/tiny.yaml::guarded"
    (sandbox.path / "old.json").write_text(json.dumps(document))
    write_audit(sandbox, BASELINE_AUDIT.format(value=1.5))
    for baseline in ("moved.json", "old.json"):
        result, data = run_audits(sandbox, tiny_dir, "--audit-baseline", baseline)
        result.assert_outcomes(failed=1)  # matched: the regression is found, not "audit not in baseline"
        deltas = {d["metric"]: d for d in data["audits"][0]["baseline_deltas"]}
        assert deltas["value"]["regression"] is True, baseline


@pytest.mark.parametrize(("mangle", "message"), [
    (lambda d: d.update(run=[1, 2]), "*\"run\" must be a mapping, got list*"),
    (lambda d: d["run"].update(model="x"), "*\"run.model\" must be a mapping*"),
    (lambda d: d["audits"][0].update(metrics=[]), "*audits[[]0[]].metrics must be a mapping*"),
])
def test_malformed_baseline_is_rejected_at_startup(sandbox: pytest.Pytester, tiny_dir: Path, mangle, message) -> None:
    write_audit(sandbox, BASELINE_AUDIT.format(value=1.0))
    _, data = run_audits(sandbox, tiny_dir)
    mangle(data)
    (sandbox.path / "bad.json").write_text(json.dumps(data))
    result, _ = run_audits(sandbox, tiny_dir, "--audit-baseline", "bad.json")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_precision_and_placement_reach_the_loader_the_card_and_the_report(
    sandbox: pytest.Pytester, tiny_dir: Path
) -> None:
    write_audit(sandbox, "audits:\n  - {name: a, check: fake_value}\n")
    result, data = run_audits(sandbox, tiny_dir, "--audit-dtype", "bfloat16", "--device", "cpu")
    assert result.ret == 0
    assert data["run"]["model"]["dtype"] == "bfloat16" and data["run"]["precision"]["dtype"] == "bfloat16"
    assert data["run"]["precision"]["device"] == "cpu" and data["run"]["model"]["layer_devices"] == ["cpu", "cpu"]
    assert "measured at <code>bfloat16</code> on <code>cpu</code>" in report_html(sandbox)
    (sandbox.path / "map.json").write_text(json.dumps({"": "cpu"}))
    result, data = run_audits(sandbox, tiny_dir, "--device-map", "map.json")
    assert result.ret == 0, result.outlines
    assert data["run"]["model"].get("content_hash") and data["run"]["precision"]["device_map"] == "map.json"


# ------------------------------------------------------------------------------- the harness self-check's gates


def _selfcheck():
    """``audits/test_harness_selfcheck.py`` as a module (``audits`` is not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "audits" / "test_harness_selfcheck.py"
    spec = importlib.util.spec_from_file_location("lmaudit_harness_selfcheck", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_loaded():
    import torch

    from lmaudit.checks.core.loading import LoadedModel
    from tests.checkpoints import byte_tokenizer
    from tests.tiny_models import tiny_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield LoadedModel.from_model(tiny_model("llama"), byte_tokenizer())
    torch.set_num_threads(threads)


def test_selfcheck_gates_hold_on_a_sound_harness(tiny_loaded) -> None:
    from lmaudit.checks.harness.thresholds import Threshold, compare

    selfcheck = _selfcheck()
    changed = selfcheck.changed_tensors(tiny_loaded, selfcheck.every_kind_of_intervention(tiny_loaded.adapter))
    assert compare("changed_tensors", len(changed), Threshold(**selfcheck.RESTORED)).passed
    assert compare("max", selfcheck.layer_skip_difference(tiny_loaded), Threshold(**selfcheck.EXACT_SKIP)).passed


@pytest.mark.counterexample("test_harness_selfcheck::test_interventions_restore_the_model.changed_tensors")
def test_selfcheck_restore_gate_fails_on_a_leaky_intervention(tiny_loaded) -> None:
    """An intervention that edits a weight and does not put it back is caught, and the weight named."""
    import contextlib

    import torch

    from lmaudit.checks.harness.thresholds import Threshold, compare

    selfcheck = _selfcheck()
    weight = tiny_loaded.adapter.down_proj(1).weight
    original = weight.detach().clone()

    @contextlib.contextmanager
    def leaky():
        with torch.no_grad():
            weight[0, 0] += 1.0  # never restored
        yield

    try:
        changed = selfcheck.changed_tensors(tiny_loaded, [*selfcheck.every_kind_of_intervention(tiny_loaded.adapter),
                                                          leaky()])
        assert changed == [tiny_loaded.adapter.module_name(tiny_loaded.adapter.down_proj(1)) + ".weight"]
        assert not compare("changed_tensors", len(changed), Threshold(**selfcheck.RESTORED)).passed
    finally:
        with torch.no_grad():
            weight.copy_(original)


@pytest.mark.counterexample("test_harness_selfcheck::test_layer_skip_is_exact.max_abs_logit_difference")
def test_selfcheck_layer_skip_gate_fails_on_a_wrong_hidden_state(tiny_loaded) -> None:
    """Feeding layer L the state that enters layer L-1 (an off-by-one in a sweep) moves the logits far beyond the
    gate."""
    from lmaudit.checks.harness.thresholds import Threshold, compare

    selfcheck = _selfcheck()
    worst = selfcheck.layer_skip_difference(tiny_loaded, hidden_for=lambda states, layer: states[layer - 1])
    assert worst > 1e-2 and not compare("max", worst, Threshold(**selfcheck.EXACT_SKIP)).passed
