"""The pytest plugin end to end: YAML audits collected as items, thresholds, errors, and the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.checkpoints import save_tiny_llama


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


def run_audits(pytester: pytest.Pytester, tiny_dir: Path, *extra: str) -> tuple[pytest.RunResult, dict]:
    result = pytester.runpytest_inprocess(
        "audits/", "--model", str(tiny_dir), "--audit-json", "results.json", "-p", "no:cacheprovider", *extra
    )
    results_path = pytester.path / "results.json"
    data = json.loads(results_path.read_text()) if results_path.exists() else {}
    return result, data


def write_audit(pytester: pytest.Pytester, text: str, name: str = "tiny.yaml") -> Path:
    audits = pytester.path / "audits"
    audits.mkdir(exist_ok=True)
    path = audits / name
    path.write_text(text)
    return path


def test_yaml_audit_passes_and_writes_report_and_json(pytester: pytest.Pytester, tiny_dir: Path) -> None:
    write_audit(pytester, """
audits:
  - name: two_layers
    check: architecture
    expect:
      n_layers: {equals: 2}
      n_heads: {min: 1}
""")
    result, data = run_audits(pytester, tiny_dir)
    result.assert_outcomes(passed=1)
    assert data["schema_version"] == 1 and data["verdict"] == "PASS"
    row = data["audits"][0]
    assert row["status"] == "passed" and row["check"] == "architecture"
    assert {c["metric"] for c in row["comparisons"]} == {"n_layers", "n_heads"}
    assert (pytester.path / "audit-report.html").read_text().count("two_layers") >= 2
    assert any("lmaudit: PASS" in line for line in result.outlines)


def test_missed_threshold_fails_with_readable_message_and_report_is_still_written(
    pytester: pytest.Pytester, tiny_dir: Path
) -> None:
    write_audit(pytester, """
audits:
  - name: wrong_depth
    check: architecture
    expect:
      n_layers: {equals: 30}
""")
    result, data = run_audits(pytester, tiny_dir)
    result.assert_outcomes(failed=1)
    assert result.ret == 1
    result.stdout.fnmatch_lines(["*n_layers: expected == 30, measured 2*"])
    assert data["verdict"] == "FAIL" and data["audits"][0]["status"] == "failed"


def test_crashing_check_gets_an_error_row_with_traceback(pytester: pytest.Pytester, tiny_dir: Path) -> None:
    write_audit(pytester, """
audits:
  - name: ppl_on_missing_corpus
    check: perplexity
    expect:
      perplexity: {max: 1000}
""")
    result, data = run_audits(pytester, tiny_dir, "--corpus", "no-such-corpus")
    result.assert_outcomes(failed=1)
    row = data["audits"][0]
    assert row["status"] == "error"
    assert "no-such-corpus" in row["message"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("audits:\n  - {name: a, check: architecure}\n", ["*tiny.yaml*audits[0]*check*Unknown check 'architecure'. Did you mean: architecture?*"]),
        ("audits:\n  - {name: a, check: architecture, params: {foo: 1}}\n", ["*tiny.yaml*params.foo*unknown key 'foo'*"]),
        ("audits:\n  - {name: a, check: architecture, thresholds: {}}\n", ["*tiny.yaml*audits[0]*thresholds*unknown key 'thresholds'*Valid keys: name, check*"]),
        ("audits:\n  - {name: a, check: perplexity, params: {seq_len: many}}\n", ["*tiny.yaml*params.seq_len*integer*"]),
        ("audits:\n  - {name: a, check: architecture, expect: {layers: {equals: 2}}}\n", ["*tiny.yaml*expect.layers*no metric 'layers'*Valid metrics:*"]),
        ("audits:\n  - {name: a, check: architecture, expect: {n_layers: {equals: 2, min: 1}}}\n", ["*tiny.yaml*expect*exactly one of*"]),
        ("audits: [\n", ["*tiny.yaml: not valid YAML*"]),
    ],
)
def test_malformed_audit_file_fails_at_collection_naming_file_and_key(
    pytester: pytest.Pytester, tiny_dir: Path, text: str, expected: list[str]
) -> None:
    write_audit(pytester, text)
    result, _ = run_audits(pytester, tiny_dir, "--collect-only")
    assert result.ret != 0
    result.stdout.fnmatch_lines(expected)


def test_python_audit_uses_the_same_fixtures_and_is_recorded(pytester: pytest.Pytester, tiny_dir: Path) -> None:
    audits = pytester.path / "audits"
    audits.mkdir()
    (audits / "test_custom.py").write_text('''
def test_depth(audit_model, audit_expect):
    """Depth read through the adapter."""
    audit_expect("n_layers", audit_model.adapter.n_layers, equals=2)
''')
    result, data = run_audits(pytester, tiny_dir)
    result.assert_outcomes(passed=1)
    assert data["audits"][0]["metrics"] == {"n_layers": 2}


def test_profile_skips_items_not_in_it(pytester: pytest.Pytester, tiny_dir: Path) -> None:
    write_audit(pytester, """
audits:
  - name: full_only
    check: architecture
    profiles: [full]
""")
    result, data = run_audits(pytester, tiny_dir, "--audit-profile", "quick")
    result.assert_outcomes(skipped=1)
    assert data["audits"][0]["status"] == "skipped" and "profile" in data["audits"][0]["message"]


def test_unknown_model_errors_every_item_and_still_reports(pytester: pytest.Pytester, tmp_path: Path) -> None:
    write_audit(pytester, "audits:\n  - {name: a, check: architecture}\n")
    result, data = run_audits(pytester, tmp_path / "missing-model")
    result.assert_outcomes(failed=1)
    assert data["audits"][0]["status"] == "error" and "unknown model" in data["audits"][0]["message"]
