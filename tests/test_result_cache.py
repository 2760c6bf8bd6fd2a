"""The result cache: a check's result is reused only when everything that determines it is the same, is stored as
plain JSON (never unpickled), survives no tampering, and is marked in the report; one session computes two
identical entries once; ``--audit-no-cache`` neither reads nor writes.

The fake check counts its own runs in ``calls.txt``, so "reused" means "not computed", not just "same value".
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from lmaudit.checks.harness.result_cache import CacheKey, ResultCache, StoredResult
from tests.checkpoints import save_tiny_llama
from tests.test_plugin import FAKE_CONFTEST, write_audit
from tests.test_plugin import tiny_dir as tiny_dir  # noqa: F401  (the module-scoped tiny model fixture)

COUNT_CONFTEST = FAKE_CONFTEST + '''

from pathlib import Path

from lmaudit.checks.core.errors import PremiseMissing


class CountParams(CheckParams):
    value: float = 1.0
    premise: bool = True


def fake_count(context, params) -> FakeResult:
    """Counts its runs; reads the session corpus."""
    with open("calls.txt", "a") as handle:
        handle.write(f"{params.value}\\n")
    if not params.premise:
        raise PremiseMissing("nothing planted to count")
    text = context.corpus().text
    return FakeResult(params.value, text[:5], len(text), [{"token": "<script>x</script>", "score": params.value}])


CHECKS.pop("fake_count", None)  # in-process runs share the registry: this conftest's function, not an earlier one's
register_check("fake_count", params=CountParams, area="model")(fake_count)
'''

ONE = "audits:\n  - {{name: counted, check: fake_count, params: {{value: 2.0}}, expect: {{value: {{{bound}: 1.5}}}}}}\n"


@pytest.fixture
def sandbox(pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    monkeypatch.setenv("LMAUDIT_CACHE", str(tmp_path / "cache"))
    pytester.makeconftest(COUNT_CONFTEST)
    (pytester.path / "audits").mkdir()
    return pytester


def run(pytester: pytest.Pytester, model: Path, *args: str) -> tuple[pytest.RunResult, dict]:
    result = pytester.runpytest_inprocess("audits/", "--model", str(model), "--audit-json", "r.json",
                                          "-p", "no:cacheprovider", *args)
    path = pytester.path / "r.json"
    return result, json.loads(path.read_text()) if path.is_file() else {}


def calls(pytester: pytest.Pytester) -> int:
    path = pytester.path / "calls.txt"
    return len(path.read_text().splitlines()) if path.exists() else 0


def cache_files(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "cache" / "results").rglob("*.json"))


def test_a_threshold_only_change_reuses_the_result_and_compares_afresh(
    sandbox: pytest.Pytester, tiny_dir: Path, tmp_path: Path  # noqa: F811
) -> None:
    write_audit(sandbox, ONE.format(bound="min"))
    result, data = run(sandbox, tiny_dir)
    assert result.ret == 0 and calls(sandbox) == 1 and data["audits"][0]["reused"] is None
    [stored] = cache_files(tmp_path)
    assert json.loads(stored.read_text())["schema"] == "lmaudit-result-cache"

    write_audit(sandbox, ONE.format(bound="max"))  # the same check and parameters, another threshold
    result, data = run(sandbox, tiny_dir, "--audit-report", "r.html")
    row = data["audits"][0]
    assert calls(sandbox) == 1, "reused, not recomputed"
    assert row["status"] == "failed" and row["comparisons"][0]["measured"] == 2.0
    assert row["reused"]["from"] == "cache" and row["result_type"] == "FakeResult"
    assert data["run"]["cache"]["reused"] == 1
    assert any(line.startswith("lmaudit: 1 result reused (1 from the result cache") for line in result.outlines)
    html = (sandbox.path / "r.html").read_text()
    assert 'class="reused"' in html and "Result reused from the result cache" in html
    assert "<script>x</script>" not in html, "a reused result is rendered (escaped) like a fresh one"


@pytest.mark.parametrize("change", ["params", "seed", "profile", "weights", "corpus", "source"])
def test_anything_that_determines_the_result_invalidates_it(
    sandbox: pytest.Pytester, tiny_dir: Path, tmp_path: Path, change: str  # noqa: F811
) -> None:
    write_audit(sandbox, ONE.format(bound="min"))
    run(sandbox, tiny_dir)
    model, args = tiny_dir, []
    if change == "params":
        write_audit(sandbox, ONE.format(bound="min").replace("2.0", "3.0"))
    elif change == "seed":
        args = ["--audit-seed", "1"]
    elif change == "profile":
        args = ["--audit-profile", "quick"]
    elif change == "weights":
        model = save_tiny_llama(tmp_path / "other", seed=1)
    elif change == "corpus":
        (sandbox.path / "mine.txt").write_text("another corpus entirely")
        args = ["--corpus-path", "mine.txt"]
    else:  # the check's own source file (a team's check in its conftest) changed
        sandbox.makeconftest(COUNT_CONFTEST + "\n# edited\n")
    result, data = run(sandbox, model, *args)
    assert calls(sandbox) == 2 and data["audits"][0]["reused"] is None, change


def test_one_session_computes_identical_entries_once(sandbox: pytest.Pytester, tiny_dir: Path) -> None:  # noqa: F811
    write_audit(sandbox, """
audits:
  - {name: first, check: fake_count, params: {value: 2.0}, expect: {value: {min: 1}}}
  - {name: second, check: fake_count, params: {value: 2.0}, expect: {value: {max: 1}}}
""")
    result, data = run(sandbox, tiny_dir, "--audit-no-cache")
    first, second = data["audits"]
    assert calls(sandbox) == 1
    assert first["status"] == "passed" and first["reused"] is None
    assert second["status"] == "failed" and second["reused"]["from"] == "session"
    assert second["reused"]["first"].endswith("::first")


def test_no_cache_neither_reads_nor_writes(sandbox: pytest.Pytester, tiny_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    write_audit(sandbox, ONE.format(bound="min"))
    run(sandbox, tiny_dir, "--audit-no-cache")
    assert cache_files(tmp_path) == []
    run(sandbox, tiny_dir)
    result, data = run(sandbox, tiny_dir, "--audit-no-cache")
    assert calls(sandbox) == 3 and data["audits"][0]["reused"] is None
    assert data["run"]["cache"]["enabled"] is False


def test_a_missing_premise_is_reused_as_a_skip_with_its_reason(
    sandbox: pytest.Pytester, tiny_dir: Path  # noqa: F811
) -> None:
    write_audit(sandbox, "audits:\n  - {name: p, check: fake_count, params: {premise: false}}\n")
    run(sandbox, tiny_dir)
    result, data = run(sandbox, tiny_dir)
    row = data["audits"][0]
    assert calls(sandbox) == 1
    assert row["status"] == "skipped" and row["message"] == "premise missing: nothing planted to count"
    assert row["reused"]["from"] == "cache"


@pytest.mark.parametrize("tamper", ["garbage", "pickle", "other_key", "wrong_types"])
def test_a_tampered_cache_file_is_ignored_and_recomputed(
    sandbox: pytest.Pytester, tiny_dir: Path, tmp_path: Path, tamper: str  # noqa: F811
) -> None:
    write_audit(sandbox, ONE.format(bound="min"))
    run(sandbox, tiny_dir)
    [path] = cache_files(tmp_path)
    document = json.loads(path.read_text())
    if tamper == "garbage":
        path.write_text("{not json")
    elif tamper == "pickle":
        path.write_bytes(pickle.dumps({"metrics": {"value": 99.0}}))
    elif tamper == "other_key":
        document["key"]["check"] = "something_else"
        document["entry"]["metrics"]["value"] = 99.0
        path.write_text(json.dumps(document))
    else:
        document["entry"]["metrics"] = "value=99"
        path.write_text(json.dumps(document))
    result, data = run(sandbox, tiny_dir)
    assert calls(sandbox) == 2 and data["audits"][0]["metrics"]["value"] == 2.0
    assert data["audits"][0]["reused"] is None and data["run"]["cache"]["ignored"]


def test_result_cache_unit(tmp_path: Path) -> None:
    cache = ResultCache(tmp_path)
    key = CacheKey.of({"check": "c", "params": {"a": 1}})
    assert cache.lookup(key) is None
    cache.store(key, StoredResult("R", {"x": [1, 2]}, {"m": 1.5}, ["pydoc: ..."], 3.0), "a.yaml::e")
    fresh = ResultCache(tmp_path)
    stored, origin = fresh.lookup(key)
    assert stored.metrics == {"m": 1.5} and stored.result == {"x": [1, 2]} and origin["from"] == "cache"
    assert origin["original_duration_s"] == 3.0 and stored.created
    assert CacheKey.of({"params": {"a": 1}, "check": "c"}).digest == key.digest  # key order does not matter
    assert ResultCache(None).path(key) is None
